"""HTTP routes for incidents, assignments, case timelines, quality reports, the road map and the console.

Mounted by :func:`dispatch.api.create_app`.  Domain errors map to status codes here only:

* 404: unknown incident / case / unit;  409: unit not available, incident closed or cancelled;
* 422: bad input (coordinates out of range or (0, 0), a location off the road network, an unknown hospital in the
  body, a hospital time point out of order with the NEMSIS / pathway ordering rules, a bad month);
* 503: the dispatch database refused or is unreachable (the action may not have been stored).

Roles (:mod:`dispatch.security`): dispatchers and administrators open, assign and cancel incidents; ED staff and
department on-call read the cases inbound to their hospital and record its time points; crew read their unit's;
quality managers read every case and the reports.  Reads of a case (incident, timeline, export) by a person and
every change are audited.

Sources of the rules and targets: NEMSIS v3.5 eTimes (ordering), ACC/AHA and ESC STEMI, AHA/ASA stroke and the
China CPC indicators (DOMAIN.md section 4, :data:`dispatch.timeline.INTERVALS`).
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, Response

from broker_config import CaseType, Findings
from broker_config.identity import Role
from broker_config.web import sign_in_script
from dispatch.audit import AuditAction
from dispatch.cases import AssignResult
from dispatch.destination import rank_destinations
from dispatch.errors import (
    IncidentClosedError,
    OutsideNetworkError,
    StoreError,
    TimelineOrderError,
    UnitUnavailableError,
    UnknownHospitalError,
    UnknownIncidentError,
    UnknownUnitError,
)
from dispatch.geo import valid_position_deg
from dispatch.incidents import recommend_units
from dispatch.repository import IncidentRecord
from dispatch.roadmap import RoadMap, road_map
from dispatch.routing import RoadRouter
from dispatch.schemas import (
    AssignmentPublic,
    AssignRequest,
    AssignResponse,
    CancelRequest,
    CaseEventIn,
    CaseEventPublic,
    CaseTimelinePublic,
    IncidentCreate,
    IncidentPublic,
    IntervalPublic,
    IntervalSummaryPublic,
    MonthlyReportPublic,
    RecommendationPublic,
    RoadMapPublic,
    UnitRecommendationPublic,
    UnitRecommendResponse,
)
from dispatch.security import AnyCaller, Caller, forbidden, record, require
from dispatch.service import DispatchService
from dispatch.timeline import NEMSIS_ETIMES, TimePoint, case_csv, compute_intervals, first_times, summarise

__all__ = ["cases_router"]

_MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
_FUTURE_SLACK = timedelta(minutes=5)
"""A time point more than this in the future (dispatch's clock) is refused as a typing error."""
_STATIC = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "login.js": "text/javascript; charset=utf-8",
}


def _service(request: Request) -> DispatchService:
    service: DispatchService = request.app.state.service
    return service


ServiceDep = Annotated[DispatchService, Depends(_service)]
MonthQuery = Annotated[str, Query(description="YYYY-MM (UTC)")]
Dispatcher = Annotated[Caller, Depends(require(Role.DISPATCHER, Role.ADMINISTRATOR))]
CaseReader = Annotated[
    Caller,
    Depends(
        require(
            Role.DISPATCHER, Role.ADMINISTRATOR, Role.QUALITY_MANAGER, Role.ED_STAFF, Role.DEPARTMENT_ONCALL, Role.CREW
        )
    ),
]
CaseWriter = Annotated[
    Caller, Depends(require(Role.DISPATCHER, Role.ADMINISTRATOR, Role.ED_STAFF, Role.DEPARTMENT_ONCALL))
]
ReportReader = Annotated[Caller, Depends(require(Role.QUALITY_MANAGER, Role.ADMINISTRATOR, Role.DISPATCHER))]
Exporter = Annotated[Caller, Depends(require(Role.QUALITY_MANAGER, Role.ADMINISTRATOR))]


_READS = frozenset({AuditAction.INCIDENT_READ, AuditAction.CASE_TIMELINE_READ, AuditAction.REPORT_EXPORT})


def incident_hospitals(svc: DispatchService, i: IncidentRecord) -> tuple[str | None, ...]:
    """The hospitals a case is inbound to: its pre-selected destination and its alert's hospital."""
    alert = svc.repo.alert(i.alert_id) if i.alert_id else None
    return (i.destination_hospital_id, alert.hospital_id if alert else None)


def incident_visible(svc: DispatchService, caller: Caller, i: IncidentRecord) -> bool:
    """Whether the caller may see this case: regional roles all; crew their unit's; hospital staff theirs."""
    return caller.claims.may_see_unit(i.unit_id or "", incident_hospitals(svc, i))


async def _audit_case(
    svc: DispatchService, caller: Caller, action: AuditAction, i: IncidentRecord, **extra: str
) -> None:
    hospitals = [h for h in incident_hospitals(svc, i) if h]
    await record(
        svc, caller, action, read=action in _READS, object_type="incident",
        object_id=i.incident_id, incident_id=i.incident_id, unit_id=i.unit_id, alert_id=i.alert_id,
        hospital_id=hospitals[-1] if hospitals else None, **extra,
    )  # fmt: skip


def _incident_public(i: IncidentRecord) -> IncidentPublic:
    return IncidentPublic(
        incident_id=i.incident_id,
        state=i.state.value,
        lat_deg=i.lat_deg,
        lon_deg=i.lon_deg,
        complaint=i.complaint,
        caller_notes=i.caller_notes,
        priority=i.priority,
        case_type=i.case_type,
        created_at=i.created_at,
        created_by=i.created_by,
        unit_id=i.unit_id,
        alert_id=i.alert_id,
        destination_hospital_id=i.destination_hospital_id,
        assignments=[
            AssignmentPublic(
                unit_id=a.unit_id, assigned_at=a.assigned_at, by=a.by, ended_at=a.ended_at, end_reason=a.end_reason
            )
            for a in i.assignments
        ],
    )


def _assign_public(result: AssignResult) -> AssignResponse:
    return AssignResponse(
        incident=_incident_public(result.incident),
        notice_confirmed=result.notice_confirmed,
        previous_unit_id=result.previous_unit_id,
        cancel_confirmed=result.cancel_confirmed,
    )


def _timeline_public(i: IncidentRecord) -> CaseTimelinePublic:
    events = sorted(i.events, key=lambda e: (e.at, e.recorded_at))
    return CaseTimelinePublic(
        case_id=i.incident_id,
        state=i.state.value,
        case_type=i.case_type,
        unit_id=i.unit_id,
        events=[
            CaseEventPublic(
                point=e.point.value,
                nemsis=NEMSIS_ETIMES.get(e.point),
                at=e.at,
                source=e.source.value,
                recorded_at=e.recorded_at,
                clock_offset_s=e.clock_offset_s,
                detail=e.detail,
                flags=list(e.flags),
            )
            for e in events
        ],
        intervals=[
            IntervalPublic(name=r.name, seconds=r.seconds, target_s=r.target_s, compliant=r.compliant, source=r.source)
            for r in compute_intervals(i.case_type, i.events)
        ],
        quality_flags=sorted({f for e in i.events for f in e.flags}),
    )


def _month_bounds(month: str) -> tuple[datetime, datetime]:
    match = _MONTH.fullmatch(month)
    if match is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "month must be YYYY-MM")
    year, mon = int(match.group(1)), int(match.group(2))
    start = datetime(year, mon, 1, tzinfo=UTC)
    end = datetime(year + (mon == 12), mon % 12 + 1, 1, tzinfo=UTC)
    return start, end


def _store_unavailable() -> HTTPException:
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "dispatch database unavailable")


def cases_router() -> APIRouter:
    """The routes of this module (a fresh router per app; the road map is cached per app)."""
    router = APIRouter()
    map_lock = asyncio.Lock()
    map_cache: dict[int, RoadMap] = {}

    # --- incidents -----------------------------------------------------------------------------------------------

    @router.post(
        "/api/incidents",
        tags=["incidents"],
        status_code=status.HTTP_201_CREATED,
        responses={422: {"description": "coordinates out of range, (0, 0), off the road network; unknown hospital"}},
    )
    async def create_incident(body: IncidentCreate, svc: ServiceDep, caller: Dispatcher) -> IncidentPublic:
        """Open an incident at (lat, lon) degrees WGS 84; records NEMSIS eTimes.01 (call received)."""
        position = (body.lat_deg, body.lon_deg)
        if not valid_position_deg(position):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "location (0, 0) is not a position")
        if body.call_received_at is not None and body.call_received_at > svc.clock() + _FUTURE_SLACK:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "call_received_at is in the future")
        if svc.router is not None:
            try:
                await asyncio.to_thread(svc.router.snap, position)
            except OutsideNetworkError as exc:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT,
                    f"location is {exc.snap_distance_m:.0f} m from the road network "
                    f"(limit {svc.router.max_snap_m:.0f} m)",
                ) from None
        try:
            incident = await svc.cases.create(
                lat_deg=body.lat_deg,
                lon_deg=body.lon_deg,
                complaint=body.complaint,
                priority=body.priority,
                created_by=caller.username,  # from the token, never the body
                case_type=body.case_type,
                caller_notes=body.caller_notes,
                call_received_at=body.call_received_at,
                destination_hospital_id=body.destination_hospital_id,
            )
        except UnknownHospitalError as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"unknown hospital {exc.hospital_id!r}"
            ) from None
        except StoreError:
            raise _store_unavailable() from None
        detail = f"destination={body.destination_hospital_id}" if body.destination_hospital_id else ""
        await _audit_case(svc, caller, AuditAction.INCIDENT_CREATE, incident, detail=detail)
        return _incident_public(incident)

    @router.get("/api/incidents", tags=["incidents"])
    async def incidents(
        svc: ServiceDep,
        caller: CaseReader,
        state: Annotated[str | None, Query(pattern="^(open|assigned|closed|cancelled)$")] = None,
    ) -> list[IncidentPublic]:
        """Every incident the caller may see, newest first; ``state`` filters."""
        return [
            _incident_public(i)
            for i in svc.repo.incidents()
            if (state is None or i.state.value == state) and incident_visible(svc, caller, i)
        ]

    def _visible_case(svc: DispatchService, caller: Caller, incident_id: str, what: str) -> IncidentRecord:
        try:
            found = svc.cases.get(incident_id)
        except UnknownIncidentError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown {what}") from None
        if not incident_visible(svc, caller, found):
            raise forbidden(f"another hospital's or unit's {what}")
        return found

    @router.get("/api/incidents/{incident_id}", tags=["incidents"], responses={404: {"description": "unknown"}})
    async def incident(incident_id: str, svc: ServiceDep, caller: CaseReader) -> IncidentPublic:
        """One incident with its assignments (a person's read is audited)."""
        found = _visible_case(svc, caller, incident_id, "incident")
        await _audit_case(svc, caller, AuditAction.INCIDENT_READ, found)
        return _incident_public(found)

    @router.get(
        "/api/incidents/{incident_id}/recommend-units",
        tags=["incidents"],
        responses={404: {"description": "unknown incident"}},
    )
    async def recommend(incident_id: str, svc: ServiceDep, caller: Dispatcher) -> UnitRecommendResponse:
        """Available units ranked by road ETA to the incident (one reverse Dijkstra search), with reasons; units
        without a position listed last as "no position"; and the destination ranking for the incident's pathway."""
        try:
            incident = svc.cases.get(incident_id)
        except UnknownIncidentError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown incident") from None
        now = svc.clock()
        available = [u for u in svc.repo.units() if u.available]
        ranking = await asyncio.to_thread(recommend_units, svc.router, incident.position_deg, available, now)
        snapshots = svc.registry.snapshot(now)
        etas = await asyncio.to_thread(svc.eta_s_by_hospital, incident.position_deg, snapshots)
        destinations = rank_destinations(
            incident.case_type or CaseType.MEDICAL, Findings(), incident.position_deg, snapshots, etas, now=now
        )
        return UnitRecommendResponse(
            incident_id=incident_id,
            units=[
                UnitRecommendationPublic(
                    rank=n,
                    unit_id=r.unit_id,
                    eta_s=r.eta_s,
                    distance_m=r.distance_m,
                    position_age_s=r.position_age_s,
                    reasons=list(r.reasons),
                )
                for n, r in enumerate(ranking, start=1)
            ],
            destinations=[
                RecommendationPublic(
                    hospital_id=d.hospital_id,
                    hospital_name=d.hospital_name,
                    score=d.score,
                    tier=d.tier,
                    eta_s=d.eta_s,
                    reasons=list(d.reasons),
                )
                for d in destinations
            ],
        )

    @router.post(
        "/api/incidents/{incident_id}/assign",
        tags=["incidents"],
        responses={
            404: {"description": "unknown incident or unit"},
            409: {"description": "unit not available, or incident closed/cancelled"},
        },
    )
    async def assign(incident_id: str, body: AssignRequest, svc: ServiceDep, caller: Dispatcher) -> AssignResponse:
        """Assign a unit: Notice(kind=assignment) to it, eTimes.02/.03; the unit assigned before (if another) gets
        Notice(kind=assignment_cancelled)."""
        try:
            result = await svc.cases.assign(incident_id, body.unit_id, caller.username)  # body.by is ignored
        except UnknownIncidentError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown incident") from None
        except UnknownUnitError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown unit") from None
        except (UnitUnavailableError, IncidentClosedError) as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        except StoreError:
            raise _store_unavailable() from None
        previous = f" previous={result.previous_unit_id}" if result.previous_unit_id else ""
        await _audit_case(
            svc, caller, AuditAction.INCIDENT_ASSIGN, result.incident, detail=f"unit={body.unit_id}{previous}"
        )
        return _assign_public(result)

    @router.post(
        "/api/incidents/{incident_id}/cancel",
        tags=["incidents"],
        responses={404: {"description": "unknown incident"}, 409: {"description": "already closed or cancelled"}},
    )
    async def cancel(incident_id: str, body: CancelRequest, svc: ServiceDep, caller: Dispatcher) -> AssignResponse:
        """Cancel the incident; its unit gets Notice(kind=assignment_cancelled)."""
        try:
            result = await svc.cases.cancel(incident_id, caller.username)  # body.by is ignored
        except UnknownIncidentError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown incident") from None
        except IncidentClosedError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        except StoreError:
            raise _store_unavailable() from None
        await _audit_case(svc, caller, AuditAction.INCIDENT_CANCEL, result.incident)
        return _assign_public(result)

    # --- cases ---------------------------------------------------------------------------------------------------

    @router.get("/api/cases/{case_id}/timeline", tags=["cases"], responses={404: {"description": "unknown case"}})
    async def timeline(case_id: str, svc: ServiceDep, caller: CaseReader) -> CaseTimelinePublic:
        """The case's time points in order (NEMSIS element, source, clock offset, flags) and its intervals
        (a person's read is audited)."""
        found = _visible_case(svc, caller, case_id, "case")
        await _audit_case(svc, caller, AuditAction.CASE_TIMELINE_READ, found)
        return _timeline_public(found)

    @router.post(
        "/api/cases/{case_id}/events",
        tags=["cases"],
        status_code=status.HTTP_201_CREATED,
        responses={
            404: {"description": "unknown case"},
            409: {"description": "case cancelled"},
            422: {"description": "out of order, in the future, or unknown hospital"},
        },
    )
    async def add_event(case_id: str, body: CaseEventIn, svc: ServiceDep, caller: CaseWriter) -> CaseTimelinePublic:
        """Record a hospital time point (door, device, needle, CT start).  One that breaks an ordering rule (for
        example a device time before the door) is refused with 422 and the rules it breaks.  ED staff and
        department on-call record only for their own hospital's cases."""
        found = _visible_case(svc, caller, case_id, "case")
        if caller.claims.hospital_scoped and body.hospital_id not in (None, caller.claims.hospital_id):
            raise forbidden("time points of another hospital")
        if body.at > svc.clock() + _FUTURE_SLACK:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "time point is in the future")
        try:
            await svc.cases.add_hospital_event(case_id, TimePoint(body.point), body.at, hospital_id=body.hospital_id)
            await _audit_case(svc, caller, AuditAction.CASE_EVENT_ADD, found, detail=f"point={body.point}")
            return _timeline_public(svc.cases.get(case_id))
        except UnknownIncidentError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown case") from None
        except IncidentClosedError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        except UnknownHospitalError as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"unknown hospital {exc.hospital_id!r}"
            ) from None
        except TimelineOrderError as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                {"message": "time point out of order", "violations": exc.violations},
            ) from None
        except StoreError:
            raise _store_unavailable() from None

    # --- reports -------------------------------------------------------------------------------------------------

    @router.get("/api/reports/monthly", tags=["reports"], responses={422: {"description": "bad month"}})
    async def monthly(
        svc: ServiceDep, caller: ReportReader, month: Annotated[str, Query(description="YYYY-MM (UTC)")]
    ) -> MonthlyReportPublic:
        """Median and compliance % of each interval over the month's cases (by call received, UTC)."""
        cases = svc.cases.cases_between(*_month_bounds(month))
        by_type: dict[str, int] = {}
        for c in cases:
            key = c.case_type.value if c.case_type else "unknown"
            by_type[key] = by_type.get(key, 0) + 1
        stemi = [c for c in cases if c.case_type is CaseType.STEMI]
        transmitted = sum(1 for c in stemi if TimePoint.ECG_TRANSMITTED in first_times(c.events))
        return MonthlyReportPublic(
            month=month,
            n_cases=len(cases),
            cases_by_type=by_type,
            intervals=[
                IntervalSummaryPublic(
                    name=s.name,
                    target_s=s.target_s,
                    n_cases=s.n_cases,
                    median_s=s.median_s,
                    compliance_pct=s.compliance_pct,
                    source=s.source,
                )
                for s in summarise(cases)
            ],
            stemi_ecg_transmitted_pct=round(100 * transmitted / len(stemi), 1) if stemi else None,
        )

    @router.get(
        "/api/reports/monthly.csv",
        tags=["reports"],
        response_class=Response,
        responses={200: {"content": {"text/csv": {}}}, 422: {"description": "bad month"}},
    )
    async def monthly_csv(svc: ServiceDep, caller: Exporter, month: MonthQuery) -> Response:
        """One row per case of the month: every time point (ISO 8601 UTC), every interval (s), quality flags
        (quality manager, administrator; the export of every case is audited)."""
        cases = svc.cases.cases_between(*_month_bounds(month))
        for case in cases:
            exported = svc.repo.incident(case.incident_id)
            if exported is not None:
                await _audit_case(svc, caller, AuditAction.REPORT_EXPORT, exported, detail=f"month={month}")
        text = case_csv(cases)
        return Response(
            text,
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="goldenhour-cases-{month}.csv"'},
        )

    # --- map and console -----------------------------------------------------------------------------------------

    @router.get("/api/map/roads", tags=["map"], responses={503: {"description": "no road graph"}})
    async def roads(svc: ServiceDep, caller: AnyCaller) -> RoadMapPublic:
        """The road network as simplified polylines (degrees), computed once per road graph and cached."""
        if not isinstance(svc.router, RoadRouter):
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no embedded road graph loaded")
        key = id(svc.router)
        async with map_lock:
            cached = map_cache.get(key)
            if cached is None:
                cached = map_cache[key] = await asyncio.to_thread(road_map, svc.router)
        return RoadMapPublic(
            min_lat_deg=cached.min_lat_deg,
            min_lon_deg=cached.min_lon_deg,
            max_lat_deg=cached.max_lat_deg,
            max_lon_deg=cached.max_lon_deg,
            polylines=cached.polylines,
        )

    @router.get("/console", tags=["console"], response_class=HTMLResponse)
    async def console() -> HTMLResponse:
        """The dispatcher console (no CDN: the page, script and style are served from here)."""
        return HTMLResponse(_static_text("console.html"), headers={"Cache-Control": "no-cache"})

    @router.get("/login", tags=["console"], response_class=HTMLResponse)
    async def login_page() -> HTMLResponse:
        """The sign-in page of the console (it posts to ``/api/auth/login``, which sets HttpOnly cookies)."""
        return HTMLResponse(_static_text("login.html"), headers={"Cache-Control": "no-store"})

    @router.get("/console/{name}", tags=["console"], response_class=Response, responses={404: {}})
    async def console_asset(name: str) -> Response:
        """The console's script and style sheet."""
        media = _STATIC.get(name)
        if media is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such file")
        text = sign_in_script() if name == "login.js" else _static_text(name)
        return Response(text, media_type=media, headers={"Cache-Control": "no-cache"})

    return router


def _static_text(name: str) -> str:
    return resources.files("dispatch").joinpath("static", name).read_text(encoding="utf-8")
