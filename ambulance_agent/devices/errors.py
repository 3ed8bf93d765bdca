"""Error hierarchy of the device adapters and the per-adapter reject tally.

Every rejection carries a ``reason`` (a :class:`~enum.StrEnum` member, an identifier) and at most message ids.
Nothing here ever holds a measured value or free text from a device: these objects end up in logs, and logs
never contain health data (DOMAIN.md section 11, STYLE.md "Logging").
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from enum import StrEnum

__all__ = [
    "DeviceInputError",
    "RejectTally",
]


class DeviceInputError(ValueError):
    """Root of every device-input rejection.  ``reason`` is an identifier, safe to log."""

    def __init__(self, reason: StrEnum, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)


class RejectTally:
    """Counts rejects by reason, in total and over a sliding window (FF-06: "count rejects per minute").

    Args:
        window_capacity: how many recent reject times are kept for :meth:`in_last` (bounded memory).
        monotonic: a monotonic clock in seconds (injectable for tests).
    """

    def __init__(self, window_capacity: int = 4096, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._by_reason: Counter[str] = Counter()
        self._recent: deque[float] = deque(maxlen=window_capacity)
        self._monotonic = monotonic

    def record(self, reason: StrEnum) -> None:
        """Count one reject with its reason."""
        self._by_reason[reason.value] += 1
        self._recent.append(self._monotonic())

    @property
    def total(self) -> int:
        """All rejects since start."""
        return sum(self._by_reason.values())

    @property
    def by_reason(self) -> Mapping[str, int]:
        """A copy of the counts, keyed by reason value."""
        return dict(self._by_reason)

    def count(self, reason: StrEnum) -> int:
        """Rejects with one reason since start."""
        return self._by_reason[reason.value]

    def in_last(self, window_s: float = 60.0) -> int:
        """Rejects within the last ``window_s`` seconds (at most ``window_capacity`` are remembered)."""
        cutoff = self._monotonic() - window_s
        return sum(1 for t in self._recent if t >= cutoff)
