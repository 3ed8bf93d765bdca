"""Pure board state: which ambulances are coming to which hospital, and what the board shows about each.

No I/O, no clock reads: every method takes ``now_at`` (timezone-aware UTC, the board server's clock) and returns
the :class:`BoardEvent`s that the change produces, each addressed to the hospitals that may see it (DOMAIN.md
section 11: a hospital sees only the patients coming to it).  The MQTT adapter (:mod:`hospital_board.sources`)
feeds decoded contract models in; the push feed (:mod:`hospital_board.feed`) fans the events out; the wire
models live in :mod:`hospital_board.schemas`.

Rules:

* A unit becomes inbound to hospital H when an alert for H names it; it leaves when that alert is cancelled or
  the crew reports hand-over (NEMSIS eTimes.12) or back in service (eTimes.13) after the alert was created, but
  not while a department's page is still unacknowledged (the card stays, with its Acknowledge, until answered).
* Cards are ordered by the most urgent open alert's priority (IEC 60601-1-8: high, medium, low), then by ETA
  (unknown last), then by unit id.
* Dispatch re-publishes an alert (same ``alert_id``, higher ``seq``) whenever its state, ETA or activations
  change; an older ``seq`` arriving late never replaces a newer one.  The board's own acknowledgement of a
  department shows at once (``confirmed=False``) until dispatch's re-publication confirms it.
* Vitals are kept per measurement: an older measurement never replaces a newer one; a reading older than
  ``stale_after_s`` is flagged stale (never shown as current).  Ages are measured on the server's clock from
  the moment the board received the value, plus the transport delay the device reports (see
  :func:`age_s`), so neither the board PC's clock nor a device clock running ahead makes old data look fresh.
* A GPS report without a fix keeps the last known position, flagged lost; (0, 0) is never a position (FF-05/FF-15).
* ECG: every lead is kept for the last ``ecg_window_s`` as a bounded ring of chunks, ordered by sample time
  (``start_at``), not by ``seq``: a chunk that starts before the newest sample shown is not live (a duplicate, a
  late one, a replay), and a ``seq`` that jumps or restarts (an agent restarted, a corrupt counter) never freezes
  the strip.  A time hole between chunks is a gap, shown as a hole, never bridged; when ``seq`` also jumped the
  missing range is recorded.  The cards get the first lead; the detail view every lead.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

import numpy as np
from pydantic import BaseModel

from broker_config import (
    SEQ_RESTART_JUMP,
    Activation,
    ActivationState,
    AlertAck,
    AlertState,
    Availability,
    CrewStatus,
    Department,
    EcgChunk,
    GapRecord,
    GpsFix,
    HospitalAlert,
    Priority,
    Status,
    Vitals,
    ecg_to_mv,
    older_session,
)
from hospital_board import news2
from hospital_board.schemas import (
    BOARD_ONLY_KINDS,
    COALESCED_KINDS,
    DETAIL_ONLY_KINDS,
    ActivationPublic,
    AlertEvent,
    AlertPublic,
    BoardSnapshot,
    CardPublic,
    DetailSnapshot,
    EcgEvent,
    EcgLeadsEvent,
    EcgLeadsPublic,
    EcgSegmentPublic,
    EventKind,
    GapEvent,
    GapPublic,
    NibpPublic,
    PositionEvent,
    PositionPublic,
    ReadingPublic,
    RemovedEvent,
    TimelineEntryPublic,
    TimelineEvent,
    TrailEvent,
    TrailPointPublic,
    TrendEvent,
    TrendPointPublic,
    UnitStateEvent,
    VitalsEvent,
    VitalsPublic,
)

__all__ = [
    "BOARD_ONLY_KINDS",
    "COALESCED_KINDS",
    "DETAIL_ONLY_KINDS",
    "PRIORITY_RANK",
    "AlertClosedError",
    "AlertEvent",
    "AlertPublic",
    "BoardError",
    "BoardEvent",
    "BoardSnapshot",
    "BoardState",
    "CardPublic",
    "DetailSnapshot",
    "EcgEvent",
    "EcgLeadsEvent",
    "EcgSegmentPublic",
    "EventKind",
    "NibpPublic",
    "NotActivatedError",
    "NotInboundError",
    "PositionEvent",
    "PositionPublic",
    "ReadingPublic",
    "RemovedEvent",
    "UnitStateEvent",
    "UnknownAlertError",
    "VitalsEvent",
    "VitalsPublic",
    "WrongHospitalError",
    "age_s",
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
"""An alert without activations only moves forward: a late or duplicated message never un-acknowledges it."""

_OPEN_PAGE = (ActivationState.PAGED, ActivationState.ESCALATED)


def _pages_open(record: _Alert) -> bool:
    """A department of this alert is paged (or escalated) and has not acknowledged."""
    return any(a.state in _OPEN_PAGE for a in record.message.activations)


_CLOSING_STATUSES = frozenset({CrewStatus.HANDED_OVER, CrewStatus.BACK_IN_SERVICE, CrewStatus.AVAILABLE})
_ECG_MAX_CHUNKS = 400
"""Hard bound of the ring in chunks, whatever their length (40 chunks/s of 25 ms for 10 s)."""
_ECG_DECIMALS = 3
"""mV rounded to 1 uV on the wire: far below the 10 uV resolution of a diagnostic ECG (IEC 60601-2-25)."""
_ECG_JOIN_SAMPLES = 2.5
"""Two chunks further apart than this many sample intervals are not contiguous: a hole, never a line."""
_GAPS_KEPT = 200
_TRAIL_MAX = 3_600
_TRAIL_STEP_S = 2.0
_TIMELINE_MAX = 200
_READING_FIELDS = ("heart_rate_bpm", "spo2_pct", "resp_rate_per_min", "etco2_mmhg", "temp_c")
_STATUS_TEXT = {
    CrewStatus.ASSIGNED: "unit notified (eTimes.03)",
    CrewStatus.EN_ROUTE: "en route (eTimes.05)",
    CrewStatus.ON_SCENE: "on scene (eTimes.06)",
    CrewStatus.PATIENT_CONTACT: "first medical contact (eTimes.07)",
    CrewStatus.TRANSPORTING: "left scene, transporting (eTimes.09)",
    CrewStatus.AT_HOSPITAL: "arrived at destination (eTimes.11)",
    CrewStatus.HANDED_OVER: "transfer of care (eTimes.12)",
    CrewStatus.BACK_IN_SERVICE: "back in service (eTimes.13)",
    CrewStatus.AVAILABLE: "available",
}


# --- errors -------------------------------------------------------------------------------------------------------


class BoardError(Exception):
    """Root of the board's domain errors; ``alert_id`` names the alert (or unit) concerned."""

    def __init__(self, alert_id: str, message: str) -> None:
        super().__init__(message)
        self.alert_id = alert_id


class UnknownAlertError(BoardError):
    """No such alert on this board (HTTP 404)."""


class WrongHospitalError(BoardError):
    """The alert is addressed to another hospital (HTTP 409)."""


class AlertClosedError(BoardError):
    """The alert was cancelled or its patient handed over (HTTP 409)."""


class NotActivatedError(BoardError):
    """The department to acknowledge was not activated by this alert (HTTP 409)."""


class NotInboundError(BoardError):
    """The unit is not inbound to this hospital: its data is not this hospital's to see (HTTP 404)."""


# --- events --------------------------------------------------------------------------------------------------------


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


def age_s(measured_at: datetime, received_at: datetime, now_at: datetime) -> float:
    """Age of a value on the server's clock: time since it was received plus its reported transport delay.

    ``received_at`` and ``now_at`` come from the same (server) clock, so the result does not depend on the clock
    of the board PC.  The transport delay ``received_at - measured_at`` comes from the device clock and is
    clamped at 0: a device clock running ahead cannot make a value look fresher than its arrival; one running
    behind makes it look older (FF-07 says such a device is flagged upstream).
    """
    transit = max(0.0, (received_at - measured_at).total_seconds())
    return max(0.0, (now_at - received_at).total_seconds()) + transit


@dataclass(slots=True)
class _Reading:
    value: float
    measured_at: datetime
    received_at: datetime


@dataclass(slots=True)
class _Nibp:
    sbp_mmhg: float | None
    dbp_mmhg: float | None
    map_mmhg: float | None
    measured_at: datetime
    received_at: datetime


@dataclass(slots=True)
class _Segment:
    seq: int
    start_at: datetime
    fs_hz: float
    leads: tuple[str, ...]
    lead_off: tuple[bool, ...]
    samples_mv: np.ndarray
    """Shape (n_leads, n_samples), mV rounded to 1 uV."""
    gap_before: bool
    saturated: tuple[bool, ...] = ()

    @property
    def n_samples(self) -> int:
        return int(self.samples_mv.shape[1])

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.fs_hz

    @property
    def end_at(self) -> datetime:
        return self.start_at + timedelta(seconds=self.duration_s)


@dataclass(slots=True)
class _Unit:
    unit_id: str
    last_heard_at: datetime
    data_at: datetime | None = None
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
    fix_received_at: datetime | None = None
    fix_lost: bool = False
    speed_mps: float | None = None
    last_gps_at: datetime | None = None
    ecg: deque[_Segment] = field(default_factory=lambda: deque(maxlen=_ECG_MAX_CHUNKS))
    last_ecg_seq: int = -1
    ecg_received_at: datetime | None = None
    gaps: deque[GapPublic] = field(default_factory=lambda: deque(maxlen=_GAPS_KEPT))
    trend: list[TrendPointPublic] = field(default_factory=list)
    trail: deque[TrailPointPublic] = field(default_factory=lambda: deque(maxlen=_TRAIL_MAX))
    timeline: deque[TimelineEntryPublic] = field(default_factory=lambda: deque(maxlen=_TIMELINE_MAX))
    shown_vitals_stale: tuple[bool, ...] = ()
    shown_position_stale: bool = False
    shown_ecg_lost: bool = False


@dataclass(slots=True)
class _LocalAck:
    at: datetime
    by_role: str


@dataclass(slots=True)
class _Alert:
    message: HospitalAlert
    state: AlertState
    received_at: datetime
    closed_at: datetime | None = None
    acknowledged_at: datetime | None = None
    acknowledged_by: str | None = None
    local_acks: dict[Department, _LocalAck] = field(default_factory=dict)
    resynced: bool = False
    timeline: list[TimelineEntryPublic] = field(default_factory=list)

    @property
    def open(self) -> bool:
        return self.closed_at is None

    @property
    def created_at(self) -> datetime:
        """When the alert was first raised: its first page, else the send time of the version we hold."""
        paged = [a.paged_at for a in self.message.activations if a.paged_at is not None]
        return min([*paged, self.message.sent_at])


class BoardState:
    """All hospitals' boards in one process.  Not thread-safe: one asyncio task owns it.

    Args:
        stale_after_s: a reading older than this is flagged stale.
        ecg_window_s: seconds of ECG (every lead) kept per unit.
        nibp_stale_after_s: staleness limit of a cuff blood pressure (cycled every few minutes, not streamed).
        gps_stale_after_s: a position older than this is flagged stale.
        ecg_lost_after_s: no ECG sample for this long and the strip says so.
        trend_step_s, trend_max_points: vitals trend resolution and length per unit.
        alert_retention_s: how long closed alerts stay known (for 409 instead of 404 on a late ack).
        unit_retention_s: how long a unit that is silent and not inbound is remembered.
    """

    def __init__(
        self,
        *,
        stale_after_s: float = 10.0,
        ecg_window_s: float = 10.0,
        nibp_stale_after_s: float = 300.0,
        gps_stale_after_s: float = 30.0,
        ecg_lost_after_s: float = 5.0,
        trend_step_s: float = 2.0,
        trend_max_points: int = 7_200,
        alert_retention_s: float = 3_600.0,
        unit_retention_s: float = 6 * 3_600.0,
    ) -> None:
        if stale_after_s <= 0 or ecg_window_s <= 0 or gps_stale_after_s <= 0 or ecg_lost_after_s <= 0:
            raise ValueError("stale_after_s, ecg_window_s, gps_stale_after_s and ecg_lost_after_s must be positive")
        if trend_step_s <= 0 or trend_max_points < 2:
            raise ValueError("trend_step_s must be positive and trend_max_points at least 2")
        self.stale_after_s = stale_after_s
        self.ecg_window_s = ecg_window_s
        self.nibp_stale_after_s = max(nibp_stale_after_s, stale_after_s)
        self.gps_stale_after_s = gps_stale_after_s
        self.ecg_lost_after_s = ecg_lost_after_s
        self.trend_step_s = trend_step_s
        self.trend_max_points = trend_max_points
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

    def open_alert_ids(self) -> frozenset[str]:
        """Ids of every open alert (any hospital)."""
        return frozenset(k for k, a in self._alerts.items() if a.open)

    def alert(self, alert_id: str, now_at: datetime | None = None) -> AlertPublic:
        """The public view of one alert (countdowns as of ``now_at``).  Raises :class:`UnknownAlertError`."""
        record = self._alerts.get(alert_id)
        if record is None:
            raise UnknownAlertError(alert_id, "unknown alert")
        return self._alert_public(record, now_at)

    def snapshot(self, hospital_id: str, now_at: datetime) -> BoardSnapshot:
        """The whole board of ``hospital_id`` as of ``now_at`` (cards in board order)."""
        cards = [self._card(unit_id, hospital_id, now_at) for unit_id, _ in self._ordered(hospital_id)]
        return BoardSnapshot(
            hospital_id=hospital_id,
            server_time=now_at,
            stale_after_s=self.stale_after_s,
            nibp_stale_after_s=self.nibp_stale_after_s,
            ecg_window_s=self.ecg_window_s,
            gps_stale_after_s=self.gps_stale_after_s,
            ecg_lost_after_s=self.ecg_lost_after_s,
            cards=cards,
        )

    def ecg_events(self, hospital_id: str, unit_id: str, now_at: datetime) -> list[BoardEvent]:
        """The last ECG window of ``unit_id`` (first lead) as ``ecg`` events for the boards of ``hospital_id``, oldest
        first, each with ``server_time`` ``now_at``; empty unless the unit is inbound to that hospital.  For a board
        feed that starts receiving a unit's ECG again (:meth:`hospital_board.feed.FeedHub.set_strips`)."""
        unit = self._units.get(unit_id)
        if unit is None or hospital_id not in self.hospitals_of(unit_id):
            return []
        to = frozenset({hospital_id})
        return [
            BoardEvent(
                EventKind.ECG, to, unit_id, EcgEvent(server_time=now_at, unit_id=unit_id, segment=self._segment(s))
            )
            for s in unit.ecg
        ]

    def detail(self, hospital_id: str, unit_id: str, now_at: datetime) -> DetailSnapshot:
        """One patient's detail view.  Raises :class:`NotInboundError` unless the unit is inbound to the hospital."""
        if hospital_id not in self.hospitals_of(unit_id):
            raise NotInboundError(unit_id, "unit is not inbound to this hospital")
        unit = self._units.get(unit_id) or _Unit(unit_id=unit_id, last_heard_at=now_at)
        return DetailSnapshot(
            hospital_id=hospital_id,
            unit_id=unit_id,
            server_time=now_at,
            stale_after_s=self.stale_after_s,
            nibp_stale_after_s=self.nibp_stale_after_s,
            gps_stale_after_s=self.gps_stale_after_s,
            ecg_window_s=self.ecg_window_s,
            ecg_lost_after_s=self.ecg_lost_after_s,
            trend_step_s=self.trend_step_s,
            card=self._card(unit_id, hospital_id, now_at),
            ecg_leads=[self._leads(s) for s in unit.ecg],
            trend=list(unit.trend),
            trail=list(unit.trail),
            gaps=list(unit.gaps),
            timeline=self.timeline(hospital_id, unit_id),
        )

    def first_contact_at(self, unit_id: str) -> datetime | None:
        """When the crew reached the patient (FMC): the earliest ``fmc_at`` of the unit's open alerts, or None
        when no open alert reports it."""
        times = [
            r.message.findings.fmc_at
            for r in self._alerts.values()
            if r.open and r.message.unit_id == unit_id and r.message.findings.fmc_at is not None
        ]
        return min(times) if times else None

    def merge_trend(self, unit_id: str, points: list[TrendPointPublic], *, bin_s: float) -> int:
        """Merge trend points read back from the telemetry store (:mod:`hospital_board.history`): each is a
        summary of the ``bin_s`` seconds around its ``at``, and is added only where the board's own trend has no
        point within ``bin_s / 2`` of it (the board's own points are finer and win).  The trend stays ordered by
        time and bounded by ``trend_max_points`` (the oldest go first).

        Returns:
            How many points were added (0 for a unit the board does not know).
        """
        unit = self._units.get(unit_id)
        if unit is None or not points:
            return 0
        trend = unit.trend
        keys = [p.at for p in trend]
        added = 0
        for point in sorted(points, key=lambda p: p.at):
            i = bisect.bisect_left(keys, point.at)
            near = [keys[j] for j in (i - 1, i) if 0 <= j < len(keys)]
            if any(abs((k - point.at).total_seconds()) < bin_s / 2 for k in near):
                continue
            trend.insert(i, point)
            keys.insert(i, point.at)
            added += 1
        if len(trend) > self.trend_max_points:
            del trend[: len(trend) - self.trend_max_points]
        return added

    def timeline(self, hospital_id: str, unit_id: str) -> list[TimelineEntryPublic]:
        """The case's time points the board knows (crew taps, findings times, alerts, pages, acks), by time."""
        entries = list(self._units[unit_id].timeline) if unit_id in self._units else []
        for record in self._alerts.values():
            msg = record.message
            if msg.unit_id != unit_id or msg.hospital_id != hospital_id:
                continue
            entries.extend(record.timeline)
            f = msg.findings
            for at, kind in (
                (f.symptom_onset_at, "symptom onset"),
                (f.last_known_well_at, "last known well"),
                (f.fmc_at, "first medical contact (crew report)"),
            ):
                if at is not None:
                    entries.append(TimelineEntryPublic(at=at, kind=kind, source="crew"))
        unique = {(e.at, e.kind, e.detail): e for e in entries}
        return sorted(unique.values(), key=lambda e: e.at)

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

    # --- inputs: alerts and acknowledgements ---------------------------------------------------------------------

    def _unit(self, unit_id: str, now_at: datetime, *, from_unit: bool = False) -> _Unit:
        unit = self._units.get(unit_id)
        if unit is None:
            unit = self._units[unit_id] = _Unit(unit_id=unit_id, last_heard_at=now_at)
        unit.last_heard_at = now_at
        if from_unit:
            unit.data_at = now_at
        return unit

    def _closed_by_crew(self, unit: _Unit, record: _Alert) -> bool:
        """The crew reported hand-over / back in service after this alert was raised, and no department's page is
        still unanswered: a page nobody acknowledged keeps the card (and its Acknowledge) on the board after the
        patient arrived, or the escalation would go on where ED staff cannot stop it (new-user trial)."""
        return (
            unit.crew_status in _CLOSING_STATUSES
            and unit.crew_status_at is not None
            and unit.crew_status_at >= record.created_at
            and not _pages_open(record)
        )

    def apply_alert(self, msg: HospitalAlert, now_at: datetime) -> tuple[list[BoardEvent], bool]:
        """Take in an alert from dispatch (new, or a re-publication with a higher ``seq``).

        Returns:
            ``(events, is_new)``: ``is_new`` is True the first time an open alert is seen (the caller then
            publishes the ``on_board`` delivery receipt).
        """
        record = self._alerts.get(msg.alert_id)
        unit = self._unit(msg.unit_id, now_at)
        if record is None:
            return self._new_alert(msg, now_at, unit, resynced=False)
        if record.message.hospital_id != msg.hospital_id or record.message.unit_id != msg.unit_id:
            raise WrongHospitalError(msg.alert_id, "alert id reused for another hospital or unit")
        if msg.seq < record.message.seq and not record.resynced:
            return [], False  # an older version arriving late (QoS 1 redelivery, reordering)
        was_open = record.open
        old = record.message
        record.message = msg
        record.resynced = False
        self._note_activation_changes(record, old, now_at)
        self._drop_confirmed_local_acks(record)
        if _STATE_RANK[msg.state] > _STATE_RANK[record.state] and not msg.activations:
            record.state = msg.state
        if msg.state is AlertState.CANCELLED and record.open:
            record.closed_at = now_at
            record.timeline.append(TimelineEntryPublic(at=now_at, kind="alert cancelled", source="dispatch"))
        elif record.open and self._closed_by_crew(unit, record):
            record.closed_at = now_at  # handed over earlier; the last open page has now been answered
        if not was_open:
            return [], False
        return self._after_change(record, now_at), False

    def apply_resync(self, msg: HospitalAlert, now_at: datetime) -> tuple[list[BoardEvent], bool]:
        """An open alert rebuilt from dispatch's API after a restart or reconnect.

        Live messages win: an alert the board already holds is only closed if dispatch says it was cancelled.
        Returns ``(events, needs_receipt)``: a new alert dispatch still lists as ``sent`` was never displayed.
        """
        record = self._alerts.get(msg.alert_id)
        unit = self._unit(msg.unit_id, now_at)
        if record is not None:
            if msg.state is AlertState.CANCELLED and record.open:
                record.closed_at = now_at
                return self._after_change(record, now_at), False
            return [], False
        if msg.state is AlertState.CANCELLED:
            return [], False
        events, is_new = self._new_alert(msg, now_at, unit, resynced=True)
        return events, is_new and msg.state is AlertState.SENT

    def _new_alert(
        self, msg: HospitalAlert, now_at: datetime, unit: _Unit, *, resynced: bool
    ) -> tuple[list[BoardEvent], bool]:
        record = _Alert(message=msg, state=msg.state, received_at=now_at, resynced=resynced)
        how = "rebuilt from dispatch after a board restart" if resynced else "received"
        kind = f"pre-alert {how} by the board"
        entry = TimelineEntryPublic(at=now_at, kind=kind, detail=msg.priority.value, source="board")
        record.timeline.append(entry)
        for a in msg.activations:
            if a.paged_at is not None:
                record.timeline.append(
                    TimelineEntryPublic(at=a.paged_at, kind=f"{a.department.value} paged", source="dispatch")
                )
        self._alerts[msg.alert_id] = record
        if msg.state is AlertState.CANCELLED or self._closed_by_crew(unit, record):
            record.closed_at = now_at
            return [], False
        return [self._alert_event(record, now_at)], True

    def _note_activation_changes(self, record: _Alert, old: HospitalAlert, now_at: datetime) -> None:
        before = {a.department: a for a in old.activations}
        for a in record.message.activations:
            prev = before.get(a.department)
            if prev is not None and prev.state is a.state and prev.level == a.level:
                continue
            if a.state is ActivationState.ESCALATED:
                kind, source = f"{a.department.value} escalated to {a.level}", "dispatch"
            elif a.state is ActivationState.ACKNOWLEDGED:
                who = a.acknowledged_by_role or "?"
                kind, source = f"{a.department.value} acknowledged by {who}", "hospital"
            elif a.state is ActivationState.PAGED and prev is None:
                kind, source = f"{a.department.value} paged", "dispatch"
            else:
                continue
            at = a.acknowledged_at if a.state is ActivationState.ACKNOWLEDGED and a.acknowledged_at else now_at
            record.timeline.append(TimelineEntryPublic(at=at, kind=kind, source=source))

    @staticmethod
    def _drop_confirmed_local_acks(record: _Alert) -> None:
        for a in record.message.activations:
            if a.state is ActivationState.ACKNOWLEDGED:
                record.local_acks.pop(a.department, None)

    def apply_ack(self, msg: AlertAck, now_at: datetime) -> list[BoardEvent]:
        """An acknowledgement seen on the bus (another board of the same hospital, or a phone)."""
        record = self._alerts.get(msg.alert_id)
        if record is None or record.message.hospital_id != msg.hospital_id or msg.state != AlertState.ACKNOWLEDGED:
            return []
        return self._acknowledge(record, msg.department, msg.by_role, msg.at, now_at)

    def acknowledge(
        self,
        alert_id: str,
        hospital_id: str,
        by_role: str,
        now_at: datetime,
        department: Department | None = None,
    ) -> list[BoardEvent]:
        """Record this board's acknowledgement (after its AlertAck was published): one department, or all.

        Raises:
            UnknownAlertError, WrongHospitalError, AlertClosedError, NotActivatedError: see :meth:`check_ack`.
        """
        record = self._check(alert_id, hospital_id, department)
        return self._acknowledge(record, department, by_role, now_at, now_at)

    def check_ack(self, alert_id: str, hospital_id: str, department: Department | None = None) -> AlertPublic:
        """Validate that ``hospital_id`` may acknowledge ``alert_id`` (one ``department``, or all); returns it.

        Raises:
            UnknownAlertError: no such alert.  WrongHospitalError: the alert is for another hospital.
            AlertClosedError: the alert was cancelled or handed over.
            NotActivatedError: ``department`` was not activated by this alert.
        """
        return self._alert_public(self._check(alert_id, hospital_id, department), None)

    def _check(self, alert_id: str, hospital_id: str, department: Department | None = None) -> _Alert:
        record = self._alerts.get(alert_id)
        if record is None:
            raise UnknownAlertError(alert_id, "unknown alert")
        if record.message.hospital_id != hospital_id:
            raise WrongHospitalError(alert_id, "alert is addressed to another hospital")
        if not record.open:
            raise AlertClosedError(alert_id, "alert is closed")
        activated = {a.department for a in record.message.activations}
        if department is not None and activated and department not in activated:
            raise NotActivatedError(alert_id, "department not activated by this alert")
        return record

    def is_acknowledged(self, alert_id: str, department: Department | None = None) -> bool:
        """Whether the alert (or one department's page) is acknowledged already (nothing to send)."""
        record = self._alerts.get(alert_id)
        if record is None:
            return False
        if department is None or not record.message.activations:
            return self._state(record) is AlertState.ACKNOWLEDGED
        return any(
            a.department is department and a.state is ActivationState.ACKNOWLEDGED
            for a in self._activations(record, None)
        )

    def _acknowledge(
        self, record: _Alert, department: Department | None, by_role: str, at: datetime, now_at: datetime
    ) -> list[BoardEvent]:
        if not record.open:
            return []
        before = self._alert_public(record, None)
        activations = record.message.activations
        if activations:
            for a in activations:
                wanted = department is None or a.department is department
                if wanted and a.state in _OPEN_PAGE and a.department not in record.local_acks:
                    record.local_acks[a.department] = _LocalAck(at, by_role)
                    kind = f"{a.department.value} acknowledged by {by_role}"
                    record.timeline.append(TimelineEntryPublic(at=at, kind=kind, source="hospital"))
        elif record.state is not AlertState.ACKNOWLEDGED:
            record.timeline.append(TimelineEntryPublic(at=at, kind=f"acknowledged by {by_role}", source="hospital"))
        if self._state(record) is AlertState.ACKNOWLEDGED or not activations:
            if record.acknowledged_at is None:
                record.acknowledged_at = at
                record.acknowledged_by = by_role
            if not activations:
                record.state = AlertState.ACKNOWLEDGED
        if self._alert_public(record, None) == before:
            return []
        return [self._alert_event(record, now_at)]

    def mark_on_board(self, alert_id: str, now_at: datetime) -> list[BoardEvent]:
        """The ``on_board`` receipt was published: move ``sent`` forward (never backwards)."""
        record = self._alerts.get(alert_id)
        if record is None or not record.open or _STATE_RANK[record.state] >= _STATE_RANK[AlertState.ON_BOARD]:
            return []
        record.state = AlertState.ON_BOARD
        record.timeline.append(TimelineEntryPublic(at=now_at, kind="displayed (on_board receipt sent)", source="board"))
        return [self._alert_event(record, now_at)]

    # --- inputs: unit streams ------------------------------------------------------------------------------------

    def apply_availability(self, msg: Availability, now_at: datetime) -> list[BoardEvent]:
        """Birth/death of a unit.  A late ``offline`` of an older session (lower ``seq``) is ignored."""
        unit = self._unit(msg.unit_id, now_at)
        if older_session(msg.seq, unit.session_seq):
            return []
        changed = unit.availability != msg.state
        unit.session_seq = msg.seq
        unit.availability = msg.state
        unit.availability_at = msg.sent_at
        if changed:
            text = "link up (birth)" if msg.state == "online" else "link lost (last will)"
            self._unit_timeline(unit, TimelineEntryPublic(at=msg.sent_at, kind=text, source="device"), now_at)
        return self._unit_state_event(unit, now_at)

    def apply_status(self, msg: Status, now_at: datetime) -> list[BoardEvent]:
        """A crew status tap.  Hand-over or back in service closes the unit's alerts raised before it."""
        unit = self._unit(msg.unit_id, now_at, from_unit=True)
        if unit.crew_status_at is not None and msg.at < unit.crew_status_at:
            return []
        changed = unit.crew_status is not msg.status
        unit.crew_status = msg.status
        unit.crew_status_at = msg.at
        events: list[BoardEvent] = []
        if changed:
            entry = TimelineEntryPublic(at=msg.at, kind=_STATUS_TEXT.get(msg.status, msg.status.value), source="crew")
            events.extend(self._unit_timeline(unit, entry, now_at))
        events.extend(self._unit_state_event(unit, now_at))
        if msg.status in _CLOSING_STATUSES:
            for record in self._alerts.values():
                if record.open and record.message.unit_id == msg.unit_id and self._closed_by_crew(unit, record):
                    record.closed_at = now_at
                    events.extend(self._after_change(record, now_at))
        return events

    def apply_vitals(self, msg: Vitals, now_at: datetime) -> list[BoardEvent]:
        """A set of vitals: each value replaces the stored one only if measured later (late replays never win,
        but do fill the trend)."""
        unit = self._unit(msg.unit_id, now_at, from_unit=True)
        changed = False
        for name in _READING_FIELDS:
            value = getattr(msg, name)
            if value is None or not math.isfinite(value):
                continue
            old = unit.readings.get(name)
            if old is None or msg.measured_at >= old.measured_at:
                unit.readings[name] = _Reading(float(value), msg.measured_at, now_at)
                if name == "heart_rate_bpm":
                    unit.heart_rate_source = msg.heart_rate_source
                changed = True
        has_nibp = msg.sbp_mmhg is not None or msg.dbp_mmhg is not None or msg.map_mmhg is not None
        if has_nibp and (unit.nibp is None or msg.measured_at >= unit.nibp.measured_at):
            unit.nibp = _Nibp(msg.sbp_mmhg, msg.dbp_mmhg, msg.map_mmhg, msg.measured_at, now_at)
            changed = True
        point = self._add_trend(unit, msg)
        hospitals = self.hospitals_of(msg.unit_id)
        if not hospitals:
            return []
        events: list[BoardEvent] = []
        if changed:
            events.append(self._vitals_event(unit, hospitals, now_at))
        if point is not None:
            payload = TrendEvent(server_time=now_at, unit_id=unit.unit_id, point=point)
            events.append(BoardEvent(EventKind.TREND, hospitals, unit.unit_id, payload))
        return events

    def _add_trend(self, unit: _Unit, msg: Vitals) -> TrendPointPublic | None:
        point = TrendPointPublic(
            at=msg.measured_at,
            heart_rate_bpm=_finite(msg.heart_rate_bpm),
            spo2_pct=_finite(msg.spo2_pct),
            sbp_mmhg=_finite(msg.sbp_mmhg),
            dbp_mmhg=_finite(msg.dbp_mmhg),
            resp_rate_per_min=_finite(msg.resp_rate_per_min),
            etco2_mmhg=_finite(msg.etco2_mmhg),
        )
        trend = unit.trend
        times = [p.at for p in trend[-2:]] if trend and msg.measured_at >= trend[-1].at else None
        if times is not None:
            if (msg.measured_at - times[-1]).total_seconds() < self.trend_step_s:
                return None
            trend.append(point)
        else:
            keys = [p.at for p in trend]
            i = bisect.bisect_left(keys, msg.measured_at)
            near = [keys[j] for j in (i - 1, i) if 0 <= j < len(keys)]
            if any(abs((k - msg.measured_at).total_seconds()) < self.trend_step_s / 2 for k in near):
                return None
            trend.insert(i, point)
        if len(trend) > self.trend_max_points:
            del trend[: len(trend) - self.trend_max_points]
        return point

    def apply_gps(self, msg: GpsFix, now_at: datetime) -> list[BoardEvent]:
        """A position report.  No fix keeps the last position flagged lost; (0, 0) counts as no fix (FF-05)."""
        unit = self._unit(msg.unit_id, now_at, from_unit=True)
        at = msg.device_time if msg.device_time is not None and not msg.clock_suspect else msg.sent_at
        if unit.last_gps_at is not None and at < unit.last_gps_at:
            return []
        unit.last_gps_at = at
        lat, lon = msg.lat_deg, msg.lon_deg
        usable = valid_position(lat, lon) and msg.fix
        trail_point: TrailPointPublic | None = None
        if usable and lat is not None and lon is not None:
            unit.lat_deg, unit.lon_deg, unit.fix_at, unit.fix_received_at = lat, lon, at, now_at
            unit.fix_lost = False
            unit.speed_mps = msg.speed_mps
            last = unit.trail[-1] if unit.trail else None
            if last is None or (at - last.at).total_seconds() >= _TRAIL_STEP_S:
                trail_point = TrailPointPublic(lat_deg=lat, lon_deg=lon, at=at)
                unit.trail.append(trail_point)
        else:
            unit.fix_lost = True
            unit.speed_mps = None
        hospitals = self.hospitals_of(msg.unit_id)
        if not hospitals:
            return []
        events = [self._position_event(unit, hospitals, now_at)]
        if trail_point is not None:
            payload = TrailEvent(server_time=now_at, unit_id=unit.unit_id, point=trail_point)
            events.append(BoardEvent(EventKind.TRAIL, hospitals, unit.unit_id, payload))
        return events

    def apply_ecg(self, chunk: EcgChunk, now_at: datetime) -> list[BoardEvent]:
        """An ECG chunk (every lead, mV) joins the unit's ring, in sample-time order.

        Not live (returns ``[]``): replays (``historical``) and any chunk that starts before the end of the newest
        chunk shown (less a join tolerance of ``_ECG_JOIN_SAMPLES`` samples): duplicates and late chunks.  ``seq``
        does not decide the order, so a chunk with a huge ``seq`` or a sequence that restarted (new agent session)
        is followed normally.  A hole in sample time is a gap (``gap_before``); if ``seq`` jumped forward across
        it, the missing range is recorded and sent as a gap event (source ``board``)."""
        unit = self._unit(chunk.unit_id, now_at, from_unit=True)
        if chunk.historical:
            return []
        ring = unit.ecg
        prev = ring[-1] if ring else None
        if prev is not None and prev.fs_hz != chunk.fs_hz:
            ring.clear()
            prev = None
        join_s = _ECG_JOIN_SAMPLES / chunk.fs_hz
        hole_s = (chunk.start_at - prev.end_at).total_seconds() if prev is not None else 0.0
        if hole_s < -join_s:
            return []  # starts before the newest sample shown: a duplicate or a late chunk, never live
        events: list[BoardEvent] = []
        gap_before = hole_s > join_s
        hospitals = self.hospitals_of(chunk.unit_id)
        if unit.last_ecg_seq >= 0 and chunk.seq > unit.last_ecg_seq + 1 and (prev is None or gap_before):
            gap_before = True
            gap = GapPublic(
                stream="ecg",
                from_seq=unit.last_ecg_seq + 1,
                to_seq=chunk.seq - 1,
                source="board",
                detected_at=now_at,
                start_at=prev.end_at if prev is not None else None,
                end_at=chunk.start_at,
                restart=chunk.seq - unit.last_ecg_seq > SEQ_RESTART_JUMP,
            )
            events.extend(self._record_gap(unit, gap, hospitals, now_at))
        unit.last_ecg_seq = chunk.seq
        unit.ecg_received_at = now_at
        samples_mv = np.round(ecg_to_mv(chunk), _ECG_DECIMALS)
        n_leads = len(chunk.leads)
        segment = _Segment(
            seq=chunk.seq,
            start_at=chunk.start_at,
            fs_hz=chunk.fs_hz,
            leads=tuple(chunk.leads),
            lead_off=tuple(bool(x) for x in chunk.lead_off) if chunk.lead_off else (False,) * n_leads,
            saturated=tuple(bool(x) for x in chunk.saturated) if chunk.saturated else (False,) * n_leads,
            samples_mv=samples_mv,
            gap_before=gap_before,
        )
        ring.append(segment)
        total_s = sum(s.duration_s for s in ring)
        while len(ring) > 1 and total_s - ring[0].duration_s >= self.ecg_window_s:
            total_s -= ring.popleft().duration_s
        if not hospitals:
            return []
        events.append(
            BoardEvent(
                EventKind.ECG,
                hospitals,
                unit.unit_id,
                EcgEvent(server_time=now_at, unit_id=unit.unit_id, segment=self._segment(segment)),
            )
        )
        events.append(
            BoardEvent(
                EventKind.ECG_LEADS,
                hospitals,
                unit.unit_id,
                EcgLeadsEvent(server_time=now_at, unit_id=unit.unit_id, segment=self._leads(segment)),
            )
        )
        if unit.shown_ecg_lost:
            events.extend(self._unit_state_event(unit, now_at))
        return events

    def apply_gap(self, msg: GapRecord, now_at: datetime) -> list[BoardEvent]:
        """The telemetry store reports missing sequence numbers of a unit's stream."""
        if msg.to_seq < msg.from_seq:
            return []
        unit = self._unit(msg.unit_id, now_at)
        start_at = end_at = None
        if msg.stream == "ecg":
            for s in unit.ecg:
                if s.seq == msg.from_seq - 1:
                    start_at = s.end_at
                elif s.seq == msg.to_seq + 1:
                    end_at = s.start_at
        gap = GapPublic(
            stream=msg.stream,
            from_seq=msg.from_seq,
            to_seq=msg.to_seq,
            source="store",
            detected_at=msg.detected_at,
            start_at=start_at,
            end_at=end_at,
            restart=msg.restart,
        )
        return self._record_gap(unit, gap, self.hospitals_of(msg.unit_id), now_at)

    def _record_gap(self, unit: _Unit, gap: GapPublic, hospitals: frozenset[str], now_at: datetime) -> list[BoardEvent]:
        for i, known in enumerate(unit.gaps):
            if (known.stream, known.from_seq, known.to_seq) == (gap.stream, gap.from_seq, gap.to_seq):
                if known.source == "store" or gap.source == "board":
                    return []
                gap = known.model_copy(update={"source": "store"})  # confirmed by the store; keep the board's times
                unit.gaps[i] = gap
                break
        else:
            unit.gaps.append(gap)
        if not hospitals:
            return []
        payload = GapEvent(server_time=now_at, unit_id=unit.unit_id, gap=gap)
        return [BoardEvent(EventKind.GAP, hospitals, unit.unit_id, payload)]

    # --- periodic ------------------------------------------------------------------------------------------------

    def sweep(self, now_at: datetime) -> list[BoardEvent]:
        """Re-check ages: a value that turned stale (or an ECG that went silent) since it was last shown is pushed
        again, so every board greys it out within one sweep of its limit even if the page's clock is wrong."""
        events: list[BoardEvent] = []
        inbound = {a.message.unit_id for a in self._alerts.values() if a.open}
        for unit_id in sorted(inbound):
            unit = self._units.get(unit_id)
            if unit is None:
                continue
            hospitals = self.hospitals_of(unit_id)
            vitals = self._vitals(unit, now_at)
            if _stale_flags(vitals) != unit.shown_vitals_stale:
                events.append(self._vitals_event(unit, hospitals, now_at, vitals))
            if self._position(unit, now_at).stale != unit.shown_position_stale:
                events.append(self._position_event(unit, hospitals, now_at))
            if self._ecg_lost(unit, now_at) != unit.shown_ecg_lost:
                events.extend(self._unit_state_event(unit, now_at))
        return events

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
            alert=self._alert_public(record, now_at),
            card=self._card(msg.unit_id, msg.hospital_id, now_at),
        )
        return BoardEvent(EventKind.ALERT, frozenset({msg.hospital_id}), msg.unit_id, payload)

    def _unit_timeline(self, unit: _Unit, entry: TimelineEntryPublic, now_at: datetime) -> list[BoardEvent]:
        unit.timeline.append(entry)
        hospitals = self.hospitals_of(unit.unit_id)
        if not hospitals:
            return []
        payload = TimelineEvent(server_time=now_at, unit_id=unit.unit_id, entry=entry)
        return [BoardEvent(EventKind.TIMELINE, hospitals, unit.unit_id, payload)]

    def _unit_state_event(self, unit: _Unit, now_at: datetime) -> list[BoardEvent]:
        hospitals = self.hospitals_of(unit.unit_id)
        if not hospitals:
            return []
        unit.shown_ecg_lost = self._ecg_lost(unit, now_at)
        payload = UnitStateEvent(
            server_time=now_at,
            unit_id=unit.unit_id,
            availability=unit.availability,
            availability_at=unit.availability_at,
            crew_status=unit.crew_status,
            crew_status_at=unit.crew_status_at,
            ecg_age_s=self._ecg_age(unit, now_at),
            ecg_lost=unit.shown_ecg_lost,
            heard_age_s=_since(unit.data_at, now_at),
        )
        return [BoardEvent(EventKind.UNIT, hospitals, unit.unit_id, payload)]

    def _vitals_event(
        self, unit: _Unit, hospitals: frozenset[str], now_at: datetime, vitals: VitalsPublic | None = None
    ) -> BoardEvent:
        vitals = vitals or self._vitals(unit, now_at)
        unit.shown_vitals_stale = _stale_flags(vitals)
        payload = VitalsEvent(server_time=now_at, unit_id=unit.unit_id, vitals=vitals)
        return BoardEvent(EventKind.VITALS, hospitals, unit.unit_id, payload)

    def _position_event(self, unit: _Unit, hospitals: frozenset[str], now_at: datetime) -> BoardEvent:
        position = self._position(unit, now_at)
        unit.shown_position_stale = position.stale
        payload = PositionEvent(server_time=now_at, unit_id=unit.unit_id, position=position)
        return BoardEvent(EventKind.POSITION, hospitals, unit.unit_id, payload)

    def _activations(self, record: _Alert, now_at: datetime | None) -> list[ActivationPublic]:
        out: list[ActivationPublic] = []
        for a in record.message.activations:
            local = record.local_acks.get(a.department)
            out.append(_activation_public(a, local, now_at))
        return out

    def _state(self, record: _Alert) -> AlertState:
        msg = record.message
        if msg.state is AlertState.CANCELLED:
            return AlertState.CANCELLED
        if not msg.activations:
            return record.state
        activations = self._activations(record, None)
        open_pages = [a for a in activations if a.state in _OPEN_PAGE]
        if not open_pages:
            return AlertState.ACKNOWLEDGED
        if any(a.state is ActivationState.ESCALATED for a in open_pages):
            return AlertState.ESCALATED
        if msg.state is AlertState.ESCALATED:  # dispatch escalated; our ack of the escalated pages is pending
            return AlertState.ON_BOARD
        base = max(record.state, msg.state, key=lambda s: _STATE_RANK[s])
        return base if _STATE_RANK[base] <= _STATE_RANK[AlertState.ON_BOARD] else AlertState.ON_BOARD

    def _alert_public(self, record: _Alert, now_at: datetime | None) -> AlertPublic:
        msg = record.message
        f = msg.findings
        state = self._state(record)
        acked_at, acked_by = record.acknowledged_at, record.acknowledged_by
        activations = self._activations(record, now_at)
        if state is AlertState.ACKNOWLEDGED and activations and acked_at is None:
            last = max(activations, key=lambda a: a.acknowledged_at or msg.sent_at)
            acked_at, acked_by = last.acknowledged_at, last.acknowledged_by
        return AlertPublic(
            alert_id=msg.alert_id,
            hospital_id=msg.hospital_id,
            unit_id=msg.unit_id,
            case_type=msg.case_type,
            priority=msg.priority,
            state=state,
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
            acknowledged_at=acked_at if state is AlertState.ACKNOWLEDGED else None,
            acknowledged_by=acked_by if state is AlertState.ACKNOWLEDGED else None,
            sent_at=msg.sent_at,
            fmc_at=f.fmc_at,
            activations=activations,
            resynced=record.resynced,
        )

    def _reading(
        self, reading: _Reading | None, now_at: datetime, score: Callable[[float], int] | None = None
    ) -> ReadingPublic | None:
        if reading is None:
            return None
        age = age_s(reading.measured_at, reading.received_at, now_at)
        return ReadingPublic(
            value=reading.value,
            measured_at=reading.measured_at,
            age_s=age,
            stale=age > self.stale_after_s,
            news2=score(reading.value) if score is not None else None,
        )

    def _vitals(self, unit: _Unit, now_at: datetime) -> VitalsPublic:
        nibp = None
        if unit.nibp is not None:
            age = age_s(unit.nibp.measured_at, unit.nibp.received_at, now_at)
            # A cuff is cycled every few minutes, not streamed: it has its own staleness limit, else every NIBP
            # reading would grey out seconds after the cuff deflates.
            nibp = NibpPublic(
                sbp_mmhg=unit.nibp.sbp_mmhg,
                dbp_mmhg=unit.nibp.dbp_mmhg,
                map_mmhg=unit.nibp.map_mmhg,
                measured_at=unit.nibp.measured_at,
                age_s=age,
                stale=age > self.nibp_stale_after_s,
                news2=news2.news2_systolic(unit.nibp.sbp_mmhg) if unit.nibp.sbp_mmhg is not None else None,
            )
        r = unit.readings
        readings = {
            "heart_rate_bpm": self._reading(r.get("heart_rate_bpm"), now_at, news2.news2_pulse),
            "spo2_pct": self._reading(r.get("spo2_pct"), now_at, news2.news2_spo2),
            "resp_rate_per_min": self._reading(r.get("resp_rate_per_min"), now_at, news2.news2_resp_rate),
            "etco2_mmhg": self._reading(r.get("etco2_mmhg"), now_at),
            "temp_c": self._reading(r.get("temp_c"), now_at, news2.news2_temperature),
        }
        scores = [v.news2 for v in (*readings.values(), nibp) if v is not None and v.news2 is not None]
        return VitalsPublic(
            heart_rate_source=unit.heart_rate_source,
            nibp=nibp,
            news2_partial=sum(scores) if scores else None,
            news2_parameters=len(scores),
            **readings,
        )

    def _position(self, unit: _Unit, now_at: datetime) -> PositionPublic:
        if unit.fix_at is None or unit.fix_received_at is None:
            return PositionPublic(has_position=False, fix_lost=unit.last_gps_at is not None)
        age = age_s(unit.fix_at, unit.fix_received_at, now_at)
        return PositionPublic(
            has_position=True,
            lat_deg=unit.lat_deg,
            lon_deg=unit.lon_deg,
            fix_at=unit.fix_at,
            age_s=age,
            fix_lost=unit.fix_lost,
            stale=age > self.gps_stale_after_s,
            speed_mps=unit.speed_mps,
        )

    @staticmethod
    def _ecg_age(unit: _Unit, now_at: datetime) -> float | None:
        if not unit.ecg or unit.ecg_received_at is None:
            return None
        last = unit.ecg[-1]
        return age_s(last.end_at, unit.ecg_received_at, now_at)

    def _ecg_lost(self, unit: _Unit, now_at: datetime) -> bool:
        age = self._ecg_age(unit, now_at)
        return age is not None and age > self.ecg_lost_after_s

    @staticmethod
    def _segment(segment: _Segment) -> EcgSegmentPublic:
        return EcgSegmentPublic(
            seq=segment.seq,
            start_at=segment.start_at,
            fs_hz=segment.fs_hz,
            lead=segment.leads[0],
            lead_off=segment.lead_off[0],
            samples_mv=segment.samples_mv[0].tolist(),
            gap_before=segment.gap_before,
            saturated=bool(segment.saturated and segment.saturated[0]),
        )

    @staticmethod
    def _leads(segment: _Segment) -> EcgLeadsPublic:
        return EcgLeadsPublic(
            seq=segment.seq,
            start_at=segment.start_at,
            fs_hz=segment.fs_hz,
            leads=list(segment.leads),
            lead_off=list(segment.lead_off),
            samples_mv=segment.samples_mv.tolist(),
            gap_before=segment.gap_before,
            saturated=list(segment.saturated),
        )

    def _card(self, unit_id: str, hospital_id: str, now_at: datetime) -> CardPublic:
        unit = self._units.get(unit_id) or _Unit(unit_id=unit_id, last_heard_at=now_at)
        alerts = [
            self._alert_public(a, now_at)
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
            ecg_age_s=self._ecg_age(unit, now_at),
            ecg_lost=self._ecg_lost(unit, now_at),
            heard_age_s=_since(unit.data_at, now_at),
        )


def valid_position(lat_deg: float | None, lon_deg: float | None) -> bool:
    """A usable position: both present, finite, in range, and not (0, 0) ("Null Island", FF-05/FF-15)."""
    if lat_deg is None or lon_deg is None:
        return False
    if not (math.isfinite(lat_deg) and math.isfinite(lon_deg)):
        return False
    if not (-90 <= lat_deg <= 90 and -180 <= lon_deg <= 180):
        return False
    return not (lat_deg == 0.0 and lon_deg == 0.0)


def _activation_public(a: Activation, local: _LocalAck | None, now_at: datetime | None) -> ActivationPublic:
    state, acked_at, acked_by, confirmed = a.state, a.acknowledged_at, a.acknowledged_by_role, True
    if local is not None and a.state in _OPEN_PAGE:
        state, acked_at, acked_by, confirmed = ActivationState.ACKNOWLEDGED, local.at, local.by_role, False
    pending = state in _OPEN_PAGE and a.escalate_at is not None
    escalate_in = (a.escalate_at - now_at).total_seconds() if pending and now_at and a.escalate_at else None
    return ActivationPublic(
        department=a.department,
        state=state,
        level=a.level,
        paged_at=a.paged_at,
        escalate_at=a.escalate_at if pending else None,
        escalate_in_s=escalate_in,
        acknowledged_at=acked_at,
        acknowledged_by=acked_by,
        confirmed=confirmed,
    )


def _stale_flags(vitals: VitalsPublic) -> tuple[bool, ...]:
    readings = (vitals.heart_rate_bpm, vitals.spo2_pct, vitals.resp_rate_per_min, vitals.etco2_mmhg, vitals.temp_c)
    flags = tuple(r is not None and r.stale for r in readings)
    return (*flags, vitals.nibp is not None and vitals.nibp.stale)


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _since(at: datetime | None, now_at: datetime) -> float | None:
    return None if at is None else max(0.0, (now_at - at).total_seconds())
