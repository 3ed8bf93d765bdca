"""Fault injection between the agent and a real Mosquitto, with the telemetry store as the judge.

* A broker outage of "10 minutes" of data (replayed at 20x, so 30 s of wall time): every seq of every non-video
  stream reaches the store (telemetry.ingest.Ingest + SQLite) exactly once, and the store's receipts reach the agent.
* The agent process killed with SIGKILL mid-stream (``python -m ambulance_agent``) and restarted: the same.
* A 64 kbit/s link (the fault proxy of ambulance_agent.faultproxy): the pre-alert arrives within 2 s while ECG backs
  off, and ECG catches up afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from ambulance_agent.app import Agent
from ambulance_agent.crypto import UnitCipher, generate_unit_key
from ambulance_agent.delivery import DeliveryStage
from ambulance_agent.faultproxy import FaultProxy
from ambulance_agent.outbox import Outbox
from ambulance_agent.sources import NumericsVitalsReplay, RouteGpsReplay, WfdbEcgReplay
from broker_config import (
    Availability,
    BrokerSettings,
    CaseType,
    EcgChunk,
    Findings,
    PreAlert,
    Stream,
    TopicSpace,
    Vitals,
    decode,
    utc_now,
)
from telemetry.ingest import Ingest
from telemetry.store import Store, open_store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RECORD_100 = ROOT / "simulators" / "data" / "mitdb" / "100"
NUMERICS = ROOT / "simulators" / "data" / "mimic2wdb_numerics" / "s25047-2704-05-04-10-44n"
ROUTE_DEG = [(43.7384, 7.4246), (43.7360, 7.4215), (43.7311, 7.4197), (43.7275, 7.4148)]
UNIT_KEY = generate_unit_key()
COUNTED = (Stream.ECG, Stream.VITALS, Stream.GPS, Stream.STATUS, Stream.PREALERT)
PERSISTENT_BROKER = "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {dir}/\n"


async def wait_condition(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> None:
    """Poll a condition that has no event of its own (another process, a link going down), bounded."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - no event exists for these conditions; bounded by the deadline
            await asyncio.sleep(poll_s)


async def wait_async(predicate: Callable[[], Any], timeout_s: float, poll_s: float = 0.2) -> None:
    """Poll an async condition (a store query), bounded."""
    async with asyncio.timeout(timeout_s):
        while not await predicate():  # noqa: ASYNC110 - a store query has no event; bounded by the deadline
            await asyncio.sleep(poll_s)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = open_store(f"sqlite:///{tmp_path}/store.sqlite3")
    await s.migrate()
    yield s
    await s.close()


@contextlib.asynccontextmanager
async def running_ingest(store: Store, broker: BrokerSettings, space: TopicSpace) -> AsyncIterator[Ingest]:
    client_id = f"test-ingest-{uuid.uuid4().hex[:10]}"
    ingest = Ingest(store, broker, space, client_id=client_id, batch_age_s=0.05, receipt_interval_s=0.5)
    task = asyncio.create_task(ingest.run())
    try:
        await ingest.link.wait_connected(15)
        yield ingest
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(aiomqtt.MqttError):
            async with aiomqtt.Client(broker.host, broker.port, identifier=client_id, clean_session=True):
                pass  # the broker forgets the test's persistent session


@contextlib.asynccontextmanager
async def running(coro: Any) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(coro)
    try:
        yield task
        if task.done() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    finally:
        task.cancel()
        async with asyncio.timeout(15):
            await asyncio.gather(task, return_exceptions=True)


async def stored(store: Store, unit: str, stream: Stream) -> list[int]:
    return await store.seqs(unit, stream)


async def assert_exactly_once(store: Store, unit: str, next_seq: dict[Stream, int], first: int) -> None:
    """Every seq from the outbox's first (its wall-clock seed) to the next unallocated one, exactly once."""
    for stream, n in next_seq.items():
        assert await stored(store, unit, stream) == list(range(first, n)), stream


async def test_ten_minute_broker_outage_loses_nothing_and_receipts_follow(
    private_mosquitto: type, topic_space: TopicSpace, store: Store, tmp_path: Path
) -> None:
    broker = private_mosquitto(PERSISTENT_BROKER)
    broker.start()
    settings = broker.settings()
    unit = f"amb-{uuid.uuid4().hex[:8]}"
    pace, data_s = 20.0, 720.0  # 12 min of data in 36 s; the broker is down for 10 of them
    agent = Agent(
        unit,
        settings,
        topic_space,
        outbox_path=tmp_path / "outbox.db",
        ecg=WfdbEcgReplay(RECORD_100, pace=pace, stop_s=data_s),
        vitals=NumericsVitalsReplay(NUMERICS, start_min=2, pace=pace, stop_s=data_s),
        gps=RouteGpsReplay(ROUTE_DEG, speed_mps=15, pace=pace, stop_s=data_s),
        live_window_s=2.0,
    )
    s0 = agent.outbox.first_seq  # a new outbox: its counters start at the wall clock in microseconds
    async with running_ingest(store, settings, topic_space) as ingest, running(agent.run()):
        await agent.link.wait_connected(15)
        await wait_async(lambda: _has(store, unit, Stream.ECG, 20), timeout_s=30)
        await asyncio.to_thread(broker.stop)
        outage_started = time.monotonic()
        await wait_condition(lambda: not agent.link_health().connected, timeout_s=15)
        alert_id = await agent.prealert(CaseType.STROKE, Findings(age_years=71, be_fast_positive=True, lams=4))
        await wait_condition(lambda: time.monotonic() - outage_started >= 600 / pace, timeout_s=60)
        backlog = agent.link_health()
        await asyncio.to_thread(broker.start)
        # the sources end; the backlog drains; the store says everything is stored
        await wait_condition(
            lambda: agent.outbox.peek_seq(Stream.ECG) == s0 + 720 and agent.outbox.peek_seq(Stream.GPS) == s0 + 720,
            timeout_s=60,
        )
        await wait_condition(lambda: agent.link_health().backlog_count == 0, timeout_s=90)
        next_seq = {s: agent.outbox.peek_seq(s) for s in COUNTED}
        await wait_async(lambda: _complete(store, unit, next_seq, s0), timeout_s=60)
        await agent.wait_until(
            # through the last seq of every stream that sent any (-1: a stream that sent nothing, e.g. status)
            lambda: all(
                agent.delivery.stored_through.get(s.value, -1) == (n - 1 if n > s0 else -1) for s, n in next_seq.items()
            ),
            timeout_s=20,
        )
        delivery = agent.delivery.prealert(alert_id)
        assert delivery is not None
        assert delivery.stage is DeliveryStage.STORED
        assert agent.delivery.ecg_summary().stored == agent.delivery.ecg_summary().tracked
        stats = ingest.stats
    assert backlog.backlog_count > 500, "ten minutes of vitals, ECG and GPS waited in the outbox"
    assert backlog.oldest_unsent_age_s is not None
    assert backlog.watchdog_stale, "the watchdog noticed (FF-03)"
    await assert_exactly_once(store, unit, next_seq, s0)
    assert stats.receipts_published >= 2
    samples = await store.ecg_samples(unit)
    record = WfdbEcgReplay(RECORD_100).record_samples()
    np.testing.assert_array_equal(samples, record[:, : 720 * 360])
    assert "Error saving" not in broker.log.read_text()
    agent.close()


async def _has(store: Store, unit: str, stream: Stream, n: int) -> bool:
    return len(await store.seqs(unit, stream)) >= n


async def _complete(store: Store, unit: str, next_seq: dict[Stream, int], first: int) -> bool:
    for stream, n in next_seq.items():
        if await store.seqs(unit, stream) != list(range(first, n)):
            return False
    return True


def agent_env(unit: str, broker: BrokerSettings, space: TopicSpace, outbox: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMS_AGENT_", "EMS_MQTT_"))}
    env.update(
        EMS_AGENT_UNIT_ID=unit,
        EMS_AGENT_BROKER_URL=f"mqtt://{broker.host}:{broker.port}",
        EMS_AGENT_TOPIC_PREFIX=space.prefix,
        EMS_AGENT_OUTBOX_PATH=str(outbox),
        EMS_AGENT_ECG_WFDB_RECORD=str(RECORD_100),
        EMS_AGENT_VITALS_NUMERICS_RECORD=str(NUMERICS),
        EMS_AGENT_CREW_SCREEN_PORT="off",
        EMS_AGENT_BANDWIDTH_BPS="off",
        EMS_AGENT_LOG_LEVEL="WARNING",
        EMS_AGENT_UNIT_KEY=base64.b64encode(UNIT_KEY).decode(),  # the outbox is sealed at rest, as in a vehicle
        **extra,
    )
    return env


async def start_agent_process(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ambulance_agent", env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL
    )


async def test_agent_killed_with_sigkill_and_restarted_loses_nothing(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace, store: Store, tmp_path: Path
) -> None:
    unit = f"amb-{uuid.uuid4().hex[:8]}"
    outbox_path = tmp_path / "outbox.db"
    env = agent_env(unit, mqtt_settings, topic_space, outbox_path, EMS_AGENT_PACE="20", EMS_AGENT_REPLAY_STOP_S="60")
    availability: list[Availability] = []
    async with (
        running_ingest(store, mqtt_settings, topic_space),
        aiomqtt.Client(mqtt_settings.host, mqtt_settings.port, identifier=f"w-{uuid.uuid4().hex[:8]}") as watcher,
    ):
        await watcher.subscribe(topic_space.filter(Stream.AVAILABILITY, unit), qos=1)

        async def watch() -> None:
            async for message in watcher.messages:
                assert isinstance(message.payload, bytes)
                model = decode(topic_space, message.topic.value, message.payload)[1]
                assert isinstance(model, Availability)
                availability.append(model)

        async with running(watch()):
            first = await start_agent_process(env)
            try:
                await wait_async(lambda: _has(store, unit, Stream.ECG, 10), timeout_s=60)
                first.send_signal(signal.SIGKILL)
                assert await first.wait() == -signal.SIGKILL
            finally:
                if first.returncode is None:
                    first.kill()
            await wait_condition(lambda: any(a.state == "offline" for a in availability), timeout_s=30)
            killed_session = next(a.seq for a in availability if a.state == "offline")

            second = await start_agent_process(env)
            # read-only use next to the running agent (WAL readers never block)
            reader = Outbox(outbox_path, cipher=UnitCipher(unit, UNIT_KEY))
            try:

                async def drained() -> bool:
                    next_seq = {s: reader.peek_seq(s) for s in (Stream.ECG, Stream.VITALS)}
                    s0 = reader.first_seq
                    return next_seq[Stream.ECG] - s0 >= 70 and await _complete(store, unit, next_seq, s0)

                await wait_async(drained, timeout_s=90)
                second.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(second.wait(), 30) == 0
            finally:
                reader.close()
                if second.returncode is None:
                    second.kill()
            await wait_condition(lambda: availability[-1].state == "offline", timeout_s=15)
    after = Outbox(outbox_path, cipher=UnitCipher(unit, UNIT_KEY))
    next_seq = {s: after.peek_seq(s) for s in (Stream.ECG, Stream.VITALS)}
    s0 = after.first_seq
    left = after.stats().count
    after.close()
    assert left == 0, "nothing left behind in the outbox"
    assert next_seq[Stream.ECG] - s0 >= 70, "two runs of 60 s of ECG, minus what the kill cut short"
    await assert_exactly_once(store, unit, next_seq, s0)
    sessions = [(a.state, a.seq) for a in availability]
    assert ("offline", killed_session) in sessions, "the will fired for the killed process"
    assert any(state == "online" and seq > killed_session for state, seq in sessions), "a new session after restart"


@pytest.mark.parametrize("budget", ["configured", "measured"])
async def test_prealert_within_2_s_on_a_64_kbit_link_while_ecg_backs_off(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace, tmp_path: Path, budget: str
) -> None:
    unit = f"amb-{uuid.uuid4().hex[:8]}"
    pace, data_s = 15.0, 150.0  # ~84 kbit/s of ECG alone at 15x, plus vitals and GPS: far more than the link
    arrivals: dict[Stream, list[tuple[float, Any]]] = {s: [] for s in (Stream.PREALERT, Stream.ECG, Stream.VITALS)}
    async with (
        FaultProxy(mqtt_settings.port, up_bps=64_000, down_bps=64_000, delay_s=0.05) as proxy,
        aiomqtt.Client(mqtt_settings.host, mqtt_settings.port, identifier=f"c-{uuid.uuid4().hex[:8]}") as sub,
    ):
        await sub.subscribe([(topic_space.filter(s, unit), 1) for s in arrivals])

        async def collect() -> None:
            async for message in sub.messages:
                assert isinstance(message.payload, bytes)
                parsed, model = decode(topic_space, message.topic.value, message.payload)
                arrivals[parsed.stream].append((time.monotonic(), model))

        agent = Agent(
            unit,
            mqtt_settings.model_copy(update={"port": proxy.port}),
            topic_space,
            outbox_path=tmp_path / "outbox.db",
            ecg=WfdbEcgReplay(RECORD_100, pace=pace, stop_s=data_s),
            vitals=NumericsVitalsReplay(NUMERICS, start_min=2, pace=pace, stop_s=data_s),
            gps=RouteGpsReplay(ROUTE_DEG, speed_mps=15, pace=pace, stop_s=data_s),
            bandwidth_bps=56_000 if budget == "configured" else None,
            adaptive_bandwidth=budget == "measured",
        )
        async with running(collect()), running(agent.run()):
            await agent.link.wait_connected(15)
            await wait_condition(lambda: agent.link_health().backlog_count >= 40, timeout_s=30)
            sent_at = time.monotonic()
            alert_id = await agent.prealert(CaseType.STEMI, Findings(age_years=58, ecg_st_elevation=True))
            await wait_condition(lambda: bool(arrivals[Stream.PREALERT]), timeout_s=10)
            latency_s = arrivals[Stream.PREALERT][0][0] - sent_at
            ecg_backlog = agent.outbox.peek_seq(Stream.ECG) - agent.outbox.first_seq - len(arrivals[Stream.ECG])
            n_ecg = int(data_s)
            await wait_condition(lambda: len({m.seq for _, m in arrivals[Stream.ECG]}) >= n_ecg, timeout_s=120)
        agent.close()
    prealert: PreAlert = arrivals[Stream.PREALERT][0][1]
    assert prealert.alert_id == alert_id
    print(f"{budget}: prealert latency {latency_s:.3f} s, ecg backlog {ecg_backlog}, {agent.link_health()}")  # noqa: T201
    assert latency_s <= 2.0, f"pre-alert took {latency_s:.2f} s on 64 kbit/s"
    assert ecg_backlog >= 10, "ECG was backing off when the pre-alert went"
    chunks: list[EcgChunk] = [m for _, m in arrivals[Stream.ECG]]
    s0 = agent.outbox.first_seq
    assert {c.seq for c in chunks} == set(range(s0, s0 + n_ecg)), "ECG caught up, every chunk"
    assert any(c.historical for c in chunks), "the backlog arrived flagged historical"
    vitals: list[Vitals] = [m for _, m in arrivals[Stream.VITALS]]
    assert vitals
    up_kbit_s = proxy.counters.up_bytes * 8 / 1000
    assert up_kbit_s > 0
    assert utc_now() > prealert.sent_at


async def test_a_unit_that_lost_its_outbox_never_has_new_data_dropped_as_duplicates(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace, store: Store, tmp_path: Path
) -> None:
    """The tablet is replaced (outbox and counters gone) and the agent restarts: the new outbox's seqs start above
    every seq the unit sent before, so the store keeps the new data instead of dropping it as duplicates."""
    unit = f"amb-{uuid.uuid4().hex[:8]}"
    outbox_path = tmp_path / "vehicle" / "outbox.db"
    runs: list[list[int]] = []
    async with running_ingest(store, mqtt_settings, topic_space):
        for run in range(2):
            agent = Agent(
                unit,
                mqtt_settings,
                topic_space,
                outbox_path=outbox_path,
                ecg=WfdbEcgReplay(RECORD_100, pace=20.0, stop_s=10.0, start_s=10.0 * run),
                vitals=None,
                gps=None,
            )
            s0 = agent.outbox.first_seq
            async with running(agent.run()):
                await wait_async(lambda: _has(store, unit, Stream.ECG, 10 * (run + 1)), timeout_s=60)  # noqa: B023
            agent.close()
            runs.append([s for s in await store.seqs(unit, Stream.ECG) if s >= s0])
            for leftover in outbox_path.parent.glob("outbox.db*"):
                leftover.unlink()  # the outbox is lost
    old, new = runs[0], runs[1]
    assert len(old) == 10
    assert len(new) == 10, "the restarted unit's data was stored, not dropped as duplicates"
    assert min(new) > max(old)
    assert await store.seqs(unit, Stream.ECG) == old + new
