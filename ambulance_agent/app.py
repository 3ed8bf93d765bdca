"""The in-vehicle agent: sources -> durable outbox -> MQTT, and dispatch's notices back to the crew.

Tasks, all in one ``asyncio.TaskGroup`` (structured concurrency):

* ``MqttLink.run``: the broker session; will = Availability ``offline`` (retained, seq = session number); on
  every connect: subscribe to the unit's notices, then publish the birth (Availability ``online``, retained, same
  session number).  Its ``on_message`` callback only enqueues (bounded) and returns (FF-01).
* one acquisition task per source: builds contract models and hands them to a bounded in-memory queue without
  ever waiting on disk or network (a full queue drops and counts);
* the outbox writer: allocates each stream's ``seq`` and stores the encoded message durably (off the loop thread);
* the sender: publishes from the outbox in priority order with at most ``max_in_flight`` messages in flight, each
  publish bounded by ``publish_timeout_s`` (FF-03); only a PUBACK deletes a message, anything else leaves it for a
  re-send (the store de-duplicates by (unit, stream, seq));
* the notice handler: decodes dispatch's notices through the contract inside a per-message error boundary;
* a watchdog that warns when the oldest unsent message gets older than ``stale_after_s`` (FF-03).

Telemetry (vitals, ECG, GPS) still in the outbox ``live_window_s`` after it was stored is re-flagged
``historical`` when finally sent, so a replay never fires live alarms (Sparkplug B's store-and-forward rule).
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

from ambulance_agent.heart_rate import HeartRateEstimator, HeartRateResult, heart_rate_from_ecg
from ambulance_agent.outbox import Outbox, OutboxMessage
from ambulance_agent.sources.base import EcgBlock, EcgSource, GpsReading, GpsSource, VitalsReading, VitalsSource
from broker_config import (
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
    Stream,
    TopicSpace,
    Vitals,
    decode,
    encode,
    utc_now,
    valid_id,
)
from broker_config.connection import MqttLink, NotConnectedError, Will

__all__ = ["Agent", "LinkHealth"]

logger = logging.getLogger(__name__)

_TELEMETRY = frozenset({Stream.VITALS, Stream.ECG, Stream.GPS})
_IDLE_S = 1.0
"""Upper bound of every idle wait of the internal loops (they re-check their state at least this often)."""


@dataclass(frozen=True, slots=True)
class LinkHealth:
    """What the crew's screen shows about the uplink."""

    connected: bool
    backlog_count: int
    backlog_bytes: int
    oldest_unsent_age_s: float | None
    session: int | None
    shed: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    publish_failures: int = 0


@dataclass(frozen=True, slots=True)
class _Pending:
    stream: Stream
    build: Callable[[int, datetime], BaseModel]
    """(seq, sent_at) -> contract model."""


async def _wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for ``event`` at most ``timeout_s``; True if it is set."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


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
        live_window_s: telemetry older than this when sent is flagged ``historical``.
        stale_after_s: the watchdog warns when the oldest unsent message is older.
        hr_window_s: heart-rate sliding window, seconds.
        on_notice: optional callback for every accepted Notice (called on the event loop; must be quick).
        clock: UTC clock for ``sent_at`` and crew taps.
        client_id: MQTT client id (default ``agent-{unit_id}``); the session is persistent (clean session off).

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
        outbox_max_bytes: int = 64 * 1024 * 1024,
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
    ) -> None:
        self.unit_id = valid_id(unit_id)
        self.space = space
        self.ecg = ecg
        self.vitals = vitals
        self.gps = gps
        self.vitals_interval_s = vitals_interval_s
        self.max_in_flight = max_in_flight
        self.publish_timeout_s = publish_timeout_s
        self.retry_delay_s = retry_delay_s
        self.live_window_s = live_window_s
        self.stale_after_s = stale_after_s
        self.hr_window_s = hr_window_s
        self.on_notice = on_notice
        self._clock = clock
        self.outbox = Outbox(outbox_path, max_bytes=outbox_max_bytes)
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
        self._retry_at = 0.0
        self._stop_requested = asyncio.Event()

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
        logger.info("prealert stored unit=%s alert=%s seq=%d", self.unit_id, alert_id, seq)
        self._wakeup.set()
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
        logger.info("status stored unit=%s status=%s seq=%d", self.unit_id, status, seq)
        self._wakeup.set()

    # --- observation -------------------------------------------------------------------------------------------

    def link_health(self) -> LinkHealth:
        """Link up or down, the outbox backlog and the age of its oldest message (no disk access)."""
        stats = self.outbox.stats()
        age = None if stats.oldest_created_at_s is None else max(0.0, time.time() - stats.oldest_created_at_s)
        return LinkHealth(
            connected=self._link.connected.is_set(),
            backlog_count=stats.count,
            backlog_bytes=stats.size_bytes,
            oldest_unsent_age_s=age,
            session=self.session,
            shed=stats.shed,
            dropped=dict(self.dropped),
            publish_failures=self.publish_failures,
        )

    @property
    def link(self) -> MqttLink:
        """The broker link (``link.connected`` is an asyncio.Event)."""
        return self._link

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Wait until ``predicate()`` holds, re-checked after every accepted notice.  Raises TimeoutError."""
        async with asyncio.timeout(timeout_s), self._notice_cond:
            await self._notice_cond.wait_for(predicate)

    def close(self) -> None:
        """Close the outbox file (after ``run`` has been cancelled)."""
        self.outbox.close()

    # --- the session -------------------------------------------------------------------------------------------

    def _availability(self, state: str) -> bytes:
        assert self.session is not None
        model = Availability(unit_id=self.unit_id, seq=self.session, sent_at=self._clock(), state=state)  # type: ignore[arg-type]
        return encode(Stream.AVAILABILITY, model)

    def _make_will(self) -> Will:
        # Called by MqttLink before each CONNECT: one small durable write per (re)connection.
        self.session = self.outbox.next_session()
        return Will(topic=self._availability_topic, payload=self._availability("offline"), qos=1, retain=True)

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        try:
            async with asyncio.timeout(self.publish_timeout_s * 2):
                await client.subscribe(self._notice_topic, qos=1, timeout=self.publish_timeout_s)
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
            logger.warning("incoming queue full, message dropped topic=%s", message.topic)

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
            if not isinstance(model, Notice) or model.unit_id != self.unit_id:
                raise PayloadError(topic, f"unexpected {parsed.stream.value} message")
            self._apply_notice(model)
            if self.on_notice is not None:
                self.on_notice(model)
        except PayloadError as exc:
            self.rejected[exc.reason[:80]] += 1
            logger.warning("message rejected topic=%s bytes=%d reason=%s", topic, len(payload), exc.reason)
            return
        except Exception:  # the per-message error boundary: one bad message never stops the loop
            self.rejected["handler error"] += 1
            logger.warning("notice handler failed topic=%s bytes=%d", topic, len(payload), exc_info=True)
            return
        async with self._notice_cond:
            self._notice_cond.notify_all()

    def _apply_notice(self, notice: Notice) -> None:
        self.notices_received += 1
        if notice.kind is NoticeKind.DESTINATION:
            self.destination = notice
        if notice.alert_id is not None and notice.alert_state is not None:
            self.alert_states[notice.alert_id] = notice.alert_state
        logger.info(
            "notice unit=%s seq=%d kind=%s alert=%s state=%s",
            self.unit_id,
            notice.seq,
            notice.kind,
            notice.alert_id,
            notice.alert_state,
        )

    # --- acquisition ---------------------------------------------------------------------------------------------

    def _enqueue(self, stream: Stream, build: Callable[[int, datetime], BaseModel]) -> None:
        try:
            self._pending.put_nowait(_Pending(stream, build))
        except asyncio.QueueFull:
            self.dropped[stream.value] += 1
            logger.warning("acquisition queue full, dropped stream=%s unit=%s", stream, self.unit_id)

    async def _ecg_loop(self, source: EcgSource) -> None:
        next_vitals_at: datetime | None = None
        async for block in source:
            if self._hr is None or self._hr.fs_hz != block.fs_hz:
                self._hr = HeartRateEstimator(block.fs_hz, window_s=self.hr_window_s)
            self._hr.push(block.samples, block.gain_adc_per_mv, block.baseline_adc, fs_hz=block.fs_hz)
            self._enqueue(Stream.ECG, self._ecg_builder(block))
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
        }
        if hr is not None and hr.bpm is not None:
            values.update(heart_rate_bpm=hr.bpm, heart_rate_source="ecg")
        elif reading.heart_rate_bpm is not None:
            values.update(heart_rate_bpm=reading.heart_rate_bpm, heart_rate_source="monitor")

        def build(seq: int, sent_at: datetime) -> BaseModel:
            base = {"unit_id": self.unit_id, "seq": seq, "sent_at": sent_at, "measured_at": reading.measured_at}
            try:
                return Vitals(**base, **values)  # type: ignore[arg-type]
            except ValidationError as exc:
                # An implausible value (outside the contract's range) is absent, never clamped; the rest is kept.
                bad = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
                kept = {k: v for k, v in values.items() if k not in bad}
                if "heart_rate_bpm" in bad:
                    kept.pop("heart_rate_source", None)
                logger.warning("vitals fields out of range dropped unit=%s fields=%s", self.unit_id, sorted(bad))
                return Vitals(**base, **kept)  # type: ignore[arg-type]

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
                return encode(item.stream, item.build(seq, self._clock()))

            try:
                await asyncio.to_thread(self.outbox.put, item.stream, topic, encode_payload)
            except (PayloadError, ValidationError) as exc:
                self.dropped[f"{item.stream.value}: invalid"] += 1
                logger.warning("outgoing message invalid, dropped stream=%s reason=%s", item.stream, type(exc).__name__)
                continue
            except sqlite3.Error as exc:
                self.dropped[f"{item.stream.value}: outbox error"] += 1
                logger.error("outbox write failed stream=%s error=%s", item.stream, type(exc).__name__)
                continue
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
                    await _wait_event(self._wakeup, _IDLE_S)
                    continue
                for message in batch:
                    in_flight.add(message.id)
                    tg.create_task(self._send_one(message, in_flight))

    async def _send_one(self, message: OutboxMessage, in_flight: set[int]) -> None:
        try:
            await self._link.publish(
                message.topic, message.payload, qos=message.qos, retain=message.retain, timeout_s=self.publish_timeout_s
            )
            await asyncio.to_thread(self.outbox.ack, message.id)
            logger.debug("published stream=%s seq=%d bytes=%d", message.stream, message.seq, len(message.payload))
        except NotConnectedError as exc:
            self.publish_failures += 1
            self._retry_at = time.monotonic() + self.retry_delay_s
            logger.info("publish not confirmed, kept stream=%s seq=%d reason=%s", message.stream, message.seq, exc)
        except sqlite3.Error as exc:
            logger.error("outbox ack failed stream=%s seq=%d error=%s", message.stream, message.seq, type(exc).__name__)
        finally:
            in_flight.discard(message.id)
            self._slot_free.set()

    def _next_batch(self, limit: int, in_flight: tuple[int, ...]) -> list[OutboxMessage]:
        """The next messages to send, in order (runs in a worker thread).

        Telemetry stored more than ``live_window_s`` ago is re-encoded with ``historical=True`` (store-and-forward
        replay must never fire live alarms); the stored bytes stay unchanged.
        """
        batch = self.outbox.pending(limit, in_flight)
        now_s = time.time()
        return [
            self._as_historical(m) if m.stream in _TELEMETRY and now_s - m.created_at_s > self.live_window_s else m
            for m in batch
        ]

    def _as_historical(self, message: OutboxMessage) -> OutboxMessage:
        try:
            _, model = decode(self.space, message.topic, message.payload)
            payload = encode(message.stream, model.model_copy(update={"historical": True}))
        except PayloadError:
            return message
        return dataclasses.replace(message, payload=payload)

    async def _watchdog_loop(self) -> None:
        warned = False
        while True:
            await asyncio.sleep(_IDLE_S)
            age = self.link_health().oldest_unsent_age_s
            if age is not None and age > self.stale_after_s:
                if not warned:
                    logger.warning("outbox stale unit=%s oldest_unsent_age_s=%.1f", self.unit_id, age)
                    warned = True
            elif warned:
                logger.info("outbox caught up unit=%s", self.unit_id)
                warned = False

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
