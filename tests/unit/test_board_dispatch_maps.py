"""The dispatch client (hospital list, open alerts for resync) with a mock transport, and the road map read from
the real Monaco extract (pyosmium); feed routing of board vs detail views."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest

from broker_config import AlertState
from hospital_board.dispatch_client import DispatchClient, DispatchUnavailableError
from hospital_board.feed import FeedHub
from hospital_board.maps import RoadMap, parse_bbox, simplify_m
from hospital_board.schemas import EventKind, RemovedEvent
from hospital_board.state import BoardEvent

NOW = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)
PBF = Path(__file__).resolve().parents[2] / "dispatch" / "data" / "monaco.osm.pbf"


def alert_row(alert_id: str, unit_id: str, created_s: float, state: str = "on_board") -> dict[str, object]:
    return {
        "alert_id": alert_id,
        "unit_id": unit_id,
        "case_type": "stemi",
        "priority": "high",
        "state": state,
        "hospital_id": "MC-CCM",
        "hospital_name": "x",
        "departments": ["cath_lab", "ed"],
        "eta_s": 60.0,
        "eta_at": (NOW + timedelta(minutes=5)).isoformat(),
        "created_at": (NOW + timedelta(seconds=created_s)).isoformat(),
        "historical": False,
        "reasons": ["24/7 PCI centre", "r" * 300],
        "future_field": 1,
    }


async def test_open_alerts_newest_per_unit_not_cancelled_with_findings() -> None:
    rows = [
        alert_row("a3", "U1", -10),
        alert_row("a2", "U2", -20, state="cancelled"),
        alert_row("a1", "U1", -3_000),
        alert_row("a0", "U3", -50_000),
        {"garbage": True},
    ]

    def dispatch(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/alerts":
            return httpx.Response(200, json=rows)
        if request.url.path == "/api/alerts/a3":
            detail = {**rows[0], "findings": {"age_years": 64, "sex": "male", "note": "chest pain", "new": 1}}
            return httpx.Response(200, json={**detail, "timeline": [], "acks": []})
        return httpx.Response(404)

    async with httpx.AsyncClient(transport=httpx.MockTransport(dispatch)) as http:
        client = DispatchClient(http, "http://dispatch")
        alerts = await client.open_alerts(NOW, max_age_s=6 * 3600)
    assert [a.alert_id for a in alerts] == ["a3"], "newest per unit, cancelled and too old left out"
    a3 = alerts[0]
    assert a3.findings.note == "chest pain"
    assert a3.state is AlertState.ON_BOARD
    assert all(len(r) <= 200 for r in a3.reasons)


async def test_dispatch_down_raises_for_alerts_and_falls_back_for_names() -> None:
    calls = 0

    def down(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(500, json={"detail": "boom"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as http:
        client = DispatchClient(http, "http://dispatch", retry_after_s=60)
        with pytest.raises(DispatchUnavailableError) as info:
            await client.open_alerts(NOW, 3600)
        assert info.value.reason == "http 500"
        assert await client.name("H1") == "H1"
        assert await client.name("H1") == "H1"
        assert calls == 2, "a failed hospital list is not re-asked on every page load"
    assert not DispatchClient(None, None).configured


def test_bbox_parsing_refuses_nonsense() -> None:
    box = parse_bbox("43.72,7.40,43.76,7.44")
    assert (box.south, box.east) == (43.72, 7.44)
    for bad in ("1,2,3", "43.76,7.40,43.72,7.44", "nan,1,2,3", "0,0,10,10", "a,b,c,d"):
        with pytest.raises(ValueError):
            parse_bbox(bad)


def test_simplify_keeps_ends_and_stays_within_tolerance() -> None:
    lat = 43.73 + np.linspace(0, 0.01, 200)
    lon = 7.42 + 0.0001 * np.sin(np.linspace(0, 20, 200))  # wiggles of ~8 m
    keep = simplify_m(lat, lon, tolerance_m=20)
    assert keep[0] == 0
    assert keep[-1] == 199
    assert len(keep) < 20
    assert len(simplify_m(lat, lon, tolerance_m=1)) > len(keep)


def test_road_map_from_the_monaco_extract() -> None:
    road_map = RoadMap.from_pbf(PBF)
    assert len(road_map) > 1_000
    bounds = road_map.bounds
    assert bounds is not None
    assert 43.6 < bounds.south < bounds.north < 43.9
    near = road_map.query(parse_bbox("43.730,7.415,43.745,7.435"))
    kinds = {w.kind for w in near.ways}
    assert kinds == {"major", "secondary", "minor"}
    assert all(len(w.points) >= 2 for w in near.ways)
    assert all(43.5 < lat < 44 and 7 < lon < 8 for w in near.ways for lat, lon in w.points)
    wide = road_map.query(parse_bbox("43.0,7.0,44.0,8.0"))
    assert {w.kind for w in wide.ways} == {"major"}, "zoomed out: major roads only"
    capped = road_map.query(parse_bbox("43.730,7.415,43.745,7.435"), max_points=50)
    assert capped.truncated


def test_detail_feeds_get_their_unit_only_and_every_lead_board_feeds_the_first_lead() -> None:
    hub = FeedHub()
    board = hub.connect("HA")
    detail = hub.connect("HA", "U1")

    def ev(kind: EventKind, unit_id: str) -> BoardEvent:
        return BoardEvent(kind, frozenset({"HA"}), unit_id, RemovedEvent(server_time=NOW, unit_id=unit_id))

    hub.publish([ev(k, u) for u in ("U1", "U2") for k in (EventKind.ECG, EventKind.ECG_LEADS, EventKind.VITALS)])

    def kinds(feed_bytes: bytes) -> list[tuple[str, str]]:
        out = []
        for block in feed_bytes.decode().split("\n\n"):
            if block:
                name, data = block.split("\n")
                out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))["unit_id"]))
        return out

    assert kinds(board.take()) == [("ecg", "U1"), ("vitals", "U1"), ("ecg", "U2"), ("vitals", "U2")]
    assert kinds(detail.take()) == [("ecg_leads", "U1"), ("vitals", "U1")]
