"""Pure board state: ordering, isolation per hospital, staleness, positions, ECG ring, alert lifecycle."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import wfdb

from broker_config import (
    Activation,
    ActivationState,
    AlertAck,
    AlertState,
    Availability,
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
    ecg_to_mv,
)
from hospital_board.state import (
    AlertClosedError,
    AlertEvent,
    BoardState,
    EcgEvent,
    EcgLeadsEvent,
    EventKind,
    RemovedEvent,
    UnknownAlertError,
    VitalsEvent,
    WrongHospitalError,
)

MITDB = Path(__file__).resolve().parents[2] / "simulators" / "data" / "mitdb"
NUMERICS = Path(__file__).resolve().parents[2] / "simulators" / "data" / "mimic2wdb_numerics"
T0 = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def alert(
    alert_id: str,
    unit_id: str,
    hospital_id: str = "HA",
    *,
    priority: Priority = Priority.HIGH,
    eta_s: float | None = 600,
    state: AlertState = AlertState.SENT,
    sent_s: float = 0,
    note: str = "",
    seq: int = 0,
) -> HospitalAlert:
    return HospitalAlert(
        unit_id=unit_id,
        seq=seq,
        sent_at=at(sent_s),
        alert_id=alert_id,
        hospital_id=hospital_id,
        case_type=CaseType.STEMI,
        priority=priority,
        eta_at=at(eta_s) if eta_s is not None else None,
        findings=Findings(age_years=67, sex="male", note=note),
        state=state,
    )


def mitdb_chunks(record: str, n_chunks: int, *, chunk_s: float = 1.0, unit_id: str = "U1") -> list[EcgChunk]:
    """Real MIT-BIH samples (digital, 360 Hz, 200 adu/mV, baseline 1024) cut into chunks."""
    rec = wfdb.rdrecord(str(MITDB / record), sampto=int(n_chunks * chunk_s * 360), physical=False)
    n = int(chunk_s * rec.fs)
    return [
        EcgChunk(
            unit_id=unit_id,
            seq=i,
            sent_at=at(i * chunk_s + chunk_s),
            start_at=at(i * chunk_s),
            fs_hz=rec.fs,
            leads=tuple(rec.sig_name),
            gain_adc_per_mv=rec.adc_gain[0],
            baseline_adc=rec.baseline[0],
            samples=rec.d_signal[i * n : (i + 1) * n].T,
        )
        for i in range(n_chunks)
    ]


def numerics_vitals(unit_id: str, row: int, measured_s: float, seq: int = 0) -> Vitals:
    """One row of the real MIMIC-II numerics trend (0 or NaN = not measured, never zero)."""
    rec = wfdb.rdrecord(str(NUMERICS / "s25047-2704-05-04-10-44n"))
    values = dict(zip(rec.sig_name, rec.p_signal[row], strict=True))

    def ok(name: str) -> float | None:
        v = float(values[name])
        return v if np.isfinite(v) and v > 0 else None

    return Vitals(
        unit_id=unit_id,
        seq=seq,
        sent_at=at(measured_s),
        measured_at=at(measured_s),
        heart_rate_bpm=ok("HR"),
        heart_rate_source="monitor",
        spo2_pct=ok("SpO2"),
        sbp_mmhg=ok("NBPSys"),
        dbp_mmhg=ok("NBPDias"),
        map_mmhg=ok("NBPMean"),
        resp_rate_per_min=ok("RESP"),
    )


def test_cards_ordered_by_priority_then_eta_unknown_eta_last() -> None:
    board = BoardState()
    board.apply_alert(alert("a1", "U1", priority=Priority.MEDIUM, eta_s=120), at(0))
    board.apply_alert(alert("a2", "U2", priority=Priority.HIGH, eta_s=900), at(0))
    board.apply_alert(alert("a3", "U3", priority=Priority.HIGH, eta_s=300), at(0))
    board.apply_alert(alert("a4", "U4", priority=Priority.HIGH, eta_s=None), at(0))
    board.apply_alert(alert("a5", "U5", priority=Priority.LOW, eta_s=60), at(0))
    assert board.inbound_units("HA") == ["U3", "U2", "U4", "U1", "U5"]
    snap = board.snapshot("HA", at(1))
    assert [c.unit_id for c in snap.cards] == ["U3", "U2", "U4", "U1", "U5"]


def test_hospital_sees_only_units_coming_to_it() -> None:
    board = BoardState()
    events, is_new = board.apply_alert(alert("a1", "U1", "HA"), at(0))
    assert is_new
    assert [e.hospital_ids for e in events] == [frozenset({"HA"})]
    board.apply_alert(alert("b1", "U2", "HB"), at(0))
    vitals_events = board.apply_vitals(numerics_vitals("U1", 2, 1), at(1))
    assert [(e.kind, e.hospital_ids) for e in vitals_events] == [
        (EventKind.VITALS, frozenset({"HA"})),
        (EventKind.TREND, frozenset({"HA"})),
    ]
    assert [c.unit_id for c in board.snapshot("HB", at(1)).cards] == ["U2"]
    # A unit inbound nowhere produces no events at all (its data is kept for when an alert names it).
    assert board.apply_vitals(numerics_vitals("U9", 2, 1), at(1)) == []
    assert board.apply_ecg(mitdb_chunks("100", 1, unit_id="U9")[0], at(1)) == []
    events, _ = board.apply_alert(alert("a9", "U9", "HA"), at(2))
    card = next(e.payload.card for e in events if isinstance(e.payload, AlertEvent))
    assert card.vitals.heart_rate_bpm is not None
    assert card.ecg, "an alert brings the unit's recent ECG with it"


def test_vitals_from_real_numerics_with_ages_and_staleness() -> None:
    board = BoardState(stale_after_s=10, nibp_stale_after_s=300)
    board.apply_alert(alert("a1", "U1"), at(0))
    # MIMIC-II s25047 row 2: HR 89.5, RESP 21.2, SpO2 95.7, NBP 87/46 (62)
    board.apply_vitals(numerics_vitals("U1", 2, 0), at(0))
    v = board.snapshot("HA", at(3)).cards[0].vitals
    assert v.heart_rate_bpm is not None
    assert v.heart_rate_bpm.value == pytest.approx(89.5)
    assert v.heart_rate_bpm.age_s == pytest.approx(3)
    assert not v.heart_rate_bpm.stale
    assert v.nibp is not None
    assert (v.nibp.sbp_mmhg, v.nibp.dbp_mmhg) == (87, 46)
    later = board.snapshot("HA", at(12)).cards[0].vitals
    assert later.heart_rate_bpm is not None
    assert later.heart_rate_bpm.stale
    assert later.spo2_pct is not None
    assert later.spo2_pct.stale
    assert later.nibp is not None
    assert not later.nibp.stale, "a cuff reading has its own (longer) limit"
    assert later.etco2_mmhg is None, "never measured is None, never zero"


def test_rows_without_a_value_keep_the_older_reading_and_late_replays_never_win() -> None:
    board = BoardState()
    board.apply_alert(alert("a1", "U1"), at(0))
    board.apply_vitals(numerics_vitals("U1", 2, 10), at(10))  # has SpO2 95.7
    board.apply_vitals(numerics_vitals("U1", 0, 20), at(20))  # row 0: SpO2 0 = not measured, HR 101.3
    v = board.snapshot("HA", at(20)).cards[0].vitals
    assert v.heart_rate_bpm is not None
    assert v.heart_rate_bpm.value == pytest.approx(101.3)
    assert v.spo2_pct is not None
    assert v.spo2_pct.value == pytest.approx(95.7)
    assert v.spo2_pct.measured_at == at(10)
    assert v.spo2_pct.age_s == pytest.approx(10)
    # a store-and-forward replay measured earlier arrives late: it must not replace the newer HR
    replay = numerics_vitals("U1", 2, 5).model_copy(update={"historical": True})
    events = board.apply_vitals(replay, at(21))
    assert [e.kind for e in events] == [EventKind.TREND], "no new live value; the replay only fills the trend"
    v = board.snapshot("HA", at(21)).cards[0].vitals
    assert v.heart_rate_bpm is not None
    assert v.heart_rate_bpm.value == pytest.approx(101.3)


def test_position_never_null_island_and_lost_fix_keeps_last_known() -> None:
    board = BoardState()
    board.apply_alert(alert("a1", "U1"), at(0))
    assert not board.snapshot("HA", at(0)).cards[0].position.has_position
    # A receiver that reports (0, 0) with fix=True is treated as no position (FF-05).
    null_island = GpsFix(unit_id="U1", seq=0, sent_at=at(1), fix=True, lat_deg=0.0, lon_deg=0.0)
    board.apply_gps(null_island, at(1))
    pos = board.snapshot("HA", at(1)).cards[0].position
    assert not pos.has_position
    assert pos.lat_deg is None
    assert pos.lon_deg is None
    fix = GpsFix(unit_id="U1", seq=1, sent_at=at(2), fix=True, lat_deg=43.7375, lon_deg=7.4242, speed_mps=12)
    board.apply_gps(fix, at(2))
    lost = GpsFix(unit_id="U1", seq=2, sent_at=at(5), fix=False)
    events = board.apply_gps(lost, at(5))
    assert [e.kind for e in events] == [EventKind.POSITION]
    pos = board.snapshot("HA", at(7)).cards[0].position
    assert pos.has_position
    assert pos.fix_lost
    assert (pos.lat_deg, pos.lon_deg) == (43.7375, 7.4242)
    assert pos.age_s == pytest.approx(5)


def test_ecg_ring_keeps_last_window_of_first_lead_in_mv() -> None:
    board = BoardState(ecg_window_s=10)
    board.apply_alert(alert("a1", "U1"), at(0))
    chunks = mitdb_chunks("100", 20)
    for chunk in chunks:
        events = board.apply_ecg(chunk, at(chunk.seq + 1))
        assert [type(e.payload) for e in events] == [EcgEvent, EcgLeadsEvent]
    ring = board.snapshot("HA", at(21)).cards[0].ecg
    total_s = sum(len(s.samples_mv) / s.fs_hz for s in ring)
    assert 10 <= total_s <= 11
    assert [s.seq for s in ring] == list(range(10, 20))
    last = ring[-1]
    assert last.lead == "MLII"
    assert last.fs_hz == 360
    expected = ecg_to_mv(chunks[-1])[0]
    assert np.allclose(last.samples_mv, expected, atol=5e-4)
    # golden value: MIT-BIH 100 sample 0 is 995 adu -> (995 - 1024) / 200 = -0.145 mV
    first = board.apply_ecg(mitdb_chunks("100", 1, unit_id="U2")[0], at(0))
    assert first == []
    assert board._units["U2"].ecg[0].samples_mv[0, 0] == pytest.approx(-0.145)


def test_duplicate_and_historical_ecg_never_reach_the_live_strip() -> None:
    board = BoardState()
    board.apply_alert(alert("a1", "U1"), at(0))
    chunks = mitdb_chunks("201", 3)
    assert board.apply_ecg(chunks[1], at(2))
    assert board.apply_ecg(chunks[1], at(2)) == [], "QoS 1 duplicate"
    assert board.apply_ecg(chunks[0], at(2)) == [], "older than what is shown"
    replay = chunks[2].model_copy(update={"historical": True})
    assert board.apply_ecg(replay, at(3)) == []


def test_live_ecg_follows_sample_time_not_sequence_numbers() -> None:
    """A chunk with a huge seq (or an agent whose sequence restarted) must not freeze the live strip."""
    board = BoardState()
    board.apply_alert(alert("a1", "U1"), at(0))
    chunks = mitdb_chunks("100", 6)
    assert board.apply_ecg(chunks[0], at(1))
    huge = chunks[1].model_copy(update={"seq": 2**62})
    events = board.apply_ecg(huge, at(2))
    assert [e.kind for e in events] == [EventKind.ECG, EventKind.ECG_LEADS], "contiguous in time: no gap"
    for i in (2, 3):
        events = board.apply_ecg(chunks[i], at(i + 1))
        assert [e.kind for e in events] == [EventKind.ECG, EventKind.ECG_LEADS], f"chunk {i} after the huge seq"
        assert not events[0].payload.segment.gap_before  # type: ignore[attr-defined]
    # a restarted agent: seq back to 0, time moving on after a hole of one chunk -> live, drawn with a hole
    restarted = chunks[5].model_copy(update={"seq": 0})
    events = board.apply_ecg(restarted, at(6))
    assert [e.kind for e in events] == [EventKind.ECG, EventKind.ECG_LEADS]
    assert events[0].payload.segment.gap_before, "a hole in sample time is drawn as a gap"  # type: ignore[attr-defined]
    ring = board._units["U1"].ecg
    assert [s.start_at for s in ring] == sorted(s.start_at for s in ring)
    assert ring[-1].start_at == chunks[5].start_at
    # older than what is shown (even with a higher seq): never drawn as live
    late = chunks[4].model_copy(update={"seq": 7})
    assert board.apply_ecg(late, at(7)) == []
    assert ring[-1].start_at == chunks[5].start_at
    card = board.snapshot("HA", at(7)).cards[0]
    starts = [s.start_at for s in card.ecg]
    assert starts == sorted(starts)
    assert chunks[4].start_at not in starts


def test_stored_trend_fills_only_where_the_board_has_none() -> None:
    """Per-minute means from the telemetry store (hospital_board.history) merge into the in-memory trend."""
    from hospital_board.history import points_from_bins
    from telemetry.records import VitalsBin

    board = BoardState(trend_step_s=2.0, trend_max_points=60)
    board.apply_alert(alert("a1", "U1"), at(0))
    board.apply_vitals(numerics_vitals("U1", 5, 575.0), at(575))  # the board's own point, in minute 9
    bins = [VitalsBin(at(60 * m), "8867-4", "/min", 3, 80.0 + m, 79.0, 82.0 + m) for m in range(12)] + [
        VitalsBin(at(60), "59408-5", "%", 2, 97.5, 97.0, 98.0),
        VitalsBin(at(60), "8480-6", "kPa", 1, 16.0, 16.0, 16.0),  # not the contract's unit: skipped, never converted
        VitalsBin(at(60), "8310-5", "Cel", 1, 37.0, 37.0, 37.0),  # a code the trend does not chart
    ]
    points = points_from_bins(bins, 60)
    assert [p.at for p in points] == [at(60 * m + 30) for m in range(12)], "one point per bin, at its middle"
    assert points[1].heart_rate_bpm == 81.0
    assert points[1].spo2_pct == 97.5
    assert points[1].sbp_mmhg is None, "not measured stays a hole"
    assert points[0].spo2_pct is None, "not measured stays a hole"
    added = board.merge_trend("U1", points, bin_s=60)
    assert added == 11, "the minute holding the board's own point keeps the board's point"
    trend = board._units["U1"].trend
    assert [p.at for p in trend] == sorted(p.at for p in trend)
    assert board.merge_trend("U1", points, bin_s=60) == 0, "merging twice adds nothing"
    assert board.merge_trend("nobody", points, bin_s=60) == 0


def test_cancel_and_hand_over_remove_the_card() -> None:
    board = BoardState()
    board.apply_alert(alert("a1", "U1", sent_s=0), at(0))
    board.apply_alert(alert("a2", "U2", sent_s=0), at(0))
    events, is_new = board.apply_alert(alert("a1", "U1", state=AlertState.CANCELLED), at(5))
    assert not is_new
    assert [type(e.payload) for e in events] == [RemovedEvent]
    # a status tap from before the alert (e.g. a retained one) does not close it
    old = Status(unit_id="U2", seq=0, sent_at=at(-60), status=CrewStatus.HANDED_OVER, at=at(-60))
    board.apply_status(old, at(6))
    assert board.inbound_units("HA") == ["U2"]
    handed = Status(unit_id="U2", seq=1, sent_at=at(30), status=CrewStatus.HANDED_OVER, at=at(30))
    events = board.apply_status(handed, at(30))
    assert EventKind.REMOVED in [e.kind for e in events]
    assert board.inbound_units("HA") == []
    with pytest.raises(AlertClosedError):
        board.check_ack("a2", "HA")


def test_acknowledge_rules_and_states_only_move_forward() -> None:
    board = BoardState()
    board.apply_alert(alert("a1", "U1", "HA"), at(0))
    with pytest.raises(UnknownAlertError):
        board.check_ack("nope", "HA")
    with pytest.raises(WrongHospitalError):
        board.check_ack("a1", "HB")
    assert board.mark_on_board("a1", at(1))[0].kind is EventKind.ALERT
    events = board.acknowledge("a1", "HA", "ed_staff", at(2))
    assert events[0].payload.alert.state is AlertState.ACKNOWLEDGED  # type: ignore[attr-defined]
    # dispatch re-sends the alert (new ETA) with its own older view of the state: still acknowledged
    board.apply_alert(alert("a1", "U1", "HA", eta_s=900, seq=1), at(3))
    view = board.alert("a1")
    assert view.state is AlertState.ACKNOWLEDGED
    assert view.acknowledged_by == "ed_staff"
    assert view.eta_at == at(900)
    assert board.mark_on_board("a1", at(4)) == []


def test_ack_from_another_board_on_the_bus_is_applied() -> None:
    board = BoardState()
    board.apply_alert(alert("a1", "U1", "HA"), at(0))
    other_hospital = AlertAck(
        unit_id="U1", seq=1, sent_at=at(1), alert_id="a1", hospital_id="HB", state=AlertState.ACKNOWLEDGED, at=at(1)
    )
    assert board.apply_ack(other_hospital, at(1)) == []
    ack = other_hospital.model_copy(update={"hospital_id": "HA", "by_role": "cath_lab"})
    assert board.apply_ack(ack, at(2))
    assert board.alert("a1").acknowledged_by == "cath_lab"


def test_late_offline_of_an_old_session_does_not_hide_a_new_online() -> None:
    board = BoardState()
    board.apply_alert(alert("a1", "U1"), at(0))
    board.apply_availability(Availability(unit_id="U1", seq=7, sent_at=at(1), state="online"), at(1))
    assert board.apply_availability(Availability(unit_id="U1", seq=6, sent_at=at(0), state="offline"), at(2)) == []
    assert board.snapshot("HA", at(2)).cards[0].availability == "online"
    board.apply_availability(Availability(unit_id="U1", seq=7, sent_at=at(3), state="offline"), at(3))
    assert board.snapshot("HA", at(3)).cards[0].availability == "offline"


def test_crew_note_travels_verbatim_escaping_is_the_pages_job() -> None:
    note = 'Name <unknown>, SpO2 88% & "quoted" `tick` St Mary\'s <img src=x onerror=alert(1)>'
    board = BoardState()
    events, _ = board.apply_alert(alert("a1", "U1", note=note), at(0))
    wire = json.loads(events[0].payload.model_dump_json())
    assert wire["alert"]["note"] == note


def test_vitals_event_is_the_latest_view() -> None:
    board = BoardState()
    board.apply_alert(alert("a1", "U1"), at(0))
    events = board.apply_vitals(numerics_vitals("U1", 3, 1), at(1))
    assert isinstance(events[0].payload, VitalsEvent)
    assert events[0].coalesced
    assert not board.apply_ecg(mitdb_chunks("100", 1)[0], at(1))[0].coalesced


def test_prune_forgets_closed_alerts_and_idle_units() -> None:
    board = BoardState(alert_retention_s=60, unit_retention_s=120)
    board.apply_alert(alert("a1", "U1"), at(0))
    board.apply_alert(alert("a1", "U1", state=AlertState.CANCELLED), at(1))
    board.apply_alert(alert("a2", "U2"), at(0))
    assert board.prune(at(30)) == 0
    assert board.prune(at(200)) == 2  # alert a1 and unit U1; U2 is inbound, kept
    with pytest.raises(UnknownAlertError):
        board.alert("a1")
    assert board.inbound_units("HA") == ["U2"]


def test_a_sequence_restart_is_shown_as_unknown_loss_not_a_count() -> None:
    """A replaced outbox starts at a clock-seeded seq: the jump is a restart, not 10**15 missing chunks."""
    board = BoardState()
    board.apply_alert(alert("a1", "U1"), at(0))
    chunks = mitdb_chunks("100", 4)
    assert board.apply_ecg(chunks[0], at(1))
    # two chunks lost with the old outbox, then the new one's first chunk: a hole in time and a huge jump in seq
    reseeded = chunks[3].model_copy(update={"seq": 1_764_000_000_000_000})
    events = board.apply_ecg(reseeded, at(4))
    gaps = [e.payload.gap for e in events if e.kind is EventKind.GAP]  # type: ignore[attr-defined]
    assert len(gaps) == 1
    assert gaps[0].restart
    assert gaps[0].source == "board"
    stored = GapRecord(
        unit_id="U1", seq=0, sent_at=at(5), stream="ecg", from_seq=9, to_seq=12, detected_at=at(5), restart=False
    )
    (event,) = [e for e in board.apply_gap(stored, at(5)) if e.kind is EventKind.GAP]
    assert not event.payload.gap.restart  # type: ignore[attr-defined]
    restart = stored.model_copy(update={"from_seq": 13, "to_seq": 1_764_000_000_000_000 - 1, "restart": True})
    (event,) = [e for e in board.apply_gap(restart, at(6)) if e.kind is EventKind.GAP]
    assert event.payload.gap.restart  # type: ignore[attr-defined]


def test_lead_off_and_clipping_flags_reach_the_strips() -> None:
    board = BoardState()
    board.apply_alert(alert("a1", "U1"), at(0))
    chunk = mitdb_chunks("100", 1)[0]
    flagged = chunk.model_copy(update={"lead_off": (False, True), "saturated": (True, False)})
    events = board.apply_ecg(flagged, at(1))
    strip = next(e.payload.segment for e in events if e.kind is EventKind.ECG)  # type: ignore[attr-defined]
    leads = next(e.payload.segment for e in events if e.kind is EventKind.ECG_LEADS)  # type: ignore[attr-defined]
    assert (strip.lead_off, strip.saturated) == (False, True)
    assert (leads.lead_off, leads.saturated) == ([False, True], [True, False])


def test_a_birth_from_a_counter_restarted_far_below_is_believed() -> None:
    """A late will of an older session is ignored; a birth from a new outbox seeded lower (the clock had run ahead
    before) is not, or the unit would stay offline for good (hostile tester)."""
    board = BoardState()
    board.apply_alert(alert("a1", "U1"), at(0))
    high, low = 4_102_444_800_000_000, 1_764_460_800_000_000
    board.apply_availability(Availability(unit_id="U1", seq=high, sent_at=at(1), state="offline"), at(1))
    assert (
        board.apply_availability(Availability(unit_id="U1", seq=high - 1, sent_at=at(2), state="online"), at(2)) == []
    )
    assert board.apply_availability(Availability(unit_id="U1", seq=low, sent_at=at(3), state="online"), at(3))
    assert board._units["U1"].availability == "online"


def test_a_page_nobody_acknowledged_keeps_the_card_after_hand_over() -> None:
    """The patient arrived, but the cath lab never answered its page: the card and its Acknowledge stay until the
    page is answered, or the escalation would run on where ED staff cannot stop it (new-user trial)."""
    board = BoardState()
    paged = Activation(department=Department.CATH_LAB, paged_at=at(0), escalate_at=at(120))
    msg = alert("a1", "U1").model_copy(update={"activations": (paged,)})
    board.apply_alert(msg, at(0))
    handed = Status(unit_id="U1", seq=0, sent_at=at(30), status=CrewStatus.HANDED_OVER, at=at(30))
    board.apply_status(handed, at(30))
    assert board.inbound_units("HA") == ["U1"], "the page is still open"
    answered = paged.model_copy(
        update={"state": ActivationState.ACKNOWLEDGED, "acknowledged_at": at(40), "escalate_at": None}
    )
    board.apply_alert(msg.model_copy(update={"seq": 1, "activations": (answered,)}), at(40))
    assert board.inbound_units("HA") == [], "answered after the hand-over: the card goes"
    # and without any page the hand-over closes the card at once, as before
    board.apply_alert(alert("a2", "U2"), at(50))
    board.apply_status(Status(unit_id="U2", seq=0, sent_at=at(60), status=CrewStatus.HANDED_OVER, at=at(60)), at(60))
    assert board.inbound_units("HA") == []
