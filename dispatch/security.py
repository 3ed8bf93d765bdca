"""Dispatch's security configuration and the request-level pieces: who is calling, may they, and the audit row.

* :class:`DispatchSecurity`: mode, signing key, token lifetimes, cookie policy; from settings, or
  :meth:`DispatchSecurity.development` for the one-process demo and tests.
* :func:`authenticate`: the caller's :class:`~broker_config.identity.Claims` from ``Authorization: Bearer`` or,
  for browsers, the ``gh_access`` cookie (HttpOnly, SameSite=Strict).  A cookie-authenticated request that changes
  something must come from this origin (``Origin`` header, when the browser sends one, equal to the host).
  A token of a signed-out session (its ``sid`` in :attr:`SecurityRuntime.revoked`) is refused at once (401).
* :attr:`SecurityRuntime.throttle`: sign-in attempts per client address (429 with ``Retry-After``).
* :func:`require`: the dependency factory for role checks; :data:`AnyCaller` etc. are the ``Annotated`` aliases.
* :func:`record`: append an audit row for the caller (who, role, from where), failing closed for reads.

HTTP status codes: 401 (no, bad or expired token; ``WWW-Authenticate: Bearer``), 403 (role or scope forbids).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fastapi import Depends, HTTPException, Request, status

from broker_config import utc_now
from broker_config.identity import (
    ACCESS_COOKIE,
    Claims,
    RevokedSessions,
    Role,
    SecurityMode,
    SignInThrottle,
    TokenError,
    generate_signing_key,
    issue_token,
    load_signing_key,
    load_verify_key,
    verify_key_text,
    verify_token,
)
from dispatch.accounts import AccountService, AccountStore
from dispatch.audit import AuditAction, AuditDraft
from dispatch.errors import StoreError
from dispatch.settings import DispatchSettings

__all__ = [
    "AdminCaller",
    "AnyCaller",
    "AuditorCaller",
    "Caller",
    "DispatchSecurity",
    "SecurityRuntime",
    "authenticate",
    "forbidden",
    "record",
    "require",
]

logger = logging.getLogger(__name__)

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class DispatchSecurity:
    """How dispatch signs and checks tokens.  ``previous_verify_keys``: retired keys still accepted (rotation)."""

    mode: SecurityMode
    signing_key: Ed25519PrivateKey
    previous_verify_keys: tuple[Ed25519PublicKey, ...] = ()
    access_ttl_s: float = 900.0
    refresh_ttl_s: float = 12 * 3_600.0
    cookie_secure: bool = True
    clock: Callable[[], datetime] = field(default=utc_now)

    @classmethod
    def from_settings(cls, settings: DispatchSettings) -> DispatchSecurity:
        """From validated settings; development without a key gets a fresh one (tokens die with the process)."""
        if settings.signing_key is not None:
            key = load_signing_key(settings.signing_key.get_secret_value())
        elif settings.security_mode is SecurityMode.DEVELOPMENT:
            key = generate_signing_key()
            logger.warning("development mode: signing tokens with a key generated for this run")
        else:  # DispatchSettings refuses this already; kept for callers that build settings by hand
            raise ValueError("a signing key is required outside development mode")
        secure = settings.cookie_secure
        return cls(
            mode=settings.security_mode,
            signing_key=key,
            previous_verify_keys=tuple(load_verify_key(t) for t in settings.previous_verify_keys),
            access_ttl_s=settings.access_token_ttl_s,
            refresh_ttl_s=settings.refresh_token_ttl_s,
            cookie_secure=secure if secure is not None else settings.security_mode is SecurityMode.PRODUCTION,
        )

    @classmethod
    def development(cls, *, access_ttl_s: float = 900.0, clock: Callable[[], datetime] = utc_now) -> DispatchSecurity:
        """A development configuration with a fresh key (the demo, tests); cookies not ``Secure`` (plain HTTP)."""
        return cls(
            SecurityMode.DEVELOPMENT,
            generate_signing_key(),
            access_ttl_s=access_ttl_s,
            cookie_secure=False,
            clock=clock,
        )

    @property
    def verify_keys(self) -> tuple[Ed25519PublicKey, ...]:
        """Every key a token may be signed with: the current one first."""
        return (self.signing_key.public_key(), *self.previous_verify_keys)

    @property
    def verify_key_text(self) -> str:
        """The current public key in the board's ``EMS_BOARD_VERIFY_KEYS`` format (not a secret)."""
        return verify_key_text(self.signing_key)

    def issue(self, subject: str, role: Role, *, hospital_id: str | None = None, unit_id: str | None = None) -> str:
        """An access token signed with this key, without an account (tests, tools: holding the key is the power
        to sign anyway).  Raises ValueError for claims that break the binding rules."""
        token, _ = issue_token(
            self.signing_key,
            subject=subject,
            role=role,
            ttl_s=self.access_ttl_s,
            now=self.clock(),
            hospital_id=hospital_id,
            unit_id=unit_id,
        )
        return token

    def account_service(self, store: AccountStore, revoked: RevokedSessions | None = None) -> AccountService:
        """Sign-in and accounts on ``store`` (dispatch's repository) with this configuration; sign-outs go into
        ``revoked`` (the app's store, checked by :func:`authenticate`)."""
        return AccountService(
            store,
            self.signing_key,
            access_ttl_s=self.access_ttl_s,
            refresh_ttl_s=self.refresh_ttl_s,
            mode=self.mode,
            clock=self.clock,
            revoked=revoked,
        )


class SecurityRuntime:
    """What the routes share: the configuration, the account service of the app's repository, the revoked
    sessions and the sign-in throttle (``throttle=None``: no per-address limit)."""

    def __init__(self, security: DispatchSecurity, throttle: SignInThrottle | None = None) -> None:
        self.security = security
        self.revoked = RevokedSessions()
        self.throttle = throttle if throttle is not None else SignInThrottle()
        self._accounts: AccountService | None = None
        self._store: object | None = None

    def accounts(self, store: AccountStore) -> AccountService:
        """The account service on ``store`` (built once per repository)."""
        if self._accounts is None or self._store is not store:
            self._accounts = self.security.account_service(store, self.revoked)
            self._store = store
        return self._accounts


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated request: the token's claims and the client's address."""

    claims: Claims
    client_addr: str | None

    @property
    def username(self) -> str:
        """The token's subject."""
        return self.claims.sub

    @property
    def role(self) -> Role:
        """The token's role."""
        return self.claims.role


def security_runtime(request: Request) -> SecurityRuntime:
    """The app's :class:`SecurityRuntime`."""
    runtime: SecurityRuntime = request.app.state.security
    return runtime


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
    )


def forbidden(message: str = "forbidden for this role or scope") -> HTTPException:
    """The 403 every check raises."""
    return HTTPException(status.HTTP_403_FORBIDDEN, message)


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        return True  # non-browser clients and same-origin GETs; SameSite=Strict keeps cross-site cookies out
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1].rstrip("/") == host


def authenticate(request: Request) -> Caller:
    """The caller, from a bearer token or the access cookie.  Raises 401 (missing/invalid/expired) or 403."""
    runtime = security_runtime(request)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    from_cookie = False
    if not header:
        token = request.cookies.get(ACCESS_COOKIE, "")
        from_cookie = True
    elif scheme.lower() != "bearer":
        raise _unauthorized("bearer token required")
    if not token:
        raise _unauthorized("sign-in required")
    try:
        claims = verify_token(token.strip(), runtime.security.verify_keys, now=runtime.security.clock())
    except TokenError as exc:
        logger.info("token refused reason=%s path=%s", exc.reason, request.url.path)
        raise _unauthorized("invalid or expired token") from None
    if runtime.revoked.is_revoked(claims, runtime.security.clock()):
        logger.info("token refused reason=signed_out user=%s path=%s", claims.sub, request.url.path)
        raise _unauthorized("session ended") from None
    if from_cookie and request.method not in _SAFE_METHODS and not _same_origin(request):
        raise forbidden("cross-origin request refused")
    return Caller(claims, request.client.host if request.client else None)


AnyCaller = Annotated[Caller, Depends(authenticate)]


def require(*roles: Role) -> Callable[..., Caller]:
    """A dependency that authenticates and then allows only ``roles`` (403 for the others)."""
    allowed = frozenset(roles)

    def check(caller: AnyCaller) -> Caller:
        if caller.role not in allowed:
            raise forbidden()
        return caller

    return check


AdminCaller = Annotated[Caller, Depends(require(Role.ADMINISTRATOR))]
AuditorCaller = Annotated[Caller, Depends(require(Role.QUALITY_MANAGER, Role.ADMINISTRATOR))]


class Audited(Protocol):
    """What :func:`record` needs: the service's store and clock."""

    @property
    def repo(self) -> Any: ...

    @property
    def clock(self) -> Callable[[], datetime]: ...


async def record(svc: Audited, caller: Caller, action: AuditAction, *, read: bool, **ids: Any) -> None:
    """Append an audit row for ``caller`` at the service's time.  A read whose row cannot be stored is refused
    (503: no unaudited reads of patient data); a change that already happened is logged (ids only) and answered."""
    store: AccountStore = svc.repo
    draft = AuditDraft(
        at=svc.clock(),
        actor=caller.username,
        role=caller.role.value,
        action=action.value,
        actor_hospital_id=caller.claims.hospital_id,
        client_addr=caller.client_addr,
        **ids,
    )
    try:
        await store.append_audit(draft)
    except StoreError as exc:
        logger.warning("audit row not stored action=%s actor=%s cause=%s", action.value, caller.username, exc.cause)
        if read:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "audit trail unavailable") from None
