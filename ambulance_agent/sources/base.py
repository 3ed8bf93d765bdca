"""What every acquisition source shares: the protocol, the value types it yields, and real-time pacing.

A source is an async iterator of typed, timezone-aware readings.  Replay sources are paced on a monotonic
schedule (item ``k`` is due at ``t0 + k * period_s / pace``), so a late wake-up is caught up on the next item
instead of accumulating drift.  Times stamped on the data come from an injectable UTC clock read once at the
start of the replay plus the data's own offset (sample index / fs_hz): at ``pace != 1`` the data therefore
runs on its own virtual time line, continuous with the waveform, not on the wall clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, TypeVar, runtime_checkable

import numpy as np

from broker_config import utc_now

__all__ = [
    "Clock",
    "EcgBlock",
    "EcgSource",
    "GpsReading",
    "GpsSource",
    "Pacer",
    "Source",
    "VitalsReading",
    "VitalsSource",
]

T_co = TypeVar("T_co", covariant=True)

Clock = Callable[[], datetime]
"""Returns the current time, timezone-aware UTC (default :func:`broker_config.utc_now`)."""


@runtime_checkable
class Source(Protocol[T_co]):
    """An acquisition source: ``async for reading in source`` until the data ends (or forever)."""

    def __aiter__(self) -> AsyncIterator[T_co]:
        """A fresh iteration over the source's readings."""
        ...


@dataclass(frozen=True, slots=True)
class EcgBlock:
    """A block of multi-lead ECG exactly as the ADC produced it (WFDB digital samples).

    ``samples`` is a read-only int16 array of shape (n_leads, n_samples); lead ``i`` is ``leads[i]``;
    sample ``j`` was taken at ``start_at + j / fs_hz``.  Physical mV = (adc - baseline_adc) / gain_adc_per_mv.
    ``sample_index`` is the record index of the first sample (for replay checks; it wraps when a replay loops).
    ``lead_off`` and ``saturated`` flag leads per block (one bool per lead, empty = not reported): the electrode was
    reported off, or a sample sat at the ADC's rail.  The samples themselves are never altered (flagged, not hidden).
    """

    start_at: datetime
    fs_hz: float
    leads: tuple[str, ...]
    gain_adc_per_mv: float
    baseline_adc: int
    samples: np.ndarray
    sample_index: int = 0
    lead_off: tuple[bool, ...] = ()
    saturated: tuple[bool, ...] = ()

    @property
    def n_samples(self) -> int:
        """Samples per lead in this block."""
        return int(self.samples.shape[1])


@dataclass(frozen=True, slots=True)
class VitalsReading:
    """A set of vital signs from a monitor's numerics.  ``None`` = not measured / not valid (never zero)."""

    measured_at: datetime
    heart_rate_bpm: float | None = None
    spo2_pct: float | None = None
    sbp_mmhg: float | None = None
    dbp_mmhg: float | None = None
    map_mmhg: float | None = None
    resp_rate_per_min: float | None = None
    etco2_mmhg: float | None = None
    temp_c: float | None = None
    heart_rate_source: Literal["ecg", "monitor", "oximeter"] | None = None
    """Where ``heart_rate_bpm`` came from when the device says (HL7: the MDC/LOINC code); None = ``monitor``."""


@dataclass(frozen=True, slots=True)
class GpsReading:
    """A position ready for :class:`broker_config.GpsFix`.  No fix = ``fix=False`` and no coordinates."""

    at: datetime
    fix: bool
    lat_deg: float | None = None
    lon_deg: float | None = None
    speed_mps: float | None = None
    heading_deg: float | None = None
    device_time: datetime | None = None
    hdop: float | None = None
    fix_quality: int | None = None
    clock_suspect: bool = False


EcgSource = Source[EcgBlock]
VitalsSource = Source[VitalsReading]
GpsSource = Source[GpsReading]


class Pacer:
    """Releases items on an absolute monotonic schedule: item at data offset ``t_s`` is due at
    ``t0 + t_s / pace``.  No drift: each due time is computed from ``t0``, never from the previous wake-up.

    Args:
        pace: 1.0 real time, 20.0 twenty times faster, 0 as fast as possible (still yields to the loop).
        monotonic: a monotonic clock in seconds (injectable for tests).
        sleep: an awaitable sleep (injectable for tests).

    Raises:
        ValueError: ``pace`` is negative or not finite.
    """

    def __init__(
        self,
        pace: float = 1.0,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not np.isfinite(pace) or pace < 0:
            raise ValueError("pace must be a finite number >= 0 (0 = as fast as possible)")
        self.pace = pace
        self._monotonic = monotonic
        self._sleep = sleep
        self._t0: float | None = None

    def start(self) -> None:
        """Fix ``t0`` (the wall moment of data offset 0) to now."""
        self._t0 = self._monotonic()

    async def until(self, offset_s: float) -> None:
        """Wait until data offset ``offset_s`` (seconds after the start of the replay) is due."""
        if self._t0 is None:
            self.start()
        if self.pace == 0:
            await self._sleep(0)
            return
        assert self._t0 is not None
        delay_s = self._t0 + offset_s / self.pace - self._monotonic()
        await self._sleep(max(delay_s, 0.0))


def default_clock() -> datetime:
    """The default :data:`Clock`: :func:`broker_config.utc_now`."""
    return utc_now()
