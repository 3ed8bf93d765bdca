"""PostgreSQL back end of the telemetry store (psycopg 3, async).

Writes: one transaction per batch; per stream a binary ``COPY`` into a session temp staging table, then
``INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING`` the message key, so a redelivered message is a no-op and
is counted as a duplicate.  ECG samples are stored as bytea (little-endian int16, lead-major).

Every connection starts with ``TimeZone=UTC`` (startup option, so psycopg never has to resolve the server's zone:
FF-12, psycopg issue #223); values sent are timezone-aware UTC.  Errors are mapped by exception class, never by
message text: ``OperationalError``/``InterfaceError`` -> :class:`StoreUnavailableError` (the connection is dropped
and reopened on the next call), ``DataError``/``IntegrityError`` -> :class:`WriteError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

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
from telemetry.rows import TABLES, Row, TableSpec, as_utc, group_rows
from telemetry.store import ECG_LOOKBACK_MARGIN_S, Batch, StoredChunk, assemble_window, concat_adc

__all__ = ["MIGRATION_LOCK_ID", "PostgresStore", "utc_conninfo"]

logger = logging.getLogger(__name__)

MIGRATION_LOCK_ID = 0x67686D67  # "ghmg": advisory lock so concurrent ingest workers migrate one at a time
_FIELD_BY_LOINC = {c.loinc: c.field for c in VITAL_CODES}


def utc_conninfo(url: str, *, application_name: str = "goldenhour-telemetry", connect_timeout_s: int = 5) -> str:
    """``url`` as a libpq conninfo string whose session starts with ``TimeZone=UTC``.

    Existing ``options`` are kept (ours are appended, so ours win); ``connect_timeout`` defaults to
    ``connect_timeout_s`` unless the URL sets it.
    """
    params: dict[str, Any] = conninfo_to_dict(url)
    options = str(params.get("options") or "")
    params["options"] = f"{options} -c TimeZone=UTC".strip()
    params.setdefault("application_name", application_name)
    params.setdefault("connect_timeout", connect_timeout_s)
    return make_conninfo("", **params)


def _stage(spec: TableSpec) -> sql.Identifier:
    return sql.Identifier(f"stage_{spec.name}")


def _adapt(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return Jsonb(value)
    if isinstance(value, datetime):
        return as_utc(value)
    return value


class _Session:
    """One lazily (re)opened autocommit connection, used by one caller at a time."""

    def __init__(self, conninfo: str, timeout_s: float) -> None:
        self._conninfo = conninfo
        self._timeout_s = timeout_s
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self.staged = False

    @asynccontextmanager
    async def use(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with self._lock:
            ok = False
            try:
                if self._conn is None or self._conn.closed:
                    self.staged = False
                    async with asyncio.timeout(self._timeout_s):
                        self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                yield self._conn
                ok = True
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                raise StoreUnavailableError(f"psycopg.{type(exc).__name__}") from exc
            except TimeoutError as exc:
                raise StoreUnavailableError("connect timed out") from exc
            except (psycopg.DataError, psycopg.IntegrityError) as exc:
                ok = True  # the connection is fine; the rows were refused
                raise WriteError(f"psycopg.{type(exc).__name__}", exc.sqlstate) from exc
            finally:
                if not ok:
                    await self._discard()

    async def _discard(self) -> None:
        conn, self._conn = self._conn, None
        self.staged = False
        if conn is not None and not conn.closed:
            await conn.close()

    async def close(self) -> None:
        async with self._lock:
            await self._discard()


class PostgresStore:
    """The telemetry store on PostgreSQL 15+ (stock; TimescaleDB not required).  Build it with
    :func:`telemetry.store.open_store`.

    Two sessions: one for writes, one for queries, so a long write does not hold up a board's query.
    ``timeout_s`` bounds each connection attempt.
    """

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        self._conninfo = utc_conninfo(url)
        self._writer = _Session(self._conninfo, timeout_s)
        self._reader = _Session(self._conninfo, timeout_s)

    async def migrate(self) -> list[int]:
        """Apply pending PostgreSQL migrations under an advisory lock (idempotent); return versions applied now."""
        applied: list[int] = []
        migrations = load_migrations("postgres")
        known = {m.version for m in migrations}
        async with self._writer.use() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
            if done - known:
                raise MigrationError(f"database has unknown migrations {sorted(done - known)}")
            for migration in migrations:
                if migration.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql.encode())  # no parameters: a multi-statement script
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
                logger.info("postgres migration applied version=%04d name=%s", migration.version, migration.name)
                applied.append(migration.version)
        return applied

    async def write(self, batch: Batch) -> WriteResult:
        """Store a batch in one transaction; see :meth:`telemetry.store.Store.write`."""
        grouped, ignored = group_rows(batch)
        result = WriteResult()
        result.ignored.update(ignored)
        if not grouped:
            return result
        async with self._writer.use() as conn:
            if not self._writer.staged:
                for spec in TABLES.values():
                    await conn.execute(
                        sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {}) ON COMMIT DELETE ROWS").format(
                            _stage(spec), sql.Identifier(spec.name)
                        )
                    )
                self._writer.staged = True
            async with conn.transaction(), conn.cursor() as cur:
                for stream, messages in grouped.items():
                    inserted = await self._copy_insert(cur, TABLES[stream], messages)
                    if inserted:
                        result.inserted[stream] += inserted
                    if len(messages) > inserted:
                        result.duplicates[stream] += len(messages) - inserted
        return result

    @staticmethod
    async def _copy_insert(cur: psycopg.AsyncCursor[Any], spec: TableSpec, messages: list[list[Row]]) -> int:
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in spec.columns)
        copy_stmt = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(_stage(spec), columns)
        async with cur.copy(copy_stmt) as copy:
            copy.set_types(list(spec.pg_types))
            for rows in messages:
                for row in rows:
                    await copy.write_row([_adapt(v) for v in row])
        insert = sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT DO NOTHING RETURNING {}").format(
            sql.Identifier(spec.name),
            columns,
            columns,
            _stage(spec),
            sql.SQL(", ").join(sql.Identifier(c) for c in spec.key),
        )
        await cur.execute(insert)
        keys = {tuple(r) for r in await cur.fetchall()}
        await cur.execute(sql.SQL("TRUNCATE {}").format(_stage(spec)))
        return len(keys)

    async def _fetch(
        self, query: sql.SQL | sql.Composed | str, params: tuple[object, ...] = (), *, binary: bool = False
    ) -> list[Any]:
        statement = query if isinstance(query, sql.SQL | sql.Composed) else query.encode()
        try:
            return await self._fetch_once(statement, params, binary)
        except StoreUnavailableError:
            # A read is idempotent: one fresh connection is worth a try (the server may have restarted since
            # the cached connection was opened).  A second failure is reported.
            return await self._fetch_once(statement, params, binary)

    async def _fetch_once(
        self, statement: sql.SQL | sql.Composed | bytes, params: tuple[object, ...], binary: bool
    ) -> list[Any]:
        async with self._reader.use() as conn, conn.cursor(binary=binary) as cur:
            await cur.execute(statement, params)
            return await cur.fetchall()

    async def latest_vitals(self) -> dict[str, LatestVitals]:
        """Per unit: the latest value of each vital code; see :meth:`telemetry.store.Store.latest_vitals`."""
        rows = await self._fetch(
            "SELECT DISTINCT ON (unit_id, loinc) unit_id, seq, loinc, mdc_code, ucum, value, measured_at, historical"
            " FROM vitals ORDER BY unit_id, loinc, measured_at DESC, seq DESC"
        )
        out: dict[str, LatestVitals] = {}
        for unit_id, seq, loinc, mdc, ucum, value, measured_at, historical in rows:
            latest = out.setdefault(unit_id, LatestVitals(unit_id, {}))
            latest.values[loinc] = VitalValue(
                _FIELD_BY_LOINC.get(loinc, loinc), loinc, mdc, ucum, value, measured_at, seq, historical
            )
        return out

    async def ecg_window(self, unit_id: str, seconds: float) -> EcgWindow | None:
        """The unit's last ``seconds`` of ECG; see :func:`telemetry.store.assemble_window`."""
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        newest = await self._fetch("SELECT max(start_at) FROM ecg_chunk WHERE unit_id = %s", (unit_id,))
        if not newest or newest[0][0] is None:
            return None
        since = newest[0][0] - timedelta(seconds=seconds + ECG_LOOKBACK_MARGIN_S)
        rows = await self._fetch(
            "SELECT seq, start_at, fs_hz, leads, gain_adc_per_mv, baseline_adc, n_samples, samples FROM ecg_chunk"
            " WHERE unit_id = %s AND start_at >= %s ORDER BY seq",
            (unit_id, since),
            binary=True,
        )
        chunks = [
            StoredChunk(seq, start, fs, tuple(leads), gain, base, n, bytes(raw))
            for seq, start, fs, leads, gain, base, n, raw in rows
        ]
        return assemble_window(unit_id, chunks, seconds)

    async def ecg_samples(self, unit_id: str) -> np.ndarray:
        """All stored ADC samples, int16 (n_leads, n) in seq order; shape (0, 0) when none."""
        rows = await self._fetch(
            "SELECT cardinality(leads), n_samples, samples FROM ecg_chunk WHERE unit_id = %s ORDER BY seq",
            (unit_id,),
            binary=True,
        )
        return concat_adc((n_leads, n, bytes(raw)) for n_leads, n, raw in rows)

    async def seqs(self, unit_id: str, stream: Stream) -> list[int]:
        """Distinct stored seqs of one unit's stream, ascending.  Raises KeyError for an unstored stream."""
        query = sql.SQL("SELECT DISTINCT seq FROM {} WHERE unit_id = %s ORDER BY seq").format(
            sql.Identifier(TABLES[stream].name)
        )
        return [int(r[0]) for r in await self._fetch(query, (unit_id,))]

    async def gps_track(self, unit_id: str, since: datetime) -> list[GpsPoint]:
        """Position reports received at or after ``since``, in seq order."""
        rows = await self._fetch(
            "SELECT seq, fix, lat_deg, lon_deg, speed_mps, heading_deg, device_time, received_at, clock_suspect,"
            " historical FROM gps_fix WHERE unit_id = %s AND received_at >= %s ORDER BY seq",
            (unit_id, as_utc(since)),
        )
        return [GpsPoint(*row) for row in rows]

    async def vitals_per_minute(self, unit_id: str, since: datetime, *, bin_s: int = 60) -> list[VitalsBin]:
        """Per-bin summaries with ``date_bin`` (core PostgreSQL 14+, no TimescaleDB needed)."""
        if bin_s <= 0:
            raise ValueError("bin_s must be positive")
        rows = await self._fetch(
            "SELECT date_bin(make_interval(secs => %s), measured_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bin,"
            " loinc, ucum, count(*), avg(value), min(value), max(value) FROM vitals"
            " WHERE unit_id = %s AND measured_at >= %s GROUP BY 1, 2, 3 ORDER BY 1, 2",
            (bin_s, unit_id, as_utc(since)),
        )
        return [
            VitalsBin(b, loinc, ucum, int(n), float(mean), float(lo), float(hi))
            for b, loinc, ucum, n, mean, lo, hi in rows
        ]

    async def gaps(self, unit_id: str | None = None) -> list[GapInfo]:
        """Recorded gaps with how many seqs are still missing; see :meth:`telemetry.store.Store.gaps`."""
        present = sql.SQL(" UNION ALL ").join(
            sql.SQL(
                "SELECT {stream} AS stream, count(DISTINCT t.seq) AS n FROM {table} t"
                " WHERE g.stream = {stream} AND t.unit_id = g.unit_id AND t.seq BETWEEN g.from_seq AND g.to_seq"
            ).format(stream=sql.Literal(s.value), table=sql.Identifier(TABLES[s].name))
            for s in sorted(GAP_TRACKED_STREAMS)
        )
        query = sql.SQL(
            "SELECT g.unit_id, g.stream, g.from_seq, g.to_seq, g.detected_at, g.seq,"
            " (g.to_seq - g.from_seq + 1) - coalesce((SELECT sum(p.n) FROM ({}) p), 0)"
            " FROM telemetry_gap g WHERE %s::text IS NULL OR g.unit_id = %s ORDER BY g.detected_at, g.unit_id, g.seq"
        ).format(present)
        rows = await self._fetch(query, (unit_id, unit_id))
        return [GapInfo(u, Stream(s), lo, hi, det, seq, int(missing)) for u, s, lo, hi, det, seq, missing in rows]

    async def ingest_state(self) -> IngestState:
        """Highest stored seq per (unit, gap-tracked stream) and highest gap seq per unit."""
        max_seq: dict[tuple[str, Stream], int] = {}
        for stream in sorted(GAP_TRACKED_STREAMS):
            query = sql.SQL("SELECT unit_id, max(seq) FROM {} GROUP BY unit_id").format(
                sql.Identifier(TABLES[stream].name)
            )
            for unit, top in await self._fetch(query):
                max_seq[(unit, stream)] = int(top)
        rows = await self._fetch("SELECT unit_id, max(seq) FROM telemetry_gap GROUP BY unit_id")
        return IngestState(max_seq, {u: int(s) for u, s in rows})

    async def close(self) -> None:
        """Close both sessions (idempotent)."""
        await self._writer.close()
        await self._reader.close()
