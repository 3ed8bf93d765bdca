"""The contract tested as a contract: topics, round trips, golden JSON, and the shared robustness cases."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import wfdb
from pydantic import ValidationError

from broker_config import (
    STREAMS,
    AlertAck,
    AlertState,
    Availability,
    CaseType,
    EcgChunk,
    Findings,
    GpsFix,
    PayloadError,
    PreAlert,
    Scope,
    Stream,
    TopicError,
    TopicSpace,
    Vitals,
    decode,
    encode,
)
from broker_config.codec import EcgEncoding, decode_ecg, encode_ecg

ROOT = Path(__file__).resolve().parents[2]
RECORD = ROOT / "simulators" / "data" / "mitdb" / "100"
T0 = datetime(2026, 11, 30, 9, 30, tzinfo=UTC)
SPACE = TopicSpace()


def _vitals(**kw: object) -> Vitals:
    base: dict[str, object] = {"unit_id": "AMB1", "seq": 7, "sent_at": T0, "measured_at": T0, "heart_rate_bpm": 118}
    base.update(kw)
    return Vitals.model_validate(base)


def _ecg(seconds: float = 1.0, start_s: float = 0.0, unit: str = "AMB1") -> EcgChunk:
    rec = wfdb.rdrecord(str(RECORD), physical=False, sampfrom=int(start_s * 360), sampto=int((start_s + seconds) * 360))
    return EcgChunk(
        unit_id=unit,
        seq=3,
        sent_at=T0,
        start_at=T0,
        fs_hz=rec.fs,
        leads=tuple(rec.sig_name),
        gain_adc_per_mv=rec.adc_gain[0],
        baseline_adc=rec.baseline[0],
        samples=rec.d_signal.T,
    )


# --- topics ------------------------------------------------------------------------------------------------------


def test_topics_carry_only_opaque_ids_and_parse_back() -> None:
    topic = SPACE.unit("AMB-12", Stream.VITALS)
    assert topic == "ems/v1/unit/AMB-12/vitals"
    parsed = SPACE.parse(topic)
    assert (parsed.scope, parsed.owner_id, parsed.stream) == (Scope.UNIT, "AMB-12", Stream.VITALS)
    assert SPACE.topic(Stream.ALERT, "MC-CHPG") == "ems/v1/hospital/MC-CHPG/alert"
    assert SPACE.matches(SPACE.filter(Stream.ECG), "ems/v1/unit/X/ecg")
    assert SPACE.matches(SPACE.all_of_scope(Scope.UNIT), topic)


@pytest.mark.parametrize("bad_id", ["", "a/b", "+", "#", "Jane Doe", "x" * 33, "é"])
def test_ids_that_could_leak_or_break_topics_are_refused(bad_id: str) -> None:
    with pytest.raises(TopicError):
        SPACE.unit(bad_id, Stream.VITALS)


@pytest.mark.parametrize(
    "topic",
    [
        "ems/v1/unit/AMB1",
        "ems/v1/unit/AMB1/vitals/extra",
        "ems/v1/unit/AMB1/nonsense",
        "ems/v1/hospital/AMB1/vitals",
        "ems/v2/unit/AMB1/vitals",
        "other/unit/AMB1/vitals",
    ],
)
def test_off_grammar_topics_are_refused(topic: str) -> None:
    with pytest.raises(TopicError):
        SPACE.parse(topic)


def test_prefix_isolates_test_topic_spaces() -> None:
    space = TopicSpace(prefix="t42/")
    assert space.unit("A", Stream.GPS) == "t42/ems/v1/unit/A/gps"
    with pytest.raises(TopicError):
        SPACE.parse(space.unit("A", Stream.GPS))
    with pytest.raises(TopicError):
        TopicSpace(prefix="t#/")


def test_every_stream_has_a_policy_and_a_decodable_model() -> None:
    from broker_config.codec import MODELS

    assert set(STREAMS) == set(Stream)
    assert set(MODELS) == set(Stream) - {Stream.VIDEO}
    assert STREAMS[Stream.AVAILABILITY].retain
    assert STREAMS[Stream.STATUS].retain
    assert all(STREAMS[s].qos == 1 for s in Stream if s is not Stream.VIDEO)
    assert STREAMS[Stream.VIDEO].qos == 0


def test_no_module_outside_the_contract_spells_a_topic() -> None:
    """Every topic comes from broker_config.topics (STYLE.md anti-pattern 3)."""
    out = subprocess.run(
        ["git", "grep", "-n", "-I", "-E", r"[\"'](\$share/)?ems/v[0-9]", "--", "*.py", "*.js", "*.html"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    offenders = [line for line in out.stdout.splitlines() if not line.startswith(("broker_config/topics.py", "tests/"))]
    assert offenders == []


# --- round trips and golden JSON ---------------------------------------------------------------------------------


def test_vitals_golden_json_catches_accidental_renames() -> None:
    data = json.loads(encode(Stream.VITALS, _vitals(spo2_pct=94, sbp_mmhg=92, dbp_mmhg=58)))
    assert data == {
        "schema_version": 1,
        "unit_id": "AMB1",
        "seq": 7,
        "sent_at": "2026-11-30T09:30:00Z",
        "historical": False,
        "measured_at": "2026-11-30T09:30:00Z",
        "heart_rate_bpm": 118.0,
        "heart_rate_source": None,
        "spo2_pct": 94.0,
        "sbp_mmhg": 92.0,
        "dbp_mmhg": 58.0,
        "map_mmhg": None,
        "resp_rate_per_min": None,
        "etco2_mmhg": None,
        "temp_c": None,
    }


def test_json_round_trip_of_every_kind() -> None:
    messages = [
        (Stream.VITALS, _vitals()),
        (Stream.AVAILABILITY, Availability(unit_id="AMB1", seq=2, sent_at=T0, state="online")),
        (Stream.GPS, GpsFix(unit_id="AMB1", seq=1, sent_at=T0, fix=True, lat_deg=43.73, lon_deg=7.42)),
        (Stream.GPS, GpsFix(unit_id="AMB1", seq=2, sent_at=T0, fix=False)),
        (
            Stream.PREALERT,
            PreAlert(
                unit_id="AMB1",
                seq=0,
                sent_at=T0,
                alert_id="a1",
                case_type=CaseType.STEMI,
                findings=Findings(age_years=64, sex="male", ecg_st_elevation=True, note="St Mary's <unknown> & `x`"),
            ),
        ),
        (
            Stream.ACK,
            AlertAck(
                unit_id="AMB1", seq=0, sent_at=T0, alert_id="a1", hospital_id="H1", state=AlertState.ON_BOARD, at=T0
            ),
        ),
    ]
    for stream, message in messages:
        owner = getattr(message, "hospital_id", None) if STREAMS[stream].scope is Scope.HOSPITAL else message.unit_id
        parsed, back = decode(SPACE, SPACE.topic(stream, owner), encode(stream, message))
        assert parsed.stream is stream
        assert back == message


def test_times_are_normalised_to_utc_and_naive_times_refused() -> None:
    local = datetime(2026, 11, 30, 10, 30, tzinfo=UTC).astimezone(tz=None).replace(tzinfo=None)
    with pytest.raises(ValidationError):
        _vitals(measured_at=local)
    cet = datetime(2026, 11, 30, 10, 30, tzinfo=__import__("zoneinfo").ZoneInfo("Europe/Monaco"))
    assert _vitals(measured_at=cet).measured_at == datetime(2026, 11, 30, 9, 30, tzinfo=UTC)


def test_no_fix_is_never_null_island() -> None:
    with pytest.raises(ValidationError):
        GpsFix(unit_id="A", seq=0, sent_at=T0, fix=False, lat_deg=0.0, lon_deg=0.0)
    with pytest.raises(ValidationError):
        GpsFix(unit_id="A", seq=0, sent_at=T0, fix=True)


# --- ECG binary encoding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [EcgEncoding.RAW_INT16, EcgEncoding.DELTA_ZLIB])
def test_ecg_chunk_is_lossless_on_a_real_record(encoding: int) -> None:
    chunk = _ecg(seconds=2.0, start_s=100.0)
    back = decode_ecg(encode_ecg(chunk, encoding=encoding))
    assert np.array_equal(back.samples, chunk.samples)
    assert (back.fs_hz, back.leads, back.gain_adc_per_mv, back.baseline_adc) == (360.0, ("MLII", "V5"), 200.0, 1024)
    assert back.start_at == chunk.start_at
    assert back.seq == chunk.seq
    assert back.unit_id == "AMB1"


def test_ecg_compression_stays_under_one_byte_per_sample_on_mitbih() -> None:
    total_bytes = total_samples = 0
    for k in range(30):
        chunk = _ecg(seconds=1.0, start_s=float(k * 7))
        total_bytes += len(encode(Stream.ECG, chunk))
        total_samples += chunk.samples.size
    assert total_bytes / total_samples < 1.0


def test_ecg_extreme_values_survive_the_wrapping_delta() -> None:
    samples = np.array([[32767, -32768, 32767, 0, -1], [-32768, 32767, -32768, 1, 0]], dtype=np.int16)
    chunk = EcgChunk(
        unit_id="A", seq=0, sent_at=T0, start_at=T0, fs_hz=500, leads=("I", "II"), gain_adc_per_mv=1000,
        baseline_adc=0, samples=samples, lead_off=(False, True),
    )  # fmt: skip
    back = decode_ecg(encode_ecg(chunk))
    assert np.array_equal(back.samples, samples)
    assert back.lead_off == (False, True)


def test_ecg_chunk_requires_a_sampling_rate_and_consistent_shape() -> None:
    with pytest.raises(ValidationError):
        EcgChunk(unit_id="A", seq=0, sent_at=T0, start_at=T0, fs_hz=0, leads=("I",), gain_adc_per_mv=200,
                 baseline_adc=0, samples=np.zeros((1, 10), dtype=np.int16))  # fmt: skip
    with pytest.raises(ValidationError):
        EcgChunk(unit_id="A", seq=0, sent_at=T0, start_at=T0, fs_hz=360, leads=("I", "II"), gain_adc_per_mv=200,
                 baseline_adc=0, samples=np.zeros((1, 10), dtype=np.int16))  # fmt: skip
    with pytest.raises(ValidationError):
        EcgChunk(unit_id="A", seq=0, sent_at=T0, start_at=T0, fs_hz=360, leads=("I",), gain_adc_per_mv=200,
                 baseline_adc=0, samples=np.array([[0.5, 1.5]]))  # fmt: skip


# --- robustness: every malformed payload is a PayloadError with a clear reason ----------------------------------


def _malformed_cases() -> list[tuple[str, Stream, bytes, str]]:
    good_vitals = encode(Stream.VITALS, _vitals())
    good_ecg = encode(Stream.ECG, _ecg())
    wrong_version = json.loads(good_vitals)
    wrong_version["schema_version"] = 2
    wrong_types = json.loads(good_vitals)
    wrong_types["heart_rate_bpm"] = "fast"
    other_unit = json.loads(good_vitals)
    other_unit["unit_id"] = "AMB9"
    return [
        ("truncated json", Stream.VITALS, good_vitals[: len(good_vitals) // 2], "not valid JSON"),
        ("wrong types", Stream.VITALS, json.dumps(wrong_types).encode(), "invalid fields: heart_rate_bpm"),
        ("wrong schema version", Stream.VITALS, json.dumps(wrong_version).encode(), "unsupported schema_version"),
        ("non-utf8", Stream.VITALS, b'{"schema_version": 1, "unit_id": "\xff\xfe"}', "not valid UTF-8"),
        ("oversized", Stream.VITALS, b" " * 10_000, "exceeds"),
        ("json array", Stream.VITALS, b"[1, 2]", "not a JSON object"),
        ("misattributed", Stream.VITALS, json.dumps(other_unit).encode(), "does not match the topic"),
        ("truncated ecg header", Stream.ECG, good_ecg[:20], "truncated"),
        ("truncated ecg body", Stream.ECG, good_ecg[:-10], "compressed samples"),
        ("ecg bad magic", Stream.ECG, b"XXXX" + good_ecg[4:], "bad magic"),
        ("ecg as json", Stream.ECG, good_vitals, "bad magic"),
        ("oversized ecg", Stream.ECG, b"\0" * 300_000, "exceeds"),
    ]


@pytest.mark.parametrize(
    ("name", "stream", "payload", "reason"), _malformed_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_malformed_payloads_are_rejected_with_a_clear_reason(
    name: str, stream: Stream, payload: bytes, reason: str
) -> None:
    topic = SPACE.unit("AMB1", stream)
    with pytest.raises(PayloadError) as info:
        decode(SPACE, topic, payload)
    assert reason in info.value.reason
    assert info.value.topic == topic


def test_consumers_ignore_unknown_fields_but_producers_refuse_them() -> None:
    data = json.loads(encode(Stream.VITALS, _vitals()))
    data["future_field"] = 1
    _, model = decode(SPACE, SPACE.unit("AMB1", Stream.VITALS), json.dumps(data).encode())
    assert isinstance(model, Vitals)
    with pytest.raises(ValidationError):
        Vitals.model_validate({**data})


def test_an_ecg_bomb_cannot_inflate_past_its_declared_size() -> None:
    import struct
    import zlib

    head = bytearray(encode_ecg(_ecg(seconds=0.1))[:58])
    struct.pack_into("<I", head, 52, 10)  # declare 10 samples per lead
    body = zlib.compress(b"\0" * 10_000_000)
    payload = bytes(head) + b"AMB1" + b"\x04MLII\x02V5" + body
    with pytest.raises(PayloadError, match="do not match"):
        decode_ecg(payload)


def test_sent_at_far_from_now_is_still_accepted_as_data() -> None:
    """Clock sanity is the consumer's job (FF-07); the codec does not drop old or future messages."""
    old = _vitals(sent_at=T0 - timedelta(days=7168), measured_at=T0 - timedelta(days=7168))
    _, back = decode(SPACE, SPACE.unit("AMB1", Stream.VITALS), encode(Stream.VITALS, old))
    assert back == old


def test_every_reject_names_its_kind_for_counting() -> None:
    from broker_config import RejectKind

    kinds = set()
    for _name, stream, payload, _reason in _malformed_cases():
        with pytest.raises(PayloadError) as info:
            decode(SPACE, SPACE.unit("AMB1", stream), payload)
        kinds.add(info.value.kind)
    assert {RejectKind.MALFORMED, RejectKind.INVALID_FIELDS, RejectKind.SCHEMA_VERSION, RejectKind.NOT_UTF8,
            RejectKind.OVERSIZED, RejectKind.UNIT_MISMATCH} <= kinds  # fmt: skip


def test_a_tiny_ecg_packet_cannot_declare_megabytes_of_samples() -> None:
    """Hostile-tester case: 16 leads x 65,536 zero samples compress to ~2 kB but would store ~2 MB."""
    chunk = EcgChunk(
        unit_id="AMB7", seq=0, sent_at=T0, start_at=T0, fs_hz=500, leads=tuple(f"L{i}" for i in range(16)),
        gain_adc_per_mv=200, baseline_adc=0, samples=np.zeros((16, 65_536), dtype=np.int16),
    )  # fmt: skip
    payload = encode_ecg(chunk)
    assert len(payload) < 5_000
    with pytest.raises(PayloadError, match="impossible sample count"):
        decode(SPACE, SPACE.unit("AMB7", Stream.ECG), payload)
    long_chunk = chunk.model_copy(update={"samples": np.zeros((1, 6_000), dtype=np.int16), "leads": ("I",)})
    with pytest.raises(PayloadError, match="longer than"):
        decode(SPACE, SPACE.unit("AMB7", Stream.ECG), encode_ecg(long_chunk))


def test_a_topic_cannot_forge_log_lines() -> None:
    topic = "ems/v1/unit/AMB1\n02:00:00 INFO    FORGED heart_rate=188/vitals"
    with pytest.raises(PayloadError) as info:
        decode(SPACE, topic, b"{}")
    assert "\n" not in info.value.topic
    assert "\n" not in str(info.value)


def test_a_device_clock_far_in_the_future_is_refused_by_consumers() -> None:
    """Hostile-tester case: one vitals message dated 9999 froze the board's "latest wins" HR for good."""
    from datetime import datetime as dt

    from broker_config import RejectKind

    received = T0
    future = _vitals(measured_at=dt(9999, 12, 31, 23, 59, 59, tzinfo=UTC), sent_at=T0)
    topic = SPACE.unit("AMB1", Stream.VITALS)
    with pytest.raises(PayloadError) as info:
        decode(SPACE, topic, encode(Stream.VITALS, future), received_at=received)
    assert info.value.kind is RejectKind.CLOCK
    slightly_ahead = _vitals(measured_at=T0 + timedelta(seconds=60), sent_at=T0 + timedelta(seconds=60))
    decode(SPACE, topic, encode(Stream.VITALS, slightly_ahead), received_at=received)  # replay pace, small skew
