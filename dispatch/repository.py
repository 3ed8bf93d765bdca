"""State of the dispatch service: units, alerts with their timelines, incidents with their case timelines.

Only the service's event loop writes here (the MQTT worker and the API handlers share one loop), so no locks are
needed.  Records are read synchronously from memory; every change is written through with ``await save_*``.
:class:`InMemoryRepository` (unit tests, the demo without a database) makes the writes no-ops;
:class:`dispatch.sql_repository.SqlRepository` persists them to SQLite or PostgreSQL and reloads them on
:meth:`~Repository.open`.  The alert table is bounded: beyond ``max_alerts`` the oldest closed alerts are
evicted first (from memory; the database keeps them).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from broker_config import Activation, AlertState, CaseType, CrewStatus, Department, Findings, Priority
from dispatch.accounts import AccountRecord, RefreshRecord
from dispatch.audit import GENESIS_HASH, AuditDraft, AuditEntry, seal
from dispatch.destination import Recommendation
from dispatch.hospitals import HospitalStatus
from dispatch.timeline import CaseEvent

__all__ = [
    "AckRecord",
    "AlertRecord",
    "AssignmentRecord",
    "IncidentRecord",
    "IncidentState",
    "Repository",
    "EventKind",
    "EventSource",
    "InMemoryRepository",
    "TimelineEvent",
    "UnitRecord",
    "STATE_RANK",
]


class EventSource(StrEnum):
    """Where a time point came from (DOMAIN.md section 3: device, crew tap, hospital, inferred)."""

    UNIT = "unit"
    DISPATCH = "dispatch"
    HOSPITAL = "hospital"
    OPERATOR = "operator"


class EventKind(StrEnum):
    """Kinds of timeline events of an alert."""

    PREALERT_RECEIVED = "prealert_received"
    PREALERT_REPLAYED = "prealert_replayed"
    DESTINATION_CHOSEN = "destination_chosen"
    CREW_REQUEST_HONOURED = "crew_request_honoured"
    CREW_REQUEST_REFUSED = "crew_request_refused"
    ALERT_SENT = "alert_sent"
    NOTICE_SENT = "notice_sent"
    PUBLISH_FAILED = "publish_failed"
    ON_BOARD = "on_board"
    ACKNOWLEDGED = "acknowledged"
    ACK_REPEATED = "ack_repeated"
    ACTIVATION_PAGED = "activation_paged"
    ACTIVATION_ACKNOWLEDGED = "activation_acknowledged"
    ACTIVATION_ESCALATED = "activation_escalated"


STATE_RANK: dict[AlertState, int] = {
    AlertState.SENT: 0,
    AlertState.ON_BOARD: 1,
    AlertState.ESCALATED: 1,
    AlertState.ACKNOWLEDGED: 2,
    AlertState.CANCELLED: 3,
}
"""Alert states only move forward in this order (a late ``on_board`` never undoes ``acknowledged``)."""


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """One time point of an alert: when (UTC), from which source, what; ``detail`` holds ids only."""

    at: datetime
    source: EventSource
    kind: EventKind
    detail: str = ""
    historical: bool = False


@dataclass(frozen=True, slots=True)
class AckRecord:
    """A hospital's acknowledgement: state reached, by which role and department, when (UTC)."""

    state: AlertState
    hospital_id: str
    by_role: str
    department: Department | None
    at: datetime
    received_at: datetime


@dataclass(slots=True)
class UnitRecord:
    """What dispatch knows about one ambulance.

    ``position_deg`` is the last valid fix (never (0, 0), FF-05); ``gps_fix`` is False while the receiver reports
    no fix, the position then being the last known one, ``position_at`` its age.  ``online`` comes from the unit's
    birth/last-will messages.
    """

    unit_id: str
    status: CrewStatus | None = None
    status_at: datetime | None = None
    status_seq: int = -1
    position_deg: tuple[float, float] | None = None
    position_at: datetime | None = None
    gps_fix: bool = False
    online: bool | None = None
    session_seq: int = -1
    last_seen_at: datetime | None = None
    current_alert_id: str | None = None
    destination_hospital_id: str | None = None
    current_incident_id: str | None = None
    lifecycle: CrewStatus | None = None
    """Dispatch's view of the unit's stage, from crew taps, GPS geofences and dispatcher actions (None = as the
    crew's last status).  Within an incident it only moves forward (:data:`dispatch.incidents.LIFECYCLE_RANK`)."""
    lifecycle_source: str | None = None
    """Who moved the lifecycle last: ``crew``, ``geofence`` or ``dispatcher``."""
    lifecycle_at: datetime | None = None

    @property
    def state(self) -> CrewStatus | None:
        """The lifecycle stage, falling back to the crew's last status."""
        return self.lifecycle if self.lifecycle is not None else self.status

    @property
    def available(self) -> bool:
        """Free for a new job: online (or unknown), on no incident, and stage ``available`` or ``back_in_service``."""
        return (
            self.online is not False
            and self.current_incident_id is None
            and self.state in (CrewStatus.AVAILABLE, CrewStatus.BACK_IN_SERVICE)
        )


@dataclass(slots=True)
class AlertRecord:
    """One pre-alert and everything dispatch did with it."""

    alert_id: str
    unit_id: str
    case_type: CaseType
    priority: Priority
    findings: Findings
    created_at: datetime
    hospital_id: str
    hospital_name: str
    departments: tuple[Department, ...]
    reasons: tuple[str, ...]
    recommendations: tuple[Recommendation, ...]
    eta_s: float | None
    eta_at: datetime | None
    historical: bool = False
    requested_hospital_id: str | None = None
    state: AlertState = AlertState.SENT
    alert_published: bool = False
    acks: list[AckRecord] = field(default_factory=list)
    timeline: list[TimelineEvent] = field(default_factory=list)
    activations: tuple[Activation, ...] = ()
    incident_id: str | None = None
    saved_events: int = 0
    """How many timeline events the store already holds (write-through bookkeeping, not domain state)."""

    def add_event(
        self, at: datetime, source: EventSource, kind: EventKind, detail: str = "", *, historical: bool = False
    ) -> TimelineEvent:
        """Append a timeline event and return it."""
        event = TimelineEvent(at, source, kind, detail, historical)
        self.timeline.append(event)
        return event


class IncidentState(StrEnum):
    """Where an incident stands: open (no unit), assigned (a unit is on it), closed (handed over), cancelled."""

    OPEN = "open"
    ASSIGNED = "assigned"
    CLOSED = "closed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class AssignmentRecord:
    """One assignment of a unit to an incident: when (UTC), by whom, and when/why it ended (None = current)."""

    unit_id: str
    assigned_at: datetime
    by: str
    ended_at: datetime | None = None
    end_reason: str | None = None


@dataclass(slots=True)
class IncidentRecord:
    """A call for help and its case: location (degrees WGS 84), complaint, priority, assignments, time points.

    ``complaint`` and ``caller_notes`` are free text: stored and shown (HTML-escaped), never logged.
    ``events`` is the case timeline (NEMSIS eTimes and the pathway time points, :mod:`dispatch.timeline`).
    """

    incident_id: str
    lat_deg: float
    lon_deg: float
    complaint: str
    priority: Priority
    created_at: datetime
    created_by: str
    case_type: CaseType | None = None
    caller_notes: str = ""
    state: IncidentState = IncidentState.OPEN
    unit_id: str | None = None
    alert_id: str | None = None
    destination_hospital_id: str | None = None
    assignments: list[AssignmentRecord] = field(default_factory=list)
    events: list[CaseEvent] = field(default_factory=list)
    saved_events: int = 0
    """How many case events the store already holds (write-through bookkeeping)."""

    @property
    def position_deg(self) -> tuple[float, float]:
        """(lat, lon) in degrees."""
        return (self.lat_deg, self.lon_deg)


class Repository(Protocol):
    """What the service needs from a store: synchronous reads from memory, awaited write-through saves.

    Raises (saves, ``open``): :class:`dispatch.errors.StoreError` when the database cannot be reached or refuses.
    """

    def unit(self, unit_id: str) -> UnitRecord: ...
    def find_unit(self, unit_id: str) -> UnitRecord | None: ...
    def units(self) -> list[UnitRecord]: ...
    def alert(self, alert_id: str) -> AlertRecord | None: ...
    def alerts(self) -> list[AlertRecord]: ...
    def add_alert(self, record: AlertRecord) -> None: ...
    def incident(self, incident_id: str) -> IncidentRecord | None: ...
    def incidents(self) -> list[IncidentRecord]: ...
    def add_incident(self, record: IncidentRecord) -> None: ...
    def hospital_statuses(self) -> dict[str, HospitalStatus]: ...
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def save_unit(self, record: UnitRecord) -> None: ...
    async def save_alert(self, record: AlertRecord) -> None: ...
    async def save_incident(self, record: IncidentRecord) -> None: ...
    async def save_hospital_status(self, hospital_id: str, status: HospitalStatus) -> None: ...
    async def get_account(self, username: str) -> AccountRecord | None: ...
    async def save_account(self, record: AccountRecord) -> None: ...
    async def list_accounts(self) -> list[AccountRecord]: ...
    async def save_refresh(self, record: RefreshRecord) -> None: ...
    async def get_refresh(self, token_hash: str) -> RefreshRecord | None: ...
    async def revoke_refresh_family(self, family: str, at: datetime) -> None: ...
    async def append_audit(self, draft: AuditDraft) -> AuditEntry: ...
    async def audit_entries(
        self,
        *,
        after_seq: int = 0,
        limit: int | None = None,
        unit_id: str | None = None,
        alert_id: str | None = None,
        incident_id: str | None = None,
        actor: str | None = None,
    ) -> list[AuditEntry]: ...


def audit_matches(
    entry: AuditEntry,
    unit_id: str | None,
    alert_id: str | None,
    incident_id: str | None,
    actor: str | None,
) -> bool:
    """Whether ``entry`` passes every filter that is set."""
    return (
        (unit_id is None or entry.unit_id == unit_id)
        and (alert_id is None or entry.alert_id == alert_id)
        and (incident_id is None or entry.incident_id == incident_id)
        and (actor is None or entry.actor == actor)
    )


class InMemoryRepository:
    """Units, alerts and incidents, in memory, with a bounded alert table; saves are no-ops."""

    def __init__(self, max_alerts: int = 10_000) -> None:
        self.max_alerts = max_alerts
        self._units: dict[str, UnitRecord] = {}
        self._alerts: OrderedDict[str, AlertRecord] = OrderedDict()
        self._incidents: dict[str, IncidentRecord] = {}
        self._hospital_status: dict[str, HospitalStatus] = {}
        self._accounts: dict[str, AccountRecord] = {}
        self._refresh: dict[str, RefreshRecord] = {}
        self._audit: list[AuditEntry] = []

    # --- accounts, refresh tokens, audit (in memory: the demo without a database, unit tests) ---------------------

    async def get_account(self, username: str) -> AccountRecord | None:
        """The account, or None."""
        return self._accounts.get(username)

    async def save_account(self, record: AccountRecord) -> None:
        """Insert or replace the account."""
        self._accounts[record.username] = record

    async def list_accounts(self) -> list[AccountRecord]:
        """Every account, by username."""
        return [self._accounts[k] for k in sorted(self._accounts)]

    async def save_refresh(self, record: RefreshRecord) -> None:
        """Insert or replace a refresh-token record."""
        self._refresh[record.token_hash] = record

    async def get_refresh(self, token_hash: str) -> RefreshRecord | None:
        """The refresh-token record with this digest, or None."""
        return self._refresh.get(token_hash)

    async def revoke_refresh_family(self, family: str, at: datetime) -> None:
        """Revoke every token of a sign-in session."""
        for key, record in list(self._refresh.items()):
            if record.family == family and record.revoked_at is None:
                self._refresh[key] = replace(record, revoked_at=at)

    async def append_audit(self, draft: AuditDraft) -> AuditEntry:
        """Seal ``draft`` after the last row and append it (one event loop: no interleaving)."""
        last = self._audit[-1] if self._audit else None
        entry = seal(draft, last.seq + 1 if last else 1, last.hash if last else GENESIS_HASH)
        self._audit.append(entry)
        return entry

    async def audit_entries(
        self,
        *,
        after_seq: int = 0,
        limit: int | None = None,
        unit_id: str | None = None,
        alert_id: str | None = None,
        incident_id: str | None = None,
        actor: str | None = None,
    ) -> list[AuditEntry]:
        """Rows after ``after_seq`` in order, filtered, at most ``limit``."""
        rows = [e for e in self._audit if e.seq > after_seq and audit_matches(e, unit_id, alert_id, incident_id, actor)]
        return rows if limit is None else rows[:limit]

    async def open(self) -> None:
        """Nothing to load."""

    async def close(self) -> None:
        """Nothing to release."""

    async def save_unit(self, record: UnitRecord) -> None:
        """No-op: the record in memory is the state."""

    async def save_alert(self, record: AlertRecord) -> None:
        """No-op apart from the event bookkeeping."""
        record.saved_events = len(record.timeline)

    async def save_incident(self, record: IncidentRecord) -> None:
        """No-op apart from the event bookkeeping."""
        record.saved_events = len(record.events)

    async def save_hospital_status(self, hospital_id: str, status: HospitalStatus) -> None:
        """Keep the latest status per hospital (the registry holds the live one)."""
        self._hospital_status[hospital_id] = status

    def hospital_statuses(self) -> dict[str, HospitalStatus]:
        """The latest saved status per hospital id."""
        return dict(self._hospital_status)

    def incident(self, incident_id: str) -> IncidentRecord | None:
        """The incident with this id, or None."""
        return self._incidents.get(incident_id)

    def incidents(self) -> list[IncidentRecord]:
        """Every incident, newest first."""
        return sorted(self._incidents.values(), key=lambda i: (i.created_at, i.incident_id), reverse=True)

    def add_incident(self, record: IncidentRecord) -> None:
        """Store a new incident."""
        self._incidents[record.incident_id] = record

    def unit(self, unit_id: str) -> UnitRecord:
        """The unit's record, created empty on first sight."""
        record = self._units.get(unit_id)
        if record is None:
            record = self._units[unit_id] = UnitRecord(unit_id)
        return record

    def find_unit(self, unit_id: str) -> UnitRecord | None:
        """The unit's record, or None if never seen."""
        return self._units.get(unit_id)

    def units(self) -> list[UnitRecord]:
        """Every known unit, in id order."""
        return [self._units[k] for k in sorted(self._units)]

    def alert(self, alert_id: str) -> AlertRecord | None:
        """The alert with this id, or None."""
        return self._alerts.get(alert_id)

    def alerts(self) -> list[AlertRecord]:
        """Every alert, newest first."""
        return list(reversed(self._alerts.values()))

    def add_alert(self, record: AlertRecord) -> None:
        """Store a new alert, evicting the oldest (closed first) beyond ``max_alerts``."""
        self._alerts[record.alert_id] = record
        while len(self._alerts) > self.max_alerts:
            closed = next(
                (k for k, a in self._alerts.items() if a.state in (AlertState.ACKNOWLEDGED, AlertState.CANCELLED)),
                None,
            )
            self._alerts.pop(closed if closed is not None else next(iter(self._alerts)))
