"""``python -m hospital_board.bench``: publish-to-browser latency and ECG frame rate of the ED board under load.

What runs, all on this machine (so every figure includes the competition for its cores; the table says how busy
the machine was and how much CPU each part took):

* an MQTT broker: the embedded amqtt broker in a process of its own, or the one at ``--mqtt-url``;
* the board service (:func:`hospital_board.main.create_app`) under uvicorn in a process of its own.  It listens on
  one loopback port per board page, because Chromium opens at most 6 connections per host and port and every
  board holds one open event stream.  A board that requires sign-in runs in development mode with a key made for
  the run, and the pages carry an ED-staff token for the hospital (see :func:`board_access`);
* one headless Chromium with ``--boards`` board pages at 1920x1080, each in a window of its own (a background tab
  is hidden and gets no animation frames at all), all showing the same hospital, so that every board receives
  every unit (the worst case of the fan-out).  By default Chromium is confined to the last CPU
  (``--browser-cpus``): on the ward every screen is a computer of its own, and a browser sharing all the cores
  starves the single-threaded services of CPU time;
* ``--sse-clients`` plain event-stream clients (:class:`SseProbe`) beside the pages: the same latencies without a
  browser, i.e. what the service itself delivers;
* one publisher process: ``--units`` ambulances, each with a ``HospitalAlert`` for that hospital, vitals at 1 Hz
  and two-lead ECG at 250 Hz in 1-s chunks.  The ECG is real: MIT-BIH records 100, 119 and 201 from
  ``simulators/data/mitdb``, resampled from 360 Hz to 250 Hz with a polyphase anti-aliasing filter
  (``scipy.signal.resample_poly``); vitals values are plausible constants (only their timing matters here).
  Every payload is encoded once through the contract (:func:`broker_config.codec.encode`) and only patched with
  ``seq`` and times before each publish.  The units are spread evenly over each second (a fleet does not tick in
  lock-step).  The alerts are published all at once at the start ("alert burst") and then re-published
  round-robin at ``--alert-rate`` per second, same ``alert_id`` and a new ``seq``, as dispatch does whenever an
  alert's state, ETA or activations change; so alerts are also measured under steady load.

Measured over ``--duration-s`` seconds after ``--warmup-s`` seconds of load:

* latency = ``Date.now()`` in the page when the server-sent event is dispatched, minus the wall time the publisher
  wrote into the payload just before publishing (``sent_at`` of the alert; ``measured_at`` = ``sent_at`` of the
  vitals, because a vitals event on the feed carries ``measured_at`` only).  Both clocks are this machine's.
  p50 and p99 over every event received by every board;
* ECG frame rate = the strip redraws per second that ``board.js`` counts itself with ``?bench=1``
  (``window.__ghBench``: animation frames in which the board drew its visible strips), median and slowest board
  (the target is judged on the slowest), with the number of ECG strips visible (canvases on screen, as the board's
  own IntersectionObserver sees them).  The board draws every visible strip incrementally in its one
  animation-frame loop (only the samples played since the last frame, see ``GH.drawStrip``), at most 40 times a
  second (``ECG_MAX_FPS`` in ``board.js``), so the strip frame rate is at most the page's rate of
  ``requestAnimationFrame`` callbacks, which is also given (median and slowest board; without a verdict since the
  strips stopped following every frame).  ``--layout wall`` (the default) asks for the board's 5-column wall layout,
  which shows ten whole strips at 1920x1080;
* per page, from the DevTools protocol (``Performance.getMetrics``, read at the start and at the end of the window,
  :data:`PAGE_METRICS`): main-thread time in tasks, script, style recalculation and layout, the number of style
  recalculations and layouts, and the CPU time of the page's renderer process, per second (median board): what a
  frame costs the page, and what is left for the event stream;
* CPU used by the board service, the broker, the publisher, Chromium, this driver and the whole machine (other
  users included), in percent of one core.

How the pages are read: the benchmark injects a short script over the DevTools protocol
(``Page.addScriptToEvaluateOnNewDocument``, see :data:`PROBE_JS`) that counts animation frames and adds its own
listeners for the ``vitals`` and ``alert`` events of the page's ``EventSource``; everything is read once, at the
end.  Nothing in ``hospital_board/static`` is changed for the benchmark; it only sets ``?bench=1``, which the
board already understands, for the strip redraw count and the frame-loop time (and ``&ecg=full`` with
``--ecg-redraw full``: every strip redrawn whole on every frame, the renderer's baseline).  The pages are the board's
own: each tells the service which strips it has on screen and then receives the ECG of those units only (see
:mod:`hospital_board.feed`); the plain SSE clients never do, so they receive every unit's ECG.  The pages keep rendering
as foreground screens: Chromium runs with ``--disable-background-timer-throttling``,
``--disable-renderer-backgrounding`` and ``--disable-backgrounding-occluded-windows`` (:data:`CHROMIUM_FLAGS`), each
page in a window of its own, each with its own event stream (one loopback port per page).  A page too busy to
answer within 15 s is left out and counted.

Baseline: the same measurements with 1 board and 1 unit, in the same run; every figure is also given as the ratio
run / baseline.  Targets (from the issue): latency p99 <= 250 ms for vitals and for alerts with 20 boards x 50
units; ECG >= 30 frames/s with 10 strips visible (judged on the slowest board).  The exit status is 0 when every
target was met.

Reading the figures: every board page costs the one Chromium the same whatever the number of boards (its strips,
its 50 units' events, and compositing its 1920x1080 window in software), so with ``--boards 20`` and Chromium on one
CPU each page has a twentieth of that CPU.  ``page renderer process CPU`` shows what one page takes when it has the
CPU it needs (``--boards 1``) and what each page got.  The service's own fan-out to 20 boards with one real page is
``--boards 1 --sse-clients 19`` (the plain clients take every unit's ECG, the worst case for the service).

Needs Chromium (``/usr/bin/chromium``) and the ``websockets`` package (the project's ``test`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import queue
import secrets
import socket
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from broker_config import (
    STREAMS,
    Availability,
    BrokerSettings,
    CaseType,
    Department,
    EcgChunk,
    Findings,
    HospitalAlert,
    Priority,
    Stream,
    TopicSpace,
    Vitals,
    decode,
    encode,
)
from broker_config.embedded import free_port
from simulators.browser import BASE_FLAGS, KEEP_RENDERING_FLAGS, DevTools, chromium_binary
from simulators.browser import chromium as browser_chromium

__all__ = [
    "ECG_FS_HZ",
    "PROBE_JS",
    "Fleet",
    "LoadPlan",
    "ScenarioResult",
    "SseProbe",
    "board_access",
    "main",
    "mitdb_ecg",
    "run",
]

logger = logging.getLogger(__name__)

ECG_FS_HZ = 250
"""ECG sample rate on the wire (MIT-BIH's 360 Hz resampled)."""
MITDB = Path(__file__).resolve().parent.parent / "simulators" / "data" / "mitdb"
RECORDS = ("100", "119", "201")
"""Three patients' records, so that neighbouring strips differ."""
ECG_SECONDS = 30
"""Distinct 1-s chunks per unit (encoded once, then cycled)."""
HOSPITAL_ID = "BENCH"
VIEWPORT = (1920, 1080)
TARGET_P99_MS = 250.0
TARGET_FPS = 30.0
CHROMIUM_FLAGS = (
    *BASE_FLAGS,
    "--mute-audio",
    "--autoplay-policy=no-user-gesture-required",
    *KEEP_RENDERING_FLAGS,
)
"""Every board page in the one browser keeps rendering as the foreground screen it stands for: no background
throttling of timers, no renderer backgrounding, no occluded-window backgrounding (see
:data:`simulators.browser.KEEP_RENDERING_FLAGS`)."""

_SEQ_MARK = 918_273_645_546_372
_TIME_MARK = datetime(2001, 2, 3, 4, 5, 6, 789_012, tzinfo=UTC)
_GHE1_TIMES = struct.Struct("<Qqq")
"""seq, sent_at and start_at (microseconds since the epoch) at offset 8 of the GHE1 header (broker_config.codec)."""
_GHE1_TIMES_AT = 8
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

PROBE_JS = r"""
// GoldenHour board benchmark probe, injected over DevTools before the page's own scripts; never shipped.
(() => {
  const probe = { raf: 0, ticks: [], vitals: [], alerts: [], snapshots: 0 };
  const seenVitals = new Set(), seenAlerts = new Set();
  window.__ghProbe = probe;
  const count = () => { probe.raf++; requestAnimationFrame(count); };
  requestAnimationFrame(count);
  // once a second: [wall ms, frames so far, strip redraws so far, ms spent in the board's frame loop so far]
  // (the last two are board.js's own ?bench=1 counters)
  const redraws = () => (window.__ghBench ? window.__ghBench.frames : 0);
  const drawMs = () => (window.__ghBench ? window.__ghBench.drawMs || 0 : 0);
  setInterval(() => { probe.ticks.push([Date.now(), probe.raf, redraws(), drawMs()]); }, 1000);
  const Native = window.EventSource;
  window.EventSource = class extends Native {
    constructor(url, init) {
      super(url, init);
      this.addEventListener("snapshot", () => { probe.snapshots++; });
      this.addEventListener("vitals", (m) => {
        const at = Date.now();
        const ev = JSON.parse(m.data);
        const hr = ev.vitals && ev.vitals.heart_rate_bpm;
        if (!hr) return;
        const key = ev.unit_id + "|" + hr.measured_at;
        if (seenVitals.has(key)) return;
        seenVitals.add(key);
        probe.vitals.push([at, at - Date.parse(hr.measured_at)]);
      });
      this.addEventListener("alert", (m) => {
        const at = Date.now();
        const a = JSON.parse(m.data).alert;
        if (!a || !a.sent_at) return;
        const key = a.alert_id + "|" + a.sent_at;
        if (seenAlerts.has(key)) return;
        seenAlerts.add(key);
        probe.alerts.push([at, at - Date.parse(a.sent_at)]);
      });
    }
  };
})();
"""
"""Counts animation frames (sampled once a second with the wall time, so that one read at the end gives the rate
over any window) and records, per ``vitals``/``alert`` event, ``[receipt ms, latency ms]`` (receipt = ``Date.now()``
when the event is dispatched; latency = receipt - the publish time in the payload).  Each reading and each alert
version is counted once."""


# --- data and payloads (pure) ---------------------------------------------------------------------------------


def mitdb_ecg(record: str, seconds: int, fs_hz: int = ECG_FS_HZ) -> tuple[np.ndarray, tuple[str, ...], float, int]:
    """The first ``seconds`` of a MIT-BIH record at ``fs_hz`` (polyphase resampling of the 360 Hz signal).

    Returns:
        ``(adc, leads, gain_adc_per_mv, baseline_adc)``; ``adc`` is int16 of shape (n_leads, seconds * fs_hz).
    """
    import wfdb  # only the publisher reads records
    from scipy.signal import resample_poly

    header = wfdb.rdheader(str(MITDB / record))
    native_fs = float(header.fs)
    rec = wfdb.rdrecord(str(MITDB / record), sampto=int(seconds * native_fs) + 1, physical=False)
    baseline = int(rec.baseline[0])
    ratio = Fraction(fs_hz) / Fraction(native_fs).limit_denominator(1000)
    centred = rec.d_signal.astype(np.float64) - baseline
    resampled = resample_poly(centred, ratio.numerator, ratio.denominator, axis=0)[: seconds * fs_hz]
    adc = np.clip(np.rint(resampled) + baseline, -32768, 32767).astype(np.int16).T
    return np.ascontiguousarray(adc), tuple(rec.sig_name), float(rec.adc_gain[0]), baseline


def _iso(at: datetime) -> bytes:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()


def _us(at: datetime) -> int:
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class _JsonTemplate:
    """A JSON payload encoded through the contract with marker seq/time values, patched per publish."""

    def __init__(self, payload: bytes) -> None:
        self.seq_mark = str(_SEQ_MARK).encode()
        self.time_mark = _iso(_TIME_MARK)
        if self.seq_mark not in payload or self.time_mark not in payload:
            raise ValueError("template markers not found in the encoded payload")
        self.payload = payload

    def render(self, seq: int, at: datetime) -> bytes:
        return self.payload.replace(self.seq_mark, str(seq).encode()).replace(self.time_mark, _iso(at))


class Fleet:
    """Pre-encoded payloads of ``units`` ambulances inbound to ``hospital_id``; ``*_payload`` patch seq and times.

    Unit ``i`` plays MIT-BIH record ``RECORDS[i % 3]`` from second ``(7 * i) % ECG_SECONDS``, cycling.
    """

    def __init__(self, space: TopicSpace, hospital_id: str, units: int, *, started_at: datetime) -> None:
        self.space = space
        self.hospital_id = hospital_id
        self.unit_ids = [f"BU{i:03d}" for i in range(units)]
        records = {r: mitdb_ecg(r, ECG_SECONDS) for r in RECORDS[: max(1, min(units, len(RECORDS)))]}
        cases = (
            (CaseType.STEMI, Priority.HIGH, (Department.CATH_LAB,), True),
            (CaseType.STROKE, Priority.HIGH, (Department.STROKE_TEAM, Department.CT), None),
            (CaseType.TRAUMA, Priority.MEDIUM, (Department.TRAUMA_TEAM,), None),
            (CaseType.MEDICAL, Priority.LOW, (Department.ED,), None),
        )
        self._ecg: list[list[bytes]] = []
        self._vitals: list[list[_JsonTemplate]] = []
        self._alerts: list[_JsonTemplate] = []
        self.topics: list[dict[Stream, str]] = []
        for i, unit in enumerate(self.unit_ids):
            self.topics.append(
                {
                    Stream.ECG: space.unit(unit, Stream.ECG),
                    Stream.VITALS: space.unit(unit, Stream.VITALS),
                    Stream.AVAILABILITY: space.unit(unit, Stream.AVAILABILITY),
                    Stream.ALERT: space.topic(Stream.ALERT, hospital_id),
                }
            )
            adc, leads, gain, baseline = records[RECORDS[i % len(records)]]
            first = (7 * i) % ECG_SECONDS
            chunks = []
            for k in range(ECG_SECONDS):
                s = (first + k) % ECG_SECONDS
                chunk = EcgChunk(
                    unit_id=unit,
                    seq=0,
                    sent_at=_TIME_MARK,
                    start_at=_TIME_MARK,
                    fs_hz=ECG_FS_HZ,
                    leads=leads,
                    gain_adc_per_mv=gain,
                    baseline_adc=baseline,
                    samples=adc[:, s * ECG_FS_HZ : (s + 1) * ECG_FS_HZ],
                )
                chunks.append(encode(Stream.ECG, chunk))
            self._ecg.append(chunks)
            self._vitals.append(
                [
                    _JsonTemplate(
                        encode(
                            Stream.VITALS,
                            Vitals(
                                unit_id=unit,
                                seq=_SEQ_MARK,
                                sent_at=_TIME_MARK,
                                measured_at=_TIME_MARK,
                                heart_rate_bpm=72 + (i % 40) + k % 3,
                                heart_rate_source="ecg",
                                spo2_pct=97 - (i % 6) - k % 2,
                                sbp_mmhg=128 - (i % 30),
                                dbp_mmhg=78 - (i % 15),
                                map_mmhg=95 - (i % 20),
                                resp_rate_per_min=16 + (i % 8),
                                etco2_mmhg=36 + k % 2,
                            ),
                        )
                    )
                    for k in range(6)
                ]
            )
            case, priority, departments, st = cases[i % len(cases)]
            alert = HospitalAlert(
                unit_id=unit,
                seq=_SEQ_MARK,
                sent_at=_TIME_MARK,
                alert_id=f"BA{i:03d}",
                hospital_id=hospital_id,
                case_type=case,
                priority=priority,
                eta_at=started_at + timedelta(minutes=8 + i % 25),
                departments=departments,
                findings=Findings(age_years=40 + i % 50, sex="female" if i % 2 else "male", ecg_st_elevation=st),
                reasons=("benchmark unit",),
            )
            self._alerts.append(_JsonTemplate(encode(Stream.ALERT, alert)))

    def __len__(self) -> int:
        return len(self.unit_ids)

    def ecg_payload(self, i: int, seq: int, sent_at: datetime) -> bytes:
        """Chunk ``seq`` of unit ``i``: the 1-s of samples that ended at ``sent_at``."""
        data = bytearray(self._ecg[i][seq % ECG_SECONDS])
        sent_us = _us(sent_at)
        _GHE1_TIMES.pack_into(data, _GHE1_TIMES_AT, seq, sent_us, sent_us - 1_000_000)
        return bytes(data)

    def vitals_payload(self, i: int, seq: int, at: datetime) -> bytes:
        """Vitals of unit ``i`` measured and sent at ``at``."""
        variants = self._vitals[i]
        return variants[seq % len(variants)].render(seq, at)

    def alert_payload(self, i: int, seq: int, at: datetime) -> bytes:
        """Version ``seq`` of unit ``i``'s alert, sent at ``at``."""
        return self._alerts[i].render(seq, at)

    def check(self) -> None:
        """Decode one patched payload of each stream through the contract (raises PayloadError if any is off)."""
        at = datetime.now(UTC).replace(microsecond=123_456)
        for stream, payload in (
            (Stream.ECG, self.ecg_payload(0, 42, at)),
            (Stream.VITALS, self.vitals_payload(0, 42, at)),
            (Stream.ALERT, self.alert_payload(0, 42, at)),
        ):
            _, model = decode(self.space, self.topics[0][stream], payload)
            if (model.seq, model.sent_at) != (42, at):  # type: ignore[attr-defined]
                raise ValueError(f"patched {stream.value} payload does not carry its seq and time")


# --- the publisher process ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """What the publisher process publishes, and where."""

    mqtt_url: str
    prefix: str
    hospital_id: str
    units: int
    alert_rate_hz: float


def _publisher_main(plan: LoadPlan, events: dict[str, MpEvent], results: Any) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # aiomqtt warns whenever more than 10 publishes await their PUBACK; the start-up bursts do so on purpose
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    try:
        asyncio.run(_publish(plan, events, results))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        results.put({"error": f"{type(exc).__name__}: {exc}"})


async def _publish(plan: LoadPlan, events: dict[str, MpEvent], results: Any) -> None:
    """Publish until ``events["stop"]``, report on ``results``, then clear the retained messages on
    ``events["clear"]`` (set by the parent once the board has stopped, so that the board never sees them go)."""
    from broker_config.connection import MqttLink, NotConnectedError

    space = TopicSpace(plan.prefix)
    fleet = Fleet(space, plan.hospital_id, plan.units, started_at=datetime.now(UTC))
    fleet.check()
    link = MqttLink(
        BrokerSettings.from_url(plan.mqtt_url),
        client_id=f"gh-bench-pub-{secrets.token_hex(4)}",
        max_inflight=1_000,
    )
    counts: dict[str, int] = {"ecg": 0, "vitals": 0, "alert": 0, "failed": 0}
    pending: set[asyncio.Task[None]] = set()
    max_late_s = 0.0

    async def send(stream: Stream, topic: str, payload: bytes, *, retain: bool = False) -> None:
        try:
            await link.publish(topic, payload, qos=STREAMS[stream].qos, retain=retain)
        except NotConnectedError:
            counts["failed"] += 1
        else:
            counts[stream.value] = counts.get(stream.value, 0) + 1

    def fire(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def availability(online: bool) -> None:
        now = datetime.now(UTC)
        await asyncio.gather(
            *(
                send(
                    Stream.AVAILABILITY,
                    fleet.topics[i][Stream.AVAILABILITY],
                    encode(Stream.AVAILABILITY, Availability(unit_id=u, seq=1, sent_at=now, state="online"))
                    if online
                    else b"",  # an empty retained message deletes the retained one
                    retain=True,
                )
                for i, u in enumerate(fleet.unit_ids)
            )
        )

    runner = asyncio.create_task(link.run())
    try:
        await link.wait_connected(30)
        await availability(online=True)
        events["ready"].set()
        await asyncio.to_thread(events["go"].wait)  # the parent sets it, or terminates this process
        burst_at = time.time()
        await asyncio.gather(
            *(
                send(Stream.ALERT, fleet.topics[i][Stream.ALERT], fleet.alert_payload(i, 1, datetime.now(UTC)))
                for i in range(len(fleet))
            )
        )
        burst_done = time.time()
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.05
        n = len(fleet)
        alert_every_s = 1.0 / plan.alert_rate_hz if plan.alert_rate_hz > 0 else float("inf")
        next_alert = t0 + alert_every_s
        alert_seq = 2
        alert_unit = 0
        stop = events["stop"]
        for k in itertools.count():
            for i in range(n):
                due = t0 + k + i / n
                while next_alert <= due:
                    await asyncio.sleep(max(0.0, next_alert - loop.time()))
                    fire(
                        send(
                            Stream.ALERT,
                            fleet.topics[alert_unit][Stream.ALERT],
                            fleet.alert_payload(alert_unit, alert_seq, datetime.now(UTC)),
                        )
                    )
                    alert_unit = (alert_unit + 1) % n
                    if alert_unit == 0:
                        alert_seq += 1
                    next_alert += alert_every_s
                await asyncio.sleep(max(0.0, due - loop.time()))
                max_late_s = max(max_late_s, loop.time() - due)
                at = datetime.now(UTC)
                fire(send(Stream.VITALS, fleet.topics[i][Stream.VITALS], fleet.vitals_payload(i, k, at)))
                fire(send(Stream.ECG, fleet.topics[i][Stream.ECG], fleet.ecg_payload(i, k, at)))
            if stop.is_set():
                break
        if pending:
            await asyncio.wait(pending, timeout=10)
        results.put(
            {
                "counts": dict(counts),
                "unconfirmed": len(pending),
                "burst_sent_ms": (burst_at * 1000, burst_done * 1000),
                "max_late_ms": max_late_s * 1000,
            }
        )
        await asyncio.to_thread(events["clear"].wait, 30)
        await availability(online=False)  # leave no retained message behind on a shared broker
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


# --- the broker and board processes ---------------------------------------------------------------------------


def _broker_main(port: int, ready: MpEvent) -> None:
    logging.basicConfig(level=logging.WARNING)
    from broker_config.embedded import EmbeddedBroker

    async def serve() -> None:
        async with EmbeddedBroker(port):
            # Overloaded, amqtt logs a traceback per late PUBACK; the table reports losses and lateness instead.
            logging.getLogger("amqtt").setLevel(logging.CRITICAL)
            ready.set()
            await asyncio.Event().wait()

    asyncio.run(serve())


def _board_main(
    mqtt_url: str, prefix: str, hospital_id: str, overrides: dict[str, Any], listeners: int, ports: Any
) -> None:
    """The board service on ``listeners`` loopback ports (their numbers are put on ``ports``).

    One port per board page: Chromium opens at most 6 connections per host and port, and every board holds one
    open event stream, so a seventh board on a shared origin would never load (on the ward each board is its own
    browser).
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # One warning per event offered to a board that is going away: a flood when Chromium falls behind.  The table
    # reports the disconnects (server side) and the resyncs (page side) instead.
    logging.getLogger("hospital_board.feed").setLevel(logging.ERROR)
    import uvicorn

    from broker_config.web import server_config
    from hospital_board.main import create_app
    from hospital_board.settings import BoardSettings

    settings = BoardSettings(
        broker=BrokerSettings.from_url(mqtt_url),
        topic_prefix=prefix,
        default_hospital_id=hospital_id,
        map_pbf=None,
        **overrides,
    )
    sockets = []
    for _ in range(listeners):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sockets.append(sock)
    ports.put([sock.getsockname()[1] for sock in sockets])
    config = server_config(create_app(settings), log_level="warning", access_log=False, timeout_graceful_shutdown=1)
    uvicorn.Server(config).run(sockets=sockets)


def board_access(hospital_id: str) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, str]]:
    """Board settings and a browser cookie that let the benchmark's pages in, if the board requires sign-in.

    A board that verifies dispatch's tokens (``BoardSettings.verify_keys``) runs in development mode (loopback
    only) trusting a key made for this run, and the browser carries an ED-staff access token for ``hospital_id``
    signed with it, as a signed-in ED screen would.

    Returns:
        ``(settings overrides, browser cookie, HTTP headers for API clients)``; ``({}, None, {})`` for a board
        without sign-in.
    """
    from hospital_board.settings import BoardSettings

    if "verify_keys" not in BoardSettings.model_fields:
        return {}, None, {}
    from broker_config.identity import BOARD_ACCESS_COOKIE, Role, generate_signing_key, issue_token, verify_key_text

    key = generate_signing_key()
    token, _ = issue_token(
        key, subject="bench-board", role=Role.ED_STAFF, ttl_s=4 * 3600, now=datetime.now(UTC), hospital_id=hospital_id
    )
    overrides = {"security_mode": "development", "verify_keys": [verify_key_text(key)]}
    cookie = {
        "name": BOARD_ACCESS_COOKIE,
        "value": token,
        "domain": "127.0.0.1",
        "path": "/",
        "httpOnly": True,
        "sameSite": "Strict",
    }
    return overrides, cookie, {"Authorization": f"Bearer {token}"}


# --- CPU accounting (Linux /proc; figures are None elsewhere) -------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, user+system clock ticks) of every process we may read."""
    table: dict[int, tuple[int, int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                text = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            rest = text[text.rindex(")") + 2 :].split()
            table[int(entry.name)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    return table


def _tree_ticks(table: dict[int, tuple[int, int]], root: int | None) -> int | None:
    if root is None or root not in table:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += table[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def _machine_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all cores since boot."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


@dataclass
class _CpuSample:
    wall_s: float
    own_s: float
    trees: dict[str, int | None]
    machine: tuple[int, int] | None


def _cpu_sample(pids: dict[str, int | None]) -> _CpuSample:
    table = _proc_table()
    trees = {k: _tree_ticks(table, p) for k, p in pids.items()}
    return _CpuSample(time.monotonic(), time.process_time(), trees, _machine_ticks())


def _cpu_pct(a: _CpuSample, b: _CpuSample) -> dict[str, float | None]:
    """Percent of one core used by each process tree between two samples, and by the whole machine."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    wall = max(b.wall_s - a.wall_s, 1e-9)
    out: dict[str, float | None] = {}
    for name, start in a.trees.items():
        end = b.trees.get(name)
        out[name] = None if start is None or end is None else 100.0 * (end - start) / tick / wall
    out["driver"] = 100.0 * (b.own_s - a.own_s) / wall
    if a.machine and b.machine:
        busy, total = b.machine[0] - a.machine[0], b.machine[1] - a.machine[1]
        out["machine"] = 100.0 * (os.cpu_count() or 1) * busy / total if total else None
    else:
        out["machine"] = None
    return out


# --- the browser (simulators.browser) ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _chromium(binary: str, cpus: frozenset[int] | None = None) -> AsyncIterator[tuple[DevTools, int]]:
    """A fresh headless Chromium, every process of it confined to ``cpus`` (None: anywhere); yields its DevTools
    client (protocol events dropped: nothing waits on them) and the browser's pid."""
    extra = CHROMIUM_FLAGS[len(BASE_FLAGS) :]
    async with browser_chromium(
        *extra,
        binary=binary,
        window=VIEWPORT,
        cpus=cpus,
        keep_events=False,
        profile_prefix="gh-bench-chromium-",
    ) as cdp:
        assert cdp.proc is not None
        yield cdp, cdp.proc.pid


async def _open_board(cdp: DevTools, url: str, timeout_s: float) -> str:
    """A board page in a window of its own (a background tab would be hidden: no animation frames)."""
    width, height = VIEWPORT
    session = await cdp.new_page(width, height, new_window=True)
    await cdp.call("Page.addScriptToEvaluateOnNewDocument", session, source=PROBE_JS)
    await cdp.call("Performance.enable", session)
    await cdp.call("Page.navigate", session, url=url)
    await cdp.poll(
        session,
        "window.__ghProbe && window.__ghBoard && document.querySelector('#link').textContent === 'LIVE'",
        timeout_s,
    )
    return session


async def _try_evaluate(cdp: DevTools, session: str, expression: str, timeout_s: float) -> Any | None:
    """``cdp.evaluate``, or None when an overloaded page does not answer in time (it is then left out)."""
    try:
        return await cdp.evaluate(session, expression, timeout_s=timeout_s)
    except (TimeoutError, RuntimeError, ConnectionError):
        return None


PAGE_METRICS = (
    "TaskDuration",
    "ScriptDuration",
    "RecalcStyleDuration",
    "LayoutDuration",
    "RecalcStyleCount",
    "LayoutCount",
    "ProcessTime",
)
"""What the benchmark reads from each page's ``Performance.getMetrics`` (DevTools protocol) at the start and the end
of the window: main-thread time in tasks, script, style recalculation and layout (seconds), the number of style
recalculations and layouts, and the CPU time of the page's renderer process (seconds; all its threads, raster
included, and shared with any other page in the same process)."""


async def _page_metrics(cdp: DevTools, session: str, timeout_s: float) -> dict[str, float] | None:
    """The page's :data:`PAGE_METRICS` (None when an overloaded page does not answer in time)."""
    try:
        answer = await cdp.call("Performance.getMetrics", session, timeout_s=timeout_s)
    except (TimeoutError, RuntimeError, ConnectionError):
        return None
    values = {m["name"]: float(m["value"]) for m in answer.get("metrics", [])}
    return {k: values[k] for k in PAGE_METRICS if k in values}


def _metric_rates(a: dict[str, float] | None, b: dict[str, float] | None, seconds: float) -> dict[str, float]:
    """Per-second rates between two :func:`_page_metrics` readings (durations in ms per s, counts per s)."""
    if not a or not b or seconds <= 0:
        return {}
    out = {}
    for key in PAGE_METRICS:
        if key in a and key in b:
            scale = 1.0 if key.endswith("Count") else 1000.0
            out[key] = scale * (b[key] - a[key]) / seconds
    return out


def _read_page_js(since_ms: float, until_ms: float) -> str:
    """Everything the benchmark takes from one page, in one read at the end of the window."""
    return (
        "(() => { const p = window.__ghProbe; const b = window.__ghBoard;"
        f" const inside = (xs) => xs.filter((x) => x[0] >= {since_ms:.0f} && x[0] <= {until_ms:.0f});"
        " return {vitals: inside(p.vitals).map((x) => x[1]), alerts: inside(p.alerts).map((x) => x[1]),"
        " ticks: inside(p.ticks), snapshots: p.snapshots, all_alerts: p.alerts,"
        " units: b ? b.units.size : 0,"
        " visible: b ? Array.from(b.units.values()).filter((u) => u.visible).length : 0}; })()"
    )


def _rates(ticks: list[list[float]]) -> tuple[float, float, float]:
    """(animation frames/s, strip redraws/s, ms per s in the board's frame loop) from the page's once-a-second
    samples inside the window.

    Fewer than two samples means the page could not even run its one-second timer: it is counted as 0 frames/s.
    """
    if len(ticks) < 2:
        return 0.0, 0.0, float("nan")
    first, last = ticks[0], ticks[-1]
    seconds = max((last[0] - first[0]) / 1000, 1e-9)
    loop_ms = (last[3] - first[3]) / seconds if len(first) > 3 and len(last) > 3 else float("nan")
    return (last[1] - first[1]) / seconds, (last[2] - first[2]) / seconds, loop_ms


# --- one scenario ---------------------------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    """Everything measured in one scenario (latencies in ms over every board; rates per board)."""

    name: str
    boards: int
    units: int
    duration_s: float
    vitals_ms: list[float] = field(default_factory=list)
    alerts_ms: list[float] = field(default_factory=list)
    burst_ms: list[float] = field(default_factory=list)
    sse_vitals_ms: list[float] = field(default_factory=list)
    sse_alerts_ms: list[float] = field(default_factory=list)
    sse_clients: int = 0
    sse_resyncs: int = 0
    browser_cpus: str = "all"
    pages_not_opened: int = 0
    """Board pages that did not load within the opening deadline (left out)."""
    pages_unresponsive: int = 0
    """Opened pages that did not answer the DevTools reads in time (left out of the page figures)."""
    raf_fps: list[float] = field(default_factory=list)
    redraw_fps: list[float] = field(default_factory=list)
    loop_ms_per_s: list[float] = field(default_factory=list)
    """Per page: ms per second spent in the board's frame loop (strips and batched text), i.e. its main-thread cost."""
    visible_strips: list[int] = field(default_factory=list)
    page_metrics: list[dict[str, float]] = field(default_factory=list)
    """Per page: :data:`PAGE_METRICS` over the window, per second (durations in ms per s, counts per s)."""
    cards: list[int] = field(default_factory=list)
    page_resyncs: int = 0
    board_disconnects: dict[str, int] = field(default_factory=dict)
    published: dict[str, int] = field(default_factory=dict)
    """Publishes the broker acknowledged, per stream (``failed``: not acknowledged in time)."""
    accepted: dict[str, int] = field(default_factory=dict)
    """Messages the board service took in, per stream (after the publisher stopped and the board drained)."""
    board_backlog: int = 0
    publisher_max_late_ms: float = 0.0
    cpu_pct: dict[str, float | None] = field(default_factory=dict)
    load_avg: tuple[float, float] = (0.0, 0.0)


async def _wait_mp(event: MpEvent, timeout_s: float, what: str, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout_s
    while not event.is_set():
        if not alive():
            raise RuntimeError(f"{what} exited during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not start within {timeout_s:.0f} s")
        await asyncio.sleep(0.1)


async def _wait_board(base_url: str, timeout_s: float, alive: Callable[[], bool]) -> None:
    async with httpx.AsyncClient(timeout=2) as http:
        deadline = time.monotonic() + timeout_s
        while True:
            if not alive():
                raise RuntimeError("the board service exited during start-up")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{base_url}/api/health")).json().get("mqtt_connected"):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("the board service did not connect to the broker")
            await asyncio.sleep(0.2)


async def _health(base_url: str) -> dict[str, Any]:
    """The board's ``/api/health`` (empty if an overloaded board does not answer within 10 s)."""
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            data: dict[str, Any] = (await http.get(f"{base_url}/api/health")).json()
            return data
    except (httpx.HTTPError, ValueError):
        return {}


def _stop(proc: mp.process.BaseProcess) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


class SseProbe:
    """A plain client of the board's event stream beside the browsers: the same latencies without a page, i.e. what
    the service delivers before any browser has to find time to take it.

    Lean on purpose (HTTP/1.0 over a raw socket, so the body is the bare event stream; only ``vitals`` and ``alert``
    events are parsed), so that twenty of them cost the machine little next to the service they measure.
    """

    def __init__(self, port: int, path: str, headers: dict[str, str]) -> None:
        self.port = port
        self.path = path
        self.headers = headers
        self.vitals: list[tuple[float, float]] = []
        self.alerts: list[tuple[float, float]] = []
        self.connections = 0
        self._seen: set[str] = set()

    def take(self, frame: bytes, at_ms: float) -> None:
        """One event-stream frame received at ``at_ms`` (wall clock, ms)."""
        kind = b"vitals" if b"event: vitals\n" in frame else b"alert" if b"event: alert\n" in frame else None
        if kind is None:
            return
        start = frame.find(b"data: ")
        if start < 0:
            return
        body = json.loads(frame[start + 6 :].split(b"\n", 1)[0])
        if kind == b"vitals":
            hr = (body.get("vitals") or {}).get("heart_rate_bpm")
            if not hr:
                return
            key, sent, out = f"v|{body.get('unit_id')}|{hr['measured_at']}", hr["measured_at"], self.vitals
        else:
            alert = body.get("alert") or {}
            if not alert.get("sent_at"):
                return
            key, sent, out = f"a|{alert['alert_id']}|{alert['sent_at']}", alert["sent_at"], self.alerts
        if key in self._seen:
            return
        self._seen.add(key)
        out.append((at_ms, at_ms - datetime.fromisoformat(sent).timestamp() * 1000))

    async def run(self) -> None:
        """Read the stream until cancelled, reconnecting as a page would."""
        head = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        request = f"GET {self.path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n{head}\r\n"
        while True:
            writer = None
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(request.encode())
                self.connections += 1
                buffer = bytearray()
                header_done = False
                while chunk := await reader.read(65536):
                    at_ms = time.time() * 1000
                    buffer += chunk
                    if not header_done:
                        end = buffer.find(b"\r\n\r\n")
                        if end < 0:
                            continue
                        del buffer[: end + 4]
                        header_done = True
                    while (end := buffer.find(b"\n\n")) >= 0:
                        self.take(bytes(buffer[:end]), at_ms)
                        del buffer[: end + 2]
            except (OSError, ValueError, KeyError):
                pass
            finally:
                if writer is not None:
                    writer.close()
            await asyncio.sleep(0.5)

    @staticmethod
    def window(samples: list[tuple[float, float]], since_ms: float, until_ms: float) -> list[float]:
        """Latencies of the samples received within [since_ms, until_ms]."""
        return [lat for at, lat in samples if since_ms <= at <= until_ms]


async def run_scenario(
    name: str,
    *,
    boards: int,
    units: int,
    duration_s: float,
    warmup_s: float,
    alert_rate_hz: float,
    mqtt_url: str,
    broker_pid: int | None,
    layout: str,
    chromium: str,
    log: Callable[[str], None],
    ecg_redraw: str = "incremental",
    browser_cpus: frozenset[int] | None = None,
    sse_clients: int = 1,
    show_timeout_s: float = 15.0,
    open_timeout_s: float = 40.0,
    page_timeout_s: float = 15.0,
) -> ScenarioResult:
    """Board service + ``boards`` pages + a publisher of ``units`` units, measured for ``duration_s``."""
    ctx = mp.get_context("spawn")
    prefix = f"bench-{uuid.uuid4().hex[:10]}/"
    overrides, cookie, headers = board_access(HOSPITAL_ID)
    board_ports = ctx.Queue()
    board_proc = ctx.Process(
        target=_board_main, args=(mqtt_url, prefix, HOSPITAL_ID, overrides, boards, board_ports), daemon=True
    )
    events = {key: ctx.Event() for key in ("ready", "go", "stop", "clear")}
    results = ctx.Queue()
    plan = LoadPlan(mqtt_url, prefix, HOSPITAL_ID, units, alert_rate_hz)
    pub_proc = ctx.Process(target=_publisher_main, args=(plan, events, results), daemon=True)
    result = ScenarioResult(name, boards, units, duration_s, sse_clients=sse_clients)
    result.browser_cpus = ",".join(str(c) for c in sorted(browser_cpus)) if browser_cpus else "all"
    board_proc.start()
    pub_proc.start()
    try:
        try:
            ports = await asyncio.to_thread(board_ports.get, True, 60)
        except queue.Empty:
            raise RuntimeError("the board service did not start") from None
        base_urls = [f"http://127.0.0.1:{p}" for p in ports]
        await _wait_board(base_urls[0], 60, board_proc.is_alive)
        await _wait_mp(events["ready"], 60, "the publisher", pub_proc.is_alive)
        async with _chromium(chromium, browser_cpus) as (cdp, chromium_pid):
            if cookie is not None:
                await cdp.call("Storage.setCookies", cookies=[cookie])
            query = (
                f"/?hospital={HOSPITAL_ID}&bench=1"
                + ("&layout=wall" if layout == "wall" else "")
                + ("&ecg=full" if ecg_redraw == "full" else "")
            )
            log(f"{name}: opening {boards} board window(s)")
            opening = asyncio.Semaphore(4)
            open_deadline = asyncio.get_running_loop().time() + open_timeout_s

            async def open_one(url: str) -> str | None:
                try:
                    async with opening, asyncio.timeout_at(open_deadline):
                        return await _open_board(cdp, url + query, timeout_s=open_timeout_s)
                except (TimeoutError, RuntimeError):
                    return None

            opened = await asyncio.gather(*(open_one(url) for url in base_urls))
            sessions = [session for session in opened if session is not None]
            result.pages_not_opened = boards - len(sessions)
            if not sessions:
                raise RuntimeError(f"no board page opened within {open_timeout_s:.0f} s")
            probes = [
                SseProbe(ports[i % len(ports)], f"/api/events?hospital={HOSPITAL_ID}", headers)
                for i in range(sse_clients)
            ]
            probe_tasks = [asyncio.create_task(p.run()) for p in probes]
            events["go"].set()
            log(f"{name}: {units} unit(s) publishing; waiting (at most {show_timeout_s:.0f} s) for the boards")
            with contextlib.suppress(TimeoutError, RuntimeError, ConnectionError):
                await asyncio.gather(
                    *(cdp.poll(s, f"window.__ghBoard.units.size >= {units}", show_timeout_s) for s in sessions)
                )
            await asyncio.sleep(warmup_s)
            pids = {"board": board_proc.pid, "broker": broker_pid, "publisher": pub_proc.pid, "chromium": chromium_pid}
            load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            metrics_a = await asyncio.gather(*(_page_metrics(cdp, s, page_timeout_s) for s in sessions))
            cpu_a = _cpu_sample(pids)
            t_start = time.time() * 1000
            log(f"{name}: measuring for {duration_s:.0f} s")
            await asyncio.sleep(duration_s)
            t_end = time.time() * 1000
            cpu_b = _cpu_sample(pids)
            load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            metrics_b = await asyncio.gather(*(_page_metrics(cdp, s, page_timeout_s) for s in sessions))
            events["stop"].set()
            pages = await asyncio.gather(
                *(_try_evaluate(cdp, s, _read_page_js(t_start, t_end), page_timeout_s) for s in sessions)
            )
            try:
                report = await asyncio.to_thread(results.get, True, 30)
            except queue.Empty:
                raise RuntimeError("the publisher did not report") from None
            if "error" in report:
                raise RuntimeError(f"publisher failed: {report['error']}")
            health = await _health(base_urls[0])
            for task in probe_tasks:
                task.cancel()
            await asyncio.gather(*probe_tasks, return_exceptions=True)
        _stop(board_proc)  # before the publisher clears its retained messages, so the board never sees them go
        events["clear"].set()
        pub_proc.join(15)
        burst_to = report["burst_sent_ms"][1]
        for page, ma, mb in zip(pages, metrics_a, metrics_b, strict=True):
            if page is None:
                result.pages_unresponsive += 1
                continue
            rates = _metric_rates(ma, mb, (t_end - t_start) / 1000)
            if rates:
                result.page_metrics.append(rates)
            raf_fps, redraw_fps, loop_ms = _rates(page["ticks"])
            result.raf_fps.append(raf_fps)
            result.redraw_fps.append(redraw_fps)
            result.loop_ms_per_s.append(loop_ms)
            result.visible_strips.append(int(page["visible"]))
            result.cards.append(int(page["units"]))
            result.vitals_ms.extend(float(x) for x in page["vitals"])
            result.alerts_ms.extend(float(x) for x in page["alerts"])
            result.burst_ms.extend(float(lat) for at, lat in page["all_alerts"] if at - lat <= burst_to + 1)
            result.page_resyncs += max(0, int(page["snapshots"]) - 1)
        for p in probes:
            result.sse_vitals_ms.extend(SseProbe.window(p.vitals, t_start, t_end))
            result.sse_alerts_ms.extend(SseProbe.window(p.alerts, t_start, t_end))
            result.sse_resyncs += max(0, p.connections - 1)
        result.board_disconnects = dict(health.get("board_disconnects", {}))
        result.accepted = {k: int(v) for k, v in health.get("accepted", {}).items()}
        result.board_backlog = int(health.get("backlog", 0))
        result.published = dict(report["counts"])
        if report.get("unconfirmed"):
            result.published["unconfirmed at the end"] = int(report["unconfirmed"])
        result.publisher_max_late_ms = float(report["max_late_ms"])
        result.cpu_pct = _cpu_pct(cpu_a, cpu_b)
        result.load_avg = (load_start, load_end)
        return result
    finally:
        for event in events.values():
            event.set()
        _stop(pub_proc)
        _stop(board_proc)
        results.close()
        board_ports.close()


# --- report -----------------------------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def _median(values: Sequence[float]) -> float:
    return _pct(values, 50)


def _min(values: Sequence[float]) -> float:
    return float(min(values)) if len(values) else float("nan")


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def figures(r: ScenarioResult) -> dict[str, float]:
    """The headline figures of one scenario."""
    cpu = r.cpu_pct
    return {
        "vitals_p50_ms": _pct(r.vitals_ms, 50),
        "vitals_p99_ms": _pct(r.vitals_ms, 99),
        "alert_p50_ms": _pct(r.alerts_ms, 50),
        "alert_p99_ms": _pct(r.alerts_ms, 99),
        "alert_burst_p99_ms": _pct(r.burst_ms, 99),
        "sse_vitals_p99_ms": _pct(r.sse_vitals_ms, 99),
        "sse_alert_p99_ms": _pct(r.sse_alerts_ms, 99),
        "raf_fps_median": _median(r.raf_fps),
        "raf_fps_slowest": _min(r.raf_fps),
        "strip_redraws_per_s_median": _median(r.redraw_fps),
        "strip_redraws_per_s_slowest": _min(r.redraw_fps),
        "frame_loop_ms_per_s_median": _median([x for x in r.loop_ms_per_s if x == x]),
        "visible_strips_median": _median([float(v) for v in r.visible_strips]),
        **{f"page_{key}_median": _median([m[key] for m in r.page_metrics if key in m]) for key in PAGE_METRICS},
        "vitals_samples": float(len(r.vitals_ms)),
        "alert_samples": float(len(r.alerts_ms)),
        "cpu_board_pct": _nan(cpu.get("board")),
        "cpu_broker_pct": _nan(cpu.get("broker")),
        "cpu_publisher_pct": _nan(cpu.get("publisher")),
        "cpu_chromium_pct": _nan(cpu.get("chromium")),
        "cpu_driver_pct": _nan(cpu.get("driver")),
        "cpu_machine_pct": _nan(cpu.get("machine")),
    }


_ROWS: tuple[tuple[str, str, str, str], ...] = (
    # key, label, format, target
    ("vitals_p50_ms", "vitals latency p50 [ms]", "{:.0f}", ""),
    ("vitals_p99_ms", "vitals latency p99 [ms]", "{:.0f}", f"<= {TARGET_P99_MS:.0f}"),
    ("alert_p50_ms", "alert latency p50 [ms]", "{:.0f}", ""),
    ("alert_p99_ms", "alert latency p99 [ms]", "{:.0f}", f"<= {TARGET_P99_MS:.0f}"),
    ("alert_burst_p99_ms", "alert latency p99, burst at start [ms]", "{:.0f}", ""),
    ("sse_vitals_p99_ms", "vitals p99 at plain SSE clients [ms]", "{:.0f}", ""),
    ("sse_alert_p99_ms", "alert p99 at plain SSE clients [ms]", "{:.0f}", ""),
    ("raf_fps_median", "frame rate, median board [rAF/s]", "{:.1f}", ""),
    ("raf_fps_slowest", "frame rate, slowest board [rAF/s]", "{:.1f}", ""),
    ("strip_redraws_per_s_median", "ECG strip redraws, median board [/s]", "{:.1f}", ""),
    ("strip_redraws_per_s_slowest", "ECG strip redraws, slowest board [/s]", "{:.1f}", f">= {TARGET_FPS:.0f}"),
    ("frame_loop_ms_per_s_median", "board frame loop (strips), median [ms per s]", "{:.1f}", ""),
    ("visible_strips_median", "ECG strips visible per board", "{:.0f}", ""),
    ("page_TaskDuration_median", "page main thread busy, median [ms per s]", "{:.0f}", ""),
    ("page_ScriptDuration_median", "  of which script [ms per s]", "{:.0f}", ""),
    ("page_RecalcStyleDuration_median", "  of which style recalculation [ms per s]", "{:.1f}", ""),
    ("page_LayoutDuration_median", "  of which layout [ms per s]", "{:.1f}", ""),
    ("page_RecalcStyleCount_median", "page style recalculations [per s]", "{:.1f}", ""),
    ("page_LayoutCount_median", "page layouts [per s]", "{:.1f}", ""),
    ("page_ProcessTime_median", "page renderer process CPU [ms per s]", "{:.0f}", ""),
    ("vitals_samples", "vitals events measured", "{:.0f}", ""),
    ("alert_samples", "alert events measured", "{:.0f}", ""),
    ("cpu_board_pct", "CPU board service [% of a core]", "{:.0f}", ""),
    ("cpu_broker_pct", "CPU broker [% of a core]", "{:.0f}", ""),
    ("cpu_publisher_pct", "CPU publisher [% of a core]", "{:.0f}", ""),
    ("cpu_chromium_pct", "CPU Chromium [% of a core]", "{:.0f}", ""),
    ("cpu_driver_pct", "CPU bench driver (DevTools, SSE clients) [%]", "{:.0f}", ""),
    ("cpu_machine_pct", "CPU whole machine, all users [% of a core]", "{:.0f}", ""),
)


def _fmt(fmt: str, value: float) -> str:
    return "-" if value != value else fmt.format(value)  # NaN: not measured


def _met(target: str, value: float) -> str:
    if not target or value != value:
        return ""
    limit = float(target.split()[1])
    ok = value <= limit if target.startswith("<=") else value >= limit
    return "met" if ok else "NOT met"


def report_lines(run_result: ScenarioResult, baseline: ScenarioResult | None) -> list[str]:
    """The table: one row per figure; columns baseline, run, ratio run/baseline, target, verdict."""
    fr = figures(run_result)
    fb = figures(baseline) if baseline else {}
    head_b = f"baseline {baseline.boards}x{baseline.units}" if baseline else "baseline"
    head_r = f"run {run_result.boards}x{run_result.units}"
    lines = [
        f"{'figure':<46}{head_b:>16}{head_r:>14}{'ratio':>9}{'target':>9}  verdict",
        "-" * 102,
    ]
    for key, label, fmt, target in _ROWS:
        value = fr[key]
        base = fb.get(key, float("nan"))
        ratio = value / base if base == base and base else float("nan")
        lines.append(
            f"{label:<46}{_fmt(fmt, base):>16}{_fmt(fmt, value):>14}{_fmt('{:.2f}x', ratio):>9}{target:>9}"
            f"  {_met(target, value)}"
        )
    lines.append("-" * 102)
    for r in (baseline, run_result):
        if r is None:
            continue
        counts = ", ".join(f"{k} {v}" for k, v in r.published.items())
        taken = ", ".join(f"{k} {v}" for k, v in r.accepted.items()) or "unknown (no answer from /api/health)"
        lines += [
            f"{r.name}: {r.boards} board(s) x {r.units} unit(s), {r.duration_s:.0f} s measured, Chromium on CPU(s)"
            f" {r.browser_cpus}, {r.sse_clients} plain SSE client(s); pages measured"
            f" {r.boards - r.pages_not_opened - r.pages_unresponsive}/{r.boards} ({r.pages_not_opened} did not load,"
            f" {r.pages_unresponsive} did not answer)",
            f"  machine: load average {r.load_avg[0]:.1f} -> {r.load_avg[1]:.1f} on {os.cpu_count()} CPUs",
            f"  published (PUBACK): {counts}; publisher at most {r.publisher_max_late_ms:.0f} ms behind schedule",
            f"  taken in by the board: {taken}; its backlog {r.board_backlog}",
            f"  cards per board {min(r.cards, default=0)}-{max(r.cards, default=0)}; page resyncs {r.page_resyncs};"
            f" SSE client reconnects {r.sse_resyncs}; server-side disconnects {r.board_disconnects or 'none'}",
        ]
    return lines


# --- entry ------------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[ScenarioResult, ScenarioResult | None]:
    """Start the broker (unless ``--mqtt-url``), then run the baseline and the main scenario."""
    binary = args.chromium or chromium_binary()
    if binary is None:
        raise SystemExit("headless Chromium is not installed (apt-get install -y chromium)")
    ctx = mp.get_context("spawn")
    broker_proc = None
    broker_pid: int | None = None
    mqtt_url = args.mqtt_url
    if mqtt_url is None:
        port = free_port()
        ready = ctx.Event()
        broker_proc = ctx.Process(target=_broker_main, args=(port, ready), daemon=True)
        broker_proc.start()
        await _wait_mp(ready, 30, "the embedded broker", broker_proc.is_alive)
        broker_pid = broker_proc.pid
        mqtt_url = f"mqtt://127.0.0.1:{port}"
    common = {
        "warmup_s": args.warmup_s,
        "alert_rate_hz": args.alert_rate,
        "mqtt_url": mqtt_url,
        "broker_pid": broker_pid,
        "layout": args.layout,
        "ecg_redraw": args.ecg_redraw,
        "chromium": binary,
        "browser_cpus": _browser_cpus(args.browser_cpus),
        "log": log,
    }
    try:
        baseline = None
        if not args.no_baseline:
            baseline = await run_scenario(
                "baseline", boards=1, units=1, duration_s=args.baseline_duration_s, sse_clients=1, **common
            )
        main_result = await run_scenario(
            "run",
            boards=args.boards,
            units=args.units,
            duration_s=args.duration_s,
            sse_clients=args.sse_clients,
            **common,
        )
        return main_result, baseline
    finally:
        if broker_proc is not None:
            _stop(broker_proc)


def _browser_cpus(spec: str) -> frozenset[int] | None:
    """Parse ``--browser-cpus``; None means no restriction."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if spec == "all" or len(available) < 2:
        return None
    if spec == "last":
        return frozenset({available[-1]})
    try:
        cpus = frozenset(int(c) for c in spec.split(",") if c.strip())
    except ValueError:
        raise SystemExit("--browser-cpus takes 'last', 'all' or a list of CPU numbers") from None
    if not cpus or not cpus <= set(available):
        raise SystemExit(f"--browser-cpus must be a subset of the CPUs available: {available}")
    return cpus


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def main(argv: list[str] | None = None, out: Callable[[str], object] | None = None) -> int:
    """Parse options, run, print the table (and ``--json``); 0 if every target was met, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m hospital_board.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--boards", type=_positive_int, default=20, help="board pages in the one Chromium")
    parser.add_argument("--units", type=_positive_int, default=50, help="ambulances publishing")
    parser.add_argument("--duration-s", type=_positive_float, default=20.0, help="measuring window of the run")
    parser.add_argument("--baseline-duration-s", type=_positive_float, default=10.0, help="window of the baseline")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="load before measuring starts")
    parser.add_argument(
        "--alert-rate", type=float, default=1.0, help="alert re-publications per second, whole fleet (0: none)"
    )
    parser.add_argument("--layout", choices=("wall", "default"), default="wall", help="board layout")
    parser.add_argument(
        "--ecg-redraw",
        choices=("incremental", "full"),
        default="incremental",
        help="how the pages draw their ECG strips: 'incremental' (the board's own way: only the samples played since"
        " the last frame) or 'full' (every visible strip redrawn whole on every frame, ?ecg=full: the renderer's"
        " baseline, to compare the frame-loop cost of the two in runs on the same machine)",
    )
    parser.add_argument("--mqtt-url", default=None, help="use this broker instead of the embedded one")
    parser.add_argument("--chromium", default=None, help="Chromium executable (default: found on PATH)")
    parser.add_argument(
        "--browser-cpus",
        default="last",
        help="CPUs Chromium may use: 'last' (the last CPU, when there are two or more: the services keep the"
        " others, as on the ward, where every screen is a computer of its own), 'all', or a list like 2,3",
    )
    parser.add_argument(
        "--sse-clients",
        type=_non_negative_int,
        default=1,
        help="plain event-stream clients beside the pages (the service's own latency, without a browser)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the 1 board x 1 unit baseline")
    parser.add_argument("--json", default=None, help="also write every figure and sample count to this file")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        logger.info("%s", message)

    main_result, baseline = asyncio.run(run(args, log))
    lines = report_lines(main_result, baseline)
    (out or sys.stdout.write)("\n".join(lines) + "\n")
    if args.json:
        doc = {
            "run": {"figures": figures(main_result), "scenario": _summary(main_result)},
            "baseline": {"figures": figures(baseline), "scenario": _summary(baseline)} if baseline else None,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    f = figures(main_result)
    met = all(_met(target, f[key]) == "met" for key, _, _, target in _ROWS if target)
    return 0 if met else 1


def _summary(r: ScenarioResult) -> dict[str, Any]:
    data = asdict(r)
    for key in ("vitals_ms", "alerts_ms", "burst_ms", "sse_vitals_ms", "sse_alerts_ms"):
        data[key] = len(data[key])
    return data


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    raise SystemExit(main(sys.argv[1:]))
