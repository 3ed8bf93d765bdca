"""Pydantic models of every message on the bus, all sharing one envelope.

Field names carry their units (``heart_rate_bpm``, ``spo2_pct``, ``sbp_mmhg``).  Times are timezone-aware UTC.
Producers build models strictly (unknown fields rejected, frozen); consumers decode through
:mod:`broker_config.codec`, which ignores unknown fields so that additive changes roll out without
lock-step deploys (STYLE.md, "strict to produce, tolerant to consume").

The ECG chunk is not JSON: see :mod:`broker_config.codec` for its binary layout.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from broker_config.topics import ID_PATTERN

__all__ = [
    "SCHEMA_VERSION",
    "SEQ_RESTART_JUMP",
    "older_session",
    "Activation",
    "ActivationState",
    "AlertAck",
    "AlertState",
    "Availability",
    "CaseType",
    "CrewStatus",
    "Department",
    "EcgChunk",
    "Envelope",
    "Findings",
    "GapRecord",
    "GpsFix",
    "HospitalAlert",
    "Notice",
    "NoticeKind",
    "OpaqueId",
    "PreAlert",
    "Priority",
    "Status",
    "StoreReceipt",
    "Vitals",
    "utc_now",
]

SCHEMA_VERSION: Literal[1] = 1
"""Payload schema version; a consumer rejects any other (a breaking change also moves the topic root)."""


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
"""A timezone-aware datetime, normalised to UTC.  Naive datetimes are rejected."""

OpaqueId = Annotated[str, Field(pattern=ID_PATTERN.pattern)]
"""Unit, hospital, alert or incident id: opaque, ``[A-Za-z0-9_-]{1,32}``."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)


class Envelope(_Model):
    """Fields every message carries.

    ``seq`` counts up per (unit, stream) and never repeats for a unit (a new outbox starts at the wall clock in
    microseconds since the epoch, not 0): it is the idempotency key of the store and the basis of gap detection.
    ``historical`` marks store-and-forward replays, which must never fire live alarms (Sparkplug B's idea).
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    unit_id: OpaqueId
    seq: Annotated[int, Field(ge=0, lt=2**63)]
    sent_at: UtcDatetime
    historical: bool = False


# --- unit -> everyone -------------------------------------------------------------------------------------------


class Availability(Envelope):
    """Birth (``online``, retained, after resubscribing) and death (``offline``, the last will).

    ``seq`` here is the unit's session number (Sparkplug's bdSeq): a will and the birth of the same
    session carry the same number, so a late ``offline`` of an old session cannot hide a new ``online``.
    """

    state: Literal["online", "offline"]


class CrewStatus(StrEnum):
    """Unit lifecycle states as the crew taps them (NEMSIS eTimes in brackets)."""

    AVAILABLE = "available"
    ASSIGNED = "assigned"  # eTimes.03 unit notified
    EN_ROUTE = "en_route"  # eTimes.05
    ON_SCENE = "on_scene"  # eTimes.06
    PATIENT_CONTACT = "patient_contact"  # eTimes.07, first medical contact (FMC)
    TRANSPORTING = "transporting"  # eTimes.09 left scene
    AT_HOSPITAL = "at_hospital"  # eTimes.11
    HANDED_OVER = "handed_over"  # eTimes.12 transfer of care
    BACK_IN_SERVICE = "back_in_service"  # eTimes.13


class Status(Envelope):
    """The crew's status tap (retained): what the unit is doing and, when known, where it is going."""

    status: CrewStatus
    at: UtcDatetime
    incident_id: OpaqueId | None = None
    destination_hospital_id: OpaqueId | None = None


class Vitals(Envelope):
    """One set of vital signs measured together.  Absent = not measured (never zero).

    Codes and units: DOMAIN.md section 7 (LOINC, IEEE 11073 MDC, UCUM); the mapping lives in
    :data:`broker_config.codes.VITAL_CODES`.
    """

    measured_at: UtcDatetime
    heart_rate_bpm: Annotated[float, Field(ge=0, le=350)] | None = None
    heart_rate_source: Literal["ecg", "monitor", "oximeter"] | None = None
    spo2_pct: Annotated[float, Field(ge=0, le=100)] | None = None
    sbp_mmhg: Annotated[float, Field(ge=0, le=350)] | None = None
    dbp_mmhg: Annotated[float, Field(ge=0, le=300)] | None = None
    map_mmhg: Annotated[float, Field(ge=0, le=300)] | None = None
    resp_rate_per_min: Annotated[float, Field(ge=0, le=150)] | None = None
    etco2_mmhg: Annotated[float, Field(ge=0, le=150)] | None = None
    temp_c: Annotated[float, Field(ge=15, le=46)] | None = None


class EcgChunk(Envelope):
    """A block of multi-lead ECG as integer ADC samples (WFDB's digital/physical split).

    Physical value in mV = (adc - baseline_adc) / gain_adc_per_mv.  ``samples`` is a read-only int16 numpy
    array of shape (n_leads, n_samples): ``samples[lead, i]`` is lead ``leads[lead]`` at ``start_at + i / fs_hz``.
    On the wire this travels in the binary layout of :mod:`broker_config.codec`, never as JSON floats nor one
    message per sample.
    ``fs_hz`` is required (FF-10: a missing or wrong rate makes nonsense heart rates).
    """

    start_at: UtcDatetime
    fs_hz: Annotated[float, Field(gt=0, le=20_000)]
    leads: tuple[Annotated[str, Field(min_length=1, max_length=16)], ...] = Field(min_length=1, max_length=16)
    gain_adc_per_mv: Annotated[float, Field(gt=0)]
    baseline_adc: int
    samples: np.ndarray
    lead_off: tuple[bool, ...] = ()
    """Per lead: the device reported the electrode off (flagged, never hidden).  Empty = not reported."""
    saturated: tuple[bool, ...] = ()
    """Per lead: a sample of this chunk sits at the ADC's rail (clipped; the samples are sent unaltered, flagged,
    never hidden).  Empty = not reported."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    @field_validator("samples", mode="before")
    @classmethod
    def _int16(cls, value: object) -> np.ndarray:
        arr = np.asarray(value)
        if arr.ndim != 2 or arr.shape[1] == 0:
            raise ValueError("samples must be a 2-D array (n_leads, n_samples) with n_samples > 0")
        if arr.dtype.kind not in "iu":
            raise ValueError("samples must be integers (ADC units)")
        if arr.size and (int(arr.min()) < -32768 or int(arr.max()) > 32767):
            raise ValueError("samples must fit in int16")
        out = np.array(arr, dtype=np.int16, order="C", copy=True)
        out.flags.writeable = False
        return out

    @model_validator(mode="after")
    def _shape(self) -> EcgChunk:
        if self.samples.shape[0] != len(self.leads):
            raise ValueError("samples must have one row per lead")
        if self.lead_off and len(self.lead_off) != len(self.leads):
            raise ValueError("lead_off must be empty or one flag per lead")
        if self.saturated and len(self.saturated) != len(self.leads):
            raise ValueError("saturated must be empty or one flag per lead")
        return self

    @property
    def n_samples(self) -> int:
        """Samples per lead in this chunk."""
        return int(self.samples.shape[1])

    @property
    def duration_s(self) -> float:
        """Length of the chunk in seconds."""
        return self.n_samples / self.fs_hz


class GpsFix(Envelope):
    """A position report.  No fix is ``fix=False`` with no coordinates: never (0, 0) (FF-05)."""

    fix: bool
    device_time: UtcDatetime | None = None
    lat_deg: Annotated[float, Field(ge=-90, le=90)] | None = None
    lon_deg: Annotated[float, Field(ge=-180, le=180)] | None = None
    speed_mps: Annotated[float, Field(ge=0, le=150)] | None = None
    heading_deg: Annotated[float, Field(ge=0, lt=360)] | None = None
    hdop: Annotated[float, Field(ge=0)] | None = None
    fix_quality: Annotated[int, Field(ge=0, le=9)] | None = None
    """NMEA GGA fix quality: 0 none, 1 GPS, 2 DGPS, 4 RTK fixed, 5 RTK float, ..."""
    clock_suspect: bool = False
    """Device time disagreed with the receive clock (FF-07); receive time is authoritative."""

    @model_validator(mode="after")
    def _position(self) -> GpsFix:
        has = self.lat_deg is not None and self.lon_deg is not None
        if self.fix != has:
            raise ValueError("fix=True needs lat_deg and lon_deg; fix=False must carry none")
        if (self.lat_deg is None) != (self.lon_deg is None):
            raise ValueError("lat_deg and lon_deg come together")
        return self


class CaseType(StrEnum):
    """The pathway a pre-alert asks for (DOMAIN.md section 5)."""

    STEMI = "stemi"
    STROKE = "stroke"
    TRAUMA = "trauma"
    MEDICAL = "medical"
    """Any other inbound patient: a notification, no team activation."""


class Priority(StrEnum):
    """Alert priority in the manner of IEC 60601-1-8 (high red flashing, medium yellow, low cyan)."""

    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


class Findings(_Model):
    """Structured pre-hospital findings.  No names or identifiers: age band and sex only."""

    age_years: Annotated[int, Field(ge=0, le=120)] | None = None
    sex: Literal["female", "male", "other", "unknown"] = "unknown"
    fmc_at: UtcDatetime | None = None
    """First medical contact (NEMSIS eTimes.07)."""
    symptom_onset_at: UtcDatetime | None = None
    last_known_well_at: UtcDatetime | None = None
    first_ecg_at: UtcDatetime | None = None
    """First 12-lead ECG recorded (China CPC / ESC: FMC -> first ECG <= 10 min)."""
    ecg_transmitted_at: UtcDatetime | None = None
    ecg_st_elevation: bool | None = None
    be_fast_positive: bool | None = None
    lams: Annotated[int, Field(ge=0, le=5)] | None = None
    gcs_total: Annotated[int, Field(ge=3, le=15)] | None = None
    gcs_motor: Annotated[int, Field(ge=1, le=6)] | None = None
    trauma_red_criteria: tuple[Annotated[str, Field(max_length=64)], ...] = ()
    sbp_mmhg: Annotated[float, Field(ge=0, le=350)] | None = None
    """Crew-measured vitals at the time of the pre-alert, for the ACS 2021 physiological criteria."""
    heart_rate_bpm: Annotated[float, Field(ge=0, le=350)] | None = None
    resp_rate_per_min: Annotated[float, Field(ge=0, le=150)] | None = None
    spo2_pct: Annotated[float, Field(ge=0, le=100)] | None = None
    note: Annotated[str, Field(max_length=500)] = ""
    """Free text from the crew: shown HTML-escaped, never logged."""


class PreAlert(Envelope):
    """The crew's pre-alert (or inbound notification for ``medical``) to dispatch.

    ``alert_id`` is chosen by the vehicle so that a replay after a link drop is recognised as the same alert.
    """

    alert_id: OpaqueId
    case_type: CaseType
    findings: Findings = Findings()
    eta_s: Annotated[int, Field(ge=0, le=86_400)] | None = None
    """Crew's own ETA estimate, seconds from ``sent_at``; dispatch computes its own from the road network."""
    requested_hospital_id: OpaqueId | None = None


# --- dispatch <-> unit, dispatch <-> hospital ---------------------------------------------------------------------


class Department(StrEnum):
    """Receiving teams a pathway activates."""

    ED = "ed"
    CATH_LAB = "cath_lab"
    STROKE_TEAM = "stroke_team"
    CT = "ct"
    TRAUMA_TEAM = "trauma_team"
    RESUS_ROOM = "resus_room"


class AlertState(StrEnum):
    """Where an alert stands at the hospital."""

    SENT = "sent"
    ON_BOARD = "on_board"
    ACKNOWLEDGED = "acknowledged"
    ESCALATED = "escalated"
    CANCELLED = "cancelled"


class ActivationState(StrEnum):
    """Where one department's activation stands."""

    PAGED = "paged"
    ACKNOWLEDGED = "acknowledged"
    ESCALATED = "escalated"
    CANCELLED = "cancelled"


class Activation(_Model):
    """One receiving department activated by a pre-alert, with its acknowledgement and escalation clock."""

    department: Department
    state: ActivationState = ActivationState.PAGED
    level: Literal["primary", "backup", "supervisor"] = "primary"
    """Who is being paged now: escalation moves primary -> backup -> supervisor."""
    paged_at: UtcDatetime | None = None
    escalate_at: UtcDatetime | None = None
    """When the page escalates if nobody acknowledges (None once acknowledged)."""
    acknowledged_at: UtcDatetime | None = None
    acknowledged_by_role: Annotated[str, Field(max_length=64)] | None = None


class HospitalAlert(Envelope):
    """Dispatch to one hospital's board: a patient is coming.  ``unit_id`` is the ambulance; ``seq`` is
    dispatch's own counter.  Dispatch re-publishes the alert (same ``alert_id``, new ``seq``) whenever its state,
    ETA or activations change; the latest ``seq`` wins.  A pre-alert is never suppressed because it was delayed:
    ``historical`` tells the board to show the delay, not to stay silent."""

    alert_id: OpaqueId
    hospital_id: OpaqueId
    case_type: CaseType
    priority: Priority
    eta_at: UtcDatetime | None = None
    departments: tuple[Department, ...] = ()
    findings: Findings = Findings()
    reasons: tuple[Annotated[str, Field(max_length=200)], ...] = ()
    state: AlertState = AlertState.SENT
    activations: tuple[Activation, ...] = ()


class AlertAck(Envelope):
    """A hospital acknowledges (or the board confirms display of) an alert.  ``unit_id`` is the ambulance."""

    alert_id: OpaqueId
    hospital_id: OpaqueId
    state: Literal[AlertState.ON_BOARD, AlertState.ACKNOWLEDGED]
    department: Department | None = None
    by_role: Annotated[str, Field(max_length=64)] = "ed_staff"
    at: UtcDatetime


class NoticeKind(StrEnum):
    """What dispatch tells a crew."""

    DESTINATION = "destination"
    ALERT_STATE = "alert_state"
    ASSIGNMENT = "assignment"
    """Dispatch assigns the unit to an incident; the crew answers with a Status(assigned, incident_id)."""
    ASSIGNMENT_CANCELLED = "assignment_cancelled"
    """The unit is stood down from ``incident_id`` (re-assigned to another unit, or the incident was cancelled)."""


class Notice(Envelope):
    """Dispatch to one unit: its destination with reasons, and the delivery state of its pre-alert."""

    kind: NoticeKind
    alert_id: OpaqueId | None = None
    hospital_id: OpaqueId | None = None
    hospital_name: Annotated[str, Field(max_length=200)] = ""
    reasons: tuple[Annotated[str, Field(max_length=200)], ...] = ()
    alert_state: AlertState | None = None
    eta_at: UtcDatetime | None = None
    activations: tuple[Activation, ...] = ()
    incident_id: OpaqueId | None = None
    incident_lat_deg: Annotated[float, Field(ge=-90, le=90)] | None = None
    incident_lon_deg: Annotated[float, Field(ge=-180, le=180)] | None = None


# --- telemetry store -> everyone ----------------------------------------------------------------------------------


class StoreReceipt(Envelope):
    """The telemetry store's delivery receipt for one unit (retained): per stream, the highest sequence number up
    to which every message is durably stored (``-1`` = none yet).  The crew screen shows "stored" from it.
    ``seq`` is the store's own counter for this unit's receipts."""

    stored_through_seq: dict[Annotated[str, Field(max_length=16)], Annotated[int, Field(ge=-1)]]
    stored_at: UtcDatetime


SEQ_RESTART_JUMP = 100_000
"""A forward jump of more seqs than this is a sequence restart (a new outbox seeded from the clock), not a gap: at
the fastest gap-tracked stream (one message a second) it is more than a day of data, while a clock-seeded counter
jumps by about 10**15.  The store and the board both judge a jump by it."""


def older_session(seq: int, newest: int) -> bool:
    """Whether a birth/will numbered ``seq`` belongs to a session older than ``newest`` (a late will that must not
    hide a newer birth), rather than to a restarted counter far below it (a new outbox seeded lower: its births
    count, or the unit would stay "offline" for good)."""
    return newest - SEQ_RESTART_JUMP <= seq < newest


class GapRecord(Envelope):
    """The store saw sequence numbers ``from_seq``..``to_seq`` (inclusive) of a unit's stream missing.

    ``restart`` (optional, default false): the jump was a sequence restart (a new outbox seeded from the clock), so
    the loss is unknown and the range is not a count of missing messages.
    """

    stream: str
    from_seq: Annotated[int, Field(ge=0)]
    to_seq: Annotated[int, Field(ge=0)]
    detected_at: UtcDatetime
    restart: bool = False
