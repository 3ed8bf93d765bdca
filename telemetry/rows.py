"""Pure mapping of decoded messages to table rows, shared by both store back ends (no I/O here).

Each stored stream has one table.  Its first columns are the message key: (unit_id, seq) for every stream except
availability, whose seq is the session number (Sparkplug bdSeq) shared by a birth and its will, so its key is
(unit_id, seq, state).  The key is the idempotency key: a row whose key is already stored is a duplicate.

Values are plain Python: str, int, float, bool, bytes, UTC datetime, tuple (an array column), dict (a JSON
column) or None.  Each back end adapts them (SQLite: ISO-8601 text and JSON text; PostgreSQL: binary COPY).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeAlias

from broker_config import (
    VITAL_CODES,
    Availability,
    EcgChunk,
    GapRecord,
    GpsFix,
    ParsedTopic,
    PreAlert,
    Status,
    Stream,
    Vitals,
)

__all__ = ["TABLES", "Row", "TableSpec", "as_utc", "rows_for"]

Row: TypeAlias = tuple[object, ...]


@dataclass(frozen=True, slots=True)
class TableSpec:
    """One stored stream's table: its columns (PostgreSQL types alongside) and its message-key columns."""

    name: str
    stream: Stream
    columns: tuple[str, ...]
    pg_types: tuple[str, ...]
    key: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.columns) != len(self.pg_types) or self.columns[: len(self.key)] != self.key:
            raise ValueError(f"table {self.name}: columns, types and key do not line up")


_COMMON = (("sent_at", "timestamptz"), ("received_at", "timestamptz"), ("historical", "boolean"))


def _spec(name: str, stream: Stream, key: tuple[str, ...], cols: tuple[tuple[str, str], ...]) -> TableSpec:
    all_cols = cols + _COMMON
    return TableSpec(name, stream, tuple(c for c, _ in all_cols), tuple(t for _, t in all_cols), key)


TABLES: dict[Stream, TableSpec] = {
    Stream.VITALS: _spec(
        "vitals",
        Stream.VITALS,
        ("unit_id", "seq"),
        (
            ("unit_id", "text"),
            ("seq", "bigint"),
            ("loinc", "text"),
            ("mdc_code", "integer"),
            ("ucum", "text"),
            ("value", "float8"),
            ("measured_at", "timestamptz"),
            ("source", "text"),
        ),
    ),
    Stream.ECG: _spec(
        "ecg_chunk",
        Stream.ECG,
        ("unit_id", "seq"),
        (
            ("unit_id", "text"),
            ("seq", "bigint"),
            ("start_at", "timestamptz"),
            ("fs_hz", "float8"),
            ("leads", "text[]"),
            ("gain_adc_per_mv", "float8"),
            ("baseline_adc", "integer"),
            ("n_samples", "integer"),
            ("samples", "bytea"),
            ("lead_off", "boolean[]"),
        ),
    ),
    Stream.GPS: _spec(
        "gps_fix",
        Stream.GPS,
        ("unit_id", "seq"),
        (
            ("unit_id", "text"),
            ("seq", "bigint"),
            ("fix", "boolean"),
            ("lat_deg", "float8"),
            ("lon_deg", "float8"),
            ("speed_mps", "float8"),
            ("heading_deg", "float8"),
            ("hdop", "float8"),
            ("fix_quality", "smallint"),
            ("device_time", "timestamptz"),
            ("clock_suspect", "boolean"),
        ),
    ),
    Stream.STATUS: _spec(
        "unit_status",
        Stream.STATUS,
        ("unit_id", "seq"),
        (
            ("unit_id", "text"),
            ("seq", "bigint"),
            ("status", "text"),
            ("at", "timestamptz"),
            ("incident_id", "text"),
            ("destination_hospital_id", "text"),
        ),
    ),
    Stream.AVAILABILITY: _spec(
        "availability",
        Stream.AVAILABILITY,
        ("unit_id", "seq", "state"),
        (("unit_id", "text"), ("seq", "bigint"), ("state", "text")),
    ),
    Stream.PREALERT: _spec(
        "prealert",
        Stream.PREALERT,
        ("unit_id", "seq"),
        (
            ("unit_id", "text"),
            ("seq", "bigint"),
            ("alert_id", "text"),
            ("case_type", "text"),
            ("eta_s", "integer"),
            ("requested_hospital_id", "text"),
            ("findings", "jsonb"),
        ),
    ),
    Stream.GAP: _spec(
        "telemetry_gap",
        Stream.GAP,
        ("unit_id", "seq"),
        (
            ("unit_id", "text"),
            ("seq", "bigint"),
            ("stream", "text"),
            ("from_seq", "bigint"),
            ("to_seq", "bigint"),
            ("detected_at", "timestamptz"),
            ("restart", "boolean"),
        ),
    ),
}
"""Every stored stream's table (video is never stored)."""


def as_utc(value: datetime) -> datetime:
    """``value`` converted to UTC.  Raises ValueError for a naive datetime (all GoldenHour times are aware)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("naive datetime: GoldenHour timestamps are timezone-aware UTC")
    return value.astimezone(UTC)


def rows_for(parsed: ParsedTopic, model: object, received_at: datetime) -> tuple[TableSpec, list[Row]] | None:
    """The rows one decoded message becomes, or None when the stream is not stored (video).

    A vitals set becomes one narrow coded row per measured field (LOINC, MDC, UCUM from
    :data:`broker_config.codes.VITAL_CODES`); an absent field is not measured and gets no row (never a zero).
    An ECG chunk becomes one row whose ``samples`` are raw little-endian int16, lead-major, (n_leads, n_samples).

    Raises:
        TypeError: ``model`` is not the payload model of ``parsed.stream``.
        ValueError: ``received_at`` is naive.
    """
    spec = TABLES.get(parsed.stream)
    if spec is None:
        return None
    rx = as_utc(received_at)
    common = (model_sent_at(model), rx, bool(getattr(model, "historical", False)))
    rows: list[Row]
    if isinstance(model, Vitals) and spec.stream is Stream.VITALS:
        rows = []
        for code in VITAL_CODES:
            value = getattr(model, code.field)
            if value is None:
                continue
            source = model.heart_rate_source if code.field == "heart_rate_bpm" else None
            rows.append(
                (
                    model.unit_id,
                    model.seq,
                    code.loinc,
                    code.mdc_code,
                    code.ucum,
                    float(value),
                    model.measured_at,
                    source,
                    *common,
                )
            )
    elif isinstance(model, EcgChunk) and spec.stream is Stream.ECG:
        samples = model.samples.astype("<i2", copy=False)
        rows = [
            (
                model.unit_id,
                model.seq,
                model.start_at,
                model.fs_hz,
                tuple(model.leads),
                model.gain_adc_per_mv,
                model.baseline_adc,
                model.n_samples,
                samples.tobytes(order="C"),
                tuple(model.lead_off),
                *common,
            )
        ]
    elif isinstance(model, GpsFix) and spec.stream is Stream.GPS:
        rows = [
            (
                model.unit_id,
                model.seq,
                model.fix,
                model.lat_deg,
                model.lon_deg,
                model.speed_mps,
                model.heading_deg,
                model.hdop,
                model.fix_quality,
                model.device_time,
                model.clock_suspect,
                *common,
            )
        ]
    elif isinstance(model, Status) and spec.stream is Stream.STATUS:
        rows = [
            (
                model.unit_id,
                model.seq,
                model.status.value,
                model.at,
                model.incident_id,
                model.destination_hospital_id,
                *common,
            )
        ]
    elif isinstance(model, Availability) and spec.stream is Stream.AVAILABILITY:
        rows = [(model.unit_id, model.seq, model.state, *common)]
    elif isinstance(model, PreAlert) and spec.stream is Stream.PREALERT:
        rows = [
            (
                model.unit_id,
                model.seq,
                model.alert_id,
                model.case_type.value,
                model.eta_s,
                model.requested_hospital_id,
                model.findings.model_dump(mode="json"),
                *common,
            )
        ]
    elif isinstance(model, GapRecord) and spec.stream is Stream.GAP:
        rows = [
            (
                model.unit_id,
                model.seq,
                Stream(model.stream).value,
                model.from_seq,
                model.to_seq,
                model.detected_at,
                model.restart,
                *common,
            )
        ]
    else:
        raise TypeError(f"{type(model).__name__} is not the payload model of stream {parsed.stream.value}")
    return spec, rows


def model_sent_at(model: object) -> datetime:
    """The envelope's ``sent_at``.  Raises TypeError for a model without an envelope."""
    sent_at = getattr(model, "sent_at", None)
    if not isinstance(sent_at, datetime):
        raise TypeError(f"{type(model).__name__} has no envelope sent_at")
    return sent_at


def group_rows(
    batch: Sequence[tuple[ParsedTopic, object, datetime] | tuple[ParsedTopic, object, datetime, bytes | None]],
) -> tuple[dict[Stream, list[list[Row]]], dict[Stream, int]]:
    """Split a batch into per-stream lists of messages (each a list of rows), plus per-stream ignored counts.

    Items may carry a fourth element (the payload bytes); it is not used here."""
    grouped: dict[Stream, list[list[Row]]] = {}
    ignored: dict[Stream, int] = {}
    for item in batch:
        parsed, model, received_at = item[0], item[1], item[2]
        mapped = rows_for(parsed, model, received_at)
        if mapped is None or not mapped[1]:
            ignored[parsed.stream] = ignored.get(parsed.stream, 0) + 1
            continue
        spec, rows = mapped
        grouped.setdefault(spec.stream, []).append(rows)
    return grouped, ignored
