"""The dispatch service: MQTT in (pre-alerts, GPS, status, availability, hospital acks), decisions, MQTT out.

Flow::

    unit prealert --> rank destinations (unit's last GPS fix, road ETAs, capabilities, live status)
                  --> HospitalAlert on the destination's alert topic + destination Notice to the unit
    hospital ack  --> alert state (on_board, acknowledged), who/when --> alert_state Notice to the unit
    team pages    --> every department of the pathway paged (primary) with an acknowledgement deadline; an
                      AlertAck acknowledges one department (or all); a missed deadline escalates the page
                      (backup, then supervisor), re-published to the hospital and the unit (:mod:`dispatch.activation`)

Timers: :meth:`DispatchService.tick` escalates every page whose deadline has passed on the injected clock; the
service calls it every ``escalation_tick_s`` seconds, tests call it directly with a chosen time.

Concurrency (FF-01): the MQTT receive loop only puts ``(topic, payload)`` on a bounded queue (a bounded wait,
then a counted drop) and returns; one worker task decodes and handles messages.  Every message passes an error
boundary: a malformed or unexpected message is counted by reason and logged with ids only (topic, unit id,
seq, size), never its contents; the loop never stops.  The session is persistent (clean session off, fixed
client id ``goldenhour-dispatch``, QoS 1), so messages published while dispatch restarts are queued by the broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import BaseModel

from broker_config import (
    STREAMS,
    ActivationState,
    AlertAck,
    AlertState,
    Availability,
    BrokerSettings,
    CaseType,
    Department,
    GpsFix,
    HospitalAlert,
    Notice,
    NoticeKind,
    PayloadError,
    PreAlert,
    Priority,
    Status,
    Stream,
    TopicSpace,
    decode,
    encode,
    older_session,
    utc_now,
)
from broker_config.connection import NotConnectedError
from broker_config.paho_link import PahoLink, ReceivedMessage
from broker_config.topics import loggable
from dispatch.activation import DEFAULT_ACK_TIMEOUT_S, acknowledge, escalate_due, next_deadline, page
from dispatch.cases import CaseDesk
from dispatch.destination import Recommendation, departments_for, priority_for, rank_destinations
from dispatch.errors import DispatchError, OutsideNetworkError, StoreError
from dispatch.external_routing import Router
from dispatch.geo import valid_position_deg
from dispatch.hospitals import HospitalRegistry, HospitalSnapshot, HospitalStatus
from dispatch.repository import (
    STATE_RANK,
    AckRecord,
    AlertRecord,
    EventKind,
    EventSource,
    InMemoryRepository,
    Repository,
)

__all__ = ["DispatchService", "Rejected", "ServiceStats", "SUBSCRIBED_STREAMS", "reject_reason"]

logger = logging.getLogger(__name__)

SUBSCRIBED_STREAMS: tuple[Stream, ...] = (Stream.PREALERT, Stream.GPS, Stream.STATUS, Stream.AVAILABILITY, Stream.ACK)
"""Streams dispatch consumes: every unit's pre-alert, GPS, status and availability; every hospital's acks."""

_REASON_TABLE: tuple[tuple[str, str], ...] = (
    ("outside the topic space", "bad_topic"),
    ("expected {scope}", "bad_topic"),
    ("unknown scope or stream", "bad_topic"),
    ("not allowed in this scope", "bad_topic"),
    ("not an opaque id", "bad_topic"),
    ("exceeds", "too_large"),
    ("UTF-8", "not_utf8"),
    ("JSON", "bad_json"),
    ("schema_version", "schema_version"),
    ("invalid fields", "invalid_fields"),
    ("does not match the topic", "id_mismatch"),
)


def reject_reason(error: PayloadError) -> str:
    """A short, bounded category for a codec error (the counter key); ``other`` when unrecognised."""
    return next((key for text, key in _REASON_TABLE if text in error.reason), "other")


class Rejected(DispatchError):
    """A well-formed message that dispatch cannot act on.  ``reason`` is the counter key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ServiceStats:
    """Counters for health checks and tests."""

    connected: bool
    sessions: int
    queue_depth: int
    processed: dict[str, int]
    rejected: dict[str, int]


@dataclass(frozen=True, slots=True)
class _Inbound:
    topic: str
    payload: bytes
    received_at: datetime


class DispatchService:
    """Dispatch's MQTT side and its in-memory state.

    Args:
        broker: MQTT connection settings.
        space: the topic space (prefix empty in production).
        registry: hospitals with live status.
        router: road router for ETAs; ``None`` runs without ETAs (ranking by capability only).
        repository: state store; a fresh :class:`InMemoryRepository` by default.
        queue_size: inbound messages waiting for the worker at most; beyond it receiving pauses (nothing dropped).
        enqueue_timeout_s: a full queue lasting longer than this is logged and counted in ``stalls``.
        publish_timeout_s: how long a publish waits for its PUBACK.
        clock: the UTC clock (tests may pin it).
        ack_timeouts_s: seconds a department page waits for its acknowledgement before escalating, by alert
            priority (default :data:`dispatch.activation.DEFAULT_ACK_TIMEOUT_S`: high 120 s).
        escalation_tick_s: how often the running service checks the escalation deadlines, seconds.
    """

    def __init__(
        self,
        broker: BrokerSettings,
        space: TopicSpace,
        registry: HospitalRegistry,
        router: Router | None,
        *,
        client_id: str = "goldenhour-dispatch",
        repository: Repository | None = None,
        queue_size: int = 1_000,
        enqueue_timeout_s: float = 5.0,
        publish_timeout_s: float = 5.0,
        clock: Callable[[], datetime] = utc_now,
        ack_timeouts_s: Mapping[Priority, float] | None = None,
        escalation_tick_s: float = 1.0,
    ) -> None:
        self.broker = broker
        self.space = space
        self.registry = registry
        self.router = router
        self.repo: Repository = repository if repository is not None else InMemoryRepository()
        self.link = PahoLink(broker, client_id=client_id, clean_session=False)
        self.clock = clock
        self.processed: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.stalls = 0
        """Times the inbound queue stayed full longer than ``enqueue_timeout_s`` (receiving paused, nothing lost)."""
        self.handled = asyncio.Condition()
        """Notified after every inbound message is handled or rejected (tests wait on it, no sleeps)."""
        self._queue: asyncio.Queue[_Inbound] = asyncio.Queue(maxsize=queue_size)
        self._enqueue_timeout_s = enqueue_timeout_s
        self._publish_timeout_s = publish_timeout_s
        # Outbound seq: per (stream, owner) counter starting at the service's start time in microseconds, so a
        # restarted dispatch never reuses a sequence number and consecutive messages still step by one.
        self._seq_base = time.time_ns() // 1_000
        self._seq: dict[tuple[Stream, str], int] = {}
        self.ack_timeouts_s: dict[Priority, float] = {**DEFAULT_ACK_TIMEOUT_S, **(ack_timeouts_s or {})}
        if any(v <= 0 for v in self.ack_timeouts_s.values()) or escalation_tick_s <= 0:
            raise ValueError("acknowledgement timeouts and the escalation tick must be positive")
        self.escalation_tick_s = escalation_tick_s
        self._deadlines: dict[str, datetime] = {}
        """alert id -> earliest escalation deadline of its open pages (the timer index)."""
        self._opened = False
        self.cases = CaseDesk(self.repo, registry, clock, self._publish, self._next_seq)
        """Incidents, assignments and case timelines (:mod:`dispatch.cases`)."""

    # --- lifecycle ----------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Load the repository, restore hospital statuses and escalation timers (idempotent).

        Raises:
            StoreError: the database cannot be reached or its schema is newer than this code.
        """
        if self._opened:
            return
        await self.repo.open()
        for hospital_id, st in self.repo.hospital_statuses().items():
            if hospital_id in self.registry:
                self.registry.restore_status(hospital_id, st)
        for record in self.repo.alerts():
            self._schedule(record)
        self._opened = True

    async def close(self) -> None:
        """Release the repository."""
        await self.repo.close()
        self._opened = False

    async def run(self) -> None:
        """Open the store, then connect, subscribe, process messages and escalate pages until cancelled."""
        await self.open()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.link.run(self._on_connect, self._on_message), name="dispatch-mqtt")
                tg.create_task(self._worker(), name="dispatch-worker")
                tg.create_task(self._escalation_loop(), name="dispatch-escalation")
        finally:
            await self.close()

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Wait until subscribed to the broker.  Raises TimeoutError."""
        await self.link.wait_connected(timeout_s)

    def stats(self) -> ServiceStats:
        """Current counters."""
        return ServiceStats(
            connected=self.link.connected.is_set(),
            sessions=self.link.sessions,
            queue_depth=self._queue.qsize(),
            processed=dict(self.processed),
            rejected=dict(self.rejected),
        )

    async def _on_connect(self, link: PahoLink) -> None:
        await link.subscribe([(self.space.filter(stream), STREAMS[stream].qos) for stream in SUBSCRIBED_STREAMS])
        logger.info("dispatch subscribed streams=%d", len(SUBSCRIBED_STREAMS))

    async def _on_message(self, message: ReceivedMessage) -> None:
        """Receive-loop callback: enqueue only, never decode or publish here (FF-01).

        A full queue is waited out, not dropped: while this waits, the link stops reading the socket and the broker
        keeps the rest for the persistent session (:class:`broker_config.paho_link.PahoLink`), so a stalled worker
        costs latency, never a pre-alert.  A wait longer than ``enqueue_timeout_s`` is logged (once per wait)."""
        topic = str(message.topic)
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            payload = b"" if payload is None else str(payload).encode()
        item = _Inbound(topic, bytes(payload), self.clock())
        try:
            self._queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            pass
        try:
            async with asyncio.timeout(self._enqueue_timeout_s):
                await self._queue.put(item)
                return
        except TimeoutError:
            self.stalls += 1
            logger.warning(
                "dispatch queue full for %.1f s; receiving paused until the worker catches up topic=%s",
                self._enqueue_timeout_s,
                loggable(topic),
            )
        await self._queue.put(item)

    async def _worker(self) -> None:
        while True:
            try:
                async with asyncio.timeout(1.0):
                    item = await self._queue.get()
            except TimeoutError:
                continue  # idle wake-up
            await self.handle(item.topic, item.payload, item.received_at)

    async def _escalation_loop(self) -> None:
        while True:
            await asyncio.sleep(self.escalation_tick_s)  # a periodic timer, not a wait for an event
            await self.tick()

    # --- the per-message error boundary --------------------------------------------------------------------------

    async def handle(self, topic: str, payload: bytes, received_at: datetime | None = None) -> None:
        """Decode and act on one message; never raises (the error boundary).  Public for unit tests."""
        received_at = received_at or self.clock()
        unit_id: str | None = None
        seq: int | None = None
        try:
            parsed, model = decode(self.space, topic, payload, received_at=received_at)
            unit_id = getattr(model, "unit_id", None)
            seq = getattr(model, "seq", None)
            await self._dispatch(parsed.stream, model, received_at)
            self.processed[parsed.stream.value] += 1
        except PayloadError as exc:
            self._reject(reject_reason(exc), topic, payload, unit_id, seq)
        except Rejected as exc:
            self._reject(exc.reason, topic, payload, unit_id, seq)
        except Exception:
            self._reject("handler_error", topic, payload, unit_id, seq)
            logger.debug("handler error topic=%s", loggable(topic), exc_info=True)
        async with self.handled:
            self.handled.notify_all()

    def _reject(self, reason: str, topic: str, payload: bytes, unit_id: str | None, seq: int | None) -> None:
        self.rejected[reason] += 1
        logger.warning(
            "message rejected reason=%s topic=%s unit=%s seq=%s bytes=%d",
            reason,
            loggable(topic),
            unit_id,
            seq,
            len(payload),
        )

    async def _dispatch(self, stream: Stream, model: BaseModel, received_at: datetime) -> None:
        if isinstance(model, GpsFix):
            self._on_gps(model, received_at)
            unit = self.repo.unit(model.unit_id)
            await self.cases.on_gps(unit, model, received_at)
            await self.repo.save_unit(unit)
        elif isinstance(model, Status):
            newest = self._on_status(model, received_at)
            unit = self.repo.unit(model.unit_id)
            await self.cases.on_status(unit, model, received_at, newest=newest)
            await self.repo.save_unit(unit)
        elif isinstance(model, Availability):
            self._on_availability(model, received_at)
            await self.repo.save_unit(self.repo.unit(model.unit_id))
        elif isinstance(model, PreAlert):
            await self._on_prealert(model, received_at)
        elif isinstance(model, AlertAck):
            await self._on_ack(model, received_at)
        else:
            raise Rejected("unexpected_stream")

    # --- unit state ----------------------------------------------------------------------------------------------

    def _on_gps(self, fix: GpsFix, received_at: datetime) -> None:
        unit = self.repo.unit(fix.unit_id)
        unit.last_seen_at = received_at
        if not fix.fix or fix.lat_deg is None or fix.lon_deg is None:
            unit.gps_fix = False  # keep the last known position and its age (FF-05, FF-15)
            return
        position = (fix.lat_deg, fix.lon_deg)
        if not valid_position_deg(position):
            raise Rejected("null_island")
        if unit.position_at is not None and fix.sent_at < unit.position_at:
            return  # an older (historical) fix never replaces a newer one
        unit.position_deg = position
        unit.position_at = fix.sent_at
        unit.gps_fix = True

    def _on_status(self, status: Status, received_at: datetime) -> bool:
        """Update the unit's last crew status; False when the tap is older than the one already known."""
        unit = self.repo.unit(status.unit_id)
        unit.last_seen_at = received_at
        if unit.status_at is not None and status.at < unit.status_at:
            return False
        unit.status = status.status
        unit.status_at = status.at
        unit.status_seq = status.seq
        return True

    def _on_availability(self, message: Availability, received_at: datetime) -> None:
        unit = self.repo.unit(message.unit_id)
        unit.last_seen_at = received_at
        if older_session(message.seq, unit.session_seq):
            return  # a late will of an older session cannot hide a newer birth
        unit.session_seq = message.seq
        unit.online = message.state == "online"

    # --- pre-alerts ----------------------------------------------------------------------------------------------

    def eta_s_by_hospital(
        self, position_deg: tuple[float, float] | None, snapshots: list[HospitalSnapshot]
    ) -> dict[str, float | None]:
        """Road ETA from ``position_deg`` to each hospital (one Dijkstra search); empty without position/router."""
        if position_deg is None or self.router is None:
            return {}
        try:
            etas = self.router.eta_s_to_many(position_deg, [s.hospital.position_deg for s in snapshots])
        except OutsideNetworkError:
            return {}
        return {s.hospital.hospital_id: eta for s, eta in zip(snapshots, etas, strict=True)}

    @staticmethod
    def _choose(
        alert: PreAlert,
        ranking: list[Recommendation],
        diverted: set[str],
        events: list[tuple[EventKind, str]],
    ) -> Recommendation:
        """The first recommendation, or the crew's requested hospital if it has an ED and is not on diversion."""
        requested = alert.requested_hospital_id
        if requested is not None:
            match = next((r for r in ranking if r.hospital_id == requested), None)
            if match is not None and requested not in diverted:
                if match is not ranking[0]:
                    events.append(
                        (EventKind.CREW_REQUEST_HONOURED, f"requested={requested} recommended={ranking[0].hospital_id}")
                    )
                return match
            events.append((EventKind.CREW_REQUEST_REFUSED, f"requested={requested}"))
        return ranking[0]

    async def _on_prealert(self, alert: PreAlert, received_at: datetime) -> None:
        existing = self.repo.alert(alert.alert_id)
        if existing is not None:
            if existing.unit_id != alert.unit_id:
                raise Rejected("alert_id_conflict")
            existing.add_event(
                received_at,
                EventSource.UNIT,
                EventKind.PREALERT_REPLAYED,
                f"seq={alert.seq}",
                historical=alert.historical,
            )
            if not existing.alert_published:
                await self._publish_alert(existing, received_at)
            await self._publish_notice(existing, NoticeKind.DESTINATION, received_at)
            await self.repo.save_alert(existing)
            return
        now = self.clock()
        unit = self.repo.find_unit(alert.unit_id)
        position = unit.position_deg if unit is not None and valid_position_deg(unit.position_deg) else None
        snapshots = self.registry.snapshot(now)
        etas = await asyncio.to_thread(self.eta_s_by_hospital, position, snapshots)
        ranking = rank_destinations(alert.case_type, alert.findings, position, snapshots, etas, now=now)
        if not ranking:
            raise Rejected("no_destination")
        events: list[tuple[EventKind, str]] = []
        diverted = {s.hospital.hospital_id for s in snapshots if s.status.diversion}
        choice = self._choose(alert, ranking, diverted, events)
        hospital = self.registry.get(choice.hospital_id)
        reasons = list(choice.reasons)
        eta_at: datetime | None = None
        if choice.eta_s is not None:
            eta_at = now + timedelta(seconds=choice.eta_s)
        elif alert.eta_s is not None:
            eta_at = alert.sent_at + timedelta(seconds=alert.eta_s)
            reasons.append("ETA from the crew's estimate")
        if position is None:
            reasons.append("unit position unknown")
        if alert.historical:
            reasons.append("delayed pre-alert (store-and-forward replay)")
        record = AlertRecord(
            alert_id=alert.alert_id,
            unit_id=alert.unit_id,
            case_type=alert.case_type,
            priority=priority_for(alert.case_type, alert.findings),
            findings=alert.findings,
            created_at=received_at,
            hospital_id=hospital.hospital_id,
            hospital_name=hospital.name,
            departments=departments_for(alert.case_type, alert.findings, hospital),
            reasons=tuple(r[:200] for r in reasons),
            recommendations=tuple(ranking),
            eta_s=choice.eta_s,
            eta_at=eta_at,
            historical=alert.historical,
            requested_hospital_id=alert.requested_hospital_id,
        )
        record.add_event(
            received_at, EventSource.UNIT, EventKind.PREALERT_RECEIVED, f"seq={alert.seq}", historical=alert.historical
        )
        for kind, detail in events:
            record.add_event(now, EventSource.DISPATCH, kind, detail)
        record.add_event(now, EventSource.DISPATCH, EventKind.DESTINATION_CHOSEN, f"hospital={hospital.hospital_id}")
        if alert.case_type is not CaseType.MEDICAL:  # MEDICAL is a notification without team activation
            record.activations = page(record.departments, now, self.ack_timeouts_s[record.priority])
            for activation in record.activations:
                record.add_event(
                    now, EventSource.DISPATCH, EventKind.ACTIVATION_PAGED, f"department={activation.department.value}"
                )
            self._schedule(record)
        self.repo.add_alert(record)
        await self.cases.on_prealert(record, alert, received_at)
        if unit is None:
            unit = self.repo.unit(alert.unit_id)
        unit.current_alert_id = alert.alert_id
        unit.destination_hospital_id = hospital.hospital_id
        logger.info(
            "prealert routed alert=%s unit=%s hospital=%s seq=%d",
            alert.alert_id,
            alert.unit_id,
            hospital.hospital_id,
            alert.seq,
        )
        await self._publish_alert(record, now)
        await self._publish_notice(record, NoticeKind.DESTINATION, now)
        await self.repo.save_unit(unit)
        await self.repo.save_alert(record)

    # --- acknowledgements ----------------------------------------------------------------------------------------

    async def _on_ack(self, ack: AlertAck, received_at: datetime) -> None:
        record = self.repo.alert(ack.alert_id)
        if record is None:
            raise Rejected("unknown_alert")
        if ack.hospital_id != record.hospital_id:
            raise Rejected("wrong_hospital")
        if ack.unit_id != record.unit_id:
            raise Rejected("unit_mismatch")
        state = AlertState(ack.state)
        record.acks.append(AckRecord(state, ack.hospital_id, ack.by_role, ack.department, ack.at, received_at))
        detail = f"hospital={ack.hospital_id} role={ack.by_role[:32]}" + (
            f" department={ack.department.value}" if ack.department else ""
        )
        acknowledged: tuple[Department, ...] = ()
        if state is AlertState.ACKNOWLEDGED and record.activations and record.state is not AlertState.CANCELLED:
            record.activations, acknowledged = acknowledge(record.activations, ack.department, ack.at, ack.by_role)
            for department in acknowledged:
                record.add_event(
                    ack.at,
                    EventSource.HOSPITAL,
                    EventKind.ACTIVATION_ACKNOWLEDGED,
                    f"department={department.value} role={ack.by_role[:32]}",
                )
            self._schedule(record)
            if acknowledged:
                await self.cases.on_acknowledged(record, acknowledged, ack.at)
        new_state = self._alert_state(record, state)
        if new_state is record.state and not acknowledged:
            record.add_event(ack.at, EventSource.HOSPITAL, EventKind.ACK_REPEATED, detail)
            await self.repo.save_alert(record)
            return
        if new_state is not record.state:
            record.state = new_state
            kind = EventKind.ACKNOWLEDGED if new_state is AlertState.ACKNOWLEDGED else EventKind.ON_BOARD
            if new_state is not AlertState.ESCALATED:
                record.add_event(ack.at, EventSource.HOSPITAL, kind, detail)
        logger.info(
            "alert state alert=%s hospital=%s state=%s", record.alert_id, record.hospital_id, record.state.value
        )
        now = self.clock()
        if acknowledged:
            await self._publish_alert(record, now)
        await self._publish_notice(record, NoticeKind.ALERT_STATE, now)
        await self.repo.save_alert(record)

    @staticmethod
    def _alert_state(record: AlertRecord, ack_state: AlertState | None) -> AlertState:
        """The alert's state after an ack (``ack_state``) or an escalation (None); never moves backwards."""
        if record.state is AlertState.CANCELLED:
            return record.state
        if record.activations:
            open_pages = [
                a for a in record.activations if a.state in (ActivationState.PAGED, ActivationState.ESCALATED)
            ]
            if not open_pages:
                return AlertState.ACKNOWLEDGED
            if any(a.state is ActivationState.ESCALATED for a in open_pages):
                return AlertState.ESCALATED
            if ack_state is not None and record.state is AlertState.SENT:
                return AlertState.ON_BOARD
            return record.state
        if ack_state is not None and STATE_RANK[ack_state] > STATE_RANK[record.state]:
            return ack_state
        return record.state

    # --- hospital status ------------------------------------------------------------------------------------------

    async def set_hospital_status(
        self,
        hospital_id: str,
        *,
        by: str,
        at: datetime,
        diversion: bool | None = None,
        cath_lab_busy: bool | None = None,
        ed_beds_free: int | None = None,
        until: datetime | None = None,
    ) -> HospitalStatus:
        """Change a hospital's live status (see :meth:`HospitalRegistry.set_status`) and store the change.

        Raises:
            UnknownHospitalError: no such hospital.  StoreError: the change is live but could not be stored.
        """
        new = self.registry.set_status(
            hospital_id,
            by=by,
            at=at,
            diversion=diversion,
            cath_lab_busy=cath_lab_busy,
            ed_beds_free=ed_beds_free,
            until=until,
        )
        await self.repo.save_hospital_status(hospital_id, new)
        return new

    # --- escalation ----------------------------------------------------------------------------------------------

    def _schedule(self, record: AlertRecord) -> None:
        deadline = next_deadline(record.activations) if record.state is not AlertState.CANCELLED else None
        if deadline is None:
            self._deadlines.pop(record.alert_id, None)
        else:
            self._deadlines[record.alert_id] = deadline

    def next_escalation_at(self) -> datetime | None:
        """The earliest pending escalation deadline (UTC), or None."""
        return min(self._deadlines.values(), default=None)

    async def tick(self, now: datetime | None = None) -> int:
        """Escalate every page whose deadline has passed at ``now`` (default: the clock).

        Each escalation is recorded in the alert's timeline and re-published: a HospitalAlert (new seq, same
        alert_id) to the hospital and an ``alert_state`` Notice with the activations to the unit.  Returns how
        many alerts escalated.  A store failure for one alert is logged (ids only) and the others go on.
        """
        now = now or self.clock()
        escalated = 0
        for alert_id in [a for a, deadline in self._deadlines.items() if deadline <= now]:
            record = self.repo.alert(alert_id)
            if record is None:
                self._deadlines.pop(alert_id, None)
                continue
            record.activations, steps = escalate_due(record.activations, now, self.ack_timeouts_s[record.priority])
            for step in steps:
                record.add_event(
                    now,
                    EventSource.DISPATCH,
                    EventKind.ACTIVATION_ESCALATED,
                    f"department={step.department.value} level={step.level}" + (" repeat" if step.repeat else ""),
                )
            record.state = self._alert_state(record, None)
            self._schedule(record)
            if not steps:
                continue
            escalated += 1
            logger.warning(
                "activation escalated alert=%s hospital=%s departments=%s",
                record.alert_id,
                record.hospital_id,
                ",".join(f"{step.department.value}:{step.level}" for step in steps),
            )
            await self._publish_alert(record, now)
            await self._publish_notice(record, NoticeKind.ALERT_STATE, now)
            try:
                await self.repo.save_alert(record)
            except StoreError as exc:
                logger.warning("escalation not saved alert=%s cause=%s", record.alert_id, exc.cause)
        if escalated:
            async with self.handled:
                self.handled.notify_all()
        return escalated

    # --- publishing ----------------------------------------------------------------------------------------------

    def _next_seq(self, stream: Stream, owner_id: str) -> int:
        key = (stream, owner_id)
        value = self._seq.get(key, self._seq_base)
        self._seq[key] = value + 1
        return value

    async def _publish(self, stream: Stream, owner_id: str, message: BaseModel) -> bool:
        """Publish with QoS/retain from the contract; one bounded retry after waiting for the link."""
        spec = STREAMS[stream]
        topic = self.space.topic(stream, owner_id)
        data = encode(stream, message)
        for attempt in (1, 2):
            try:
                await self.link.publish(
                    topic, data, qos=spec.qos, retain=spec.retain, timeout_s=self._publish_timeout_s
                )
                return True
            except NotConnectedError:
                logger.warning("publish not confirmed topic=%s attempt=%d", topic, attempt)
                if attempt == 1:
                    try:
                        await self.link.wait_connected(self._publish_timeout_s)
                    except TimeoutError:
                        return False
        return False

    async def _publish_alert(self, record: AlertRecord, now: datetime) -> None:
        message = HospitalAlert(
            unit_id=record.unit_id,
            seq=self._next_seq(Stream.ALERT, record.hospital_id),
            sent_at=now,
            historical=record.historical,
            alert_id=record.alert_id,
            hospital_id=record.hospital_id,
            case_type=record.case_type,
            priority=record.priority,
            eta_at=record.eta_at,
            departments=record.departments,
            findings=record.findings,
            reasons=record.reasons,
            state=record.state,
            activations=record.activations,
        )
        ok = await self._publish(Stream.ALERT, record.hospital_id, message)
        record.alert_published = ok
        kind = EventKind.ALERT_SENT if ok else EventKind.PUBLISH_FAILED
        record.add_event(self.clock(), EventSource.DISPATCH, kind, f"stream=alert hospital={record.hospital_id}")

    async def _publish_notice(self, record: AlertRecord, kind: NoticeKind, now: datetime) -> None:
        message = Notice(
            unit_id=record.unit_id,
            seq=self._next_seq(Stream.NOTICE, record.unit_id),
            sent_at=now,
            kind=kind,
            alert_id=record.alert_id,
            hospital_id=record.hospital_id,
            hospital_name=record.hospital_name[:200],
            reasons=record.reasons if kind is NoticeKind.DESTINATION else (),
            alert_state=record.state,
            eta_at=record.eta_at,
            activations=record.activations,
        )
        ok = await self._publish(Stream.NOTICE, record.unit_id, message)
        event = EventKind.NOTICE_SENT if ok else EventKind.PUBLISH_FAILED
        record.add_event(self.clock(), EventSource.DISPATCH, event, f"stream=notice kind={kind.value}")
