"""Run the board: ``python -m hospital_board`` (settings from ``EMS_BOARD_*``; host/port from ``EMS_BOARD_HTTP_*``)."""

from __future__ import annotations

import logging
import os

import uvicorn

from hospital_board.main import create_app
from hospital_board.settings import BoardSettings


def main() -> None:
    """Configure logging once, build the app from the environment and serve it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = BoardSettings()
    host = os.environ.get("EMS_BOARD_HTTP_HOST", "127.0.0.1")
    port = int(os.environ.get("EMS_BOARD_HTTP_PORT", "8090"))
    uvicorn.run(create_app(settings), host=host, port=port, timeout_graceful_shutdown=3, log_config=None)


if __name__ == "__main__":
    main()
