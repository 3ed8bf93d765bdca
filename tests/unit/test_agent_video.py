"""Video frames: the GHV1 header, renditions fitted to a byte budget, the test-pattern camera."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from PIL import Image

from ambulance_agent.video import (
    RENDITIONS,
    CameraFrame,
    Rendition,
    SyntheticCamera,
    choose_rendition,
    decode_video_frame,
    encode_video_frame,
)

AT = datetime(2025, 3, 14, 9, 30, 0, 123456, tzinfo=UTC)


def test_ghv1_round_trip_scales_and_keeps_time_and_seq() -> None:
    frame = CameraFrame(SyntheticCamera().picture(3), AT)
    payload = encode_video_frame(frame, Rendition(320, 40), seq=7)
    header, jpeg = decode_video_frame(payload)
    assert (header.width, header.height, header.quality, header.seq) == (320, 240, 40, 7)
    assert header.captured_at == AT
    image = Image.open(io.BytesIO(jpeg))
    assert (image.format, image.size) == ("JPEG", (320, 240))
    smaller = encode_video_frame(frame, Rendition(160, 25), seq=8)
    assert len(smaller) < len(payload) / 2


@pytest.mark.parametrize("bad", [b"", b"GHV1", b"XXXX" + bytes(40), bytes(28) + b"\xff\xd8"])
def test_not_a_frame_is_refused(bad: bytes) -> None:
    with pytest.raises(ValueError, match=r"GHV1|header"):
        decode_video_frame(bad)


def test_rendition_fits_the_frame_budget() -> None:
    assert choose_rendition(1e9) == RENDITIONS[0]
    assert choose_rendition(0) is None
    small = choose_rendition(2_000)  # 64 kbit/s with 2-lead ECG leaves ~2-3 kB per frame at 2 fps
    assert small is not None
    assert small.width <= 240
    widths = [choose_rendition(b).width for b in (2_000, 10_000, 50_000, 300_000)]  # type: ignore[union-attr]
    assert widths == sorted(widths)
    # the estimate is conservative: a real encode of the test pattern fits the budget it was chosen for
    for budget in (3_000, 20_000, 80_000):
        r = choose_rendition(budget)
        assert r is not None
        size = len(encode_video_frame(CameraFrame(SyntheticCamera().picture(1), AT), r, 0))
        assert size <= budget * 1.5, (budget, r, size)


async def test_camera_paces_frames() -> None:
    ticks = iter([0.0, 0.0, 0.5, 1.0, 1.0])
    camera = SyntheticCamera(2.0, size=(64, 48), stop_after=3, monotonic=lambda: next(ticks, 1.0), clock=lambda: AT)
    frames = [f async for f in camera]
    assert len(frames) == 3
    assert frames[0].image.size == (64, 48)
