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
* ``GET /api/events?hospital=ID[&unit=UNIT][&feed=KEY]``  server-sent events (see :mod:`hospital_board.feed`);
  ``feed``: the page's own random key (16-64 of ``[A-Za-z0-9_-]``) for a board feed, for the next route
* ``PUT /api/events/{feed}/strips``                 :class:`StripsPut`: the units whose ECG strips the board with
  that feed key has on screen; its feed then carries only their ECG (:class:`StripsPublic`; 404 when no board feed
  of the viewer's is connected under that key)
* ``POST /api/alerts/{alert_id}/ack``               acknowledge one ``department`` or (without it) every page;
  publishes ``AlertAck(acknowledged)`` on the hospital's ack stream (404 unknown alert, 409 another hospital's,
  closed, or a department the alert did not activate, 503 broker link down)
* ``GET /api/units/{unit_id}/route?hospital=ID``    road route unit -> hospital from dispatch (409 no position,
  503 dispatch unavailable)
* ``GET /api/units/{unit_id}/timeline?hospital=ID`` the case timeline: the board's own time points merged with
  dispatch's (``dispatch_available`` False when dispatch did not answer)
* ``GET /api/map/roads?bbox=S,W,N,E``               simplified road polylines from the local OSM extract
* ``GET /api/health``                               link state, counters (no sign-in needed)
* ``POST /api/auth/login|refresh|logout``, ``GET /api/auth/me``, ``GET /login``  sign-in (forwarded to dispatch;
  the tokens come back as HttpOnly cookies, see :mod:`hospital_board.security`)

Every page and API route but health and sign-in needs a valid token (pages redirect to ``/login``, the API answers
401) and a role and hospital that may see it (403); reads of patient data and acknowledgements are audited.
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
from datetime import datetime, timedelta
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from broker_config import AlertState, Department, TopicSpace, utc_now
from broker_config.connection import NotConnectedError
from broker_config.identity import BOARD_ACCESS_COOKIE, BOARD_REFRESH_COOKIE, Claims, Role, TokenError, verify_token
from broker_config.paho_link import PahoLink
from broker_config.topics import ID_PATTERN
from broker_config.web import BodyLimitMiddleware, sign_in_script
from hospital_board.dispatch_client import DispatchClient, DispatchUnavailableError, RouteInfo
from hospital_board.feed import FeedHub, SseResponse, sse_frame
from hospital_board.history import StoreTrends
from hospital_board.maps import RoadMap, RoadsPublic, parse_bbox
from hospital_board.schemas import BoardSnapshot, DetailSnapshot, EventKind, TimelineEntryPublic
from hospital_board.security import (
    ACK_ROLES,
    AuditReporter,
    BoardSecurity,
    Viewer,
    ViewerDep,
    check_hospital,
    check_unit,
    forbidden,
    viewer_or_none,
)
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

__all__ = [
    "AckCreate",
    "BoardRuntime",
    "HealthPublic",
    "RoutePublic",
    "StripsPublic",
    "StripsPut",
    "TimelinePublic",
    "create_app",
]

logger = logging.getLogger(__name__)

_PRUNE_EVERY_S = 60.0
_REVOCATIONS_EVERY_S = 5.0
"""How often the board asks dispatch for ended sessions: a token signed out at dispatch works here at most this
long (plus a request's time)."""
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
    """Ignored (kept so older pages still validate): who acknowledged and in which role come from the token."""
    department: Department | None = None


FEED_KEY_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"
"""A board page's own key for its feed (random, chosen by the page)."""


class StripsPut(BaseModel):
    """Body of ``PUT /api/events/{feed}/strips``: the units whose strips the board has on screen (at most 200)."""

    model_config = ConfigDict(extra="forbid")

    hospital_id: Annotated[str, Field(pattern=ID_PATTERN.pattern)]
    units: Annotated[list[Annotated[str, Field(pattern=ID_PATTERN.pattern)]], Field(max_length=200)]


class StripsPublic(BaseModel):
    """Answer to ``PUT /api/events/{feed}/strips``.

    ``server_time``: when the feed changed (server clock): an ``ecg`` event of a unit the board no longer receives
    that is still on its way carries an older ``server_time``.  ``queued``: ECG events queued for the units coming
    into view (their last window).
    """

    server_time: datetime
    units: int
    queued: int


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
    audit_backlog: int = 0
    audit_dropped: int = 0


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
    link: PahoLink
    ingest: BoardIngest
    clock: Callable[[], datetime]
    security: BoardSecurity
    audit: AuditReporter
    directory: DispatchClient = field(default_factory=lambda: DispatchClient(None, None))
    resync: AlertResync | None = None
    road_map: RoadMap | None = None
    map_error: str | None = None
    _map_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _routes: dict[tuple[str, str], _RouteCache] = field(default_factory=dict)
    history: StoreTrends | None = None
    """The telemetry store's vitals (``EMS_BOARD_TELEMETRY_DATABASE_URL``), or None: in-memory trends only."""
    _history_loaded: set[str] = field(default_factory=set)

    async def load_trend_history(self, unit_id: str) -> None:
        """Fill the unit's trend from the telemetry store, since first contact (the alert's ``fmc_at``; without
        one, as far back as the trend holds), once per unit and board process: after a board restart the detail
        view shows the whole course, not only what arrived since.  A store that does not answer is retried on the
        next open (see :class:`hospital_board.history.StoreTrends`)."""
        if self.history is None or unit_id in self._history_loaded:
            return
        state = self.state
        since = state.first_contact_at(unit_id) or self.clock() - timedelta(
            seconds=state.trend_step_s * state.trend_max_points
        )
        points = await self.history.points(unit_id, since)
        if points is None:
            return
        added = state.merge_trend(unit_id, points, bin_s=self.history.bin_s)
        self._history_loaded.add(unit_id)
        logger.info("trend history merged unit=%s points=%d", unit_id, added)

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
FeedQuery = Annotated[str | None, Query(pattern=FEED_KEY_PATTERN, description="the board page's key for its feed")]
FeedPath = Annotated[str, PathParam(pattern=FEED_KEY_PATTERN)]


class LoginCreate(BaseModel):
    """Body of ``POST /api/auth/login`` (forwarded to dispatch)."""

    model_config = ConfigDict(extra="forbid")

    username: Annotated[str, Field(min_length=1, max_length=64)]
    password: Annotated[str, Field(min_length=1, max_length=256)]
    totp: Annotated[str, Field(pattern=r"^[0-9]{6}$")] | None = None


class PrincipalPublic(BaseModel):
    """Who is signed in, until when."""

    username: str
    role: Role
    hospital_id: str | None
    unit_id: str | None
    expires_at: datetime


def _principal(claims: Claims) -> PrincipalPublic:
    return PrincipalPublic(
        username=claims.sub,
        role=claims.role,
        hospital_id=claims.hospital_id,
        unit_id=claims.unit_id,
        expires_at=claims.expires_at,
    )


def _no_cookie_jar() -> CookieJar:
    """The board's HTTP client to dispatch keeps no cookies: people's session cookies must never stick to it."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def create_app(
    settings: BoardSettings,
    *,
    link: PahoLink | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> FastAPI:
    """Build the board service.

    Args:
        settings: the service settings (broker, topic prefix, default hospital, staleness, feed bounds).
        link: a not-yet-running :class:`broker_config.paho_link.PahoLink` to use (tests); by default one is
            created with client id ``goldenhour-board-<random>`` and a clean session.  Either way the app's
            lifespan runs it.
        clock: UTC clock (tests).

    Returns:
        The FastAPI application; serve it with uvicorn (``timeout_graceful_shutdown`` set, since event streams
        stay open until the server gives up on them).
    """
    space = TopicSpace(settings.topic_prefix or settings.broker.topic_prefix)
    if link is None:
        link = PahoLink(settings.broker, client_id=f"goldenhour-board-{secrets.token_hex(4)}", clean_session=True)
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
    security = BoardSecurity.from_texts(
        settings.security_mode, settings.verify_keys, cookie_secure=settings.cookie_secure, clock=clock
    )
    audit = AuditReporter(None, max_items=settings.audit_queue_items, errors=(DispatchUnavailableError,))
    runtime = BoardRuntime(settings, space, state, hub, link, ingest, clock, security, audit)
    if settings.telemetry_database_url:
        runtime.history = StoreTrends(settings.telemetry_database_url, timeout_s=settings.history_timeout_s)
    pages = {
        name: (_STATIC / f"{name}.html").read_text(encoding="utf-8") for name in ("board", "detail", "phone", "login")
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=settings.dispatch_timeout_s, cookies=_no_cookie_jar()) as http:
            if not runtime.directory.configured:
                secret = settings.dispatch_client_secret
                runtime.directory = DispatchClient(
                    http,
                    str(settings.dispatch_url) if settings.dispatch_url else None,
                    timeout_s=settings.dispatch_timeout_s,
                    credentials=(settings.dispatch_client_id, secret.get_secret_value())
                    if settings.dispatch_client_id and secret
                    else None,
                )
            if runtime.directory.configured and settings.dispatch_client_id and runtime.audit.sink is None:
                runtime.audit.sink = runtime.directory.report_audit
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
                    tg.create_task(_revocations_forever(runtime), name="board-revocations"),
                    tg.create_task(runtime.audit.run(), name="board-audit"),
                ]
                try:
                    yield
                finally:
                    hub.close_all()
                    for task in tasks:
                        task.cancel()
                    if runtime.history is not None:
                        await runtime.history.close()

    app = FastAPI(title="GoldenHour ED board", lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware)
    app.state.board = runtime

    @app.get("/static/login.js", include_in_schema=False)
    async def sign_in_page_script() -> Response:
        """The sign-in script shared with dispatch's console (declared before the mount, which would shadow it)."""
        return Response(sign_in_script(), media_type="text/javascript; charset=utf-8")

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

    def hospital_for(rt: BoardRuntime, viewer: Viewer, hospital: str | None) -> str:
        """The asked hospital, else the viewer's own, else the board's default."""
        return hospital or viewer.claims.hospital_id or rt.settings.default_hospital_id

    def sign_in_redirect(request: Request) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    def denied(rt: BoardRuntime, viewer: Viewer, hospital_id: str, unit_id: str | None, what: str) -> None:
        rt.audit.report(
            viewer, "access.denied", at=rt.clock(), hospital_id=hospital_id, unit_id=unit_id,
            object_type="unit" if unit_id else "hospital", object_id=unit_id or hospital_id, outcome="denied",
            detail=what,
        )  # fmt: skip

    def guard_hospital(rt: BoardRuntime, viewer: Viewer, hospital_id: str, what: str) -> None:
        try:
            check_hospital(viewer, hospital_id)
        except HTTPException:
            denied(rt, viewer, hospital_id, None, what)
            raise

    def guard_unit(rt: BoardRuntime, viewer: Viewer, hospital_id: str, unit_id: str, what: str) -> None:
        try:
            check_unit(viewer, hospital_id, unit_id)
        except HTTPException:
            denied(rt, viewer, hospital_id, unit_id, what)
            raise

    def audit_units(rt: BoardRuntime, viewer: Viewer, action: str, hospital_id: str, units: list[Any]) -> None:
        """One audit event per patient shown (``units``: cards), or one for the hospital when none is inbound."""
        at = rt.clock()
        for card in units:
            alert_id = card.alerts[0].alert_id if card.alerts else None
            rt.audit.report(
                viewer, action, at=at, hospital_id=hospital_id, unit_id=card.unit_id, alert_id=alert_id,
                object_type="unit", object_id=card.unit_id,
            )  # fmt: skip
        if not units:
            rt.audit.report(
                viewer, action, at=at, hospital_id=hospital_id, object_type="hospital", object_id=hospital_id,
                detail="no inbound patients",
            )  # fmt: skip

    @app.get("/login", response_class=HTMLResponse)
    async def login_page() -> HTMLResponse:
        return HTMLResponse(pages["login"], headers={"Cache-Control": "no-store", "Content-Security-Policy": _CSP})

    @app.get("/", response_class=HTMLResponse, response_model=None)
    async def board_page(request: Request, rt: RuntimeDep, hospital: HospitalQuery = None) -> Response:
        viewer = viewer_or_none(request)
        if viewer is None:
            return sign_in_redirect(request)
        hospital_id = hospital_for(rt, viewer, hospital)
        guard_hospital(rt, viewer, hospital_id, "board page")
        return await render("board", hospital_id)

    @app.get("/unit/{unit_id}", response_class=HTMLResponse, response_model=None)
    async def detail_page(
        request: Request, rt: RuntimeDep, unit_id: UnitPath, hospital: HospitalQuery = None
    ) -> Response:
        viewer = viewer_or_none(request)
        if viewer is None:
            return sign_in_redirect(request)
        hospital_id = hospital_for(rt, viewer, hospital)
        guard_unit(rt, viewer, hospital_id, unit_id, "detail page")
        return await render("detail", hospital_id, unit_id)

    @app.get("/phone", response_class=HTMLResponse, response_model=None)
    async def phone_page(
        request: Request,
        rt: RuntimeDep,
        unit: Annotated[str, Query(pattern=ID_PATTERN.pattern)],
        hospital: HospitalQuery = None,
    ) -> Response:
        viewer = viewer_or_none(request)
        if viewer is None:
            return sign_in_redirect(request)
        hospital_id = hospital_for(rt, viewer, hospital)
        guard_unit(rt, viewer, hospital_id, unit, "phone page")
        return await render("phone", hospital_id, unit)

    @app.get("/api/hospitals/{hospital_id}/snapshot", responses={401: {}, 403: {}})
    async def snapshot(rt: RuntimeDep, viewer: ViewerDep, hospital_id: HospitalPath) -> BoardSnapshot:
        guard_hospital(rt, viewer, hospital_id, "snapshot")
        snap = rt.state.snapshot(hospital_id, rt.clock())
        audit_units(rt, viewer, "board.snapshot.read", hospital_id, list(snap.cards))
        return snap

    @app.get(
        "/api/hospitals/{hospital_id}/units/{unit_id}",
        responses={401: {}, 403: {}, 404: {"description": "not inbound"}},
    )
    async def detail(rt: RuntimeDep, viewer: ViewerDep, hospital_id: HospitalPath, unit_id: UnitPath) -> DetailSnapshot:
        guard_unit(rt, viewer, hospital_id, unit_id, "detail")
        await rt.load_trend_history(unit_id)
        try:
            found = rt.state.detail(hospital_id, unit_id, rt.clock())
        except NotInboundError:
            raise HTTPException(404, "unit is not inbound to this hospital") from None
        audit_units(rt, viewer, "board.detail.read", hospital_id, [found.card])
        return found

    @app.get("/api/events", responses={401: {}, 403: {}})
    async def events(
        rt: RuntimeDep,
        viewer: ViewerDep,
        hospital: HospitalQuery = None,
        unit: UnitQuery = None,
        feed: FeedQuery = None,
    ) -> SseResponse:
        hospital_id = hospital_for(rt, viewer, hospital)
        now_at = rt.clock()
        if unit is None:
            guard_hospital(rt, viewer, hospital_id, "feed")
            snap = rt.state.snapshot(hospital_id, now_at)
            first = sse_frame(EventKind.SNAPSHOT, snap)
            shown = list(snap.cards)
        else:
            guard_unit(rt, viewer, hospital_id, unit, "feed")
            await rt.load_trend_history(unit)
            now_at = rt.clock()
            try:
                detail_snap = rt.state.detail(hospital_id, unit, now_at)
            except NotInboundError:
                raise HTTPException(404, "unit is not inbound to this hospital") from None
            first = sse_frame(EventKind.DETAIL, detail_snap)
            shown = [detail_snap.card]
        audit_units(rt, viewer, "board.feed.subscribe", hospital_id, shown)
        client = rt.hub.connect(hospital_id, unit, key=feed, owner=viewer.claims.sub)
        started = time.monotonic()

        async def ended() -> None:
            rt.audit.report(
                viewer, "board.feed.end", at=rt.clock(), hospital_id=hospital_id, unit_id=unit,
                object_type="unit" if unit else "hospital", object_id=unit or hospital_id,
                detail=f"seconds={time.monotonic() - started:.0f} reason={(client.close_reason or 'end')[:40]}",
            )  # fmt: skip

        return SseResponse(
            rt.hub,
            client,
            first,
            heartbeat_s=rt.settings.heartbeat_s,
            send_timeout_s=rt.settings.send_timeout_s,
            server_clock=rt.clock,
            background=BackgroundTask(ended),
            expires_at=viewer.claims.expires_at,
        )

    @app.put("/api/events/{feed}/strips", responses={401: {}, 403: {}, 404: {}})
    async def strips(rt: RuntimeDep, viewer: ViewerDep, feed: FeedPath, body: StripsPut) -> StripsPublic:
        guard_hospital(rt, viewer, body.hospital_id, "feed")
        client = rt.hub.feed(feed)
        if client is None or client.hospital_id != body.hospital_id or client.owner != viewer.claims.sub:
            raise HTTPException(404, "no board feed of yours under this key")
        now_at = rt.clock()
        queued = rt.hub.set_strips(client, body.units, lambda u: rt.state.ecg_events(body.hospital_id, u, now_at))
        return StripsPublic(server_time=now_at, units=len(client.ecg_units or ()), queued=queued)

    @app.post("/api/alerts/{alert_id}/ack", responses={401: {}, 403: {}})
    async def acknowledge(rt: RuntimeDep, viewer: ViewerDep, alert_id: AlertPath, body: AckCreate) -> AlertPublic:
        if viewer.role not in ACK_ROLES or viewer.claims.hospital_id != body.hospital_id:
            denied(rt, viewer, body.hospital_id, None, f"ack alert={alert_id}")
            raise forbidden("only the receiving hospital's staff acknowledge")
        try:
            alert = rt.state.check_ack(alert_id, body.hospital_id, body.department)
        except UnknownAlertError:
            raise HTTPException(404, "unknown alert") from None
        except (WrongHospitalError, AlertClosedError, NotActivatedError) as exc:
            raise HTTPException(409, _conflict(exc)) from None
        if rt.state.is_acknowledged(alert_id, body.department):
            return rt.state.alert(alert_id, rt.clock())
        by_role = viewer.role.value  # from the verified token, never from the body
        now_at = rt.clock()
        try:
            await rt.ingest.publish_ack(
                alert_id=alert_id,
                unit_id=alert.unit_id,
                hospital_id=body.hospital_id,
                state=AlertState.ACKNOWLEDGED,
                by_role=by_role,
                at=now_at,
                department=body.department,
            )
        except NotConnectedError:
            raise HTTPException(503, "broker link down: acknowledgement not delivered, try again") from None
        rt.audit.report(
            viewer, "alert.ack", at=now_at, hospital_id=body.hospital_id, unit_id=alert.unit_id, alert_id=alert_id,
            object_type="alert", object_id=alert_id,
            detail=f"department={body.department.value if body.department else 'all'}",
        )  # fmt: skip
        logger.info(
            "alert acknowledged alert=%s hospital=%s role=%s department=%s",
            alert_id,
            body.hospital_id,
            by_role,
            body.department.value if body.department else "all",
        )
        try:
            rt.hub.publish(rt.state.acknowledge(alert_id, body.hospital_id, by_role, now_at, body.department))
        except BoardError as exc:
            raise HTTPException(409, _conflict(exc)) from None
        return rt.state.alert(alert_id, rt.clock())

    @app.get("/api/units/{unit_id}/route", responses={409: {"description": "no position"}, 503: {}})
    async def route(
        rt: RuntimeDep, viewer: ViewerDep, unit_id: UnitPath, hospital: HospitalQuery = None
    ) -> RoutePublic:
        hospital_id = hospital_for(rt, viewer, hospital)
        guard_unit(rt, viewer, hospital_id, unit_id, "route")
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
    async def timeline(
        rt: RuntimeDep, viewer: ViewerDep, unit_id: UnitPath, hospital: HospitalQuery = None
    ) -> TimelinePublic:
        hospital_id = hospital_for(rt, viewer, hospital)
        guard_unit(rt, viewer, hospital_id, unit_id, "timeline")
        try:
            card = rt.state.detail(hospital_id, unit_id, rt.clock()).card
        except NotInboundError:
            raise HTTPException(404, "unit is not inbound to this hospital") from None
        audit_units(rt, viewer, "board.timeline.read", hospital_id, [card])
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
        rt: RuntimeDep, viewer: ViewerDep, bbox: Annotated[str, Query(description="south,west,north,east in degrees")]
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
            audit_backlog=rt.audit.backlog,
            audit_dropped=rt.audit.counts["dropped"],
        )

    # --- sign-in, forwarded to dispatch; tokens come back as HttpOnly cookies ----------------------------------

    def session_cookies(rt: BoardRuntime, response: Response, body: Any) -> PrincipalPublic:
        try:
            token = str(body["access_token"])
            claims = verify_token(token, rt.security.verify_keys, now=rt.clock())
            expires_in = int(body["expires_in"])
            refresh = body.get("refresh_token")
            refresh_in = int(body.get("refresh_expires_in") or 0)
        except (KeyError, TypeError, ValueError, TokenError):
            logger.warning("dispatch answered a sign-in with a token this board cannot verify (check the keys)")
            raise HTTPException(502, "sign-in answer not verifiable") from None
        secure = rt.security.cookie_secure
        response.set_cookie(
            BOARD_ACCESS_COOKIE, token, max_age=expires_in, path="/", secure=secure, httponly=True, samesite="strict"
        )
        if refresh:
            response.set_cookie(
                BOARD_REFRESH_COOKIE, str(refresh), max_age=refresh_in, path="/api/auth", secure=secure, httponly=True,
                samesite="strict",
            )  # fmt: skip
        response.headers["Cache-Control"] = "no-store"
        return _principal(claims)

    def clear_cookies(rt: BoardRuntime, response: Response) -> None:
        secure = rt.security.cookie_secure
        response.delete_cookie(BOARD_ACCESS_COOKIE, path="/", secure=secure, httponly=True, samesite="strict")
        response.delete_cookie(BOARD_REFRESH_COOKIE, path="/api/auth", secure=secure, httponly=True, samesite="strict")

    def end_session(rt: BoardRuntime, request: Request) -> None:
        try:
            viewer = viewer_or_none(request)
        except HTTPException:
            viewer = None
        if viewer is not None and viewer.claims.sid is not None:
            rt.security.revoked.revoke(viewer.claims.sid, viewer.claims.expires_at + timedelta(seconds=60))

    async def forward(
        rt: BoardRuntime, action: str, body: dict[str, Any], client_addr: str | None = None
    ) -> tuple[int, Any]:
        try:
            return await rt.directory.forward_auth(action, body, client_addr)
        except DispatchUnavailableError as exc:
            logger.warning("sign-in service unavailable action=%s reason=%s", action, exc.reason)
            raise HTTPException(503, "sign-in service (dispatch) unavailable") from None

    @app.post("/api/auth/login", responses={401: {}, 423: {"description": "locked"}, 429: {}, 503: {}})
    async def login(rt: RuntimeDep, body: LoginCreate, request: Request, response: Response) -> PrincipalPublic:
        client = request.client.host if request.client else None
        wait_s = rt.security.throttle.hit(client, body.username)  # per address, before forwarding
        if wait_s is not None:
            logger.warning("sign-in throttled client=%s", client)
            raise HTTPException(
                429, "too many sign-in attempts, try again later", {"Retry-After": str(math.ceil(wait_s))}
            )
        code, answer = await forward(rt, "login", body.model_dump(exclude_none=True), client)
        detail = answer.get("detail") if isinstance(answer, dict) else None
        if code == 401 and detail != "totp_required":
            rt.security.throttle.failed(client, body.username)
        if code == 429:  # dispatch's own throttle (this board's service token missing or refused)
            raise HTTPException(429, "too many sign-in attempts, try again later", {"Retry-After": "60"})
        if code != 200:
            raise HTTPException(code if code in (401, 422, 423) else 502, detail if isinstance(detail, str) else "")
        return session_cookies(rt, response, answer)

    @app.post("/api/auth/refresh", response_model=PrincipalPublic, responses={401: {}, 503: {}})
    async def refresh(rt: RuntimeDep, request: Request, response: Response) -> Any:
        token = request.cookies.get(BOARD_REFRESH_COOKIE)
        if not token:
            raise HTTPException(401, "no session")
        code, answer = await forward(rt, "refresh", {"refresh_token": token})
        if code != 200:
            end_session(rt, request)  # a refused refresh (expired, or reused: the session was revoked) ends it here too
            failed = JSONResponse({"detail": "session ended"}, status_code=401)
            clear_cookies(rt, failed)
            return failed
        return session_cookies(rt, response, answer)

    @app.post("/api/auth/logout", status_code=204, response_model=None)
    async def logout(rt: RuntimeDep, request: Request, response: Response) -> None:
        token = request.cookies.get(BOARD_REFRESH_COOKIE)
        end_session(rt, request)  # the access token stops working here at once
        if token and rt.directory.configured:
            await forward(rt, "logout", {"refresh_token": token})
        clear_cookies(rt, response)

    @app.get("/api/auth/me", responses={401: {}})
    async def me(viewer: ViewerDep) -> PrincipalPublic:
        return _principal(viewer.claims)

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


async def _revocations_forever(runtime: BoardRuntime) -> None:
    """Learn the sessions dispatch has ended (sign-out there, refresh-token reuse) every few seconds, so their
    access tokens stop working here too, not only when they expire (found by the hostile tester)."""
    while True:
        if runtime.directory.configured:
            try:
                runtime.security.revoked.merge(await runtime.directory.revoked_sessions())
            except DispatchUnavailableError as exc:
                logger.debug("revoked sessions not fetched reason=%s", exc.reason)
        await asyncio.sleep(_REVOCATIONS_EVERY_S)


async def _prune_forever(runtime: BoardRuntime) -> None:
    while True:
        await asyncio.sleep(_PRUNE_EVERY_S)
        removed = runtime.state.prune(runtime.clock())
        if removed:
            logger.info("board pruned entries=%d", removed)
