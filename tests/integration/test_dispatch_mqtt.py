"""Dispatch end to end over real sockets: a unit's GPS fix and STEMI pre-alert in, a HospitalAlert to the PCI
centre and a destination Notice to the unit out; the hospital's ack relayed back; the API shows it all.

Runs against the embedded amqtt broker (the app owns the service in its lifespan) and the real Mosquitto
(the caller runs the service and passes it to the app).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import aiomqtt
import httpx
import pytest
from fastapi import FastAPI

from broker_config import (
    STREAMS,
    AlertAck,
    AlertState,
    BrokerSettings,
    CaseType,
    Findings,
    GpsFix,
    HospitalAlert,
    Notice,
    NoticeKind,
    PreAlert,
    Stream,
    TopicSpace,
    decode,
    encode,
    utc_now,
)
from broker_config.identity import Role, generate_signing_key, signing_key_text
from dispatch.api import create_app
from dispatch.hospitals import DATA_DIR, HospitalRegistry
from dispatch.routing import RoadRouter
from dispatch.security import DispatchSecurity
from dispatch.service import DispatchService
from dispatch.settings import DispatchSettings

pytestmark = pytest.mark.integration

UNIT = "AMB12"
NEAR_CHPG = (43.7304054, 7.4114082)  # the nearest ED is CHPG; the only 24/7 PCI centre is CCM


@pytest.fixture(scope="module")
def router() -> RoadRouter:
    return RoadRouter.from_pbf(DATA_DIR / "monaco.osm.pbf")


async def wait_until(service: DispatchService, predicate: Callable[[], bool], timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s), service.handled:
        await service.handled.wait_for(predicate)


class Crew:
    """A unit and a hospital board as the test drives them: one MQTT client, inbound messages on a queue."""

    def __init__(self, client: aiomqtt.Client, space: TopicSpace) -> None:
        self.client = client
        self.space = space
        self.inbox: asyncio.Queue[object] = asyncio.Queue(maxsize=100)

    async def reader(self) -> None:
        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            await self.inbox.put(decode(self.space, str(message.topic), payload)[1])

    async def publish(self, stream: Stream, owner: str, model: object) -> None:
        spec = STREAMS[stream]
        data = encode(stream, model)  # type: ignore[arg-type]
        await self.client.publish(self.space.topic(stream, owner), data, qos=spec.qos, retain=spec.retain)

    async def next(self, kind: type, timeout_s: float = 10) -> object:
        async with asyncio.timeout(timeout_s):
            while True:
                item = await self.inbox.get()
                if isinstance(item, kind):
                    return item


@contextlib.asynccontextmanager
async def crew_client(broker: BrokerSettings, space: TopicSpace) -> AsyncIterator[Crew]:
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"test-crew-{uuid.uuid4().hex[:8]}") as client:
        crew = Crew(client, space)
        await client.subscribe([(space.filter(Stream.ALERT, "MC-CCM"), 1), (space.filter(Stream.NOTICE, UNIT), 1)])
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(crew.reader())
            try:
                yield crew
            finally:
                # clear the retained GPS fix so the shared broker keeps no state of this test
                await client.publish(space.topic(Stream.GPS, UNIT), b"", qos=1, retain=True)
                task.cancel()


async def drive_stemi_scenario(service: DispatchService, app: FastAPI, crew: Crew) -> None:
    now = utc_now()
    fix = GpsFix(unit_id=UNIT, seq=1, sent_at=now, fix=True, lat_deg=NEAR_CHPG[0], lon_deg=NEAR_CHPG[1])
    await crew.publish(Stream.GPS, UNIT, fix)
    await wait_until(service, lambda: service.processed["gps"] >= 1)

    # a malformed pre-alert first: counted, logged with ids only, and the loop keeps going
    await crew.client.publish(crew.space.topic(Stream.PREALERT, UNIT), b'{"schema_version":1,"unit_', qos=1)
    findings = Findings(fmc_at=now - timedelta(minutes=8), age_years=60, ecg_st_elevation=True)
    alert_in = PreAlert(
        unit_id=UNIT, seq=7, sent_at=now, alert_id="ALERT-1", case_type=CaseType.STEMI, findings=findings
    )
    await crew.publish(Stream.PREALERT, UNIT, alert_in)

    hospital_alert = await crew.next(HospitalAlert)
    assert isinstance(hospital_alert, HospitalAlert)
    assert hospital_alert.hospital_id == "MC-CCM"
    assert hospital_alert.alert_id == "ALERT-1"
    assert hospital_alert.state is AlertState.SENT
    assert hospital_alert.eta_at is not None
    assert hospital_alert.findings.ecg_st_elevation
    notice = await crew.next(Notice)
    assert isinstance(notice, Notice)
    assert notice.kind is NoticeKind.DESTINATION
    assert notice.hospital_id == "MC-CCM"
    assert notice.hospital_name == "Centre Cardio-Thoracique de Monaco"
    assert notice.alert_state is AlertState.SENT
    assert notice.reasons
    assert service.rejected["bad_json"] == 1

    ack = AlertAck(
        unit_id=UNIT,
        seq=0,
        sent_at=utc_now(),
        alert_id="ALERT-1",
        hospital_id="MC-CCM",
        state=AlertState.ACKNOWLEDGED,
        by_role="cath_lab_nurse",
        at=utc_now(),
    )
    await crew.publish(Stream.ACK, "MC-CCM", ack)
    relayed = await crew.next(Notice)
    assert isinstance(relayed, Notice)
    assert relayed.kind is NoticeKind.ALERT_STATE
    assert relayed.alert_state is AlertState.ACKNOWLEDGED

    token = app.state.security.security.issue("admin", Role.ADMINISTRATOR)
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://dispatch", headers=headers) as http:
        detail = (await http.get("/api/alerts/ALERT-1")).json()
        assert detail["state"] == "acknowledged"
        assert detail["hospital_id"] == "MC-CCM"
        assert detail["acks"][0]["by_role"] == "cath_lab_nurse"
        kinds = [e["kind"] for e in detail["timeline"]]
        assert kinds[:2] == ["prealert_received", "destination_chosen"]
        assert {"alert_sent", "notice_sent", "acknowledged"} <= set(kinds)
        assert all(e["source"] for e in detail["timeline"])
        units = (await http.get("/api/units")).json()
        assert units[0]["unit_id"] == UNIT
        assert units[0]["destination_hospital_id"] == "MC-CCM"
        health = (await http.get("/api/health")).json()
        assert health["status"] == "ok"
        assert health["rejected"] == {"bad_json": 1}


async def forget_session(broker: BrokerSettings, client_id: str) -> None:
    """Drop the persistent session the test created on the broker."""
    async with aiomqtt.Client(broker.host, broker.port, identifier=client_id, clean_session=True):
        pass


async def test_stemi_prealert_via_embedded_broker_app_owns_service(
    embedded_broker: BrokerSettings, topic_space: TopicSpace, router: RoadRouter
) -> None:
    broker = embedded_broker.model_copy(update={"topic_prefix": topic_space.prefix})
    settings = DispatchSettings(
        broker=broker,
        client_id=f"goldenhour-dispatch-{uuid.uuid4().hex[:8]}",
        signing_key=signing_key_text(generate_signing_key()),
    )
    app = create_app(settings, router=router)
    async with app.router.lifespan_context(app):
        service: DispatchService = app.state.service
        await service.wait_ready(10)
        async with crew_client(broker, topic_space) as crew:
            await drive_stemi_scenario(service, app, crew)


async def test_stemi_prealert_via_mosquitto_caller_runs_service(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace, router: RoadRouter
) -> None:
    client_id = f"goldenhour-dispatch-{uuid.uuid4().hex[:8]}"
    service = DispatchService(mqtt_settings, topic_space, HospitalRegistry.load(), router, client_id=client_id)
    app = create_app(service=service, security=DispatchSecurity.development())
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(service.run())
        try:
            await service.wait_ready(10)
            async with crew_client(mqtt_settings, topic_space) as crew:
                await drive_stemi_scenario(service, app, crew)
        finally:
            task.cancel()
    await forget_session(mqtt_settings, client_id)


async def test_prealert_sent_while_dispatch_is_down_is_delivered_on_return(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace, router: RoadRouter
) -> None:
    """Persistent session (clean session off, fixed client id, QoS 1): a restart of dispatch loses no pre-alert."""
    client_id = f"goldenhour-dispatch-{uuid.uuid4().hex[:8]}"

    def make() -> DispatchService:
        return DispatchService(mqtt_settings, topic_space, HospitalRegistry.load(), router, client_id=client_id)

    first = make()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(first.run())
        await first.wait_ready(10)
        task.cancel()
    async with crew_client(mqtt_settings, topic_space) as crew:
        alert_in = PreAlert(unit_id=UNIT, seq=1, sent_at=utc_now(), alert_id="WHILE-DOWN", case_type=CaseType.STEMI)
        await crew.publish(Stream.PREALERT, UNIT, alert_in)  # dispatch is offline now
        second = make()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(second.run())
            try:
                hospital_alert = await crew.next(HospitalAlert)
                assert isinstance(hospital_alert, HospitalAlert)
                assert hospital_alert.alert_id == "WHILE-DOWN"
                assert hospital_alert.hospital_id == "MC-CCM"  # no position: capability decides, ETA unknown
            finally:
                task.cancel()
    await forget_session(mqtt_settings, client_id)
