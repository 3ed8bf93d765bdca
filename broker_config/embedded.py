"""An in-process MQTT broker (amqtt) for the embedded default: the demo and tests need no server installed.

It is a development broker: loopback only, anonymous, sessions in memory.  Production runs Mosquitto with
the configuration in ``broker_config/mosquitto/``.
"""

from __future__ import annotations

import logging
import socket
from types import TracebackType

from amqtt.broker import Broker

__all__ = ["EmbeddedBroker", "free_port"]

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """``async with EmbeddedBroker(port) as broker:`` serves MQTT 3.1.1 on 127.0.0.1:port."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._broker: Broker | None = None

    async def start(self) -> None:
        """Start listening.  Raises OSError if the port is taken."""
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            }
        )
        await self._broker.start()
        logger.info("embedded MQTT broker on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop the broker (idempotent)."""
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
