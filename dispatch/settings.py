"""Settings of the dispatch service (environment prefix ``EMS_DISPATCH_``; the broker uses ``EMS_MQTT_``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Self

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker_config import BrokerSettings
from broker_config.identity import SecurityMode, load_signing_key, load_verify_key
from dispatch.hospitals import DATA_DIR

__all__ = ["DispatchSettings"]


class DispatchSettings(BaseSettings):
    """Where the data files are, how the service talks MQTT, how the HTTP API listens.

    Refuses unsafe values at start-up (missing files, non-positive limits) and, for security: outside development
    mode a missing, short or malformed signing key; development mode on a non-loopback address; token lifetimes
    beyond an hour (access) or a week (refresh).
    """

    model_config = SettingsConfigDict(env_prefix="EMS_DISPATCH_", extra="ignore")

    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    """Broker address and topic prefix (read from ``EMS_MQTT_*``)."""
    client_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "goldenhour-dispatch"
    hospital_csvs: tuple[Path, ...] = (DATA_DIR / "monaco_hospitals.csv",)
    capabilities_path: Path = DATA_DIR / "hospital_capabilities.json"
    road_pbf: Path = DATA_DIR / "monaco.osm.pbf"
    routing_url: str | None = None
    """An OSRM server (``http://host:5000``) to route with instead of the embedded OSM graph (large regions)."""
    emergency_speed_factor: Annotated[float, Field(ge=1.0, le=2.0)] = 1.2
    max_snap_m: Annotated[float, Field(gt=0, le=10_000)] = 1_000.0
    queue_size: Annotated[int, Field(ge=1, le=1_000_000)] = 1_000
    publish_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    enqueue_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    max_alerts: Annotated[int, Field(ge=1)] = 10_000
    database_url: str | None = None
    """``sqlite:///path`` or ``postgresql://...`` (the telemetry store's convention); None keeps state in memory."""
    ack_timeout_high_s: Annotated[float, Field(gt=0, le=3_600)] = 120.0
    """Seconds a high-priority team page waits for its acknowledgement before escalating (dispatch.activation)."""
    ack_timeout_medium_s: Annotated[float, Field(gt=0, le=3_600)] = 300.0
    ack_timeout_low_s: Annotated[float, Field(gt=0, le=3_600)] = 600.0
    escalation_tick_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    """How often escalation deadlines are checked, seconds."""
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, Field(ge=1, le=65535)] = 8081
    security_mode: SecurityMode = Field(
        SecurityMode.PRODUCTION, validation_alias=AliasChoices("security_mode", "EMS_SECURITY_MODE")
    )
    """``EMS_SECURITY_MODE`` (shared with the board): ``production`` unless ``development`` is asked for explicitly."""
    signing_key: SecretStr | None = None
    """``EMS_DISPATCH_SIGNING_KEY``: Ed25519 seed (base64url, 32 bytes) or PKCS#8 PEM.  Required outside development
    (development without one uses a fresh key per start, so tokens die with the process)."""
    previous_verify_keys: tuple[str, ...] = ()
    """Public keys of retired signing keys still accepted (key rotation), base64url or PEM."""
    access_token_ttl_s: Annotated[float, Field(ge=60, le=3_600)] = 900.0
    refresh_token_ttl_s: Annotated[float, Field(ge=600, le=7 * 24 * 3_600)] = 12 * 3_600.0
    cookie_secure: bool | None = None
    """Mark session cookies ``Secure`` (HTTPS only); default True outside development."""

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("database_url must be sqlite:///path or postgresql://...")
        return value

    @field_validator("previous_verify_keys")
    @classmethod
    def _verify_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for text in value:
            load_verify_key(text)
        return value

    @model_validator(mode="after")
    def _security(self) -> Self:
        if self.signing_key is not None:
            load_signing_key(self.signing_key.get_secret_value())  # raises ValueError without echoing the key
        if self.security_mode is SecurityMode.PRODUCTION and self.signing_key is None:
            raise ValueError("EMS_DISPATCH_SIGNING_KEY is required outside development mode")
        if self.security_mode is SecurityMode.DEVELOPMENT and not _loopback(self.http_host):
            raise ValueError("development mode serves on a loopback address only (http_host)")
        if self.access_token_ttl_s >= self.refresh_token_ttl_s:
            raise ValueError("access tokens must be shorter-lived than refresh tokens")
        return self

    @field_validator("hospital_csvs", "capabilities_path", "road_pbf")
    @classmethod
    def _exists(cls, value: Path | tuple[Path, ...]) -> Path | tuple[Path, ...]:
        for path in value if isinstance(value, tuple) else (value,):
            if not path.is_file():
                raise ValueError(f"file not found: {path.name}")
        return value


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
