"""MQTT -> store ingest: subscribe to every stored unit stream, decode behind an error boundary, batch, write.

Shape of the data path (FF-01: the receive loop never waits on the database)::

    PahoLink (paho driven by the event loop; each message acknowledged once taken: the broker paces a stalled ingest)
        --on_message: decode + gap check + put_nowait--> bounded asyncio.Queue
        --writer task: batches by count (batch_max) and age (batch_age_s)--> Store.write (retried with back-off)
        --after each stored batch--> GapRecord messages published on the gap stream (own task, bounded)

* Persistent session: fixed client id, clean_session=False, QoS 1 subscriptions (FF-02, FF-19), so a
  disconnect costs latency, not data.  Video is not subscribed: it is a live view and is never stored.
* ECG into a store that keeps GHE1 bytes (PostgreSQL): the chunk is checked completely but not decoded into samples
  (:func:`telemetry.ghe1.check_chunk`, which accepts and refuses exactly what the codec does); the store files the
  bytes as received.
* Error boundary: a payload the codec refuses (truncated, wrong types, wrong schema version, non-UTF-8, oversized,
  a unit id that does not match the topic) is counted under its reason and logged as one warning line with the
  topic, reason and size only - never the payload, which is health data.  The loop goes on.
* A failed write (database down or stalled: StoreUnavailableError, or the write deadline) keeps the batch and
  retries with capped exponential back-off and jitter while messages keep queueing; rows the database refuses
  (WriteError) are retried one message at a time and only the refused ones are dropped and counted.
* Gap detection on vitals, ECG and GPS (telemetry.gaps): a jump records a GapRecord in the store and publishes it
  on ``space.topic(Stream.GAP, unit_id)``; late arrivals are stored and shrink the gap (Store.gaps reports what is
  still missing).  A forward jump beyond ``telemetry.gaps.DEFAULT_RESTART_JUMP`` is a sequence restart (a new outbox
  seeded from the clock): recorded and published with ``restart=True`` (unknown loss), not as a range.
  Availability, status and pre-alert seqs are not gap-checked (seq semantics differ).
* Delivery receipts: after each committed batch, per unit, the highest seq through which every message of each of
  the unit's streams (pre-alert, status, vitals, ECG, GPS) is durably dealt with (:class:`StoredWatermarks`) is
  published as a retained :class:`broker_config.StoreReceipt` on ``space.topic(Stream.RECEIPT, unit_id)``, at most
  once per ``receipt_interval_s`` per unit; the crew screen shows "stored" from it.  "Dealt with" includes the rare
  message the store refuses for good (expired, a clock far in the future, rows refused): re-sending would not
  change that, and counting it keeps the watermark moving.  A seq the vehicle never sent (shed by its full outbox)
  holds its stream's watermark until the ingest restarts.  Off in shared-subscription mode (each worker sees only
  part of a unit's sequence).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TypeVar

from pydantic import BaseModel

from broker_config import (
    STREAMS,
    BrokerSettings,
    GapRecord,
    ParsedTopic,
    PayloadError,
    Scope,
    StoreReceipt,
    Stream,
    TopicSpace,
    decode,
    encode,
    utc_now,
)
from broker_config.codec import RejectKind
from broker_config.connection import Backoff, NotConnectedError
from broker_config.paho_link import PahoLink, ReceivedMessage
from broker_config.topics import TopicError, loggable
from telemetry.errors import StoreUnavailableError, WriteError
from telemetry.gaps import DEFAULT_RESTART_JUMP, Arrival, GapTracker
from telemetry.ghe1 import EcgHead, check_chunk
from telemetry.records import GAP_TRACKED_STREAMS, STORED_STREAMS, WriteResult
from telemetry.store import Store

__all__ = [
    "RECEIPT_STREAMS",
    "Ingest",
    "IngestStats",
    "RejectReason",
    "StoredWatermarks",
    "classify_rejection",
    "subscription_filters",
]

logger = logging.getLogger(__name__)

Item = tuple[ParsedTopic, BaseModel | EcgHead, datetime, bytes | None]
"""A decoded message (or, for ECG into a store that files GHE1 bytes, the checked chunk's header), its receive time
and, for ECG, the payload bytes (stored as received: already compressed)."""
OnStored = Callable[[Sequence[Item], datetime], None]


T = TypeVar("T")
_RECEIPT_ROUND = 500
"""Receipts published together (each awaits its own PUBACK) before the next group starts."""
_COLLECT_SLICE_S = 0.02
"""Longest nap of the writer while a batch fills (adds at most this to a message's latency)."""


class RejectReason(StrEnum):
    """Why a message was not stored (the keys of ``IngestStats.rejected``)."""

    TOPIC = "topic"
    OVERSIZED = "oversized"
    NOT_UTF8 = "not_utf8"
    MALFORMED = "malformed"
    """Truncated or otherwise unparseable JSON or GHE1 binary."""
    SCHEMA_VERSION = "schema_version"
    INVALID_FIELDS = "invalid_fields"
    """Wrong types, missing or out-of-range fields."""
    UNIT_MISMATCH = "unit_mismatch"
    """The unit (or hospital) id in the payload is not the one in the topic."""
    QUEUE_FULL = "queue_full"
    STORE_REFUSED = "store_refused"
    EXPIRED = "expired"
    """Older than the stream's retention: there is no partition to keep it in (and it would be dropped anyway)."""
    FUTURE = "future"
    """Time too far ahead of the store's clock to be filed (a device clock gone wrong, FF-07)."""
    OTHER = "other"


_REASON_MARKERS: tuple[tuple[str, RejectReason], ...] = (
    ("does not match the topic", RejectReason.UNIT_MISMATCH),
    ("exceeds the", RejectReason.OVERSIZED),
    ("not valid UTF-8", RejectReason.NOT_UTF8),
    ("schema_version", RejectReason.SCHEMA_VERSION),
    ("invalid fields", RejectReason.INVALID_FIELDS),
    ("invalid values", RejectReason.INVALID_FIELDS),
    ("not valid JSON", RejectReason.MALFORMED),
    ("not a JSON object", RejectReason.MALFORMED),
    ("ECG chunk", RejectReason.MALFORMED),
    ("GHE1", RejectReason.MALFORMED),
    ("ECG sample encoding", RejectReason.MALFORMED),
    ("outside the topic space", RejectReason.TOPIC),
    ("expected {scope}", RejectReason.TOPIC),
    ("unknown scope or stream", RejectReason.TOPIC),
    ("not allowed in this scope", RejectReason.TOPIC),
    ("not an opaque id", RejectReason.TOPIC),
    ("no decodable payload model", RejectReason.TOPIC),
)


def classify_rejection(reason: str) -> RejectReason:
    """Map a :class:`broker_config.PayloadError` reason to a counter key.

    The contract's PayloadError carries only a text ``reason``; this is the single place that reads it (a
    ``kind`` attribute on PayloadError is requested from the contract owners, then this becomes a lookup).
    """
    for marker, kind in _REASON_MARKERS:
        if marker in reason:
            return kind
    return RejectReason.OTHER


def subscription_filters(space: TopicSpace, share_group: str | None = None) -> list[str]:
    """The ingest's QoS 1 subscription filters: every stored unit-scope stream of every unit (video excluded).

    With ``share_group``, each filter is an MQTT shared subscription ``$share/{group}/...`` (load-balanced workers).
    """
    filters = [
        space.filter(stream)
        for stream, spec in STREAMS.items()
        if spec.scope is Scope.UNIT and stream in STORED_STREAMS
    ]
    return [space.shared(share_group, f) for f in filters] if share_group else filters


RECEIPT_STREAMS: tuple[Stream, ...] = (Stream.PREALERT, Stream.STATUS, Stream.VITALS, Stream.ECG, Stream.GPS)
"""Streams whose seq counts every message from 0 (the vehicle's outbox counters): the receipt covers these.
Availability is not among them (its seq is the session number)."""


def _reraise_if_cancelling() -> None:
    """Python 3.11's ``asyncio.wait_for`` (inside aiomqtt's publish) can swallow a cancellation that lands with the
    PUBACK (CPython gh-86296); a loop that publishes must notice it was cancelled, or it never stops."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class StoredWatermarks:
    """Per (unit, stream): the highest seq through which every seq has been stored (``-1`` = none), plus the seqs
    stored above a hole, bounded by ``max_pending`` per stream (beyond it the highest are forgotten: the watermark
    then stops at them until the ingest restarts)."""

    def __init__(self, max_pending: int = 100_000, restart_jump: int = DEFAULT_RESTART_JUMP) -> None:
        self.max_pending = max_pending
        self.restart_jump = restart_jump
        """A seq more than this above the watermark is a sequence restart (telemetry.gaps): the watermark jumps."""
        self._through: dict[str, dict[str, int]] = {}
        self._above: dict[tuple[str, str], set[int]] = {}
        self._below: dict[tuple[str, str], int] = {}
        """Per stream: a seq far below the watermark, waiting for a second to show a restarted counter."""

    def seed(self, unit_id: str, stream: Stream, through: int) -> None:
        """Start from ``through`` (an ingest restart: what the store already holds)."""
        streams = self._through.setdefault(unit_id, {})
        streams[stream.value] = max(through, streams.get(stream.value, -1))

    def add(self, unit_id: str, stream: Stream, seq: int) -> bool:
        """Record a stored seq; True if the unit's watermark moved."""
        streams = self._through.setdefault(unit_id, {})
        through = streams.get(stream.value, -1)
        key = (unit_id, stream.value)
        if seq < through - self.restart_jump:
            # far below the watermark: a late message of the old counter, or the first of a new outbox seeded lower
            # (its clock had run ahead before): the second of a run just above it decides for a new counter
            low = self._below.get(key)
            if low is None or not low < seq <= low + self.restart_jump:
                self._below[key] = seq
                return False
            del self._below[key]
            self._above.pop(key, None)
            through = low
        elif seq <= through:
            return False
        if seq - through - 1 > self.restart_jump:
            # a new outbox seeded from the clock: what came before it is the old outbox's business
            through = seq - 1
            above = self._above.get(key)
            if above is not None:
                above.intersection_update(s for s in above if s > seq)
        if seq != through + 1:
            new_stream = stream.value not in streams
            streams[stream.value] = through  # listed (-1 at first) so the receipt shows the stream
            pending = self._above.setdefault(key, set())
            if len(pending) < self.max_pending:
                pending.add(seq)
            return new_stream
        through = seq
        above = self._above.get(key)
        if above is not None:
            while through + 1 in above:
                through += 1
                above.discard(through)
            if not above:
                del self._above[key]
        streams[stream.value] = through
        return True

    def through(self, unit_id: str) -> dict[str, int]:
        """The unit's watermarks by stream value."""
        return dict(self._through.get(unit_id, {}))


@dataclass(slots=True)
class IngestStats:
    """Counters of one ingest (monotonic since start), safe to read at any time.

    Message counts: ``received`` = every MQTT message; ``rejected`` by :class:`RejectReason`; ``inserted`` and
    ``duplicates`` per stream as reported by the store; ``ignored`` = delivered but not stored (video).
    Gaps: ``gaps_detected`` ranges opened, ``late_fills`` seqs that arrived inside an open range, ``gaps_closed``
    ranges fully filled; ``sequence_restarts`` forward jumps too large to be gaps (telemetry.gaps).
    ``handler_max_s`` is the slowest on_message call (FF-01: must stay in milliseconds).
    """

    received: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    inserted: Counter[Stream] = field(default_factory=Counter)
    duplicates: Counter[Stream] = field(default_factory=Counter)
    ignored: Counter[Stream] = field(default_factory=Counter)
    gaps_detected: int = 0
    late_fills: int = 0
    gaps_closed: int = 0
    gaps_published: int = 0
    sequence_restarts: int = 0
    receipts_published: int = 0
    batches: int = 0
    write_retries: int = 0
    queue_depth: int = 0
    queue_high_water: int = 0
    handler_max_s: float = 0.0
    last_write_s: float = 0.0

    @property
    def total_rejected(self) -> int:
        """All rejected messages."""
        return sum(self.rejected.values())

    def stored(self, stream: Stream) -> int:
        """Messages of ``stream`` that are in the store (inserted now or found already there)."""
        return self.inserted[stream] + self.duplicates[stream]


class Ingest:
    """The telemetry ingest service: MQTT (persistent session) -> bounded queue -> batched store writes.

    Args:
        store: an opened, migrated :class:`telemetry.store.Store`.
        broker: where the broker is.
        space: the topic space (empty prefix in production).
        client_id: fixed MQTT client id; with ``clean_session=False`` the broker queues QoS 1 messages while the
            ingest is away (FF-02).
        batch_max: messages per write at most.
        batch_age_s: a batch is written at the latest this long after its first message arrived.
        queue_max: capacity of the in-memory queue between the receive loop and the writer.
        write_timeout_s: deadline of one store write; past it the write counts as failed and is retried.
        retry_min_s, retry_max_s: back-off bounds for failed writes (capped exponential, full jitter).
        share_group: subscribe through ``$share/{group}/`` so several workers split the load.  Each worker then
            sees only part of every unit's sequence, so the in-memory gap tracker is off and gaps are found in the
            store instead (``PostgresStore.scan_gaps`` every ``gap_scan_interval_s``; one worker at a time).
        gap_scan_interval_s, gap_window_s, gap_settle_s: the store-side gap scan (shared mode): how often, how far
            back in partition time it looks, and how long a jump must have been stored before it is reported.
        on_stored: called after every stored batch with the batch and the commit time (UTC); the benchmark's
            publish-to-commit lag.  Must be quick.
        enqueue_timeout_s: how long the receive loop waits for room when the queue is full before it drops the
            message (counted as ``queue_full``; the next message of that stream then shows the gap).
        max_queued_incoming: messages received but not yet taken by the handler (``max_pending`` of
            :class:`broker_config.paho_link.PahoLink`; QoS 1 messages beyond the broker's in-flight window wait at the
            broker, unacknowledged).
        publish_receipts: publish each unit's retained StoreReceipt (forced off with ``share_group``).
        receipt_interval_s: at most one receipt per unit per this many seconds.
        gap_publish_timeout_s, gap_publish_budget_s: bounds of publishing gap records (their own task, never the
            writer): per record (PUBACK), and per round; unpublished records are kept (up to 10,000) and retried.
    """

    def __init__(
        self,
        store: Store,
        broker: BrokerSettings,
        space: TopicSpace,
        *,
        client_id: str = "goldenhour-ingest",
        batch_max: int = 1000,
        batch_age_s: float = 0.25,
        queue_max: int = 100_000,
        write_timeout_s: float = 30.0,
        retry_min_s: float = 0.2,
        retry_max_s: float = 10.0,
        share_group: str | None = None,
        enqueue_timeout_s: float = 5.0,
        gap_scan_interval_s: float = 2.0,
        gap_window_s: float = 300.0,
        gap_settle_s: float = 3.0,
        on_stored: OnStored | None = None,
        max_queued_incoming: int = 10_000,
        publish_receipts: bool = True,
        receipt_interval_s: float = 1.0,
        gap_publish_timeout_s: float = 5.0,
        gap_publish_budget_s: float = 30.0,
    ) -> None:
        if batch_max < 1 or queue_max < 1 or batch_age_s <= 0 or write_timeout_s <= 0:
            raise ValueError("batch_max, queue_max, batch_age_s and write_timeout_s must be positive")
        self.store = store
        self.space = space
        self.batch_max = batch_max
        self.batch_age_s = batch_age_s
        self.write_timeout_s = write_timeout_s
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.share_group = share_group
        self.enqueue_timeout_s = enqueue_timeout_s
        self.detect_gaps = share_group is None
        self.gap_scan_interval_s = gap_scan_interval_s
        self.gap_window_s = gap_window_s
        self.gap_settle_s = gap_settle_s
        self.on_stored = on_stored
        self.stats = IngestStats()
        self.link = PahoLink(broker, client_id=client_id, clean_session=False, max_pending=max_queued_incoming)
        self._lean_ecg = bool(getattr(store, "files_ghe1", False))
        self.ready = asyncio.Event()
        """Set once the resume state is loaded and the receive loop may start."""
        self._queue: asyncio.Queue[Item] = asyncio.Queue(queue_max)
        self._tracker = GapTracker()
        self._gap_seq: dict[str, int] = {}
        self._unpublished: deque[GapRecord] = deque(maxlen=10_000)
        self._inflight: list[Item] = []
        self._changed = asyncio.Event()
        self._watchers = 0
        self._gaps_wakeup = asyncio.Event()
        self.gap_publish_timeout_s = gap_publish_timeout_s
        self.gap_publish_budget_s = gap_publish_budget_s
        self.publish_receipts = publish_receipts and share_group is None
        self.receipt_interval_s = receipt_interval_s
        self.watermarks = StoredWatermarks()
        self._receipt_due: dict[str, float] = {}
        """Units whose watermark moved since their last receipt -> earliest monotonic time to publish."""
        self._receipt_last: dict[str, float] = {}
        self._receipt_seq: dict[str, int] = {}
        self._receipt_wakeup = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Load the resume state, then receive and write until cancelled.

        On cancellation the messages already taken from the broker are written (bounded by ``write_timeout_s``)
        before returning.  Raises :class:`broker_config.connection.AuthError` if the broker refuses us.
        """
        await self.resume()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.link.run(self._on_connect, self._receive), name="ingest-mqtt")
                tg.create_task(self._writer(), name="ingest-writer")
                tg.create_task(self._gap_publisher(), name="ingest-gaps")
                if self.publish_receipts:
                    tg.create_task(self._receipt_publisher(), name="ingest-receipts")
                if not self.detect_gaps and hasattr(self.store, "scan_gaps"):
                    tg.create_task(self._gap_scanner(), name="ingest-gap-scan")
        finally:
            await self._drain()

    async def resume(self) -> None:
        """Load the highest stored seqs (retrying while the store is unavailable) so that a restart neither
        re-reports old gaps nor reuses GapRecord seqs; then set :attr:`ready`."""
        state = await self._with_retry("load ingest state", self.store.ingest_state)
        self._tracker.seed(state.max_seq)
        for unit_id, top in state.max_gap_seq.items():
            self._gap_seq[unit_id] = max(top, self._gap_seq.get(unit_id, -1))
        if self.publish_receipts:
            await self._seed_watermarks(state.max_seq)
        self.ready.set()

    async def _seed_watermarks(self, max_seq: dict[tuple[str, Stream], int]) -> None:
        """Watermarks after a restart: the highest stored seq, lowered below any gap the store still misses."""
        through = {key: top for key, top in max_seq.items() if key[1] in RECEIPT_STREAMS}
        if not through:
            return
        gaps = await self._with_retry("load open gaps", self.store.gaps)
        for gap in gaps:
            key = (gap.unit_id, gap.stream)
            if gap.missing > 0 and not gap.restart and key in through:
                through[key] = min(through[key], gap.from_seq - 1)
        for (unit_id, stream), top in through.items():
            self.watermarks.seed(unit_id, stream, top)

    async def wait_until(self, predicate: Callable[[IngestStats], bool], timeout_s: float) -> None:
        """Wait until ``predicate(self.stats)`` holds (checked after every change).  Raises TimeoutError."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self.stats):
                await self.changed()

    async def changed(self) -> None:
        """Return at the next change of :attr:`stats` (for callers that watch several ingests at once)."""
        self._watchers += 1
        try:
            await self._changed.wait()
        finally:
            self._watchers -= 1

    def _notify(self) -> None:
        depth = self._queue.qsize()
        self.stats.queue_depth = depth
        if depth > self.stats.queue_high_water:
            self.stats.queue_high_water = depth
        if self._watchers:  # only wait_until() listens: no Event churn per message otherwise
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def _with_retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        backoff = Backoff(self.retry_min_s, self.retry_max_s)
        while True:
            try:
                async with asyncio.timeout(self.write_timeout_s):
                    return await call()
            except (StoreUnavailableError, TimeoutError) as exc:
                delay = max(self.retry_min_s, backoff.next_delay_s())
                logger.warning("%s failed (%s); retry in %.2f s", what, type(exc).__name__, delay)
                await asyncio.sleep(delay)

    # --- receive side (runs in the MQTT loop: no I/O, no waiting except for room in the queue) --------------------

    async def _on_connect(self, link: PahoLink) -> None:
        filters = subscription_filters(self.space, self.share_group)
        await link.subscribe(filters, qos=1, timeout_s=10)
        logger.info("ingest subscribed filters=%d session=%d", len(filters), self.link.sessions)

    async def _on_message(self, message: ReceivedMessage) -> None:
        """Receive one message, waiting for room in the queue if it must (see :meth:`_receive`)."""
        pending = self._receive(message)
        if pending is not None:
            await pending

    def _receive(self, message: ReceivedMessage) -> Awaitable[None] | None:
        """The receive loop's handler: decode, enqueue, gap-check, without a coroutine per message.

        Returns None when the message is dealt with; an awaitable only when the queue is full and the loop must
        wait for room (back-pressure, bounded by ``enqueue_timeout_s``)."""
        started = time.monotonic()
        received_at = utc_now()
        topic = str(message.topic)
        payload = message.payload
        self.stats.received += 1
        try:
            if not isinstance(payload, bytes | bytearray):
                raise PayloadError(topic, "payload is not valid JSON (truncated or malformed)")
            parsed, model = self._decode(topic, bytes(payload))
        except PayloadError as exc:
            kind = classify_rejection(exc.reason)
            self.stats.rejected[kind] += 1
            size = len(payload) if isinstance(payload, bytes | bytearray) else 0
            logger.warning(
                "message rejected topic=%s reason=%s kind=%s bytes=%d",
                loggable(topic),
                loggable(exc.reason),
                kind,
                size,
            )
            self._notify()
            return None
        if parsed.stream not in STORED_STREAMS:
            self.stats.ignored[parsed.stream] += 1
            return None
        wire = bytes(payload) if parsed.stream is Stream.ECG else None
        item: Item = (parsed, model, received_at, wire)
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            return self._receive_waiting(item)
        if self.detect_gaps and parsed.stream in GAP_TRACKED_STREAMS:
            gap = self._track(parsed, model, received_at)
            if gap is not None:
                try:
                    self._queue.put_nowait(gap)
                except asyncio.QueueFull:
                    return self._enqueue_gap(gap)
        self._notify()
        elapsed = time.monotonic() - started
        if elapsed > self.stats.handler_max_s:
            self.stats.handler_max_s = elapsed
        return None

    async def _receive_waiting(self, item: Item) -> None:
        """:meth:`_receive` with a full queue: wait (bounded) for room, drop and count past the deadline."""
        parsed, model, received_at = item[0], item[1], item[2]
        if not await self._enqueue(item):
            self.stats.rejected[RejectReason.QUEUE_FULL] += 1
            logger.warning(
                "message dropped, queue full unit=%s stream=%s seq=%s",
                parsed.owner_id,
                parsed.stream,
                getattr(model, "seq", None),
            )
            self._notify()
            return
        if self.detect_gaps and parsed.stream in GAP_TRACKED_STREAMS:
            gap = self._track(parsed, model, received_at)
            if gap is not None:
                await self._enqueue_gap(gap)
        self._notify()

    async def _enqueue_gap(self, gap: Item) -> None:
        if not await self._enqueue(gap):
            logger.error("gap record dropped, queue full unit=%s stream=%s", gap[0].owner_id, gap[1].stream)  # type: ignore[union-attr]

    def _decode(self, topic: str, payload: bytes) -> tuple[ParsedTopic, BaseModel | EcgHead]:
        """The codec's decode; for ECG into a store that files GHE1 bytes, the lean complete check instead (no
        samples or model built: telemetry.ghe1).  Raises PayloadError."""
        if self._lean_ecg:
            try:
                parsed = self.space.parse(topic)
            except TopicError as exc:
                raise PayloadError(topic, exc.reason, RejectKind.TOPIC) from None
            if parsed.stream is Stream.ECG:
                limit = STREAMS[Stream.ECG].max_payload_bytes
                if len(payload) > limit:
                    raise PayloadError(
                        topic, f"payload {len(payload)} B exceeds the {limit} B limit", RejectKind.OVERSIZED
                    )
                return parsed, check_chunk(payload, topic=topic, unit_id=parsed.owner_id)
        return decode(self.space, topic, payload)

    async def _enqueue(self, item: Item) -> bool:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            try:
                async with asyncio.timeout(self.enqueue_timeout_s):
                    await self._queue.put(item)
            except TimeoutError:
                return False
        return True

    def _track(self, parsed: ParsedTopic, model: BaseModel | EcgHead, received_at: datetime) -> Item | None:
        """Gap-check one enqueued message; returns the GapRecord item to store when it opens a gap or a restart."""
        unit_id = parsed.owner_id
        seq = int(getattr(model, "seq", 0))
        observed = self._tracker.observe(unit_id, parsed.stream, seq)
        restart = observed.arrival is Arrival.RESTART
        if (observed.arrival is Arrival.GAP or restart) and observed.gap is not None:
            lo, hi = observed.gap
            gap_seq = self._gap_seq.get(unit_id, -1) + 1
            self._gap_seq[unit_id] = gap_seq
            record = GapRecord(
                unit_id=unit_id,
                seq=gap_seq,
                sent_at=received_at,
                stream=parsed.stream.value,
                from_seq=lo,
                to_seq=hi,
                detected_at=received_at,
                restart=restart,
            )
            if restart:
                self.stats.sequence_restarts += 1
                logger.warning(
                    "sequence restart unit=%s stream=%s after_seq=%d new_seq=%d", unit_id, parsed.stream, lo - 1, seq
                )
            else:
                self.stats.gaps_detected += 1
                logger.warning("sequence gap unit=%s stream=%s from_seq=%d to_seq=%d", unit_id, parsed.stream, lo, hi)
            return (ParsedTopic(Scope.TELEMETRY, unit_id, Stream.GAP), record, received_at, None)
        if observed.arrival is Arrival.LATE_FILL:
            self.stats.late_fills += 1
            if observed.gap_closed:
                self.stats.gaps_closed += 1
                logger.info("sequence gap filled unit=%s stream=%s seq=%d", unit_id, parsed.stream, seq)
        return None

    # --- write side -----------------------------------------------------------------------------------------------

    async def _writer(self) -> None:
        while True:
            batch = await self._collect()
            if batch:
                self._inflight = batch
                await self._store_batch(batch)
                self._inflight = []

    async def _collect(self) -> list[Item]:
        """The next batch: waits (bounded) for a first message, then up to ``batch_age_s`` for more.

        While the batch fills, the writer drains the queue in slices of at most ``_COLLECT_SLICE_S`` instead of
        waking for every message (one timer per slice, not per message)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(max(1.0, self.batch_age_s)):
                first = await self._queue.get()
        except TimeoutError:
            return []
        batch = [first]
        deadline = loop.time() + self.batch_age_s
        while True:
            while len(batch) < self.batch_max:
                try:
                    batch.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            remaining = deadline - loop.time()
            if len(batch) >= self.batch_max or remaining <= 0:
                return batch
            await asyncio.sleep(min(remaining, _COLLECT_SLICE_S))

    async def _store_batch(self, batch: list[Item]) -> None:
        """Write ``batch`` until it is stored: retry while the store is unavailable; isolate refused messages."""
        try:
            result = await self._write_retrying(batch)
        except WriteError as exc:
            logger.warning("store refused a batch of %d (%s); writing one by one", len(batch), exc.cause)
            result = WriteResult()
            for item in batch:
                try:
                    result.add(await self._write_retrying([item]))
                except WriteError as item_exc:
                    parsed, model = item[0], item[1]
                    self.stats.rejected[RejectReason.STORE_REFUSED] += 1
                    logger.warning(
                        "message refused by the store unit=%s stream=%s seq=%s sqlstate=%s",
                        parsed.owner_id,
                        parsed.stream,
                        getattr(model, "seq", None),
                        item_exc.sqlstate,
                    )
        self.stats.inserted.update(result.inserted)
        self.stats.duplicates.update(result.duplicates)
        self.stats.ignored.update(result.ignored)
        for reason, counts in ((RejectReason.EXPIRED, result.expired), (RejectReason.FUTURE, result.future)):
            if counts:
                self.stats.rejected[reason] += sum(counts.values())
                logger.warning(
                    "messages refused by retention reason=%s streams=%s",
                    reason,
                    ",".join(f"{s.value}:{n}" for s, n in sorted(counts.items())),
                )
        self.stats.batches += 1
        if self.publish_receipts:
            self._advance_watermarks(batch)
        if self.on_stored is not None:
            self.on_stored(batch, utc_now())
        gaps = [i[1] for i in batch if i[0].stream is Stream.GAP and isinstance(i[1], GapRecord)]
        if gaps:
            self._unpublished.extend(gaps)
            self._gaps_wakeup.set()
        self._notify()

    async def _write_retrying(self, batch: list[Item]) -> WriteResult:
        backoff = Backoff(self.retry_min_s, self.retry_max_s)
        while True:
            started = time.monotonic()
            try:
                async with asyncio.timeout(self.write_timeout_s):
                    result = await self.store.write(batch)
            except (StoreUnavailableError, TimeoutError) as exc:
                self.stats.write_retries += 1
                delay = max(self.retry_min_s, backoff.next_delay_s())
                logger.warning(
                    "store write failed batch=%d cause=%s queued=%d; retry in %.2f s",
                    len(batch),
                    getattr(exc, "cause", type(exc).__name__),
                    self._queue.qsize(),
                    delay,
                )
                self._notify()
                await asyncio.sleep(delay)
                continue
            self.stats.last_write_s = time.monotonic() - started
            return result

    # --- delivery receipts ----------------------------------------------------------------------------------------

    def _advance_watermarks(self, batch: Sequence[Item]) -> None:
        """After a committed batch: move the watermarks and schedule a receipt for every unit that moved."""
        now = time.monotonic()
        moved = False
        for item in batch:
            parsed, model = item[0], item[1]
            if parsed.scope is not Scope.UNIT or parsed.stream not in RECEIPT_STREAMS:
                continue
            seq = getattr(model, "seq", None)
            if isinstance(seq, int) and self.watermarks.add(parsed.owner_id, parsed.stream, seq):
                unit_id = parsed.owner_id
                if unit_id not in self._receipt_due:
                    last = self._receipt_last.get(unit_id, -1e9)
                    self._receipt_due[unit_id] = max(now, last + self.receipt_interval_s)
                    moved = True
        if moved:
            self._receipt_wakeup.set()

    async def _receipt_publisher(self) -> None:
        """Publish due receipts (retained, QoS 1); a unit's receipt at most once per ``receipt_interval_s``."""
        while True:
            now = time.monotonic()
            due = [unit_id for unit_id, at in self._receipt_due.items() if at <= now]
            if due and self.link.connected.is_set():
                # one round in flight together (paho queues beyond its in-flight window): a round costs one round
                # trip to the broker, not one per unit
                for start in range(0, len(due), _RECEIPT_ROUND):
                    published = await asyncio.gather(*map(self._publish_receipt, due[start : start + _RECEIPT_ROUND]))
                    _reraise_if_cancelling()
                    if not all(published):
                        break
                continue
            wait_s = min((at - now for at in self._receipt_due.values()), default=1.0)
            self._receipt_wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(max(wait_s, 0.01), 1.0)):
                    await self._receipt_wakeup.wait()

    async def _publish_receipt(self, unit_id: str) -> bool:
        self._receipt_due.pop(unit_id, None)
        self._receipt_last[unit_id] = time.monotonic()
        now_utc = utc_now()
        seq = max(self._receipt_seq.get(unit_id, -1) + 1, int(now_utc.timestamp() * 1000))
        receipt = StoreReceipt(
            unit_id=unit_id,
            seq=seq,
            sent_at=now_utc,
            stored_through_seq=self.watermarks.through(unit_id),
            stored_at=now_utc,
        )
        try:
            await self.link.publish(
                self.space.topic(Stream.RECEIPT, unit_id),
                encode(Stream.RECEIPT, receipt),
                qos=STREAMS[Stream.RECEIPT].qos,
                retain=STREAMS[Stream.RECEIPT].retain,
                timeout_s=5,
            )
        except NotConnectedError:
            logger.info("receipt not confirmed unit=%s; retried", unit_id)
            self._receipt_due.setdefault(unit_id, time.monotonic() + self.receipt_interval_s)
            return False
        self._receipt_seq[unit_id] = seq
        self.stats.receipts_published += 1
        self._notify()
        return True

    async def _gap_publisher(self) -> None:
        """Publish stored gap records in their own task: the writer never waits on the network for them."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._gaps_wakeup.wait()
            self._gaps_wakeup.clear()
            await self._publish_gaps()

    async def _publish_gaps(self) -> None:
        """Publish queued gap records, each bounded by ``gap_publish_timeout_s`` and all of them together by
        ``gap_publish_budget_s``; what is left (link down, budget spent) is kept for the next round."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.gap_publish_budget_s):
                await self._publish_gaps_unbounded()

    async def _publish_gaps_unbounded(self) -> None:
        while self._unpublished and self.link.connected.is_set():
            record = self._unpublished[0]
            try:
                await self.link.publish(
                    self.space.topic(Stream.GAP, record.unit_id),
                    encode(Stream.GAP, record),
                    qos=STREAMS[Stream.GAP].qos,
                    retain=STREAMS[Stream.GAP].retain,
                    timeout_s=self.gap_publish_timeout_s,
                )
            except NotConnectedError:
                return  # kept; retried in the next round
            _reraise_if_cancelling()
            self._unpublished.popleft()
            self.stats.gaps_published += 1
            self._notify()

    async def _gap_scanner(self) -> None:
        """Shared mode: find gaps in the store (every worker tries; the store lets one scan at a time)."""
        scan = self.store.scan_gaps  # type: ignore[attr-defined]
        while True:
            await asyncio.sleep(self.gap_scan_interval_s)
            try:
                async with asyncio.timeout(self.write_timeout_s):
                    records = await scan(window_s=self.gap_window_s, settle_s=self.gap_settle_s)
            except (StoreUnavailableError, TimeoutError) as exc:
                logger.warning("gap scan failed (%s); next in %.1f s", type(exc).__name__, self.gap_scan_interval_s)
                continue
            for record in records or ():
                if record.restart:
                    self.stats.sequence_restarts += 1
                else:
                    self.stats.gaps_detected += 1
                self.stats.inserted[Stream.GAP] += 1
                logger.warning(
                    "sequence %s unit=%s stream=%s from_seq=%d to_seq=%d",
                    "restart" if record.restart else "gap",
                    record.unit_id,
                    record.stream,
                    record.from_seq,
                    record.to_seq,
                )
                self._unpublished.append(record)
            if records:
                self._gaps_wakeup.set()
                self._notify()

    async def _drain(self) -> None:
        """On shutdown: write the in-flight batch and whatever is queued, bounded by ``write_timeout_s``."""
        pending = list(self._inflight)
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        self._inflight = []
        if not pending:
            return
        try:
            async with asyncio.timeout(self.write_timeout_s):
                for start in range(0, len(pending), self.batch_max):
                    await self._store_batch(pending[start : start + self.batch_max])
        except TimeoutError:
            logger.error("shutdown: %d received messages could not be stored in time", len(pending))
