"""The walking skeleton end to end: ambulance -> MQTT -> store -> dispatch -> ED board -> acknowledgement -> crew.

Two runs of the real demo composition (``simulators.demo.run_demo``):

* embedded: the in-process broker and SQLite, exactly what ``make demo`` runs;
* services: the real Mosquitto and PostgreSQL of the machine, with the exactly-once and sample-equality checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import wfdb

from broker_config import AlertState, BrokerSettings, CaseType, Stream, TopicSpace
from broker_config.identity import Role
from simulators.demo import DEMO_HOSPITAL_ID, DemoOptions, DemoRunning, run_demo
from simulators.fleet import DATA_DIR
from telemetry.store import open_store

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def reference_hr_bpm(record: str, from_s: float, to_s: float) -> float:
    """Heart rate from the cardiologists' beat annotations (.atr) of an MIT-BIH record over [from_s, to_s)."""
    ann = wfdb.rdann(str(DATA_DIR / "mitdb" / record), "atr", sampfrom=int(from_s * 360), sampto=int(to_s * 360))
    beats = [s for s, sym in zip(ann.sample, ann.symbol, strict=True) if sym in set("NLRAaJSVFejE/fQ")]
    rr_s = np.diff(beats) / 360.0
    return float(60.0 / np.mean(rr_s))


class Demo:
    """A demo run in the background of a test."""

    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self.ready = asyncio.Event()
        self.running: DemoRunning | None = None
        self.task: asyncio.Task[None] | None = None

    def _on_ready(self, running: DemoRunning) -> None:
        self.running = running
        self.ready.set()

    async def __aenter__(self) -> DemoRunning:
        self.task = asyncio.create_task(run_demo(self.options, on_ready=self._on_ready))
        async with asyncio.timeout(60):
            done, _ = await asyncio.wait(
                {self.task, asyncio.create_task(self.ready.wait())}, return_when="FIRST_COMPLETED"
            )
        if self.task in done:
            self.task.result()
        assert self.running is not None
        return self.running

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def board_client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def sign_in(client: httpx.AsyncClient, running: DemoRunning) -> None:
    """Sign in as the demo's ED staff account on the board and on dispatch: each service has its own HttpOnly
    session cookies (cookies are per host, not per port, so the names differ), both kept in the client's jar."""
    base = running.board_url.split("/?")[0]
    ed = next(a for a in running.accounts if a.role is Role.ED_STAFF)
    credentials = {"username": ed.username, "password": ed.password}
    response = await client.post(f"{base}/api/auth/login", json=credentials)
    assert response.status_code == 200, response.text
    assert response.json()["hospital_id"] == DEMO_HOSPITAL_ID
    response = await client.post(f"{running.dispatch_url}/api/auth/login", json=credentials)
    assert response.status_code == 200, response.text


async def wait_for_board(client: httpx.AsyncClient, running: DemoRunning, timeout_s: float) -> dict[str, object]:
    """Poll the board's snapshot until three inbound units show an ECG-derived heart rate and the STEMI alert."""
    base = running.board_url.split("/?")[0]
    async with asyncio.timeout(timeout_s):
        while True:
            snap = (await client.get(f"{base}/api/hospitals/{DEMO_HOSPITAL_ID}/snapshot")).json()
            cards = snap["cards"]
            with_hr = [
                c for c in cards
                if c["vitals"]["heart_rate_bpm"] is not None and c["vitals"]["heart_rate_source"] == "ecg"
            ]  # fmt: skip
            stemi = [a for c in cards for a in c["alerts"] if a["case_type"] == CaseType.STEMI.value]
            if len(cards) == 3 and len(with_hr) == 3 and stemi:
                return dict(snap)
            await asyncio.sleep(0.25)


async def acknowledge_stemi(client: httpx.AsyncClient, running: DemoRunning, snap: dict[str, object]) -> str:
    base = running.board_url.split("/?")[0]
    cards = snap["cards"]
    assert isinstance(cards, list)
    alert = next(a for c in cards for a in c["alerts"] if a["case_type"] == CaseType.STEMI.value)
    assert alert["unit_id"] == "AMB1"
    assert alert["priority"] == "high"
    response = await client.post(
        f"{base}/api/alerts/{alert['alert_id']}/ack", json={"hospital_id": DEMO_HOSPITAL_ID, "by_role": "cath_lab"}
    )
    assert response.status_code == 200, response.text
    return str(alert["alert_id"])


async def wait_acknowledged_everywhere(client: httpx.AsyncClient, running: DemoRunning, alert_id: str) -> None:
    amb1 = next(u for u in running.units if u.plan.unit_id == "AMB1")
    async with asyncio.timeout(20):
        while True:
            detail = (await client.get(f"{running.dispatch_url}/api/alerts/{alert_id}")).json()
            crew_state = amb1.agent.alert_states.get(alert_id)
            if detail["state"] == AlertState.ACKNOWLEDGED.value and crew_state is AlertState.ACKNOWLEDGED:
                return
            await asyncio.sleep(0.1)


async def test_demo_on_the_embedded_default_shows_three_inbound_and_the_acknowledged_stemi(
    tmp_path: Path, board_client: httpx.AsyncClient
) -> None:
    """The README's demo: within 30 s three inbound with HR from their ECG and the STEMI pre-alert, acknowledged."""
    options = DemoOptions(board_port=0, dispatch_port=0, state_dir=tmp_path)
    async with Demo(options) as running:
        assert running.broker.host == "127.0.0.1"
        assert running.database_url.startswith("sqlite:///")
        base = running.board_url.split("/?")[0]
        assert (await board_client.get(f"{base}/api/hospitals/{DEMO_HOSPITAL_ID}/snapshot")).status_code == 401
        await sign_in(board_client, running)
        started = asyncio.get_running_loop().time()
        snap = await wait_for_board(board_client, running, timeout_s=30)
        assert asyncio.get_running_loop().time() - started < 30
        cards = snap["cards"]
        assert isinstance(cards, list)
        hr = {c["unit_id"]: c["vitals"]["heart_rate_bpm"]["value"] for c in cards}
        assert set(hr) == {"AMB1", "AMB2", "AMB3"}
        assert abs(hr["AMB1"] - reference_hr_bpm("100", 0, 60)) < 8
        page = await board_client.get(running.board_url)
        assert page.status_code == 200
        assert "notification" in page.text.lower()
        alert_id = await acknowledge_stemi(board_client, running, snap)
        await wait_acknowledged_everywhere(board_client, running, alert_id)


@pytest.mark.integration
async def test_the_path_on_real_mosquitto_and_postgresql(
    tmp_path: Path, board_client: httpx.AsyncClient, mqtt_settings: BrokerSettings, pg_url: str, topic_space: TopicSpace
) -> None:
    """Real broker and database: every ECG seq stored exactly once, stored samples equal the record's, the board's
    live feed carries the alert, and the acknowledgement reaches dispatch and the crew."""
    options = DemoOptions(
        mqtt_url=f"mqtt://{mqtt_settings.host}:{mqtt_settings.port}",
        database_url=pg_url,
        board_port=0,
        dispatch_port=0,
        state_dir=tmp_path,
        pace=3.0,
        topic_prefix=topic_space.prefix,
    )
    async with Demo(options) as running:
        base = running.board_url.split("/?")[0]
        await sign_in(board_client, running)
        feed_saw_alert = asyncio.Event()

        async def read_feed() -> None:
            async with board_client.stream("GET", f"{base}/api/events", params={"hospital": DEMO_HOSPITAL_ID}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:") and '"stemi"' in line and "alert_id" in line:
                        json.loads(line[5:])
                        feed_saw_alert.set()
                        return

        feed = asyncio.create_task(read_feed())
        snap = await wait_for_board(board_client, running, timeout_s=60)
        async with asyncio.timeout(20):
            await feed_saw_alert.wait()
        await feed
        alert_id = await acknowledge_stemi(board_client, running, snap)
        await wait_acknowledged_everywhere(board_client, running, alert_id)

        first = next(u for u in running.units if u.plan.unit_id == "AMB1").agent.outbox.first_seq
        store = open_store(pg_url)
        async with asyncio.timeout(60):  # let at least 30 s of ECG reach the store while the demo runs
            while len(await store.seqs("AMB1", Stream.ECG)) < 30:  # noqa: ASYNC110 - polling the database
                await asyncio.sleep(0.5)

    try:
        seqs = await store.seqs("AMB1", Stream.ECG)
        expected = list(range(first, first + len(seqs)))  # a new outbox starts at its seed, then counts by one
        missing_or_extra = sorted(set(expected) ^ set(seqs))[:20]
        assert seqs == expected, f"missing or duplicated ECG seqs: {missing_or_extra}"
        stored = await store.ecg_samples("AMB1")
        record = wfdb.rdrecord(str(DATA_DIR / "mitdb" / "100"), physical=False, sampto=stored.shape[1])
        assert np.array_equal(stored, record.d_signal.T.astype(np.int16))
        vitals = await store.latest_vitals()
        assert {"AMB1", "AMB2", "AMB3"} <= set(vitals)
    finally:
        await store.close()
