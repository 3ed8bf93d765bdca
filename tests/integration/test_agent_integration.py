"""The agent across real sockets: real Mosquitto, the embedded broker, a broker restart, a killed connection.

A plain MQTT client subscribes and decodes everything through broker_config, as the store and boards would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import stat
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
import wfdb
from pydantic import BaseModel

from ambulance_agent.app import Agent
from ambulance_agent.sources import NumericsVitalsReplay, RouteGpsReplay, WfdbEcgReplay
from broker_config import (
    AlertState,
    Availability,
    BrokerSettings,
    CaseType,
    CrewStatus,
    EcgChunk,
    Findings,
    GpsFix,
    Notice,
    NoticeKind,
    PreAlert,
    Status,
    Stream,
    TopicSpace,
    Vitals,
    decode,
    encode,
    utc_now,
)
from broker_config.connection import MqttLink
from broker_config.embedded import EmbeddedBroker, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RECORD_100 = ROOT / "simulators" / "data" / "mitdb" / "100"
NUMERICS = ROOT / "simulators" / "data" / "mimic2wdb_numerics" / "s25047-2704-05-04-10-44n"
ROUTE_DEG = [(43.7384, 7.4246), (43.7360, 7.4215), (43.7311, 7.4197), (43.7275, 7.4148)]  # Monaco streets
UNIT_STREAMS = (Stream.AVAILABILITY, Stream.STATUS, Stream.VITALS, Stream.ECG, Stream.GPS, Stream.PREALERT)
BEATS = frozenset("NLRBAaJSVrFejnE/fQ")


# --- helpers ---------------------------------------------------------------------------------------------------


class Collector:
    """A subscriber standing in for the store: decodes every message of one unit through the contract."""

    def __init__(self, settings: BrokerSettings, space: TopicSpace, unit_id: str, *, persistent: bool = False):
        self.space = space
        self.unit_id = unit_id
        self.messages: list[tuple[Stream, BaseModel]] = []
        self.undecodable = 0
        self.link = MqttLink(settings, client_id=f"collector-{uuid.uuid4().hex[:8]}", clean_session=not persistent)
        self._cond = asyncio.Condition()

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        for stream in UNIT_STREAMS:
            await client.subscribe(self.space.filter(stream, self.unit_id), qos=1, timeout=5)

    async def _on_message(self, message: aiomqtt.Message) -> None:
        try:
            parsed, model = decode(self.space, str(message.topic), bytes(message.payload))  # type: ignore[arg-type,unused-ignore]
        except ValueError:
            self.undecodable += 1
            return
        self.messages.append((parsed.stream, model))
        async with self._cond:
            self._cond.notify_all()

    async def run(self) -> None:
        await self.link.run(self._on_connect, self._on_message)

    def of(self, stream: Stream) -> list[Any]:
        return [m for s, m in self.messages if s is stream]

    def seqs(self, stream: Stream) -> set[int]:
        return {m.seq for m in self.of(stream)}

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s), self._cond:
            await self._cond.wait_for(predicate)


class TcpProxy:
    """A loopback TCP relay in front of a broker, so a test can cut the agent's connection abruptly."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for coro in (self._pipe(reader, up_writer), self._pipe(up_reader, writer)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def kill_connections(self) -> None:
        """Abort every relayed connection (RST both ways): the broker sees no DISCONNECT, so the will fires."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self.kill_connections()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()


@contextlib.asynccontextmanager
async def running(*coros: Coroutine[Any, Any, None]) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run coroutines as tasks for the body; fail if one crashed; cancel and await them all at the end."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield tasks
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks, return_exceptions=True)


async def wait_condition(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.02) -> None:
    """Poll a condition that has no event of its own (e.g. a link going down), bounded by a deadline."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - no event exists for these conditions; bounded by the deadline
            await asyncio.sleep(poll_s)


def reference_bpm(beats: np.ndarray, start: int, stop: int, fs_hz: float) -> float:
    inside = beats[(beats >= start) & (beats < stop)]
    return 60.0 * (inside.size - 1) / ((inside[-1] - inside[0]) / fs_hz)


def annotated_beats(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # wfdb's pandas inplace deprecation, not ours
        ann = wfdb.rdann(str(path), "atr")
    return np.array([s for s, sym in zip(ann.sample, ann.symbol, strict=True) if sym in BEATS])


def let_broker_user_write(folder: Path) -> None:
    """FF-02's pitfall: Mosquitto started as root drops to the ``mosquitto`` user, which cannot write a root-owned
    0700 temp folder; the only trace is "Error saving in-memory database ... Permission denied" at shutdown and
    every persistent session is silently lost.  Hand the persistence folder to the broker user."""
    if os.geteuid() != 0:
        return  # the broker runs as us and can write our folders
    try:
        broker_user = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    os.chown(folder, broker_user.pw_uid, broker_user.pw_gid)
    for parent in (folder.parent, folder.parent.parent):
        parent.chmod(parent.stat().st_mode | stat.S_IXOTH)  # traverse only, nothing readable


def unit_id() -> str:
    return f"amb-{uuid.uuid4().hex[:10]}"


# --- tests -----------------------------------------------------------------------------------------------------


async def test_agent_streams_record_100_to_real_mosquitto(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace, tmp_path: Path
) -> None:
    unit = unit_id()
    anchor = utc_now()
    ecg = WfdbEcgReplay(RECORD_100, chunk_s=1.0, pace=20.0, stop_s=60.0, clock=lambda: anchor)
    vitals = NumericsVitalsReplay(NUMERICS, start_min=2, pace=20.0, interval_s=2.0, loop=True, clock=lambda: anchor)
    gps = RouteGpsReplay(ROUTE_DEG, speed_mps=15.0, interval_s=1.0, pace=20.0, clock=lambda: anchor)
    proxy = TcpProxy(mqtt_settings.port)
    await proxy.start()
    agent_settings = mqtt_settings.model_copy(update={"port": proxy.port})
    agent = Agent(
        unit, agent_settings, topic_space, outbox_path=tmp_path / "outbox.db", ecg=ecg, vitals=vitals, gps=gps
    )
    s0 = agent.outbox.first_seq  # a new outbox: every stream counts from the wall clock in microseconds
    collector = Collector(mqtt_settings, topic_space, unit)
    async with running(collector.run()):
        await collector.link.wait_connected(10)
        async with running(agent.run()):
            # every ECG seq of 60 s of record arrives (3 s of wall time at pace 20)
            await collector.wait_for(lambda: collector.seqs(Stream.ECG) >= set(range(s0, s0 + 60)), timeout_s=30)
            await agent.set_status(CrewStatus.TRANSPORTING, destination_hospital_id="chpg", incident_id="inc-1")
            await collector.wait_for(lambda: len(collector.of(Stream.STATUS)) == 1, timeout_s=10)
            await wait_condition(lambda: agent.link_health().backlog_count == 0, timeout_s=10)

            # the will fires as offline when the agent's TCP connection is killed, then a new session is born
            session = agent.session
            assert session is not None
            proxy.kill_connections()

            def availability() -> list[Availability]:
                return collector.of(Stream.AVAILABILITY)

            await collector.wait_for(
                lambda: any(a.state == "offline" and a.seq == session for a in availability()), timeout_s=15
            )
            await collector.wait_for(
                lambda: any(a.state == "online" and a.seq == session + 1 for a in availability()), timeout_s=15
            )
    await proxy.stop()

    chunks: dict[int, EcgChunk] = {c.seq - s0: c for c in collector.of(Stream.ECG)}
    record = ecg.record_samples()
    for seq in range(60):
        chunk = chunks[seq]
        assert (chunk.fs_hz, chunk.leads, chunk.gain_adc_per_mv, chunk.baseline_adc) == (
            360.0,
            ("MLII", "V5"),
            200.0,
            1024,
        )
        np.testing.assert_array_equal(chunk.samples, record[:, seq * 360 : (seq + 1) * 360])
        assert chunk.start_at == anchor + timedelta(seconds=seq)
        assert chunk.unit_id == unit

    beats = annotated_beats(RECORD_100)
    ecg_vitals: list[Vitals] = [v for v in collector.of(Stream.VITALS) if v.heart_rate_source == "ecg"]
    assert len(ecg_vitals) >= 20
    for v in ecg_vitals:
        t_s = (v.measured_at - anchor).total_seconds()
        end = int(min(t_s, 60.0) * 360)
        ref = reference_bpm(beats, max(0, end - 3600 - 360), end, 360.0)
        assert v.heart_rate_bpm == pytest.approx(ref, abs=5.0), t_s
    numerics = [v for v in collector.of(Stream.VITALS) if v.spo2_pct is not None]
    assert numerics
    assert all(v.spo2_pct > 0 for v in numerics)
    fixes: list[GpsFix] = collector.of(Stream.GPS)
    assert fixes
    assert all(f.fix and f.lat_deg is not None for f in fixes)
    status: Status = collector.of(Stream.STATUS)[0]
    assert (status.status, status.destination_hospital_id) == (CrewStatus.TRANSPORTING, "chpg")

    # birth is retained: a subscriber arriving now sees the unit online with the latest session
    late = Collector(mqtt_settings, topic_space, unit)
    async with running(late.run()):
        await late.wait_for(lambda: bool(late.of(Stream.AVAILABILITY)), timeout_s=10)
    retained: Availability = late.of(Stream.AVAILABILITY)[-1]
    assert retained.state in {"online", "offline"}
    assert retained.seq >= session + 1
    assert collector.undecodable == 0
    agent.close()


async def test_backlog_goes_out_prealert_first_and_notices_reach_the_crew(
    topic_space: TopicSpace, tmp_path: Path
) -> None:
    """Embedded broker: the agent fills its outbox while no broker is reachable; on connect the pre-alert leads."""
    unit = unit_id()
    async with EmbeddedBroker() as broker:
        proxy = TcpProxy(broker.port)  # not listening yet: the agent cannot connect
        settings = BrokerSettings(host="127.0.0.1", port=proxy.port, reconnect_min_s=0.05, reconnect_max_s=0.2)
        direct = BrokerSettings(host=broker.host, port=broker.port, reconnect_min_s=0.05, reconnect_max_s=0.2)
        ecg = WfdbEcgReplay(RECORD_100, chunk_s=1.0, pace=20.0, stop_s=30.0)
        notices: list[Notice] = []
        agent = Agent(
            unit,
            settings,
            topic_space,
            outbox_path=tmp_path / "outbox.db",
            ecg=ecg,
            vitals=None,
            gps=None,
            live_window_s=0.5,
            on_notice=notices.append,
        )
        s0 = agent.outbox.first_seq
        collector = Collector(direct, topic_space, unit)
        async with running(agent.run(), collector.run()):
            await wait_condition(lambda: agent.link_health().backlog_count >= 20, timeout_s=10)
            assert not agent.link_health().connected
            alert_id = await agent.prealert(CaseType.STEMI, Findings(age_years=60, ecg_st_elevation=True), eta_s=900)
            await collector.link.wait_connected(10)
            health = agent.link_health()
            assert health.oldest_unsent_age_s is not None
            assert health.oldest_unsent_age_s > 0
            await proxy.start()  # the link comes up
            await collector.wait_for(lambda: collector.seqs(Stream.ECG) >= set(range(s0, s0 + 30)), timeout_s=20)

            # the first message after the birth is the pre-alert, ahead of ECG stored long before it
            ordered = [s for s, _ in collector.messages if s is not Stream.AVAILABILITY]
            assert ordered[0] is Stream.PREALERT
            prealert: PreAlert = collector.of(Stream.PREALERT)[0]
            assert (prealert.alert_id, prealert.case_type, prealert.eta_s) == (alert_id, CaseType.STEMI, 900)
            assert not prealert.historical
            # backlog telemetry is flagged historical (never fires live alarms) and drains oldest first, after the
            # live chunks (newest first): the board sees the present before the past
            chunks: list[EcgChunk] = collector.of(Stream.ECG)
            backlog = [c.seq for c in chunks if c.historical]
            assert backlog[0] == s0
            assert backlog == sorted(backlog), "the backlog keeps its order"
            live = [c.seq for c in chunks if not c.historical]
            assert live, "live chunks went out too"
            hr_vitals: list[Vitals] = collector.of(Stream.VITALS)
            assert hr_vitals
            assert all(v.spo2_pct is None for v in hr_vitals)
            assert any(v.heart_rate_source == "ecg" for v in hr_vitals)

            # dispatch answers: a malformed notice is counted and dropped, the next one still lands
            async with aiomqtt.Client(broker.host, broker.port, identifier=f"dispatch-{unit}") as dispatch:
                topic = topic_space.topic(Stream.NOTICE, unit)
                await dispatch.publish(topic, b'{"schema_version": 1, "unit_id": ', qos=1)
                other = Notice(unit_id="someone-else", seq=0, sent_at=utc_now(), kind=NoticeKind.DESTINATION)
                await dispatch.publish(topic, encode(Stream.NOTICE, other), qos=1)
                ack = Notice(
                    unit_id=unit,
                    seq=1,
                    sent_at=utc_now(),
                    kind=NoticeKind.ALERT_STATE,
                    alert_id=alert_id,
                    alert_state=AlertState.ACKNOWLEDGED,
                )
                dest = Notice(
                    unit_id=unit,
                    seq=2,
                    sent_at=utc_now(),
                    kind=NoticeKind.DESTINATION,
                    hospital_id="chpg",
                    hospital_name="Centre Hospitalier Princesse Grace",
                    reasons=("24/7 cath lab",),
                )
                await dispatch.publish(topic, encode(Stream.NOTICE, ack), qos=1)
                await dispatch.publish(topic, encode(Stream.NOTICE, dest), qos=1)
            await agent.wait_until(
                lambda: agent.alert_states.get(alert_id) is AlertState.ACKNOWLEDGED and agent.destination is not None,
                timeout_s=10,
            )
            assert agent.destination is not None
            assert agent.destination.hospital_id == "chpg"
            assert sum(agent.rejected.values()) == 2
            assert [n.seq for n in notices] == [1, 2]
            await wait_condition(lambda: agent.link_health().backlog_count == 0, timeout_s=10)
        await proxy.stop()
    agent.close()


async def test_broker_restart_mid_stream_loses_no_ecg_seq(
    private_mosquitto: type, topic_space: TopicSpace, tmp_path: Path
) -> None:
    broker = private_mosquitto(
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {dir}/\n"
    )
    let_broker_user_write(broker.workdir)
    broker.start()
    settings = broker.settings()
    unit = unit_id()
    n_chunks = 60
    ecg = WfdbEcgReplay(RECORD_100, chunk_s=1.0, pace=15.0, stop_s=float(n_chunks))
    agent = Agent(unit, settings, topic_space, outbox_path=tmp_path / "outbox.db", ecg=ecg, vitals=None, gps=None)
    s0 = agent.outbox.first_seq
    collector = Collector(settings, topic_space, unit, persistent=True)
    async with running(collector.run()):
        await collector.link.wait_connected(10)
        async with running(agent.run()):
            await collector.wait_for(lambda: len(collector.seqs(Stream.ECG)) >= 10, timeout_s=15)
            await asyncio.to_thread(broker.stop)
            await wait_condition(lambda: not agent.link_health().connected, timeout_s=10)
            await wait_condition(lambda: agent.link_health().backlog_count >= 5, timeout_s=10)
            backlog_during_outage = agent.link_health().backlog_count
            await asyncio.to_thread(broker.start)
            await collector.wait_for(lambda: collector.seqs(Stream.ECG) >= set(range(s0, s0 + n_chunks)), timeout_s=30)
            await wait_condition(lambda: agent.link_health().backlog_count == 0, timeout_s=10)
    assert "Error saving" not in broker.log.read_text()  # persistence really worked (FF-02)
    assert backlog_during_outage >= 5
    assert collector.seqs(Stream.ECG) == set(range(s0, s0 + n_chunks))
    record = ecg.record_samples()
    for chunk in collector.of(Stream.ECG):
        k = chunk.seq - s0
        np.testing.assert_array_equal(chunk.samples, record[:, k * 360 : (k + 1) * 360])
    vitals_seqs = collector.seqs(Stream.VITALS)
    assert vitals_seqs == set(range(s0, max(vitals_seqs) + 1))
    assert agent.link_health().publish_failures >= 0
    agent.close()


async def test_restarted_agent_continues_its_sequences(topic_space: TopicSpace, tmp_path: Path) -> None:
    """Durability across an agent restart: same outbox file, seq and session numbers continue, never reused."""
    unit = unit_id()
    seen: list[datetime] = []
    async with EmbeddedBroker() as broker:
        settings = BrokerSettings(host=broker.host, port=broker.port, reconnect_min_s=0.05, reconnect_max_s=0.2)
        collector = Collector(settings, topic_space, unit)
        async with running(collector.run()):
            await collector.link.wait_connected(10)
            for run in range(2):
                ecg = WfdbEcgReplay(RECORD_100, chunk_s=1.0, start_s=10.0 * run, pace=0, stop_s=10.0)
                agent = Agent(
                    unit, settings, topic_space, outbox_path=tmp_path / "outbox.db", ecg=ecg, vitals=None, gps=None
                )
                s0 = agent.outbox.first_seq  # the same file: the same seed both runs
                async with running(agent.run()):
                    expected = set(range(s0, s0 + 10 * (run + 1)))
                    await collector.wait_for(lambda: collector.seqs(Stream.ECG) >= expected, timeout_s=15)  # noqa: B023
                    await wait_condition(lambda: agent.link_health().backlog_count == 0, timeout_s=10)  # noqa: B023
                    agent.stop()
                    seen.append(utc_now())
                agent.close()
            await collector.wait_for(
                lambda: [a.state for a in collector.of(Stream.AVAILABILITY)][-1:] == ["offline"], timeout_s=10
            )
    ecg_seqs = sorted(c.seq for c in collector.of(Stream.ECG))
    assert ecg_seqs == list(range(s0, s0 + 20))  # no duplicates, no reuse
    sessions = [(a.state, a.seq) for a in collector.of(Stream.AVAILABILITY)]
    assert ("online", s0) in sessions
    assert ("online", s0 + 1) in sessions
    assert sessions[-1] == ("offline", s0 + 1)  # graceful stop publishes the death itself
