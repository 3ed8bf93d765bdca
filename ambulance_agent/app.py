"""The in-vehicle agent: sources -> durable outbox -> MQTT, and dispatch's notices back to the crew.

Tasks, all in one ``asyncio.TaskGroup`` (structured concurrency):

* ``MqttLink.run``: the broker session; will = Availability ``offline`` (retained, seq = session number); on
  every connect: subscribe to the unit's notices, then publish the birth (Availability ``online``, retained, same
  session number).  Its ``on_message`` callback only enqueues (bounded) and returns (FF-01).
* one acquisition task per source: builds contract models and hands them to a bounded in-memory queue without
  ever waiting on disk or network (a full queue drops and counts);
* the outbox writer: allocates each stream's ``seq`` and stores the encoded message durably (off the loop thread);
  a 12-lead ECG chunk carries III, aVR, aVL and aVF as residuals from I and II (lossless, see broker_config.codec);
* the sender: publishes from the outbox in priority order with at most ``max_in_flight`` messages in flight, each
  publish bounded by ``publish_timeout_s`` (FF-03); only a PUBACK deletes a message, anything else leaves it for a
  re-send (the store de-duplicates by (unit, stream, seq));
* the notice handler: decodes dispatch's notices through the contract inside a per-message error boundary;
* a watchdog that warns when the oldest unsent message gets older than ``stale_after_s`` (FF-03).

Uplink order (:mod:`ambulance_agent.outbox`, :mod:`ambulance_agent.uplink`): pre-alerts, then availability and
status, oldest first; then live telemetry (stored less than ``live_window_s`` ago) by priority - vitals, ECG,
GPS - newest first; then the backlog by priority, oldest first; video last, only with spare budget.  With a
bandwidth budget (fixed ``bandwidth_bps`` or measured from PUBACK delays) the sender paces telemetry to the budget so
the link's buffers stay short and a pre-alert never queues behind seconds of ECG; crew messages never wait for it.

Telemetry (vitals, ECG, GPS) still in the outbox ``live_window_s`` after it was stored is re-flagged
``historical`` when finally sent, so a replay never fires live alarms (Sparkplug B's store-and-forward rule), and
is published without the retain flag, so a replayed old position never replaces the unit's retained latest one.

Delivery (:mod:`ambulance_agent.delivery`): the agent subscribes to its own retained
:class:`broker_config.StoreReceipt`, and tracks for each pre-alert and ECG chunk when it was queued, sent (PUBACK),
stored (receipt) and, for pre-alerts, shown on the board and acknowledged (dispatch's notices).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import aiomqtt
from pydantic import BaseModel, ValidationError

from ambulance_agent.crypto import UnitCipher
from ambulance_agent.delivery import DeliveryTracker
from ambulance_agent.heart_rate import HeartRateEstimator, HeartRateResult, heart_rate_from_ecg
from ambulance_agent.outbox import DEFAULT_MAX_BYTES, Outbox, OutboxMessage
from ambulance_agent.sources.base import (
    EcgBlock,
    EcgSource,
    GpsReading,
    GpsSource,
    Source,
    VitalsReading,
    VitalsSource,
)
from ambulance_agent.uplink import BandwidthEstimator, TokenBucket, WireStats, wire_size
from ambulance_agent.video import CameraFrame, Rendition, choose_rendition, encode_video_frame
from broker_config import (
    STREAMS,
    AlertState,
    Availability,
    BrokerSettings,
    CaseType,
    CrewStatus,
    EcgChunk,
    Findings,
    GpsFix,
    Notice,
    NoticeKind,
    PayloadError,
    PreAlert,
    Status,
    StoreReceipt,
    Stream,
    TopicSpace,
    Vitals,
    decode,
    encode,
    utc_now,
    valid_id,
)
from broker_config.connection import MqttLink, NotConnectedError, Will
from broker_config.topics import loggable

__all__ = ["Agent", "LinkHealth"]

logger = logging.getLogger(__name__)

_TELEMETRY = frozenset({Stream.VITALS, Stream.ECG, Stream.GPS})
_CREW_PRIORITY = 1
"""Pre-alerts (0), availability and status (1) never wait for the bandwidth budget."""
_IDLE_S = 1.0
"""Upper bound of every idle wait of the internal loops (they re-check their state at least this often)."""
_BURST_S = 0.2
"""Bucket size of the bandwidth budget in seconds of its rate (a pre-alert waits at most about this long)."""
_MIN_BURST_BYTES = 1_500


@dataclass(frozen=True, slots=True)
class LinkHealth:
    """What the crew's screen shows about the uplink.

    ``watchdog_stale``: the oldest unsent message is older than ``stale_after_s`` (FF-03).  ``budget_bps``: the
    current bandwidth budget in bit/s (None = unlimited); ``queue_delay_s``: the latest queueing delay measured in
    front of the link.  ``stored_through``: the store's latest receipt per stream.
    """

    connected: bool
    backlog_count: int
    backlog_bytes: int
    oldest_unsent_age_s: float | None
    session: int | None
    shed: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    publish_failures: int = 0
    watchdog_stale: bool = False
    stale_after_s: float = 30.0
    in_flight: int = 0
    budget_bps: float | None = None
    queue_delay_s: float | None = None
    last_ack_age_s: float | None = None
    ecg_bytes_per_sample: float | None = None
    stored_through: dict[str, int] = field(default_factory=dict)
    receipt_age_s: float | None = None


@dataclass(frozen=True, slots=True)
class _Pending:
    stream: Stream
    build: Callable[[int, datetime], BaseModel]
    """(seq, sent_at) -> contract model."""
    start_at: datetime | None = None
    """ECG: the chunk's first sample time (for delivery tracking)."""


def _reraise_if_cancelling() -> None:
    """A loop that publishes must notice a cancellation swallowed by Python 3.11's ``asyncio.wait_for`` inside aiomqtt
    (CPython gh-86296, see :meth:`Agent._link_loop`), or it never stops."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for ``event`` at most ``timeout_s``; True if it is set."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


def _flagged(flags: tuple[bool, ...], lead: int) -> bool:
    """Whether per-lead ``flags`` (empty = not reported) mark ``lead``."""
    return lead < len(flags) and flags[lead]


class Agent:
    """The ambulance's agent (see the module docstring).

    Args:
        unit_id: the unit's opaque id (``[A-Za-z0-9_-]{1,32}``).
        broker: broker settings (``broker_config.BrokerSettings``).
        space: topic space (empty prefix in production).
        outbox_path: SQLite outbox file; survives restarts (sequence and session counters too).
        ecg, vitals, gps: acquisition sources, any of them None.
        vitals_interval_s: with ECG but no vitals source, an ECG-derived heart-rate-only Vitals every this many
            seconds of ECG data time.
        outbox_max_bytes: outbox payload budget (see :mod:`ambulance_agent.outbox`).
        max_in_flight: publishes awaiting PUBACK at once.
        publish_timeout_s: bound of each publish (FF-03).
        retry_delay_s: pause of the sender after a failed publish.
        live_window_s: telemetry older than this when sent is flagged ``historical`` (and counts as backlog).
        stale_after_s: the watchdog warns when the oldest unsent message is older.
        bandwidth_bps: a fixed uplink budget in bit/s (None: unlimited unless ``adaptive_bandwidth``).
        adaptive_bandwidth: measure the budget from PUBACK queueing delays, starting at ``bandwidth_bps`` (or
            32 kbit/s: a low start only delays the backlog, an overshoot delays pre-alerts) and staying within
            [16 kbit/s, ``bandwidth_max_bps``].
        bandwidth_max_bps: upper bound of the measured budget.
        video: camera frames (:mod:`ambulance_agent.video`): sent last, QoS 0, never stored, at most ``video_fps``
            per second, sized to the spare budget.
        hr_window_s: heart-rate sliding window, seconds.
        on_notice: optional callback for every accepted Notice (called on the event loop; must be quick).
        clock: UTC clock for ``sent_at`` and crew taps.
        client_id: MQTT client id (default ``agent-{unit_id}``); the session is persistent (clean session off).
        cipher: the unit's key sealing the outbox at rest (:mod:`ambulance_agent.crypto`; None: clear, tests only).

    Raises:
        TopicError: invalid ``unit_id``.
        OutboxError: the outbox file cannot be opened.
    """

    def __init__(
        self,
        unit_id: str,
        broker: BrokerSettings,
        space: TopicSpace,
        *,
        outbox_path: Path,
        ecg: EcgSource | None,
        vitals: VitalsSource | None,
        gps: GpsSource | None,
        vitals_interval_s: float = 2.0,
        outbox_max_bytes: int = DEFAULT_MAX_BYTES,
        max_in_flight: int = 16,
        publish_timeout_s: float = 5.0,
        retry_delay_s: float = 0.5,
        live_window_s: float = 10.0,
        stale_after_s: float = 30.0,
        hr_window_s: float = 10.0,
        pending_max: int = 512,
        on_notice: Callable[[Notice], None] | None = None,
        clock: Callable[[], datetime] = utc_now,
        client_id: str | None = None,
        bandwidth_bps: int | None = None,
        adaptive_bandwidth: bool = False,
        bandwidth_max_bps: int = 10_000_000,
        video: Source[CameraFrame] | None = None,
        video_fps: float = 2.0,
        cipher: UnitCipher | None = None,
    ) -> None:
        self.unit_id = valid_id(unit_id)
        self.space = space
        self.ecg = ecg
        self.vitals = vitals
        self.gps = gps
        self.video = video
        self.video_fps = video_fps
        self.vitals_interval_s = vitals_interval_s
        self.max_in_flight = max_in_flight
        self.publish_timeout_s = publish_timeout_s
        self.retry_delay_s = retry_delay_s
        self.live_window_s = live_window_s
        self.stale_after_s = stale_after_s
        self.hr_window_s = hr_window_s
        self.on_notice = on_notice
        self._clock = clock
        self.outbox = Outbox(outbox_path, max_bytes=outbox_max_bytes, cipher=cipher)
        self._link = MqttLink(
            broker, client_id=client_id or f"agent-{unit_id}", clean_session=False, will=self._make_will
        )
        self._availability_topic = space.topic(Stream.AVAILABILITY, unit_id)
        self._notice_topic = space.topic(Stream.NOTICE, unit_id)
        self.session: int | None = None
        self.alert_states: dict[str, AlertState] = {}
        self.destination: Notice | None = None
        self.notices_received = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        """Incoming messages refused by the error boundary, by reason."""
        self.dropped: collections.Counter[str] = collections.Counter()
        """Outgoing messages dropped before the outbox (queue full, invalid), by stream."""
        self.publish_failures = 0
        self.heart_rate: HeartRateResult | None = None
        self._hr: HeartRateEstimator | None = None
        self._incoming: asyncio.Queue[aiomqtt.Message] = asyncio.Queue(maxsize=256)
        self._pending: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=pending_max)
        self._wakeup = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._notice_cond = asyncio.Condition()
        self._notify_tasks: set[asyncio.Task[None]] = set()
        self._retry_at = 0.0
        self._stop_requested = asyncio.Event()
        self._receipt_topic = space.topic(Stream.RECEIPT, unit_id)
        self.delivery = DeliveryTracker(clock)
        """Per pre-alert and ECG chunk: queued, sent, stored, on the board, acknowledged."""
        self.wire = WireStats()
        """Messages and bytes confirmed on the wire per stream; ECG bytes per sample."""
        self.crew_status: tuple[CrewStatus, datetime] | None = None
        """The crew's latest status tap and its time."""
        self.alert_notices: dict[str, Notice] = {}
        """The latest alert_state notice per pre-alert id (hospital, activations)."""
        self.monitor_alarms: object | None = None
        """The HL7 monitor's alarm book (:class:`ambulance_agent.sources.monitor.MonitorAlarms`), if wired."""
        self.watchdog_stale = False
        self._last_ack_at: float | None = None
        self._in_flight = 0
        self._inflight_bytes = 0
        self._limited_at = -1e9
        self._latest_frame: CameraFrame | None = None
        self._video_pending: tuple[float, bytes, Rendition] | None = None
        self._video_seq = 0
        self._video_next_at = 0.0
        self.video_frames_sent = 0
        self.video_frames_skipped = 0
        self.video_rendition: Rendition | None = None
        self._other_acked: collections.deque[tuple[float, int]] = collections.deque(maxlen=2048)
        self._bucket: TokenBucket | None = None
        self._estimator: BandwidthEstimator | None = None
        if adaptive_bandwidth:
            start = bandwidth_bps or min(32_000, bandwidth_max_bps)
            self._estimator = BandwidthEstimator(
                start / 8, min_bytes_s=min(2_000.0, start / 8), max_bytes_s=bandwidth_max_bps / 8
            )
            self._bucket = TokenBucket(start / 8, self._burst_bytes(start / 8))
        elif bandwidth_bps is not None:
            self._bucket = TokenBucket(bandwidth_bps / 8, self._burst_bytes(bandwidth_bps / 8))

    @staticmethod
    def _burst_bytes(rate_bytes_s: float) -> float:
        return max(_MIN_BURST_BYTES, rate_bytes_s * _BURST_S)

    # --- crew actions ------------------------------------------------------------------------------------------

    async def prealert(self, case_type: CaseType, findings: Findings, eta_s: int | None = None) -> str:
        """Store a pre-alert durably and send it ahead of everything else (priority 0).

        Returns:
            The alert id (chosen here, so a re-send after a link drop is the same alert).
        Raises:
            PayloadError: the alert does not fit the contract's size limit.
        """
        alert_id = f"pa-{uuid.uuid4().hex[:24]}"

        def build(seq: int) -> bytes:
            model = PreAlert(
                unit_id=self.unit_id,
                seq=seq,
                sent_at=self._clock(),
                alert_id=alert_id,
                case_type=case_type,
                findings=findings,
                eta_s=eta_s,
            )
            return encode(Stream.PREALERT, model)

        topic = self.space.topic(Stream.PREALERT, self.unit_id)
        seq = await asyncio.to_thread(self.outbox.put, Stream.PREALERT, topic, build)
        self.delivery.prealert_queued(alert_id, seq, case_type)
        logger.info("prealert stored unit=%s alert=%s seq=%d", self.unit_id, alert_id, seq)
        self._wakeup.set()
        self._notify_changed()
        return alert_id

    async def set_status(
        self,
        status: CrewStatus,
        destination_hospital_id: str | None = None,
        incident_id: str | None = None,
    ) -> None:
        """Store and send the crew's status tap (retained on the broker).  Raises PayloadError/ValidationError."""
        at = self._clock()

        def build(seq: int) -> bytes:
            model = Status(
                unit_id=self.unit_id,
                seq=seq,
                sent_at=self._clock(),
                status=status,
                at=at,
                incident_id=incident_id,
                destination_hospital_id=destination_hospital_id,
            )
            return encode(Stream.STATUS, model)

        topic = self.space.topic(Stream.STATUS, self.unit_id)
        seq = await asyncio.to_thread(self.outbox.put, Stream.STATUS, topic, build)
        self.crew_status = (status, at)
        logger.info("status stored unit=%s status=%s seq=%d", self.unit_id, status, seq)
        self._wakeup.set()
        self._notify_changed()

    # --- observation -------------------------------------------------------------------------------------------

    def link_health(self) -> LinkHealth:
        """Link up or down, the outbox backlog and the age of its oldest message, the budget, the watchdog and the
        store's receipt (no disk access)."""
        stats = self.outbox.stats()
        age = None if stats.oldest_created_at_s is None else max(0.0, time.time() - stats.oldest_created_at_s)
        receipt_at = self.delivery.receipt_at
        return LinkHealth(
            connected=self._link.connected.is_set(),
            backlog_count=stats.count,
            backlog_bytes=stats.size_bytes,
            oldest_unsent_age_s=age,
            session=self.session,
            shed=stats.shed,
            dropped=dict(self.dropped),
            publish_failures=self.publish_failures,
            watchdog_stale=age is not None and age > self.stale_after_s,
            stale_after_s=self.stale_after_s,
            in_flight=self._in_flight,
            budget_bps=self._bucket.rate_bytes_s * 8 if self._bucket is not None else None,
            queue_delay_s=self._estimator.last_delay_s if self._estimator is not None else None,
            last_ack_age_s=None if self._last_ack_at is None else time.monotonic() - self._last_ack_at,
            ecg_bytes_per_sample=self.wire.ecg_bytes_per_sample(),
            stored_through=self.delivery.stored_through,
            receipt_age_s=None if receipt_at is None else max(0.0, (self._clock() - receipt_at).total_seconds()),
        )

    def _notify_changed(self) -> None:
        """Wake :meth:`wait_until` waiters (a crew action, a notice, a receipt, a confirmed message)."""
        task = asyncio.get_running_loop().create_task(self._notify_all())
        self._notify_tasks.add(task)
        task.add_done_callback(self._notify_tasks.discard)

    async def _notify_all(self) -> None:
        async with self._notice_cond:
            self._notice_cond.notify_all()

    @property
    def link(self) -> MqttLink:
        """The broker link (``link.connected`` is an asyncio.Event)."""
        return self._link

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Wait until ``predicate()`` holds, re-checked after every accepted notice or receipt, crew action and
        delivery change (a PUBACK of a pre-alert or ECG chunk).  Raises TimeoutError."""
        async with asyncio.timeout(timeout_s), self._notice_cond:
            await self._notice_cond.wait_for(predicate)

    def close(self) -> None:
        """Close the outbox file (after ``run`` has been cancelled)."""
        self.outbox.close()

    # --- the session -------------------------------------------------------------------------------------------

    def _availability(self, state: str) -> bytes:
        assert self.session is not None
        model = Availability(unit_id=self.unit_id, seq=self.session, sent_at=self._clock(), state=state)  # type: ignore[arg-type,unused-ignore]
        return encode(Stream.AVAILABILITY, model)

    def _make_will(self) -> Will:
        # Called by MqttLink before each CONNECT: one small durable write per (re)connection.
        self.session = self.outbox.next_session()
        return Will(topic=self._availability_topic, payload=self._availability("offline"), qos=1, retain=True)

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        try:
            async with asyncio.timeout(self.publish_timeout_s * 2):
                await client.subscribe(
                    [(self._notice_topic, 1), (self._receipt_topic, 1)], timeout=self.publish_timeout_s
                )
                await client.publish(
                    self._availability_topic,
                    self._availability("online"),
                    qos=1,
                    retain=True,
                    timeout=self.publish_timeout_s,
                )
        except TimeoutError:
            raise aiomqtt.MqttError("subscribe or birth not confirmed in time") from None
        logger.info("birth published unit=%s session=%s", self.unit_id, self.session)
        self._wakeup.set()

    def _on_message(self, message: aiomqtt.Message) -> None:
        # FF-01: only enqueue, never block the receive loop.
        try:
            self._incoming.put_nowait(message)
        except asyncio.QueueFull:
            self.rejected["incoming queue full"] += 1
            logger.warning("incoming queue full, message dropped topic=%s", loggable(str(message.topic)))

    # --- incoming notices ----------------------------------------------------------------------------------------

    async def _notice_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(_IDLE_S):
                    message = await self._incoming.get()
            except TimeoutError:
                continue
            await self._handle_incoming(message)

    async def _handle_incoming(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        raw = message.payload
        payload = bytes(raw) if isinstance(raw, bytes | bytearray) else str(raw or "").encode()
        try:
            parsed, model = decode(self.space, topic, payload)
            if isinstance(model, StoreReceipt) and model.unit_id == self.unit_id:
                if self.delivery.receipt(model):
                    logger.debug("receipt unit=%s seq=%d", self.unit_id, model.seq)
            elif isinstance(model, Notice) and model.unit_id == self.unit_id:
                self._apply_notice(model)
                if self.on_notice is not None:
                    self.on_notice(model)
            else:
                raise PayloadError(topic, f"unexpected {parsed.stream.value} message")
        except PayloadError as exc:
            self.rejected[exc.reason[:80]] += 1
            logger.warning("message rejected topic=%s bytes=%d reason=%s", loggable(topic), len(payload), exc.reason)
            return
        except Exception:  # the per-message error boundary: one bad message never stops the loop
            self.rejected["handler error"] += 1
            logger.warning("notice handler failed topic=%s bytes=%d", loggable(topic), len(payload), exc_info=True)
            return
        async with self._notice_cond:
            self._notice_cond.notify_all()

    def _apply_notice(self, notice: Notice) -> None:
        self.notices_received += 1
        if notice.kind is NoticeKind.DESTINATION:
            self.destination = notice
        if notice.alert_id is not None and notice.alert_state is not None:
            self.alert_states[notice.alert_id] = notice.alert_state
            self.alert_notices[notice.alert_id] = notice
            while len(self.alert_notices) > 64:
                del self.alert_notices[next(iter(self.alert_notices))]
            self.delivery.notice(notice)
        logger.info(
            "notice unit=%s seq=%d kind=%s alert=%s state=%s",
            self.unit_id,
            notice.seq,
            notice.kind,
            notice.alert_id,
            notice.alert_state,
        )

    # --- acquisition ---------------------------------------------------------------------------------------------

    def _enqueue(
        self, stream: Stream, build: Callable[[int, datetime], BaseModel], start_at: datetime | None = None
    ) -> None:
        try:
            self._pending.put_nowait(_Pending(stream, build, start_at))
        except asyncio.QueueFull:
            self.dropped[stream.value] += 1
            logger.warning("acquisition queue full, dropped stream=%s unit=%s", stream, self.unit_id)

    async def _ecg_loop(self, source: EcgSource) -> None:
        next_vitals_at: datetime | None = None
        async for block in source:
            if self._hr is None or self._hr.fs_hz != block.fs_hz:
                self._hr = HeartRateEstimator(block.fs_hz, window_s=self.hr_window_s)
            if _flagged(block.lead_off, self._hr.lead) or _flagged(block.saturated, self._hr.lead):
                # an electrode off or a clipped trace gives no heart rate, never a wrong one: start the window
                # again from the next clean block ("insufficient data" until min_s of clean signal)
                self._hr.reset()
            else:
                self._hr.push(block.samples, block.gain_adc_per_mv, block.baseline_adc, fs_hz=block.fs_hz)
            self._enqueue(Stream.ECG, self._ecg_builder(block), start_at=block.start_at)
            if self.vitals is None:
                end_at = block.start_at + timedelta(seconds=block.n_samples / block.fs_hz)
                if next_vitals_at is None:
                    next_vitals_at = end_at
                if end_at >= next_vitals_at:
                    next_vitals_at += timedelta(seconds=self.vitals_interval_s)
                    hr = await self._estimate_hr()
                    self._enqueue(Stream.VITALS, self._vitals_builder(VitalsReading(measured_at=end_at), hr))

    def _ecg_builder(self, block: EcgBlock) -> Callable[[int, datetime], BaseModel]:
        def build(seq: int, sent_at: datetime) -> BaseModel:
            return EcgChunk(
                unit_id=self.unit_id,
                seq=seq,
                sent_at=sent_at,
                start_at=block.start_at,
                fs_hz=block.fs_hz,
                leads=block.leads,
                gain_adc_per_mv=block.gain_adc_per_mv,
                baseline_adc=block.baseline_adc,
                samples=block.samples,
                lead_off=block.lead_off,
                saturated=block.saturated,
            )

        return build

    async def _estimate_hr(self) -> HeartRateResult | None:
        if self._hr is None:
            return None
        window = self._hr.window_mv()
        result = await asyncio.to_thread(heart_rate_from_ecg, window, self._hr.fs_hz, min_s=self._hr.min_s)
        self.heart_rate = result
        return result

    async def _vitals_loop(self, source: VitalsSource) -> None:
        async for reading in source:
            hr = await self._estimate_hr() if self.ecg is not None else None
            self._enqueue(Stream.VITALS, self._vitals_builder(reading, hr))

    def _vitals_builder(
        self, reading: VitalsReading, hr: HeartRateResult | None
    ) -> Callable[[int, datetime], BaseModel]:
        values: dict[str, object] = {
            "spo2_pct": reading.spo2_pct,
            "sbp_mmhg": reading.sbp_mmhg,
            "dbp_mmhg": reading.dbp_mmhg,
            "map_mmhg": reading.map_mmhg,
            "resp_rate_per_min": reading.resp_rate_per_min,
            "etco2_mmhg": reading.etco2_mmhg,
            "temp_c": reading.temp_c,
        }
        if hr is not None and hr.bpm is not None:
            values.update(heart_rate_bpm=hr.bpm, heart_rate_source="ecg")
        elif reading.heart_rate_bpm is not None:
            values.update(
                heart_rate_bpm=reading.heart_rate_bpm, heart_rate_source=reading.heart_rate_source or "monitor"
            )

        def build(seq: int, sent_at: datetime) -> BaseModel:
            base = {"unit_id": self.unit_id, "seq": seq, "sent_at": sent_at, "measured_at": reading.measured_at}
            try:
                return Vitals(**base, **values)  # type: ignore[arg-type,unused-ignore]
            except ValidationError as exc:
                # An implausible value (outside the contract's range) is absent, never clamped; the rest is kept.
                bad = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
                kept = {k: v for k, v in values.items() if k not in bad}
                if "heart_rate_bpm" in bad:
                    kept.pop("heart_rate_source", None)
                logger.warning("vitals fields out of range dropped unit=%s fields=%s", self.unit_id, sorted(bad))
                return Vitals(**base, **kept)  # type: ignore[arg-type,unused-ignore]

        return build

    async def _gps_loop(self, source: GpsSource) -> None:
        async for reading in source:
            self._enqueue(Stream.GPS, self._gps_builder(reading))

    def _gps_builder(self, reading: GpsReading) -> Callable[[int, datetime], BaseModel]:
        def build(seq: int, sent_at: datetime) -> BaseModel:
            return GpsFix(
                unit_id=self.unit_id,
                seq=seq,
                sent_at=sent_at,
                fix=reading.fix,
                device_time=reading.device_time,
                lat_deg=reading.lat_deg,
                lon_deg=reading.lon_deg,
                speed_mps=reading.speed_mps,
                heading_deg=reading.heading_deg,
                hdop=reading.hdop,
                fix_quality=reading.fix_quality,
                clock_suspect=reading.clock_suspect,
            )

        return build

    # --- outbox writer and sender ------------------------------------------------------------------------------

    async def _writer_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(_IDLE_S):
                    item = await self._pending.get()
            except TimeoutError:
                continue
            topic = self.space.topic(item.stream, self.unit_id)

            def encode_payload(seq: int, item: _Pending = item) -> bytes:
                return encode(item.stream, item.build(seq, self._clock()), ecg_limb_residuals=True)

            try:
                seq = await asyncio.to_thread(self.outbox.put, item.stream, topic, encode_payload)
            except (PayloadError, ValidationError) as exc:
                self.dropped[f"{item.stream.value}: invalid"] += 1
                logger.warning("outgoing message invalid, dropped stream=%s reason=%s", item.stream, type(exc).__name__)
                continue
            except sqlite3.Error as exc:
                self.dropped[f"{item.stream.value}: outbox error"] += 1
                logger.error("outbox write failed stream=%s error=%s", item.stream, type(exc).__name__)
                continue
            if item.stream is Stream.ECG and item.start_at is not None:
                self.delivery.chunk_queued(seq, item.start_at)
            self._wakeup.set()

    async def _sender_loop(self) -> None:
        in_flight: set[int] = set()
        async with asyncio.TaskGroup() as tg:
            while True:
                if not self._link.connected.is_set():
                    await _wait_event(self._link.connected, _IDLE_S)
                    continue
                pause_s = self._retry_at - time.monotonic()
                if pause_s > 0:
                    await asyncio.sleep(min(pause_s, _IDLE_S))
                    continue
                free = self.max_in_flight - len(in_flight)
                if free <= 0:
                    self._slot_free.clear()
                    await _wait_event(self._slot_free, _IDLE_S)
                    continue
                self._wakeup.clear()
                batch = await asyncio.to_thread(self._next_batch, free, tuple(in_flight))
                if not batch:
                    sent = await self._send_video()
                    _reraise_if_cancelling()
                    if not sent:
                        await _wait_event(self._wakeup, self._video_wait_s())
                    continue
                for message in batch:
                    size = wire_size(message.topic, message.payload)
                    if self._bucket is not None:
                        paced = STREAMS[message.stream].priority > _CREW_PRIORITY
                        if paced and self._inflight_bytes and self._inflight_bytes + size > self._window_bytes():
                            # Enough bytes on their way already: more would only queue in front of the link.
                            self._limited_at = time.monotonic()
                            self._slot_free.clear()
                            await _wait_event(self._slot_free, _IDLE_S)
                            break
                        delay_s = self._bucket.delay_s(size)
                        if delay_s > 0 and paced:
                            # Out of budget: wait for tokens, or for a new message (a pre-alert) to re-plan.
                            self._limited_at = time.monotonic()
                            await _wait_event(self._wakeup, min(delay_s, _IDLE_S))
                            break
                        self._bucket.take(size)
                    in_flight.add(message.id)
                    self._in_flight = len(in_flight)
                    self._inflight_bytes += size
                    tg.create_task(self._send_one(message, in_flight, size))

    async def _send_one(self, message: OutboxMessage, in_flight: set[int], size: int) -> None:
        started = time.monotonic()
        try:
            await self._link.publish(
                message.topic, message.payload, qos=message.qos, retain=message.retain, timeout_s=self.publish_timeout_s
            )
            acked = time.monotonic()
            self._last_ack_at = acked
            self.wire.add(message.stream, message.topic, message.payload)
            self._other_acked.append((acked, size))
            self._on_ack_measure(size, acked - started)
            await asyncio.to_thread(self.outbox.ack, message.id)
            if message.stream in (Stream.PREALERT, Stream.ECG):
                self.delivery.sent(message.stream, message.seq)
                self._notify_changed()
            logger.debug("published stream=%s seq=%d bytes=%d", message.stream, message.seq, len(message.payload))
        except NotConnectedError as exc:
            self.publish_failures += 1
            self._retry_at = time.monotonic() + self.retry_delay_s
            if self._estimator is not None and self._link.connected.is_set():
                self._estimator.on_timeout()
                self._apply_estimate()
            logger.info("publish not confirmed, kept stream=%s seq=%d reason=%s", message.stream, message.seq, exc)
        except sqlite3.Error as exc:
            logger.error("outbox ack failed stream=%s seq=%d error=%s", message.stream, message.seq, type(exc).__name__)
        finally:
            in_flight.discard(message.id)
            self._in_flight = len(in_flight)
            self._inflight_bytes -= size
            self._slot_free.set()

    # --- video: last, QoS 0, never stored -----------------------------------------------------------------------

    async def _video_loop(self, source: Source[CameraFrame]) -> None:
        async for frame in source:
            if self._latest_frame is not None:
                self.video_frames_skipped += 1  # the link did not take the previous one: only the newest counts
            self._latest_frame = frame
            self._wakeup.set()

    def _video_wait_s(self) -> float:
        if self._video_pending is not None and self._bucket is not None:
            _, payload, _ = self._video_pending
            return min(_IDLE_S, max(0.01, self._bucket.delay_s(len(payload))))
        if self._latest_frame is None:
            return _IDLE_S
        return min(_IDLE_S, max(0.01, self._video_next_at - time.monotonic()))

    def _spare_bytes_s(self) -> float:
        """Budget left by everything else, over the last 2 s (unlimited without a budget)."""
        if self._bucket is None:
            return float("inf")
        now = time.monotonic()
        used = sum(size for at, size in self._other_acked if now - at <= 2.0) / 2.0
        return max(0.0, self._bucket.rate_bytes_s - used)

    async def _send_video(self) -> bool:
        """Send the newest camera frame when its turn has come and the spare budget has room.  True if sent.

        The frame is encoded for the spare budget (:func:`choose_rendition`), then waits for tokens at most one
        frame interval: video only ever uses what the other streams leave.
        """
        now = time.monotonic()
        if self._video_pending is not None and now - self._video_pending[0] > 1.0 / self.video_fps:
            self._video_pending = None  # a newer frame is due: never send a stale picture
            self.video_frames_skipped += 1
        if self._video_pending is None:
            frame = self._latest_frame
            if frame is None or now < self._video_next_at:
                return False
            # on a grid of 1/fps, not "1/fps after this send": the wake-up's lateness must not add up frame after
            # frame (it did: 1.46 fps for 2 asked); a late grid restarts at now, and the camera bounds any burst
            self._video_next_at = max(self._video_next_at + 1.0 / self.video_fps, now)
            self._latest_frame = None
            rendition = choose_rendition(0.8 * self._spare_bytes_s() / self.video_fps)
            if rendition is None:
                self.video_frames_skipped += 1
                return False
            payload = await asyncio.to_thread(encode_video_frame, frame, rendition, self._video_seq)
            self._video_seq += 1
            self._video_pending = (now, payload, rendition)
        _, payload, rendition = self._video_pending
        topic = self.space.topic(Stream.VIDEO, self.unit_id)
        size = wire_size(topic, payload)
        if not self._link.connected.is_set():
            return False
        if self._bucket is not None:
            if self._bucket.delay_s(size) > 0 or (
                self._inflight_bytes and self._inflight_bytes + size > self._window_bytes()
            ):
                return False
            self._bucket.take(size)
        self._video_pending = None
        try:
            await self._link.publish(topic, payload, qos=0, retain=False, timeout_s=self.publish_timeout_s)
        except NotConnectedError:
            return False
        self.video_frames_sent += 1
        self.video_rendition = rendition
        self.wire.add(Stream.VIDEO, topic, payload)
        return True

    def _window_bytes(self) -> float:
        """Bytes allowed on their way at once (a congestion window): the budget times the base round trip plus the
        tolerated queueing delay, so at most ~``target_delay_s`` of data ever waits in front of the link."""
        assert self._bucket is not None
        if self._estimator is not None:
            rtt_s = (self._estimator.base_rtt_s or 0.2) + self._estimator.target_delay_s
        else:
            rtt_s = 0.5
        return self._bucket.rate_bytes_s * rtt_s

    def _on_ack_measure(self, size: int, rtt_s: float) -> None:
        if self._estimator is None or self._bucket is None:
            return
        # The message's own transmission time at the budgeted rate is not queueing.
        queued_rtt_s = max(0.0, rtt_s - size / self._bucket.rate_bytes_s)
        limited = time.monotonic() - self._limited_at < _IDLE_S
        self._estimator.on_ack(size, queued_rtt_s, limited)
        self._apply_estimate()

    def _apply_estimate(self) -> None:
        if self._estimator is not None and self._bucket is not None:
            rate = self._estimator.rate_bytes_s
            self._bucket.set_rate(rate, self._burst_bytes(rate))

    def _next_batch(self, limit: int, in_flight: tuple[int, ...]) -> list[OutboxMessage]:
        """The next messages to send, in the uplink's order (runs in a worker thread).

        Telemetry stored more than ``live_window_s`` ago is backlog: sent after live telemetry, re-encoded with
        ``historical=True`` (store-and-forward replay must never fire live alarms) and without the retain flag;
        the stored bytes stay unchanged.
        """
        now_s = time.time()
        batch = self.outbox.pending(limit, in_flight, live_since_s=now_s - self.live_window_s)
        return [
            self._as_historical(m) if m.stream in _TELEMETRY and now_s - m.created_at_s > self.live_window_s else m
            for m in batch
        ]

    def _as_historical(self, message: OutboxMessage) -> OutboxMessage:
        try:
            _, model = decode(self.space, message.topic, message.payload)
            payload = encode(message.stream, model.model_copy(update={"historical": True}), ecg_limb_residuals=True)
        except PayloadError:
            return message
        return dataclasses.replace(message, payload=payload, retain=False)

    async def _watchdog_loop(self) -> None:
        while True:
            await asyncio.sleep(_IDLE_S)
            stats = self.outbox.stats()
            oldest = stats.oldest_created_at_s
            age = None if oldest is None else max(0.0, time.time() - oldest)
            if age is not None and age > self.stale_after_s:
                if not self.watchdog_stale:
                    logger.warning("outbox stale unit=%s oldest_unsent_age_s=%.1f", self.unit_id, age)
                    self.watchdog_stale = True
            elif self.watchdog_stale:
                logger.info("outbox caught up unit=%s", self.unit_id)
                self.watchdog_stale = False

    # --- composition -------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run every task until :meth:`stop` or cancellation; both end with a retained ``offline`` (death).

        Raises broker_config.connection.AuthError on refused credentials.
        """
        logger.info("agent starting unit=%s broker=%s", self.unit_id, self._link.settings.url)
        self._stop_requested.clear()
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self._link_loop(), name="mqtt-link-owner"),
                tg.create_task(self._writer_loop(), name="outbox-writer"),
                tg.create_task(self._sender_loop(), name="sender"),
                tg.create_task(self._notice_loop(), name="notices"),
                tg.create_task(self._watchdog_loop(), name="watchdog"),
            ]
            if self.ecg is not None:
                tasks.append(tg.create_task(self._ecg_loop(self.ecg), name="ecg"))
            if self.vitals is not None:
                tasks.append(tg.create_task(self._vitals_loop(self.vitals), name="vitals"))
            if self.gps is not None:
                tasks.append(tg.create_task(self._gps_loop(self.gps), name="gps"))
            if self.video is not None:
                tasks.append(tg.create_task(self._video_loop(self.video), name="video"))
            try:
                while not await _wait_event(self._stop_requested, _IDLE_S * 60):
                    pass
            finally:
                await self._graceful_death()
            for task in tasks:
                task.cancel()
        logger.info("agent stopped unit=%s", self.unit_id)

    async def _link_loop(self) -> None:
        """Run the broker link in its own task and make its cancellation stick.

        Python 3.11's ``asyncio.wait_for`` (used by aiomqtt for CONNACK/SUBACK/PUBACK waits) returns the result
        and drops a cancellation that arrives in the same loop iteration as the acknowledgement (CPython
        gh-86296, fixed in 3.12).  Cancelling once could then leave the link running forever, so the owner
        re-cancels it, each wait bounded, until it has really stopped.
        """
        task = asyncio.create_task(self._link.run(self._on_connect, self._on_message), name="mqtt-link")
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=_IDLE_S * 60)
            task.result()  # AuthError and any other failure propagate to the TaskGroup
        finally:
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=_IDLE_S)

    def stop(self) -> None:
        """Ask :meth:`run` to publish the death and return."""
        self._stop_requested.set()

    async def _graceful_death(self) -> None:
        """On a clean stop, say ``offline`` ourselves: a clean DISCONNECT does not fire the will (MQTT 3.1.1)."""
        if self.session is None or not self._link.connected.is_set():
            return
        try:
            await self._link.publish(
                self._availability_topic, self._availability("offline"), qos=1, retain=True, timeout_s=2.0
            )
        except NotConnectedError:
            logger.info("death not confirmed unit=%s session=%s (the will covers it)", self.unit_id, self.session)
        else:
            logger.info("death published unit=%s session=%s", self.unit_id, self.session)
