"""SQLite back end of the telemetry store (the embedded default).

All database work runs on one dedicated thread that owns the connection (sqlite3 objects stay on the thread
that made them); the event loop only awaits it.  WAL journal, ``synchronous=NORMAL``, a bounded busy timeout.
Times are stored as fixed-width ISO-8601 UTC text, which sorts like the instants it names.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sqlite3
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import numpy as np

from broker_config import VITAL_CODES, Stream
from telemetry.errors import MigrationError, StoreUnavailableError, WriteError
from telemetry.migrate import load_migrations
from telemetry.records import (
    GAP_TRACKED_STREAMS,
    EcgWindow,
    GapInfo,
    GpsPoint,
    IngestState,
    LatestVitals,
    VitalsBin,
    VitalValue,
    WriteResult,
)
from telemetry.rows import TABLES, Row, as_utc, group_rows
from telemetry.store import (
    DEFAULT_TIME_RULES,
    ECG_LOOKBACK_MARGIN_S,
    PARTITION_TIME,
    Batch,
    BatchItem,
    StoredChunk,
    TimeRule,
    assemble_window,
    concat_adc,
    time_verdict,
)

__all__ = ["SqliteStore"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_FIELD_BY_LOINC = {c.loinc: c.field for c in VITAL_CODES}
_TRANSIENT = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_PROTOCOL,
}
"""Primary result codes that mean "try again later" (https://www.sqlite.org/rescode.html); others are bugs."""
_BIN_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

# Statements built once from the constant table specs (identifiers are ours, never input): S608 does not apply.
_INSERT = {
    stream: f"INSERT INTO {spec.name} ({', '.join(spec.columns)}) "  # noqa: S608
    f"VALUES ({', '.join('?' * len(spec.columns))}) ON CONFLICT DO NOTHING"
    for stream, spec in TABLES.items()
}
_SEQS = {
    stream: f"SELECT DISTINCT seq FROM {spec.name} WHERE unit_id = ? ORDER BY seq"  # noqa: S608
    for stream, spec in TABLES.items()
}
_COUNT_IN_RANGE = {
    stream: f"SELECT COUNT(DISTINCT seq) FROM {spec.name} WHERE unit_id = ? AND seq BETWEEN ? AND ?"  # noqa: S608
    for stream, spec in TABLES.items()
}
_MAX_SEQ = {
    stream: f"SELECT unit_id, MAX(seq) FROM {TABLES[stream].name} GROUP BY unit_id"  # noqa: S608
    for stream in GAP_TRACKED_STREAMS
}


def _iso(value: datetime) -> str:
    return as_utc(value).isoformat(timespec="microseconds")


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _adapt(value: object) -> object:
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, tuple):
        return json.dumps(list(value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, bool):
        return int(value)
    return value


class SqliteStore:
    """The telemetry store on one SQLite file.  Build it with :func:`telemetry.store.open_store`.

    ``busy_timeout_s`` bounds how long a statement waits for another process's lock before
    :class:`~telemetry.errors.StoreUnavailableError` is raised.  ``time_rules`` (default: PostgreSQL's defaults,
    :data:`telemetry.store.DEFAULT_TIME_RULES`) and ``clock`` decide which ECG, vitals and GPS messages are refused
    as expired or too far in the future, exactly as the PostgreSQL store does.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        busy_timeout_s: float = 5.0,
        time_rules: dict[Stream, TimeRule] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.path = str(path)
        self.busy_timeout_s = busy_timeout_s
        self.time_rules = dict(DEFAULT_TIME_RULES if time_rules is None else time_rules)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="telemetry-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> SqliteStore:
        """``sqlite:///relative/path.sqlite3``, ``sqlite:////absolute/path.sqlite3`` or ``sqlite:///:memory:``.

        Raises:
            ValueError: no path.
        """
        parts = urlsplit(url)
        path = unquote(parts.path)
        if path.startswith("/:memory:"):
            return cls(":memory:")
        if not path or path == "/":
            raise ValueError("sqlite URL needs a file path: sqlite:///path/to/file.sqlite3")
        # SQLAlchemy's convention: sqlite:///data/x.sqlite3 is relative, sqlite:////abs/x.sqlite3 absolute.
        return cls(path[1:])

    # --- thread plumbing ------------------------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise StoreUnavailableError("store closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._guarded, fn, *args))

    def _guarded(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return fn(self._connection(), *args)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF in _TRANSIENT:
                raise StoreUnavailableError(f"sqlite3.OperationalError: {exc.sqlite_errorname}") from exc
            raise
        except (sqlite3.IntegrityError, sqlite3.DataError) as exc:
            raise WriteError(f"sqlite3.{type(exc).__name__}: {exc.sqlite_errorname}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._conn = conn
        return self._conn

    # --- schema ---------------------------------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        """Apply pending SQLite migrations (idempotent); return the versions applied now."""
        return await self._call(self._migrate)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> list[int]:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        applied: list[int] = []
        migrations = load_migrations("sqlite")
        known = {m.version for m in migrations}
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        if done - known:
            raise MigrationError(f"database has unknown migrations {sorted(done - known)}: code is older than schema")
        for migration in migrations:
            if migration.version in done:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, _iso(datetime.now(UTC))),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            logger.info("sqlite migration applied version=%04d name=%s", migration.version, migration.name)
            applied.append(migration.version)
        return applied

    # --- writes ---------------------------------------------------------------------------------------------------

    async def write(self, batch: Batch) -> WriteResult:
        """Store a batch in one transaction; see :meth:`telemetry.store.Store.write`.

        ECG, vitals and GPS messages older than their stream's retention are refused and counted as ``expired``,
        those too far ahead of the store's clock as ``future`` (the PostgreSQL store's rules).  A vitals message
        whose (unit, seq) is already stored is a duplicate as a whole, even if its fields differ.
        """
        result = WriteResult()
        now = self._clock()
        kept: list[BatchItem] = []
        for item in batch:
            stream = item[0].stream
            rule = self.time_rules.get(stream)
            if rule is not None and stream in PARTITION_TIME:
                at = getattr(item[1], PARTITION_TIME[stream], None)
                verdict = time_verdict(rule, as_utc(at), now) if isinstance(at, datetime) else None
                if verdict == "expired":
                    result.expired[stream] += 1
                    continue
                if verdict == "future":
                    result.future[stream] += 1
                    continue
            kept.append(item)
        grouped, ignored = group_rows(kept)
        result.ignored.update(ignored)
        if not grouped:
            return result
        adapted = {s: [[tuple(_adapt(v) for v in row) for row in rows] for rows in msgs] for s, msgs in grouped.items()}
        result.add(await self._call(self._write, adapted))
        return result

    @staticmethod
    def _write(conn: sqlite3.Connection, grouped: dict[Stream, list[list[Row]]]) -> WriteResult:
        result = WriteResult()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stream, messages in grouped.items():
                statement = _INSERT[stream]
                for rows in messages:
                    if stream is Stream.VITALS and rows and _vitals_stored(conn, rows[0]):
                        result.duplicates[stream] += 1  # message-level key: a replay never merges new codes
                        continue
                    before = conn.total_changes
                    for row in rows:
                        conn.execute(statement, row)
                    if conn.total_changes > before:
                        result.inserted[stream] += 1
                    else:
                        result.duplicates[stream] += 1
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return result

    # --- queries --------------------------------------------------------------------------------------------------

    async def latest_vitals(self) -> Mapping[str, LatestVitals]:
        """Per unit: the latest value of each vital code; see :meth:`telemetry.store.Store.latest_vitals`."""
        rows = await self._call(
            _fetch,
            "SELECT unit_id, seq, loinc, mdc_code, ucum, value, measured_at, historical FROM ("
            " SELECT *, ROW_NUMBER() OVER (PARTITION BY unit_id, loinc ORDER BY measured_at DESC, seq DESC) AS rn"
            " FROM vitals) WHERE rn = 1 ORDER BY unit_id, loinc",
            (),
        )
        values: dict[str, dict[str, VitalValue]] = {}
        for unit_id, seq, loinc, mdc, ucum, value, measured_at, historical in rows:
            values.setdefault(unit_id, {})[loinc] = VitalValue(
                _FIELD_BY_LOINC.get(loinc, loinc), loinc, mdc, ucum, value, _dt(measured_at), seq, bool(historical)
            )
        return {unit_id: LatestVitals(unit_id, by_code) for unit_id, by_code in values.items()}

    async def ecg_window(self, unit_id: str, seconds: float) -> EcgWindow | None:
        """The unit's last ``seconds`` of ECG; see :func:`telemetry.store.assemble_window`."""
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        newest = await self._call(_fetch, "SELECT MAX(start_at) FROM ecg_chunk WHERE unit_id = ?", (unit_id,))
        if not newest or newest[0][0] is None:
            return None
        since = _dt(newest[0][0]) - timedelta(seconds=seconds + ECG_LOOKBACK_MARGIN_S)
        rows = await self._call(
            _fetch,
            "SELECT seq, start_at, fs_hz, leads, gain_adc_per_mv, baseline_adc, n_samples, samples FROM ecg_chunk"
            " WHERE unit_id = ? AND start_at >= ? ORDER BY seq",
            (unit_id, _iso(since)),
        )
        chunks = [
            StoredChunk(seq, _dt(start), fs, tuple(json.loads(leads)), gain, base, n, bytes(raw))
            for seq, start, fs, leads, gain, base, n, raw in rows
        ]
        return assemble_window(unit_id, chunks, seconds)

    async def ecg_samples(self, unit_id: str) -> np.ndarray:
        """All stored ADC samples, int16 (n_leads, n) in seq order; shape (0, 0) when none."""
        rows = await self._call(
            _fetch, "SELECT leads, n_samples, samples FROM ecg_chunk WHERE unit_id = ? ORDER BY seq", (unit_id,)
        )
        return concat_adc((len(json.loads(leads)), n, bytes(raw)) for leads, n, raw in rows)

    async def seqs(self, unit_id: str, stream: Stream) -> list[int]:
        """Distinct stored seqs of one unit's stream, ascending.  Raises KeyError for an unstored stream."""
        rows = await self._call(_fetch, _SEQS[stream], (unit_id,))
        return [int(r[0]) for r in rows]

    async def gps_track(self, unit_id: str, since: datetime) -> list[GpsPoint]:
        """Position reports received at or after ``since``, in seq order."""
        rows = await self._call(
            _fetch,
            "SELECT seq, fix, lat_deg, lon_deg, speed_mps, heading_deg, device_time, received_at, clock_suspect,"
            " historical FROM gps_fix WHERE unit_id = ? AND received_at >= ? ORDER BY seq",
            (unit_id, _iso(since)),
        )
        return [
            GpsPoint(seq, bool(fix), lat, lon, spd, hdg, _dt(dev) if dev else None, _dt(rx), bool(sus), bool(hist))
            for seq, fix, lat, lon, spd, hdg, dev, rx, sus, hist in rows
        ]

    async def vitals_per_minute(self, unit_id: str, since: datetime, *, bin_s: int = 60) -> list[VitalsBin]:
        """Per-bin summaries of each code; see :meth:`telemetry.store.Store.vitals_per_minute`."""
        if bin_s <= 0:
            raise ValueError("bin_s must be positive")
        rows = await self._call(
            _fetch,
            "SELECT loinc, ucum, value, measured_at FROM vitals WHERE unit_id = ? AND measured_at >= ?",
            (unit_id, _iso(since)),
        )
        bins: dict[tuple[datetime, str], tuple[str, list[float]]] = {}
        for loinc, ucum, value, measured_at in rows:
            elapsed_s = (_dt(measured_at) - _BIN_EPOCH).total_seconds()
            start = _BIN_EPOCH + timedelta(seconds=(elapsed_s // bin_s) * bin_s)
            bins.setdefault((start, loinc), (ucum, []))[1].append(float(value))
        return [
            VitalsBin(start, loinc, ucum, len(vals), float(np.mean(vals)), min(vals), max(vals))
            for (start, loinc), (ucum, vals) in sorted(bins.items())
        ]

    async def gaps(self, unit_id: str | None = None) -> list[GapInfo]:
        """Recorded gaps with how many seqs are still missing; see :meth:`telemetry.store.Store.gaps`."""
        return await self._call(self._gaps, unit_id)

    @staticmethod
    def _gaps(conn: sqlite3.Connection, unit_id: str | None) -> list[GapInfo]:
        rows = conn.execute(
            "SELECT unit_id, seq, stream, from_seq, to_seq, detected_at, restart FROM telemetry_gap"
            " WHERE ? IS NULL OR unit_id = ? ORDER BY detected_at, unit_id, seq",
            (unit_id, unit_id),
        ).fetchall()
        out = []
        for unit, seq, stream_s, lo, hi, detected_at, restart in rows:
            stream = Stream(stream_s)
            (present,) = conn.execute(_COUNT_IN_RANGE[stream], (unit, lo, hi)).fetchone()
            missing = (hi - lo + 1) - int(present)
            out.append(GapInfo(unit, stream, lo, hi, _dt(detected_at), seq, missing, bool(restart)))
        return out

    async def ingest_state(self) -> IngestState:
        """Highest stored seq per (unit, gap-tracked stream) and highest gap seq per unit."""
        return await self._call(self._ingest_state)

    @staticmethod
    def _ingest_state(conn: sqlite3.Connection) -> IngestState:
        max_seq: dict[tuple[str, Stream], int] = {}
        for stream, statement in _MAX_SEQ.items():
            for unit, top in conn.execute(statement):
                max_seq[(unit, stream)] = int(top)
        max_gap = {u: int(s) for u, s in conn.execute("SELECT unit_id, MAX(seq) FROM telemetry_gap GROUP BY unit_id")}
        return IngestState(max_seq, max_gap)

    async def close(self) -> None:
        """Close the connection and stop the thread (idempotent)."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_conn)
        self._closed = True
        self._executor.shutdown(wait=False)

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _vitals_stored(conn: sqlite3.Connection, row: Row) -> bool:
    """Whether any row of the vitals message (unit_id, seq) of ``row`` is stored (primary-key prefix lookup)."""
    found = conn.execute("SELECT 1 FROM vitals WHERE unit_id = ? AND seq = ? LIMIT 1", (row[0], row[1])).fetchone()
    return found is not None


def _fetch(conn: sqlite3.Connection, statement: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
    # rows are untyped at the driver boundary; each query unpacks them into typed records at once
    return conn.execute(statement, params).fetchall()


def _statements(script: str) -> list[str]:
    """Split a SQL script into complete statements (sqlite3.complete_statement knows about triggers and quotes)."""
    out: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \n\t;"):
                out.append(buffer)
            buffer = ""
    if buffer.strip() and not all(ln.strip().startswith("--") or not ln.strip() for ln in buffer.splitlines()):
        raise MigrationError("migration ends with an incomplete statement")
    return out
