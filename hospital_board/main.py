"""Composition root of the board service: ``create_app(settings) -> FastAPI``.

The lifespan owns the one MQTT link of the process (STYLE.md: one client per process, created in the lifespan and
injected) and runs, in one ``asyncio.TaskGroup``: the link's receive loop, the ingest worker, the ``on_board``
receipt publisher, the alert resync from dispatch, the staleness sweep and a periodic prune.  HTTP:

Pages (every asset served by the app itself; no CDN, no external font):

* ``GET /``                                  the big-screen board (``?hospital=ID``, else the default hospital)
* ``GET /unit/{unit_id}?hospital=ID``        one patient's detail view (ECG leads, trends, map, timeline)
* ``GET /phone?hospital=ID&unit=UNIT``       the phone view (one ECG strip, Acknowledge)

API:

* ``GET /api/hospitals/{id}/snapshot``              :class:`~hospital_board.schemas.BoardSnapshot`
* ``GET /api/hospitals/{id}/units/{unit_id}``       :class:`~hospital_board.schemas.DetailSnapshot` (404 unless
  the unit is inbound to that hospital)
* ``GET /api/events?hospital=ID[&unit=UNIT]``       server-sent events (see :mod:`hospital_board.feed`)
* ``POST /api/alerts/{alert_id}/ack``               acknowledge one ``department`` or (without it) every page;
  publishes ``AlertAck(acknowledged)`` on the hospital's ack stream (404 unknown alert, 409 another hospital's,
  closed, or a department the alert did not activate, 503 broker link down)
* ``GET /api/units/{unit_id}/route?hospital=ID``    road route unit -> hospital from dispatch (409 no position,
  503 dispatch unavailable)
* ``GET /api/units/{unit_id}/timeline?hospital=ID`` the case timeline: the board's own time points merged with
  dispatch's (``dispatch_available`` False when dispatch did not answer)
* ``GET /api/map/roads?bbox=S,W,N,E``               simplified road polylines from the local OSM extract
* ``GET /api/health``                               link state, counters
"""

from __future__ import annotations

import asyncio
import html
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated

import httpx
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from broker_config import AlertState, Department, TopicSpace, utc_now
from broker_config.connection import MqttLink, NotConnectedError
from broker_config.topics import ID_PATTERN
from hospital_board.dispatch_client import DispatchClient, DispatchUnavailableError, RouteInfo
from hospital_board.feed import FeedHub, SseResponse, sse_frame
from hospital_board.maps import RoadMap, RoadsPublic, parse_bbox
from hospital_board.schemas import BoardSnapshot, DetailSnapshot, EventKind, TimelineEntryPublic
from hospital_board.settings import BoardSettings
from hospital_board.sources import AlertResync, BoardIngest
from hospital_board.state import (
    AlertClosedError,
    AlertPublic,
    BoardError,
    BoardState,
    NotActivatedError,
    NotInboundError,
    UnknownAlertError,
    WrongHospitalError,
    valid_position,
)

__all__ = ["AckCreate", "BoardRuntime", "HealthPublic", "RoutePublic", "TimelinePublic", "create_app"]

logger = logging.getLogger(__name__)

_PRUNE_EVERY_S = 60.0
_ROUTE_REUSE_S = 10.0
_ROUTE_MAX_AGE_S = 60.0
_ROUTE_MOVED_M = 50.0
_STATIC = Path(__file__).resolve().parent / "static"
"""The page's files, shipped inside the package (package-data), served by the app itself: no CDN."""


class AckCreate(BaseModel):
    """Body of ``POST /api/alerts/{alert_id}/ack``: without ``department``, every open page is acknowledged."""

    model_config = ConfigDict(extra="forbid")

    hospital_id: Annotated[str, Field(pattern=ID_PATTERN.pattern)]
    by_role: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_ -]+$")] = "ed_staff"
    department: Department | None = None


class HealthPublic(BaseModel):
    """``GET /api/health``: ``status`` is ``ok`` while the broker link is up, else ``degraded``."""

    status: str
    mqtt_connected: bool
    mqtt_sessions: int
    boards: int
    backlog: int
    accepted: dict[str, int]
    rejects: dict[str, int]
    board_disconnects: dict[str, int]
    receipts_sent: int
    resyncs_ok: int = 0
    resync_failures: int = 0
    map_ways: int | None = None


class RoutePublic(BaseModel):
    """A road route from the unit's last validated position to the hospital (dispatch's router)."""

    unit_id: str
    hospital_id: str
    from_deg: tuple[float, float]
    to_deg: tuple[float, float]
    points_deg: list[tuple[float, float]]
    distance_m: float
    duration_s: float
    position_age_s: float | None
    fix_lost: bool


class TimelinePublic(BaseModel):
    """The case timeline, oldest first."""

    unit_id: str
    hospital_id: str
    entries: list[TimelineEntryPublic]
    dispatch_available: bool


@dataclass
class _RouteCache:
    at_s: float
    from_deg: tuple[float, float]
    route: RouteInfo


@dataclass
class BoardRuntime:
    """Everything the routes share, created by :func:`create_app` and started by its lifespan."""

    settings: BoardSettings
    space: TopicSpace
    state: BoardState
    hub: FeedHub
    link: MqttLink
    ingest: BoardIngest
    clock: Callable[[], datetime]
    directory: DispatchClient = field(default_factory=lambda: DispatchClient(None, None))
    resync: AlertResync | None = None
    road_map: RoadMap | None = None
    map_error: str | None = None
    _map_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _routes: dict[tuple[str, str], _RouteCache] = field(default_factory=dict)

    async def roads(self) -> RoadMap | None:
        """The road map, read from the extract on first use (off the event loop), or None if unavailable."""
        if self.road_map is not None or self.map_error is not None:
            return self.road_map
        async with self._map_lock:
            if self.road_map is None and self.map_error is None:
                path = self.settings.map_pbf
                if path is None or not path.exists():
                    self.map_error = "no map extract configured"
                else:
                    try:
                        self.road_map = await asyncio.to_thread(RoadMap.from_pbf, path)
                        logger.info("road map loaded ways=%d", len(self.road_map))
                    except (OSError, RuntimeError) as exc:
                        self.map_error = type(exc).__name__
                        logger.warning("road map unavailable reason=%s", self.map_error)
        return self.road_map


def get_runtime(request: Request) -> BoardRuntime:
    """Dependency: the app's :class:`BoardRuntime`."""
    runtime: BoardRuntime = request.app.state.board
    return runtime


RuntimeDep = Annotated[BoardRuntime, Depends(get_runtime)]
HospitalQuery = Annotated[str | None, Query(pattern=ID_PATTERN.pattern, description="hospital id")]
UnitQuery = Annotated[str | None, Query(pattern=ID_PATTERN.pattern, description="unit id")]
HospitalPath = Annotated[str, PathParam(pattern=ID_PATTERN.pattern)]
UnitPath = Annotated[str, PathParam(pattern=ID_PATTERN.pattern)]
AlertPath = Annotated[str, PathParam(pattern=ID_PATTERN.pattern)]


def create_app(
    settings: BoardSettings,
    *,
    link: MqttLink | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> FastAPI:
    """Build the board service.

    Args:
        settings: the service settings (broker, topic prefix, default hospital, staleness, feed bounds).
        link: a not-yet-running :class:`MqttLink` to use (tests); by default one is created with client id
            ``goldenhour-board-<random>`` and a clean session.  Either way the app's lifespan runs it.
        clock: UTC clock (tests).

    Returns:
        The FastAPI application; serve it with uvicorn (``timeout_graceful_shutdown`` set, since event streams
        stay open until the server gives up on them).
    """
    space = TopicSpace(settings.topic_prefix or settings.broker.topic_prefix)
    if link is None:
        link = MqttLink(settings.broker, client_id=f"goldenhour-board-{secrets.token_hex(4)}", clean_session=True)
    state = BoardState(
        stale_after_s=settings.stale_after_s,
        ecg_window_s=settings.ecg_window_s,
        nibp_stale_after_s=settings.nibp_stale_after_s,
        gps_stale_after_s=settings.gps_stale_after_s,
        ecg_lost_after_s=settings.ecg_lost_after_s,
        trend_step_s=settings.trend_step_s,
        trend_max_points=settings.trend_max_points,
        alert_retention_s=settings.alert_retention_s,
        unit_retention_s=settings.unit_retention_s,
    )
    hub = FeedHub(max_items=settings.client_queue_items, max_lag_s=settings.client_max_lag_s)
    ingest = BoardIngest(
        state,
        hub,
        space,
        link,
        queue_items=settings.ingest_queue_items,
        publish_timeout_s=settings.publish_timeout_s,
        clock=clock,
    )
    runtime = BoardRuntime(settings, space, state, hub, link, ingest, clock)
    pages = {name: (_STATIC / f"{name}.html").read_text(encoding="utf-8") for name in ("board", "detail", "phone")}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=settings.dispatch_timeout_s) as http:
            if not runtime.directory.configured:
                runtime.directory = DispatchClient(
                    http,
                    str(settings.dispatch_url) if settings.dispatch_url else None,
                    timeout_s=settings.dispatch_timeout_s,
                )
            resync = AlertResync(
                runtime.directory,
                ingest,
                max_age_s=settings.resync_max_age_s,
                retry_min_s=settings.resync_retry_min_s,
                retry_max_s=settings.resync_retry_max_s,
            )
            runtime.resync = resync
            ingest.on_session = resync.trigger
            resync.trigger()  # at start-up, whether or not the broker is reachable yet
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(runtime.link.run(ingest.on_connect, ingest.on_message), name="board-mqtt"),
                    tg.create_task(ingest.run(), name="board-ingest"),
                    tg.create_task(ingest.run_receipts(), name="board-receipts"),
                    tg.create_task(resync.run(), name="board-resync"),
                    tg.create_task(_sweep_forever(runtime), name="board-sweep"),
                    tg.create_task(_prune_forever(runtime), name="board-prune"),
                ]
                try:
                    yield
                finally:
                    hub.close_all()
                    for task in tasks:
                        task.cancel()

    app = FastAPI(title="GoldenHour ED board", lifespan=lifespan)
    app.state.board = runtime
    app.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")

    async def render(name: str, hospital_id: str, unit_id: str = "") -> HTMLResponse:
        hospital_name = await runtime.directory.name(hospital_id)
        page = (
            pages[name]
            .replace("{{HOSPITAL_ID}}", html.escape(hospital_id, quote=True))
            .replace("{{HOSPITAL_NAME}}", html.escape(hospital_name, quote=True))
            .replace("{{UNIT_ID}}", html.escape(unit_id, quote=True))
        )
        return HTMLResponse(page, headers={"Cache-Control": "no-store", "Content-Security-Policy": _CSP})

    @app.get("/", response_class=HTMLResponse)
    async def board_page(rt: RuntimeDep, hospital: HospitalQuery = None) -> HTMLResponse:
        return await render("board", hospital or rt.settings.default_hospital_id)

    @app.get("/unit/{unit_id}", response_class=HTMLResponse)
    async def detail_page(rt: RuntimeDep, unit_id: UnitPath, hospital: HospitalQuery = None) -> HTMLResponse:
        return await render("detail", hospital or rt.settings.default_hospital_id, unit_id)

    @app.get("/phone", response_class=HTMLResponse)
    async def phone_page(
        rt: RuntimeDep, unit: Annotated[str, Query(pattern=ID_PATTERN.pattern)], hospital: HospitalQuery = None
    ) -> HTMLResponse:
        return await render("phone", hospital or rt.settings.default_hospital_id, unit)

    @app.get("/api/hospitals/{hospital_id}/snapshot")
    async def snapshot(rt: RuntimeDep, hospital_id: HospitalPath) -> BoardSnapshot:
        return rt.state.snapshot(hospital_id, rt.clock())

    @app.get("/api/hospitals/{hospital_id}/units/{unit_id}", responses={404: {"description": "not inbound"}})
    async def detail(rt: RuntimeDep, hospital_id: HospitalPath, unit_id: UnitPath) -> DetailSnapshot:
        try:
            return rt.state.detail(hospital_id, unit_id, rt.clock())
        except NotInboundError:
            raise HTTPException(404, "unit is not inbound to this hospital") from None

    @app.get("/api/events")
    async def events(rt: RuntimeDep, hospital: HospitalQuery = None, unit: UnitQuery = None) -> SseResponse:
        hospital_id = hospital or rt.settings.default_hospital_id
        now_at = rt.clock()
        if unit is None:
            first = sse_frame(EventKind.SNAPSHOT, rt.state.snapshot(hospital_id, now_at))
        else:
            try:
                first = sse_frame(EventKind.DETAIL, rt.state.detail(hospital_id, unit, now_at))
            except NotInboundError:
                raise HTTPException(404, "unit is not inbound to this hospital") from None
        client = rt.hub.connect(hospital_id, unit)
        return SseResponse(
            rt.hub,
            client,
            first,
            heartbeat_s=rt.settings.heartbeat_s,
            send_timeout_s=rt.settings.send_timeout_s,
            server_clock=rt.clock,
        )

    @app.post("/api/alerts/{alert_id}/ack")
    async def acknowledge(rt: RuntimeDep, alert_id: AlertPath, body: AckCreate) -> AlertPublic:
        try:
            alert = rt.state.check_ack(alert_id, body.hospital_id, body.department)
        except UnknownAlertError:
            raise HTTPException(404, "unknown alert") from None
        except (WrongHospitalError, AlertClosedError, NotActivatedError) as exc:
            raise HTTPException(409, _conflict(exc)) from None
        if rt.state.is_acknowledged(alert_id, body.department):
            return rt.state.alert(alert_id, rt.clock())
        now_at = rt.clock()
        try:
            await rt.ingest.publish_ack(
                alert_id=alert_id,
                unit_id=alert.unit_id,
                hospital_id=body.hospital_id,
                state=AlertState.ACKNOWLEDGED,
                by_role=body.by_role,
                at=now_at,
                department=body.department,
            )
        except NotConnectedError:
            raise HTTPException(503, "broker link down: acknowledgement not delivered, try again") from None
        logger.info(
            "alert acknowledged alert=%s hospital=%s role=%s department=%s",
            alert_id,
            body.hospital_id,
            body.by_role,
            body.department.value if body.department else "all",
        )
        try:
            rt.hub.publish(rt.state.acknowledge(alert_id, body.hospital_id, body.by_role, now_at, body.department))
        except BoardError as exc:
            raise HTTPException(409, _conflict(exc)) from None
        return rt.state.alert(alert_id, rt.clock())

    @app.get("/api/units/{unit_id}/route", responses={409: {"description": "no position"}, 503: {}})
    async def route(rt: RuntimeDep, unit_id: UnitPath, hospital: HospitalQuery = None) -> RoutePublic:
        hospital_id = hospital or rt.settings.default_hospital_id
        now_at = rt.clock()
        try:
            card = rt.state.detail(hospital_id, unit_id, now_at).card
        except NotInboundError:
            raise HTTPException(404, "unit is not inbound to this hospital") from None
        pos = card.position
        if not pos.has_position or not valid_position(pos.lat_deg, pos.lon_deg):
            raise HTTPException(409, "no position")
        start = (float(pos.lat_deg or 0.0), float(pos.lon_deg or 0.0))  # both present: valid_position checked
        target = await rt.directory.position(hospital_id)
        if target is None:
            raise HTTPException(503, "hospital position unknown (dispatch unavailable)")
        route_info = await _route(rt, unit_id, hospital_id, start, target)
        return RoutePublic(
            unit_id=unit_id,
            hospital_id=hospital_id,
            from_deg=start,
            to_deg=target,
            points_deg=route_info.points_deg,
            distance_m=route_info.distance_m,
            duration_s=route_info.duration_s,
            position_age_s=pos.age_s,
            fix_lost=pos.fix_lost,
        )

    @app.get("/api/units/{unit_id}/timeline")
    async def timeline(rt: RuntimeDep, unit_id: UnitPath, hospital: HospitalQuery = None) -> TimelinePublic:
        hospital_id = hospital or rt.settings.default_hospital_id
        try:
            card = rt.state.detail(hospital_id, unit_id, rt.clock()).card
        except NotInboundError:
            raise HTTPException(404, "unit is not inbound to this hospital") from None
        entries = rt.state.timeline(hospital_id, unit_id)
        available = rt.directory.configured
        for alert in card.alerts:
            try:
                items = await rt.directory.timeline(alert.alert_id)
            except DispatchUnavailableError:
                available = False
                continue
            entries.extend(
                TimelineEntryPublic(at=i.at, kind=i.kind, detail=i.detail[:200], source=f"dispatch/{i.source}")
                for i in items
            )
        entries.sort(key=lambda e: e.at)
        return TimelinePublic(unit_id=unit_id, hospital_id=hospital_id, entries=entries, dispatch_available=available)

    @app.get("/api/map/roads", responses={422: {"description": "bad bbox"}, 503: {"description": "no map"}})
    async def roads(
        rt: RuntimeDep, bbox: Annotated[str, Query(description="south,west,north,east in degrees")]
    ) -> RoadsPublic:
        try:
            box = parse_bbox(bbox)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        road_map = await rt.roads()
        if road_map is None:
            raise HTTPException(503, rt.map_error or "no map")
        return await asyncio.to_thread(road_map.query, box)

    @app.get("/api/health")
    async def health(rt: RuntimeDep) -> HealthPublic:
        up = rt.link.connected.is_set()
        return HealthPublic(
            status="ok" if up else "degraded",
            mqtt_connected=up,
            mqtt_sessions=rt.link.sessions,
            boards=rt.hub.count(),
            backlog=rt.ingest.backlog,
            accepted=dict(rt.ingest.accepted),
            rejects=dict(rt.ingest.rejects),
            board_disconnects=dict(rt.hub.disconnects),
            receipts_sent=rt.ingest.receipts_sent,
            resyncs_ok=rt.resync.runs_ok if rt.resync else 0,
            resync_failures=rt.resync.failures if rt.resync else 0,
            map_ways=len(rt.road_map) if rt.road_map is not None else None,
        )

    return app


_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "media-src 'none'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
"""No inline script, no external origin: even an injected tag could not run (defence in depth for FF-16)."""


def _conflict(exc: Exception) -> str:
    if isinstance(exc, WrongHospitalError):
        return "alert is addressed to another hospital"
    if isinstance(exc, NotActivatedError):
        return "department not activated by this alert"
    return "alert is closed (cancelled or handed over)"


def _distance_m(a: tuple[float, float], b: tuple[float, float]) -> float:
    k = math.cos(math.radians((a[0] + b[0]) / 2))
    return math.hypot(math.radians(b[0] - a[0]), math.radians(b[1] - a[1]) * k) * 6_371_008.8


async def _route(
    rt: BoardRuntime, unit_id: str, hospital_id: str, start: tuple[float, float], target: tuple[float, float]
) -> RouteInfo:
    key = (unit_id, hospital_id)
    cached = rt._routes.get(key)
    now_s = time.monotonic()
    if cached is not None:
        age = now_s - cached.at_s
        if age < _ROUTE_REUSE_S or (age < _ROUTE_MAX_AGE_S and _distance_m(cached.from_deg, start) < _ROUTE_MOVED_M):
            return cached.route
    try:
        info = await rt.directory.route(start, target)
    except DispatchUnavailableError as exc:
        if cached is not None:
            return cached.route
        raise HTTPException(503, f"no route (dispatch: {exc.reason})") from None
    rt._routes[key] = _RouteCache(now_s, start, info)
    if len(rt._routes) > 1_000:
        rt._routes.pop(next(iter(rt._routes)))
    return info


async def _sweep_forever(runtime: BoardRuntime) -> None:
    while True:
        await asyncio.sleep(runtime.settings.sweep_s)
        runtime.hub.publish(runtime.state.sweep(runtime.clock()))


async def _prune_forever(runtime: BoardRuntime) -> None:
    while True:
        await asyncio.sleep(_PRUNE_EVERY_S)
        removed = runtime.state.prune(runtime.clock())
        if removed:
            logger.info("board pruned entries=%d", removed)
