"""Composition root of the board service: ``create_app(settings) -> FastAPI``.

The lifespan owns the one MQTT link of the process (STYLE.md: one client per process, created in the lifespan and
injected) and runs, in one ``asyncio.TaskGroup``: the link's receive loop, the ingest worker, the ``on_board``
receipt publisher and a periodic prune.  HTTP:

* ``GET /``                              the board page (``?hospital=ID``, else the default hospital)
* ``GET /api/hospitals/{id}/snapshot``   :class:`~hospital_board.state.BoardSnapshot`
* ``GET /api/events?hospital=ID``        server-sent events (see :mod:`hospital_board.feed`)
* ``POST /api/alerts/{alert_id}/ack``    acknowledge; publishes ``AlertAck(acknowledged)`` on the hospital's ack
  stream (404 unknown alert, 409 another hospital's or closed, 503 broker link down)
* ``GET /api/health``                    link state, counters
"""

from __future__ import annotations

import asyncio
import html
import logging
import secrets
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
from hospital_board.feed import FeedHub, SseResponse, sse_frame
from hospital_board.settings import BoardSettings
from hospital_board.sources import BoardIngest, HospitalDirectory
from hospital_board.state import (
    AlertClosedError,
    AlertPublic,
    BoardSnapshot,
    BoardState,
    EventKind,
    UnknownAlertError,
    WrongHospitalError,
)

__all__ = ["AckCreate", "BoardRuntime", "HealthPublic", "create_app"]

logger = logging.getLogger(__name__)

_PRUNE_EVERY_S = 60.0
_STATIC = Path(__file__).resolve().parent / "static"
"""The page's files, shipped inside the package (package-data), served by the app itself: no CDN."""


class AckCreate(BaseModel):
    """Body of ``POST /api/alerts/{alert_id}/ack``."""

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
    directory: HospitalDirectory = field(default_factory=lambda: HospitalDirectory(None, None))


def get_runtime(request: Request) -> BoardRuntime:
    """Dependency: the app's :class:`BoardRuntime`."""
    runtime: BoardRuntime = request.app.state.board
    return runtime


RuntimeDep = Annotated[BoardRuntime, Depends(get_runtime)]
HospitalQuery = Annotated[str | None, Query(pattern=ID_PATTERN.pattern, description="hospital id")]
HospitalPath = Annotated[str, PathParam(pattern=ID_PATTERN.pattern)]
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
    page_template = (_STATIC / "board.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=settings.dispatch_timeout_s) as http:
            runtime.directory = HospitalDirectory(
                http,
                str(settings.dispatch_url) if settings.dispatch_url else None,
                timeout_s=settings.dispatch_timeout_s,
            )
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(runtime.link.run(ingest.on_connect, ingest.on_message), name="board-mqtt"),
                    tg.create_task(ingest.run(), name="board-ingest"),
                    tg.create_task(ingest.run_receipts(), name="board-receipts"),
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

    @app.get("/", response_class=HTMLResponse)
    async def board_page(rt: RuntimeDep, hospital: HospitalQuery = None) -> HTMLResponse:
        hospital_id = hospital or rt.settings.default_hospital_id
        name = await rt.directory.name(hospital_id)
        page = page_template.replace("{{HOSPITAL_ID}}", html.escape(hospital_id, quote=True)).replace(
            "{{HOSPITAL_NAME}}", html.escape(name, quote=True)
        )
        return HTMLResponse(page, headers={"Cache-Control": "no-store", "Content-Security-Policy": _CSP})

    @app.get("/api/hospitals/{hospital_id}/snapshot")
    async def snapshot(rt: RuntimeDep, hospital_id: HospitalPath) -> BoardSnapshot:
        return rt.state.snapshot(hospital_id, rt.clock())

    @app.get("/api/events")
    async def events(rt: RuntimeDep, hospital: HospitalQuery = None) -> SseResponse:
        hospital_id = hospital or rt.settings.default_hospital_id
        client = rt.hub.connect(hospital_id)
        first = sse_frame(EventKind.SNAPSHOT, rt.state.snapshot(hospital_id, rt.clock()))
        return SseResponse(
            rt.hub, client, first, heartbeat_s=rt.settings.heartbeat_s, send_timeout_s=rt.settings.send_timeout_s
        )

    @app.post("/api/alerts/{alert_id}/ack")
    async def acknowledge(rt: RuntimeDep, alert_id: AlertPath, body: AckCreate) -> AlertPublic:
        try:
            alert = rt.state.check_ack(alert_id, body.hospital_id)
        except UnknownAlertError:
            raise HTTPException(404, "unknown alert") from None
        except (WrongHospitalError, AlertClosedError) as exc:
            raise HTTPException(409, _conflict(exc)) from None
        if alert.state is AlertState.ACKNOWLEDGED:
            return alert
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
        logger.info("alert acknowledged alert=%s hospital=%s role=%s", alert_id, body.hospital_id, body.by_role)
        try:
            rt.hub.publish(rt.state.acknowledge(alert_id, body.hospital_id, body.by_role, now_at))
        except (UnknownAlertError, WrongHospitalError, AlertClosedError) as exc:
            raise HTTPException(409, _conflict(exc)) from None
        return rt.state.alert(alert_id)

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
        )

    return app


_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
"""No inline script, no external origin: even an injected tag could not run (defence in depth for FF-16)."""


def _conflict(exc: Exception) -> str:
    if isinstance(exc, WrongHospitalError):
        return "alert is addressed to another hospital"
    return "alert is closed (cancelled or handed over)"


async def _prune_forever(runtime: BoardRuntime) -> None:
    while True:
        await asyncio.sleep(_PRUNE_EVERY_S)
        removed = runtime.state.prune(runtime.clock())
        if removed:
            logger.info("board pruned entries=%d", removed)
