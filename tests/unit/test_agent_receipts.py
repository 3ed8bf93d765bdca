"""The store's side of delivery receipts: contiguous watermarks per unit and stream (telemetry.ingest)."""

from __future__ import annotations

from broker_config import Stream
from telemetry.ingest import RECEIPT_STREAMS, StoredWatermarks


def test_watermark_is_the_highest_contiguous_seq() -> None:
    marks = StoredWatermarks()
    assert marks.add("U1", Stream.ECG, 0)
    assert marks.add("U1", Stream.ECG, 1)
    assert not marks.add("U1", Stream.ECG, 1), "a duplicate moves nothing"
    assert not marks.add("U1", Stream.ECG, 3), "a hole holds the watermark"
    assert not marks.add("U1", Stream.ECG, 4)
    assert marks.through("U1") == {"ecg": 1}
    assert marks.add("U1", Stream.ECG, 2), "the late seq fills the hole"
    assert marks.through("U1") == {"ecg": 4}
    assert marks.through("nobody") == {}


def test_a_stream_first_seen_above_zero_is_listed_at_minus_one() -> None:
    marks = StoredWatermarks()
    assert marks.add("U1", Stream.VITALS, 5), "a new stream is news for the receipt"
    assert marks.through("U1") == {"vitals": -1}
    assert not marks.add("U1", Stream.VITALS, 6)
    assert marks.add("U2", Stream.VITALS, 0)
    assert marks.through("U2") == {"vitals": 0}


def test_seeded_after_a_restart_and_bounded_above_holes() -> None:
    marks = StoredWatermarks(max_pending=3)
    marks.seed("U1", Stream.GPS, 99)
    assert not marks.add("U1", Stream.GPS, 50)
    assert marks.add("U1", Stream.GPS, 100)
    for seq in range(102, 110):  # more than max_pending above the hole at 101: the highest are forgotten
        marks.add("U1", Stream.GPS, seq)
    marks.add("U1", Stream.GPS, 101)
    assert marks.through("U1") == {"gps": 104}


def test_receipts_cover_every_counted_unit_stream_but_availability() -> None:
    assert set(RECEIPT_STREAMS) == {Stream.PREALERT, Stream.STATUS, Stream.VITALS, Stream.ECG, Stream.GPS}


def test_a_counter_restarted_below_the_old_one_starts_the_watermark_again() -> None:
    """A unit whose clock had run ahead (2100) and was corrected gets a new outbox seeded far below the old
    counter: its messages are news, and the receipt speaks of them again (hostile tester)."""
    marks = StoredWatermarks(restart_jump=100_000)
    old, new = 4_102_444_800_000_000, 1_764_460_800_000_000
    assert marks.add("U1", Stream.PREALERT, old)
    assert marks.through("U1") == {"prealert": old}
    assert not marks.add("U1", Stream.PREALERT, new)  # alone: could be a late message of an old counter
    assert marks.add("U1", Stream.PREALERT, new + 1)  # a run: a new counter
    assert marks.through("U1") == {"prealert": new + 1}
    assert not marks.add("U1", Stream.PREALERT, new + 1)
    assert marks.add("U1", Stream.PREALERT, new + 2)
    assert marks.through("U1") == {"prealert": new + 2}
