"""Wire models of the board ("public" schemas): what the server sends to pages, never internal objects.

Every age (``age_s``, ``escalate_in_s``...) is computed by the server as of the event's ``server_time``.  Pages
extrapolate from there with their own monotonic clock (``performance.now()``), never comparing the server's
timestamps with their own wall clock, so a board PC whose clock is minutes off shows the same ages as the server.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict

from broker_config import ActivationState, AlertState, CaseType, CrewStatus, Department, Priority

__all__ = [
    "COALESCED_KINDS",
    "DETAIL_ONLY_KINDS",
    "BOARD_ONLY_KINDS",
    "ActivationPublic",
    "AlertEvent",
    "AlertPublic",
    "BoardSnapshot",
    "CardPublic",
    "DetailSnapshot",
    "EcgEvent",
    "EcgLeadsEvent",
    "EcgLeadsPublic",
    "EcgSegmentPublic",
    "EventKind",
    "GapEvent",
    "GapPublic",
    "NibpPublic",
    "PositionEvent",
    "PositionPublic",
    "ReadingPublic",
    "RemovedEvent",
    "TickEvent",
    "TimelineEntryPublic",
    "TimelineEvent",
    "TrailEvent",
    "TrailPointPublic",
    "TrendEvent",
    "TrendPointPublic",
    "UnitStateEvent",
    "VitalsEvent",
    "VitalsPublic",
]


class _Public(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ReadingPublic(_Public):
    """One measured value with its time; ``age_s`` and ``stale`` are as of the event's ``server_time``.

    ``age_s`` = time since the board received it + the transport delay the device clock reports (never
    negative): a device clock running ahead can make a value look younger by its transport delay, never fresh
    forever (FF-07).
    """

    value: float
    measured_at: datetime
    age_s: float
    stale: bool
    news2: int | None = None
    """This parameter's NEWS2 sub-score, 0-3 (RCP 2017; :mod:`hospital_board.news2`), None where NEWS2 has none
    (EtCO2)."""


class NibpPublic(_Public):
    """Non-invasive blood pressure, mm[Hg] (LOINC 85354-9 panel: 8480-6 systolic, 8462-4 diastolic)."""

    sbp_mmhg: float | None
    dbp_mmhg: float | None
    map_mmhg: float | None
    measured_at: datetime
    age_s: float
    stale: bool
    news2: int | None = None
    """NEWS2 sub-score of the systolic pressure, 0-3."""


class VitalsPublic(_Public):
    """Latest vital signs of a unit, each with its own age.  ``None`` = never measured (never shown as zero)."""

    heart_rate_bpm: ReadingPublic | None = None
    heart_rate_source: Literal["ecg", "monitor", "oximeter"] | None = None
    spo2_pct: ReadingPublic | None = None
    nibp: NibpPublic | None = None
    resp_rate_per_min: ReadingPublic | None = None
    etco2_mmhg: ReadingPublic | None = None
    temp_c: ReadingPublic | None = None
    news2_partial: int | None = None
    """Sum of the NEWS2 sub-scores of the parameters measured (None: none measured); partial: consciousness and
    supplemental oxygen are not streamed (:mod:`hospital_board.news2`)."""
    news2_parameters: int = 0
    """How many of NEWS2's seven parameters the partial sum counts."""


class PositionPublic(_Public):
    """Last known position.  ``has_position`` False = never had a fix ("no position"); ``fix_lost`` = the latest
    report had no fix, so ``lat_deg``/``lon_deg`` are the last known ones (shown greyed with their age);
    ``stale`` = older than the board's GPS limit."""

    has_position: bool
    lat_deg: float | None = None
    lon_deg: float | None = None
    fix_at: datetime | None = None
    age_s: float | None = None
    fix_lost: bool = False
    stale: bool = False
    speed_mps: float | None = None


class EcgSegmentPublic(_Public):
    """Contiguous first-lead samples in mV: sample ``i`` is at ``start_at + i / fs_hz``.

    ``gap_before``: samples are missing between the previous segment and this one (a sequence jump); the strip
    draws the hole, never a line across it.
    """

    seq: int
    start_at: datetime
    fs_hz: float
    lead: str
    lead_off: bool
    samples_mv: list[float]
    gap_before: bool = False
    saturated: bool = False
    """The device flagged the trace clipped at its ADC rail in this chunk (drawn as is, labelled)."""


class EcgLeadsPublic(_Public):
    """One chunk with every lead (``samples_mv[k]`` is lead ``leads[k]``), for the patient detail view."""

    seq: int
    start_at: datetime
    fs_hz: float
    leads: list[str]
    lead_off: list[bool]
    samples_mv: list[list[float]]
    gap_before: bool = False
    saturated: list[bool] = []


class GapPublic(_Public):
    """Missing sequence numbers ``from_seq..to_seq`` of one stream of a unit.

    ``source``: ``board`` (this board saw the jump) or ``store`` (the telemetry store's GapRecord).  For ECG the
    board adds the time span when it knows the chunks on both sides (``start_at`` = end of the last chunk before,
    ``end_at`` = start of the first chunk after).  ``restart``: the unit's sequence restarted (a new outbox, jump
    beyond :data:`broker_config.SEQ_RESTART_JUMP`): the loss is unknown and the range counts nothing.
    """

    stream: str
    from_seq: int
    to_seq: int
    source: Literal["board", "store"]
    detected_at: datetime
    start_at: datetime | None = None
    end_at: datetime | None = None
    restart: bool = False


class TrendPointPublic(_Public):
    """One point of the vitals trend (None = not measured at that time: the chart leaves a hole)."""

    at: datetime
    heart_rate_bpm: float | None = None
    spo2_pct: float | None = None
    sbp_mmhg: float | None = None
    dbp_mmhg: float | None = None
    resp_rate_per_min: float | None = None
    etco2_mmhg: float | None = None


class TrailPointPublic(_Public):
    """A validated position the unit reported (never (0, 0), never without a fix)."""

    lat_deg: float
    lon_deg: float
    at: datetime


class ActivationPublic(_Public):
    """One department paged by the alert.

    ``escalate_in_s`` is the time left before dispatch escalates the page, as of ``server_time`` (None once
    acknowledged or cancelled; negative when the deadline passed and dispatch has not re-published yet).
    ``confirmed`` is False while this board's own acknowledgement waits for dispatch's re-published alert.
    """

    department: Department
    state: ActivationState
    level: Literal["primary", "backup", "supervisor"]
    paged_at: datetime | None
    escalate_at: datetime | None
    escalate_in_s: float | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    confirmed: bool = True


class AlertPublic(_Public):
    """An alert as the board shows it (the crew note is plain text: the page escapes it, FF-16).

    ``sent_at`` is when dispatch sent the latest version; ``resynced`` means the board rebuilt it from dispatch's
    API after a restart or reconnect (activations arrive with dispatch's next re-publication).
    """

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
    sent_at: datetime | None = None
    fmc_at: datetime | None = None
    activations: list[ActivationPublic] = []
    resynced: bool = False


class CardPublic(_Public):
    """One inbound ambulance on one hospital's board.

    ``ecg_age_s``: seconds since the newest ECG sample (None = no ECG); ``ecg_lost``: older than the board's limit.
    ``heard_age_s``: seconds since the board last received anything from the unit.
    """

    unit_id: str
    availability: Literal["online", "offline", "unknown"]
    availability_at: datetime | None
    crew_status: CrewStatus | None
    crew_status_at: datetime | None
    alerts: list[AlertPublic]
    vitals: VitalsPublic
    position: PositionPublic
    ecg: list[EcgSegmentPublic]
    ecg_age_s: float | None = None
    ecg_lost: bool = False
    heard_age_s: float | None = None


class BoardSnapshot(_Public):
    """Everything one hospital's board shows, ordered by acuity then ETA (the resync of the feed)."""

    hospital_id: str
    server_time: datetime
    stale_after_s: float
    nibp_stale_after_s: float
    ecg_window_s: float
    cards: list[CardPublic]
    gps_stale_after_s: float = 30.0
    ecg_lost_after_s: float = 5.0


class TimelineEntryPublic(_Public):
    """One time point of the case as the board knows it (``source``: crew, dispatch, board, device)."""

    at: datetime
    kind: str
    detail: str = ""
    source: str


class DetailSnapshot(_Public):
    """One patient's detail view: the card plus every ECG lead, the vitals trend, positions, gaps, timeline."""

    hospital_id: str
    unit_id: str
    server_time: datetime
    stale_after_s: float
    nibp_stale_after_s: float
    gps_stale_after_s: float
    ecg_window_s: float
    ecg_lost_after_s: float
    trend_step_s: float
    card: CardPublic
    ecg_leads: list[EcgLeadsPublic]
    trend: list[TrendPointPublic]
    trail: list[TrailPointPublic]
    gaps: list[GapPublic]
    timeline: list[TimelineEntryPublic]


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
    """Availability, crew status and ECG freshness of a unit (coalesced latest-wins per unit)."""

    server_time: datetime
    unit_id: str
    availability: Literal["online", "offline", "unknown"]
    availability_at: datetime | None
    crew_status: CrewStatus | None
    crew_status_at: datetime | None
    ecg_age_s: float | None = None
    ecg_lost: bool = False
    heard_age_s: float | None = None


class EcgEvent(_Public):
    """New first-lead ECG samples of a unit (appended, in order): the cards' strips."""

    server_time: datetime
    unit_id: str
    segment: EcgSegmentPublic


class EcgLeadsEvent(_Public):
    """New ECG samples of every lead of a unit (appended, in order): the detail view."""

    server_time: datetime
    unit_id: str
    segment: EcgLeadsPublic


class TrendEvent(_Public):
    """A new vitals trend point of a unit (detail view)."""

    server_time: datetime
    unit_id: str
    point: TrendPointPublic


class TrailEvent(_Public):
    """A new validated position of a unit (detail view map)."""

    server_time: datetime
    unit_id: str
    point: TrailPointPublic


class GapEvent(_Public):
    """Samples of a unit's stream are missing (seen by this board or reported by the telemetry store)."""

    server_time: datetime
    unit_id: str
    gap: GapPublic


class TimelineEvent(_Public):
    """A new time point of a unit's case (detail view)."""

    server_time: datetime
    unit_id: str
    entry: TimelineEntryPublic


class TickEvent(_Public):
    """Sent when the feed is idle: the server's time, so the page knows the link is alive."""

    server_time: datetime


class EventKind(StrEnum):
    """SSE event names of the board feed."""

    SNAPSHOT = "snapshot"
    DETAIL = "detail"
    ALERT = "alert"
    REMOVED = "removed"
    VITALS = "vitals"
    POSITION = "position"
    UNIT = "unit"
    ECG = "ecg"
    ECG_LEADS = "ecg_leads"
    TREND = "trend"
    TRAIL = "trail"
    GAP = "gap"
    TIMELINE = "timeline"
    TICK = "tick"


COALESCED_KINDS = frozenset({EventKind.VITALS, EventKind.POSITION, EventKind.UNIT})
"""Kinds where only the latest pending event per unit matters (FF-14); the others are delivered one by one."""

DETAIL_ONLY_KINDS = frozenset({EventKind.ECG_LEADS, EventKind.TREND, EventKind.TRAIL, EventKind.TIMELINE})
"""Kinds only a patient-detail (or phone) feed receives."""

BOARD_ONLY_KINDS = frozenset({EventKind.ECG})
"""Kinds only the big-screen board feed receives (the detail feed gets every lead instead)."""
