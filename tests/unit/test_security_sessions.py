"""Sessions end when they should, on dispatch and on the board: refresh-token reuse revokes the family (RFC 9700
section 4.14.2), sign-out revokes the access token at once, sign-in is throttled per client address, and who
acknowledged (or changed a status) comes from the token, never from the request body."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import httpx
import pytest

from broker_config import AlertAck, BrokerSettings, CaseType, Findings, HospitalAlert, Priority, TopicSpace
from broker_config.codec import decode_as
from broker_config.identity import BOARD_ACCESS_COOKIE, BOARD_REFRESH_COOKIE, Role, SignInThrottle
from dispatch.api import create_app as create_dispatch
from dispatch.hospitals import HospitalRegistry
from dispatch.security import DispatchSecurity
from dispatch.service import DispatchService
from hospital_board import main as board_main
from hospital_board.dispatch_client import DispatchClient, DispatchUnavailableError
from hospital_board.main import BoardRuntime, create_app
from hospital_board.settings import BoardSettings

PASSWORD = "correct horse battery staple"
ATTACKER = ("203.0.113.7", 40000)
NURSE = ("198.51.100.20", 40001)


class Broker:
    """Records what the board publishes (the acknowledgement)."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.sessions = 0
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False, timeout_s: float) -> None:
        self.published.append((topic, payload))

    async def wait_connected(self, timeout_s: float) -> None:
        raise TimeoutError


@dataclass
class Stack:
    security: DispatchSecurity
    dispatch_app: object
    runtime: BoardRuntime
    board: httpx.AsyncClient
    dispatch: httpx.AsyncClient
    board_secret: str

    def dispatch_from(self, client: tuple[str, int]) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.dispatch_app, client=client)  # type: ignore[arg-type]
        return httpx.AsyncClient(transport=transport, base_url="http://dispatch")


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    """Dispatch with an ED nurse (ed.a at HA), an administrator and the board's service account, and a board that
    forwards sign-in to it; one alert for U1 inbound to HA on the board."""
    service = DispatchService(BrokerSettings(), TopicSpace("sess/"), HospitalRegistry.load(), None)
    service.link = Broker()  # type: ignore[assignment]
    security = DispatchSecurity.development()
    dispatch_app = create_dispatch(service=service, security=security)
    accounts = security.account_service(service.repo)
    await accounts.create_account("ed.a", Role.ED_STAFF, PASSWORD, hospital_id="MC-CCM")
    await accounts.create_account("ed.b", Role.ED_STAFF, PASSWORD, hospital_id="HA")
    board_secret = secrets.token_urlsafe(32)
    await accounts.create_account("board", Role.SERVICE, board_secret)
    settings = BoardSettings(
        broker=BrokerSettings(), default_hospital_id="HA", security_mode="development",
        verify_keys=(security.verify_key_text,), map_pbf=None,
    )  # fmt: skip
    app = create_app(settings)
    runtime: BoardRuntime = app.state.board
    now = datetime.now(UTC)
    runtime.state.apply_alert(
        HospitalAlert(
            unit_id="U1", seq=1, sent_at=now, alert_id="a1", hospital_id="HA", case_type=CaseType.STEMI,
            priority=Priority.HIGH, findings=Findings(note="chest pain"),
        ),
        now,
    )  # fmt: skip
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=dispatch_app), base_url="http://dispatch") as to_dispatch,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://board") as board,
    ):
        runtime.directory = DispatchClient(to_dispatch, "http://dispatch", credentials=("board", board_secret))
        runtime.audit.errors = (DispatchUnavailableError,)
        yield Stack(security, dispatch_app, runtime, board, to_dispatch, board_secret)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(client: httpx.AsyncClient, username: str = "ed.a") -> dict[str, str]:
    r = await client.post("/api/auth/login", json={"username": username, "password": PASSWORD})
    assert r.status_code == 200, r.text
    body: dict[str, str] = r.json()
    return body


# --- 2. refresh-token reuse -----------------------------------------------------------------------------------------


async def test_reusing_a_rotated_refresh_token_revokes_the_family_and_its_access_tokens(stack: Stack) -> None:
    http = stack.dispatch
    first = await login(http)
    other_session = await login(http)  # the same nurse on another workstation: not this family
    second = (await http.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})).json()
    assert (await http.get("/api/auth/me", headers=bearer(second["access_token"]))).status_code == 200
    replay = await http.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert replay.status_code == 401, "no grace period: an immediate replay is reuse"
    assert (await http.post("/api/auth/refresh", json={"refresh_token": second["refresh_token"]})).status_code == 401
    for token in (first["access_token"], second["access_token"]):
        assert (await http.get("/api/auth/me", headers=bearer(token))).status_code == 401, "access tokens end too"
    assert (await http.get("/api/auth/me", headers=bearer(other_session["access_token"]))).status_code == 200
    again = await http.post("/api/auth/refresh", json={"refresh_token": other_session["refresh_token"]})
    assert again.status_code == 200


async def test_reuse_through_the_board_ends_the_boards_session_too(stack: Stack) -> None:
    await login(stack.board, "ed.b")
    stolen = stack.board.cookies.get(BOARD_REFRESH_COOKIE, path="/api/auth")
    assert (await stack.board.post("/api/auth/refresh")).status_code == 200  # the page rotates it
    assert (await stack.board.get("/api/hospitals/HA/snapshot")).status_code == 200
    thief = await stack.dispatch.post("/api/auth/refresh", json={"refresh_token": stolen})
    assert thief.status_code == 401
    assert (await stack.board.post("/api/auth/refresh")).status_code == 401, "the family was revoked"
    assert (await stack.board.get("/api/hospitals/HA/snapshot")).status_code == 401


# --- 3. sign-out revokes the access token at once -------------------------------------------------------------------


async def test_dispatch_sign_out_refuses_a_captured_access_token(stack: Stack) -> None:
    http = stack.dispatch
    session = await login(http)
    captured = bearer(session["access_token"])
    assert (await http.get("/api/auth/me", headers=captured)).status_code == 200
    assert (await http.post("/api/auth/logout", json={"refresh_token": session["refresh_token"]})).status_code == 204
    after = await http.get("/api/auth/me", headers=captured)
    assert after.status_code == 401
    assert after.headers["www-authenticate"].startswith("Bearer")
    # an API client that signs out with its access token only
    api = await login(http)
    assert (await http.post("/api/auth/logout", headers=bearer(api["access_token"]))).status_code == 204
    assert (await http.get("/api/auth/me", headers=bearer(api["access_token"]))).status_code == 401
    assert (await http.post("/api/auth/refresh", json={"refresh_token": api["refresh_token"]})).status_code == 401


async def test_board_sign_out_refuses_a_captured_access_token_on_the_board_and_at_dispatch(stack: Stack) -> None:
    await login(stack.board, "ed.b")
    token = stack.board.cookies.get(BOARD_ACCESS_COOKIE)
    assert token
    captured = bearer(token)
    assert (await stack.board.get("/api/hospitals/HA/snapshot", headers=captured)).status_code == 200
    assert (await stack.board.post("/api/auth/logout")).status_code == 204
    assert (await stack.board.get("/api/hospitals/HA/snapshot", headers=captured)).status_code == 401
    assert (await stack.board.get("/api/auth/me", headers=captured)).status_code == 401
    assert (await stack.dispatch.get("/api/auth/me", headers=captured)).status_code == 401


async def test_service_tokens_carry_no_session_and_are_not_refused(stack: Stack) -> None:
    token = stack.security.issue("board", Role.SERVICE)
    assert (await stack.dispatch.get("/api/auth/me", headers=bearer(token))).status_code == 200


# --- 4. sign-in throttling per client address -----------------------------------------------------------------------


async def test_a_flood_from_one_address_is_bounded_with_retry_after(stack: Stack) -> None:
    async with stack.dispatch_from(ATTACKER) as attacker, stack.dispatch_from(NURSE) as nurse:
        codes = []
        for n in range(12):
            r = await attacker.post("/api/auth/login", json={"username": f"user{n}", "password": "guess guess"})
            codes.append(r.status_code)
        assert codes == [401] * 10 + [429] * 2
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert (await nurse.post("/api/auth/login", json={"username": "ed.a", "password": PASSWORD})).status_code == 200


async def test_one_address_cannot_lock_a_nurse_out(stack: Stack) -> None:
    async with stack.dispatch_from(ATTACKER) as attacker, stack.dispatch_from(NURSE) as nurse:
        codes = [
            (await attacker.post("/api/auth/login", json={"username": "ed.a", "password": "guess guess"})).status_code
            for _ in range(8)
        ]
        assert codes == [401] * 4 + [429] * 4, "the fifth guess is refused before the password is checked"
        ok = await nurse.post("/api/auth/login", json={"username": "ed.a", "password": PASSWORD})
        assert ok.status_code == 200, "not locked: the lockout (5 in a row) was never reached"
        other = await attacker.post("/api/auth/login", json={"username": "ed.b", "password": PASSWORD})
        assert other.status_code == 200, "only that account is held back for that address"


async def test_a_forwarded_address_counts_only_from_an_authenticated_service(stack: Stack) -> None:
    async with stack.dispatch_from(ATTACKER) as attacker:
        spoofed = {"X-Forwarded-For": "192.0.2.99"}
        codes = []
        for _ in range(11):
            r = await attacker.post(
                "/api/auth/login", json={"username": "nobody", "password": "guess guess"}, headers=spoofed
            )
            codes.append(r.status_code)
        assert codes[-1] == 429, "X-Forwarded-For from a stranger is ignored"
    service = await stack.dispatch.post("/api/auth/login", json={"username": "board", "password": stack.board_secret})
    board_token = service.json()["access_token"]
    for n in range(12):  # the board forwards twelve people's sign-ins from twelve addresses: none is throttled
        r = await stack.dispatch.post(
            "/api/auth/login",
            json={"username": "ed.b", "password": PASSWORD},
            headers={**bearer(board_token), "X-Forwarded-For": f"198.51.100.{n + 1}"},
        )
        assert r.status_code == 200, (n, r.text)


async def test_the_board_throttles_before_forwarding(stack: Stack) -> None:
    stack.runtime.security = replace(stack.runtime.security, throttle=SignInThrottle(attempts=3, window_s=60))
    codes = [
        (await stack.board.post("/api/auth/login", json={"username": "ed.b", "password": "guess guess"})).status_code
        for _ in range(4)
    ]
    assert codes == [401, 401, 401, 429]


def test_throttle_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="positive"):
        SignInThrottle(attempts=0)


# --- 5. who acknowledged comes from the token -----------------------------------------------------------------------


async def test_the_acknowledgements_role_comes_from_the_token_not_the_body(stack: Stack) -> None:
    broker = Broker()
    stack.runtime.link = broker  # type: ignore[assignment]
    stack.runtime.ingest.link = broker  # type: ignore[assignment]
    ed = bearer(stack.security.issue("ed.b", Role.ED_STAFF, hospital_id="HA"))
    r = await stack.board.post("/api/alerts/a1/ack", json={"hospital_id": "HA", "by_role": "administrator"}, headers=ed)
    assert r.status_code == 200, r.text
    ((topic, payload),) = broker.published
    ack = decode_as(AlertAck, TopicSpace(), topic, payload)
    assert ack.by_role == "ed_staff", "the body's claimed role is ignored"
    event = next(e for e in stack.runtime.audit.recent if e["action"] == "alert.ack")
    assert (event["actor"], event["role"]) == ("ed.b", "ed_staff")


async def test_a_hospital_status_change_records_the_token_subject_not_the_bodys_name(stack: Stack) -> None:
    ed = bearer(stack.security.issue("ed.a", Role.ED_STAFF, hospital_id="MC-CCM"))
    r = await stack.dispatch.patch(
        "/api/hospitals/MC-CCM/status", json={"set_by": "chief medical officer", "ed_beds_free": 2}, headers=ed
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"]["set_by"] == "ed.a"


async def test_a_sign_out_at_dispatch_ends_the_session_on_the_board_too(stack: Stack) -> None:
    """The board learns dispatch's ended sessions (GET /api/auth/revoked, polled): a token signed out at dispatch
    stops working on the board as well (hostile tester: it worked there until it expired)."""
    session = await login(stack.dispatch, "ed.b")
    captured = bearer(session["access_token"])
    assert (await stack.board.get("/api/hospitals/HA/snapshot", headers=captured)).status_code == 200
    assert (await stack.dispatch.post("/api/auth/logout", headers=captured)).status_code == 204
    poll = asyncio.create_task(board_main._revocations_forever(stack.runtime))
    try:
        async with asyncio.timeout(10):
            while not len(stack.runtime.security.revoked):  # noqa: ASYNC110 - the board's poll is the thing tested
                await asyncio.sleep(0.01)
    finally:
        poll.cancel()
    assert (await stack.board.get("/api/hospitals/HA/snapshot", headers=captured)).status_code == 401
    # only services may read the list
    assert (await stack.dispatch.get("/api/auth/revoked", headers=captured)).status_code in (401, 403)
