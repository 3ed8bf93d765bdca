"""ECG lead-off and saturation flags on the wire (GHE1 flag bits 1 and 3): round trip for any input, old chunks
unchanged, bad masks refused, and the agent copying both flags from the acquisition block into the chunk."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from ambulance_agent.app import Agent
from ambulance_agent.sources.base import EcgBlock
from broker_config import BrokerSettings, EcgChunk, Stream, TopicSpace
from broker_config.codec import EcgEncoding, PayloadError, decode_ecg, encode_ecg

T0 = datetime(2026, 11, 30, 9, 30, tzinfo=UTC)
NAMES = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6", "X", "Y", "Z", "R")


@st.composite
def chunks(draw: st.DrawFn) -> EcgChunk:
    n_leads = draw(st.integers(1, 16))
    n_samples = draw(st.integers(1, 64))
    samples = draw(arrays(np.int16, (n_leads, n_samples)))
    flags = st.one_of(st.just(()), st.tuples(*[st.booleans()] * n_leads))
    return EcgChunk(
        unit_id="AMB1", seq=draw(st.integers(0, 2**40)), sent_at=T0, start_at=T0, fs_hz=500.0,
        leads=NAMES[:n_leads], gain_adc_per_mv=1000.0, baseline_adc=draw(st.integers(-2048, 2048)),
        samples=samples, lead_off=draw(flags), saturated=draw(flags), historical=draw(st.booleans()),
    )  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(chunk=chunks(), encoding=st.sampled_from([EcgEncoding.RAW_INT16, EcgEncoding.DELTA_ZLIB]), limb=st.booleans())
def test_lead_off_and_saturation_masks_round_trip_for_any_chunk(chunk: EcgChunk, encoding: int, limb: bool) -> None:
    back = decode_ecg(encode_ecg(chunk, encoding=encoding, limb_residuals=limb))
    assert back.lead_off == chunk.lead_off
    assert back.saturated == chunk.saturated
    assert np.array_equal(back.samples, chunk.samples)  # flagged, never altered
    assert (back.leads, back.historical, back.seq, back.baseline_adc) == (
        chunk.leads, chunk.historical, chunk.seq, chunk.baseline_adc
    )  # fmt: skip


def _chunk(**flags: tuple[bool, ...]) -> EcgChunk:
    samples = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int16)
    return EcgChunk(unit_id="A", seq=1, sent_at=T0, start_at=T0, fs_hz=500, leads=("I", "II"),
                    gain_adc_per_mv=1000, baseline_adc=0, samples=samples, **flags)  # fmt: skip


def test_a_chunk_without_saturation_is_byte_for_byte_the_old_layout() -> None:
    plain = encode_ecg(_chunk(lead_off=(True, False)), encoding=EcgEncoding.RAW_INT16)
    assert plain[5] & 0x08 == 0
    # header 58 + unit "A" + names (1+1, 1+2) then the samples directly: no mask bytes
    assert len(plain) == 58 + 1 + 2 + 3 + 2 * 2 * 3
    flagged = encode_ecg(_chunk(lead_off=(True, False), saturated=(False, True)), encoding=EcgEncoding.RAW_INT16)
    assert flagged[5] & 0x08
    assert flagged[: 58 + 6] == plain[:5] + bytes([plain[5] | 0x08]) + plain[6 : 58 + 6]
    assert flagged[58 + 6 : 58 + 8] == (0b10).to_bytes(2, "little")
    assert flagged[58 + 8 :] == plain[58 + 6 :]


def test_a_truncated_saturation_mask_is_refused_and_bad_flag_lengths_are_invalid() -> None:
    flagged = encode_ecg(_chunk(saturated=(False, True)), encoding=EcgEncoding.RAW_INT16)
    with pytest.raises(PayloadError, match="saturation mask"):
        decode_ecg(flagged[: 58 + 7])
    with pytest.raises(ValidationError):
        _chunk(saturated=(True,))
    with pytest.raises(ValidationError):
        _chunk(lead_off=(True, False, False))


def test_the_agent_copies_both_flags_from_the_block_into_the_chunk(tmp_path: Path) -> None:
    samples = np.array([[0, 2047, 5], [-32768, -32768, 7]], dtype=np.int16)
    samples.flags.writeable = False
    block = EcgBlock(start_at=T0, fs_hz=500.0, leads=("I", "II"), gain_adc_per_mv=200.0, baseline_adc=1024,
                     samples=samples, lead_off=(False, True), saturated=(True, False))  # fmt: skip
    agent = Agent("amb-7", BrokerSettings(), TopicSpace(""), outbox_path=tmp_path / "o.db", ecg=None, vitals=None,
                  gps=None)  # fmt: skip
    try:
        chunk = agent._ecg_builder(block)(3, T0)
    finally:
        agent.close()
    assert isinstance(chunk, EcgChunk)
    assert (chunk.lead_off, chunk.saturated) == ((False, True), (True, False))
    assert np.array_equal(chunk.samples, samples)
    back = decode_ecg(encode_ecg(chunk))
    assert (back.lead_off, back.saturated) == ((False, True), (True, False))
    assert np.array_equal(back.samples, samples)


async def test_a_lead_off_or_clipped_block_restarts_the_heart_rate_window(tmp_path: Path) -> None:
    """No heart rate from an electrode that is off or a clipped trace: the window starts again after it."""
    rng = np.random.default_rng(7)

    def block(k: int, *, lead_off: tuple[bool, ...] = (), saturated: tuple[bool, ...] = ()) -> EcgBlock:
        samples = rng.integers(900, 1100, size=(2, 500), dtype=np.int16)
        samples.flags.writeable = False
        return EcgBlock(start_at=T0 + timedelta(seconds=k), fs_hz=500.0, leads=("II", "V1"), gain_adc_per_mv=200.0,
                        baseline_adc=1024, samples=samples, lead_off=lead_off, saturated=saturated)  # fmt: skip

    blocks = [block(k) for k in range(6)]
    blocks.append(block(6, lead_off=(True, False)))  # the analysed lead (0) comes off
    blocks += [block(7), block(8)]
    blocks.append(block(9, lead_off=(False, True)))  # another lead off: the analysed lead is still good
    blocks.append(block(10, saturated=(True, False)))  # the analysed lead clips
    blocks.append(block(11))

    async def source() -> AsyncIterator[EcgBlock]:
        for b in blocks:
            yield b

    agent = Agent("amb-7", BrokerSettings(), TopicSpace(""), outbox_path=tmp_path / "o.db", ecg=None, vitals=None,
                  gps=None)  # fmt: skip
    try:
        seen: list[float] = []
        original = agent._enqueue

        def spy(stream: Stream, build: object, start_at: datetime | None = None) -> None:
            assert agent._hr is not None
            seen.append(agent._hr.buffered_s)
            original(stream, build, start_at)  # type: ignore[arg-type]

        agent._enqueue = spy  # type: ignore[method-assign]
        agent.vitals = object()  # type: ignore[assignment]  # no ECG-derived vitals in this test
        await agent._ecg_loop(source())
    finally:
        agent.close()
    assert seen == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 1.0, 2.0, 3.0, 0.0, 1.0]
