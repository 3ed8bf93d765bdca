"""Persistent dispatch state on SQLite or PostgreSQL, behind the :class:`dispatch.repository.Repository` interface.

URL convention (as the telemetry store): ``sqlite:///relative/file.sqlite3``, ``sqlite:////absolute/file.sqlite3``
or ``postgresql://user@host:port/db``.

Design: a write-through cache.  :meth:`SqlRepository.open` applies the numbered migrations of
``dispatch/migrations/{postgres,sqlite}/NNNN_name.sql`` (each once, in its own transaction, recorded in
``dispatch_schema_migrations``), then loads units, the newest ``max_alerts`` alerts with their timelines,
incidents with their case timelines and the latest status of each hospital into memory.  Reads are served from
memory; every ``save_*`` upserts the record and appends the timeline events not yet stored, in one transaction.
Hospital status changes are appended (who, when, until), never overwritten.

All database work runs on one dedicated thread that owns the connection, so the event loop never blocks on I/O.
PostgreSQL sessions start with ``TimeZone=UTC`` (FF-12); identifiers are composed with :mod:`psycopg.sql`.
Errors are mapped by exception class, never by message text, to :class:`dispatch.errors.StoreError`; after a
connection error the connection is reopened on the next call.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb
from pydantic import TypeAdapter

from broker_config.identity import Role
from dispatch.accounts import AccountRecord, RefreshRecord
from dispatch.audit import GENESIS_HASH, AuditDraft, AuditEntry, seal
from dispatch.errors import StoreError
from dispatch.hospitals import HospitalStatus
from dispatch.repository import (
    AlertRecord,
    EventKind,
    EventSource,
    IncidentRecord,
    InMemoryRepository,
    TimelineEvent,
    UnitRecord,
)
from dispatch.timeline import CaseEvent, TimePoint, TimeSource

__all__ = ["MIGRATIONS_TABLE", "Migration", "SqlRepository", "load_migrations", "open_repository"]

logger = logging.getLogger(__name__)

Dialect = Literal["postgres", "sqlite"]
T = TypeVar("T")

MIGRATIONS_TABLE = "dispatch_schema_migrations"
_MIGRATION_LOCK_ID = 0x67686470  # "ghdp": concurrent dispatch instances migrate one at a time
_AUDIT_LOCK_ID = 0x67686175  # "ghau": audit appends are serialised across dispatch instances (one chain)
_SELECT_ACCOUNT = (
    "SELECT username, role, hospital_id, unit_id, password_hash, totp_secret, totp_last_step, failed_logins, "
    "locked_until, disabled, created_at, updated_at FROM {}"
)
_INSERT_ACCOUNT = (
    "INSERT INTO {} (username, role, hospital_id, unit_id, password_hash, totp_secret, totp_last_step, "
    "failed_logins, locked_until, disabled, created_at, updated_at) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (username) DO UPDATE SET role = excluded.role, hospital_id = excluded.hospital_id, "
    "unit_id = excluded.unit_id, password_hash = excluded.password_hash, "
    "totp_secret = excluded.totp_secret, totp_last_step = excluded.totp_last_step, "
    "failed_logins = excluded.failed_logins, locked_until = excluded.locked_until, "
    "disabled = excluded.disabled, updated_at = excluded.updated_at"
)
_SELECT_REFRESH = (
    "SELECT token_hash, username, family, created_at, expires_at, revoked_at FROM {} WHERE token_hash = %s"
)
_INSERT_REFRESH = (
    "INSERT INTO {} (token_hash, username, family, created_at, expires_at, revoked_at) VALUES (%s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (token_hash) DO UPDATE SET revoked_at = excluded.revoked_at"
)
_INSERT_AUDIT = (
    "INSERT INTO {} (seq, at, actor, role, actor_hospital_id, action, object_type, object_id, unit_id, alert_id, "
    "incident_id, hospital_id, client_addr, outcome, reported_by, detail, prev_hash, hash) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_SELECT_AUDIT = (
    "SELECT seq, at, actor, role, actor_hospital_id, action, object_type, object_id, unit_id, alert_id, "
    "incident_id, hospital_id, client_addr, outcome, reported_by, detail, prev_hash, hash FROM {} "
    "WHERE seq > %s AND (CAST(%s AS text) IS NULL OR unit_id = %s) AND (CAST(%s AS text) IS NULL OR alert_id = %s) "
    "AND (CAST(%s AS text) IS NULL OR incident_id = %s) AND (CAST(%s AS text) IS NULL OR actor = %s) "
    "ORDER BY seq LIMIT %s"
)
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_UNIT = TypeAdapter(UnitRecord)
_ALERT = TypeAdapter(AlertRecord)
_INCIDENT = TypeAdapter(IncidentRecord)
_ALERT_EXCLUDE = {"timeline", "saved_events"}
_INCIDENT_EXCLUDE = {"events", "saved_events"}


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: number, name, SQL text."""

    version: int
    name: str
    sql: str


def load_migrations(dialect: Dialect) -> list[Migration]:
    """The shipped migrations of ``dialect`` in version order.  Raises StoreError on a misnamed or duplicate file."""
    folder = resources.files("dispatch").joinpath("migrations", dialect)
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _NAME.fullmatch(entry.name)
        if match is None:
            raise StoreError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise StoreError(f"two {dialect} migrations numbered {version:04d}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def _statements(text: str) -> list[str]:
    """Split a migration into statements (our files have no ``;`` inside literals); drop ``--`` comments."""
    lines = [line for line in text.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _utc_conninfo(url: str) -> str:
    params: dict[str, Any] = conninfo_to_dict(url)
    params["options"] = f"{params.get('options') or ''} -c TimeZone=UTC".strip()
    params.setdefault("application_name", "goldenhour-dispatch")
    params.setdefault("connect_timeout", 5)
    return make_conninfo("", **params)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _dt(value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(slots=True)
class _Loaded:
    units: list[UnitRecord]
    alerts: list[AlertRecord]
    incidents: list[IncidentRecord]
    statuses: dict[str, HospitalStatus]


class SqlRepository(InMemoryRepository):
    """The dispatch repository on SQLite or PostgreSQL (see the module docstring).  Build with
    :func:`open_repository` or :meth:`from_url`; call :meth:`open` before use and :meth:`close` at the end.

    Raises:
        StoreError: from :meth:`open` and every ``save_*`` when the database cannot be reached or refuses.
    """

    def __init__(self, dialect: Dialect, target: str, *, max_alerts: int = 10_000) -> None:
        super().__init__(max_alerts=max_alerts)
        self.dialect: Dialect = dialect
        self._target = target
        self._conn: Any = None
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_url(cls, url: str, *, max_alerts: int = 10_000) -> SqlRepository:
        """``sqlite:///path`` or ``postgresql://...``.  Raises ValueError for any other scheme or no path."""
        scheme = urlsplit(url).scheme
        if scheme == "sqlite":
            path = unquote(urlsplit(url).path)
            if not path or path == "/":
                raise ValueError("sqlite URL needs a file path: sqlite:///path/to/file.sqlite3")
            # SQLAlchemy's convention: sqlite:///data/x.sqlite3 is relative, sqlite:////abs/x.sqlite3 absolute.
            return cls("sqlite", path[1:], max_alerts=max_alerts)
        if scheme in ("postgresql", "postgres"):
            return cls("postgres", url, max_alerts=max_alerts)
        raise ValueError("database_url must be sqlite:///path or postgresql://...")

    # --- thread plumbing ----------------------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        if self._executor is None:
            raise StoreError("repository is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._guarded, fn, *args))

    def _guarded(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return fn(self._connection(), *args)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._drop()
            raise StoreError("database unavailable", f"psycopg.{type(exc).__name__}") from exc
        except psycopg.Error as exc:
            raise StoreError("database refused the write", f"psycopg.{type(exc).__name__}") from exc
        except sqlite3.Error as exc:
            raise StoreError("database error", f"sqlite3.{type(exc).__name__}") from exc

    def _connection(self) -> Any:
        if self._conn is None:
            if self.dialect == "postgres":
                self._conn = psycopg.connect(_utc_conninfo(self._target), autocommit=True)
            else:
                if self._target != ":memory:":
                    Path(self._target).parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self._target, timeout=5.0, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA foreign_keys=ON")
                self._conn = conn
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except (psycopg.Error, sqlite3.Error):
                logger.debug("closing a broken connection failed", exc_info=True)

    def _q(self, template: str, *tables: str) -> Any:
        """A statement with ``{}`` table placeholders and ``%s`` parameters, in this dialect."""
        if self.dialect == "postgres":
            return sql.SQL(template).format(*(sql.Identifier(t) for t in tables))
        return template.replace("%s", "?").format(*(f'"{t}"' for t in tables))

    def _ts(self, value: datetime | None) -> object:
        return value if self.dialect == "postgres" else _iso(value)

    def _doc(self, value: object) -> object:
        return Jsonb(value) if self.dialect == "postgres" else json.dumps(value)

    def _transaction(self, conn: Any, work: Callable[[Callable[..., Any]], T]) -> T:
        """Run ``work(execute)`` in one transaction; ``execute(stmt, params)`` returns the cursor."""
        if self.dialect == "postgres":
            with conn.transaction():
                return work(lambda stmt, params=(): conn.execute(stmt, params))
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(lambda stmt, params=(): conn.execute(stmt, params))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    # --- lifecycle ------------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Migrate the schema and load the state into memory (idempotent migrations)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dispatch-db")
        applied = await self._call(self._migrate)
        if applied:
            logger.info("dispatch migrations applied versions=%s", applied)
        loaded = await self._call(self._load)
        self._units = {u.unit_id: u for u in loaded.units}
        self._alerts.clear()
        for alert in loaded.alerts:
            self._alerts[alert.alert_id] = alert
        self._incidents = {i.incident_id: i for i in loaded.incidents}
        self._hospital_status = loaded.statuses
        logger.info(
            "dispatch state loaded units=%d alerts=%d incidents=%d",
            len(self._units),
            len(self._alerts),
            len(self._incidents),
        )

    async def close(self) -> None:
        """Close the connection and the database thread (idempotent)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, self._drop)
            executor.shutdown(wait=False)

    def applied_migrations(self) -> list[int]:
        """Versions recorded in ``dispatch_schema_migrations`` (synchronous helper for tests and tools)."""
        return [int(r[0]) for r in self._connection().execute(self._q("SELECT version FROM {}", MIGRATIONS_TABLE))]

    def _migrate(self, conn: Any) -> list[int]:
        ts_type = "timestamptz" if self.dialect == "postgres" else "TEXT"
        conn.execute(
            self._q(
                "CREATE TABLE IF NOT EXISTS {} (version integer PRIMARY KEY, name text NOT NULL, "
                f"applied_at {ts_type} NOT NULL)",
                MIGRATIONS_TABLE,
            )
        )
        migrations = load_migrations(self.dialect)
        known = {m.version for m in migrations}

        def work(execute: Callable[..., Any]) -> list[int]:
            if self.dialect == "postgres":
                execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_ID,))
            done = {int(r[0]) for r in execute(self._q("SELECT version FROM {}", MIGRATIONS_TABLE)).fetchall()}
            if done - known:
                raise StoreError(f"database has unknown migrations {sorted(done - known)}: code older than schema")
            applied: list[int] = []
            for m in migrations:
                if m.version in done:
                    continue
                for statement in _statements(m.sql):
                    execute(statement)
                execute(
                    self._q("INSERT INTO {} (version, name, applied_at) VALUES (%s, %s, %s)", MIGRATIONS_TABLE),
                    (m.version, m.name, self._ts(datetime.now(UTC))),
                )
                applied.append(m.version)
            return applied

        return self._transaction(conn, work)

    def _load(self, conn: Any) -> _Loaded:
        units = [
            _UNIT.validate_python(_json(r[0])) for r in conn.execute(self._q("SELECT doc FROM {}", "dispatch_units"))
        ]
        rows = conn.execute(
            self._q("SELECT alert_id, doc FROM {} ORDER BY created_at DESC, alert_id LIMIT %s", "dispatch_alerts"),
            (self.max_alerts,),
        ).fetchall()
        events: dict[str, list[TimelineEvent]] = {}
        for alert_id, at, source, kind, detail, historical in conn.execute(
            self._q(
                "SELECT alert_id, at, source, kind, detail, historical FROM {} ORDER BY alert_id, event_no",
                "dispatch_alert_events",
            )
        ):
            events.setdefault(alert_id, []).append(
                TimelineEvent(_dt(at), EventSource(source), EventKind(kind), detail, bool(historical))  # type: ignore[arg-type]
            )
        alerts: list[AlertRecord] = []
        for alert_id, doc in reversed(rows):
            record = _ALERT.validate_python({**_json(doc), "timeline": []})
            record.timeline = events.get(alert_id, [])
            record.saved_events = len(record.timeline)
            alerts.append(record)
        case_events: dict[str, list[CaseEvent]] = {}
        for incident_id, point, at, source, recorded_at, detail, offset, flags in conn.execute(
            self._q(
                "SELECT incident_id, point, at, source, recorded_at, detail, clock_offset_s, flags FROM {} "
                "ORDER BY incident_id, event_no",
                "dispatch_case_events",
            )
        ):
            case_events.setdefault(incident_id, []).append(
                CaseEvent(
                    TimePoint(point),
                    _dt(at),  # type: ignore[arg-type]
                    TimeSource(source),
                    _dt(recorded_at),  # type: ignore[arg-type]
                    detail,
                    offset,
                    tuple(_json(flags)),
                )
            )
        incidents: list[IncidentRecord] = []
        for incident_id, doc in conn.execute(self._q("SELECT incident_id, doc FROM {}", "dispatch_incidents")):
            incident = _INCIDENT.validate_python({**_json(doc), "events": []})
            incident.events = case_events.get(incident_id, [])
            incident.saved_events = len(incident.events)
            incidents.append(incident)
        statuses: dict[str, HospitalStatus] = {}
        for hospital_id, set_by, set_at, until, diversion, busy, beds in conn.execute(
            self._q(
                "SELECT hospital_id, set_by, set_at, until, diversion, cath_lab_busy, ed_beds_free FROM {} "
                "ORDER BY change_id",
                "dispatch_hospital_status",
            )
        ):
            statuses[hospital_id] = HospitalStatus(bool(diversion), bool(busy), beds, set_by, _dt(set_at), _dt(until))
        return _Loaded(units, alerts, incidents, statuses)

    # --- writes -----------------------------------------------------------------------------------------------------

    async def save_unit(self, record: UnitRecord) -> None:
        """Upsert the unit."""
        doc = _UNIT.dump_python(record, mode="json")
        await self._call(self._save_unit, record.unit_id, doc)

    def _save_unit(self, conn: Any, unit_id: str, doc: dict[str, Any]) -> None:
        conn.execute(
            self._q(
                "INSERT INTO {} (unit_id, doc, updated_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (unit_id) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at",
                "dispatch_units",
            ),
            (unit_id, self._doc(doc), self._ts(datetime.now(UTC))),
        )

    async def save_alert(self, record: AlertRecord) -> None:
        """Upsert the alert and append its timeline events not yet stored, in one transaction."""
        doc = _ALERT.dump_python(record, mode="json", exclude=_ALERT_EXCLUDE)
        start = record.saved_events
        new = list(enumerate(record.timeline[start:], start=start))
        await self._call(self._save_alert, record, doc, new)
        record.saved_events = start + len(new)

    def _save_alert(
        self, conn: Any, r: AlertRecord, doc: dict[str, Any], new: Sequence[tuple[int, TimelineEvent]]
    ) -> None:
        def work(execute: Callable[..., Any]) -> None:
            execute(
                self._q(
                    "INSERT INTO {} (alert_id, unit_id, incident_id, hospital_id, case_type, priority, state, "
                    "created_at, doc, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (alert_id) DO UPDATE SET incident_id = excluded.incident_id, "
                    "state = excluded.state, doc = excluded.doc, updated_at = excluded.updated_at",
                    "dispatch_alerts",
                ),
                (
                    r.alert_id,
                    r.unit_id,
                    r.incident_id,
                    r.hospital_id,
                    r.case_type.value,
                    r.priority.value,
                    r.state.value,
                    self._ts(r.created_at),
                    self._doc(doc),
                    self._ts(datetime.now(UTC)),
                ),
            )
            for no, e in new:
                execute(
                    self._q(
                        "INSERT INTO {} (alert_id, event_no, at, source, kind, detail, historical) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        "dispatch_alert_events",
                    ),
                    (r.alert_id, no, self._ts(e.at), e.source.value, e.kind.value, e.detail, e.historical),
                )

        self._transaction(conn, work)

    async def save_incident(self, record: IncidentRecord) -> None:
        """Upsert the incident and append its case events not yet stored, in one transaction."""
        doc = _INCIDENT.dump_python(record, mode="json", exclude=_INCIDENT_EXCLUDE)
        start = record.saved_events
        new = list(enumerate(record.events[start:], start=start))
        await self._call(self._save_incident, record, doc, new)
        record.saved_events = start + len(new)

    def _save_incident(
        self, conn: Any, r: IncidentRecord, doc: dict[str, Any], new: Sequence[tuple[int, CaseEvent]]
    ) -> None:
        def work(execute: Callable[..., Any]) -> None:
            execute(
                self._q(
                    "INSERT INTO {} (incident_id, state, priority, case_type, unit_id, lat_deg, lon_deg, created_at, "
                    "doc, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (incident_id) DO UPDATE SET state = excluded.state, case_type = excluded.case_type, "
                    "unit_id = excluded.unit_id, doc = excluded.doc, updated_at = excluded.updated_at",
                    "dispatch_incidents",
                ),
                (
                    r.incident_id,
                    r.state.value,
                    r.priority.value,
                    r.case_type.value if r.case_type else None,
                    r.unit_id,
                    r.lat_deg,
                    r.lon_deg,
                    self._ts(r.created_at),
                    self._doc(doc),
                    self._ts(datetime.now(UTC)),
                ),
            )
            for no, e in new:
                execute(
                    self._q(
                        "INSERT INTO {} (incident_id, event_no, point, at, source, recorded_at, detail, "
                        "clock_offset_s, flags) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        "dispatch_case_events",
                    ),
                    (
                        r.incident_id,
                        no,
                        e.point.value,
                        self._ts(e.at),
                        e.source.value,
                        self._ts(e.recorded_at),
                        e.detail,
                        e.clock_offset_s,
                        self._doc(list(e.flags)),
                    ),
                )

        self._transaction(conn, work)

    async def save_hospital_status(self, hospital_id: str, status: HospitalStatus) -> None:
        """Append a status change (who, when, until) and keep it as the hospital's latest."""
        await self._call(self._save_status, hospital_id, status)
        await super().save_hospital_status(hospital_id, status)

    def _save_status(self, conn: Any, hospital_id: str, s: HospitalStatus) -> None:
        conn.execute(
            self._q(
                "INSERT INTO {} (hospital_id, set_by, set_at, until, diversion, cath_lab_busy, ed_beds_free) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                "dispatch_hospital_status",
            ),
            (
                hospital_id,
                s.set_by,
                self._ts(s.set_at),
                self._ts(s.until),
                s.diversion,
                s.cath_lab_busy,
                s.ed_beds_free,
            ),
        )

    # --- accounts, refresh tokens, audit: read from and written to the database (never cached: several dispatch
    # instances must agree on lockout counters, revoked tokens and the one audit chain) --------------------------

    async def get_account(self, username: str) -> AccountRecord | None:
        """The account, or None."""
        return await self._call(self._get_account, username)

    def _get_account(self, conn: Any, username: str) -> AccountRecord | None:
        row = conn.execute(
            self._q(_SELECT_ACCOUNT + " WHERE username = %s", "dispatch_accounts"), (username,)
        ).fetchone()
        return None if row is None else _account(row)

    async def save_account(self, record: AccountRecord) -> None:
        """Insert or update the account."""
        await self._call(self._save_account, record)

    def _save_account(self, conn: Any, r: AccountRecord) -> None:
        conn.execute(
            self._q(
                _INSERT_ACCOUNT,
                "dispatch_accounts",
            ),
            (
                r.username,
                r.role.value,
                r.hospital_id,
                r.unit_id,
                r.password_hash,
                r.totp_secret,
                r.totp_last_step,
                r.failed_logins,
                self._ts(r.locked_until),
                r.disabled,
                self._ts(r.created_at),
                self._ts(r.updated_at),
            ),
        )

    async def list_accounts(self) -> list[AccountRecord]:
        """Every account, by username."""
        return await self._call(self._list_accounts)

    def _list_accounts(self, conn: Any) -> list[AccountRecord]:
        stmt = self._q(_SELECT_ACCOUNT + " ORDER BY username", "dispatch_accounts")
        return [_account(r) for r in conn.execute(stmt).fetchall()]

    async def save_refresh(self, record: RefreshRecord) -> None:
        """Insert or update a refresh-token record."""
        await self._call(self._save_refresh, record)

    def _save_refresh(self, conn: Any, r: RefreshRecord) -> None:
        conn.execute(
            self._q(
                _INSERT_REFRESH,
                "dispatch_refresh_tokens",
            ),
            (
                r.token_hash,
                r.username,
                r.family,
                self._ts(r.created_at),
                self._ts(r.expires_at),
                self._ts(r.revoked_at),
            ),
        )

    async def get_refresh(self, token_hash: str) -> RefreshRecord | None:
        """The refresh-token record with this digest, or None."""
        return await self._call(self._get_refresh, token_hash)

    def _get_refresh(self, conn: Any, token_hash: str) -> RefreshRecord | None:
        row = conn.execute(
            self._q(_SELECT_REFRESH, "dispatch_refresh_tokens"),
            (token_hash,),
        ).fetchone()
        return None if row is None else _refresh(row)

    async def revoke_refresh_family(self, family: str, at: datetime) -> None:
        """Revoke every token of a sign-in session."""
        await self._call(self._revoke_family, family, at)

    def _revoke_family(self, conn: Any, family: str, at: datetime) -> None:
        conn.execute(
            self._q(
                "UPDATE {} SET revoked_at = %s WHERE family = %s AND revoked_at IS NULL", "dispatch_refresh_tokens"
            ),
            (self._ts(at), family),
        )

    async def append_audit(self, draft: AuditDraft) -> AuditEntry:
        """Seal ``draft`` after the last stored row and insert it, in one transaction (PostgreSQL: under an
        advisory lock, so concurrent dispatch instances extend one chain, never fork it)."""
        return await self._call(self._append_audit, draft)

    def _append_audit(self, conn: Any, draft: AuditDraft) -> AuditEntry:
        def work(execute: Callable[..., Any]) -> AuditEntry:
            if self.dialect == "postgres":
                execute("SELECT pg_advisory_xact_lock(%s)", (_AUDIT_LOCK_ID,))
            last = execute(self._q("SELECT seq, hash FROM {} ORDER BY seq DESC LIMIT 1", "dispatch_audit")).fetchone()
            entry = seal(draft, int(last[0]) + 1 if last else 1, last[1] if last else GENESIS_HASH)
            execute(
                self._q(
                    _INSERT_AUDIT,
                    "dispatch_audit",
                ),
                (
                    entry.seq,
                    entry.at.astimezone(UTC).isoformat(timespec="microseconds"),
                    entry.actor,
                    entry.role,
                    entry.actor_hospital_id,
                    entry.action,
                    entry.object_type,
                    entry.object_id,
                    entry.unit_id,
                    entry.alert_id,
                    entry.incident_id,
                    entry.hospital_id,
                    entry.client_addr,
                    entry.outcome,
                    entry.reported_by,
                    entry.detail,
                    entry.prev_hash,
                    entry.hash,
                ),
            )
            return entry

        return self._transaction(conn, work)

    async def audit_entries(
        self,
        *,
        after_seq: int = 0,
        limit: int | None = None,
        unit_id: str | None = None,
        alert_id: str | None = None,
        incident_id: str | None = None,
        actor: str | None = None,
    ) -> list[AuditEntry]:
        """Rows after ``after_seq`` in order, filtered, at most ``limit``."""
        return await self._call(self._audit_entries, after_seq, limit, unit_id, alert_id, incident_id, actor)

    def _audit_entries(
        self,
        conn: Any,
        after_seq: int,
        limit: int | None,
        unit_id: str | None,
        alert_id: str | None,
        incident_id: str | None,
        actor: str | None,
    ) -> list[AuditEntry]:
        params = (
            after_seq,
            *(unit_id, unit_id),
            *(alert_id, alert_id),
            *(incident_id, incident_id),
            *(actor, actor),
            limit if limit is not None else 2**62,
        )
        rows = conn.execute(self._q(_SELECT_AUDIT, "dispatch_audit"), params).fetchall()
        return [_audit(r) for r in rows]


def _account(row: Sequence[Any]) -> AccountRecord:
    return AccountRecord(
        username=row[0],
        role=Role(row[1]),
        hospital_id=row[2],
        unit_id=row[3],
        password_hash=row[4],
        totp_secret=row[5],
        totp_last_step=int(row[6]),
        failed_logins=int(row[7]),
        locked_until=_dt(row[8]),
        disabled=bool(row[9]),
        created_at=_dt(row[10]),  # type: ignore[arg-type]
        updated_at=_dt(row[11]),
    )


def _refresh(row: Sequence[Any]) -> RefreshRecord:
    return RefreshRecord(row[0], row[1], row[2], _dt(row[3]), _dt(row[4]), _dt(row[5]))  # type: ignore[arg-type]


def _audit(row: Sequence[Any]) -> AuditEntry:
    return AuditEntry(
        seq=int(row[0]),
        at=datetime.fromisoformat(row[1]),
        actor=row[2],
        role=row[3],
        actor_hospital_id=row[4],
        action=row[5],
        object_type=row[6],
        object_id=row[7],
        unit_id=row[8],
        alert_id=row[9],
        incident_id=row[10],
        hospital_id=row[11],
        client_addr=row[12],
        outcome=row[13],
        reported_by=row[14],
        detail=row[15],
        prev_hash=row[16],
        hash=row[17],
    )


def _json(value: object) -> Any:
    """A jsonb value (already decoded by psycopg) or JSON text (SQLite)."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def open_repository(url: str | None, *, max_alerts: int = 10_000) -> InMemoryRepository:
    """The repository for ``url``: in memory for None, else :class:`SqlRepository` (not yet opened).

    Raises:
        ValueError: an unsupported URL scheme.
    """
    if url is None:
        return InMemoryRepository(max_alerts=max_alerts)
    return SqlRepository.from_url(url, max_alerts=max_alerts)
