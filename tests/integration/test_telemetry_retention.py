"""Time partitions and retention of the PostgreSQL telemetry store (migration 0002), on a real PostgreSQL database:
maintenance drops expired data and nothing else, late data for an old-but-retained partition is accepted, data older
than retention is refused and counted (also through the running ingest, which goes on), and a 0001 database
migrates forward with its rows."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiomqtt
import numpy as np
import psycopg
import pytest

from broker_config import BrokerSettings, EcgChunk, GpsFix, ParsedTopic, Scope, Stream, TopicSpace, Vitals, encode
from telemetry import maintenance
from telemetry.ingest import Ingest, RejectReason
from telemetry.migrate import load_migrations
from telemetry.postgres_store import PostgresStore
from telemetry.store import open_store

pytestmark = pytest.mark.integration

U = "amb31"
NOW = datetime.now(UTC).replace(microsecond=0)


def ecg(seq: int, at: datetime, unit_id: str = U) -> EcgChunk:
    rng = np.random.default_rng(seq)
    return EcgChunk(
        unit_id=unit_id,
        seq=seq,
        sent_at=at,
        start_at=at,
        fs_hz=500.0,
        leads=("I", "II", "V1"),
        gain_adc_per_mv=200.0,
        baseline_adc=0,
        samples=np.cumsum(rng.integers(-3, 4, size=(3, 500)), axis=1),
    )


def vitals(seq: int, at: datetime, hr: float = 80.0) -> Vitals:
    return Vitals(unit_id=U, seq=seq, sent_at=at, measured_at=at, heart_rate_bpm=hr, spo2_pct=97.0)


def gps(seq: int, at: datetime) -> GpsFix:
    return GpsFix(unit_id=U, seq=seq, sent_at=at, fix=True, lat_deg=43.7, lon_deg=7.4)


def item(stream: Stream, model: object) -> tuple[ParsedTopic, object, datetime]:
    return (ParsedTopic(Scope.UNIT, U, stream), model, NOW)


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresStore]:
    s = open_store(pg_url)
    assert isinstance(s, PostgresStore)
    await s.migrate()
    yield s
    await s.close()


async def partitions(url: str, table: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT partition_name FROM telemetry_partition WHERE table_name = %s ORDER BY lower_bound", (table,)
        )
        return [r[0] for r in await cur.fetchall()]


async def test_maintenance_creates_ahead_and_drops_only_expired_partitions(store: PostgresStore, pg_url: str) -> None:
    made = await maintenance.run(pg_url, NOW)
    assert made.created == []  # the migration already made today's and the next two days' partitions
    ahead = await partitions(pg_url, "ecg_chunk")
    assert len(ahead) >= 3

    batch = [
        item(Stream.ECG, ecg(0, NOW - timedelta(days=10))),  # retained now, expired 25 days from now
        item(Stream.ECG, ecg(1, NOW - timedelta(minutes=5))),  # retained throughout
        item(Stream.VITALS, vitals(0, NOW - timedelta(days=40))),  # late data, old-but-retained partition (1 year)
        item(Stream.VITALS, vitals(1, NOW - timedelta(minutes=5))),
        item(Stream.GPS, gps(0, NOW - timedelta(days=200))),
        item(Stream.ECG, ecg(2, NOW - timedelta(days=31))),  # older than the ECG retention: refused, counted
        item(Stream.GPS, gps(1, NOW - timedelta(days=400))),  # older than the GPS retention: refused, counted
    ]
    result = await store.write(batch)  # type: ignore[arg-type]
    assert result.inserted == {Stream.ECG: 2, Stream.VITALS: 2, Stream.GPS: 1}
    assert result.expired == {Stream.ECG: 1, Stream.GPS: 1}
    assert await store.seqs(U, Stream.ECG) == [0, 1]

    later = NOW + timedelta(days=25)
    report = await maintenance.run(pg_url, later)
    assert report.dropped  # the ECG partitions wholly older than later - 30 days
    assert all(name.startswith("ecg_chunk_p") for name in report.dropped)
    assert report.created  # partitions up to later + 2 days
    assert await store.seqs(U, Stream.ECG) == [1]  # the expired chunk went, and nothing else
    assert await store.seqs(U, Stream.VITALS) == [0, 1]
    assert await store.seqs(U, Stream.GPS) == [0]
    window = await store.ecg_window(U, 10.0)
    assert window is not None
    assert window.missing_samples == 0
    assert (await maintenance.run(pg_url, later)).dropped == []  # idempotent

    # a shorter retention takes effect at the next run
    await maintenance.set_retention(pg_url, {Stream.VITALS: timedelta(days=30)})
    report = await maintenance.run(pg_url, NOW + timedelta(days=1))
    assert any(name.startswith("vitals_p") for name in report.dropped)
    assert await store.seqs(U, Stream.VITALS) == [1]


async def test_duplicate_delivery_is_still_a_no_op_in_a_partition(store: PostgresStore) -> None:
    old = NOW - timedelta(days=20)
    batch = [item(Stream.ECG, ecg(5, old)), item(Stream.VITALS, vitals(5, old)), item(Stream.GPS, gps(5, old))]
    first = await store.write(batch)  # type: ignore[arg-type]
    again = await store.write(batch)  # type: ignore[arg-type]
    assert first.total_inserted == 3
    assert again.total_inserted == 0
    assert again.total_duplicates == 3
    # the late, older vitals never replace the newer latest value
    await store.write([item(Stream.VITALS, vitals(9, NOW, hr=60.0))])  # type: ignore[list-item]
    await store.write([item(Stream.VITALS, vitals(6, old + timedelta(seconds=1), hr=120.0))])  # type: ignore[list-item]
    latest = (await store.latest_vitals())[U].by_field("heart_rate_bpm")
    assert latest is not None
    assert (latest.value, latest.seq) == (60.0, 9)
    state = await store.ingest_state()
    assert state.max_seq[(U, Stream.VITALS)] == 9


async def test_ecg_is_stored_compressed_and_lossless(store: PostgresStore, pg_url: str) -> None:
    chunks = [ecg(i, NOW - timedelta(seconds=60 - i)) for i in range(60)]
    wire = [encode(Stream.ECG, c) for c in chunks]
    await store.write([(ParsedTopic(Scope.UNIT, U, Stream.ECG), c, NOW, w) for c, w in zip(chunks, wire, strict=True)])
    np.testing.assert_array_equal(await store.ecg_samples(U), np.concatenate([c.samples for c in chunks], axis=1))
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        cur = await conn.execute("SELECT sum(octet_length(ghe1)), count(samples) FROM ecg_chunk")
        row = await cur.fetchone()
    assert row is not None
    assert row[1] == 0  # no raw int16 copy
    assert row[0] == sum(len(w) for w in wire)  # kept exactly as received (not compressed again)
    assert row[0] / (60 * 3 * 500) < 1.0  # bytes per sample, payload only


async def test_expired_message_through_the_running_ingest_is_counted_and_the_loop_goes_on(
    store: PostgresStore, mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    client_id = f"test-ingest-{uuid.uuid4().hex[:10]}"
    ingest = Ingest(store, mqtt_settings, topic_space, client_id=client_id, batch_age_s=0.05)
    async with contextlib.AsyncExitStack() as stack:
        task = asyncio.create_task(ingest.run())

        async def _stop() -> None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            async with aiomqtt.Client(mqtt_settings.host, mqtt_settings.port, identifier=client_id, clean_session=True):
                pass

        stack.push_async_callback(_stop)
        await ingest.link.wait_connected(10)
        pub = await stack.enter_async_context(aiomqtt.Client(mqtt_settings.host, mqtt_settings.port))
        times = (NOW - timedelta(seconds=3), NOW - timedelta(days=45), NOW - timedelta(seconds=1))
        for seq, at in enumerate(times):
            await pub.publish(topic_space.topic(Stream.ECG, U), encode(Stream.ECG, ecg(seq, at)), qos=1, timeout=10)
        await ingest.wait_until(lambda s: s.stored(Stream.ECG) == 2 and s.rejected[RejectReason.EXPIRED] == 1, 20)
    assert await store.seqs(U, Stream.ECG) == [0, 2]


async def test_a_0001_database_migrates_forward_with_its_rows(pg_url: str) -> None:
    (first, *_) = load_migrations("postgres")
    at = NOW - timedelta(hours=1)
    raw = np.arange(1000, dtype="<i2").reshape(2, 500)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute("SET TimeZone = 'UTC'")
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(first.sql.encode())
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (1, 'init')")
        await conn.execute(
            "INSERT INTO vitals VALUES (%s, 3, '8867-4', 147842, '/min', 72.0, %s, NULL, %s, %s, false)",
            (U, at, at, at),
        )
        await conn.execute(
            "INSERT INTO ecg_chunk VALUES (%s, 4, %s, 500.0, ARRAY['I','II'], 200.0, 0, 500, %s, ARRAY[]::boolean[],"
            " %s, %s, false)",
            (U, at, raw.tobytes(), at, at),
        )
        await conn.execute(
            "INSERT INTO gps_fix VALUES (%s, 2, true, 43.7, 7.4, NULL, NULL, NULL, NULL, NULL, false, %s, %s, false)",
            (U, at, at),
        )
    store = open_store(pg_url)
    try:
        assert await store.migrate() == [2, 3, 4, 5]
        assert await store.seqs(U, Stream.VITALS) == [3]
        assert await store.seqs(U, Stream.GPS) == [2]
        np.testing.assert_array_equal(await store.ecg_samples(U), raw)
        latest = (await store.latest_vitals())[U].by_field("heart_rate_bpm")
        assert latest is not None
        assert latest.value == 72.0
        state = await store.ingest_state()
        assert state.max_seq == {(U, Stream.VITALS): 3, (U, Stream.ECG): 4, (U, Stream.GPS): 2}
        # new rows go next to the carried-over ones
        new = ecg(5, at + timedelta(seconds=1))
        assert (await store.write([(ParsedTopic(Scope.UNIT, U, Stream.ECG), new, NOW)])).inserted[Stream.ECG] == 1
    finally:
        await store.close()


async def test_a_vitals_replay_with_other_fields_is_a_no_op_as_a_whole(store: PostgresStore) -> None:
    """Message-level idempotency on (unit, stream, seq): a replay never merges new codes into the stored message,
    whether it lands in the same partition or (another measured_at) in another one, in a later batch or the same."""
    first = Vitals(unit_id=U, seq=7, sent_at=NOW, measured_at=NOW, heart_rate_bpm=80.0)
    other = Vitals(unit_id=U, seq=7, sent_at=NOW, measured_at=NOW, heart_rate_bpm=81.0, spo2_pct=95.0)
    moved = Vitals(unit_id=U, seq=7, sent_at=NOW, measured_at=NOW - timedelta(days=3), resp_rate_per_min=20.0)
    assert (await store.write([item(Stream.VITALS, first)])).inserted[Stream.VITALS] == 1  # type: ignore[list-item]
    again = await store.write([item(Stream.VITALS, other), item(Stream.VITALS, moved)])  # type: ignore[list-item]
    assert again.duplicates[Stream.VITALS] == 2
    assert again.total_inserted == 0
    a = Vitals(unit_id=U, seq=8, sent_at=NOW, measured_at=NOW, spo2_pct=97.0)
    b = Vitals(unit_id=U, seq=8, sent_at=NOW, measured_at=NOW, spo2_pct=90.0, sbp_mmhg=120.0)
    both = await store.write([item(Stream.VITALS, a), item(Stream.VITALS, b)])  # type: ignore[list-item]
    assert both.inserted[Stream.VITALS] == 1
    assert both.duplicates[Stream.VITALS] == 1
    late = Vitals(unit_id=U, seq=2, sent_at=NOW, measured_at=NOW - timedelta(hours=1), spo2_pct=99.0)
    assert (await store.write([item(Stream.VITALS, late)])).inserted[Stream.VITALS] == 1  # type: ignore[list-item]
    async with await psycopg.AsyncConnection.connect(store._conninfo) as conn:
        cur = await conn.execute("SELECT seq, loinc, value FROM vitals WHERE unit_id = %s ORDER BY seq, loinc", (U,))
        rows = await cur.fetchall()
    assert rows == [(2, "59408-5", 99.0), (7, "8867-4", 80.0), (8, "59408-5", 97.0)]


async def test_store_side_scan_reports_a_sequence_restart_not_a_gap(store: PostgresStore) -> None:
    seed = 1_764_470_000_000_000  # a new outbox seeded from the clock (microseconds since the epoch)
    batch = [item(Stream.GPS, gps(s, NOW - timedelta(seconds=10 - s))) for s in (0, 1)]
    batch.append(item(Stream.GPS, gps(seed, NOW)))
    batch.append(item(Stream.GPS, gps(seed + 2, NOW)))
    await store.write(batch)  # type: ignore[arg-type]
    records = await store.scan_gaps(window_s=3600, settle_s=0)
    assert records is not None
    assert [(r.from_seq, r.to_seq, r.restart) for r in records] == [(2, seed - 1, True), (seed + 1, seed + 1, False)]
    gaps = await store.gaps(U)
    assert [(g.restart, g.missing) for g in gaps if not g.restart] == [(False, 1)]
    assert any(g.restart for g in gaps)


async def test_store_side_scan_starts_at_the_window_over_a_store_with_history(store: PostgresStore) -> None:
    """The first scan over a store that already holds history reads the window, not every stored seq: a stream
    starts at the highest seq stored below its window (a jump there is still checked), and a stream with nothing
    stored below starts at -1 (its first messages missing are a gap)."""
    old = NOW - timedelta(hours=2)
    history = [item(Stream.GPS, gps(s, old + timedelta(seconds=s))) for s in range(90)]  # outside a 10-min window
    recent = [item(Stream.GPS, gps(s, NOW - timedelta(seconds=110 - s))) for s in range(100, 110)]
    await store.write([*history, *recent])  # type: ignore[arg-type]
    fresh = ParsedTopic(Scope.UNIT, "amb32", Stream.GPS)
    late_start = [
        (fresh, GpsFix(unit_id="amb32", seq=s, sent_at=NOW, fix=True, lat_deg=43.7, lon_deg=7.4), NOW)
        for s in range(5, 8)
    ]
    await store.write(late_start)  # type: ignore[arg-type]
    records = await store.scan_gaps(window_s=600, settle_s=0)
    assert records is not None
    assert sorted((r.unit_id, r.from_seq, r.to_seq, r.restart) for r in records) == [
        ("amb31", 90, 99, False),  # between the history and the window: checked
        ("amb32", 0, 4, False),  # a new stream whose first messages never came
    ]
    async with await psycopg.AsyncConnection.connect(store._conninfo) as conn:
        cur = await conn.execute("SELECT unit_id, checked_seq FROM gap_scan_state WHERE stream = 'gps' ORDER BY 1")
        assert await cur.fetchall() == [("amb31", 109), ("amb32", 7)]
    assert await store.scan_gaps(window_s=600, settle_s=0) == []


async def test_a_refused_vitals_replay_never_becomes_the_latest_value(store: PostgresStore) -> None:
    """A replay of a stored vitals message with other values is refused as a whole, and must not show as the
    unit's latest vitals either (the latest read the staging rows, refused ones included)."""
    first = Vitals(unit_id=U, seq=70, sent_at=NOW, measured_at=NOW - timedelta(seconds=30), heart_rate_bpm=80.0)
    await store.write([item(Stream.VITALS, first)])  # type: ignore[list-item]
    replay = Vitals(unit_id=U, seq=70, sent_at=NOW, measured_at=NOW, heart_rate_bpm=150.0, spo2_pct=70.0)
    result = await store.write([item(Stream.VITALS, replay)])  # type: ignore[list-item]
    assert (result.inserted[Stream.VITALS], result.duplicates[Stream.VITALS]) == (0, 1)
    latest = (await store.latest_vitals())[U]
    assert latest.by_field("spo2_pct") is None
    hr = latest.by_field("heart_rate_bpm")
    assert hr is not None
    assert (hr.value, hr.seq) == (80.0, 70)


async def test_two_writers_of_one_unit_keep_its_latest_vitals_whole(store: PostgresStore) -> None:
    """Two ingest workers write one unit's vitals with different codes at the same time (a monitor's HR, an
    oximeter's SpO2): the unit's latest-vitals document must hold both, as the per-code table does."""
    a, b = PostgresStore(store._conninfo), PostgresStore(store._conninfo)
    unit = "amb33"
    topic = ParsedTopic(Scope.UNIT, unit, Stream.VITALS)

    def vit(seq: int, ago_s: int, **values: float) -> tuple[ParsedTopic, Vitals, datetime]:
        at = NOW - timedelta(seconds=ago_s)
        return (topic, Vitals(unit_id=unit, seq=seq, sent_at=at, measured_at=at, **values), NOW)

    try:
        await store.write([vit(1, 60, heart_rate_bpm=60.0, spo2_pct=90.0)])  # type: ignore[list-item]
        async with await psycopg.AsyncConnection.connect(store._conninfo) as gate:
            async with gate.transaction():  # holds the document row: forces the interleaving timing gives
                await gate.execute("SELECT 1 FROM vitals_latest_doc WHERE unit_id = %s FOR UPDATE", (unit,))
                first = asyncio.create_task(a.write([vit(2, 2, heart_rate_bpm=120.0)]))  # type: ignore[list-item]
                await asyncio.sleep(0.5)
                second = asyncio.create_task(b.write([vit(3, 1, spo2_pct=99.0)]))  # type: ignore[list-item]
                await asyncio.sleep(0.5)
            await asyncio.gather(first, second)
        latest = (await store.latest_vitals())[unit]
        assert {v.field: v.value for v in latest.values.values()} == {"heart_rate_bpm": 120.0, "spo2_pct": 99.0}
    finally:
        await a.close()
        await b.close()
