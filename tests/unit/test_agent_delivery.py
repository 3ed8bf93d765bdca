"""Delivery stages of pre-alerts and ECG chunks: queued -> sent -> stored -> on the board -> acknowledged."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ambulance_agent.delivery import DeliveryStage, DeliveryTracker
from broker_config import (
    Activation,
    ActivationState,
    AlertState,
    CaseType,
    Department,
    Notice,
    NoticeKind,
    StoreReceipt,
    Stream,
)

T0 = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def receipt(seq: int, **through: int) -> StoreReceipt:
    return StoreReceipt(unit_id="U1", seq=seq, sent_at=T0, stored_through_seq=through, stored_at=T0)


def notice(alert_id: str, state: AlertState, seq: int = 0, **extra: object) -> Notice:
    return Notice(
        unit_id="U1",
        seq=seq,
        sent_at=T0,
        kind=NoticeKind.ALERT_STATE,
        alert_id=alert_id,
        alert_state=state,
        **extra,  # type: ignore[arg-type,unused-ignore]
    )


def test_prealert_moves_through_every_stage_once() -> None:
    tracker = DeliveryTracker(Clock())
    tracker.prealert_queued("pa-1", 0, CaseType.STEMI)
    record = tracker.prealert("pa-1")
    assert record is not None
    assert record.stage is DeliveryStage.QUEUED
    tracker.sent(Stream.PREALERT, 0)
    assert tracker.prealert("pa-1").stage is DeliveryStage.SENT  # type: ignore[union-attr]
    assert tracker.receipt(receipt(5, prealert=0, ecg=-1))
    stored = tracker.prealert("pa-1")
    assert stored is not None
    assert stored.stage is DeliveryStage.STORED
    assert stored.stored_at == T0
    tracker.notice(notice("pa-1", AlertState.ON_BOARD, hospital_id="chpg"))
    assert tracker.prealert("pa-1").stage is DeliveryStage.ON_BOARD  # type: ignore[union-attr]
    cath = Activation(department=Department.CATH_LAB, state=ActivationState.ACKNOWLEDGED)
    tracker.notice(notice("pa-1", AlertState.ACKNOWLEDGED, seq=1, activations=(cath,)))
    done = tracker.prealert("pa-1")
    assert done is not None
    assert done.stage is DeliveryStage.ACKNOWLEDGED
    assert (done.hospital_id, done.activations) == ("chpg", (cath,))
    assert done.sent_at is not None
    assert done.on_board_at is not None
    assert done.acknowledged_at is not None
    assert done.queued_at < done.sent_at < done.on_board_at < done.acknowledged_at
    # a late PUBACK (a resend after a lost ack) changes nothing
    tracker.sent(Stream.PREALERT, 0)
    assert tracker.prealert("pa-1") == done


def test_an_older_receipt_is_ignored_and_watermarks_never_go_back() -> None:
    tracker = DeliveryTracker(Clock())
    assert tracker.receipt(receipt(10, ecg=7))
    assert not tracker.receipt(receipt(9, ecg=9))
    assert tracker.receipt(receipt(11, ecg=3, vitals=2))
    assert tracker.stored_through == {"ecg": 7, "vitals": 2}


def test_ecg_chunks_are_stored_up_to_the_watermark_and_tracking_is_bounded() -> None:
    tracker = DeliveryTracker(Clock(), max_chunks=5)
    for seq in range(8):
        tracker.chunk_queued(seq, T0 + timedelta(seconds=seq))
    tracker.chunk_queued(-1, T0)  # shed by a full outbox: never tracked
    assert [c.seq for c in tracker.chunks(10)] == [7, 6, 5, 4, 3]
    tracker.sent(Stream.ECG, 6)
    tracker.sent(Stream.ECG, 7)
    tracker.receipt(receipt(0, ecg=5))
    summary = tracker.ecg_summary()
    assert (summary.tracked, summary.queued, summary.sent, summary.stored) == (5, 0, 2, 3)
    assert (summary.newest_sent_seq, summary.stored_through_seq) == (7, 5)
    chunk = tracker.chunk(4)
    assert chunk is not None
    assert chunk.stage is DeliveryStage.STORED
    # a chunk queued after the receipt that already covers it is stored at once (a resend after a restart)
    tracker.chunk_queued(2, T0)
    assert tracker.chunk(2).stage is DeliveryStage.STORED  # type: ignore[union-attr]


def test_unknown_alerts_and_notices_without_state_are_ignored() -> None:
    tracker = DeliveryTracker(Clock())
    tracker.notice(notice("pa-x", AlertState.ACKNOWLEDGED))
    tracker.notice(Notice(unit_id="U1", seq=0, sent_at=T0, kind=NoticeKind.DESTINATION, hospital_id="h"))
    tracker.sent(Stream.PREALERT, 3)
    assert tracker.prealerts() == []
    assert tracker.prealert("pa-x") is None


def test_a_receipt_from_another_counter_never_marks_new_messages_stored() -> None:
    """A unit whose clock ran ahead (2100) and was corrected gets a new outbox seeded lower than what the store
    holds: the store's retained receipt (far above) must not make a queued pre-alert look stored (hostile tester)."""
    tracker = DeliveryTracker(Clock())
    old = 4_102_444_800_000_000  # an outbox seeded in 2100
    new = 1_764_460_800_000_000  # the replacement, seeded in 2025
    assert tracker.receipt(receipt(5, prealert=old + 3, ecg=old + 40))
    tracker.prealert_queued("A-1", new, CaseType.STEMI)
    tracker.chunk_queued(new, T0)
    record = tracker.prealert("A-1")
    assert record is not None
    assert (record.sent_at, record.stored_at) == (None, None)
    assert tracker.chunk(new).stage is DeliveryStage.QUEUED  # type: ignore[union-attr]
    # the store sees the restart and starts its watermark again: now the receipt speaks of our messages
    tracker.sent(Stream.PREALERT, new)
    assert tracker.receipt(receipt(6, prealert=new, ecg=new - 1))
    record = tracker.prealert("A-1")
    assert record is not None
    assert record.stored_at is not None
    assert tracker.stored_through["prealert"] == new
