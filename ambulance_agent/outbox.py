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
:meth:`Outbox.put` and opened in :meth:`Outbox.pending`, bound to the unit and to every column the sender acts on
(stream, ``seq``, priority, topic, QoS, retain, store time, size), so a row copied onto another row or another
unit's disk, or whose topic/QoS/retain/store time was edited, does not open.  Topics and counters stay clear (opaque
ids only, never patient data).  A ``meta`` row marks the outbox sealed: from then on a payload that is not a sealed
blob is quarantined, never taken for a row of an older unencrypted outbox (those are sealed once, at the first start
with a key, which sets the marker; an outbox without the marker but with sealed rows counts as sealed, its rows of
the first associated-data format, stream and ``seq`` only, are re-sealed at open).  Opening a sealed outbox without
a key stops.  At open, rows sealed with a previous key (rotation) are re-sealed with the current key.  Rows sealed
with a key the unit does not hold: if no row opens with the configured keys (the wrong key is configured) the start
stops with :class:`OutboxError` and nothing is deleted; otherwise they are quarantined, counted and the agent starts.
A row that fails authentication is moved to a ``quarantine`` table (kept for investigation, never sent) and counted
in :attr:`OutboxStats.rejected`.  ``PRAGMA secure_delete`` overwrites deleted rows, and the WAL is truncated after a
re-seal.  Limit: an attacker who can rewrite the file can delete the marker and every sealed row and leave clear
rows, which the next start then takes for a never-sealed outbox; the key proves what the unit wrote, not that
nothing was removed.

Full disk (SQLITE_FULL): the WAL is checkpointed every 64 pages (the data lives in the main file) and a
``<file>-reserve`` file (``reserve_bytes``, 128 KiB) is kept beside it.  When a write meets a full disk, the reserve is
given back, the oldest ECG then GPS messages are shed in small transactions (each followed by a WAL checkpoint;
new files use ``auto_vacuum=FULL`` so the freed pages return to the disk) until the reserve can be kept again, and the
write is retried; counted in :attr:`OutboxStats.disk_full`.  If nothing sheddable is left, a protected message
raises :class:`OutboxError` (show it to the crew) and a sheddable one is itself shed (-1).  An ack whose DELETE meets a
full disk is kept in memory (never offered again) and deleted by the next write that succeeds; a restart before then
sends it once more, and the store drops the duplicate ``seq``.

All methods are blocking and thread-safe (one connection behind a lock); the agent calls them through
``asyncio.to_thread`` so the event loop never waits on the disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ambulance_agent.crypto import MAGIC, CryptoError, UnitCipher
from broker_config import STREAMS, Stream

__all__ = ["SHEDDABLE", "OutboxMessage", "OutboxStats", "Outbox", "OutboxError", "OutboxFullError"]

logger = logging.getLogger(__name__)

SHEDDABLE: tuple[Stream, ...] = (Stream.ECG, Stream.GPS)
"""Streams that may be dropped when the outbox is full, in shedding order."""

_SESSION = "__session__"
_SEALED = "sealed"
"""``meta`` row: present once the outbox holds only sealed payloads; its value is the associated-data format."""
_FORMAT = 2
"""Associated data of a sealed row: unit, and every column the sender uses (see :meth:`Outbox._context`).
Format 1 (stream and seq only) is opened once at start and re-sealed."""
_RESERVE_NAME = "-reserve"
_DISK_FULL_ROUNDS = 4
_SHED_BATCH = 16
"""Rows deleted per transaction when the disk is full (each transaction must fit in the reserve)."""
_WAL_PAGES = 64
"""Checkpoint the WAL into the main file every 64 pages (256 KiB with 4 KiB pages; SQLite's default is 1000)."""
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
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    at_s REAL NOT NULL
);
"""


SEED_CLOCK_FROM_S = 1_735_689_600.0
"""2025-01-01T00:00:00Z: a clock before this is not believed for seeding (a vehicle computer whose real-time-clock
battery died boots in 1970: two lost outboxes would get the same seeds, or a negative one)."""
SEED_CLOCK_UNTIL_S = 4_102_444_800.0
"""2100-01-01T00:00:00Z: nor a clock after this."""


def seq_seed(now_s: float) -> int:
    """The first ``seq`` of a new outbox: the clock in microseconds since the Unix epoch (about 1.8e15) when the
    clock is plausible, else a random number in [2**61, 2**62), above any clock seed, so a unit never repeats a
    ``seq`` it already sent (the store then sees a restart, never duplicates).  Always in [1, 2**63)."""
    if SEED_CLOCK_FROM_S <= now_s < SEED_CLOCK_UNTIL_S:
        return int(now_s * 1_000_000)
    logger.warning("system clock implausible for seeding sequence numbers: using a random seed")
    return 2**61 + secrets.randbelow(2**61)


DEFAULT_MAX_BYTES = 2 * 1024**3
"""Default payload budget: 2 GiB, hours of 12-lead ECG in a tunnel or a dead zone (a vehicle computer's disk)."""


class OutboxError(RuntimeError):
    """The outbox file cannot be used (corrupt, unwritable, wrong key), or a protected message cannot be stored
    because the disk is full even after shedding every sheddable message (show it to the crew)."""


class OutboxFullError(OutboxError, sqlite3.OperationalError):
    """A protected message was not stored: the disk is full and nothing sheddable is left.  Also a
    :class:`sqlite3.OperationalError`, so callers that count outbox write failures keep counting it."""


def _disk_full(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


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
    """Rows that failed authentication (tampered, swapped, another unit's, unknown key, clear in a sealed outbox)
    since start, moved to quarantine."""
    disk_full: int = 0
    """Writes that met a full disk (SQLITE_FULL) since start (each answered by shedding, or deferred for acks)."""


class Outbox:
    """The durable outbox (see the module docstring).

    Args:
        path: SQLite file (created with its parent folder if missing).
        max_bytes: payload budget in bytes (> 0).
        wall_clock_s: Unix-time clock (injectable for tests).
        cipher: the unit's key (:class:`~ambulance_agent.crypto.UnitCipher`); every payload is sealed with it.
            None stores payloads in clear: tests and the simulated fleet only (the vehicle's agent always gets
            one from its settings).
        reserve_bytes: disk space (bytes, >= 0) kept in a ``<file>-reserve`` file beside the outbox and given
            back when the disk is full, so shedding (which itself writes to the WAL) can still run.

    Raises:
        OutboxError: the file cannot be opened as an outbox, holds sealed rows and no (or not the right) key.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        wall_clock_s: Callable[[], float] = time.time,
        cipher: UnitCipher | None = None,
        reserve_bytes: int = 128 * 1024,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._now = wall_clock_s
        self._cipher = cipher
        self._rejected = 0
        self._disk_full = 0
        self._acked_unsynced: set[int] = set()
        """Acked ids whose DELETE met a full disk: never offered again, deleted at the next write that works."""
        self._reserve_path = self.path.with_name(self.path.name + _RESERVE_NAME)
        self._reserve_bytes = reserve_bytes
        self._reserve_held = False
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA auto_vacuum=FULL")  # new files only: shed pages go back to the disk
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA secure_delete=ON")
            # a short WAL: the data lives in the main file and the WAL's own space is reused after each checkpoint,
            # so a full disk can still be answered by shedding (see _free_disk)
            self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_PAGES * 4 * 4096}")
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
        self._refill_reserve()

    # --- encryption at rest -----------------------------------------------------------------------------------------

    @staticmethod
    def _context(row: tuple, version: int = _FORMAT) -> bytes:
        """Associated data of one row ``(stream, seq, priority, topic, qos, retain, created_at_s, size_bytes)``.

        Format 2 binds every column the sender acts on, so a row whose topic, QoS, retain flag, priority, store time
        or size was edited on disk fails authentication.  Format 1 (stream, seq) is only read, at start."""
        stream, seq = row[0], int(row[1])
        if version == 1:
            return f"outbox|{stream}|{seq}".encode("ascii")
        priority, topic, qos, retain, created, size = row[2:8]
        fields = [stream, seq, int(priority), topic, int(qos), int(bool(retain)), float(created), int(size)]
        return b"outbox2|" + json.dumps(fields, separators=(",", ":")).encode("utf-8")

    def _reseal(self) -> None:
        """At open: check and migrate what is at rest (see the module docstring).

        Unsealed outbox (no ``meta`` marker, no sealed row) + key: every row is sealed, once, and the marker set.
        Sealed outbox: a clear row or a row of an unknown key is quarantined; rows of a previous key or of the
        older associated-data format are re-sealed.  If no row opens with the configured keys while some carry an
        unknown key id, the wrong key is configured: the start stops and nothing is deleted.
        """
        header = len(MAGIC) + 8
        rows = self._db.execute(
            "SELECT id, stream, seq, priority, topic, qos, retain, created_at_s, size_bytes, substr(payload, 1, ?)"
            " FROM messages",
            (header,),
        ).fetchall()
        marker = self._db.execute("SELECT value FROM meta WHERE name = ?", (_SEALED,)).fetchone()
        any_sealed = any(bytes(r[9]).startswith(MAGIC) for r in rows)
        cipher = self._cipher
        if cipher is None:
            if marker is not None or any_sealed:
                raise OutboxError(f"outbox {self.path.name} is encrypted: the unit key is required (nothing deleted)")
            return
        # 0: never sealed (legacy clear rows are sealed once); 1: sealed before the marker existed; 2: current
        version = int(marker[0]) if marker is not None else (1 if any_sealed else 0)
        foreign = [r for r in rows if bytes(r[9]).startswith(MAGIC) and not cipher.holds_key_of(bytes(r[9]))]
        if foreign:
            held = (r for r in rows if cipher.holds_key_of(bytes(r[9])))
            if not any(self._opens(r, version) for r in held):
                raise OutboxError(
                    f"outbox {self.path.name}: {len(foreign)} stored messages are sealed with a key this unit does "
                    "not hold and none opens with the configured keys; configure that key as the unit key or a "
                    "previous unit key (nothing deleted)"
                )
        work = [r for r in rows if version != _FORMAT or not cipher.is_current(bytes(r[9]))]
        if not work and marker is not None:
            return
        resealed = 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for r in work:
                message_id, stream, seq, head = int(r[0]), r[1], int(r[2]), bytes(r[9])
                (blob,) = self._db.execute("SELECT payload FROM messages WHERE id = ?", (message_id,)).fetchone()
                blob = bytes(blob)
                if not head.startswith(MAGIC):
                    if version != 0:
                        self._quarantine(message_id, stream, seq, blob, "not a sealed payload in a sealed outbox")
                        continue
                    plain = blob  # written before encryption was configured
                else:
                    try:
                        plain = cipher.open(blob, context=self._context(r[1:9], max(version, 1)))
                    except CryptoError as exc:
                        self._quarantine(message_id, stream, seq, blob, exc.reason)
                        continue
                sealed = cipher.seal(plain, context=self._context(r[1:9]))
                self._db.execute("UPDATE messages SET payload = ? WHERE id = ?", (sealed, message_id))
                resealed += 1
            self._db.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (_SEALED, str(_FORMAT)),
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        if resealed or self._rejected:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # no clear or old-key page left in the WAL
            logger.warning("outbox re-sealed with the current unit key rows=%d rejected=%d", resealed, self._rejected)

    def _opens(self, row: tuple, version: int) -> bool:
        """Whether one stored row authenticates with the configured keys (full read; used only at start)."""
        assert self._cipher is not None
        (blob,) = self._db.execute("SELECT payload FROM messages WHERE id = ?", (row[0],)).fetchone()
        try:
            self._cipher.open(bytes(blob), context=self._context(row[1:9], max(version, 1)))
        except CryptoError:
            return False
        return True

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
            seed = seq_seed(self._now())
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
            The message's seq, or -1 if the message itself was shed because the outbox (or the disk) is full of
            protected messages (ECG/GPS only).

        Raises:
            OutboxFullError: the disk is full (SQLITE_FULL) and shedding every sheddable message did not make room for
                a protected one (pre-alert, status, availability, vitals): it is NOT stored.
        """
        if stream is Stream.VIDEO:
            raise ValueError("video never goes through the outbox")
        with self._lock:
            for _ in range(_DISK_FULL_ROUNDS):
                try:
                    seq = self._put_once(stream, topic, encode_payload)
                except sqlite3.OperationalError as exc:
                    if not _disk_full(exc):
                        raise
                    self._disk_full += 1
                    if self._free_disk():
                        continue
                    break
                else:
                    if self._acked_unsynced:
                        self._delete_acked()
                    self._refill_reserve()
                    return seq
            if stream in SHEDDABLE:
                self._shed[stream.value] = self._shed.get(stream.value, 0) + 1
                logger.warning("outbox disk full: new message shed stream=%s", stream)
                return -1
            logger.error("outbox disk full: protected message not stored stream=%s", stream)
            raise OutboxFullError(
                f"disk full: the {stream.value} message could not be stored even after shedding every ECG/GPS "
                "message; free disk space on the vehicle computer"
            )

    def _put_once(self, stream: Stream, topic: str, encode_payload: Callable[[int], bytes]) -> int:
        spec = STREAMS[stream]
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
            row = (stream.value, seq, spec.priority, topic, spec.qos, int(spec.retain), now, size)
            if self._cipher is not None:
                payload = self._cipher.seal(payload, context=self._context(row))
            self._db.execute(
                "INSERT INTO messages"
                " (stream, seq, priority, topic, qos, retain, created_at_s, size_bytes, payload)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*row, payload),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            self._recount()  # _make_room may have changed the in-memory figures before the failure
            raise
        self._count += 1
        self._bytes += size
        if self._oldest is None:
            self._oldest = now
        return seq

    def _rollback(self) -> None:
        """Roll back if a transaction is still open (SQLite rolls back by itself on SQLITE_FULL)."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _recount(self) -> None:
        row = self._db.execute(
            "SELECT count(*), coalesce(sum(size_bytes), 0) FROM messages"
            " WHERE id NOT IN (SELECT value FROM json_each(?))",
            (json.dumps(sorted(self._acked_unsynced)),),
        ).fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])
        self._oldest = self._query_oldest()

    # --- full disk -----------------------------------------------------------------------------------------------

    def _refill_reserve(self) -> None:
        """Keep ``reserve_bytes`` of disk beside the outbox (best effort: skipped while the disk is full)."""
        if self._reserve_bytes <= 0 or self._reserve_held:
            return
        try:
            if not (self._reserve_path.exists() and self._reserve_path.stat().st_size >= self._reserve_bytes):
                with open(self._reserve_path, "wb") as out:
                    os.posix_fallocate(out.fileno(), 0, self._reserve_bytes)
            self._reserve_held = True
        except OSError as exc:
            self._reserve_path.unlink(missing_ok=True)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                logger.warning("outbox disk reserve not kept: %s", type(exc).__name__)

    def _free_disk(self) -> bool:
        """After SQLITE_FULL: give back the reserve, delete acked rows, then shed the oldest sheddable messages (in
        :data:`SHEDDABLE` order) in small transactions, each followed by a WAL checkpoint, until the reserve can be
        kept again.  Returns False if nothing could be freed.  Under the lock."""
        released = self._reserve_path.exists()
        self._reserve_path.unlink(missing_ok=True)
        self._reserve_held = False
        target = self._reserve_bytes + 32 * 1024  # payload bytes: room for the reserve and more
        freed = 0
        progress = False
        while freed < target:
            shed: list[tuple[str, int, int]] = []
            try:
                self._db.execute("BEGIN IMMEDIATE")
                if self._acked_unsynced:
                    self._delete_acked_in_transaction()
                for victim in SHEDDABLE:
                    rows = self._db.execute(
                        "SELECT id, seq, size_bytes FROM messages WHERE stream = ? ORDER BY id LIMIT ?",
                        (victim.value, _SHED_BATCH - len(shed)),
                    ).fetchall()
                    for message_id, seq, size in rows:
                        self._db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
                        shed.append((victim.value, int(seq), int(size)))
                    if len(shed) >= _SHED_BATCH:
                        break
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._rollback()
                if not _disk_full(exc):
                    raise
                logger.error("outbox disk full: cannot shed (no disk reserve left)")
                break
            acked, self._acked_unsynced = bool(self._acked_unsynced), set()
            progress = progress or acked or bool(shed)
            for victim_stream, seq, size in shed:
                self._shed[victim_stream] = self._shed.get(victim_stream, 0) + 1
                freed += size
                logger.warning("outbox disk full: shed stream=%s seq=%d bytes=%d", victim_stream, seq, size)
            with contextlib.suppress(sqlite3.OperationalError):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL's space back to the disk
            if not shed:
                break
        self._recount()
        self._refill_reserve()  # before the freed space is used up
        return progress or released

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
        columns = (
            "SELECT id, stream, seq, topic, payload, qos, retain, created_at_s, priority, size_bytes FROM messages"
        )
        with self._lock:
            excluded = set(exclude_ids) | self._acked_unsynced
            n = limit + len(excluded)
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
                        context = self._context((r[1], r[2], r[8], r[3], r[5], r[6], r[7], r[9]))
                        payload = self._cipher.open(payload, context=context)
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
        rejected = self._rejected
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._quarantine(message_id, stream, seq, blob, reason)
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._rollback()
            if not _disk_full(exc):
                raise
            self._rejected = rejected  # not moved: found (and not sent) again at the next call
            self._disk_full += 1
            return
        except BaseException:
            self._rollback()
            raise
        if size is not None:
            self._count -= 1
            self._bytes -= int(size[0])
        self._oldest = self._query_oldest()

    def ack(self, message_id: int) -> bool:
        """Delete an acknowledged message.  Returns False if it was already gone (shed or acked twice).

        On a full disk (SQLITE_FULL) the message is marked delivered in memory: never offered by :meth:`pending`
        again, deleted by the next write that succeeds.  A restart before then sends it once more (the store drops
        it as a duplicate ``seq``)."""
        with self._lock:
            if message_id in self._acked_unsynced:
                return False
            try:
                row = self._db.execute(
                    "DELETE FROM messages WHERE id = ? RETURNING size_bytes, created_at_s", (message_id,)
                ).fetchone()
            except sqlite3.OperationalError as exc:
                if not _disk_full(exc):
                    raise
                self._disk_full += 1
                row = self._db.execute(
                    "SELECT size_bytes, created_at_s FROM messages WHERE id = ?", (message_id,)
                ).fetchone()
                if row is None:
                    return False
                self._acked_unsynced.add(message_id)
                logger.warning("outbox disk full: ack kept in memory id=%d", message_id)
            if row is None:
                return False
            self._count -= 1
            self._bytes -= int(row[0])
            if self._oldest is not None and float(row[1]) <= self._oldest:
                self._oldest = self._query_oldest()
            if message_id not in self._acked_unsynced:
                if self._acked_unsynced:
                    self._delete_acked()
                self._refill_reserve()
            return True

    def _delete_acked_in_transaction(self) -> None:
        ids = sorted(self._acked_unsynced)
        self._db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in ids])

    def _delete_acked(self) -> None:
        """Retry the deletes of acks that met a full disk (best effort).  Under the lock."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._delete_acked_in_transaction()
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._rollback()
            if not _disk_full(exc):
                raise
            return
        self._acked_unsynced.clear()
        self._recount()

    def _query_oldest(self) -> float | None:
        row = self._db.execute("SELECT min(created_at_s) FROM messages").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def stats(self) -> OutboxStats:
        """Backlog figures kept in memory (no disk access; safe to call from the event loop)."""
        return OutboxStats(self._count, self._bytes, self._oldest, dict(self._shed), self._rejected, self._disk_full)

    def close(self) -> None:
        """Checkpoint and close the file (idempotent)."""
        with self._lock, contextlib.suppress(sqlite3.ProgrammingError):
            self._db.close()
