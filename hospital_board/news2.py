"""NEWS2 sub-scores of the vital signs the ambulance sends, so an abnormal value stands out on the board.

Source: Royal College of Physicians, *National Early Warning Score (NEWS) 2*, 2017, chart 1 (SpO2 scale 1).  Each
physiological parameter scores 0 (normal) to 3; the board shows a value scoring 3 as red and 1-2 as amber, with the
score as text (never colour alone).  The ambulance streams five of NEWS2's seven parameters: respiration rate,
SpO2, systolic blood pressure, pulse and temperature; consciousness (ACVPU) and supplemental oxygen are not in the
stream, so the sum shown is a *partial* NEWS2 and says how many parameters it counts.  SpO2 scale 2 (hypercapnic
respiratory failure) needs a clinician's decision and is not applied.

A score is a prompt for attention, not a diagnosis; stale values are scored too (the board greys them out).
"""

from __future__ import annotations

__all__ = ["news2_pulse", "news2_resp_rate", "news2_spo2", "news2_systolic", "news2_temperature"]


def _band(value: float, bands: tuple[tuple[float, int], ...], top: int) -> int:
    """The score of the first band whose upper bound (inclusive) ``value`` does not exceed, else ``top``."""
    for upper, score in bands:
        if value <= upper:
            return score
    return top


def news2_resp_rate(per_min: float) -> int:
    """Respiration rate /min: <=8 -> 3, 9-11 -> 1, 12-20 -> 0, 21-24 -> 2, >=25 -> 3."""
    return _band(per_min, ((8, 3), (11, 1), (20, 0), (24, 2)), 3)


def news2_spo2(pct: float) -> int:
    """SpO2 % (scale 1): <=91 -> 3, 92-93 -> 2, 94-95 -> 1, >=96 -> 0."""
    return _band(pct, ((91, 3), (93, 2), (95, 1)), 0)


def news2_systolic(mmhg: float) -> int:
    """Systolic blood pressure mm[Hg]: <=90 -> 3, 91-100 -> 2, 101-110 -> 1, 111-219 -> 0, >=220 -> 3."""
    return _band(mmhg, ((90, 3), (100, 2), (110, 1), (219, 0)), 3)


def news2_pulse(per_min: float) -> int:
    """Pulse /min: <=40 -> 3, 41-50 -> 1, 51-90 -> 0, 91-110 -> 1, 111-130 -> 2, >=131 -> 3."""
    return _band(per_min, ((40, 3), (50, 1), (90, 0), (110, 1), (130, 2)), 3)


def news2_temperature(celsius: float) -> int:
    """Temperature Cel: <=35.0 -> 3, 35.1-36.0 -> 1, 36.1-38.0 -> 0, 38.1-39.0 -> 1, >=39.1 -> 2."""
    return _band(celsius, ((35.0, 3), (36.0, 1), (38.0, 0), (39.0, 1)), 2)
