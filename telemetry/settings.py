"""Settings of the telemetry ingest service (environment prefix ``EMS_TELEMETRY_``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["TelemetrySettings"]


class TelemetrySettings(BaseSettings):
    """Where the store is and how the ingest batches.

    ``EMS_TELEMETRY_DATABASE_URL``: ``sqlite:///goldenhour-telemetry.sqlite3`` (embedded default, relative path) or
    ``postgresql://user@host:5432/db``.
    """

    model_config = SettingsConfigDict(env_prefix="EMS_TELEMETRY_", extra="ignore")

    database_url: str = "sqlite:///goldenhour-telemetry.sqlite3"
    client_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "goldenhour-ingest"
    batch_max: Annotated[int, Field(ge=1, le=100_000)] = 1000
    batch_age_s: Annotated[float, Field(gt=0, le=10)] = 0.25
    queue_max: Annotated[int, Field(ge=100, le=10_000_000)] = 100_000
    write_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    share_group: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")] | None = None
    """Run as one of several workers on the MQTT shared subscription ``$share/{group}/`` (each worker needs its own
    ``client_id``); gaps are then found by a store-side scan (PostgreSQL)."""
    publish_receipts: bool = True
    """Publish each unit's retained delivery receipt (StoreReceipt) after its data is committed (the crew screen's
    "stored"); always off with ``share_group``."""
    receipt_interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    """At most one receipt per unit per this many seconds."""

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("database_url must be sqlite:///path or postgresql://...")
        return value
