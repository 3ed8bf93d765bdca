"""The dispatcher console in a real headless Chromium, driven over the DevTools protocol.

Units report over the real broker; uvicorn serves dispatch on a loopback socket; Chromium loads /console, a real
mouse click on the map places the incident, the form creates it, "Assign recommended unit" assigns the nearest
unit, whose crew receives Notice(kind=assignment) over MQTT.  A unit without a fix is listed as "no position"
(FF-15) and a caller note with markup is shown as text (FF-16).  A 1920x1080 screenshot goes to ``artifacts/``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import uvicorn
from conftest import chromium_binary

from broker_config import (
    STREAMS,
    Availability,
    BrokerSettings,
    CaseType,
    CrewStatus,
    Findings,
    GpsFix,
    Notice,
    NoticeKind,
    PreAlert,
    Status,
    Stream,
    TopicSpace,
    decode_as,
    encode,
    utc_now,
)
from broker_config.identity import ACCESS_COOKIE, Role
from dispatch.api import create_app
from dispatch.hospitals import DATA_DIR, HospitalRegistry
from dispatch.routing import RoadRouter
from dispatch.security import DispatchSecurity
from dispatch.service import DispatchService
from simulators import browser
from simulators.browser import DevTools

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.integration]

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
SCENE = (43.7304054, 7.4114082)
UNITS = {"AMB1": (43.7440, 7.4300), "AMB2": (43.7369, 7.4210), "AMB9": None}
NOTE = 'Name <unknown> <img src=x onerror="window.__pwned=1">'


@asynccontextmanager
async def chromium() -> AsyncIterator[DevTools]:
    """A fresh headless Chromium (the shared client of :mod:`simulators.browser`)."""
    async with browser.chromium(binary=chromium_binary()) as cdp:
        yield cdp


@asynccontextmanager
async def dispatch_server(
    broker: BrokerSettings, space: TopicSpace
) -> AsyncIterator[tuple[str, DispatchService, DispatchSecurity]]:
    router = await asyncio.to_thread(RoadRouter.from_pbf, DATA_DIR / "monaco.osm.pbf")
    service = DispatchService(
        broker, space, HospitalRegistry.load(), router, client_id=f"dispatch-{uuid.uuid4().hex[:8]}"
    )
    security = DispatchSecurity.development()
    app = create_app(service=service, security=security)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, access_log=False))
    async with asyncio.TaskGroup() as tg:
        running = tg.create_task(service.run())
        serving = tg.create_task(server.serve(sockets=[sock]))
        try:
            await service.wait_ready(15)
            yield f"http://127.0.0.1:{sock.getsockname()[1]}", service, security
        finally:
            server.should_exit = True
            async with asyncio.timeout(15):
                await serving
            running.cancel()
            sock.close()


async def test_console_creates_incident_and_assigns_recommended_unit(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    chromium_binary()
    space = topic_space
    notices: asyncio.Queue[Notice] = asyncio.Queue()
    async with (
        dispatch_server(mqtt_settings, space) as (url, service, security),
        aiomqtt.Client(mqtt_settings.host, mqtt_settings.port, identifier=f"t-{uuid.uuid4().hex[:8]}") as mqtt,
        chromium() as cdp,
    ):
        await mqtt.subscribe(space.filter(Stream.NOTICE), qos=1)

        async def pub(stream: Stream, owner: str, message: Any) -> None:
            spec = STREAMS[stream]
            await mqtt.publish(space.topic(stream, owner), encode(stream, message), qos=spec.qos, retain=spec.retain)

        async def collect() -> None:
            async for message in mqtt.messages:
                assert isinstance(message.payload, bytes)
                await notices.put(decode_as(Notice, space, message.topic.value, message.payload))

        collector = asyncio.create_task(collect())
        try:
            now = utc_now()
            for n, (unit, pos) in enumerate(UNITS.items()):
                await pub(Stream.AVAILABILITY, unit, Availability(unit_id=unit, seq=1, sent_at=now, state="online"))
                await pub(
                    Stream.STATUS, unit, Status(unit_id=unit, seq=n, sent_at=now, status=CrewStatus.AVAILABLE, at=now)
                )
                fix = (
                    GpsFix(unit_id=unit, seq=n, sent_at=now, fix=True, lat_deg=pos[0], lon_deg=pos[1])
                    if pos
                    else GpsFix(unit_id=unit, seq=n, sent_at=now, fix=False)
                )
                await pub(Stream.GPS, unit, fix)
            async with asyncio.timeout(10), service.handled:
                await service.handled.wait_for(lambda: sum(u.available for u in service.repo.units()) == 3)

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
            await cdp.call("Network.enable", session)
            token = security.issue("dispatcher-1", Role.DISPATCHER)
            await cdp.call(
                "Network.setCookie", session, name=ACCESS_COOKIE, value=token, url=url, httpOnly=True, sameSite="Strict"
            )
            await cdp.call("Page.navigate", session, url=f"{url}/console")
            await cdp.wait_event("Page.loadEventFired")
            await cdp.wait_in_page(session, "window.ghConsole && window.ghConsole.ready()")
            await cdp.wait_in_page(session, "document.querySelectorAll('#units li').length === 2")
            nopos = await cdp.evaluate(session, "document.querySelector('#units-nopos').textContent")
            assert "AMB9" in nopos
            assert "no position" in nopos

            # a real click on the map at the scene fills the form; the form creates the incident
            point = await cdp.evaluate(session, f"window.ghConsole.toPixel({SCENE[0]}, {SCENE[1]})")
            await cdp.click_at(session, point["x"], point["y"])
            lat = float(await cdp.evaluate(session, "document.querySelector('#f-lat').value"))
            lon = float(await cdp.evaluate(session, "document.querySelector('#f-lon').value"))
            assert abs(lat - SCENE[0]) < 0.001
            assert abs(lon - SCENE[1]) < 0.001
            await cdp.evaluate(
                session,
                "(() => { document.querySelector('#f-complaint').value = 'chest pain';"
                f" document.querySelector('#f-notes').value = {json.dumps(NOTE)};"
                " document.querySelector('#f-priority').value = 'high';"
                " document.querySelector('#f-case').value = 'stemi'; return true; })()",
            )
            await cdp.click(session, "document.querySelector('#f-submit')")
            await cdp.wait_in_page(
                session,
                "document.querySelectorAll('#rec-units li').length === 3 &&"
                " !document.querySelector('#assign-best').disabled",
            )
            shown = await cdp.evaluate(
                session,
                "(() => ({ first: document.querySelector('#rec-units li').dataset.unit,"
                " reasons: document.querySelector('#rec-units li .reasons').textContent,"
                " dest: document.querySelector('#rec-dest li').textContent,"
                " notes: document.querySelector('#d-notes').textContent,"
                " imgs: document.querySelectorAll('#detail img').length,"
                " pwned: window.__pwned === undefined ? null : window.__pwned }))()",
            )
            assert shown["first"] == "AMB2"
            assert shown["reasons"].startswith("road ETA")
            assert "Cardio" in shown["dest"] or "PCI" in shown["dest"]
            assert shown["notes"] == NOTE
            assert shown["imgs"] == 0
            assert shown["pwned"] is None

            await cdp.click(session, "document.querySelector('#assign-best')")
            async with asyncio.timeout(10):
                notice = await notices.get()
                while notice.kind is not NoticeKind.ASSIGNMENT:
                    notice = await notices.get()
            assert notice.unit_id == "AMB2"
            incident = service.repo.incidents()[0]
            assert (notice.incident_id, incident.unit_id) == (incident.incident_id, "AMB2")
            await cdp.wait_in_page(
                session,
                "document.querySelector('#timeline tbody tr[data-point=unit_notified]') &&"
                " document.querySelector('#d-state').textContent.startsWith('assigned')",
            )
            # a crew's pre-alert: the panel shows it with each department's page while nobody has acknowledged
            await pub(
                Stream.PREALERT, "AMB1",
                PreAlert(unit_id="AMB1", seq=0, sent_at=utc_now(), alert_id="A-CONSOLE-1", case_type=CaseType.STEMI,
                         findings=Findings(note=NOTE), requested_hospital_id="MC-CCM"),
            )  # fmt: skip
            await cdp.wait_in_page(
                session, "document.querySelectorAll('#alerts li[data-alert=\"A-CONSOLE-1\"] .acts li').length === 2"
            )
            panel = await cdp.evaluate(
                session, "document.querySelector('#alerts li[data-alert=\"A-CONSOLE-1\"]').textContent"
            )
            assert "AMB1" in panel
            assert "cath lab: paged, primary" in panel
            assert "escalates in" in panel
            ARTIFACTS.mkdir(exist_ok=True)
            shot = await cdp.call("Page.captureScreenshot", session, format="png")
            (ARTIFACTS / "dispatch-console-1920x1080.png").write_bytes(base64.b64decode(shot["data"]))
        finally:
            collector.cancel()
            with suppress(asyncio.CancelledError):
                await collector
            for unit in UNITS:
                for stream in (Stream.STATUS, Stream.GPS, Stream.AVAILABILITY):
                    await mqtt.publish(space.topic(stream, unit), b"", qos=1, retain=True)
