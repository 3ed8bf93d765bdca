"""The board end to end over real sockets: MQTT broker (embedded amqtt and real Mosquitto) -> board -> uvicorn ->
server-sent events read with httpx; acknowledgement back onto the bus; malformed input; slow and vanished boards.

Real data: ECG from MIT-BIH records 100 and 119, vitals from the MIMIC-II numerics record s25047, positions in
Monaco (the demo's map), all shipped under simulators/data.  Replay is accelerated: chunks are published as fast
as the broker takes them, with their original timestamps relative to "now".
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import numpy as np
import pytest
import uvicorn
import wfdb
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel

from broker_config import (
    STREAMS,
    AlertAck,
    AlertState,
    Availability,
    BrokerSettings,
    CaseType,
    Department,
    EcgChunk,
    Findings,
    GpsFix,
    HospitalAlert,
    Priority,
    Stream,
    TopicSpace,
    Vitals,
    decode_as,
    ecg_to_mv,
    encode,
)
from broker_config.identity import Role, generate_signing_key, issue_token, verify_key_text
from hospital_board.main import BoardRuntime, create_app
from hospital_board.settings import BoardSettings

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[2] / "simulators" / "data"
NOTE = "Name <unknown>, SpO2 88% & St Mary's <img src=x onerror=alert(1)>"


# --- real data ----------------------------------------------------------------------------------------------------


def ecg_chunks(record: str, n_chunks: int, unit_id: str, end_at: datetime) -> list[EcgChunk]:
    """``n_chunks`` one-second chunks of a MIT-BIH record (360 Hz, digital), the last ending at ``end_at``."""
    rec = wfdb.rdrecord(str(DATA / "mitdb" / record), sampto=n_chunks * 360, physical=False)
    start = end_at - timedelta(seconds=n_chunks)
    return [
        EcgChunk(
            unit_id=unit_id,
            seq=i,
            sent_at=start + timedelta(seconds=i + 1),
            start_at=start + timedelta(seconds=i),
            fs_hz=rec.fs,
            leads=tuple(rec.sig_name),
            gain_adc_per_mv=rec.adc_gain[0],
            baseline_adc=rec.baseline[0],
            samples=rec.d_signal[i * 360 : (i + 1) * 360].T,
        )
        for i in range(n_chunks)
    ]


def vitals_row(unit_id: str, row: int, seq: int, measured_at: datetime) -> Vitals:
    """A row of the real MIMIC-II numerics (0 / NaN = not measured)."""
    rec = wfdb.rdrecord(str(DATA / "mimic2wdb_numerics" / "s25047-2704-05-04-10-44n"))
    v = dict(zip(rec.sig_name, rec.p_signal[row], strict=True))

    def ok(name: str) -> float | None:
        x = float(v[name])
        return x if np.isfinite(x) and x > 0 else None

    return Vitals(
        unit_id=unit_id,
        seq=seq,
        sent_at=measured_at,
        measured_at=measured_at,
        heart_rate_bpm=ok("HR"),
        heart_rate_source="monitor",
        spo2_pct=ok("SpO2"),
        sbp_mmhg=ok("NBPSys"),
        dbp_mmhg=ok("NBPDias"),
        map_mmhg=ok("NBPMean"),
        resp_rate_per_min=ok("RESP"),
    )


def hospital_alert(alert_id: str, unit_id: str, hospital_id: str, now: datetime, **extra: Any) -> HospitalAlert:
    return HospitalAlert(
        unit_id=unit_id,
        seq=int(time.time_ns() // 1000),
        sent_at=now,
        alert_id=alert_id,
        hospital_id=hospital_id,
        case_type=CaseType.STEMI,
        priority=Priority.HIGH,
        eta_at=now + timedelta(minutes=8),
        departments=(Department.CATH_LAB, Department.ED),
        findings=Findings(age_years=67, sex="male", ecg_st_elevation=True, note=NOTE, fmc_at=now),
        reasons=("24/7 PCI centre", "ETA 8 min by road"),
        **extra,
    )


# --- harness ------------------------------------------------------------------------------------------------------


@dataclass
class AckInbox:
    """AlertAcks seen on a hospital's ack topic, with a condition to wait on."""

    acks: list[AlertAck] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def add(self, ack: AlertAck) -> None:
        async with self.changed:
            self.acks.append(ack)
            self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[AlertAck], bool], timeout_s: float = 10) -> AlertAck:
        async with asyncio.timeout(timeout_s), self.changed:
            while True:
                for ack in self.acks:
                    if predicate(ack):
                        return ack
                await self.changed.wait()


@dataclass
class SseLog:
    """Everything one board received, with a condition to wait on."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    heartbeats: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def add(self, name: str, data: dict[str, Any]) -> None:
        async with self.changed:
            self.events.append((name, data))
            self.changed.notify_all()

    async def beat(self) -> None:
        async with self.changed:
            self.heartbeats += 1
            self.changed.notify_all()

    async def wait_heartbeats(self, count: int, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s), self.changed:
            await self.changed.wait_for(lambda: self.heartbeats >= count)

    async def wait_for(
        self, predicate: Callable[[str, dict[str, Any]], bool], timeout_s: float = 10
    ) -> tuple[str, dict[str, Any]]:
        async with asyncio.timeout(timeout_s), self.changed:
            while True:
                for name, data in self.events:
                    if predicate(name, data):
                        return name, data
                await self.changed.wait()

    def units_seen(self) -> set[str]:
        seen: set[str] = set()
        for name, data in self.events:
            if name == "snapshot":
                seen.update(c["unit_id"] for c in data["cards"])
            elif name == "alert":
                seen.add(data["card"]["unit_id"])
            elif "unit_id" in data:  # idle "tick" events name no unit
                seen.add(data["unit_id"])
        return seen


async def read_sse(http: httpx.AsyncClient, url: str, log: SseLog) -> None:
    async with http.stream("GET", url, timeout=httpx.Timeout(10, read=None)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name, data = None, None
        async for line in response.aiter_lines():
            if line.startswith(":"):
                await log.beat()
            elif line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
            elif line == "" and name is not None and data is not None:
                await log.add(name, data)
                name, data = None, None


@dataclass
class Board:
    url: str
    port: int
    runtime: BoardRuntime
    http: httpx.AsyncClient
    key: Ed25519PrivateKey
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def auth(self, role: Role = Role.DISPATCHER, hospital_id: str | None = None) -> dict[str, str]:
        """An Authorization header for a token of ``role`` (signed with the key the board trusts)."""
        token, _ = issue_token(self.key, subject=f"t-{role.value}", role=role, ttl_s=600, now=datetime.now(UTC),
                               hospital_id=hospital_id)  # fmt: skip
        return {"Authorization": f"Bearer {token}"}

    def watch(self, hospital_id: str) -> SseLog:
        log = SseLog()
        url = f"{self.url}/api/events?hospital={hospital_id}"
        self.tasks.append(asyncio.create_task(read_sse(self.http, url, log)))
        return log


@asynccontextmanager
async def board_server(
    broker: BrokerSettings, space: TopicSpace, *, sndbuf_bytes: int | None = None, **overrides: Any
) -> AsyncIterator[Board]:
    """The board app under a real uvicorn on a pre-bound loopback socket (clients may connect at once)."""
    key = generate_signing_key()
    settings = BoardSettings(
        broker=broker,
        topic_prefix=space.prefix,
        default_hospital_id="HA",
        heartbeat_s=0.5,
        security_mode="development",
        verify_keys=(verify_key_text(key),),
        **overrides,
    )
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sndbuf_bytes is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf_bytes)  # inherited by accepted sockets
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2, access_log=False)
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    runtime: BoardRuntime = app.state.board
    url = f"http://127.0.0.1:{port}"
    viewer, _ = issue_token(key, subject="t-dispatcher", role=Role.DISPATCHER, ttl_s=600, now=datetime.now(UTC))
    async with httpx.AsyncClient(timeout=10, headers={"Authorization": f"Bearer {viewer}"}) as http:
        board = Board(url, port, runtime, http, key)
        try:
            await runtime.link.wait_connected(15)
            yield board
        finally:
            for task in board.tasks:
                task.cancel()
            for task in board.tasks:
                with suppress(asyncio.CancelledError, httpx.HTTPError):
                    await task
            server.should_exit = True
            async with asyncio.timeout(15):
                await serving
            sock.close()


@asynccontextmanager
async def bus(broker: BrokerSettings, space: TopicSpace) -> AsyncIterator[tuple[aiomqtt.Client, Callable[..., Any]]]:
    """A test publisher; ``pub(stream, owner, model_or_bytes)`` publishes at the stream's QoS (never retained)."""
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"test-pub-{uuid.uuid4().hex[:8]}") as client:

        async def pub(stream: Stream, owner: str, message: BaseModel | bytes) -> None:
            payload = message if isinstance(message, bytes) else encode(stream, message)
            await client.publish(space.topic(stream, owner), payload, qos=STREAMS[stream].qos, retain=False)

        yield client, pub


async def collect_acks(broker: BrokerSettings, space: TopicSpace, hospital_id: str, inbox: AckInbox) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"test-ack-{uuid.uuid4().hex[:8]}") as client:
        await client.subscribe(space.topic(Stream.ACK, hospital_id), qos=1)
        inbox.ready.set()
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            await inbox.add(decode_as(AlertAck, space, message.topic.value, message.payload))


# --- the scenario, run against both brokers ------------------------------------------------------------------------


async def alert_vitals_ecg_ack_scenario(broker: BrokerSettings, space: TopicSpace) -> None:
    acks = AckInbox()
    async with board_server(broker, space) as board, bus(broker, space) as (_, pub):
        ack_task = asyncio.create_task(collect_acks(broker, space, "HA", acks))
        try:
            feed_a, feed_b = board.watch("HA"), board.watch("HB")
            await feed_a.wait_for(lambda n, d: n == "snapshot")
            await feed_b.wait_for(lambda n, d: n == "snapshot")
            async with asyncio.timeout(10):
                await acks.ready.wait()

            now = datetime.now(UTC)
            await pub(Stream.AVAILABILITY, "U1", Availability(unit_id="U1", seq=1, sent_at=now, state="online"))
            await pub(Stream.ALERT, "HA", hospital_alert("a1", "U1", "HA", now))
            await pub(Stream.VITALS, "U1", vitals_row("U1", 2, 0, now))
            chunks = ecg_chunks("100", 3, "U1", now)
            for chunk in chunks:
                await pub(Stream.ECG, "U1", chunk)
            gps = GpsFix(unit_id="U1", seq=0, sent_at=now, fix=True, lat_deg=43.7375, lon_deg=7.4242, speed_mps=11.0)
            await pub(Stream.GPS, "U1", gps)

            # A sees the alert with its card, the note verbatim (escaping is the page's job), then live data.
            _, ev = await feed_a.wait_for(lambda n, d: n == "alert" and d["alert"]["alert_id"] == "a1")
            assert ev["card"]["unit_id"] == "U1"
            assert ev["alert"]["note"] == NOTE
            _, ev = await feed_a.wait_for(lambda n, d: n == "vitals" and d["unit_id"] == "U1")
            assert ev["vitals"]["heart_rate_bpm"]["value"] == pytest.approx(89.5)
            assert ev["vitals"]["nibp"]["sbp_mmhg"] == 87
            for chunk in chunks:
                _, ev = await feed_a.wait_for(lambda n, d, s=chunk.seq: n == "ecg" and d["segment"]["seq"] == s)
                assert np.allclose(ev["segment"]["samples_mv"], ecg_to_mv(chunk)[0], atol=5e-4)
            _, ev = await feed_a.wait_for(lambda n, d: n == "position" and d["unit_id"] == "U1")
            assert ev["position"]["lat_deg"] == pytest.approx(43.7375)

            # Delivery receipt: the board published on_board for the new alert.
            receipt = await acks.wait_for(lambda a: a.alert_id == "a1" and a.state is AlertState.ON_BOARD)
            assert receipt.unit_id == "U1"
            assert receipt.by_role == "board"
            await feed_a.wait_for(lambda n, d: n == "alert" and d["alert"]["state"] == "on_board")

            # Malformed payloads are counted and the loop goes on.
            await pub(Stream.VITALS, "U1", b"{not json")
            await pub(Stream.ECG, "U1", encode(Stream.ECG, chunks[0])[:30])
            await pub(Stream.VITALS, "U1", vitals_row("U2", 3, 1, now))  # U2's payload on U1's topic
            await pub(Stream.VITALS, "U1", b"\xff\xfe")
            await pub(Stream.VITALS, "U1", vitals_row("U1", 10, 2, now + timedelta(seconds=1)))
            expected_hr = vitals_row("U1", 10, 2, now).heart_rate_bpm
            await feed_a.wait_for(
                lambda n, d: n == "vitals" and d["vitals"]["heart_rate_bpm"]["value"] == pytest.approx(expected_hr)
            )
            health = (await board.http.get(f"{board.url}/api/health")).json()
            assert health["mqtt_connected"]
            assert health["status"] == "ok"
            assert sum(health["rejects"].values()) == 4, health["rejects"]
            assert any("JSON" in reason for reason in health["rejects"])
            assert any("does not match the topic" in reason for reason in health["rejects"])

            # Hospital B's board: its own patient only, never A's.
            await pub(Stream.ALERT, "HB", hospital_alert("b1", "U2", "HB", now))
            await feed_b.wait_for(lambda n, d: n == "alert" and d["alert"]["alert_id"] == "b1")
            assert "U1" not in feed_b.units_seen()

            # One-click acknowledge: AlertAck(acknowledged) on A's ack topic, and the board shows it.
            ed_a = board.auth(Role.ED_STAFF, "HA")
            r = await board.http.post(
                f"{board.url}/api/alerts/a1/ack", json={"hospital_id": "HA", "by_role": "cath_lab"}, headers=ed_a
            )
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "acknowledged"
            ack = await acks.wait_for(lambda a: a.alert_id == "a1" and a.state is AlertState.ACKNOWLEDGED)
            assert (ack.hospital_id, ack.unit_id, ack.by_role) == ("HA", "U1", "ed_staff")  # the token's role
            await feed_a.wait_for(lambda n, d: n == "alert" and d["alert"]["state"] == "acknowledged")
            assert "U2" not in feed_a.units_seen()

            wrong = await board.http.post(f"{board.url}/api/alerts/b1/ack", json={"hospital_id": "HA"}, headers=ed_a)
            assert wrong.status_code == 409
            unknown = await board.http.post(f"{board.url}/api/alerts/zz9/ack", json={"hospital_id": "HA"}, headers=ed_a)
            assert unknown.status_code == 404
            bad = await board.http.post(f"{board.url}/api/alerts/a1/ack", json={"hospital_id": "../x"}, headers=ed_a)
            assert bad.status_code == 422

            snap = (await board.http.get(f"{board.url}/api/hospitals/HA/snapshot")).json()
            assert [c["unit_id"] for c in snap["cards"]] == ["U1"]
            assert snap["cards"][0]["alerts"][0]["state"] == "acknowledged"
            assert snap["cards"][0]["availability"] == "online"
            page = await board.http.get(f"{board.url}/?hospital=HB")
            assert page.status_code == 200
            assert 'data-hospital="HB"' in page.text
            assert "not the primary patient alarm system" in page.text.lower().replace("\n", " ").replace("  ", " ")
        finally:
            ack_task.cancel()
            with suppress(asyncio.CancelledError):
                await ack_task


async def test_board_end_to_end_embedded_broker(embedded_broker: BrokerSettings, topic_space: TopicSpace) -> None:
    await alert_vitals_ecg_ack_scenario(embedded_broker, topic_space)


async def test_board_end_to_end_real_mosquitto(mqtt_settings: BrokerSettings, topic_space: TopicSpace) -> None:
    await alert_vitals_ecg_ack_scenario(mqtt_settings, topic_space)


# --- FF-14 and FF-13 -------------------------------------------------------------------------------------------------


def raw_sse_client(port: int, hospital_id: str, authorization: str, rcvbuf_bytes: int = 4096) -> socket.socket:
    """A board that connects, asks for the stream, and then never reads (tablet on bad Wi-Fi)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
    sock.connect(("127.0.0.1", port))
    request = (
        f"GET /api/events?hospital={hospital_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
        f"Authorization: {authorization}\r\n\r\n"
    )
    sock.sendall(request.encode())
    return sock


async def test_board_that_stops_reading_does_not_stall_the_others(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    n_chunks = 150
    async with (
        board_server(
            mqtt_settings,
            topic_space,
            sndbuf_bytes=4096,
            client_queue_items=64,
            client_max_lag_s=2.0,
            send_timeout_s=1.0,
        ) as board,
        bus(mqtt_settings, topic_space) as (_, pub),
    ):
        hub = board.runtime.hub
        slow = raw_sse_client(board.port, "HA", board.auth()["Authorization"])
        try:
            fast = board.watch("HA")
            await fast.wait_for(lambda n, d: n == "snapshot")
            await hub.wait_until(lambda h: h.count("HA") == 2, timeout_s=10)

            now = datetime.now(UTC)
            await pub(Stream.ALERT, "HA", hospital_alert("a1", "U1", "HA", now))
            chunks = ecg_chunks("119", n_chunks, "U1", now)  # 150 s of ventricular bigeminy, replayed at once
            started = time.monotonic()
            for chunk in chunks:
                await pub(Stream.ECG, "U1", chunk)
            await fast.wait_for(lambda n, d: n == "ecg" and d["segment"]["seq"] == n_chunks - 1, timeout_s=20)
            elapsed_s = time.monotonic() - started
            seqs = [d["segment"]["seq"] for n, d in fast.events if n == "ecg"]
            assert seqs == list(range(n_chunks)), "the reading board got every ECG segment, in order"
            await hub.wait_until(lambda h: h.count("HA") == 1, timeout_s=10)
            reasons = set(hub.disconnects)
            assert reasons & {"send timeout", "queue overflow", "lagging"}, reasons
            assert elapsed_s < 10
        finally:
            slow.close()


async def test_board_killed_abruptly_leaves_the_registry_within_a_heartbeat(
    embedded_broker: BrokerSettings, topic_space: TopicSpace
) -> None:
    async with board_server(embedded_broker, topic_space) as board:
        hub = board.runtime.hub
        other = board.watch("HA")
        await other.wait_for(lambda n, d: n == "snapshot")
        victim = raw_sse_client(board.port, "HA", board.auth()["Authorization"], rcvbuf_bytes=65536)
        await hub.wait_until(lambda h: h.count("HA") == 2, timeout_s=10)
        victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
        victim.close()
        await hub.wait_until(lambda h: h.count("HA") == 1, timeout_s=3 * board.runtime.settings.heartbeat_s + 1)
        assert hub.disconnects["client gone"] >= 1
        await other.wait_heartbeats(other.heartbeats + 1, timeout_s=5)  # the other board is still served
