"""Settings of the ED board service (environment prefix ``EMS_BOARD_``; the broker itself under ``EMS_MQTT_``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Self

from pydantic import AliasChoices, AnyHttpUrl, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker_config import BrokerSettings
from broker_config.identity import SUBJECT_PATTERN, SecurityMode, load_verify_key
from broker_config.topics import ID_PATTERN

__all__ = ["DEFAULT_MAP_PBF", "BoardSettings"]

DEFAULT_MAP_PBF = Path(__file__).resolve().parent.parent / "dispatch" / "data" / "monaco.osm.pbf"
"""The OSM extract shipped with the project (read as a data file; the board never imports dispatch)."""


class BoardSettings(BaseSettings):
    """How the board connects, which hospital it shows by default, and its feed limits.

    Every limit is bounded so that a bad value refuses to start rather than producing an unbounded queue.
    Security: outside development mode the board refuses to start without dispatch's verification key(s), without
    dispatch's URL (sign-in and the audit trail live there) and without its own service credentials; development
    mode refuses a non-loopback bind address.
    ``stale_after_s``: a vital sign older than this is shown greyed with its age, never as current (the
    monitors in the ambulance report every 1-5 s, so 10 s means at least two reports were missed).
    """

    model_config = SettingsConfigDict(env_prefix="EMS_BOARD_", env_nested_delimiter="__", extra="ignore")

    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    topic_prefix: str = ""
    """Empty in production; tests use a unique prefix each (see :class:`broker_config.TopicSpace`)."""
    default_hospital_id: Annotated[str, Field(pattern=ID_PATTERN.pattern)] = "H1"
    stale_after_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    nibp_stale_after_s: Annotated[float, Field(gt=0, le=3_600)] = 300.0
    """A cuff blood pressure is cycled every few minutes, not streamed, so it has its own staleness limit."""
    gps_stale_after_s: Annotated[float, Field(gt=0, le=3_600)] = 30.0
    """A position older than this is shown greyed with its age (GPS reports every 1-5 s)."""
    ecg_window_s: Annotated[float, Field(gt=0, le=30)] = 10.0
    """How much ECG (every lead) each unit keeps for the strips (and a new board's snapshot)."""
    ecg_lost_after_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    """No new ECG sample for this long: the strip says SIGNAL LOST."""
    trend_step_s: Annotated[float, Field(ge=0.5, le=60)] = 2.0
    """Vitals trend resolution: at most one trend point per unit per step."""
    trend_max_points: Annotated[int, Field(ge=60, le=100_000)] = 7_200
    """Trend points kept per unit (7,200 at 2 s = 4 h since first contact)."""
    sweep_s: Annotated[float, Field(gt=0, le=10)] = 1.0
    """How often the server re-checks ages, so a value turns stale on every board within this of its limit."""
    dispatch_url: AnyHttpUrl | None = None
    """Dispatch's HTTP API: hospital names and positions (``GET /api/hospitals``), the open alerts to resync
    after a restart or reconnect (``GET /api/alerts``, ``GET /api/alerts/{id}``), road routes (``GET /api/route``)."""
    dispatch_timeout_s: Annotated[float, Field(gt=0, le=30)] = 2.0
    resync_retry_min_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    resync_retry_max_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    """A failed resync from dispatch is retried with capped, jittered back-off between these bounds."""
    resync_max_age_s: Annotated[float, Field(gt=0)] = 6 * 3_600.0
    """Alerts older than this are not resynced (a unit carries one patient; older alerts are history)."""
    telemetry_database_url: str | None = None
    """The telemetry store (the ingest's database: ``postgresql://...`` or ``sqlite:///path``), read only: a patient's
    detail view gets the vitals trend since first contact from it (per-minute means), so that trends survive a board
    restart.  None: the board's in-memory trend only."""
    history_timeout_s: Annotated[float, Field(gt=0, le=30)] = 3.0
    """Deadline of one trend read from the telemetry store; a slower store costs the older trend, not the view."""
    map_pbf: Path | None = DEFAULT_MAP_PBF
    """OSM extract for the route map (``GET /api/map/roads``); None or a missing file disables the map."""
    heartbeat_s: Annotated[float, Field(gt=0, le=30)] = 2.0
    """Idle feed interval: a ``tick`` event carrying server time (keeps proxies open, lets a send to a dead client
    fail (FF-13), and lets the page notice a silent link)."""
    client_queue_items: Annotated[int, Field(ge=16, le=100_000)] = 2_000
    """Per-board outbound bound; beyond it the board is disconnected and resyncs (FF-14)."""
    client_max_lag_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    """A board whose oldest undelivered event is older than this is disconnected (FF-14)."""
    send_timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    """Deadline of one write to a board's socket; a write that cannot complete disconnects that board."""
    ingest_queue_items: Annotated[int, Field(ge=16, le=1_000_000)] = 20_000
    """Bound of the MQTT -> state queue (callbacks only enqueue, FF-01)."""
    publish_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    alert_retention_s: Annotated[float, Field(gt=0)] = 3_600.0
    """How long a closed (cancelled / handed-over) alert is kept, so a late acknowledgement gets 409, not 404."""
    unit_retention_s: Annotated[float, Field(gt=0)] = 6 * 3_600.0
    """A unit heard from by nobody for this long and not inbound anywhere is forgotten."""

    http_host: str = "127.0.0.1"
    """``EMS_BOARD_HTTP_HOST``: the address ``python -m hospital_board`` binds."""
    http_port: Annotated[int, Field(ge=1, le=65535)] = 8090
    security_mode: SecurityMode = Field(
        SecurityMode.PRODUCTION, validation_alias=AliasChoices("security_mode", "EMS_SECURITY_MODE")
    )
    """``EMS_SECURITY_MODE`` (shared with dispatch): ``production`` unless ``development`` is asked for."""
    verify_keys: tuple[str, ...] = ()
    """``EMS_BOARD_VERIFY_KEYS`` (JSON list): dispatch's Ed25519 public key(s), base64url of 32 bytes or PEM; the
    current one and any retired ones still accepted.  Public keys, not secrets."""
    dispatch_client_id: Annotated[str, Field(pattern=SUBJECT_PATTERN.pattern)] | None = None
    """The board's service account at dispatch (role ``service``): fetches alerts and routes, reports audit events."""
    dispatch_client_secret: SecretStr | None = None
    """``EMS_BOARD_DISPATCH_CLIENT_SECRET``: that account's secret (at least 32 characters)."""
    cookie_secure: bool | None = None
    """Mark session cookies ``Secure`` (HTTPS only); default True outside development."""
    audit_queue_items: Annotated[int, Field(ge=100, le=1_000_000)] = 20_000
    """Audit events waiting for dispatch; beyond this they are dropped and counted (never blocking a display)."""

    @field_validator("verify_keys")
    @classmethod
    def _keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for text in value:
            load_verify_key(text)
        return value

    @model_validator(mode="after")
    def _security(self) -> Self:
        secret = self.dispatch_client_secret.get_secret_value() if self.dispatch_client_secret else None
        if secret is not None and len(secret) < 32:
            raise ValueError("dispatch_client_secret must be at least 32 characters")
        if (self.dispatch_client_id is None) != (secret is None):
            raise ValueError("give both dispatch_client_id and dispatch_client_secret, or neither")
        if self.security_mode is SecurityMode.PRODUCTION:
            if not self.verify_keys:
                raise ValueError("EMS_BOARD_VERIFY_KEYS is required outside development mode")
            if self.dispatch_url is None or secret is None:
                raise ValueError("dispatch_url and the board's dispatch client credentials are required in production")
        elif not _loopback(self.http_host):
            raise ValueError("development mode serves on a loopback address only (http_host)")
        return self

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value and (not value.endswith("/") or any(c in value for c in "+#")):
            raise ValueError("topic_prefix must end with '/' and contain no wildcard")
        return value


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
