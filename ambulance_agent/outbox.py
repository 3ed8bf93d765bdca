"""Durable store-and-forward outbox of the vehicle: every outgoing message (all streams but video) is written
here before it is published, and deleted only when the broker acknowledged it (QoS 1 PUBACK).

One SQLite file in WAL mode (``synchronous=NORMAL``: a power cut may lose the last few commits, never corrupt the
file).  It also keeps the unit's counters: one sequence counter per stream, allocated in the same transaction as
the message it numbers, so a restarted agent never reuses a ``seq``; and the session (birth/death) counter.  A new
outbox (first start, or the old one was lost) starts every counter at the wall clock in microseconds since the Unix
epoch (about 1.8e15, < 2**63) instead of 0, so a unit that lost its outbox never repeats a ``seq`` it already sent
(the store would drop the new data as duplicates); an existing outbox continues its counters.

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

Encryption at rest (:mod:`ambulance_agent.crypto`): with a ``cipher`` (the unit's AES-256-GCM key, from
:class:`~ambulance_agent.settings.AgentSettings`; the key never enters this file) every payload is sealed in
:meth:`Outbox.put` and opened in :meth:`Outbox.pending`, bound to the unit, the stream and the ``seq``, so a row
copied onto another row or another unit's disk does not open.  Topics and counters stay clear (opaque ids only,
never patient data).  At open, rows sealed with a previous key (rotation) and rows of an older unencrypted outbox are
re-sealed with the current key; rows sealed with a key the unit does not hold stop the start with
:class:`OutboxError` and are never deleted.  A row that fails authentication in :meth:`Outbox.pending` is moved to a
``quarantine`` table (kept for investigation, never sent) and counted in :attr:`OutboxStats.rejected`.
``PRAGMA secure_delete`` overwrites deleted rows, and the WAL is truncated after a re-seal.

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

from ambulance_agent.crypto import CryptoError, UnitCipher
from broker_config import STREAMS, Stream

__all__ = ["SHEDDABLE", "OutboxMessage", "OutboxStats", "Outbox", "OutboxError"]

logger = logging.getLogger(__name__)

SHEDDABLE: tuple[Stream, ...] = (Stream.ECG, Stream.GPS)
"""Streams that may be dropped when the outbox is full, in shedding order."""

_SESSION = "__session__"
_SEED = "__seed__"
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
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    at_s REAL NOT NULL
);
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
    rejected: int = 0
    """Rows that failed authentication (tampered, swapped, another unit's) since start, moved to quarantine."""


class Outbox:
    """The durable outbox (see the module docstring).

    Args:
        path: SQLite file (created with its parent folder if missing).
        max_bytes: payload budget in bytes (> 0).
        wall_clock_s: Unix-time clock (injectable for tests).
        cipher: the unit's key (:class:`~ambulance_agent.crypto.UnitCipher`); every payload is sealed with it.
            None stores payloads in clear: tests and the simulated fleet only (the vehicle's agent always gets
            one from its settings).

    Raises:
        OutboxError: the file cannot be opened as an outbox, holds sealed rows and no (or not the right) key.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        wall_clock_s: Callable[[], float] = time.time,
        cipher: UnitCipher | None = None,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._now = wall_clock_s
        self._cipher = cipher
        self._rejected = 0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(_SCHEMA)
            self._seed = self._counter_seed()
            self._reseal()
            row = self._db.execute("SELECT count(*), coalesce(sum(size_bytes), 0) FROM messages").fetchone()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise OutboxError(f"cannot open outbox {self.path.name}: {type(exc).__name__}") from None
        except OutboxError:
            self._db.close()
            raise
        self._count, self._bytes = int(row[0]), int(row[1])
        self._shed: dict[str, int] = {}
        self._oldest = self._query_oldest()

    # --- encryption at rest -----------------------------------------------------------------------------------------

    @staticmethod
    def _context(stream: str, seq: int) -> bytes:
        return f"outbox|{stream}|{seq}".encode("ascii")

    def _reseal(self) -> None:
        """At open: refuse rows this key cannot open; re-seal rows of a previous key or of an unencrypted outbox."""
        header = len(b"GHC1") + 8
        rows = self._db.execute("SELECT id, stream, seq, substr(payload, 1, ?) FROM messages", (header,)).fetchall()
        cipher = self._cipher
        if cipher is None:
            if any(bytes(r[3]).startswith(b"GHC1") for r in rows):
                raise OutboxError(f"outbox {self.path.name} is encrypted: the unit key is required (nothing deleted)")
            return
        foreign = [r for r in rows if bytes(r[3]).startswith(b"GHC1") and not cipher.holds_key_of(bytes(r[3]))]
        if foreign:
            raise OutboxError(
                f"outbox {self.path.name}: {len(foreign)} stored messages are sealed with a key this unit does not "
                "hold; configure that key as a previous unit key (nothing deleted)"
            )
        stale = [r for r in rows if not cipher.is_current(bytes(r[3]))]
        if not stale:
            return
        resealed = 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for message_id, stream, seq, head in stale:
                (blob,) = self._db.execute("SELECT payload FROM messages WHERE id = ?", (message_id,)).fetchone()
                blob = bytes(blob)
                context = self._context(stream, int(seq))
                if bytes(head).startswith(b"GHC1"):
                    try:
                        plain = cipher.open(blob, context=context)
                    except CryptoError as exc:
                        self._quarantine(message_id, stream, int(seq), blob, exc.reason)
                        continue
                else:
                    plain = blob  # written before encryption was configured
                sealed = cipher.seal(plain, context=context)
                self._db.execute("UPDATE messages SET payload = ? WHERE id = ?", (sealed, message_id))
                resealed += 1
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # no clear or old-key page left in the WAL
        logger.warning("outbox re-sealed with the current unit key rows=%d", resealed)

    def _quarantine(self, message_id: int, stream: str, seq: int, blob: bytes, reason: str) -> None:
        """Move a row that fails authentication out of the queue (kept for investigation).  In a transaction."""
        self._db.execute(
            "INSERT OR REPLACE INTO quarantine (id, stream, seq, payload, reason, at_s) VALUES (?, ?, ?, ?, ?, ?)",
            (message_id, stream, seq, blob, reason, self._now()),
        )
        self._db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
        self._rejected += 1
        logger.warning("outbox row rejected id=%d stream=%s seq=%d reason=%s", message_id, stream, seq, reason)

    # --- counters ----------------------------------------------------------------------------------------------

    def _counter_seed(self) -> int:
        """First value of every counter: the wall clock in microseconds, fixed when the outbox is new; 0 for an
        outbox with counters from before seeding (they continue)."""
        if self._db.execute("SELECT 1 FROM counters WHERE name != ? LIMIT 1", (_SEED,)).fetchone() is None:
            seed = int(self._now() * 1_000_000)
            self._db.execute("INSERT OR IGNORE INTO counters (name, value) VALUES (?, ?)", (_SEED, seed))
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (_SEED,)).fetchone()
        return 0 if row is None else int(row[0])

    def _bump(self, name: str) -> int:
        row = self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
            (name, self._seed),
        ).fetchone()
        return int(row[0])

    def next_session(self) -> int:
        """Allocate the next session (birth/death) number, durable: seed, seed + 1 ... across restarts."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                value = self._bump(_SESSION)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return value

    @property
    def first_seq(self) -> int:
        """The ``seq`` every stream of this outbox started at (its seed; see the module docstring)."""
        return self._seed

    def peek_seq(self, stream: Stream) -> int:
        """The seq the next message of ``stream`` will get."""
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (stream.value,)).fetchone()
        return self._seed if row is None else int(row[0]) + 1

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
                if self._cipher is not None:
                    payload = self._cipher.seal(payload, context=self._context(stream.value, seq))
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
            out: list[OutboxMessage] = []
            for r in rows:
                if r[0] in excluded:
                    continue
                payload = bytes(r[4])
                if self._cipher is not None:
                    try:
                        payload = self._cipher.open(payload, context=self._context(r[1], int(r[2])))
                    except CryptoError as exc:
                        self._reject(int(r[0]), r[1], int(r[2]), payload, exc.reason)
                        continue
                out.append(
                    OutboxMessage(int(r[0]), Stream(r[1]), int(r[2]), r[3], payload, int(r[5]), bool(r[6]), float(r[7]))
                )
        return out[:limit]

    def _reject(self, message_id: int, stream: str, seq: int, blob: bytes, reason: str) -> None:
        """Quarantine one row found bad by :meth:`pending` and fix the in-memory figures.  Under the lock."""
        size = self._db.execute("SELECT size_bytes FROM messages WHERE id = ?", (message_id,)).fetchone()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._quarantine(message_id, stream, seq, blob, reason)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        if size is not None:
            self._count -= 1
            self._bytes -= int(size[0])
        self._oldest = self._query_oldest()

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
        return OutboxStats(self._count, self._bytes, self._oldest, dict(self._shed), self._rejected)

    def close(self) -> None:
        """Checkpoint and close the file (idempotent)."""
        with self._lock, contextlib.suppress(sqlite3.ProgrammingError):
            self._db.close()
