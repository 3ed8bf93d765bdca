"""Unit tests of the ingest's error boundary, gap handling and write retries, without sockets: messages are
handed to the receive handler directly and the writer runs against a SQLite store (wrapped to inject faults)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from broker_config import BrokerSettings, GapRecord, GpsFix, Stream, TopicSpace, Vitals, encode
from telemetry.errors import StoreUnavailableError, WriteError
from telemetry.ingest import Ingest, RejectReason, StoredWatermarks, classify_rejection, subscription_filters
from telemetry.records import WriteResult
from telemetry.sqlite_store import SqliteStore
from telemetry.store import Store

T0 = datetime(2024, 3, 14, 9, 30, tzinfo=UTC)
U = "amb7"
SPACE = TopicSpace(prefix="unit-test/")
SECRET_HR = 123.456  # a marker value that must never appear in a log line


def vitals(seq: int, unit_id: str = U) -> Vitals:
    at = T0 + timedelta(seconds=seq)
    return Vitals(unit_id=unit_id, seq=seq, sent_at=at, measured_at=at, heart_rate_bpm=SECRET_HR, spo2_pct=97.25)


def msg(stream: Stream, payload: bytes, unit_id: str = U) -> aiomqtt.Message:
    return aiomqtt.Message(SPACE.topic(stream, unit_id), payload, qos=1, retain=False, mid=1, properties=None)


class FlakyStore:
    """Delegates to a real store; the first ``fail_times`` writes raise StoreUnavailableError, and any batch that
    holds a vitals message with a seq in ``refuse_seqs`` raises WriteError (as a CHECK violation would)."""

    def __init__(self, inner: Store, *, fail_times: int = 0, refuse_seqs: frozenset[int] = frozenset()) -> None:
        self.inner = inner
        self.fail_times = fail_times
        self.refuse_seqs = refuse_seqs
        self.calls = 0

    async def write(self, batch: Sequence[Any]) -> WriteResult:
        self.calls += 1
        if self.fail_times:
            self.fail_times -= 1
            raise StoreUnavailableError("injected outage")
        if any(p.stream is Stream.VITALS and m.seq in self.refuse_seqs for p, m, *_ in batch):
            raise WriteError("injected refusal", "23514")
        return await self.inner.write(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = SqliteStore(tmp_path / "ingest.sqlite3", clock=lambda: T0)  # the data's times are around T0
    await s.migrate()
    yield s
    await s.close()


async def started(store: Any, **kwargs: Any) -> tuple[Ingest, asyncio.Task[None]]:
    ingest = Ingest(store, BrokerSettings(), SPACE, batch_age_s=0.02, retry_min_s=0.01, retry_max_s=0.05, **kwargs)
    await ingest.resume()
    return ingest, asyncio.create_task(ingest._writer())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_subscriptions_cover_every_stored_unit_stream_but_not_video() -> None:
    filters = subscription_filters(SPACE)
    streams = {SPACE.parse(f.replace("+", "x")).stream for f in filters}
    assert streams == {Stream.AVAILABILITY, Stream.STATUS, Stream.VITALS, Stream.ECG, Stream.GPS, Stream.PREALERT}
    assert all(f.startswith("$share/ingest/") for f in subscription_filters(SPACE, "ingest"))


async def test_each_malformed_kind_is_counted_and_logged_without_content(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    good = encode(Stream.VITALS, vitals(0))
    doc = json.loads(good)
    bad = {
        RejectReason.MALFORMED: good[: len(good) // 2],
        RejectReason.INVALID_FIELDS: json.dumps(doc | {"heart_rate_bpm": "fast"}).encode(),
        RejectReason.SCHEMA_VERSION: json.dumps(doc | {"schema_version": 2}).encode(),
        RejectReason.NOT_UTF8: good.replace(b"amb7", b"amb\xff"),
        RejectReason.OVERSIZED: good + b" " * 9000,
        RejectReason.UNIT_MISMATCH: encode(Stream.VITALS, vitals(0, unit_id="amb8")),
    }
    ingest, writer = await started(store)
    caplog.set_level(logging.DEBUG)
    seq = 0
    for payload in bad.values():
        await ingest._on_message(msg(Stream.VITALS, encode(Stream.VITALS, vitals(seq))))
        seq += 1
        await ingest._on_message(msg(Stream.VITALS, payload))
    await ingest._on_message(msg(Stream.VITALS, encode(Stream.VITALS, vitals(seq))))
    await ingest._on_message(msg(Stream.ECG, b"GHE1\x01"))  # a truncated binary ECG chunk
    await ingest.wait_until(lambda s: s.inserted[Stream.VITALS] == seq + 1, timeout_s=5)
    await stop(writer)
    assert ingest.stats.rejected == {k: 1 for k in bad} | {RejectReason.MALFORMED: 2}
    assert ingest.stats.received == 2 * len(bad) + 2
    assert await store.seqs(U, Stream.VITALS) == list(range(seq + 1))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert str(SECRET_HR) not in text
    assert "97.25" not in text
    assert sum("message rejected" in r.getMessage() for r in caplog.records) == len(bad) + 1


def test_every_codec_reason_has_a_kind() -> None:
    assert classify_rejection("payload 9000 B exceeds the 8192 B limit") is RejectReason.OVERSIZED
    assert classify_rejection("ECG chunk truncated (shorter than its header)") is RejectReason.MALFORMED
    assert classify_rejection("outside the topic space") is RejectReason.TOPIC
    assert classify_rejection("something new") is RejectReason.OTHER


async def test_gap_is_recorded_then_filled_by_late_arrivals(store: Store) -> None:
    ingest, writer = await started(store)
    for seq in (0, 1, 4, 5):
        await ingest._on_message(msg(Stream.GPS, encode(Stream.GPS, GpsFix(unit_id=U, seq=seq, sent_at=T0, fix=False))))
    await ingest.wait_until(lambda s: s.inserted[Stream.GAP] == 1 and s.inserted[Stream.GPS] == 4, timeout_s=5)
    (gap,) = await store.gaps(U)
    assert (gap.stream, gap.from_seq, gap.to_seq, gap.missing, gap.seq) == (Stream.GPS, 2, 3, 2, 0)
    for seq in (3, 2, 2):
        await ingest._on_message(msg(Stream.GPS, encode(Stream.GPS, GpsFix(unit_id=U, seq=seq, sent_at=T0, fix=False))))
    await ingest.wait_until(lambda s: s.stored(Stream.GPS) == 7, timeout_s=5)
    await stop(writer)
    assert (await store.gaps(U))[0].filled
    assert (ingest.stats.gaps_detected, ingest.stats.late_fills, ingest.stats.gaps_closed) == (1, 2, 1)
    assert ingest.stats.duplicates[Stream.GPS] == 1


async def test_resume_continues_seqs_and_gap_numbers(store: Store) -> None:
    first, writer = await started(store)
    for seq in (0, 2):
        await first._on_message(msg(Stream.VITALS, encode(Stream.VITALS, vitals(seq))))
    await first.wait_until(lambda s: s.inserted[Stream.GAP] == 1 and s.inserted[Stream.VITALS] == 2, timeout_s=5)
    await stop(writer)
    second, writer = await started(store)
    await second._on_message(msg(Stream.VITALS, encode(Stream.VITALS, vitals(3))))
    await second._on_message(msg(Stream.VITALS, encode(Stream.VITALS, vitals(6))))
    await second.wait_until(lambda s: s.inserted[Stream.GAP] == 1 and s.inserted[Stream.VITALS] == 2, timeout_s=5)
    await stop(writer)
    assert [(g.seq, g.from_seq, g.to_seq) for g in await store.gaps(U)] == [(0, 1, 1), (1, 4, 5)]


async def test_database_outage_keeps_the_batch_and_retries(store: Store) -> None:
    flaky = FlakyStore(store, fail_times=3)
    ingest, writer = await started(flaky)
    for seq in range(50):
        await ingest._on_message(msg(Stream.VITALS, encode(Stream.VITALS, vitals(seq))))
    await ingest.wait_until(lambda s: s.inserted[Stream.VITALS] == 50, timeout_s=5)
    await stop(writer)
    assert ingest.stats.write_retries == 3
    assert await store.seqs(U, Stream.VITALS) == list(range(50))


async def test_refused_rows_are_isolated_and_the_rest_stored(store: Store) -> None:
    flaky = FlakyStore(store, refuse_seqs=frozenset({7}))
    ingest, writer = await started(flaky, batch_max=20)
    for seq in range(20):
        await ingest._on_message(msg(Stream.VITALS, encode(Stream.VITALS, vitals(seq))))
    await ingest.wait_until(lambda s: s.inserted[Stream.VITALS] == 19, timeout_s=5)
    await stop(writer)
    assert ingest.stats.rejected == {RejectReason.STORE_REFUSED: 1}
    assert await store.seqs(U, Stream.VITALS) == [s for s in range(20) if s != 7]


async def test_full_queue_drops_after_a_bounded_wait_and_counts_it(store: Store) -> None:
    ingest = Ingest(store, BrokerSettings(), SPACE, queue_max=2, enqueue_timeout_s=0.01)
    await ingest.resume()
    for seq in range(3):
        await ingest._on_message(msg(Stream.VITALS, encode(Stream.VITALS, vitals(seq))))
    assert ingest.stats.rejected == {RejectReason.QUEUE_FULL: 1}
    assert ingest.stats.queue_depth == 2


async def test_shutdown_writes_what_was_already_received(store: Store) -> None:
    ingest, writer = await started(store)
    await stop(writer)
    for seq in range(5):
        await ingest._on_message(msg(Stream.VITALS, encode(Stream.VITALS, vitals(seq))))
    await ingest._drain()
    assert await store.seqs(U, Stream.VITALS) == list(range(5))


def test_watermark_follows_a_sequence_restart() -> None:
    """A new outbox seeded from the clock: the receipt's watermark jumps to it instead of waiting forever."""
    marks = StoredWatermarks(restart_jump=1000)
    for seq in (0, 1, 3):
        marks.add("amb7", Stream.GPS, seq)
    assert marks.through("amb7") == {"gps": 1}
    seed = 1_764_470_000_000_000
    assert marks.add("amb7", Stream.GPS, seed)
    assert marks.add("amb7", Stream.GPS, seed + 1)
    assert marks.through("amb7") == {"gps": seed + 1}
    assert not marks.add("amb7", Stream.GPS, 2)  # a late message of the old outbox changes nothing


async def test_a_hanging_broker_never_holds_up_the_writer_or_gap_publishing(store: Store) -> None:
    """Gap records are published by their own task within a bounded budget; the writer never awaits the network."""
    ingest, writer = await started(store, gap_publish_timeout_s=0.05, gap_publish_budget_s=0.2)
    calls = 0

    async def never_acknowledged(*_: object, **__: object) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(3600)  # a broker that takes the PUBLISH and never answers

    ingest.link.publish = never_acknowledged  # type: ignore[method-assign]
    ingest.link.connected.set()
    record = GapRecord(unit_id="amb7", seq=0, sent_at=T0, stream="gps", from_seq=1, to_seq=2, detected_at=T0)
    ingest._unpublished.append(record)
    async with asyncio.timeout(2):
        await ingest._publish_gaps()  # returns within its budget
    assert calls == 1
    assert list(ingest._unpublished) == [record]  # kept for the next round, not lost
    fix = GpsFix(unit_id="amb7", seq=0, sent_at=T0, fix=False)
    await ingest._on_message(msg(Stream.GPS, encode(Stream.GPS, fix), "amb7"))
    await ingest.wait_until(lambda s: s.stored(Stream.GPS) == 1, 2.0)  # the writer went on meanwhile
    await stop(writer)
