"""The telemetry store: one async interface, two back ends chosen by URL.

* ``sqlite:///path/to/file.sqlite3`` (``sqlite:///:memory:`` for a throw-away store): the embedded default, stdlib
  sqlite3 on one dedicated thread, WAL journal.
* ``postgresql://user@host:5432/db``: psycopg 3 async, binary COPY into a staging temp table then
  ``INSERT ... ON CONFLICT DO NOTHING``; every session runs with ``TimeZone=UTC`` (FF-12).

Every write is idempotent on the message key (unit, stream, seq): writing the same batch twice stores nothing
the second time and reports the messages as duplicates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

import numpy as np
from pydantic import BaseModel

from broker_config import ParsedTopic, Stream
from telemetry.errors import UnsupportedStoreError
from telemetry.ghe1 import EcgHead
from telemetry.records import EcgWindow, GapInfo, GpsPoint, IngestState, LatestVitals, VitalsBin, WriteResult

__all__ = [
    "DEFAULT_TIME_RULES",
    "PARTITION_TIME",
    "Batch",
    "BatchItem",
    "Store",
    "StoredChunk",
    "TimeRule",
    "assemble_window",
    "concat_adc",
    "open_store",
    "time_verdict",
]

BatchItem = (
    tuple[ParsedTopic, BaseModel | EcgHead, datetime] | tuple[ParsedTopic, BaseModel | EcgHead, datetime, bytes | None]
)
"""A decoded message with its receive time (timezone-aware UTC) and, optionally, the payload bytes it was decoded
from (the PostgreSQL store keeps an ECG chunk's already compressed GHE1 bytes instead of compressing again).  An
:class:`telemetry.ghe1.EcgHead` (a checked but undecoded ECG chunk, with its bytes) goes only to a store whose
``files_ghe1`` is true."""

Batch = Sequence[BatchItem]
"""Decoded messages to store in one transaction."""

PARTITION_TIME: dict[Stream, str] = {Stream.ECG: "start_at", Stream.VITALS: "measured_at", Stream.GPS: "sent_at"}
"""The payload time that files a message of each time-kept stream (PostgreSQL's partition key)."""


@dataclass(frozen=True, slots=True)
class TimeRule:
    """How long a stream is kept (``retain``) and how far ahead of the store's clock it is accepted
    (``premake + partition_width``, PostgreSQL's furthest premade partition)."""

    retain: timedelta
    partition_width: timedelta
    premake: timedelta


DEFAULT_TIME_RULES: dict[Stream, TimeRule] = {
    Stream.ECG: TimeRule(timedelta(days=30), timedelta(days=1), timedelta(days=2)),
    Stream.VITALS: TimeRule(timedelta(days=365), timedelta(days=1), timedelta(days=2)),
    Stream.GPS: TimeRule(timedelta(days=365), timedelta(days=1), timedelta(days=2)),
}
"""The defaults of PostgreSQL migration 0002's ``telemetry_retention`` (raw ECG 30 days, vitals and GPS 1 year),
which the SQLite store applies too, so that the embedded store never keeps what PostgreSQL refuses."""


def time_verdict(rule: TimeRule, at: datetime, now: datetime) -> str | None:
    """``"expired"`` when ``at`` is older than the rule's retention, ``"future"`` when it is too far ahead of
    ``now`` to be filed (a device clock gone wrong, FF-07), else None.  Both times timezone-aware."""
    if at < now - rule.retain:
        return "expired"
    if at >= now + rule.premake + rule.partition_width:
        return "future"
    return None


ECG_LOOKBACK_MARGIN_S = 300.0
"""How far before a window's start to look for a chunk that may still reach into it (longest chunk assumed)."""


@runtime_checkable
class Store(Protocol):
    """Async telemetry store.  Both back ends raise :class:`telemetry.errors.StoreUnavailableError` when the
    database cannot be reached or is busy (retry later) and :class:`telemetry.errors.WriteError` when it refuses
    the rows themselves."""

    async def migrate(self) -> list[int]:
        """Apply pending migrations (idempotent); return the versions applied now."""
        ...

    async def write(self, batch: Batch) -> WriteResult:
        """Store a batch in one transaction; duplicates of stored messages are no-ops, counted per stream."""
        ...

    async def latest_vitals(self) -> Mapping[str, LatestVitals]:
        """Per unit id: the latest value of each vital code (by ``measured_at``)."""
        ...

    async def ecg_window(self, unit_id: str, seconds: float) -> EcgWindow | None:
        """The unit's last ``seconds`` of ECG in mV, or None when nothing is stored."""
        ...

    async def ecg_samples(self, unit_id: str) -> np.ndarray:
        """All stored ADC samples of the unit, int16, shape (n_leads, n), chunks concatenated in seq order."""
        ...

    async def seqs(self, unit_id: str, stream: Stream) -> list[int]:
        """The distinct stored seqs of one unit's stream, ascending."""
        ...

    async def gps_track(self, unit_id: str, since: datetime) -> list[GpsPoint]:
        """Position reports received at or after ``since``, in seq order (fix=False reports included)."""
        ...

    async def vitals_per_minute(self, unit_id: str, since: datetime, *, bin_s: int = 60) -> list[VitalsBin]:
        """Per ``bin_s`` bin (aligned to 2000-01-01T00:00Z) and code: count, mean, min, max of values measured
        at or after ``since``; ordered by bin then LOINC."""
        ...

    async def gaps(self, unit_id: str | None = None) -> list[GapInfo]:
        """Recorded sequence gaps (of one unit, or all), each with how many seqs are still missing now."""
        ...

    async def ingest_state(self) -> IngestState:
        """Highest stored seq per (unit, gap-tracked stream) and highest gap-record seq per unit."""
        ...

    async def close(self) -> None:
        """Release connections and threads (idempotent)."""
        ...


def open_store(url: str) -> Store:
    """Build the store for ``url`` (no I/O yet; connections open lazily).

    Raises:
        UnsupportedStoreError: a scheme other than ``sqlite`` or ``postgresql``/``postgres``.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        from telemetry.sqlite_store import SqliteStore  # import the back end in use only

        return SqliteStore.from_url(url)
    if scheme in {"postgresql", "postgres"}:
        from telemetry.postgres_store import PostgresStore

        return PostgresStore(url)
    raise UnsupportedStoreError(scheme)


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """One stored ECG chunk as read back: raw little-endian int16 lead-major ``samples`` bytes."""

    seq: int
    start_at: datetime
    fs_hz: float
    leads: tuple[str, ...]
    gain_adc_per_mv: float
    baseline_adc: int
    n_samples: int
    samples: bytes

    @property
    def end_at(self) -> datetime:
        """Time just after the last sample."""
        return self.start_at + timedelta(seconds=self.n_samples / self.fs_hz)

    def adc(self) -> np.ndarray:
        """The samples as int16, shape (n_leads, n_samples)."""
        return np.frombuffer(self.samples, dtype="<i2").reshape(len(self.leads), self.n_samples).astype(np.int16)


def assemble_window(unit_id: str, chunks: Sequence[StoredChunk], seconds: float) -> EcgWindow | None:
    """Place stored chunks on one regular grid covering the last ``seconds`` before the newest chunk's end.

    Only chunks with the newest chunk's ``fs_hz`` and lead set are used (a configuration change starts a new
    signal).  Sample positions come from each chunk's ``start_at`` rounded to the grid; where chunks overlap, the
    higher seq wins; where none covers the grid, the value is NaN.  The window starts no earlier than the first
    stored sample.  Conversion to mV per chunk: (adc - baseline_adc) / gain_adc_per_mv (WFDB convention).

    Raises:
        ValueError: ``seconds`` is not positive.
    """
    if seconds <= 0:
        raise ValueError("seconds must be positive")
    if not chunks:
        return None
    newest = max(chunks, key=lambda c: (c.end_at, c.seq))
    fs_hz, leads = newest.fs_hz, newest.leads
    usable = sorted((c for c in chunks if c.fs_hz == fs_hz and c.leads == leads), key=lambda c: c.seq)
    end_at = newest.end_at
    earliest = min(c.start_at for c in usable)
    start_at = max(end_at - timedelta(seconds=seconds), earliest)
    n = round((end_at - start_at).total_seconds() * fs_hz)
    grid = np.full((len(leads), n), np.nan, dtype=np.float64)
    for chunk in usable:
        offset = round((chunk.start_at - start_at).total_seconds() * fs_hz)
        lo, hi = max(offset, 0), min(offset + chunk.n_samples, n)
        if lo >= hi:
            continue
        mv = (chunk.adc().astype(np.float64) - chunk.baseline_adc) / chunk.gain_adc_per_mv
        grid[:, lo:hi] = mv[:, lo - offset : hi - offset]
    missing = int(np.isnan(grid[0]).sum()) if n else 0
    return EcgWindow(unit_id, fs_hz, leads, start_at, grid, missing)


def concat_adc(parts: Iterable[tuple[int, int, bytes]]) -> np.ndarray:
    """Concatenate raw lead-major int16 chunks (n_leads, n_samples, bytes) along time.

    Raises:
        ValueError: chunks with different lead counts.
    """
    arrays = [np.frombuffer(raw, dtype="<i2").reshape(n_leads, n) for n_leads, n, raw in parts]
    if not arrays:
        return np.zeros((0, 0), dtype=np.int16)
    if len({a.shape[0] for a in arrays}) != 1:
        raise ValueError("stored chunks have different lead counts; read them per configuration")
    return np.concatenate(arrays, axis=1).astype(np.int16)
