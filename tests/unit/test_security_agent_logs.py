"""The agent's logs cannot be forged or garbled by a device or a broker: topics and device-supplied ids (HL7 MSH-10
control ids, OBX codes) are escaped (``broker_config.topics.loggable``) and bounded before they are logged."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest

from ambulance_agent.app import Agent
from ambulance_agent.devices.hl7_monitor import Hl7MonitorInput
from broker_config import BrokerSettings, TopicSpace

FORGED = "\x1b[2J\nINFO ambulance_agent forged line"
HOSTILE_ID = "\x1b[2J\x1b[1;31mID42"
"""A terminal-control sequence inside one HL7 field (a newline would end the segment)."""
RECEIVED = datetime(2025, 3, 14, 9, 30, 20, tzinfo=UTC)


def raw_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [line for r in caplog.records for line in r.getMessage().splitlines()]


def test_a_hostile_hl7_control_id_and_obx_code_are_escaped(caplog: pytest.LogCaptureFixture) -> None:
    msh = rf"MSH|^~\&|MONITOR|AMB12|EDBOARD|CITYHOSP|20250314093015||ORU^R01^ORU_R01|{HOSTILE_ID}|P|2.5"
    obx = f"OBX|1|NM|{HOSTILE_ID}^Heart rate^LN||118|/min^/min^UCUM|||||F"
    message = "\r".join([msh, "OBR|1||VS0042|85353-1^Vital signs panel^LN|||20250314093000", obx]) + "\r"
    inp = Hl7MonitorInput(clock=lambda: RECEIVED)
    with caplog.at_level(logging.INFO):
        inp.handle(message)
        inp.handle(message)  # the duplicate path logs the control id too
    assert caplog.records, "the OBX rejection and the duplicate are logged"
    for line in raw_lines(caplog):
        assert "\x1b" not in line
        assert not line.startswith("INFO ambulance_agent forged")
    assert any("\\x1b" in r.getMessage() for r in caplog.records)


async def test_a_hostile_topic_is_escaped_in_the_agents_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent = Agent(
        "amb-7", BrokerSettings(), TopicSpace(), outbox_path=tmp_path / "o.db", ecg=None, vitals=None, gps=None
    )
    try:
        message = aiomqtt.Message(f"ems/v1/dispatch/amb-7/{FORGED}", b"{}", qos=1, retain=False, mid=1, properties=None)
        with caplog.at_level(logging.WARNING):
            await agent._handle_incoming(message)
        assert sum(agent.rejected.values()) == 1
        assert caplog.records
        for line in raw_lines(caplog):
            assert "\x1b" not in line
            assert not line.startswith("INFO ambulance_agent forged")
    finally:
        agent.close()
