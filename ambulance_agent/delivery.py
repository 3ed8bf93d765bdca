"""End-to-end delivery of the crew's messages, as the crew screen shows it.

Each pre-alert and each ECG chunk moves through stages, each with its time:

``queued``
    stored in the vehicle's durable outbox (survives a crash or power cut);
``sent``
    the broker confirmed it (QoS 1 PUBACK);
``stored``
    the telemetry store's retained :class:`broker_config.StoreReceipt` for this unit says everything of the stream
    up to at least this ``seq`` is durably stored;
``on_board`` / ``acknowledged`` (pre-alerts)
    dispatch's :class:`broker_config.Notice` (``alert_state``) relays the hospital board's display receipt and the
    staff's acknowledgement (with the departments' activations).

Stages are monotonic: a late PUBACK after the store's receipt does not move a message back.  Memory is bounded:
the last ``max_alerts`` pre-alerts and ``max_chunks`` ECG chunks are tracked.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum

from broker_config import SEQ_RESTART_JUMP, Activation, AlertState, CaseType, Notice, StoreReceipt, Stream

__all__ = ["ChunkDelivery", "DeliveryStage", "DeliveryTracker", "EcgDeliverySummary", "PreAlertDelivery"]


class DeliveryStage(StrEnum):
    """How far a message got (in order)."""

    QUEUED = "queued"
    SENT = "sent"
    STORED = "stored"
    ON_BOARD = "on_board"
    ACKNOWLEDGED = "acknowledged"


@dataclass(frozen=True, slots=True)
class PreAlertDelivery:
    """One pre-alert's way to the hospital."""

    alert_id: str
    seq: int
    case_type: CaseType
    queued_at: datetime
    sent_at: datetime | None = None
    stored_at: datetime | None = None
    hospital_state: AlertState | None = None
    hospital_state_at: datetime | None = None
    on_board_at: datetime | None = None
    acknowledged_at: datetime | None = None
    hospital_id: str | None = None
    activations: tuple[Activation, ...] = ()

    @property
    def stage(self) -> DeliveryStage:
        """The furthest stage reached."""
        if self.acknowledged_at is not None:
            return DeliveryStage.ACKNOWLEDGED
        if self.on_board_at is not None:
            return DeliveryStage.ON_BOARD
        if self.stored_at is not None:
            return DeliveryStage.STORED
        if self.sent_at is not None:
            return DeliveryStage.SENT
        return DeliveryStage.QUEUED


@dataclass(frozen=True, slots=True)
class ChunkDelivery:
    """One ECG chunk's delivery."""

    seq: int
    start_at: datetime
    queued_at: datetime
    sent_at: datetime | None = None
    stored_at: datetime | None = None

    @property
    def stage(self) -> DeliveryStage:
        """The furthest stage reached."""
        if self.stored_at is not None:
            return DeliveryStage.STORED
        if self.sent_at is not None:
            return DeliveryStage.SENT
        return DeliveryStage.QUEUED


@dataclass(frozen=True, slots=True)
class EcgDeliverySummary:
    """ECG chunks tracked now, by stage, and the receipt's watermark."""

    tracked: int
    queued: int
    sent: int
    stored: int
    newest_sent_seq: int | None
    stored_through_seq: int | None


@dataclass(slots=True)
class _Receipts:
    stored_through: dict[str, int] = field(default_factory=dict)
    at: datetime | None = None
    seq: int = -1


class DeliveryTracker:
    """Bookkeeping of :class:`PreAlertDelivery` and :class:`ChunkDelivery` (no I/O; event-loop only).

    Args:
        clock: aware-UTC clock for the stage times.
        max_alerts, max_chunks: how many are remembered (oldest forgotten first).
    """

    def __init__(self, clock: Callable[[], datetime], *, max_alerts: int = 32, max_chunks: int = 600) -> None:
        self._clock = clock
        self.max_alerts = max_alerts
        self.max_chunks = max_chunks
        self._alerts: OrderedDict[str, PreAlertDelivery] = OrderedDict()
        self._alert_by_seq: dict[int, str] = {}
        self._chunks: OrderedDict[int, ChunkDelivery] = OrderedDict()
        self._receipts = _Receipts()
        self._highest_queued: dict[str, int] = {}

    # --- events --------------------------------------------------------------------------------------------------

    def prealert_queued(self, alert_id: str, seq: int, case_type: CaseType) -> None:
        """A pre-alert is in the outbox with ``seq``."""
        self._queued(Stream.PREALERT, seq)
        record = PreAlertDelivery(alert_id=alert_id, seq=seq, case_type=case_type, queued_at=self._clock())
        self._alerts[alert_id] = self._apply_receipt_to_alert(record)
        self._alert_by_seq[seq] = alert_id
        while len(self._alerts) > self.max_alerts:
            _, old = self._alerts.popitem(last=False)
            self._alert_by_seq.pop(old.seq, None)

    def chunk_queued(self, seq: int, start_at: datetime) -> None:
        """An ECG chunk is in the outbox with ``seq``."""
        if seq < 0:
            return
        self._queued(Stream.ECG, seq)
        self._chunks[seq] = self._apply_receipt_to_chunk(ChunkDelivery(seq, start_at, self._clock()))
        while len(self._chunks) > self.max_chunks:
            self._chunks.popitem(last=False)

    def sent(self, stream: Stream, seq: int) -> None:
        """The broker acknowledged ``stream``/``seq``."""
        now = self._clock()
        if stream is Stream.PREALERT:
            alert_id = self._alert_by_seq.get(seq)
            record = self._alerts.get(alert_id) if alert_id else None
            if record is not None and record.sent_at is None:
                self._alerts[record.alert_id] = self._apply_receipt_to_alert(replace(record, sent_at=now))
        elif stream is Stream.ECG:
            chunk = self._chunks.get(seq)
            if chunk is not None and chunk.sent_at is None:
                self._chunks[seq] = self._apply_receipt_to_chunk(replace(chunk, sent_at=now))

    def receipt(self, receipt: StoreReceipt) -> bool:
        """Apply the store's receipt; False if it is older than the one applied (by ``seq``)."""
        if receipt.seq < self._receipts.seq:
            return False
        merged = dict(self._receipts.stored_through)
        for stream, through in receipt.stored_through_seq.items():
            old = merged.get(stream, -1)
            # far below what it said before: the store saw this unit's counter restart (a new outbox) and started
            # its watermark again; otherwise receipts only move forward
            merged[stream] = through if through < old - SEQ_RESTART_JUMP else max(through, old)
        self._receipts = _Receipts(merged, receipt.stored_at, receipt.seq)
        for alert_id, record in self._alerts.items():
            self._alerts[alert_id] = self._apply_receipt_to_alert(record)
        for seq, chunk in self._chunks.items():
            self._chunks[seq] = self._apply_receipt_to_chunk(chunk)
        return True

    def notice(self, notice: Notice) -> None:
        """Dispatch relayed the hospital's state of a pre-alert (and the departments' activations)."""
        if notice.alert_id is None or notice.alert_state is None:
            return
        record = self._alerts.get(notice.alert_id)
        if record is None:
            return
        now = self._clock()
        state = notice.alert_state
        changes: dict[str, object] = {"hospital_state": state, "hospital_state_at": now}
        if notice.hospital_id is not None:
            changes["hospital_id"] = notice.hospital_id
        if notice.activations:
            changes["activations"] = notice.activations
        if state in (AlertState.ON_BOARD, AlertState.ACKNOWLEDGED, AlertState.ESCALATED) and record.on_board_at is None:
            changes["on_board_at"] = now
        if state is AlertState.ACKNOWLEDGED and record.acknowledged_at is None:
            changes["acknowledged_at"] = now
        if record.sent_at is None:
            changes["sent_at"] = now  # dispatch has it, so the broker had it
        self._alerts[record.alert_id] = replace(record, **changes)  # type: ignore[arg-type]

    # --- receipts ------------------------------------------------------------------------------------------------

    def _queued(self, stream: Stream, seq: int) -> None:
        self._highest_queued[stream.value] = max(seq, self._highest_queued.get(stream.value, -1))

    def _through(self, stream: Stream) -> int:
        """The receipt's watermark for ``stream``, or -1 if it belongs to another counter: far above anything this
        agent has queued (a retained receipt of an outbox whose clock ran ahead), it proves nothing about ours."""
        through = self._receipts.stored_through.get(stream.value, -1)
        highest = self._highest_queued.get(stream.value)
        if highest is not None and through > highest + SEQ_RESTART_JUMP:
            return -1
        return through

    def _apply_receipt_to_alert(self, record: PreAlertDelivery) -> PreAlertDelivery:
        if record.stored_at is None and record.seq <= self._through(Stream.PREALERT):
            now = self._clock()
            return replace(record, stored_at=self._receipts.at or now, sent_at=record.sent_at or now)
        return record

    def _apply_receipt_to_chunk(self, chunk: ChunkDelivery) -> ChunkDelivery:
        if chunk.stored_at is None and chunk.seq <= self._through(Stream.ECG):
            now = self._clock()
            return replace(chunk, stored_at=self._receipts.at or now, sent_at=chunk.sent_at or now)
        return chunk

    # --- views ---------------------------------------------------------------------------------------------------

    @property
    def stored_through(self) -> dict[str, int]:
        """The latest receipt's watermark per stream (``-1`` = nothing stored yet; absent = no receipt)."""
        return dict(self._receipts.stored_through)

    @property
    def receipt_at(self) -> datetime | None:
        """``stored_at`` of the latest receipt."""
        return self._receipts.at

    def prealert(self, alert_id: str) -> PreAlertDelivery | None:
        """One pre-alert's delivery, or None if unknown (or forgotten)."""
        return self._alerts.get(alert_id)

    def prealerts(self) -> list[PreAlertDelivery]:
        """Tracked pre-alerts, newest first."""
        return list(reversed(self._alerts.values()))

    def chunk(self, seq: int) -> ChunkDelivery | None:
        """One ECG chunk's delivery, or None if not tracked."""
        return self._chunks.get(seq)

    def chunks(self, last: int = 20) -> list[ChunkDelivery]:
        """The newest ``last`` tracked chunks, newest first."""
        out = list(reversed(self._chunks.values()))
        return out[:last]

    def ecg_summary(self) -> EcgDeliverySummary:
        """Counts of tracked chunks by stage."""
        stages = [c.stage for c in self._chunks.values()]
        sent_seqs = [c.seq for c in self._chunks.values() if c.sent_at is not None]
        through = self._receipts.stored_through.get(Stream.ECG.value)
        return EcgDeliverySummary(
            tracked=len(stages),
            queued=stages.count(DeliveryStage.QUEUED),
            sent=stages.count(DeliveryStage.SENT),
            stored=stages.count(DeliveryStage.STORED),
            newest_sent_seq=max(sent_seqs, default=None),
            stored_through_seq=through,
        )
