"""NEWS2 sub-scores (Royal College of Physicians, NEWS2 2017, chart 1, SpO2 scale 1) at every band edge, and the
board's vitals carrying them (the new-user trial: a BP of 63/41 looked exactly like a normal one)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker_config import CaseType, Findings, HospitalAlert, Priority, Vitals
from hospital_board.news2 import news2_pulse, news2_resp_rate, news2_spo2, news2_systolic, news2_temperature
from hospital_board.state import BoardState

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("score", "cases"),
    [
        (news2_resp_rate, [(8, 3), (9, 1), (11, 1), (12, 0), (20, 0), (21, 2), (24, 2), (25, 3)]),
        (news2_spo2, [(91, 3), (92, 2), (93, 2), (94, 1), (95, 1), (96, 0), (100, 0)]),
        (news2_systolic, [(90, 3), (91, 2), (100, 2), (101, 1), (110, 1), (111, 0), (219, 0), (220, 3)]),
        (news2_pulse, [(40, 3), (41, 1), (50, 1), (51, 0), (90, 0), (91, 1), (110, 1), (111, 2), (130, 2), (131, 3)]),
        (news2_temperature, [(35.0, 3), (35.1, 1), (36.0, 1), (36.1, 0), (38.0, 0), (38.1, 1), (39.0, 1), (39.1, 2)]),
    ],
)
def test_band_edges(score: object, cases: list[tuple[float, int]]) -> None:
    assert [score(v) for v, _ in cases] == [s for _, s in cases]  # type: ignore[operator]


def test_the_board_scores_each_vital_and_sums_a_partial_news2() -> None:
    board = BoardState()
    board.apply_alert(
        HospitalAlert(unit_id="U3", seq=0, sent_at=T0, alert_id="a1", hospital_id="HA", case_type=CaseType.MEDICAL,
                      priority=Priority.LOW, findings=Findings()),
        T0,
    )  # fmt: skip
    reading = Vitals(unit_id="U3", seq=0, sent_at=T0, measured_at=T0, heart_rate_bpm=118, spo2_pct=78,
                     resp_rate_per_min=37, sbp_mmhg=77, dbp_mmhg=37, etco2_mmhg=30)  # fmt: skip
    board.apply_vitals(reading, T0 + timedelta(seconds=1))
    vitals = board.snapshot("HA", T0 + timedelta(seconds=2)).cards[0].vitals
    assert (vitals.heart_rate_bpm.news2, vitals.spo2_pct.news2, vitals.resp_rate_per_min.news2) == (2, 3, 3)  # type: ignore[union-attr]
    assert vitals.nibp is not None
    assert vitals.nibp.news2 == 3
    assert vitals.etco2_mmhg.news2 is None  # type: ignore[union-attr]  # not a NEWS2 parameter
    assert (vitals.news2_partial, vitals.news2_parameters) == (11, 4)
