"""A camera as an agent source: frames from anything FFmpeg can open, through PyAV, sampled at a few per second.

Inputs (one ``url`` string, as FFmpeg takes it):

* a video file (``/var/lib/goldenhour/cabin.mp4``): played in real time by its timestamps, looped;
* a network stream (``rtsp://camera.local/stream1``, ``http://10.0.0.5/video.ts``, ``udp://...``);
* a V4L2 device (``/dev/video0``; the ``v4l2`` input format is chosen automatically for ``/dev/video*``).

PyAV (``av`` on PyPI, bundling FFmpeg's libavformat/libavcodec) demuxes and decodes in a worker thread of its own,
so the event loop never waits on the camera.  Every frame is decoded (inter-coded video needs it) but only one per
``1 / fps`` seconds is converted to a picture (scaled to at most ``max_width`` wide, RGB) and handed to the loop;
if the agent has not taken the previous picture yet it is replaced, never queued (video is live only).  What is
sent, at which size and JPEG quality, is the agent's decision (:mod:`ambulance_agent.video`).

Failures (cannot open, no video stream, corrupt data, a network stream that ends or stalls past
``read_timeout_s``, an unplugged device) end the session: the reason is counted in :attr:`AvCameraSource.errors`
and logged with the camera's id only (a URL may carry credentials, so it is never logged), and the source re-opens
after a capped exponential back-off with jitter.  The iteration itself never raises, so a broken camera never stops
the agent's other sources.  The end of a file is not a failure: the file is played again (``loop=True``).

The ``av`` module is imported in the worker thread on first use, so an agent without a camera never loads FFmpeg.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from ambulance_agent.video import CameraFrame
from broker_config import utc_now
from broker_config.connection import Backoff

__all__ = ["AvCameraSource", "camera_input_format"]

logger = logging.getLogger(__name__)

_RESYNC_S = 5.0
"""A timestamp jump of more than this (a stream discontinuity, a looped file) restarts the real-time pacing."""


def camera_input_format(url: str) -> str | None:
    """The FFmpeg input format to force for ``url``: ``v4l2`` for ``/dev/video*``, else None (FFmpeg probes)."""
    return "v4l2" if url.startswith("/dev/video") else None


class _Mailbox:
    """The newest picture from the capture thread, and whether the session ended (used on the loop thread only)."""

    def __init__(self) -> None:
        self.frame: CameraFrame | None = None
        self.ended: str | None = None
        self.replaced = 0
        self.event = asyncio.Event()

    def put(self, frame: CameraFrame) -> None:
        if self.frame is not None:
            self.replaced += 1
        self.frame = frame
        self.event.set()

    def end(self, outcome: str) -> None:
        self.ended = outcome
        self.event.set()


class AvCameraSource:
    """Camera frames (:class:`~ambulance_agent.video.CameraFrame`) from a file, a network stream or a V4L2 device.

    Args:
        url: what FFmpeg opens (see the module docstring).
        camera_id: the id logs and counters use (never the URL).
        fps: pictures per second handed to the agent at most (> 0; the agent sends at most its own ``video_fps``).
        input_format: FFmpeg input format (None: ``v4l2`` for ``/dev/video*``, else probed).
        options: FFmpeg options for the input (e.g. ``{"rtsp_transport": "tcp"}``, ``{"video_size": "640x480"}``).
        max_width: pictures wider than this are scaled down (aspect kept) before they leave the capture thread.
        loop: play a file again when it ends, else end the iteration (a network stream or device that ends is a
            failure and is retried).
        open_timeout_s, read_timeout_s: FFmpeg's bounds for opening and for each read of a network input.
        retry_min_s, retry_max_s: back-off bounds after a failure.
        clock: aware-UTC clock for ``captured_at``.

    Attributes:
        errors: failures by reason (``open``, ``no video stream``, ``decode``, ``ended``, ``stalled``).
        sessions: inputs opened successfully.  frames_decoded, frames_delivered: counters.

    Raises:
        ValueError: ``fps`` not > 0 or ``max_width`` < 16.
    """

    def __init__(
        self,
        url: str,
        *,
        camera_id: str = "camera",
        fps: float = 2.0,
        input_format: str | None = None,
        options: dict[str, str] | None = None,
        max_width: int = 1280,
        loop: bool = True,
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 10.0,
        retry_min_s: float = 0.5,
        retry_max_s: float = 30.0,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        if not fps > 0:
            raise ValueError("fps must be > 0")
        if max_width < 16:
            raise ValueError("max_width must be >= 16")
        self.url = url
        self.camera_id = camera_id
        self.fps = fps
        self.input_format = input_format if input_format is not None else camera_input_format(url)
        self.options = dict(options or {})
        self.max_width = max_width
        self.loop = loop
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        self._backoff = Backoff(retry_min_s, retry_max_s)
        self._clock = clock
        self.errors: collections.Counter[str] = collections.Counter()
        self.sessions = 0
        self.frames_decoded = 0
        self.frames_delivered = 0
        self.frames_replaced = 0
        self.connected = False

    @property
    def is_file(self) -> bool:
        """The input is a regular file (its end is not a failure)."""
        try:
            return self.input_format is None and Path(self.url).is_file()
        except (OSError, ValueError):
            return False

    def __aiter__(self) -> AsyncGenerator[CameraFrame, None]:
        return self._frames()

    async def _frames(self) -> AsyncGenerator[CameraFrame, None]:
        loop = asyncio.get_running_loop()
        while True:
            mailbox = _Mailbox()
            stop = threading.Event()

            def post(frame: CameraFrame, mailbox: _Mailbox = mailbox) -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed while the thread was still decoding
                    loop.call_soon_threadsafe(mailbox.put, frame)

            def finish(outcome: str, mailbox: _Mailbox = mailbox) -> None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(mailbox.end, outcome)

            thread = threading.Thread(
                target=self._session, args=(stop, post, finish), name=f"camera-{self.camera_id}", daemon=True
            )
            thread.start()
            started = time.monotonic()
            delivered = 0
            try:
                while True:
                    if mailbox.frame is not None:
                        frame, mailbox.frame = mailbox.frame, None
                        delivered += 1
                        self.frames_delivered += 1
                        yield frame
                    elif mailbox.ended is not None:
                        break
                    else:
                        mailbox.event.clear()
                        await mailbox.event.wait()
            finally:
                stop.set()  # the thread notices within one frame or one read timeout
                self.frames_replaced += mailbox.replaced
                self.connected = False
            outcome = mailbox.ended
            if outcome == "eof" and self.is_file and delivered:
                if not self.loop:
                    return  # a file played once: the iteration ends
                # a file played to its end: again, but a clip shorter than a frame period (one picture) must not
                # reopen in a hot loop
                await asyncio.sleep(max(0.0, 1.0 / self.fps - (time.monotonic() - started)))
                continue
            if outcome == "eof":
                outcome = "ended"
            if delivered:
                self._backoff.reset()
            delay_s = max(self._backoff.next_delay_s(), 0.05)
            if outcome != "stopped":
                self.errors[outcome] += 1
                logger.warning(
                    "camera %s: %s; retrying in %.1f s (errors %d)",
                    self.camera_id,
                    outcome,
                    delay_s,
                    sum(self.errors.values()),
                )
            await asyncio.sleep(delay_s)

    def _open(self) -> Any:
        import av  # lazily: FFmpeg's libraries are loaded only when a camera is configured

        return av.open(
            self.url,
            format=self.input_format,
            options=self.options,
            timeout=(self.open_timeout_s, self.read_timeout_s),
        )

    def _session(
        self, stop: threading.Event, post: Callable[[CameraFrame], None], finish: Callable[[str], None]
    ) -> None:
        """One opening of the input, in the capture thread: decode, pace, sample, scale; ``finish`` says why it
        ended (``eof``, ``stopped`` or a failure reason).  Never raises."""
        try:
            container = self._open()
        except Exception as exc:  # noqa: BLE001 - the source's error boundary: any failure to open is counted
            logger.debug("camera %s: open failed (%s)", self.camera_id, type(exc).__name__)
            finish("open")
            return
        outcome = "eof"
        try:
            if not container.streams.video:
                finish("no video stream")
                return
            stream = container.streams.video[0]
            self.sessions += 1
            self.connected = True
            logger.info("camera %s: input open", self.camera_id)
            period_s = 1.0 / self.fps
            t0: float | None = None
            first_s = 0.0
            next_at = 0.0
            for frame in container.decode(stream):
                if stop.is_set():
                    outcome = "stopped"
                    break
                self.frames_decoded += 1
                now = time.monotonic()
                at_s = frame.time
                if at_s is not None:
                    due = None if t0 is None else t0 + (at_s - first_s)
                    if due is None or abs(due - now) > _RESYNC_S:
                        t0, first_s, due = now, at_s, now
                    if due > now:  # a file (or a burst): real time by the frame's timestamp
                        if stop.wait(due - now):
                            outcome = "stopped"
                            break
                        now = time.monotonic()
                if now < next_at:
                    continue
                next_at = now + period_s if now - next_at > period_s else next_at + period_s
                width = min(frame.width, self.max_width)
                height = max(2, round(frame.height * width / frame.width))
                post(CameraFrame(frame.to_image(width=width, height=height), self._clock()))
        except Exception as exc:  # noqa: BLE001 - error boundary: corrupt data, a dropped stream, a stall, unplugged
            name = type(exc).__name__
            outcome = "stalled" if "timeout" in name.lower() or "TimedOut" in name else "decode"
            logger.debug("camera %s: session ended (%s)", self.camera_id, name)
        finally:
            with contextlib.suppress(Exception):
                container.close()
        finish(outcome)
