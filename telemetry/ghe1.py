"""Lean handling of GHE1 ECG chunks for the ingest and the store.

The PostgreSQL store keeps an ECG chunk as the GHE1 message it arrived as (delta-zlib, lossless, about one byte per
sample), so the ingest does not need the samples: :func:`check_chunk` is the codec's
:func:`broker_config.codec.check_ecg` (every rule :func:`broker_config.codec.decode_ecg` applies, the samples
inflated and counted but never summed, no pydantic model) plus the topic's unit id; :func:`adc_samples` reads a
stored chunk back.  The layout is the one documented in :mod:`broker_config.codec`.
"""

from __future__ import annotations

import numpy as np

from broker_config import PayloadError
from broker_config.codec import EcgHead, RejectKind, check_ecg, decode_ecg_samples

__all__ = ["EcgHead", "adc_samples", "check_chunk"]


def check_chunk(payload: bytes, *, topic: str, unit_id: str) -> EcgHead:
    """Check one GHE1 chunk received on ``topic`` (of unit ``unit_id``) without decoding its samples.

    Raises:
        PayloadError: what :func:`broker_config.codec.decode_ecg` refuses, and a unit id other than the topic's
            (``unit_mismatch``: never misattributed).
    """
    head = check_ecg(payload, topic=topic)
    if head.unit_id != unit_id:
        raise PayloadError(topic, "payload unit_id does not match the topic", RejectKind.UNIT_MISMATCH)
    return head


def adc_samples(ghe1: bytes) -> np.ndarray:
    """The ADC samples of a stored (already checked) GHE1 chunk: int16, shape (n_leads, n_samples).

    Raises:
        ValueError: the bytes are not a well-formed GHE1 chunk.
    """
    try:
        return decode_ecg_samples(ghe1, topic="store")
    except PayloadError as exc:
        raise ValueError(exc.reason) from None
