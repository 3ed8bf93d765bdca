"""Lean handling of GHE1 ECG chunks for the ingest and the store: check a chunk completely without building its
numpy samples or pydantic model, and read stored chunks back to ADC samples.

The PostgreSQL store keeps an ECG chunk as the GHE1 message it arrived as (delta-zlib, lossless, about one byte per
sample), so the ingest does not need the samples: :func:`check_chunk` applies every rule that
:func:`broker_config.codec.decode_ecg` and :class:`broker_config.EcgChunk` apply (header bounds, ASCII unit id and
lead names, the unit id of the topic, the declared sample count inflated exactly - bounded, so a small packet cannot
inflate into a large one - and the value ranges of the envelope), and returns an :class:`EcgHead` with the fields
the store files.  A chunk it accepts decodes with ``decode_ecg``; a chunk it refuses raises the same
:class:`broker_config.PayloadError` (tested against each other).  The layout is the one documented in
:mod:`broker_config.codec`.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from broker_config import SCHEMA_VERSION, EcgChunk, PayloadError
from broker_config.codec import (
    ECG_MAGIC,
    MAX_ECG_CHUNK_S,
    MAX_ECG_SAMPLES_PER_CHUNK,
    EcgEncoding,
    RejectKind,
    decode_ecg,
)

__all__ = ["GHE1_HEADER", "EcgHead", "adc_samples", "check_chunk"]

GHE1_HEADER = struct.Struct("<4sBBBBQqqddiIH")
"""The fixed GHE1 header (58 bytes): magic, schema_version, flags, n_leads, unit id length, seq, sent_at us,
start_at us, fs_hz, gain_adc_per_mv, baseline_adc, n_samples, lead-off mask (:mod:`broker_config.codec`)."""

_KNOWN_FLAGS = 0xF3
"""Flag bits this module reads itself: historical, lead-off reported, the encoding.  A chunk with any other flag
(a codec feature such as limb-lead residuals) is handed to :func:`broker_config.codec.decode_ecg`, so that the lean
path never disagrees with the codec."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_OPAQUE_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_MAX_SEQ = 2**63


@dataclass(frozen=True, slots=True)
class EcgHead:
    """What the store files of a checked GHE1 chunk (the samples stay in the message bytes).

    The attribute names are :class:`broker_config.EcgChunk`'s, so code reading the envelope (seq, sent_at,
    historical) treats both alike.
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
    historical: bool
    encoding: int

    @property
    def end_at(self) -> datetime:
        """Time just after the last sample."""
        return self.start_at + timedelta(seconds=self.n_samples / self.fs_hz)


def check_chunk(payload: bytes, *, topic: str, unit_id: str) -> EcgHead:
    """Check a GHE1 chunk sent under ``unit_id``'s topic completely, without building its samples.

    Raises:
        PayloadError: the reason and kind :func:`broker_config.codec.decode_ecg` gives for the same bytes
            (truncated, bad magic, schema version, impossible sizes, corrupt or short compressed samples, invalid
            header values), or ``unit_mismatch`` when the unit id inside is not the topic's.
    """
    if len(payload) < GHE1_HEADER.size:
        raise PayloadError(topic, "ECG chunk truncated (shorter than its header)")
    magic, version, flags, n_leads, unit_len, seq, sent_us, start_us, fs_hz, gain, baseline, n_samples, mask = (
        GHE1_HEADER.unpack_from(payload)
    )
    if magic != ECG_MAGIC:
        raise PayloadError(topic, "not a GHE1 ECG chunk (bad magic)")
    if flags & ~_KNOWN_FLAGS:
        return _head_of(decode_ecg(payload, topic=topic), topic, unit_id, flags >> 4)
    if version != SCHEMA_VERSION:
        raise PayloadError(
            topic, f"unsupported schema_version {version}, expected {SCHEMA_VERSION}", RejectKind.SCHEMA_VERSION
        )
    if not 1 <= n_leads <= 16 or not 1 <= unit_len <= 32:
        raise PayloadError(topic, "ECG chunk header out of range (leads or unit id length)")
    total = n_leads * n_samples
    if n_samples <= 0 or total > MAX_ECG_SAMPLES_PER_CHUNK:
        raise PayloadError(topic, "ECG chunk declares an impossible sample count", RejectKind.OVERSIZED)
    if not (0 < fs_hz <= 20_000) or n_samples / fs_hz > MAX_ECG_CHUNK_S:
        raise PayloadError(
            topic, f"ECG chunk longer than {MAX_ECG_CHUNK_S:.0f} s or with an impossible rate", RejectKind.OVERSIZED
        )
    pos = GHE1_HEADER.size
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
    encoding = flags >> 4
    if encoding == EcgEncoding.RAW_INT16:
        if len(payload) - pos != total * 2:
            raise PayloadError(topic, "ECG chunk sample bytes do not match the declared count")
    elif encoding == EcgEncoding.DELTA_ZLIB:
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(memoryview(payload)[pos:], total * 2)
        except zlib.error:
            raise PayloadError(topic, "ECG chunk compressed samples are corrupt") from None
        if len(raw) != total * 2 or inflater.unconsumed_tail or not inflater.eof:
            raise PayloadError(topic, "ECG chunk compressed samples do not match the declared count")
    else:
        raise PayloadError(topic, f"unknown ECG sample encoding {encoding}")
    invalid = [
        name
        for name, bad in (
            ("unit_id", not _OPAQUE_ID.fullmatch(unit)),
            ("seq", seq >= _MAX_SEQ),
            ("gain_adc_per_mv", not gain > 0),
            ("leads", any(not 1 <= len(n) <= 16 for n in leads)),
        )
        if bad
    ]
    try:
        sent_at = _EPOCH + timedelta(microseconds=sent_us)
        start_at = _EPOCH + timedelta(microseconds=start_us)
    except OverflowError:
        invalid.append("sent_at/start_at")
    if invalid:
        raise PayloadError(topic, f"ECG chunk header has invalid values {invalid[0]}", RejectKind.INVALID_FIELDS)
    if unit != unit_id:
        raise PayloadError(topic, "payload unit_id does not match the topic", RejectKind.UNIT_MISMATCH)
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
        lead_off=tuple(bool(mask >> i & 1) for i in range(n_leads)) if flags & 2 else (),
        historical=bool(flags & 1),
        encoding=encoding,
    )


def _head_of(chunk: EcgChunk, topic: str, unit_id: str, encoding: int) -> EcgHead:
    if chunk.unit_id != unit_id:
        raise PayloadError(topic, "payload unit_id does not match the topic", RejectKind.UNIT_MISMATCH)
    return EcgHead(
        unit_id=chunk.unit_id,
        seq=chunk.seq,
        sent_at=chunk.sent_at,
        start_at=chunk.start_at,
        fs_hz=chunk.fs_hz,
        leads=tuple(chunk.leads),
        gain_adc_per_mv=chunk.gain_adc_per_mv,
        baseline_adc=chunk.baseline_adc,
        n_samples=chunk.n_samples,
        lead_off=tuple(chunk.lead_off),
        historical=chunk.historical,
        encoding=encoding,
    )


def adc_samples(ghe1: bytes) -> np.ndarray:
    """The ADC samples of a stored (already checked) GHE1 chunk: int16, shape (n_leads, n_samples).

    Raises:
        ValueError: the bytes are not a well-formed GHE1 chunk.
    """
    if len(ghe1) < GHE1_HEADER.size or ghe1[:4] != ECG_MAGIC:
        raise ValueError("not a GHE1 ECG chunk")
    _, _, flags, n_leads, unit_len, *_, n_samples, _ = GHE1_HEADER.unpack_from(ghe1)
    if flags & ~_KNOWN_FLAGS:
        try:
            return decode_ecg(ghe1, topic="store").samples
        except PayloadError as exc:
            raise ValueError(exc.reason) from None
    pos = GHE1_HEADER.size + unit_len
    for _ in range(n_leads):
        pos += 1 + ghe1[pos]
    total = n_leads * n_samples
    encoding = flags >> 4
    if encoding == EcgEncoding.RAW_INT16:
        return np.frombuffer(ghe1, dtype="<i2", count=total, offset=pos).reshape(n_leads, n_samples)
    if encoding != EcgEncoding.DELTA_ZLIB:
        raise ValueError(f"unknown ECG sample encoding {encoding}")
    raw = zlib.decompress(memoryview(ghe1)[pos:], bufsize=total * 2)
    if len(raw) != total * 2:
        raise ValueError("GHE1 chunk samples do not match the declared count")
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(2, n_leads, n_samples)
    delta = np.ascontiguousarray(planes.transpose(1, 2, 0)).view("<i2").reshape(n_leads, n_samples)
    return np.cumsum(delta, axis=1, dtype="<i2")
