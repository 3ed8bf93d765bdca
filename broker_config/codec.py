"""The only place where bytes meet models: encode and decode every stream, with one error type.

JSON streams
    UTF-8 JSON of the pydantic model.  Decoding is tolerant of unknown fields (ignored) and strict about
    everything else: size, UTF-8, schema version, types, and that the id inside the payload is the id in the
    topic (a message from unit A under unit B's topic is refused, never misattributed).

ECG chunks (``GHE1`` binary layout, little-endian)
    ====== ===== ==================================================================================
    offset bytes field
    ====== ===== ==================================================================================
    0      4     magic ``b"GHE1"``
    4      1     schema_version (1)
    5      1     flags: bit 0 historical, bit 1 lead-off reported, bit 2 limb-lead residuals, bit 3 saturation
                 reported, bits 4-7 sample encoding
    6      1     n_leads (1-16)
    7      1     length U of unit_id (1-32)
    8      8     seq (uint64)
    16     8     sent_at, microseconds since 1970-01-01 UTC (int64)
    24     8     start_at (time of the first sample), microseconds since 1970-01-01 UTC (int64)
    32     8     fs_hz (float64)
    40     8     gain_adc_per_mv (float64)
    48     4     baseline_adc (int32)
    52     4     n_samples per lead (uint32)
    56     2     lead-off bit mask (uint16), bit i = lead i
    58     U     unit_id, ASCII
    ...          per lead: 1 byte name length L, then L bytes ASCII name
    ...    2     saturation bit mask (uint16), bit i = lead i at the ADC's rail; present only when flag bit 3 is set
    ...          samples, lead-major, by encoding:
                 0 = raw int16;
                 1 = lossless "delta-zlib": per lead the first difference of the int16 samples taken
                     modulo 2**16 (so it always fits int16 and the running sum restores every value), the
                     low bytes of all deltas then the high bytes (byte planes), compressed with zlib.
    ====== ===== ==================================================================================

Limb-lead residuals (flag bit 2, optional, off by default; chunks without it decode as before): in a chunk with
leads I and II (names case-insensitive), leads III, aVR, aVL and aVF are sent as their difference from what
Einthoven's and Goldberger's relations predict from I and II (III = II - I, aVR = -(I + II)/2, aVL = I - II/2,
aVF = II - I/2; Goldberger, Am Heart J 1942), computed on the ADC integers about ``baseline_adc`` with floor
division, the difference taken modulo 2**16 so it always fits int16.  A monitor that derives those leads leaves
residuals of rounding noise, which compress to little; any other input still decodes exactly (the decoder adds the
same prediction back, modulo 2**16).  Applied to the samples before the sample encoding.

Lead-off and saturation (flag bits 1 and 3) only flag leads: the samples are never altered.  A chunk without
saturation reported has no saturation mask and is byte-for-byte what it was before bit 3 existed.

Samples must fit in int16 (every ECG ADC in use is 16 bits or fewer: MIT-BIH 11 bits, PTB 16 bits).
Decompression is bounded by the declared sample count, so a small packet cannot inflate into a large one.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from broker_config.payloads import (
    SCHEMA_VERSION,
    AlertAck,
    Availability,
    EcgChunk,
    GapRecord,
    GpsFix,
    HospitalAlert,
    Notice,
    PreAlert,
    Status,
    StoreReceipt,
    Vitals,
)
from broker_config.topics import ID_PATTERN, STREAMS, ParsedTopic, Scope, Stream, TopicError, TopicSpace, loggable

__all__ = [
    "ECG_MAGIC",
    "RejectKind",
    "EcgEncoding",
    "MODELS",
    "PayloadError",
    "decode",
    "EcgHead",
    "check_ecg",
    "decode_ecg",
    "decode_ecg_samples",
    "read_ecg_head",
    "encode",
    "encode_ecg",
    "decode_as",
    "ecg_to_mv",
]

T = TypeVar("T", bound=BaseModel)


class RejectKind(StrEnum):
    """Why a payload was refused: the label consumers count rejects under."""

    TOPIC = "topic"
    OVERSIZED = "oversized"
    NOT_UTF8 = "not_utf8"
    MALFORMED = "malformed"
    SCHEMA_VERSION = "schema_version"
    INVALID_FIELDS = "invalid_fields"
    UNIT_MISMATCH = "unit_mismatch"
    WRONG_MODEL = "wrong_model"
    CLOCK = "clock"


class PayloadError(ValueError):
    """A payload that cannot be accepted.  ``topic``, ``kind`` and ``reason`` are safe to log (no health data)."""

    def __init__(self, topic: str, reason: str, kind: RejectKind = RejectKind.MALFORMED) -> None:
        super().__init__(f"{reason} (topic {loggable(topic)})")
        self.topic = loggable(topic)
        self.reason = reason
        self.kind = kind


MODELS: dict[Stream, type[BaseModel]] = {
    Stream.AVAILABILITY: Availability,
    Stream.STATUS: Status,
    Stream.VITALS: Vitals,
    Stream.ECG: EcgChunk,
    Stream.GPS: GpsFix,
    Stream.PREALERT: PreAlert,
    Stream.NOTICE: Notice,
    Stream.ALERT: HospitalAlert,
    Stream.ACK: AlertAck,
    Stream.GAP: GapRecord,
    Stream.RECEIPT: StoreReceipt,
}
"""Payload model of each stream (video frames are opaque JPEG/H.264 bytes with their own header)."""

ECG_MAGIC = b"GHE1"
MAX_ECG_CHUNK_S = 10.0
"""Longest ECG chunk accepted, seconds (agents send 1-s chunks)."""
MAX_ECG_SAMPLES_PER_CHUNK = 16 * 10 * 1_000
"""Most samples (all leads) in one chunk: 16 leads x 10 s at 1 kHz.  Bounds what a small compressed packet may
inflate to in memory and on disk (a 2 kB packet of zeros must not become megabytes)."""
_HEAD = struct.Struct("<4sBBBBQqqddiIH")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LEAD_OFF = 2
"""Flag bit 1: the header's lead-off mask is reported."""
_LIMB_RESIDUALS = 4
"""Flag bit 2: leads III, aVR, aVL, aVF are residuals from I and II (see the module docstring)."""
_SATURATED = 8
"""Flag bit 3: a uint16 saturation mask follows the lead-name table."""
_MASK = struct.Struct("<H")
_DERIVED = ("iii", "avr", "avl", "avf")


class EcgEncoding:
    """Sample encodings of the GHE1 layout."""

    RAW_INT16 = 0
    DELTA_ZLIB = 1


# --- helpers -----------------------------------------------------------------------------------------------------


def _us(value: datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _tolerant(model: type[BaseModel], data: Any) -> Any:
    """Drop keys the model does not know, recursively into nested models (tolerant consumer)."""
    if not isinstance(data, dict):
        return data
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if name not in data:
            continue
        value = data[name]
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            value = _tolerant(annotation, value)
        out[name] = value
    return out


def _check_owner(topic: str, parsed: ParsedTopic, model: BaseModel) -> None:
    if parsed.scope is Scope.HOSPITAL:
        owner = getattr(model, "hospital_id", None)
        what = "hospital_id"
    else:
        owner = getattr(model, "unit_id", None)
        what = "unit_id"
    if owner != parsed.owner_id:
        raise PayloadError(topic, f"payload {what} does not match the topic", RejectKind.UNIT_MISMATCH)


# --- public API --------------------------------------------------------------------------------------------------


def encode(
    stream: Stream,
    message: BaseModel,
    *,
    ecg_encoding: int = EcgEncoding.DELTA_ZLIB,
    ecg_limb_residuals: bool = False,
) -> bytes:
    """Serialise ``message`` for ``stream``.  ECG chunks use the GHE1 layout (``ecg_limb_residuals``: see
    :func:`encode_ecg`), everything else JSON.

    Raises:
        PayloadError: the message is not of the stream's model, or is too large for the stream.
    """
    expected = MODELS.get(stream)
    if expected is None or not isinstance(message, expected):
        raise PayloadError(
            stream.value, f"{type(message).__name__} is not the model of stream {stream.value}", RejectKind.WRONG_MODEL
        )
    if isinstance(message, EcgChunk):
        data = encode_ecg(message, encoding=ecg_encoding, limb_residuals=ecg_limb_residuals)
    else:
        data = message.model_dump_json(exclude_defaults=False).encode()
    limit = STREAMS[stream].max_payload_bytes
    if len(data) > limit:
        raise PayloadError(
            stream.value, f"encoded payload {len(data)} B exceeds the {limit} B limit", RejectKind.OVERSIZED
        )
    return data


MAX_CLOCK_AHEAD_S = 300.0
"""A message whose own times are further ahead of its receive time than this is refused (FF-07 kind: a device
clock in the future would otherwise freeze "latest wins" displays and status for good)."""
_MESSAGE_TIME_FIELDS = ("sent_at", "measured_at", "at", "start_at", "device_time", "stored_at", "detected_at")


def _check_clock(topic: str, model: BaseModel, received_at: datetime) -> None:
    times = [v for name in _MESSAGE_TIME_FIELDS if isinstance(v := getattr(model, name, None), datetime)]
    if times and (max(times) - received_at).total_seconds() > MAX_CLOCK_AHEAD_S:
        raise PayloadError(
            topic, f"message time more than {MAX_CLOCK_AHEAD_S:.0f} s ahead of receipt", RejectKind.CLOCK
        )


def decode(
    space: TopicSpace, topic: str, payload: bytes, *, received_at: datetime | None = None
) -> tuple[ParsedTopic, BaseModel]:
    """Parse ``topic`` and decode ``payload`` into the stream's model.

    With ``received_at`` (the consumer's UTC clock), a message whose own times are more than
    :data:`MAX_CLOCK_AHEAD_S` ahead of it is refused with kind ``clock``.

    Returns:
        ``(parsed_topic, model)``; ``model`` is an instance of ``MODELS[parsed_topic.stream]``.

    Raises:
        PayloadError: with a reason safe to log, for an off-grammar topic, oversized payload, bad UTF-8,
            malformed JSON or binary, wrong schema version, wrong types, or an id that does not match the topic.
    """
    try:
        parsed = space.parse(topic)
    except TopicError as exc:
        raise PayloadError(topic, exc.reason, RejectKind.TOPIC) from None
    stream = parsed.stream
    limit = STREAMS[stream].max_payload_bytes
    if len(payload) > limit:
        raise PayloadError(topic, f"payload {len(payload)} B exceeds the {limit} B limit", RejectKind.OVERSIZED)
    model_cls = MODELS.get(stream)
    if model_cls is None:
        raise PayloadError(topic, f"stream {stream.value} has no decodable payload model", RejectKind.TOPIC)
    model = decode_ecg(payload, topic=topic) if stream is Stream.ECG else _decode_json(model_cls, payload, topic)
    _check_owner(topic, parsed, model)
    if received_at is not None:
        _check_clock(topic, model, received_at)
    return parsed, model


def decode_as(model_cls: type[T], space: TopicSpace, topic: str, payload: bytes) -> T:
    """:func:`decode`, and also check the result is a ``model_cls`` (else PayloadError)."""
    _, model = decode(space, topic, payload)
    if not isinstance(model, model_cls):
        raise PayloadError(topic, f"expected {model_cls.__name__}", RejectKind.WRONG_MODEL)
    return model


def _decode_json(model_cls: type[BaseModel], payload: bytes, topic: str) -> BaseModel:
    try:
        text = payload.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise PayloadError(topic, "payload is not valid UTF-8", RejectKind.NOT_UTF8) from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise PayloadError(topic, "payload is not valid JSON (truncated or malformed)") from None
    if not isinstance(data, dict):
        raise PayloadError(topic, "payload is not a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PayloadError(
            topic,
            f"unsupported schema_version {str(version)[:16]!r}, expected {SCHEMA_VERSION}",
            RejectKind.SCHEMA_VERSION,
        )
    try:
        return model_cls.model_validate(_tolerant(model_cls, data))
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in err["loc"]) or "(root)" for err in exc.errors()})
        raise PayloadError(topic, f"invalid fields: {', '.join(fields)[:200]}", RejectKind.INVALID_FIELDS) from None


def _limb_plan(leads: tuple[str, ...] | list[str]) -> tuple[int, int, list[tuple[int, str]]] | None:
    """(index of I, index of II, [(index, name) of each derivable limb lead]), or None if nothing to derive."""
    names = [n.lower() for n in leads]
    if "i" not in names or "ii" not in names:
        return None
    derived = [(k, n) for k, n in enumerate(names) if n in _DERIVED]
    return (names.index("i"), names.index("ii"), derived) if derived else None


def _limb_prediction(name: str, lead_i: np.ndarray, lead_ii: np.ndarray, baseline: int) -> np.ndarray:
    """The Einthoven/Goldberger prediction of a limb lead from I and II, in ADC integers (int64, floor division)."""
    a = lead_i.astype(np.int64) - baseline
    b = lead_ii.astype(np.int64) - baseline
    if name == "iii":
        d = b - a
    elif name == "avr":
        d = -((a + b) >> 1)
    elif name == "avl":
        d = a - (b >> 1)
    else:  # avf
        d = b - (a >> 1)
    return d + baseline


def _wrap16(values: np.ndarray) -> np.ndarray:
    """int64 values modulo 2**16 as int16 (two's complement)."""
    return (values & 0xFFFF).astype(np.uint16).view(np.int16)


def encode_ecg(chunk: EcgChunk, *, encoding: int = EcgEncoding.DELTA_ZLIB, limb_residuals: bool = False) -> bytes:
    """Pack an ECG chunk in the GHE1 binary layout (see the module docstring).

    With ``limb_residuals`` and leads I and II in the chunk, leads III, aVR, aVL and aVF travel as residuals from
    their Einthoven/Goldberger prediction (flag bit 2; lossless for any input).  Otherwise the flag stays clear.

    Raises:
        PayloadError: a sample outside int16, or a lead name or unit id that is not ASCII.
    """
    plan = _limb_plan(chunk.leads) if limb_residuals else None
    flags = (
        (1 if chunk.historical else 0)
        | (_LEAD_OFF if chunk.lead_off else 0)
        | (_LIMB_RESIDUALS if plan else 0)
        | (_SATURATED if chunk.saturated else 0)
        | (encoding << 4)
    )
    mask = sum(1 << i for i, off in enumerate(chunk.lead_off) if off)
    saturation = _MASK.pack(sum(1 << i for i, sat in enumerate(chunk.saturated) if sat)) if chunk.saturated else b""
    unit = chunk.unit_id.encode("ascii")
    head = _HEAD.pack(
        ECG_MAGIC,
        SCHEMA_VERSION,
        flags,
        len(chunk.leads),
        len(unit),
        chunk.seq,
        _us(chunk.sent_at),
        _us(chunk.start_at),
        chunk.fs_hz,
        chunk.gain_adc_per_mv,
        chunk.baseline_adc,
        chunk.n_samples,
        mask,
    )
    try:
        names = b"".join(bytes([len(n)]) + n.encode("ascii") for n in chunk.leads)
    except UnicodeEncodeError:
        raise PayloadError("ecg", "ECG lead names must be ASCII") from None
    i16 = chunk.samples.astype("<i2", copy=False)
    if plan is not None:
        i16 = i16.copy()
        k_i, k_ii, derived = plan
        for k, name in derived:
            predicted = _limb_prediction(name, i16[k_i], i16[k_ii], chunk.baseline_adc)
            i16[k] = _wrap16(i16[k].astype(np.int64) - predicted)
    if encoding == EcgEncoding.RAW_INT16:
        body = i16.tobytes()
    elif encoding == EcgEncoding.DELTA_ZLIB:
        delta = np.ascontiguousarray(
            np.diff(i16, axis=1, prepend=np.zeros((i16.shape[0], 1), dtype="<i2")), dtype="<i2"
        )
        planes = delta.view(np.uint8).reshape(*delta.shape, 2)
        body = zlib.compress(np.ascontiguousarray(planes.transpose(2, 0, 1)).tobytes(), 6)
    else:
        raise PayloadError("ecg", f"unknown ECG encoding {encoding}")
    return head + unit + names + saturation + body


@dataclass(frozen=True, slots=True)
class EcgHead:
    """A GHE1 chunk read up to its samples: everything :class:`EcgChunk` carries but ``samples``.

    The attribute names are :class:`EcgChunk`'s, so code reading the envelope (seq, sent_at, historical) treats
    both alike.  ``body_offset`` is where the sample bytes start; ``encoding`` is the sample encoding
    (:class:`EcgEncoding`); ``limb_residuals`` is flag bit 2.
    """

    unit_id: str
    seq: int
    sent_at: datetime
    start_at: datetime
    fs_hz: float
    leads: tuple[str, ...]
    gain_adc_per_mv: float
    baseline_adc: int
    n_samples: int
    lead_off: tuple[bool, ...]
    saturated: tuple[bool, ...]
    historical: bool
    encoding: int
    limb_residuals: bool
    body_offset: int

    @property
    def end_at(self) -> datetime:
        """Time just after the last sample."""
        return self.start_at + timedelta(seconds=self.n_samples / self.fs_hz)


def read_ecg_head(payload: bytes, *, topic: str = "ecg") -> EcgHead:
    """Read and check a GHE1 chunk's header, unit id, lead names and flag masks (not the samples).

    Applies every rule :class:`EcgChunk` applies to those fields, so a head this returns belongs to a chunk that
    :func:`decode_ecg` accepts if its samples are intact (:func:`check_ecg` checks them too).

    Raises:
        PayloadError: truncation, bad magic or version, out-of-range counts or rate (``oversized``), invalid values
            (``invalid_fields``).
    """
    if len(payload) < _HEAD.size:
        raise PayloadError(topic, "ECG chunk truncated (shorter than its header)")
    (magic, version, flags, n_leads, unit_len, seq, sent_us, start_us, fs_hz, gain, baseline, n_samples, mask) = (
        _HEAD.unpack_from(payload)
    )
    if magic != ECG_MAGIC:
        raise PayloadError(topic, "not a GHE1 ECG chunk (bad magic)")
    if version != SCHEMA_VERSION:
        raise PayloadError(
            topic, f"unsupported schema_version {version}, expected {SCHEMA_VERSION}", RejectKind.SCHEMA_VERSION
        )
    if not 1 <= n_leads <= 16 or not 1 <= unit_len <= 32:
        raise PayloadError(topic, "ECG chunk header out of range (leads or unit id length)")
    if n_samples <= 0 or n_leads * n_samples > MAX_ECG_SAMPLES_PER_CHUNK:
        raise PayloadError(topic, "ECG chunk declares an impossible sample count", RejectKind.OVERSIZED)
    if not (0 < fs_hz <= 20_000) or n_samples / fs_hz > MAX_ECG_CHUNK_S:
        raise PayloadError(
            topic, f"ECG chunk longer than {MAX_ECG_CHUNK_S:.0f} s or with an impossible rate", RejectKind.OVERSIZED
        )
    pos = _HEAD.size
    try:
        unit = payload[pos : pos + unit_len].decode("ascii")
        if len(unit) != unit_len:
            raise IndexError
        pos += unit_len
        leads = []
        for _ in range(n_leads):
            length = payload[pos]
            name = payload[pos + 1 : pos + 1 + length]
            if len(name) != length:
                raise IndexError
            leads.append(name.decode("ascii"))
            pos += 1 + length
    except (IndexError, UnicodeDecodeError):
        raise PayloadError(topic, "ECG chunk truncated or corrupt in its unit id or lead names") from None
    saturated: tuple[bool, ...] = ()
    if flags & _SATURATED:
        if len(payload) < pos + _MASK.size:
            raise PayloadError(topic, "ECG chunk truncated in its saturation mask")
        (sat_mask,) = _MASK.unpack_from(payload, pos)
        pos += _MASK.size
        saturated = tuple(bool(sat_mask >> i & 1) for i in range(n_leads))
    invalid = [
        name
        for name, bad in (
            ("unit_id", not ID_PATTERN.fullmatch(unit)),
            ("seq", seq >= 2**63),
            ("gain_adc_per_mv", not gain > 0),
            ("leads", any(not 1 <= len(n) <= 16 for n in leads)),
        )
        if bad
    ]
    try:
        sent_at, start_at = _from_us(sent_us), _from_us(start_us)
    except OverflowError:
        invalid.append("sent_at/start_at")
    if invalid:
        raise PayloadError(topic, f"ECG chunk header has invalid values {invalid[0]}", RejectKind.INVALID_FIELDS)
    return EcgHead(
        unit_id=unit,
        seq=seq,
        sent_at=sent_at,
        start_at=start_at,
        fs_hz=fs_hz,
        leads=tuple(leads),
        gain_adc_per_mv=gain,
        baseline_adc=baseline,
        n_samples=n_samples,
        lead_off=tuple(bool(mask >> i & 1) for i in range(n_leads)) if flags & _LEAD_OFF else (),
        saturated=saturated,
        historical=bool(flags & 1),
        encoding=flags >> 4,
        limb_residuals=bool(flags & _LIMB_RESIDUALS),
        body_offset=pos,
    )


def _sample_planes(payload: bytes, head: EcgHead, topic: str) -> bytes:
    """The sample bytes after the sample encoding is undone (raw int16, or the two delta byte planes), checked to be
    exactly the declared count; inflation is bounded by that count."""
    total = len(head.leads) * head.n_samples
    body = memoryview(payload)[head.body_offset :]
    if head.encoding == EcgEncoding.RAW_INT16:
        if len(body) != total * 2:
            raise PayloadError(topic, "ECG chunk sample bytes do not match the declared count")
        return bytes(body)
    if head.encoding == EcgEncoding.DELTA_ZLIB:
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(body, total * 2)
        except zlib.error:
            raise PayloadError(topic, "ECG chunk compressed samples are corrupt") from None
        if len(raw) != total * 2 or inflater.unconsumed_tail or not inflater.eof:
            raise PayloadError(topic, "ECG chunk compressed samples do not match the declared count")
        return raw
    raise PayloadError(topic, f"unknown ECG sample encoding {head.encoding}")


def _check_limb_plan(head: EcgHead, topic: str) -> tuple[int, int, list[tuple[int, str]]] | None:
    if not head.limb_residuals:
        return None
    plan = _limb_plan(head.leads)
    if plan is None:
        raise PayloadError(topic, "ECG chunk flags limb-lead residuals but has no leads I and II to derive from")
    return plan


def check_ecg(payload: bytes, *, topic: str = "ecg") -> EcgHead:
    """Check a GHE1 chunk completely without building its samples or model: it accepts and refuses exactly what
    :func:`decode_ecg` does (the samples are inflated, bounded, and counted, never summed).  For consumers that
    keep the chunk as it came (the telemetry store).

    Raises:
        PayloadError: as :func:`decode_ecg`.
    """
    head = read_ecg_head(payload, topic=topic)
    _sample_planes(payload, head, topic)
    _check_limb_plan(head, topic)
    return head


def _samples(payload: bytes, head: EcgHead, topic: str) -> np.ndarray:
    n_leads, n = len(head.leads), head.n_samples
    raw = _sample_planes(payload, head, topic)
    if head.encoding == EcgEncoding.RAW_INT16:
        samples = np.frombuffer(raw, dtype="<i2").reshape(n_leads, n)
    else:
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(2, n_leads, n)
        delta = np.ascontiguousarray(planes.transpose(1, 2, 0)).view("<i2").reshape(n_leads, n)
        samples = np.cumsum(delta, axis=1, dtype="<i2")
    plan = _check_limb_plan(head, topic)
    if plan is not None:
        samples = samples.copy()
        k_i, k_ii, derived = plan
        for k, lead in derived:
            predicted = _limb_prediction(lead, samples[k_i], samples[k_ii], head.baseline_adc)
            samples[k] = _wrap16(samples[k].astype(np.int64) + predicted)
    return samples


def decode_ecg_samples(payload: bytes, *, topic: str = "ecg") -> np.ndarray:
    """A GHE1 chunk's ADC samples only: int16, shape (n_leads, n_samples), no model built (reading stored chunks).

    Raises:
        PayloadError: as :func:`decode_ecg`.
    """
    return _samples(payload, read_ecg_head(payload, topic=topic), topic)


def decode_ecg(payload: bytes, *, topic: str = "ecg") -> EcgChunk:
    """Unpack a GHE1 ECG chunk.  Raises :class:`PayloadError` with a clear reason on any malformation."""
    head = read_ecg_head(payload, topic=topic)
    samples = _samples(payload, head, topic)
    try:
        return EcgChunk(
            unit_id=head.unit_id,
            seq=head.seq,
            sent_at=head.sent_at,
            historical=head.historical,
            start_at=head.start_at,
            fs_hz=head.fs_hz,
            leads=head.leads,
            gain_adc_per_mv=head.gain_adc_per_mv,
            baseline_adc=head.baseline_adc,
            samples=samples,
            lead_off=head.lead_off,
            saturated=head.saturated,
        )
    except ValidationError as exc:
        detail = exc.errors()[0]["loc"] if exc.errors() else ""
        raise PayloadError(topic, f"ECG chunk header has invalid values {detail}", RejectKind.INVALID_FIELDS) from None


def ecg_to_mv(chunk: EcgChunk) -> np.ndarray:
    """The chunk's samples in mV, float64, shape (n_leads, n_samples): (adc - baseline) / gain."""
    return (chunk.samples.astype(np.float64) - chunk.baseline_adc) / chunk.gain_adc_per_mv
