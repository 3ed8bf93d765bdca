"""The PyAV camera source on real inputs: an H.264 file, the same clip as a network stream over a real local HTTP
socket, a V4L2 device when the machine has one, and a corrupt file that is counted and retried while the agent's
other sources keep streaming through a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import glob
import http.server
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest

from ambulance_agent.app import Agent
from ambulance_agent.sources import WfdbEcgReplay
from ambulance_agent.sources.camera import AvCameraSource, camera_input_format
from ambulance_agent.video import CameraFrame, decode_video_frame, write_test_clip
from broker_config import BrokerSettings, Stream, TopicSpace

pytestmark = pytest.mark.integration

RECORD_100 = Path(__file__).resolve().parents[2] / "simulators" / "data" / "mitdb" / "100"


async def take(source: AvCameraSource, n: int, timeout_s: float = 20.0) -> list[CameraFrame]:
    frames: list[CameraFrame] = []
    async with asyncio.timeout(timeout_s), contextlib.aclosing(source.__aiter__()) as it:
        async for frame in it:
            frames.append(frame)
            if len(frames) == n:
                break
    return frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 3-s H.264 clip in MPEG-TS (10 fps, 640x480) written with PyAV."""
    return write_test_clip(tmp_path_factory.mktemp("clip") / "cabin.ts", seconds=3.0, fps=10)


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[int]:
    """A real HTTP server on a loopback socket serving ``folder`` (a camera's HTTP stream stand-in)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


async def test_a_video_file_is_sampled_at_the_configured_rate_scaled_and_looped(clip: Path) -> None:
    source = AvCameraSource(str(clip), fps=2.0, max_width=320)
    loop = asyncio.get_running_loop()
    started = loop.time()
    frames = await take(source, 8)
    elapsed = loop.time() - started
    assert all(f.image.size == (320, 240) and f.image.mode == "RGB" for f in frames)
    # 8 pictures at 2 per second of a 3-s clip played in real time: the file was looped, not read at once
    assert elapsed >= 3.0
    assert source.sessions >= 2, "the file was played again at its end"
    assert source.frames_decoded > source.frames_delivered, "decoded at the clip's 10 fps, sampled at 2"
    assert not source.errors
    times = [f.captured_at for f in frames]
    assert times == sorted(times)


async def test_a_file_played_once_ends_the_iteration(clip: Path) -> None:
    source = AvCameraSource(str(clip), fps=2.0, loop=False)
    frames = await take(source, 100)
    assert 5 <= len(frames) <= 7, "3 s at 2 frames per second"
    assert source.sessions == 1
    assert not source.errors


async def test_a_one_picture_file_loops_at_the_frame_rate_not_in_a_hot_loop(tmp_path: Path) -> None:
    """A clip shorter than a frame period (one picture) used to reopen at once: 720 sessions in 3 s (hostile tester)."""
    still = write_test_clip(tmp_path / "still.ts", seconds=0.1, fps=10)
    source = AvCameraSource(str(still), fps=4.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    frames = await take(source, 5)
    elapsed = loop.time() - started
    assert len(frames) == 5
    assert elapsed >= 4 * 0.25 * 0.9, "five pictures at 4 per second take about a second"
    assert source.sessions <= 8


async def test_the_same_clip_as_a_network_stream_over_a_real_http_socket(clip: Path) -> None:
    with http_server(clip.parent) as port:
        source = AvCameraSource(f"http://127.0.0.1:{port}/{clip.name}", fps=4.0, retry_min_s=0.05, retry_max_s=0.2)
        assert not source.is_file
        frames = await take(source, 14)
    assert all(f.image.size == (640, 480) for f in frames)
    # the served clip is 3 s: the stream "dropped" at its end, was counted and re-opened
    assert source.errors["ended"] >= 1
    assert source.sessions >= 2


async def test_a_network_stream_that_is_not_there_is_counted_and_retried() -> None:
    with http_server(Path(__file__).parent) as port:
        source = AvCameraSource(f"http://127.0.0.1:{port}/missing.ts", fps=2.0, retry_min_s=0.05, retry_max_s=0.1)
        with pytest.raises(TimeoutError):
            await take(source, 1, timeout_s=1.5)
    assert source.errors["open"] >= 2
    assert source.sessions == 0


def test_v4l2_devices_get_the_v4l2_input_format() -> None:
    assert camera_input_format("/dev/video0") == "v4l2"
    assert camera_input_format("rtsp://cam/stream1") is None
    assert camera_input_format("/var/cabin.mp4") is None


async def test_a_v4l2_device() -> None:
    devices = sorted(glob.glob("/dev/video*"))
    if not devices:
        pytest.skip("no V4L2 device (/dev/video*) on this machine")
    source = AvCameraSource(devices[0], fps=2.0, max_width=320)
    frames = await take(source, 2, timeout_s=30)
    assert all(f.image.width <= 320 for f in frames)


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    task = asyncio.create_task(agent.run())
    try:
        await agent.link.wait_connected(15)
        yield agent
    finally:
        agent.stop()
        async with asyncio.timeout(15):
            await task
        agent.close()


async def test_a_corrupt_camera_file_is_counted_and_the_other_sources_continue(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace, tmp_path: Path, clip: Path
) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64)
    camera = AvCameraSource(str(corrupt), camera_id="cab-1", fps=2.0, retry_min_s=0.05, retry_max_s=0.2)
    unit = f"amb-{uuid.uuid4().hex[:8]}"
    ecg_seqs: list[int] = []
    video = 0
    async with aiomqtt.Client(mqtt_settings.host, mqtt_settings.port, identifier=f"c-{uuid.uuid4().hex[:8]}") as sub:
        await sub.subscribe([(topic_space.filter(s, unit), 1) for s in (Stream.ECG, Stream.VIDEO)])
        agent = Agent(
            unit,
            mqtt_settings,
            topic_space,
            outbox_path=tmp_path / "outbox.db",
            ecg=WfdbEcgReplay(RECORD_100, pace=4.0),
            vitals=None,
            gps=None,
            video=camera,
            video_fps=2.0,
        )
        async with running(agent):
            async with asyncio.timeout(20):
                async for message in sub.messages:
                    if topic_space.parse(message.topic.value).stream is Stream.VIDEO:
                        video += 1
                    else:
                        ecg_seqs.append(len(ecg_seqs))
                    if len(ecg_seqs) >= 8 and camera.errors["open"] >= 3:
                        break
    assert video == 0
    assert camera.errors["open"] >= 3, "each failed opening is counted"
    assert len(ecg_seqs) >= 8, "the ECG kept streaming while the camera failed"


async def test_frames_from_the_real_capture_path_reach_the_broker_as_jpeg(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace, tmp_path: Path, clip: Path
) -> None:
    unit = f"amb-{uuid.uuid4().hex[:8]}"
    camera = AvCameraSource(str(clip), fps=2.0)
    headers = []
    async with aiomqtt.Client(mqtt_settings.host, mqtt_settings.port, identifier=f"v-{uuid.uuid4().hex[:8]}") as sub:
        await sub.subscribe(topic_space.filter(Stream.VIDEO, unit), qos=0)
        agent = Agent(
            unit,
            mqtt_settings,
            topic_space,
            outbox_path=tmp_path / "outbox.db",
            ecg=None,
            vitals=None,
            gps=None,
            video=camera,
            video_fps=2.0,
        )
        async with running(agent):
            async with asyncio.timeout(20):
                async for message in sub.messages:
                    assert isinstance(message.payload, bytes)
                    headers.append(decode_video_frame(message.payload)[0])
                    if len(headers) == 4:
                        break
            assert all(m.stream is not Stream.VIDEO for m in agent.outbox.pending(1000))
    assert [h.seq for h in headers] == sorted(h.seq for h in headers)
    assert all((h.width, h.height) == (640, 480) for h in headers), "no budget: full size"
