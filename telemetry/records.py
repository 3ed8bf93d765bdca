"""Value types returned by the store: frozen dataclasses and numpy arrays, never table rows or dicts of rows.

Times are timezone-aware UTC.  Vital codes follow :data:`broker_config.codes.VITAL_CODES` (LOINC, IEEE 11073 MDC,
UCUM as fixed by the FHIR R4 vital-signs profiles).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from broker_config import Stream

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

__all__ = [
    "STORED_STREAMS",
    "GAP_TRACKED_STREAMS",
    "EcgWindow",
    "GapInfo",
    "GpsPoint",
    "IngestState",
    "LatestVitals",
    "LatestVitalsByUnit",
    "VitalValue",
    "VitalsBin",
    "VitalsByCode",
    "WriteResult",
]

STORED_STREAMS: frozenset[Stream] = frozenset(
    {Stream.VITALS, Stream.ECG, Stream.GPS, Stream.STATUS, Stream.AVAILABILITY, Stream.PREALERT, Stream.GAP}
)
"""Streams the store keeps.  Video is never stored (it is a live view only)."""

GAP_TRACKED_STREAMS: frozenset[Stream] = frozenset({Stream.VITALS, Stream.ECG, Stream.GPS})
"""Streams whose ``seq`` counts every message, so a jump is a gap.  Availability uses seq as the session number
(Sparkplug bdSeq), status and pre-alert are sparse by nature, so they are not gap-checked."""


@dataclass(slots=True)
class WriteResult:
    """What one ``Store.write`` call did, counted in messages (not rows) per stream.

    ``duplicates`` are messages whose (unit, stream, seq) key was already stored (a QoS 1 redelivery or a replay);
    ``ignored`` are messages with nothing to store (video, a vitals set with no measured value);
    ``expired`` are messages older than their stream's retention and ``future`` messages too far ahead of the
    store's clock to be filed (a device clock gone wrong, FF-07): both are refused, counted, never an error.
    """

    inserted: Counter[Stream] = field(default_factory=Counter)
    duplicates: Counter[Stream] = field(default_factory=Counter)
    ignored: Counter[Stream] = field(default_factory=Counter)
    expired: Counter[Stream] = field(default_factory=Counter)
    future: Counter[Stream] = field(default_factory=Counter)

    @property
    def total_inserted(self) -> int:
        """Messages newly stored, all streams."""
        return sum(self.inserted.values())

    @property
    def total_duplicates(self) -> int:
        """Messages that were already stored, all streams."""
        return sum(self.duplicates.values())

    def add(self, other: WriteResult) -> None:
        """Accumulate ``other`` into this result."""
        self.inserted.update(other.inserted)
        self.duplicates.update(other.duplicates)
        self.ignored.update(other.ignored)
        self.expired.update(other.expired)
        self.future.update(other.future)


@dataclass(frozen=True, slots=True)
class VitalValue:
    """One coded vital-sign value: ``value`` in ``ucum`` units, measured at ``measured_at``."""

    field: str
    """The :class:`broker_config.Vitals` field it came from, e.g. ``heart_rate_bpm``."""
    loinc: str
    mdc_code: int | None
    ucum: str
    value: float
    measured_at: datetime
    seq: int
    historical: bool


class VitalsByCode(Mapping[str, VitalValue]):
    """A unit's latest values keyed by LOINC code, parsed on first access (the board's query returns every unit at
    once; a unit's values cost nothing until they are read)."""

    __slots__ = ("_pending", "_values")

    def __init__(self, entries_json: str, field_of: Mapping[str, str]) -> None:
        """``entries_json``: a JSON array with one ``[loinc, mdc_code, ucum, value, measured_at_us, seq,
        historical]`` per code, ``measured_at_us`` in integer microseconds since the Unix epoch (UTC): exact, like
        ``value`` (a JSON number written by the server as the shortest text that reads back as the same double)."""
        self._pending: tuple[str, Mapping[str, str]] | None = (entries_json, field_of)
        self._values: dict[str, VitalValue] = {}

    def _built(self) -> dict[str, VitalValue]:
        if self._pending is not None:
            text, field_of = self._pending
            for loinc, mdc, ucum, value, at_us, seq, historical in json.loads(text):
                at = _EPOCH + timedelta(microseconds=at_us)
                field_name = field_of.get(loinc, loinc)
                self._values[loinc] = VitalValue(field_name, loinc, mdc, ucum, float(value), at, seq, historical)
            self._pending = None
        return self._values

    def __getitem__(self, loinc: str) -> VitalValue:
        return self._built()[loinc]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())

    def __repr__(self) -> str:
        return f"VitalsByCode({self._built()!r})"


class LatestVitalsByUnit(Mapping[str, "LatestVitals"]):
    """Every unit's latest vitals as the store returned them: one string per unit, each unit's
    :class:`LatestVitals` built when it is looked up.

    Why: a read of a thousand units that built a thousand objects at once fed Python's cyclic garbage collector
    several thousand surviving containers per read, and every few reads a full collection of the reading
    service's whole heap landed inside the read (p99 40 ms against a 3 ms median).  Here a read leaves one dict of
    strings behind.
    """

    __slots__ = ("_entries", "_field_of")

    def __init__(self, entries: dict[str, str], field_of: Mapping[str, str]) -> None:
        """``entries``: unit id -> the JSON text :class:`VitalsByCode` reads."""
        self._entries = entries
        self._field_of = field_of

    def __getitem__(self, unit_id: str) -> LatestVitals:
        return LatestVitals(unit_id, VitalsByCode(self._entries[unit_id], self._field_of))

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class LatestVitals:
    """The latest value of each vital code of one unit, keyed by LOINC code."""

    unit_id: str
    values: Mapping[str, VitalValue]

    def by_field(self, field_name: str) -> VitalValue | None:
        """The latest value of a :class:`broker_config.Vitals` field (``"spo2_pct"``), or None if never measured."""
        for value in self.values.values():
            if value.field == field_name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class EcgWindow:
    """The last seconds of one unit's ECG on a regular time grid.

    ``samples_mv`` is float64, shape (n_leads, n), in mV: (adc - baseline_adc) / gain_adc_per_mv (WFDB's
    digital-to-physical conversion).  Sample ``i`` is at ``start_at + i / fs_hz``.  Samples the store does not
    have (a sequence gap inside the window) are NaN, never zero; ``missing_samples`` counts them per lead.
    """

    unit_id: str
    fs_hz: float
    leads: tuple[str, ...]
    start_at: datetime
    samples_mv: np.ndarray
    missing_samples: int

    @property
    def duration_s(self) -> float:
        """Length of the window in seconds."""
        return self.samples_mv.shape[1] / self.fs_hz


@dataclass(frozen=True, slots=True)
class GpsPoint:
    """One stored position report.  ``fix=False`` has no coordinates (never (0, 0), FF-05).

    ``device_time`` is the receiver's own clock (untrusted, FF-07); ``received_at`` is the ingest's UTC clock.
    """

    seq: int
    fix: bool
    lat_deg: float | None
    lon_deg: float | None
    speed_mps: float | None
    heading_deg: float | None
    device_time: datetime | None
    received_at: datetime
    clock_suspect: bool
    historical: bool


@dataclass(frozen=True, slots=True)
class VitalsBin:
    """Summary of one vital code over one time bin (``date_bin`` on PostgreSQL): count, mean, min and max."""

    bin_start: datetime
    loinc: str
    ucum: str
    n: int
    mean: float
    min: float
    max: float


@dataclass(frozen=True, slots=True)
class GapInfo:
    """A detected sequence gap of a unit's stream, ``from_seq``..``to_seq`` inclusive.

    ``missing`` is how many of those seqs the store still lacks now (late arrivals shrink it); ``filled`` is
    ``missing == 0``.  ``seq`` is the GapRecord's own sequence number on the gap stream.  ``restart``: the jump was a
    sequence restart (:data:`telemetry.gaps.DEFAULT_RESTART_JUMP`): the loss is unknown, the range is what the
    sender's counters skipped and ``missing`` is not a count of lost messages.
    """

    unit_id: str
    stream: Stream
    from_seq: int
    to_seq: int
    detected_at: datetime
    seq: int
    missing: int
    restart: bool = False

    @property
    def filled(self) -> bool:
        """Every missing seq has since arrived."""
        return self.missing == 0


@dataclass(frozen=True, slots=True)
class IngestState:
    """What an ingest needs to resume after a restart: the highest stored seq per (unit, stream), and the
    highest GapRecord seq per unit."""

    max_seq: dict[tuple[str, Stream], int]
    max_gap_seq: dict[str, int]
