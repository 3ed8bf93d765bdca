"""HL7 v2 monitor input: normalising (FF-09), PCD-01 numerics, PCD-04 alarms, units, pairing (FF-18), ACKs, dedup.

Real messages come from the shared data set (IHE PCD TF examples and Draeger reference messages, see
``shared/data/hl7/README.md``); they are read via ``shared_data`` and never copied.  Minimal messages written here
cover the field failures and the edge cases.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import shared_data
from pydantic import ValidationError

from ambulance_agent.devices.hl7_message import (
    AckCode,
    Hl7InputError,
    Hl7Reason,
    build_ack,
    normalise_segments,
    parse_dtm,
    parse_message,
    read_ack,
)
from ambulance_agent.devices.hl7_monitor import (
    FIELD_RANGES,
    AlarmReport,
    Hl7MonitorInput,
    MonitorReport,
    ObxReason,
    QualityFlag,
    TimeSource,
    VitalField,
    read_alarm_report,
    read_monitor_report,
)
from broker_config import Priority, Vitals

RECEIVED = datetime(2025, 3, 14, 9, 30, 20, tzinfo=UTC)

# FF-09 minimal input (field-failures.md), one segment per list item.
FF09_SEGMENTS = [
    r"MSH|^~\&|MONITOR|AMB12|EDBOARD|CITYHOSP|20250314093015||ORU^R01^ORU_R01|MSG00042|P|2.5",
    "PID|1||TEST0001^^^CITYHOSP^MR||TESTPATIENT^ALEX||19700101|U",
    "OBR|1||VS0042|85353-1^Vital signs panel^LN|||20250314093000",
    "OBX|1|NM|8867-4^Heart rate^LN||118|/min^/min^UCUM|||||F",
]


def message(*segments: str, terminator: str = "\r") -> str:
    """An ORU built from segments (MSH first), each followed by ``terminator``."""
    return "".join(s + terminator for s in segments)


def oru(*obx: str, obr_time: str = "20250314093000+0100", msh_time: str = "20250314093015+0100") -> str:
    """A minimal LOINC/UCUM ORU^R01 with the given OBX segments."""
    return message(
        rf"MSH|^~\&|MONITOR|AMB12|EDBOARD|CITYHOSP|{msh_time}||ORU^R01^ORU_R01|MSG{len(obx):05d}|P|2.6",
        f"OBR|1||VS1|85353-1^Vital signs panel^LN|||{obr_time}",
        *obx,
    )


def read_bytes(relative: str) -> bytes:
    return Path(shared_data(relative)).read_bytes()


# --- FF-09: terminators ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("terminator", ["\r", "\r\n", "\n"], ids=["CR", "CRLF", "LF"])
def test_ff09_every_terminator_style_keeps_every_segment(terminator: str) -> None:
    raw = message(*FF09_SEGMENTS, terminator=terminator).encode()
    parsed = parse_message(raw)
    assert parsed.segment_ids == ("MSH", "PID", "OBR", "OBX")
    assert len(parsed.message) == 4
    assert parsed.text.count("\r") == 4
    assert "\n" not in parsed.text
    report = read_monitor_report(parsed, RECEIVED)
    assert report.control_id == "MSG00042"
    (group,) = report.groups
    assert group.heart_rate_bpm == 118.0
    assert group.heart_rate_source == "monitor"


def test_ff09_empty_and_doubled_terminators_are_ignored() -> None:
    raw = "\r\n\n" + "\r\n\r\n".join(FF09_SEGMENTS) + "\r\n\r\n\r\n"
    assert normalise_segments(raw).split("\r")[:-1] == FF09_SEGMENTS
    assert parse_message(raw).segment_ids == ("MSH", "PID", "OBR", "OBX")


@pytest.mark.parametrize("terminator", ["\r", "\r\n", "\n"], ids=["CR", "CRLF", "LF"])
def test_ff09_oru_without_obx_fails_loudly_with_ae(terminator: str) -> None:
    raw = message(*FF09_SEGMENTS[:3], terminator=terminator)
    with pytest.raises(Hl7InputError) as info:
        read_monitor_report(parse_message(raw), RECEIVED)
    assert info.value.reason is Hl7Reason.NO_OBX
    assert info.value.ack_code is AckCode.AE
    outcome = Hl7MonitorInput(clock=lambda: RECEIVED).handle(raw.encode())
    assert outcome.ack_code is AckCode.AE
    assert outcome.reason is Hl7Reason.NO_OBX
    assert outcome.report is None
    ack = read_ack(outcome.ack or "")
    assert (ack.code, ack.acked_control_id) == (AckCode.AE, "MSG00042")


def test_lf_only_input_is_not_swallowed_into_msh_as_python_hl7_alone_would() -> None:
    import hl7

    raw = message(*FF09_SEGMENTS, terminator="\n")
    assert len(hl7.parse(raw)) == 1  # the failure FF-09 reports, reproduced with the library alone
    assert len(parse_message(raw).message) == 4


# --- structural rejects --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", Hl7Reason.NOT_HL7),
        (b"\r\n\r\n", Hl7Reason.NOT_HL7),
        (b"PID|1||X\r", Hl7Reason.NOT_HL7),
        (b"MSH", Hl7Reason.BAD_MSH),
        (b"MSHA^~\\&|X|Y\r", Hl7Reason.BAD_MSH),
        (b"MSH|^^\\&|A|B|C|D|2025||ORU^R01|X|P|2.6\r", Hl7Reason.BAD_MSH),
        (b"MSH|^~\\&|A|B|C|D|2025||ORU^R01|X|P|2.6\r64|1.0|||\r", Hl7Reason.BAD_SEGMENT),
        (b"MSH|^~\\&|A|B|C|D|2025||ORU^R01|X|P|2.6\rcclusion|||\r", Hl7Reason.BAD_SEGMENT),
        (b"MSH|^~\\&|A|B|C|D|2025||ORU^R01||P|2.6\rOBX|1\r", Hl7Reason.NO_CONTROL_ID),
        (b"\xff\xfeMSH|^~\\&|A|B|C|D|2025||ORU^R01|X|P|2.6\r", Hl7Reason.NOT_HL7),
        (b"MSH|^~\\&|A|B|C|D|2025||ORU^R01|X|P|2.6||||||UNICODE UTF-8\rOBX|1|ST|1||\xff\r", Hl7Reason.UNDECODABLE),
    ],
    ids=[
        "empty",
        "blank",
        "no-msh",
        "short-msh",
        "alnum-separator",
        "repeated-encoding-char",
        "continuation-digits",
        "continuation-lowercase",
        "no-control-id",
        "garbage-before-msh",
        "bad-utf8",
    ],
)
def test_structural_problems_are_rejected_with_a_reason(raw: bytes, reason: Hl7Reason) -> None:
    with pytest.raises(Hl7InputError) as info:
        parse_message(raw)
    assert info.value.reason is reason


def test_messages_are_decoded_per_msh18() -> None:
    raw = "MSH|^~\\&|A|B|C|D|2025||ORU^R01|X1|P|2.6||||||8859/1\rPID|||||Müller\r".encode("latin-1")
    parsed = parse_message(raw)
    assert parsed.codec == "latin-1"
    assert "Müller" in parsed.text


def test_a_hard_wrapped_continuation_line_is_rejected_not_glued() -> None:
    # The IHE document wrapped 'OBX|...|EUI-' / '64' across lines; a sender doing that is broken, not guessed at.
    raw = FF09_SEGMENTS[0] + "\r" + FF09_SEGMENTS[3][:30] + "\r" + FF09_SEGMENTS[3][30:] + "\r"
    with pytest.raises(Hl7InputError) as info:
        parse_message(raw)
    assert info.value.reason is Hl7Reason.BAD_SEGMENT


# --- times ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected", "assumed"),
    [
        ("20120109175426-0600", datetime(2012, 1, 9, 23, 54, 26, tzinfo=UTC), False),
        ("20191127160543+0100", datetime(2019, 11, 27, 15, 5, 43, tzinfo=UTC), False),
        ("20250314093000-0030", datetime(2025, 3, 14, 10, 0, 0, tzinfo=UTC), False),
        ("20250314093000.25+0000", datetime(2025, 3, 14, 9, 30, 0, 250000, tzinfo=UTC), False),
        ("202503140930", datetime(2025, 3, 14, 9, 30, tzinfo=UTC), True),
    ],
)
def test_dtm_is_parsed_with_its_offset_or_flagged(value: str, expected: datetime, assumed: bool) -> None:
    assert parse_dtm(value, None) == (expected, assumed)


def test_dtm_without_offset_takes_the_senders_offset_from_msh7() -> None:
    assert parse_dtm("20250314093000", timezone(timedelta(hours=2))) == (
        datetime(2025, 3, 14, 7, 30, tzinfo=UTC),
        True,
    )


@pytest.mark.parametrize("value", ["2025031", "20251314", "20250314093000+2500", "20250314093000Z", "abc", "2025-03"])
def test_malformed_dtm_is_none(value: str) -> None:
    assert parse_dtm(value, None) is None


# --- PCD-01 numerics from the shared data --------------------------------------------------------------------------


def test_philips_numerics_map_to_the_readme_values() -> None:
    report = read_monitor_report(parse_message(read_bytes("hl7/ihe_pcd01_philips_monitor_numerics.hl7")), RECEIVED)
    assert report.control_id == "HP0122182658686QQ000CND119C0WS61"
    assert report.obx_count == 17
    assert report.rejected == ()
    nibp, numerics = report.groups  # the NIBP is episodic (OBX-14), the rest are at OBR-7
    assert (nibp.sbp_mmhg, nibp.dbp_mmhg, nibp.map_mmhg) == (117.0, 82.0, 90.0)
    assert nibp.measured.source is TimeSource.OBX_14
    assert nibp.measured.at == datetime(2015, 1, 22, 11, 50, tzinfo=UTC)
    assert numerics.heart_rate_bpm == 80.0
    assert numerics.heart_rate_source == "ecg"
    assert numerics.resp_rate_per_min == 30.0
    assert numerics.spo2_pct == 99.0
    assert numerics.measured.source is TimeSource.OBR_7
    assert numerics.measured.at == datetime(2015, 1, 22, 18, 26, 56, tzinfo=UTC)
    # The example's times carry no offset: MSH-7's +0000 was assumed, and that is flagged.
    assert QualityFlag.TIME_OFFSET_ASSUMED in nibp.flags
    assert numerics.measured.flagged
    assert {o.source_unit for o in report.observations} == {"266016", "264864", "264928", "262688"}


def test_acme_gateway_nibp_with_ucum_units() -> None:
    report = read_monitor_report(parse_message(read_bytes("hl7/ihe_pcd01_acme_gateway_nibp_episodic.hl7")), RECEIVED)
    assert report.control_id == "0104ef190d604db188c3"
    (group,) = report.groups
    assert (group.sbp_mmhg, group.dbp_mmhg, group.map_mmhg) == (111.0, 60.0, 80.0)
    assert group.heart_rate_bpm == 63.0
    assert group.heart_rate_source == "monitor"  # MDC_PULS_RATE_NON_INV, the cuff's pulse
    assert group.measured == report.observations[0].time
    assert group.measured.at == datetime(2011, 6, 2, 4, 58, 42, tzinfo=UTC)
    assert {o.source_unit for o in report.observations} == {"mm[Hg]", "{beat}/min"}
    assert {o.channel for o in report.observations} == {"1.16.1"}
    vitals = group.to_vitals(unit_id="amb-12", seq=7, sent_at=RECEIVED)
    assert isinstance(vitals, Vitals)
    assert (vitals.sbp_mmhg, vitals.dbp_mmhg, vitals.heart_rate_bpm) == (111.0, 60.0, 63.0)
    assert vitals.measured_at == group.measured.at


# --- PCD-04 alarms from the shared data ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "phase", "state", "when"),
    [
        ("ihe_pcd04_bbraun_occlusion_alarm_start.hl7", "start", "active", datetime(2012, 1, 9, 23, 54, 17, tzinfo=UTC)),
        ("ihe_pcd04_bbraun_occlusion_alarm_end.hl7", "end", "inactive", datetime(2012, 1, 9, 23, 54, 26, tzinfo=UTC)),
    ],
)
def test_bbraun_occlusion_alarm_start_and_end(name: str, phase: str, state: str, when: datetime) -> None:
    report = read_alarm_report(parse_message(read_bytes(f"hl7/{name}")), RECEIVED)
    (alarm,) = report.alarms
    assert (alarm.event_code, alarm.event_ref) == (196940, "MDC_EVT_FLUID_LINE_OCCL")
    assert (alarm.phase, alarm.state, alarm.inactivation_state) == (phase, state, "enabled")
    assert alarm.alert_id == "P6013_4"  # the same alert instance in both messages
    assert alarm.source_code == 69985  # MDC_DEV_PUMP_INFUS_MDS
    assert alarm.time.at == when
    assert alarm.time.source is TimeSource.OBR_7
    assert not alarm.time.flagged
    assert alarm.priority is None


def test_draeger_technical_alarm() -> None:
    report = read_alarm_report(parse_message(read_bytes("hl7/draeger_acm_PCD04_alarm.hl7")), RECEIVED)
    (alarm,) = report.alarms
    assert (alarm.event_code, alarm.event_ref) == (196916, "MDC_EVT_SENSOR_DISCONN")
    assert (alarm.phase, alarm.state) == ("start", "active")
    assert (alarm.priority, alarm.priority_code, alarm.alert_type) == (Priority.LOW, "PL", "SP")
    assert alarm.source_code == 42
    assert alarm.text == "CO2 Sensor unplugged"
    assert alarm.time.at == datetime(2019, 11, 27, 15, 5, 43, tzinfo=UTC)


def test_draeger_watchdog_alarm() -> None:
    report = read_alarm_report(parse_message(read_bytes("hl7/draeger_acm_PCD04_watchdog.hl7")), RECEIVED)
    assert report.control_id == "2df8823a-f8fb-44e0-a4ba-1d826e0809f1"
    (alarm,) = report.alarms
    assert (alarm.event_code, alarm.event_ref) == (196614, "MDC_EVT_ACTIVE")
    assert (alarm.priority, alarm.priority_code, alarm.alert_type) == (None, "PN", "SA")


@pytest.mark.parametrize(
    ("name", "code", "report_type", "reason"),
    [
        ("ihe_pcd01_philips_monitor_numerics.hl7", AckCode.AA, MonitorReport, None),
        ("ihe_pcd01_acme_gateway_nibp_episodic.hl7", AckCode.AA, MonitorReport, None),
        ("ihe_pcd04_bbraun_occlusion_alarm_start.hl7", AckCode.AA, AlarmReport, None),
        ("ihe_pcd04_bbraun_occlusion_alarm_end.hl7", AckCode.AA, AlarmReport, None),
        ("draeger_acm_PCD04_alarm.hl7", AckCode.AA, AlarmReport, None),
        ("draeger_acm_PCD04_watchdog.hl7", AckCode.AA, AlarmReport, None),
        ("ihe_pcd10_pump_delivery_start.hl7", AckCode.AR, type(None), Hl7Reason.UNSUPPORTED_MESSAGE),
        ("draeger_acm_PCD05_alarm.hl7", AckCode.AR, type(None), Hl7Reason.UNSUPPORTED_MESSAGE),
        ("draeger_acm_ACK_watchdog.hl7", None, type(None), Hl7Reason.UNSUPPORTED_MESSAGE),
    ],
)
def test_every_shared_hl7_file_through_the_input(
    name: str, code: AckCode | None, report_type: type, reason: Hl7Reason | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    raw = read_bytes(f"hl7/{name}")
    parsed = parse_message(raw, require_control_id=False)
    outcome = Hl7MonitorInput(clock=lambda: RECEIVED).handle(raw)
    assert outcome.ack_code is code
    assert isinstance(outcome.report, report_type)
    assert outcome.reason is reason
    if code is None:
        assert outcome.ack is None  # an ACK is never acknowledged
        return
    ack = read_ack(outcome.ack or "")
    assert (ack.code, ack.acked_control_id) == (code, parsed.header.control_id)
    ack_msh = parse_message(outcome.ack or "").header
    assert ack_msh.raw_receiving_application == parsed.header.raw_sending_application
    assert ack_msh.raw_receiving_facility == parsed.header.raw_sending_facility
    assert ack_msh.trigger_event == parsed.header.trigger_event
    assert ack_msh.version_id == parsed.header.version_id
    # Logs never contain health data or free text: no patient names, no alarm text, no values.
    for forbidden in ("Hon", "Albert", "Amy", "Simulated", "Sensor unplugged", "Occlusion", "117", "Dopamine"):
        assert forbidden not in caplog.text


def test_all_shared_hl7_files_are_covered() -> None:
    folder = shared_data("hl7")
    assert len(sorted(folder.glob("*.hl7"))) == 9


# --- mapping rules -------------------------------------------------------------------------------------------------


def test_ff18_systolic_and_diastolic_pair_by_sub_id_and_time() -> None:
    raw = oru(
        "OBX|3|NM|8480-6^Systolic blood pressure^LN|1|92|mm[Hg]^mm[Hg]^UCUM|||||F",
        "OBX|4|NM|8462-4^Diastolic blood pressure^LN|1|58|mm[Hg]^mm[Hg]^UCUM|||||F",
    )
    (group,) = read_monitor_report(parse_message(raw), RECEIVED).groups
    assert (group.sbp_mmhg, group.dbp_mmhg) == (92.0, 58.0)
    assert QualityFlag.BP_INCOMPLETE not in group.flags
    assert group.measured.at == datetime(2025, 3, 14, 8, 30, tzinfo=UTC)
    assert not group.measured.flagged


def test_ff18_halves_with_different_sub_ids_are_not_paired() -> None:
    raw = oru(
        "OBX|3|NM|8480-6^Systolic blood pressure^LN|1|92|mm[Hg]^mm[Hg]^UCUM|||||F",
        "OBX|4|NM|8462-4^Diastolic blood pressure^LN|2|58|mm[Hg]^mm[Hg]^UCUM|||||F",
    )
    report = read_monitor_report(parse_message(raw), RECEIVED)
    assert report.groups[0].sbp_mmhg is None
    assert report.groups[0].dbp_mmhg is None
    assert {r.reason for r in report.rejected} == {ObxReason.UNPAIRED_PRESSURE}


def test_ff18_halves_at_different_times_are_not_one_measurement() -> None:
    raw = oru(
        "OBX|3|NM|8480-6^Systolic^LN|1|92|mm[Hg]^^UCUM|||||F|||20250314092000+0100",
        "OBX|4|NM|8462-4^Diastolic^LN|1|58|mm[Hg]^^UCUM|||||F|||20250314092500+0100",
    )
    first, second = read_monitor_report(parse_message(raw), RECEIVED).groups
    assert (first.sbp_mmhg, first.dbp_mmhg) == (92.0, None)
    assert (second.sbp_mmhg, second.dbp_mmhg) == (None, 58.0)
    assert QualityFlag.BP_INCOMPLETE in first.flags
    assert QualityFlag.BP_INCOMPLETE in second.flags


def test_a_complete_pair_wins_over_a_stray_half_on_another_channel() -> None:
    raw = oru(
        "OBX|1|NM|150021^MDC_PRESS_BLD_NONINV_SYS^MDC|1.1.1.1|120|266016^MDC_DIM_MMHG^MDC|||||F",
        "OBX|2|NM|150022^MDC_PRESS_BLD_NONINV_DIA^MDC|1.1.1.2|80|266016^MDC_DIM_MMHG^MDC|||||F",
        "OBX|3|NM|150021^MDC_PRESS_BLD_NONINV_SYS^MDC|1.2.1.1|95|266016^MDC_DIM_MMHG^MDC|||||F",
    )
    report = read_monitor_report(parse_message(raw), RECEIVED)
    assert (report.groups[0].sbp_mmhg, report.groups[0].dbp_mmhg) == (120.0, 80.0)
    assert [(r.set_id, r.reason) for r in report.rejected] == [("3", ObxReason.UNPAIRED_PRESSURE)]


@pytest.mark.parametrize(
    ("obx", "field", "expected"),
    [
        ("OBX|1|NM|147842^MDC_ECG_HEART_RATE^MDC|1.2.1.1|72|264864^MDC_DIM_BEAT_PER_MIN^MDC", "heart_rate_bpm", 72.0),
        ("OBX|1|NM|8867-4^Heart rate^LN||72|{beats}/min^^UCUM", "heart_rate_bpm", 72.0),
        ("OBX|1|NM|8867-4^Heart rate^LN||72|{Beats}/min^^UCUM", "heart_rate_bpm", 72.0),
        ("OBX|1|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1.3.1.1|97|262688^MDC_DIM_PERCENT^MDC", "spo2_pct", 97.0),
        ("OBX|1|NM|59408-5^SpO2^LN||97|%^^UCUM", "spo2_pct", 97.0),
        ("OBX|1|NM|2708-6^SaO2^LN||97|%^percent^UCUM", "spo2_pct", 97.0),
        ("OBX|1|NM|151562^MDC_RESP_RATE^MDC|1.4.1.1|16|264928^MDC_DIM_RESP_PER_MIN^MDC", "resp_rate_per_min", 16.0),
        ("OBX|1|NM|9279-1^Resp rate^LN||16|/min^^UCUM", "resp_rate_per_min", 16.0),
        ("OBX|1|NM|151708^MDC_AWAY_CO2_ET^MDC|1.5.1.1|38|266016^MDC_DIM_MMHG^MDC", "etco2_mmhg", 38.0),
        ("OBX|1|NM|151708^MDC_AWAY_CO2_ET^MDC|1.5.1.1|5.0|265987^MDC_DIM_KILO_PASCAL^MDC", "etco2_mmhg", 37.503),
        ("OBX|1|NM|19889-5^EtCO2^LN||5.0|kPa^^UCUM", "etco2_mmhg", 37.503),
        ("OBX|1|NM|150364^MDC_TEMP_BODY^MDC|1.6.1.1|37.2|268192^MDC_DIM_DEGC^MDC", "temp_c", 37.2),
        ("OBX|1|NM|8310-5^Body temperature^LN||98.6|[degF]^^UCUM", "temp_c", 37.0),
        ("OBX|1|NM|149530^MDC_PULS_OXIM_PULS_RATE^MDC|1.3.1.2|70|264864^^MDC", "heart_rate_bpm", 70.0),
        ("OBX|1|NM|8889-8^Pulse oximetry^LN||70|/min^^UCUM", "heart_rate_bpm", 70.0),
    ],
)
def test_mdc_and_loinc_codes_with_their_units(obx: str, field: str, expected: float) -> None:
    report = read_monitor_report(parse_message(oru(obx)), RECEIVED)
    assert report.rejected == ()
    assert getattr(report.groups[0], field) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(
    ("obx", "reason"),
    [
        ("OBX|1|NM|8867-4^Heart rate^LN||72|bpm^^L", ObxReason.UNIT_UNKNOWN),
        ("OBX|1|NM|8867-4^Heart rate^LN||72", ObxReason.UNIT_UNKNOWN),
        ("OBX|1|NM|8867-4^Heart rate^LN||72|mmHg^^UCUM", ObxReason.UNIT_UNKNOWN),
        ("OBX|1|NM|8867-4^Heart rate^LN||72|266016^MDC_DIM_MMHG^MDC", ObxReason.UNIT_MISMATCH),
        ("OBX|1|NM|150456^SpO2^MDC||97|264864^MDC_DIM_BEAT_PER_MIN^MDC", ObxReason.UNIT_MISMATCH),
        ("OBX|1|NM|150021^SYS^MDC|1|120|266016^MDC_DIM_MMHG^MDC^kPa^kPa^UCUM", ObxReason.UNIT_CONFLICT),
        ("OBX|1|ST|8867-4^Heart rate^LN||72|/min^^UCUM", ObxReason.NOT_NUMERIC),
        ("OBX|1|NM|8867-4^Heart rate^LN||seventy|/min^^UCUM", ObxReason.NOT_NUMERIC),
        ("OBX|1|NM|8867-4^Heart rate^LN||1e2|/min^^UCUM", ObxReason.NOT_NUMERIC),
        ("OBX|1|NM|8867-4^Heart rate^LN||NaN|/min^^UCUM", ObxReason.NOT_NUMERIC),
        ("OBX|1|NM|8867-4^Heart rate^LN|||/min^^UCUM", ObxReason.NO_VALUE),
        ("OBX|1|NM|8867-4^Heart rate^LN||400|/min^^UCUM", ObxReason.OUT_OF_RANGE),
        ("OBX|1|NM|150456^SpO2^MDC||101|262688^^MDC", ObxReason.OUT_OF_RANGE),
        ("OBX|1|NM|8867-4^Heart rate^LN||-5|/min^^UCUM", ObxReason.OUT_OF_RANGE),
        ("OBX|1|NM|8867-4^Heart rate^LN||72|/min^^UCUM|||||W", ObxReason.WITHDRAWN),
        ("OBX|1|NM|8867-4^Heart rate^LN||72|/min^^UCUM|||||F|||2025-03-14", ObxReason.BAD_TIME),
    ],
)
def test_observations_it_cannot_interpret_are_rejected_not_guessed(obx: str, reason: ObxReason) -> None:
    report = read_monitor_report(parse_message(oru(obx)), RECEIVED)
    assert report.groups == ()
    assert [(r.set_id, r.code, r.reason) for r in report.rejected] == [("1", report.rejected[0].code, reason)]


def test_non_vital_observations_are_ignored_not_rejected() -> None:
    raw = oru(
        "OBX|1|ST|69965^MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS^MDC|1.0.0.0|||||||X",
        "OBX|2|NM|147232^MDC_ECG_TIME_PD_QT_GL^MDC|1.2.1.14|360|264338^MDC_DIM_MILLI_SEC^MDC",
        "OBX|3|NM|1234-5^Something^99LOCAL||5|mg",
    )
    report = read_monitor_report(parse_message(raw), RECEIVED)
    assert (report.obx_count, report.groups, report.rejected) == (3, (), ())


def test_heart_rate_prefers_ecg_then_oximeter_then_cuff() -> None:
    raw = oru(
        "OBX|1|NM|149546^MDC_PULS_RATE_NON_INV^MDC|1.1.1.4|66|264864^^MDC",
        "OBX|2|NM|149530^MDC_PULS_OXIM_PULS_RATE^MDC|1.3.1.2|68|264864^^MDC",
        "OBX|3|NM|147842^MDC_ECG_HEART_RATE^MDC|1.2.1.1|70|264864^^MDC",
    )
    (group,) = read_monitor_report(parse_message(raw), RECEIVED).groups
    assert (group.heart_rate_bpm, group.heart_rate_source) == (70.0, "ecg")


def test_conflicting_values_of_one_field_at_one_time_are_dropped() -> None:
    raw = oru("OBX|1|NM|59408-5^SpO2^LN||97|%^^UCUM", "OBX|2|NM|59408-5^SpO2^LN||91|%^^UCUM")
    report = read_monitor_report(parse_message(raw), RECEIVED)
    assert report.groups[0].spo2_pct is None
    assert {r.reason for r in report.rejected} == {ObxReason.CONFLICTING_VALUES}


def test_no_observation_time_uses_the_receive_time_and_flags_it() -> None:
    raw = message(
        r"MSH|^~\&|MONITOR|AMB12|||20250314093015||ORU^R01|M1|P|2.6",
        "OBX|1|NM|8867-4^Heart rate^LN||72|/min^^UCUM",
    )
    (group,) = read_monitor_report(parse_message(raw), RECEIVED).groups
    assert group.measured == (group.measured.__class__(RECEIVED, TimeSource.RECEIVED, False))
    assert QualityFlag.TIME_FROM_RECEIPT in group.flags


def test_wrong_trigger_is_unsupported() -> None:
    with pytest.raises(Hl7InputError) as info:
        read_alarm_report(parse_message(oru("OBX|1|NM|8867-4^HR^LN||72|/min^^UCUM")), RECEIVED)
    assert info.value.reason is Hl7Reason.UNSUPPORTED_MESSAGE
    assert info.value.ack_code is AckCode.AR


def test_alarm_without_event_code_is_an_error() -> None:
    raw = message(
        r"MSH|^~\&|PUMP|X|||20250314093015+0000||ORU^R40^ORU_R40|A1|P|2.6",
        "OBR|1||A1|196616^MDC_EVT_ALARM^MDC|||20250314093015+0000",
        "OBX|1|ST|68481^MDC_ATTR_EVENT_PHASE^MDC|1.0.0.1|start",
    )
    with pytest.raises(Hl7InputError) as info:
        read_alarm_report(parse_message(raw), RECEIVED)
    assert info.value.reason is Hl7Reason.NO_ALARM_EVENT


def test_digits_of_other_scripts_are_not_numbers() -> None:
    # Found by fuzzing: str.isdigit() and \\d accept superscript and Arabic-Indic digits; int() then raised out of
    # the alarm reader.
    raw = message(
        r"MSH|^~\&|PUMP|X|||20250314093015+0000||ORU^R40^ORU_R40|A1|P|2.6",
        "OBR|1||A1|196616^MDC_EVT_ALARM^MDC|||20250314093015+0000",
        "OBX|1|ST|1969²6^MDC_EVT_X^MDC|1.0.0.1|text",
        "OBX|2|ST|68481^MDC_ATTR_EVENT_PHASE^MDC|1.0.0.2|start",
    )
    outcome = Hl7MonitorInput(clock=lambda: RECEIVED).handle(raw)
    assert (outcome.ack_code, outcome.reason) == (AckCode.AE, Hl7Reason.NO_ALARM_EVENT)
    arabic_indic_120 = "\u0661\u0662\u0660"
    report = read_monitor_report(parse_message(oru(f"OBX|1|NM|8867-4^HR^LN||{arabic_indic_120}|/min^^UCUM")), RECEIVED)
    assert [r.reason for r in report.rejected] == [ObxReason.NOT_NUMERIC]


def test_field_ranges_match_the_vitals_contract() -> None:
    base = {"unit_id": "amb-1", "seq": 0, "sent_at": RECEIVED, "measured_at": RECEIVED}
    for vital, (low, high) in FIELD_RANGES.items():
        Vitals(**base, **{vital.value: low})
        Vitals(**base, **{vital.value: high})
        for outside in (low - 0.01, high + 0.01):
            with pytest.raises(ValidationError):
                Vitals(**base, **{vital.value: outside})
    assert set(FIELD_RANGES) == set(VitalField)


# --- acknowledgements ----------------------------------------------------------------------------------------------


def test_ack_swaps_sender_and_receiver_and_echoes_the_control_id() -> None:
    header = parse_message(message(*FF09_SEGMENTS)).header
    ack = build_ack(header, AckCode.AA, at=RECEIVED, ack_control_id="ACK00042")
    assert ack == (
        r"MSH|^~\&|EDBOARD|CITYHOSP|MONITOR|AMB12|20250314093020+0000||ACK^R01^ACK|ACK00042|P|2.5" + "\r"
        "MSA|AA|MSG00042\r"
    )


@pytest.mark.parametrize("code", [AckCode.AE, AckCode.AR])
def test_error_acks_say_why_without_content(code: AckCode) -> None:
    header = parse_message(message(*FF09_SEGMENTS)).header
    ack = build_ack(header, code, at=RECEIVED, ack_control_id="A1", reason=Hl7Reason.NO_OBX)
    segments = ack.split("\r")
    assert segments[1] == f"MSA|{code.value}|MSG00042|no_obx"
    assert segments[2] == "ERR|||101^Required field missing^HL70357|E|||no_obx"
    assert read_ack(ack).code is code


def test_ack_for_an_unreadable_message_is_ar_with_empty_msa2() -> None:
    outcome = Hl7MonitorInput(clock=lambda: RECEIVED).handle(b"\x00\x01 not hl7 at all")
    assert outcome.ack_code is AckCode.AR
    assert outcome.reason is Hl7Reason.NOT_HL7
    ack = read_ack(outcome.ack or "")
    assert (ack.code, ack.acked_control_id) == (AckCode.AR, "")


def test_ack_keeps_the_senders_encoding_characters() -> None:
    header = parse_message("MSH#*~\\&#A#B#C#D#2025##ORU*R01#C1#P#2.6\rOBX#1\r").header
    ack = build_ack(header, AckCode.AA, at=RECEIVED, ack_control_id="K1")
    assert ack.startswith("MSH#*~\\&#C#D#A#B#")
    assert read_ack(ack).acked_control_id == "C1"


def test_read_ack_rejects_a_message_without_msa() -> None:
    with pytest.raises(Hl7InputError) as info:
        read_ack(message(*FF09_SEGMENTS))
    assert info.value.reason is Hl7Reason.NOT_AN_ACK


# --- the stateful input: dedup, sink, counters ---------------------------------------------------------------------


def test_duplicate_control_id_is_acknowledged_again_but_handed_over_once() -> None:
    received: list[object] = []
    inp = Hl7MonitorInput(received.append, clock=lambda: RECEIVED)
    raw = message(*FF09_SEGMENTS).encode()
    first = inp.handle(raw)
    second = inp.handle(raw.replace(b"\r", b"\r\n"))  # the same message, resent by a CRLF gateway
    assert (first.ack_code, second.ack_code) == (AckCode.AA, AckCode.AA)
    assert second.duplicate
    assert second.ack == first.ack
    assert len(received) == 1
    assert (inp.accepted, inp.duplicates) == (1, 1)


def test_a_reused_control_id_with_new_content_is_processed() -> None:
    received: list[object] = []
    inp = Hl7MonitorInput(received.append, clock=lambda: RECEIVED)
    inp.handle(message(*FF09_SEGMENTS))
    outcome = inp.handle(message(*FF09_SEGMENTS[:3], FF09_SEGMENTS[3].replace("|118|", "|121|")))
    assert not outcome.duplicate
    assert len(received) == 2


def test_dedup_memory_is_bounded() -> None:
    inp = Hl7MonitorInput(dedup_capacity=2, clock=lambda: RECEIVED)
    for i in range(3):
        inp.handle(message(FF09_SEGMENTS[0].replace("MSG00042", f"M{i}"), *FF09_SEGMENTS[1:]))
    assert not inp.handle(message(FF09_SEGMENTS[0].replace("MSG00042", "M0"), *FF09_SEGMENTS[1:])).duplicate
    assert inp.handle(message(FF09_SEGMENTS[0].replace("MSG00042", "M2"), *FF09_SEGMENTS[1:])).duplicate


def test_a_failing_sink_answers_ae_so_the_sender_resends_and_is_not_remembered() -> None:
    calls = 0

    def sink(report: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("buffer full")

    inp = Hl7MonitorInput(sink, clock=lambda: RECEIVED)
    raw = message(*FF09_SEGMENTS)
    assert inp.handle(raw).ack_code is AckCode.AE
    retry = inp.handle(raw)
    assert (retry.ack_code, retry.duplicate, calls) == (AckCode.AA, False, 2)
    assert inp.rejects.count(Hl7Reason.SINK_FAILED) == 1


def test_rejects_are_counted_by_reason_and_logged_without_values(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    inp = Hl7MonitorInput(clock=lambda: RECEIVED)
    inp.handle(b"garbage")
    inp.handle(message(*FF09_SEGMENTS[:3]))
    inp.handle(oru("OBX|1|NM|8867-4^Heart rate^LN||987|/min^^UCUM"))
    assert inp.rejects.by_reason == {"not_hl7": 1, "no_obx": 1}
    assert inp.obx_rejects.by_reason == {"out_of_range": 1}
    assert inp.rejects.in_last(60) == 2
    assert "987" not in caplog.text
    assert "TESTPATIENT" not in caplog.text
    assert "out_of_range" in caplog.text


async def test_the_input_is_an_mllp_handler() -> None:
    inp = Hl7MonitorInput(clock=lambda: RECEIVED)
    ack = await inp(message(*FF09_SEGMENTS).encode())
    assert ack is not None
    assert read_ack(ack).code is AckCode.AA
    assert await inp(b"MSH|^~\\&|A|B|C|D|2025||ACK^R01|X|P|2.6\rMSA|AA|Y\r") is None
