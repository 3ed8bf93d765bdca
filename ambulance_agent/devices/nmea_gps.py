"""NMEA 0183 input from a GNSS receiver (serial port, TCP bridge or gpsd's raw feed) to contract-ready fixes.

pynmea2 (:mod:`pynmea2`) splits sentences and names their fields; this module adds the reliability around it:

* Every sentence must carry a correct ``*hh`` checksum (FF-06: pynmea2 accepts a truncated sentence without one
  unless asked to be strict); the field count is checked per sentence type; a rejected line is counted and
  logged by reason, and nothing derived from it is ever emitted or re-serialised.
* No fix is "no position": RMC status ``V``, GGA quality 0, GLL status ``V``, GNS mode ``N``, or any empty
  coordinate field give ``fix=False`` without coordinates, never (0, 0), and empty date/time fields never raise
  (FF-05).
* Time-only sentences (GGA, GLL, GNS) are dated from the last RMC/ZDA date, choosing the day that puts them
  nearest the last dated time, so 23:59:59 -> 00:00:01 crosses midnight correctly.
* The receiver's clock is compared with the receive clock (FF-07): an offset within ``rollover_tolerance_s`` of
  a multiple of 1024 GPS weeks (7168 days) is snapped back and flagged; any other skew beyond
  ``max_ahead_s`` / ``max_behind_s`` is flagged and the receive time is used.

Sources: NMEA 0183 v4.11 sentence layouts (RMC, GGA, GLL, GNS, ZDA, VTG, GSA, GSV; checksum = XOR of the
characters between ``$`` and ``*``); gpsd's ``driver_nmea0183.c`` behaviour and regression logs for real-world
variants (field counts of NMEA 2.3 / 4.1, talkers GP/GL/GA/GB/BD/GN); the GPS week-number rollover
(IS-GPS-200, 10-bit week number = 1024 weeks).

Logs carry sentence types and reasons only, never positions (a position is health-adjacent personal data).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from functools import reduce
from operator import xor

import pynmea2

from ambulance_agent.devices.errors import DeviceInputError, RejectTally
from broker_config import GpsFix, utc_now

__all__ = [
    "GPS_ROLLOVER",
    "KNOTS_TO_MPS",
    "ClockStatus",
    "NmeaFix",
    "NmeaGpsReader",
    "NmeaInputError",
    "NmeaReason",
]

logger = logging.getLogger(__name__)

GPS_ROLLOVER = timedelta(weeks=1024)
"""7168 days: the span of the legacy 10-bit GPS week number (IS-GPS-200)."""

KNOTS_TO_MPS = 1852.0 / 3600.0
"""1 knot = 1852 m/h (exact)."""

# Data fields after the address field, per sentence type, as (fewest, most): NMEA 2.x, 2.3 (mode indicator) and
# 4.1 (navigational status) layouts.  GGA allows one trailing vendor field (SiRF-TriG, gpsd's beidou-bd.log).
# A truncated sentence has too few fields (FF-06).
_FIELD_COUNTS: dict[str, tuple[int, int]] = {
    "RMC": (11, 13),
    "GGA": (14, 15),
    "GLL": (6, 7),
    "GNS": (12, 13),
    "ZDA": (6, 6),
    "VTG": (8, 9),
    "GSA": (17, 18),
}
_POSITION_TYPES = frozenset({"RMC", "GGA", "GLL", "GNS"})
_FIX_QUALITIES = frozenset({1, 2, 3, 4, 5})  # GGA: GPS, DGPS, PPS, RTK fixed, RTK float (6 = dead reckoning)
_FIX_MODES = frozenset("ADPRF")  # autonomous, differential, precise, RTK, float RTK (not N, E, M, S)

_LAT = re.compile(r"(\d{2})(\d{2}(?:\.\d+)?)", re.ASCII)
_LON = re.compile(r"(\d{3})(\d{2}(?:\.\d+)?)", re.ASCII)
_TIME = re.compile(r"(\d{2})(\d{2})(\d{2})(?:\.(\d{1,6}))?", re.ASCII)
_DATE = re.compile(r"(\d{2})(\d{2})(\d{2})", re.ASCII)
_UNSIGNED = re.compile(r"\d+(?:\.\d*)?|\.\d+", re.ASCII)
_CHECKSUM = re.compile(r"[0-9A-Fa-f]{2}", re.ASCII)


class NmeaReason(StrEnum):
    """Why a line was rejected."""

    NOT_ASCII = "not_ascii"
    TOO_LONG = "too_long"
    NO_START = "no_start_delimiter"
    NO_CHECKSUM = "no_checksum"
    BAD_CHECKSUM = "bad_checksum"
    MALFORMED = "malformed"
    FIELD_COUNT = "field_count"
    BAD_FIELD = "bad_field"


class ClockStatus(StrEnum):
    """How the receiver's time compared with the receive clock (FF-07)."""

    OK = "ok"
    """Within the skew limits: the device time is used."""
    WEEK_ROLLOVER = "week_rollover"
    """Off by a multiple of 1024 GPS weeks: snapped back and flagged (the unit's receiver needs attention)."""
    SKEW = "skew"
    """Otherwise wrong: the receive time is used and the fix flagged."""
    UNDATED = "undated"
    """A time-only sentence before any date was seen: the receive time (if any) is used."""
    UNCHECKED = "unchecked"
    """No receive clock (log replay): the device time is used as is."""


class NmeaInputError(DeviceInputError):
    """A line was rejected; ``reason`` says why (an identifier, safe to log)."""

    def __init__(self, reason: NmeaReason, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason: NmeaReason = reason


@dataclass(frozen=True, slots=True)
class NmeaFix:
    """One position sentence, ready for :class:`broker_config.GpsFix`.

    ``fix=False`` means no position: ``lat_deg``/``lon_deg`` are then ``None`` (FF-05).  ``time`` is the
    authoritative UTC time (device time, snapped after a week rollover, or the receive time when the device clock
    is wrong or the sentence could not be dated); ``device_time`` is what the receiver said, dated but otherwise
    uncorrected; ``clock`` says which.  Units: degrees WGS 84 (north/east positive), m/s, degrees true.
    """

    sentence: str
    talker: str
    fix: bool
    time: datetime | None
    device_time: datetime | None
    received_at: datetime | None
    clock: ClockStatus
    lat_deg: float | None = None
    lon_deg: float | None = None
    speed_mps: float | None = None
    heading_deg: float | None = None
    hdop: float | None = None
    fix_quality: int | None = None

    @property
    def clock_suspect(self) -> bool:
        """The device clock disagreed with the receive clock (week rollover or skew)."""
        return self.clock in (ClockStatus.WEEK_ROLLOVER, ClockStatus.SKEW)

    def to_gps_fix(self, *, unit_id: str, seq: int, sent_at: datetime, historical: bool = False) -> GpsFix:
        """The :class:`broker_config.GpsFix` payload; its ``device_time`` is the authoritative :attr:`time`.

        Raises:
            pydantic.ValidationError: an envelope field is invalid.
        """
        return GpsFix(
            unit_id=unit_id,
            seq=seq,
            sent_at=sent_at,
            historical=historical,
            fix=self.fix,
            device_time=self.time,
            lat_deg=self.lat_deg,
            lon_deg=self.lon_deg,
            speed_mps=self.speed_mps,
            heading_deg=self.heading_deg,
            hdop=self.hdop,
            fix_quality=self.fix_quality,
            clock_suspect=self.clock_suspect,
        )


@dataclass(frozen=True, slots=True)
class _Sentence:
    talker: str
    kind: str
    fields: list[str]

    def get(self, index: int) -> str:
        return self.fields[index].strip() if index < len(self.fields) else ""


def _checked_sentence(line: str | bytes, max_line_chars: int) -> _Sentence | None:
    """Validate framing and checksum, then let pynmea2 split the sentence.  ``None`` for non-sentences to skip."""
    if isinstance(line, bytes):
        if line.lstrip().startswith(b"#"):
            return None  # a gpsd log header (free text, may be UTF-8)
        try:
            line = line.decode("ascii")
        except UnicodeDecodeError as exc:
            raise NmeaInputError(NmeaReason.NOT_ASCII) from exc
    text = line.strip()
    if not text or text.startswith("#"):
        return None  # blank line or a gpsd log header
    if not text.isascii():
        raise NmeaInputError(NmeaReason.NOT_ASCII)
    if len(text) > max_line_chars:
        raise NmeaInputError(NmeaReason.TOO_LONG)
    if text[0] not in "$!":
        raise NmeaInputError(NmeaReason.NO_START)
    star = text.rfind("*")
    if star < 0 or not text[star + 1 :]:
        raise NmeaInputError(NmeaReason.NO_CHECKSUM)
    body, given = text[1:star], text[star + 1 :]
    if not _CHECKSUM.fullmatch(given):
        raise NmeaInputError(NmeaReason.MALFORMED, "checksum is not two hex digits")
    if any(c in "$!*\r\n" or not c.isprintable() for c in body):
        raise NmeaInputError(NmeaReason.MALFORMED, "reserved character inside the sentence")
    if reduce(xor, body.encode("ascii"), 0) != int(given, 16):
        raise NmeaInputError(NmeaReason.BAD_CHECKSUM)
    try:
        message = pynmea2.parse(text, check=True)
    except pynmea2.SentenceTypeError:
        return None  # checksummed, but a type pynmea2 does not know: nothing for us
    except pynmea2.ParseError as exc:
        raise NmeaInputError(NmeaReason.MALFORMED) from exc
    if not isinstance(message, pynmea2.TalkerSentence):
        return None  # proprietary ($P...) or query sentences
    kind = str(message.sentence_type).upper()
    fields = [str(f) for f in message.data]
    counts = _FIELD_COUNTS.get(kind)
    if kind == "GSV":
        if len(fields) < 3 or (len(fields) - 3) % 4 not in (0, 1) or len(fields) > 20:
            raise NmeaInputError(NmeaReason.FIELD_COUNT, kind)
    elif counts is not None and not counts[0] <= len(fields) <= counts[1]:
        raise NmeaInputError(NmeaReason.FIELD_COUNT, kind)
    return _Sentence(talker=str(message.talker).upper(), kind=kind, fields=fields)


def _coordinate(value: str, hemisphere: str, pattern: re.Pattern[str], limit: float, negative: str) -> float | None:
    """Degrees from NMEA ``(d)ddmm.mmmm`` + hemisphere; ``None`` when either field is empty."""
    if not value or not hemisphere:
        return None
    match = pattern.fullmatch(value)
    if match is None or hemisphere not in ("NS" if limit == 90 else "EW"):
        raise NmeaInputError(NmeaReason.BAD_FIELD, "coordinate")
    degrees, minutes = int(match.group(1)), float(match.group(2))
    if minutes >= 60 or degrees + minutes / 60 > limit:
        raise NmeaInputError(NmeaReason.BAD_FIELD, "coordinate")
    result = degrees + minutes / 60.0
    return -result if hemisphere == negative else result


def _time_of_day(value: str) -> time | None:
    if not value:
        return None
    match = _TIME.fullmatch(value)
    if match is None:
        raise NmeaInputError(NmeaReason.BAD_FIELD, "time")
    hh, mm, ss = int(match.group(1)), int(match.group(2)), int(match.group(3))
    micros = int((match.group(4) or "0").ljust(6, "0"))
    if hh > 23 or mm > 59 or ss > 59:
        raise NmeaInputError(NmeaReason.BAD_FIELD, "time")
    return time(hh, mm, ss, micros, tzinfo=UTC)


def _rmc_date(value: str) -> date | None:
    if not value:
        return None
    match = _DATE.fullmatch(value)
    if match is None:
        raise NmeaInputError(NmeaReason.BAD_FIELD, "date")
    day, month, yy = (int(g) for g in match.groups())
    year = 1900 + yy if yy >= 80 else 2000 + yy  # two-digit NMEA year: 1980 (GPS epoch) .. 2079
    try:
        return date(year, month, day)
    except ValueError as exc:
        raise NmeaInputError(NmeaReason.BAD_FIELD, "date") from exc


def _number(value: str) -> float | None:
    """An optional unsigned decimal field; an empty or malformed auxiliary value is just unknown."""
    if not _UNSIGNED.fullmatch(value):
        return None
    result = float(value)
    return result if math.isfinite(result) else None


class NmeaGpsReader:
    """Turns NMEA 0183 lines into :class:`NmeaFix` results, one per position sentence (RMC, GGA, GLL, GNS).

    Feed it lines in arrival order (the reader keeps the last date for time-only sentences).  :meth:`parse_line`
    raises :class:`NmeaInputError` for a bad line; :meth:`feed` and the iterators never raise for any input:
    they count the reject in :attr:`rejects` (by reason, and per minute via ``rejects.in_last(60)``), log the
    reason, and go on.

    Args:
        clock: the receive clock (NTP-synced system time, aware UTC), read when a line comes without an explicit
            ``received_at``; ``None`` disables the comparison (log replay).
        max_ahead_s: device time this far ahead of the receive time is wrong (FF-07: 5 min).
        max_behind_s: device time this far behind the receive time is wrong (FF-07: 24 h; leaves room for
            buffered replays).
        rollover_tolerance_s: how close to a multiple of 1024 weeks an offset must be to be snapped.
        max_line_chars: longer lines are rejected (NMEA 0183 allows 82; real RTK receivers send ~90).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] | None = utc_now,
        max_ahead_s: float = 300.0,
        max_behind_s: float = 86_400.0,
        rollover_tolerance_s: float = 600.0,
        max_line_chars: int = 120,
    ) -> None:
        self.clock = clock
        self.max_ahead = timedelta(seconds=max_ahead_s)
        self.max_behind = timedelta(seconds=max_behind_s)
        self.rollover_tolerance = timedelta(seconds=rollover_tolerance_s)
        self.max_line_chars = max_line_chars
        self.rejects = RejectTally()
        self.ignored: Counter[str] = Counter()
        self.fixes = 0
        self._anchor: datetime | None = None
        self._last_clock: ClockStatus | None = None

    # -- public API --

    def parse_line(self, line: str | bytes, received_at: datetime | None = None) -> NmeaFix | None:
        """One line in; the fix it carries, or ``None`` for a valid line without a position (GSV, ZDA, ...).

        Raises:
            NmeaInputError: the line is rejected (no/wrong checksum, wrong field count, malformed field, ...);
                the reader's state is unchanged.
        """
        sentence = _checked_sentence(line, self.max_line_chars)
        if sentence is None:
            self.ignored["non_sentence"] += 1
            return None
        if received_at is None and self.clock is not None:
            received_at = self.clock()
        if sentence.kind == "ZDA":
            self._zda(sentence)
            return None
        if sentence.kind not in _POSITION_TYPES:
            self.ignored[sentence.kind] += 1
            return None
        result = self._position(sentence, received_at)
        self.fixes += 1
        return result

    def feed(self, line: str | bytes, received_at: datetime | None = None) -> NmeaFix | None:
        """Like :meth:`parse_line`, but a rejected line is counted, logged and answered with ``None``."""
        try:
            return self.parse_line(line, received_at)
        except NmeaInputError as exc:
            self.rejects.record(exc.reason)
            logger.warning("nmea: rejected a line: %s", exc.reason.value)
            return None

    def read_lines(self, lines: Iterable[str | bytes]) -> Iterator[NmeaFix]:
        """Every fix from an iterable of lines (a file, a list); rejects are counted and skipped."""
        for line in lines:
            fix = self.feed(line)
            if fix is not None:
                yield fix

    async def aread_lines(self, lines: AsyncIterable[str | bytes]) -> AsyncIterator[NmeaFix]:
        """Every fix from an async iterable of lines; rejects are counted and skipped."""
        async for line in lines:
            fix = self.feed(line)
            if fix is not None:
                yield fix

    async def aread_stream(self, stream: asyncio.StreamReader, max_line_bytes: int = 256) -> AsyncIterator[NmeaFix]:
        """Every fix from a byte stream (a TCP bridge, gpsd's raw feed, a serial port wrapped as a stream).

        Lines are split at ``\\n`` in whatever chunks the stream delivers; a line longer than ``max_line_bytes``
        (noise without a line end) is discarded up to its end and counted as ``too_long``; the stream's own
        buffer limit bounds memory.  Ends when the stream ends.
        """
        async for line in _stream_lines(stream, max_line_bytes):
            if line is None:
                self.rejects.record(NmeaReason.TOO_LONG)
                logger.warning("nmea: rejected a line: %s", NmeaReason.TOO_LONG.value)
                continue
            fix = self.feed(line)
            if fix is not None:
                yield fix

    # -- internals --

    def _zda(self, s: _Sentence) -> None:
        tod = _time_of_day(s.get(0))
        day, month, year = s.get(1), s.get(2), s.get(3)
        if tod is None or not (day.isdigit() and month.isdigit() and year.isdigit() and len(year) == 4):
            if day or month or year:
                raise NmeaInputError(NmeaReason.BAD_FIELD, "date")
            return
        try:
            self._anchor = datetime.combine(date(int(year), int(month), int(day)), tod)
        except ValueError as exc:
            raise NmeaInputError(NmeaReason.BAD_FIELD, "date") from exc

    def _date_time_only(self, tod: time) -> datetime | None:
        """Date a time of day by the last dated time: the candidate day nearest to it (handles midnight)."""
        if self._anchor is None:
            return None
        anchor = self._anchor
        candidates = (datetime.combine(anchor.date() + timedelta(days=d), tod) for d in (-1, 0, 1))
        return min(candidates, key=lambda c: abs(c - anchor))

    def _position(self, s: _Sentence, received_at: datetime | None) -> NmeaFix:
        kind = s.kind
        speed_mps = heading_deg = hdop = None
        quality: int | None = None
        new_anchor: datetime | None = None
        if kind == "RMC":
            tod = _time_of_day(s.get(0))
            status = s.get(1).upper()
            lat = _coordinate(s.get(2), s.get(3).upper(), _LAT, 90, "S")
            lon = _coordinate(s.get(4), s.get(5).upper(), _LON, 180, "W")
            day = _rmc_date(s.get(8))
            mode = s.get(11).upper()[:1]
            valid = status == "A" and (not mode or mode in _FIX_MODES)
            knots = _number(s.get(6))
            speed_mps = knots * KNOTS_TO_MPS if knots is not None else None
            heading_deg = _number(s.get(7))
            device_time = datetime.combine(day, tod) if day is not None and tod is not None else None
            new_anchor = device_time
        elif kind == "GGA":
            tod = _time_of_day(s.get(0))
            lat = _coordinate(s.get(1), s.get(2).upper(), _LAT, 90, "S")
            lon = _coordinate(s.get(3), s.get(4).upper(), _LON, 180, "W")
            q = s.get(5)
            if q and not (q.isdigit() and len(q) == 1):
                raise NmeaInputError(NmeaReason.BAD_FIELD, "quality")
            quality = int(q) if q else None
            valid = quality in _FIX_QUALITIES
            hdop = _number(s.get(7))
            device_time = self._date_time_only(tod) if tod is not None else None
        elif kind == "GLL":
            lat = _coordinate(s.get(0), s.get(1).upper(), _LAT, 90, "S")
            lon = _coordinate(s.get(2), s.get(3).upper(), _LON, 180, "W")
            tod = _time_of_day(s.get(4))
            mode = s.get(6).upper()[:1]
            valid = s.get(5).upper() == "A" and (not mode or mode in _FIX_MODES)
            device_time = self._date_time_only(tod) if tod is not None else None
        else:  # GNS
            tod = _time_of_day(s.get(0))
            lat = _coordinate(s.get(1), s.get(2).upper(), _LAT, 90, "S")
            lon = _coordinate(s.get(3), s.get(4).upper(), _LON, 180, "W")
            valid = any(m in _FIX_MODES for m in s.get(5).upper())
            hdop = _number(s.get(7))
            device_time = self._date_time_only(tod) if tod is not None else None

        has_position = valid and lat is not None and lon is not None
        authoritative, clock = self._judge(device_time, received_at)
        if new_anchor is not None:
            self._anchor = new_anchor  # only after the whole sentence validated
        if speed_mps is not None and speed_mps > 150:
            speed_mps = None  # beyond any road vehicle (and the contract): a receiver glitch, not a speed
        if heading_deg is not None:
            heading_deg = heading_deg % 360.0 if heading_deg <= 360.0 else None
        return NmeaFix(
            sentence=kind,
            talker=s.talker,
            fix=has_position,
            time=authoritative,
            device_time=device_time,
            received_at=received_at,
            clock=clock,
            lat_deg=lat if has_position else None,
            lon_deg=lon if has_position else None,
            speed_mps=speed_mps if has_position else None,
            heading_deg=heading_deg if has_position else None,
            hdop=hdop,
            fix_quality=quality,
        )

    def _judge(self, device_time: datetime | None, received_at: datetime | None) -> tuple[datetime | None, ClockStatus]:
        """The authoritative time and the clock verdict (FF-07)."""
        if device_time is None:
            status, result = ClockStatus.UNDATED, received_at
        elif received_at is None:
            status, result = ClockStatus.UNCHECKED, device_time
        else:
            offset = received_at - device_time  # > 0: the device is behind
            if -self.max_ahead <= offset <= self.max_behind:
                status, result = ClockStatus.OK, device_time
            else:
                weeks = round(offset / GPS_ROLLOVER)
                if 1 <= abs(weeks) <= 4 and abs(offset - weeks * GPS_ROLLOVER) <= self.rollover_tolerance:
                    status, result = ClockStatus.WEEK_ROLLOVER, device_time + weeks * GPS_ROLLOVER
                else:
                    status, result = ClockStatus.SKEW, received_at
        if status is not self._last_clock and status in (ClockStatus.WEEK_ROLLOVER, ClockStatus.SKEW):
            logger.warning("nmea: receiver clock disagrees with the receive clock (%s)", status.value)
        self._last_clock = status
        return result, status


async def _stream_lines(stream: asyncio.StreamReader, max_line_bytes: int) -> AsyncIterator[bytes | None]:
    """Lines of a byte stream; ``None`` stands for an overlong line that was discarded up to its end."""
    while True:
        try:
            line = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                yield exc.partial  # a last line without its end: its checksum decides
            return
        except asyncio.LimitOverrunError:
            await _discard_line(stream)
            yield None
            continue
        yield None if len(line) > max_line_bytes else line


async def _discard_line(stream: asyncio.StreamReader) -> None:
    while True:
        try:
            await stream.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as exc:
            await stream.readexactly(exc.consumed)
        except asyncio.IncompleteReadError:
            return
