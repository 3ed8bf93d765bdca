"""HTTP API of the dispatch service (FastAPI).

``create_app(settings)`` builds the registry, the road graph and the :class:`DispatchService` in the app's
lifespan and runs the service there; ``create_app(service=...)`` serves an existing service that the caller
runs.  Responses are the pydantic models of :mod:`dispatch.schemas`, never internal objects; domain errors are
mapped to HTTP status codes here only (404 unknown hospital or alert, 422 bad coordinates, 503 no road graph).
Incidents, assignments, case timelines, reports, the road map and the console: :mod:`dispatch.cases_api`;
sign-in, accounts and the audit trail: :mod:`dispatch.auth_api`.

Security (:mod:`dispatch.security`): every route but ``/api/health``, sign-in and the console's static files needs
a valid access token (401 otherwise) and a role that may use it (403 otherwise).  ED staff and department on-call
see only alerts, units and cases inbound to their hospital, crew only their unit's; a read of a patient's data
by a person (alert detail, incident, case timeline, case export) is appended to the audit trail before the answer
leaves, as is every change (hospital status, incident, assignment, cancellation, hospital time point).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request, status

from broker_config import Priority, TopicSpace, utc_now
from broker_config.identity import Role
from broker_config.web import BodyLimitMiddleware
from dispatch.audit import AuditAction
from dispatch.auth_api import auth_router
from dispatch.cases_api import cases_router
from dispatch.destination import Recommendation, departments_for, priority_for, rank_destinations
from dispatch.errors import RoutingError, StoreError, UnknownHospitalError
from dispatch.external_routing import OsrmRouter, Router
from dispatch.geo import valid_position_deg
from dispatch.hospitals import Hospital, HospitalRegistry, HospitalStatus
from dispatch.repository import AlertRecord, UnitRecord
from dispatch.routing import RoadRouter
from dispatch.schemas import (
    AckPublic,
    AlertDetailPublic,
    AlertPublic,
    CapabilitiesPublic,
    HealthPublic,
    HospitalPublic,
    HospitalStatusPublic,
    HospitalStatusUpdate,
    RecommendationPublic,
    RecommendRequest,
    RecommendResponse,
    RoutePublic,
    TimelineEventPublic,
    UnitPublic,
)
from dispatch.security import AnyCaller, Caller, DispatchSecurity, SecurityRuntime, forbidden, record, require
from dispatch.service import DispatchService
from dispatch.settings import DispatchSettings
from dispatch.sql_repository import open_repository

__all__ = ["build_service", "create_app"]

logger = logging.getLogger(__name__)


def build_service(
    settings: DispatchSettings,
    *,
    registry: HospitalRegistry | None = None,
    router: Router | None = None,
) -> DispatchService:
    """A service from settings; ``registry``/``router`` override loading (tests reuse one road graph).

    The router is the embedded OSM one unless ``settings.routing_url`` names an OSRM server (large regions)."""
    if registry is None:
        registry = HospitalRegistry.load(settings.hospital_csvs, settings.capabilities_path)
    if router is None and settings.routing_url:
        router = OsrmRouter(settings.routing_url, emergency_factor=settings.emergency_speed_factor)
    if router is None:
        router = RoadRouter.from_pbf(
            settings.road_pbf, emergency_factor=settings.emergency_speed_factor, max_snap_m=settings.max_snap_m
        )
    return DispatchService(
        settings.broker,
        TopicSpace(settings.broker.topic_prefix),
        registry,
        router,
        client_id=settings.client_id,
        repository=open_repository(settings.database_url, max_alerts=settings.max_alerts),
        queue_size=settings.queue_size,
        enqueue_timeout_s=settings.enqueue_timeout_s,
        publish_timeout_s=settings.publish_timeout_s,
        ack_timeouts_s={
            Priority.HIGH: settings.ack_timeout_high_s,
            Priority.MEDIUM: settings.ack_timeout_medium_s,
            Priority.LOW: settings.ack_timeout_low_s,
        },
        escalation_tick_s=settings.escalation_tick_s,
    )


# --- mapping internal objects to public schemas --------------------------------------------------------------------


def _hospital_public(hospital: Hospital, st: HospitalStatus) -> HospitalPublic:
    c = hospital.capabilities
    return HospitalPublic(
        hospital_id=hospital.hospital_id,
        name=hospital.name,
        lat_deg=hospital.lat_deg,
        lon_deg=hospital.lon_deg,
        region=hospital.region,
        capabilities=CapabilitiesPublic(
            ed=c.ed,
            pci_24_7=c.pci_24_7,
            stroke_unit=c.stroke_unit,
            thrombectomy=c.thrombectomy,
            trauma_level=c.trauma_level,
        ),
        status=HospitalStatusPublic(
            diversion=st.diversion,
            cath_lab_busy=st.cath_lab_busy,
            ed_beds_free=st.ed_beds_free,
            set_by=st.set_by,
            set_at=st.set_at,
            until=st.until,
        ),
    )


def _unit_public(unit: UnitRecord, now: datetime) -> UnitPublic:
    lat, lon = unit.position_deg if unit.position_deg else (None, None)
    return UnitPublic(
        unit_id=unit.unit_id,
        status=unit.status,
        status_at=unit.status_at,
        available=unit.available,
        online=unit.online,
        gps_fix=unit.gps_fix,
        lat_deg=lat,
        lon_deg=lon,
        position_at=unit.position_at,
        position_age_s=(now - unit.position_at).total_seconds() if unit.position_at else None,
        current_alert_id=unit.current_alert_id,
        destination_hospital_id=unit.destination_hospital_id,
        current_incident_id=unit.current_incident_id,
        lifecycle=unit.state,
        lifecycle_source=unit.lifecycle_source if unit.lifecycle is not None else "crew",
    )


def _recommendation_public(r: Recommendation) -> RecommendationPublic:
    return RecommendationPublic(
        hospital_id=r.hospital_id,
        hospital_name=r.hospital_name,
        score=r.score,
        tier=r.tier,
        eta_s=r.eta_s,
        reasons=list(r.reasons),
    )


def _alert_fields(a: AlertRecord) -> dict[str, object]:
    return {
        "alert_id": a.alert_id,
        "unit_id": a.unit_id,
        "case_type": a.case_type,
        "priority": a.priority,
        "state": a.state,
        "hospital_id": a.hospital_id,
        "hospital_name": a.hospital_name,
        "departments": list(a.departments),
        "eta_s": a.eta_s,
        "eta_at": a.eta_at,
        "created_at": a.created_at,
        "historical": a.historical,
        "reasons": list(a.reasons),
        "activations": list(a.activations),
    }


def _alert_detail(a: AlertRecord) -> AlertDetailPublic:
    return AlertDetailPublic.model_validate(
        {
            **_alert_fields(a),
            "findings": a.findings,
            "requested_hospital_id": a.requested_hospital_id,
            "recommendations": [_recommendation_public(r) for r in a.recommendations],
            "acks": [
                AckPublic(
                    state=k.state,
                    hospital_id=k.hospital_id,
                    by_role=k.by_role,
                    department=k.department,
                    at=k.at,
                    received_at=k.received_at,
                )
                for k in a.acks
            ],
            "timeline": [
                TimelineEventPublic(
                    at=e.at, source=e.source.value, kind=e.kind.value, detail=e.detail, historical=e.historical
                )
                for e in a.timeline
            ],
        }
    )


def _parse_point(text: str, name: str) -> tuple[float, float]:
    try:
        lat_s, lon_s = text.split(",")
        point = (float(lat_s), float(lon_s))
    except ValueError:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{name} must be 'lat,lon' in degrees") from None
    if not valid_position_deg(point):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{name} is out of range or (0, 0)")
    return point


# --- the app -------------------------------------------------------------------------------------------------------


def _service(request: Request) -> DispatchService:
    service: DispatchService = request.app.state.service
    return service


ServiceDep = Annotated[DispatchService, Depends(_service)]
_ALL_ROLES = tuple(Role)
AlertReader = Annotated[Caller, Depends(require(*_ALL_ROLES))]
StatusWriter = Annotated[
    Caller, Depends(require(Role.DISPATCHER, Role.ADMINISTRATOR, Role.ED_STAFF, Role.DEPARTMENT_ONCALL))
]
UnitReader = Annotated[Caller, Depends(require(*_ALL_ROLES))]
Recommender = Annotated[Caller, Depends(require(Role.DISPATCHER, Role.ADMINISTRATOR, Role.CREW))]


def alert_visible(caller: Caller, alert: AlertRecord) -> bool:
    """Whether the caller may see this alert (its unit's crew, its hospital's staff, regional roles)."""
    return caller.claims.may_see_unit(alert.unit_id, (alert.hospital_id,))


def create_app(
    settings: DispatchSettings | None = None,
    *,
    service: DispatchService | None = None,
    security: DispatchSecurity | None = None,
    registry: HospitalRegistry | None = None,
    router: Router | None = None,
) -> FastAPI:
    """The dispatch HTTP app.

    Give ``settings`` for an app that owns its :class:`DispatchService` (built and run in the lifespan, stopped
    at shutdown; ``registry``/``router`` may be passed pre-built), or ``service`` to serve a service the caller
    runs.  ``security`` is required with ``service`` (``DispatchSecurity.development()`` for the demo and tests);
    with ``settings`` it defaults to :meth:`DispatchSecurity.from_settings`.

    Raises:
        ValueError: neither or both of settings and service, or ``service`` without ``security``.
    """
    if (settings is None) == (service is None):
        raise ValueError("give exactly one of settings or service")
    if security is None:
        if settings is None:
            raise ValueError("give security= (DispatchSecurity) with service=: there is no insecure default")
        security = DispatchSecurity.from_settings(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings is None:
            yield
            return
        owned = await asyncio.to_thread(build_service, settings, registry=registry, router=router)
        app.state.service = owned
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(owned.run(), name="dispatch-service")
            try:
                yield
            finally:
                task.cancel()

    app = FastAPI(
        title="GoldenHour dispatch",
        version="0.1.0",
        summary="Destination choice with reasons, hospital status, units, pre-alerts and their acknowledgements.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware)
    if service is not None:
        app.state.service = service
    app.state.security = SecurityRuntime(security)
    app.include_router(auth_router())
    app.include_router(cases_router())

    @app.get("/api/health", tags=["health"])
    async def health(svc: ServiceDep) -> HealthPublic:
        """Broker link and message counters (processed per stream, rejected per reason)."""
        stats = svc.stats()
        return HealthPublic(
            status="ok" if stats.connected else "degraded",
            mqtt_connected=stats.connected,
            mqtt_sessions=stats.sessions,
            queue_depth=stats.queue_depth,
            processed=stats.processed,
            rejected=stats.rejected,
            hospitals=len(svc.registry.hospitals()),
            road_nodes=getattr(svc.router, "n_nodes", None),
        )

    @app.get("/api/hospitals", tags=["hospitals"])
    async def hospitals(svc: ServiceDep, caller: AnyCaller) -> list[HospitalPublic]:
        """Every hospital with capabilities and the live status in force now."""
        now = utc_now()
        return [_hospital_public(s.hospital, s.status) for s in svc.registry.snapshot(now)]

    @app.patch(
        "/api/hospitals/{hospital_id}/status",
        tags=["hospitals"],
        responses={404: {"description": "unknown hospital"}, 422: {"description": "invalid change"}},
    )
    async def set_hospital_status(
        hospital_id: str, change: HospitalStatusUpdate, svc: ServiceDep, caller: StatusWriter
    ) -> HospitalPublic:
        """Set diversion, cath-lab availability or free ED spaces; records who and when, optionally until when.

        Dispatchers and administrators for any hospital; ED staff and department on-call for their own."""
        if not caller.claims.may_see_hospital(hospital_id):
            raise forbidden("another hospital's status")
        now = utc_now()
        if change.until is not None and change.until <= now:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "until must be in the future")
        try:
            new = await svc.set_hospital_status(
                hospital_id,
                by=caller.username,  # who, from the token: never the body's say-so (set_by is ignored)
                at=now,
                diversion=change.diversion,
                cath_lab_busy=change.cath_lab_busy,
                ed_beds_free=change.ed_beds_free,
                until=change.until,
            )
        except UnknownHospitalError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown hospital") from None
        except StoreError:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "dispatch database unavailable") from None
        await record(
            svc, caller, AuditAction.HOSPITAL_STATUS_UPDATE, read=False, object_type="hospital",
            object_id=hospital_id, hospital_id=hospital_id,
            detail=",".join(k for k, v in change.model_dump(exclude={"set_by"}).items() if v is not None),
        )  # fmt: skip
        return _hospital_public(svc.registry.get(hospital_id), new)

    @app.get("/api/units", tags=["units"])
    async def units(svc: ServiceDep, caller: UnitReader) -> list[UnitPublic]:
        """Every unit seen on the bus: last status, last position and its age, availability (crew: their own unit;
        ED staff and on-call: units inbound to their hospital)."""
        now = utc_now()
        return [
            _unit_public(u, now)
            for u in svc.repo.units()
            if caller.claims.may_see_unit(u.unit_id, (u.destination_hospital_id,))
        ]

    @app.get("/api/alerts", tags=["alerts"])
    async def alerts(svc: ServiceDep, caller: AlertReader) -> list[AlertPublic]:
        """Every pre-alert the caller may see, newest first (scoped to the hospital or unit of the token)."""
        return [AlertPublic.model_validate(_alert_fields(a)) for a in svc.repo.alerts() if alert_visible(caller, a)]

    @app.get(
        "/api/alerts/{alert_id}",
        tags=["alerts"],
        responses={403: {"description": "another hospital's or unit's"}, 404: {"description": "unknown alert"}},
    )
    async def alert(alert_id: str, svc: ServiceDep, caller: AlertReader) -> AlertDetailPublic:
        """One alert with its findings, ranking, acknowledgements and timeline (a person's read is audited)."""
        found = svc.repo.alert(alert_id)
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown alert")
        if not alert_visible(caller, found):
            raise forbidden("another hospital's or unit's alert")
        if caller.claims.is_person:
            await record(
                svc, caller, AuditAction.ALERT_READ, read=True, object_type="alert", object_id=alert_id,
                alert_id=alert_id, unit_id=found.unit_id, incident_id=found.incident_id,
                hospital_id=found.hospital_id,
            )  # fmt: skip
        return _alert_detail(found)

    @app.post("/api/destinations/recommend", tags=["destinations"])
    async def recommend(body: RecommendRequest, svc: ServiceDep, caller: Recommender) -> RecommendResponse:
        """Rank destinations for a case type, findings and position, with reasons (DOMAIN.md section 5)."""
        now = utc_now()
        position = (body.position.lat_deg, body.position.lon_deg) if body.position else None
        if position is not None and not valid_position_deg(position):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "position (0, 0) is not a fix")
        snapshots = svc.registry.snapshot(now)
        etas = await asyncio.to_thread(svc.eta_s_by_hospital, position, snapshots)
        ranking = rank_destinations(body.case_type, body.findings, position, snapshots, etas, now=now)
        first = svc.registry.get(ranking[0].hospital_id) if ranking else None
        return RecommendResponse(
            priority=priority_for(body.case_type, body.findings),
            departments=list(departments_for(body.case_type, body.findings, first)),
            recommendations=[_recommendation_public(r) for r in ranking],
        )

    @app.get(
        "/api/route",
        tags=["routing"],
        responses={422: {"description": "bad or off-network coordinates"}, 503: {"description": "no road graph"}},
    )
    async def route(
        svc: ServiceDep,
        caller: AnyCaller,
        from_: Annotated[str, Query(alias="from", description="start 'lat,lon' in degrees")],
        to: Annotated[str, Query(description="end 'lat,lon' in degrees")],
    ) -> RoutePublic:
        """The fastest road route for an emergency vehicle between two points."""
        if svc.router is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no road graph loaded")
        start, end = _parse_point(from_, "from"), _parse_point(to, "to")
        try:
            result = await asyncio.to_thread(svc.router.route, start, end)
        except RoutingError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        return RoutePublic(points_deg=result.points_deg, distance_m=result.distance_m, duration_s=result.duration_s)

    return app
