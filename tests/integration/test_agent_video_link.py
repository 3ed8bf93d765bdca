"""Video through the agent: QoS 0 JPEG frames at the lowest priority, never in the outbox, sized to the budget."""

from __future__ import annotations

import asyncio
import contextlib
import io
import uuid
from pathlib import Path

import aiomqtt
import pytest
from PIL import Image

from ambulance_agent.app import Agent
from ambulance_agent.faultproxy import FaultProxy
from ambulance_agent.sources import WfdbEcgReplay
from ambulance_agent.video import SyntheticCamera, VideoHeader, decode_video_frame
from broker_config import BrokerSettings, CaseType, Findings, Stream, TopicSpace

pytestmark = pytest.mark.integration

RECORD_100 = Path(__file__).resolve().parents[2] / "simulators" / "data" / "mitdb" / "100"


async def run_with_video(
    broker: BrokerSettings, space: TopicSpace, tmp_path: Path, *, frames: int, fps: float = 4.0, **agent_kwargs: object
) -> tuple[list[tuple[VideoHeader, bytes]], list[str], Agent]:
    unit = f"amb-{uuid.uuid4().hex[:8]}"
    got: list[tuple[VideoHeader, bytes]] = []
    order: list[str] = []
    changed = asyncio.Event()
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"v-{uuid.uuid4().hex[:8]}") as sub:
        await sub.subscribe([(space.filter(s, unit), 1) for s in (Stream.VIDEO, Stream.PREALERT)])

        async def collect() -> None:
            async for message in sub.messages:
                assert isinstance(message.payload, bytes)
                stream = space.parse(message.topic.value).stream
                order.append(stream.value)
                if stream is Stream.VIDEO:
                    got.append(decode_video_frame(message.payload))
                changed.set()

        agent = Agent(
            unit,
            agent_kwargs.pop("agent_broker", broker),  # type: ignore[arg-type]
            space,
            outbox_path=tmp_path / f"{unit}.db",
            ecg=WfdbEcgReplay(RECORD_100, pace=4.0),
            vitals=None,
            gps=None,
            video=SyntheticCamera(fps, stop_after=frames),
            video_fps=fps,
            **agent_kwargs,  # type: ignore[arg-type]
        )
        collector = asyncio.create_task(collect())
        task = asyncio.create_task(agent.run())
        try:
            await agent.link.wait_connected(15)
            alert = await agent.prealert(CaseType.MEDICAL, Findings(age_years=40))
            assert alert
            async with asyncio.timeout(30):
                while len(got) + agent.video_frames_skipped < frames or "prealert" not in order:
                    assert all(m.stream is not Stream.VIDEO for m in agent.outbox.pending(1000))
                    changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1):
                            await changed.wait()
        finally:
            agent.stop()
            async with asyncio.timeout(15):
                await task
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
            agent.close()
    return got, order, agent


async def test_frames_arrive_as_jpeg_and_never_touch_the_outbox(
    embedded_broker: BrokerSettings, topic_space: TopicSpace, tmp_path: Path
) -> None:
    got, _, agent = await run_with_video(embedded_broker, topic_space, tmp_path, frames=8)
    assert len(got) >= 6, "unlimited link: (nearly) every frame goes"
    assert [h.seq for h, _ in got] == sorted(h.seq for h, _ in got)
    header, jpeg = got[0]
    assert Image.open(io.BytesIO(jpeg)).size == (header.width, header.height)
    assert header.width == 640, "no budget: the camera's full size"
    assert agent.wire.streams["video"].messages == len(got)


async def test_on_a_64_kbit_budget_frames_shrink_and_crew_messages_still_lead(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace, tmp_path: Path
) -> None:
    async with FaultProxy(mqtt_settings.port, up_bps=64_000, down_bps=64_000) as proxy:
        slow = mqtt_settings.model_copy(update={"port": proxy.port})
        got, order, _ = await run_with_video(
            mqtt_settings, topic_space, tmp_path, frames=6, fps=1.0, agent_broker=slow, bandwidth_bps=56_000
        )
    assert order.index("prealert") < 3, "the pre-alert went before (nearly) any frame"
    assert got, "spare budget carried some frames"
    assert all(h.width <= 320 for h, _ in got), [h.width for h, _ in got]
    assert max(len(j) for _, j in got) < 10_000
