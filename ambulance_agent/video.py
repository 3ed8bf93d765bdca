"""Camera frames at the lowest priority: JPEG, QoS 0, never stored in the outbox, rate and quality fitted to the link.

The contract leaves video frames opaque (:data:`broker_config.MODELS` has no video model: "JPEG/H.264 bytes with
their own header").  This is that header, ``GHV1``, little-endian:

====== ===== ===============================================================
offset bytes field
====== ===== ===============================================================
0      4     magic ``b"GHV1"``
4      1     version (1)
5      1     codec (1 = JPEG)
6      2     width (uint16)
8      2     height (uint16)
10     1     JPEG quality used (1-95)
11     1     reserved (0)
12     8     seq (uint64, per unit, restarts with the agent: video is live only)
20     8     captured_at, microseconds since 1970-01-01 UTC (int64)
28     ...   the JPEG (JFIF) image
====== ===== ===============================================================

A frame is only sent when nothing else is waiting and the bandwidth budget has room for it; the size and quality
come from :func:`choose_rendition` for the bytes per frame the spare budget allows.  A camera that delivers faster
than frames can go is simply sampled: only the newest frame is kept (no queue).

Pillow encodes the JPEGs (``Pillow`` is on PyPI and installed here; OpenCV is not needed for JPEG).  The real camera
source is :class:`ambulance_agent.sources.camera.AvCameraSource` (PyAV: a file, an RTSP/HTTP stream, a V4L2 device);
:class:`SyntheticCamera` is a test pattern, and :func:`write_test_clip` turns it into a real H.264 file for tests and
the benchmark.
"""

from __future__ import annotations

import asyncio
import io
import math
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from PIL import Image, ImageDraw

from broker_config import utc_now

__all__ = [
    "RENDITIONS",
    "VIDEO_MAGIC",
    "CameraFrame",
    "Rendition",
    "SyntheticCamera",
    "VideoHeader",
    "choose_rendition",
    "decode_video_frame",
    "encode_video_frame",
    "write_test_clip",
]

VIDEO_MAGIC = b"GHV1"
_HEAD = struct.Struct("<4sBBHHBBQq")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_JPEG = 1


@dataclass(frozen=True, slots=True)
class CameraFrame:
    """One picture from the camera (RGB) and when it was taken."""

    image: Image.Image
    captured_at: datetime


@dataclass(frozen=True, slots=True)
class Rendition:
    """How a frame is sent: width (height keeps the aspect ratio) and JPEG quality."""

    width: int
    quality: int


RENDITIONS: tuple[Rendition, ...] = (
    Rendition(1280, 80),
    Rendition(960, 70),
    Rendition(640, 60),
    Rendition(480, 50),
    Rendition(320, 40),
    Rendition(240, 30),
    Rendition(160, 25),
)
"""From best to smallest."""

_BYTES_PER_PIXEL_AT_QUALITY = {80: 0.30, 70: 0.22, 60: 0.17, 50: 0.14, 40: 0.11, 30: 0.09, 25: 0.08}
"""Rough JPEG size of camera-like pictures per pixel (4:2:0), used only to pick a rendition before encoding."""


def choose_rendition(frame_budget_bytes: float, aspect: float = 0.75) -> Rendition | None:
    """The best rendition whose expected JPEG fits ``frame_budget_bytes``; None if even the smallest does not."""
    for r in RENDITIONS:
        pixels = r.width * r.width * aspect
        if pixels * _BYTES_PER_PIXEL_AT_QUALITY[r.quality] <= frame_budget_bytes:
            return r
    return None


@dataclass(frozen=True, slots=True)
class VideoHeader:
    """The decoded GHV1 header."""

    width: int
    height: int
    quality: int
    seq: int
    captured_at: datetime


def encode_video_frame(frame: CameraFrame, rendition: Rendition, seq: int) -> bytes:
    """Scale and JPEG-encode a frame, with the GHV1 header in front (CPU work: call it off the event loop)."""
    image = frame.image.convert("RGB")
    if image.width > rendition.width:
        height = max(1, round(image.height * rendition.width / image.width))
        image = image.resize((rendition.width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rendition.quality, optimize=False)
    delta = frame.captured_at - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    head = _HEAD.pack(VIDEO_MAGIC, 1, _JPEG, image.width, image.height, rendition.quality, 0, seq, micros)
    return head + buffer.getvalue()


def decode_video_frame(payload: bytes) -> tuple[VideoHeader, bytes]:
    """Split a GHV1 payload into its header and JPEG bytes.  Raises ValueError for anything else."""
    if len(payload) < _HEAD.size:
        raise ValueError("video frame shorter than its header")
    magic, version, codec, width, height, quality, _, seq, micros = _HEAD.unpack_from(payload)
    if magic != VIDEO_MAGIC or version != 1 or codec != _JPEG:
        raise ValueError("not a GHV1 JPEG frame")
    jpeg = payload[_HEAD.size :]
    if not jpeg.startswith(b"\xff\xd8"):
        raise ValueError("GHV1 frame without a JPEG image")
    return VideoHeader(width, height, quality, seq, _EPOCH + timedelta(microseconds=micros)), jpeg


class SyntheticCamera:
    """A stand-in camera: ``fps`` frames per second of a moving test picture (640x480 by default).

    Args:
        fps: frames per second (> 0).
        size: (width, height) in pixels.
        stop_after: frames before the iteration ends (None = never).
        clock, monotonic: injectable time.
    """

    def __init__(
        self,
        fps: float = 2.0,
        *,
        size: tuple[int, int] = (640, 480),
        stop_after: int | None = None,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not fps > 0:
            raise ValueError("fps must be > 0")
        self.fps = fps
        self.size = size
        self.stop_after = stop_after
        self._clock = clock
        self._monotonic = monotonic

    def picture(self, k: int) -> Image.Image:
        """Frame ``k``: a gradient with a moving bar and grid (compresses like a real scene, not like a flat one)."""
        w, h = self.size
        image = Image.new("RGB", self.size)
        draw = ImageDraw.Draw(image)
        for y in range(0, h, 8):
            shade = int(80 + 100 * (0.5 + 0.5 * math.sin(y / 37 + k / 5)))
            draw.rectangle((0, y, w, y + 8), fill=(shade, shade // 2, 255 - shade))
        x = (k * 23) % w
        draw.rectangle((x, 0, x + w // 8, h), fill=(240, 240, 240))
        for gx in range(0, w, 40):
            draw.line((gx, 0, gx, h), fill=(20, 20, 20))
        draw.text((10, 10), f"frame {k}", fill=(255, 255, 0))
        return image

    def __aiter__(self) -> AsyncIterator[CameraFrame]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[CameraFrame]:
        t0 = self._monotonic()
        k = 0
        while self.stop_after is None or k < self.stop_after:
            delay = t0 + k / self.fps - self._monotonic()
            await asyncio.sleep(max(0.0, delay))
            yield CameraFrame(await asyncio.to_thread(self.picture, k), self._clock())
            k += 1


def write_test_clip(
    path: Path, *, seconds: float = 4.0, fps: int = 10, size: tuple[int, int] = (640, 480), container: str | None = None
) -> Path:
    """Write :class:`SyntheticCamera`'s pictures as an H.264 video file with PyAV (libx264, yuv420p).

    Args:
        path: the file; its suffix chooses the container (``.mp4``, ``.ts``, ``.mkv``) unless ``container`` is given.
        seconds, fps, size: length, frame rate and picture size (width and height even).

    Returns:
        ``path``.
    """
    import av  # only tests and the benchmark write clips

    camera = SyntheticCamera(float(fps), size=size)
    with av.open(str(path), mode="w", format=container) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "g": str(2 * fps)}
        for k in range(round(seconds * fps)):
            frame = av.VideoFrame.from_image(camera.picture(k))
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path
