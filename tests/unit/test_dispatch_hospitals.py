"""Hospital registry: table-driven cleaning of the real OSM tagging noise, capabilities merge, live status."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dispatch.errors import RegistryError, UnknownHospitalError
from dispatch.hospitals import (
    CLEANING_RULES,
    DATA_DIR,
    HospitalRegistry,
    clean_osm_hospitals,
    read_osm_hospitals,
)

T0 = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("csv_name", "kept", "dropped"),
    [
        (
            "monaco_hospitals.csv",
            {"node/25237989", "node/1794111144", "node/2169430533"},
            {"pharmacy": ["node/2287695176"], "emergency_no": ["node/280488322"]},
        ),
        (
            "baltimore_hospitals.csv",
            {"way/85609491", "way/113103986", "node/358248701", "node/358249585"},
            {
                "historical": ["node/358245093"],
                "outpatient": ["node/1682114014", "node/3327247438"],
                "named_duplicate": ["node/2670282444"],
                "unnamed_duplicate": ["way/167644847", "way/167644853"],
            },
        ),
    ],
)
def test_cleaning_drops_each_kind_of_noise_with_its_rule(
    csv_name: str, kept: set[str], dropped: dict[str, list[str]]
) -> None:
    report = clean_osm_hospitals(read_osm_hospitals(DATA_DIR / csv_name))
    assert {r.osm_ref for r in report.kept} == kept
    assert {k: sorted(v) for k, v in report.dropped_by_rule().items()} == {k: sorted(v) for k, v in dropped.items()}
    for _row, rule in report.dropped:
        assert rule.reason  # every drop is explained


def test_every_rule_has_an_id_and_a_reason() -> None:
    ids = [r.rule_id for r in CLEANING_RULES]
    assert len(ids) == len(set(ids))
    assert all(r.reason for r in CLEANING_RULES)


def test_monaco_registry_has_two_eds_and_exactly_one_pci_and_names_chpg() -> None:
    registry = HospitalRegistry.load()
    hospitals = {h.hospital_id: h for h in registry.hospitals()}
    assert hospitals["MC-CHPG"].osm_ref == "node/25237989"
    assert hospitals["MC-CHPG"].name == "Centre Hospitalier Princesse Grace"
    assert sum(h.capabilities.ed for h in hospitals.values()) >= 2
    assert [h.hospital_id for h in hospitals.values() if h.capabilities.pci_24_7] == ["MC-CCM"]


def test_capabilities_file_says_it_holds_demo_assumptions() -> None:
    doc = json.loads((DATA_DIR / "hospital_capabilities.json").read_text(encoding="utf-8"))
    assert "DEMO ASSUMPTIONS" in doc["note"]


def test_both_regions_load_together() -> None:
    registry = HospitalRegistry.load((DATA_DIR / "monaco_hospitals.csv", DATA_DIR / "baltimore_hospitals.csv"))
    assert {"MC-CHPG", "BA-JHH", "BA-JHBMC"} <= {h.hospital_id for h in registry.hospitals()}


def test_kept_hospital_without_capabilities_is_an_error(tmp_path: Path) -> None:
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"note": "x", "hospitals": []}), encoding="utf-8")
    with pytest.raises(RegistryError) as info:
        HospitalRegistry.load(capabilities_path=caps)
    assert "no capabilities" in info.value.reason


def test_csv_without_coordinates_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "h.csv"
    bad.write_text("osm_id,name,lat,lon\nn1,X,notanumber,7.4\n", encoding="utf-8")
    with pytest.raises(RegistryError):
        read_osm_hospitals(bad)


def test_status_change_records_who_and_lapses_after_until() -> None:
    registry = HospitalRegistry.load()
    new = registry.set_status("MC-CHPG", by="charge nurse", at=T0, diversion=True, until=T0 + timedelta(hours=1))
    assert new.diversion
    assert new.set_by == "charge nurse"
    assert new.set_at == T0
    assert registry.status("MC-CHPG", T0 + timedelta(minutes=59)).diversion
    assert not registry.status("MC-CHPG", T0 + timedelta(hours=1)).diversion
    # a partial change keeps the other fields
    registry.set_status("MC-CCM", by="cath lab", at=T0, cath_lab_busy=True)
    after = registry.set_status("MC-CCM", by="ed", at=T0, ed_beds_free=3)
    assert after.cath_lab_busy
    assert after.ed_beds_free == 3


def test_unknown_hospital_raises() -> None:
    registry = HospitalRegistry.load()
    with pytest.raises(UnknownHospitalError):
        registry.set_status("XX-NONE", by="x", at=T0, diversion=True)
    with pytest.raises(UnknownHospitalError):
        registry.get("XX-NONE")
