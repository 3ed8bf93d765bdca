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
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from broker_config import VITAL_CODES, EcgChunk, GapRecord, Stream
from broker_config.codec import EcgEncoding, decode_ecg, encode_ecg
from telemetry.errors import MigrationError, StoreUnavailableError, WriteError
from telemetry.gaps import DEFAULT_RESTART_JUMP
from telemetry.ghe1 import EcgHead, adc_samples
from telemetry.migrate import load_migrations
from telemetry.records import (
    GAP_TRACKED_STREAMS,
    EcgWindow,
    GapInfo,
    GpsPoint,
    IngestState,
    LatestVitals,
    LatestVitalsByUnit,
    VitalsBin,
    WriteResult,
)
from telemetry.rows import TABLES, Row, TableSpec, as_utc, group_rows
from telemetry.store import ECG_LOOKBACK_MARGIN_S, Batch, BatchItem, StoredChunk, assemble_window, concat_adc

__all__ = [
    "GAP_SCAN_LOCK_ID",
    "MIGRATION_LOCK_ID",
    "PG_ECG",
    "PostgresStore",
    "RetentionRule",
    "rebuild_latest_docs",
    "utc_conninfo",
]

logger = logging.getLogger(__name__)

MIGRATION_LOCK_ID = 0x67686D67  # "ghmg": advisory lock so concurrent ingest workers migrate one at a time
GAP_SCAN_LOCK_ID = 0x67686773  # "ghgs": one store-side gap scan at a time across workers
_ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)  # date_bin origin of the partitions (migration 0002)
_RETENTION_REFRESH_S = 60.0

PG_ECG = TableSpec(
    "ecg_chunk",
    Stream.ECG,
    (
        "unit_id",
        "seq",
        "start_at",
        "end_at",
        "fs_hz",
        "leads",
        "gain_adc_per_mv",
        "baseline_adc",
        "n_samples",
        "ghe1",
        "lead_off",
        "sent_at",
        "received_at",
        "historical",
    ),
    (
        "text",
        "bigint",
        "timestamptz",
        "timestamptz",
        "float8",
        "text[]",
        "float8",
        "integer",
        "integer",
        "bytea",
        "boolean[]",
        "timestamptz",
        "timestamptz",
        "boolean",
    ),
    ("unit_id", "seq"),
)
"""The PostgreSQL ECG table (migration 0002): samples kept as the GHE1 message (lossless delta-zlib, about one byte
per sample) rather than raw int16, plus ``end_at`` so that a window query reads only the chunks it needs."""

_DIRECT = frozenset({Stream.ECG, Stream.GPS})
"""Streams copied straight into their table when no message of the batch is stored yet (:meth:`PostgresStore.
_copy_direct`).  Vitals always go through the staging table: a message is a no-op as a whole when its (unit, seq) is
stored, even with other codes (``_NEW_VITALS_MESSAGE``), which a unique key on (unit, seq, code) cannot say."""

_PARTITION_TIME: dict[Stream, str] = {Stream.ECG: "start_at", Stream.VITALS: "measured_at", Stream.GPS: "sent_at"}
"""Partition key of each time-partitioned stream: a time carried in the payload, so a redelivery lands in the same
partition and hits the same unique key."""


@dataclass(frozen=True, slots=True)
class RetentionRule:
    """One row of ``telemetry_retention``: how long a stream is kept and how it is partitioned."""

    stream: Stream
    table: str
    retain: timedelta
    partition_width: timedelta
    premake: timedelta


def _partition_time(model: BaseModel | EcgHead, stream: Stream) -> datetime:
    value = getattr(model, _PARTITION_TIME[stream])
    if not isinstance(value, datetime):
        raise TypeError(f"{type(model).__name__} has no {_PARTITION_TIME[stream]}")
    return value


def _bin_start(at: datetime, width: timedelta) -> datetime:
    """``date_bin(width, at, 2000-01-01Z)`` in Python (the partition holding ``at``)."""
    return _ORIGIN + ((at - _ORIGIN) // width) * width


def _ghe1(model: EcgChunk | EcgHead, wire: bytes | None) -> bytes:
    """The chunk as GHE1 with delta-zlib samples: the payload as received when it already is that, else re-encoded."""
    if wire is not None and len(wire) > 5 and wire[:4] == b"GHE1" and wire[5] >> 4 == EcgEncoding.DELTA_ZLIB:
        return wire
    if isinstance(model, EcgHead):  # a checked raw-int16 chunk: its samples are in the wire bytes
        if wire is None:
            raise ValueError("a checked ECG chunk needs its GHE1 bytes")
        model = decode_ecg(wire, topic="store")
    return encode_ecg(model, encoding=EcgEncoding.DELTA_ZLIB)


def _ecg_row(model: EcgChunk | EcgHead, received_at: datetime, wire: bytes | None) -> Row:
    return (
        model.unit_id,
        model.seq,
        model.start_at,
        model.start_at + timedelta(seconds=model.n_samples / model.fs_hz),
        model.fs_hz,
        tuple(model.leads),
        model.gain_adc_per_mv,
        model.baseline_adc,
        model.n_samples,
        _ghe1(model, wire),
        tuple(model.lead_off),
        model.sent_at,
        as_utc(received_at),
        model.historical,
    )


def _stored_adc(samples: bytes | None, ghe1: bytes | None) -> bytes:
    """Raw little-endian int16 lead-major samples of a stored chunk (legacy raw column, or decoded GHE1)."""
    if samples is not None:
        return bytes(samples)
    if ghe1 is None:
        raise ValueError("stored ECG chunk without samples")
    return adc_samples(bytes(ghe1)).astype("<i2", copy=False).tobytes()


_FIELD_BY_LOINC = {c.loinc: c.field for c in VITAL_CODES}
_LATEST_VITALS = "SELECT unit_id, entries FROM vitals_latest_doc"


def rebuild_latest_docs(where: sql.Composable | None = None) -> sql.Composed:
    """The statement that rebuilds ``vitals_latest_doc`` from ``vitals_latest`` for the units ``where`` selects
    (a ``WHERE`` clause on ``vitals_latest``; all units by default)."""
    return sql.SQL(
        "INSERT INTO vitals_latest_doc (unit_id, entries)"
        " SELECT unit_id, json_agg(json_build_array(loinc, mdc_code, ucum, value,"
        " (extract(epoch FROM measured_at) * 1000000)::bigint, seq, historical) ORDER BY loinc)::text"
        " FROM vitals_latest {} GROUP BY unit_id ORDER BY unit_id"
        " ON CONFLICT (unit_id) DO UPDATE SET entries = excluded.entries"
    ).format(where if where is not None else sql.SQL(""))


_REBUILD_BATCH_DOCS = rebuild_latest_docs(sql.SQL("WHERE unit_id IN (SELECT DISTINCT unit_id FROM stage_vitals)"))
"""After every vitals batch: the latest-vitals document of each unit in the batch (migration 0004), a JSON array of
``[loinc, mdc_code, ucum, value, measured_at_us, seq, historical]`` (:class:`telemetry.records.VitalsByCode`)."""


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


def _adapters(spec: TableSpec) -> tuple[tuple[int, type], ...]:
    """(column index, wrapper) for the columns of ``spec`` whose Python values psycopg needs wrapped: arrays kept as
    tuples in a row become lists, jsonb dicts :class:`Jsonb`.  Times need nothing: the models' datetimes are aware
    UTC, and psycopg refuses a naive one for ``timestamptz`` (TypeError) rather than guess its zone."""
    cached = _ADAPTERS.get(spec.name)
    if cached is None:
        cached = tuple(
            (i, list if pg_type.endswith("[]") else Jsonb)
            for i, pg_type in enumerate(spec.pg_types)
            if pg_type.endswith("[]") or pg_type == "jsonb"
        )
        _ADAPTERS[spec.name] = cached
    return cached


_ADAPTERS: dict[str, tuple[tuple[int, type], ...]] = {}


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


_LOCK_BATCH_UNITS = (
    "SELECT pg_advisory_xact_lock(hashtext('vitals_latest'), hashtext(u))"
    " FROM (SELECT DISTINCT unit_id AS u FROM stage_vitals ORDER BY 1) AS units"
)
"""Writers on a shared subscription take a batch's units in turn (in unit order, so never in a cycle): each rebuilds
a unit's latest-vitals document from a snapshot that holds the other writers' committed codes (without it the
later of two concurrent writers overwrote the document with a stale one)."""

_UPSERT_LATEST = (
    "INSERT INTO vitals_latest (unit_id, loinc, seq, mdc_code, ucum, value, measured_at, historical)"
    " SELECT DISTINCT ON (unit_id, loinc) unit_id, loinc, seq, mdc_code, ucum, value, measured_at, historical"
    " FROM stage_vitals ORDER BY unit_id, loinc, measured_at DESC, seq DESC"
    " ON CONFLICT (unit_id, loinc) DO UPDATE SET seq = excluded.seq, mdc_code = excluded.mdc_code,"
    " ucum = excluded.ucum, value = excluded.value, measured_at = excluded.measured_at,"
    " historical = excluded.historical"
    " WHERE (excluded.measured_at, excluded.seq) > (vitals_latest.measured_at, vitals_latest.seq)"
)


_NEW_VITALS_MESSAGE = sql.SQL(
    "WHERE NOT EXISTS (SELECT 1 FROM stream_head h WHERE h.unit_id = s.unit_id AND h.stream = 'vitals'"
    " AND h.max_seq >= s.seq AND EXISTS (SELECT 1 FROM vitals v WHERE v.unit_id = s.unit_id AND v.seq = s.seq))"
)
"""Vitals idempotency is per message: rows of a (unit, seq) already stored are a no-op as a whole, so a replay with
other fields never merges new codes into the stored message.  Only a seq at or below the unit's stored head (a
duplicate or a late fill: rare) costs the lookup across partitions."""


def _first_per_key(messages: list[list[Row]], result: WriteResult) -> list[list[Row]]:
    """Vitals messages of a batch with the first of each (unit, seq) kept; the others are counted as duplicates."""
    seen: set[tuple[object, object]] = set()
    kept: list[list[Row]] = []
    for rows in messages:
        key = (rows[0][0], rows[0][1])
        if key in seen:
            result.duplicates[Stream.VITALS] += 1
            continue
        seen.add(key)
        kept.append(rows)
    return kept


class PostgresStore:
    """The telemetry store on PostgreSQL 15+ (stock; TimescaleDB not required).  Build it with
    :func:`telemetry.store.open_store`.

    Two sessions: one for writes, one for queries, so a long write does not hold up a board's query.
    ``timeout_s`` bounds each connection attempt; ``restart_jump`` is the gap scan's sequence-restart bound.
    """

    files_ghe1 = True
    """ECG is kept as the GHE1 message: the ingest may hand over a checked :class:`telemetry.ghe1.EcgHead` with the
    payload bytes instead of a decoded :class:`broker_config.EcgChunk`."""

    def __init__(
        self, url: str, *, timeout_s: float = 10.0, clock: Any = None, restart_jump: int = DEFAULT_RESTART_JUMP
    ) -> None:
        self.restart_jump = restart_jump
        """A forward seq jump above this is a sequence restart in :meth:`scan_gaps` (telemetry.gaps)."""
        self._conninfo = utc_conninfo(url)
        self._writer = _Session(self._conninfo, timeout_s)
        self._reader = _Session(self._conninfo, timeout_s)
        self._scanner = _Session(self._conninfo, timeout_s)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._rules: dict[Stream, RetentionRule] = {}
        self._rules_loaded_at = -1e18
        self._native = True
        self._partitions: set[tuple[str, datetime]] = set()

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
        self._writer.staged = False  # the staging tables copy the table shapes: rebuild them after a migration
        self._rules_loaded_at = -1e18
        self._partitions.clear()
        return applied

    # --- retention and partitions ---------------------------------------------------------------------------------

    async def retention(self) -> dict[Stream, RetentionRule]:
        """The retention rules in force (``telemetry_retention``), re-read at most once a minute."""
        if time.monotonic() - self._rules_loaded_at < _RETENTION_REFRESH_S and self._rules:
            return self._rules
        async with self._writer.use() as conn:
            cur = await conn.execute(
                "SELECT stream, table_name, retain, partition_width, premake FROM telemetry_retention"
            )
            rows = await cur.fetchall()
            cur = await conn.execute("SELECT mode FROM telemetry_storage")
            mode = await cur.fetchone()
            cur = await conn.execute("SELECT table_name, lower_bound FROM telemetry_partition")
            parts = await cur.fetchall()
        self._rules = {Stream(r[0]): RetentionRule(Stream(r[0]), r[1], r[2], r[3], r[4]) for r in rows}
        self._native = mode is None or mode[0] == "native"
        self._partitions = {(t, lo) for t, lo in parts}
        self._rules_loaded_at = time.monotonic()
        return self._rules

    async def _ensure_partitions(self, needed: set[tuple[str, datetime]]) -> None:
        """Create the partitions a batch needs, each in its own short transaction (attaching locks the parent)."""
        missing = sorted(needed - self._partitions)
        if not missing or not self._native:
            return
        async with self._writer.use() as conn:
            for table, lower in missing:
                await conn.execute("SELECT telemetry_ensure_partition(%s, %s)", (table, lower))
                self._partitions.add((table, lower))
                logger.info("partition ensured table=%s from=%s", table, lower.isoformat())

    # --- writes ---------------------------------------------------------------------------------------------------

    async def write(self, batch: Batch) -> WriteResult:
        """Store a batch in one transaction; see :meth:`telemetry.store.Store.write`.

        Messages of a time-partitioned stream older than the stream's retention are refused and counted as
        ``expired``; those more than ``premake`` ahead of the store's clock as ``future``.  Partitions for late
        data that is still within retention are created on demand.
        """
        result = WriteResult()
        rules = await self.retention()
        now = self._clock()
        kept: list[BatchItem] = []
        ecg: list[list[Row]] = []
        needed: set[tuple[str, datetime]] = set()
        for item in batch:
            parsed, model = item[0], item[1]
            rule = rules.get(parsed.stream)
            if rule is not None and parsed.stream in _PARTITION_TIME:
                at = _partition_time(model, parsed.stream)
                if at < now - rule.retain:
                    result.expired[parsed.stream] += 1
                    continue
                if at >= now + rule.premake + rule.partition_width:
                    result.future[parsed.stream] += 1
                    continue
                needed.add((rule.table, _bin_start(at, rule.partition_width)))
            if parsed.stream is Stream.ECG and isinstance(model, EcgChunk | EcgHead):
                wire = item[3] if len(item) > 3 else None
                ecg.append([_ecg_row(model, item[2], wire)])
            else:
                kept.append(item)
        grouped, ignored = group_rows(kept)
        result.ignored.update(ignored)
        if Stream.VITALS in grouped:
            grouped[Stream.VITALS] = _first_per_key(grouped[Stream.VITALS], result)
        if ecg:
            grouped[Stream.ECG] = ecg
        if not grouped:
            return result
        await self._ensure_partitions(needed)
        try:
            await self._write_grouped(grouped, result)
        except WriteError as exc:
            if exc.sqlstate != "23514" or not needed:
                raise
            # "no partition of relation found for row": a partition was dropped behind our cache; re-read, retry once
            self._rules_loaded_at = -1e18
            await self.retention()
            await self._ensure_partitions(needed)
            result.inserted.clear()
            result.duplicates.clear()
            await self._write_grouped(grouped, result)
        return result

    async def _write_grouped(self, grouped: dict[Stream, list[list[Row]]], result: WriteResult) -> None:
        async with self._writer.use() as conn:
            if not self._writer.staged:
                for spec in (*(t for s, t in TABLES.items() if s is not Stream.ECG), PG_ECG):
                    await conn.execute(
                        sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {}) ON COMMIT DELETE ROWS").format(
                            _stage(spec), sql.Identifier(spec.name)
                        )
                    )
                self._writer.staged = True
            # streams in a fixed order: concurrent workers then lock head/latest rows in the same order
            async with conn.transaction(), conn.cursor() as cur:
                for stream in sorted(grouped):
                    messages = grouped[stream]
                    spec = PG_ECG if stream is Stream.ECG else TABLES[stream]
                    inserted = await self._copy_direct(conn, cur, spec, messages) if stream in _DIRECT else None
                    if inserted is None:
                        keys = await self._copy_insert(cur, spec, messages)
                        inserted = len(keys)
                        if stream is Stream.VITALS and inserted < len(messages):
                            # a refused replay must not become the latest value: only what was stored counts
                            await cur.execute(
                                "DELETE FROM stage_vitals s WHERE NOT EXISTS (SELECT 1 FROM"
                                " unnest(%s::text[], %s::bigint[]) AS k(u, q) WHERE k.u = s.unit_id AND k.q = s.seq)",
                                ([k[0] for k in keys], [k[1] for k in keys]),
                            )
                    if inserted:
                        result.inserted[stream] += inserted
                    if len(messages) > inserted:
                        result.duplicates[stream] += len(messages) - inserted
                    if stream is Stream.VITALS:
                        await cur.execute(_LOCK_BATCH_UNITS)
                        await cur.execute(_UPSERT_LATEST)
                        await cur.execute(_REBUILD_BATCH_DOCS)
                    if stream in _PARTITION_TIME:
                        heads: dict[str, int] = {}
                        for rows in messages:
                            unit_id, seq = rows[0][0], rows[0][1]
                            if seq > heads.get(unit_id, -1):
                                heads[unit_id] = seq
                        ordered = sorted(heads)
                        await cur.execute(
                            "INSERT INTO stream_head (unit_id, stream, max_seq)"
                            " SELECT u, %s, s FROM unnest(%s::text[], %s::bigint[]) AS h(u, s)"
                            " ON CONFLICT (unit_id, stream) DO UPDATE SET max_seq = excluded.max_seq"
                            " WHERE excluded.max_seq > stream_head.max_seq",
                            (stream.value, ordered, [heads[u] for u in ordered]),
                        )

    @staticmethod
    async def _copy_direct(
        conn: psycopg.AsyncConnection[Any], cur: psycopg.AsyncCursor[Any], spec: TableSpec, messages: list[list[Row]]
    ) -> int | None:
        """The common case, no message already stored: binary COPY straight into the table, inside a savepoint.
        Returns the messages inserted, or None when a unique key was hit (a redelivery or a replay: the savepoint is
        rolled back and the caller goes through the staging table, which sorts new from already stored)."""
        if len({(rows[0][0], rows[0][1]) for rows in messages}) != len(messages):
            return None  # the same message twice in one batch
        try:
            async with conn.transaction():
                await PostgresStore._copy_rows(cur, spec, sql.Identifier(spec.name), messages)
        except psycopg.errors.UniqueViolation:
            return None
        return len(messages)

    @staticmethod
    async def _copy_insert(
        cur: psycopg.AsyncCursor[Any], spec: TableSpec, messages: list[list[Row]]
    ) -> set[tuple[Any, ...]]:
        """Through the staging table: the message keys newly inserted (the others were already stored)."""
        await PostgresStore._copy_rows(cur, spec, _stage(spec), messages)
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in spec.columns)
        insert = sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} s {} ON CONFLICT DO NOTHING RETURNING {}").format(
            sql.Identifier(spec.name),
            columns,
            columns,
            _stage(spec),
            _NEW_VITALS_MESSAGE if spec.stream is Stream.VITALS else sql.SQL(""),
            sql.SQL(", ").join(sql.Identifier(c) for c in spec.key),
        )
        await cur.execute(insert)
        return {tuple(r) for r in await cur.fetchall()}

    @staticmethod
    async def _copy_rows(
        cur: psycopg.AsyncCursor[Any], spec: TableSpec, target: sql.Identifier, messages: list[list[Row]]
    ) -> None:
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in spec.columns)
        copy_stmt = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(target, columns)
        adapters = _adapters(spec)
        async with cur.copy(copy_stmt) as copy:
            copy.set_types(list(spec.pg_types))
            for rows in messages:
                for row in rows:
                    if adapters:
                        values = list(row)
                        for i, wrap in adapters:
                            if values[i] is not None:
                                values[i] = wrap(values[i])
                        await copy.write_row(values)
                    else:
                        await copy.write_row(row)

    async def _fetch(
        self,
        query: sql.SQL | sql.Composed | str,
        params: Sequence[object] | dict[str, object] = (),
        *,
        binary: bool = False,
    ) -> list[Any]:
        statement = query if isinstance(query, sql.SQL | sql.Composed) else query.encode()
        # a read is idempotent: retried once on a fresh connection below
        try:
            return await self._fetch_once(statement, params, binary)
        except StoreUnavailableError:
            # A read is idempotent: one fresh connection is worth a try (the server may have restarted since
            # the cached connection was opened).  A second failure is reported.
            return await self._fetch_once(statement, params, binary)

    async def _fetch_once(
        self, statement: sql.SQL | sql.Composed | bytes, params: Sequence[object] | dict[str, object], binary: bool
    ) -> list[Any]:
        async with self._reader.use() as conn, conn.cursor(binary=binary) as cur:
            await cur.execute(statement, params)
            return await cur.fetchall()

    async def latest_vitals(self) -> Mapping[str, LatestVitals]:
        """Per unit: the latest value of each vital code (from ``vitals_latest``, kept by every write).

        Each unit's codes are one JSON text that the writer rebuilds for the units of every vitals batch
        (``vitals_latest_doc``, migration 0004): a read aggregates nothing and keeps one dict of strings
        (:class:`telemetry.records.LatestVitalsByUnit`); a unit's values are parsed when it is looked up.
        """
        rows = await self._fetch(_LATEST_VITALS)
        return LatestVitalsByUnit(dict(rows), _FIELD_BY_LOINC)

    async def ecg_window(self, unit_id: str, seconds: float) -> EcgWindow | None:
        """The unit's last ``seconds`` of ECG; see :func:`telemetry.store.assemble_window`.

        Reads only the chunks that reach into the window (index on ``end_at``); ``start_at`` bounds the partitions.
        """
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        rows = await self._fetch(
            "WITH newest AS (SELECT max(end_at) AS end_at FROM ecg_chunk WHERE unit_id = %(u)s)"
            " SELECT seq, start_at, fs_hz, leads, gain_adc_per_mv, baseline_adc, n_samples, samples, ghe1"
            " FROM ecg_chunk, newest WHERE unit_id = %(u)s"
            " AND ecg_chunk.end_at > newest.end_at - make_interval(secs => %(s)s)"
            " AND start_at > newest.end_at - make_interval(secs => %(m)s) ORDER BY seq",
            {"u": unit_id, "s": seconds, "m": seconds + ECG_LOOKBACK_MARGIN_S},
            binary=True,
        )
        chunks = [
            StoredChunk(seq, start, fs, tuple(leads), gain, base, n, _stored_adc(raw, ghe1))
            for seq, start, fs, leads, gain, base, n, raw, ghe1 in rows
        ]
        return assemble_window(unit_id, chunks, seconds)

    async def ecg_samples(self, unit_id: str) -> np.ndarray:
        """All stored ADC samples, int16 (n_leads, n) in seq order; shape (0, 0) when none."""
        rows = await self._fetch(
            "SELECT cardinality(leads), n_samples, samples, ghe1 FROM ecg_chunk WHERE unit_id = %s ORDER BY seq",
            (unit_id,),
            binary=True,
        )
        return concat_adc((n_leads, n, _stored_adc(raw, ghe1)) for n_leads, n, raw, ghe1 in rows)

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
            " (g.to_seq - g.from_seq + 1) - coalesce((SELECT sum(p.n) FROM ({}) p), 0), g.restart"
            " FROM telemetry_gap g WHERE %s::text IS NULL OR g.unit_id = %s ORDER BY g.detected_at, g.unit_id, g.seq"
        ).format(present)
        rows = await self._fetch(query, (unit_id, unit_id))
        return [
            GapInfo(u, Stream(s), lo, hi, det, seq, int(missing), bool(restart))
            for u, s, lo, hi, det, seq, missing, restart in rows
        ]

    async def ingest_state(self) -> IngestState:
        """Highest stored seq per (unit, gap-tracked stream) (``stream_head``) and highest gap seq per unit."""
        rows = await self._fetch("SELECT unit_id, stream, max_seq FROM stream_head")
        max_seq = {(u, Stream(s)): int(top) for u, s, top in rows if Stream(s) in GAP_TRACKED_STREAMS}
        gaps = await self._fetch("SELECT unit_id, max(seq) FROM telemetry_gap GROUP BY unit_id")
        return IngestState(max_seq, {u: int(s) for u, s in gaps})

    async def scan_gaps(self, *, window_s: float = 300.0, settle_s: float = 3.0) -> list[GapRecord] | None:
        """Store-side gap detection for workers on a shared subscription (each sees only part of a sequence).

        Per (unit, gap-tracked stream), ``gap_scan_state.checked_seq`` says every seq up to it is stored or
        covered by a gap record.  The scan reads the seqs stored above it whose partition time is within the last
        ``window_s`` (so it touches one or two partitions), walks them in order, and records a gap for a jump once
        the message after the jump has been stored for ``settle_s`` (reordering between workers and batches has
        then settled).  Seqs that are stored outside the window (an old replay) are checked before a gap is
        recorded.  The new gap records are stored (idempotent on their key) and returned, to be published.

        Returns None when another worker holds the scan (one scanner at a time, by advisory lock).
        """
        now = self._clock()
        since = now - timedelta(seconds=window_s)
        settled = now - timedelta(seconds=settle_s)
        records: list[GapRecord] = []
        async with self._scanner.use() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (GAP_SCAN_LOCK_ID,))
            locked = await cur.fetchone()
            if not locked or not locked[0]:
                return None
            await cur.execute("SELECT unit_id, coalesce(max(seq), -1) FROM telemetry_gap GROUP BY unit_id")
            gap_seq = {u: int(top) for u, top in await cur.fetchall()}

            def record(unit_id: str, stream: Stream, lo: int, hi: int, *, restart: bool) -> None:
                gap_seq[unit_id] = gap_seq.get(unit_id, -1) + 1
                gap = {"stream": stream.value, "from_seq": lo, "to_seq": hi, "detected_at": now, "restart": restart}
                records.append(GapRecord(unit_id=unit_id, seq=gap_seq[unit_id], sent_at=now, **gap))

            for stream in sorted(_PARTITION_TIME):
                table = sql.Identifier(PG_ECG.name if stream is Stream.ECG else TABLES[stream].name)
                await cur.execute(
                    sql.SQL(
                        "SELECT h.unit_id, coalesce(s.checked_seq, -1), x.seq, x.rx FROM stream_head h"
                        " LEFT JOIN gap_scan_state s ON s.unit_id = h.unit_id AND s.stream = h.stream"
                        " CROSS JOIN LATERAL (SELECT t.seq, min(t.received_at) AS rx FROM {t} t"
                        "   WHERE t.unit_id = h.unit_id AND t.seq > coalesce(s.checked_seq, -1) AND t.{c} >= %s"
                        "   GROUP BY t.seq) x"
                        " WHERE h.stream = %s AND h.max_seq > coalesce(s.checked_seq, -1)"
                        " ORDER BY h.unit_id, x.seq"
                    ).format(t=table, c=sql.Identifier(_PARTITION_TIME[stream])),
                    (since, stream.value),
                )
                per_unit: dict[str, tuple[int, list[tuple[int, datetime]]]] = {}
                for unit_id, checked, seq, rx in await cur.fetchall():
                    per_unit.setdefault(unit_id, (int(checked), []))[1].append((int(seq), rx))
                advanced: list[tuple[str, int]] = []
                below = await self._stored_below(cur, table, per_unit)
                for unit_id, (checked, seqs) in per_unit.items():
                    top = below.get(unit_id, checked)
                    for seq, rx in seqs:
                        if seq == top + 1:
                            top = seq
                            continue
                        if rx > settled:
                            break  # the jump is too recent: messages may still be on their way
                        if seq - top - 1 > self.restart_jump:  # a sequence restart: unknown loss, no range
                            if top >= 0:  # (a first contact at a clock-seeded counter is no restart)
                                record(unit_id, stream, top + 1, seq - 1, restart=True)
                            top = seq
                            continue
                        for lo, hi in await self._still_missing(cur, table, unit_id, top + 1, seq - 1):
                            record(unit_id, stream, lo, hi, restart=False)
                        top = seq
                    if top != checked:
                        advanced.append((unit_id, top))
                if advanced:
                    await cur.executemany(
                        "INSERT INTO gap_scan_state (unit_id, stream, checked_seq) VALUES (%s, %s, %s)"
                        " ON CONFLICT (unit_id, stream) DO UPDATE SET checked_seq = excluded.checked_seq",
                        [(u, stream.value, top) for u, top in advanced],
                    )
            if records:
                await cur.executemany(
                    "INSERT INTO telemetry_gap (unit_id, seq, stream, from_seq, to_seq, detected_at, restart, sent_at,"
                    " received_at, historical) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, false)"
                    " ON CONFLICT DO NOTHING",
                    [(r.unit_id, r.seq, r.stream, r.from_seq, r.to_seq, now, r.restart, now, now) for r in records],
                )
        return records

    @staticmethod
    async def _stored_below(
        cur: psycopg.AsyncCursor[Any], table: sql.Identifier, per_unit: dict[str, tuple[int, list[tuple[int, Any]]]]
    ) -> dict[str, int]:
        """For the streams the scan has never checked: the highest seq stored below their first seq in the window
        (one index probe per partition), where the scan starts instead of at -1.  Without it a first scan over a
        store with history re-reads every stored seq of every unit across all partitions (it ran past the write
        deadline on an hour of data, and was rolled back and repeated every few seconds).  A stream with nothing
        stored below starts at -1: its first seqs missing are still a gap."""
        fresh = [(u, seqs[0][0]) for u, (checked, seqs) in per_unit.items() if checked < 0 and seqs]
        if not fresh:
            return {}
        await cur.execute(
            sql.SQL(
                "SELECT f.u, (SELECT max(t.seq) FROM {} t WHERE t.unit_id = f.u AND t.seq < f.s)"
                " FROM unnest(%s::text[], %s::bigint[]) AS f(u, s)"
            ).format(table),
            ([u for u, _ in fresh], [s for _, s in fresh]),
        )
        return {u: int(top) for u, top in await cur.fetchall() if top is not None}

    @staticmethod
    async def _still_missing(
        cur: psycopg.AsyncCursor[Any], table: sql.Identifier, unit_id: str, lo: int, hi: int
    ) -> list[tuple[int, int]]:
        """The sub-ranges of ``lo..hi`` with no stored row in any partition (late or replayed data counts)."""
        await cur.execute(
            sql.SQL("SELECT DISTINCT seq FROM {} WHERE unit_id = %s AND seq BETWEEN %s AND %s ORDER BY seq").format(
                table
            ),
            (unit_id, lo, hi),
        )
        present = [int(r[0]) for r in await cur.fetchall()]
        missing: list[tuple[int, int]] = []
        start = lo
        for seq in present:
            if seq > start:
                missing.append((start, seq - 1))
            start = seq + 1
        if start <= hi:
            missing.append((start, hi))
        return missing

    async def close(self) -> None:
        """Close every session (idempotent)."""
        await self._writer.close()
        await self._reader.close()
        await self._scanner.close()
