"""Terminology for vital signs: LOINC, IEEE 11073-10101 MDC and UCUM, one row per vitals field.

Sources: LOINC 2.77 (loinc.org); IEEE 11073-10101 nomenclature as used in IHE PCD-01 (Rosetta terminology
mapping); UCUM units fixed by the FHIR R4 vital-signs profiles (``/min`` not ``{Beats}/min``, FF-17).
DOMAIN.md section 7 lists the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["VITAL_CODES", "VitalCode", "code_for_field"]


@dataclass(frozen=True, slots=True)
class VitalCode:
    """How one vitals field is coded in storage and exports."""

    field: str
    loinc: str
    mdc_code: int | None
    mdc_ref: str | None
    ucum: str
    display: str


VITAL_CODES: tuple[VitalCode, ...] = (
    VitalCode("heart_rate_bpm", "8867-4", 147842, "MDC_ECG_HEART_RATE", "/min", "Heart rate"),
    VitalCode("spo2_pct", "59408-5", 150456, "MDC_PULS_OXIM_SAT_O2", "%", "Oxygen saturation by pulse oximetry"),
    VitalCode("sbp_mmhg", "8480-6", 150021, "MDC_PRESS_BLD_NONINV_SYS", "mm[Hg]", "Systolic blood pressure"),
    VitalCode("dbp_mmhg", "8462-4", 150022, "MDC_PRESS_BLD_NONINV_DIA", "mm[Hg]", "Diastolic blood pressure"),
    VitalCode("map_mmhg", "8478-0", 150023, "MDC_PRESS_BLD_NONINV_MEAN", "mm[Hg]", "Mean blood pressure"),
    VitalCode("resp_rate_per_min", "9279-1", 151562, "MDC_RESP_RATE", "/min", "Respiratory rate"),
    VitalCode("etco2_mmhg", "19889-5", 151708, "MDC_AWAY_CO2_ET", "mm[Hg]", "End-tidal CO2"),
    VitalCode("temp_c", "8310-5", 150364, "MDC_TEMP_BODY", "Cel", "Body temperature"),
)

_BY_FIELD = {c.field: c for c in VITAL_CODES}


def code_for_field(field: str) -> VitalCode:
    """The coding of a :class:`broker_config.payloads.Vitals` field.  Raises KeyError for an unknown field."""
    return _BY_FIELD[field]
