"""Unit tests of sequence-gap detection (pure, no I/O)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker_config import Stream
from telemetry.gaps import Arrival, GapTracker, Observation

U = "amb12"


def test_in_order_then_jump_then_late_fills_split_and_close() -> None:
    t = GapTracker()
    assert t.observe(U, Stream.ECG, 0) == Observation(Arrival.IN_ORDER)
    assert t.observe(U, Stream.ECG, 1).arrival is Arrival.IN_ORDER
    assert t.observe(U, Stream.ECG, 6) == Observation(Arrival.GAP, gap=(2, 5))
    assert t.open_gaps(U, Stream.ECG) == [(2, 5)]
    assert t.observe(U, Stream.ECG, 4) == Observation(Arrival.LATE_FILL)
    assert t.open_gaps(U, Stream.ECG) == [(2, 3), (5, 5)]
    assert t.observe(U, Stream.ECG, 5) == Observation(Arrival.LATE_FILL, gap_closed=True)
    assert t.observe(U, Stream.ECG, 2).arrival is Arrival.LATE_FILL
    assert t.observe(U, Stream.ECG, 3) == Observation(Arrival.LATE_FILL, gap_closed=True)
    assert t.open_gaps(U, Stream.ECG) == []
    assert t.observe(U, Stream.ECG, 3).arrival is Arrival.DUPLICATE
    assert t.observe(U, Stream.ECG, 6).arrival is Arrival.DUPLICATE
    assert t.highest(U, Stream.ECG) == 6


def test_keys_are_independent_per_unit_and_stream() -> None:
    t = GapTracker()
    t.observe(U, Stream.ECG, 0)
    assert t.observe(U, Stream.VITALS, 0).arrival is Arrival.IN_ORDER
    assert t.observe("amb13", Stream.ECG, 0).arrival is Arrival.IN_ORDER
    assert t.observe(U, Stream.ECG, 1).arrival is Arrival.IN_ORDER


def test_first_message_after_zero_reports_what_never_arrived() -> None:
    t = GapTracker()
    assert t.observe(U, Stream.GPS, 1000) == Observation(Arrival.GAP, gap=(0, 999))


def test_seed_resumes_without_reporting_old_seqs() -> None:
    t = GapTracker()
    t.seed({(U, Stream.VITALS): 41})
    assert t.observe(U, Stream.VITALS, 42).arrival is Arrival.IN_ORDER
    assert t.observe(U, Stream.VITALS, 10).arrival is Arrival.DUPLICATE
    assert t.observe(U, Stream.VITALS, 45) == Observation(Arrival.GAP, gap=(43, 44))


def test_open_ranges_are_bounded() -> None:
    t = GapTracker(max_open_ranges=3)
    for seq in range(0, 20, 2):  # every odd seq missing
        t.observe(U, Stream.ECG, seq)
    assert t.open_gaps(U, Stream.ECG) == [(13, 13), (15, 15), (17, 17)]
    with pytest.raises(ValueError):
        GapTracker(max_open_ranges=0)
    with pytest.raises(ValueError):
        t.observe(U, Stream.ECG, -1)


def test_ff19_broker_drops_the_newest_queued_messages() -> None:
    """FF-19: a broker queue of 1000 keeps seqs 0-999 of 5000; the next live message shows the loss."""
    t = GapTracker()
    for seq in range(1000):
        t.observe(U, Stream.VITALS, seq)
    assert t.observe(U, Stream.VITALS, 5000) == Observation(Arrival.GAP, gap=(1000, 4999))


@given(
    n=st.integers(min_value=1, max_value=200),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    drop=st.floats(min_value=0, max_value=0.6),
)
def test_open_gaps_are_exactly_the_missing_seqs_below_the_highest(n: int, seed: int, drop: float) -> None:
    rng = random.Random(seed)
    seqs = [s for s in range(n) if rng.random() >= drop]
    rng.shuffle(seqs)
    seqs += seqs[: len(seqs) // 4]  # some redeliveries
    t = GapTracker(max_open_ranges=10_000)
    for s in seqs:
        t.observe(U, Stream.ECG, s)
    if not seqs:
        return
    top = max(seqs)
    missing = {s for lo, hi in t.open_gaps(U, Stream.ECG) for s in range(lo, hi + 1)}
    assert missing == set(range(top + 1)) - set(seqs)


def test_a_wall_clock_seeded_restart_is_a_restart_not_a_gap() -> None:
    """A new outbox seeds its counters from the clock (microseconds since the epoch): unknown loss, no range."""
    t = GapTracker(restart_jump=100_000)
    t.observe(U, Stream.ECG, 0)
    t.observe(U, Stream.ECG, 1)
    clock_seed = 1_764_470_000_000_000
    restart = t.observe(U, Stream.ECG, clock_seed)
    assert restart == Observation(Arrival.RESTART, gap=(2, clock_seed - 1))
    assert t.open_gaps(U, Stream.ECG) == []  # nothing to fill: never reported as 10^15 missing messages
    assert t.observe(U, Stream.ECG, clock_seed + 1).arrival is Arrival.IN_ORDER
    assert t.observe(U, Stream.ECG, clock_seed + 3) == Observation(Arrival.GAP, gap=(clock_seed + 2, clock_seed + 2))
    assert t.observe(U, Stream.ECG, 1).arrival is Arrival.DUPLICATE  # the old outbox's seqs stay harmless


def test_the_restart_bound_is_exclusive_and_first_contact_counts() -> None:
    t = GapTracker(restart_jump=10)
    t.observe(U, Stream.GPS, 0)
    assert t.observe(U, Stream.GPS, 11) == Observation(Arrival.GAP, gap=(1, 10))  # 10 missing: still a gap
    assert t.observe(U, Stream.GPS, 23).arrival is Arrival.RESTART  # 11 missing: a restart
    assert t.observe("fresh", Stream.GPS, 10) == Observation(Arrival.GAP, gap=(0, 9))
    # a unit's first contact at a clock-seeded counter: its first words, neither a restart nor a gap
    assert t.observe("seeded", Stream.GPS, 11) == Observation(Arrival.IN_ORDER)
    assert t.observe("seeded", Stream.GPS, 12) == Observation(Arrival.IN_ORDER)
    with pytest.raises(ValueError):
        GapTracker(restart_jump=0)
