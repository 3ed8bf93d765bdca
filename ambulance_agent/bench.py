"""``python -m ambulance_agent.bench``: the vehicle agent's figures, each as a ratio to a baseline measured in the
same run.

1. ECG bytes per sample on the wire: GHE1 delta-zlib chunks (1 s) of every MIT-BIH record found (the committed
   ones in simulators/data, plus the shared set when present) and of the 12-lead PTB record at 500 Hz, against the
   raw int16 encoding of the same chunks (baseline).  Target <= 1.0 B/sample.
2. Agent CPU (% of one core) and RSS while streaming 12-lead 500 Hz ECG (the PTB record s0010_re, i..v6, resampled
   1000 -> 500 Hz; when the shared data is absent, a synthetic 12-lead built from MIT-BIH 100's two leads and their
   Einthoven/Goldberger combinations, marked as such), monitor vitals, NMEA GPS (a TCP feed replaying a real receiver
   log) and 2 fps video through the real capture path (PyAV decoding a 640x480 10 fps H.264 file in real time, sampled
   at 2 fps, JPEG-encoded) to the broker: ``python -m ambulance_agent`` in a subprocess, configured as in a vehicle,
   measured with psutil, once with the camera and once without (the camera's own cost).  The benchmark process plays
   the devices: it reads the ECG record with wfdb and streams it in real time over a local TCP socket as a monitor's
   raw waveform output (interleaved int16 frames, ambulance_agent.sources.ecg_stream), and sends the MIMIC-II numerics
   as HL7 v2 ORU^R01 (IHE PCD-01, MDC codes) over MLLP to the agent's monitor listener every 2 s; so the agent never
   loads wfdb, pandas or scipy.  The baseline is a bare publisher in a subprocess (same interpreter) reading the same
   ECG stream with the same adapter and publishing the chunks with aiomqtt at QoS 1 (no outbox, no heart rate, no
   vitals/GPS, no crew screen).  Targets: CPU <= 10 % of a core, RSS <= 150 MB.
3. On a 64 kbit/s link (ambulance_agent.faultproxy, 50 ms each way) while streaming the same 12-lead ECG, vitals
   and GPS, after an outage (the backlog drains while live data keeps coming): pre-alert arrival time at a
   subscriber and vitals freshness (age of the newest live vitals the subscriber has, sampled every 0.5 s), with
   the measured budget; baselines: the same on an unthrottled link, and on the
   64 kbit/s link without any budget (the sender writes as fast as the socket takes it).  Target pre-alert <= 2 s.

Figures go to stdout (this is a command-line report, like a test runner's summary).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import aiomqtt
import numpy as np
import psutil

from ambulance_agent.app import Agent
from ambulance_agent.devices.mllp import MllpError, send_mllp
from ambulance_agent.faultproxy import FaultProxy
from ambulance_agent.sources.ecg import WfdbEcgReplay
from ambulance_agent.sources.ecg_stream import RawEcgStreamSource
from ambulance_agent.sources.nmea import NmeaGpsSource
from ambulance_agent.sources.vitals import NumericsVitalsReplay
from broker_config import (
    VITAL_CODES,
    BrokerSettings,
    CaseType,
    EcgChunk,
    Findings,
    PreAlert,
    Stream,
    TopicSpace,
    Vitals,
    decode,
    encode,
    utc_now,
)
from broker_config.codec import EcgEncoding, encode_ecg
from broker_config.embedded import EmbeddedBroker

ROOT = Path(__file__).resolve().parent.parent
LOCAL_MITDB = ROOT / "simulators" / "data" / "mitdb"
SHARED = ROOT.parent / "shared" / "data"
SHARED_MITDB = SHARED / "ecg" / "mitdb"
PTB = SHARED / "ecg" / "ptbdb" / "s0010_re"
NUMERICS = ROOT / "simulators" / "data" / "mimic2wdb_numerics" / "s25047-2704-05-04-10-44n"
NMEA_LOG = ROOT / "tests" / "data" / "nmea" / "bu353s4.log"
TWELVE = ("i", "ii", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5", "v6")


def out(line: str = "") -> None:
    """One report line on stdout."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --- 1. ECG bytes per sample ----------------------------------------------------------------------------------


def _chunks(samples: np.ndarray, fs_hz: float, leads: tuple[str, ...], gain: float, base: int) -> Iterator[EcgChunk]:
    n = round(fs_hz)
    now = utc_now()
    for k in range(samples.shape[1] // n):
        yield EcgChunk(
            unit_id="BENCH",
            seq=k,
            sent_at=now,
            start_at=now + timedelta(seconds=k),
            fs_hz=fs_hz,
            leads=leads,
            gain_adc_per_mv=gain,
            baseline_adc=base,
            samples=samples[:, k * n : (k + 1) * n],
        )


def ecg_bytes_per_sample(max_s: float) -> None:
    out("1. ECG bytes per sample on the wire (1 s GHE1 chunks, headers included)")
    records = sorted({p.stem for p in LOCAL_MITDB.glob("*.hea")} | {p.stem for p in SHARED_MITDB.glob("*.hea")})
    total = {"ghe1": 0, "raw": 0, "samples": 0}
    for name in records:
        path = SHARED_MITDB / name if (SHARED_MITDB / f"{name}.hea").exists() else LOCAL_MITDB / name
        replay = WfdbEcgReplay(path)
        samples = replay.record_samples()[:, : int(max_s * replay.fs_hz)]
        for chunk in _chunks(samples, replay.fs_hz, replay.leads, replay.gain_adc_per_mv, replay.baseline_adc):
            total["ghe1"] += len(encode_ecg(chunk))
            total["raw"] += len(encode_ecg(chunk, encoding=EcgEncoding.RAW_INT16))
            total["samples"] += chunk.samples.size
    ghe1 = total["ghe1"] / total["samples"]
    raw = total["raw"] / total["samples"]
    out(f"   MIT-BIH, {len(records)} records x {max_s:.0f} s (2 leads, 360 Hz, 11 bit):")
    out(f"     GHE1 delta-zlib {ghe1:.3f} B/sample; raw int16 baseline {raw:.3f} B/sample; ratio {ghe1 / raw:.3f}")
    out(f"     target <= 1.0 B/sample: {'met' if ghe1 <= 1.0 else 'NOT met'}")
    replay12, label = twelve_lead()
    samples = replay12.record_samples()
    chunks = _chunks(samples, replay12.fs_hz, replay12.leads, replay12.gain_adc_per_mv, replay12.baseline_adc)
    sizes = [
        (len(encode_ecg(c)), len(encode_ecg(c, encoding=EcgEncoding.RAW_INT16)), c.samples.size,
         len(encode_ecg(c, limb_residuals=True)))
        for c in chunks
    ]  # fmt: skip
    g = sum(s[0] for s in sizes) / sum(s[2] for s in sizes)
    r = sum(s[1] for s in sizes) / sum(s[2] for s in sizes)
    lr = sum(s[3] for s in sizes) / sum(s[2] for s in sizes)
    out(f"   12-lead 500 Hz ({label}): GHE1 {g:.3f} B/sample; raw {r:.3f}; ratio {g / r:.3f};"
        f" {g * 6000 * 8 / 1000:.1f} kbit/s of ECG")  # fmt: skip
    out(f"     with limb-lead residuals (III, aVR, aVL, aVF from I and II; what the agent sends): {lr:.3f} B/sample,"
        f" ratio to plain GHE1 {lr / g:.3f}; {lr * 6000 * 8 / 1000:.1f} kbit/s of ECG")  # fmt: skip


def twelve_lead() -> tuple[WfdbEcgReplay, str]:
    """The 12-lead 500 Hz source: PTB s0010_re resampled, or a synthetic one (written to a temp record)."""
    if PTB.with_suffix(".hea").exists():
        return WfdbEcgReplay(PTB, channels=TWELVE, resample_hz=500), "PTB s0010_re, 1000 -> 500 Hz"
    return WfdbEcgReplay(_synthetic_12_lead(), resample_hz=500), "SYNTHETIC from MIT-BIH 100 (no shared data)"


def _synthetic_12_lead() -> Path:
    import wfdb

    rec = wfdb.rdrecord(str(LOCAL_MITDB / "100"), physical=False, sampto=360 * 60)
    a, b = rec.d_signal[:, 0].astype(np.int32) - 1024, rec.d_signal[:, 1].astype(np.int32) - 1024
    # I ~ V5-like, II = MLII; III = II - I; aVR = -(I+II)/2; aVL = I - II/2; aVF = II - I/2; V1..V6 mixtures
    leads = [b, a, a - b, -(a + b) // 2, b - a // 2, a - b // 2, -b, (a - b) // 2, a // 2, a, (a + b) // 2, b]
    signal = np.stack(leads, axis=1).astype(np.int16)
    folder = Path(tempfile.mkdtemp(prefix="gh-bench-"))
    wfdb.wrsamp("syn12", fs=360, units=["mV"] * 12, sig_name=list(TWELVE), d_signal=signal, fmt=["16"] * 12,
                adc_gain=[200.0] * 12, baseline=[0] * 12, write_dir=str(folder))  # fmt: skip
    return folder / "syn12"


# --- helpers: broker, NMEA feed ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def broker_for(url: str | None) -> AsyncIterator[BrokerSettings]:
    if url:
        settings = BrokerSettings.from_url(url, reconnect_min_s=0.1, reconnect_max_s=1.0)
        with contextlib.suppress(OSError), socket.create_connection((settings.host, settings.port), timeout=1):
            yield settings
            return
        out(f"   (no broker at {settings.url}: using the embedded broker)")
    async with EmbeddedBroker() as embedded:
        yield BrokerSettings(host=embedded.host, port=embedded.port, reconnect_min_s=0.1, reconnect_max_s=1.0)


@contextlib.asynccontextmanager
async def _loopback_feed(chunks: Callable[[], AsyncIterator[bytes]]) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 writing ``chunks()`` (a fresh, self-paced iterator per client) until the feed is
    left; yields its port.  A device's output as the agent meets it: a socket."""
    clients: set[asyncio.Task[None]] = set()

    async def client(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        clients.add(task)
        try:
            # CancelledError: the feed's own shutdown (below); ending quietly keeps asyncio's stream callback from
            # reporting the handler task as failed
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                async for data in chunks():
                    writer.write(data)
                    await writer.drain()
        finally:
            writer.close()
            clients.discard(task)

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for task in list(clients):
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)


def nmea_feed() -> contextlib.AbstractAsyncContextManager[int]:
    """A TCP NMEA feed replaying a real receiver log one epoch per second, looping."""
    lines = [ln + b"\r\n" for ln in NMEA_LOG.read_bytes().splitlines() if ln.startswith(b"$")]

    async def epochs() -> AsyncIterator[bytes]:
        i = 0
        while True:
            epoch = []
            while True:
                line = lines[i % len(lines)]
                i += 1
                epoch.append(line)
                if line.startswith(b"$GPRMC"):
                    break
            yield b"".join(epoch)
            await asyncio.sleep(1.0)

    return _loopback_feed(epochs)


def ecg_stream_feed(replay: WfdbEcgReplay, period_s: float = 0.1) -> contextlib.AbstractAsyncContextManager[int]:
    """A monitor's raw waveform output on a local TCP port: the record's frames (interleaved little-endian int16, one
    per lead per sampling instant) in real time, ``period_s`` worth per write, looping."""
    frames = np.ascontiguousarray(replay.record_samples().T).astype("<i2")
    step = max(1, round(replay.fs_hz * period_s))

    async def waveform() -> AsyncIterator[bytes]:
        t0 = time.monotonic()
        k = 0
        while True:
            start = k * step % len(frames)
            yield frames[start : start + step].tobytes()
            k += 1
            await asyncio.sleep(max(0.0, t0 + k * step / replay.fs_hz - time.monotonic()))

    return _loopback_feed(waveform)


_MDC_UNITS = {
    "heart_rate_bpm": "264864^MDC_DIM_BEAT_PER_MIN^MDC",
    "resp_rate_per_min": "264928^MDC_DIM_RESP_PER_MIN^MDC",
    "spo2_pct": "262688^MDC_DIM_PERCENT^MDC",
    "sbp_mmhg": "266016^MDC_DIM_MMHG^MDC",
    "dbp_mmhg": "266016^MDC_DIM_MMHG^MDC",
    "map_mmhg": "266016^MDC_DIM_MMHG^MDC",
}


def pcd01(values: dict[str, float | None], at: datetime, control_id: str) -> str:
    """An HL7 v2.6 ORU^R01 (IHE PCD-01) with one NM OBX per vital sign, MDC-coded, as a monitor sends it."""
    t = at.strftime("%Y%m%d%H%M%S")
    segments = [
        f"MSH|^~\\&|MONITOR|BENCH|GOLDENHOUR|VEH|{t}+0000||ORU^R01^ORU_R01|{control_id}|P|2.6",
        f"OBR|1||{control_id}|69965^MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS^MDC|||{t}+0000",
    ]
    codes = {c.field: c for c in VITAL_CODES}
    for field, value in values.items():
        code = codes.get(field)
        if value is None or code is None or code.mdc_code is None or field not in _MDC_UNITS:
            continue
        k = len(segments) - 1
        segments.append(f"OBX|{k}|NM|{code.mdc_code}^{code.mdc_ref}^MDC|1.1.1.{k}|{value:g}|{_MDC_UNITS[field]}|||||F")
    return "\r".join(segments)


@contextlib.asynccontextmanager
async def hl7_monitor_feed(port: int, interval_s: float = 2.0) -> AsyncIterator[None]:
    """A bedside monitor sending the MIMIC-II numerics as PCD-01 over MLLP to ``port`` every ``interval_s``
    (a refused connection while the agent starts is retried at the next interval)."""
    numerics = NumericsVitalsReplay(NUMERICS)

    async def run() -> None:
        for _ in range(150):  # wait for the agent's listener (it starts with the agent), at most 30 s
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.2)
            else:
                writer.close()
                break
        k = 0
        while True:
            row = numerics.row(int(k * interval_s // numerics.period_s) % numerics.n_rows)
            with contextlib.suppress(OSError, MllpError, TimeoutError):
                await send_mllp("127.0.0.1", port, pcd01(row, utc_now(), f"B{k}"), timeout_s=2.0, attempts=1)
            k += 1
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def delivered(broker: BrokerSettings, space: TopicSpace) -> AsyncIterator[dict[str, int]]:
    """Counts what the agent under test delivers to the broker (proof that the measured pipeline runs)."""
    counts = {"ecg": 0, "ecg_samples": 0, "monitor_vitals": 0, "gps": 0, "video": 0}
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"bench-count-{uuid.uuid4().hex[:8]}") as sub:
        streams = (Stream.ECG, Stream.VITALS, Stream.GPS, Stream.VIDEO)
        await sub.subscribe([(space.filter(s, "bench-1"), 0) for s in streams])
        video_topic = space.topic(Stream.VIDEO, "bench-1")

        async def pump() -> None:
            async for message in sub.messages:
                topic = message.topic.value
                assert isinstance(message.payload, bytes)
                if topic == video_topic:
                    counts["video"] += 1
                    continue
                with contextlib.suppress(ValueError):
                    _, model = decode(space, topic, message.payload)
                    if isinstance(model, EcgChunk):
                        counts["ecg"] += 1
                        counts["ecg_samples"] += model.samples.size
                    elif isinstance(model, Vitals) and (model.spo2_pct, model.resp_rate_per_min) != (None, None):
                        counts["monitor_vitals"] += 1
                    elif type(model).__name__ == "GpsFix":
                        counts["gps"] += 1

        task = asyncio.create_task(pump())
        try:
            yield counts
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- 2. CPU and RSS ---------------------------------------------------------------------------------------------


@dataclass
class ProcessFigures:
    cpu_pct: float
    rss_mb: float


async def measure(proc: asyncio.subprocess.Process, warmup_s: float, seconds: float) -> ProcessFigures:
    ps = psutil.Process(proc.pid)
    await asyncio.sleep(warmup_s)
    t0, c0 = time.monotonic(), ps.cpu_times()
    rss = 0
    for _ in range(int(seconds)):
        await asyncio.sleep(1.0)
        if proc.returncode is not None:
            raise RuntimeError("the measured process died")
        rss = max(rss, ps.memory_info().rss)
    t1, c1 = time.monotonic(), ps.cpu_times()
    cpu = (c1.user + c1.system - c0.user - c0.system) / (t1 - t0) * 100
    return ProcessFigures(cpu, rss / 1e6)


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            async with asyncio.timeout(15):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def cpu_and_rss(url: str | None, seconds: float) -> None:
    import base64

    from ambulance_agent.crypto import generate_unit_key
    from ambulance_agent.video import write_test_clip

    replay, label = twelve_lead()
    out(f"2. Agent CPU and RSS, 12-lead 500 Hz ECG ({label}, raw waveform stream over TCP) + HL7/MLLP monitor"
        f" vitals + NMEA GPS + 2 fps video, {seconds:.0f} s")  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="gh-bench-agent-"))
    clip = write_test_clip(workdir / "cabin.mp4", seconds=20.0, fps=10, size=(640, 480))
    stream = {
        "fs_hz": replay.fs_hz,
        "leads": list(replay.leads),
        "gain_adc_per_mv": replay.gain_adc_per_mv,
        "baseline_adc": replay.baseline_adc,
    }
    async with broker_for(url) as broker, nmea_feed() as gps_port, ecg_stream_feed(replay) as ecg_port:

        async def run_agent(camera: bool) -> ProcessFigures:
            mllp_port = free_port()
            prefix = f"bench-{uuid.uuid4().hex[:8]}/"
            env = {k: v for k, v in os.environ.items() if not k.startswith(("EMS_AGENT_", "EMS_MQTT_"))}
            env.update(
                EMS_AGENT_UNIT_ID="bench-1",
                EMS_AGENT_CLIENT_ID=f"bench-{uuid.uuid4().hex[:8]}",
                EMS_AGENT_BROKER_URL=f"mqtt://{broker.host}:{broker.port}",
                EMS_AGENT_TOPIC_PREFIX=prefix,
                EMS_AGENT_OUTBOX_PATH=str(workdir / f"outbox-{prefix[6:14]}.sqlite3"),
                EMS_AGENT_UNIT_KEY=base64.b64encode(generate_unit_key()).decode(),
                EMS_AGENT_ECG_STREAM=f"127.0.0.1:{ecg_port}",
                EMS_AGENT_ECG_STREAM_FS_HZ=str(replay.fs_hz),
                EMS_AGENT_ECG_STREAM_LEADS=",".join(replay.leads),
                EMS_AGENT_ECG_STREAM_GAIN=str(replay.gain_adc_per_mv),
                EMS_AGENT_ECG_STREAM_BASELINE=str(replay.baseline_adc),
                EMS_AGENT_MLLP_PORT=str(mllp_port),
                EMS_AGENT_NMEA_TCP=f"127.0.0.1:{gps_port}",
                EMS_AGENT_CREW_SCREEN_PORT="0",
                EMS_AGENT_LOG_LEVEL="WARNING",
            )
            if camera:
                env.update(EMS_AGENT_CAMERA=str(clip), EMS_AGENT_VIDEO_FPS="2")
            agent = await asyncio.create_subprocess_exec(sys.executable, "-m", "ambulance_agent", env=env, cwd=ROOT)
            try:
                async with hl7_monitor_feed(mllp_port), delivered(broker, TopicSpace(prefix)) as counts:
                    figures = await measure(agent, 5.0, seconds)
            finally:
                await stop_process(agent)
            out(f"   delivered ({'with' if camera else 'without'} camera, whole run): {counts['ecg']} ECG chunks"
                f" ({counts['ecg_samples']} samples), {counts['monitor_vitals']} monitor vitals (SpO2 or resp rate),"
                f" {counts['gps']} GPS fixes, {counts['video']} video frames")  # fmt: skip
            return figures

        agent_fig = await run_agent(camera=True)
        no_camera_fig = await run_agent(camera=False)
        bare = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ambulance_agent.bench", "--bare-publisher", f"mqtt://{broker.host}:{broker.port}",
            "--stream", json.dumps({"port": ecg_port, **stream}),
            env={k: v for k, v in os.environ.items() if not k.startswith("EMS_")}, cwd=ROOT,
        )  # fmt: skip
        try:
            bare_fig = await measure(bare, 5.0, seconds)
        finally:
            await stop_process(bare)
        shutil.rmtree(workdir, ignore_errors=True)
    out(f"   agent with the 2 fps camera: CPU {agent_fig.cpu_pct:.1f} % of one core, RSS {agent_fig.rss_mb:.0f} MB")
    out(f"   the same agent without a camera: CPU {no_camera_fig.cpu_pct:.1f} %, RSS {no_camera_fig.rss_mb:.0f} MB"
        f" (camera costs {agent_fig.cpu_pct - no_camera_fig.cpu_pct:.1f} % CPU,"
        f" {agent_fig.rss_mb - no_camera_fig.rss_mb:.0f} MB)")  # fmt: skip
    out(f"   baseline, bare aiomqtt publisher of the same ECG chunks: CPU {bare_fig.cpu_pct:.1f} %,"
        f" RSS {bare_fig.rss_mb:.0f} MB")  # fmt: skip
    out(f"   ratios agent/baseline: CPU {agent_fig.cpu_pct / max(bare_fig.cpu_pct, 0.01):.2f},"
        f" RSS {agent_fig.rss_mb / bare_fig.rss_mb:.2f}")  # fmt: skip
    out(f"   targets CPU <= 10 %: {'met' if agent_fig.cpu_pct <= 10 else 'NOT met'};"
        f" RSS <= 150 MB: {'met' if agent_fig.rss_mb <= 150 else 'NOT met'}")  # fmt: skip


async def bare_publisher(url: str, stream: str) -> None:
    """The CPU baseline: the same 12-lead stream read by the same adapter, each chunk encoded and published at QoS 1,
    nothing else.  ``stream``: JSON of the port and the stream's out-of-band description."""
    description = json.loads(stream)
    port = description.pop("port")
    replay = RawEcgStreamSource(("127.0.0.1", port), **description)
    settings = BrokerSettings.from_url(url)
    space = TopicSpace(f"bench-bare-{uuid.uuid4().hex[:8]}/")
    topic = space.topic(Stream.ECG, "bare-1")
    async with aiomqtt.Client(settings.host, settings.port, identifier=f"bare-{uuid.uuid4().hex[:8]}") as client:
        seq = 0
        async for block in replay:
            chunk = EcgChunk(
                unit_id="bare-1",
                seq=seq,
                sent_at=utc_now(),
                start_at=block.start_at,
                fs_hz=block.fs_hz,
                leads=block.leads,
                gain_adc_per_mv=block.gain_adc_per_mv,
                baseline_adc=block.baseline_adc,
                samples=block.samples,
            )
            await client.publish(topic, encode(Stream.ECG, chunk), qos=1)
            seq += 1


# --- 3. 64 kbit/s link --------------------------------------------------------------------------------------------


@dataclass
class LinkFigures:
    prealert_s: float
    vitals_age_median_s: float
    vitals_age_p95_s: float
    ecg_behind_chunks: int
    up_kbit_s: float


async def link_run(
    broker: BrokerSettings, rate_bps: float | None, budget: str, seconds: float, outage_s: float
) -> LinkFigures:
    space = TopicSpace(f"bench-link-{uuid.uuid4().hex[:8]}/")
    unit = "bench-2"
    workdir = Path(tempfile.mkdtemp(prefix="gh-bench-link-"))
    replay, _ = twelve_lead()
    arrivals: dict[str, float] = {}
    newest_vitals: list[Vitals] = []
    ecg_seen: set[int] = set()
    arrived = asyncio.Event()
    async with (
        FaultProxy(broker.port, up_bps=rate_bps, down_bps=rate_bps, delay_s=0.05) as proxy,
        nmea_feed() as gps_port,
        aiomqtt.Client(broker.host, broker.port, identifier=f"bench-sub-{uuid.uuid4().hex[:8]}") as sub,
    ):
        await sub.subscribe([(space.filter(s, unit), 1) for s in (Stream.PREALERT, Stream.VITALS, Stream.ECG)])

        async def collect() -> None:
            async for message in sub.messages:
                assert isinstance(message.payload, bytes)
                _, model = decode(space, message.topic.value, message.payload)
                if isinstance(model, PreAlert):
                    arrivals.setdefault(model.alert_id, time.monotonic())
                    arrived.set()
                elif isinstance(model, Vitals) and not model.historical:
                    newest_vitals.append(model)
                elif isinstance(model, EcgChunk):
                    ecg_seen.add(model.seq)

        agent = Agent(
            unit,
            broker.model_copy(update={"port": proxy.port}),
            space,
            outbox_path=workdir / "outbox.sqlite3",
            ecg=replay,
            vitals=NumericsVitalsReplay(NUMERICS, start_min=2),
            gps=NmeaGpsSource(tcp=("127.0.0.1", gps_port)),
            adaptive_bandwidth=budget == "measured",
            client_id=f"bench-{uuid.uuid4().hex[:8]}",
            publish_timeout_s=30.0,
        )
        collector = asyncio.create_task(collect())
        running = asyncio.create_task(agent.run())
        ages: list[float] = []
        try:
            await agent.link.wait_connected(15)
            # a tunnel: the link is gone for a third of the run, the backlog builds; then it drains while live
            # data keeps coming, and the pre-alert is raised in the middle of the drain
            proxy.refuse()
            proxy.reset()
            await asyncio.sleep(outage_s)
            proxy.restore()
            await agent.link.wait_connected(30)
            start = time.monotonic()
            alert_sent = None
            alert_id = ""
            while time.monotonic() - start < seconds:
                await asyncio.sleep(0.5)
                if newest_vitals:
                    ages.append((utc_now() - max(v.measured_at for v in newest_vitals[-5:])).total_seconds())
                if alert_sent is None and time.monotonic() - start >= min(5.0, seconds / 2):
                    alert_sent = time.monotonic()
                    alert_id = await agent.prealert(CaseType.STEMI, Findings(age_years=60, ecg_st_elevation=True))
            async with asyncio.timeout(30):
                while alert_id not in arrivals:
                    arrived.clear()
                    await arrived.wait()
            assert alert_sent is not None
            behind = agent.outbox.peek_seq(Stream.ECG) - agent.outbox.first_seq - len(ecg_seen)
            up = proxy.counters.up_bytes * 8 / 1000 / (time.monotonic() - start)
        finally:
            agent.stop()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await asyncio.gather(running, return_exceptions=True)
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
            agent.close()
            shutil.rmtree(workdir, ignore_errors=True)
    ages = ages[len(ages) // 4 :] or [float("nan")]
    p95 = sorted(ages)[max(0, int(len(ages) * 0.95) - 1)]
    return LinkFigures(arrivals[alert_id] - alert_sent, statistics.median(ages), p95, behind, up)


async def slow_link(url: str | None, seconds: float) -> None:
    outage_s = seconds / 2
    out(f"3. 64 kbit/s link (50 ms each way), 12-lead 500 Hz ECG + vitals + GPS: {outage_s:.0f} s without a link,"
        f" then {seconds:.0f} s of backlog drain and live data; the pre-alert 5 s into the drain")  # fmt: skip
    async with broker_for(url) as broker:
        runs = [
            ("64 kbit/s, measured budget", 64_000.0, "measured"),
            ("baseline: unthrottled link, no budget", None, "none"),
            ("baseline: 64 kbit/s, no budget", 64_000.0, "none"),
        ]
        figures: dict[str, LinkFigures] = {}
        for label, rate, budget in runs:
            fig = await link_run(broker, rate, budget, seconds, outage_s)
            figures[label] = fig
            out(f"   {label}: pre-alert {fig.prealert_s:.2f} s; vitals age median {fig.vitals_age_median_s:.2f} s,"
                f" p95 {fig.vitals_age_p95_s:.2f} s; ECG chunks not yet delivered {fig.ecg_behind_chunks};"
                f" uplink used {fig.up_kbit_s:.1f} kbit/s")  # fmt: skip
    main, fast, unpaced = (figures[r[0]] for r in runs)
    out(f"   ratios to the unthrottled baseline: pre-alert {main.prealert_s / fast.prealert_s:.1f}x,"
        f" vitals age {main.vitals_age_median_s / fast.vitals_age_median_s:.1f}x")  # fmt: skip
    out(f"   ratio to the unpaced 64 kbit/s baseline: pre-alert {main.prealert_s / unpaced.prealert_s:.2f}x,"
        f" vitals age {main.vitals_age_median_s / unpaced.vitals_age_median_s:.2f}x")  # fmt: skip
    out(f"   target pre-alert <= 2 s on 64 kbit/s: {'met' if main.prealert_s <= 2 else 'NOT met'}")


def main() -> int:
    """Run the benchmark (or the bare-publisher baseline when asked by the benchmark itself)."""
    parser = argparse.ArgumentParser(
        prog="python -m ambulance_agent.bench", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    parser.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883", help="broker (embedded if unreachable)")
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement window per run")
    parser.add_argument("--codec-seconds", type=float, default=300.0, help="seconds of each MIT-BIH record")
    parser.add_argument("--only", choices=["codec", "cpu", "link"], help="run one part")
    parser.add_argument("--bare-publisher", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--stream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_publisher:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(bare_publisher(args.bare_publisher, args.stream))
        return 0
    out("GoldenHour ambulance agent benchmark")
    out(f"   machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    if args.only in (None, "codec"):
        ecg_bytes_per_sample(args.codec_seconds)
    if args.only in (None, "cpu"):
        asyncio.run(cpu_and_rss(args.mqtt_url, args.seconds))
    if args.only in (None, "link"):
        asyncio.run(slow_link(args.mqtt_url, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
