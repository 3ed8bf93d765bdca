"""The crew screen: a local web page served by the agent on http://127.0.0.1:{port}/ (the cab's tablet or the
monitor's browser).

* ``GET /``: the page (``static/index.html``, ``crew.css``, ``crew.js``; no CDN, works offline);
* ``GET /api/state``: everything the page shows (:class:`CrewState`): status, destination with its reasons, each
  pre-alert's delivery (queued, sent, stored, on the board, acknowledged) with the teams' activations, ECG delivery,
  link health (connected, backlog, oldest unsent, watchdog, budget, the store's receipt) and monitor alarms;
* ``POST /api/status`` ``{"status": "en_route"}``: a one-tap status;
* ``POST /api/prealert``: the pre-alert form (:class:`PreAlertForm`).

Safety of a local server: bound to 127.0.0.1 only; requests must name this server in ``Host`` (no DNS rebinding)
and state-changing requests must be JSON from this page's own origin (a web page elsewhere cannot post to it).
Crew text is returned as data and shown with ``textContent`` only.  Nothing here logs values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response
from starlette.types import ASGIApp

from ambulance_agent.app import Agent
from ambulance_agent.delivery import PreAlertDelivery
from ambulance_agent.outbox import OutboxFullError
from broker_config import CaseType, CrewStatus, Findings, Notice, utc_now
from broker_config.web import server_config

__all__ = ["TRAUMA_RED_CRITERIA", "CrewScreen", "CrewState", "PreAlertForm", "create_app"]

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"

TRAUMA_RED_CRITERIA: tuple[str, ...] = (
    "penetrating head/neck/torso/proximal limb",
    "flail chest",
    "pelvic fracture",
    "amputation proximal to wrist/ankle",
    "active bleeding needing a tourniquet",
    "skull deformity / suspected skull fracture",
    "paralysis / suspected spinal injury",
)
"""ACS 2021 field triage "red" anatomic criteria (DOMAIN.md section 5); physiological ones come from the vitals."""

CREW_BUTTONS: tuple[CrewStatus, ...] = (
    CrewStatus.EN_ROUTE,
    CrewStatus.ON_SCENE,
    CrewStatus.PATIENT_CONTACT,
    CrewStatus.TRANSPORTING,
    CrewStatus.AT_HOSPITAL,
    CrewStatus.HANDED_OVER,
)


class _Api(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StatusTap(_Api):
    """One status button."""

    status: CrewStatus


class PreAlertForm(_Api):
    """The pre-alert form.  Everything but the case type is optional; absent = not assessed."""

    case_type: CaseType
    age_years: Annotated[int, Field(ge=0, le=120)] | None = None
    sex: Literal["female", "male", "other", "unknown"] = "unknown"
    be_fast_positive: bool | None = None
    lams: Annotated[int, Field(ge=0, le=5)] | None = None
    gcs_total: Annotated[int, Field(ge=3, le=15)] | None = None
    gcs_motor: Annotated[int, Field(ge=1, le=6)] | None = None
    trauma_red_criteria: tuple[Annotated[str, Field(max_length=64)], ...] = ()
    ecg_st_elevation: bool | None = None
    last_known_well_at: AwareDatetime | None = None
    symptom_onset_at: AwareDatetime | None = None
    sbp_mmhg: Annotated[float, Field(ge=0, le=350)] | None = None
    heart_rate_bpm: Annotated[float, Field(ge=0, le=350)] | None = None
    resp_rate_per_min: Annotated[float, Field(ge=0, le=150)] | None = None
    spo2_pct: Annotated[float, Field(ge=0, le=100)] | None = None
    eta_min: Annotated[int, Field(ge=0, le=1440)] | None = None
    note: Annotated[str, Field(max_length=500)] = ""


class ActivationView(_Api):
    department: str
    state: str
    level: str
    acknowledged_by_role: str | None = None


class PreAlertView(_Api):
    alert_id: str
    case_type: str
    stage: str
    queued_at: datetime
    sent_at: datetime | None
    stored_at: datetime | None
    on_board_at: datetime | None
    acknowledged_at: datetime | None
    hospital_state: str | None
    hospital_id: str | None
    activations: list[ActivationView]


class DestinationView(_Api):
    hospital_id: str | None
    hospital_name: str
    reasons: list[str]
    eta_at: datetime | None


class EcgView(_Api):
    tracked: int
    queued: int
    sent: int
    stored: int
    newest_sent_seq: int | None
    stored_through_seq: int | None
    bytes_per_sample: float | None


class LinkView(_Api):
    connected: bool
    backlog_count: int
    backlog_bytes: int
    oldest_unsent_age_s: float | None
    watchdog_stale: bool
    stale_after_s: float
    in_flight: int
    budget_bps: float | None
    queue_delay_s: float | None
    stored_through: dict[str, int]
    receipt_age_s: float | None
    publish_failures: int
    shed: dict[str, int]


class AlarmView(_Api):
    text: str
    priority: str | None
    since: datetime


class CrewState(_Api):
    """What the page shows."""

    unit_id: str
    now: datetime
    status: str | None
    status_at: datetime | None
    buttons: list[str]
    trauma_red_criteria: list[str]
    destination: DestinationView | None
    prealerts: list[PreAlertView]
    ecg: EcgView
    link: LinkView
    heart_rate_bpm: float | None
    alarms_total: int | None
    alarms: list[AlarmView]


def _prealert_view(record: PreAlertDelivery) -> PreAlertView:
    return PreAlertView(
        alert_id=record.alert_id,
        case_type=record.case_type.value,
        stage=record.stage.value,
        queued_at=record.queued_at,
        sent_at=record.sent_at,
        stored_at=record.stored_at,
        on_board_at=record.on_board_at,
        acknowledged_at=record.acknowledged_at,
        hospital_state=record.hospital_state.value if record.hospital_state else None,
        hospital_id=record.hospital_id,
        activations=[
            ActivationView(
                department=a.department.value,
                state=a.state.value,
                level=a.level,
                acknowledged_by_role=a.acknowledged_by_role,
            )
            for a in record.activations
        ],
    )


def _destination_view(notice: Notice) -> DestinationView:
    return DestinationView(
        hospital_id=notice.hospital_id,
        hospital_name=notice.hospital_name,
        reasons=list(notice.reasons),
        eta_at=notice.eta_at,
    )


def crew_state(agent: Agent) -> CrewState:
    """Snapshot of the agent for the page (no I/O)."""
    health = agent.link_health()
    summary = agent.delivery.ecg_summary()
    dest = agent.destination
    alarms = getattr(agent.monitor_alarms, "summary", None)
    alarm_summary = alarms() if callable(alarms) else None
    status = agent.crew_status
    hr = agent.heart_rate.bpm if agent.heart_rate is not None else None
    return CrewState(
        unit_id=agent.unit_id,
        now=utc_now(),
        status=status[0].value if status else None,
        status_at=status[1] if status else None,
        buttons=[b.value for b in CREW_BUTTONS],
        trauma_red_criteria=list(TRAUMA_RED_CRITERIA),
        destination=None if dest is None else _destination_view(dest),
        prealerts=[_prealert_view(p) for p in agent.delivery.prealerts()],
        ecg=EcgView(
            tracked=summary.tracked,
            queued=summary.queued,
            sent=summary.sent,
            stored=summary.stored,
            newest_sent_seq=summary.newest_sent_seq,
            stored_through_seq=summary.stored_through_seq,
            bytes_per_sample=health.ecg_bytes_per_sample,
        ),
        link=LinkView(
            connected=health.connected,
            backlog_count=health.backlog_count,
            backlog_bytes=health.backlog_bytes,
            oldest_unsent_age_s=health.oldest_unsent_age_s,
            watchdog_stale=health.watchdog_stale,
            stale_after_s=health.stale_after_s,
            in_flight=health.in_flight,
            budget_bps=health.budget_bps,
            queue_delay_s=health.queue_delay_s,
            stored_through=health.stored_through,
            receipt_age_s=health.receipt_age_s,
            publish_failures=health.publish_failures,
            shed=health.shed,
        ),
        heart_rate_bpm=hr,
        alarms_total=alarm_summary.alarms if alarm_summary else None,
        alarms=[
            AlarmView(text=a.text, priority=a.priority.value if a.priority else None, since=a.since)
            for a in (alarm_summary.active if alarm_summary else ())
        ],
    )


class _LocalOnly(BaseHTTPMiddleware):
    """Refuse requests not addressed to this server, and state changes from another origin or not in JSON."""

    def __init__(self, app: ASGIApp, allowed_hosts: set[str]) -> None:
        super().__init__(app)
        self.allowed_hosts = allowed_hosts

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        host = request.headers.get("host", "")
        if host not in self.allowed_hosts:
            return JSONResponse({"detail": "unknown host"}, status_code=421)
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            if origin is not None and origin not in {f"http://{h}" for h in self.allowed_hosts}:
                return JSONResponse({"detail": "cross-origin request refused"}, status_code=403)
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return JSONResponse({"detail": "JSON only"}, status_code=415)
        response = await call_next(request)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = "default-src 'self'; frame-ancestors 'none'"
        return response


_STORAGE_FULL = "NOT SENT: the vehicle computer's storage is full. Phone the hospital, and report the fault."
"""What the crew reads when the outbox cannot keep a pre-alert or a status (HTTP 507): never a silent failure."""


def create_app(agent: Agent, *, allowed_hosts: set[str]) -> FastAPI:
    """The crew screen's FastAPI app for ``agent``; ``allowed_hosts`` are the ``Host`` values it answers."""
    app = FastAPI(title="GoldenHour crew screen", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_LocalOnly, allowed_hosts=allowed_hosts)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/state")
    async def state() -> CrewState:
        return crew_state(agent)

    @app.post("/api/status")
    async def status(tap: StatusTap) -> CrewState:
        dest = agent.destination.hospital_id if agent.destination is not None else None
        with_destination = tap.status in (CrewStatus.TRANSPORTING, CrewStatus.AT_HOSPITAL, CrewStatus.HANDED_OVER)
        try:
            await agent.set_status(tap.status, destination_hospital_id=dest if with_destination else None)
        except OutboxFullError:
            raise HTTPException(status_code=507, detail=_STORAGE_FULL) from None
        return crew_state(agent)

    @app.post("/api/prealert")
    async def prealert(form: PreAlertForm) -> dict[str, str]:
        contact = agent.crew_status
        fmc_at = contact[1] if contact and contact[0] is CrewStatus.PATIENT_CONTACT else None
        try:
            findings = Findings(
                age_years=form.age_years,
                sex=form.sex,
                fmc_at=fmc_at,
                symptom_onset_at=form.symptom_onset_at,
                last_known_well_at=form.last_known_well_at,
                ecg_st_elevation=form.ecg_st_elevation,
                be_fast_positive=form.be_fast_positive,
                lams=form.lams,
                gcs_total=form.gcs_total,
                gcs_motor=form.gcs_motor,
                trauma_red_criteria=form.trauma_red_criteria,
                sbp_mmhg=form.sbp_mmhg,
                heart_rate_bpm=form.heart_rate_bpm,
                resp_rate_per_min=form.resp_rate_per_min,
                spo2_pct=form.spo2_pct,
                note=form.note,
            )
        except ValidationError as exc:
            fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
            raise HTTPException(status_code=422, detail=f"invalid findings: {', '.join(fields)}") from None
        eta_s = form.eta_min * 60 if form.eta_min is not None else None
        try:
            alert_id = await agent.prealert(form.case_type, findings, eta_s=eta_s)
        except OutboxFullError:
            raise HTTPException(status_code=507, detail=_STORAGE_FULL) from None
        return {"alert_id": alert_id}

    return app


class CrewScreen:
    """Serves :func:`create_app` with uvicorn on 127.0.0.1 (never another interface).

    Args:
        agent: the running agent.
        port: TCP port (0 = a free one; :attr:`url` after :meth:`bind`).
    """

    def __init__(self, agent: Agent, port: int = 8080) -> None:
        self.agent = agent
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self.port = int(self._sock.getsockname()[1])
        hosts = {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}
        self.app = create_app(agent, allowed_hosts=hosts)
        self._server = uvicorn.Server(
            server_config(self.app, log_level="warning", access_log=False, timeout_graceful_shutdown=2, lifespan="off")
        )

    @property
    def url(self) -> str:
        """Where the page is."""
        return f"http://127.0.0.1:{self.port}/"

    async def serve(self) -> None:
        """Serve until :meth:`stop` (or cancellation)."""
        self._sock.listen(16)
        logger.info("crew screen on %s", self.url)
        try:
            await self._server.serve(sockets=[self._sock])
        finally:
            with contextlib.suppress(OSError):
                self._sock.close()

    def stop(self) -> None:
        """Ask the server to finish."""
        self._server.should_exit = True

    async def wait_started(self, timeout_s: float = 10) -> None:
        """Wait (bounded) until the server accepts connections."""
        async with asyncio.timeout(timeout_s):
            while not self._server.started:  # noqa: ASYNC110 - uvicorn exposes no event for this
                await asyncio.sleep(0.02)
