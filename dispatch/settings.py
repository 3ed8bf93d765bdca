"""Settings of the dispatch service (environment prefix ``EMS_DISPATCH_``; the broker uses ``EMS_MQTT_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker_config import BrokerSettings
from dispatch.hospitals import DATA_DIR

__all__ = ["DispatchSettings"]


class DispatchSettings(BaseSettings):
    """Where the data files are, how the service talks MQTT, how the HTTP API listens.

    Refuses unsafe values at start-up (missing files, non-positive limits).
    """

    model_config = SettingsConfigDict(env_prefix="EMS_DISPATCH_", extra="ignore")

    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    """Broker address and topic prefix (read from ``EMS_MQTT_*``)."""
    client_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "goldenhour-dispatch"
    hospital_csvs: tuple[Path, ...] = (DATA_DIR / "monaco_hospitals.csv",)
    capabilities_path: Path = DATA_DIR / "hospital_capabilities.json"
    road_pbf: Path = DATA_DIR / "monaco.osm.pbf"
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

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("database_url must be sqlite:///path or postgresql://...")
        return value

    @field_validator("hospital_csvs", "capabilities_path", "road_pbf")
    @classmethod
    def _exists(cls, value: Path | tuple[Path, ...]) -> Path | tuple[Path, ...]:
        for path in value if isinstance(value, tuple) else (value,):
            if not path.is_file():
                raise ValueError(f"file not found: {path.name}")
        return value
