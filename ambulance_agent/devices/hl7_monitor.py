"""HL7 v2 input from patient monitors: IHE PCD-01 numerics (ORU^R01) and PCD-04 alarms (ORU^R40).

Messages come in through the byte-safe front end :mod:`ambulance_agent.devices.hl7_message` (terminator
normalising, FF-09).  :class:`Hl7MonitorInput` is the per-message error boundary in front of the MLLP listener:
parse, map, de-duplicate by MSH-10, hand over, acknowledge (AA / AE / AR).

Numerics are mapped to :class:`broker_config.Vitals` fields by IEEE 11073-10101 (MDC) or LOINC code
(:data:`broker_config.codes.VITAL_CODES`, DOMAIN.md section 7), with the unit read from OBX-6 (MDC dimension codes
or UCUM) and converted; an observation whose unit cannot be interpreted, whose value is not an HL7 NM number,
or whose value is outside the contract's range is rejected (counted, logged by reason), never guessed.
Systolic and diastolic pressure are paired by OBX-4 channel and observation time (FF-18).  Times come from
OBX-14, else OBR-7, with their UTC offset; a time without an offset, or no time at all, is flagged.

Sources: HL7 v2.6 chapters 2 (control, ACK, MSA, ERR) and 7 (OBR, OBX); IHE PCD Technical Framework Vol. 2
(Rev. 9.0) PCD-01 and PCD-04; IEEE 11073-10101 nomenclature (Rosetta); UCUM.

Logs carry message control ids and reasons only, never values, text or patient data (DOMAIN.md section 11).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Literal

import hl7

from ambulance_agent.devices.errors import RejectTally
from ambulance_agent.devices.hl7_message import (
    AckCode,
    Hl7InputError,
    Hl7Reason,
    MessageHeader,
    ParsedMessage,
    build_ack,
    field_value,
    parse_dtm,
    parse_message,
)
from broker_config import VITAL_CODES, Priority, Vitals, utc_now
from broker_config.topics import loggable

__all__ = [
    "FIELD_RANGES",
    "AlarmReport",
    "DeviceAlarm",
    "DeviceReport",
    "HandleOutcome",
    "HeartRateSource",
    "Hl7MonitorInput",
    "MonitorReport",
    "ObservationTime",
    "ObxReason",
    "ObxRejection",
    "QualityFlag",
    "TimeSource",
    "VitalField",
    "VitalObservation",
    "VitalsGroup",
    "read_alarm_report",
    "read_monitor_report",
]

logger = logging.getLogger(__name__)

_NM = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)", re.ASCII)
_MDC_CONTAINMENT = re.compile(r"\d+(?:\.\d+){3,}", re.ASCII)
_UCUM_PER_MIN = re.compile(r"(?:1|\{[^{}]{0,40}\})?/min", re.ASCII)
_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}", re.ASCII)


# --- enums --------------------------------------------------------------------------------------------------------


class ObxReason(StrEnum):
    """Why one observation (OBX) carrying a vital sign was not used."""

    NOT_NUMERIC = "not_numeric"
    NO_VALUE = "no_value"
    UNIT_UNKNOWN = "unit_unknown"
    UNIT_CONFLICT = "unit_conflict"
    UNIT_MISMATCH = "unit_mismatch"
    OUT_OF_RANGE = "out_of_range"
    BAD_TIME = "bad_time"
    WITHDRAWN = "withdrawn"
    CONFLICTING_VALUES = "conflicting_values"
    UNPAIRED_PRESSURE = "unpaired_pressure"


class TimeSource(StrEnum):
    """Where an observation's time came from."""

    OBX_14 = "obx_14"
    OBR_7 = "obr_7"
    RECEIVED = "received"
    """The message carried no observation time: the receive time is used (flagged)."""


class QualityFlag(StrEnum):
    """Data-quality notes attached to a :class:`VitalsGroup`."""

    TIME_OFFSET_ASSUMED = "time_offset_assumed"
    """A timestamp had no UTC offset: MSH-7's offset (or UTC) was assumed."""
    TIME_FROM_RECEIPT = "time_from_receipt"
    BP_INCOMPLETE = "bp_incomplete"
    """Only one of systolic/diastolic was measured (FF-18: the other is absent, never zero)."""


class VitalField(StrEnum):
    """The :class:`broker_config.Vitals` fields a monitor can fill."""

    HEART_RATE_BPM = "heart_rate_bpm"
    SPO2_PCT = "spo2_pct"
    SBP_MMHG = "sbp_mmhg"
    DBP_MMHG = "dbp_mmhg"
    MAP_MMHG = "map_mmhg"
    RESP_RATE_PER_MIN = "resp_rate_per_min"
    ETCO2_MMHG = "etco2_mmhg"
    TEMP_C = "temp_c"


HeartRateSource = Literal["ecg", "monitor", "oximeter"]


class _Quantity(StrEnum):
    RATE_PER_MIN = "rate_per_min"
    PRESSURE_MMHG = "pressure_mmhg"
    PERCENT = "percent"
    TEMPERATURE_C = "temperature_c"


# --- code and unit tables -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _VitalSpec:
    field: VitalField
    quantity: _Quantity
    heart_rate_source: HeartRateSource | None = None


_FIELD_QUANTITY = {
    VitalField.HEART_RATE_BPM: _Quantity.RATE_PER_MIN,
    VitalField.SPO2_PCT: _Quantity.PERCENT,
    VitalField.SBP_MMHG: _Quantity.PRESSURE_MMHG,
    VitalField.DBP_MMHG: _Quantity.PRESSURE_MMHG,
    VitalField.MAP_MMHG: _Quantity.PRESSURE_MMHG,
    VitalField.RESP_RATE_PER_MIN: _Quantity.RATE_PER_MIN,
    VitalField.ETCO2_MMHG: _Quantity.PRESSURE_MMHG,
    VitalField.TEMP_C: _Quantity.TEMPERATURE_C,
}

# Inclusive ranges of broker_config.payloads.Vitals (a unit test keeps them in step with the model).
FIELD_RANGES: dict[VitalField, tuple[float, float]] = {
    VitalField.HEART_RATE_BPM: (0.0, 350.0),
    VitalField.SPO2_PCT: (0.0, 100.0),
    VitalField.SBP_MMHG: (0.0, 350.0),
    VitalField.DBP_MMHG: (0.0, 300.0),
    VitalField.MAP_MMHG: (0.0, 300.0),
    VitalField.RESP_RATE_PER_MIN: (0.0, 150.0),
    VitalField.ETCO2_MMHG: (0.0, 150.0),
    VitalField.TEMP_C: (15.0, 46.0),
}


def _code_tables() -> tuple[dict[str, _VitalSpec], dict[str, _VitalSpec]]:
    mdc: dict[str, _VitalSpec] = {}
    loinc: dict[str, _VitalSpec] = {}
    for code in VITAL_CODES:
        vf = VitalField(code.field)
        hr_source: HeartRateSource | None = None
        if vf is VitalField.HEART_RATE_BPM:
            hr_source = "ecg"  # 147842 MDC_ECG_HEART_RATE is the ECG-derived rate
        spec = _VitalSpec(vf, _FIELD_QUANTITY[vf], hr_source)
        if code.mdc_code is not None:
            mdc[str(code.mdc_code)] = spec
        loinc[code.loinc] = _VitalSpec(vf, _FIELD_QUANTITY[vf], "monitor" if hr_source else None)
    # Codes the contract table does not list, from DOMAIN.md section 7 and IHE PCD-01 examples.
    mdc["149530"] = _VitalSpec(VitalField.HEART_RATE_BPM, _Quantity.RATE_PER_MIN, "oximeter")  # MDC_PULS_OXIM_PULS_RATE
    mdc["149546"] = _VitalSpec(VitalField.HEART_RATE_BPM, _Quantity.RATE_PER_MIN, "monitor")  # MDC_PULS_RATE_NON_INV
    loinc["8889-8"] = _VitalSpec(VitalField.HEART_RATE_BPM, _Quantity.RATE_PER_MIN, "oximeter")  # pulse oximetry
    loinc["2708-6"] = _VitalSpec(VitalField.SPO2_PCT, _Quantity.PERCENT)  # SaO2, arterial (also used by monitors)
    return mdc, loinc


_MDC_VITALS, _LOINC_VITALS = _code_tables()
_HR_SOURCE_RANK: dict[HeartRateSource, int] = {"ecg": 0, "oximeter": 1, "monitor": 2}

_MMHG_PER_KPA = 1000.0 / 133.322387415  # 1 mmHg = 133.322387415 Pa (UCUM definition of mm[Hg])


def _identity(x: float) -> float:
    return x


def _kpa_to_mmhg(x: float) -> float:
    return x * _MMHG_PER_KPA


def _degf_to_c(x: float) -> float:
    return (x - 32.0) * 5.0 / 9.0


_Conversion = tuple[_Quantity, Callable[[float], float]]

# IEEE 11073-10101 dimension codes (partition 4, context-free code = 262144 + term code).
_MDC_UNITS: dict[str, _Conversion] = {
    "264672": (_Quantity.RATE_PER_MIN, _identity),  # MDC_DIM_PER_MIN
    "264864": (_Quantity.RATE_PER_MIN, _identity),  # MDC_DIM_BEAT_PER_MIN
    "264896": (_Quantity.RATE_PER_MIN, _identity),  # MDC_DIM_PULS_PER_MIN
    "264928": (_Quantity.RATE_PER_MIN, _identity),  # MDC_DIM_RESP_PER_MIN
    "266016": (_Quantity.PRESSURE_MMHG, _identity),  # MDC_DIM_MMHG
    "265987": (_Quantity.PRESSURE_MMHG, _kpa_to_mmhg),  # MDC_DIM_KILO_PASCAL
    "262688": (_Quantity.PERCENT, _identity),  # MDC_DIM_PERCENT
    "268192": (_Quantity.TEMPERATURE_C, _identity),  # MDC_DIM_DEGC
    "266560": (_Quantity.TEMPERATURE_C, _degf_to_c),  # MDC_DIM_FAHR
}

# UCUM case-sensitive codes.  "{beat}/min" is 1/min with an annotation, which UCUM ignores for comparison.
_UCUM_UNITS: dict[str, _Conversion] = {
    "mm[Hg]": (_Quantity.PRESSURE_MMHG, _identity),
    "kPa": (_Quantity.PRESSURE_MMHG, _kpa_to_mmhg),
    "%": (_Quantity.PERCENT, _identity),
    "Cel": (_Quantity.TEMPERATURE_C, _identity),
    "[degF]": (_Quantity.TEMPERATURE_C, _degf_to_c),
}


# --- ORU^R01: numerics --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObservationTime:
    """When an observation was made, aware UTC, with where that came from and whether it is trustworthy."""

    at: datetime
    source: TimeSource
    offset_assumed: bool = False

    @property
    def flagged(self) -> bool:
        """True when the time was not an explicit, offset-carrying observation time."""
        return self.offset_assumed or self.source is TimeSource.RECEIVED


@dataclass(frozen=True, slots=True)
class VitalObservation:
    """One OBX mapped to a vitals field: value converted to the field's unit (see :class:`VitalField`).

    ``code`` is ``"MDC:150021"`` or ``"LN:8480-6"``; ``source_unit`` the OBX-6 identifier as sent;
    ``channel`` the OBX-4 pairing key (the MDC containment without its metric level, or OBX-4 as is).
    """

    field: VitalField
    value: float
    set_id: str
    sub_id: str
    channel: str
    code: str
    source_unit: str
    time: ObservationTime
    heart_rate_source: HeartRateSource | None = None


@dataclass(frozen=True, slots=True)
class ObxRejection:
    """An OBX with a vital-sign code that was not used: its OBX-1 set id, code and the reason (no value)."""

    set_id: str
    code: str
    reason: ObxReason


@dataclass(frozen=True, slots=True)
class VitalsGroup:
    """Vital signs measured at one time, in the contract's units; ``None`` = not measured (never zero)."""

    measured: ObservationTime
    heart_rate_bpm: float | None = None
    heart_rate_source: HeartRateSource | None = None
    spo2_pct: float | None = None
    sbp_mmhg: float | None = None
    dbp_mmhg: float | None = None
    map_mmhg: float | None = None
    resp_rate_per_min: float | None = None
    etco2_mmhg: float | None = None
    temp_c: float | None = None
    flags: tuple[QualityFlag, ...] = ()

    def to_vitals(self, *, unit_id: str, seq: int, sent_at: datetime, historical: bool = False) -> Vitals:
        """The :class:`broker_config.Vitals` payload for this group (envelope fields from the caller).

        Raises:
            pydantic.ValidationError: an envelope field is invalid (the values here are already in range).
        """
        return Vitals(
            unit_id=unit_id,
            seq=seq,
            sent_at=sent_at,
            historical=historical,
            measured_at=self.measured.at,
            heart_rate_bpm=self.heart_rate_bpm,
            heart_rate_source=self.heart_rate_source,
            spo2_pct=self.spo2_pct,
            sbp_mmhg=self.sbp_mmhg,
            dbp_mmhg=self.dbp_mmhg,
            map_mmhg=self.map_mmhg,
            resp_rate_per_min=self.resp_rate_per_min,
            etco2_mmhg=self.etco2_mmhg,
            temp_c=self.temp_c,
        )


@dataclass(frozen=True, slots=True)
class MonitorReport:
    """The vital signs of one ORU^R01 (IHE PCD-01) message.

    ``groups`` are ordered by time, one per distinct observation time; ``observations`` are every mapped OBX;
    ``rejected`` lists OBX with a vital-sign code that could not be used; ``control_id`` is MSH-10.
    """

    control_id: str
    message_time: datetime | None
    obx_count: int
    groups: tuple[VitalsGroup, ...]
    observations: tuple[VitalObservation, ...]
    rejected: tuple[ObxRejection, ...]


def _iter_obx_with_obr(message: hl7.Message) -> Iterator[tuple[hl7.Segment | None, hl7.Segment]]:
    obr: hl7.Segment | None = None
    for segment in message:
        name = str(segment[0])
        if name == "OBR":
            obr = segment
        elif name == "OBX":
            yield obr, segment


def _interpret_unit(obx: hl7.Segment) -> tuple[_Conversion | None, str, ObxReason | None]:
    """The quantity and conversion of OBX-6 (CWE: id^text^system^alt id^alt text^alt system)."""
    found: list[_Conversion] = []
    first_id = field_value(obx, 6, 1)
    for id_comp, system_comp in ((1, 3), (4, 6)):
        unit_id = field_value(obx, 6, id_comp)
        system = field_value(obx, 6, system_comp).upper()
        if not unit_id:
            continue
        if system == "MDC" or (not system and unit_id.isascii() and unit_id.isdigit()):
            conversion = _MDC_UNITS.get(unit_id)
        elif system in ("UCUM", ""):
            conversion = _UCUM_UNITS.get(unit_id)
            if conversion is None and _UCUM_PER_MIN.fullmatch(unit_id):
                conversion = (_Quantity.RATE_PER_MIN, _identity)
        else:
            conversion = None
        if conversion is not None:
            found.append(conversion)
    if not found:
        return None, first_id, ObxReason.UNIT_UNKNOWN
    if any(q != found[0][0] or f is not found[0][1] for q, f in found[1:]):
        return None, first_id, ObxReason.UNIT_CONFLICT
    return found[0], first_id, None


def _vital_spec(obx: hl7.Segment) -> tuple[_VitalSpec | None, str]:
    code = field_value(obx, 3, 1)
    system = field_value(obx, 3, 3).upper()
    if system == "MDC":
        return _MDC_VITALS.get(code), f"MDC:{code}"
    if system in ("LN", "LOINC"):
        return _LOINC_VITALS.get(code), f"LN:{code}"
    return None, f"{system}:{code}" if system else code


def _channel(sub_id: str) -> str:
    if _MDC_CONTAINMENT.fullmatch(sub_id):
        return sub_id.rsplit(".", 1)[0]
    return sub_id


def _observation_time(
    obx: hl7.Segment, obr: hl7.Segment | None, header: MessageHeader, received_at: datetime
) -> ObservationTime | None:
    for source, value in (
        (TimeSource.OBX_14, field_value(obx, 14)),
        (TimeSource.OBR_7, field_value(obr, 7) if obr else ""),
    ):
        if value:
            parsed = parse_dtm(value, header.message_time_offset)
            if parsed is None:
                return None
            return ObservationTime(parsed[0], source, parsed[1])
    return ObservationTime(received_at, TimeSource.RECEIVED)


def _map_obx(
    obx: hl7.Segment, obr: hl7.Segment | None, header: MessageHeader, received_at: datetime
) -> VitalObservation | ObxRejection | None:
    spec, code = _vital_spec(obx)
    if spec is None:
        return None  # not a vital sign this adapter maps (containment, QT interval, rhythm, ...)
    set_id = field_value(obx, 1)

    def reject(reason: ObxReason) -> ObxRejection:
        return ObxRejection(set_id=set_id, code=code, reason=reason)

    if field_value(obx, 11).upper() in ("D", "W"):
        return reject(ObxReason.WITHDRAWN)  # HL7 table 0085: deleted / posted in error
    value_text = field_value(obx, 5)
    if not value_text:
        return reject(ObxReason.NO_VALUE)
    if field_value(obx, 2).upper() != "NM" or not _NM.fullmatch(value_text):
        return reject(ObxReason.NOT_NUMERIC)
    conversion, unit_id, unit_problem = _interpret_unit(obx)
    if unit_problem is not None or conversion is None:
        return reject(unit_problem or ObxReason.UNIT_UNKNOWN)
    quantity, convert = conversion
    if quantity is not spec.quantity:
        return reject(ObxReason.UNIT_MISMATCH)
    value = convert(float(value_text))
    low, high = FIELD_RANGES[spec.field]
    if not math.isfinite(value) or not low <= value <= high:
        return reject(ObxReason.OUT_OF_RANGE)
    when = _observation_time(obx, obr, header, received_at)
    if when is None:
        return reject(ObxReason.BAD_TIME)
    sub_id = field_value(obx, 4)
    return VitalObservation(
        field=spec.field,
        value=value,
        set_id=set_id,
        sub_id=sub_id,
        channel=_channel(sub_id),
        code=code,
        source_unit=unit_id,
        time=when,
        heart_rate_source=spec.heart_rate_source,
    )


_BP_FIELDS = (VitalField.SBP_MMHG, VitalField.DBP_MMHG, VitalField.MAP_MMHG)


@dataclass
class _GroupBuilder:
    time: ObservationTime
    values: dict[VitalField, float] = field(default_factory=dict)
    heart_rate_source: HeartRateSource | None = None
    flags: set[QualityFlag] = field(default_factory=set)


def _single_value(items: list[VitalObservation], rejected: list[ObxRejection]) -> float | None:
    values = {o.value for o in items}
    if len(values) == 1:
        return items[0].value
    rejected.extend(ObxRejection(o.set_id, o.code, ObxReason.CONFLICTING_VALUES) for o in items)
    return None


def _build_group(items: list[VitalObservation], rejected: list[ObxRejection]) -> VitalsGroup:
    builder = _GroupBuilder(time=items[0].time)
    by_field: dict[VitalField, list[VitalObservation]] = {}
    for o in items:
        by_field.setdefault(o.field, []).append(o)

    # Blood pressure (FF-18): systolic, diastolic and mean of one channel and one time form one measurement.
    channels: dict[str, list[VitalObservation]] = {}
    for vf in _BP_FIELDS:
        for o in by_field.pop(vf, []):
            channels.setdefault(o.channel, []).append(o)
    complete = [
        ch for ch, obs in channels.items() if {VitalField.SBP_MMHG, VitalField.DBP_MMHG} <= {o.field for o in obs}
    ]
    if len(channels) == 1:
        chosen: str | None = next(iter(channels))
    elif len(complete) == 1:
        chosen = complete[0]
    else:
        chosen = None
    for ch, obs in channels.items():
        if ch != chosen:
            rejected.extend(ObxRejection(o.set_id, o.code, ObxReason.UNPAIRED_PRESSURE) for o in obs)
            continue
        for vf in _BP_FIELDS:
            of_field = [o for o in obs if o.field is vf]
            if of_field and (value := _single_value(of_field, rejected)) is not None:
                builder.values[vf] = value
        if (VitalField.SBP_MMHG in builder.values) != (VitalField.DBP_MMHG in builder.values):
            builder.flags.add(QualityFlag.BP_INCOMPLETE)

    # Heart rate: the ECG-derived rate first, then the oximeter's pulse, then the NIBP cuff's pulse.
    hr_items = by_field.pop(VitalField.HEART_RATE_BPM, [])
    if hr_items:
        best = min(_HR_SOURCE_RANK[o.heart_rate_source or "monitor"] for o in hr_items)
        chosen_hr = [o for o in hr_items if _HR_SOURCE_RANK[o.heart_rate_source or "monitor"] == best]
        if (value := _single_value(chosen_hr, rejected)) is not None:
            builder.values[VitalField.HEART_RATE_BPM] = value
            builder.heart_rate_source = chosen_hr[0].heart_rate_source

    for vf, obs in by_field.items():
        if (value := _single_value(obs, rejected)) is not None:
            builder.values[vf] = value

    if builder.time.offset_assumed:
        builder.flags.add(QualityFlag.TIME_OFFSET_ASSUMED)
    if builder.time.source is TimeSource.RECEIVED:
        builder.flags.add(QualityFlag.TIME_FROM_RECEIPT)
    v = builder.values
    return VitalsGroup(
        measured=builder.time,
        heart_rate_bpm=v.get(VitalField.HEART_RATE_BPM),
        heart_rate_source=builder.heart_rate_source,
        spo2_pct=v.get(VitalField.SPO2_PCT),
        sbp_mmhg=v.get(VitalField.SBP_MMHG),
        dbp_mmhg=v.get(VitalField.DBP_MMHG),
        map_mmhg=v.get(VitalField.MAP_MMHG),
        resp_rate_per_min=v.get(VitalField.RESP_RATE_PER_MIN),
        etco2_mmhg=v.get(VitalField.ETCO2_MMHG),
        temp_c=v.get(VitalField.TEMP_C),
        flags=tuple(sorted(builder.flags)),
    )


def _require(parsed: ParsedMessage, code: str, trigger: str) -> None:
    header = parsed.header
    if header.message_code != code or header.trigger_event != trigger:
        raise Hl7InputError(Hl7Reason.UNSUPPORTED_MESSAGE, f"expected {code}^{trigger}", header.control_id)


def read_monitor_report(parsed: ParsedMessage, received_at: datetime | None = None) -> MonitorReport:
    """Map an ORU^R01 (IHE PCD-01) message's numeric OBX to vital signs.

    Args:
        parsed: from :func:`parse_message`.
        received_at: aware UTC receive time, used (and flagged) when the message has no observation time;
            defaults to now.

    Returns:
        A :class:`MonitorReport`; OBX without a mappable vital-sign code are ignored, those with one but an
        unusable value, unit or time are listed in ``rejected``.

    Raises:
        Hl7InputError: ``unsupported_message`` (not ORU^R01) or ``no_obx`` (no OBX segment at all: AE, FF-09).
    """
    _require(parsed, "ORU", "R01")
    header = parsed.header
    received = received_at or utc_now()
    pairs = list(_iter_obx_with_obr(parsed.message))
    if not pairs:
        raise Hl7InputError(Hl7Reason.NO_OBX, "ORU without OBX", header.control_id)
    observations: list[VitalObservation] = []
    rejected: list[ObxRejection] = []
    for obr, obx in pairs:
        mapped = _map_obx(obx, obr, header, received)
        if isinstance(mapped, VitalObservation):
            observations.append(mapped)
        elif isinstance(mapped, ObxRejection):
            rejected.append(mapped)
    by_time: dict[datetime, list[VitalObservation]] = {}
    for o in observations:
        by_time.setdefault(o.time.at, []).append(o)
    groups = tuple(_build_group(by_time[at], rejected) for at in sorted(by_time))
    return MonitorReport(
        control_id=header.control_id,
        message_time=header.message_time,
        obx_count=len(pairs),
        groups=groups,
        observations=tuple(observations),
        rejected=tuple(rejected),
    )


# --- ORU^R40: alarms ----------------------------------------------------------------------------------------------

_MDC_EVT_ALARM = "196616"
_MDC_PARTITION_EVT = 3
_ALARM_ATTRIBUTES = {
    "68480": "source",  # MDC_ATTR_ALERT_SOURCE
    "68481": "phase",  # MDC_ATTR_EVENT_PHASE
    "68482": "state",  # MDC_ATTR_ALARM_STATE
    "68483": "inactivation_state",  # MDC_ATTR_ALARM_INACTIVATION_STATE
    "68484": "priority",  # MDC_ATTR_ALARM_PRIORITY
    "68485": "alert_type",  # MDC_ATTR_ALERT_TYPE
}
_PRIORITIES = {"PH": Priority.HIGH, "PM": Priority.MEDIUM, "PL": Priority.LOW, "PN": None}


@dataclass(frozen=True, slots=True)
class DeviceAlarm:
    """One alert of an ORU^R40 (IHE PCD-04 Report Alert), one OBR group.

    ``event_code``/``event_ref`` identify the alert (e.g. 196940 ``MDC_EVT_FLUID_LINE_OCCL``); ``alert_id`` is
    OBR-3's entity id, which links the start and end of one alert; ``phase`` (start, continue, end, ...),
    ``state`` (active, inactive, latched), ``inactivation_state`` and ``alert_type`` (SP physiological, ST
    technical, SA advisory) are the PCD-04 attribute values; ``priority`` maps PH/PM/PL to IEC 60601-1-8
    high/medium/low (PN = no priority = ``None``), ``priority_code`` keeps the code.  ``text`` is the device's
    alert text: it may contain patient values, so it is shown on screens but never logged.
    """

    event_code: int
    event_ref: str
    alert_id: str
    time: ObservationTime
    phase: str | None
    state: str | None
    inactivation_state: str | None
    priority: Priority | None
    priority_code: str | None
    alert_type: str | None
    source_code: int | None
    text: str = ""


@dataclass(frozen=True, slots=True)
class AlarmReport:
    """The alerts of one ORU^R40 message; ``control_id`` is MSH-10."""

    control_id: str
    message_time: datetime | None
    alarms: tuple[DeviceAlarm, ...]


def _mdc_int(value: str) -> int | None:
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 9 else None


def _read_alarm_group(
    obr: hl7.Segment, obx_list: list[hl7.Segment], header: MessageHeader, received_at: datetime
) -> DeviceAlarm | None:
    event_code: int | None = None
    event_ref = ""
    text = ""
    attributes: dict[str, str] = {}
    for obx in obx_list:
        code = field_value(obx, 3, 1)
        if code in _ALARM_ATTRIBUTES:
            attributes[_ALARM_ATTRIBUTES[code]] = field_value(obx, 5, 1)
            continue
        number = _mdc_int(code)
        if event_code is not None or number is None or number >> 16 != _MDC_PARTITION_EVT:
            continue
        if code == _MDC_EVT_ALARM and _mdc_int(field_value(obx, 5, 1)) is not None:
            event_code = _mdc_int(field_value(obx, 5, 1))
            event_ref = field_value(obx, 5, 2)
            text = field_value(obx, 5, 9)
        else:
            event_code = number
            event_ref = field_value(obx, 3, 2)
            text = field_value(obx, 5) if field_value(obx, 2).upper() in ("ST", "TX", "FT") else ""
    if event_code is None:
        return None
    obr_time = field_value(obr, 7)
    parsed_time = parse_dtm(obr_time, header.message_time_offset) if obr_time else None
    when = (
        ObservationTime(parsed_time[0], TimeSource.OBR_7, parsed_time[1])
        if parsed_time
        else ObservationTime(received_at, TimeSource.RECEIVED)
    )

    def token(name: str) -> str | None:
        value = attributes.get(name, "")
        return value.lower() if _TOKEN.fullmatch(value) else None

    priority_code = attributes.get("priority", "").upper() or None
    return DeviceAlarm(
        event_code=event_code,
        event_ref=event_ref if _TOKEN.fullmatch(event_ref) else "",
        alert_id=field_value(obr, 3, 1),
        time=when,
        phase=token("phase"),
        state=token("state"),
        inactivation_state=token("inactivation_state"),
        priority=_PRIORITIES.get(priority_code or ""),
        priority_code=priority_code if priority_code in _PRIORITIES else None,
        alert_type=alert_type.upper() if (alert_type := token("alert_type")) else None,
        source_code=_mdc_int(attributes.get("source", "")),
        text=text,
    )


def read_alarm_report(parsed: ParsedMessage, received_at: datetime | None = None) -> AlarmReport:
    """Read the alerts of an ORU^R40 (IHE PCD-04) message: one :class:`DeviceAlarm` per OBR group.

    The event is the group's first OBX whose OBX-3 is an MDC event code (partition 3): either
    ``MDC_EVT_ALARM`` with the specific event in OBX-5 (CWE), or the event code itself in OBX-3.

    Raises:
        Hl7InputError: ``unsupported_message`` (not ORU^R40), ``no_obx``, or ``no_alarm_event`` (no group
            carries an event code).
    """
    _require(parsed, "ORU", "R40")
    header = parsed.header
    received = received_at or utc_now()
    groups: list[tuple[hl7.Segment, list[hl7.Segment]]] = []
    obx_count = 0
    for segment in parsed.message:
        name = str(segment[0])
        if name == "OBR":
            groups.append((segment, []))
        elif name == "OBX":
            obx_count += 1
            if groups:
                groups[-1][1].append(segment)
    if obx_count == 0:
        raise Hl7InputError(Hl7Reason.NO_OBX, "ORU without OBX", header.control_id)
    alarms = [a for obr, obxs in groups if (a := _read_alarm_group(obr, obxs, header, received)) is not None]
    if not alarms:
        raise Hl7InputError(Hl7Reason.NO_ALARM_EVENT, "no OBR group with an MDC event", header.control_id)
    return AlarmReport(control_id=header.control_id, message_time=header.message_time, alarms=tuple(alarms))


# --- the stateful input -------------------------------------------------------------------------------------------

DeviceReport = MonitorReport | AlarmReport


@dataclass(frozen=True, slots=True)
class HandleOutcome:
    """What :meth:`Hl7MonitorInput.handle` did with one message.

    ``ack`` is the response to send (``None`` for an incoming ACK, which is never acknowledged); ``report`` the
    decoded content (``None`` when rejected or a duplicate); ``reason`` why it was rejected.
    """

    ack: str | None
    ack_code: AckCode | None
    report: DeviceReport | None = None
    duplicate: bool = False
    reason: Hl7Reason | None = None
    control_id: str | None = None


class Hl7MonitorInput:
    """The monitor-facing HL7 input: parse, map, de-duplicate, hand over, acknowledge.  Never raises.

    Each message passes one error boundary: a rejected message costs one warning (reason and control id, no
    content), one counted reject and an AE/AR acknowledgement.  A message whose (MSH-3, MSH-10) was already
    accepted with the same content is answered with the same ACK and not handed over again (a resend after a
    lost ACK, FF-08); the same control id with different content is processed and logged as a reused id.

    Args:
        sink: receives each accepted :class:`MonitorReport` / :class:`AlarmReport`; must not block.  If it
            raises, the message is answered AE (so the sender resends) and not remembered as seen.
        application: our HL7 application name for ACKs whose original named no receiver.
        dedup_capacity: how many recent control ids are remembered.
        clock: aware-UTC clock for receive times and ACK timestamps.
    """

    def __init__(
        self,
        sink: Callable[[DeviceReport], None] | None = None,
        *,
        application: str = "GOLDENHOUR",
        dedup_capacity: int = 1024,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.sink = sink
        self.application = application
        self.dedup_capacity = dedup_capacity
        self.clock = clock
        self.rejects = RejectTally()
        self.obx_rejects = RejectTally()
        self.accepted = 0
        self.duplicates = 0
        self._seen: OrderedDict[tuple[str, str], tuple[str, str, AckCode]] = OrderedDict()

    def handle(self, payload: bytes | str, received_at: datetime | None = None) -> HandleOutcome:
        """Process one message payload (MLLP framing removed) and return the outcome with its ACK."""
        now = received_at or self.clock()
        try:
            parsed = parse_message(payload, require_control_id=False)
        except Hl7InputError as exc:
            return self._reject(None, exc, now)
        header = parsed.header
        if header.message_code == "ACK":
            self.rejects.record(Hl7Reason.UNSUPPORTED_MESSAGE)
            logger.info(
                "hl7: ignored an incoming ACK (control id %s); an ACK is never acknowledged",
                loggable(header.control_id, 64),
            )
            return HandleOutcome(
                ack=None, ack_code=None, reason=Hl7Reason.UNSUPPORTED_MESSAGE, control_id=header.control_id
            )
        if not header.control_id:
            return self._reject(header, Hl7InputError(Hl7Reason.NO_CONTROL_ID, "MSH-10 empty"), now)
        key = (header.raw_sending_application, header.control_id)
        digest = hashlib.sha256(parsed.text.encode("utf-8", "surrogatepass")).hexdigest()
        seen = self._seen.get(key)
        if seen is not None:
            if seen[0] == digest:
                self.duplicates += 1
                self._seen.move_to_end(key)
                logger.info(
                    "hl7: duplicate of control id %s answered again, not re-processed", loggable(header.control_id, 64)
                )
                return HandleOutcome(ack=seen[1], ack_code=seen[2], duplicate=True, control_id=header.control_id)
            logger.warning(
                "hl7: control id %s reused with different content; processing it", loggable(header.control_id, 64)
            )
        try:
            report: DeviceReport
            if header.message_code == "ORU" and header.trigger_event == "R01":
                report = read_monitor_report(parsed, now)
                for rejection in report.rejected:
                    self.obx_rejects.record(rejection.reason)
                    logger.warning(
                        "hl7: control id %s OBX %s (%s) not used: %s",
                        loggable(header.control_id, 64),
                        loggable(str(rejection.set_id), 16),
                        loggable(str(rejection.code), 64),
                        rejection.reason.value,
                    )
            elif header.message_code == "ORU" and header.trigger_event == "R40":
                report = read_alarm_report(parsed, now)
            else:
                raise Hl7InputError(Hl7Reason.UNSUPPORTED_MESSAGE, "not ORU^R01 or ORU^R40", header.control_id)
        except Hl7InputError as exc:
            return self._reject(header, exc, now)
        if self.sink is not None:
            try:
                self.sink(report)
            except Exception as exc:  # noqa: BLE001 - error boundary: a failing consumer must not kill the input
                logger.warning(
                    "hl7: sink failed for control id %s (%s)", loggable(header.control_id, 64), type(exc).__name__
                )
                return self._reject(header, Hl7InputError(Hl7Reason.SINK_FAILED, "", header.control_id), now)
        ack = build_ack(header, AckCode.AA, at=now, application=self.application)
        self._seen[key] = (digest, ack, AckCode.AA)
        self._seen.move_to_end(key)
        while len(self._seen) > self.dedup_capacity:
            self._seen.popitem(last=False)
        self.accepted += 1
        return HandleOutcome(ack=ack, ack_code=AckCode.AA, report=report, control_id=header.control_id)

    def _reject(self, header: MessageHeader | None, exc: Hl7InputError, now: datetime) -> HandleOutcome:
        self.rejects.record(exc.reason)
        control_id = header.control_id if header else exc.control_id
        logger.warning("hl7: rejected message (control id %s): %s", loggable(control_id or "-", 64), exc.reason.value)
        code = exc.ack_code
        ack = build_ack(header, code, at=now, reason=exc.reason, application=self.application)
        return HandleOutcome(ack=ack, ack_code=code, reason=exc.reason, control_id=control_id)

    async def __call__(self, payload: bytes) -> bytes | None:
        """The :data:`ambulance_agent.devices.mllp.MllpHandler` form: payload in, ACK bytes out."""
        outcome = self.handle(payload)
        if outcome.ack is None:
            return None
        return outcome.ack.encode("utf-8", "replace")
