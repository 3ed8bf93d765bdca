"""Incidents and case timelines over the real broker (Mosquitto) and a fresh PostgreSQL database.

Units report over MQTT; the dispatcher works through the HTTP API (ASGI, in process); the crew receives its
assignment and stand-down notices over MQTT; the hospital's board receives the pre-alert and acknowledges over
MQTT.  A STEMI case runs from call to hand-over with every time point recorded and the door-to-balloon time
computed; the state is read back after a restart from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import aiomqtt
import httpx
import pytest
from pydantic import BaseModel

from broker_config import (
    STREAMS,
    AlertAck,
    AlertState,
    Availability,
    BrokerSettings,
    CaseType,
    CrewStatus,
    Department,
    Findings,
    GpsFix,
    HospitalAlert,
    Notice,
    NoticeKind,
    PreAlert,
    Status,
    Stream,
    TopicSpace,
    decode,
    encode,
    utc_now,
)
from broker_config.identity import Role
from dispatch.api import create_app
from dispatch.hospitals import DATA_DIR, HospitalRegistry
from dispatch.routing import RoadRouter
from dispatch.security import DispatchSecurity
from dispatch.service import DispatchService
from dispatch.sql_repository import SqlRepository

pytestmark = pytest.mark.integration

SCENE = (43.7304054, 7.4114082)
NEAR_SCENE = (43.7369, 7.4210)
FAR = (43.7440, 7.4300)
CCM = (43.7376303, 7.4248591)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def router() -> RoadRouter:
    return RoadRouter.from_pbf(DATA_DIR / "monaco.osm.pbf")


class Field:
    """The crews and the CCM board: one MQTT client; notices and alerts land on a queue."""

    def __init__(self, client: aiomqtt.Client, space: TopicSpace) -> None:
        self.client = client
        self.space = space
        self.inbox: asyncio.Queue[object] = asyncio.Queue(maxsize=200)
        self.seq = 100
        self.clock: Clock | None = None

    async def reader(self) -> None:
        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            await self.inbox.put(decode(self.space, str(message.topic), payload)[1])

    async def publish(self, stream: Stream, owner: str, model: BaseModel) -> None:
        sent_at = getattr(model, "sent_at", None)
        if self.clock is not None and sent_at is not None and sent_at > self.clock.now:
            self.clock.now = sent_at  # the service's clock follows the crews' (it refuses messages from the future)
        spec = STREAMS[stream]
        await self.client.publish(
            self.space.topic(stream, owner),
            encode(stream, model),
            qos=spec.qos,
            retain=spec.retain,
        )

    async def expect(self, predicate: Callable[[object], bool], timeout_s: float = 10) -> object:
        async with asyncio.timeout(timeout_s):
            while True:
                item = await self.inbox.get()
                if predicate(item):
                    return item

    async def notice(self, unit: str, kind: NoticeKind) -> Notice:
        found = await self.expect(lambda m: isinstance(m, Notice) and m.unit_id == unit and m.kind is kind)
        assert isinstance(found, Notice)
        return found

    async def status(self, unit: str, st: CrewStatus, at: datetime, incident: str | None) -> None:
        self.seq += 1
        message = Status(unit_id=unit, seq=self.seq, sent_at=at, status=st, at=at, incident_id=incident)
        await self.publish(Stream.STATUS, unit, message)

    async def gps(self, unit: str, pos: tuple[float, float], at: datetime) -> None:
        self.seq += 1
        await self.publish(
            Stream.GPS, unit, GpsFix(unit_id=unit, seq=self.seq, sent_at=at, fix=True, lat_deg=pos[0], lon_deg=pos[1])
        )


@asynccontextmanager
async def field(broker: BrokerSettings, space: TopicSpace) -> AsyncIterator[Field]:
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"test-field-{uuid.uuid4().hex[:8]}") as client:
        f = Field(client, space)
        await client.subscribe([(space.filter(Stream.NOTICE), 1), (space.filter(Stream.ALERT, "MC-CCM"), 1)])
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(f.reader())
            try:
                yield f
            finally:
                for unit in ("AMB1", "AMB2"):  # no retained state of this test stays on the shared broker
                    for stream in (Stream.STATUS, Stream.GPS, Stream.AVAILABILITY):
                        await client.publish(space.topic(stream, unit), b"", qos=1, retain=True)
                task.cancel()


@asynccontextmanager
async def running(
    broker: BrokerSettings, space: TopicSpace, router: RoadRouter, pg_url: str, clock: Clock
) -> AsyncIterator[tuple[DispatchService, httpx.AsyncClient]]:
    service = DispatchService(
        broker,
        space,
        HospitalRegistry.load(),
        router,
        client_id=f"dispatch-{uuid.uuid4().hex[:8]}",
        repository=SqlRepository.from_url(pg_url),
        clock=clock,
    )
    security = DispatchSecurity.development(clock=clock, access_ttl_s=24 * 3600)  # the test clock jumps hours
    app = create_app(service=service, security=security)
    headers = {"Authorization": f"Bearer {security.issue('admin', Role.ADMINISTRATOR)}"}
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(service.run())
        try:
            await service.wait_ready(15)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://dispatch", headers=headers) as client:
                yield service, client
        finally:
            task.cancel()


async def wait_until(service: DispatchService, predicate: Callable[[], bool], timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s), service.handled:
        await service.handled.wait_for(predicate)


async def test_stemi_case_from_call_to_handover_over_broker_and_postgresql(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace, router: RoadRouter, pg_url: str
) -> None:
    t0 = utc_now().replace(microsecond=0) - timedelta(hours=3)
    m: Callable[[float], datetime] = lambda minutes: t0 + timedelta(minutes=minutes)  # noqa: E731
    clock = Clock(t0)
    space = topic_space
    async with field(mqtt_settings, space) as crews:
        crews.clock = clock
        async with running(mqtt_settings, space, router, pg_url, clock) as (svc, api):
            for unit, pos in (("AMB1", FAR), ("AMB2", NEAR_SCENE)):
                await crews.publish(
                    Stream.AVAILABILITY, unit, Availability(unit_id=unit, seq=1, sent_at=t0, state="online")
                )
                await crews.status(unit, CrewStatus.AVAILABLE, t0, None)
                await crews.gps(unit, pos, t0)
            await wait_until(
                svc, lambda: all(u.available and u.gps_fix for u in svc.repo.units()) and len(svc.repo.units()) == 2
            )

            # bad input is refused with a clear reason
            out_of_range = await api.post("/api/incidents", json={"lat_deg": 95, "lon_deg": 7.4, "complaint": "x"})
            assert out_of_range.status_code == 422
            assert "lat_deg" in out_of_range.text
            body = {"lat_deg": SCENE[0], "lon_deg": SCENE[1], "complaint": "x", "destination_hospital_id": "XX-NONE"}
            unknown = await api.post("/api/incidents", json=body)
            assert unknown.status_code == 422
            assert unknown.json()["detail"] == "unknown hospital 'XX-NONE'"

            body = {"lat_deg": SCENE[0], "lon_deg": SCENE[1], "complaint": "chest pain", "priority": "high"}
            incident = (await api.post("/api/incidents", json={**body, "case_type": "stemi"})).json()
            iid = incident["incident_id"]
            rec = (await api.get(f"/api/incidents/{iid}/recommend-units")).json()
            assert [u["unit_id"] for u in rec["units"]] == ["AMB2", "AMB1"]
            assert rec["destinations"][0]["hospital_id"] == "MC-CCM"

            # assign AMB2, then re-assign to AMB1: both notices cross the broker
            clock.now = m(0.5)
            assert (await api.post(f"/api/incidents/{iid}/assign", json={"unit_id": "AMB2"})).status_code == 200
            first = await crews.notice("AMB2", NoticeKind.ASSIGNMENT)
            assert (first.incident_id, first.incident_lat_deg, first.incident_lon_deg) == (iid, *SCENE)
            clock.now = m(1)
            resp = await api.post(f"/api/incidents/{iid}/assign", json={"unit_id": "AMB1"})
            assert resp.json()["previous_unit_id"] == "AMB2"
            assert (await crews.notice("AMB2", NoticeKind.ASSIGNMENT_CANCELLED)).incident_id == iid
            assert (await crews.notice("AMB1", NoticeKind.ASSIGNMENT)).incident_id == iid

            # a second incident for AMB2, cancelled: the stand-down crosses the broker too
            other = (await api.post("/api/incidents", json={**body, "complaint": "fall"})).json()
            await api.post(f"/api/incidents/{other['incident_id']}/assign", json={"unit_id": "AMB2"})
            assert (await crews.notice("AMB2", NoticeKind.ASSIGNMENT)).incident_id == other["incident_id"]
            assert (await api.post(f"/api/incidents/{other['incident_id']}/cancel", json={})).status_code == 200
            assert (await crews.notice("AMB2", NoticeKind.ASSIGNMENT_CANCELLED)).incident_id == other["incident_id"]

            # AMB1 runs the STEMI case
            await crews.status("AMB1", CrewStatus.ASSIGNED, m(1.2), iid)
            await crews.status("AMB1", CrewStatus.EN_ROUTE, m(2), iid)
            await crews.gps("AMB1", (SCENE[0], SCENE[1] + 0.0005), m(8))  # geofence: on scene
            await crews.status("AMB1", CrewStatus.ON_SCENE, m(8.5), iid)
            await crews.status("AMB1", CrewStatus.PATIENT_CONTACT, m(10), iid)
            await wait_until(svc, lambda: svc.repo.unit("AMB1").status is CrewStatus.PATIENT_CONTACT)
            clock.now = m(17)
            findings = Findings(fmc_at=m(10), first_ecg_at=m(15), ecg_transmitted_at=m(16), ecg_st_elevation=True)
            await crews.publish(
                Stream.PREALERT,
                "AMB1",
                PreAlert(
                    unit_id="AMB1", seq=0, sent_at=m(17), alert_id="P-1", case_type=CaseType.STEMI, findings=findings
                ),
            )
            alert = await crews.expect(lambda x: isinstance(x, HospitalAlert) and x.alert_id == "P-1")
            assert isinstance(alert, HospitalAlert)
            assert Department.CATH_LAB in alert.departments
            clock.now = m(19)
            ack = AlertAck(
                unit_id="AMB1",
                seq=0,
                sent_at=m(19),
                alert_id="P-1",
                hospital_id="MC-CCM",
                state=AlertState.ACKNOWLEDGED,
                department=Department.CATH_LAB,
                by_role="cath_lab_nurse",
                at=m(19),
            )
            await crews.publish(Stream.ACK, "MC-CCM", ack)
            await crews.status("AMB1", CrewStatus.TRANSPORTING, m(21), iid)
            await crews.gps("AMB1", CCM, m(29))  # geofence: at destination
            await wait_until(svc, lambda: svc.repo.unit("AMB1").lifecycle is CrewStatus.AT_HOSPITAL)
            clock.now = m(100)
            for point, minute in (("hospital_door", 30), ("device", 78)):
                event = {"point": point, "at": m(minute).isoformat(), "hospital_id": "MC-CCM"}
                assert (await api.post(f"/api/cases/{iid}/events", json=event)).status_code == 201
            late = await api.post(f"/api/cases/{iid}/events", json={"point": "ct_start", "at": m(25).isoformat()})
            assert late.status_code == 422
            assert late.json()["detail"]["violations"] == ["ct_start before hospital_door"]
            bad_hospital = {"point": "needle", "at": m(40).isoformat(), "hospital_id": "XX-NONE"}
            assert (await api.post(f"/api/cases/{iid}/events", json=bad_hospital)).status_code == 422
            await crews.status("AMB1", CrewStatus.HANDED_OVER, m(32), iid)
            await crews.status("AMB1", CrewStatus.BACK_IN_SERVICE, m(50), iid)
            await wait_until(svc, lambda: svc.repo.unit("AMB1").available)
            assert svc.rejected == {}
            before = (await api.get(f"/api/cases/{iid}/timeline")).json()

        points = {(e["point"], e["source"]) for e in before["events"]}
        expected = {
            ("call_received", "dispatch"),
            ("dispatch_notified", "dispatch"),
            ("unit_notified", "dispatch"),
            ("en_route", "crew"),
            ("on_scene", "geofence"),
            ("on_scene", "crew"),
            ("patient_contact", "crew"),
            ("first_ecg", "device"),
            ("ecg_transmitted", "device"),
            ("prealert_sent", "device"),
            ("cath_lab_activated", "dispatch"),
            ("cath_lab_acknowledged", "hospital"),
            ("left_scene", "crew"),
            ("at_destination", "geofence"),
            ("hospital_door", "hospital"),
            ("device", "hospital"),
            ("transfer_of_care", "crew"),
            ("back_in_service", "crew"),
        }
        assert expected <= points, expected - points
        intervals = {i["name"]: i for i in before["intervals"]}
        assert (intervals["door_to_balloon"]["seconds"], intervals["door_to_balloon"]["compliant"]) == (2880.0, True)
        assert intervals["fmc_to_ecg"]["seconds"] == 300.0
        assert before["quality_flags"] == []
        assert before["state"] == "closed"

        # a restart reads the same case back from PostgreSQL
        async with running(mqtt_settings, space, router, pg_url, clock) as (_svc, api):
            after = (await api.get(f"/api/cases/{iid}/timeline")).json()
            assert after == before
            cancelled = (await api.get(f"/api/incidents/{other['incident_id']}")).json()
            assert cancelled["state"] == "cancelled"
            month = f"{t0:%Y-%m}"
            report = (await api.get("/api/reports/monthly", params={"month": month})).json()
            d2b = next(i for i in report["intervals"] if i["name"] == "door_to_balloon")
            assert d2b["n_cases"] >= 1
