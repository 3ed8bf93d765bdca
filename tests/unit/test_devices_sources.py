"""Device adapters as agent sources, the pure parts: NMEA epoch merging, monitor alarm bookkeeping, HL7 -> reading."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import reduce
from operator import xor

import pytest

from ambulance_agent.devices.hl7_message import parse_message
from ambulance_agent.devices.hl7_monitor import read_alarm_report, read_monitor_report
from ambulance_agent.devices.nmea_gps import NmeaGpsReader
from ambulance_agent.sources.monitor import MonitorAlarms, reading_from_group
from ambulance_agent.sources.nmea import EpochMerger, merge_epoch, parse_host_port
from broker_config import Priority

# BU-353-S4 log (gpsd regression data, tests/data/nmea/bu353s4.log), Hamilton NZ, 2014-12-31.
GGA_1 = "$GPGGA,030719.000,3747.0873,S,17518.8938,E,1,08,1.1,59.9,M,23.7,M,,0000*7D"
GSA = "$GPGSA,A,3,17,28,06,01,30,20,26,13,,,,,1.8,1.1,1.5*33"
RMC_1 = "$GPRMC,030719.000,A,3747.0873,S,17518.8938,E,0.69,181.39,311214,,,A*7D"
GGA_2 = "$GPGGA,030720.000,3747.0875,S,17518.8938,E,1,08,1.1,59.8,M,23.7,M,,0000*70"
RMC_2 = "$GPRMC,030720.000,A,3747.0875,S,17518.8938,E,1.15,181.39,311214,,,A*7B"
NO_FIX_RMC = "$GPRMC,,V,,,,,,,,,,N*53"  # FF-05
NO_FIX_GGA = "$GNGGA,,,,,,0,00,99.99,,,,,,*56"  # FF-05
RECEIVED = datetime(2014, 12, 31, 3, 7, 20, tzinfo=UTC)


def nmea(body: str) -> str:
    return f"${body}*{reduce(xor, body.encode(), 0):02X}"


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fixes(*lines: str, received: datetime = RECEIVED) -> list:
    reader = NmeaGpsReader(clock=lambda: received)
    out = [reader.feed(line) for line in lines]
    return [f for f in out if f is not None]


def test_parse_host_port() -> None:
    assert parse_host_port("127.0.0.1:10110") == ("127.0.0.1", 10110)
    assert parse_host_port("[::1]:2947") == ("::1", 2947)
    for bad in ("host", "host:0", "host:x", ":10"):
        with pytest.raises(ValueError, match="host:port"):
            parse_host_port(bad)


def test_one_reading_per_epoch_with_rmc_speed_and_gga_quality() -> None:
    merger = EpochMerger(hold_s=0.5, monotonic=FakeMonotonic())
    out = [merger.add(f) for f in fixes(GGA_1, GSA, RMC_1, GGA_2, RMC_2)]
    done = [r for r in out if r is not None]
    assert len(done) == 1, "the second epoch's GGA closes the first epoch"
    first = done[0]
    assert first.fix
    assert first.lat_deg == pytest.approx(-(37 + 47.0873 / 60))
    assert first.lon_deg == pytest.approx(175 + 18.8938 / 60)
    assert first.speed_mps == pytest.approx(0.69 * 1852 / 3600)
    assert first.heading_deg == pytest.approx(181.39)
    assert (first.hdop, first.fix_quality) == (1.1, 1)
    assert first.device_time == datetime(2014, 12, 31, 3, 7, 19, tzinfo=UTC)
    assert not first.clock_suspect
    second = merger.flush()
    assert second is not None
    assert second.device_time == datetime(2014, 12, 31, 3, 7, 20, tzinfo=UTC)
    assert merger.flush() is None


def test_ff05_no_fix_epoch_has_no_position_never_null_island() -> None:
    reading = merge_epoch(fixes(NO_FIX_RMC, NO_FIX_GGA))
    assert not reading.fix
    assert (reading.lat_deg, reading.lon_deg, reading.speed_mps) == (None, None, None)
    assert reading.fix_quality == 0


def test_epoch_where_sentences_disagree_is_not_trusted() -> None:
    gga_no_fix = nmea("GPGGA,030719.000,3747.0873,S,17518.8938,E,0,08,1.1,59.9,M,23.7,M,,0000")
    reading = merge_epoch(fixes(RMC_1, gga_no_fix))
    assert not reading.fix
    assert reading.lat_deg is None


def test_ff07_clock_suspect_is_carried() -> None:
    # the same epoch received 1024 weeks later: snapped and flagged
    later = RECEIVED + timedelta(weeks=1024)
    reading = merge_epoch(fixes(GGA_1, RMC_1, received=later))
    assert reading.clock_suspect
    assert reading.fix
    assert reading.device_time == datetime(2014, 12, 31, 3, 7, 19, tzinfo=UTC) + timedelta(weeks=1024)


def test_undated_sentences_are_closed_by_the_hold_deadline() -> None:
    clock = FakeMonotonic()
    merger = EpochMerger(hold_s=0.5, monotonic=clock)
    assert merger.add(fixes(NO_FIX_RMC)[0]) is None
    assert not merger.due()
    clock.now += 0.6
    assert merger.due()
    done = merger.add(fixes(NO_FIX_RMC)[0])  # same (empty) key, but the epoch is overdue
    assert done is not None
    assert not done.fix


MDC_NUMERICS = "\r".join(
    [
        "MSH|^~\\&|MONITOR|AMB12|GOLDENHOUR|VEH|20250314093015+0000||ORU^R01^ORU_R01|MSG1|P|2.6",
        "OBR|1||VS1|69965^MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS^MDC|||20250314093000+0000",
        "OBX|1|NM|150021^MDC_PRESS_BLD_NONINV_SYS^MDC|1.1.1.5|92|266016^MDC_DIM_MMHG^MDC|||||F",
        "OBX|2|NM|150022^MDC_PRESS_BLD_NONINV_DIA^MDC|1.1.1.6|58|266016^MDC_DIM_MMHG^MDC|||||F",
        "OBX|3|NM|147842^MDC_ECG_HEART_RATE^MDC|1.2.1.1|118|264864^MDC_DIM_BEAT_PER_MIN^MDC|||||F",
        "OBX|4|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1.3.1.1|91|262688^MDC_DIM_PERCENT^MDC|||||F",
        "OBX|5|NM|151708^MDC_AWAY_CO2_ET^MDC|1.4.1.1|4.7|265987^MDC_DIM_KILO_PASCAL^MDC|||||F",
        "OBX|6|NM|8310-5^Body temperature^LN|1|98.6|[degF]^degF^UCUM|||||F",
        "OBX|7|NM|9279-1^Respiratory rate^LN|1|24|/min^/min^UCUM|||||F",
    ]
)


def test_monitor_group_becomes_a_reading_in_contract_units() -> None:
    report = read_monitor_report(parse_message(MDC_NUMERICS))
    assert len(report.groups) == 1
    reading = reading_from_group(report.groups[0])
    assert reading.measured_at == datetime(2025, 3, 14, 9, 30, tzinfo=UTC)
    assert (reading.sbp_mmhg, reading.dbp_mmhg) == (92, 58)
    assert (reading.heart_rate_bpm, reading.heart_rate_source) == (118, "ecg")
    assert reading.spo2_pct == 91
    assert reading.etco2_mmhg == pytest.approx(4.7 * 1000 / 133.322387415)
    assert reading.temp_c == pytest.approx(37.0)
    assert reading.resp_rate_per_min == 24


def alarm(phase: str, control_id: str, priority: str = "PH") -> str:
    return "\r".join(
        [
            f"MSH|^~\\&|MONITOR|AMB12|GOLDENHOUR|VEH|20250314093015+0000||ORU^R40^ORU_R40|{control_id}|P|2.6",
            "OBR|1|1^MONITOR|ALM7^MONITOR|196616^MDC_EVT_ALARM^MDC|||20250314093015+0000",
            "OBX|1|CWE|196616^MDC_EVT_ALARM^MDC|1.0.0.0.1|196648^MDC_EVT_HI^MDC^^^^^^SpO2 low 85|||||F",
            f"OBX|2|ST|68481^MDC_ATTR_EVENT_PHASE^MDC|1.0.0.0.2|{phase}||||||F",
            "OBX|3|ST|68482^MDC_ATTR_ALARM_STATE^MDC|1.0.0.0.3|active||||||F",
            f"OBX|4|ST|68484^MDC_ATTR_ALARM_PRIORITY^MDC|1.0.0.0.4|{priority}||||||F",
            "OBX|5|ST|68485^MDC_ATTR_ALERT_TYPE^MDC|1.0.0.0.5|SP||||||F",
        ]
    )


def test_pcd04_alarms_are_counted_and_listed_until_they_end() -> None:
    alarms = MonitorAlarms()
    alarms.update(read_alarm_report(parse_message(alarm("start", "A1"))))
    alarms.update(read_alarm_report(parse_message(alarm("continue", "A2"))))
    summary = alarms.summary()
    assert (summary.reports, summary.alarms, summary.by_priority) == (2, 1, {"high": 1})
    assert len(summary.active) == 1
    active = summary.active[0]
    assert (active.event_code, active.priority, active.alert_type) == (196648, Priority.HIGH, "SP")
    assert active.text == "SpO2 low 85"
    alarms.update(read_alarm_report(parse_message(alarm("end", "A3"))))
    assert alarms.summary().active == ()
    assert alarms.summary().alarms == 1
