"""Sequence-gap detection per (unit, stream): pure, in memory, no I/O.

Every message of a gap-tracked stream (vitals, ECG, GPS) carries a ``seq`` that counts from 0 and never repeats
(broker_config.payloads.Envelope).  The tracker keeps the highest seq seen and the still-open missing ranges:

* ``seq == highest + 1``: in order.
* ``seq > highest + 1``: a jump; ``highest + 1 .. seq - 1`` is a new gap (for a key never seen before and with no
  stored history, the gap starts at 0: those messages never reached the store).
* ``seq <= highest`` inside an open range: a late arrival (store-and-forward replay, QoS 1 redelivery after a
  reconnect) that shrinks or splits the range; when a range is empty the gap is filled.
* anything else at or below ``highest``: a duplicate (or older than the tracked ranges): nothing to report.
* ``seq > highest + restart_jump`` (or a first seq above ``restart_jump`` with no stored history): a *sequence
  restart*, not a gap.  A vehicle whose outbox was lost seeds its new counters from the wall clock (microseconds
  since the epoch) so that it never reuses a seq; the jump then says "unknown loss" rather than naming 10^15
  missing messages.  It is reported (``Arrival.RESTART``) but opens no range to fill.

Idea from Sparkplug B's per-stream sequence numbers; applied to FF-19 (a broker dropping queued QoS 1 messages
silently must at least show up as a reported gap).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from broker_config import SEQ_RESTART_JUMP, Stream

__all__ = ["DEFAULT_RESTART_JUMP", "Arrival", "GapTracker", "Observation"]


class Arrival(StrEnum):
    """How one seq relates to what the tracker had seen."""

    IN_ORDER = "in_order"
    GAP = "gap"
    LATE_FILL = "late_fill"
    DUPLICATE = "duplicate"
    RESTART = "restart"
    """A forward jump larger than the tracker's ``restart_jump``: the sender's counters restarted (unknown loss)."""


DEFAULT_RESTART_JUMP = SEQ_RESTART_JUMP
"""A forward jump of more seqs than this is a sequence restart, not a gap (the contract's
:data:`broker_config.SEQ_RESTART_JUMP`)."""


@dataclass(frozen=True, slots=True)
class Observation:
    """Result of :meth:`GapTracker.observe`.

    ``gap`` is the new missing range (inclusive) for ``GAP``, and the skipped range for ``RESTART`` (informative
    only: it is not tracked as missing); ``gap_closed`` is True for a ``LATE_FILL`` that emptied its range.
    """

    arrival: Arrival
    gap: tuple[int, int] | None = None
    gap_closed: bool = False


@dataclass(slots=True)
class _KeyState:
    highest: int
    open_ranges: list[list[int]] = field(default_factory=list)  # sorted, disjoint [lo, hi] inclusive


class GapTracker:
    """Tracks the highest seq and open gaps per (unit id, stream).

    ``max_open_ranges`` bounds memory per key: beyond it the oldest ranges are forgotten (they stay recorded in
    the store, where :meth:`telemetry.store.Store.gaps` still reports them).  ``restart_jump`` is the largest
    forward jump still reported as a gap (see :data:`DEFAULT_RESTART_JUMP`).
    """

    def __init__(self, *, max_open_ranges: int = 256, restart_jump: int = DEFAULT_RESTART_JUMP) -> None:
        if max_open_ranges < 1 or restart_jump < 1:
            raise ValueError("max_open_ranges and restart_jump must be at least 1")
        self.max_open_ranges = max_open_ranges
        self.restart_jump = restart_jump
        self._state: dict[tuple[str, Stream], _KeyState] = {}

    def seed(self, max_seq: Mapping[tuple[str, Stream], int]) -> None:
        """Resume from the store's highest seq per key (after a restart), so old seqs are not gaps again."""
        for key, top in max_seq.items():
            state = self._state.get(key)
            if state is None:
                self._state[key] = _KeyState(top)
            elif top > state.highest:
                state.highest = top

    def highest(self, unit_id: str, stream: Stream) -> int | None:
        """Highest seq seen for the key, or None."""
        state = self._state.get((unit_id, stream))
        return None if state is None else state.highest

    def open_gaps(self, unit_id: str, stream: Stream) -> list[tuple[int, int]]:
        """The key's still-missing ranges (inclusive), oldest first."""
        state = self._state.get((unit_id, stream))
        return [] if state is None else [(lo, hi) for lo, hi in state.open_ranges]

    def observe(self, unit_id: str, stream: Stream, seq: int) -> Observation:
        """Account for one arrival of ``seq``.  Raises ValueError for a negative seq."""
        if seq < 0:
            raise ValueError("seq must be >= 0")
        key = (unit_id, stream)
        state = self._state.get(key)
        if state is None:
            self._state[key] = state = _KeyState(seq)
            if seq == 0 or seq > self.restart_jump:
                # 0, or a counter seeded from the clock (a new outbox starts there): a unit's first words, no loss
                return Observation(Arrival.IN_ORDER)
            return self._open(state, 0, seq - 1)
        if seq == state.highest + 1:
            state.highest = seq
            return Observation(Arrival.IN_ORDER)
        if seq > state.highest + 1:
            lo = state.highest + 1
            state.highest = seq
            if seq - lo > self.restart_jump:
                return Observation(Arrival.RESTART, gap=(lo, seq - 1))
            return self._open(state, lo, seq - 1)
        return self._fill(state, seq)

    def _open(self, state: _KeyState, lo: int, hi: int) -> Observation:
        state.open_ranges.append([lo, hi])
        if len(state.open_ranges) > self.max_open_ranges:
            del state.open_ranges[0]
        return Observation(Arrival.GAP, gap=(lo, hi))

    @staticmethod
    def _fill(state: _KeyState, seq: int) -> Observation:
        ranges = state.open_ranges
        i = bisect.bisect_right(ranges, seq, key=lambda r: r[0]) - 1
        if i < 0 or not ranges[i][0] <= seq <= ranges[i][1]:
            return Observation(Arrival.DUPLICATE)
        lo, hi = ranges[i]
        pieces = [p for p in ([lo, seq - 1], [seq + 1, hi]) if p[0] <= p[1]]
        ranges[i : i + 1] = pieces
        return Observation(Arrival.LATE_FILL, gap_closed=not pieces)
