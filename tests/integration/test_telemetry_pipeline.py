"""Integration tests of the telemetry ingest across real sockets: real Mosquitto (mqtt_settings) and a fresh real
PostgreSQL database (pg_url).  Real data: MIT-BIH records 119/201 (ECG) and the MIMIC-II numerics trend (vitals)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
import warnings
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import psycopg
import pytest
from psycopg import sql

from broker_config import (
    BrokerSettings,
    EcgChunk,
    GapRecord,
    GpsFix,
    ParsedTopic,
    Scope,
    Stream,
    TopicSpace,
    Vitals,
    decode_as,
    encode,
)
from telemetry.ingest import Ingest, RejectReason
from telemetry.service import run_ingest
from telemetry.store import Store, open_store

with warnings.catch_warnings():
    # wfdb 4.3 calls DataFrame.set_index(inplace=True) at import; pandas 3 deprecates it (Pandas4Warning).
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    import wfdb

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[2] / "simulators" / "data"
T0 = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
"""Recent enough for every stream's retention (raw ECG is kept 30 days): older data is refused by design."""
U = "amb12"
WAIT_S = 20.0


def mitdb_chunks(record: str, seconds: int, unit_id: str = U) -> tuple[list[EcgChunk], np.ndarray]:
    """The record's first ``seconds`` as 1-s EcgChunks (seq = second), plus wfdb's ADC samples (n_leads, n)."""
    rec = wfdb.rdrecord(str(DATA / "mitdb" / record), sampto=seconds * 360, physical=False)
    adc = rec.d_signal.T.astype(np.int16)
    fs = int(rec.fs)
    return [
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
    ], adc


def numerics_vitals(n: int, unit_id: str = U) -> list[Vitals]:
    """The first ``n`` MIMIC-II numerics rows replayed one per second (accelerated 60x)."""
    rec = wfdb.rdrecord(str(DATA / "mimic2wdb_numerics" / "s25047-2704-05-04-10-44n"))
    names = {"HR": "heart_rate_bpm", "RESP": "resp_rate_per_min", "SpO2": "spo2_pct", "NBPSys": "sbp_mmhg"}
    out = []
    for i, row in enumerate(rec.p_signal[:n]):
        values = {
            names[k]: float(v)
            for k, v in zip(rec.sig_name, row, strict=True)
            if k in names and not math.isnan(v) and not (k == "SpO2" and v == 0)
        }
        at = T0 + timedelta(seconds=i)
        out.append(Vitals(unit_id=unit_id, seq=i, sent_at=at, measured_at=at, **values))
    return out


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[Store]:
    store = open_store(pg_url)
    await store.migrate()
    yield store
    await store.close()


@contextlib.asynccontextmanager
async def running_ingest(store: Any, broker: BrokerSettings, space: TopicSpace, **kwargs: Any) -> AsyncIterator[Ingest]:
    """An ingest with its own client id (the broker is shared), its persistent session removed afterwards."""
    client_id = f"test-ingest-{uuid.uuid4().hex[:10]}"
    ingest = Ingest(store, broker, space, client_id=client_id, batch_age_s=0.05, **kwargs)
    task = asyncio.create_task(ingest.run())
    try:
        await ingest.link.wait_connected(10)
        yield ingest
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        async with aiomqtt.Client(broker.host, broker.port, identifier=client_id, clean_session=True):
            pass  # connecting with a clean session makes the broker forget the test's persistent session


@contextlib.asynccontextmanager
async def publisher(broker: BrokerSettings) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"test-pub-{uuid.uuid4().hex[:10]}") as client:
        yield client


async def publish(client: aiomqtt.Client, space: TopicSpace, stream: Stream, payload: bytes, unit_id: str = U) -> None:
    await client.publish(space.topic(stream, unit_id), payload, qos=1, timeout=10)


async def test_mitdb_60_s_stored_exactly_once_and_replay_is_a_no_op(
    pg_store: Store, mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    chunks, adc = mitdb_chunks("119", 60)
    vitals = numerics_vitals(60)
    async with running_ingest(pg_store, mqtt_settings, topic_space) as ingest, publisher(mqtt_settings) as pub:
        for chunk, vit in zip(chunks, vitals, strict=True):
            await publish(pub, topic_space, Stream.ECG, encode(Stream.ECG, chunk))
            await publish(pub, topic_space, Stream.VITALS, encode(Stream.VITALS, vit))
        await ingest.wait_until(lambda s: s.stored(Stream.ECG) == 60 and s.stored(Stream.VITALS) == 60, WAIT_S)
        assert ingest.stats.inserted == {Stream.ECG: 60, Stream.VITALS: 60}
        assert await pg_store.seqs(U, Stream.ECG) == list(range(60))
        assert await pg_store.seqs(U, Stream.VITALS) == list(range(60))
        np.testing.assert_array_equal(await pg_store.ecg_samples(U), adc)
        window = await pg_store.ecg_window(U, 10.0)
        assert window is not None
        assert window.missing_samples == 0
        np.testing.assert_array_equal(window.samples_mv, (adc[:, -3600:].astype(np.float64) - 1024) / 200.0)
        latest = (await pg_store.latest_vitals())[U].by_field("heart_rate_bpm")
        assert latest is not None
        assert (latest.value, latest.seq) == (vitals[-1].heart_rate_bpm, 59)

        # the whole replay again over MQTT (a store-and-forward resend): every message a duplicate
        for chunk, vit in zip(chunks, vitals, strict=True):
            await publish(pub, topic_space, Stream.ECG, encode(Stream.ECG, chunk))
            await publish(pub, topic_space, Stream.VITALS, encode(Stream.VITALS, vit))
        await ingest.wait_until(lambda s: s.duplicates[Stream.ECG] == 60 and s.duplicates[Stream.VITALS] == 60, WAIT_S)
        assert ingest.stats.inserted == {Stream.ECG: 60, Stream.VITALS: 60}
        assert ingest.stats.total_rejected == 0
        assert ingest.stats.gaps_detected == 0
    assert await pg_store.gaps() == []
    # and the same batch written straight to the store twice
    batch = [(ParsedTopic(Scope.UNIT, U, Stream.ECG), c, T0) for c in chunks]
    assert (await pg_store.write(batch)).duplicates[Stream.ECG] == 60
    assert (await pg_store.write(batch)).total_inserted == 0
    np.testing.assert_array_equal(await pg_store.ecg_samples(U), adc)


async def test_one_malformed_payload_of_each_kind_between_good_ones(
    pg_store: Store, mqtt_settings: BrokerSettings, topic_space: TopicSpace, caplog: pytest.LogCaptureFixture
) -> None:
    marker = 36.789  # a body temperature that must never reach a log line
    vitals = [v.model_copy(update={"temp_c": marker}) for v in numerics_vitals(10)]
    chunks, _ = mitdb_chunks("201", 10)
    good = encode(Stream.VITALS, vitals[0])
    doc = json.loads(good)
    ecg_bytes = encode(Stream.ECG, chunks[0])
    bad: list[tuple[RejectReason, Stream, bytes]] = [
        (RejectReason.MALFORMED, Stream.VITALS, good[: len(good) // 2]),
        (RejectReason.INVALID_FIELDS, Stream.VITALS, json.dumps(doc | {"spo2_pct": "low"}).encode()),
        (RejectReason.SCHEMA_VERSION, Stream.VITALS, json.dumps(doc | {"schema_version": 2}).encode()),
        (RejectReason.NOT_UTF8, Stream.VITALS, good.replace(b"amb12", b"amb\xc312")),
        (RejectReason.OVERSIZED, Stream.VITALS, good + b" " * 8192),
        (RejectReason.UNIT_MISMATCH, Stream.VITALS, encode(Stream.VITALS, numerics_vitals(1, unit_id="amb99")[0])),
        (RejectReason.MALFORMED, Stream.ECG, ecg_bytes[:40]),
    ]
    caplog.set_level(logging.INFO)
    async with running_ingest(pg_store, mqtt_settings, topic_space) as ingest, publisher(mqtt_settings) as pub:
        n_good = 0
        for reason_stream_payload, vit, chunk in zip(bad, vitals, chunks, strict=False):
            _, stream, payload = reason_stream_payload
            await publish(pub, topic_space, Stream.VITALS, encode(Stream.VITALS, vit))
            await publish(pub, topic_space, stream, payload)
            await publish(pub, topic_space, Stream.ECG, encode(Stream.ECG, chunk))
            n_good += 1
        for vit, chunk in zip(vitals[n_good:], chunks[n_good:], strict=True):  # the good messages after the last bad
            await publish(pub, topic_space, Stream.VITALS, encode(Stream.VITALS, vit))
            await publish(pub, topic_space, Stream.ECG, encode(Stream.ECG, chunk))
        await ingest.wait_until(lambda s: s.stored(Stream.VITALS) == 10 and s.stored(Stream.ECG) == 10, WAIT_S)
        expected: dict[str, int] = {}
        for reason, _, _ in bad:
            expected[reason] = expected.get(reason, 0) + 1
        assert ingest.stats.rejected == expected
        assert ingest.stats.received == 20 + len(bad)
    assert await pg_store.seqs(U, Stream.VITALS) == list(range(10))
    assert await pg_store.seqs(U, Stream.ECG) == list(range(10))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged.count("message rejected") == len(bad)
    assert str(marker) not in logged


async def test_gap_is_published_and_stored_then_filled(
    pg_store: Store, mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    received: list[GapRecord] = []
    got_gap = asyncio.Event()

    async def listen(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            received.append(decode_as(GapRecord, topic_space, message.topic.value, message.payload))
            got_gap.set()

    fixes = [GpsFix(unit_id=U, seq=s, sent_at=T0, fix=True, lat_deg=43.73 + s / 1e4, lon_deg=7.42) for s in range(8)]
    async with (
        running_ingest(pg_store, mqtt_settings, topic_space) as ingest,
        publisher(mqtt_settings) as pub,
        publisher(mqtt_settings) as board,
        asyncio.TaskGroup() as tg,
    ):
        await board.subscribe(topic_space.filter(Stream.GAP), qos=1, timeout=10)
        listener = tg.create_task(listen(board))
        for fix in (fixes[0], fixes[1], fixes[2], fixes[5]):
            await publish(pub, topic_space, Stream.GPS, encode(Stream.GPS, fix))
        async with asyncio.timeout(WAIT_S):
            await got_gap.wait()
        (gap,) = received
        assert (gap.unit_id, gap.stream, gap.from_seq, gap.to_seq) == (U, "gps", 3, 4)
        await ingest.wait_until(lambda s: s.inserted[Stream.GAP] == 1 and s.stored(Stream.GPS) == 4, WAIT_S)
        assert [(g.from_seq, g.to_seq, g.missing) for g in await pg_store.gaps(U)] == [(3, 4, 2)]
        for fix in (fixes[4], fixes[3], fixes[6], fixes[7]):  # late arrivals, then live again
            await publish(pub, topic_space, Stream.GPS, encode(Stream.GPS, fix))
        await ingest.wait_until(lambda s: s.stored(Stream.GPS) == 8, WAIT_S)
        assert ingest.stats.gaps_closed == 1
        listener.cancel()
    (info,) = await pg_store.gaps(U)
    assert info.filled
    track = await pg_store.gps_track(U, T0 - timedelta(days=1))
    assert [p.seq for p in track] == list(range(8))


async def test_database_connection_killed_during_ingest_loses_nothing(
    pg_store: Store, pg_url: str, mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    chunks, adc = mitdb_chunks("100", 30)
    async with (
        running_ingest(pg_store, mqtt_settings, topic_space, retry_min_s=0.05, retry_max_s=0.5) as ingest,
        publisher(mqtt_settings) as pub,
    ):
        for chunk in chunks[:15]:
            await publish(pub, topic_space, Stream.ECG, encode(Stream.ECG, chunk))
        await ingest.wait_until(lambda s: s.stored(Stream.ECG) == 15, WAIT_S)
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
            cur = await admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = 'goldenhour-telemetry'"
            )
            row = await cur.fetchone()
            assert row is not None
            assert row[0] >= 1
        for chunk in chunks[15:]:
            await publish(pub, topic_space, Stream.ECG, encode(Stream.ECG, chunk))
        await ingest.wait_until(lambda s: s.stored(Stream.ECG) == 30, WAIT_S)
        assert ingest.stats.write_retries >= 1
        assert ingest.link.sessions == 1
    np.testing.assert_array_equal(await pg_store.ecg_samples(U), adc)


async def test_ff12_session_time_zone_is_utc_even_when_the_server_zone_is_unknown_to_python(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """FF-12: the server's zone ('XYZ-5', a POSIX zone Python's zoneinfo cannot resolve) never reaches psycopg."""
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
        name = (await (await admin.execute("SELECT current_database()")).fetchone() or ("",))[0]
        await admin.execute(sql.SQL("ALTER DATABASE {} SET TimeZone = 'XYZ-5'").format(sql.Identifier(name)))
    caplog.set_level(logging.WARNING, logger="psycopg")
    # control: a plain connection does trip the warning, so the trap is armed
    async with await psycopg.AsyncConnection.connect(pg_url) as plain:
        await plain.execute("SELECT now()")
    assert any("unknown PostgreSQL timezone" in r.getMessage() for r in caplog.records)
    caplog.clear()

    store = open_store(pg_url)
    try:
        await store.migrate()
        at = (T0 - timedelta(days=1)).replace(hour=23, minute=59, second=59, microsecond=999_999)
        fix = GpsFix(unit_id=U, seq=0, sent_at=at, fix=False, device_time=at)
        await store.write([(ParsedTopic(Scope.UNIT, U, Stream.GPS), fix, at)])
        (point,) = await store.gps_track(U, at)
        assert point.received_at == at
        assert point.device_time == at
        assert point.received_at.utcoffset() == timedelta(0)
        bins = await store.vitals_per_minute(U, at)
        assert bins == []
    finally:
        await store.close()
    assert not [r for r in caplog.records if "unknown PostgreSQL timezone" in r.getMessage()]


@pytest.mark.slow
async def test_ff01_ten_second_database_stall_keeps_the_mqtt_session(
    pg_store: Store, pg_url: str, mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    """FF-01: the table is locked for 10 s (a DB stall) with a 5 s keepalive.  The receive loop keeps taking
    messages, the broker never drops the session (1.5 x keepalive would be 7.5 s), and nothing is lost."""
    broker = mqtt_settings.model_copy(update={"keepalive_s": 5})
    chunks, adc = mitdb_chunks("201", 12)
    async with (
        running_ingest(pg_store, broker, topic_space) as ingest,
        publisher(broker) as pub,
        await psycopg.AsyncConnection.connect(pg_url) as blocker,
    ):
        await blocker.execute("LOCK TABLE ecg_chunk IN ACCESS EXCLUSIVE MODE")  # held until rollback
        for chunk in chunks:
            await publish(pub, topic_space, Stream.ECG, encode(Stream.ECG, chunk))
        await ingest.wait_until(lambda s: s.received == 12, WAIT_S)
        with pytest.raises(TimeoutError):  # the stall: nothing can be written for 10 s
            await ingest.wait_until(lambda s: s.stored(Stream.ECG) > 0, timeout_s=10)
        assert ingest.link.connected.is_set()
        await blocker.rollback()
        await ingest.wait_until(lambda s: s.stored(Stream.ECG) == 12, WAIT_S)
        assert ingest.link.sessions == 1
        assert ingest.stats.handler_max_s < 0.1
        assert ingest.stats.gaps_detected == 0
    np.testing.assert_array_equal(await pg_store.ecg_samples(U), adc)


async def test_run_ingest_on_the_embedded_defaults(tmp_path: Path, embedded_broker: BrokerSettings) -> None:
    """The service entry: SQLite store (migrated by run_ingest) and the in-process amqtt broker."""
    space = TopicSpace(prefix=f"t{uuid.uuid4().hex[:8]}/")
    url = f"sqlite:///{tmp_path}/embedded.sqlite3"
    chunks, adc = mitdb_chunks("100", 5)
    built: asyncio.Queue[Ingest] = asyncio.Queue(1)
    task = asyncio.create_task(run_ingest(url, embedded_broker, space, on_ingest=built.put_nowait))
    try:
        async with asyncio.timeout(WAIT_S):
            ingest = await built.get()
        await ingest.link.wait_connected(WAIT_S)
        async with publisher(embedded_broker) as pub:
            for chunk in chunks:
                await publish(pub, space, Stream.ECG, encode(Stream.ECG, chunk))
            await ingest.wait_until(lambda s: s.stored(Stream.ECG) == 5, WAIT_S)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    reader = open_store(url)
    try:
        assert await reader.seqs(U, Stream.ECG) == list(range(5))
        np.testing.assert_array_equal(await reader.ecg_samples(U), adc)
    finally:
        await reader.close()
