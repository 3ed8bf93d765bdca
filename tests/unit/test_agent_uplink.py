"""Uplink budget and order: token bucket, delay-based estimate, wire statistics, the outbox's live/backlog tiers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ambulance_agent.outbox import Outbox
from ambulance_agent.uplink import MQTT_OVERHEAD_BYTES, BandwidthEstimator, TokenBucket, WireStats, wire_size
from broker_config import EcgChunk, Stream, TopicSpace, encode, utc_now

SPACE = TopicSpace()


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_bucket_paces_to_its_rate_and_allows_debt() -> None:
    clock = Clock()
    bucket = TokenBucket(1000, 500, monotonic=clock)
    assert bucket.delay_s(400) == 0
    bucket.take(400)
    assert bucket.delay_s(400) == pytest.approx(0.3)  # 100 left, 300 missing at 1000 B/s
    clock.now += 0.3 + 1e-9
    assert bucket.delay_s(400) == 0
    bucket.take(400)
    bucket.take(2000)  # a pre-alert never waits: debt
    assert bucket.tokens == pytest.approx(-2000)
    assert bucket.delay_s(100) == pytest.approx(2.1)
    clock.now += 100
    assert bucket.tokens == 500, "the bucket never holds more than its burst"
    assert bucket.delay_s(5000) == 0, "a message larger than the bucket goes when the bucket is full"


def test_estimator_cuts_on_queueing_delay_and_grows_when_limited() -> None:
    clock = Clock()
    est = BandwidthEstimator(10_000, min_bytes_s=1_000, max_bytes_s=100_000, target_delay_s=0.25, monotonic=clock)
    est.on_ack(500, 0.05, limited=True)  # base RTT 50 ms, no queueing: grow
    assert est.rate_bytes_s == pytest.approx(10_000 + 0.2 * 500)
    clock.now += 10
    est.on_ack(500, 0.05 + 0.8, limited=True)  # 800 ms of queueing: a deep cut (target / delay, at most half)
    assert est.rate_bytes_s == pytest.approx((10_000 + 100) * 0.5)
    assert est.last_delay_s == pytest.approx(0.8)
    before = est.rate_bytes_s
    est.on_ack(500, 0.9, limited=True)  # within the same round trip: no second cut
    assert est.rate_bytes_s == before
    clock.now += 10
    est.on_ack(500, 0.06, limited=False)  # not held back: no growth
    assert est.rate_bytes_s == before
    clock.now += 10
    est.on_ack(500, 0.05 + 0.3, limited=True)  # just above the target: the gentle cut
    assert est.rate_bytes_s == pytest.approx(before * 0.75)
    before = est.rate_bytes_s
    for _ in range(100):
        clock.now += 10
        est.on_timeout()
    assert est.rate_bytes_s == 1_000, "never below the floor"
    assert est.cuts >= 100


def test_a_cut_never_leaves_the_rate_above_what_the_link_delivered() -> None:
    clock = Clock()
    est = BandwidthEstimator(50_000, min_bytes_s=1_000, target_delay_s=0.25, monotonic=clock)
    est.on_ack(1_000, 0.05, limited=False)
    for _ in range(8):  # 8 kB/s delivered while the queue builds (a 64 kbit/s link)
        clock.now += 0.125
        est.on_ack(1_000, 0.05 + 0.4, limited=True)
    delivered = est.delivery_rate_bytes_s()
    assert delivered is not None
    assert delivered == pytest.approx(8_000, rel=0.15)
    assert est.rate_bytes_s <= 0.9 * delivered, "from 50 kB/s straight to just under the link's 8 kB/s"


def test_estimator_forgets_an_old_base_rtt() -> None:
    clock = Clock()
    est = BandwidthEstimator(10_000, base_window_s=60, monotonic=clock)
    est.on_ack(100, 0.01, limited=False)
    clock.now += 61
    est.on_ack(100, 0.2, limited=False)  # the route changed: 200 ms is the new base, not queueing
    assert est.base_rtt_s == pytest.approx(0.2)
    assert est.last_delay_s == 0


def ecg_chunk(seq: int, n_leads: int = 12, n: int = 500) -> EcgChunk:
    rng = np.random.default_rng(seq)
    samples = np.cumsum(rng.integers(-3, 4, size=(n_leads, n)), axis=1).astype(np.int16)
    now = utc_now()
    return EcgChunk(
        unit_id="U1",
        seq=seq,
        sent_at=now,
        start_at=now,
        fs_hz=500.0,
        leads=tuple(f"L{i}" for i in range(n_leads)),
        gain_adc_per_mv=200.0,
        baseline_adc=0,
        samples=samples,
    )


def test_wire_stats_count_ecg_bytes_per_sample_from_the_ghe1_header() -> None:
    stats = WireStats()
    topic = SPACE.topic(Stream.ECG, "U1")
    payloads = [encode(Stream.ECG, ecg_chunk(i)) for i in range(3)]
    for p in payloads:
        stats.add(Stream.ECG, topic, p)
    wire = stats.streams["ecg"]
    assert (wire.messages, wire.samples) == (3, 3 * 12 * 500)
    assert wire.payload_bytes == sum(len(p) for p in payloads)
    assert wire.wire_bytes == sum(len(p) + len(topic) + MQTT_OVERHEAD_BYTES for p in payloads)
    assert stats.ecg_bytes_per_sample() == pytest.approx(wire.payload_bytes / (3 * 12 * 500))
    assert wire_size(topic, payloads[0]) == len(payloads[0]) + len(topic) + MQTT_OVERHEAD_BYTES
    assert WireStats().ecg_bytes_per_sample() is None


def test_outbox_order_crew_first_then_live_newest_first_then_backlog_oldest_first(tmp_path: Path) -> None:
    clock = Clock(1_000.0)
    box = Outbox(tmp_path / "o.db", wall_clock_s=clock)

    def put(stream: Stream) -> int:
        return box.put(stream, SPACE.topic(stream, "U1"), lambda seq: b"x" * 10)

    for _ in range(3):  # backlog from an outage, 100 s ago
        put(Stream.ECG)
        put(Stream.GPS)
        put(Stream.VITALS)
    clock.now += 100
    put(Stream.STATUS)
    for _ in range(2):  # live
        put(Stream.ECG)
        put(Stream.GPS)
        put(Stream.VITALS)
    put(Stream.PREALERT)
    order = [(m.stream.value, m.seq - box.first_seq) for m in box.pending(100, live_since_s=clock.now - 10)]
    assert order == [
        ("prealert", 0),
        ("status", 0),
        ("vitals", 4),
        ("vitals", 3),
        ("ecg", 4),
        ("ecg", 3),
        ("gps", 4),
        ("gps", 3),
        ("vitals", 0),
        ("vitals", 1),
        ("vitals", 2),
        ("ecg", 0),
        ("ecg", 1),
        ("ecg", 2),
        ("gps", 0),
        ("gps", 1),
        ("gps", 2),
    ]
    # in-flight messages are skipped and the limit holds across the tiers
    first = box.pending(3, live_since_s=clock.now - 10)
    nxt = box.pending(3, exclude_ids=[m.id for m in first], live_since_s=clock.now - 10)
    assert [(m.stream.value, m.seq - box.first_seq) for m in nxt] == [("vitals", 3), ("ecg", 4), ("ecg", 3)]
    # without a live window: the plain priority order (older callers)
    plain = [(m.stream.value, m.seq - box.first_seq) for m in box.pending(4)]
    assert plain == [("prealert", 0), ("status", 0), ("vitals", 0), ("vitals", 1)]
    box.close()
