"""HL7 v2 message front end: byte-safe normalising and parsing, header, and original-mode acknowledgements.

Any byte string is made safe for python-hl7 (:mod:`hl7`) before it parses: decoded per MSH-18, segment
terminators normalised (``<CR><LF>`` and lone ``<LF>`` become ``<CR>``; HL7 v2.6 section 2.5.1 requires ``<CR>``),
empty segments dropped, the MSH and every segment id checked (FF-09: python-hl7 0.4.5 swallows LF-terminated
segments into MSH, and names CRLF-terminated ones with a leading line feed).  Whatever the input, the only
exception that leaves this module is :class:`Hl7InputError`, carrying a reason id and the ACK code it calls for.

Sources: HL7 v2.6 chapter 2 (message construction 2.5-2.6, DTM 2.A.22, acknowledgements 2.9, MSH 2.14.9,
MSA 2.14.8, ERR 2.14.5; tables 0008, 0211, 0357).
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum

import hl7

from ambulance_agent.devices.errors import DeviceInputError

__all__ = [
    "MAX_MESSAGE_CHARS",
    "AckCode",
    "AckInfo",
    "Hl7InputError",
    "Hl7Reason",
    "MessageHeader",
    "ParsedMessage",
    "build_ack",
    "field_value",
    "normalise_segments",
    "parse_dtm",
    "parse_message",
    "read_ack",
]

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 1_048_576
"""Longest message accepted (characters after decoding); matches the MLLP frame limit."""

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}", re.ASCII)
_DTM = re.compile(
    r"(\d{4}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,4})?)?)?)?)?)?)(?:([+-])(\d{2})(\d{2}))?", re.ASCII
)


class AckCode(StrEnum):
    """MSA-1 acknowledgment codes (HL7 table 0008)."""

    AA = "AA"
    AE = "AE"
    AR = "AR"
    CA = "CA"
    CE = "CE"
    CR = "CR"


class Hl7Reason(StrEnum):
    """Why a whole message was rejected.  Each maps to an ACK code and an HL7 table 0357 error code."""

    TOO_LARGE = "too_large"
    UNDECODABLE = "undecodable"
    NOT_HL7 = "not_hl7"
    BAD_MSH = "bad_msh"
    BAD_SEGMENT = "bad_segment"
    PARSE_FAILED = "parse_failed"
    NO_CONTROL_ID = "no_control_id"
    UNSUPPORTED_MESSAGE = "unsupported_message"
    NO_OBX = "no_obx"
    NO_ALARM_EVENT = "no_alarm_event"
    NOT_AN_ACK = "not_an_ack"
    SINK_FAILED = "sink_failed"


# (ACK code, HL7 table 0357 code, its text)
_REASON_ACK: dict[Hl7Reason, tuple[AckCode, str, str]] = {
    Hl7Reason.TOO_LARGE: (AckCode.AR, "102", "Data type error"),
    Hl7Reason.UNDECODABLE: (AckCode.AR, "102", "Data type error"),
    Hl7Reason.NOT_HL7: (AckCode.AR, "100", "Segment sequence error"),
    Hl7Reason.BAD_MSH: (AckCode.AR, "100", "Segment sequence error"),
    Hl7Reason.BAD_SEGMENT: (AckCode.AE, "100", "Segment sequence error"),
    Hl7Reason.PARSE_FAILED: (AckCode.AE, "102", "Data type error"),
    Hl7Reason.NO_CONTROL_ID: (AckCode.AR, "101", "Required field missing"),
    Hl7Reason.UNSUPPORTED_MESSAGE: (AckCode.AR, "200", "Unsupported message type"),
    Hl7Reason.NO_OBX: (AckCode.AE, "101", "Required field missing"),
    Hl7Reason.NO_ALARM_EVENT: (AckCode.AE, "101", "Required field missing"),
    Hl7Reason.NOT_AN_ACK: (AckCode.AR, "200", "Unsupported message type"),
    Hl7Reason.SINK_FAILED: (AckCode.AE, "207", "Application internal error"),
}


class Hl7InputError(DeviceInputError):
    """A message was rejected as a whole.  ``control_id`` is MSH-10 when it could be read."""

    def __init__(self, reason: Hl7Reason, detail: str = "", control_id: str | None = None) -> None:
        super().__init__(reason, detail)
        self.reason: Hl7Reason = reason
        self.control_id = control_id

    @property
    def ack_code(self) -> AckCode:
        """AR (the message cannot be processed at all) or AE (processing error), per HL7 v2.6 section 2.9."""
        return _REASON_ACK[self.reason][0]


# --- normalising and parsing --------------------------------------------------------------------------------------

_CHARSETS = {
    "ASCII": "ascii",
    "88591": "latin-1",
    "ISO88591": "latin-1",
    "LATIN1": "latin-1",
    "885915": "iso8859-15",
    "UNICODEUTF8": "utf-8",
    "UTF8": "utf-8",
}


def _declared_codec(raw: bytes) -> str | None:
    """The Python codec named by MSH-18 (HL7 table 0211), read before decoding; ``None`` if absent/unknown."""
    end = len(raw)
    for terminator in (b"\r", b"\n"):
        pos = raw.find(terminator)
        if 0 <= pos < end:
            end = pos
    first = raw[:end].lstrip()
    if not first.startswith(b"MSH") or len(first) < 4:
        return None
    fields = first.split(first[3:4])
    if len(fields) < 18:
        return None
    label = fields[17].split(b"~")[0].split(b"^")[0]
    key = re.sub(rb"[\s_\-/]", b"", label).upper().decode("ascii", "replace")
    return _CHARSETS.get(key)


def _decode(raw: bytes) -> tuple[str, str]:
    codec = _declared_codec(raw)
    if codec is not None:
        try:
            return raw.decode(codec), codec
        except UnicodeDecodeError as exc:
            raise Hl7InputError(Hl7Reason.UNDECODABLE, f"not valid {codec}") from exc
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        # No (known) MSH-18: HL7's default is ASCII; Latin-1 is the common real-world superset.  Only free text
        # (names, labels) can differ, and this module reads none of it.
        return raw.decode("latin-1"), "latin-1"


def normalise_segments(raw: bytes | str) -> str:
    """Text with every segment ended by ``<CR>``, empty segments removed (FF-09).

    ``<CR><LF>`` and lone ``<LF>`` become ``<CR>``; segments that are empty or only whitespace are dropped;
    whitespace before the first segment is dropped.  Bytes are decoded per MSH-18 (ASCII, 8859/1, UTF-8), else
    UTF-8, else Latin-1.  MLLP framing must already be removed (:class:`ambulance_agent.devices.mllp.MllpDecoder`).

    Raises:
        Hl7InputError: ``too_large`` (over :data:`MAX_MESSAGE_CHARS`), ``undecodable``, ``not_hl7`` (nothing left).
    """
    if len(raw) > MAX_MESSAGE_CHARS * 4:
        raise Hl7InputError(Hl7Reason.TOO_LARGE)
    text = _decode(raw)[0] if isinstance(raw, bytes) else raw
    if len(text) > MAX_MESSAGE_CHARS:
        raise Hl7InputError(Hl7Reason.TOO_LARGE)
    segments = [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.strip()]
    if not segments:
        raise Hl7InputError(Hl7Reason.NOT_HL7, "no segments")
    segments[0] = segments[0].lstrip()
    return "\r".join(segments) + "\r"


@dataclass(frozen=True, slots=True)
class MessageHeader:
    """What the MSH says, as needed to route, de-duplicate and acknowledge (HL7 v2.6 section 2.14.9).

    ``raw_*`` fields keep the escaped wire form, so an ACK can echo them in the same encoding.
    """

    field_separator: str
    encoding_characters: str
    raw_sending_application: str
    raw_sending_facility: str
    raw_receiving_application: str
    raw_receiving_facility: str
    message_time: datetime | None
    message_time_offset: timezone | None
    message_code: str
    trigger_event: str
    message_structure: str
    control_id: str
    raw_control_id: str
    processing_id: str
    version_id: str


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """A normalised, structurally checked message: the python-hl7 tree plus its header.

    ``segment_ids`` lists every segment's id in order (FF-09 tests assert on it); ``codec`` is the character
    set the bytes were decoded with.
    """

    header: MessageHeader
    message: hl7.Message
    segment_ids: tuple[str, ...]
    text: str
    codec: str


def field_value(segment: hl7.Segment, field_num: int, component: int = 1, repetition: int = 1) -> str:
    """One unescaped, stripped (sub)value of a python-hl7 segment; ``""`` when absent.

    For MSH, ``field_num`` n is MSH-n.  python-hl7 raises IndexError for a path past a leaf (asking for component
    2 of a field without components); here that is simply "absent".
    """
    try:
        value = segment.extract_field(field_num=field_num, repeat_num=repetition, component_num=component)
    except (IndexError, KeyError, TypeError, ValueError, AttributeError):
        return ""
    return str(value).strip() if value is not None else ""


def _raw(segment: hl7.Segment, field_num: int) -> str:
    return str(segment[field_num]) if field_num < len(segment) else ""


def _check_structure(text: str) -> tuple[str, str]:
    if not text.startswith("MSH"):
        raise Hl7InputError(Hl7Reason.NOT_HL7, "first segment is not MSH")
    first = text.split("\r", 1)[0]
    if len(first) < 9:
        raise Hl7InputError(Hl7Reason.BAD_MSH, "MSH too short")
    fs = first[3]
    if fs.isalnum() or fs.isspace() or not fs.isprintable() or not fs.isascii():
        raise Hl7InputError(Hl7Reason.BAD_MSH, "bad field separator")
    end = first.find(fs, 4)
    enc = first[4:end] if end > 4 else ""
    if not 4 <= len(enc) <= 5 or len(set(enc + fs)) != len(enc) + 1:
        raise Hl7InputError(Hl7Reason.BAD_MSH, "bad encoding characters")
    if any(c.isalnum() or c.isspace() or not c.isprintable() or not c.isascii() for c in enc):
        raise Hl7InputError(Hl7Reason.BAD_MSH, "bad encoding characters")
    for number, segment in enumerate(text.rstrip("\r").split("\r"), start=1):
        if not _SEGMENT_ID.fullmatch(segment[:3]) or (len(segment) > 3 and segment[3] != fs):
            raise Hl7InputError(Hl7Reason.BAD_SEGMENT, f"segment {number} has no valid segment id")
    return fs, enc


def parse_dtm(value: str, default_offset: timezone | None) -> tuple[datetime, bool] | None:
    """An HL7 DTM as aware UTC and whether its offset was assumed; ``None`` if malformed.

    ``YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]`` (HL7 v2.6 section 2.A.22).  Without an offset, the
    ``default_offset`` (MSH-7's, the sender's zone) is used, else UTC; either way the result is flagged.
    """
    match = _DTM.fullmatch(value)
    if match is None:
        return None
    body, sign, off_h, off_m = match.groups()
    try:
        naive = hl7.parse_datetime(body)
    except (ValueError, OverflowError):
        return None
    if naive is None:
        return None
    naive = naive.replace(tzinfo=None)
    if sign is not None:
        hours, minutes = int(off_h), int(off_m)
        if hours > 14 or minutes > 59:
            return None
        delta = timedelta(hours=hours, minutes=minutes)
        tz = timezone(-delta if sign == "-" else delta)
        assumed = False
    else:
        tz = default_offset or UTC
        assumed = True
    try:
        return naive.replace(tzinfo=tz).astimezone(UTC), assumed
    except OverflowError:
        return None


def _offset_of(value: str) -> timezone | None:
    match = _DTM.fullmatch(value)
    if match is None or match.group(2) is None:
        return None
    hours, minutes = int(match.group(3)), int(match.group(4))
    if hours > 14 or minutes > 59:
        return None
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if match.group(2) == "-" else delta)


def parse_message(raw: bytes | str, *, require_control_id: bool = True) -> ParsedMessage:
    """Normalise, check and parse one HL7 v2 message with python-hl7.

    Args:
        raw: the message payload (MLLP framing removed), bytes or text, any of CR / CRLF / LF terminators.
        require_control_id: reject a message without MSH-10 (every message but an incoming ACK needs one).

    Returns:
        A :class:`ParsedMessage`.

    Raises:
        Hl7InputError: with reason ``too_large``, ``undecodable``, ``not_hl7``, ``bad_msh``, ``bad_segment``,
            ``parse_failed`` or ``no_control_id``.  Nothing else escapes for any input.
    """
    codec = "utf-8"
    if isinstance(raw, bytes):
        if len(raw) > MAX_MESSAGE_CHARS * 4:
            raise Hl7InputError(Hl7Reason.TOO_LARGE)
        decoded, codec = _decode(raw)
        text = normalise_segments(decoded)
    else:
        text = normalise_segments(raw)
    fs, enc = _check_structure(text)
    try:
        message = hl7.parse(text)
        msh = message.segment("MSH")
    except (hl7.ParseException, ValueError, IndexError, KeyError, TypeError, AssertionError) as exc:
        raise Hl7InputError(Hl7Reason.PARSE_FAILED, type(exc).__name__) from exc
    msh7 = field_value(msh, 7)
    offset = _offset_of(msh7)
    parsed_time = parse_dtm(msh7, None) if msh7 else None
    control_id = field_value(msh, 10)
    header = MessageHeader(
        field_separator=fs,
        encoding_characters=enc,
        raw_sending_application=_raw(msh, 3),
        raw_sending_facility=_raw(msh, 4),
        raw_receiving_application=_raw(msh, 5),
        raw_receiving_facility=_raw(msh, 6),
        message_time=parsed_time[0] if parsed_time else None,
        message_time_offset=offset,
        message_code=field_value(msh, 9, 1),
        trigger_event=field_value(msh, 9, 2),
        message_structure=field_value(msh, 9, 3),
        control_id=control_id,
        raw_control_id=_raw(msh, 10),
        processing_id=field_value(msh, 11),
        version_id=field_value(msh, 12),
    )
    if len(control_id) > 199 or (require_control_id and not control_id):
        raise Hl7InputError(Hl7Reason.NO_CONTROL_ID, "MSH-10 empty or longer than 199")
    segment_ids = tuple(str(seg[0]) for seg in message)
    return ParsedMessage(header=header, message=message, segment_ids=segment_ids, text=text, codec=codec)


# --- acknowledgements ---------------------------------------------------------------------------------------------


def _format_dtm(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y%m%d%H%M%S") + "+0000"


def _escape(value: str, fs: str, enc: str) -> str:
    esc = enc[2] if len(enc) > 2 else "\\"
    out = value.replace(esc, f"{esc}E{esc}").replace(fs, f"{esc}F{esc}").replace(enc[0], f"{esc}S{esc}")
    out = out.replace(enc[1], f"{esc}R{esc}").replace(enc[3], f"{esc}T{esc}")
    return out.replace("\r", " ").replace("\n", " ")


_FALLBACK_HEADER = MessageHeader(
    field_separator="|",
    encoding_characters="^~\\&",
    raw_sending_application="",
    raw_sending_facility="",
    raw_receiving_application="",
    raw_receiving_facility="",
    message_time=None,
    message_time_offset=None,
    message_code="",
    trigger_event="",
    message_structure="",
    control_id="",
    raw_control_id="",
    processing_id="P",
    version_id="2.6",
)


def build_ack(
    original: MessageHeader | None,
    code: AckCode,
    *,
    at: datetime,
    ack_control_id: str | None = None,
    reason: Hl7Reason | None = None,
    application: str = "GOLDENHOUR",
) -> str:
    """An original-mode ACK (HL7 v2.6 section 2.9.2) for a received message.

    MSH-3/4 are the original MSH-5/6 and MSH-5/6 the original MSH-3/4 (sender and receiver swapped; an empty
    original receiving application is replaced by ``application``); MSH-9 is ``ACK^<trigger>^ACK``; MSH-11/12
    are copied; MSA-2 echoes the original MSH-10.  For AE/AR with a ``reason``, MSA-3 and an ERR segment
    (ERR-3 from HL7 table 0357, ERR-4 severity ``E``, ERR-7 the reason id) say why, without any message content.

    Args:
        original: the received message's header; ``None`` when even MSH could not be read (MSA-2 is then empty).
        code: MSA-1.
        at: MSH-7, aware.
        ack_control_id: MSH-10 of the ACK; a random 20-character id by default.
        reason: why the message was not accepted (AE/AR).
        application: our application name, used when the original named no receiver.

    Returns:
        The ACK text, segments terminated by ``<CR>``.
    """
    h = original or _FALLBACK_HEADER
    fs, enc = h.field_separator, h.encoding_characters
    comp = enc[0]
    trigger = h.trigger_event if re.fullmatch(r"[A-Z0-9]{3}", h.trigger_event) else ""
    version = h.version_id if re.fullmatch(r"[0-9]\.[0-9]{1,2}(?:\.[0-9]{1,2})?", h.version_id) else "2.6"
    processing = h.processing_id if re.fullmatch(r"[A-Z]{1,3}", h.processing_id) else "P"
    msh = fs.join(
        [
            "MSH",
            enc,
            h.raw_receiving_application or _escape(application, fs, enc),
            h.raw_receiving_facility,
            h.raw_sending_application,
            h.raw_sending_facility,
            _format_dtm(at),
            "",
            f"ACK{comp}{trigger}{comp}ACK" if trigger else "ACK",
            _escape(ack_control_id or uuid.uuid4().hex[:20].upper(), fs, enc),
            processing,
            version,
        ]
    )
    segments = [msh]
    if reason is not None and code not in (AckCode.AA, AckCode.CA):
        _, err_code, err_text = _REASON_ACK[reason]
        segments.append(fs.join(["MSA", code.value, h.raw_control_id, reason.value]))
        segments.append(fs.join(["ERR", "", "", f"{err_code}{comp}{err_text}{comp}HL70357", "E", "", "", reason.value]))
    else:
        segments.append(fs.join(["MSA", code.value, h.raw_control_id]))
    return "\r".join(segments) + "\r"


@dataclass(frozen=True, slots=True)
class AckInfo:
    """What an acknowledgement says: MSA-1 ``code``, MSA-2 ``acked_control_id``, its own MSH-10."""

    code: AckCode
    acked_control_id: str
    control_id: str


def read_ack(raw: bytes | str) -> AckInfo:
    """Read an ACK (any trigger): MSA-1 and MSA-2.

    Raises:
        Hl7InputError: not HL7, or ``not_an_ack`` (no MSA segment or an unknown MSA-1 code).
    """
    parsed = parse_message(raw, require_control_id=False)
    msa = next((seg for seg in parsed.message if str(seg[0]) == "MSA"), None)
    if msa is None:
        raise Hl7InputError(Hl7Reason.NOT_AN_ACK, "no MSA segment", parsed.header.control_id)
    try:
        code = AckCode(field_value(msa, 1).upper())
    except ValueError as exc:
        raise Hl7InputError(Hl7Reason.NOT_AN_ACK, "unknown MSA-1 code", parsed.header.control_id) from exc
    return AckInfo(code=code, acked_control_id=field_value(msa, 2), control_id=parsed.header.control_id)
