"""HTTP routes for sign-in, accounts and the audit trail.  Mounted by :func:`dispatch.api.create_app`.

* ``POST /api/auth/login``    username + password (+ ``totp``) -> access token (15 min) + refresh token (12 h), also
  set as cookies ``gh_access`` (Path=/) and ``gh_refresh`` (Path=/api/auth), both HttpOnly and SameSite=Strict.
  401 wrong credentials (one message for every cause), 401 ``totp_required``, 423 locked (5 failures -> 15 min),
  429 with ``Retry-After`` beyond 10 attempts a minute from one client address, or beyond 4 failures into one account
  from one address in 15 minutes (:class:`~broker_config.identity.SignInThrottle`; before any password is checked);
  a sign-in forwarded by a service (the board) with its service token counts against the person's address in
  ``X-Forwarded-For``, never against the board's (or one flood would lock every nurse of that board out).
* ``POST /api/auth/refresh``  rotate the refresh token (body or cookie) -> new tokens; 401 if invalid or reused.
* ``POST /api/auth/logout``   revoke the sign-in session (refresh token in body or cookie, and/or the caller's access
  token): its refresh tokens and, at once, its access tokens; clears the cookies (204).
* ``GET  /api/auth/me``       who the token says the caller is.
* ``POST /api/accounts``, ``GET /api/accounts``, ``PATCH /api/accounts/{username}`` (administrator).
* ``GET  /api/audit``         rows, filtered by unit / alert / incident / actor (quality manager, administrator).
* ``GET  /api/audit/verify``  the hash-chain check with the first broken row (quality manager, administrator).
* ``POST /api/audit/events``  the board reports its people's reads and acknowledgements (service accounts only).
"""

from __future__ import annotations

import ipaddress
import logging
import math
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi import Path as PathParam

from broker_config.identity import ACCESS_COOKIE, REFRESH_COOKIE, SUBJECT_PATTERN, Claims, Role
from broker_config.topics import ID_PATTERN
from dispatch.accounts import AccountRecord, AccountService, Session, totp_uri
from dispatch.audit import BOARD_ACTIONS, AuditAction, AuditDraft, verify_chain
from dispatch.errors import (
    AccountExistsError,
    AccountLockedError,
    AuthError,
    InvalidCredentialsError,
    InvalidRefreshTokenError,
    SecondFactorRequiredError,
    StoreError,
    UnknownAccountError,
)
from dispatch.schemas import (
    AccountCreate,
    AccountCreated,
    AccountPublic,
    AccountUpdate,
    AuditEntryPublic,
    AuditReportBatch,
    AuditVerifyPublic,
    LoginRequest,
    LogoutRequest,
    PrincipalPublic,
    RefreshRequest,
    RevokedSessionsPublic,
    TokenResponse,
)
from dispatch.security import (
    AdminCaller,
    AnyCaller,
    AuditorCaller,
    Caller,
    SecurityRuntime,
    authenticate,
    record,
    require,
    security_runtime,
)
from dispatch.service import DispatchService

__all__ = ["auth_router", "principal_public"]

logger = logging.getLogger(__name__)

ServiceCaller = Annotated[Caller, Depends(require(Role.SERVICE))]
_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def _service(request: Request) -> DispatchService:
    service: DispatchService = request.app.state.service
    return service


ServiceDep = Annotated[DispatchService, Depends(_service)]
SecurityDep = Annotated[SecurityRuntime, Depends(security_runtime)]


def principal_public(claims: Claims) -> PrincipalPublic:
    """The public view of a token's claims."""
    return PrincipalPublic(
        username=claims.sub,
        role=claims.role,
        hospital_id=claims.hospital_id,
        unit_id=claims.unit_id,
        expires_at=claims.expires_at,
    )


def _account_public(r: AccountRecord, secret: str | None = None) -> AccountCreated:
    return AccountCreated(
        username=r.username,
        role=r.role,
        hospital_id=r.hospital_id,
        unit_id=r.unit_id,
        totp_enrolled=r.totp_secret is not None,
        disabled=r.disabled,
        locked_until=r.locked_until,
        created_at=r.created_at,
        totp_secret=secret,
        totp_uri=totp_uri(secret, r.username) if secret else None,
    )


def _store_unavailable() -> HTTPException:
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "dispatch database unavailable")


def _issue(response: Response, session: Session, accounts: AccountService, secure: bool) -> TokenResponse:
    now = accounts.clock()
    expires_in = max(0, int((session.claims.expires_at - now).total_seconds()))
    response.set_cookie(
        ACCESS_COOKIE, session.access_token, max_age=expires_in, path="/", secure=secure, httponly=True,
        samesite="strict",
    )  # fmt: skip
    refresh_in: int | None = None
    if session.refresh_token is not None and session.refresh_expires_at is not None:
        refresh_in = max(0, int((session.refresh_expires_at - now).total_seconds()))
        response.set_cookie(
            REFRESH_COOKIE, session.refresh_token, max_age=refresh_in, path="/api/auth", secure=secure,
            httponly=True, samesite="strict",
        )  # fmt: skip
    response.headers["Cache-Control"] = "no-store"
    return TokenResponse(
        access_token=session.access_token,
        expires_in=expires_in,
        refresh_token=session.refresh_token,
        refresh_expires_in=refresh_in,
        principal=principal_public(session.claims),
    )


def _clear(response: Response, secure: bool) -> None:
    response.delete_cookie(ACCESS_COOKIE, path="/", secure=secure, httponly=True, samesite="strict")
    response.delete_cookie(REFRESH_COOKIE, path="/api/auth", secure=secure, httponly=True, samesite="strict")


def _throttle_address(request: Request) -> str | None:
    """The address a sign-in counts against: the peer's, or the one a service (the board) forwards for a person."""
    peer = request.client.host if request.client else None
    forwarded = request.headers.get("x-forwarded-for")
    if not forwarded or not request.headers.get("authorization"):
        return peer
    try:
        caller = authenticate(request)
        address = ipaddress.ip_address(forwarded.split(",")[-1].strip())
    except (HTTPException, ValueError):
        return peer
    return f"{address}" if caller.role is Role.SERVICE else peer


def auth_router() -> APIRouter:
    """The routes of this module."""
    router = APIRouter()

    # --- sign-in -------------------------------------------------------------------------------------------------

    @router.post(
        "/api/auth/login",
        tags=["auth"],
        responses={
            401: {"description": "invalid credentials, or totp_required"},
            423: {"description": "locked"},
            429: {"description": "too many attempts from this address (Retry-After)"},
        },
    )
    async def login(
        body: LoginRequest, request: Request, response: Response, svc: ServiceDep, sec: SecurityDep
    ) -> TokenResponse:
        """Sign in with username, password and (if enrolled) a TOTP code."""
        client = _throttle_address(request)
        wait_s = sec.throttle.hit(client, body.username)
        if wait_s is not None:
            logger.warning("sign-in throttled client=%s", client)
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                "too many sign-in attempts from this address, try again later",
                headers={"Retry-After": str(math.ceil(wait_s))},
            )
        accounts = sec.accounts(svc.repo)
        try:
            session = await accounts.login(body.username, body.password, body.totp)
        except SecondFactorRequiredError:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "totp_required", headers=_UNAUTHORIZED) from None
        except AccountLockedError:
            raise HTTPException(status.HTTP_423_LOCKED, "account locked, try again later") from None
        except InvalidCredentialsError:
            sec.throttle.failed(client, body.username)
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "invalid username, password or code", headers=_UNAUTHORIZED
            ) from None
        except StoreError:
            raise _store_unavailable() from None
        return _issue(response, session, accounts, sec.security.cookie_secure)

    @router.post("/api/auth/refresh", tags=["auth"], responses={401: {"description": "invalid refresh token"}})
    async def refresh(
        request: Request, response: Response, svc: ServiceDep, sec: SecurityDep, body: RefreshRequest | None = None
    ) -> TokenResponse:
        """A new access token and a new refresh token for a valid refresh token (body or cookie)."""
        token = (body.refresh_token if body else None) or request.cookies.get(REFRESH_COOKIE, "")
        accounts = sec.accounts(svc.repo)
        try:
            session = await accounts.refresh(token)
        except InvalidRefreshTokenError:
            _clear(response, sec.security.cookie_secure)
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid refresh token", headers=_UNAUTHORIZED) from None
        except StoreError:
            raise _store_unavailable() from None
        return _issue(response, session, accounts, sec.security.cookie_secure)

    @router.post("/api/auth/logout", tags=["auth"], status_code=status.HTTP_204_NO_CONTENT)
    async def logout(
        request: Request, response: Response, svc: ServiceDep, sec: SecurityDep, body: LogoutRequest | None = None
    ) -> None:
        """Revoke the sign-in session (its refresh and access tokens, at once) and clear the cookies."""
        token = (body.refresh_token if body else None) or request.cookies.get(REFRESH_COOKIE, "")
        try:
            session_id = authenticate(request).claims.sid
        except HTTPException:
            session_id = None  # no, expired or foreign access token: the refresh token alone decides
        try:
            await sec.accounts(svc.repo).logout(token, session_id)
        except StoreError:
            raise _store_unavailable() from None
        _clear(response, sec.security.cookie_secure)

    @router.get("/api/auth/revoked", tags=["auth"], responses={403: {"description": "services only"}})
    async def revoked_sessions(_: ServiceCaller, sec: SecurityDep) -> RevokedSessionsPublic:
        """Sessions ended before their access tokens expire (sign-out, refresh-token reuse): session id -> until.
        For the other services that verify dispatch's tokens (the ED board polls it), so a sign-out here ends the
        session there too within the poll interval."""
        return RevokedSessionsPublic(sessions=sec.revoked.active(sec.security.clock()))

    @router.get("/api/auth/me", tags=["auth"], responses={401: {"description": "not signed in"}})
    async def me(caller: AnyCaller) -> PrincipalPublic:
        """The caller as the token describes them."""
        return principal_public(caller.claims)

    # --- accounts ------------------------------------------------------------------------------------------------

    @router.post(
        "/api/accounts",
        tags=["accounts"],
        status_code=status.HTTP_201_CREATED,
        responses={409: {"description": "exists"}, 422: {"description": "bad binding or password"}},
    )
    async def create_account(
        body: AccountCreate, caller: AdminCaller, svc: ServiceDep, sec: SecurityDep
    ) -> AccountCreated:
        """Create an account (administrator).  The TOTP secret, if enrolled, is in this answer only."""
        try:
            account, secret = await sec.accounts(svc.repo).create_account(
                body.username,
                body.role,
                body.password,
                hospital_id=body.hospital_id,
                unit_id=body.unit_id,
                totp=body.totp,
            )
        except AccountExistsError:
            raise HTTPException(status.HTTP_409_CONFLICT, "account exists") from None
        except AuthError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        except StoreError:
            raise _store_unavailable() from None
        await record(
            svc, caller, AuditAction.ACCOUNT_CREATE, read=False, object_type="account",
            object_id=None, detail=f"username={account.username} role={account.role.value}",
        )  # fmt: skip
        return _account_public(account, secret)

    @router.get("/api/accounts", tags=["accounts"])
    async def accounts(caller: AdminCaller, svc: ServiceDep) -> list[AccountPublic]:
        """Every account, without secrets (administrator)."""
        try:
            rows = await svc.repo.list_accounts()
        except StoreError:
            raise _store_unavailable() from None
        return [
            AccountPublic.model_validate(_account_public(r).model_dump(exclude={"totp_secret", "totp_uri"}))
            for r in rows
        ]

    @router.patch(
        "/api/accounts/{username}",
        tags=["accounts"],
        responses={404: {"description": "unknown account"}, 422: {"description": "weak password"}},
    )
    async def update_account(
        username: Annotated[str, PathParam(pattern=SUBJECT_PATTERN.pattern)],
        body: AccountUpdate,
        caller: AdminCaller,
        svc: ServiceDep,
        sec: SecurityDep,
    ) -> AccountCreated:
        """Disable/enable, new password, unlock, enrol or remove TOTP (administrator)."""
        try:
            account, secret = await sec.accounts(svc.repo).update_account(
                username, disabled=body.disabled, password=body.password, unlock=body.unlock, reset_totp=body.reset_totp
            )
        except UnknownAccountError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown account") from None
        except AuthError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        except StoreError:
            raise _store_unavailable() from None
        changes = ",".join(k for k, v in body.model_dump(exclude={"password"}).items() if v not in (None, False))
        await record(
            svc, caller, AuditAction.ACCOUNT_UPDATE, read=False, object_type="account",
            detail=f"username={username} changes={changes}{',password' if body.password else ''}",
        )  # fmt: skip
        return _account_public(account, secret)

    # --- audit ---------------------------------------------------------------------------------------------------

    @router.get("/api/audit", tags=["audit"])
    async def audit(
        caller: AuditorCaller,
        svc: ServiceDep,
        unit_id: Annotated[str | None, Query(pattern=ID_PATTERN.pattern)] = None,
        alert_id: Annotated[str | None, Query(pattern=ID_PATTERN.pattern)] = None,
        incident_id: Annotated[str | None, Query(pattern=ID_PATTERN.pattern)] = None,
        actor: Annotated[str | None, Query(pattern=SUBJECT_PATTERN.pattern)] = None,
        after_seq: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=1_000)] = 200,
    ) -> list[AuditEntryPublic]:
        """Audit rows in order after ``after_seq`` (page with the last ``seq``), filtered (quality, administrator)."""
        try:
            rows = await svc.repo.audit_entries(
                after_seq=after_seq, limit=limit, unit_id=unit_id, alert_id=alert_id, incident_id=incident_id,
                actor=actor,
            )  # fmt: skip
        except StoreError:
            raise _store_unavailable() from None
        await record(svc, caller, AuditAction.AUDIT_READ, read=True, object_type="audit", detail=f"rows={len(rows)}")
        return [AuditEntryPublic.model_validate(r, from_attributes=True) for r in rows]

    @router.get("/api/audit/verify", tags=["audit"])
    async def verify(caller: AuditorCaller, svc: ServiceDep) -> AuditVerifyPublic:
        """Recompute the whole hash chain and report the first broken link (quality manager, administrator)."""
        try:
            rows = await svc.repo.audit_entries()
        except StoreError:
            raise _store_unavailable() from None
        report = verify_chain(rows)
        return AuditVerifyPublic(
            ok=report.ok,
            checked=report.checked,
            first_broken_seq=report.first_broken_seq,
            reason=report.reason,
            head_hash=report.head_hash,
        )

    @router.post("/api/audit/events", tags=["audit"], status_code=status.HTTP_202_ACCEPTED)
    async def report(body: AuditReportBatch, caller: ServiceCaller, svc: ServiceDep) -> dict[str, int]:
        """Append events a service (the board) observed: its people's reads of patient data, acknowledgements.

        Only the board's actions are accepted (422 otherwise); a hospital-bound service may report only its
        hospital.  Each row records the service as ``reported_by``.
        """
        for event in body.events:
            if event.action not in BOARD_ACTIONS:
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"action {event.action} not reportable")
            if caller.claims.hospital_id is not None and event.hospital_id != caller.claims.hospital_id:
                raise HTTPException(status.HTTP_403_FORBIDDEN, "another hospital's event")
        try:
            for event in body.events:
                await svc.repo.append_audit(
                    AuditDraft(
                        at=event.at,
                        actor=event.actor,
                        role=event.role.value,
                        action=event.action,
                        actor_hospital_id=event.actor_hospital_id,
                        object_type=event.object_type,
                        object_id=event.object_id,
                        unit_id=event.unit_id,
                        alert_id=event.alert_id,
                        hospital_id=event.hospital_id,
                        client_addr=event.client_addr,
                        outcome=event.outcome,
                        reported_by=caller.username,
                        detail=event.detail,
                    )
                )
        except StoreError:
            raise _store_unavailable() from None
        return {"accepted": len(body.events)}

    return router
