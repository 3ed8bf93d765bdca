"""Broker connection settings shared by every service (environment prefix ``EMS_MQTT_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["BrokerSettings"]


class BrokerSettings(BaseSettings):
    """Where the MQTT broker is and how to authenticate.

    ``EMS_MQTT_URL`` takes ``mqtt://user:password@host:1883`` or ``mqtts://host:8883`` (TLS).
    """

    model_config = SettingsConfigDict(env_prefix="EMS_MQTT_", extra="ignore")

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=600)] = 20
    topic_prefix: str = ""
    """Empty in production; tests use a unique prefix each."""
    reconnect_min_s: Annotated[float, Field(gt=0)] = 0.5
    reconnect_max_s: Annotated[float, Field(gt=0)] = 30.0

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> BrokerSettings:
        """Build settings from ``mqtt://[user[:password]@]host[:port]`` (``mqtts://`` for TLS).

        Raises:
            ValueError: another scheme, or no host.
        """
        parts = urlsplit(url)
        if parts.scheme not in {"mqtt", "mqtts", "tcp"} or not parts.hostname:
            raise ValueError("MQTT URL must look like mqtt://host:1883 or mqtts://host:8883")
        tls = parts.scheme == "mqtts"
        values: dict[str, object] = {
            "host": parts.hostname,
            "port": parts.port or (8883 if tls else 1883),
            "tls": tls,
        }
        if parts.username:
            values["username"] = unquote(parts.username)
        if parts.password:
            values["password"] = SecretStr(unquote(parts.password))
        values.update(overrides)
        return cls.model_validate(values)

    @property
    def url(self) -> str:
        """The broker address without credentials, safe to log."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"
