"""People and services who may use GoldenHour: sign-in, second factor, lockout, access and refresh tokens.

* Passwords are stored as argon2id hashes with OWASP's minimum parameters (Password Storage Cheat Sheet: m = 19 MiB,
  t = 2, p = 1; about 50 ms on one core, and dispatch must stay responsive on small servers); hashes made with
  other parameters are upgraded at the next sign-in.  An unknown username is checked against a dummy hash, so
  timing does not tell whether an account exists.
* Optional second factor: TOTP (RFC 6238, SHA-1, 6 digits, 30 s steps, one step of clock drift either way), with
  the last accepted step stored so a code cannot be replayed.
* Lockout: :data:`MAX_FAILURES` failed sign-ins in a row (wrong password or wrong code) lock the account for
  :data:`LOCKOUT_S` seconds (15 min); a successful sign-in resets the count.  Service accounts (the board) are
  exempt: their secrets are 256-bit random, and a lockout would be a way to blind an emergency department.
* Access tokens: :func:`broker_config.identity.issue_token`, short-lived (default 15 min).
* Refresh tokens: opaque (``ghr_`` + 256 random bits), stored as SHA-256 only, valid for a shift (default 12 h),
  rotated on every use.  Presenting an already-rotated token revokes the whole sign-in session, the refresh-token
  family and its access tokens (RFC 9700, OAuth 2.0 Security BCP, section 4.14.2: the server cannot tell the thief
  from the legitimate client, so both lose the session).  There is no grace period: pages that may refresh from
  several tabs must take turns (one refresh at a time per browser).  Services get no refresh token: they sign in
  again.
* Sign-out and reuse revoke at once: access tokens carry the session id (``sid``), and the session goes into the
  :class:`~broker_config.identity.RevokedSessions` store every request checks, until its last token expires.

Nothing here logs a password, a TOTP secret or code, or a token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol
from urllib.parse import quote

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker_config import utc_now
from broker_config.identity import (
    HOSPITAL_BOUND_ROLES,
    SUBJECT_PATTERN,
    Claims,
    RevokedSessions,
    Role,
    SecurityMode,
    issue_token,
)
from broker_config.topics import ID_PATTERN
from dispatch.audit import AuditDraft, AuditEntry
from dispatch.errors import (
    AccountExistsError,
    AccountLockedError,
    AuthError,
    InvalidCredentialsError,
    InvalidRefreshTokenError,
    SecondFactorRequiredError,
    UnknownAccountError,
)

__all__ = [
    "LOCKOUT_S",
    "MAX_FAILURES",
    "AccountRecord",
    "AccountService",
    "AccountStore",
    "DemoAccount",
    "RefreshRecord",
    "Session",
    "create_demo_accounts",
    "new_totp_secret",
    "totp_code",
    "totp_uri",
    "verify_totp",
]

logger = logging.getLogger(__name__)

MAX_FAILURES = 5
LOCKOUT_S = 15 * 60.0
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 256
TOTP_STEP_S = 30
TOTP_DIGITS = 6


# --- TOTP (RFC 6238 over RFC 4226 HOTP) -------------------------------------------------------------------------------


def new_totp_secret() -> str:
    """A fresh 160-bit TOTP secret, base32 without padding (what authenticator apps expect)."""
    return base64.b32encode(secrets.token_bytes(20)).decode("ascii").rstrip("=")


def _hotp(secret_b32: str, counter: int) -> str:
    key = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8), casefold=True)
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**TOTP_DIGITS).zfill(TOTP_DIGITS)


def totp_code(secret_b32: str, at: datetime) -> str:
    """The TOTP code of ``secret_b32`` at time ``at`` (authenticator apps and tests)."""
    return _hotp(secret_b32, int(at.timestamp()) // TOTP_STEP_S)


def verify_totp(secret_b32: str, code: str, at: datetime, *, last_step: int = -1, drift_steps: int = 1) -> int | None:
    """The time step ``code`` matches within ``drift_steps`` of ``at`` and after ``last_step``, or None."""
    if not (len(code) == TOTP_DIGITS and code.isdigit()):
        return None
    now_step = int(at.timestamp()) // TOTP_STEP_S
    for step in range(now_step - drift_steps, now_step + drift_steps + 1):
        if step > last_step and hmac.compare_digest(_hotp(secret_b32, step), code):
            return step
    return None


def totp_uri(secret_b32: str, username: str, issuer: str = "GoldenHour") -> str:
    """``otpauth://`` URI for enrolment in an authenticator app (show once, as a QR code or text)."""
    return f"otpauth://totp/{quote(issuer)}:{quote(username)}?secret={secret_b32}&issuer={quote(issuer)}"


# --- records and the store they live in -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """One account.  ``password_hash`` is argon2id; ``totp_secret`` base32 (None = no second factor)."""

    username: str
    role: Role
    password_hash: str
    created_at: datetime
    hospital_id: str | None = None
    unit_id: str | None = None
    totp_secret: str | None = None
    totp_last_step: int = -1
    failed_logins: int = 0
    locked_until: datetime | None = None
    disabled: bool = False
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RefreshRecord:
    """A refresh token, by the SHA-256 (hex) of its value; ``family`` is the sign-in session it belongs to."""

    token_hash: str
    username: str
    family: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None


class AccountStore(Protocol):
    """What :class:`AccountService` and the audit trail need from dispatch's repository."""

    async def get_account(self, username: str) -> AccountRecord | None: ...
    async def save_account(self, record: AccountRecord) -> None: ...
    async def list_accounts(self) -> list[AccountRecord]: ...
    async def save_refresh(self, record: RefreshRecord) -> None: ...
    async def get_refresh(self, token_hash: str) -> RefreshRecord | None: ...
    async def revoke_refresh_family(self, family: str, at: datetime) -> None: ...
    async def append_audit(self, draft: AuditDraft) -> AuditEntry: ...
    async def audit_entries(
        self,
        *,
        after_seq: int = 0,
        limit: int | None = None,
        unit_id: str | None = None,
        alert_id: str | None = None,
        incident_id: str | None = None,
        actor: str | None = None,
    ) -> list[AuditEntry]: ...


@dataclass(frozen=True, slots=True)
class Session:
    """The result of a sign-in or refresh: an access token, its claims, and (people only) a refresh token."""

    access_token: str
    claims: Claims
    refresh_token: str | None
    refresh_expires_at: datetime | None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class AccountService:
    """Sign-in, refresh, sign-out and account management on an :class:`AccountStore`.

    Args:
        store: the repository (accounts, refresh tokens).
        signing_key: dispatch's Ed25519 key.
        access_ttl_s: access-token lifetime (default 15 min).
        refresh_ttl_s: refresh-token lifetime (default 12 h, one shift).
        mode: :class:`SecurityMode`; demo accounts only in development.
        clock: UTC clock (tests pin it).
        revoked: the revoked-session store the service's requests check (sign-out and reuse add to it).
    """

    def __init__(
        self,
        store: AccountStore,
        signing_key: Ed25519PrivateKey,
        *,
        access_ttl_s: float = 900.0,
        refresh_ttl_s: float = 12 * 3600.0,
        mode: SecurityMode = SecurityMode.PRODUCTION,
        clock: Callable[[], datetime] = utc_now,
        hasher: PasswordHasher | None = None,
        revoked: RevokedSessions | None = None,
    ) -> None:
        if access_ttl_s <= 0 or refresh_ttl_s <= access_ttl_s:
            raise ValueError("access_ttl_s must be positive and shorter than refresh_ttl_s")
        self.store = store
        self.mode = mode
        self.clock = clock
        self.access_ttl_s = access_ttl_s
        self.refresh_ttl_s = refresh_ttl_s
        self._key = signing_key
        self.revoked = revoked if revoked is not None else RevokedSessions()
        self._hasher = hasher or PasswordHasher(time_cost=2, memory_cost=19_456, parallelism=1)
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    @property
    def verify_key(self) -> Ed25519PublicKey:
        """The public key verifiers need (the board's ``EMS_BOARD_VERIFY_KEYS``)."""
        return self._key.public_key()

    # --- sign-in ---------------------------------------------------------------------------------------------------

    async def login(self, username: str, password: str, totp: str | None = None) -> Session:
        """Check password (and TOTP when enrolled), count failures, lock after :data:`MAX_FAILURES`.

        Raises:
            InvalidCredentialsError: unknown user, wrong password or code, disabled account.
            AccountLockedError: locked (a failure while locked does not extend the lock).
            SecondFactorRequiredError: password right, TOTP enrolled, no code given.
        """
        now = self.clock()
        record = await self.store.get_account(username) if SUBJECT_PATTERN.fullmatch(username) else None
        if record is None:
            self._check_password(self._dummy_hash, password)  # same work as for a real account
            raise InvalidCredentialsError("invalid username or password")
        if record.locked_until is not None and record.locked_until > now:
            raise AccountLockedError(record.locked_until)
        service = record.role is Role.SERVICE
        if not self._check_password(record.password_hash, password) or record.disabled:
            await self._failed(record, now, service)
            raise InvalidCredentialsError("invalid username or password")
        step: int | None = None
        if record.totp_secret is not None and not service:
            if not totp:
                raise SecondFactorRequiredError("a one-time code from the authenticator app is required")
            step = verify_totp(record.totp_secret, totp, now, last_step=record.totp_last_step)
            if step is None:
                await self._failed(record, now, service)
                raise InvalidCredentialsError("invalid one-time code")
        if self._hasher.check_needs_rehash(record.password_hash):
            record = replace(record, password_hash=self._hasher.hash(password))
        record = replace(
            record,
            failed_logins=0,
            locked_until=None,
            totp_last_step=step if step is not None else record.totp_last_step,
            updated_at=now,
        )
        await self.store.save_account(record)
        logger.info("sign-in user=%s role=%s", record.username, record.role.value)
        family = None if service else secrets.token_urlsafe(12)
        return await self._session(record, now, family)

    def _check_password(self, password_hash: str, password: str) -> bool:
        if not password or len(password) > MAX_PASSWORD_CHARS:
            return False
        try:
            return self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    async def _failed(self, record: AccountRecord, now: datetime, service: bool) -> None:
        failures = record.failed_logins + 1
        locked_until = None
        if failures >= MAX_FAILURES and not service:
            locked_until = now + timedelta(seconds=LOCKOUT_S)
            failures = 0
            logger.warning("account locked user=%s until=%s", record.username, locked_until.isoformat())
        await self.store.save_account(
            replace(record, failed_logins=failures, locked_until=locked_until, updated_at=now)
        )

    async def _session(self, record: AccountRecord, now: datetime, family: str | None) -> Session:
        token, claims = issue_token(
            self._key,
            subject=record.username,
            role=record.role,
            ttl_s=self.access_ttl_s,
            now=now,
            hospital_id=record.hospital_id,
            unit_id=record.unit_id,
            session_id=family,
        )
        if family is None:
            return Session(token, claims, None, None)
        refresh = "ghr_" + secrets.token_urlsafe(32)
        expires = now + timedelta(seconds=self.refresh_ttl_s)
        await self.store.save_refresh(RefreshRecord(_digest(refresh), record.username, family, now, expires))
        return Session(token, claims, refresh, expires)

    async def refresh(self, refresh_token: str) -> Session:
        """Exchange a refresh token for a new access token and a new refresh token (rotation).

        Raises:
            InvalidRefreshTokenError: unknown, expired, revoked, reused (revokes the session) or a disabled account.
        """
        now = self.clock()
        if not refresh_token.startswith("ghr_") or len(refresh_token) > 128:
            raise InvalidRefreshTokenError("invalid refresh token")
        stored = await self.store.get_refresh(_digest(refresh_token))
        if stored is None or stored.expires_at <= now:
            raise InvalidRefreshTokenError("invalid refresh token")
        if stored.revoked_at is not None:
            await self._end_session(stored.family, now)
            logger.warning("refresh token reused; session revoked user=%s", stored.username)
            raise InvalidRefreshTokenError("invalid refresh token")
        record = await self.store.get_account(stored.username)
        if record is None or record.disabled:
            raise InvalidRefreshTokenError("invalid refresh token")
        await self.store.save_refresh(replace(stored, revoked_at=now))
        return await self._session(record, now, stored.family)

    async def logout(self, refresh_token: str, session_id: str | None = None) -> None:
        """Revoke the sign-in session of ``refresh_token`` and/or of an access token's ``session_id``: its refresh
        tokens and, at once, its access tokens (unknown tokens are ignored)."""
        now = self.clock()
        stored = await self.store.get_refresh(_digest(refresh_token)) if refresh_token.startswith("ghr_") else None
        families = {stored.family} if stored is not None else set()
        if session_id is not None:
            families.add(session_id)
        for family in families:
            await self._end_session(family, now)

    async def _end_session(self, family: str, now: datetime) -> None:
        """Revoke a refresh-token family and refuse its access tokens until the last one would have expired."""
        await self.store.revoke_refresh_family(family, now)
        self.revoked.revoke(family, now + timedelta(seconds=self.access_ttl_s + 60))

    # --- administration ------------------------------------------------------------------------------------------

    async def create_account(
        self,
        username: str,
        role: Role,
        password: str,
        *,
        hospital_id: str | None = None,
        unit_id: str | None = None,
        totp: bool = False,
    ) -> tuple[AccountRecord, str | None]:
        """Create an account; returns it and, with ``totp``, the TOTP secret (show it once).

        Raises:
            AuthError: bad username, weak password, binding that does not fit the role.
            AccountExistsError: the username is taken.
        """
        _check_binding(username, role, hospital_id, unit_id)
        _check_password_policy(password, role)
        if await self.store.get_account(username) is not None:
            raise AccountExistsError(f"account {username} exists")
        now = self.clock()
        secret = new_totp_secret() if totp and role is not Role.SERVICE else None
        record = AccountRecord(
            username=username,
            role=role,
            password_hash=self._hasher.hash(password),
            created_at=now,
            hospital_id=hospital_id,
            unit_id=unit_id,
            totp_secret=secret,
            updated_at=now,
        )
        await self.store.save_account(record)
        logger.info("account created user=%s role=%s", username, role.value)
        return record, secret

    async def update_account(
        self,
        username: str,
        *,
        disabled: bool | None = None,
        password: str | None = None,
        unlock: bool = False,
        reset_totp: bool | None = None,
    ) -> tuple[AccountRecord, str | None]:
        """Disable/enable, set a new password, unlock, or (re)enrol/remove TOTP.  Returns the record and a new TOTP
        secret when one was enrolled.

        Raises:
            UnknownAccountError: no such account.  AuthError: weak password.
        """
        record = await self.store.get_account(username)
        if record is None:
            raise UnknownAccountError(f"no account {username}")
        now = self.clock()
        secret: str | None = None
        if password is not None:
            _check_password_policy(password, record.role)
            record = replace(record, password_hash=self._hasher.hash(password))
        if disabled is not None:
            record = replace(record, disabled=disabled)
        if unlock:
            record = replace(record, failed_logins=0, locked_until=None)
        if reset_totp is not None:
            secret = new_totp_secret() if reset_totp and record.role is not Role.SERVICE else None
            record = replace(record, totp_secret=secret, totp_last_step=-1)
        record = replace(record, updated_at=now)
        await self.store.save_account(record)
        return record, secret


def _check_binding(username: str, role: Role, hospital_id: str | None, unit_id: str | None) -> None:
    if not SUBJECT_PATTERN.fullmatch(username):
        raise AuthError("username must match [A-Za-z0-9_.@-]{1,64}")
    for value in (hospital_id, unit_id):
        if value is not None and not ID_PATTERN.fullmatch(value):
            raise AuthError("hospital_id and unit_id are opaque ids [A-Za-z0-9_-]{1,32}")
    if role in HOSPITAL_BOUND_ROLES and hospital_id is None:
        raise AuthError(f"role {role.value} needs a hospital_id")
    if role is Role.CREW and unit_id is None:
        raise AuthError("role crew needs a unit_id")
    if role is not Role.CREW and unit_id is not None:
        raise AuthError("only crew accounts have a unit_id")
    if role not in HOSPITAL_BOUND_ROLES and role is not Role.SERVICE and hospital_id is not None:
        raise AuthError(f"role {role.value} is not bound to a hospital")


def _check_password_policy(password: str, role: Role) -> None:
    minimum = 32 if role is Role.SERVICE else MIN_PASSWORD_CHARS
    if not minimum <= len(password) <= MAX_PASSWORD_CHARS:
        raise AuthError(f"password must be {minimum}-{MAX_PASSWORD_CHARS} characters")
    if len(set(password)) < 6:
        raise AuthError("password has too few distinct characters")


# --- development mode ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoAccount:
    """A demo account with its random password, printed once at demo start-up (development mode only)."""

    username: str
    password: str
    role: Role
    hospital_id: str | None = None
    unit_id: str | None = None


async def create_demo_accounts(
    accounts: AccountService,
    *,
    hospital_id: str,
    unit_id: str,
    board_service: tuple[str, str] | None = None,
) -> list[DemoAccount]:
    """One account per role with a fresh random password (no second factor), plus the board's service account
    ``board_service = (name, secret)`` if given.  Accounts that exist already are left alone (not returned).

    Raises:
        AuthError: not in development mode (production never gets default or demo accounts).
    """
    if accounts.mode is not SecurityMode.DEVELOPMENT:
        raise AuthError("demo accounts exist only in development mode")
    plans = [
        ("dispatcher", Role.DISPATCHER, None, None),
        ("ed", Role.ED_STAFF, hospital_id, None),
        ("oncall", Role.DEPARTMENT_ONCALL, hospital_id, None),
        ("crew", Role.CREW, None, unit_id),
        ("quality", Role.QUALITY_MANAGER, None, None),
        ("admin", Role.ADMINISTRATOR, None, None),
    ]
    created: list[DemoAccount] = []
    for username, role, hospital, unit in plans:
        if await accounts.store.get_account(username) is not None:
            continue
        password = secrets.token_urlsafe(12)
        await accounts.create_account(username, role, password, hospital_id=hospital, unit_id=unit)
        created.append(DemoAccount(username, password, role, hospital, unit))
    if board_service is not None and await accounts.store.get_account(board_service[0]) is None:
        await accounts.create_account(board_service[0], Role.SERVICE, board_service[1])
    return created
