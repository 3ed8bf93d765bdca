"""Pure board state: which ambulances are coming to which hospital, and what the board shows about each.

No I/O, no clock reads: every method takes ``now_at`` (timezone-aware UTC) and returns the :class:`BoardEvent`s
that the change produces, each addressed to the hospitals that may see it (DOMAIN.md section 11: a hospital
sees only the patients coming to it).  The MQTT adapter (:mod:`hospital_board.sources`) feeds decoded contract
models in; the push feed (:mod:`hospital_board.feed`) fans the events out; snapshots are the ``*Public`` pydantic
models sent on the wire.

Rules:

* A unit becomes inbound to hospital H when an alert for H names it; it leaves when that alert is cancelled or
  the crew reports hand-over (NEMSIS eTimes.12) or back in service (eTimes.13) after the alert was sent.
* Cards are ordered by the most urgent open alert's priority (IEC 60601-1-8: high, medium, low), then by ETA
  (unknown last), then by unit id.
* Vitals are kept per measurement with its ``measured_at``: an older measurement never replaces a newer one, and a
  reading older than ``stale_after_s`` is flagged stale (never shown as current).
* A GPS report without a fix keeps the last known position, flagged lost; (0, 0) is never a position (FF-05/FF-15).
* The ECG strip keeps the last ``ecg_window_s`` of the first lead in mV as a bounded ring of chunks.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from broker_config import (
    AlertAck,
    AlertState,
    Availability,
    CaseType,
    CrewStatus,
    Department,
    EcgChunk,
    GpsFix,
    HospitalAlert,
    Priority,
    Status,
    Vitals,
    ecg_to_mv,
)

__all__ = [
    "PRIORITY_RANK",
    "AlertClosedError",
    "AlertPublic",
    "BoardError",
    "BoardEvent",
    "BoardSnapshot",
    "BoardState",
    "CardPublic",
    "EcgEvent",
    "EcgSegmentPublic",
    "EventKind",
    "NibpPublic",
    "PositionEvent",
    "PositionPublic",
    "ReadingPublic",
    "RemovedEvent",
    "AlertEvent",
    "UnitStateEvent",
    "UnknownAlertError",
    "VitalsEvent",
    "VitalsPublic",
    "WrongHospitalError",
]

PRIORITY_RANK: dict[Priority, int] = {Priority.HIGH: 0, Priority.MEDIUM: 1, Priority.LOW: 2}
"""Sort rank of an alert priority, most urgent first (IEC 60601-1-8 high > medium > low)."""

_STATE_RANK: dict[AlertState, int] = {
    AlertState.SENT: 0,
    AlertState.ON_BOARD: 1,
    AlertState.ESCALATED: 2,
    AlertState.ACKNOWLEDGED: 3,
    AlertState.CANCELLED: 4,
}
"""An alert's state only moves forward: a late or duplicated message never un-acknowledges nor revives it."""

_CLOSING_STATUSES = frozenset({CrewStatus.HANDED_OVER, CrewStatus.BACK_IN_SERVICE, CrewStatus.AVAILABLE})
_ECG_MAX_CHUNKS = 400
"""Hard bound of the ring in chunks, whatever their length (40 chunks/s of 25 ms for 10 s)."""
_ECG_DECIMALS = 3
"""mV rounded to 1 uV on the wire: far below the 10 uV resolution of a diagnostic ECG (IEC 60601-2-25)."""


# --- errors -------------------------------------------------------------------------------------------------------


class BoardError(Exception):
    """Root of the board's domain errors; ``alert_id`` names the alert concerned."""

    def __init__(self, alert_id: str, message: str) -> None:
        super().__init__(message)
        self.alert_id = alert_id


class UnknownAlertError(BoardError):
    """No such alert on this board (HTTP 404)."""


class WrongHospitalError(BoardError):
    """The alert is addressed to another hospital (HTTP 409)."""


class AlertClosedError(BoardError):
    """The alert was cancelled or its patient handed over (HTTP 409)."""


# --- wire models ("public" schemas) ------------------------------------------------------------------------------


class _Public(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ReadingPublic(_Public):
    """One measured value with its time; ``age_s`` and ``stale`` are as of the event's ``server_time``."""

    value: float
    measured_at: datetime
    age_s: float
    stale: bool


class NibpPublic(_Public):
    """Non-invasive blood pressure, mm[Hg] (LOINC 85354-9 panel: 8480-6 systolic, 8462-4 diastolic)."""

    sbp_mmhg: float | None
    dbp_mmhg: float | None
    map_mmhg: float | None
    measured_at: datetime
    age_s: float
    stale: bool


class VitalsPublic(_Public):
    """Latest vital signs of a unit, each with its own age.  ``None`` = never measured (never shown as zero)."""

    heart_rate_bpm: ReadingPublic | None = None
    heart_rate_source: Literal["ecg", "monitor", "oximeter"] | None = None
    spo2_pct: ReadingPublic | None = None
    nibp: NibpPublic | None = None
    resp_rate_per_min: ReadingPublic | None = None
    etco2_mmhg: ReadingPublic | None = None
    temp_c: ReadingPublic | None = None


class PositionPublic(_Public):
    """Last known position.  ``has_position`` False = never had a fix ("no position"); ``fix_lost`` = the latest
    report had no fix, so ``lat_deg``/``lon_deg`` are the last known ones (shown greyed with their age)."""

    has_position: bool
    lat_deg: float | None = None
    lon_deg: float | None = None
    fix_at: datetime | None = None
    age_s: float | None = None
    fix_lost: bool = False
    speed_mps: float | None = None


class EcgSegmentPublic(_Public):
    """Contiguous first-lead samples in mV: sample ``i`` is at ``start_at + i / fs_hz``."""

    seq: int
    start_at: datetime
    fs_hz: float
    lead: str
    lead_off: bool
    samples_mv: list[float]


class AlertPublic(_Public):
    """An alert as the board shows it (the crew note is plain text: the page escapes it, FF-16)."""

    alert_id: str
    hospital_id: str
    unit_id: str
    case_type: CaseType
    priority: Priority
    state: AlertState
    eta_at: datetime | None
    departments: tuple[Department, ...]
    age_years: int | None
    sex: str
    note: str
    reasons: tuple[str, ...]
    ecg_st_elevation: bool | None
    be_fast_positive: bool | None
    lams: int | None
    gcs_total: int | None
    trauma_red_criteria: tuple[str, ...]
    historical: bool
    received_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str | None


class CardPublic(_Public):
    """One inbound ambulance on one hospital's board."""

    unit_id: str
    availability: Literal["online", "offline", "unknown"]
    availability_at: datetime | None
    crew_status: CrewStatus | None
    crew_status_at: datetime | None
    alerts: list[AlertPublic]
    vitals: VitalsPublic
    position: PositionPublic
    ecg: list[EcgSegmentPublic]


class BoardSnapshot(_Public):
    """Everything one hospital's board shows, ordered by acuity then ETA (the resync of the feed)."""

    hospital_id: str
    server_time: datetime
    stale_after_s: float
    nibp_stale_after_s: float
    ecg_window_s: float
    cards: list[CardPublic]


class AlertEvent(_Public):
    """An alert was added or changed; carries the unit's whole card.  Never coalesced nor dropped."""

    server_time: datetime
    alert: AlertPublic
    card: CardPublic


class RemovedEvent(_Public):
    """A unit is no longer inbound to this hospital (cancelled or handed over)."""

    server_time: datetime
    unit_id: str


class VitalsEvent(_Public):
    """Latest vitals of a unit (coalesced latest-wins per unit)."""

    server_time: datetime
    unit_id: str
    vitals: VitalsPublic


class PositionEvent(_Public):
    """Latest position of a unit (coalesced latest-wins per unit)."""

    server_time: datetime
    unit_id: str
    position: PositionPublic


class UnitStateEvent(_Public):
    """Availability and crew status of a unit (coalesced latest-wins per unit)."""

    server_time: datetime
    unit_id: str
    availability: Literal["online", "offline", "unknown"]
    availability_at: datetime | None
    crew_status: CrewStatus | None
    crew_status_at: datetime | None


class EcgEvent(_Public):
    """New ECG samples of a unit (appended, in order)."""

    server_time: datetime
    unit_id: str
    segment: EcgSegmentPublic


class EventKind(StrEnum):
    """SSE event names of the board feed."""

    SNAPSHOT = "snapshot"
    ALERT = "alert"
    REMOVED = "removed"
    VITALS = "vitals"
    POSITION = "position"
    UNIT = "unit"
    ECG = "ecg"


COALESCED_KINDS = frozenset({EventKind.VITALS, EventKind.POSITION, EventKind.UNIT})
"""Kinds where only the latest pending event per unit matters (FF-14); the others are delivered one by one."""


@dataclass(frozen=True, slots=True)
class BoardEvent:
    """One change, addressed to the boards of ``hospital_ids``.  ``unit_id`` is the coalescing key."""

    kind: EventKind
    hospital_ids: frozenset[str]
    unit_id: str
    payload: BaseModel

    @property
    def coalesced(self) -> bool:
        """Whether a newer event of the same kind and unit may replace this one while it waits."""
        return self.kind in COALESCED_KINDS


# --- internal state ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Reading:
    value: float
    measured_at: datetime


@dataclass(slots=True)
class _Nibp:
    sbp_mmhg: float | None
    dbp_mmhg: float | None
    map_mmhg: float | None
    measured_at: datetime


@dataclass(slots=True)
class _Segment:
    seq: int
    start_at: datetime
    fs_hz: float
    lead: str
    lead_off: bool
    samples_mv: np.ndarray

    @property
    def duration_s(self) -> float:
        return len(self.samples_mv) / self.fs_hz


@dataclass(slots=True)
class _Unit:
    unit_id: str
    last_heard_at: datetime
    availability: Literal["online", "offline", "unknown"] = "unknown"
    availability_at: datetime | None = None
    session_seq: int = -1
    crew_status: CrewStatus | None = None
    crew_status_at: datetime | None = None
    readings: dict[str, _Reading] = field(default_factory=dict)
    heart_rate_source: Literal["ecg", "monitor", "oximeter"] | None = None
    nibp: _Nibp | None = None
    lat_deg: float | None = None
    lon_deg: float | None = None
    fix_at: datetime | None = None
    fix_lost: bool = False
    speed_mps: float | None = None
    last_gps_at: datetime | None = None
    ecg: deque[_Segment] = field(default_factory=lambda: deque(maxlen=_ECG_MAX_CHUNKS))
    last_ecg_seq: int = -1


@dataclass(slots=True)
class _Alert:
    message: HospitalAlert
    state: AlertState
    received_at: datetime
    closed_at: datetime | None = None
    acknowledged_at: datetime | None = None
    acknowledged_by: str | None = None

    @property
    def open(self) -> bool:
        return self.closed_at is None


_READING_FIELDS = ("heart_rate_bpm", "spo2_pct", "resp_rate_per_min", "etco2_mmhg", "temp_c")


def _age_s(at: datetime, now_at: datetime) -> float:
    """Seconds since ``at``, never negative (a device clock slightly ahead reads as just measured)."""
    return max(0.0, (now_at - at).total_seconds())


class BoardState:
    """All hospitals' boards in one process.  Not thread-safe: one asyncio task owns it.

    Args:
        stale_after_s: a reading older than this is flagged stale.
        ecg_window_s: seconds of the first ECG lead kept per unit.
        nibp_stale_after_s: staleness limit of a cuff blood pressure (cycled every few minutes, not streamed).
        alert_retention_s: how long closed alerts stay known (for 409 instead of 404 on a late ack).
        unit_retention_s: how long a unit that is silent and not inbound is remembered.
    """

    def __init__(
        self,
        *,
        stale_after_s: float = 10.0,
        ecg_window_s: float = 10.0,
        nibp_stale_after_s: float = 300.0,
        alert_retention_s: float = 3_600.0,
        unit_retention_s: float = 6 * 3_600.0,
    ) -> None:
        if stale_after_s <= 0 or ecg_window_s <= 0:
            raise ValueError("stale_after_s and ecg_window_s must be positive")
        self.stale_after_s = stale_after_s
        self.ecg_window_s = ecg_window_s
        self.nibp_stale_after_s = max(nibp_stale_after_s, stale_after_s)
        self.alert_retention_s = alert_retention_s
        self.unit_retention_s = unit_retention_s
        self._units: dict[str, _Unit] = {}
        self._alerts: dict[str, _Alert] = {}

    # --- queries ---------------------------------------------------------------------------------------------

    def hospitals_of(self, unit_id: str) -> frozenset[str]:
        """Hospitals to which ``unit_id`` is inbound (an open alert names it)."""
        alerts = self._alerts.values()
        return frozenset(a.message.hospital_id for a in alerts if a.open and a.message.unit_id == unit_id)

    def inbound_units(self, hospital_id: str) -> list[str]:
        """Unit ids inbound to ``hospital_id``, in board order (priority, then ETA, then unit id)."""
        return [card_unit for card_unit, _ in self._ordered(hospital_id)]

    def alert(self, alert_id: str) -> AlertPublic:
        """The public view of one alert.  Raises :class:`UnknownAlertError`."""
        record = self._alerts.get(alert_id)
        if record is None:
            raise UnknownAlertError(alert_id, "unknown alert")
        return self._alert_public(record)

    def snapshot(self, hospital_id: str, now_at: datetime) -> BoardSnapshot:
        """The whole board of ``hospital_id`` as of ``now_at`` (cards in board order)."""
        cards = [self._card(unit_id, hospital_id, now_at) for unit_id, _ in self._ordered(hospital_id)]
        return BoardSnapshot(
            hospital_id=hospital_id,
            server_time=now_at,
            stale_after_s=self.stale_after_s,
            nibp_stale_after_s=self.nibp_stale_after_s,
            ecg_window_s=self.ecg_window_s,
            cards=cards,
        )

    def _ordered(self, hospital_id: str) -> list[tuple[str, tuple[int, float, str]]]:
        keys: dict[str, tuple[int, float, str]] = {}
        for record in self._alerts.values():
            msg = record.message
            if not record.open or msg.hospital_id != hospital_id:
                continue
            eta = msg.eta_at.timestamp() if msg.eta_at is not None else math.inf
            key = (PRIORITY_RANK[msg.priority], eta, msg.unit_id)
            if msg.unit_id not in keys or key < keys[msg.unit_id]:
                keys[msg.unit_id] = key
        return sorted(keys.items(), key=lambda item: item[1])

    # --- inputs ------------------------------------------------------------------------------------------------

    def _unit(self, unit_id: str, now_at: datetime) -> _Unit:
        unit = self._units.get(unit_id)
        if unit is None:
            unit = self._units[unit_id] = _Unit(unit_id=unit_id, last_heard_at=now_at)
        unit.last_heard_at = now_at
        return unit

    def apply_alert(self, msg: HospitalAlert, now_at: datetime) -> tuple[list[BoardEvent], bool]:
        """Take in an alert from dispatch.

        Returns:
            ``(events, is_new)``: ``is_new`` is True the first time an open alert is seen (the caller then
            publishes the ``on_board`` delivery receipt).
        """
        record = self._alerts.get(msg.alert_id)
        self._unit(msg.unit_id, now_at)
        if record is None:
            closed = msg.state is AlertState.CANCELLED
            record = _Alert(message=msg, state=msg.state, received_at=now_at, closed_at=now_at if closed else None)
            self._alerts[msg.alert_id] = record
            if closed:
                return [], False
            return [self._alert_event(record, now_at)], True
        if record.message.hospital_id != msg.hospital_id or record.message.unit_id != msg.unit_id:
            raise WrongHospitalError(msg.alert_id, "alert id reused for another hospital or unit")
        was_open = record.open
        record.message = msg
        if _STATE_RANK[msg.state] > _STATE_RANK[record.state]:
            record.state = msg.state
        if msg.state is AlertState.CANCELLED and record.open:
            record.closed_at = now_at
        if not was_open:
            return [], False
        return self._after_change(record, now_at), False

    def apply_ack(self, msg: AlertAck, now_at: datetime) -> list[BoardEvent]:
        """An acknowledgement seen on the bus (another board of the same hospital, or a phone)."""
        record = self._alerts.get(msg.alert_id)
        if record is None or record.message.hospital_id != msg.hospital_id or msg.state != AlertState.ACKNOWLEDGED:
            return []
        return self._acknowledge(record, msg.by_role, msg.at, now_at)

    def acknowledge(self, alert_id: str, hospital_id: str, by_role: str, now_at: datetime) -> list[BoardEvent]:
        """Record this board's acknowledgement (after its AlertAck was published).

        Raises:
            UnknownAlertError, WrongHospitalError, AlertClosedError: see :meth:`check_ack`.
        """
        record = self._check(alert_id, hospital_id)
        return self._acknowledge(record, by_role, now_at, now_at)

    def check_ack(self, alert_id: str, hospital_id: str) -> AlertPublic:
        """Validate that ``hospital_id`` may acknowledge ``alert_id``; returns the alert.

        Raises:
            UnknownAlertError: no such alert.  WrongHospitalError: the alert is for another hospital.
            AlertClosedError: the alert was cancelled or handed over.
        """
        return self._alert_public(self._check(alert_id, hospital_id))

    def _check(self, alert_id: str, hospital_id: str) -> _Alert:
        record = self._alerts.get(alert_id)
        if record is None:
            raise UnknownAlertError(alert_id, "unknown alert")
        if record.message.hospital_id != hospital_id:
            raise WrongHospitalError(alert_id, "alert is addressed to another hospital")
        if not record.open:
            raise AlertClosedError(alert_id, "alert is closed")
        return record

    def _acknowledge(self, record: _Alert, by_role: str, at: datetime, now_at: datetime) -> list[BoardEvent]:
        if not record.open or record.state is AlertState.ACKNOWLEDGED:
            return []
        record.state = AlertState.ACKNOWLEDGED
        record.acknowledged_at = at
        record.acknowledged_by = by_role
        return [self._alert_event(record, now_at)]

    def mark_on_board(self, alert_id: str, now_at: datetime) -> list[BoardEvent]:
        """The ``on_board`` receipt was published: move ``sent`` forward (never backwards)."""
        record = self._alerts.get(alert_id)
        if record is None or not record.open or _STATE_RANK[record.state] >= _STATE_RANK[AlertState.ON_BOARD]:
            return []
        record.state = AlertState.ON_BOARD
        return [self._alert_event(record, now_at)]

    def apply_availability(self, msg: Availability, now_at: datetime) -> list[BoardEvent]:
        """Birth/death of a unit.  A late ``offline`` of an older session (lower ``seq``) is ignored."""
        unit = self._unit(msg.unit_id, now_at)
        if msg.seq < unit.session_seq:
            return []
        unit.session_seq = msg.seq
        unit.availability = msg.state
        unit.availability_at = msg.sent_at
        return self._unit_state_event(unit, now_at)

    def apply_status(self, msg: Status, now_at: datetime) -> list[BoardEvent]:
        """A crew status tap.  Hand-over or back in service closes the unit's alerts sent before it."""
        unit = self._unit(msg.unit_id, now_at)
        if unit.crew_status_at is not None and msg.at < unit.crew_status_at:
            return []
        unit.crew_status = msg.status
        unit.crew_status_at = msg.at
        events = self._unit_state_event(unit, now_at)
        if msg.status in _CLOSING_STATUSES:
            for record in self._alerts.values():
                if record.open and record.message.unit_id == msg.unit_id and record.message.sent_at <= msg.at:
                    record.closed_at = now_at
                    events.extend(self._after_change(record, now_at))
        return events

    def apply_vitals(self, msg: Vitals, now_at: datetime) -> list[BoardEvent]:
        """A set of vitals: each value replaces the stored one only if measured later (late replays never win)."""
        unit = self._unit(msg.unit_id, now_at)
        changed = False
        for name in _READING_FIELDS:
            value = getattr(msg, name)
            if value is None or not math.isfinite(value):
                continue
            old = unit.readings.get(name)
            if old is None or msg.measured_at >= old.measured_at:
                unit.readings[name] = _Reading(float(value), msg.measured_at)
                if name == "heart_rate_bpm":
                    unit.heart_rate_source = msg.heart_rate_source
                changed = True
        has_nibp = msg.sbp_mmhg is not None or msg.dbp_mmhg is not None or msg.map_mmhg is not None
        if has_nibp and (unit.nibp is None or msg.measured_at >= unit.nibp.measured_at):
            unit.nibp = _Nibp(msg.sbp_mmhg, msg.dbp_mmhg, msg.map_mmhg, msg.measured_at)
            changed = True
        hospitals = self.hospitals_of(msg.unit_id)
        if not changed or not hospitals:
            return []
        payload = VitalsEvent(server_time=now_at, unit_id=unit.unit_id, vitals=self._vitals(unit, now_at))
        return [BoardEvent(EventKind.VITALS, hospitals, unit.unit_id, payload)]

    def apply_gps(self, msg: GpsFix, now_at: datetime) -> list[BoardEvent]:
        """A position report.  No fix keeps the last position flagged lost; (0, 0) counts as no fix (FF-05)."""
        unit = self._unit(msg.unit_id, now_at)
        at = msg.device_time if msg.device_time is not None and not msg.clock_suspect else msg.sent_at
        if unit.last_gps_at is not None and at < unit.last_gps_at:
            return []
        unit.last_gps_at = at
        lat, lon = msg.lat_deg, msg.lon_deg
        usable = (
            msg.fix
            and lat is not None
            and lon is not None
            and math.isfinite(lat)
            and math.isfinite(lon)
            and not (lat == 0.0 and lon == 0.0)
        )
        if usable:
            unit.lat_deg, unit.lon_deg, unit.fix_at = lat, lon, at
            unit.fix_lost = False
            unit.speed_mps = msg.speed_mps
        else:
            unit.fix_lost = True
            unit.speed_mps = None
        hospitals = self.hospitals_of(msg.unit_id)
        if not hospitals:
            return []
        payload = PositionEvent(server_time=now_at, unit_id=unit.unit_id, position=self._position(unit, now_at))
        return [BoardEvent(EventKind.POSITION, hospitals, unit.unit_id, payload)]

    def apply_ecg(self, chunk: EcgChunk, now_at: datetime) -> list[BoardEvent]:
        """An ECG chunk: its first lead (mV) joins the unit's ring.  Replays (``historical``) and duplicates
        (``seq`` not above the last) never reach the live strip."""
        unit = self._unit(chunk.unit_id, now_at)
        if chunk.historical or chunk.seq <= unit.last_ecg_seq:
            return []
        unit.last_ecg_seq = chunk.seq
        samples_mv = np.round(ecg_to_mv(chunk)[0], _ECG_DECIMALS)
        segment = _Segment(
            seq=chunk.seq,
            start_at=chunk.start_at,
            fs_hz=chunk.fs_hz,
            lead=chunk.leads[0],
            lead_off=bool(chunk.lead_off[0]) if chunk.lead_off else False,
            samples_mv=samples_mv,
        )
        ring = unit.ecg
        if ring and ring[-1].fs_hz != chunk.fs_hz:
            ring.clear()
        ring.append(segment)
        total_s = sum(s.duration_s for s in ring)
        while len(ring) > 1 and total_s - ring[0].duration_s >= self.ecg_window_s:
            total_s -= ring.popleft().duration_s
        hospitals = self.hospitals_of(chunk.unit_id)
        if not hospitals:
            return []
        payload = EcgEvent(server_time=now_at, unit_id=unit.unit_id, segment=self._segment(segment))
        return [BoardEvent(EventKind.ECG, hospitals, unit.unit_id, payload)]

    def prune(self, now_at: datetime) -> int:
        """Forget closed alerts older than the retention and silent units not inbound; returns how many."""
        alert_cut = now_at - timedelta(seconds=self.alert_retention_s)
        old = [k for k, a in self._alerts.items() if a.closed_at is not None and a.closed_at < alert_cut]
        for key in old:
            del self._alerts[key]
        inbound = {a.message.unit_id for a in self._alerts.values() if a.open}
        unit_cut = now_at - timedelta(seconds=self.unit_retention_s)
        idle = [k for k, u in self._units.items() if k not in inbound and u.last_heard_at < unit_cut]
        for key in idle:
            del self._units[key]
        return len(old) + len(idle)

    # --- builders ----------------------------------------------------------------------------------------------

    def _after_change(self, record: _Alert, now_at: datetime) -> list[BoardEvent]:
        hospital_id = record.message.hospital_id
        unit_id = record.message.unit_id
        if record.open:
            return [self._alert_event(record, now_at)]
        still = any(
            a.open and a.message.unit_id == unit_id and a.message.hospital_id == hospital_id
            for a in self._alerts.values()
        )
        if still:
            return [self._alert_event(record, now_at)]
        payload = RemovedEvent(server_time=now_at, unit_id=unit_id)
        return [BoardEvent(EventKind.REMOVED, frozenset({hospital_id}), unit_id, payload)]

    def _alert_event(self, record: _Alert, now_at: datetime) -> BoardEvent:
        msg = record.message
        payload = AlertEvent(
            server_time=now_at,
            alert=self._alert_public(record),
            card=self._card(msg.unit_id, msg.hospital_id, now_at),
        )
        return BoardEvent(EventKind.ALERT, frozenset({msg.hospital_id}), msg.unit_id, payload)

    def _unit_state_event(self, unit: _Unit, now_at: datetime) -> list[BoardEvent]:
        hospitals = self.hospitals_of(unit.unit_id)
        if not hospitals:
            return []
        payload = UnitStateEvent(
            server_time=now_at,
            unit_id=unit.unit_id,
            availability=unit.availability,
            availability_at=unit.availability_at,
            crew_status=unit.crew_status,
            crew_status_at=unit.crew_status_at,
        )
        return [BoardEvent(EventKind.UNIT, hospitals, unit.unit_id, payload)]

    @staticmethod
    def _alert_public(record: _Alert) -> AlertPublic:
        msg = record.message
        f = msg.findings
        return AlertPublic(
            alert_id=msg.alert_id,
            hospital_id=msg.hospital_id,
            unit_id=msg.unit_id,
            case_type=msg.case_type,
            priority=msg.priority,
            state=AlertState.CANCELLED if msg.state is AlertState.CANCELLED else record.state,
            eta_at=msg.eta_at,
            departments=msg.departments,
            age_years=f.age_years,
            sex=f.sex,
            note=f.note,
            reasons=msg.reasons,
            ecg_st_elevation=f.ecg_st_elevation,
            be_fast_positive=f.be_fast_positive,
            lams=f.lams,
            gcs_total=f.gcs_total,
            trauma_red_criteria=f.trauma_red_criteria,
            historical=msg.historical,
            received_at=record.received_at,
            acknowledged_at=record.acknowledged_at,
            acknowledged_by=record.acknowledged_by,
        )

    def _reading(self, reading: _Reading | None, now_at: datetime) -> ReadingPublic | None:
        if reading is None:
            return None
        age = _age_s(reading.measured_at, now_at)
        return ReadingPublic(
            value=reading.value, measured_at=reading.measured_at, age_s=age, stale=age > self.stale_after_s
        )

    def _vitals(self, unit: _Unit, now_at: datetime) -> VitalsPublic:
        nibp = None
        if unit.nibp is not None:
            age = _age_s(unit.nibp.measured_at, now_at)
            # A cuff is cycled every few minutes, not streamed: it has its own staleness limit, else every NIBP
            # reading would grey out seconds after the cuff deflates.
            nibp = NibpPublic(
                sbp_mmhg=unit.nibp.sbp_mmhg,
                dbp_mmhg=unit.nibp.dbp_mmhg,
                map_mmhg=unit.nibp.map_mmhg,
                measured_at=unit.nibp.measured_at,
                age_s=age,
                stale=age > self.nibp_stale_after_s,
            )
        r = unit.readings
        return VitalsPublic(
            heart_rate_bpm=self._reading(r.get("heart_rate_bpm"), now_at),
            heart_rate_source=unit.heart_rate_source,
            spo2_pct=self._reading(r.get("spo2_pct"), now_at),
            nibp=nibp,
            resp_rate_per_min=self._reading(r.get("resp_rate_per_min"), now_at),
            etco2_mmhg=self._reading(r.get("etco2_mmhg"), now_at),
            temp_c=self._reading(r.get("temp_c"), now_at),
        )

    @staticmethod
    def _position(unit: _Unit, now_at: datetime) -> PositionPublic:
        if unit.fix_at is None:
            return PositionPublic(has_position=False, fix_lost=unit.last_gps_at is not None)
        return PositionPublic(
            has_position=True,
            lat_deg=unit.lat_deg,
            lon_deg=unit.lon_deg,
            fix_at=unit.fix_at,
            age_s=_age_s(unit.fix_at, now_at),
            fix_lost=unit.fix_lost,
            speed_mps=unit.speed_mps,
        )

    @staticmethod
    def _segment(segment: _Segment) -> EcgSegmentPublic:
        return EcgSegmentPublic(
            seq=segment.seq,
            start_at=segment.start_at,
            fs_hz=segment.fs_hz,
            lead=segment.lead,
            lead_off=segment.lead_off,
            samples_mv=segment.samples_mv.tolist(),
        )

    def _card(self, unit_id: str, hospital_id: str, now_at: datetime) -> CardPublic:
        unit = self._units.get(unit_id) or _Unit(unit_id=unit_id, last_heard_at=now_at)
        alerts = [
            self._alert_public(a)
            for a in self._alerts.values()
            if a.message.unit_id == unit_id and a.message.hospital_id == hospital_id and a.open
        ]
        alerts.sort(key=lambda a: (PRIORITY_RANK[a.priority], a.eta_at.timestamp() if a.eta_at else math.inf))
        return CardPublic(
            unit_id=unit_id,
            availability=unit.availability,
            availability_at=unit.availability_at,
            crew_status=unit.crew_status,
            crew_status_at=unit.crew_status_at,
            alerts=alerts,
            vitals=self._vitals(unit, now_at),
            position=self._position(unit, now_at),
            ecg=[self._segment(s) for s in unit.ecg],
        )
