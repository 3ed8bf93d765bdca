"""In-memory state of the dispatch service: units, alerts and each alert's event timeline.

Only the service's event loop writes here (the MQTT worker and the API handlers share one loop), so no locks are
needed.  Persistence (PostgreSQL) will replace this class behind the same methods.  The alert table is bounded:
beyond ``max_alerts`` the oldest closed alerts are evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from broker_config import AlertState, CaseType, CrewStatus, Department, Findings, Priority
from dispatch.destination import Recommendation

__all__ = [
    "AckRecord",
    "AlertRecord",
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

    @property
    def available(self) -> bool:
        """Free for a new job: online (or unknown) and last status ``available`` or ``back_in_service``."""
        return self.online is not False and self.status in (CrewStatus.AVAILABLE, CrewStatus.BACK_IN_SERVICE)


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

    def add_event(
        self, at: datetime, source: EventSource, kind: EventKind, detail: str = "", *, historical: bool = False
    ) -> TimelineEvent:
        """Append a timeline event and return it."""
        event = TimelineEvent(at, source, kind, detail, historical)
        self.timeline.append(event)
        return event


class InMemoryRepository:
    """Units and alerts, in memory, with a bounded alert table."""

    def __init__(self, max_alerts: int = 10_000) -> None:
        self.max_alerts = max_alerts
        self._units: dict[str, UnitRecord] = {}
        self._alerts: OrderedDict[str, AlertRecord] = OrderedDict()

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
