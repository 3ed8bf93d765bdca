"""Ingest robustness across real sockets: two workers on a shared subscription (no loss, no duplicates, gaps found
in the store), a database outage during ingest, a broker restart with a persistent session (FF-02), and a broker
whose per-client queue drops QoS 1 messages (FF-19): the gap is detected and reported."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import numpy as np
import psycopg
import pytest
from psycopg import sql

from broker_config import BrokerSettings, EcgChunk, GpsFix, Stream, TopicSpace, Vitals, encode
from telemetry.ingest import Ingest
from telemetry.postgres_store import PostgresStore
from telemetry.store import Store, open_store

pytestmark = pytest.mark.integration

WAIT_S = 30.0
NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)

PERSISTENT_CONF = """listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {dir}/
autosave_interval 3600
max_queued_messages 0
"""

SMALL_QUEUE_CONF = """listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100
"""


def ecg(unit_id: str, seq: int) -> EcgChunk:
    rng = np.random.default_rng(seq)
    at = NOW + timedelta(seconds=seq)
    return EcgChunk(
        unit_id=unit_id,
        seq=seq,
        sent_at=at,
        start_at=at,
        fs_hz=500.0,
        leads=("I", "II"),
        gain_adc_per_mv=200.0,
        baseline_adc=0,
        samples=np.cumsum(rng.integers(-3, 4, size=(2, 500)), axis=1),
    )


def vitals(unit_id: str, seq: int) -> Vitals:
    at = NOW + timedelta(seconds=seq)
    return Vitals(unit_id=unit_id, seq=seq, sent_at=at, measured_at=at, heart_rate_bpm=70 + seq % 30, spo2_pct=97.0)


def gps(unit_id: str, seq: int) -> GpsFix:
    at = NOW + timedelta(seconds=seq)
    return GpsFix(unit_id=unit_id, seq=seq, sent_at=at, fix=True, lat_deg=43.7 + seq / 1e5, lon_deg=7.4)


BUILD: dict[Stream, Callable[[str, int], Any]] = {Stream.ECG: ecg, Stream.VITALS: vitals, Stream.GPS: gps}


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[Store]:
    store = open_store(pg_url)
    await store.migrate()
    yield store
    await store.close()


@contextlib.asynccontextmanager
async def running(
    store: Store,
    broker: BrokerSettings,
    space: TopicSpace,
    client_id: str | None = None,
    *,
    forget: bool = True,
    **kw: Any,
) -> AsyncIterator[Ingest]:
    """A running ingest; its persistent session is removed afterwards unless ``forget`` is False."""
    client_id = client_id or f"test-ingest-{uuid.uuid4().hex[:10]}"
    ingest = Ingest(store, broker, space, client_id=client_id, batch_age_s=0.05, **kw)
    task = asyncio.create_task(ingest.run())
    try:
        await ingest.link.wait_connected(10)
        yield ingest
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if forget:
            with contextlib.suppress(aiomqtt.MqttError):
                async with aiomqtt.Client(broker.host, broker.port, identifier=client_id, clean_session=True):
                    pass


@contextlib.asynccontextmanager
async def publisher(broker: BrokerSettings) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"test-pub-{uuid.uuid4().hex[:10]}") as client:
        yield client


async def send(pub: aiomqtt.Client, space: TopicSpace, stream: Stream, unit_id: str, seqs: Iterable[int]) -> None:
    for seq in seqs:
        payload = encode(stream, BUILD[stream](unit_id, seq))
        await pub.publish(space.topic(stream, unit_id), payload, qos=1, timeout=10)


async def stored_rows(url: str, table: str) -> tuple[int, int]:
    """(rows, distinct message keys) of a table."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            sql.SQL("SELECT count(*), count(DISTINCT (unit_id, seq)) FROM {}").format(sql.Identifier(table))
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def total(workers: Iterable[Ingest], stream: Stream) -> int:
    return sum(w.stats.stored(stream) for w in workers)


async def wait_for(predicate: Callable[[], bool], workers: list[Ingest], timeout_s: float = WAIT_S) -> None:
    """Wait until ``predicate()`` holds, re-checked whenever any worker's stats change."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            changed = [asyncio.create_task(w.changed()) for w in workers]
            try:
                await asyncio.wait(changed, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in changed:
                    task.cancel()


async def test_two_workers_on_a_shared_subscription_store_everything_once_and_find_gaps_in_the_store(
    pg_url: str, mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    group = f"g{uuid.uuid4().hex[:8]}"
    stores = [open_store(pg_url), open_store(pg_url)]
    for s in stores:
        await s.migrate()
    units = ["amb1", "amb2", "amb3"]
    n = 60
    opts: dict[str, Any] = {"share_group": group, "gap_scan_interval_s": 0.2, "gap_settle_s": 0.5, "gap_window_s": 3600}
    try:
        async with (
            running(stores[0], mqtt_settings, topic_space, **opts) as w1,
            running(stores[1], mqtt_settings, topic_space, **opts) as w2,
            publisher(mqtt_settings) as pub,
        ):
            for unit in units:
                for stream in BUILD:
                    await send(pub, topic_space, stream, unit, range(n))
            workers = [w1, w2]
            await wait_for(lambda: all(total(workers, s) == n * len(units) for s in BUILD), workers)
            assert w1.stats.received > 0
            assert w2.stats.received > 0  # the broker really split the load
            assert sum(w.stats.duplicates.total() for w in workers) == 0
            # a unit whose vitals skip 10..14: neither worker saw the whole sequence, the store scan finds the gap
            await send(pub, topic_space, Stream.VITALS, "amb9", [*range(10), *range(15, 20)])
            await wait_for(lambda: sum(w.stats.gaps_detected for w in workers) >= 1, workers)
        for table, per_msg in (("ecg_chunk", 1), ("gps_fix", 1)):
            assert await stored_rows(pg_url, table) == (n * len(units) * per_msg, n * len(units))
        for unit in units:
            for stream in BUILD:
                assert await stores[0].seqs(unit, stream) == list(range(n))
        gaps = await stores[0].gaps()
        assert [(g.unit_id, g.stream, g.from_seq, g.to_seq, g.missing) for g in gaps] == [
            ("amb9", Stream.VITALS, 10, 14, 5)
        ]
    finally:
        for s in stores:
            await s.close()


async def test_database_outage_during_ingest_loses_nothing(
    pg_store: Store, pg_url: str, mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    """Terminate the ingest's backends and refuse connections (as a restarting server does), then let them back."""
    name = urlsplit(pg_url).path.lstrip("/")
    admin_url = urlsplit(pg_url)._replace(path="/postgres").geturl()
    unit = "amb5"
    async with (
        running(pg_store, mqtt_settings, topic_space, retry_min_s=0.05, retry_max_s=0.3) as ingest,
        publisher(mqtt_settings) as pub,
        await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as admin,
    ):
        await send(pub, topic_space, Stream.ECG, unit, range(20))
        await ingest.wait_until(lambda s: s.stored(Stream.ECG) == 20, WAIT_S)
        try:
            await admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            await send(pub, topic_space, Stream.ECG, unit, range(20, 40))
            await send(pub, topic_space, Stream.VITALS, unit, range(20))
            await ingest.wait_until(lambda s: s.write_retries >= 2, WAIT_S)  # the outage was seen, twice
            assert ingest.stats.stored(Stream.ECG) == 20
        finally:
            await admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
        await ingest.wait_until(lambda s: s.stored(Stream.ECG) == 40 and s.stored(Stream.VITALS) == 20, WAIT_S)
        assert ingest.link.sessions == 1
        assert ingest.stats.gaps_detected == 0
    assert await pg_store.seqs(unit, Stream.ECG) == list(range(40))
    assert await pg_store.seqs(unit, Stream.VITALS) == list(range(20))
    assert await stored_rows(pg_url, "ecg_chunk") == (40, 40)


async def test_ff02_broker_restart_with_persistent_session_loses_nothing(
    pg_store: Store, pg_url: str, private_mosquitto: Any, topic_space: TopicSpace
) -> None:
    """Ingest away while messages are published, then the broker restarts (graceful): the persistent session and
    its queued QoS 1 messages survive because persistence is on; the same client id gets all of them."""
    broker = private_mosquitto(PERSISTENT_CONF)
    # FF-02's pitfall: started as root, Mosquitto drops to the "mosquitto" user, which must be able to write the
    # persistence directory, or the only trace is "Permission denied" at shutdown and the session is lost.
    broker.workdir.parent.chmod(0o711)
    broker.workdir.chmod(0o777)
    broker.start()
    settings: BrokerSettings = broker.settings()
    client_id = f"test-ingest-{uuid.uuid4().hex[:10]}"
    unit = "amb7"
    async with running(pg_store, settings, topic_space, client_id, forget=False) as ingest:
        async with publisher(settings) as pub:
            await send(pub, topic_space, Stream.VITALS, unit, range(30))
        await ingest.wait_until(lambda s: s.stored(Stream.VITALS) == 30, WAIT_S)
    async with publisher(settings) as pub:  # the ingest is away: the broker queues these for its session
        await send(pub, topic_space, Stream.VITALS, unit, range(30, 60))
    broker.stop()
    assert "Error saving" not in broker.log.read_text()
    broker.start()
    async with running(pg_store, settings, topic_space, client_id) as ingest:
        async with publisher(settings) as pub:
            await send(pub, topic_space, Stream.VITALS, unit, range(60, 90))
        await ingest.wait_until(lambda s: s.stored(Stream.VITALS) == 60, WAIT_S)
        assert ingest.stats.gaps_detected == 0
    assert await pg_store.seqs(unit, Stream.VITALS) == list(range(90))
    assert await pg_store.gaps() == []


async def test_ff19_broker_queue_limit_drops_messages_and_the_gap_is_reported(
    pg_store: Store, private_mosquitto: Any, topic_space: TopicSpace
) -> None:
    """Mosquitto keeps only max_queued_messages (100 here) for an offline persistent client and silently drops
    the rest: the ingest must report the missing seqs as a gap as soon as the unit's next message arrives."""
    broker = private_mosquitto(SMALL_QUEUE_CONF)
    broker.start()
    settings: BrokerSettings = broker.settings()
    client_id = f"test-ingest-{uuid.uuid4().hex[:10]}"
    unit = "amb8"
    async with running(pg_store, settings, topic_space, client_id, forget=False):
        pass  # subscribed with a persistent session, then away
    async with publisher(settings) as pub:
        await send(pub, topic_space, Stream.VITALS, unit, range(500))
    async with running(pg_store, settings, topic_space, client_id) as ingest:
        await ingest.wait_until(lambda s: s.stored(Stream.VITALS) == 100, WAIT_S)
        async with publisher(settings) as pub:
            await send(pub, topic_space, Stream.VITALS, unit, [500])  # the unit goes on streaming
        await ingest.wait_until(lambda s: s.gaps_detected == 1 and s.inserted[Stream.GAP] == 1, WAIT_S)
        assert ingest.stats.stored(Stream.VITALS) == 101
    assert await pg_store.seqs(unit, Stream.VITALS) == [*range(100), 500]
    assert [(g.stream, g.from_seq, g.to_seq, g.missing) for g in await pg_store.gaps(unit)] == [
        (Stream.VITALS, 100, 499, 400)
    ]


def test_scan_gaps_is_a_postgres_store_feature() -> None:
    assert hasattr(PostgresStore, "scan_gaps")


async def test_a_stuck_handler_withholds_acknowledgements_and_loses_nothing(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    """Flow control on the receiving services' path: while the handler is stuck, the link acknowledges nothing, so
    the broker stops sending once its in-flight window for the client is full and keeps the rest; once the handler
    moves again, every message arrives once, in order."""
    from broker_config.paho_link import PahoLink

    topic = topic_space.topic(Stream.GPS, "amb77")
    link = PahoLink(mqtt_settings, client_id=f"test-link-{uuid.uuid4().hex[:8]}", max_pending=5)
    release = asyncio.Event()
    all_seen = asyncio.Event()
    seen: list[bytes] = []

    async def handler(message: Any) -> None:
        await release.wait()
        seen.append(bytes(message.payload))
        if len(seen) == 200:
            all_seen.set()

    async def on_connect(lnk: PahoLink) -> None:
        await lnk.subscribe([topic], qos=1)

    task = asyncio.create_task(link.run(on_connect, handler))
    try:
        await link.wait_connected(10)
        async with publisher(mqtt_settings) as pub:
            for i in range(200):
                await pub.publish(topic, str(i).encode(), qos=1, timeout=10)
        async with asyncio.timeout(WAIT_S):
            while not link.paused:  # noqa: ASYNC110 - the link exposes a counter, not an event
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        # the broker's in-flight window (Mosquitto's default: 20), not the 200, waits in our memory
        assert len(link._pending) <= 100
        release.set()
        async with asyncio.timeout(WAIT_S):
            await all_seen.wait()
        await asyncio.sleep(0.3)  # nothing more (no duplicate) arrives
        assert seen == [str(i).encode() for i in range(200)]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_backlog_larger_than_the_link_arrives_after_a_reconnect(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    """A persistent session's backlog comes before the SUBACK: a backlog larger than ``max_pending`` must not stop
    the subscription from completing (it did: nothing was delivered and the link reconnected for ever)."""
    from broker_config.paho_link import PahoLink

    topic = topic_space.topic(Stream.GPS, "amb78")
    client_id = f"test-link-{uuid.uuid4().hex[:8]}"
    seen: list[bytes] = []
    all_seen = asyncio.Event()

    async def on_connect(lnk: PahoLink) -> None:
        await lnk.subscribe([topic], qos=1)

    def handler(message: Any) -> None:
        seen.append(bytes(message.payload))
        if len(seen) == 300:
            all_seen.set()

    first = PahoLink(mqtt_settings, client_id=client_id, clean_session=False)
    task = asyncio.create_task(first.run(on_connect, handler))
    await first.wait_connected(10)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    async with publisher(mqtt_settings) as pub:  # the backlog, queued by the broker while the service is away
        for i in range(300):
            await pub.publish(topic, str(i).encode(), qos=1, timeout=10)
    again = PahoLink(mqtt_settings, client_id=client_id, clean_session=False, max_pending=20)
    task = asyncio.create_task(again.run(on_connect, handler))
    try:
        async with asyncio.timeout(WAIT_S):
            await all_seen.wait()
        assert sorted(int(p) for p in seen) == list(range(300))
        assert again.sessions == 1  # subscribed the first time, no reconnect loop
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(aiomqtt.MqttError):
            async with aiomqtt.Client(mqtt_settings.host, mqtt_settings.port, identifier=client_id, clean_session=True):
                pass


async def test_a_service_publish_is_confirmed_while_its_handler_waits(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    """Dispatch's shape: the handler waits for room in a bounded queue whose worker publishes (QoS 1) each item.
    The worker's PUBACKs must get through while the handler waits (they did not while reading was paused)."""
    from broker_config.paho_link import PahoLink

    inbound = topic_space.topic(Stream.GPS, "amb79")
    outbound = topic_space.topic(Stream.STATUS, "amb79")
    link = PahoLink(mqtt_settings, client_id=f"test-link-{uuid.uuid4().hex[:8]}", max_pending=5)
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=2)
    published: list[bytes] = []

    async def handler(message: Any) -> None:
        await queue.put(bytes(message.payload))

    async def worker() -> None:
        while True:
            item = await queue.get()
            await link.publish(outbound, item, qos=1, timeout_s=5)
            published.append(item)

    async def on_connect(lnk: PahoLink) -> None:
        await lnk.subscribe([inbound], qos=1)

    tasks = [asyncio.create_task(link.run(on_connect, handler)), asyncio.create_task(worker())]
    try:
        await link.wait_connected(10)
        async with publisher(mqtt_settings) as pub:
            for i in range(100):
                await pub.publish(inbound, str(i).encode(), qos=1, timeout=10)
        async with asyncio.timeout(WAIT_S):
            while len(published) < 100:  # noqa: ASYNC110 - a plain list, not an event
                await asyncio.sleep(0.05)
        assert published == [str(i).encode() for i in range(100)]
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
