"""Settings of the in-vehicle agent (environment prefix ``EMS_AGENT_``), checked at start-up.

The broker comes from ``EMS_AGENT_BROKER_URL`` (``mqtt://host:1883``, ``mqtts://`` for TLS) or, when that is not set,
from the shared ``EMS_MQTT_*`` settings (:class:`broker_config.BrokerSettings`: TLS files, credentials).

Sources (at most one of each kind):

* ECG: ``EMS_AGENT_ECG_WFDB_RECORD`` (a WFDB record replayed as the monitor's 12-lead / rhythm output), with
  ``ECG_CHANNELS`` (comma separated lead names) and ``ECG_RESAMPLE_HZ``;
* vitals: ``EMS_AGENT_MLLP_PORT`` (HL7 v2 monitor over MLLP, PCD-01/PCD-04) or ``EMS_AGENT_VITALS_NUMERICS_RECORD``;
* GPS: ``EMS_AGENT_NMEA_TCP`` (``host:port``) or ``EMS_AGENT_NMEA_DEVICE`` (``/dev/ttyUSB0``, read as a stream).

Unsafe values are refused at start-up: an MLLP listener on a non-loopback address needs
``EMS_AGENT_MLLP_ALLOW_REMOTE=true`` (the in-vehicle LAN only, never a public interface); the crew screen is always
bound to 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ambulance_agent.sources.nmea import parse_host_port
from broker_config import BrokerSettings, valid_id

__all__ = ["AgentSettings"]


class AgentSettings(BaseSettings):
    """Everything ``python -m ambulance_agent`` needs (see the module docstring)."""

    model_config = SettingsConfigDict(env_prefix="EMS_AGENT_", extra="ignore")

    unit_id: str
    client_id: str | None = None
    """MQTT client id (default ``agent-{unit_id}``); fixed, because the session is persistent."""
    broker_url: str | None = None
    topic_prefix: str = ""

    outbox_path: Path = Path("goldenhour-agent") / "outbox.sqlite3"
    outbox_max_bytes: Annotated[int, Field(ge=1_048_576)] = 64 * 1024 * 1024

    ecg_wfdb_record: Path | None = None
    ecg_channels: Annotated[tuple[str, ...], NoDecode] = ()
    ecg_resample_hz: Annotated[float, Field(gt=0, le=2000)] | None = None
    ecg_chunk_s: Annotated[float, Field(gt=0, le=10)] = 1.0
    vitals_numerics_record: Path | None = None
    mllp_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    mllp_host: str = "127.0.0.1"
    mllp_allow_remote: bool = False
    nmea_tcp: str | None = None
    nmea_device: Path | None = None
    nmea_baud: int = 4800
    pace: Annotated[float, Field(ge=0, le=1000)] = 1.0
    """Replay speed of file sources (1 = real time); device sources are always real time."""
    replay_loop: bool = True
    replay_stop_s: Annotated[float, Field(gt=0)] | None = None
    """File sources end after this many seconds of data (tests and benchmarks)."""

    bandwidth_bps: Annotated[int, Field(ge=8_000)] | None = None
    """Uplink budget in bit/s.  Unset: measured (adapts to the queueing delay of PUBACKs)."""
    bandwidth_max_bps: Annotated[int, Field(ge=8_000)] = 10_000_000
    video_fps: Annotated[float, Field(ge=0, le=30)] = 0.0
    """Camera frames per second at most (0 = no video); frames are sent only with spare bandwidth.  Only a test-pattern
    camera exists so far (ambulance_agent.video.SyntheticCamera): a V4L2/OpenCV capture source is still to write."""

    crew_screen_port: Annotated[int, Field(ge=0, le=65535)] | None = 8080
    """The crew screen on http://127.0.0.1:{port}/ (None = no screen)."""
    stale_after_s: Annotated[float, Field(gt=0)] = 30.0
    log_level: str = "INFO"

    @field_validator("unit_id")
    @classmethod
    def _unit(cls, value: str) -> str:
        return valid_id(value)

    @field_validator("crew_screen_port", "mllp_port", "bandwidth_bps", "ecg_resample_hz", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in {"", "none", "off"}:
            return None
        return value

    @field_validator("ecg_channels", mode="before")
    @classmethod
    def _channels(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(c.strip() for c in value.split(",") if c.strip())
        return value

    @field_validator("nmea_tcp")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("log_level must be DEBUG, INFO, WARNING or ERROR")
        return level

    @model_validator(mode="after")
    def _consistent(self) -> AgentSettings:
        if self.mllp_port is not None and self.vitals_numerics_record is not None:
            raise ValueError("choose one vitals source: mllp_port or vitals_numerics_record")
        if self.nmea_tcp is not None and self.nmea_device is not None:
            raise ValueError("choose one GPS source: nmea_tcp or nmea_device")
        if self.mllp_port is not None and not self.mllp_allow_remote:
            try:
                loopback = ipaddress.ip_address(self.mllp_host).is_loopback
            except ValueError:
                loopback = self.mllp_host == "localhost"
            if not loopback:
                raise ValueError("the MLLP listener must be on loopback unless mllp_allow_remote=true")
        if self.ecg_channels and self.ecg_wfdb_record is None:
            raise ValueError("ecg_channels needs ecg_wfdb_record")
        if self.bandwidth_bps is not None and self.bandwidth_bps > self.bandwidth_max_bps:
            raise ValueError("bandwidth_bps exceeds bandwidth_max_bps")
        return self

    def broker(self) -> BrokerSettings:
        """The broker settings: from ``broker_url`` or the ``EMS_MQTT_*`` environment."""
        if self.broker_url is not None:
            return BrokerSettings.from_url(self.broker_url)
        return BrokerSettings()
