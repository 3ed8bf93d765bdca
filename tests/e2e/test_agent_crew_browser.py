"""The crew screen in a real headless Chromium, end to end over a real broker (embedded).

Crew taps "PATIENT CONTACT" and sends a STEMI pre-alert on the agent's local page -> the broker carries Status and
PreAlert -> dispatch (DispatchService) picks the destination and alerts the hospital -> the ED board (its own app)
publishes its display receipt -> the staff's acknowledgement (an AlertAck on the hospital's ack topic) -> dispatch
relays the state -> the crew screen shows the
destination with its reasons and the pre-alert's delivery: sent, stored (the telemetry store's receipt), on the
board, acknowledged.  Screenshots go to ``artifacts/`` (gitignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import uvicorn
from conftest import chromium_binary

from ambulance_agent.app import Agent
from ambulance_agent.crew_screen import CrewScreen
from ambulance_agent.sources import RouteGpsReplay, WfdbEcgReplay
from broker_config import (
    AlertAck,
    AlertState,
    BrokerSettings,
    CaseType,
    CrewStatus,
    PreAlert,
    Status,
    Stream,
    TopicSpace,
    decode,
    encode,
    utc_now,
)
from broker_config.identity import SecurityMode
from dispatch.hospitals import HospitalRegistry
from dispatch.service import DispatchService
from hospital_board.main import create_app as create_board_app
from hospital_board.settings import BoardSettings
from simulators import browser
from simulators.browser import DevTools
from telemetry.ingest import Ingest
from telemetry.store import open_store

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
RECORD_100 = ROOT / "simulators" / "data" / "mitdb" / "100"
SCENE_DEG = [(43.7396, 7.4275), (43.7384, 7.4246)]  # Monaco, near the Centre Cardio-Thoracique
HOSPITAL = "MC-CCM"
NOTE = 'Chest pain 40 min <img src=x onerror="window.__pwned=1"> & `x`'


class Cdp(DevTools):
    """The shared DevTools client (:mod:`simulators.browser`) with the crew screen's touch helpers; waits default
    to 20 s (the agent's first connection can take a while)."""

    async def wait_in_page(self, session: str, condition_js: str, timeout_s: float = 20) -> Any:
        return await super().wait_in_page(session, condition_js, timeout_s)

    async def tap(self, session: str, selector_js: str) -> None:
        """A real touch-sized mouse click at the centre of the element, scrolled into view first."""
        await self.click(session, selector_js, scroll=True)

    async def type_into(self, session: str, selector_js: str, text: str) -> None:
        await self.tap(session, selector_js)
        await self.insert_text(session, text)

    async def shot(self, session: str, name: str) -> None:
        """A screenshot of the top of the page, saved as ``artifacts/<name>``."""
        await self.evaluate(session, "window.scrollTo(0, 0)")
        await self.screenshot(session, ARTIFACTS / name)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Cdp]:
    async with browser.chromium(binary=chromium_binary(), window=None, client=Cdp, profile_prefix="gh-crew-") as cdp:
        assert isinstance(cdp, Cdp)
        yield cdp


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(15):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers only a flag
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await task
        sock.close()


@contextlib.asynccontextmanager
async def background(*coros: Any) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        async with asyncio.timeout(15):
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_crew_screen_status_and_prealert_reach_dispatch_and_board_and_the_ack_comes_back(
    embedded_broker: BrokerSettings, topic_space: TopicSpace, tmp_path: Path
) -> None:
    chromium_binary()
    space = topic_space
    unit = f"amb-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:8]
    store = open_store(f"sqlite:///{tmp_path}/store.sqlite3")
    await store.migrate()
    ingest = Ingest(store, embedded_broker, space, client_id=f"ingest-{tag}", batch_age_s=0.05)
    dispatch = DispatchService(embedded_broker, space, HospitalRegistry.load(), None, client_id=f"dispatch-{tag}")
    board_settings = BoardSettings(
        broker=embedded_broker,
        topic_prefix=space.prefix,
        default_hospital_id=HOSPITAL,
        security_mode=SecurityMode.DEVELOPMENT,
    )
    board_app = create_board_app(board_settings)
    agent = Agent(
        unit,
        embedded_broker,
        space,
        outbox_path=tmp_path / "outbox.db",
        ecg=WfdbEcgReplay(RECORD_100),
        vitals=None,
        gps=RouteGpsReplay(SCENE_DEG, speed_mps=0.0),
    )
    screen = CrewScreen(agent, port=0)
    seen: list[Any] = []
    arrived = asyncio.Event()
    async with (
        aiomqtt.Client(embedded_broker.host, embedded_broker.port, identifier=f"watch-{tag}") as watcher,
        background(ingest.run(), dispatch.run()),
        serving(board_app),
    ):
        await watcher.subscribe([(space.filter(s, unit), 1) for s in (Stream.STATUS, Stream.PREALERT)])

        async def watch() -> None:
            async for message in watcher.messages:
                assert isinstance(message.payload, bytes)
                seen.append(decode(space, message.topic.value, message.payload)[1])
                arrived.set()

        async def wait_seen(kind: type, timeout_s: float = 15) -> Any:
            async with asyncio.timeout(timeout_s):
                while not any(isinstance(m, kind) for m in seen):
                    arrived.clear()
                    await arrived.wait()
            return next(m for m in seen if isinstance(m, kind))

        await ingest.link.wait_connected(15)
        await dispatch.wait_ready(15)
        async with background(watch(), agent.run(), screen.serve()), chromium() as cdp:
            await screen.wait_started()
            await agent.link.wait_connected(15)
            crew = await cdp.open_page(screen.url, width=1280, height=800, timeout_s=20)  # the cab's tablet
            await cdp.wait_in_page(crew, "document.querySelector('#link-state').textContent === 'CONNECTED'")
            # gloves: every button is at least 64 px in both directions
            smallest = await cdp.evaluate(
                crew,
                "Math.min(...[...document.querySelectorAll('button')].filter(b => b.offsetParent)"
                ".map(b => Math.min(b.getBoundingClientRect().width, b.getBoundingClientRect().height)))",
            )
            assert smallest >= 64

            await cdp.tap(crew, "document.querySelector('button.status[data-status=patient_contact]')")
            status: Status = await wait_seen(Status)
            assert (status.unit_id, status.status) == (unit, CrewStatus.PATIENT_CONTACT)
            await cdp.wait_in_page(
                crew, "document.querySelector('button.status.current').dataset.status === 'patient_contact'"
            )

            await cdp.tap(crew, "document.querySelector('button.case[data-case=stemi]')")
            await cdp.type_into(crew, "document.querySelector('#age')", "64")
            await cdp.tap(crew, "document.querySelector('button.sex[data-sex=male]')")
            await cdp.tap(crew, "document.querySelector('button.tri[data-field=ecg_st_elevation][data-value=true]')")
            await cdp.type_into(crew, "document.querySelector('#sbp')", "128")
            await cdp.type_into(crew, "document.querySelector('#note')", NOTE)
            await cdp.tap(crew, "document.querySelector('#send-prealert')")
            prealert: PreAlert = await wait_seen(PreAlert)
            f = prealert.findings
            assert (prealert.case_type, f.age_years, f.sex, f.ecg_st_elevation, f.sbp_mmhg) == (
                CaseType.STEMI,
                64,
                "male",
                True,
                128,
            )
            assert f.note == NOTE
            assert f.fmc_at == status.at

            # dispatch chose the destination and told the crew, with its reasons
            await agent.wait_until(lambda: agent.destination is not None, timeout_s=20)
            assert agent.destination is not None
            await cdp.wait_in_page(
                crew,
                "document.querySelector('#destination').textContent !== 'No destination yet' && "
                "document.querySelectorAll('#destination-reasons li').length > 0",
            )
            # the store's receipt marks the pre-alert stored; the board's display receipt marks it on the board
            await cdp.wait_in_page(
                crew,
                "document.querySelector('.alert [data-stage=on_board]').classList.contains('done') && "
                "document.querySelector('.alert [data-stage=stored]').classList.contains('done')",
                timeout_s=30,
            )
            await cdp.shot(crew, "crew-screen-1280x800-sent.png")

            # The ED acknowledges.  The board app now signs its staff in with dispatch-issued tokens (another
            # engineer's work in progress), so the staff's acknowledgement is published here exactly as the board's
            # "Acknowledge" button publishes it: an AlertAck on the hospital's ack topic.
            hospital = agent.destination.hospital_id
            assert hospital is not None
            ack = AlertAck(
                unit_id=unit,
                seq=1,
                sent_at=utc_now(),
                alert_id=prealert.alert_id,
                hospital_id=hospital,
                state=AlertState.ACKNOWLEDGED,
                by_role="ed_staff",
                at=utc_now(),
            )
            await watcher.publish(space.topic(Stream.ACK, hospital), encode(Stream.ACK, ack), qos=1)
            await agent.wait_until(
                lambda: agent.alert_states.get(prealert.alert_id) is AlertState.ACKNOWLEDGED, timeout_s=20
            )
            await cdp.wait_in_page(
                crew, "document.querySelector('.alert [data-stage=acknowledged]').classList.contains('done')"
            )
            shown = await cdp.evaluate(
                crew,
                "(() => ({dest: document.querySelector('#destination').textContent,"
                " reasons: [...document.querySelectorAll('#destination-reasons li')].map(li => li.textContent),"
                " teams: [...document.querySelectorAll('.alert .teams li')].map(li => li.textContent),"
                " imgs: document.querySelectorAll('img').length,"
                " pwned: window.__pwned === undefined ? null : window.__pwned}))()",
            )
            await cdp.shot(crew, "crew-screen-1280x800-acknowledged.png")
            agent.stop()
    await store.close()
    agent.close()
    assert shown["dest"] == agent.destination.hospital_name
    assert shown["reasons"] == list(agent.destination.reasons)
    assert any("CATH LAB" in t for t in shown["teams"]), shown["teams"]
    assert shown["imgs"] == 0
    assert shown["pwned"] is None
