"""HTTP request and response models of the dispatch API (never internal objects: ``XPublic`` / ``XUpdate``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from broker_config import AlertState, CaseType, CrewStatus, Department, Findings, Priority

__all__ = [
    "AckPublic",
    "AlertDetailPublic",
    "AlertPublic",
    "CapabilitiesPublic",
    "HealthPublic",
    "HospitalPublic",
    "HospitalStatusPublic",
    "HospitalStatusUpdate",
    "PositionIn",
    "RecommendRequest",
    "RecommendResponse",
    "RecommendationPublic",
    "RoutePublic",
    "TimelineEventPublic",
    "UnitPublic",
]

Lat = Annotated[float, Field(ge=-90, le=90, description="latitude, degrees WGS 84")]
Lon = Annotated[float, Field(ge=-180, le=180, description="longitude, degrees WGS 84")]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class _In(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HealthPublic(_Out):
    """Service health: ``ok`` when the broker link is up."""

    status: Literal["ok", "degraded"]
    mqtt_connected: bool
    mqtt_sessions: int
    queue_depth: int
    processed: dict[str, int]
    rejected: dict[str, int]
    hospitals: int
    road_nodes: int | None


class CapabilitiesPublic(_Out):
    """Capabilities (demo assumptions for the shipped regions).  ``trauma_level`` 1 is highest, null = none."""

    ed: bool
    pci_24_7: bool
    stroke_unit: bool
    thrombectomy: bool
    trauma_level: int | None


class HospitalStatusPublic(_Out):
    """Live status in force now: who set it, when, until when (UTC)."""

    diversion: bool
    cath_lab_busy: bool
    ed_beds_free: int | None
    set_by: str | None
    set_at: datetime | None
    until: datetime | None


class HospitalPublic(_Out):
    """A hospital of the registry."""

    hospital_id: str
    name: str
    lat_deg: float
    lon_deg: float
    region: str
    capabilities: CapabilitiesPublic
    status: HospitalStatusPublic


class HospitalStatusUpdate(_In):
    """A status change.  Fields left out keep their value; ``until`` (UTC, in the future) makes it lapse."""

    set_by: Annotated[str, Field(min_length=1, max_length=64, description="person or role making the change")]
    diversion: bool | None = None
    cath_lab_busy: bool | None = None
    ed_beds_free: Annotated[int, Field(ge=0, le=10_000)] | None = None
    until: AwareDatetime | None = None


class UnitPublic(_Out):
    """An ambulance as dispatch sees it.  ``position_age_s`` is the age of the last fix (null = never had one)."""

    unit_id: str
    status: CrewStatus | None
    status_at: datetime | None
    available: bool
    online: bool | None
    gps_fix: bool
    lat_deg: float | None
    lon_deg: float | None
    position_at: datetime | None
    position_age_s: float | None
    current_alert_id: str | None
    destination_hospital_id: str | None


class RecommendationPublic(_Out):
    """One ranked destination; ``score`` higher is better; ``eta_s`` road ETA in seconds (null = unknown)."""

    hospital_id: str
    hospital_name: str
    score: float
    tier: int
    eta_s: float | None
    reasons: list[str]


class TimelineEventPublic(_Out):
    """One time point of an alert (UTC) with its source."""

    at: datetime
    source: str
    kind: str
    detail: str
    historical: bool


class AckPublic(_Out):
    """A hospital acknowledgement."""

    state: AlertState
    hospital_id: str
    by_role: str
    department: Department | None
    at: datetime
    received_at: datetime


class AlertPublic(_Out):
    """A pre-alert's routing and state."""

    alert_id: str
    unit_id: str
    case_type: CaseType
    priority: Priority
    state: AlertState
    hospital_id: str
    hospital_name: str
    departments: list[Department]
    eta_s: float | None
    eta_at: datetime | None
    created_at: datetime
    historical: bool
    reasons: list[str]


class AlertDetailPublic(AlertPublic):
    """An alert with findings, the full ranking, the acks and the timeline."""

    findings: Findings
    requested_hospital_id: str | None
    recommendations: list[RecommendationPublic]
    acks: list[AckPublic]
    timeline: list[TimelineEventPublic]


class PositionIn(_In):
    """A (lat, lon) position in degrees."""

    lat_deg: Lat
    lon_deg: Lon


class RecommendRequest(_In):
    """Ask for a destination ranking."""

    case_type: CaseType
    findings: Findings = Findings()
    position: PositionIn | None = None


class RecommendResponse(_Out):
    """The ranking with the priority and the teams to activate at the first destination."""

    priority: Priority
    departments: list[Department]
    recommendations: list[RecommendationPublic]


class RoutePublic(_Out):
    """A road route: points [[lat, lon], ...], distance in metres, emergency driving time in seconds."""

    points_deg: list[tuple[float, float]]
    distance_m: float
    duration_s: float
