"""Settings of the raw-stream ECG source (EMS_AGENT_ECG_STREAM*) and the agent built from them."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from ambulance_agent.crypto import generate_unit_key
from ambulance_agent.main import build
from ambulance_agent.settings import AgentSettings
from ambulance_agent.sources.ecg_stream import STANDARD_12_LEADS, RawEcgStreamSource


@pytest.fixture(autouse=True)
def unit_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMS_AGENT_UNIT_KEY", base64.b64encode(generate_unit_key()).decode())


def test_the_stream_source_is_built_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMS_AGENT_UNIT_ID", "amb-12")
    monkeypatch.setenv("EMS_AGENT_OUTBOX_PATH", str(tmp_path / "o.db"))
    monkeypatch.setenv("EMS_AGENT_ECG_STREAM", "127.0.0.1:5599")
    monkeypatch.setenv("EMS_AGENT_ECG_STREAM_FS_HZ", "500")
    monkeypatch.setenv("EMS_AGENT_ECG_STREAM_GAIN", "1000")
    monkeypatch.setenv("EMS_AGENT_ECG_STREAM_BASELINE", "-3")
    monkeypatch.setenv("EMS_AGENT_ECG_STREAM_LEAD_OFF_CODE", "none")
    monkeypatch.setenv("EMS_AGENT_ECG_STREAM_ADC_MIN", "-2048")
    monkeypatch.setenv("EMS_AGENT_ECG_STREAM_ADC_MAX", "2047")
    built = build(AgentSettings())  # type: ignore[call-arg,unused-ignore]
    try:
        ecg = built.agent.ecg
        assert isinstance(ecg, RawEcgStreamSource)
        assert ecg.target == ("127.0.0.1", 5599)
        assert (ecg.fs_hz, ecg.gain_adc_per_mv, ecg.baseline_adc) == (500.0, 1000.0, -3)
        assert ecg.leads == STANDARD_12_LEADS
        assert (ecg.lead_off_code, ecg.adc_min, ecg.adc_max) == (None, -2048, 2047)
        assert ecg.chunk_n == 500
    finally:
        built.agent.close()
    monkeypatch.setenv("EMS_AGENT_ECG_STREAM", "/dev/ttyUSB3")
    monkeypatch.setenv("EMS_AGENT_ECG_STREAM_LEADS", "I, II, V5")
    monkeypatch.delenv("EMS_AGENT_ECG_STREAM_LEAD_OFF_CODE")
    built = build(AgentSettings())  # type: ignore[call-arg,unused-ignore]
    try:
        ecg = built.agent.ecg
        assert isinstance(ecg, RawEcgStreamSource)
        assert (ecg.target, ecg.leads, ecg.lead_off_code) == (Path("/dev/ttyUSB3"), ("I", "II", "V5"), -32768)
    finally:
        built.agent.close()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ecg_stream": "monitor"}, "host:port"),
        ({"ecg_stream": "h:1", "ecg_stream_gain": 200}, "ecg_stream_fs_hz and ecg_stream_gain"),
        ({"ecg_stream": "h:1", "ecg_stream_fs_hz": 500}, "ecg_stream_fs_hz and ecg_stream_gain"),
        ({"ecg_stream": "h:1", "ecg_stream_fs_hz": 500, "ecg_stream_gain": 200, "ecg_wfdb_record": "x"}, "one ECG"),
        ({"ecg_stream": "h:1", "ecg_stream_fs_hz": 500, "ecg_stream_gain": 200, "ecg_stream_adc_min": 5,
          "ecg_stream_adc_max": 5}, "adc_min"),
        ({"ecg_stream": "h:1", "ecg_stream_fs_hz": 500, "ecg_stream_gain": 0}, "ecg_stream_gain"),
    ],
)  # fmt: skip
def test_an_incomplete_or_inconsistent_stream_description_is_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AgentSettings(**{"unit_id": "amb-1", **values})  # type: ignore[arg-type]


def test_the_vehicle_agent_never_loads_wfdb_pandas_or_scipy() -> None:
    """wfdb pulls pandas (~70 MB) and scipy.signal costs ~100 MB; only the file replays may load them, lazily."""
    code = (
        "import sys, ambulance_agent.__main__, ambulance_agent.main, ambulance_agent.sources, ambulance_agent.app\n"
        "print(sorted(m for m in ('wfdb', 'pandas', 'scipy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == "[]"
