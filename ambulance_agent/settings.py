"""Settings of the in-vehicle agent (environment prefix ``EMS_AGENT_``), checked at start-up.

The broker comes from ``EMS_AGENT_BROKER_URL`` (``mqtt://host:1883``, ``mqtts://`` for TLS) or, when that is not set,
from the shared ``EMS_MQTT_*`` settings (:class:`broker_config.BrokerSettings`: TLS files, credentials).

Sources (at most one of each kind):

* ECG: ``EMS_AGENT_ECG_STREAM`` (a monitor's raw int16 waveform output: ``host:port``, a serial device or a FIFO;
  :mod:`ambulance_agent.sources.ecg_stream`) described by ``ECG_STREAM_FS_HZ`` and ``ECG_STREAM_GAIN`` (required),
  ``ECG_STREAM_LEADS`` (comma separated, default the 12 standard leads), ``ECG_STREAM_BASELINE``,
  ``ECG_STREAM_LEAD_OFF_CODE`` (default -32768, ``none``: not reported), ``ECG_STREAM_ADC_MIN``/``_ADC_MAX`` (the
  rails) and ``ECG_STREAM_BAUD``; or ``EMS_AGENT_ECG_WFDB_RECORD`` (a WFDB record replayed as the monitor's
  12-lead / rhythm output), with ``ECG_CHANNELS`` (comma separated lead names) and ``ECG_RESAMPLE_HZ``;
* vitals: ``EMS_AGENT_MLLP_PORT`` (HL7 v2 monitor over MLLP, PCD-01/PCD-04) or ``EMS_AGENT_VITALS_NUMERICS_RECORD``;
* GPS: ``EMS_AGENT_NMEA_TCP`` (``host:port``) or ``EMS_AGENT_NMEA_DEVICE`` (``/dev/ttyUSB0``, read as a stream).
* camera: ``EMS_AGENT_CAMERA`` (a file, an ``rtsp://``/``http://`` stream or ``/dev/videoN``) at ``VIDEO_FPS``.

Unsafe values are refused at start-up: an MLLP listener on a non-loopback address needs
``EMS_AGENT_MLLP_ALLOW_REMOTE=true`` (the in-vehicle LAN only, never a public interface); the crew screen is always
bound to 127.0.0.1.

Encryption at rest: the outbox is sealed with the unit's AES-256-GCM key (:mod:`ambulance_agent.crypto`), read from
``EMS_AGENT_UNIT_KEY_FILE`` (32 raw bytes or their base64, owner-only permissions: ``chmod 600``) or
``EMS_AGENT_UNIT_KEY`` (base64); retired keys still needed to open older rows (rotation) in
``EMS_AGENT_PREVIOUS_UNIT_KEY_FILES`` (comma separated).  Outside development (``EMS_SECURITY_MODE``, shared with the
other services) the agent refuses to start without a key; in development it generates one next to the outbox
(``unit.key``, mode 600) and warns.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ambulance_agent.crypto import CryptoError, UnitCipher, development_unit_key, load_unit_key
from ambulance_agent.outbox import DEFAULT_MAX_BYTES
from ambulance_agent.sources.ecg_stream import STANDARD_12_LEADS, parse_stream_target
from ambulance_agent.sources.nmea import parse_host_port
from broker_config import BrokerSettings, valid_id
from broker_config.identity import SecurityMode

logger = logging.getLogger(__name__)

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
    outbox_max_bytes: Annotated[int, Field(ge=1_048_576)] = DEFAULT_MAX_BYTES
    security_mode: SecurityMode = Field(
        SecurityMode.PRODUCTION, validation_alias=AliasChoices("security_mode", "EMS_SECURITY_MODE")
    )
    unit_key_file: Path | None = None
    """The unit's 256-bit outbox key (owner-only file); or ``unit_key``.  Never stored in the outbox."""
    unit_key: SecretStr | None = None
    """The unit's key as base64 (an environment secret); or ``unit_key_file``."""
    previous_unit_key_files: Annotated[tuple[Path, ...], NoDecode] = ()
    """Retired keys, still accepted to open (and re-seal) older outbox rows."""

    ecg_wfdb_record: Path | None = None
    ecg_channels: Annotated[tuple[str, ...], NoDecode] = ()
    ecg_resample_hz: Annotated[float, Field(gt=0, le=2000)] | None = None
    ecg_chunk_s: Annotated[float, Field(gt=0, le=10)] = 1.0
    ecg_stream: str | None = None
    """``EMS_AGENT_ECG_STREAM``: the monitor's raw waveform output, ``host:port`` / ``tcp://host:port`` or a path."""
    ecg_stream_fs_hz: Annotated[float, Field(gt=0, le=20_000)] | None = None
    ecg_stream_leads: Annotated[tuple[str, ...], NoDecode] = STANDARD_12_LEADS
    ecg_stream_gain: Annotated[float, Field(gt=0)] | None = None
    """ADC units per mV."""
    ecg_stream_baseline: int = 0
    ecg_stream_lead_off_code: Annotated[int, Field(ge=-32768, le=32767)] | None = -32768
    ecg_stream_adc_min: Annotated[int, Field(ge=-32768, le=32767)] = -32767
    ecg_stream_adc_max: Annotated[int, Field(ge=-32768, le=32767)] = 32767
    ecg_stream_baud: Annotated[int, Field(gt=0)] = 921_600
    vitals_numerics_record: Path | None = None
    mllp_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    mllp_host: str = "127.0.0.1"
    mllp_allow_remote: bool = False
    nmea_tcp: str | None = None
    nmea_gpsd: str | None = None
    """A gpsd daemon's ``host:port`` (usually 127.0.0.1:2947): its receivers' NMEA, checked as from a serial port."""
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
    """Camera frames per second at most (0 = no video; 2 when ``camera`` is set); frames are sent only with spare
    bandwidth.  Without ``camera``, a value > 0 sends a test pattern (ambulance_agent.video.SyntheticCamera)."""
    camera: str | None = None
    """``EMS_AGENT_CAMERA``: what FFmpeg opens (ambulance_agent.sources.camera): a file, ``rtsp://``/``http://``
    stream or V4L2 device ``/dev/videoN``.  Unset: no camera (FFmpeg is then never loaded)."""

    crew_screen_port: Annotated[int, Field(ge=0, le=65535)] | None = 8080
    """The crew screen on http://127.0.0.1:{port}/ (None = no screen)."""
    stale_after_s: Annotated[float, Field(gt=0)] = 30.0
    log_level: str = "INFO"

    @field_validator("unit_id")
    @classmethod
    def _unit(cls, value: str) -> str:
        return valid_id(value)

    @field_validator(
        "crew_screen_port", "mllp_port", "bandwidth_bps", "ecg_resample_hz", "ecg_stream_lead_off_code", mode="before"
    )
    @classmethod
    def _off(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in {"", "none", "off"}:
            return None
        return value

    @field_validator("previous_unit_key_files", mode="before")
    @classmethod
    def _key_files(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(Path(p.strip()) for p in value.split(",") if p.strip())
        return value

    @field_validator("ecg_channels", "ecg_stream_leads", mode="before")
    @classmethod
    def _channels(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(c.strip() for c in value.split(",") if c.strip())
        return value

    @field_validator("nmea_tcp", "nmea_gpsd")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value

    @field_validator("ecg_stream")
    @classmethod
    def _stream_target(cls, value: str | None) -> str | None:
        if value is not None:
            parse_stream_target(value)
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
        if sum(x is not None for x in (self.nmea_tcp, self.nmea_gpsd, self.nmea_device)) > 1:
            raise ValueError("choose one GPS source: nmea_tcp, nmea_gpsd or nmea_device")
        if self.mllp_port is not None and not self.mllp_allow_remote:
            try:
                loopback = ipaddress.ip_address(self.mllp_host).is_loopback
            except ValueError:
                loopback = self.mllp_host == "localhost"
            if not loopback:
                raise ValueError("the MLLP listener must be on loopback unless mllp_allow_remote=true")
        if self.ecg_channels and self.ecg_wfdb_record is None:
            raise ValueError("ecg_channels needs ecg_wfdb_record")
        if self.ecg_stream is not None:
            if self.ecg_wfdb_record is not None:
                raise ValueError("choose one ECG source: ecg_stream or ecg_wfdb_record")
            if self.ecg_stream_fs_hz is None or self.ecg_stream_gain is None:
                raise ValueError("ecg_stream needs ecg_stream_fs_hz and ecg_stream_gain (from the monitor's settings)")
            if not 1 <= len(self.ecg_stream_leads) <= 16:
                raise ValueError("ecg_stream_leads must name 1 to 16 leads")
            if self.ecg_stream_adc_min >= self.ecg_stream_adc_max:
                raise ValueError("ecg_stream_adc_min must be below ecg_stream_adc_max")
        if self.bandwidth_bps is not None and self.bandwidth_bps > self.bandwidth_max_bps:
            raise ValueError("bandwidth_bps exceeds bandwidth_max_bps")
        if self.unit_key_file is not None and self.unit_key is not None:
            raise ValueError("choose one unit key: unit_key_file or unit_key")
        if self.security_mode is SecurityMode.PRODUCTION and self.unit_key_file is None and self.unit_key is None:
            raise ValueError("a unit key is required outside development (EMS_AGENT_UNIT_KEY_FILE or _UNIT_KEY)")
        self._keys()  # unreadable, too open or malformed keys fail the start, not the first write
        return self

    def _keys(self) -> tuple[bytes | None, tuple[bytes, ...]]:
        def from_file(path: Path) -> bytes:
            try:
                return load_unit_key(path)
            except CryptoError as exc:
                raise ValueError(f"unit key file {path.name}: {exc.reason}") from None
            except OSError as exc:
                raise ValueError(f"unit key file {path.name} cannot be read ({type(exc).__name__})") from None

        current: bytes | None = None
        if self.unit_key_file is not None:
            current = from_file(self.unit_key_file)
        elif self.unit_key is not None:
            text = self.unit_key.get_secret_value().strip()
            try:
                current = base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4))
            except (ValueError, binascii.Error):
                raise ValueError("unit_key must be base64 of 32 bytes") from None
            if len(current) != 32:
                raise ValueError("unit_key must be base64 of 32 bytes")
        return current, tuple(from_file(p) for p in self.previous_unit_key_files)

    def cipher(self) -> UnitCipher:
        """The unit's outbox cipher.  Development without a key: ``unit.key`` beside the outbox, created (mode 600)
        if missing, with a warning.  Raises ValueError for an unusable key (see the module docstring)."""
        current, previous = self._keys()
        if current is None:
            if self.security_mode is not SecurityMode.DEVELOPMENT:
                raise ValueError("a unit key is required outside development")
            path = self.outbox_path.parent / "unit.key"
            if not path.exists():
                logger.warning("development mode: generating a unit key beside the outbox (%s)", path.name)
            try:
                current = development_unit_key(path)
            except CryptoError as exc:
                raise ValueError(f"unit key file {path.name}: {exc.reason}") from None
        return UnitCipher(self.unit_id, current, previous)

    def broker(self) -> BrokerSettings:
        """The broker settings: from ``broker_url`` or the ``EMS_MQTT_*`` environment."""
        if self.broker_url is not None:
            return BrokerSettings.from_url(self.broker_url)
        return BrokerSettings()
