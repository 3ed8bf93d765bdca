"""Composition of a real vehicle's agent from :class:`~ambulance_agent.settings.AgentSettings`.

``python -m ambulance_agent`` calls :func:`main`; tests and the benchmark call :func:`build` / :func:`serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

from ambulance_agent.app import Agent
from ambulance_agent.settings import AgentSettings
from ambulance_agent.sources.base import EcgSource, GpsSource, Source, VitalsSource
from ambulance_agent.sources.ecg import WfdbEcgReplay
from ambulance_agent.sources.ecg_stream import RawEcgStreamSource, parse_stream_target
from ambulance_agent.sources.monitor import Hl7MonitorSource
from ambulance_agent.sources.nmea import NmeaGpsSource, parse_host_port
from ambulance_agent.sources.vitals import NumericsVitalsReplay
from ambulance_agent.video import CameraFrame
from broker_config import TopicSpace

__all__ = ["Built", "build", "serve"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Built:
    """An agent with its sources, ready to :func:`serve`."""

    settings: AgentSettings
    agent: Agent
    monitor: Hl7MonitorSource | None
    gps: GpsSource | None


def build(settings: AgentSettings) -> Built:
    """Create the sources and the agent (no I/O except reading replay files and opening the outbox)."""
    ecg: EcgSource | None = None
    if settings.ecg_stream is not None:
        assert settings.ecg_stream_fs_hz is not None
        assert settings.ecg_stream_gain is not None
        ecg = RawEcgStreamSource(
            parse_stream_target(settings.ecg_stream),
            fs_hz=settings.ecg_stream_fs_hz,
            leads=settings.ecg_stream_leads,
            gain_adc_per_mv=settings.ecg_stream_gain,
            baseline_adc=settings.ecg_stream_baseline,
            lead_off_code=settings.ecg_stream_lead_off_code,
            adc_min=settings.ecg_stream_adc_min,
            adc_max=settings.ecg_stream_adc_max,
            chunk_s=settings.ecg_chunk_s,
            baud=settings.ecg_stream_baud,
        )
    elif settings.ecg_wfdb_record is not None:
        ecg = WfdbEcgReplay(
            settings.ecg_wfdb_record,
            chunk_s=settings.ecg_chunk_s,
            pace=settings.pace,
            loop=settings.replay_loop,
            stop_s=settings.replay_stop_s,
            channels=settings.ecg_channels,
            resample_hz=settings.ecg_resample_hz,
        )
    vitals: VitalsSource | None = None
    monitor: Hl7MonitorSource | None = None
    if settings.mllp_port is not None:
        monitor = Hl7MonitorSource(settings.mllp_host, settings.mllp_port)
        vitals = monitor
    elif settings.vitals_numerics_record is not None:
        vitals = NumericsVitalsReplay(
            settings.vitals_numerics_record,
            pace=settings.pace,
            loop=settings.replay_loop,
            stop_s=settings.replay_stop_s,
        )
    gps: GpsSource | None = None
    if settings.nmea_tcp is not None:
        gps = NmeaGpsSource(tcp=parse_host_port(settings.nmea_tcp), baud=settings.nmea_baud)
    elif settings.nmea_gpsd is not None:
        gps = NmeaGpsSource(gpsd=parse_host_port(settings.nmea_gpsd), baud=settings.nmea_baud)
    elif settings.nmea_device is not None:
        gps = NmeaGpsSource(device=settings.nmea_device, baud=settings.nmea_baud)
    video: Source[CameraFrame] | None = None
    if settings.camera:
        from ambulance_agent.sources.camera import AvCameraSource  # FFmpeg (PyAV) only when a camera is configured

        video = AvCameraSource(settings.camera, camera_id=f"{settings.unit_id}-cam", fps=settings.video_fps or 2.0)
    elif settings.video_fps > 0:
        from ambulance_agent.video import SyntheticCamera  # a test pattern

        video = SyntheticCamera(settings.video_fps)
    agent = Agent(
        settings.unit_id,
        settings.broker(),
        TopicSpace(settings.topic_prefix),
        outbox_path=settings.outbox_path,
        ecg=ecg,
        vitals=vitals,
        gps=gps,
        outbox_max_bytes=settings.outbox_max_bytes,
        stale_after_s=settings.stale_after_s,
        client_id=settings.client_id,
        bandwidth_bps=settings.bandwidth_bps,
        adaptive_bandwidth=settings.bandwidth_bps is None,
        bandwidth_max_bps=settings.bandwidth_max_bps,
        video=video,
        video_fps=settings.video_fps or 2.0,
        cipher=settings.cipher(),
    )
    if monitor is not None:
        agent.monitor_alarms = monitor.alarms
    return Built(settings, agent, monitor, gps)


async def serve(built: Built, *, stop: asyncio.Event | None = None) -> None:
    """Run the agent (and its crew screen, if configured) until ``stop`` is set, SIGTERM/SIGINT, or cancellation.

    A stop publishes the retained ``offline`` death before returning (the will covers a crash).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    agent = built.agent
    try:
        if built.monitor is not None:
            await built.monitor.start()  # bind now: a port conflict fails the start, not a task later
        async with asyncio.TaskGroup() as tg:
            tg.create_task(agent.run(), name="agent")
            screen = None
            if built.settings.crew_screen_port is not None:
                from ambulance_agent.crew_screen import CrewScreen

                screen = CrewScreen(agent, port=built.settings.crew_screen_port)
                tg.create_task(screen.serve(), name="crew-screen")
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(60):
                        await stop.wait()
            logger.info("agent stop requested unit=%s", agent.unit_id)
            if screen is not None:
                screen.stop()
            agent.stop()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        if built.monitor is not None:
            await built.monitor.close()
        agent.close()
