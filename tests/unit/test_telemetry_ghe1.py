"""The ingest's lean GHE1 check agrees with the codec on every chunk: same acceptance, same rejection kind, same
header fields, and the stored bytes read back to the very ADC values (lossless)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from broker_config import PayloadError
from broker_config.codec import EcgEncoding, decode_ecg, encode_ecg
from telemetry import bench
from telemetry.ghe1 import EcgHead, adc_samples, check_chunk

UNIT = "amb1"


def _outcome(payload: bytes) -> tuple[str, str]:
    try:
        chunk = decode_ecg(payload, topic="t")
    except PayloadError as exc:
        return ("refused", str(exc.kind))
    return ("accepted", "") if chunk.unit_id == UNIT else ("refused", "unit_mismatch")


def _lean_outcome(payload: bytes) -> tuple[EcgHead | None, tuple[str, str]]:
    try:
        return check_chunk(payload, topic="t", unit_id=UNIT), ("accepted", "")
    except PayloadError as exc:
        return None, ("refused", str(exc.kind))


def test_lean_check_agrees_with_the_codec_on_mutated_chunks() -> None:
    bodies = bench._retarget(bench.ecg_templates("x"), UNIT)
    rng = random.Random(3)
    accepted = refused = 0
    for _ in range(3000):
        payload = bytearray(rng.choice(bodies))
        for _ in range(rng.randint(0, 3)):
            op = rng.random()
            if op < 0.5:
                payload[rng.randrange(min(len(payload), 90))] = rng.randrange(256)  # mostly the header
            elif op < 0.8:
                payload = payload[: rng.randrange(len(payload) + 1)]
            else:
                payload += bytes(rng.randrange(256) for _ in range(rng.randint(1, 5)))
            if not payload:
                break
        data = bytes(payload)
        expected = _outcome(data)
        head, lean = _lean_outcome(data)
        assert lean == expected
        if head is None:
            refused += 1
            continue
        chunk = decode_ecg(data, topic="t")
        assert (head.seq, head.sent_at, head.start_at, head.leads, head.n_samples, head.lead_off) == (
            chunk.seq,
            chunk.sent_at,
            chunk.start_at,
            chunk.leads,
            chunk.n_samples,
            chunk.lead_off,
        )
        np.testing.assert_array_equal(adc_samples(data), chunk.samples)
        accepted += 1
    assert accepted > 100
    assert refused > 100


@pytest.mark.parametrize("encoding", [EcgEncoding.RAW_INT16, EcgEncoding.DELTA_ZLIB])
def test_both_encodings_read_back_exactly(encoding: int) -> None:
    chunk = decode_ecg(bench._retarget(bench.ecg_templates("x"), UNIT)[0], topic="t")
    wire = encode_ecg(chunk, encoding=encoding)
    head = check_chunk(wire, topic="t", unit_id=UNIT)
    assert head.encoding == encoding
    np.testing.assert_array_equal(adc_samples(wire), chunk.samples)
    with pytest.raises(PayloadError) as refused:
        check_chunk(wire, topic="t", unit_id="amb2")
    assert refused.value.kind == "unit_mismatch"
