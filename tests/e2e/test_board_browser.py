"""The board page in a real headless Chromium, driven over the DevTools protocol.

MQTT (embedded broker) -> board -> uvicorn -> Chromium: the card appears with the crew note shown as text (an
``<img onerror>`` payload neither renders nor runs, FF-16), live vitals and an ECG strip drawn on the canvas; a
real mouse click on "Acknowledge" publishes AlertAck(acknowledged) on the hospital's ack topic.  Screenshots at
1920x1080 go to ``artifacts/`` (gitignored).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import uvicorn
import wfdb
from conftest import chromium_binary

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
    encode,
)
from broker_config.identity import BOARD_ACCESS_COOKIE, Role, generate_signing_key, issue_token, verify_key_text
from hospital_board.main import BoardRuntime, create_app
from hospital_board.settings import BoardSettings
from simulators import browser
from simulators.browser import DevTools

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
MITDB = ROOT / "simulators" / "data" / "mitdb"
BOARD_SESSIONS: dict[str, str] = {}
"""Board base URL -> the access token the browser carries there (an ED staff member of hospital HA)."""
NOTE = 'Name <unknown>, SpO2 88% & St Mary\'s "ward" `x` <img src=x onerror="window.__pwned=1">'


class Cdp(DevTools):
    """The shared DevTools client (:mod:`simulators.browser`) that signs the browser in to a test board (its
    HttpOnly session cookie) before it opens one of that board's pages."""

    async def call(self, method: str, session: str | None = None, timeout_s: float = 15, **params: Any) -> Any:
        if method == "Page.navigate":
            await self.sign_in(str(params["url"]))
        return await super().call(method, session, timeout_s, **params)

    async def sign_in(self, url: str) -> None:
        """Put the board's session cookie (HttpOnly, SameSite=Strict) into the browser before it opens ``url``."""
        for base, token in BOARD_SESSIONS.items():
            if url.startswith(base):
                cookie = {
                    "name": BOARD_ACCESS_COOKIE,
                    "value": token,
                    "url": base,
                    "httpOnly": True,
                    "sameSite": "Strict",
                }
                await self.call("Storage.setCookies", cookies=[cookie])


@asynccontextmanager
async def chromium(*extra_args: str) -> AsyncIterator[Cdp]:
    """A fresh headless Chromium; ``cdp.proc`` is its process (tests may kill it)."""
    binary = chromium_binary()
    async with browser.chromium(*extra_args, binary=binary, client=Cdp) as cdp:
        assert isinstance(cdp, Cdp)
        yield cdp


@asynccontextmanager
async def board_server(
    broker: BrokerSettings, space: TopicSpace, **overrides: Any
) -> AsyncIterator[tuple[str, BoardRuntime]]:
    key = generate_signing_key()
    settings = BoardSettings(
        broker=broker,
        topic_prefix=space.prefix,
        default_hospital_id="HA",
        security_mode="development",
        verify_keys=(verify_key_text(key),),
        **overrides,
    )
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    token, _ = issue_token(
        key, subject="ed-nurse", role=Role.ED_STAFF, hospital_id="HA", ttl_s=3_600, now=datetime.now(UTC)
    )
    BOARD_SESSIONS[base] = token
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, access_log=False))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    runtime: BoardRuntime = app.state.board
    try:
        await runtime.link.wait_connected(15)
        yield base, runtime
    finally:
        BOARD_SESSIONS.pop(base, None)
        server.should_exit = True
        async with asyncio.timeout(15):
            await serving
        sock.close()


def ecg_chunks(n_chunks: int, end_at: datetime) -> list[EcgChunk]:
    rec = wfdb.rdrecord(str(MITDB / "100"), sampto=n_chunks * 360, physical=False)
    start = end_at - timedelta(seconds=n_chunks)
    return [
        EcgChunk(
            unit_id="U1",
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


async def test_board_in_chromium_shows_card_and_acknowledges(
    embedded_broker: BrokerSettings, topic_space: TopicSpace
) -> None:
    chromium_binary()
    space = topic_space
    acks: asyncio.Queue[AlertAck] = asyncio.Queue()
    async with (
        board_server(embedded_broker, space) as (url, _runtime),
        aiomqtt.Client(embedded_broker.host, embedded_broker.port, identifier=f"t-{uuid.uuid4().hex[:8]}") as mqtt,
        chromium() as cdp,
    ):
        await mqtt.subscribe(space.topic(Stream.ACK, "HA"), qos=1)

        async def pub(stream: Stream, owner: str, message: Any) -> None:
            await mqtt.publish(space.topic(stream, owner), encode(stream, message), qos=STREAMS[stream].qos)

        async def collect() -> None:
            async for message in mqtt.messages:
                assert isinstance(message.payload, bytes)
                await acks.put(decode_as(AlertAck, space, message.topic.value, message.payload))

        collector = asyncio.create_task(collect())
        try:
            now = datetime.now(UTC)
            await pub(Stream.AVAILABILITY, "U1", Availability(unit_id="U1", seq=1, sent_at=now, state="online"))
            alert = HospitalAlert(
                unit_id="U1",
                seq=1,
                sent_at=now,
                alert_id="a1",
                hospital_id="HA",
                case_type=CaseType.STEMI,
                priority=Priority.HIGH,
                eta_at=now + timedelta(minutes=7),
                departments=(Department.CATH_LAB,),
                findings=Findings(age_years=67, sex="male", ecg_st_elevation=True, note=NOTE),
                reasons=("24/7 PCI centre",),
            )
            await pub(Stream.ALERT, "HA", alert)
            vitals = Vitals(
                unit_id="U1",
                seq=0,
                sent_at=now,
                measured_at=now,
                heart_rate_bpm=89.5,
                heart_rate_source="monitor",
                spo2_pct=95.7,
                sbp_mmhg=87,
                dbp_mmhg=46,
                map_mmhg=62,
                resp_rate_per_min=21.2,
            )  # MIMIC-II s25047 numerics, row 2
            await pub(Stream.VITALS, "U1", vitals)
            for chunk in ecg_chunks(10, now):
                await pub(Stream.ECG, "U1", chunk)
            await pub(
                Stream.GPS, "U1", GpsFix(unit_id="U1", seq=0, sent_at=now, fix=True, lat_deg=43.7375, lon_deg=7.4242)
            )

            target = await cdp.call("Target.createTarget", url="about:blank")
            session = (await cdp.call("Target.attachToTarget", targetId=target["targetId"], flatten=True))["sessionId"]
            await cdp.call(
                "Emulation.setDeviceMetricsOverride",
                session,
                width=1920,
                height=1080,
                deviceScaleFactor=1,
                mobile=False,
            )
            await cdp.call("Page.enable", session)
            await cdp.call("Page.navigate", session, url=f"{url}/?hospital=HA")
            await cdp.wait_event("Page.loadEventFired")

            await cdp.wait_in_page(
                session,
                "document.querySelector('#link').textContent === 'LIVE' && document.querySelector('.card') && "
                "document.querySelector('.card [data-vital=hr] .v-value').textContent !== '--' && "
                "document.querySelector('.card .position').textContent.startsWith('Position')",
            )
            shown = await cdp.evaluate(
                session,
                "(() => { const c = document.querySelector('.card'); return {"
                "note: c.querySelector('.note').textContent, imgs: c.querySelectorAll('img').length,"
                "pwned: window.__pwned === undefined ? null : window.__pwned,"
                "prio: c.querySelector('.prio-text').textContent, flashing: c.classList.contains('flash-high'),"
                "hr: c.querySelector('[data-vital=hr] .v-value').textContent,"
                "nibp: c.querySelector('[data-vital=nibp] .v-value').textContent,"
                "pos: c.querySelector('.position').textContent,"
                "disclaimer: document.querySelector('.disclaimer').textContent}; })()",
            )
            assert shown["note"] == NOTE, "the crew note is shown exactly, as text"
            assert shown["imgs"] == 0
            assert shown["pwned"] is None, "no script from the note ran"
            assert shown["prio"] == "HIGH !!!"
            assert shown["flashing"]
            assert shown["hr"] == "90"
            assert shown["nibp"] == "87/46"
            assert shown["pos"].startswith("Position 43.7375, 7.4242")
            assert "NOT the primary patient alarm system" in " ".join(shown["disclaimer"].split())
            # the ECG strip is drawn: enough bright-green trace pixels on the canvas
            green = await cdp.wait_in_page(
                session,
                "(() => { const cv = document.querySelector('canvas.ecg'); const d = cv.getContext('2d')"
                ".getImageData(0, 0, cv.width, cv.height).data; let n = 0; for (let i = 0; i < d.length; i += 4)"
                " { if (d[i + 1] > 200 && d[i] < 120) n++; } return n > 300 ? n : 0; })()",
            )
            assert green > 300

            ARTIFACTS.mkdir(exist_ok=True)
            shot = await cdp.call("Page.captureScreenshot", session, format="png")
            (ARTIFACTS / "board-1920x1080-alert.png").write_bytes(base64.b64decode(shot["data"]))

            box = await cdp.evaluate(
                session,
                "(() => { const r = document.querySelector('button.ack').getBoundingClientRect();"
                " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()",
            )
            for kind in ("mousePressed", "mouseReleased"):
                await cdp.call(
                    "Input.dispatchMouseEvent", session, type=kind, x=box["x"], y=box["y"], button="left", clickCount=1
                )
            async with asyncio.timeout(10):
                ack = await acks.get()
                while ack.state is not AlertState.ACKNOWLEDGED:
                    ack = await acks.get()
            assert (ack.alert_id, ack.hospital_id, ack.unit_id) == ("a1", "HA", "U1")
            state_text = await cdp.wait_in_page(
                session,
                "(() => { const s = document.querySelector('.ack-state').textContent;"
                " return s.startsWith('ACKNOWLEDGED') ? s : ''; })()",
            )
            assert "ed_staff" in state_text
            assert not await cdp.evaluate(session, "document.querySelector('.card').classList.contains('flash-high')")
            shot = await cdp.call("Page.captureScreenshot", session, format="png")
            (ARTIFACTS / "board-1920x1080.png").write_bytes(base64.b64decode(shot["data"]))
        finally:
            collector.cancel()
            with suppress(asyncio.CancelledError):
                await collector
