"""Board over real sockets with the telemetry store (real PostgreSQL): a patient's vitals trend since first contact
survives a board restart, read back through the store's per-minute read API (``vitals_per_minute``), merged with
the board's own live points, and nothing from before first contact is shown."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from test_board_live import board_server, bus, hospital_alert, vitals_row

from broker_config import BrokerSettings, ParsedTopic, Scope, Stream, TopicSpace
from telemetry.postgres_store import PostgresStore

pytestmark = pytest.mark.integration

MINUTES = 25


def _minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


async def test_trend_since_first_contact_survives_a_board_restart(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace, pg_url: str
) -> None:
    now = datetime.now(UTC)
    fmc = _minute(now) - timedelta(minutes=MINUTES)
    # What the telemetry ingest stored while the board was down: MIMIC-II numerics rows (cycled) every 20 s since first
    # contact, and one reading from an earlier call (before first contact) that must not show.
    rows = [vitals_row("U1", k % 72, k, fmc + timedelta(seconds=20 * k)) for k in range(3 * MINUTES)]
    before = vitals_row("U1", 10, 999, fmc - timedelta(hours=2))
    store = PostgresStore(pg_url)
    try:
        await store.migrate()
        unit_topic = ParsedTopic(Scope.UNIT, "U1", Stream.VITALS)
        await store.write([(unit_topic, v, v.measured_at) for v in [*rows, before]])
    finally:
        await store.close()

    alert = hospital_alert("a1", "U1", "HA", now).model_copy(
        update={"findings": hospital_alert("a1", "U1", "HA", now).findings.model_copy(update={"fmc_at": fmc})}
    )
    async with (
        board_server(mqtt_settings, topic_space, telemetry_database_url=pg_url) as board,
        bus(mqtt_settings, topic_space) as (_, pub),
    ):
        feed = board.watch("HA")
        await feed.wait_for(lambda n, d: n == "snapshot")
        await pub(Stream.ALERT, "HA", alert)
        await feed.wait_for(lambda n, d: n == "alert" and d["alert"]["alert_id"] == "a1")
        measured = next(v for v in reversed(rows) if v.heart_rate_bpm is not None)
        live = measured.model_copy(update={"seq": 1_000, "sent_at": now, "measured_at": now})
        await pub(Stream.VITALS, "U1", live)
        await feed.wait_for(lambda n, d: n == "vitals" and d["unit_id"] == "U1")

        detail = (await board.http.get(f"{board.url}/api/hospitals/HA/units/U1")).json()
        trend = detail["trend"]
        times = [datetime.fromisoformat(p["at"]) for p in trend]
        assert times == sorted(times), "one trend, ordered by time"
        assert min(times) >= fmc, "nothing from before first contact"
        stored = [p for p, t in zip(trend, times, strict=True) if t < _minute(now) - timedelta(minutes=1)]
        assert len(stored) >= MINUTES - 1, "a point per stored minute"
        # each stored point is the minute's mean, at the minute's middle (per-minute bins of the store)
        first = stored[0]
        minute_rows = [v for v in rows if _minute(v.measured_at) == fmc]
        assert datetime.fromisoformat(first["at"]) == fmc + timedelta(seconds=30)
        hr = [v.heart_rate_bpm for v in minute_rows if v.heart_rate_bpm is not None]
        assert first["heart_rate_bpm"] == pytest.approx(sum(hr) / len(hr))
        sbp = [v.sbp_mmhg for v in minute_rows if v.sbp_mmhg is not None]
        if sbp:
            assert first["sbp_mmhg"] == pytest.approx(sum(sbp) / len(sbp))
        else:
            assert first["sbp_mmhg"] is None, "not measured stays a hole"
        live_points = [p for p, t in zip(trend, times, strict=True) if t == now]
        assert len(live_points) == 1, "the board's own live point stays, beside the stored minutes"
        assert math.isclose(live_points[0]["heart_rate_bpm"], measured.heart_rate_bpm or math.nan)
        health = (await board.http.get(f"{board.url}/api/health")).json()
        assert health["status"] in ("ok", "degraded")
        assert board.runtime.history is not None
        assert board.runtime.history.stats["ok"] == 1
        # a second open reads the store no more (the board's own trend goes on from there)
        await board.http.get(f"{board.url}/api/hospitals/HA/units/U1")
        assert board.runtime.history.stats["ok"] == 1

    # A board restarted without the store configured has only what it hears live: the contrast the store fixes.
    async with (
        board_server(mqtt_settings, topic_space) as bare,
        bus(mqtt_settings, topic_space) as (_, pub),
    ):
        feed = bare.watch("HA")
        await feed.wait_for(lambda n, d: n == "snapshot")
        await pub(Stream.ALERT, "HA", alert.model_copy(update={"seq": alert.seq + 1}))
        await feed.wait_for(lambda n, d: n == "alert" and d["alert"]["alert_id"] == "a1")
        detail = (await bare.http.get(f"{bare.url}/api/hospitals/HA/units/U1")).json()
        assert detail["trend"] == []


async def test_store_down_costs_the_older_trend_not_the_view(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    now = datetime.now(UTC)
    # nothing listens on port 9 of loopback: the store is unreachable
    url = "postgresql://postgres@127.0.0.1:9/none?connect_timeout=1"
    async with (
        board_server(mqtt_settings, topic_space, telemetry_database_url=url, history_timeout_s=2) as board,
        bus(mqtt_settings, topic_space) as (_, pub),
    ):
        feed = board.watch("HA")
        await feed.wait_for(lambda n, d: n == "snapshot")
        await pub(Stream.ALERT, "HA", hospital_alert("a1", "U1", "HA", now))
        await feed.wait_for(lambda n, d: n == "alert" and d["alert"]["alert_id"] == "a1")
        answer = await board.http.get(f"{board.url}/api/hospitals/HA/units/U1")
        assert answer.status_code == 200
        assert answer.json()["card"]["unit_id"] == "U1"
        history = board.runtime.history
        assert history is not None
        assert history.stats["failed"] + history.stats["timeout"] == 1
        assert "U1" not in board.runtime._history_loaded, "tried again on the next open"
