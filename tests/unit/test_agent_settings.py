"""AgentSettings: environment prefix EMS_AGENT_, unsafe values refused at start-up; the agent built from them."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from pydantic import ValidationError

from ambulance_agent.crypto import generate_unit_key
from ambulance_agent.main import build
from ambulance_agent.settings import AgentSettings
from ambulance_agent.sources.ecg import WfdbEcgReplay
from ambulance_agent.sources.monitor import Hl7MonitorSource
from ambulance_agent.sources.nmea import NmeaGpsSource

ROOT = Path(__file__).resolve().parents[2]
RECORD_100 = ROOT / "simulators" / "data" / "mitdb" / "100"


@pytest.fixture(autouse=True)
def unit_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Production settings need the unit's outbox key (tests/unit/test_security_outbox_at_rest.py)."""
    monkeypatch.setenv("EMS_AGENT_UNIT_KEY", base64.b64encode(generate_unit_key()).decode())


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMS_AGENT_UNIT_ID", "amb-12")
    monkeypatch.setenv("EMS_AGENT_BROKER_URL", "mqtt://127.0.0.1:1884")
    monkeypatch.setenv("EMS_AGENT_OUTBOX_PATH", str(tmp_path / "o.db"))
    monkeypatch.setenv("EMS_AGENT_ECG_WFDB_RECORD", str(RECORD_100))
    monkeypatch.setenv("EMS_AGENT_ECG_CHANNELS", "MLII, V5")
    monkeypatch.setenv("EMS_AGENT_MLLP_PORT", "0")
    monkeypatch.setenv("EMS_AGENT_NMEA_TCP", "127.0.0.1:10110")
    monkeypatch.setenv("EMS_AGENT_BANDWIDTH_BPS", "64000")
    settings = AgentSettings()  # type: ignore[call-arg,unused-ignore]
    assert settings.ecg_channels == ("MLII", "V5")
    assert settings.broker().port == 1884
    built = build(settings)
    try:
        assert isinstance(built.agent.ecg, WfdbEcgReplay)
        assert built.agent.ecg.leads == ("MLII", "V5")
        assert isinstance(built.monitor, Hl7MonitorSource)
        assert isinstance(built.gps, NmeaGpsSource)
        assert built.gps.tcp == ("127.0.0.1", 10110)
        assert built.agent.link_health().budget_bps == 64000
        assert built.agent.link.client_id == "agent-amb-12"
    finally:
        built.agent.close()


def test_measured_budget_when_none_is_configured(tmp_path: Path) -> None:
    built = build(AgentSettings(unit_id="amb-1", outbox_path=tmp_path / "o.db", bandwidth_max_bps=2_000_000))
    try:
        assert built.agent.link_health().budget_bps == 32_000
        assert built.agent.ecg is None
        assert built.agent.vitals is None
    finally:
        built.agent.close()


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"unit_id": "amb 1"}, "unit_id"),
        ({"mllp_port": 2575, "mllp_host": "0.0.0.0"}, "loopback"),
        ({"mllp_port": 2575, "vitals_numerics_record": "x"}, "one vitals source"),
        ({"nmea_tcp": "gps", "unit_id": "a"}, "host:port"),
        ({"nmea_tcp": "h:1", "nmea_device": "/dev/ttyUSB0"}, "one GPS source"),
        ({"bandwidth_bps": 1000}, "bandwidth_bps"),
        ({"ecg_channels": "i,ii"}, "ecg_channels needs"),
        ({"log_level": "chatty"}, "log_level"),
    ],
)
def test_unsafe_or_inconsistent_settings_are_refused(values: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        AgentSettings(**{"unit_id": "amb-1", **values})  # type: ignore[arg-type]


def test_a_remote_mllp_listener_needs_an_explicit_yes() -> None:
    settings = AgentSettings(unit_id="amb-1", mllp_port=2575, mllp_host="192.168.8.2", mllp_allow_remote=True)
    assert settings.mllp_host == "192.168.8.2"
