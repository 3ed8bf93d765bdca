"""Dispatch HTTP API through httpx's ASGI transport (no sockets; the MQTT link is a recorder)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from broker_config import BrokerSettings, CaseType, Findings, PreAlert, Stream, TopicSpace, encode, utc_now
from broker_config.connection import NotConnectedError
from broker_config.identity import Role
from broker_config.web import sign_in_script
from dispatch.api import create_app
from dispatch.hospitals import DATA_DIR, HospitalRegistry
from dispatch.routing import RoadRouter
from dispatch.security import DispatchSecurity
from dispatch.service import DispatchService


class RecordingLink:
    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.sessions = 0

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False, timeout_s: float) -> None:
        raise NotConnectedError("no broker in unit tests")

    async def wait_connected(self, timeout_s: float) -> None:
        raise TimeoutError


@pytest.fixture(scope="module")
def router() -> RoadRouter:
    return RoadRouter.from_pbf(DATA_DIR / "monaco.osm.pbf")


@pytest.fixture
async def client(router: RoadRouter) -> AsyncIterator[httpx.AsyncClient]:
    service = DispatchService(BrokerSettings(), TopicSpace("api-test/"), HospitalRegistry.load(), router)
    service.link = RecordingLink()  # type: ignore[assignment]
    security = DispatchSecurity.development()
    app = create_app(service=service, security=security)
    headers = {"Authorization": f"Bearer {security.issue('admin', Role.ADMINISTRATOR)}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://dispatch", headers=headers) as c:
        yield c


async def test_health_reports_degraded_without_broker(client: httpx.AsyncClient) -> None:
    body = (await client.get("/api/health")).json()
    assert body["status"] == "degraded"
    assert body["hospitals"] == 3
    assert body["road_nodes"] > 10_000


async def test_hospitals_list_and_status_change(client: httpx.AsyncClient) -> None:
    hospitals = {h["hospital_id"]: h for h in (await client.get("/api/hospitals")).json()}
    assert hospitals["MC-CCM"]["capabilities"]["pci_24_7"] is True
    assert hospitals["MC-CHPG"]["status"]["diversion"] is False
    until = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    resp = await client.patch(
        "/api/hospitals/MC-CHPG/status", json={"set_by": "ED charge nurse", "diversion": True, "until": until}
    )
    assert resp.status_code == 200
    assert resp.json()["status"]["diversion"] is True
    assert resp.json()["status"]["set_by"] == "admin", "who comes from the token, not the body's set_by"
    # the ranking now moves CHPG down for a medical patient next to it
    body = {"case_type": "medical", "position": {"lat_deg": 43.7304054, "lon_deg": 7.4114082}}
    ranking = (await client.post("/api/destinations/recommend", json=body)).json()["recommendations"]
    assert ranking[0]["hospital_id"] != "MC-CHPG"


@pytest.mark.parametrize(
    "body",
    [
        {"set_by": "x", "diversion": True, "until": "2000-01-01T00:00:00Z"},  # in the past
        {"set_by": "x", "until": "2030-01-01T00:00:00"},  # naive time
        {"diversion": True},  # who is missing
        {"set_by": "x", "ed_beds_free": -1},
    ],
)
async def test_bad_status_change_is_422(client: httpx.AsyncClient, body: dict[str, object]) -> None:
    assert (await client.patch("/api/hospitals/MC-CHPG/status", json=body)).status_code == 422


async def test_unknown_hospital_and_alert_are_404(client: httpx.AsyncClient) -> None:
    resp = await client.patch("/api/hospitals/XX-NONE/status", json={"set_by": "x", "diversion": True})
    assert resp.status_code == 404
    assert (await client.get("/api/alerts/NOPE")).status_code == 404


async def test_recommend_stemi_with_reasons(client: httpx.AsyncClient) -> None:
    body = {"case_type": "stemi", "findings": {}, "position": {"lat_deg": 43.7304054, "lon_deg": 7.4114082}}
    resp = await client.post("/api/destinations/recommend", json=body)
    assert resp.status_code == 200
    data = resp.json()
    assert data["priority"] == "high"
    assert data["departments"] == ["cath_lab", "ed"]
    assert data["recommendations"][0]["hospital_id"] == "MC-CCM"
    assert any("PCI" in r for r in data["recommendations"][0]["reasons"])
    assert data["recommendations"][0]["eta_s"] > 0


@pytest.mark.parametrize(
    "position",
    [{"lat_deg": 91, "lon_deg": 7.4}, {"lat_deg": 43.7, "lon_deg": -181}, {"lat_deg": 0, "lon_deg": 0}],
)
async def test_recommend_out_of_range_is_422(client: httpx.AsyncClient, position: dict[str, float]) -> None:
    resp = await client.post("/api/destinations/recommend", json={"case_type": "stemi", "position": position})
    assert resp.status_code == 422


async def test_route_endpoint(client: httpx.AsyncClient) -> None:
    resp = await client.get("/api/route", params={"from": "43.7304054,7.4114082", "to": "43.7376303,7.4248591"})
    assert resp.status_code == 200
    data = resp.json()
    assert data["distance_m"] > 1_347
    assert len(data["points_deg"]) > 10


@pytest.mark.parametrize(
    ("start", "end"),
    [("43.73", "43.73,7.42"), ("95,7.4", "43.73,7.42"), ("43.73,7.41", "abc,def"), ("43.60,7.40", "43.73,7.42")],
)
async def test_route_bad_coordinates_are_422(client: httpx.AsyncClient, start: str, end: str) -> None:
    assert (await client.get("/api/route", params={"from": start, "to": end})).status_code == 422


async def test_openapi_documents_every_endpoint(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert {
        "/api/health",
        "/api/hospitals",
        "/api/hospitals/{hospital_id}/status",
        "/api/units",
        "/api/alerts",
        "/api/alerts/{alert_id}",
        "/api/destinations/recommend",
        "/api/route",
    } <= set(paths)


def test_create_app_needs_exactly_one_of_settings_or_service() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        create_app()


async def test_alert_list_carries_each_departments_page_for_the_console(client: httpx.AsyncClient) -> None:
    """The console shows, per pre-alert, who is paged, who acknowledged and when a page escalates."""
    service: DispatchService = client._transport.app.state.service  # type: ignore[attr-defined]
    now = utc_now()
    alert = PreAlert(
        unit_id="AMB7",
        seq=0,
        sent_at=now,
        alert_id="A-CONSOLE",
        case_type=CaseType.STEMI,
        findings=Findings(note="x"),
        requested_hospital_id="MC-CCM",
    )
    await service.handle(TopicSpace("api-test/").topic(Stream.PREALERT, "AMB7"), encode(Stream.PREALERT, alert))
    listed = {a["alert_id"]: a for a in (await client.get("/api/alerts")).json()}
    acts = {a["department"]: a for a in listed["A-CONSOLE"]["activations"]}
    assert set(acts) == {"cath_lab", "ed"}
    for act in acts.values():
        assert act["state"] == "paged"
        assert act["level"] == "primary"
        assert datetime.fromisoformat(act["escalate_at"]) > now


async def test_console_sign_in_page_serves_the_shared_script(client: httpx.AsyncClient) -> None:
    page = await client.get("/login")
    assert '<script src="/console/login.js"' in page.text
    assert (await client.get("/console/login.js")).text == sign_in_script()
