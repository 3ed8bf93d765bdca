"""Acquisition sources: exact samples, drift-free pacing, absent-not-zero vitals, GPS along a route."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import wfdb

from ambulance_agent.sources import (
    EcgBlock,
    NumericsVitalsReplay,
    Pacer,
    RouteGpsReplay,
    Source,
    VitalsReading,
    WfdbEcgReplay,
    haversine_m,
)

ROOT = Path(__file__).resolve().parents[2]
MITDB = ROOT / "simulators" / "data" / "mitdb"
NUMERICS = ROOT / "simulators" / "data" / "mimic2wdb_numerics" / "s25047-2704-05-04-10-44n"
T0 = datetime(2026, 11, 30, 9, 30, tzinfo=UTC)


class FakeTime:
    """A monotonic clock and a sleep that advances it, recording every wait (no real sleeping)."""

    def __init__(self, overshoot_s: dict[int, float] | None = None) -> None:
        self.now_s = 100.0
        self.sleeps: list[float] = []
        self.wakeups: list[float] = []
        self.overshoot_s = overshoot_s or {}

    def monotonic(self) -> float:
        return self.now_s

    async def sleep(self, delay_s: float) -> None:
        self.sleeps.append(delay_s)
        self.now_s += delay_s + self.overshoot_s.get(len(self.sleeps) - 1, 0.0)
        self.wakeups.append(self.now_s)


async def take(source: Source, n: int) -> list:
    out = []
    async for item in source:
        out.append(item)
        if len(out) == n:
            break
    return out


async def test_ecg_blocks_are_exactly_the_record_samples_in_order() -> None:
    record = wfdb.rdrecord(str(MITDB / "100"), physical=False)
    replay = WfdbEcgReplay(MITDB / "100", chunk_s=1.0, pace=0, clock=lambda: T0)
    blocks: list[EcgBlock] = await take(replay, 12)
    assert replay.fs_hz == 360.0
    assert replay.leads == ("MLII", "V5")
    assert (replay.gain_adc_per_mv, replay.baseline_adc) == (200.0, 1024)
    got = np.concatenate([b.samples for b in blocks], axis=1)
    assert got.dtype == np.int16
    assert got.shape == (2, 12 * 360)
    np.testing.assert_array_equal(got, record.d_signal[: 12 * 360].T)
    for k, block in enumerate(blocks):
        assert block.start_at == T0 + timedelta(seconds=k)
        assert block.start_at.tzinfo is not None
        assert block.sample_index == k * 360
        assert not block.samples.flags.writeable


async def test_ecg_start_offset_stop_and_loop_wraparound() -> None:
    replay = WfdbEcgReplay(MITDB / "119", chunk_s=0.5, start_s=1799.0, pace=0, clock=lambda: T0)
    total = replay.n_record_samples  # 650000: the record is 1805.56 s long
    blocks = await take(replay, 16)
    got = np.concatenate([b.samples for b in blocks], axis=1)
    start = round(1799.0 * 360)
    expected_idx = np.arange(start, start + got.shape[1]) % total
    np.testing.assert_array_equal(got, replay.record_samples()[:, expected_idx])
    assert all(b.n_samples == 180 for b in blocks)  # chunks keep their length across the wrap

    limited = WfdbEcgReplay(MITDB / "100", chunk_s=1.0, stop_s=2.5, pace=0, clock=lambda: T0)
    sizes = [b.n_samples for b in await take(limited, 10)]
    assert sizes == [360, 360, 180]

    no_loop = WfdbEcgReplay(MITDB / "100", chunk_s=1.0, start_s=1805.0, loop=False, pace=0, clock=lambda: T0)
    tail = await take(no_loop, 10)
    assert sum(b.n_samples for b in tail) == total - 1805 * 360


async def test_ecg_pacing_follows_an_absolute_schedule_without_drift() -> None:
    # The 3rd wake-up is 0.3 s late; the schedule absorbs it instead of shifting every later block.
    fake = FakeTime(overshoot_s={2: 0.3})
    replay = WfdbEcgReplay(
        MITDB / "100", chunk_s=1.0, pace=2.0, clock=lambda: T0, monotonic=fake.monotonic, sleep=fake.sleep
    )
    await take(replay, 6)
    due = [100.0 + (k + 1) * 1.0 / 2.0 for k in range(6)]
    assert fake.wakeups[:2] == pytest.approx(due[:2])
    assert fake.wakeups[2] == pytest.approx(due[2] + 0.3)
    assert fake.wakeups[3:] == pytest.approx(due[3:])  # back on the schedule, no accumulated drift
    assert fake.sleeps[3] == pytest.approx(0.5 - 0.3)


async def test_pacer_rejects_bad_pace_and_pace_zero_never_waits() -> None:
    with pytest.raises(ValueError):
        Pacer(-1)
    with pytest.raises(ValueError):
        Pacer(math.inf)
    fake = FakeTime()
    pacer = Pacer(0, monotonic=fake.monotonic, sleep=fake.sleep)
    await pacer.until(1000.0)
    assert fake.sleeps == [0]


async def test_numerics_nan_and_zero_are_absent_never_zero_and_held_within_the_minute() -> None:
    record = wfdb.rdrecord(str(NUMERICS), physical=True)
    names = list(record.sig_name)
    replay = NumericsVitalsReplay(NUMERICS, start_min=0, interval_s=20.0, pace=0, clock=lambda: T0)
    readings: list[VitalsReading] = await take(replay, 30)  # 10 minutes at 3 readings per minute
    for k, reading in enumerate(readings):
        row = record.p_signal[(k * 20) // 60]
        assert reading.measured_at == T0 + timedelta(seconds=20 * k)
        for name, field in (
            ("SpO2", "spo2_pct"),
            ("NBPSys", "sbp_mmhg"),
            ("NBPMean", "map_mmhg"),
            ("RESP", "resp_rate_per_min"),
        ):
            value = row[names.index(name)]
            got = getattr(reading, field)
            if math.isnan(value) or value <= 0:
                assert got is None, (k, field)
            else:
                assert got == pytest.approx(value)
    # row 0: SpO2 0 % and blood pressure NaN in the record -> absent
    assert readings[0].spo2_pct is None
    assert readings[0].sbp_mmhg is None
    # row 2: all present (SpO2 95.7 %, NIBP 87/46 mean 62)
    assert (readings[6].spo2_pct, readings[6].sbp_mmhg, readings[6].dbp_mmhg) == pytest.approx((95.7, 87, 46))
    # sample-and-hold: three readings within a minute carry the same values
    assert readings[7] == dataclasses.replace(readings[6], measured_at=readings[7].measured_at)
    assert readings[8] == dataclasses.replace(readings[6], measured_at=readings[8].measured_at)
    assert all(r.spo2_pct != 0 and r.sbp_mmhg != 0 for r in readings)


async def test_numerics_start_minute_and_end_without_loop() -> None:
    replay = NumericsVitalsReplay(NUMERICS, start_min=70, interval_s=30.0, loop=False, pace=0, clock=lambda: T0)
    readings = await take(replay, 100)
    assert len(readings) == 4  # rows 70 and 71, two readings each
    with pytest.raises(ValueError):
        NumericsVitalsReplay(NUMERICS, start_min=72)


async def test_gps_route_interpolates_at_speed_and_stays_at_the_end() -> None:
    route = [(43.7300, 7.4200), (43.7300, 7.4300), (43.7400, 7.4300)]
    replay = RouteGpsReplay(route, speed_mps=20.0, interval_s=5.0, pace=0, clock=lambda: T0)
    length_m = replay.length_m
    assert length_m == pytest.approx(haversine_m(*route[0], *route[1]) + haversine_m(*route[1], *route[2]))
    n_drive = int(length_m // (20.0 * 5.0))
    fixes = await take(replay, n_drive + 4)
    assert (fixes[0].lat_deg, fixes[0].lon_deg) == route[0]
    for k in range(1, n_drive + 1):
        driven = haversine_m(fixes[k - 1].lat_deg, fixes[k - 1].lon_deg, fixes[k].lat_deg, fixes[k].lon_deg)
        # straight segments: 100 m per fix, less only at the corner
        assert driven <= 100.0 + 0.5
        assert fixes[k].at == T0 + timedelta(seconds=5 * k)
    assert fixes[1].heading_deg == pytest.approx(90.0, abs=0.1)  # due east on the first leg
    assert fixes[-1].heading_deg is None or fixes[-1].speed_mps == 0
    for fix in fixes[-3:]:
        assert (fix.lat_deg, fix.lon_deg) == route[-1]
        assert fix.speed_mps == 0.0
        assert fix.fix is True
    with pytest.raises(ValueError):
        RouteGpsReplay([], speed_mps=10)
    with pytest.raises(ValueError):
        RouteGpsReplay([(91.0, 0.0)], speed_mps=10)


# --- saturation (ADC rails) in the WFDB replay ------------------------------------------------------------------


async def test_ecg_replay_reports_no_saturation_on_mitbih_records_that_never_reach_the_rails() -> None:
    """MIT-BIH: 11-bit ADC, zero 1024, so the rails are codes 0 and 2047; records 100, 119 and 201 never reach them
    (checked against the raw record here), so no block may be flagged."""
    from ambulance_agent.sources.ecg import adc_rails

    for name in ("100", "119", "201"):
        record = wfdb.rdrecord(str(MITDB / name), physical=False, return_res=16)
        low, high = adc_rails(record)
        assert (low.tolist(), high.tolist()) == ([0, 0], [2047, 2047])
        assert not ((record.d_signal == low) | (record.d_signal == high)).any()
        replay = WfdbEcgReplay(MITDB / name, chunk_s=10.0, pace=0, loop=False, clock=lambda: T0)
        blocks: list[EcgBlock] = await take(replay, 10**6)
        assert sum(b.n_samples for b in blocks) == 650_000
        assert all(b.saturated == (False, False) and b.lead_off == () for b in blocks)


def _clipped_record(folder: Path) -> tuple[Path, np.ndarray]:
    """A tiny WFDB record with an 11-bit ADC (zero 1024, rails 0 and 2047), MIT-BIH 100's first 4 s with lead 0
    at the upper rail in second 1 and lead 1 at the lower rail in second 3."""
    source = wfdb.rdrecord(str(MITDB / "100"), physical=False, sampto=4 * 360).d_signal.astype(np.int64)
    source[400:410, 0] = 2047
    source[3 * 360 + 5, 1] = 0
    rec = wfdb.Record(
        record_name="clip", n_sig=2, fs=360, sig_len=len(source), file_name=["clip.dat"] * 2, fmt=["212"] * 2,
        adc_gain=[200.0] * 2, baseline=[1024] * 2, units=["mV"] * 2, adc_res=[11, 11], adc_zero=[1024, 1024],
        sig_name=["MLII", "V5"], d_signal=source, init_value=[int(v) for v in source[0]], block_size=[0, 0],
    )  # fmt: skip
    rec.checksum = rec.calc_checksum()
    rec.wrsamp(write_dir=str(folder))
    return folder / "clip", source


async def test_ecg_replay_flags_a_lead_at_the_adc_rail_in_that_block_only_and_keeps_the_samples(
    tmp_path: Path,
) -> None:
    path, source = _clipped_record(tmp_path)
    replay = WfdbEcgReplay(path, chunk_s=1.0, pace=0, loop=False, clock=lambda: T0)
    blocks: list[EcgBlock] = await take(replay, 10)
    assert [b.saturated for b in blocks] == [(False, False), (True, False), (False, False), (False, True)]
    got = np.concatenate([b.samples for b in blocks], axis=1)
    np.testing.assert_array_equal(got, source.T)  # flagged, not hidden: the rail values are sent as they are

    # resampled 360 -> 500 Hz: the flags follow the data's time, not the sample index
    resampled = WfdbEcgReplay(path, chunk_s=1.0, pace=0, loop=False, clock=lambda: T0, resample_hz=500)
    blocks = await take(resampled, 10)
    assert [b.saturated for b in blocks] == [(False, False), (True, False), (False, False), (False, True)]
