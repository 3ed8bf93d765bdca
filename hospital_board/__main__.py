"""Run the board: ``python -m hospital_board`` (settings from ``EMS_BOARD_*``, bind ``EMS_BOARD_HTTP_HOST/PORT``)."""

from __future__ import annotations

import logging

import uvicorn

from broker_config.web import server_config
from hospital_board.main import create_app
from hospital_board.settings import BoardSettings


def main() -> None:
    """Configure logging once, build the app from the environment and serve it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = BoardSettings()
    config = server_config(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        timeout_graceful_shutdown=3,
        log_config=None,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
