"""GHE1 limb-lead residuals (flag bit 2): exact for any int16 input, off by default, refused when inconsistent."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from broker_config import EcgChunk, PayloadError, Stream, TopicSpace, decode, encode
from broker_config.codec import EcgEncoding, decode_ecg, encode_ecg

AT = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)
TWELVE = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def chunk(samples: np.ndarray, leads: tuple[str, ...] = TWELVE, baseline: int = 0) -> EcgChunk:
    return EcgChunk(
        unit_id="AMB1",
        seq=3,
        sent_at=AT,
        start_at=AT,
        fs_hz=500.0,
        leads=leads,
        gain_adc_per_mv=1000.0,
        baseline_adc=baseline,
        samples=samples,
    )


@settings(max_examples=200, deadline=None)
@given(
    samples=arrays(np.int16, st.tuples(st.just(12), st.integers(1, 64))),
    baseline=st.integers(-(2**31), 2**31 - 1),
    order=st.permutations(range(12)),
    upper=st.booleans(),
    encoding=st.sampled_from([EcgEncoding.RAW_INT16, EcgEncoding.DELTA_ZLIB]),
)
def test_any_int16_input_decodes_exactly_with_the_flag_on(
    samples: np.ndarray, baseline: int, order: list[int], upper: bool, encoding: int
) -> None:
    leads = tuple((TWELVE[k].upper() if upper else TWELVE[k].lower()) for k in order)
    original = chunk(samples, leads, baseline)
    payload = encode_ecg(original, encoding=encoding, limb_residuals=True)
    assert payload[5] & 4, "the flag is set when I and II are present"
    decoded = decode_ecg(payload)
    np.testing.assert_array_equal(decoded.samples, samples)
    assert decoded.leads == leads
    assert decoded.baseline_adc == baseline


def test_off_by_default_and_without_i_and_ii_the_flag_stays_clear() -> None:
    rng = np.random.default_rng(7)
    samples = rng.integers(-2000, 2000, size=(12, 500), dtype=np.int16)
    plain = encode(Stream.ECG, chunk(samples))
    assert not plain[5] & 4
    assert plain == encode_ecg(chunk(samples), limb_residuals=False)
    two = chunk(samples[:2], ("MLII", "V5"))
    assert encode_ecg(two, limb_residuals=True) == encode_ecg(two), "nothing to derive: the old layout"
    _, model = decode(TopicSpace(), "ems/v1/unit/AMB1/ecg", plain)
    assert isinstance(model, EcgChunk)
    np.testing.assert_array_equal(model.samples, samples)


def test_derived_limb_leads_leave_zero_residuals_and_shrink_the_chunk() -> None:
    """A monitor that derives III, aVR, aVL, aVF from I and II (integer arithmetic as in the codec) sends them for
    almost nothing."""
    t = np.arange(500)
    lead_i = (300 * np.sin(t / 9) + 40 * np.sin(t / 2.3)).astype(np.int64)
    lead_ii = (500 * np.sin(t / 7 + 1) + 30 * np.cos(t / 1.7)).astype(np.int64)
    limb = [lead_i, lead_ii, lead_ii - lead_i, -((lead_i + lead_ii) >> 1), lead_i - (lead_ii >> 1),
            lead_ii - (lead_i >> 1)]  # fmt: skip
    chest = [(200 * np.sin(t / (5 + k))).astype(np.int64) for k in range(6)]
    samples = np.stack(limb + chest).astype(np.int16)
    with_flag = encode_ecg(chunk(samples), limb_residuals=True)
    without = encode_ecg(chunk(samples))
    assert len(with_flag) < len(without)
    np.testing.assert_array_equal(decode_ecg(with_flag).samples, samples)


def test_a_flagged_chunk_without_leads_i_and_ii_is_refused() -> None:
    samples = np.zeros((2, 10), dtype=np.int16)
    payload = bytearray(encode_ecg(chunk(samples, ("III", "aVF"))))
    payload[5] |= 4
    with pytest.raises(PayloadError, match="limb-lead residuals"):
        decode_ecg(bytes(payload))
