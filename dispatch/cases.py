"""Incidents, assignments and case timelines: the stateful part behind the incident and case endpoints.

:class:`CaseDesk` is owned by :class:`dispatch.service.DispatchService` (``service.cases``) and runs on the
service's event loop, like everything that writes the repository.  It

* creates incidents (eTimes.01 call received, source ``dispatch``);
* assigns a unit: Notice(kind=assignment, incident id and position) to the unit, eTimes.02 dispatch notified at the
  first assignment and eTimes.03 unit notified once the broker confirmed the notice; a re-assignment or a
  cancellation sends Notice(kind=assignment_cancelled) to the unit stood down;
* follows the unit through the incident from crew status taps (source ``crew``) and GPS geofences (source
  ``geofence``, :mod:`dispatch.incidents`), links the unit's pre-alert to the case (pre-alert sent, FMC, first ECG,
  ECG transmitted; source ``device``/``crew``) and the cath lab's activation and acknowledgement;
* takes hospital time points (door, device, needle, CT start) from the API, refusing one out of order.

Automatic time points that break a NEMSIS v3.5 ordering rule are kept with a data-quality flag
(:func:`dispatch.timeline.append_event`).  Logs carry ids only; complaint and caller notes are never logged.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime

from pydantic import BaseModel

from broker_config import (
    CaseType,
    CrewStatus,
    Department,
    GpsFix,
    Notice,
    NoticeKind,
    PreAlert,
    Priority,
    Status,
    Stream,
)
from dispatch.errors import (
    IncidentClosedError,
    UnitUnavailableError,
    UnknownIncidentError,
    UnknownUnitError,
)
from dispatch.geo import valid_position_deg
from dispatch.hospitals import HospitalRegistry
from dispatch.incidents import GEOFENCE_RADIUS_M, STATUS_TIME_POINTS, advances, within_geofence
from dispatch.repository import (
    AlertRecord,
    AssignmentRecord,
    IncidentRecord,
    IncidentState,
    Repository,
    UnitRecord,
)
from dispatch.timeline import CaseEvent, CaseSummary, TimePoint, TimeSource, append_event

__all__ = ["AssignResult", "CaseDesk"]

logger = logging.getLogger(__name__)

Publish = Callable[[Stream, str, BaseModel], Awaitable[bool]]
NextSeq = Callable[[Stream, str], int]

_UNIT_TAG = "unit="


def _unit_of(event: CaseEvent) -> str | None:
    for part in event.detail.split():
        if part.startswith(_UNIT_TAG):
            return part[len(_UNIT_TAG) :]
    return None


def _offset_s(sent_at: datetime, received_at: datetime) -> float:
    """The source clock minus dispatch's clock, seconds (includes the transport latency, an upper bound)."""
    return round((sent_at - received_at).total_seconds(), 3)


@dataclass(frozen=True, slots=True)
class AssignResult:
    """The outcome of an assignment: the incident, whether the broker confirmed the unit's notice, and the unit
    stood down (re-assignment) with whether its cancellation notice was confirmed."""

    incident: IncidentRecord
    notice_confirmed: bool
    previous_unit_id: str | None = None
    cancel_confirmed: bool | None = None


class CaseDesk:
    """Incidents and their case timelines (see the module docstring).

    Args:
        repo: the service's repository (reads from memory, awaited write-through saves).
        registry: hospitals (destination geofence, hospital ids of time points).
        clock: the UTC clock.
        publish: ``publish(stream, owner_id, message) -> confirmed``: the service's QoS-1 publish.
        next_seq: the service's outbound sequence counter.
        geofence_radius_m: arrival radius in metres (default :data:`dispatch.incidents.GEOFENCE_RADIUS_M`).
        new_id: incident id factory (default ``INC-`` and 12 hex digits).
    """

    def __init__(
        self,
        repo: Repository,
        registry: HospitalRegistry,
        clock: Callable[[], datetime],
        publish: Publish,
        next_seq: NextSeq,
        *,
        geofence_radius_m: float = GEOFENCE_RADIUS_M,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        self.repo = repo
        self.registry = registry
        self.clock = clock
        self._publish = publish
        self._next_seq = next_seq
        self.geofence_radius_m = geofence_radius_m
        self._new_id = new_id or (lambda: f"INC-{uuid.uuid4().hex[:12]}")

    # --- incidents -------------------------------------------------------------------------------------------------

    def get(self, incident_id: str) -> IncidentRecord:
        """The incident.  Raises UnknownIncidentError."""
        incident = self.repo.incident(incident_id)
        if incident is None:
            raise UnknownIncidentError(incident_id)
        return incident

    async def create(
        self,
        *,
        lat_deg: float,
        lon_deg: float,
        complaint: str,
        priority: Priority,
        created_by: str,
        case_type: CaseType | None = None,
        caller_notes: str = "",
        call_received_at: datetime | None = None,
        destination_hospital_id: str | None = None,
    ) -> IncidentRecord:
        """Open an incident at (lat, lon) degrees; records eTimes.01 (call received, default now).

        Raises:
            ValueError: the position is out of range or (0, 0).  UnknownHospitalError: unknown destination.
            StoreError: not stored.
        """
        if not valid_position_deg((lat_deg, lon_deg)):
            raise ValueError("incident position out of range or (0, 0)")
        if destination_hospital_id is not None:
            self.registry.get(destination_hospital_id)
        now = self.clock()
        incident = IncidentRecord(
            incident_id=self._new_id(),
            lat_deg=lat_deg,
            lon_deg=lon_deg,
            complaint=complaint,
            priority=priority,
            created_at=now,
            created_by=created_by,
            case_type=case_type,
            caller_notes=caller_notes,
            destination_hospital_id=destination_hospital_id,
        )
        append_event(incident.events, TimePoint.CALL_RECEIVED, call_received_at or now, TimeSource.DISPATCH, now)
        self.repo.add_incident(incident)
        await self.repo.save_incident(incident)
        logger.info("incident created incident=%s priority=%s", incident.incident_id, priority.value)
        return incident

    # --- assignment ------------------------------------------------------------------------------------------------

    @staticmethod
    def unavailable_reason(unit: UnitRecord) -> str | None:
        """Why a unit cannot take a job now, or None when it can."""
        if unit.online is False:
            return "offline"
        if unit.current_incident_id is not None:
            return f"on incident {unit.current_incident_id}"
        if not unit.available:
            return f"status {unit.state.value if unit.state else 'unknown'}"
        return None

    async def assign(self, incident_id: str, unit_id: str, by: str) -> AssignResult:
        """Assign ``unit_id`` to the incident, standing down the unit assigned before (if another).

        Assigning the unit already on the incident repeats its notice.  Raises UnknownIncidentError,
        UnknownUnitError, IncidentClosedError (closed or cancelled), UnitUnavailableError, StoreError.
        """
        incident = self.get(incident_id)
        if incident.state in (IncidentState.CLOSED, IncidentState.CANCELLED):
            raise IncidentClosedError(incident_id, incident.state.value)
        unit = self.repo.find_unit(unit_id)
        if unit is None:
            raise UnknownUnitError(unit_id)
        now = self.clock()
        repeat = incident.unit_id == unit_id and unit.current_incident_id == incident_id
        if not repeat:
            reason = self.unavailable_reason(unit)
            if reason is not None:
                raise UnitUnavailableError(unit_id, reason)
        previous_id = incident.unit_id if incident.state is IncidentState.ASSIGNED and not repeat else None
        cancel_confirmed: bool | None = None
        if previous_id is not None:
            cancel_confirmed = await self._stand_down(incident, previous_id, now, "reassigned")
        if not repeat:
            incident.assignments.append(AssignmentRecord(unit_id, now, by[:64]))
            incident.unit_id = unit_id
            incident.state = IncidentState.ASSIGNED
            unit.current_incident_id = incident_id
            unit.lifecycle, unit.lifecycle_source, unit.lifecycle_at = CrewStatus.ASSIGNED, "dispatcher", now
            if not any(e.point is TimePoint.DISPATCH_NOTIFIED for e in incident.events):
                append_event(incident.events, TimePoint.DISPATCH_NOTIFIED, now, TimeSource.DISPATCH, now)
        notice = Notice(
            unit_id=unit_id,
            seq=self._next_seq(Stream.NOTICE, unit_id),
            sent_at=now,
            kind=NoticeKind.ASSIGNMENT,
            incident_id=incident_id,
            incident_lat_deg=incident.lat_deg,
            incident_lon_deg=incident.lon_deg,
            hospital_id=incident.destination_hospital_id,
        )
        confirmed = await self._publish(Stream.NOTICE, unit_id, notice)
        if confirmed:
            self._record(incident, TimePoint.UNIT_NOTIFIED, self.clock(), TimeSource.DISPATCH, unit_id=unit_id)
        logger.info(
            "unit assigned incident=%s unit=%s previous=%s confirmed=%s", incident_id, unit_id, previous_id, confirmed
        )
        await self.repo.save_unit(unit)
        await self.repo.save_incident(incident)
        return AssignResult(incident, confirmed, previous_id, cancel_confirmed)

    async def cancel(self, incident_id: str, by: str) -> AssignResult:
        """Cancel the incident; the assigned unit (if any) gets Notice(kind=assignment_cancelled).

        Raises UnknownIncidentError, IncidentClosedError (already closed or cancelled), StoreError.
        """
        incident = self.get(incident_id)
        if incident.state in (IncidentState.CLOSED, IncidentState.CANCELLED):
            raise IncidentClosedError(incident_id, incident.state.value)
        now = self.clock()
        previous_id = incident.unit_id if incident.state is IncidentState.ASSIGNED else None
        confirmed: bool | None = None
        if previous_id is not None:
            confirmed = await self._stand_down(incident, previous_id, now, "cancelled")
        incident.state = IncidentState.CANCELLED
        logger.info("incident cancelled incident=%s unit=%s by_len=%d", incident_id, previous_id, len(by))
        await self.repo.save_incident(incident)
        return AssignResult(incident, False, previous_id, confirmed)

    async def _stand_down(self, incident: IncidentRecord, unit_id: str, now: datetime, reason: str) -> bool:
        if incident.assignments and incident.assignments[-1].unit_id == unit_id:
            incident.assignments[-1] = replace(incident.assignments[-1], ended_at=now, end_reason=reason)
        unit = self.repo.find_unit(unit_id)
        if unit is not None and unit.current_incident_id == incident.incident_id:
            unit.current_incident_id = None
            unit.lifecycle, unit.lifecycle_source, unit.lifecycle_at = CrewStatus.AVAILABLE, "dispatcher", now
            await self.repo.save_unit(unit)
        notice = Notice(
            unit_id=unit_id,
            seq=self._next_seq(Stream.NOTICE, unit_id),
            sent_at=now,
            kind=NoticeKind.ASSIGNMENT_CANCELLED,
            incident_id=incident.incident_id,
        )
        confirmed = await self._publish(Stream.NOTICE, unit_id, notice)
        logger.info(
            "unit stood down incident=%s unit=%s reason=%s confirmed=%s",
            incident.incident_id,
            unit_id,
            reason,
            confirmed,
        )
        return confirmed

    # --- time points -----------------------------------------------------------------------------------------------

    def _record(
        self,
        incident: IncidentRecord,
        point: TimePoint,
        at: datetime,
        source: TimeSource,
        *,
        unit_id: str | None = None,
        detail: str = "",
        clock_offset_s: float | None = None,
    ) -> CaseEvent | None:
        """Record an automatic time point; per-unit points are order-checked against that unit's events only."""
        against = None
        if unit_id is not None:
            detail = f"{_UNIT_TAG}{unit_id} {detail}".strip()
            against = [e for e in incident.events if _unit_of(e) in (None, unit_id)]
        event = append_event(
            incident.events,
            point,
            at,
            source,
            self.clock(),
            detail=detail,
            clock_offset_s=clock_offset_s,
            against=against,
        )
        if event is not None and event.flags:
            logger.warning(
                "time point out of order incident=%s point=%s source=%s", incident.incident_id, point.value, source
            )
        return event

    def _has(self, incident: IncidentRecord, point: TimePoint, unit_id: str, source: TimeSource | None = None) -> bool:
        return any(
            e.point is point and _unit_of(e) == unit_id and (source is None or e.source is source)
            for e in incident.events
        )

    def _incident_for(self, unit: UnitRecord, incident_id: str | None) -> IncidentRecord | None:
        incident = self.repo.incident(incident_id or unit.current_incident_id or "")
        if incident is None or incident.unit_id != unit.unit_id or incident.state is IncidentState.CANCELLED:
            return None
        return incident

    async def on_status(self, unit: UnitRecord, status: Status, received_at: datetime, *, newest: bool) -> None:
        """A crew status tap: its eTime on the case, the unit's lifecycle (``newest``: not older than the last)."""
        incident = self._incident_for(unit, status.incident_id)
        if incident is None:
            if unit.current_incident_id is None and newest:
                unit.lifecycle, unit.lifecycle_source, unit.lifecycle_at = None, "crew", status.at
            return
        if status.destination_hospital_id is not None and status.destination_hospital_id in self.registry:
            incident.destination_hospital_id = status.destination_hospital_id
        point = STATUS_TIME_POINTS.get(status.status)
        if point is not None:
            self._record(
                incident,
                point,
                status.at,
                TimeSource.CREW,
                unit_id=unit.unit_id,
                clock_offset_s=_offset_s(status.sent_at, received_at),
            )
        if unit.current_incident_id == incident.incident_id and advances(unit.lifecycle, status.status):
            unit.lifecycle, unit.lifecycle_source, unit.lifecycle_at = status.status, "crew", status.at
        closing = status.status in (CrewStatus.HANDED_OVER, CrewStatus.BACK_IN_SERVICE)
        if closing and incident.state is IncidentState.ASSIGNED:
            incident.state = IncidentState.CLOSED
            if incident.assignments and incident.assignments[-1].ended_at is None:
                incident.assignments[-1] = replace(
                    incident.assignments[-1], ended_at=status.at, end_reason=status.status.value
                )
        if status.status is CrewStatus.BACK_IN_SERVICE and unit.current_incident_id == incident.incident_id:
            unit.current_incident_id = None
        await self.repo.save_incident(incident)

    async def on_gps(self, unit: UnitRecord, fix: GpsFix, received_at: datetime) -> None:
        """A position: arrival geofences on scene (eTimes.06) and at the destination (eTimes.11)."""
        if unit.current_incident_id is None or not fix.fix or fix.lat_deg is None or fix.lon_deg is None:
            return
        incident = self._incident_for(unit, None)
        if incident is None:
            return
        position = (fix.lat_deg, fix.lon_deg)
        at = fix.device_time if fix.device_time is not None and not fix.clock_suspect else fix.sent_at
        offset = _offset_s(fix.sent_at, received_at)
        changed = False
        if not self._has(incident, TimePoint.ON_SCENE, unit.unit_id, TimeSource.GEOFENCE) and within_geofence(
            position, incident.position_deg, self.geofence_radius_m
        ):
            changed |= self._geofence(incident, unit, TimePoint.ON_SCENE, CrewStatus.ON_SCENE, at, offset)
        destination = incident.destination_hospital_id or unit.destination_hospital_id
        patient_on_board = self._has(incident, TimePoint.PATIENT_CONTACT, unit.unit_id) or self._has(
            incident, TimePoint.LEFT_SCENE, unit.unit_id
        )
        if (
            destination is not None
            and destination in self.registry
            and patient_on_board
            and not self._has(incident, TimePoint.AT_DESTINATION, unit.unit_id, TimeSource.GEOFENCE)
            and within_geofence(position, self.registry.get(destination).position_deg, self.geofence_radius_m)
        ):
            changed |= self._geofence(incident, unit, TimePoint.AT_DESTINATION, CrewStatus.AT_HOSPITAL, at, offset)
        if changed:
            await self.repo.save_incident(incident)

    def _geofence(
        self,
        incident: IncidentRecord,
        unit: UnitRecord,
        point: TimePoint,
        stage: CrewStatus,
        at: datetime,
        offset_s: float,
    ) -> bool:
        event = self._record(incident, point, at, TimeSource.GEOFENCE, unit_id=unit.unit_id, clock_offset_s=offset_s)
        if advances(unit.lifecycle, stage):
            unit.lifecycle, unit.lifecycle_source, unit.lifecycle_at = stage, "geofence", at
        logger.info("geofence incident=%s unit=%s point=%s", incident.incident_id, unit.unit_id, point.value)
        return event is not None

    async def on_prealert(self, record: AlertRecord, alert: PreAlert, received_at: datetime) -> None:
        """Link a new pre-alert to the unit's incident: pre-alert sent, FMC, first ECG, ECG transmitted, cath lab."""
        unit = self.repo.find_unit(alert.unit_id)
        incident = self._incident_for(unit, None) if unit is not None and unit.current_incident_id else None
        if incident is None:
            return
        record.incident_id = incident.incident_id
        incident.alert_id = record.alert_id
        incident.case_type = alert.case_type
        incident.destination_hospital_id = record.hospital_id
        unit_id = alert.unit_id
        offset = _offset_s(alert.sent_at, received_at)
        tag = f"alert={alert.alert_id}"
        self._record(
            incident,
            TimePoint.PREALERT_SENT,
            alert.sent_at,
            TimeSource.DEVICE,
            unit_id=unit_id,
            detail=tag,
            clock_offset_s=offset,
        )
        f = alert.findings
        for point, at, source in (
            (TimePoint.PATIENT_CONTACT, f.fmc_at, TimeSource.CREW),
            (TimePoint.FIRST_ECG, f.first_ecg_at, TimeSource.DEVICE),
            (TimePoint.ECG_TRANSMITTED, f.ecg_transmitted_at, TimeSource.DEVICE),
        ):
            if at is not None:
                self._record(incident, point, at, source, unit_id=unit_id, detail=tag, clock_offset_s=offset)
        for activation in record.activations:
            if activation.department is Department.CATH_LAB and activation.paged_at is not None:
                self._record(
                    incident,
                    TimePoint.CATH_LAB_ACTIVATED,
                    activation.paged_at,
                    TimeSource.DISPATCH,
                    detail=f"{tag} hospital={record.hospital_id}",
                )
        await self.repo.save_incident(incident)

    async def on_acknowledged(self, record: AlertRecord, departments: tuple[Department, ...], at: datetime) -> None:
        """A hospital acknowledged pages of a linked alert: the cath lab's acknowledgement time point."""
        if record.incident_id is None or Department.CATH_LAB not in departments:
            return
        incident = self.repo.incident(record.incident_id)
        if incident is None:
            return
        self._record(
            incident,
            TimePoint.CATH_LAB_ACKNOWLEDGED,
            at,
            TimeSource.HOSPITAL,
            detail=f"alert={record.alert_id} hospital={record.hospital_id}",
        )
        await self.repo.save_incident(incident)

    async def add_hospital_event(
        self, case_id: str, point: TimePoint, at: datetime, *, hospital_id: str | None = None
    ) -> CaseEvent:
        """A hospital time point posted by a person (door, device, needle, CT start).

        Raises:
            UnknownIncidentError; IncidentClosedError (cancelled case); UnknownHospitalError;
            TimelineOrderError (breaks an ordering rule: refused, not stored); StoreError.
        """
        incident = self.get(case_id)
        if incident.state is IncidentState.CANCELLED:
            raise IncidentClosedError(case_id, incident.state.value)
        if hospital_id is not None:
            self.registry.get(hospital_id)
        detail = f"hospital={hospital_id}" if hospital_id else ""
        event = append_event(incident.events, point, at, TimeSource.HOSPITAL, self.clock(), detail=detail, strict=True)
        if event is None:  # the same point at the same time again: idempotent
            event = next(
                e for e in incident.events if e.point is point and e.at == at and e.source is TimeSource.HOSPITAL
            )
        else:
            await self.repo.save_incident(incident)
            logger.info("hospital time point incident=%s point=%s", case_id, point.value)
        return event

    # --- reports ---------------------------------------------------------------------------------------------------

    def cases_between(self, start: datetime, end: datetime) -> list[CaseSummary]:
        """Cases (not cancelled) whose call was received in ``[start, end)``, oldest first."""
        out: list[CaseSummary] = []
        for incident in self.repo.incidents():
            if incident.state is IncidentState.CANCELLED:
                continue
            call = min(
                (e.at for e in incident.events if e.point is TimePoint.CALL_RECEIVED), default=incident.created_at
            )
            if start <= call < end:
                out.append(CaseSummary(incident.incident_id, incident.case_type, tuple(incident.events)))
        out.reverse()
        return out
