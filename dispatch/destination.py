"""Destination engine: which hospital, which teams, which priority.  Pure functions over typed data, no I/O.

Rules (DOMAIN.md section 5):

* STEMI: a 24/7 PCI hospital when first medical contact (FMC) -> device can be <= 120 min (ACC/AHA 2013 STEMI
  guideline; ESC 2017/2023: primary PCI if FMC-to-wire <= 120 min), else the nearest ED for fibrinolysis
  (door-to-needle <= 30 min).  FMC -> device is estimated as (now - FMC) + road ETA + :data:`DOOR_TO_DEVICE_S`
  (the ED-bypass door-to-device time assumed for a pre-alerted cath lab).
* Stroke: a stroke unit; with a suspected large-vessel occlusion (LAMS >= 4; Llanes et al., Prehosp Emerg Care
  2004; Nogueira et al. 2017) a thrombectomy-capable centre when it costs at most
  :data:`THROMBECTOMY_EXTRA_TRANSPORT_S` more than the nearest stroke unit (AHA Mission: Lifeline Stroke EMS
  triage algorithm, 2020: bypass when the extra travel time is <= 15 min).
* Major trauma meeting any ACS 2021 "red" criterion (American College of Surgeons, National Guideline for the
  Field Triage of Injured Patients, 2021): the highest trauma level reachable; otherwise the nearest ED.
* Medical: the nearest ED.

Every hospital needs an ED to be a candidate.  Within the clinical ranking, an ED on diversion or a full ED is
moved down a tier, a busy cath lab costs PCI its top tier; ties go to the shorter road ETA.  Each
:class:`Recommendation` lists the reasons in plain words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from broker_config import CaseType, Department, Findings, Priority, utc_now
from dispatch.hospitals import Hospital, HospitalSnapshot

__all__ = [
    "DOOR_TO_DEVICE_S",
    "FMC_TO_DEVICE_MAX_S",
    "THROMBECTOMY_EXTRA_TRANSPORT_S",
    "Recommendation",
    "TraumaVitals",
    "departments_for",
    "priority_for",
    "rank_destinations",
    "trauma_red_criteria",
]

FMC_TO_DEVICE_MAX_S = 120 * 60
"""Primary PCI is preferred when FMC -> device can be <= 120 min (ACC/AHA 2013; ESC 2017 STEMI guideline)."""
DOOR_TO_DEVICE_S = 30 * 60
"""Assumed door -> device time at a pre-alerted PCI centre with ED bypass (D2B 16-47 min shorter when the ED is
bypassed, SJTREM 2014 doi:10.1186/s13049-014-0067-x; a demo assumption, tune per hospital)."""
THROMBECTOMY_EXTRA_TRANSPORT_S = 15 * 60
"""Extra transport time acceptable to reach a thrombectomy centre instead of the nearest stroke unit."""
LAMS_LVO_THRESHOLD = 4
"""LAMS >= 4 suggests a large-vessel occlusion (DOMAIN.md section 5)."""

_TIER_POINTS = (300.0, 200.0, 100.0, 0.0)


@dataclass(frozen=True, slots=True)
class Recommendation:
    """One ranked destination.

    ``score``: higher is better; ``tier points - ETA in minutes`` (tiers 300/200/100/0 for "meets the pathway",
    "fallback", "demoted", "last resort"), so the order is by tier, then by ETA.  ``eta_s``: road ETA in seconds,
    ``None`` when unknown (no position, or the hospital is off the road network).  ``reasons``: plain words.
    """

    hospital_id: str
    hospital_name: str
    score: float
    eta_s: float | None
    tier: int
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TraumaVitals:
    """Physiology for the ACS 2021 red criteria, all optional: absent = not measured."""

    sbp_mmhg: float | None = None
    heart_rate_bpm: float | None = None
    resp_rate_per_min: float | None = None
    spo2_pct: float | None = None


def trauma_red_criteria(findings: Findings, vitals: TraumaVitals | None = None) -> tuple[str, ...]:
    """The ACS 2021 "red" criteria met, as short labels (empty = none).

    Physiology: motor GCS < 6; RR < 10 or > 29 /min; SpO2 < 90 %; SBP < 70 + 2 x age (age 0-9), SBP < 90 mmHg or
    HR > SBP (10-64, or age unknown), SBP < 110 or HR > SBP (>= 65).  Anatomy is what the crew lists in
    ``findings.trauma_red_criteria`` (penetrating injury, flail chest, pelvic fracture, amputation, tourniquet).
    Source: ACS National Guideline for the Field Triage of Injured Patients (2021); DOMAIN.md section 5.
    """
    met = [f"crew: {c}" for c in findings.trauma_red_criteria]
    if findings.gcs_motor is not None and findings.gcs_motor < 6:
        met.append("motor GCS < 6")
    if vitals is None:
        return tuple(met)
    rr, spo2, sbp, hr = vitals.resp_rate_per_min, vitals.spo2_pct, vitals.sbp_mmhg, vitals.heart_rate_bpm
    if rr is not None and (rr < 10 or rr > 29):
        met.append("RR < 10 or > 29 /min")
    if spo2 is not None and spo2 < 90:
        met.append("SpO2 < 90 %")
    age = findings.age_years
    if sbp is not None:
        if age is not None and age <= 9:
            if sbp < 70 + 2 * age:
                met.append("SBP < 70 + 2 x age")
        else:
            limit = 110 if age is not None and age >= 65 else 90
            if sbp < limit:
                met.append(f"SBP < {limit} mmHg")
            if hr is not None and hr > sbp:
                met.append("HR > SBP")
    return tuple(met)


def _red(findings: Findings, vitals: TraumaVitals | None) -> bool:
    return bool(trauma_red_criteria(findings, vitals))


def priority_for(case_type: CaseType, findings: Findings, vitals: TraumaVitals | None = None) -> Priority:
    """Alert priority: STEMI, stroke and red-criteria trauma are high; other trauma medium; medical low."""
    if case_type in (CaseType.STEMI, CaseType.STROKE):
        return Priority.HIGH
    if case_type is CaseType.TRAUMA:
        return Priority.HIGH if _red(findings, vitals) else Priority.MEDIUM
    return Priority.LOW


def departments_for(
    case_type: CaseType,
    findings: Findings,
    destination: Hospital | None = None,
    vitals: TraumaVitals | None = None,
) -> tuple[Department, ...]:
    """Teams to activate at the destination, most specific first.

    STEMI: cath lab + ED (ED only when the destination has no 24/7 PCI: lysis); stroke: stroke team + CT + ED;
    red-criteria trauma: trauma team + resuscitation room + ED; anything else: ED.
    """
    if case_type is CaseType.STEMI:
        if destination is not None and not destination.capabilities.pci_24_7:
            return (Department.ED,)
        return (Department.CATH_LAB, Department.ED)
    if case_type is CaseType.STROKE:
        return (Department.STROKE_TEAM, Department.CT, Department.ED)
    if case_type is CaseType.TRAUMA and _red(findings, vitals):
        return (Department.TRAUMA_TEAM, Department.RESUS_ROOM, Department.ED)
    return (Department.ED,)


def _minutes(seconds: float) -> str:
    return f"{round(seconds / 60)} min"


def _eta_key(eta_s: float | None) -> float:
    return math.inf if eta_s is None else eta_s


def _nearest(etas: Mapping[str, float | None], ids: Sequence[str]) -> str | None:
    known = [i for i in ids if etas.get(i) is not None]
    return min(known, key=lambda i: _eta_key(etas.get(i))) if known else None


def rank_destinations(
    case_type: CaseType,
    findings: Findings,
    position_deg: tuple[float, float] | None,
    hospitals: Sequence[HospitalSnapshot],
    eta_s_by_hospital: Mapping[str, float | None],
    *,
    now: datetime | None = None,
    vitals: TraumaVitals | None = None,
) -> list[Recommendation]:
    """Rank the hospitals for one patient, best first.

    Args:
        case_type: the pathway of the pre-alert.
        findings: structured findings (FMC time, LAMS, GCS motor, crew-listed trauma criteria).
        position_deg: the unit's (lat, lon), or ``None`` when it has no position (ETAs then unknown).
        hospitals: candidates with their live status; hospitals without an ED are left out.
        eta_s_by_hospital: road ETA in seconds per hospital id (missing or ``None`` = unknown).
        now: the current time (UTC) for the FMC -> device estimate; defaults to the clock.
        vitals: latest physiology for the trauma red criteria, if known.

    Returns:
        One :class:`Recommendation` per hospital with an ED, sorted by tier then ETA (unknown ETAs last).
    """
    now = now or utc_now()
    etas: dict[str, float | None] = {
        s.hospital.hospital_id: (eta_s_by_hospital.get(s.hospital.hospital_id) if position_deg else None)
        for s in hospitals
    }
    candidates = [s for s in hospitals if s.hospital.capabilities.ed]
    tiers: dict[str, int] = {}
    reasons: dict[str, list[str]] = {s.hospital.hospital_id: [] for s in candidates}

    if case_type is CaseType.STEMI:
        elapsed_s = max(0.0, (now - findings.fmc_at).total_seconds()) if findings.fmc_at else 0.0
        pci_ok: list[str] = []
        for s in candidates:
            hid, caps = s.hospital.hospital_id, s.hospital.capabilities
            if not caps.pci_24_7:
                continue
            if s.status.cath_lab_busy:
                reasons[hid].append("24/7 PCI centre, but the cath lab is busy")
                continue
            eta = etas[hid]
            if eta is None:
                pci_ok.append(hid)
                reasons[hid].append("24/7 PCI centre (ETA unknown: FMC -> device not checked)")
                continue
            fmc_to_device_s = elapsed_s + eta + DOOR_TO_DEVICE_S
            if fmc_to_device_s <= FMC_TO_DEVICE_MAX_S:
                pci_ok.append(hid)
                reasons[hid].append(
                    f"24/7 PCI centre: estimated FMC -> device {_minutes(fmc_to_device_s)} <= 120 min (ACC/AHA, ESC)"
                )
            else:
                reasons[hid].append(
                    f"24/7 PCI centre, but estimated FMC -> device {_minutes(fmc_to_device_s)} > 120 min"
                )
        for s in candidates:
            hid = s.hospital.hospital_id
            if hid in pci_ok:
                tiers[hid] = 0
            elif pci_ok:
                tiers[hid] = 2
                reasons[hid].append("no 24/7 PCI available here: not the STEMI pathway")
            else:
                tiers[hid] = 0
                reasons[hid].append("no PCI centre within 120 min FMC -> device: nearest ED for fibrinolysis")

    elif case_type is CaseType.STROKE:
        lvo = findings.lams is not None and findings.lams >= LAMS_LVO_THRESHOLD
        units = [s.hospital.hospital_id for s in candidates if s.hospital.capabilities.stroke_unit]
        nearest_unit = _nearest(etas, units)
        for s in candidates:
            hid, caps = s.hospital.hospital_id, s.hospital.capabilities
            if not caps.stroke_unit:
                tiers[hid] = 2
                reasons[hid].append("no stroke unit")
                continue
            if not lvo:
                tiers[hid] = 0
                reasons[hid].append("stroke unit")
                continue
            eta, base = etas[hid], etas.get(nearest_unit) if nearest_unit else None
            extra_s = None if eta is None or base is None else eta - base
            if caps.thrombectomy and (extra_s is None or extra_s <= THROMBECTOMY_EXTRA_TRANSPORT_S):
                tiers[hid] = 0
                extra = "" if extra_s is None else f", {_minutes(extra_s)} more than the nearest stroke unit"
                reasons[hid].append(f"thrombectomy centre for suspected LVO (LAMS {findings.lams} >= 4){extra}")
            elif caps.thrombectomy:
                tiers[hid] = 1
                reasons[hid].append(
                    f"thrombectomy centre, but {_minutes(extra_s or 0)} more than the nearest stroke unit (> 15 min)"
                )
            else:
                tiers[hid] = 1
                reasons[hid].append(f"stroke unit without thrombectomy (LAMS {findings.lams} >= 4 suggests LVO)")
        if lvo and not any(t == 0 for t in tiers.values()):
            for hid in units:
                tiers[hid] = 0

    elif case_type is CaseType.TRAUMA and _red(findings, vitals):
        met = trauma_red_criteria(findings, vitals)
        levels = [s.hospital.capabilities.trauma_level for s in candidates]
        best = min((lv for lv in levels if lv is not None), default=None)
        for s in candidates:
            hid, level = s.hospital.hospital_id, s.hospital.capabilities.trauma_level
            if level is not None and level == best:
                tiers[hid] = 0
                reasons[hid].append(f"level {level} trauma centre (highest available); ACS red: {', '.join(met)}")
            elif level is not None:
                tiers[hid] = 1
                reasons[hid].append(f"level {level} trauma centre, not the highest available")
            else:
                tiers[hid] = 2
                reasons[hid].append("not a trauma centre")

    else:
        label = "no ACS red criteria: nearest ED" if case_type is CaseType.TRAUMA else "nearest emergency department"
        for s in candidates:
            tiers[s.hospital.hospital_id] = 0
            reasons[s.hospital.hospital_id].append(label)

    out: list[Recommendation] = []
    for s in candidates:
        hid, status = s.hospital.hospital_id, s.status
        tier = tiers[hid]
        if status.diversion:
            tier = min(tier + 2, 3)
            until = f" until {status.until:%H:%M} UTC" if status.until else ""
            reasons[hid].append(f"ED on diversion{until}")
        elif status.ed_beds_free == 0:
            tier = min(tier + 1, 3)
            reasons[hid].append("ED reports no free treatment space")
        eta = etas[hid]
        reasons[hid].append(f"road ETA {_minutes(eta)}" if eta is not None else "road ETA unknown")
        score = _TIER_POINTS[tier] - (min(eta / 60, 99.0) if eta is not None else 99.0)
        out.append(Recommendation(hid, s.hospital.name, round(score, 2), eta, tier, tuple(reasons[hid])))
    out.sort(key=lambda r: (r.tier, _eta_key(r.eta_s), r.hospital_id))
    return out
