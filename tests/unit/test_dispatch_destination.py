"""Destination engine: table-driven cases with the right answers written out (DOMAIN.md section 5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from broker_config import CaseType, Department, Findings, Priority
from dispatch.destination import (
    TraumaVitals,
    departments_for,
    priority_for,
    rank_destinations,
    trauma_red_criteria,
)
from dispatch.hospitals import Capabilities, Hospital, HospitalSnapshot, HospitalStatus

NOW = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)
POS = (43.73, 7.41)
MIN = 60.0

# A small synthetic region: NEAR is the nearest ED (no PCI), PCI the only 24/7 cath lab,
# STROKE a stroke unit without thrombectomy, NEURO a thrombectomy centre, TRAUMA1 the level-1 centre.
HOSPITALS = {
    "NEAR": Hospital("NEAR", "Near ED", 0, 0, Capabilities(ed=True, trauma_level=3)),
    "PCI": Hospital("PCI", "PCI centre", 0, 0, Capabilities(ed=True, pci_24_7=True)),
    "STROKE": Hospital("STROKE", "Stroke unit", 0, 0, Capabilities(ed=True, stroke_unit=True)),
    "NEURO": Hospital("NEURO", "Neuro centre", 0, 0, Capabilities(ed=True, stroke_unit=True, thrombectomy=True)),
    "TRAUMA1": Hospital("TRAUMA1", "Level 1", 0, 0, Capabilities(ed=True, trauma_level=1)),
    "NOED": Hospital("NOED", "Rehab", 0, 0, Capabilities(ed=False, pci_24_7=True, trauma_level=1)),
}
ETAS = {"NEAR": 3 * MIN, "PCI": 12 * MIN, "STROKE": 8 * MIN, "NEURO": 18 * MIN, "TRAUMA1": 20 * MIN, "NOED": 1 * MIN}


@dataclass
class Case:
    name: str
    case_type: CaseType
    findings: Findings
    expected_first: str
    etas: dict[str, float | None] = field(default_factory=lambda: dict(ETAS))
    status: dict[str, HospitalStatus] = field(default_factory=dict)
    reason_contains: str = ""
    position: tuple[float, float] | None = POS


CASES = [
    Case(
        "stemi goes to PCI though another ED is nearer",
        CaseType.STEMI,
        Findings(fmc_at=NOW - timedelta(minutes=10)),
        "PCI",
        reason_contains="FMC -> device 52 min <= 120 min",
    ),
    Case(
        "stemi beyond 120 min FMC->device goes to nearest ED for lysis",
        CaseType.STEMI,
        Findings(fmc_at=NOW - timedelta(minutes=85)),
        "NEAR",
        reason_contains="fibrinolysis",
    ),
    Case(
        "stemi with the cath lab busy goes to the nearest ED",
        CaseType.STEMI,
        Findings(fmc_at=NOW),
        "NEAR",
        status={"PCI": HospitalStatus(cath_lab_busy=True)},
        reason_contains="fibrinolysis",
    ),
    Case(
        "stemi without FMC time counts from now",
        CaseType.STEMI,
        Findings(),
        "PCI",
    ),
    Case(
        "stroke without LVO goes to the nearest stroke unit",
        CaseType.STROKE,
        Findings(lams=2),
        "STROKE",
        reason_contains="stroke unit",
    ),
    Case(
        "stroke LAMS 4 goes to thrombectomy when only 10 min more",
        CaseType.STROKE,
        Findings(lams=4),
        "NEURO",
        reason_contains="LAMS 4 >= 4",
    ),
    Case(
        "stroke LAMS 5 stays at the stroke unit when thrombectomy is 25 min more",
        CaseType.STROKE,
        Findings(lams=5),
        "STROKE",
        etas={**ETAS, "NEURO": 33 * MIN},
    ),
    Case(
        "trauma with motor GCS 4 goes to the level 1 centre",
        CaseType.TRAUMA,
        Findings(gcs_motor=4),
        "TRAUMA1",
        reason_contains="motor GCS < 6",
    ),
    Case(
        "trauma with a crew-listed penetrating torso injury goes to the level 1 centre",
        CaseType.TRAUMA,
        Findings(trauma_red_criteria=("penetrating torso",)),
        "TRAUMA1",
    ),
    Case(
        "trauma without red criteria goes to the nearest ED",
        CaseType.TRAUMA,
        Findings(gcs_motor=6),
        "NEAR",
        reason_contains="no ACS red criteria",
    ),
    Case("medical goes to the nearest ED", CaseType.MEDICAL, Findings(), "NEAR"),
    Case(
        "medical skips the nearest ED on diversion",
        CaseType.MEDICAL,
        Findings(),
        "STROKE",
        status={"NEAR": HospitalStatus(diversion=True, until=NOW + timedelta(hours=1))},
    ),
    Case(
        "medical skips a full ED",
        CaseType.MEDICAL,
        Findings(),
        "STROKE",
        status={"NEAR": HospitalStatus(ed_beds_free=0)},
    ),
    Case(
        "no position: ETAs unknown, PCI still first for STEMI",
        CaseType.STEMI,
        Findings(),
        "PCI",
        position=None,
        reason_contains="ETA unknown",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rank_destinations(case: Case) -> None:
    snapshots = [HospitalSnapshot(h, case.status.get(hid, HospitalStatus())) for hid, h in HOSPITALS.items()]
    ranking = rank_destinations(case.case_type, case.findings, case.position, snapshots, case.etas, now=NOW)
    assert ranking[0].hospital_id == case.expected_first
    assert "NOED" not in {r.hospital_id for r in ranking}, "a hospital without an ED is never a destination"
    assert [r.score for r in ranking] == sorted((r.score for r in ranking), reverse=True)
    if case.reason_contains:
        assert any(case.reason_contains in reason for reason in ranking[0].reasons), ranking[0].reasons
    assert all(r.reasons for r in ranking)


def test_diversion_reason_says_until_when() -> None:
    status = {"NEAR": HospitalStatus(diversion=True, until=NOW + timedelta(hours=1))}
    snapshots = [HospitalSnapshot(h, status.get(hid, HospitalStatus())) for hid, h in HOSPITALS.items()]
    ranking = rank_destinations(CaseType.MEDICAL, Findings(), POS, snapshots, ETAS, now=NOW)
    near = next(r for r in ranking if r.hospital_id == "NEAR")
    assert "ED on diversion until 10:30 UTC" in near.reasons


@pytest.mark.parametrize(
    ("age", "vitals", "expected"),
    [
        (5, TraumaVitals(sbp_mmhg=75), ("SBP < 70 + 2 x age",)),  # 70 + 10 = 80
        (5, TraumaVitals(sbp_mmhg=85), ()),
        (40, TraumaVitals(sbp_mmhg=85), ("SBP < 90 mmHg",)),
        (40, TraumaVitals(sbp_mmhg=100, heart_rate_bpm=120), ("HR > SBP",)),
        (40, TraumaVitals(sbp_mmhg=100, heart_rate_bpm=80), ()),
        (70, TraumaVitals(sbp_mmhg=105), ("SBP < 110 mmHg",)),
        (None, TraumaVitals(resp_rate_per_min=8), ("RR < 10 or > 29 /min",)),
        (None, TraumaVitals(resp_rate_per_min=30), ("RR < 10 or > 29 /min",)),
        (None, TraumaVitals(resp_rate_per_min=29, spo2_pct=89), ("SpO2 < 90 %",)),
        (None, None, ()),
    ],
)
def test_acs_2021_red_physiology(age: int | None, vitals: TraumaVitals | None, expected: tuple[str, ...]) -> None:
    assert trauma_red_criteria(Findings(age_years=age), vitals) == expected


@pytest.mark.parametrize(
    ("case_type", "findings", "priority", "departments"),
    [
        (CaseType.STEMI, Findings(), Priority.HIGH, (Department.CATH_LAB, Department.ED)),
        (CaseType.STROKE, Findings(), Priority.HIGH, (Department.STROKE_TEAM, Department.CT, Department.ED)),
        (
            CaseType.TRAUMA,
            Findings(gcs_motor=5),
            Priority.HIGH,
            (Department.TRAUMA_TEAM, Department.RESUS_ROOM, Department.ED),
        ),
        (CaseType.TRAUMA, Findings(), Priority.MEDIUM, (Department.ED,)),
        (CaseType.MEDICAL, Findings(), Priority.LOW, (Department.ED,)),
    ],
)
def test_priority_and_departments(
    case_type: CaseType, findings: Findings, priority: Priority, departments: tuple[Department, ...]
) -> None:
    assert priority_for(case_type, findings) is priority
    assert departments_for(case_type, findings) == departments


def test_stemi_to_a_hospital_without_pci_activates_the_ed_only() -> None:
    assert departments_for(CaseType.STEMI, Findings(), HOSPITALS["NEAR"]) == (Department.ED,)
