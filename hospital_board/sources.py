"""Adapters feeding the board: the MQTT subscription (with its error boundary) and the resync from dispatch.

MQTT path (FF-01): the link's message callback only parses the topic and enqueues the raw bytes on a bounded
queue, returning at once; one worker task decodes (:func:`broker_config.decode`), applies the model to the
:class:`~hospital_board.state.BoardState` and hands the resulting events to the :class:`~hospital_board.feed.FeedHub`.
Every failure is counted by reason and logged with identifiers only (topic, unit or hospital id, seq, size),
never payload contents; the loop goes on.

Alerts, acknowledgements, availability and status travel on a separate control queue that is drained first and
never dropped (a full one makes the callback wait, bounded, so QoS 1 back-pressure reaches the broker);
telemetry (vitals, ECG, GPS) is dropped and counted when its queue is full, because a newer sample follows.

Resync (:class:`AlertResync`): alerts are not retained on the broker, so a board that restarts (or whose broker
session was lost) would forget open alerts.  At start-up and after every MQTT (re)connect, a separate task asks
dispatch for the open alerts (bounded timeout), applies them (live messages always win), and on failure logs and
retries with capped, jittered back-off, never touching the MQTT receive loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from broker_config import (
    STREAMS,
    AlertAck,
    AlertState,
    Availability,
    Department,
    EcgChunk,
    GapRecord,
    GpsFix,
    HospitalAlert,
    ParsedTopic,
    PayloadError,
    Status,
    Stream,
    TopicError,
    TopicSpace,
    Vitals,
    decode,
    encode,
    utc_now,
)
from broker_config.connection import Backoff, NotConnectedError
from broker_config.paho_link import PahoLink, ReceivedMessage
from broker_config.topics import loggable
from hospital_board.dispatch_client import DispatchClient, DispatchUnavailableError, HospitalDirectory
from hospital_board.feed import FeedHub
from hospital_board.state import BoardError, BoardEvent, BoardState

__all__ = ["BOARD_STREAMS", "AckSequence", "AlertResync", "BoardIngest", "HospitalDirectory"]

logger = logging.getLogger(__name__)

BOARD_STREAMS: tuple[Stream, ...] = (
    Stream.ALERT,
    Stream.ACK,
    Stream.AVAILABILITY,
    Stream.STATUS,
    Stream.VITALS,
    Stream.ECG,
    Stream.GPS,
    Stream.GAP,
)
"""Streams the board subscribes to, for every hospital and every unit."""

_CONTROL = frozenset({Stream.ALERT, Stream.ACK, Stream.AVAILABILITY, Stream.STATUS, Stream.GAP})
_LOG_FIRST_N = 10
_LOG_EVERY_N = 1_000
_RECEIPT_ATTEMPTS = 5
_RECEIPT_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class _Inbound:
    parsed: ParsedTopic
    topic: str
    payload: bytes


class AckSequence:
    """``seq`` for the board's own AlertAcks: strictly increasing and, being seeded from the wall clock in
    microseconds, not repeated after a restart (the envelope's "never repeats" rule)."""

    def __init__(self, clock_us: Callable[[], int] = lambda: time.time_ns() // 1_000) -> None:
        self._clock_us = clock_us
        self._last = -1

    def next(self) -> int:
        """The next sequence number."""
        self._last = max(self._last + 1, self._clock_us())
        return self._last


class BoardIngest:
    """MQTT -> state -> feed, plus the ``on_board`` delivery receipts.

    Attributes:
        rejects: dropped messages by reason (numbers in reasons are folded to ``#`` so the keys stay few).
        accepted: messages applied, by stream name.
    """

    def __init__(
        self,
        state: BoardState,
        hub: FeedHub,
        space: TopicSpace,
        link: PahoLink,
        *,
        queue_items: int = 20_000,
        publish_timeout_s: float = 5.0,
        clock: Callable[[], datetime] = utc_now,
        ack_seq: AckSequence | None = None,
    ) -> None:
        self.state = state
        self.hub = hub
        self.space = space
        self.link = link
        self.publish_timeout_s = publish_timeout_s
        self.clock = clock
        self.ack_seq = ack_seq or AckSequence()
        self._control: deque[_Inbound] = deque()
        self._telemetry: deque[_Inbound] = deque()
        self._queue_items = queue_items
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._receipts: asyncio.Queue[HospitalAlert] = asyncio.Queue(maxsize=1_000)
        self.rejects: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self.receipts_sent = 0
        self.on_session: Callable[[], None] | None = None
        """Called after every (re)subscription: the resync's trigger."""

    # --- MQTT callbacks (fast) -------------------------------------------------------------------------------

    async def on_connect(self, link: PahoLink) -> None:
        """Subscribe to every hospital's alert/ack stream and every unit's availability/status/vitals/ecg/gps."""
        await link.subscribe([(self.space.filter(s), STREAMS[s].qos) for s in BOARD_STREAMS])
        logger.info("board subscribed streams=%d", len(BOARD_STREAMS))
        if self.on_session is not None:
            self.on_session()

    async def on_message(self, message: ReceivedMessage) -> None:
        """Enqueue only (FF-01).  Telemetry beyond the queue is dropped and counted (the next reading replaces it);
        alerts and acknowledgements are never dropped: a full control queue is waited out while the link stops
        reading (:class:`broker_config.paho_link.PahoLink`: the broker keeps the rest)."""
        topic = str(message.topic)
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            self.reject(topic, None, 0, "payload is not bytes")
            return
        try:
            parsed = self.space.parse(topic)
        except TopicError as exc:
            self.reject(topic, None, len(payload), exc.reason)
            return
        item = _Inbound(parsed, topic, bytes(payload))
        if parsed.stream in _CONTROL:
            while len(self._control) >= self._queue_items:
                self._room.clear()
                await self._room.wait()
            self._control.append(item)
        else:
            if len(self._telemetry) >= self._queue_items:
                self.reject(topic, parsed.owner_id, len(payload), "telemetry queue full")
                return
            self._telemetry.append(item)
        self._wake.set()

    # --- worker --------------------------------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Messages waiting to be applied."""
        return len(self._control) + len(self._telemetry)

    async def run(self, idle_wait_s: float = 1.0) -> None:
        """Apply queued messages forever (control first).  Returns only when cancelled."""
        while True:
            if not self._control and not self._telemetry:
                self._wake.clear()
                try:
                    async with asyncio.timeout(idle_wait_s):
                        await self._wake.wait()
                except TimeoutError:
                    continue
            for _ in range(256):
                if self._control:
                    item = self._control.popleft()
                    self._room.set()
                elif self._telemetry:
                    item = self._telemetry.popleft()
                else:
                    break
                self.handle(item.topic, item.payload, item.parsed.owner_id)
            await asyncio.sleep(0)  # yield to the feed senders between batches

    def handle(self, topic: str, payload: bytes, owner: str | None = None) -> None:
        """Decode and apply one message inside the error boundary: never raises.  ``owner`` (unit or hospital
        id from the topic) is only for the log line."""
        try:
            parsed, model = decode(self.space, topic, payload, received_at=self.clock())
            events = self._apply(model)
        except PayloadError as exc:
            self.reject(topic, owner, len(payload), exc.reason)
            return
        except BoardError as exc:
            self.reject(topic, owner, len(payload), f"{type(exc).__name__}")
            return
        except Exception as exc:  # noqa: BLE001 - the per-message error boundary (STYLE.md "never die on input")
            self.reject(topic, owner, len(payload), f"handler error {type(exc).__name__}")
            return
        self.accepted[parsed.stream.value] += 1
        self.hub.publish(events)

    def _apply(self, model: object) -> list[BoardEvent]:
        now_at = self.clock()
        state = self.state
        if isinstance(model, HospitalAlert):
            events, is_new = state.apply_alert(model, now_at)
            if is_new and not model.historical:
                try:
                    self._receipts.put_nowait(model)
                except asyncio.QueueFull:
                    self.rejects["receipt queue full"] += 1
            return events
        if isinstance(model, Vitals):
            return state.apply_vitals(model, now_at)
        if isinstance(model, EcgChunk):
            return state.apply_ecg(model, now_at)
        if isinstance(model, GpsFix):
            return state.apply_gps(model, now_at)
        if isinstance(model, Availability):
            return state.apply_availability(model, now_at)
        if isinstance(model, Status):
            return state.apply_status(model, now_at)
        if isinstance(model, AlertAck):
            return state.apply_ack(model, now_at)
        if isinstance(model, GapRecord):
            return state.apply_gap(model, now_at)
        return []

    def apply_resync(self, alerts: list[HospitalAlert]) -> int:
        """Apply alerts rebuilt from dispatch (never raises); returns how many the board did not know."""
        added = 0
        for alert in alerts:
            try:
                events, needs_receipt = self.state.apply_resync(alert, self.clock())
            except BoardError as exc:
                self.rejects[f"resync {type(exc).__name__}"] += 1
                continue
            if events:
                added += 1
            self.hub.publish(events)
            if needs_receipt:
                try:
                    self._receipts.put_nowait(alert)
                except asyncio.QueueFull:
                    self.rejects["receipt queue full"] += 1
        return added

    def reject(self, topic: str, owner_id: str | None, size_bytes: int, reason: str) -> None:
        """Count and log one dropped message: identifiers and sizes only, never contents."""
        key = re.sub(r"\d{2,}", "#", reason)[:120]
        self.rejects[key] += 1
        n = self.rejects[key]
        if n <= _LOG_FIRST_N or n % _LOG_EVERY_N == 0:
            logger.warning(
                "board dropped message topic=%s owner=%s bytes=%d reason=%s count=%d",
                loggable(topic),
                owner_id,
                size_bytes,
                key,
                n,
            )

    # --- receipts and acknowledgements ---------------------------------------------------------------------------

    async def publish_ack(
        self,
        *,
        alert_id: str,
        unit_id: str,
        hospital_id: str,
        state: AlertState,
        by_role: str,
        at: datetime,
        department: Department | None = None,
    ) -> None:
        """Publish an AlertAck on the hospital's ack stream (QoS 1, PUBACK awaited within the timeout).

        Raises:
            NotConnectedError: the broker link is down or did not confirm in time.
        """
        ack = AlertAck(
            unit_id=unit_id,
            seq=self.ack_seq.next(),
            sent_at=self.clock(),
            alert_id=alert_id,
            hospital_id=hospital_id,
            state=state,
            department=department,
            by_role=by_role,
            at=at,
        )
        spec = STREAMS[Stream.ACK]
        await self.link.publish(
            self.space.topic(Stream.ACK, hospital_id),
            encode(Stream.ACK, ack),
            qos=spec.qos,
            retain=spec.retain,
            timeout_s=self.publish_timeout_s,
        )

    async def run_receipts(self) -> None:
        """Publish ``on_board`` receipts for newly displayed alerts, retrying a few times while the link is down."""
        while True:
            alert = await self._receipts.get()
            for attempt in range(_RECEIPT_ATTEMPTS):
                try:
                    await self.publish_ack(
                        alert_id=alert.alert_id,
                        unit_id=alert.unit_id,
                        hospital_id=alert.hospital_id,
                        state=AlertState.ON_BOARD,
                        by_role="board",
                        at=self.clock(),
                    )
                except NotConnectedError:
                    logger.warning("on_board receipt not confirmed alert=%s attempt=%d", alert.alert_id, attempt + 1)
                    await asyncio.sleep(_RECEIPT_RETRY_S)
                    continue
                self.receipts_sent += 1
                self.hub.publish(self.state.mark_on_board(alert.alert_id, self.clock()))
                break
            else:
                self.rejects["receipt not confirmed"] += 1


class AlertResync:
    """Re-reads open alerts from dispatch at start-up and after each MQTT (re)connect.

    Attributes:
        runs_ok: successful resyncs.  failures: failed attempts.  alerts_added: alerts the board did not know.
        done: set after each successful resync (tests wait on it); cleared by :meth:`trigger`.
    """

    def __init__(
        self,
        dispatch: DispatchClient,
        ingest: BoardIngest,
        *,
        max_age_s: float,
        retry_min_s: float = 1.0,
        retry_max_s: float = 30.0,
    ) -> None:
        self.dispatch = dispatch
        self.ingest = ingest
        self.max_age_s = max_age_s
        self.backoff = Backoff(retry_min_s, max(retry_min_s, retry_max_s))
        self._floor_s = retry_min_s / 2  # full jitter may draw ~0: never retry in a hot loop
        self._wanted = asyncio.Event()
        self.done = asyncio.Event()
        self.runs_ok = 0
        self.failures = 0
        self.alerts_added = 0

    def trigger(self) -> None:
        """Ask for a resync (cheap, callable from the MQTT connect callback)."""
        self.done.clear()
        self._wanted.set()

    async def run(self) -> None:
        """Resync whenever triggered; retry failures with back-off until one succeeds.  Returns when cancelled."""
        if not self.dispatch.configured:
            return
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            while True:
                try:
                    alerts = await self.dispatch.open_alerts(self.ingest.clock(), self.max_age_s)
                except DispatchUnavailableError as exc:
                    self.failures += 1
                    delay = max(self._floor_s, self.backoff.next_delay_s())
                    logger.warning("alert resync from dispatch failed reason=%s retry_in_s=%.1f", exc.reason, delay)
                    try:
                        async with asyncio.timeout(delay):
                            await self._wanted.wait()  # a new trigger retries at once
                        self._wanted.clear()
                    except TimeoutError:
                        pass
                    continue
                self.backoff.reset()
                added = self.ingest.apply_resync(alerts)
                self.alerts_added += added
                self.runs_ok += 1
                logger.info("alert resync done listed=%d added=%d", len(alerts), added)
                self.done.set()
                break
