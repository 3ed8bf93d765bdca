"""The case timeline: time points with their source, ordering checks, intervals and compliance.  Pure, no I/O.

Time points (DOMAIN.md section 3) are the NEMSIS v3.5 eTimes (``.01`` call received (PSAP), ``.02`` dispatch
notified, ``.03`` unit notified, ``.05`` en route, ``.06`` on scene, ``.07`` at patient = first medical contact
(FMC), ``.09`` left scene, ``.11`` at destination, ``.12`` transfer of care, ``.13`` back in service) plus the
chest-pain-centre and stroke registry points (first ECG, ECG transmitted, pre-alert sent, cath lab activated /
acknowledged, hospital door, device = wire crossing or balloon, needle, CT start).  Each event carries its source:
device, geofence, crew tap, hospital, dispatch or inferred.

Ordering: NEMSIS defines ordering rules between eTimes (each later eTime is not earlier than the one before, e.g.
.06 on scene >= .05 en route); :data:`ORDER_RULES` holds them, plus the pathway rules (FMC <= first ECG, door <=
device...), as data.  An automatic event that breaks one is kept and flagged (a data-quality flag); a person
posting one through the API is refused.

Intervals and targets (DOMAIN.md section 4): :data:`INTERVALS`.  Where several events record one time point the
earliest counts.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from broker_config import CaseType
from dispatch.errors import TimelineOrderError

__all__ = [
    "CASE_CSV_COLUMNS",
    "INTERVALS",
    "NEMSIS_ETIMES",
    "ORDER_RULES",
    "CaseEvent",
    "CaseSummary",
    "Interval",
    "IntervalResult",
    "IntervalSummary",
    "TimePoint",
    "TimeSource",
    "HOSPITAL_POINTS",
    "append_event",
    "case_csv",
    "compute_intervals",
    "first_times",
    "order_violations",
    "summarise",
]


class TimePoint(StrEnum):
    """A time point of a case (see the module docstring for the NEMSIS eTimes numbers)."""

    CALL_RECEIVED = "call_received"
    DISPATCH_NOTIFIED = "dispatch_notified"
    UNIT_NOTIFIED = "unit_notified"
    EN_ROUTE = "en_route"
    ON_SCENE = "on_scene"
    PATIENT_CONTACT = "patient_contact"
    LEFT_SCENE = "left_scene"
    AT_DESTINATION = "at_destination"
    TRANSFER_OF_CARE = "transfer_of_care"
    BACK_IN_SERVICE = "back_in_service"
    FIRST_ECG = "first_ecg"
    ECG_TRANSMITTED = "ecg_transmitted"
    PREALERT_SENT = "prealert_sent"
    CATH_LAB_ACTIVATED = "cath_lab_activated"
    CATH_LAB_ACKNOWLEDGED = "cath_lab_acknowledged"
    HOSPITAL_DOOR = "hospital_door"
    DEVICE = "device"
    NEEDLE = "needle"
    CT_START = "ct_start"


class TimeSource(StrEnum):
    """Where a time point came from (DOMAIN.md section 3)."""

    DEVICE = "device"
    GEOFENCE = "geofence"
    CREW = "crew"
    HOSPITAL = "hospital"
    DISPATCH = "dispatch"
    INFERRED = "inferred"


NEMSIS_ETIMES: dict[TimePoint, str] = {
    TimePoint.CALL_RECEIVED: "eTimes.01",
    TimePoint.DISPATCH_NOTIFIED: "eTimes.02",
    TimePoint.UNIT_NOTIFIED: "eTimes.03",
    TimePoint.EN_ROUTE: "eTimes.05",
    TimePoint.ON_SCENE: "eTimes.06",
    TimePoint.PATIENT_CONTACT: "eTimes.07",
    TimePoint.LEFT_SCENE: "eTimes.09",
    TimePoint.AT_DESTINATION: "eTimes.11",
    TimePoint.TRANSFER_OF_CARE: "eTimes.12",
    TimePoint.BACK_IN_SERVICE: "eTimes.13",
}
"""NEMSIS v3.5 element of each EMS time point."""

_ETIMES_CHAIN = tuple(NEMSIS_ETIMES)

ORDER_RULES: tuple[tuple[TimePoint, TimePoint], ...] = (
    *((a, b) for i, a in enumerate(_ETIMES_CHAIN) for b in _ETIMES_CHAIN[i + 1 :]),
    (TimePoint.CALL_RECEIVED, TimePoint.FIRST_ECG),
    (TimePoint.PATIENT_CONTACT, TimePoint.FIRST_ECG),
    (TimePoint.FIRST_ECG, TimePoint.ECG_TRANSMITTED),
    (TimePoint.CALL_RECEIVED, TimePoint.PREALERT_SENT),
    (TimePoint.CATH_LAB_ACTIVATED, TimePoint.CATH_LAB_ACKNOWLEDGED),
    (TimePoint.CALL_RECEIVED, TimePoint.HOSPITAL_DOOR),
    (TimePoint.HOSPITAL_DOOR, TimePoint.DEVICE),
    (TimePoint.PATIENT_CONTACT, TimePoint.DEVICE),
    (TimePoint.HOSPITAL_DOOR, TimePoint.NEEDLE),
    (TimePoint.HOSPITAL_DOOR, TimePoint.CT_START),
    (TimePoint.CT_START, TimePoint.NEEDLE),
)
"""``(earlier, later)``: ``later`` must not be before ``earlier``.  The eTimes chain follows the NEMSIS v3.5
ordering rules (each eTime >= the ones before it); the others follow from the pathway (an ECG needs a patient,
a device time needs a door, stroke lysis needs imaging first)."""


@dataclass(frozen=True, slots=True)
class CaseEvent:
    """One time point of a case: when it happened (UTC), its source, when it was recorded, and quality flags.

    ``clock_offset_s``: the source's clock minus dispatch's clock, when known (device clocks drift).
    ``flags``: data-quality flags such as ``order: on_scene before en_route``; empty for a clean event.
    ``detail``: ids only (never health data).
    """

    point: TimePoint
    at: datetime
    source: TimeSource
    recorded_at: datetime
    detail: str = ""
    clock_offset_s: float | None = None
    flags: tuple[str, ...] = ()


def first_times(events: Iterable[CaseEvent]) -> dict[TimePoint, datetime]:
    """The earliest time of each recorded point."""
    out: dict[TimePoint, datetime] = {}
    for e in events:
        if e.point not in out or e.at < out[e.point]:
            out[e.point] = e.at
    return out


def order_violations(events: Sequence[CaseEvent], point: TimePoint, at: datetime) -> list[str]:
    """Which :data:`ORDER_RULES` a new ``point`` at ``at`` would break against ``events``, in plain words."""
    times = first_times(events)
    out: list[str] = []
    for earlier, later in ORDER_RULES:
        if point is later and earlier in times and at < times[earlier]:
            out.append(f"{_label(point)} before {_label(earlier)}")
        elif point is earlier and later in times and times[later] < at:
            out.append(f"{_label(point)} after {_label(later)}")
    return out


HOSPITAL_POINTS: frozenset[TimePoint] = frozenset(
    {TimePoint.HOSPITAL_DOOR, TimePoint.DEVICE, TimePoint.NEEDLE, TimePoint.CT_START}
)
"""Time points a hospital reports through the API (door, device = wire crossing / balloon, needle, CT start)."""


def append_event(
    events: list[CaseEvent],
    point: TimePoint,
    at: datetime,
    source: TimeSource,
    recorded_at: datetime,
    *,
    detail: str = "",
    clock_offset_s: float | None = None,
    strict: bool = False,
    against: Sequence[CaseEvent] | None = None,
) -> CaseEvent | None:
    """Append one time point to ``events`` (in place) after checking :data:`ORDER_RULES`.

    A repeat of the same point from the same source at the same time (a retained message delivered again) is
    ignored and None returned.  An order violation is kept as a data-quality flag (``order: ...``) on the new
    event, or, with ``strict`` (a person posting it), refused.  ``against`` (default: ``events``) is the set the
    rules are checked on: per-unit points of a re-assigned case are checked against that unit's events only.

    Raises:
        TimelineOrderError: ``strict`` and the point breaks an ordering rule; ``violations`` says which.
    """
    if any(e.point is point and e.source is source and e.at == at for e in events):
        return None
    violations = order_violations(events if against is None else against, point, at)
    if violations and strict:
        raise TimelineOrderError(violations)
    event = CaseEvent(
        point, at, source, recorded_at, detail[:200], clock_offset_s, tuple(f"order: {v}" for v in violations)
    )
    events.append(event)
    return event


def _label(point: TimePoint) -> str:
    code = NEMSIS_ETIMES.get(point)
    return f"{point.value} ({code})" if code else point.value


@dataclass(frozen=True, slots=True)
class Interval:
    """A measured interval between two time points with its target (inclusive) and source."""

    name: str
    start: TimePoint
    end: TimePoint
    target_s: float
    case_types: frozenset[CaseType]
    source: str


_STEMI = frozenset({CaseType.STEMI})
INTERVALS: tuple[Interval, ...] = (
    Interval("fmc_to_ecg", TimePoint.PATIENT_CONTACT, TimePoint.FIRST_ECG, 10 * 60, _STEMI, "ESC / ACC-AHA STEMI"),
    Interval(
        "fmc_to_device", TimePoint.PATIENT_CONTACT, TimePoint.DEVICE, 90 * 60, _STEMI, "ACC/AHA; ESC (PCI hospital)"
    ),
    Interval("door_to_balloon", TimePoint.HOSPITAL_DOOR, TimePoint.DEVICE, 90 * 60, _STEMI, "ACC/AHA; ESC; China CPC"),
    Interval("door_to_needle_stemi", TimePoint.HOSPITAL_DOOR, TimePoint.NEEDLE, 30 * 60, _STEMI, "ACC/AHA lysis"),
    Interval(
        "door_to_needle_stroke",
        TimePoint.HOSPITAL_DOOR,
        TimePoint.NEEDLE,
        60 * 60,
        frozenset({CaseType.STROKE}),
        "AHA/ASA (goal 45, ideal 30 min)",
    ),
    Interval(
        "door_to_ct", TimePoint.HOSPITAL_DOOR, TimePoint.CT_START, 25 * 60, frozenset({CaseType.STROKE}), "AHA/ASA"
    ),
    Interval(
        "cath_lab_activation",
        TimePoint.CATH_LAB_ACTIVATED,
        TimePoint.CATH_LAB_ACKNOWLEDGED,
        30 * 60,
        _STEMI,
        "China CPC (< 30 min; activation -> team acknowledgement as the measurable proxy)",
    ),
)
"""The intervals reported (DOMAIN.md section 4): name, from, to, target in seconds, pathways, source."""


@dataclass(frozen=True, slots=True)
class IntervalResult:
    """One interval of one case: seconds (None = a point missing) and compliance (None = not measurable)."""

    name: str
    seconds: float | None
    target_s: float
    compliant: bool | None
    source: str


def compute_intervals(case_type: CaseType | None, events: Iterable[CaseEvent]) -> list[IntervalResult]:
    """Every interval of :data:`INTERVALS` that applies to ``case_type``, measured on the earliest times."""
    times = first_times(events)
    out: list[IntervalResult] = []
    for iv in INTERVALS:
        if case_type not in iv.case_types:
            continue
        start, end = times.get(iv.start), times.get(iv.end)
        seconds = (end - start).total_seconds() if start is not None and end is not None else None
        out.append(
            IntervalResult(
                iv.name, seconds, iv.target_s, None if seconds is None else seconds <= iv.target_s, iv.source
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class CaseSummary:
    """What the report needs from one case."""

    incident_id: str
    case_type: CaseType | None
    events: tuple[CaseEvent, ...]


@dataclass(frozen=True, slots=True)
class IntervalSummary:
    """One interval over many cases: how many measured, the median (s), the share meeting the target (%)."""

    name: str
    target_s: float
    n_cases: int
    median_s: float | None
    compliance_pct: float | None
    source: str


def summarise(cases: Iterable[CaseSummary]) -> list[IntervalSummary]:
    """Median and compliance % per interval over ``cases`` (intervals without any measurement report n = 0)."""
    values: dict[str, list[float]] = {iv.name: [] for iv in INTERVALS}
    for case in cases:
        for result in compute_intervals(case.case_type, case.events):
            if result.seconds is not None:
                values[result.name].append(result.seconds)
    out: list[IntervalSummary] = []
    for iv in INTERVALS:
        v = values[iv.name]
        met = sum(1 for s in v if s <= iv.target_s)
        out.append(
            IntervalSummary(
                iv.name,
                iv.target_s,
                len(v),
                statistics.median(v) if v else None,
                round(100 * met / len(v), 1) if v else None,
                iv.source,
            )
        )
    return out


CASE_CSV_COLUMNS: tuple[str, ...] = (
    "incident_id",
    "case_type",
    *(p.value for p in TimePoint),
    *(f"{iv.name}_s" for iv in INTERVALS),
    "quality_flags",
)
"""Columns of the per-case CSV export: ids, every time point (ISO 8601 UTC), every interval (s), flags."""


def case_csv(cases: Iterable[CaseSummary]) -> str:
    """One CSV row per case (:data:`CASE_CSV_COLUMNS`); empty cells for points or intervals not recorded."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CASE_CSV_COLUMNS)
    for case in cases:
        times = first_times(case.events)
        results = {r.name: r.seconds for r in compute_intervals(case.case_type, case.events)}
        flags = sorted({f for e in case.events for f in e.flags})
        writer.writerow(
            [
                case.incident_id,
                case.case_type.value if case.case_type else "",
                *(times[p].isoformat() if p in times else "" for p in TimePoint),
                *("" if results.get(iv.name) is None else f"{results[iv.name]:.0f}" for iv in INTERVALS),
                "; ".join(flags),
            ]
        )
    return buffer.getvalue()
