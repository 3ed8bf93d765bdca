"""Dispatch security in process: sign-in, lockout, TOTP, refresh, every role, hospital and unit scoping, audit."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from broker_config import BrokerSettings, CaseType, Findings, PreAlert, Stream, TopicSpace, encode
from broker_config.connection import NotConnectedError
from broker_config.identity import ACCESS_COOKIE, REFRESH_COOKIE, Role
from dispatch.accounts import LOCKOUT_S, totp_code
from dispatch.api import create_app
from dispatch.audit import verify_chain
from dispatch.hospitals import HospitalRegistry
from dispatch.repository import InMemoryRepository
from dispatch.security import DispatchSecurity
from dispatch.service import DispatchService

SPACE = TopicSpace("sec/")
T0 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)
PASSWORD = "correct horse battery staple"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class NoBroker:
    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.sessions = 0

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False, timeout_s: float) -> None:
        raise NotConnectedError("no broker in unit tests")

    async def wait_connected(self, timeout_s: float) -> None:
        raise TimeoutError


class Env:
    def __init__(self, service: DispatchService, security: DispatchSecurity, http: httpx.AsyncClient) -> None:
        self.service = service
        self.security = security
        self.http = http
        self.repo: InMemoryRepository = service.repo  # type: ignore[assignment]

    def as_(self, role: Role, hospital_id: str | None = None, unit_id: str | None = None) -> dict[str, str]:
        token = self.security.issue(f"t-{role.value}", role, hospital_id=hospital_id, unit_id=unit_id)
        return {"Authorization": f"Bearer {token}"}

    async def prealert(self, alert_id: str, unit_id: str, hospital_id: str) -> None:
        alert = PreAlert(
            unit_id=unit_id,
            seq=0,
            sent_at=T0,
            alert_id=alert_id,
            case_type=CaseType.MEDICAL,
            findings=Findings(note="crew note"),
            requested_hospital_id=hospital_id,
        )
        await self.service.handle(SPACE.topic(Stream.PREALERT, unit_id), encode(Stream.PREALERT, alert))
        assert self.repo.alert(alert_id) is not None
        assert self.repo.alert(alert_id).hospital_id == hospital_id  # type: ignore[union-attr]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    clock = Clock()
    service = DispatchService(BrokerSettings(), SPACE, HospitalRegistry.load(), None, clock=clock)
    service.link = NoBroker()  # type: ignore[assignment]
    security = DispatchSecurity.development(clock=clock)
    app = create_app(service=service, security=security)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dispatch") as http:
        e = Env(service, security, http)
        e.clock = clock  # type: ignore[attr-defined]
        e.app = app  # type: ignore[attr-defined]
        yield e


def from_address(env: Env, n: int) -> httpx.AsyncClient:
    """A client at its own address: one address alone cannot reach the lockout (test_security_sessions.py)."""
    transport = httpx.ASGITransport(app=env.app, client=(f"192.0.2.{n}", 50000))  # type: ignore[attr-defined]
    return httpx.AsyncClient(transport=transport, base_url="http://dispatch")


async def _accounts(env: Env) -> None:
    accounts = env.security.account_service(env.repo)
    await accounts.create_account("disp", Role.DISPATCHER, PASSWORD)
    await accounts.create_account("ed.a", Role.ED_STAFF, PASSWORD, hospital_id="MC-CCM")


# --- sign-in ---------------------------------------------------------------------------------------------------------


async def test_login_sets_httponly_strict_cookies_and_stores_only_an_argon2_hash(env: Env) -> None:
    await _accounts(env)
    stored = await env.repo.get_account("disp")
    assert stored is not None
    assert stored.password_hash.startswith("$argon2id$")
    assert PASSWORD not in stored.password_hash
    r = await env.http.post("/api/auth/login", json={"username": "disp", "password": PASSWORD})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["principal"] == {
        "username": "disp",
        "role": "dispatcher",
        "hospital_id": None,
        "unit_id": None,
        "expires_at": (T0 + timedelta(minutes=15)).isoformat().replace("+00:00", "Z"),
    }
    assert body["expires_in"] == 900
    assert body["refresh_token"].startswith("ghr_")
    cookies = r.headers.get_list("set-cookie")
    access = next(c for c in cookies if c.startswith(ACCESS_COOKIE + "="))
    refresh = next(c for c in cookies if c.startswith(REFRESH_COOKIE + "="))
    for cookie in (access, refresh):
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    assert "Path=/api/auth" in refresh
    assert r.headers["cache-control"] == "no-store"
    me = await env.http.get("/api/auth/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.json()["role"] == "dispatcher"


async def test_wrong_password_and_unknown_user_get_the_same_answer(env: Env) -> None:
    await _accounts(env)
    wrong = await env.http.post("/api/auth/login", json={"username": "disp", "password": "x" * 20})
    unknown = await env.http.post("/api/auth/login", json={"username": "nobody", "password": "x" * 20})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()


async def test_five_failures_lock_the_account_for_15_minutes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    await _accounts(env)
    clock: Clock = env.clock  # type: ignore[attr-defined]
    for n in range(4):  # from several addresses: a distributed guess still meets the lockout
        async with from_address(env, n) as http:
            bad = await http.post("/api/auth/login", json={"username": "disp", "password": "wrong password!"})
        assert bad.status_code == 401
    assert (await env.repo.get_account("disp")).failed_logins == 4  # type: ignore[union-attr]
    async with from_address(env, 4) as http:
        fifth = await http.post("/api/auth/login", json={"username": "disp", "password": "wrong password!"})
    assert fifth.status_code == 401
    locked = await env.http.post("/api/auth/login", json={"username": "disp", "password": PASSWORD})
    assert locked.status_code == 423, "even the right password is refused while locked"
    clock.now = T0 + timedelta(seconds=LOCKOUT_S - 1)
    assert (await env.http.post("/api/auth/login", json={"username": "disp", "password": PASSWORD})).status_code == 423
    clock.now = T0 + timedelta(seconds=LOCKOUT_S + 1)
    ok = await env.http.post("/api/auth/login", json={"username": "disp", "password": PASSWORD})
    assert ok.status_code == 200
    assert (await env.repo.get_account("disp")).failed_logins == 0  # type: ignore[union-attr]
    assert PASSWORD not in caplog.text
    assert "wrong password!" not in caplog.text


async def test_totp_second_factor_required_checked_and_not_replayable(env: Env) -> None:
    accounts = env.security.account_service(env.repo)
    _, secret = await accounts.create_account(
        "oncall", Role.DEPARTMENT_ONCALL, PASSWORD, hospital_id="MC-CCM", totp=True
    )
    assert secret is not None
    creds = {"username": "oncall", "password": PASSWORD}
    need = await env.http.post("/api/auth/login", json=creds)
    assert (need.status_code, need.json()["detail"]) == (401, "totp_required")
    wrong_code = "000000" if totp_code(secret, T0) != "000000" else "111111"
    assert (await env.http.post("/api/auth/login", json={**creds, "totp": wrong_code})).status_code == 401
    code = totp_code(secret, T0)
    ok = await env.http.post("/api/auth/login", json={**creds, "totp": code})
    assert ok.status_code == 200
    assert ok.json()["principal"]["hospital_id"] == "MC-CCM"
    replay = await env.http.post("/api/auth/login", json={**creds, "totp": code})
    assert replay.status_code == 401, "a code is good once"
    assert (await env.repo.get_account("oncall")).failed_logins == 1  # type: ignore[union-attr]


def test_totp_matches_rfc_6238_sha1_test_vectors() -> None:
    secret = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"  # "12345678901234567890"
    for unix, expected in ((59, "287082"), (1111111109, "081804"), (1234567890, "005924"), (2000000000, "279037")):
        assert totp_code(secret, datetime.fromtimestamp(unix, UTC)) == expected


async def test_refresh_rotates_and_reuse_revokes_the_session(env: Env) -> None:
    await _accounts(env)
    clock: Clock = env.clock  # type: ignore[attr-defined]
    first = (await env.http.post("/api/auth/login", json={"username": "disp", "password": PASSWORD})).json()
    clock.now = T0 + timedelta(minutes=14)
    second = await env.http.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert second.status_code == 200
    rotated = second.json()["refresh_token"]
    assert rotated != first["refresh_token"]
    assert second.json()["principal"]["expires_at"].startswith("2025-06-01T08:29")
    clock.now = T0 + timedelta(minutes=16)  # the first access token has expired
    expired = await env.http.get("/api/auth/me", headers={"Authorization": f"Bearer {first['access_token']}"})
    assert expired.status_code == 401
    assert expired.headers["www-authenticate"].startswith("Bearer")
    reuse = await env.http.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert reuse.status_code == 401
    theft_detected = await env.http.post("/api/auth/refresh", json={"refresh_token": rotated})
    assert theft_detected.status_code == 401, "reusing a rotated token ends the whole session"


async def test_logout_revokes_the_session(env: Env) -> None:
    await _accounts(env)
    tokens = (await env.http.post("/api/auth/login", json={"username": "disp", "password": PASSWORD})).json()
    assert (await env.http.post("/api/auth/logout", json={"refresh_token": tokens["refresh_token"]})).status_code == 204
    assert (
        await env.http.post("/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    ).status_code == 401


async def test_service_accounts_get_no_refresh_token_and_are_never_locked(env: Env) -> None:
    accounts = env.security.account_service(env.repo)
    await accounts.create_account("board", Role.SERVICE, "s" * 40 + "ecret!")
    for n in range(7):
        async with from_address(env, n) as http:
            await http.post("/api/auth/login", json={"username": "board", "password": "wrong-wrong-wrong"})
    ok = await env.http.post("/api/auth/login", json={"username": "board", "password": "s" * 40 + "ecret!"})
    assert ok.status_code == 200
    assert ok.json()["refresh_token"] is None


async def test_demo_accounts_exist_only_in_development(env: Env) -> None:
    from dispatch.accounts import create_demo_accounts
    from dispatch.errors import AuthError

    production = replace(env.security, mode=env.security.mode.PRODUCTION)
    with pytest.raises(AuthError):
        await create_demo_accounts(production.account_service(env.repo), hospital_id="MC-CCM", unit_id="AMB1")
    created = await create_demo_accounts(
        env.security.account_service(env.repo),
        hospital_id="MC-CCM",
        unit_id="AMB1",
        board_service=("board", secrets.token_urlsafe(32)),
    )
    assert {a.role for a in created} == set(Role) - {Role.SERVICE}
    assert len({a.password for a in created}) == len(created), "a fresh random password each"
    ed = next(a for a in created if a.role is Role.ED_STAFF)
    r = await env.http.post("/api/auth/login", json={"username": ed.username, "password": ed.password})
    assert r.json()["principal"]["hospital_id"] == "MC-CCM"


# --- authorisation ---------------------------------------------------------------------------------------------------


PROTECTED = [
    ("GET", "/api/hospitals"),
    ("PATCH", "/api/hospitals/MC-CCM/status"),
    ("GET", "/api/units"),
    ("GET", "/api/alerts"),
    ("GET", "/api/alerts/A1"),
    ("POST", "/api/destinations/recommend"),
    ("GET", "/api/route?from=43.73,7.42&to=43.74,7.43"),
    ("POST", "/api/incidents"),
    ("GET", "/api/incidents"),
    ("GET", "/api/incidents/I1"),
    ("GET", "/api/incidents/I1/recommend-units"),
    ("POST", "/api/incidents/I1/assign"),
    ("POST", "/api/incidents/I1/cancel"),
    ("GET", "/api/cases/I1/timeline"),
    ("POST", "/api/cases/I1/events"),
    ("GET", "/api/reports/monthly?month=2025-06"),
    ("GET", "/api/reports/monthly.csv?month=2025-06"),
    ("GET", "/api/map/roads"),
    ("GET", "/api/auth/me"),
    ("GET", "/api/accounts"),
    ("POST", "/api/accounts"),
    ("PATCH", "/api/accounts/disp"),
    ("GET", "/api/audit"),
    ("GET", "/api/audit/verify"),
    ("POST", "/api/audit/events"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_every_protected_route_answers_401_without_a_valid_token(env: Env, method: str, path: str) -> None:
    assert (await env.http.request(method, path)).status_code == 401
    bad = {"Authorization": "Bearer not.a.token"}
    assert (await env.http.request(method, path, headers=bad)).status_code == 401
    basic = {"Authorization": "Basic ZGlzcDpwdw=="}
    assert (await env.http.request(method, path, headers=basic)).status_code == 401


async def test_health_and_the_console_page_are_open(env: Env) -> None:
    assert (await env.http.get("/api/health")).status_code == 200
    assert (await env.http.get("/console")).status_code == 200


FORBIDDEN = [
    (Role.CREW, None, "AMB1", "POST", "/api/incidents", {"lat_deg": 43.73, "lon_deg": 7.42, "complaint": "x"}),
    (Role.ED_STAFF, "MC-CCM", None, "POST", "/api/incidents", {"lat_deg": 43.73, "lon_deg": 7.42, "complaint": "x"}),
    (Role.QUALITY_MANAGER, None, None, "POST", "/api/incidents/I1/assign", {"unit_id": "AMB1"}),
    (Role.ED_STAFF, "MC-CCM", None, "PATCH", "/api/hospitals/MC-CHPG/status", {"set_by": "x", "diversion": True}),
    (Role.CREW, None, "AMB1", "PATCH", "/api/hospitals/MC-CCM/status", {"set_by": "x", "diversion": True}),
    (Role.QUALITY_MANAGER, None, None, "PATCH", "/api/hospitals/MC-CCM/status", {"set_by": "x", "diversion": True}),
    (Role.DISPATCHER, None, None, "GET", "/api/audit", None),
    (Role.ED_STAFF, "MC-CCM", None, "GET", "/api/audit/verify", None),
    (Role.QUALITY_MANAGER, None, None, "GET", "/api/accounts", None),
    (Role.DISPATCHER, None, None, "POST", "/api/accounts", {"username": "x", "role": "crew", "password": "p" * 12}),
    (Role.ED_STAFF, "MC-CCM", None, "GET", "/api/reports/monthly.csv?month=2025-06", None),
    (Role.DISPATCHER, None, None, "GET", "/api/reports/monthly.csv?month=2025-06", None),
    (Role.CREW, None, "AMB1", "GET", "/api/reports/monthly?month=2025-06", None),
    (Role.ED_STAFF, "MC-CCM", None, "POST", "/api/destinations/recommend", {"case_type": "stemi"}),
    (Role.DISPATCHER, None, None, "POST", "/api/audit/events", {"events": []}),
    (Role.SERVICE, None, None, "POST", "/api/incidents", {"lat_deg": 43.73, "lon_deg": 7.42, "complaint": "x"}),
]


@pytest.mark.parametrize(("role", "hospital", "unit", "method", "path", "body"), FORBIDDEN)
async def test_roles_outside_their_remit_get_403(
    env: Env, role: Role, hospital: str | None, unit: str | None, method: str, path: str, body: object
) -> None:
    r = await env.http.request(method, path, json=body, headers=env.as_(role, hospital, unit))
    assert r.status_code == 403, r.text


ALLOWED = [
    (Role.DISPATCHER, None, None, "PATCH", "/api/hospitals/MC-CHPG/status", {"set_by": "d", "diversion": True}, 200),
    (Role.ED_STAFF, "MC-CCM", None, "PATCH", "/api/hospitals/MC-CCM/status", {"set_by": "e", "ed_beds_free": 3}, 200),
    (Role.DEPARTMENT_ONCALL, "MC-CCM", None, "PATCH", "/api/hospitals/MC-CCM/status", {"set_by": "o"}, 200),
    (Role.DISPATCHER, None, None, "POST", "/api/incidents", {"lat_deg": 43.73, "lon_deg": 7.42, "complaint": "x"}, 201),
    (Role.CREW, None, "AMB1", "POST", "/api/destinations/recommend", {"case_type": "stemi"}, 200),
    (Role.QUALITY_MANAGER, None, None, "GET", "/api/reports/monthly.csv?month=2025-06", None, 200),
    (Role.DISPATCHER, None, None, "GET", "/api/reports/monthly?month=2025-06", None, 200),
    (Role.QUALITY_MANAGER, None, None, "GET", "/api/audit/verify", None, 200),
    (Role.ADMINISTRATOR, None, None, "GET", "/api/accounts", None, 200),
    (Role.SERVICE, None, None, "GET", "/api/hospitals", None, 200),
    (Role.CREW, None, "AMB1", "GET", "/api/hospitals", None, 200),
]


@pytest.mark.parametrize(("role", "hospital", "unit", "method", "path", "body", "expected"), ALLOWED)
async def test_roles_within_their_remit_are_served(
    env: Env, role: Role, hospital: str | None, unit: str | None, method: str, path: str, body: object, expected: int
) -> None:
    r = await env.http.request(method, path, json=body, headers=env.as_(role, hospital, unit))
    assert r.status_code == expected, r.text


async def test_ed_staff_and_crew_see_only_their_hospitals_and_units_alerts(env: Env) -> None:
    await env.prealert("A-CCM", "AMB1", "MC-CCM")
    await env.prealert("A-CHPG", "AMB2", "MC-CHPG")
    ed = env.as_(Role.ED_STAFF, "MC-CCM")
    listed = [a["alert_id"] for a in (await env.http.get("/api/alerts", headers=ed)).json()]
    assert listed == ["A-CCM"]
    assert (await env.http.get("/api/alerts/A-CCM", headers=ed)).status_code == 200
    assert (await env.http.get("/api/alerts/A-CHPG", headers=ed)).status_code == 403
    units = [u["unit_id"] for u in (await env.http.get("/api/units", headers=ed)).json()]
    assert units == ["AMB1"]
    oncall = env.as_(Role.DEPARTMENT_ONCALL, "MC-CHPG")
    assert [a["alert_id"] for a in (await env.http.get("/api/alerts", headers=oncall)).json()] == ["A-CHPG"]
    crew = env.as_(Role.CREW, unit_id="AMB2")
    assert [a["alert_id"] for a in (await env.http.get("/api/alerts", headers=crew)).json()] == ["A-CHPG"]
    assert (await env.http.get("/api/alerts/A-CCM", headers=crew)).status_code == 403
    assert [u["unit_id"] for u in (await env.http.get("/api/units", headers=crew)).json()] == ["AMB2"]
    dispatcher = env.as_(Role.DISPATCHER)
    assert len((await env.http.get("/api/alerts", headers=dispatcher)).json()) == 2
    scoped_board = env.as_(Role.SERVICE, "MC-CCM")
    assert [a["alert_id"] for a in (await env.http.get("/api/alerts", headers=scoped_board)).json()] == ["A-CCM"]


async def test_cases_are_scoped_to_the_destination_hospital_and_the_assigned_unit(env: Env) -> None:
    dispatcher = env.as_(Role.DISPATCHER)
    body = {"lat_deg": 43.73, "lon_deg": 7.42, "complaint": "chest pain", "destination_hospital_id": "MC-CCM"}
    incident = (await env.http.post("/api/incidents", json=body, headers=dispatcher)).json()
    iid = incident["incident_id"]
    ed_ccm, ed_chpg = env.as_(Role.ED_STAFF, "MC-CCM"), env.as_(Role.ED_STAFF, "MC-CHPG")
    assert (await env.http.get(f"/api/cases/{iid}/timeline", headers=ed_ccm)).status_code == 200
    assert (await env.http.get(f"/api/cases/{iid}/timeline", headers=ed_chpg)).status_code == 403
    assert (await env.http.get(f"/api/incidents/{iid}", headers=ed_chpg)).status_code == 403
    assert (await env.http.get("/api/incidents", headers=ed_chpg)).json() == []
    assert [i["incident_id"] for i in (await env.http.get("/api/incidents", headers=ed_ccm)).json()] == [iid]
    assert (await env.http.get(f"/api/incidents/{iid}", headers=env.as_(Role.CREW, unit_id="AMB7"))).status_code == 403
    door = {"point": "hospital_door", "at": T0.isoformat(), "hospital_id": "MC-CHPG"}
    assert (await env.http.post(f"/api/cases/{iid}/events", json=door, headers=ed_ccm)).status_code == 403


# --- audit -----------------------------------------------------------------------------------------------------------


async def test_every_read_of_patient_data_and_every_change_is_audited_with_who_where_and_when(env: Env) -> None:
    await env.prealert("A-CCM", "AMB1", "MC-CCM")
    ed = env.as_(Role.ED_STAFF, "MC-CCM")
    await env.http.get("/api/alerts/A-CCM", headers=ed)
    dispatcher = env.as_(Role.DISPATCHER)
    body = {"lat_deg": 43.73, "lon_deg": 7.42, "complaint": "chest pain", "destination_hospital_id": "MC-CCM"}
    iid = (await env.http.post("/api/incidents", json=body, headers=dispatcher)).json()["incident_id"]
    await env.http.get(f"/api/incidents/{iid}", headers=dispatcher)
    await env.http.get(f"/api/cases/{iid}/timeline", headers=ed)
    await env.http.patch("/api/hospitals/MC-CCM/status", json={"set_by": "e", "diversion": True}, headers=ed)
    forbidden = await env.http.get("/api/alerts/A-CCM", headers=env.as_(Role.ED_STAFF, "MC-CHPG"))
    assert forbidden.status_code == 403
    qm = env.as_(Role.QUALITY_MANAGER)
    rows = (await env.http.get("/api/audit", headers=qm)).json()
    actions = [(r["action"], r["actor"], r["role"]) for r in rows]
    assert actions[:5] == [
        ("alert.read", "t-ed_staff", "ed_staff"),
        ("incident.create", "t-dispatcher", "dispatcher"),
        ("incident.read", "t-dispatcher", "dispatcher"),
        ("case.timeline.read", "t-ed_staff", "ed_staff"),
        ("hospital.status.update", "t-ed_staff", "ed_staff"),
    ]
    first = rows[0]
    assert (first["alert_id"], first["unit_id"], first["hospital_id"]) == ("A-CCM", "AMB1", "MC-CCM")
    assert first["actor_hospital_id"] == "MC-CCM"
    assert first["client_addr"] == "127.0.0.1"
    assert first["at"].startswith("2025-06-01T08:00")
    assert rows[3]["incident_id"] == iid
    by_unit = (await env.http.get("/api/audit", params={"unit_id": "AMB1"}, headers=qm)).json()
    assert [r["action"] for r in by_unit] == ["alert.read"]
    for r in rows:
        assert "chest pain" not in str(r)
        assert "crew note" not in str(r)
    verdict = (await env.http.get("/api/audit/verify", headers=qm)).json()
    assert verdict["ok"] is True
    assert verdict["checked"] >= 6


async def test_a_modified_or_deleted_audit_row_is_detected_at_the_first_broken_link(env: Env) -> None:
    await env.prealert("A-CCM", "AMB1", "MC-CCM")
    ed = env.as_(Role.ED_STAFF, "MC-CCM")
    for _ in range(5):
        await env.http.get("/api/alerts/A-CCM", headers=ed)
    qm = env.as_(Role.QUALITY_MANAGER)
    assert (await env.http.get("/api/audit/verify", headers=qm)).json()["ok"]
    original = list(env.repo._audit)
    env.repo._audit[2] = replace(original[2], actor="someone-else")  # rewrite who read it
    verdict = (await env.http.get("/api/audit/verify", headers=qm)).json()
    assert (verdict["ok"], verdict["first_broken_seq"]) == (False, 3)
    assert verdict["reason"] == "content does not match its hash"
    env.repo._audit[:] = original[:1] + original[2:]  # delete the second row
    assert verify_chain(env.repo._audit).first_broken_seq == 3
    env.repo._audit[:] = original
    resealed = replace(original[3], detail="x")
    from dispatch.audit import chain_hash

    env.repo._audit[3] = replace(resealed, hash=chain_hash(resealed.prev_hash, resealed))  # re-hashed, link kept
    assert verify_chain(env.repo._audit).first_broken_seq == 5, "the next row's link exposes a re-hashed row"


async def test_board_service_may_report_only_board_events_of_its_hospital(env: Env) -> None:
    event = {
        "at": T0.isoformat(),
        "actor": "ed.a",
        "role": "ed_staff",
        "actor_hospital_id": "MC-CCM",
        "action": "board.detail.read",
        "unit_id": "AMB1",
        "hospital_id": "MC-CCM",
        "client_addr": "10.1.2.3",
    }
    board = env.as_(Role.SERVICE, "MC-CCM")
    ok = await env.http.post("/api/audit/events", json={"events": [event]}, headers=board)
    assert ok.status_code == 202
    other = await env.http.post(
        "/api/audit/events", json={"events": [{**event, "hospital_id": "MC-CHPG"}]}, headers=board
    )
    assert other.status_code == 403
    sneaky = await env.http.post(
        "/api/audit/events", json={"events": [{**event, "action": "incident.create"}]}, headers=board
    )
    assert sneaky.status_code == 422
    rows = (await env.http.get("/api/audit", headers=env.as_(Role.ADMINISTRATOR))).json()
    assert (rows[0]["reported_by"], rows[0]["client_addr"], rows[0]["actor"]) == ("t-service", "10.1.2.3", "ed.a")
