"""Who is calling: roles, the access-token claims, and signing/verifying tokens (shared by dispatch and the board).

Dispatch issues tokens (it holds the Ed25519 private key); the board, and any other service, verifies them with the
public key only.  Both import this one definition, so the format cannot drift between them.  No web framework here.

Token format: a JSON Web Token (RFC 7519) in JWS compact serialisation (RFC 7515), signed with Ed25519
(``"alg": "EdDSA"``, RFC 8037)::

    base64url(header) "." base64url(claims) "." base64url(signature over the first two parts)

* header: exactly ``{"alg": "EdDSA", "typ": "JWT", "kid": <key id>}``.  Any other algorithm (``none``, HS256, ...)
  is refused before any key is touched, so the classic algorithm-confusion attacks have nothing to work with.
* ``kid`` is the first 12 base64url characters of SHA-256 of the raw public key: a verifier may hold several keys
  (rotation: publish the new public key to every verifier, then switch dispatch's signing key).
* claims: :class:`Claims`; times are integer seconds since the epoch (UTC).  Claims carry opaque ids only
  (username, role, hospital id, unit id): never a patient's data.
* A token is at most :data:`MAX_TOKEN_BYTES` long; anything longer is refused unparsed.
* ``sid`` (a person's sign-in session, the refresh-token family) lets a verifier refuse a token before it expires:
  sign-out and refresh-token reuse put the session in a :class:`RevokedSessions` store that every request checks.

Scoping rules (DOMAIN.md section 11: a hospital sees only the patients coming to it): ED staff and department
on-call are bound to one ``hospital_id``; crew to one ``unit_id``; a service principal (the board) may be bound to
a hospital or serve all; dispatcher, quality manager and administrator are regional.  :meth:`Claims.may_see_hospital`
and :meth:`Claims.may_see_unit` state those rules once for every service.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from limits import RateLimitItemPerSecond, storage, strategies
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker_config.topics import ID_PATTERN

__all__ = [
    "ACCESS_COOKIE",
    "AUDIENCE",
    "BOARD_ACCESS_COOKIE",
    "BOARD_REFRESH_COOKIE",
    "HOSPITAL_BOUND_ROLES",
    "ISSUER",
    "MAX_TOKEN_BYTES",
    "PERSON_ROLES",
    "REFRESH_COOKIE",
    "RevokedSessions",
    "SignInThrottle",
    "SUBJECT_PATTERN",
    "Claims",
    "Role",
    "SecurityMode",
    "TokenError",
    "TokenType",
    "generate_signing_key",
    "issue_token",
    "key_id",
    "load_signing_key",
    "load_verify_key",
    "signing_key_text",
    "verify_key_text",
    "expires_in_s",
    "verify_token",
]

ACCESS_COOKIE = "gh_access"
"""Cookie holding the access token for browsers (HttpOnly, SameSite=Strict, Path=/): EventSource cannot send headers."""
REFRESH_COOKIE = "gh_refresh"
"""Cookie holding the refresh token (HttpOnly, SameSite=Strict, Path=/api/auth: sent to nothing else)."""
BOARD_ACCESS_COOKIE = "gh_board_access"
BOARD_REFRESH_COOKIE = "gh_board_refresh"
"""The ED board's own cookie names.  Cookies are scoped by host, not port (RFC 6265 section 8.5): with dispatch and
the board on one host (the demo; a small hospital's server), shared names let a sign-in on one replace the other's
session (an ``ed`` sign-in on the board turned the dispatcher's console into ``ed``)."""
ISSUER = "goldenhour-dispatch"
AUDIENCE = "goldenhour"
MAX_TOKEN_BYTES = 4096
SUBJECT_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
"""Usernames and service names: opaque, loggable, never a patient's name."""

_HEADER_KEYS = {"alg", "typ", "kid"}


class SecurityMode(StrEnum):
    """``production`` (the default): secrets from the environment, no demo accounts, refuses unsafe settings.
    ``development``: the one-command demo; loopback only, may create demo accounts with random passwords."""

    PRODUCTION = "production"
    DEVELOPMENT = "development"


class Role(StrEnum):
    """What a principal may do.  Every role but ``service`` is a person; ``service`` is a machine (the board)."""

    DISPATCHER = "dispatcher"
    CREW = "crew"
    ED_STAFF = "ed_staff"
    DEPARTMENT_ONCALL = "department_oncall"
    QUALITY_MANAGER = "quality_manager"
    ADMINISTRATOR = "administrator"
    SERVICE = "service"


PERSON_ROLES = frozenset(r for r in Role if r is not Role.SERVICE)
HOSPITAL_BOUND_ROLES = frozenset({Role.ED_STAFF, Role.DEPARTMENT_ONCALL})
"""Roles that must carry a ``hospital_id`` and see only patients inbound to it."""


class TokenType(StrEnum):
    """The only token type so far: a short-lived access token (refresh tokens are opaque and never leave dispatch's
    database as anything but a SHA-256 digest)."""

    ACCESS = "access"


class TokenError(Exception):
    """A token that cannot be accepted.  ``reason`` is a short label, safe to log (never the token itself)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


OpaqueId = Annotated[str, Field(pattern=ID_PATTERN.pattern)]
Subject = Annotated[str, Field(pattern=SUBJECT_PATTERN.pattern)]


class Claims(BaseModel):
    """The claims of an access token.  ``sub`` is the username (or the service's name)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    iss: str
    aud: str
    sub: Subject
    role: Role
    hospital_id: OpaqueId | None = None
    unit_id: OpaqueId | None = None
    iat: int
    nbf: int
    exp: int
    jti: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")]
    typ: TokenType = TokenType.ACCESS
    sid: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")] | None = None
    """The sign-in session (refresh-token family) of a person's token; services have none."""

    @model_validator(mode="after")
    def _bindings(self) -> Self:
        if self.role in HOSPITAL_BOUND_ROLES and self.hospital_id is None:
            raise ValueError(f"role {self.role.value} must be bound to a hospital_id")
        if self.role is Role.CREW and self.unit_id is None:
            raise ValueError("role crew must be bound to a unit_id")
        if self.role is not Role.CREW and self.unit_id is not None:
            raise ValueError("only crew tokens carry a unit_id")
        if self.role in (Role.DISPATCHER, Role.QUALITY_MANAGER, Role.ADMINISTRATOR, Role.CREW) and self.hospital_id:
            raise ValueError(f"role {self.role.value} is not bound to a hospital")
        if not self.iat <= self.exp or not self.nbf <= self.exp:
            raise ValueError("token times out of order")
        return self

    @property
    def expires_at(self) -> datetime:
        """When the token expires (UTC)."""
        return datetime.fromtimestamp(self.exp, UTC)

    @property
    def is_person(self) -> bool:
        """Whether a person (not a service) holds this token: person reads of patient data are audited."""
        return self.role in PERSON_ROLES

    @property
    def hospital_scoped(self) -> bool:
        """Whether this principal sees one hospital's patients only."""
        return self.role in HOSPITAL_BOUND_ROLES or (self.role is Role.SERVICE and self.hospital_id is not None)

    def may_see_hospital(self, hospital_id: str | None) -> bool:
        """Whether this principal may see the patients inbound to ``hospital_id`` (crew: never a whole hospital)."""
        if self.role is Role.CREW:
            return False
        if self.hospital_scoped:
            return hospital_id is not None and hospital_id == self.hospital_id
        return True

    def may_see_unit(self, unit_id: str, hospital_ids: Iterable[str | None] = ()) -> bool:
        """Whether this principal may see a unit's patient, given the hospitals that patient is inbound to."""
        if self.role is Role.CREW:
            return unit_id == self.unit_id
        if self.hospital_scoped:
            return self.hospital_id in set(hospital_ids)
        return True


# --- keys ------------------------------------------------------------------------------------------------------------


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def generate_signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 signing key (development mode, tests and key generation)."""
    return Ed25519PrivateKey.generate()


def signing_key_text(key: Ed25519PrivateKey) -> str:
    """The key as base64url of its 32-byte seed (the ``EMS_DISPATCH_SIGNING_KEY`` format).  A secret."""
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return _b64e(raw)


def verify_key_text(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The public key as base64url of its 32 raw bytes (the ``EMS_BOARD_VERIFY_KEYS`` format).  Not a secret."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return _b64e(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def load_signing_key(text: str) -> Ed25519PrivateKey:
    """Parse a signing key: base64url of the 32-byte Ed25519 seed, or a PKCS#8 PEM.

    Raises:
        ValueError: empty, short, long or not an Ed25519 key (the message never contains the key).
    """
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError):
            raise ValueError("signing key PEM could not be read") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("signing key must be an Ed25519 key")
        return key
    try:
        raw = _b64d(text)
    except (ValueError, binascii.Error):
        raise ValueError("signing key must be base64url of a 32-byte Ed25519 seed or a PEM") from None
    if len(raw) != 32:
        raise ValueError(f"signing key must be 32 bytes (got {len(raw)})")
    if len(set(raw)) < 8:
        raise ValueError("signing key has too little variety to be random")
    return Ed25519PrivateKey.from_private_bytes(raw)


def load_verify_key(text: str) -> Ed25519PublicKey:
    """Parse a verification (public) key: base64url of its 32 raw bytes, or a SubjectPublicKeyInfo PEM.

    Raises:
        ValueError: not an Ed25519 public key.
    """
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except (ValueError, TypeError):
            raise ValueError("verify key PEM could not be read") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("verify key must be an Ed25519 key")
        return key
    try:
        raw = _b64d(text)
    except (ValueError, binascii.Error):
        raise ValueError("verify key must be base64url of 32 bytes or a PEM") from None
    if len(raw) != 32:
        raise ValueError(f"verify key must be 32 bytes (got {len(raw)})")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The ``kid`` of a key: 12 base64url characters of SHA-256 of the raw public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _b64e(hashlib.sha256(raw).digest())[:12]


# --- tokens ----------------------------------------------------------------------------------------------------------


def _json(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def issue_token(
    key: Ed25519PrivateKey,
    *,
    subject: str,
    role: Role,
    ttl_s: float,
    now: datetime,
    hospital_id: str | None = None,
    unit_id: str | None = None,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    session_id: str | None = None,
) -> tuple[str, Claims]:
    """Sign an access token valid for ``ttl_s`` seconds from ``now``.  Returns the token and its claims.

    ``session_id`` (claim ``sid``): the sign-in session, so that signing out revokes the token at once.

    Raises:
        ValueError: claims that break the binding rules (e.g. ED staff without a hospital) or ``ttl_s`` <= 0.
    """
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    issued = int(now.timestamp())
    try:
        claims = Claims(
            iss=issuer,
            aud=audience,
            sub=subject,
            role=role,
            hospital_id=hospital_id,
            unit_id=unit_id,
            iat=issued,
            nbf=issued,
            exp=issued + max(1, round(ttl_s)),
            jti=secrets.token_urlsafe(12),
            sid=session_id,
        )
    except ValidationError as exc:
        raise ValueError(f"invalid claims: {exc.errors()[0]['msg']}") from None
    header = {"alg": "EdDSA", "typ": "JWT", "kid": key_id(key)}
    signing_input = _b64e(_json(header)) + "." + _b64e(_json(claims.model_dump(mode="json", exclude_none=True)))
    signature = key.sign(signing_input.encode("ascii"))
    return signing_input + "." + _b64e(signature), claims


def verify_token(
    token: str,
    keys: Ed25519PublicKey | Sequence[Ed25519PublicKey],
    *,
    now: datetime | None = None,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    leeway_s: float = 30.0,
) -> Claims:
    """Check a token's form, algorithm, key id, signature, issuer, audience and times; return its claims.

    ``leeway_s`` tolerates that much clock difference between issuer and verifier (not more than a minute).

    Raises:
        TokenError: ``malformed``, ``bad_header``, ``unknown_key``, ``bad_signature``, ``bad_claims``,
            ``wrong_issuer``, ``wrong_audience``, ``not_yet_valid`` or ``expired``.
    """
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES or not token.isascii():
        raise TokenError("malformed")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("malformed")
    try:
        header = json.loads(_b64d(parts[0]))
        payload = json.loads(_b64d(parts[1]))
        signature = _b64d(parts[2])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise TokenError("malformed") from None
    if (
        not isinstance(header, dict)
        or set(header) != _HEADER_KEYS
        or header.get("alg") != "EdDSA"
        or header.get("typ") != "JWT"
    ):
        raise TokenError("bad_header")
    candidates = [keys] if isinstance(keys, Ed25519PublicKey) else list(keys)
    key = next((k for k in candidates if key_id(k) == header.get("kid")), None)
    if key is None:
        raise TokenError("unknown_key")
    try:
        key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"))
    except InvalidSignature:
        raise TokenError("bad_signature") from None
    try:
        claims = Claims.model_validate(payload)
    except ValidationError:
        raise TokenError("bad_claims") from None
    if claims.iss != issuer:
        raise TokenError("wrong_issuer")
    if claims.aud != audience:
        raise TokenError("wrong_audience")
    at = (now or datetime.now(UTC)).timestamp()
    leeway = min(max(leeway_s, 0.0), 60.0)
    if at + leeway < claims.nbf:
        raise TokenError("not_yet_valid")
    if at - leeway >= claims.exp:
        raise TokenError("expired")
    return claims


def expires_in_s(claims: Claims, now: datetime) -> float:
    """Seconds until ``claims`` expire, from ``now`` (negative once expired)."""
    return (claims.expires_at - now) / timedelta(seconds=1)


# --- revocation and sign-in throttling (framework-free; both services use them) --------------------------------------


class RevokedSessions:
    """Sign-in sessions ended before their access tokens expire (sign-out, refresh-token reuse), in memory.

    Each entry lives until the last access token of that session has expired (``until``), so the store stays small
    (bounded by ``max_entries``: beyond it the entries closest to expiry go first, logged).  It is per process: a
    restarted service forgets, and tokens revoked before the restart stay usable until they expire (15 min at most
    with the default lifetime).
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._until: dict[str, datetime] = {}

    def revoke(self, session_id: str, until: datetime) -> None:
        """Refuse tokens of ``session_id`` until ``until`` (UTC; the latest expiry of its access tokens)."""
        self._until[session_id] = max(until, self._until.get(session_id, until))
        if len(self._until) > self.max_entries:
            self.prune(min(self._until.values()) + timedelta(microseconds=1))

    def prune(self, now: datetime) -> None:
        """Forget entries whose tokens have all expired by ``now``."""
        for sid in [s for s, until in self._until.items() if until < now]:
            del self._until[sid]

    def is_revoked(self, claims: Claims, now: datetime) -> bool:
        """Whether ``claims`` belong to a revoked session (tokens without ``sid`` never are)."""
        if claims.sid is None:
            return False
        until = self._until.get(claims.sid)
        return until is not None and until >= now

    def active(self, now: datetime) -> dict[str, datetime]:
        """The sessions still refused at ``now``: session id -> until (UTC).  What dispatch tells the board, whose
        own store :meth:`merge` takes it in (a sign-out at dispatch must end the session on the board too)."""
        self.prune(now)
        return dict(self._until)

    def merge(self, revoked: Mapping[str, datetime]) -> None:
        """Add sessions revoked elsewhere (see :meth:`active`)."""
        for session_id, until in revoked.items():
            self.revoke(session_id, until)

    def __len__(self) -> int:
        return len(self._until)


class SignInThrottle:
    """Sign-in attempts allowed per client address, with the ``limits`` library (moving windows, in memory):

    * at most ``attempts`` per ``window_s`` seconds from one address, whatever the account (a flood is bounded, and
      so is the argon2id work it causes: ~50 ms a check);
    * at most ``failures_per_account`` failed sign-ins into one account from one address per ``failure_window_s``
      seconds (default 4 per 15 min: one less than the account lockout, 5 in a row).  So one address cannot lock an
      ED nurse out at full speed: its fifth guess is refused (429) before the password is checked, and the nurse,
      from her own workstation, is not affected.  Many addresses still can (the lockout remains the last line).

    OWASP Authentication Cheat Sheet ("Protect against automated attacks": throttling and lockout); the answer is
    HTTP 429 with ``Retry-After`` (RFC 6585 section 4).  Per process: instances behind a load balancer each count.

    Args:
        attempts, window_s: the per-address bound (> 0).
        failures_per_account, failure_window_s: the per-(address, account) failure bound (> 0).
    """

    def __init__(
        self, attempts: int = 10, window_s: int = 60, failures_per_account: int = 4, failure_window_s: int = 900
    ) -> None:
        if min(attempts, window_s, failures_per_account, failure_window_s) <= 0:
            raise ValueError("throttle limits must be positive")
        self._item = RateLimitItemPerSecond(attempts, window_s)
        self._fail_item = RateLimitItemPerSecond(failures_per_account, failure_window_s)
        self._limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
        self.refused = 0

    def _wait(self, item: RateLimitItemPerSecond, *ids: str) -> float:
        self.refused += 1
        reset_at = self._limiter.get_window_stats(item, *ids).reset_time
        return max(1.0, reset_at - time.time())

    def hit(self, client_addr: str | None, username: str = "") -> float | None:
        """Count one attempt from ``client_addr`` at ``username``; None if allowed, else the seconds to wait."""
        key, account = client_addr or "unknown", username[:64]
        if not self._limiter.test(self._fail_item, "failed", key, account):
            return self._wait(self._fail_item, "failed", key, account)
        if not self._limiter.hit(self._item, "sign-in", key):
            return self._wait(self._item, "sign-in", key)
        return None

    def failed(self, client_addr: str | None, username: str) -> None:
        """Record a failed sign-in (wrong password or code) from ``client_addr`` into ``username``."""
        self._limiter.hit(self._fail_item, "failed", client_addr or "unknown", username[:64])
