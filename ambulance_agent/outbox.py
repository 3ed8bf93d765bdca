"""Durable store-and-forward outbox of the vehicle: every outgoing message (all streams but video) is written
here before it is published, and deleted only when the broker acknowledged it (QoS 1 PUBACK).

One SQLite file in WAL mode (``synchronous=NORMAL``: a power cut may lose the last few commits, never corrupt the
file).  It also keeps the unit's counters: one sequence counter per stream, allocated in the same transaction as
the message it numbers, so a restarted agent never reuses a ``seq``; and the session (birth/death) counter.

Order of sending (:meth:`Outbox.pending`): stream priority (``broker_config.STREAMS[stream].priority``: pre-alert
0, availability/status 1, vitals 2, ECG 3, GPS 4), then insertion order (= ``seq`` within a stream).  With a live
window (``live_since_s``) the order is the uplink's:

1. crew messages (priority <= 1: pre-alerts, status), oldest first - never reordered, a retained status must end
   with the newest;
2. live telemetry (stored at or after ``live_since_s``) in priority order, newest first within a stream;
3. backlog telemetry (older) in priority order, oldest first: it drains when the link has room after live data.

Bound: ``max_bytes`` of payload.  When a new message does not fit, the oldest ECG is shed first, then the oldest
GPS fixes (the newest position is retained at the broker anyway); pre-alerts, status, availability and vitals are
never shed (they are stored even beyond the bound, and a warning is logged).  Shed messages leave gaps in the
sequence numbers, which the store reports as gaps.

All methods are blocking and thread-safe (one connection behind a lock); the agent calls them through
``asyncio.to_thread`` so the event loop never waits on the disk.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from broker_config import STREAMS, Stream

__all__ = ["SHEDDABLE", "OutboxMessage", "OutboxStats", "Outbox", "OutboxError"]

logger = logging.getLogger(__name__)

SHEDDABLE: tuple[Stream, ...] = (Stream.ECG, Stream.GPS)
"""Streams that may be dropped when the outbox is full, in shedding order."""

_SESSION = "__session__"
_CREW_PRIORITY = 1
"""Pre-alerts (0), availability and status (1): always first, never reordered."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created_at_s REAL NOT NULL,
    size_bytes INTEGER NOT NULL,
    UNIQUE (stream, seq)
);
CREATE INDEX IF NOT EXISTS messages_order ON messages (priority, id);
CREATE INDEX IF NOT EXISTS messages_shed ON messages (stream, id);
CREATE INDEX IF NOT EXISTS messages_created ON messages (created_at_s);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxError(RuntimeError):
    """The outbox file cannot be used (corrupt, unwritable)."""


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One stored message, ready to publish."""

    id: int
    stream: Stream
    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created_at_s: float
    """Unix time (s) when the message was stored."""


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Backlog figures: messages and payload bytes waiting, the oldest one's store time, shed counts."""

    count: int
    size_bytes: int
    oldest_created_at_s: float | None
    shed: dict[str, int]


class Outbox:
    """The durable outbox (see the module docstring).

    Args:
        path: SQLite file (created with its parent folder if missing).
        max_bytes: payload budget in bytes (> 0).
        wall_clock_s: Unix-time clock (injectable for tests).

    Raises:
        OutboxError: the file cannot be opened as an outbox.
    """

    def __init__(
        self, path: Path, *, max_bytes: int = 64 * 1024 * 1024, wall_clock_s: Callable[[], float] = time.time
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._now = wall_clock_s
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT count(*), coalesce(sum(size_bytes), 0) FROM messages").fetchone()
        except sqlite3.DatabaseError as exc:
            raise OutboxError(f"cannot open outbox {self.path.name}: {type(exc).__name__}") from None
        self._count, self._bytes = int(row[0]), int(row[1])
        self._shed: dict[str, int] = {}
        self._oldest = self._query_oldest()

    # --- counters ----------------------------------------------------------------------------------------------

    def _bump(self, name: str) -> int:
        row = self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, 0) "
            "ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
            (name,),
        ).fetchone()
        return int(row[0])

    def next_session(self) -> int:
        """Allocate the next session (birth/death) number, durable: 0, 1, 2 ... across restarts."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                value = self._bump(_SESSION)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return value

    def peek_seq(self, stream: Stream) -> int:
        """The seq the next message of ``stream`` will get."""
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (stream.value,)).fetchone()
        return 0 if row is None else int(row[0]) + 1

    # --- messages ----------------------------------------------------------------------------------------------

    def put(self, stream: Stream, topic: str, encode_payload: Callable[[int], bytes]) -> int:
        """Allocate the stream's next ``seq``, build the payload with it and store both in one transaction.

        Args:
            stream: a stream of :data:`broker_config.STREAMS` (not video).
            topic: the concrete topic (from ``TopicSpace``).
            encode_payload: ``seq -> bytes``; called inside the transaction (raise to abort: the seq is
                then not consumed).

        Returns:
            The message's seq, or -1 if the message itself was shed because the outbox is full of protected
            messages (ECG/GPS only).
        """
        spec = STREAMS[stream]
        if stream is Stream.VIDEO:
            raise ValueError("video never goes through the outbox")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._bump(stream.value)
                payload = encode_payload(seq)
                size = len(payload)
                if self._bytes + size > self.max_bytes and not self._make_room(size, stream):
                    self._db.execute("COMMIT")  # the seq is consumed: the store will report the gap
                    self._shed[stream.value] = self._shed.get(stream.value, 0) + 1
                    logger.warning("outbox full: new message shed stream=%s seq=%d bytes=%d", stream, seq, size)
                    return -1
                now = self._now()
                self._db.execute(
                    "INSERT INTO messages"
                    " (stream, seq, priority, topic, payload, qos, retain, created_at_s, size_bytes)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (stream.value, seq, spec.priority, topic, payload, spec.qos, int(spec.retain), now, size),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._count += 1
            self._bytes += size
            if self._oldest is None:
                self._oldest = now
            return seq

    def _make_room(self, size: int, stream: Stream) -> bool:
        """Shed sheddable messages, oldest first, until ``size`` more bytes fit.  Inside the put transaction.

        Returns False if the new message (a sheddable one) cannot fit and must itself be dropped.
        """
        for victim in SHEDDABLE:
            while self._bytes + size > self.max_bytes:
                row = self._db.execute(
                    "SELECT id, seq, size_bytes FROM messages WHERE stream = ? ORDER BY id LIMIT 1", (victim.value,)
                ).fetchone()
                if row is None:
                    break
                self._db.execute("DELETE FROM messages WHERE id = ?", (row[0],))
                self._count -= 1
                self._bytes -= int(row[2])
                self._shed[victim.value] = self._shed.get(victim.value, 0) + 1
                logger.warning("outbox full: shed stream=%s seq=%d bytes=%d", victim, row[1], row[2])
            if self._bytes + size <= self.max_bytes:
                self._oldest = self._query_oldest()
                return True
        self._oldest = self._query_oldest()
        if stream in SHEDDABLE:
            return False
        logger.warning("outbox over budget keeping protected stream=%s bytes=%d", stream, self._bytes + size)
        return True

    def pending(
        self, limit: int, exclude_ids: Iterable[int] = (), live_since_s: float | None = None
    ) -> list[OutboxMessage]:
        """Up to ``limit`` messages in sending order, skipping ``exclude_ids`` (see the module docstring).

        Without ``live_since_s``: priority, then insertion.  With it: crew messages, then live telemetry newest
        first, then backlog oldest first.
        """
        excluded = set(exclude_ids)
        n = limit + len(excluded)
        columns = "SELECT id, stream, seq, topic, payload, qos, retain, created_at_s FROM messages"
        with self._lock:
            if live_since_s is None:
                rows = self._db.execute(f"{columns} ORDER BY priority, id LIMIT ?", (n,)).fetchall()
            else:
                rows = self._db.execute(
                    f"{columns} WHERE priority <= ? ORDER BY priority, id LIMIT ?", (_CREW_PRIORITY, n)
                ).fetchall()
                if len(rows) < n:
                    rows += self._db.execute(
                        f"{columns} WHERE created_at_s >= ? AND priority > ? ORDER BY priority, id DESC LIMIT ?",
                        (live_since_s, _CREW_PRIORITY, n - len(rows)),
                    ).fetchall()
                if len(rows) < n:
                    rows += self._db.execute(
                        f"{columns} WHERE priority > ? AND created_at_s < ? ORDER BY priority, id LIMIT ?",
                        (_CREW_PRIORITY, live_since_s, n - len(rows)),
                    ).fetchall()
        out = [
            OutboxMessage(int(r[0]), Stream(r[1]), int(r[2]), r[3], bytes(r[4]), int(r[5]), bool(r[6]), float(r[7]))
            for r in rows
            if r[0] not in excluded
        ]
        return out[:limit]

    def ack(self, message_id: int) -> bool:
        """Delete an acknowledged message.  Returns False if it was already gone (shed or acked twice)."""
        with self._lock:
            row = self._db.execute(
                "DELETE FROM messages WHERE id = ? RETURNING size_bytes, created_at_s", (message_id,)
            ).fetchone()
            if row is None:
                return False
            self._count -= 1
            self._bytes -= int(row[0])
            if self._oldest is not None and float(row[1]) <= self._oldest:
                self._oldest = self._query_oldest()
            return True

    def _query_oldest(self) -> float | None:
        row = self._db.execute("SELECT min(created_at_s) FROM messages").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def stats(self) -> OutboxStats:
        """Backlog figures kept in memory (no disk access; safe to call from the event loop)."""
        return OutboxStats(self._count, self._bytes, self._oldest, dict(self._shed))

    def close(self) -> None:
        """Checkpoint and close the file (idempotent)."""
        with self._lock, contextlib.suppress(sqlite3.ProgrammingError):
            self._db.close()
