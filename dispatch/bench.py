"""``python -m dispatch.bench``: dispatch's two latency figures, each against a baseline measured in the same run.

1. Unit recommendation for an incident with ``--units`` (200) available units on the Baltimore road graph
   (``--pbf``, from the shared data set; skipped with a message when absent): :func:`dispatch.incidents.
   recommend_units` (one reverse Dijkstra search + ranking), p50/p99 over ``--runs`` incidents, against the
   baseline of one :meth:`RoadRouter.route` call per unit.  Target: p99 <= 100 ms.
2. Pre-alert to the boards through the real broker (``--mqtt-url``, default the local Mosquitto; skipped with a
   message when unreachable): a unit publishes a STEMI PreAlert, dispatch routes it, and every activated
   department's board (one subscriber each on the destination's alert topic) receives the HospitalAlert; p50/p99
   over ``--alerts`` pre-alerts, against a plain MQTT round trip (publish -> the same subscribers) of a payload
   of the same size.  Target: p99 <= 500 ms.

Figures are printed to stdout, one per line, with the ratio to the baseline.  Times are wall-clock
(``time.perf_counter``); the first sample of each series is a warm-up and discarded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import aiomqtt
import numpy as np

from broker_config import (
    STREAMS,
    BrokerSettings,
    CaseType,
    Department,
    Findings,
    GpsFix,
    HospitalAlert,
    PreAlert,
    Stream,
    TopicSpace,
    decode_as,
    encode,
    utc_now,
)
from dispatch.hospitals import DATA_DIR, HospitalRegistry
from dispatch.incidents import recommend_units
from dispatch.repository import UnitRecord
from dispatch.routing import RoadRouter
from dispatch.service import DispatchService

__all__ = ["main"]

RECOMMEND_TARGET_P99_S = 0.100
PREALERT_TARGET_P99_S = 0.500
DEFAULT_PBF = Path(__file__).resolve().parents[2] / "shared" / "data" / "osm" / "baltimore.osm.pbf"
NEAR_CHPG = (43.7304054, 7.4114082)


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _percentiles_ms(samples_s: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(samples_s[1:] if len(samples_s) > 1 else samples_s) * 1000
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def _report(name: str, samples_s: Sequence[float], baseline_s: Sequence[float], target_s: float) -> bool:
    p50, p99 = _percentiles_ms(samples_s)
    b50, b99 = _percentiles_ms(baseline_s)
    ok = p99 <= target_s * 1000
    _out(
        f"{name}: p50 {p50:.2f} ms, p99 {p99:.2f} ms (n={len(samples_s) - 1}) | baseline p50 {b50:.2f} ms, "
        f"p99 {b99:.2f} ms (n={len(baseline_s) - 1}) | ratio p50 {p50 / b50:.3f}, p99 {p99 / b99:.3f} | "
        f"target p99 <= {target_s * 1000:.0f} ms: {'PASS' if ok else 'FAIL'}"
    )
    return ok


# --- 1. unit recommendation ----------------------------------------------------------------------------------------


def bench_recommend(pbf: Path, n_units: int, runs: int, baseline_runs: int, seed: int) -> bool | None:
    """Recommendation vs. one route() per unit.  None when the PBF is absent."""
    if not pbf.is_file():
        _out(f"recommendation: SKIPPED - road graph {pbf} not found (pass --pbf path/to/baltimore.osm.pbf)")
        return None
    router = RoadRouter.from_pbf(pbf)
    _out(f"recommendation: graph {pbf.name}, {router.n_nodes} nodes, {router.n_edges} edges, {n_units} units")
    rng = random.Random(seed)  # noqa: S311 - sample positions, not cryptography
    now = utc_now()

    def node() -> tuple[float, float]:
        return router.node_deg(rng.randrange(router.n_nodes))

    units = [
        UnitRecord(f"U{i:03d}", position_deg=node(), position_at=now, gps_fix=True, online=True) for i in range(n_units)
    ]
    samples: list[float] = []
    for _ in range(runs + 1):
        incident = node()
        started = time.perf_counter()
        ranking = recommend_units(router, incident, units, now)
        samples.append(time.perf_counter() - started)
        assert len(ranking) == n_units
    baseline: list[float] = []
    for _ in range(baseline_runs + 1):
        incident = node()
        started = time.perf_counter()
        for unit in units:
            router.route(unit.position_deg, incident)  # type: ignore[arg-type]
        baseline.append(time.perf_counter() - started)
    return _report("recommendation (1 reverse search)", samples, baseline, RECOMMEND_TARGET_P99_S)


# --- 2. pre-alert to the boards ------------------------------------------------------------------------------------


def _reachable(settings: BrokerSettings) -> bool:
    try:
        with socket.create_connection((settings.host, settings.port), timeout=1):
            return True
    except OSError:
        return False


async def _measure(
    publish: Callable[[int], object], arrived: Callable[[int], asyncio.Event], n: int, timeout_s: float
) -> list[float]:
    samples: list[float] = []
    for i in range(n + 1):
        started = time.perf_counter()
        await publish(i)  # type: ignore[misc]
        async with asyncio.timeout(timeout_s):
            await arrived(i).wait()
        samples.append(time.perf_counter() - started)
    return samples


async def bench_prealert(settings: BrokerSettings, n_alerts: int) -> bool | None:
    """Pre-alert -> HospitalAlert on every activated department's board, vs. a plain MQTT round trip."""
    if not _reachable(settings):
        _out(f"pre-alert: SKIPPED - no MQTT broker at {settings.host}:{settings.port} (pass --mqtt-url)")
        return None
    for name in ("dispatch", "broker_config"):
        logging.getLogger(name).setLevel(logging.ERROR)
    space = TopicSpace(f"bench-{uuid.uuid4().hex[:8]}/")
    router = await asyncio.to_thread(RoadRouter.from_pbf, DATA_DIR / "monaco.osm.pbf")
    service = DispatchService(
        settings, space, HospitalRegistry.load(), router, client_id=f"bench-dispatch-{uuid.uuid4().hex[:6]}"
    )
    boards = (Department.CATH_LAB, Department.ED)  # what a STEMI to the PCI centre activates
    events: dict[tuple[str, int], asyncio.Event] = {}
    seen: dict[tuple[str, int], set[int]] = {}

    def event(kind: str, i: int) -> asyncio.Event:
        return events.setdefault((kind, i), asyncio.Event())

    def delivered(kind: str, i: int, board_no: int) -> None:
        boards_seen = seen.setdefault((kind, i), set())
        boards_seen.add(board_no)
        if len(boards_seen) == len(boards):
            event(kind, i).set()

    echo_topic = space.topic(Stream.ALERT, "BENCHECHO")
    alert_topic = space.topic(Stream.ALERT, "MC-CCM")

    async def board(client: aiomqtt.Client, board_no: int) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if str(message.topic) == echo_topic:
                delivered("echo", int.from_bytes(payload[:4], "big"), board_no)
                continue
            alert = decode_as(HospitalAlert, space, str(message.topic), payload)
            delivered("alert", int(alert.alert_id[2:]), board_no)

    async with contextlib.AsyncExitStack() as stack:
        tg = await stack.enter_async_context(asyncio.TaskGroup())
        run = tg.create_task(service.run())
        await service.wait_ready(15)
        clients = []
        for board_no, d in enumerate(boards):
            c = await stack.enter_async_context(
                aiomqtt.Client(settings.host, settings.port, identifier=f"bench-board-{d.value}-{uuid.uuid4().hex[:4]}")
            )
            await c.subscribe([(alert_topic, 1), (echo_topic, 1)])
            clients.append(tg.create_task(board(c, board_no)))
        unit = await stack.enter_async_context(
            aiomqtt.Client(settings.host, settings.port, identifier=f"bench-unit-{uuid.uuid4().hex[:6]}")
        )
        now = utc_now()
        fix = GpsFix(unit_id="BENCH1", seq=0, sent_at=now, fix=True, lat_deg=NEAR_CHPG[0], lon_deg=NEAR_CHPG[1])
        await unit.publish(space.topic(Stream.GPS, "BENCH1"), encode(Stream.GPS, fix), qos=1, retain=False)
        spec = STREAMS[Stream.PREALERT]

        async def prealert(i: int) -> None:
            message = PreAlert(
                unit_id="BENCH1",
                seq=i + 1,
                sent_at=utc_now(),
                alert_id=f"B-{i}",
                case_type=CaseType.STEMI,
                findings=Findings(ecg_st_elevation=True, age_years=60),
            )
            await unit.publish(space.topic(Stream.PREALERT, "BENCH1"), encode(Stream.PREALERT, message), qos=spec.qos)

        size = 1_200  # about the size of an encoded HospitalAlert with two activations

        async def echo(i: int) -> None:
            await unit.publish(echo_topic, i.to_bytes(4, "big") + bytes(size - 4), qos=1)

        samples = await _measure(prealert, lambda i: event("alert", i), n_alerts, 10)
        baseline = await _measure(echo, lambda i: event("echo", i), n_alerts, 10)
        for task in (*clients, run):
            task.cancel()
    return _report("pre-alert to boards (2 departments)", samples, baseline, PREALERT_TARGET_P99_S)


def main(argv: Sequence[str] | None = None) -> int:
    """Run both benchmarks; exit code 1 if a measured figure misses its target."""
    parser = argparse.ArgumentParser(prog="python -m dispatch.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--pbf", type=Path, default=DEFAULT_PBF, help="road graph for the recommendation")
    parser.add_argument("--units", type=int, default=200)
    parser.add_argument("--runs", type=int, default=200, help="recommendations measured")
    parser.add_argument("--baseline-runs", type=int, default=10, help="baseline samples (each = units x route())")
    parser.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--alerts", type=int, default=100, help="pre-alerts measured")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = [bench_recommend(args.pbf, args.units, args.runs, args.baseline_runs, args.seed)]
    settings = BrokerSettings.from_url(args.mqtt_url)
    results.append(asyncio.run(bench_prealert(settings, args.alerts)))
    return 1 if any(r is False for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
