"""Unit tests of the SQLite telemetry store (no sockets): idempotency, out-of-order arrival, queries, and the
ECG round trip checked bit-exact against the real MIT-BIH record read with wfdb."""

from __future__ import annotations

import math
import sqlite3
import warnings
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from broker_config import (
    Availability,
    CaseType,
    CrewStatus,
    EcgChunk,
    Findings,
    GapRecord,
    GpsFix,
    ParsedTopic,
    PreAlert,
    Scope,
    Status,
    Stream,
    TopicSpace,
    Vitals,
    decode,
    encode,
)
from telemetry.errors import StoreUnavailableError, UnsupportedStoreError
from telemetry.migrate import load_migrations
from telemetry.records import WriteResult
from telemetry.sqlite_store import SqliteStore
from telemetry.store import Store, open_store

with warnings.catch_warnings():
    # wfdb 4.3 calls DataFrame.set_index(inplace=True) at import; pandas 3 deprecates it (Pandas4Warning).
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    import wfdb

MITDB = Path(__file__).resolve().parents[2] / "simulators" / "data" / "mitdb"
NUMERICS = Path(__file__).resolve().parents[2] / "simulators" / "data" / "mimic2wdb_numerics"
T0 = datetime(2024, 3, 14, 9, 30, tzinfo=UTC)
UNIT = "amb12"


def pt(stream: Stream, unit_id: str = UNIT) -> ParsedTopic:
    scope = Scope.TELEMETRY if stream is Stream.GAP else Scope.UNIT
    return ParsedTopic(scope, unit_id, stream)


def mitdb_chunks(record: str, seconds: int, unit_id: str = UNIT) -> tuple[list[EcgChunk], np.ndarray]:
    """The record's first ``seconds`` as 1-s EcgChunks, plus the ADC samples (n_leads, n) read by wfdb."""
    rec = wfdb.rdrecord(str(MITDB / record), sampto=int(seconds * 360), physical=False)
    adc = rec.d_signal.T.astype(np.int16)
    fs = int(rec.fs)
    assert len(set(rec.adc_gain)) == 1
    assert len(set(rec.baseline)) == 1
    chunks = [
        EcgChunk(
            unit_id=unit_id,
            seq=i,
            sent_at=T0 + timedelta(seconds=i + 1),
            start_at=T0 + timedelta(seconds=i),
            fs_hz=float(fs),
            leads=tuple(rec.sig_name),
            gain_adc_per_mv=float(rec.adc_gain[0]),
            baseline_adc=int(rec.baseline[0]),
            samples=adc[:, i * fs : (i + 1) * fs],
        )
        for i in range(seconds)
    ]
    return chunks, adc


def numerics_vitals(unit_id: str = UNIT) -> list[Vitals]:
    """The MIMIC-II numerics trend (72 per-minute rows) as Vitals; NaN and 0 % SpO2 are 'not measured'."""
    rec = wfdb.rdrecord(str(NUMERICS / "s25047-2704-05-04-10-44n"))
    names = {"HR": "heart_rate_bpm", "RESP": "resp_rate_per_min", "SpO2": "spo2_pct", "NBPSys": "sbp_mmhg"}
    names |= {"NBPDias": "dbp_mmhg", "NBPMean": "map_mmhg"}
    out = []
    for i, row in enumerate(rec.p_signal):
        values = {
            names[n]: float(v)
            for n, v in zip(rec.sig_name, row, strict=True)
            if n in names and not math.isnan(v) and not (n == "SpO2" and v == 0)
        }
        at = T0 + timedelta(minutes=i)
        out.append(Vitals(unit_id=unit_id, seq=i, sent_at=at, measured_at=at, **values))
    return out


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = SqliteStore(tmp_path / "telemetry.sqlite3", clock=lambda: T0)  # the data's times are around T0
    await s.migrate()
    yield s
    await s.close()


async def test_migrate_is_idempotent_and_recorded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/m.sqlite3"
    s = open_store(url)
    versions = [m.version for m in load_migrations("sqlite")]
    assert await s.migrate() == versions
    assert await s.migrate() == []
    await s.close()
    with sqlite3.connect(tmp_path / "m.sqlite3") as conn:
        assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations")] == versions
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # PostgreSQL has more (0002: time partitions, retention); both start from the same 0001 schema
    assert [m.version for m in load_migrations("postgres")][: len(versions)] == versions


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(UnsupportedStoreError):
        open_store("mysql://localhost/x")


async def test_ecg_round_trip_is_bit_exact_against_wfdb(store: Store) -> None:
    chunks, adc = mitdb_chunks("100", 60)
    space = TopicSpace()
    # through the real codec, as the ingest receives them
    decoded = [decode(space, space.topic(Stream.ECG, UNIT), encode(Stream.ECG, c)) for c in chunks]
    result = await store.write([(p, m, T0) for p, m in decoded])
    assert result.inserted[Stream.ECG] == 60
    stored = await store.ecg_samples(UNIT)
    assert stored.dtype == np.int16
    assert stored.shape == (2, 60 * 360)
    np.testing.assert_array_equal(stored, adc)


async def test_same_batch_twice_writes_nothing_the_second_time(store: Store) -> None:
    chunks, _ = mitdb_chunks("119", 5)
    vitals = numerics_vitals()[:5]
    batch = [(pt(Stream.ECG), c, T0) for c in chunks] + [(pt(Stream.VITALS), v, T0) for v in vitals]
    first = await store.write(batch)
    assert first.inserted == {Stream.ECG: 5, Stream.VITALS: 5}
    assert first.total_duplicates == 0
    second = await store.write(batch)
    assert second.total_inserted == 0
    assert second.duplicates == {Stream.ECG: 5, Stream.VITALS: 5}
    assert await store.seqs(UNIT, Stream.ECG) == list(range(5))
    assert (await store.ecg_samples(UNIT)).shape == (2, 5 * 360)


async def test_duplicates_inside_one_batch_count_once(store: Store) -> None:
    fix = GpsFix(unit_id=UNIT, seq=0, sent_at=T0, fix=True, lat_deg=43.73, lon_deg=7.42)
    result = await store.write([(pt(Stream.GPS), fix, T0)] * 3)
    assert result.inserted[Stream.GPS] == 1
    assert result.duplicates[Stream.GPS] == 2


async def test_out_of_order_arrival_and_latest_vitals(store: Store) -> None:
    vitals = numerics_vitals()
    shuffled = list(reversed(vitals))
    for start in range(0, len(shuffled), 7):  # several batches, newest first
        await store.write([(pt(Stream.VITALS), v, T0) for v in shuffled[start : start + 7]])
    assert await store.seqs(UNIT, Stream.VITALS) == list(range(72))
    latest = (await store.latest_vitals())[UNIT]
    last = vitals[-1]
    hr = latest.by_field("heart_rate_bpm")
    assert hr is not None
    assert (hr.value, hr.measured_at, hr.loinc, hr.ucum, hr.mdc_code) == (
        last.heart_rate_bpm,
        last.measured_at,
        "8867-4",
        "/min",
        147842,
    )
    # NBP is measured only some minutes: the latest is the last row that has it
    last_sbp = next(v for v in reversed(vitals) if v.sbp_mmhg is not None)
    sbp = latest.values["8480-6"]
    assert (sbp.value, sbp.measured_at, sbp.ucum) == (last_sbp.sbp_mmhg, last_sbp.measured_at, "mm[Hg]")
    assert latest.by_field("temp_c") is None


async def test_vitals_per_minute_matches_the_numerics(store: Store) -> None:
    vitals = numerics_vitals()
    await store.write([(pt(Stream.VITALS), v, T0) for v in vitals])
    bins = await store.vitals_per_minute(UNIT, T0 + timedelta(minutes=10))
    hr_bins = [b for b in bins if b.loinc == "8867-4"]
    assert len(hr_bins) == 62
    assert [b.bin_start for b in hr_bins] == [T0 + timedelta(minutes=i) for i in range(10, 72)]
    assert [b.mean for b in hr_bins] == [v.heart_rate_bpm for v in vitals[10:]]
    five = await store.vitals_per_minute(UNIT, T0, bin_s=300)
    first_hr = next(b for b in five if b.loinc == "8867-4")
    assert first_hr.n == 5
    assert first_hr.mean == pytest.approx(np.mean([v.heart_rate_bpm for v in vitals[:5]]))


async def test_ecg_window_in_mv_with_nan_for_a_missing_chunk(store: Store) -> None:
    chunks, adc = mitdb_chunks("201", 20)
    await store.write([(pt(Stream.ECG), c, T0) for c in chunks if c.seq != 15])
    window = await store.ecg_window(UNIT, 10.0)
    assert window is not None
    assert window.samples_mv.shape == (2, 3600)
    assert window.fs_hz == 360.0
    assert window.leads == ("MLII", "V1")
    assert window.start_at == T0 + timedelta(seconds=10)
    assert window.missing_samples == 360
    expected = (adc[:, 3600:7200].astype(np.float64) - 1024) / 200.0
    expected[:, 1800:2160] = np.nan
    np.testing.assert_array_equal(window.samples_mv, expected)
    assert await store.ecg_window("nobody", 10.0) is None
    short = await store.ecg_window(UNIT, 100.0)
    assert short is not None
    assert short.samples_mv.shape == (2, 20 * 360)


async def test_gps_status_availability_prealert_and_gaps(store: Store) -> None:
    batch = [
        (pt(Stream.GPS), GpsFix(unit_id=UNIT, seq=0, sent_at=T0, fix=False), T0),
        (
            pt(Stream.GPS),
            GpsFix(unit_id=UNIT, seq=1, sent_at=T0, fix=True, lat_deg=43.7384, lon_deg=7.4246, device_time=T0),
            T0 + timedelta(seconds=1),
        ),
        (pt(Stream.STATUS), Status(unit_id=UNIT, seq=0, sent_at=T0, status=CrewStatus.TRANSPORTING, at=T0), T0),
        # birth and will of one session share the seq (Sparkplug bdSeq): both are stored
        (pt(Stream.AVAILABILITY), Availability(unit_id=UNIT, seq=4, sent_at=T0, state="online"), T0),
        (pt(Stream.AVAILABILITY), Availability(unit_id=UNIT, seq=4, sent_at=T0, state="offline"), T0),
        (
            pt(Stream.PREALERT),
            PreAlert(
                unit_id=UNIT,
                seq=0,
                sent_at=T0,
                alert_id="pa-1",
                case_type=CaseType.STEMI,
                findings=Findings(age_years=60),
            ),
            T0,
        ),
        (
            pt(Stream.GAP),
            GapRecord(unit_id=UNIT, seq=0, sent_at=T0, stream="gps", from_seq=2, to_seq=4, detected_at=T0),
            T0,
        ),
    ]
    result = await store.write(batch)
    assert result.inserted == {
        Stream.GPS: 2,
        Stream.STATUS: 1,
        Stream.AVAILABILITY: 2,
        Stream.PREALERT: 1,
        Stream.GAP: 1,
    }
    track = await store.gps_track(UNIT, T0)
    assert [(p.seq, p.fix, p.lat_deg, p.lon_deg) for p in track] == [(0, False, None, None), (1, True, 43.7384, 7.4246)]
    assert track[1].device_time == T0
    assert await store.seqs(UNIT, Stream.AVAILABILITY) == [4]
    (gap,) = await store.gaps(UNIT)
    assert (gap.stream, gap.from_seq, gap.to_seq, gap.missing, gap.filled) == (Stream.GPS, 2, 4, 3, False)
    # late arrivals shrink the gap, then fill it
    await store.write([(pt(Stream.GPS), GpsFix(unit_id=UNIT, seq=3, sent_at=T0, fix=False), T0)])
    assert (await store.gaps())[0].missing == 2
    await store.write([(pt(Stream.GPS), GpsFix(unit_id=UNIT, seq=s, sent_at=T0, fix=False), T0) for s in (2, 4)])
    assert (await store.gaps(UNIT))[0].filled
    assert await store.gaps("other") == []
    state = await store.ingest_state()
    assert state.max_seq == {(UNIT, Stream.GPS): 4}
    assert state.max_gap_seq == {UNIT: 0}


async def test_naive_receive_time_is_refused(store: Store) -> None:
    fix = GpsFix(unit_id=UNIT, seq=0, sent_at=T0, fix=False)
    with pytest.raises(ValueError, match="naive"):
        await store.write([(pt(Stream.GPS), fix, datetime(2024, 1, 1))])


async def test_video_and_empty_vitals_are_ignored(store: Store) -> None:
    empty = Vitals(unit_id=UNIT, seq=0, sent_at=T0, measured_at=T0)
    result = await store.write([(pt(Stream.VITALS), empty, T0)])
    assert result == WriteResult(ignored={Stream.VITALS: 1})  # type: ignore[arg-type]


async def test_a_locked_database_is_unavailable_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite3"
    s = SqliteStore(path, busy_timeout_s=0.05, clock=lambda: T0)
    await s.migrate()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    fix = GpsFix(unit_id=UNIT, seq=0, sent_at=T0, fix=False)
    with pytest.raises(StoreUnavailableError):
        await s.write([(pt(Stream.GPS), fix, T0)])
    blocker.execute("ROLLBACK")
    blocker.close()
    assert (await s.write([(pt(Stream.GPS), fix, T0)])).inserted[Stream.GPS] == 1
    await s.close()


async def test_migrate_entry_point(tmp_path: Path) -> None:
    from telemetry.migrate import migrate

    url = f"sqlite:///{tmp_path}/cli.sqlite3"
    assert await migrate(url) == [m.version for m in load_migrations("sqlite")]
    assert await migrate(url) == []


async def test_a_vitals_replay_of_a_stored_seq_is_a_no_op_as_a_whole(store: Store) -> None:
    """Idempotency is per message (unit, stream, seq): a replay carrying other codes merges nothing."""
    first = Vitals(unit_id=UNIT, seq=5, sent_at=T0, measured_at=T0, heart_rate_bpm=80.0)
    other = Vitals(unit_id=UNIT, seq=5, sent_at=T0, measured_at=T0, heart_rate_bpm=81.0, spo2_pct=95.0)
    moved = Vitals(unit_id=UNIT, seq=5, sent_at=T0, measured_at=T0 + timedelta(hours=1), resp_rate_per_min=20.0)
    assert (await store.write([(pt(Stream.VITALS), first, T0)])).inserted[Stream.VITALS] == 1
    again = await store.write([(pt(Stream.VITALS), other, T0), (pt(Stream.VITALS), moved, T0)])
    assert again.duplicates[Stream.VITALS] == 2
    assert again.total_inserted == 0
    # and within one batch: the first message of a (unit, seq) wins
    a = Vitals(unit_id=UNIT, seq=6, sent_at=T0, measured_at=T0, spo2_pct=97.0)
    b = Vitals(unit_id=UNIT, seq=6, sent_at=T0, measured_at=T0, spo2_pct=90.0, sbp_mmhg=120.0)
    both = await store.write([(pt(Stream.VITALS), a, T0), (pt(Stream.VITALS), b, T0)])
    assert both.inserted[Stream.VITALS] == 1
    assert both.duplicates[Stream.VITALS] == 1
    latest = (await store.latest_vitals())[UNIT].values
    assert {v.field: v.value for v in latest.values()} == {"heart_rate_bpm": 80.0, "spo2_pct": 97.0}


async def test_sqlite_refuses_expired_and_future_data_like_postgres(tmp_path: Path) -> None:
    """The embedded store applies PostgreSQL's retention defaults (ECG 30 d, vitals and GPS 365 d; at most
    premake + one partition ahead): what PostgreSQL refuses is counted, not kept."""
    now = T0
    s = SqliteStore(tmp_path / "rules.sqlite3", clock=lambda: now)
    await s.migrate()
    old_ecg, _ = mitdb_chunks("100", 1)
    expired_ecg = old_ecg[0].model_copy(update={"start_at": now - timedelta(days=31), "seq": 0})
    fresh_ecg = old_ecg[0].model_copy(update={"start_at": now - timedelta(days=29), "seq": 1})
    far = now + timedelta(days=3, minutes=1)
    batch = [
        (pt(Stream.ECG), expired_ecg, now),
        (pt(Stream.ECG), fresh_ecg, now),
        (pt(Stream.VITALS), Vitals(unit_id=UNIT, seq=0, sent_at=now, measured_at=far, spo2_pct=97.0), now),
        (pt(Stream.VITALS), Vitals(unit_id=UNIT, seq=1, sent_at=now, measured_at=now, spo2_pct=97.0), now),
        (pt(Stream.GPS), GpsFix(unit_id=UNIT, seq=0, sent_at=now - timedelta(days=366), fix=False), now),
        (pt(Stream.GPS), GpsFix(unit_id=UNIT, seq=1, sent_at=now + timedelta(days=2), fix=False), now),
    ]
    result = await s.write(batch)
    assert result.expired == {Stream.ECG: 1, Stream.GPS: 1}
    assert result.future == {Stream.VITALS: 1}
    assert result.inserted == {Stream.ECG: 1, Stream.VITALS: 1, Stream.GPS: 1}
    assert await s.seqs(UNIT, Stream.ECG) == [1]
    assert await s.seqs(UNIT, Stream.VITALS) == [1]
    await s.close()


async def test_restart_gap_records_round_trip(store: Store) -> None:
    record = GapRecord(
        unit_id=UNIT, seq=0, sent_at=T0, stream="gps", from_seq=3, to_seq=10**15, detected_at=T0, restart=True
    )
    assert (await store.write([(pt(Stream.GAP), record, T0)])).inserted[Stream.GAP] == 1
    (info,) = await store.gaps(UNIT)
    assert info.restart
    assert (info.from_seq, info.to_seq) == (3, 10**15)
