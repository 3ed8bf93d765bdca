"""HTTP request and response models of the dispatch API (never internal objects: ``XPublic`` / ``XUpdate``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from broker_config import Activation, AlertState, CaseType, CrewStatus, Department, Findings, Priority
from broker_config.identity import SUBJECT_PATTERN, Role
from broker_config.topics import ID_PATTERN

__all__ = [
    "AccountCreate",
    "AccountCreated",
    "AccountPublic",
    "AccountUpdate",
    "AuditEntryPublic",
    "AuditReportBatch",
    "AuditReportIn",
    "AuditVerifyPublic",
    "LoginRequest",
    "LogoutRequest",
    "PrincipalPublic",
    "RefreshRequest",
    "TokenResponse",
    "AckPublic",
    "AssignRequest",
    "AssignResponse",
    "AssignmentPublic",
    "CancelRequest",
    "CaseEventIn",
    "CaseEventPublic",
    "CaseTimelinePublic",
    "IncidentCreate",
    "IncidentPublic",
    "IntervalPublic",
    "IntervalSummaryPublic",
    "MonthlyReportPublic",
    "RoadMapPublic",
    "UnitRecommendationPublic",
    "UnitRecommendResponse",
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
    current_incident_id: str | None = None
    lifecycle: CrewStatus | None = None
    """Dispatch's view of the stage (crew taps, geofences, dispatcher actions); ``status`` is the crew's own."""
    lifecycle_source: str | None = None


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
    activations: list[Activation] = []
    """Each receiving department's page: paged / acknowledged (when, by which role) / escalated (to whom), and when
    it escalates next if nobody acknowledges."""


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


OpaqueIdIn = Annotated[str, Field(pattern=ID_PATTERN.pattern, description="opaque id [A-Za-z0-9_-]{1,32}")]


class IncidentCreate(_In):
    """A call for help.  ``complaint`` and ``caller_notes`` are free text: stored, shown as text, never logged.

    ``call_received_at`` (UTC, default now) is NEMSIS eTimes.01; ``destination_hospital_id`` pre-selects a hospital.
    """

    lat_deg: Lat
    lon_deg: Lon
    complaint: Annotated[str, Field(min_length=1, max_length=200)]
    priority: Priority = Priority.MEDIUM
    case_type: CaseType | None = None
    caller_notes: Annotated[str, Field(max_length=1_000)] = ""
    created_by: Annotated[str, Field(min_length=1, max_length=64)] = "dispatcher"
    call_received_at: AwareDatetime | None = None
    destination_hospital_id: OpaqueIdIn | None = None


class AssignmentPublic(_Out):
    """One assignment of a unit (UTC); ``ended_at``/``end_reason`` null while current."""

    unit_id: str
    assigned_at: datetime
    by: str
    ended_at: datetime | None
    end_reason: str | None


class IncidentPublic(_Out):
    """An incident: position in degrees, complaint, priority, state (open, assigned, closed, cancelled), its unit."""

    incident_id: str
    state: Literal["open", "assigned", "closed", "cancelled"]
    lat_deg: float
    lon_deg: float
    complaint: str
    caller_notes: str
    priority: Priority
    case_type: CaseType | None
    created_at: datetime
    created_by: str
    unit_id: str | None
    alert_id: str | None
    destination_hospital_id: str | None
    assignments: list[AssignmentPublic]


class AssignRequest(_In):
    """Assign a unit to the incident (re-assigning stands the previous unit down)."""

    unit_id: OpaqueIdIn
    by: Annotated[str, Field(min_length=1, max_length=64)] = "dispatcher"


class CancelRequest(_In):
    """Cancel the incident (the assigned unit is stood down)."""

    by: Annotated[str, Field(min_length=1, max_length=64)] = "dispatcher"


class AssignResponse(_Out):
    """The incident after the action; whether the broker confirmed (PUBACK) the unit's notice and, for the unit
    stood down, its cancellation notice."""

    incident: IncidentPublic
    notice_confirmed: bool
    previous_unit_id: str | None
    cancel_confirmed: bool | None


class UnitRecommendationPublic(_Out):
    """One available unit: rank (1 = best), road ETA in seconds, straight-line distance in metres, fix age in
    seconds (null = unknown), reasons."""

    rank: int
    unit_id: str
    eta_s: float | None
    distance_m: float | None
    position_age_s: float | None
    reasons: list[str]


class UnitRecommendResponse(_Out):
    """Available units ranked by road ETA (one reverse Dijkstra search), and the destination ranking for the
    incident's pathway (``medical`` when not known yet) with reasons."""

    incident_id: str
    units: list[UnitRecommendationPublic]
    destinations: list[RecommendationPublic]


class CaseEventIn(_In):
    """A hospital time point (UTC): door, device (wire crossing / balloon), needle or CT start."""

    point: Literal["hospital_door", "device", "needle", "ct_start"]
    at: AwareDatetime
    hospital_id: OpaqueIdIn | None = None


class CaseEventPublic(_Out):
    """One time point: NEMSIS element (null for registry points), when, source, when recorded, the source's clock
    offset in seconds (null = unknown) and data-quality flags."""

    point: str
    nemsis: str | None
    at: datetime
    source: str
    recorded_at: datetime
    clock_offset_s: float | None
    detail: str
    flags: list[str]


class IntervalPublic(_Out):
    """One interval of the case: seconds (null = a point missing), target (s), compliant (null = not measurable)."""

    name: str
    seconds: float | None
    target_s: float
    compliant: bool | None
    source: str


class CaseTimelinePublic(_Out):
    """A case's timeline in time order, its intervals against the targets, and its quality flags."""

    case_id: str
    state: str
    case_type: CaseType | None
    unit_id: str | None
    events: list[CaseEventPublic]
    intervals: list[IntervalPublic]
    quality_flags: list[str]


class IntervalSummaryPublic(_Out):
    """One interval over the month: cases measured, median seconds, % meeting the target."""

    name: str
    target_s: float
    n_cases: int
    median_s: float | None
    compliance_pct: float | None
    source: str


class MonthlyReportPublic(_Out):
    """Quality report of one month (by call received, UTC): cases, per pathway, intervals, STEMI ECG transmission."""

    month: str
    n_cases: int
    cases_by_type: dict[str, int]
    intervals: list[IntervalSummaryPublic]
    stemi_ecg_transmitted_pct: float | None
    """Share of STEMI cases with a transmitted pre-hospital ECG (China CPC: >= 30 %)."""


class RoadMapPublic(_Out):
    """The road network for drawing: polylines [[[lat, lon], ...], ...] in degrees and the bounding box."""

    min_lat_deg: float
    min_lon_deg: float
    max_lat_deg: float
    max_lon_deg: float
    polylines: list[list[tuple[float, float]]]


# --- security: sign-in, accounts, audit ------------------------------------------------------------------------------

Username = Annotated[str, Field(pattern=SUBJECT_PATTERN.pattern, description="username [A-Za-z0-9_.@-]{1,64}")]


class LoginRequest(_In):
    """Sign in: username, password and, for accounts with a second factor, the current 6-digit TOTP code."""

    username: Annotated[str, Field(min_length=1, max_length=64)]
    password: Annotated[str, Field(min_length=1, max_length=256)]
    totp: Annotated[str, Field(pattern=r"^[0-9]{6}$")] | None = None


class RefreshRequest(_In):
    """Exchange a refresh token (else the ``gh_refresh`` cookie is used)."""

    refresh_token: Annotated[str, Field(min_length=1, max_length=128)] | None = None


class LogoutRequest(RefreshRequest):
    """End the sign-in session of this refresh token (else of the ``gh_refresh`` cookie)."""


class PrincipalPublic(_Out):
    """Who the token says the caller is, and until when (UTC)."""

    username: str
    role: Role
    hospital_id: str | None
    unit_id: str | None
    expires_at: datetime


class TokenResponse(_Out):
    """A short-lived bearer access token and, for people, a rotating refresh token (also set as HttpOnly cookies)."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth 2.0 token type, not a secret
    expires_in: int
    refresh_token: str | None
    refresh_expires_in: int | None
    principal: PrincipalPublic


class AccountCreate(_In):
    """A new account.  ED staff / department on-call need ``hospital_id``, crew ``unit_id``; ``totp`` enrols a second
    factor whose secret is returned once.  Passwords: 12-256 characters (services: at least 32)."""

    username: Username
    role: Role
    password: Annotated[str, Field(min_length=12, max_length=256)]
    hospital_id: OpaqueIdIn | None = None
    unit_id: OpaqueIdIn | None = None
    totp: bool = False


class AccountUpdate(_In):
    """Disable or enable, set a new password, lift a lockout, enrol (true) or remove (false) the second factor."""

    disabled: bool | None = None
    password: Annotated[str, Field(min_length=12, max_length=256)] | None = None
    unlock: bool = False
    reset_totp: bool | None = None


class AccountPublic(_Out):
    """An account without its secrets."""

    username: str
    role: Role
    hospital_id: str | None
    unit_id: str | None
    totp_enrolled: bool
    disabled: bool
    locked_until: datetime | None
    created_at: datetime


class AccountCreated(AccountPublic):
    """A created or updated account; ``totp_secret``/``totp_uri`` only right after enrolment (shown once)."""

    totp_secret: str | None = None
    totp_uri: str | None = None


class AuditEntryPublic(_Out):
    """One audit row (ids only) with its place in the hash chain."""

    seq: int
    at: datetime
    actor: str
    role: str
    actor_hospital_id: str | None
    action: str
    object_type: str | None
    object_id: str | None
    unit_id: str | None
    alert_id: str | None
    incident_id: str | None
    hospital_id: str | None
    client_addr: str | None
    outcome: str
    reported_by: str | None
    detail: str
    prev_hash: str
    hash: str


class AuditVerifyPublic(_Out):
    """The chain check: ``ok``, rows checked, the first broken row (null = none) and why, the head hash."""

    ok: bool
    checked: int
    first_broken_seq: int | None
    reason: str | None
    head_hash: str


class AuditReportIn(_In):
    """One event the board saw (a person's read of patient data, an acknowledgement), reported to dispatch's trail."""

    at: AwareDatetime
    actor: Username
    role: Role
    actor_hospital_id: OpaqueIdIn | None = None
    action: Annotated[str, Field(pattern=r"^[a-z.]{1,40}$")]
    object_type: Annotated[str, Field(pattern=r"^[a-z_]{1,20}$")] | None = None
    object_id: OpaqueIdIn | None = None
    unit_id: OpaqueIdIn | None = None
    alert_id: OpaqueIdIn | None = None
    hospital_id: OpaqueIdIn | None = None
    client_addr: Annotated[str, Field(max_length=64, pattern=r"^[0-9A-Fa-f:.]{1,64}$")] | None = None
    outcome: Literal["ok", "denied"] = "ok"
    detail: Annotated[str, Field(max_length=200, pattern=r"^[A-Za-z0-9_=,.: -]*$")] = ""


class AuditReportBatch(_In):
    """Up to 500 board events in one request."""

    events: Annotated[list[AuditReportIn], Field(min_length=1, max_length=500)]


class RevokedSessionsPublic(_Out):
    """Sessions whose tokens are refused before they expire: session id -> until (UTC)."""

    sessions: dict[str, AwareDatetime]
