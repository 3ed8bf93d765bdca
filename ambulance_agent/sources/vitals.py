"""Replay of a monitor's per-minute numerics (MIMIC-II waveform database numerics records) as vital signs."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import numpy as np

from ambulance_agent.sources.base import Clock, Pacer, VitalsReading, default_clock

__all__ = ["NUMERICS_SIGNALS", "NumericsVitalsReplay"]

NUMERICS_SIGNALS: dict[str, str] = {
    "HR": "heart_rate_bpm",
    "SpO2": "spo2_pct",
    "NBPSys": "sbp_mmhg",
    "NBPDias": "dbp_mmhg",
    "NBPMean": "map_mmhg",
    "RESP": "resp_rate_per_min",
}
"""MIMIC-II numerics signal name -> :class:`VitalsReading` field (PhysioNet MIMIC-II waveform database v3)."""


class NumericsVitalsReplay:
    """Vital signs from a MIMIC-II numerics record, sample-and-hold within each minute, one reading per
    ``interval_s`` of data time, paced at ``pace`` x real time.

    Values that are NaN (not recorded) or <= 0 (the monitor's "no valid reading": an SpO2, blood pressure or
    respiratory rate of exactly 0 in a per-minute trend is a sensor dropout, not a measurement) become ``None``,
    never zero.  Reading ``k`` is stamped ``clock() at start + k * interval_s`` and holds the values of record
    row ``start_min + floor(k * interval_s / period)`` (period = 1 / fs, 60 s for these records).

    Args:
        record_path: numerics record name without extension.
        start_min: first row (minute) to replay.
        pace: 1.0 real time, 20.0 twenty times faster, 0 as fast as possible.
        interval_s: emission interval in seconds of data time (> 0).
        loop: after the last row, continue from ``start_min``; otherwise the iteration ends.
        stop_s: end after this many seconds of data (None: never when looping).
        clock, monotonic, sleep: injectable time (tests).

    Raises:
        ValueError: bad arguments or a record with none of :data:`NUMERICS_SIGNALS`.
    """

    def __init__(
        self,
        record_path: Path,
        *,
        start_min: int = 0,
        pace: float = 1.0,
        interval_s: float = 2.0,
        loop: bool = True,
        stop_s: float | None = None,
        clock: Clock = default_clock,
        monotonic: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        import wfdb  # lazy: wfdb loads pandas (~70 MB); only replays need it, never a vehicle's device sources

        record = wfdb.rdrecord(str(record_path), physical=True)
        if record.p_signal is None or not record.fs:
            raise ValueError("numerics record has no physical signal or no sampling frequency")
        self.period_s = round(1.0 / float(record.fs), 3)
        names = [str(n) for n in record.sig_name]
        self.columns: dict[str, np.ndarray] = {}
        for name, field in NUMERICS_SIGNALS.items():
            if name in names:
                column = np.asarray(record.p_signal[:, names.index(name)], dtype=np.float64)
                self.columns[field] = column
        if not self.columns:
            raise ValueError("numerics record carries none of the known vital signs")
        self.n_rows = int(record.p_signal.shape[0])
        if not 0 <= start_min < self.n_rows:
            raise ValueError("start_min outside the record")
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        Pacer(pace)  # validate now
        self.start_min = start_min
        self.interval_s = interval_s
        self.loop = loop
        self.stop_s = stop_s
        self._pace = pace
        self._clock = clock
        self._pacer_kwargs = {k: v for k, v in (("monotonic", monotonic), ("sleep", sleep)) if v is not None}

    def row(self, index: int) -> dict[str, float | None]:
        """Values of record row ``index`` by field name; NaN and <= 0 become None."""
        out: dict[str, float | None] = {}
        for field, column in self.columns.items():
            value = float(column[index])
            out[field] = value if math.isfinite(value) and value > 0 else None
        return out

    def __aiter__(self) -> AsyncIterator[VitalsReading]:
        return self._readings()

    async def _readings(self) -> AsyncIterator[VitalsReading]:
        pacer = Pacer(self._pace, **self._pacer_kwargs)  # type: ignore[arg-type]
        anchor = self._clock()
        pacer.start()
        span = self.n_rows - self.start_min
        k = 0
        while True:
            offset_s = k * self.interval_s
            step = int(offset_s // self.period_s)
            if (step >= span and not self.loop) or (self.stop_s is not None and offset_s >= self.stop_s):
                return
            index = self.start_min + step % span
            await pacer.until(offset_s)
            yield VitalsReading(measured_at=anchor + timedelta(seconds=offset_s), **self.row(index))  # type: ignore[arg-type]
            k += 1
