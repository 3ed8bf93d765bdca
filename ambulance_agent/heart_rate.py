"""Heart rate from the streamed ECG, as a monitor computes it: R peaks on a sliding window, mean R-R interval.

Pure signal code (no I/O): int16 ADC blocks go in with their gain and baseline, a :class:`HeartRateResult` comes
out.  R peaks are found by NeuroKit2's default QRS detector (``neurokit2.ecg_peaks``, method "neurokit":
Makowski et al., NeuroKit2, Behav Res Methods 53:1689-1696, 2021).  The rate is
``60 * (n_beats - 1) / (t_last_peak - t_first_peak)``, the mean rate over the window, which stays right in
bigeminy where a median R-R would not.  Checked against the MIT-BIH reference annotations (tests).

FF-10: the sampling rate is required and checked on every block.  FF-11: a window shorter than ``min_s`` gives
``bpm=None, reason="insufficient data"``; a detector failure is a result, never an exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import neurokit2 as nk
import numpy as np

__all__ = [
    "DETECTOR_FAILED",
    "HR_MAX_BPM",
    "HR_MIN_BPM",
    "IMPLAUSIBLE",
    "INSUFFICIENT_DATA",
    "INVALID_SAMPLES",
    "TOO_FEW_BEATS",
    "HeartRateEstimator",
    "HeartRateResult",
    "heart_rate_from_ecg",
]

INSUFFICIENT_DATA = "insufficient data"
TOO_FEW_BEATS = "too few beats detected"
DETECTOR_FAILED = "detector failed"
INVALID_SAMPLES = "invalid samples"
IMPLAUSIBLE = "implausible rate"

HR_MIN_BPM = 20.0
HR_MAX_BPM = 300.0
"""Rates outside [20, 300] /min are reported as implausible rather than published (artefact, wrong fs)."""


@dataclass(frozen=True, slots=True)
class HeartRateResult:
    """One estimate.  ``bpm`` is None exactly when ``reason`` says why (one of the module constants)."""

    bpm: float | None
    n_beats: int
    reason: str | None = None


def heart_rate_from_ecg(signal_mv: np.ndarray, fs_hz: float, *, min_s: float = 5.0) -> HeartRateResult:
    """Mean heart rate (/min) over one ECG lead.

    Args:
        signal_mv: 1-D float array, one lead in mV, shape (n,).
        fs_hz: sampling frequency in Hz (required: FF-10).
        min_s: shortest window analysed; shorter gives ``reason=INSUFFICIENT_DATA`` (FF-11).

    Returns:
        HeartRateResult; never raises for signal content.

    Raises:
        ValueError: ``fs_hz`` not a positive finite number, or ``signal_mv`` not 1-D.
    """
    if not (math.isfinite(fs_hz) and fs_hz > 0):
        raise ValueError("fs_hz must be a positive number")
    signal = np.asarray(signal_mv, dtype=np.float64)
    if signal.ndim != 1:
        raise ValueError("signal_mv must be 1-D (one lead)")
    if signal.size < max(min_s, 1.0) * fs_hz:
        return HeartRateResult(None, 0, INSUFFICIENT_DATA)
    if not np.all(np.isfinite(signal)):
        return HeartRateResult(None, 0, INVALID_SAMPLES)
    if float(np.ptp(signal)) == 0.0:
        return HeartRateResult(None, 0, TOO_FEW_BEATS)
    try:
        _, info = nk.ecg_peaks(signal, sampling_rate=round(fs_hz))
        peaks = np.asarray(info["ECG_R_Peaks"], dtype=np.int64)
    except (ValueError, IndexError, KeyError, ZeroDivisionError, FloatingPointError, Warning):
        return HeartRateResult(None, 0, DETECTOR_FAILED)
    n_beats = int(peaks.size)
    if n_beats < 2:
        return HeartRateResult(None, n_beats, TOO_FEW_BEATS)
    span_s = float(peaks[-1] - peaks[0]) / fs_hz
    bpm = 60.0 * (n_beats - 1) / span_s
    if not HR_MIN_BPM <= bpm <= HR_MAX_BPM:
        return HeartRateResult(None, n_beats, IMPLAUSIBLE)
    return HeartRateResult(round(bpm, 1), n_beats)


class HeartRateEstimator:
    """Keeps the last ``window_s`` seconds of one ECG lead and estimates the heart rate over it.

    Args:
        fs_hz: sampling frequency in Hz, required (FF-10); every pushed block must declare the same rate.
        window_s: sliding window length in seconds (monitors average over ~10 s or the last beats).
        lead: which lead (row of the block) to analyse; lead 0 is MLII in MIT-BIH records.
        min_s: shortest buffer analysed (default min(5 s, window_s)); shorter gives "insufficient data".

    Raises:
        ValueError: non-positive or non-finite ``fs_hz``/``window_s``, or ``min_s > window_s``.
    """

    def __init__(self, fs_hz: float, window_s: float = 10.0, *, lead: int = 0, min_s: float | None = None) -> None:
        if not (math.isfinite(fs_hz) and fs_hz > 0):
            raise ValueError("fs_hz is required and must be > 0 (FF-10)")
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError("window_s must be > 0")
        self.fs_hz = float(fs_hz)
        self.window_s = float(window_s)
        self.lead = lead
        self.min_s = min(5.0, window_s) if min_s is None else float(min_s)
        if self.min_s > self.window_s:
            raise ValueError("min_s must not exceed window_s")
        self._window_n = round(self.window_s * self.fs_hz)
        self._buffer = np.zeros(0, dtype=np.float64)

    @property
    def buffered_s(self) -> float:
        """Seconds of signal currently in the window."""
        return self._buffer.size / self.fs_hz

    def push(
        self, samples: np.ndarray, gain_adc_per_mv: float, baseline_adc: int, *, fs_hz: float | None = None
    ) -> None:
        """Append a block of ADC samples, shape (n_leads, n) or (n,), converted to mV.

        Raises:
            ValueError: gain not > 0, the lead missing from the block, or ``fs_hz`` given and different from
                the estimator's rate (a sampling-rate mismatch, FF-10).
        """
        if fs_hz is not None and not math.isclose(fs_hz, self.fs_hz, rel_tol=1e-6):
            raise ValueError("block sampling rate differs from the estimator's fs_hz (FF-10)")
        if not gain_adc_per_mv > 0:
            raise ValueError("gain_adc_per_mv must be > 0")
        block = np.asarray(samples)
        row = block if block.ndim == 1 else block[self.lead]
        mv = (row.astype(np.float64) - baseline_adc) / gain_adc_per_mv
        self._buffer = np.concatenate((self._buffer, mv))[-self._window_n :]

    def reset(self) -> None:
        """Forget the buffered signal (after a lead-off or a gap in the stream)."""
        self._buffer = np.zeros(0, dtype=np.float64)

    def window_mv(self) -> np.ndarray:
        """A copy of the buffered lead in mV, shape (n,), for analysis off the event loop."""
        return self._buffer.copy()

    def estimate(self) -> HeartRateResult:
        """The heart rate over the buffered window (see :func:`heart_rate_from_ecg`)."""
        return heart_rate_from_ecg(self._buffer, self.fs_hz, min_s=self.min_s)
