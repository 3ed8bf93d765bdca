"""Property tests: any bytes or text into the HL7 front end, the MLLP deframer and the NMEA reader is either
accepted or rejected with the adapter's own error, never an uncaught exception and never a hang."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import reduce
from operator import xor

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ambulance_agent.devices.hl7_message import (
    AckCode,
    Hl7InputError,
    normalise_segments,
    parse_message,
    read_ack,
)
from ambulance_agent.devices.hl7_monitor import Hl7MonitorInput
from ambulance_agent.devices.mllp import MllpDecoder, frame
from ambulance_agent.devices.nmea_gps import NmeaGpsReader, NmeaInputError

RECEIVED = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)
FAST = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])

ALARM_SEGMENTS = [
    "MSH|^~\\&|PUMP^0012211839000001^EUI-64|BBRAUN|||20120109175417-0600||ORU^R40^ORU_R40|634617|P|2.6",
    "OBR|1|6346^PUMP|P6013_4^PUMP|196616^MDC_EVT_ALARM^MDC|||20120109175417-0600",
    "OBX|1|CWE|196616^MDC_EVT_ALARM^MDC|1.0.0.0.1|196940^MDC_EVT_FLUID_LINE_OCCL^MDC^^^^^^Occlusion|||ST|||F",
    "OBX|2|CWE|68480^MDC_ATTR_ALERT_SOURCE^MDC|1.0.0.0.2|69985^MDC_DEV_PUMP_INFUS_MDS^MDC||||||F",
    "OBX|3|ST|68481^MDC_ATTR_EVENT_PHASE^MDC|1.0.0.0.3|start||||||F",
    "OBX|4|ST|68484^MDC_ATTR_ALARM_PRIORITY^MDC|1.0.0.0.4|PH||||||F",
]
SEGMENTS = [
    "MSH|^~\\&|MONITOR|AMB12|EDBOARD|CITYHOSP|20250314093015||ORU^R01^ORU_R01|MSG00042|P|2.6",
    "OBR|1||VS0042|85353-1^Vital signs panel^LN|||20250314093000",
    "OBX|1|NM|8867-4^Heart rate^LN||118|/min^/min^UCUM|||||F",
    "OBX|2|NM|150021^MDC_PRESS_BLD_NONINV_SYS^MDC|1.1.1.1|120|266016^MDC_DIM_MMHG^MDC|||||F|||20250314093000+0100",
    "OBX|3|NM|150022^MDC_PRESS_BLD_NONINV_DIA^MDC|1.1.1.2|80|mm[Hg]^^UCUM|||||F|||20250314093000+0100",
    "OBX|4|ST|184327^MDC_ECG_STAT_RHY^MDC|1.2.1.21|MDC_ECG_SINUS_RHY",
]
HL7_ALPHABET = st.sampled_from(
    [*"|^~\\&\r\n MSHOBXR0123456789.+-AZaz{}[]%/", "\x0b", "\x1c", "é", "\x00", "\u00b2", "\u0661"]
)
NMEA_SAMPLE = "$GPRMC,101530.00,A,4807.0380,N,01131.0000,E,0.0,0.0,141000,,,A*5E"
NMEA_ALPHABET = st.sampled_from([*"$!*,.0123456789ABCDEFNSEWVGPRMCGA\r\n# ", "\x00", "é"])


def check_hl7_boundary(raw: bytes | str) -> None:
    try:
        parsed = parse_message(raw)
    except Hl7InputError:
        pass
    else:
        assert parsed.segment_ids[0] == "MSH"
        assert "\n" not in parsed.text
    outcome = Hl7MonitorInput(clock=lambda: RECEIVED).handle(raw)
    if outcome.ack is not None:
        assert read_ack(outcome.ack).code in (AckCode.AA, AckCode.AE, AckCode.AR)


@FAST
@given(st.binary(max_size=2000))
def test_hl7_arbitrary_bytes(raw: bytes) -> None:
    check_hl7_boundary(raw)


@FAST
@given(st.text(max_size=2000))
def test_hl7_arbitrary_text(raw: str) -> None:
    check_hl7_boundary(raw)


@FAST
@given(st.text(HL7_ALPHABET, max_size=600))
def test_hl7_text_from_hl7_characters(raw: str) -> None:
    check_hl7_boundary("MSH|^~\\&|" + raw)


@FAST
@given(st.lists(st.sampled_from(SEGMENTS[1:]), max_size=8), st.sampled_from(["\r", "\n", "\r\n", "\n\n"]))
def test_hl7_valid_messages_in_any_terminator_style(segments: list[str], terminator: str) -> None:
    raw = terminator.join([SEGMENTS[0], *segments]) + terminator
    parsed = parse_message(raw)
    assert len(parsed.segment_ids) == 1 + len(segments)
    outcome = Hl7MonitorInput(clock=lambda: RECEIVED).handle(raw)
    has_obx = any(s.startswith("OBX") for s in segments)
    assert outcome.ack_code is (AckCode.AA if has_obx else AckCode.AE)


@FAST
@given(st.data(), st.sampled_from([SEGMENTS, ALARM_SEGMENTS]))
def test_hl7_mutated_real_message(data: st.DataObject, segments: list[str]) -> None:
    raw = bytearray("\r".join(segments).encode())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if action == "flip":
            raw[pos] = data.draw(st.integers(0, 255))
        elif action == "delete":
            del raw[pos]
        else:
            raw.insert(pos, data.draw(st.integers(0, 255)))
        if not raw:
            break
    check_hl7_boundary(bytes(raw))


@FAST
@given(st.text(max_size=500))
def test_normaliser_only_raises_its_own_error(raw: str) -> None:
    try:
        text = normalise_segments(raw)
    except Hl7InputError:
        return
    assert text.endswith("\r")
    assert "\n" not in text
    assert "\r\r" not in text


@FAST
@given(st.lists(st.binary(max_size=60), max_size=6), st.lists(st.integers(0, 400), max_size=10))
def test_mllp_frames_survive_any_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    payloads = [p.replace(b"\x0b", b"").replace(b"\x1c", b"") for p in payloads]
    stream = b"".join(frame(p) for p in payloads)
    decoder = MllpDecoder()
    out: list[bytes] = []
    previous = 0
    for cut in sorted({min(c, len(stream)) for c in cuts}):
        out += decoder.feed(stream[previous:cut])
        previous = cut
    out += decoder.feed(stream[previous:])
    assert out == payloads


@FAST
@given(st.binary(max_size=3000))
def test_mllp_decoder_accepts_any_bytes(data: bytes) -> None:
    decoder = MllpDecoder(max_frame_bytes=512)
    frames = decoder.feed(data)
    assert all(len(f) <= 512 for f in frames)


def check_nmea_boundary(line: str | bytes) -> None:
    reader = NmeaGpsReader(clock=lambda: RECEIVED)
    try:
        fix = reader.parse_line(line)
    except NmeaInputError:
        fix = None
    if fix is not None:
        assert fix.fix == (fix.lat_deg is not None)
        fix.to_gps_fix(unit_id="amb-1", seq=0, sent_at=RECEIVED)
    assert reader.feed(line) == fix or fix is None


@FAST
@given(st.binary(max_size=200))
def test_nmea_arbitrary_bytes(line: bytes) -> None:
    check_nmea_boundary(line)


@FAST
@given(st.text(max_size=200))
def test_nmea_arbitrary_text(line: str) -> None:
    check_nmea_boundary(line)


@FAST
@given(st.text(NMEA_ALPHABET, max_size=120))
def test_nmea_text_from_nmea_characters(body: str) -> None:
    check_nmea_boundary(body)
    clean = body.replace("$", "").replace("*", "").replace("!", "")
    if clean.isascii() and clean.isprintable():
        # With a correct checksum, anything still goes through the field checks without escaping them.
        check_nmea_boundary(f"${clean}*{reduce(xor, clean.encode(), 0):02X}")


@FAST
@given(st.data())
def test_nmea_mutated_sentences_with_recomputed_checksums(data: st.DataObject) -> None:
    fields = NMEA_SAMPLE[1:-3].split(",")
    index = data.draw(st.integers(0, len(fields) - 1))
    fields[index] = data.draw(st.text(st.sampled_from(list("0123456789.-+NSEWAV ")), max_size=12))
    if data.draw(st.booleans()):
        fields = fields[: data.draw(st.integers(1, len(fields)))]
    body = ",".join(fields)
    check_nmea_boundary(f"${body}*{reduce(xor, body.encode(), 0):02X}")


@FAST
@given(st.lists(st.one_of(st.text(max_size=100), st.binary(max_size=100)), max_size=30))
def test_nmea_reader_never_raises_on_a_stream_of_junk(lines: list[str | bytes]) -> None:
    reader = NmeaGpsReader(clock=lambda: RECEIVED)
    fixes = list(reader.read_lines([*lines, NMEA_SAMPLE]))
    assert fixes[-1].fix
