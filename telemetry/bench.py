"""``goldenhour bench ingest``: N ambulances through Mosquitto into PostgreSQL, against a naive baseline.

Each simulated ambulance sends, every second, one 1-s chunk of 12-lead ECG at 500 Hz (GHE1, delta-zlib), one vitals
set (5 values) and one GPS fix, all QoS 1.  Per N the run:

1. creates a fresh database on the server of ``--database-url`` and migrates it;
2. writes ``--history-s`` (default one hour) of data for every unit directly into the database (not over MQTT), so
   the board's queries run against a realistic table;
3. starts the ingest (:class:`telemetry.ingest.Ingest`) in its own process and a lean fleet publisher (paho, payloads
   pre-encoded and only patched with seq and times, one MQTT connection per publisher process) in other processes,
   so the publisher does not share a core with the ingest;
4. publishes for ``--duration-s`` while timing the board's queries (latest vitals of all units; last 10 s of ECG of
   one unit) against the loaded store, then waits for the ingest to drain;
5. reports messages/s, samples/s, publish-to-commit lag p50/p99 (``sent_at`` carries the publish time; the ingest
   notes the commit time of each batch), ingest CPU seconds per 1,000 messages, bytes on disk per ECG sample and per
   vitals row, lost and duplicated messages (stored seqs compared with acknowledged publishes) and the query
   timings; then runs the same load through a naive ingest (one INSERT per vitals value, ECG as float8[] in mV,
   one transaction per message) and reports the ratios.

Targets (a region on a 2-core machine): 1,000 ambulances with lag p99 <= 2 s, no loss, no duplicates; ECG <= 2
bytes/sample, lossless; both board queries p99 <= 20 ms.  Measure on a quiet machine: the publisher, Mosquitto,
PostgreSQL and the ingest compete for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import struct
import sys
import time
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as MpEvent
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import psutil
import psycopg
from psycopg import sql

from broker_config import BrokerSettings, EcgChunk, GpsFix, Stream, TopicSpace, Vitals, decode, encode
from broker_config.codec import EcgEncoding, ecg_to_mv, encode_ecg
from telemetry.postgres_store import PostgresStore, rebuild_latest_docs, utc_conninfo

__all__ = ["BenchResult", "main", "run", "synthetic_ecg"]

logger = logging.getLogger(__name__)

FS_HZ = 500
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
ECG_VARIANTS = 8
"""Distinct 1-s ECG seconds per run (compressed once, reused: the publisher must stay lean)."""
VITALS_PER_SET = 5
STREAMS = (Stream.ECG, Stream.VITALS, Stream.GPS)
_SEQ_MARK = 987654321012
_TIME_MARK = datetime(2001, 2, 3, 4, 5, 6, 789012, tzinfo=UTC)
_MEASURED_MARK = datetime(2002, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
_GHE1_TIMES = struct.Struct("<Qqq")  # seq, sent_at us, start_at us at offset 8 of the GHE1 header
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us(at: datetime) -> int:
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def synthetic_ecg(seconds: int, *, fs_hz: int = FS_HZ, seed: int = 0) -> np.ndarray:
    """Seeded 12-lead ECG-like signal (P, QRS, T as Gaussians at 75/min, baseline wander, 10 uV noise), int16 ADC
    at 200 ADC/mV, shape (12, seconds * fs_hz).  Stands in for a monitor: its compressibility is close to MIT-BIH's."""
    rng = np.random.default_rng(seed)
    n = seconds * fs_hz
    t = np.arange(n) / fs_hz
    phase = (t % 0.8) - 0.3
    beat = np.zeros(n)
    for amp, mu, sd in (
        (0.15, -0.2, 0.025),
        (-0.1, -0.05, 0.01),
        (1.2, 0.0, 0.012),
        (-0.25, 0.04, 0.01),
        (0.3, 0.3, 0.04),
    ):
        beat += amp * np.exp(-0.5 * ((phase - mu) / sd) ** 2)
    leads = []
    for i in range(len(LEADS)):
        wander = 0.05 * np.sin(2 * np.pi * 0.2 * t + i)
        leads.append(np.round(((0.4 + 0.1 * i) * beat + wander + rng.normal(0, 0.01, n)) * 200))
    return np.asarray(leads, dtype=np.int16)


def unit_ids(n: int) -> list[str]:
    """The benchmark's unit ids."""
    return [f"bench{i:05d}" for i in range(n)]


# --- payload templates (pre-encoded; only seq and times are patched per message) ---------------------------------


class _JsonTemplate:
    def __init__(self, payload: bytes) -> None:
        seq, sent, measured = (
            str(_SEQ_MARK).encode(),
            _iso(_TIME_MARK).encode(),
            _iso(_MEASURED_MARK).encode(),
        )
        if payload.count(seq) != 1 or payload.count(sent) != 1:
            raise ValueError("template markers not found exactly once")
        self.payload = payload
        self.marks = (seq, sent, measured)

    def render(self, seq: int, sent_iso: bytes, at_iso: bytes) -> bytes:
        seq_m, sent_m, measured_m = self.marks
        return self.payload.replace(seq_m, str(seq).encode()).replace(sent_m, sent_iso).replace(measured_m, at_iso)


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Payloads:
    """Pre-encoded payloads of one unit; :meth:`render` patches seq and times (a few microseconds per message)."""

    def __init__(self, unit_id: str, ecg_bodies: Sequence[bytes]) -> None:
        self.unit_id = unit_id
        self.ecg = [bytearray(b) for b in ecg_bodies]
        vit = Vitals(
            unit_id=unit_id,
            seq=_SEQ_MARK,
            sent_at=_TIME_MARK,
            measured_at=_MEASURED_MARK,
            heart_rate_bpm=82.0,
            spo2_pct=96.0,
            sbp_mmhg=128.0,
            dbp_mmhg=79.0,
            resp_rate_per_min=18.0,
        )
        fix = GpsFix(unit_id=unit_id, seq=_SEQ_MARK, sent_at=_TIME_MARK, fix=True, lat_deg=43.7384, lon_deg=7.4246)
        self.vitals = _JsonTemplate(encode(Stream.VITALS, vit))
        self.gps = _JsonTemplate(encode(Stream.GPS, fix))

    def render(self, stream: Stream, seq: int, sent_at: datetime, at: datetime) -> bytes:
        """Payload of ``stream`` with ``seq``, ``sent_at`` and the data's time ``at`` (aware datetimes)."""
        clock = _IsoClock()
        at_us = _us(at)
        return self.render_us(stream, seq, _us(sent_at), at_us, clock.iso(at_us), clock)

    def render_us(self, stream: Stream, seq: int, sent_us: int, at_us: int, at_iso: bytes, clock: _IsoClock) -> bytes:
        """:meth:`render` with times as UTC epoch microseconds (``at_iso``: ``at_us`` as ``clock`` formats it), for
        the publisher's loop."""
        if stream is Stream.ECG:
            buf = self.ecg[seq % len(self.ecg)]
            _GHE1_TIMES.pack_into(buf, 8, seq, sent_us, at_us)
            return bytes(buf)
        template = self.vitals if stream is Stream.VITALS else self.gps
        return template.render(seq, clock.iso(sent_us), at_iso)


def ecg_templates(unit_id: str, *, seed: int = 0) -> list[bytes]:
    """GHE1 payloads of ``ECG_VARIANTS`` distinct seconds for ``unit_id`` (seq and times patched later)."""
    adc = synthetic_ecg(ECG_VARIANTS, seed=seed)
    out = []
    for k in range(ECG_VARIANTS):
        chunk = EcgChunk(
            unit_id=unit_id,
            seq=0,
            sent_at=_TIME_MARK,
            start_at=_TIME_MARK,
            fs_hz=float(FS_HZ),
            leads=LEADS,
            gain_adc_per_mv=200.0,
            baseline_adc=0,
            samples=adc[:, k * FS_HZ : (k + 1) * FS_HZ],
        )
        out.append(encode_ecg(chunk, encoding=EcgEncoding.DELTA_ZLIB))
    return out


# --- fleet publisher (own process) -------------------------------------------------------------------------------

PUBLISH_TICKS_PER_S = 20
"""The fleet's second is cut into this many ticks; each tick publishes its share of the units back to back."""
PUBLISH_WINDOW = 1000
"""QoS 1 publishes in flight (unacknowledged) per publisher process before it waits for the oldest PUBACK."""


class _IsoClock:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` of a UTC epoch time in microseconds, the seconds part formatted once."""

    __slots__ = ("_prefix", "_sec")

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = ""

    def iso(self, us: int) -> bytes:
        sec, frac = divmod(us, 1_000_000)
        if sec != self._sec:
            self._sec = sec
            self._prefix = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{frac:06d}Z".encode()


def _publisher_main(
    broker_url: str,
    prefix: str,
    units: list[str],
    first_seq: int,
    t0: float,
    duration_s: int,
    done: Connection,
) -> None:
    """Publish ``duration_s`` seconds of every unit's three streams (QoS 1) and report what was published.

    Lean load generator on paho-mqtt: one connection; publishes do not await their PUBACK, at most
    ``PUBLISH_WINDOW`` are in flight (the oldest is waited for only when the window is full); the fleet's second is
    paced in ``PUBLISH_TICKS_PER_S`` ticks.  Reports ``sent`` per stream (publishes the client accepted: the count
    lost/duplicated are measured against), ``acked`` (PUBACKs received), ``failed`` (publishes refused, e.g. while
    disconnected) and ``cpu_s`` (the process's CPU seconds, imports and payload set-up included)."""
    import paho.mqtt.client as paho

    settings = BrokerSettings.from_url(broker_url)
    space = TopicSpace(prefix)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}")
    # paho's own in-flight limit re-scans every unacknowledged message on each PUBACK: off (0), the window below
    # bounds what is in flight instead
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client.connect(settings.host, settings.port, keepalive=30)
    client.loop_start()
    ok = paho.MQTT_ERR_SUCCESS
    bodies = ecg_templates("x")
    fleet = [(Payloads(u, _retarget(bodies, u)), [space.topic(s, u) for s in STREAMS]) for u in units]
    clock = _IsoClock()
    sent = {s: 0 for s in STREAMS}
    failed = 0
    acked = 0
    window: deque[Any] = deque()

    def settle(info: Any, timeout: float) -> bool:
        if not info.is_published():
            info.wait_for_publish(timeout)
        return info.is_published()

    n = len(fleet)
    ticks = max(1, min(PUBLISH_TICKS_PER_S, n))
    for second in range(duration_s):
        seq = first_seq + second
        at_us = int((t0 + second) * 1_000_000)
        at_iso = clock.iso(at_us)
        for tick in range(ticks):
            delay = t0 + second + tick / ticks - time.time()
            if delay > 0:
                time.sleep(delay)
            for payloads, topics in fleet[tick * n // ticks : (tick + 1) * n // ticks]:
                for stream, topic in zip(STREAMS, topics, strict=True):
                    now_us = time.time_ns() // 1000
                    body = payloads.render_us(stream, seq, now_us, at_us, at_iso, clock)
                    if len(window) >= PUBLISH_WINDOW:
                        acked += settle(window.popleft(), 30.0)
                    info = client.publish(topic, body, qos=1)
                    if info.rc == ok:
                        sent[stream] += 1
                        window.append(info)
                    else:
                        failed += 1
            while window and window[0].is_published():
                window.popleft()
                acked += 1
    deadline = time.monotonic() + 30
    while window:
        acked += settle(window.popleft(), max(0.0, deadline - time.monotonic()))
    client.loop_stop()
    client.disconnect()
    done.send(
        {"sent": {s.value: n for s, n in sent.items()}, "acked": acked, "failed": failed, "cpu_s": time.process_time()}
    )
    done.close()


def _retarget(bodies: Sequence[bytes], unit_id: str) -> list[bytes]:
    """Re-address GHE1 templates made for unit "x" to ``unit_id`` (header byte 7 is the id length)."""
    unit = unit_id.encode("ascii")
    out = []
    for body in bodies:
        head = bytearray(body[:58])
        head[7] = len(unit)
        out.append(bytes(head) + unit + body[58 + 1 :])
    return out


# --- ingest processes --------------------------------------------------------------------------------------------


def _ingest_main(
    database_url: str,
    broker_url: str,
    prefix: str,
    ready: MpEvent,
    stop: MpEvent,
    share_group: str | None,
    receipt_interval_s: float,
    out: Connection,
) -> None:
    """Run the real ingest until ``stop`` (one of several workers with ``share_group``); send stats, lags (s) and
    CPU seconds back."""
    from telemetry.ingest import Ingest
    from telemetry.store import open_store

    lags = array("d")

    def on_stored(batch: Sequence[Any], committed_at: datetime) -> None:
        for item in batch:
            sent_at = getattr(item[1], "sent_at", None)
            if sent_at is not None and item[0].stream in STREAMS:
                lags.append((committed_at - sent_at).total_seconds())

    async def go() -> dict[str, Any]:
        store = open_store(database_url)
        client_id = f"bench-ingest-{uuid.uuid4().hex[:8]}"
        ingest = Ingest(
            store,
            BrokerSettings.from_url(broker_url),
            TopicSpace(prefix),
            client_id=client_id,
            batch_max=2000,
            batch_age_s=0.1,
            on_stored=on_stored,
            max_queued_incoming=50_000,
            share_group=share_group,
            receipt_interval_s=receipt_interval_s,
        )
        task = asyncio.create_task(ingest.run())
        await ingest.link.wait_connected(30)
        ready.set()
        cpu0 = time.process_time()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        cpu = time.process_time() - cpu0
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()
        s = ingest.stats
        return {
            "cpu_s": cpu,
            "inserted": {k.value: v for k, v in s.inserted.items()},
            "duplicates": {k.value: v for k, v in s.duplicates.items()},
            "rejected": dict(s.rejected),
            "received": s.received,
            "gaps": s.gaps_detected,
            "queue_high_water": s.queue_high_water,
        }

    result = asyncio.run(go())
    result["lags"] = lags.tobytes()
    out.send(result)
    out.close()


_NAIVE_DDL = (
    "CREATE TABLE naive_vitals (unit_id text, seq bigint, code text, value float8, measured_at timestamptz,"
    " sent_at timestamptz, PRIMARY KEY (unit_id, seq, code))",
    "CREATE TABLE naive_ecg (unit_id text, seq bigint, lead text, start_at timestamptz, fs_hz float8,"
    " samples_mv float8[], sent_at timestamptz, PRIMARY KEY (unit_id, seq, lead))",
    "CREATE TABLE naive_gps (unit_id text, seq bigint, lat float8, lon float8, sent_at timestamptz,"
    " PRIMARY KEY (unit_id, seq))",
)
_NAIVE_FIELDS = ("heart_rate_bpm", "spo2_pct", "sbp_mmhg", "dbp_mmhg", "resp_rate_per_min")


def _naive_main(
    database_url: str,
    broker_url: str,
    prefix: str,
    ready: MpEvent,
    stop: MpEvent,
    share_group: str | None,
    receipt_interval_s: float,
    out: Connection,
) -> None:
    """The baseline: decode, then one transaction per message with one INSERT per value (ECG as float8[] in mV)."""
    import aiomqtt

    lags = array("d")
    stored = {s.value: 0 for s in STREAMS}

    async def handle(conn: psycopg.AsyncConnection[Any], space: TopicSpace, message: aiomqtt.Message) -> None:
        payload = message.payload
        if not isinstance(payload, bytes):
            return
        parsed, model = decode(space, message.topic.value, payload)
        async with conn.transaction():
            if isinstance(model, Vitals):
                for name in _NAIVE_FIELDS:
                    await conn.execute(
                        "INSERT INTO naive_vitals VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        (model.unit_id, model.seq, name, getattr(model, name), model.measured_at, model.sent_at),
                    )
            elif isinstance(model, EcgChunk):
                mv = ecg_to_mv(model)
                for lead, row in zip(model.leads, mv, strict=True):
                    await conn.execute(
                        "INSERT INTO naive_ecg VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        (model.unit_id, model.seq, lead, model.start_at, model.fs_hz, row.tolist(), model.sent_at),
                    )
            elif isinstance(model, GpsFix):
                await conn.execute(
                    "INSERT INTO naive_gps VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (model.unit_id, model.seq, model.lat_deg, model.lon_deg, model.sent_at),
                )
        lags.append((datetime.now(UTC) - model.sent_at).total_seconds())  # type: ignore[attr-defined]
        stored[parsed.stream.value] += 1

    async def go() -> dict[str, Any]:
        settings = BrokerSettings.from_url(broker_url)
        space = TopicSpace(prefix)
        async with (
            await psycopg.AsyncConnection.connect(utc_conninfo(database_url), autocommit=True) as conn,
            aiomqtt.Client(settings.host, settings.port, identifier=f"bench-naive-{uuid.uuid4().hex[:8]}") as client,
        ):
            await client.subscribe([(space.filter(s), 1) for s in STREAMS])
            ready.set()
            cpu0 = time.process_time()

            async def consume() -> None:
                async for message in client.messages:
                    await handle(conn, space, message)

            task = asyncio.create_task(consume())
            await asyncio.get_running_loop().run_in_executor(None, stop.wait)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return {"cpu_s": time.process_time() - cpu0, "inserted": dict(stored)}

    result = asyncio.run(go())
    result["lags"] = lags.tobytes()
    out.send(result)
    out.close()


# --- history (straight into the database) ------------------------------------------------------------------------


async def load_history(database_url: str, units: Sequence[str], start: datetime, seconds: int) -> None:
    """Write ``seconds`` of vitals, GPS and ECG per unit ending at ``start`` (seqs 0..seconds-1), with COPY."""
    store = PostgresStore(database_url)
    await store.retention()
    first = start - timedelta(seconds=seconds)
    async with await psycopg.AsyncConnection.connect(utc_conninfo(database_url), autocommit=True) as conn:
        for table in ("ecg_chunk", "vitals", "gps_fix"):
            day = first
            while day <= start + timedelta(days=1):
                await conn.execute("SELECT telemetry_ensure_partition(%s, %s)", (table, day))
                day += timedelta(hours=12)
        await conn.execute(
            "INSERT INTO vitals (unit_id, seq, loinc, mdc_code, ucum, value, measured_at, source, sent_at, received_at,"
            " historical) SELECT u, s, c.loinc, c.mdc, c.ucum, c.v, %(t0)s + make_interval(secs => s), NULL,"
            " %(t0)s + make_interval(secs => s), %(t0)s + make_interval(secs => s), false"
            " FROM unnest(%(units)s::text[]) u, generate_series(0, %(n)s - 1) s, (VALUES"
            " ('8867-4', 147842, '/min', 82.0), ('59408-5', 150456, '%%', 96.0), ('8480-6', 150021, 'mm[Hg]', 128.0),"
            " ('8462-4', 150022, 'mm[Hg]', 79.0), ('9279-1', 151562, '/min', 18.0)) c(loinc, mdc, ucum, v)",
            {"t0": first, "units": list(units), "n": seconds},
        )
        await conn.execute(
            "INSERT INTO gps_fix (unit_id, seq, fix, lat_deg, lon_deg, clock_suspect, sent_at, received_at, historical)"
            " SELECT u, s, true, 43.7, 7.4, false, %(t0)s + make_interval(secs => s),"
            " %(t0)s + make_interval(secs => s), false"
            " FROM unnest(%(units)s::text[]) u, generate_series(0, %(n)s - 1) s",
            {"t0": first, "units": list(units), "n": seconds},
        )
        # ECG: ECG_VARIANTS distinct GHE1 seconds, copied once, then replicated by the server (one hour of 12-lead
        # ECG for 1,000 units is 3.6 M chunks, ~21 GB: Python must not touch each row)
        await conn.execute("CREATE TEMP TABLE bench_ecg_template (k integer PRIMARY KEY, ghe1 bytea NOT NULL)")
        async with conn.cursor() as cur, cur.copy("COPY bench_ecg_template (k, ghe1) FROM STDIN") as copy:
            for k, body in enumerate(ecg_templates("x", seed=1)):
                await copy.write_row((k, body))
        await conn.execute(
            "INSERT INTO ecg_chunk (unit_id, seq, start_at, end_at, fs_hz, leads, gain_adc_per_mv, baseline_adc,"
            " n_samples, ghe1, lead_off, sent_at, received_at, historical)"
            " SELECT u, s, %(t0)s + make_interval(secs => s), %(t0)s + make_interval(secs => s + 1), %(fs)s,"
            " %(leads)s, 200.0, 0, %(fs)s, t.ghe1, '{}', %(t0)s + make_interval(secs => s),"
            " %(t0)s + make_interval(secs => s), false"
            " FROM unnest(%(units)s::text[]) u, generate_series(0, %(n)s - 1) s"
            " JOIN bench_ecg_template t ON t.k = s %% %(variants)s",
            {
                "t0": first,
                "units": list(units),
                "n": seconds,
                "fs": FS_HZ,
                "leads": list(LEADS),
                "variants": ECG_VARIANTS,
            },
        )
        await conn.execute(
            "INSERT INTO vitals_latest SELECT DISTINCT ON (unit_id, loinc) unit_id, loinc, seq, mdc_code, ucum, value,"
            " measured_at, historical FROM vitals ORDER BY unit_id, loinc, measured_at DESC, seq DESC"
            " ON CONFLICT DO NOTHING"
        )
        await conn.execute(rebuild_latest_docs())
        for stream, table in ((Stream.ECG, "ecg_chunk"), (Stream.VITALS, "vitals"), (Stream.GPS, "gps_fix")):
            await conn.execute(
                sql.SQL(
                    "INSERT INTO stream_head SELECT unit_id, {}, max(seq) FROM {} GROUP BY unit_id"
                    " ON CONFLICT (unit_id, stream) DO UPDATE SET max_seq = excluded.max_seq"
                ).format(sql.Literal(stream.value), sql.Identifier(table))
            )
        await conn.execute("ANALYZE")
    await store.close()


# --- one run -----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class PhaseResult:
    """Figures of one ingest (optimised or naive) under one load."""

    messages_per_s: float = 0.0
    samples_per_s: float = 0.0
    lag_p50_s: float = float("nan")
    lag_p99_s: float = float("nan")
    cpu_s_per_1000_msgs: float = float("nan")
    bytes_per_ecg_sample: float = float("nan")
    bytes_per_vitals_row: float = float("nan")
    published: int = 0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    redeliveries_absorbed: int = 0
    cpu_s_per_1000_msgs_by_process: dict[str, float] = field(default_factory=dict)
    """CPU seconds per 1,000 stored messages of the broker, the publisher(s), the ingest worker(s) and PostgreSQL."""


@dataclass(slots=True)
class BenchResult:
    """Everything measured for one fleet size."""

    units: int
    duration_s: int
    history_s: int
    ingest: PhaseResult
    naive: PhaseResult | None
    latest_vitals_ms: tuple[float, float] = (float("nan"), float("nan"))
    ecg_10s_ms: tuple[float, float] = (float("nan"), float("nan"))
    ratios: dict[str, float] = field(default_factory=dict)
    workers: int = 1
    loadavg: str = ""
    """``/proc/loadavg`` at the end of the run (other load on the machine skews every figure)."""
    idle_latest_vitals_ms: tuple[float, float] = (float("nan"), float("nan"))
    idle_ecg_10s_ms: tuple[float, float] = (float("nan"), float("nan"))
    """The board's queries timed again after the run, on the same data with the ingest stopped (p50, p99)."""
    server: dict[str, str] = field(default_factory=dict)
    """The PostgreSQL settings that shape a write-heavy run (:data:`SERVER_SETTINGS`), as the server reported them."""


IDLE_QUERIES = 300
"""Default rounds of the board's queries timed after the run (ingest stopped), 0.1 s apart, ECG of a different unit
each (``--idle-queries``)."""

SERVER_SETTINGS = (
    "server_version",
    "shared_buffers",
    "max_wal_size",
    "checkpoint_timeout",
    "wal_compression",
    "synchronous_commit",
)
"""Reported with every run: the store's WAL volume and checkpoints are what the tail latency follows (see
``telemetry/postgresql.conf`` for the settings recommended for a telemetry store)."""


async def server_settings(url: str) -> dict[str, str]:
    """The values of :data:`SERVER_SETTINGS` on the server at ``url``."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)", (list(SERVER_SETTINGS),)
        )
        found = dict(await cur.fetchall())
    return {name: found.get(name, "?") for name in SERVER_SETTINGS}


def _pct(values: Sequence[float] | np.ndarray, q: float) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else float("nan")


async def _sizes(url: str, parent: str) -> int:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(relid)), 0) FROM pg_partition_tree(%s::regclass)", (parent,)
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _count(url: str, table: str, first_seq: int) -> tuple[int, int, int]:
    """(rows, distinct message keys, distinct keys with seq >= first_seq)."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            sql.SQL(
                "SELECT count(*), count(DISTINCT (unit_id, seq)), count(DISTINCT (unit_id, seq)) FILTER"
                " (WHERE seq >= %s) FROM {}"
            ).format(sql.Identifier(table)),
            (first_seq,),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def _spawn(ctx: Any, target: Callable[..., None], *args: object) -> tuple[Any, Connection]:
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, send), daemon=True)
    proc.start()
    send.close()
    return proc, recv


async def _phase(
    ctx: Any,
    target: Callable[..., None],
    database_url: str,
    mqtt_url: str,
    units: list[str],
    first_seq: int,
    duration_s: int,
    publishers: int,
    during: Callable[[], Any] | None = None,
    workers: int = 1,
    broker_pid: int | None = None,
    receipt_interval_s: float = 1.0,
) -> tuple[dict[str, Any], dict[str, int], float]:
    """Run the ingest (``workers`` processes on one shared subscription when more than one) and the publishers;
    returns (ingest report merged over the workers, sent per stream, wall time).  The report's ``cpu`` gives CPU
    seconds per role (broker, publisher, ingest, PostgreSQL) over the phase."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}/"
    stop = ctx.Event()
    share = "bench" if workers > 1 else None
    readies = [ctx.Event() for _ in range(workers)]
    ingests = [_spawn(ctx, target, database_url, mqtt_url, prefix, r, stop, share, receipt_interval_s) for r in readies]
    loop = asyncio.get_running_loop()
    for ready in readies:
        if not await loop.run_in_executor(None, ready.wait, 60):
            raise RuntimeError("ingest process did not start")
    cpu0 = _role_cpu(broker_pid)
    t0 = time.time() + 2.0  # publishers start on a common clock, after their imports
    per = -(-len(units) // publishers)
    pubs = [
        _spawn(ctx, _publisher_main, mqtt_url, prefix, units[i : i + per], first_seq, t0, duration_s)
        for i in range(0, len(units), per)
    ]
    started = time.monotonic()
    extra = asyncio.create_task(during()) if during else None
    sent = {s.value: 0 for s in STREAMS}
    publisher_cpu = 0.0
    for proc, out in pubs:
        report = await loop.run_in_executor(None, out.recv)
        for k, v in report["sent"].items():
            sent[k] += v
        publisher_cpu += report.get("cpu_s", 0.0)
        await loop.run_in_executor(None, proc.join, 30)
    if extra is not None:
        extra.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await extra
    expected = sum(sent.values())
    deadline = time.monotonic() + max(10.0, duration_s)
    while time.monotonic() < deadline:  # drain: poll the store until everything published is there
        counts = [await _count(database_url, t, first_seq) for t in _tables(target)]
        if sum(c[2] for c in counts) >= expected:
            break
        await asyncio.sleep(0.5)
    wall = time.monotonic() - started
    cpu1 = _role_cpu(broker_pid)
    stop.set()
    reports = []
    for proc, out in ingests:
        reports.append(await loop.run_in_executor(None, out.recv))
        await loop.run_in_executor(None, proc.join, 30)
    result = _merge_reports(reports)
    result["cpu"] = {
        "broker": cpu1["broker"] - cpu0["broker"],
        "publisher": publisher_cpu,
        "ingest": result["cpu_s"],
        "postgresql": cpu1["postgresql"] - cpu0["postgresql"],
    }
    return result, sent, wall


def _role_cpu(broker_pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the broker and by all PostgreSQL server processes.

    With ``broker_pid`` (the bench's own Mosquitto) the broker is that process; otherwise every process named
    ``mosquitto``.  On a shared machine other users of the same servers are counted too: measure on a quiet one."""
    totals = {"broker": 0.0, "postgresql": 0.0}
    for proc in psutil.process_iter(["name"]):
        try:
            name = proc.info["name"] or ""
            if (broker_pid is not None and proc.pid == broker_pid) or (broker_pid is None and name == "mosquitto"):
                role = "broker"
            elif name.startswith("postgres"):
                role = "postgresql"
            else:
                continue
            times = proc.cpu_times()
            totals[role] += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return totals


def _merge_reports(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One report for several ingest workers: counters and CPU summed, lags concatenated."""
    merged: dict[str, Any] = {"cpu_s": 0.0, "lags": b"", "inserted": {}, "duplicates": {}, "rejected": {}}
    for report in reports:
        merged["cpu_s"] += report["cpu_s"]
        merged["lags"] += report.get("lags", b"")
        for key in ("inserted", "duplicates", "rejected"):
            for k, v in report.get(key, {}).items():
                merged[key][k] = merged[key].get(k, 0) + v
        for key in ("received", "gaps", "queue_high_water"):
            if key in report:
                merged[key] = merged.get(key, 0) + report[key]
    return merged


def _tables(target: Callable[..., None]) -> tuple[str, ...]:
    return ("naive_ecg", "naive_vitals", "naive_gps") if target is _naive_main else ("ecg_chunk", "vitals", "gps_fix")


async def run(
    units_n: int,
    *,
    duration_s: int,
    mqtt_url: str,
    database_url: str,
    history_s: int = 3600,
    publishers: int = 1,
    baseline: bool = True,
    keep_database: bool = False,
    workers: int = 1,
    broker_pid: int | None = None,
    receipt_interval_s: float = 1.0,
    idle_queries: int = IDLE_QUERIES,
) -> BenchResult:
    """Benchmark one fleet size in a fresh database created on ``database_url``'s server, with ``workers`` ingest
    processes (a shared subscription when more than one)."""
    ctx = mp.get_context("spawn")
    name = f"gh_bench_{uuid.uuid4().hex[:10]}"
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = urlsplit(database_url)._replace(path=f"/{name}").geturl()
    try:
        store = PostgresStore(url)
        await store.migrate()
        units = unit_ids(units_n)
        now = datetime.now(UTC)
        await load_history(url, units, now, history_s)
        latest_ms: list[float] = []
        ecg_ms: list[float] = []

        async def board_queries(latest: list[float] = latest_ms, ecg: list[float] = ecg_ms, n: int = -1) -> None:
            while n:
                n -= 1
                t = time.perf_counter()
                await store.latest_vitals()
                latest.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                await store.ecg_window(units[n % len(units)], 10.0)
                ecg.append((time.perf_counter() - t) * 1000)
                await asyncio.sleep(0.1)

        report, sent, _ = await _phase(
            ctx,
            _ingest_main,
            url,
            mqtt_url,
            units,
            history_s,
            duration_s,
            publishers,
            board_queries,
            workers=workers,
            broker_pid=broker_pid,
            receipt_interval_s=receipt_interval_s,
        )
        main_phase = await _figures(url, report, sent, duration_s, history_s, ("ecg_chunk", "vitals", "gps_fix"))
        idle_latest: list[float] = []
        idle_ecg: list[float] = []
        await board_queries(idle_latest, idle_ecg, idle_queries)  # the same store, the ingest stopped
        await store.close()
        result = BenchResult(
            units_n,
            duration_s,
            history_s,
            main_phase,
            None,
            (_pct(latest_ms, 50), _pct(latest_ms, 99)),
            (_pct(ecg_ms, 50), _pct(ecg_ms, 99)),
            workers=workers,
            server=await server_settings(url),
            idle_latest_vitals_ms=(_pct(idle_latest, 50), _pct(idle_latest, 99)),
            idle_ecg_10s_ms=(_pct(idle_ecg, 50), _pct(idle_ecg, 99)),
        )
        if baseline:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                for ddl in _NAIVE_DDL:
                    await conn.execute(ddl.encode())
            report, sent, _ = await _phase(
                ctx, _naive_main, url, mqtt_url, units, 0, duration_s, publishers, broker_pid=broker_pid
            )
            naive = await _figures(url, report, sent, duration_s, 0, ("naive_ecg", "naive_vitals", "naive_gps"))
            result.naive = naive
            for key in ("messages_per_s", "cpu_s_per_1000_msgs", "bytes_per_ecg_sample", "bytes_per_vitals_row"):
                base = getattr(naive, key)
                result.ratios[key] = getattr(main_phase, key) / base if base else float("nan")
            result.ratios["lag_p99_s"] = main_phase.lag_p99_s / naive.lag_p99_s if naive.lag_p99_s else float("nan")
        return result
    finally:
        if not keep_database:
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
                await admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def _figures(
    url: str, report: dict[str, Any], sent: dict[str, int], duration_s: int, first_seq: int, tables: tuple[str, ...]
) -> PhaseResult:
    ecg_t, vitals_t = tables[0], tables[1]
    out = PhaseResult()
    lags = np.frombuffer(report["lags"], dtype=np.float64)
    out.lag_p50_s, out.lag_p99_s = _pct(lags, 50), _pct(lags, 99)
    per_stream = {}
    for stream, table in zip(STREAMS, tables, strict=True):
        rows, keys, live = await _count(url, table, first_seq)
        per_stream[stream] = (rows, keys, live)
    out.published = sum(sent.values())
    out.stored = sum(v[2] for v in per_stream.values())
    out.lost = out.published - out.stored
    rows_per_msg = {Stream.ECG: len(LEADS) if ecg_t == "naive_ecg" else 1, Stream.VITALS: VITALS_PER_SET, Stream.GPS: 1}
    out.duplicated = sum(max(0, rows - keys * rows_per_msg[s]) for s, (rows, keys, _) in per_stream.items())
    out.redeliveries_absorbed = sum(report.get("duplicates", {}).values())
    out.messages_per_s = out.stored / duration_s
    out.samples_per_s = per_stream[Stream.ECG][2] * len(LEADS) * FS_HZ / duration_s
    if out.stored:
        out.cpu_s_per_1000_msgs = report["cpu_s"] / (out.stored / 1000)
        out.cpu_s_per_1000_msgs_by_process = {
            role: seconds / (out.stored / 1000) for role, seconds in report.get("cpu", {}).items()
        }
    ecg_keys, vit_rows = per_stream[Stream.ECG][1], per_stream[Stream.VITALS][0]
    if ecg_keys:
        out.bytes_per_ecg_sample = await _relation_size(url, ecg_t) / (ecg_keys * len(LEADS) * FS_HZ)
    if vit_rows:
        out.bytes_per_vitals_row = await _relation_size(url, vitals_t) / vit_rows
    return out


async def _relation_size(url: str, table: str) -> int:
    if table.startswith("naive_"):
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute("SELECT pg_total_relation_size(%s::regclass)", (table,))
            row = await cur.fetchone()
        return int(row[0]) if row else 0
    return await _sizes(url, table)


def _report_lines(r: BenchResult) -> list[str]:
    i = r.ingest
    per_process = ", ".join(f"{k} {v:.3f}" for k, v in i.cpu_s_per_1000_msgs_by_process.items())
    lines = [
        f"units={r.units} workers={r.workers} duration_s={r.duration_s} history_s={r.history_s} loadavg {r.loadavg}",
        "  server: " + ", ".join(f"{k} {v}" for k, v in r.server.items()),
        f"  ingest: {i.messages_per_s:.0f} msg/s, {i.samples_per_s:.0f} ECG samples/s, lag p50 {i.lag_p50_s:.3f} s"
        f" p99 {i.lag_p99_s:.3f} s, {i.cpu_s_per_1000_msgs:.3f} CPU s/1000 msgs",
        f"          {i.bytes_per_ecg_sample:.3f} B/ECG sample, {i.bytes_per_vitals_row:.1f} B/vitals row,"
        f" published {i.published} stored {i.stored} lost {i.lost} duplicated {i.duplicated}"
        f" (redeliveries absorbed {i.redeliveries_absorbed})",
        f"          CPU s/1000 msgs by process: {per_process}",
        f"  board queries: latest vitals p50 {r.latest_vitals_ms[0]:.1f} ms p99 {r.latest_vitals_ms[1]:.1f} ms;"
        f" ECG last 10 s p50 {r.ecg_10s_ms[0]:.1f} ms p99 {r.ecg_10s_ms[1]:.1f} ms",
        f"  after the run, ingest stopped: latest vitals p50 {r.idle_latest_vitals_ms[0]:.1f} ms"
        f" p99 {r.idle_latest_vitals_ms[1]:.1f} ms; ECG last 10 s p50 {r.idle_ecg_10s_ms[0]:.1f} ms"
        f" p99 {r.idle_ecg_10s_ms[1]:.1f} ms",
    ]
    if r.naive is not None:
        n = r.naive
        lines.append(
            f"  naive:  {n.messages_per_s:.0f} msg/s, lag p50 {n.lag_p50_s:.3f} s p99 {n.lag_p99_s:.3f} s,"
            f" {n.cpu_s_per_1000_msgs:.3f} CPU s/1000 msgs, {n.bytes_per_ecg_sample:.3f} B/ECG sample,"
            f" {n.bytes_per_vitals_row:.1f} B/vitals row, stored {n.stored}/{n.published}"
        )
        lines.append("  ratio ingest/naive: " + ", ".join(f"{k} {v:.3f}" for k, v in r.ratios.items()))
    return lines


_BROKER_CONF = """listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 1000000
max_queued_bytes 0
max_inflight_messages 20
queue_qos0_messages false
log_dest none
"""
"""The bench's own broker: the queue budget and the in-flight window of
``broker_config/mosquitto/production.conf.template`` (FF-19), so that a lagging ingest shows as lag rather than as
Mosquitto's default 1,000-message queue silently dropping, and the ingest's acknowledgements meet the production
window (20 unacknowledged messages per client)."""


@contextlib.contextmanager
def private_broker(mosquitto: str = "mosquitto") -> Any:
    """Start a Mosquitto on a free loopback port for one run; yields ``(url, pid)``.  Raises RuntimeError when the
    binary is missing or the broker does not come up within 10 s."""
    import shutil
    import socket
    import subprocess
    import tempfile

    binary = shutil.which(mosquitto) or shutil.which(mosquitto, path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        raise RuntimeError("mosquitto not found: install it or pass --mqtt-url of a running broker")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="gh-bench-broker-") as tmp:
        conf = f"{tmp}/bench.conf"
        with open(conf, "w", encoding="utf-8") as fh:
            fh.write(_BROKER_CONF.format(port=port))
        proc = subprocess.Popen([binary, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the bench's mosquitto did not start")
                time.sleep(0.05)
            yield f"mqtt://127.0.0.1:{port}", proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _units_arg(values: list[str]) -> list[int]:
    out: list[int] = []
    for value in values:
        out.extend(int(v) for v in value.split(",") if v.strip())
    if not out or any(n < 1 for n in out):
        raise argparse.ArgumentTypeError("--units needs positive integers")
    return out


def main(argv: list[str] | None = None) -> int:
    """``goldenhour bench ingest`` entry: parse options, run each fleet size, write the report; 0 on success."""
    parser = argparse.ArgumentParser(
        prog="goldenhour bench ingest",
        description=__doc__.split("\n")[0],
        epilog="The acceptance run for a region (5 minutes, one hour of history, on a quiet machine): goldenhour bench"
        " ingest --units 1000 --duration-s 300 --private-broker.  Iterate with --duration-s 60 --history-s 600"
        " --no-baseline.",
    )
    parser.add_argument("--units", action="append", default=None, help="fleet size(s): repeat or 10,100,1000")
    parser.add_argument("--duration-s", type=int, default=30)
    parser.add_argument("--history-s", type=int, default=3600, help="data loaded before the run (default 1 h)")
    parser.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883")
    parser.add_argument(
        "--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="a fresh database is made"
    )
    parser.add_argument("--publishers", type=int, default=1, help="publisher processes")
    parser.add_argument(
        "--workers", type=int, default=1, help="ingest processes; more than one share an MQTT $share subscription"
    )
    parser.add_argument(
        "--receipt-interval-s",
        type=float,
        default=1.0,
        help="one worker's delivery receipts: at most one per unit per this many seconds (at the production default,"
        " 1 s, they took a sixth of the ingest's CPU: 0.79 against 0.65 CPU s per 1,000 messages at 5 s, N=200);"
        " off with --workers > 1",
    )
    parser.add_argument(
        "--private-broker",
        action="store_true",
        help="run the load through a Mosquitto started for the run with the production queue budget (FF-19)"
        " instead of --mqtt-url; a stock broker's 1,000-message queue drops QoS 1 messages once the ingest lags",
    )
    parser.add_argument(
        "--idle-queries", type=int, default=IDLE_QUERIES, help="rounds of the board's queries timed after the run"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    sizes = _units_arg(args.units or ["10"])
    results: list[BenchResult] = []
    for n in sizes:
        with contextlib.ExitStack() as stack:
            mqtt_url, broker_pid = args.mqtt_url, None
            if args.private_broker:
                mqtt_url, broker_pid = stack.enter_context(private_broker())
            result = asyncio.run(
                run(
                    n,
                    duration_s=args.duration_s,
                    mqtt_url=mqtt_url,
                    database_url=args.database_url,
                    history_s=args.history_s,
                    publishers=max(1, args.publishers),
                    baseline=not args.no_baseline,
                    keep_database=args.keep_database,
                    workers=max(1, args.workers),
                    broker_pid=broker_pid,
                    receipt_interval_s=args.receipt_interval_s,
                    idle_queries=max(1, args.idle_queries),
                )
            )
        with contextlib.suppress(OSError), open("/proc/loadavg", encoding="ascii") as fh:
            result.loadavg = " ".join(fh.read().split()[:3])
        results.append(result)
        sys.stdout.write("\n".join(_report_lines(result)) + "\n")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump([asdict(r) for r in results], fh, indent=2, default=str)
    return 0 if all(r.ingest.lost == 0 and r.ingest.duplicated == 0 for r in results) else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    raise SystemExit(main(sys.argv[1:]))
