"""Incidents, assignment, unit lifecycle, geofences and the case timeline, through the HTTP API (ASGI transport,
no sockets; the MQTT link is a recorder) and the pure helpers underneath."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest

from broker_config import (
    AlertAck,
    AlertState,
    Availability,
    BrokerSettings,
    CaseType,
    CrewStatus,
    Department,
    Findings,
    GpsFix,
    Notice,
    NoticeKind,
    PreAlert,
    Status,
    Stream,
    TopicSpace,
    decode,
    encode,
)
from broker_config.connection import NotConnectedError
from broker_config.identity import Role
from dispatch.api import create_app
from dispatch.errors import TimelineOrderError
from dispatch.hospitals import DATA_DIR, HospitalRegistry
from dispatch.incidents import advances, rank_units, within_geofence
from dispatch.repository import UnitRecord
from dispatch.roadmap import road_map, simplify
from dispatch.routing import RoadRouter
from dispatch.security import DispatchSecurity
from dispatch.service import DispatchService
from dispatch.timeline import TimePoint, TimeSource, append_event

T0 = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)
SPACE = TopicSpace("inc-test/")
SCENE = (43.7304054, 7.4114082)  # next to CHPG
NEAR_SCENE = (43.7369, 7.4210)  # ~1.2 km away
FAR = (43.7440, 7.4300)
CCM = (43.7376303, 7.4248591)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class RecordingLink:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.fail = False
        self.connected = asyncio.Event()
        self.connected.set()
        self.sessions = 1

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False, timeout_s: float) -> None:
        if self.fail:
            raise NotConnectedError("down")
        self.published.append((topic, payload))

    async def wait_connected(self, timeout_s: float) -> None:
        if self.fail:
            raise TimeoutError

    def notices(self) -> list[Notice]:
        out = []
        for topic, payload in self.published:
            model = decode(SPACE, topic, payload)[1]
            if isinstance(model, Notice):
                out.append(model)
        return out


@pytest.fixture(scope="module")
def router() -> RoadRouter:
    return RoadRouter.from_pbf(DATA_DIR / "monaco.osm.pbf")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(router: RoadRouter, clock: Clock) -> DispatchService:
    svc = DispatchService(BrokerSettings(), SPACE, HospitalRegistry.load(), router, clock=clock)
    svc.link = RecordingLink()  # type: ignore[assignment]
    return svc


@pytest.fixture
async def client(service: DispatchService) -> AsyncIterator[httpx.AsyncClient]:
    security = DispatchSecurity.development(clock=service.clock, access_ttl_s=24 * 3600)  # the test clock jumps hours
    app = create_app(service=service, security=security)
    headers = {"Authorization": f"Bearer {security.issue('admin', Role.ADMINISTRATOR)}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://dispatch", headers=headers) as c:
        yield c


async def feed(svc: DispatchService, stream: Stream, owner: str, model: object) -> None:
    """Deliver as the broker would, received when it was sent (the clock check refuses messages from the future)."""
    received_at = getattr(model, "sent_at", None)
    await svc.handle(SPACE.topic(stream, owner), encode(stream, model), received_at)  # type: ignore[arg-type]


async def unit_at(svc: DispatchService, unit: str, pos: tuple[float, float] | None, seq: int = 0) -> None:
    await feed(svc, Stream.AVAILABILITY, unit, Availability(unit_id=unit, seq=1, sent_at=T0, state="online"))
    status = Status(unit_id=unit, seq=seq, sent_at=T0, status=CrewStatus.AVAILABLE, at=T0)
    await feed(svc, Stream.STATUS, unit, status)
    fix = (
        GpsFix(unit_id=unit, seq=seq, sent_at=T0, fix=True, lat_deg=pos[0], lon_deg=pos[1])
        if pos
        else GpsFix(unit_id=unit, seq=seq, sent_at=T0, fix=False)
    )
    await feed(svc, Stream.GPS, unit, fix)


async def tap(svc: DispatchService, unit: str, seq: int, st: CrewStatus, at: datetime, incident: str) -> None:
    status = Status(unit_id=unit, seq=seq, sent_at=at, status=st, at=at, incident_id=incident)
    await feed(svc, Stream.STATUS, unit, status)


async def new_incident(client: httpx.AsyncClient, **kw: object) -> dict[str, object]:
    body = {"lat_deg": SCENE[0], "lon_deg": SCENE[1], "complaint": "chest pain", "priority": "high", **kw}
    resp = await client.post("/api/incidents", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()


# --- pure helpers ------------------------------------------------------------------------------------------------


def test_rank_units_orders_by_eta_and_lists_units_without_position_last() -> None:
    units = [
        UnitRecord("A", position_deg=FAR, position_at=T0, gps_fix=True),
        UnitRecord("B", position_deg=None),
        UnitRecord("C", position_deg=NEAR_SCENE, position_at=T0 - timedelta(minutes=20), gps_fix=False),
        UnitRecord("D", position_deg=(0.0, 0.0), position_at=T0, gps_fix=True),  # Null Island is no position
    ]
    ranked = rank_units(SCENE, units, {"A": 600.0, "C": 200.0, "D": 1.0}, T0)
    assert [r.unit_id for r in ranked] == ["C", "A", "B", "D"]
    assert ranked[0].reasons[0] == "road ETA 3 min 20 s"
    assert "no GPS fix now: last known position used" in ranked[0].reasons
    assert "position 20 min 00 s old" in ranked[0].reasons
    assert ranked[2].reasons == ("no position: ETA unknown", "online state not reported")
    assert ranked[3].eta_s is None
    assert ranked[3].distance_m is None


def test_geofence_and_lifecycle_order() -> None:
    assert within_geofence((43.7304054, 7.4114082 + 0.0010), SCENE)  # ~80 m east
    assert not within_geofence((43.7304054, 7.4114082 + 0.0015), SCENE)  # ~120 m
    assert not within_geofence(None, SCENE)
    assert advances(None, CrewStatus.EN_ROUTE)
    assert advances(CrewStatus.ASSIGNED, CrewStatus.ON_SCENE)
    assert not advances(CrewStatus.ON_SCENE, CrewStatus.EN_ROUTE)


def test_append_event_flags_automatic_and_refuses_manual_out_of_order() -> None:
    events: list = []
    append_event(events, TimePoint.EN_ROUTE, T0, TimeSource.CREW, T0)
    early = append_event(events, TimePoint.ON_SCENE, T0 - timedelta(minutes=1), TimeSource.GEOFENCE, T0)
    assert early is not None
    assert early.flags == ("order: on_scene (eTimes.06) before en_route (eTimes.05)",)
    assert append_event(events, TimePoint.EN_ROUTE, T0, TimeSource.CREW, T0) is None  # retained repeat
    append_event(events, TimePoint.HOSPITAL_DOOR, T0 + timedelta(minutes=30), TimeSource.HOSPITAL, T0)
    with pytest.raises(TimelineOrderError) as info:
        append_event(events, TimePoint.DEVICE, T0 + timedelta(minutes=20), TimeSource.HOSPITAL, T0, strict=True)
    assert info.value.violations == ["device before hospital_door"]
    assert len(events) == 3


def test_douglas_peucker_and_road_map(router: RoadRouter) -> None:
    line = np.array([[0.0, 0.0], [10.0, 0.5], [20.0, 0.0], [30.0, 12.0]])
    assert simplify(line, 1.0) == [0, 2, 3]
    m = road_map(router)
    assert m.points_out < m.points_in
    assert all(len(p) >= 2 for p in m.polylines)
    assert m.min_lat_deg < SCENE[0] < m.max_lat_deg


# --- incidents over the API --------------------------------------------------------------------------------------


async def test_create_list_get_incident(client: httpx.AsyncClient) -> None:
    created = await new_incident(client, caller_notes="Name <unknown>", case_type="stemi")
    assert created["state"] == "open"
    assert created["caller_notes"] == "Name <unknown>"
    listed = (await client.get("/api/incidents")).json()
    assert [i["incident_id"] for i in listed] == [created["incident_id"]]
    one = await client.get(f"/api/incidents/{created['incident_id']}")
    assert one.json()["complaint"] == "chest pain"
    assert (await client.get("/api/incidents/NOPE")).status_code == 404
    timeline = (await client.get(f"/api/cases/{created['incident_id']}/timeline")).json()
    assert [(e["point"], e["nemsis"], e["source"]) for e in timeline["events"]] == [
        ("call_received", "eTimes.01", "dispatch")
    ]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"lat_deg": 91, "lon_deg": 7.4}, "lat_deg"),
        ({"lat_deg": 43.7, "lon_deg": 181}, "lon_deg"),
        ({"lat_deg": 0, "lon_deg": 0}, "(0, 0)"),
        ({"lat_deg": 43.60, "lon_deg": 7.40}, "from the road network"),
        ({"destination_hospital_id": "XX-NONE"}, "unknown hospital"),
        ({"complaint": ""}, "complaint"),
    ],
)
async def test_bad_incident_is_422_with_a_clear_reason(
    client: httpx.AsyncClient, body: dict[str, object], fragment: str
) -> None:
    full = {"lat_deg": SCENE[0], "lon_deg": SCENE[1], "complaint": "fall", **body}
    resp = await client.post("/api/incidents", json=full)
    assert resp.status_code == 422
    assert fragment in resp.text


async def test_recommend_units_by_road_eta_with_reasons(client: httpx.AsyncClient, service: DispatchService) -> None:
    await unit_at(service, "AMB1", FAR)
    await unit_at(service, "AMB2", NEAR_SCENE)
    await unit_at(service, "AMB3", None)
    created = await new_incident(client, case_type="stemi")
    body = (await client.get(f"/api/incidents/{created['incident_id']}/recommend-units")).json()
    assert [u["unit_id"] for u in body["units"]] == ["AMB2", "AMB1", "AMB3"]
    assert body["units"][0]["rank"] == 1
    assert body["units"][0]["eta_s"] < body["units"][1]["eta_s"]
    assert body["units"][0]["reasons"][0].startswith("road ETA")
    assert body["units"][2]["reasons"] == ["no position: ETA unknown"]
    assert body["destinations"][0]["hospital_id"] == "MC-CCM"  # STEMI -> the 24/7 PCI centre
    assert (await client.get("/api/incidents/NOPE/recommend-units")).status_code == 404


async def test_assign_reassign_and_cancel(client: httpx.AsyncClient, service: DispatchService, clock: Clock) -> None:
    link: RecordingLink = service.link  # type: ignore[assignment]
    await unit_at(service, "AMB1", FAR)
    await unit_at(service, "AMB2", NEAR_SCENE)
    created = await new_incident(client)
    iid = created["incident_id"]
    clock.now = T0 + timedelta(seconds=30)
    resp = await client.post(f"/api/incidents/{iid}/assign", json={"unit_id": "AMB2"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["notice_confirmed"] is True
    assert resp.json()["incident"]["state"] == "assigned"
    notice = link.notices()[-1]
    assert (notice.kind, notice.incident_id, notice.unit_id) == (NoticeKind.ASSIGNMENT, iid, "AMB2")
    assert (notice.incident_lat_deg, notice.incident_lon_deg) == SCENE
    units = {u["unit_id"]: u for u in (await client.get("/api/units")).json()}
    assert units["AMB2"]["available"] is False
    assert (units["AMB2"]["lifecycle"], units["AMB2"]["lifecycle_source"]) == ("assigned", "dispatcher")
    # the busy unit cannot take another job; unknowns are 404
    other = await new_incident(client, complaint="fall")
    busy = await client.post(f"/api/incidents/{other['incident_id']}/assign", json={"unit_id": "AMB2"})
    assert busy.status_code == 409
    assert "on incident" in busy.json()["detail"]
    assert (await client.post(f"/api/incidents/{iid}/assign", json={"unit_id": "NOPE"})).status_code == 404
    assert (await client.post("/api/incidents/NOPE/assign", json={"unit_id": "AMB1"})).status_code == 404
    # re-assign: AMB2 is stood down
    clock.now = T0 + timedelta(seconds=60)
    resp = await client.post(f"/api/incidents/{iid}/assign", json={"unit_id": "AMB1"})
    assert resp.json()["previous_unit_id"] == "AMB2"
    assert resp.json()["cancel_confirmed"] is True
    kinds = [(n.unit_id, n.kind) for n in link.notices()]
    assert kinds[-2:] == [("AMB2", NoticeKind.ASSIGNMENT_CANCELLED), ("AMB1", NoticeKind.ASSIGNMENT)]
    assignments = resp.json()["incident"]["assignments"]
    assert [(a["unit_id"], a["end_reason"]) for a in assignments] == [("AMB2", "reassigned"), ("AMB1", None)]
    units = {u["unit_id"]: u for u in (await client.get("/api/units")).json()}
    assert units["AMB2"]["available"] is True
    points = [e["point"] for e in (await client.get(f"/api/cases/{iid}/timeline")).json()["events"]]
    assert points == ["call_received", "dispatch_notified", "unit_notified", "unit_notified"]
    # cancel: AMB1 is stood down; a second cancel and an assignment to the cancelled incident are 409
    resp = await client.post(f"/api/incidents/{iid}/cancel", json={})
    assert resp.json()["incident"]["state"] == "cancelled"
    assert (link.notices()[-1].unit_id, link.notices()[-1].kind) == ("AMB1", NoticeKind.ASSIGNMENT_CANCELLED)
    assert (await client.post(f"/api/incidents/{iid}/cancel", json={})).status_code == 409
    assert (await client.post(f"/api/incidents/{iid}/assign", json={"unit_id": "AMB2"})).status_code == 409


async def test_assignment_without_broker_is_kept_but_not_confirmed(
    client: httpx.AsyncClient, service: DispatchService
) -> None:
    await unit_at(service, "AMB2", NEAR_SCENE)
    created = await new_incident(client)
    service.link.fail = True  # type: ignore[attr-defined]
    resp = await client.post(f"/api/incidents/{created['incident_id']}/assign", json={"unit_id": "AMB2"})
    assert resp.status_code == 200
    assert resp.json()["notice_confirmed"] is False
    points = [e["point"] for e in (await client.get(f"/api/cases/{created['incident_id']}/timeline")).json()["events"]]
    assert "unit_notified" not in points  # eTimes.03 only once the broker confirmed the notice


async def test_stemi_case_from_call_to_handover(
    client: httpx.AsyncClient, service: DispatchService, clock: Clock
) -> None:
    """Crew taps, geofences, the pre-alert, the cath lab's acknowledgement and the hospital's time points."""
    await unit_at(service, "AMB2", NEAR_SCENE)
    created = await new_incident(client, case_type="stemi")
    iid = str(created["incident_id"])
    await client.post(f"/api/incidents/{iid}/assign", json={"unit_id": "AMB2"})
    m = lambda minutes: T0 + timedelta(minutes=minutes)  # noqa: E731
    await tap(service, "AMB2", 1, CrewStatus.ASSIGNED, m(1), iid)
    await tap(service, "AMB2", 2, CrewStatus.EN_ROUTE, m(2), iid)
    arrive = GpsFix(unit_id="AMB2", seq=5, sent_at=m(7), fix=True, lat_deg=SCENE[0], lon_deg=SCENE[1] + 0.0005)
    await feed(service, Stream.GPS, "AMB2", arrive)
    await tap(service, "AMB2", 3, CrewStatus.ON_SCENE, m(7.5), iid)
    await tap(service, "AMB2", 4, CrewStatus.PATIENT_CONTACT, m(9), iid)
    findings = Findings(fmc_at=m(9), first_ecg_at=m(14), ecg_transmitted_at=m(15), ecg_st_elevation=True)
    alert = PreAlert(unit_id="AMB2", seq=0, sent_at=m(16), alert_id="P-1", case_type=CaseType.STEMI, findings=findings)
    await feed(service, Stream.PREALERT, "AMB2", alert)
    ack = AlertAck(
        unit_id="AMB2",
        seq=0,
        sent_at=m(18),
        alert_id="P-1",
        hospital_id="MC-CCM",
        state=AlertState.ACKNOWLEDGED,
        department=Department.CATH_LAB,
        by_role="cath_lab_nurse",
        at=m(18),
    )
    await feed(service, Stream.ACK, "MC-CCM", ack)
    await tap(service, "AMB2", 5, CrewStatus.TRANSPORTING, m(20), iid)
    at_ccm = GpsFix(unit_id="AMB2", seq=6, sent_at=m(27), fix=True, lat_deg=CCM[0], lon_deg=CCM[1])
    await feed(service, Stream.GPS, "AMB2", at_ccm)
    unit = service.repo.unit("AMB2")
    assert (unit.lifecycle, unit.lifecycle_source) == (CrewStatus.AT_HOSPITAL, "geofence")
    clock.now = m(90)
    for point, minute in (("hospital_door", 28), ("device", 75)):
        resp = await client.post(f"/api/cases/{iid}/events", json={"point": point, "at": m(minute).isoformat()})
        assert resp.status_code == 201, resp.text
    bad = await client.post(f"/api/cases/{iid}/events", json={"point": "device", "at": m(20).isoformat()})
    assert bad.status_code == 422
    assert bad.json()["detail"]["violations"] == ["device before hospital_door"]
    unknown = {"point": "needle", "at": m(40).isoformat(), "hospital_id": "XX-NONE"}
    assert "unknown hospital" in (await client.post(f"/api/cases/{iid}/events", json=unknown)).text
    await tap(service, "AMB2", 6, CrewStatus.HANDED_OVER, m(30), iid)
    await tap(service, "AMB2", 7, CrewStatus.BACK_IN_SERVICE, m(45), iid)
    assert service.rejected == {}
    timeline = (await client.get(f"/api/cases/{iid}/timeline")).json()
    got = {(e["point"], e["source"]) for e in timeline["events"]}
    assert {
        ("call_received", "dispatch"),
        ("dispatch_notified", "dispatch"),
        ("unit_notified", "dispatch"),
        ("en_route", "crew"),
        ("on_scene", "geofence"),
        ("on_scene", "crew"),
        ("patient_contact", "crew"),
        ("prealert_sent", "device"),
        ("first_ecg", "device"),
        ("ecg_transmitted", "device"),
        ("cath_lab_activated", "dispatch"),
        ("cath_lab_acknowledged", "hospital"),
        ("left_scene", "crew"),
        ("at_destination", "geofence"),
        ("hospital_door", "hospital"),
        ("device", "hospital"),
        ("transfer_of_care", "crew"),
        ("back_in_service", "crew"),
    } <= got
    intervals = {i["name"]: i for i in timeline["intervals"]}
    assert intervals["door_to_balloon"]["seconds"] == 47 * 60
    assert intervals["door_to_balloon"]["compliant"] is True
    assert intervals["fmc_to_ecg"]["seconds"] == 5 * 60
    assert intervals["fmc_to_device"]["seconds"] == 66 * 60
    assert timeline["quality_flags"] == []
    assert timeline["state"] == "closed"
    assert service.repo.unit("AMB2").available  # back in service
    report = (await client.get("/api/reports/monthly", params={"month": "2025-03"})).json()
    d2b = next(i for i in report["intervals"] if i["name"] == "door_to_balloon")
    assert (report["n_cases"], d2b["median_s"], d2b["compliance_pct"]) == (1, 2820.0, 100.0)
    assert report["stemi_ecg_transmitted_pct"] == 100.0
    csv_resp = await client.get("/api/reports/monthly.csv", params={"month": "2025-03"})
    assert csv_resp.headers["content-type"].startswith("text/csv")
    _header, row = csv_resp.text.strip().split("\n")
    assert row.startswith(f"{iid},stemi,")
    assert "2820" in row.split(",")
    empty = (await client.get("/api/reports/monthly", params={"month": "2025-04"})).json()
    assert empty["n_cases"] == 0
    assert (await client.get("/api/reports/monthly", params={"month": "2025-13"})).status_code == 422


async def test_automatic_out_of_order_time_point_is_flagged_not_dropped(
    client: httpx.AsyncClient, service: DispatchService
) -> None:
    await unit_at(service, "AMB2", NEAR_SCENE)
    iid = str((await new_incident(client))["incident_id"])
    await client.post(f"/api/incidents/{iid}/assign", json={"unit_id": "AMB2"})
    await tap(service, "AMB2", 1, CrewStatus.ON_SCENE, T0 + timedelta(minutes=8), iid)
    await tap(service, "AMB2", 2, CrewStatus.EN_ROUTE, T0 + timedelta(minutes=9), iid)  # tapped late
    timeline = (await client.get(f"/api/cases/{iid}/timeline")).json()
    assert timeline["quality_flags"] == ["order: en_route (eTimes.05) after on_scene (eTimes.06)"]
    # the retained status delivered again after a reconnect adds nothing
    await tap(service, "AMB2", 2, CrewStatus.EN_ROUTE, T0 + timedelta(minutes=9), iid)
    assert len((await client.get(f"/api/cases/{iid}/timeline")).json()["events"]) == len(timeline["events"])


async def test_console_and_road_map_are_served(client: httpx.AsyncClient) -> None:
    page = await client.get("/console")
    assert page.status_code == 200
    assert '<canvas id="map"' in page.text
    assert "http" not in page.text.replace('lang="en"', "")  # no CDN, works offline
    for name, kind in (("console.js", "javascript"), ("console.css", "css")):
        resp = await client.get(f"/console/{name}")
        assert resp.status_code == 200
        assert kind in resp.headers["content-type"]
    assert "innerHTML" not in (await client.get("/console/console.js")).text  # names via textContent only
    assert (await client.get("/console/../api.py")).status_code == 404
    roads = (await client.get("/api/map/roads")).json()
    assert len(roads["polylines"]) > 1_000
    assert roads["min_lat_deg"] < SCENE[0] < roads["max_lat_deg"]
