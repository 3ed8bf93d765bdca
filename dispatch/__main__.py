"""``python -m dispatch``: serve the dispatch service and its HTTP API.

Settings come from ``EMS_DISPATCH_*`` (dispatch) and ``EMS_MQTT_*`` (broker, including the topic prefix).
"""

from __future__ import annotations

import logging

import uvicorn

from broker_config.web import server_config
from dispatch.api import create_app
from dispatch.settings import DispatchSettings


def main() -> None:
    """Configure logging once, build the app from the environment and serve it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = DispatchSettings()
    config = server_config(create_app(settings), host=settings.http_host, port=settings.http_port, log_level="info")
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
