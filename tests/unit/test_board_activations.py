"""Activations on the board: per-department acknowledgement, escalation state and count-down, staleness sweep,
gaps, trends, detail view isolation, resync rules (pure state, no sockets)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from broker_config import (
    Activation,
    ActivationState,
    AlertAck,
    AlertState,
    CaseType,
    CrewStatus,
    Department,
    EcgChunk,
    Findings,
    GapRecord,
    GpsFix,
    HospitalAlert,
    Priority,
    Status,
    Vitals,
)
from hospital_board.state import (
    BoardState,
    EventKind,
    NotActivatedError,
    NotInboundError,
    age_s,
)

T0 = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def stemi(seq: int, activations: tuple[Activation, ...], *, state: AlertState = AlertState.SENT) -> HospitalAlert:
    return HospitalAlert(
        unit_id="U1",
        seq=seq,
        sent_at=at(seq),
        alert_id="a1",
        hospital_id="HA",
        case_type=CaseType.STEMI,
        priority=Priority.HIGH,
        eta_at=at(600),
        departments=(Department.CATH_LAB, Department.ED),
        findings=Findings(age_years=64, sex="male", fmc_at=at(-300)),
        state=state,
        activations=activations,
    )


def paged(dept: Department, *, escalate_s: float = 120) -> Activation:
    return Activation(department=dept, paged_at=at(0), escalate_at=at(escalate_s))


def test_escalation_count_down_is_against_server_time_and_escalated_is_plain() -> None:
    board = BoardState()
    board.apply_alert(stemi(0, (paged(Department.CATH_LAB), paged(Department.ED))), at(0))
    view = board.alert("a1", at(30))
    assert [a.escalate_in_s for a in view.activations] == [90, 90]
    assert view.state is AlertState.SENT
    escalated = Activation(
        department=Department.CATH_LAB,
        state=ActivationState.ESCALATED,
        level="backup",
        paged_at=at(0),
        escalate_at=at(240),
    )
    events, _ = board.apply_alert(stemi(1, (escalated, paged(Department.ED)), state=AlertState.ESCALATED), at(121))
    alert = events[0].payload.alert  # type: ignore[attr-defined]
    assert alert.state is AlertState.ESCALATED
    cath = alert.activations[0]
    assert (cath.state, cath.level, cath.escalate_in_s) == (ActivationState.ESCALATED, "backup", 119)
    timeline = [e.kind for e in board.timeline("HA", "U1")]
    assert "cath_lab escalated to backup" in timeline
    assert "first medical contact (crew report)" in timeline
    # an older version arriving late never undoes the escalation
    board.apply_alert(stemi(0, (paged(Department.CATH_LAB), paged(Department.ED))), at(122))
    assert board.alert("a1").activations[0].state is ActivationState.ESCALATED


def test_acknowledge_one_department_then_all_with_local_then_confirmed_state() -> None:
    board = BoardState()
    board.apply_alert(stemi(0, (paged(Department.CATH_LAB), paged(Department.ED))), at(0))
    with pytest.raises(NotActivatedError):
        board.check_ack("a1", "HA", Department.STROKE_TEAM)
    events = board.acknowledge("a1", "HA", "cath_lab", at(10), Department.CATH_LAB)
    alert = events[0].payload.alert  # type: ignore[attr-defined]
    cath, ed = alert.activations
    assert (cath.state, cath.confirmed, cath.acknowledged_by) == (ActivationState.ACKNOWLEDGED, False, "cath_lab")
    assert cath.escalate_in_s is None
    assert ed.state is ActivationState.PAGED
    assert alert.state is not AlertState.ACKNOWLEDGED, "one team of two is not the whole alert"
    assert board.is_acknowledged("a1", Department.CATH_LAB)
    assert not board.is_acknowledged("a1")
    # dispatch confirms (re-publishes with the activation acknowledged)
    confirmed = Activation(
        department=Department.CATH_LAB,
        state=ActivationState.ACKNOWLEDGED,
        paged_at=at(0),
        acknowledged_at=at(10),
        acknowledged_by_role="cath_lab",
    )
    board.apply_alert(stemi(1, (confirmed, paged(Department.ED))), at(11))
    assert board.alert("a1").activations[0].confirmed
    # the rest from a phone, seen on the bus
    ack = AlertAck(
        unit_id="U1", seq=5, sent_at=at(20), alert_id="a1", hospital_id="HA", state=AlertState.ACKNOWLEDGED, at=at(20)
    )
    board.apply_ack(ack, at(20))
    view = board.alert("a1")
    assert view.state is AlertState.ACKNOWLEDGED
    assert view.acknowledged_at == at(20)
    assert board.acknowledge("a1", "HA", "ed_staff", at(21)) == [], "nothing left to acknowledge"


def test_values_turn_stale_within_a_sweep_of_the_limit_and_ecg_silence_is_reported() -> None:
    board = BoardState(stale_after_s=10, ecg_lost_after_s=5)
    board.apply_alert(stemi(0, ()), at(0))
    vitals = Vitals(unit_id="U1", seq=0, sent_at=at(0), measured_at=at(0), heart_rate_bpm=88, spo2_pct=97)
    board.apply_vitals(vitals, at(0))
    chunk = EcgChunk(
        unit_id="U1",
        seq=0,
        sent_at=at(1),
        start_at=at(0),
        fs_hz=250,
        leads=("II",),
        gain_adc_per_mv=200,
        baseline_adc=0,
        samples=np.zeros((1, 250), dtype=np.int16),
    )
    board.apply_ecg(chunk, at(1))
    assert board.sweep(at(5)) == []
    lost = board.sweep(at(6.5))
    assert [e.kind for e in lost] == [EventKind.UNIT]
    assert lost[0].payload.ecg_lost  # type: ignore[attr-defined]
    stale = board.sweep(at(10.5))
    assert [e.kind for e in stale] == [EventKind.VITALS]
    assert stale[0].payload.vitals.heart_rate_bpm.stale  # type: ignore[attr-defined]
    assert board.sweep(at(11)) == [], "pushed once, not every sweep"


def test_age_uses_the_receive_clock_a_device_ahead_cannot_look_fresh_forever() -> None:
    assert age_s(at(0), at(0.5), at(3)) == pytest.approx(3.0)
    # device clock 60 s ahead: measured "in the future"; the age still grows from reception
    assert age_s(at(60), at(0), at(12)) == pytest.approx(12.0)
    # a store-and-forward replay measured long before reception is old
    assert age_s(at(-300), at(0), at(1)) == pytest.approx(301.0)


def test_ecg_sequence_jump_is_a_gap_with_its_time_span_and_the_store_confirms_it() -> None:
    board = BoardState()
    board.apply_alert(stemi(0, ()), at(0))

    def chunk(seq: int) -> EcgChunk:
        return EcgChunk(
            unit_id="U1",
            seq=seq,
            sent_at=at(seq + 1),
            start_at=at(seq),
            fs_hz=250,
            leads=("I", "II", "III"),
            gain_adc_per_mv=200,
            baseline_adc=0,
            samples=np.full((3, 250), 100 * seq, dtype=np.int16),
        )

    board.apply_ecg(chunk(0), at(1))
    events = board.apply_ecg(chunk(3), at(4))
    kinds = [e.kind for e in events]
    assert kinds == [EventKind.GAP, EventKind.ECG, EventKind.ECG_LEADS]
    gap = events[0].payload.gap  # type: ignore[attr-defined]
    assert (gap.from_seq, gap.to_seq, gap.start_at, gap.end_at) == (1, 2, at(1), at(3))
    assert events[1].payload.segment.gap_before  # type: ignore[attr-defined]
    leads = events[2].payload.segment  # type: ignore[attr-defined]
    assert leads.leads == ["I", "II", "III"]
    assert len(leads.samples_mv) == 3
    record = GapRecord(unit_id="U1", seq=0, sent_at=at(4), stream="ecg", from_seq=1, to_seq=2, detected_at=at(4))
    confirmed = board.apply_gap(record, at(4))
    assert confirmed[0].payload.gap.source == "store"  # type: ignore[attr-defined]
    assert board.apply_gap(record, at(5)) == [], "the same gap twice is one gap"
    detail = board.detail("HA", "U1", at(5))
    assert len(detail.gaps) == 1
    assert [s.seq for s in detail.ecg_leads] == [0, 3]


def test_detail_is_only_for_the_hospital_the_unit_is_coming_to() -> None:
    board = BoardState(trend_step_s=2)
    board.apply_alert(stemi(0, ()), at(0))
    for i in range(10):
        v = Vitals(unit_id="U1", seq=i, sent_at=at(i), measured_at=at(i), heart_rate_bpm=80 + i)
        board.apply_vitals(v, at(i))
    board.apply_gps(GpsFix(unit_id="U1", seq=0, sent_at=at(1), fix=False), at(1))
    board.apply_gps(GpsFix(unit_id="U1", seq=1, sent_at=at(2), fix=True, lat_deg=0.0, lon_deg=0.0), at(2))
    fix = GpsFix(unit_id="U1", seq=2, sent_at=at(3), fix=True, lat_deg=43.7375, lon_deg=7.4242)
    board.apply_gps(fix, at(3))
    detail = board.detail("HA", "U1", at(10))
    assert [p.heart_rate_bpm for p in detail.trend] == [80, 82, 84, 86, 88]
    assert [(p.lat_deg, p.lon_deg) for p in detail.trail] == [(43.7375, 7.4242)], "never (0, 0), never no-fix"
    with pytest.raises(NotInboundError):
        board.detail("HB", "U1", at(10))


def test_resync_creates_missing_alerts_but_live_messages_win_and_handover_closes() -> None:
    board = BoardState()
    live = stemi(5, (paged(Department.CATH_LAB),))
    board.apply_alert(live, at(5))
    resynced = stemi(0, ())
    assert board.apply_resync(resynced, at(6)) == ([], False)
    assert board.alert("a1").activations, "the live version (with activations) is kept"
    other = resynced.model_copy(update={"alert_id": "a2", "unit_id": "U2", "state": AlertState.SENT})
    events, needs_receipt = board.apply_resync(other, at(6))
    assert needs_receipt
    assert events[0].payload.alert.resynced  # type: ignore[attr-defined]
    # the next live re-publication replaces the resynced copy even with a lower seq
    board.apply_alert(other.model_copy(update={"seq": 0, "priority": Priority.MEDIUM}), at(7))
    assert not board.alert("a2").resynced
    # a crew that already handed over (retained status, after the alert was raised) closes a resynced alert
    board.apply_status(Status(unit_id="U3", seq=3, sent_at=at(50), status=CrewStatus.HANDED_OVER, at=at(50)), at(50))
    third = resynced.model_copy(update={"alert_id": "a3", "unit_id": "U3"})
    assert board.apply_resync(third, at(60)) == ([], False)
    assert "U3" not in board.inbound_units("HA")
