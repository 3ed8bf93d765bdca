"""Board over real sockets: resync of open alerts from dispatch after a restart (alerts are not retained on the
broker), with dispatch failing first; a unit whose streams stop turns stale within the stated time."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from test_board_live import board_server, bus, ecg_chunks, hospital_alert, vitals_row

from broker_config import Activation, BrokerSettings, Department, Stream, TopicSpace

pytestmark = pytest.mark.integration


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers only a flag
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(10):
            await task
        sock.close()


def stub_dispatch(rows: list[dict[str, Any]], fail_first: int) -> tuple[FastAPI, dict[str, int]]:
    """Dispatch's API as the board uses it (same shapes as dispatch/schemas.py), failing the first calls."""
    app = FastAPI()
    calls = {"alerts": 0}

    @app.get("/api/hospitals")
    async def hospitals() -> list[dict[str, Any]]:
        return [{"hospital_id": "HA", "name": "Hospital A", "lat_deg": 43.7376, "lon_deg": 7.4249}]

    @app.get("/api/alerts", response_model=None)
    async def alerts() -> Any:
        calls["alerts"] += 1
        if calls["alerts"] <= fail_first:
            return JSONResponse({"detail": "starting"}, status_code=503)
        return rows

    @app.get("/api/alerts/{alert_id}")
    async def alert(alert_id: str) -> dict[str, Any]:
        row = next(r for r in rows if r["alert_id"] == alert_id)
        return {**row, "findings": {"age_years": 67, "sex": "male", "note": "resynced note"}, "timeline": []}

    return app, calls


async def test_board_restart_resyncs_open_alerts_from_dispatch(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    now = datetime.now(UTC)
    live = hospital_alert("a1", "U1", "HA", now)
    # The first board learns the alert live over MQTT, then goes away (a restart).
    async with board_server(mqtt_settings, topic_space) as first, bus(mqtt_settings, topic_space) as (_, pub):
        feed = first.watch("HA")
        await feed.wait_for(lambda n, d: n == "snapshot")
        await pub(Stream.ALERT, "HA", live)
        await feed.wait_for(lambda n, d: n == "alert" and d["alert"]["alert_id"] == "a1")
    row = {
        "alert_id": "a1",
        "unit_id": "U1",
        "case_type": "stemi",
        "priority": "high",
        "state": "on_board",
        "hospital_id": "HA",
        "hospital_name": "Hospital A",
        "departments": ["cath_lab", "ed"],
        "eta_s": 480.0,
        "eta_at": (now + timedelta(minutes=8)).isoformat(),
        "created_at": now.isoformat(),
        "historical": False,
        "reasons": ["24/7 PCI centre"],
    }
    app, calls = stub_dispatch([row], fail_first=2)
    async with (
        serve(app) as dispatch_url,
        board_server(
            mqtt_settings, topic_space, dispatch_url=dispatch_url, resync_retry_min_s=0.1, resync_retry_max_s=0.5
        ) as second,
        bus(mqtt_settings, topic_space) as (_, pub),
    ):
        feed = second.watch("HA")
        started = time.monotonic()
        _, ev = await feed.wait_for(lambda n, d: n == "alert" and d["alert"]["alert_id"] == "a1", timeout_s=10)
        assert ev["alert"]["resynced"]
        assert ev["alert"]["note"] == "resynced note"
        assert ev["card"]["unit_id"] == "U1"
        assert time.monotonic() - started < 5, "failed attempts are retried with a short back-off"
        resync = second.runtime.resync
        assert resync is not None
        assert resync.failures >= 2
        assert calls["alerts"] >= 3
        health = (await second.http.get(f"{second.url}/api/health")).json()
        assert health["resyncs_ok"] >= 1
        assert not second.runtime.state.alert("a1").activations
        # dispatch's next re-publication (an escalation, new seq) brings the activations and wins
        cath = Activation(department=Department.CATH_LAB, paged_at=now, escalate_at=now + timedelta(minutes=2))
        update = live.model_copy(update={"seq": live.seq + 1, "activations": (cath,)})
        await pub(Stream.ALERT, "HA", update)
        _, ev = await feed.wait_for(lambda n, d: n == "alert" and d["alert"]["activations"], timeout_s=10)
        assert not ev["alert"]["resynced"]
        assert ev["alert"]["activations"][0]["department"] == "cath_lab"
        page = await second.http.get(f"{second.url}/?hospital=HA")
        assert "Hospital A" in page.text, "the name comes from dispatch's GET /api/hospitals"


async def test_unit_whose_streams_stop_turns_stale_within_the_stated_time(
    embedded_broker: BrokerSettings, topic_space: TopicSpace
) -> None:
    stale_after_s, sweep_s, ecg_lost_after_s = 2.0, 0.25, 1.5
    async with (
        board_server(
            embedded_broker,
            topic_space,
            stale_after_s=stale_after_s,
            sweep_s=sweep_s,
            ecg_lost_after_s=ecg_lost_after_s,
        ) as board,
        bus(embedded_broker, topic_space) as (_, pub),
    ):
        feed = board.watch("HA")
        await feed.wait_for(lambda n, d: n == "snapshot")
        now = datetime.now(UTC)
        await pub(Stream.ALERT, "HA", hospital_alert("a1", "U1", "HA", now))
        await feed.wait_for(lambda n, d: n == "alert")
        for chunk in ecg_chunks("100", 2, "U1", now):
            await pub(Stream.ECG, "U1", chunk)
        await pub(Stream.VITALS, "U1", vitals_row("U1", 2, 0, now))
        # the event carrying this reading (a sweep may push the unit's still-empty vitals before it arrives)
        _, ev = await feed.wait_for(lambda n, d: n == "vitals" and d["vitals"]["heart_rate_bpm"] is not None)
        received = time.monotonic()
        assert not ev["vitals"]["heart_rate_bpm"]["stale"]
        # the unit stops sending: no message arrives, yet the board pushes the change itself
        _, ev = await feed.wait_for(lambda n, d: n == "unit" and d["ecg_lost"], timeout_s=10)
        _, ev = await feed.wait_for(lambda n, d: n == "vitals" and d["vitals"]["heart_rate_bpm"]["stale"], timeout_s=10)
        elapsed = time.monotonic() - received
        assert stale_after_s <= elapsed + 0.5
        assert elapsed <= stale_after_s + sweep_s + 1.0, f"stale after {elapsed:.2f} s"
        assert ev["vitals"]["heart_rate_bpm"]["age_s"] > stale_after_s
