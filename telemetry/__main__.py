"""``python -m telemetry``: run the ingest with settings from the environment (EMS_MQTT_*, EMS_TELEMETRY_*)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from broker_config import BrokerSettings, TopicSpace
from telemetry.service import run_ingest
from telemetry.settings import TelemetrySettings


def main() -> None:
    """Configure logging once, load settings, run until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    broker = BrokerSettings()
    settings = TelemetrySettings()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_ingest(settings.database_url, broker, TopicSpace(broker.topic_prefix), settings=settings))


if __name__ == "__main__":
    main()
