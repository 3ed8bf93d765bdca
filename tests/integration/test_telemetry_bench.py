"""Smoke test of ``goldenhour bench ingest`` at tiny scale (the full benchmark runs on a quiet machine)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker_config import BrokerSettings, TopicSpace, decode
from telemetry import bench

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_ingest_tiny_run_reports_every_figure(tmp_path: Path, mqtt_settings: BrokerSettings) -> None:
    out = tmp_path / "bench.json"
    pg = os.environ.get("GOLDENHOUR_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    argv = ["--units", "3", "--duration-s", "3", "--history-s", "30", "--mqtt-url", mqtt_settings.url, "--workers", "2"]
    argv += ["--idle-queries", "3"]
    assert bench.main([*argv, "--database-url", pg, "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    ingest, naive = result["ingest"], result["naive"]
    assert (ingest["published"], ingest["stored"], ingest["lost"], ingest["duplicated"]) == (27, 27, 0, 0)
    assert 0 < ingest["bytes_per_ecg_sample"] <= 2.0
    assert ingest["lag_p99_s"] == ingest["lag_p99_s"]  # measured (its size is the benchmark's business, not a test's)
    assert naive["stored"] == naive["published"] == 27
    assert set(result["ratios"]) >= {"messages_per_s", "cpu_s_per_1000_msgs", "bytes_per_ecg_sample"}
    queries = ("latest_vitals_ms", "ecg_10s_ms", "idle_latest_vitals_ms", "idle_ecg_10s_ms")
    assert all(v == v for k in queries for v in result[k])  # measured, not NaN
    assert result["workers"] == 2  # two ingest processes on one shared subscription: still nothing lost or doubled
    assert set(ingest["cpu_s_per_1000_msgs_by_process"]) == {"broker", "publisher", "ingest", "postgresql"}


def test_synthetic_ecg_and_templates_are_lossless() -> None:

    adc = bench.synthetic_ecg(2)
    assert adc.shape == (12, 1000)
    payloads = bench.Payloads("bench00001", bench._retarget(bench.ecg_templates("x"), "bench00001"))
    space = TopicSpace()
    for stream in bench.STREAMS:
        at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
        _, model = decode(space, space.topic(stream, "bench00001"), payloads.render(stream, 42, at, at))
        assert (model.unit_id, model.seq, model.sent_at) == ("bench00001", 42, at)  # type: ignore[attr-defined]
