"""Heart rate from streamed ECG against the cardiologists' reference beat annotations (MIT-BIH .atr)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import wfdb
from conftest import shared_data

from ambulance_agent.heart_rate import (
    INSUFFICIENT_DATA,
    TOO_FEW_BEATS,
    HeartRateEstimator,
    heart_rate_from_ecg,
)

ROOT = Path(__file__).resolve().parents[2]
MITDB = ROOT / "simulators" / "data" / "mitdb"
BEAT_SYMBOLS = frozenset("NLRBAaJSVrFejnE/fQ")
"""WFDB annotation codes that mark a beat (wfdb.io.annotation; PhysioBank annotations page)."""


def read_record(path: Path) -> tuple[wfdb.Record, np.ndarray]:
    """The record's digital samples and its reference beat positions (sample indices)."""
    record = wfdb.rdrecord(str(path), physical=False, return_res=16)
    with warnings.catch_warnings():
        # wfdb 4.3 calls DataFrame.set_index(inplace=True), deprecated by pandas (a Pandas4Warning); not ours.
        warnings.simplefilter("ignore", DeprecationWarning)
        ann = wfdb.rdann(str(path), "atr")
    beats = np.array([s for s, sym in zip(ann.sample, ann.symbol, strict=True) if sym in BEAT_SYMBOLS])
    return record, beats


def reference_bpm(beats: np.ndarray, start: int, stop: int, fs_hz: float) -> float | None:
    """Mean rate over the annotated beats in [start, stop): 60 * (n - 1) / (last - first)."""
    inside = beats[(beats >= start) & (beats < stop)]
    if inside.size < 3:
        return None
    return 60.0 * (inside.size - 1) / ((inside[-1] - inside[0]) / fs_hz)


def streamed_estimates(record: wfdb.Record, window_starts_s: list[int], window_s: float = 10.0) -> list[float | None]:
    """Feed 1-s blocks (as the agent receives them) and estimate at the end of each 10-s window."""
    fs = float(record.fs)
    out = []
    for w0 in window_starts_s:
        est = HeartRateEstimator(fs, window_s=window_s)
        for k in range(int(window_s)):
            a = int((w0 + k) * fs)
            block = record.d_signal[a : a + int(fs)].T
            est.push(block, record.adc_gain[0], record.baseline[0], fs_hz=fs)
        out.append(est.estimate().bpm)
    return out


@pytest.mark.parametrize("name", ["100", "119", "201"])
def test_streamed_heart_rate_matches_annotations_within_5_bpm(name: str) -> None:
    record, beats = read_record(MITDB / name)
    fs = float(record.fs)
    starts = list(range(0, 1790, 90))  # 20 windows of 10 s spread over the 30-min record
    estimates = streamed_estimates(record, starts)
    for w0, bpm in zip(starts, estimates, strict=True):
        ref = reference_bpm(beats, int(w0 * fs), int((w0 + 10) * fs), fs)
        assert ref is not None
        assert bpm is not None, f"{name} @ {w0} s"
        assert abs(bpm - ref) <= 5.0, f"{name} @ {w0} s: {bpm} vs reference {ref:.1f}"


def test_shared_mitdb_records_mostly_within_5_bpm() -> None:
    folder = shared_data("ecg/mitdb")
    hits = total = 0
    for header in sorted(folder.glob("*.hea")):
        record, beats = read_record(header.with_suffix(""))
        fs = float(record.fs)
        starts = list(range(0, 1790, 120))
        for w0, bpm in zip(starts, streamed_estimates(record, starts), strict=True):
            ref = reference_bpm(beats, int(w0 * fs), int((w0 + 10) * fs), fs)
            if ref is None:
                continue
            total += 1
            hits += bpm is not None and abs(bpm - ref) <= 5.0
    assert total > 200
    # measured: 96.8 % of 10-s windows within +-5 bpm over 22 records incl. AF, bigeminy and noisy 200/208/210
    assert hits / total >= 0.93


def test_short_windows_report_insufficient_data_instead_of_raising() -> None:
    record, _ = read_record(MITDB / "100")
    fs = float(record.fs)
    est = HeartRateEstimator(fs, window_s=10.0)
    assert est.estimate().reason == INSUFFICIENT_DATA
    block = record.d_signal[: int(1.5 * fs)].T  # FF-11: the 1.5-s first chunk after a reconnect
    est.push(block, 200.0, 1024, fs_hz=fs)
    result = est.estimate()
    assert (result.bpm, result.n_beats, result.reason) == (None, 0, INSUFFICIENT_DATA)
    for n in (0, 1, 10, 359):
        assert heart_rate_from_ecg(np.zeros(n), fs).reason == INSUFFICIENT_DATA
    # once enough has arrived, a rate comes out; the buffer never exceeds the window
    for k in range(2, 15):
        est.push(record.d_signal[int(k * fs) : int((k + 1) * fs)].T, 200.0, 1024, fs_hz=fs)
    assert est.buffered_s == pytest.approx(10.0)
    assert est.estimate().bpm is not None


def test_flat_line_gives_no_rate_not_zero() -> None:
    result = heart_rate_from_ecg(np.zeros(3600), 360.0)
    assert result.bpm is None
    assert result.reason == TOO_FEW_BEATS


def test_sampling_rate_is_required_and_checked_per_block() -> None:
    # FF-10: no default rate; a block whose rate differs from the estimator's is refused, never reinterpreted
    with pytest.raises(TypeError):
        HeartRateEstimator()  # type: ignore[call-arg]
    for bad in (0.0, -360.0, float("nan")):
        with pytest.raises(ValueError):
            HeartRateEstimator(bad)
    est = HeartRateEstimator(500.0)
    with pytest.raises(ValueError):
        est.push(np.zeros((2, 250), dtype=np.int16), 200.0, 0, fs_hz=250.0)
    with pytest.raises(ValueError):
        heart_rate_from_ecg(np.zeros(5000), 0.0)


def test_mislabelled_rate_changes_the_answer_so_metadata_matters() -> None:
    # The same 10 s of record 100 at its true 360 Hz vs. mislabelled 180 Hz: half the rate (FF-10's trap).
    record, _beats = read_record(MITDB / "100")
    mv = (record.d_signal[:3600, 0].astype(float) - 1024) / 200.0
    right = heart_rate_from_ecg(mv, 360.0).bpm
    wrong = heart_rate_from_ecg(mv, 180.0).bpm
    assert right is not None
    assert wrong is not None
    assert wrong == pytest.approx(right / 2, rel=0.1)
