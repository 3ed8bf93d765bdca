"""Board security in process: sign-in forwarded to dispatch, cookies, roles, hospital scoping, stream expiry, audit."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from broker_config import BrokerSettings, CaseType, Findings, HospitalAlert, Priority, TopicSpace
from broker_config.connection import NotConnectedError
from broker_config.identity import BOARD_ACCESS_COOKIE, BOARD_REFRESH_COOKIE, Role, issue_token
from dispatch.api import create_app as create_dispatch
from dispatch.hospitals import HospitalRegistry
from dispatch.security import DispatchSecurity
from dispatch.service import DispatchService
from hospital_board.dispatch_client import DispatchClient, DispatchUnavailableError
from hospital_board.main import BoardRuntime, create_app
from hospital_board.settings import BoardSettings

PASSWORD = "correct horse battery staple"


class NoBroker:
    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.sessions = 0

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False, timeout_s: float) -> None:
        raise NotConnectedError("no broker in unit tests")

    async def wait_connected(self, timeout_s: float) -> None:
        raise TimeoutError


def alert(alert_id: str, unit_id: str, hospital_id: str, now: datetime) -> HospitalAlert:
    return HospitalAlert(
        unit_id=unit_id,
        seq=1,
        sent_at=now,
        alert_id=alert_id,
        hospital_id=hospital_id,
        case_type=CaseType.STEMI,
        priority=Priority.HIGH,
        findings=Findings(note="Jane Doe, chest pain"),
    )


class Env:
    def __init__(self, security: DispatchSecurity, runtime: BoardRuntime, board: httpx.AsyncClient) -> None:
        self.security = security
        self.runtime = runtime
        self.board = board

    def as_(self, role: Role, hospital_id: str | None = None, unit_id: str | None = None) -> dict[str, str]:
        token = self.security.issue(f"t-{role.value}", role, hospital_id=hospital_id, unit_id=unit_id)
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    """A board trusting a development dispatch's key; alerts for U1 -> HA and U2 -> HB in its state."""
    security = DispatchSecurity.development()
    settings = BoardSettings(
        broker=BrokerSettings(),
        default_hospital_id="HA",
        security_mode="development",
        verify_keys=(security.verify_key_text,),
        heartbeat_s=0.2,
        map_pbf=None,
    )
    app = create_app(settings)
    runtime: BoardRuntime = app.state.board
    now = datetime.now(UTC)
    runtime.state.apply_alert(alert("a1", "U1", "HA", now), now)
    runtime.state.apply_alert(alert("b1", "U2", "HB", now), now)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://board") as board:
        yield Env(security, runtime, board)


async def test_pages_send_strangers_to_sign_in_and_the_api_answers_401(env: Env) -> None:
    page = await env.board.get("/", params={"hospital": "HA"})
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=%2F%3Fhospital%3DHA"
    assert (await env.board.get("/unit/U1?hospital=HA")).status_code == 303
    login = await env.board.get("/login")
    assert login.status_code == 200
    assert "script-src 'self'" in login.headers["content-security-policy"]
    for path in ("/api/hospitals/HA/snapshot", "/api/hospitals/HA/units/U1", "/api/events?hospital=HA",
                 "/api/units/U1/timeline?hospital=HA", "/api/map/roads?bbox=1,2,3,4", "/api/auth/me"):  # fmt: skip
        assert (await env.board.get(path)).status_code == 401, path
    assert (await env.board.post("/api/alerts/a1/ack", json={"hospital_id": "HA"})).status_code == 401
    assert (await env.board.get("/api/health")).status_code == 200


async def test_expired_or_foreign_tokens_are_refused(env: Env) -> None:
    old, _ = issue_token(
        env.security.signing_key, subject="ed", role=Role.ED_STAFF, hospital_id="HA", ttl_s=60,
        now=datetime.now(UTC) - timedelta(hours=1),
    )  # fmt: skip
    assert (
        await env.board.get("/api/hospitals/HA/snapshot", headers={"Authorization": f"Bearer {old}"})
    ).status_code == 401
    other = DispatchSecurity.development()
    foreign = {"Authorization": f"Bearer {other.issue('ed', Role.ED_STAFF, hospital_id='HA')}"}
    assert (await env.board.get("/api/hospitals/HA/snapshot", headers=foreign)).status_code == 401


async def test_ed_staff_see_only_their_hospital(env: Env) -> None:
    ed_a = env.as_(Role.ED_STAFF, "HA")
    snap = await env.board.get("/api/hospitals/HA/snapshot", headers=ed_a)
    assert snap.status_code == 200
    assert [c["unit_id"] for c in snap.json()["cards"]] == ["U1"]
    assert (await env.board.get("/api/hospitals/HB/snapshot", headers=ed_a)).status_code == 403
    assert (await env.board.get("/api/hospitals/HA/units/U1", headers=ed_a)).status_code == 200
    assert (await env.board.get("/api/hospitals/HB/units/U2", headers=ed_a)).status_code == 403
    assert (await env.board.get("/api/units/U2/timeline?hospital=HB", headers=ed_a)).status_code == 403
    assert (await env.board.get("/api/events?hospital=HB", headers=ed_a)).status_code == 403
    page = await env.board.get("/", headers=ed_a)  # no ?hospital: the viewer's own
    assert 'data-hospital="HA"' in page.text
    assert (await env.board.get("/?hospital=HB", headers=ed_a)).status_code == 403
    oncall_b = env.as_(Role.DEPARTMENT_ONCALL, "HB")
    assert [
        c["unit_id"] for c in (await env.board.get("/api/hospitals/HB/snapshot", headers=oncall_b)).json()["cards"]
    ] == ["U2"]


async def test_regional_roles_read_any_board_crew_only_their_unit_quality_and_services_none(env: Env) -> None:
    for role in (Role.DISPATCHER, Role.ADMINISTRATOR):
        assert (await env.board.get("/api/hospitals/HB/snapshot", headers=env.as_(role))).status_code == 200
    crew = env.as_(Role.CREW, unit_id="U1")
    assert (await env.board.get("/api/hospitals/HA/units/U1", headers=crew)).status_code == 200
    assert (await env.board.get("/phone?hospital=HA&unit=U1", headers=crew)).status_code == 200
    assert (await env.board.get("/api/hospitals/HB/units/U2", headers=crew)).status_code == 403
    assert (await env.board.get("/api/hospitals/HA/snapshot", headers=crew)).status_code == 403
    for role, hospital in ((Role.QUALITY_MANAGER, None), (Role.SERVICE, None), (Role.SERVICE, "HA")):
        assert (await env.board.get("/api/hospitals/HA/snapshot", headers=env.as_(role, hospital))).status_code == 403


async def test_only_the_receiving_hospitals_staff_acknowledge(env: Env) -> None:
    env.runtime.link = NoBroker()  # type: ignore[assignment]
    env.runtime.ingest.link = env.runtime.link
    body = {"hospital_id": "HA", "by_role": "cath_lab"}
    for headers in (env.as_(Role.ED_STAFF, "HB"), env.as_(Role.DISPATCHER), env.as_(Role.CREW, unit_id="U1"),
                    env.as_(Role.ADMINISTRATOR)):  # fmt: skip
        assert (await env.board.post("/api/alerts/a1/ack", json=body, headers=headers)).status_code == 403
    other_body = await env.board.post(
        "/api/alerts/a1/ack", json={"hospital_id": "HB"}, headers=env.as_(Role.ED_STAFF, "HA")
    )
    assert other_body.status_code == 403, "the body's hospital must be the token's"
    allowed = await env.board.post("/api/alerts/a1/ack", json=body, headers=env.as_(Role.DEPARTMENT_ONCALL, "HA"))
    assert allowed.status_code == 503, "authorised; the broker link is down in this test"
    env.board.cookies.set(BOARD_ACCESS_COOKIE, env.security.issue("ed", Role.ED_STAFF, hospital_id="HA"))
    cross_site = await env.board.post("/api/alerts/a1/ack", json=body, headers={"Origin": "https://evil.example"})
    assert cross_site.status_code == 403


async def test_reads_are_queued_for_the_audit_trail_with_ids_only(env: Env) -> None:
    ed_a = env.as_(Role.ED_STAFF, "HA")
    await env.board.get("/api/hospitals/HA/snapshot", headers=ed_a)
    await env.board.get("/api/hospitals/HA/units/U1", headers=ed_a)
    await env.board.get("/api/hospitals/HB/units/U2", headers=ed_a)  # refused, and recorded as such
    events = list(env.runtime.audit.recent)
    assert [(e["action"], e["unit_id"], e["outcome"]) for e in events] == [
        ("board.snapshot.read", "U1", "ok"),
        ("board.detail.read", "U1", "ok"),
        ("access.denied", "U2", "denied"),
    ]
    assert events[0]["actor"] == "t-ed_staff"
    assert events[0]["alert_id"] == "a1"
    assert events[0]["client_addr"] == "127.0.0.1"
    assert "Jane" not in str(events)
    await env.board.get("/api/hospitals/HA/snapshot", headers=env.as_(Role.SERVICE))  # services are not audited reads
    assert len(env.runtime.audit.recent) == 3, "a service is not a person: neither its reads nor denials are"


async def test_an_event_stream_ends_when_its_token_expires(env: Env) -> None:
    token, _ = issue_token(env.security.signing_key, subject="ed", role=Role.ED_STAFF, hospital_id="HA", ttl_s=2,
                           now=datetime.now(UTC))  # fmt: skip
    async with asyncio.timeout(10):  # ASGITransport returns once the stream has ended
        r = await env.board.get("/api/events?hospital=HA", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    assert r.text.startswith("retry: 2000")
    assert "event: snapshot" in r.text
    actions = [e["action"] for e in env.runtime.audit.recent]
    assert actions == ["board.feed.subscribe", "board.feed.end"]
    assert "reason=token expired" in env.runtime.audit.recent[-1]["detail"]


# --- with a real dispatch behind the board (in process) -------------------------------------------------------------


@pytest.fixture
async def joined() -> AsyncIterator[tuple[Env, httpx.AsyncClient]]:
    """Dispatch (development accounts: ed at HA, a board service account) and a board that forwards sign-in to it."""
    service = DispatchService(BrokerSettings(), TopicSpace("sec/"), HospitalRegistry.load(), None)
    service.link = NoBroker()  # type: ignore[assignment]
    security = DispatchSecurity.development()
    dispatch_app = create_dispatch(service=service, security=security)
    accounts = security.account_service(service.repo)
    await accounts.create_account("ed.a", Role.ED_STAFF, PASSWORD, hospital_id="HA")
    board_secret = secrets.token_urlsafe(32)
    await accounts.create_account("board", Role.SERVICE, board_secret)
    settings = BoardSettings(
        broker=BrokerSettings(), default_hospital_id="HA", security_mode="development",
        verify_keys=(security.verify_key_text,), map_pbf=None,
    )  # fmt: skip
    app = create_app(settings)
    runtime: BoardRuntime = app.state.board
    now = datetime.now(UTC)
    runtime.state.apply_alert(alert("a1", "U1", "HA", now), now)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=dispatch_app), base_url="http://dispatch") as to_dispatch,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://board") as board,
    ):
        runtime.directory = DispatchClient(to_dispatch, "http://dispatch", credentials=("board", board_secret))
        runtime.audit.sink = runtime.directory.report_audit
        runtime.audit.errors = (DispatchUnavailableError,)
        task = asyncio.create_task(runtime.audit.run())
        try:
            yield Env(security, runtime, board), to_dispatch
        finally:
            task.cancel()


async def test_sign_in_through_the_board_sets_httponly_cookies_and_refreshes(
    joined: tuple[Env, httpx.AsyncClient],
) -> None:
    env, _ = joined
    wrong = await env.board.post("/api/auth/login", json={"username": "ed.a", "password": "nope, not it"})
    assert wrong.status_code == 401
    r = await env.board.post("/api/auth/login", json={"username": "ed.a", "password": PASSWORD})
    assert r.status_code == 200, r.text
    assert r.json()["role"] == "ed_staff"
    assert "access_token" not in r.text, "the browser never sees a token, only HttpOnly cookies"
    set_cookies = r.headers.get_list("set-cookie")
    assert all("HttpOnly" in c and "samesite=strict" in c.lower() for c in set_cookies)
    assert {c.split("=")[0] for c in set_cookies} == {BOARD_ACCESS_COOKIE, BOARD_REFRESH_COOKIE}
    assert (await env.board.get("/api/hospitals/HA/snapshot")).status_code == 200  # the cookie jar carries it
    old_refresh = env.board.cookies.get(BOARD_REFRESH_COOKIE, path="/api/auth")
    refreshed = await env.board.post("/api/auth/refresh")
    assert refreshed.status_code == 200
    assert env.board.cookies.get(BOARD_REFRESH_COOKIE, path="/api/auth") != old_refresh
    assert (await env.board.post("/api/auth/logout")).status_code == 204
    assert (await env.board.get("/api/hospitals/HA/snapshot")).status_code == 401


async def test_every_board_read_reaches_dispatchs_hash_chained_audit_trail(
    joined: tuple[Env, httpx.AsyncClient],
) -> None:
    env, to_dispatch = joined
    await env.board.post("/api/auth/login", json={"username": "ed.a", "password": PASSWORD})
    await env.board.get("/api/hospitals/HA/snapshot")
    await env.board.get("/api/hospitals/HA/units/U1")
    await env.runtime.audit.drained(10)
    qm = {"Authorization": f"Bearer {env.security.issue('qm', Role.QUALITY_MANAGER)}"}
    rows = (await to_dispatch.get("/api/audit", params={"unit_id": "U1"}, headers=qm)).json()
    assert [(r["action"], r["actor"], r["reported_by"]) for r in rows] == [
        ("board.snapshot.read", "ed.a", "board"),
        ("board.detail.read", "ed.a", "board"),
    ]
    assert rows[0]["hospital_id"] == "HA"
    assert (await to_dispatch.get("/api/audit/verify", headers=qm)).json()["ok"] is True


async def test_only_the_feeds_own_viewer_tells_it_which_strips_are_on_screen(env: Env) -> None:
    key = secrets.token_hex(16)
    feed = env.runtime.hub.connect("HA", key=key, owner="t-ed_staff")
    body = {"hospital_id": "HA", "units": ["U1"]}
    assert (await env.board.put(f"/api/events/{key}/strips", json=body)).status_code == 401
    ed_b = env.as_(Role.ED_STAFF, "HB")
    assert (await env.board.put(f"/api/events/{key}/strips", json=body, headers=ed_b)).status_code == 403
    oncall_a = env.as_(Role.DEPARTMENT_ONCALL, "HA")  # the same hospital, another viewer
    assert (await env.board.put(f"/api/events/{key}/strips", json=body, headers=oncall_a)).status_code == 404
    assert feed.ecg_units is None
    ed_a = env.as_(Role.ED_STAFF, "HA")
    assert (await env.board.put(f"/api/events/{'0' * 32}/strips", json=body, headers=ed_a)).status_code == 404
    bad = {"hospital_id": "HA", "units": ["U1", "no such id!"]}
    assert (await env.board.put(f"/api/events/{key}/strips", json=bad, headers=ed_a)).status_code == 422
    told = await env.board.put(f"/api/events/{key}/strips", json=body, headers=ed_a)
    assert told.status_code == 200
    assert told.json()["units"] == 1
    assert feed.ecg_units == {"U1"}
