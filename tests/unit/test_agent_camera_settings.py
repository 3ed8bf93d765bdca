"""The camera setting: ``EMS_AGENT_CAMERA`` builds the PyAV source; without it FFmpeg is never loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ambulance_agent.main import build
from ambulance_agent.settings import AgentSettings
from ambulance_agent.sources.camera import AvCameraSource
from ambulance_agent.video import SyntheticCamera

ROOT = Path(__file__).resolve().parents[2]


def test_camera_setting_builds_the_capture_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMS_SECURITY_MODE", "development")
    monkeypatch.setenv("EMS_AGENT_UNIT_ID", "AMB7")
    monkeypatch.setenv("EMS_AGENT_CAMERA", "rtsp://cabin-camera.local/stream1")
    monkeypatch.setenv("EMS_AGENT_OUTBOX_PATH", str(tmp_path / "o.db"))
    built = build(AgentSettings(broker_url="mqtt://127.0.0.1:1"))
    try:
        camera = built.agent.video
        assert isinstance(camera, AvCameraSource)
        assert camera.fps == 2.0, "2 fps unless VIDEO_FPS says otherwise"
        assert built.agent.video_fps == 2.0
        assert camera.camera_id == "AMB7-cam"
        assert camera.input_format is None
    finally:
        built.agent.close()
    monkeypatch.setenv("EMS_AGENT_CAMERA", "/dev/video2")
    monkeypatch.setenv("EMS_AGENT_VIDEO_FPS", "1")
    built = build(AgentSettings(broker_url="mqtt://127.0.0.1:1"))
    try:
        camera = built.agent.video
        assert isinstance(camera, AvCameraSource)
        assert (camera.input_format, camera.fps) == ("v4l2", 1.0)
    finally:
        built.agent.close()
    monkeypatch.delenv("EMS_AGENT_CAMERA")
    built = build(AgentSettings(broker_url="mqtt://127.0.0.1:1"))
    try:
        assert isinstance(built.agent.video, SyntheticCamera)
    finally:
        built.agent.close()


def test_without_a_camera_ffmpeg_is_not_loaded(tmp_path: Path) -> None:
    code = (
        "import sys, os\n"
        "from ambulance_agent.main import build\n"
        "from ambulance_agent.settings import AgentSettings\n"
        f"s = AgentSettings(unit_id='AMB7', broker_url='mqtt://127.0.0.1:1', outbox_path={str(tmp_path / 'o.db')!r})\n"
        "b = build(s)\n"
        "b.agent.close()\n"
        "assert 'av' not in sys.modules, 'PyAV imported without a camera'\n"
    )
    env = {"PATH": "/usr/bin:/bin", "EMS_SECURITY_MODE": "development"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=60)
