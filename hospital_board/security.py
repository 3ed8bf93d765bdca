"""The board's side of security: who is looking, may they, and the audit of what they saw.

* Tokens are dispatch's (:mod:`broker_config.identity`); the board holds only the public key(s) to verify them.
* Browsers carry the access token in the board's own ``gh_board_access`` cookie (HttpOnly, SameSite=Strict,
  Path=/; not dispatch's name, see ``broker_config.identity.BOARD_ACCESS_COOKIE``), set by the board's own
  ``POST /api/auth/login``, which forwards the sign-in to dispatch.  A cookie and not a stream ticket
  in the query string, because ``EventSource`` cannot send an ``Authorization`` header, query strings end up in
  access logs and browser history, and an HttpOnly cookie is out of reach of any script (the strict CSP already
  forbids inline script).  SameSite=Strict keeps the cookie off cross-site requests; state-changing requests must
  also carry a same-origin ``Origin`` when the browser sends one.  API clients may use ``Authorization: Bearer``.
* An event stream ends when its token expires; the page's ``EventSource`` reconnects with the refreshed cookie
  (``common.js`` refreshes it before expiry) and receives a full snapshot, so nobody misses an alert.
* Sign-out revokes at once: the board keeps a :class:`~broker_config.identity.RevokedSessions` store of the
  sessions signed out (or refused at refresh) through it and refuses their tokens (``sid``) before they expire.
  Sign-in attempts are throttled per client address (:class:`~broker_config.identity.SignInThrottle`, 429 with
  ``Retry-After``) before they are forwarded: dispatch sees only the board's address.
* Who may see what: ED staff and department on-call: their hospital's board, inbound patients, acknowledgement;
  dispatcher and administrator: any hospital's board, read only; crew: their own unit's detail and phone view;
  quality manager: no live board (reports are in dispatch); services: nothing here.
* Audit: every read of a patient's data by a person (snapshot, detail, timeline, feed subscription and its end)
  and every acknowledgement is queued to :class:`AuditReporter`, which posts batches to dispatch's
  ``POST /api/audit/events`` (one hash-chained trail for the region, read by quality managers in one place).
  The queue is bounded; when dispatch is unreachable it retries with back-off, and beyond the bound it drops and
  counts (``/api/health``), never blocking a display.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import Depends, HTTPException, Request, status

from broker_config import utc_now
from broker_config.identity import (
    BOARD_ACCESS_COOKIE,
    Claims,
    RevokedSessions,
    Role,
    SecurityMode,
    SignInThrottle,
    TokenError,
    load_verify_key,
    verify_token,
)

__all__ = [
    "BOARD_ROLES",
    "AuditReporter",
    "BoardSecurity",
    "Viewer",
    "ViewerDep",
    "authenticate",
    "check_hospital",
    "forbidden",
]

logger = logging.getLogger(__name__)

BOARD_ROLES = frozenset({Role.ED_STAFF, Role.DEPARTMENT_ONCALL, Role.DISPATCHER, Role.ADMINISTRATOR})
"""Roles that may open a hospital's board (hospital-bound ones only their own)."""
ACK_ROLES = frozenset({Role.ED_STAFF, Role.DEPARTMENT_ONCALL})
"""Acknowledging is the receiving team's act."""
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class BoardSecurity:
    """Verification keys (current first, then retired ones still accepted), mode, cookie policy, clock; the
    sessions signed out through this board and the sign-in throttle."""

    mode: SecurityMode
    verify_keys: tuple[Ed25519PublicKey, ...]
    cookie_secure: bool = True
    clock: Callable[[], datetime] = field(default=utc_now)
    revoked: RevokedSessions = field(default_factory=RevokedSessions)
    throttle: SignInThrottle = field(default_factory=SignInThrottle)

    @classmethod
    def from_texts(
        cls,
        mode: SecurityMode,
        keys: Sequence[str],
        *,
        cookie_secure: bool | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> BoardSecurity:
        """From the settings' key texts (base64url or PEM).  Raises ValueError for a bad key."""
        secure = cookie_secure if cookie_secure is not None else mode is SecurityMode.PRODUCTION
        return cls(mode, tuple(load_verify_key(k) for k in keys), secure, clock)


@dataclass(frozen=True, slots=True)
class Viewer:
    """An authenticated request to the board: the token's claims and the client's address."""

    claims: Claims
    client_addr: str | None

    @property
    def role(self) -> Role:
        """The token's role."""
        return self.claims.role


def forbidden(message: str = "forbidden for this role or hospital") -> HTTPException:
    """The 403 every check raises."""
    return HTTPException(status.HTTP_403_FORBIDDEN, message)


def _unauthorized() -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, "sign-in required", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
    )


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    return origin is None or origin.split("://", 1)[-1].rstrip("/") == request.headers.get("host", "")


def viewer_or_none(request: Request) -> Viewer | None:
    """The viewer, or None when there is no valid token (pages redirect to sign-in instead of answering 401)."""
    security: BoardSecurity = request.app.state.board.security
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    from_cookie = not header
    if from_cookie:
        token = request.cookies.get(BOARD_ACCESS_COOKIE, "")
    elif scheme.lower() != "bearer":
        return None
    if not token or not security.verify_keys:
        return None
    try:
        claims = verify_token(token.strip(), security.verify_keys, now=security.clock())
    except TokenError as exc:
        logger.info("token refused reason=%s path=%s", exc.reason, request.url.path)
        return None
    if security.revoked.is_revoked(claims, security.clock()):
        logger.info("token refused reason=signed_out user=%s path=%s", claims.sub, request.url.path)
        return None
    if from_cookie and request.method not in _SAFE_METHODS and not _same_origin(request):
        raise forbidden("cross-origin request refused")
    return Viewer(claims, request.client.host if request.client else None)


def authenticate(request: Request) -> Viewer:
    """The viewer from a bearer token or the access cookie.  Raises 401 without a valid one."""
    viewer = viewer_or_none(request)
    if viewer is None:
        raise _unauthorized()
    return viewer


ViewerDep = Annotated[Viewer, Depends(authenticate)]


def check_hospital(viewer: Viewer, hospital_id: str) -> None:
    """Allow a hospital's whole board only to its staff and to regional roles.  Raises 403."""
    if viewer.role not in BOARD_ROLES or not viewer.claims.may_see_hospital(hospital_id):
        raise forbidden()


def check_unit(viewer: Viewer, hospital_id: str, unit_id: str) -> None:
    """Allow one inbound patient's detail to the hospital's staff, regional roles and the unit's own crew."""
    if viewer.role is Role.CREW:
        if viewer.claims.unit_id != unit_id:
            raise forbidden("another unit's patient")
        return
    check_hospital(viewer, hospital_id)


# --- the audit queue ------------------------------------------------------------------------------------------------


Sink = Callable[[list[dict[str, Any]]], Awaitable[None]]


class AuditReporter:
    """A bounded queue of audit events, posted in batches to dispatch by :meth:`run`.

    Args:
        sink: posts one batch (raises on failure; the batch is retried); None keeps events only in :attr:`recent`
            (development without dispatch, unit tests).
        max_items: queue bound; beyond it events are dropped and counted in :attr:`dropped`.
        batch_items: events per request (dispatch accepts up to 500).
        errors: the exceptions of ``sink`` that mean "try again later".
    """

    def __init__(
        self,
        sink: Sink | None,
        *,
        max_items: int = 20_000,
        batch_items: int = 200,
        retry_min_s: float = 1.0,
        retry_max_s: float = 30.0,
        errors: tuple[type[Exception], ...] = (OSError,),
    ) -> None:
        self.sink = sink
        self.errors = errors
        self.max_items = max_items
        self.batch_items = batch_items
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self._queue: deque[dict[str, Any]] = deque()
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.recent: deque[dict[str, Any]] = deque(maxlen=2_000)
        """The latest events (queued or sent), for health checks and tests."""
        self.counts: Counter[str] = Counter()

    @property
    def backlog(self) -> int:
        """Events waiting to be posted."""
        return len(self._queue)

    def report(
        self,
        viewer: Viewer,
        action: str,
        *,
        at: datetime,
        hospital_id: str | None,
        unit_id: str | None = None,
        alert_id: str | None = None,
        object_type: str | None = None,
        object_id: str | None = None,
        outcome: str = "ok",
        detail: str = "",
    ) -> None:
        """Queue one event (never waits).  Ids only: no patient data travels in an audit event."""
        if not viewer.claims.is_person:
            return
        event: dict[str, Any] = {
            "at": at.isoformat(),
            "actor": viewer.claims.sub,
            "role": viewer.claims.role.value,
            "actor_hospital_id": viewer.claims.hospital_id,
            "action": action,
            "object_type": object_type,
            "object_id": object_id,
            "unit_id": unit_id,
            "alert_id": alert_id,
            "hospital_id": hospital_id,
            "client_addr": viewer.client_addr,
            "outcome": outcome,
            "detail": detail[:200],
        }
        self.recent.append(event)
        self.counts[action] += 1
        if self.sink is None:
            return
        if len(self._queue) >= self.max_items:
            self.counts["dropped"] += 1
            logger.warning("audit queue full, event dropped action=%s actor=%s", action, viewer.claims.sub)
            return
        self._queue.append(event)
        self._idle.clear()
        self._ready.set()

    async def run(self) -> None:
        """Post queued events in batches until cancelled; failed batches are retried with capped back-off."""
        if self.sink is None:
            return
        delay = self.retry_min_s
        while True:
            if not self._queue:
                self._idle.set()
                self._ready.clear()
                await self._ready.wait()
                continue
            batch = [self._queue[i] for i in range(min(self.batch_items, len(self._queue)))]
            try:
                await self.sink(batch)
            except self.errors as exc:
                self.counts["post_failures"] += 1
                logger.warning("audit batch not delivered events=%d reason=%s", len(batch), type(exc).__name__)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret
                delay = min(delay * 2, self.retry_max_s)
                continue
            delay = self.retry_min_s
            for _ in batch:
                self._queue.popleft()
            self.counts["sent"] += len(batch)

    async def drained(self, timeout_s: float) -> None:
        """Wait until every queued event was posted (tests, shutdown).  Raises TimeoutError."""
        async with asyncio.timeout(timeout_s):
            await self._idle.wait()
