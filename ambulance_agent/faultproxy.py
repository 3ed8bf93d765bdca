"""A fault-injecting TCP relay for tests and benchmarks: throttle, delay, cut and reset a link on loopback.

Between the agent and its broker, it plays the cellular link::

    agent --TCP--> FaultProxy(127.0.0.1:port) --TCP--> broker

* ``up_bps`` / ``down_bps``: each direction is serialised at that many bit/s (the relay reads at most one small
  segment, then holds the direction for ``len * 8 / bps`` seconds).  Bytes the relay has not read yet wait in the
  kernel's socket buffers, like in a modem's: a sender that writes faster than the link builds a queue in front of it.
* ``delay_s``: one-way latency added to every segment, per direction, order kept.
* :meth:`cut`: the radio goes dead: relayed bytes are dropped, nothing is closed (a tunnel; the client notices
  only by its keep-alive); new connections are accepted and left hanging.  :meth:`restore` ends the cut and resets
  the connections that lived through it (their byte streams lost data and cannot be resumed).
* :meth:`reset`: every relayed connection is aborted with an RST both ways (the broker fires the will).
* :meth:`refuse`: new connections are refused until :meth:`restore`.

Loopback only: the relay listens on 127.0.0.1 and connects to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

__all__ = ["FaultProxy", "LinkCounters"]

_LOOPBACK = "127.0.0.1"
_SEGMENT_BYTES = 1_400
_QUEUE_SEGMENTS = 4_096


@dataclass(slots=True)
class LinkCounters:
    """Bytes relayed (and dropped during cuts) per direction."""

    up_bytes: int = 0
    down_bytes: int = 0
    dropped_bytes: int = 0
    connections: int = 0
    resets: int = 0
    segments_up: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=_QUEUE_SEGMENTS))
    """(monotonic time, bytes) of the last segments relayed upstream (bounded), for throughput checks."""


class _Connection:
    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.writers: list[asyncio.StreamWriter] = [client]
        self.tasks: list[asyncio.Task[None]] = []
        self.cut = False

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """The relay (see the module docstring).

    Args:
        target_port: the broker's port on 127.0.0.1.
        up_bps, down_bps: link rates (None = unlimited).
        delay_s: one-way latency per direction.
        port: listening port (0 = a free one; read :attr:`port` after :meth:`start`).
    """

    def __init__(
        self,
        target_port: int,
        *,
        up_bps: float | None = None,
        down_bps: float | None = None,
        delay_s: float = 0.0,
        port: int = 0,
    ) -> None:
        self.target_port = target_port
        self.up_bps = up_bps
        self.down_bps = down_bps
        self.delay_s = delay_s
        self._port = port
        self.counters = LinkCounters()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._cut = False
        self._refuse = False

    @property
    def port(self) -> int:
        """The listening port."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        """Listen on 127.0.0.1."""
        self._server = await asyncio.start_server(self._accept, _LOOPBACK, self._port)
        self._port = self.port

    async def stop(self) -> None:
        """Stop listening and abort every connection."""
        if self._server is not None:
            self._server.close()
        self.reset()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- faults --------------------------------------------------------------------------------------------------

    def set_rate(self, up_bps: float | None, down_bps: float | None = None) -> None:
        """Change the link rates (None = unlimited); applies to the next segment."""
        self.up_bps = up_bps
        self.down_bps = down_bps

    def cut(self) -> None:
        """The link goes silent: bytes are dropped, connections stay open, new ones hang."""
        self._cut = True
        for conn in self._connections:
            conn.cut = True

    def refuse(self) -> None:
        """New connections are refused (nothing listens) until :meth:`restore`."""
        self._refuse = True

    def restore(self) -> None:
        """End a cut or refusal; connections that lived through a cut are reset."""
        self._cut = False
        self._refuse = False
        for conn in [c for c in self._connections if c.cut]:
            self._drop(conn)

    def reset(self) -> None:
        """Abort every relayed connection (RST both ways)."""
        for conn in list(self._connections):
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        self.counters.resets += 1
        conn.abort()
        self._connections.discard(conn)

    # --- relay ---------------------------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refuse:
            writer.transport.abort()
            return
        conn = _Connection(self, writer)
        conn.cut = self._cut
        self._connections.add(conn)
        self.counters.connections += 1
        if conn.cut:
            return  # hangs: accepted, never answered (the reader is simply not read)
        try:
            up_reader, up_writer = await asyncio.open_connection(_LOOPBACK, self.target_port)
        except OSError:
            self._drop(conn)
            return
        conn.writers.append(up_writer)
        conn.tasks = [
            asyncio.create_task(self._pipe(conn, reader, up_writer, upstream=True)),
            asyncio.create_task(self._pipe(conn, up_reader, writer, upstream=False)),
        ]

    async def _pipe(
        self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUE_SEGMENTS)
        sender = asyncio.create_task(self._deliver(queue, writer))
        try:
            while True:
                bps = self.up_bps if upstream else self.down_bps
                data = await reader.read(_SEGMENT_BYTES if bps else 65_536)
                if not data:
                    break
                if bps:
                    await asyncio.sleep(len(data) * 8 / bps)  # serialisation on the link
                if conn.cut:
                    self.counters.dropped_bytes += len(data)
                    continue
                if upstream:
                    self.counters.up_bytes += len(data)
                    self.counters.segments_up.append((time.monotonic(), len(data)))
                else:
                    self.counters.down_bytes += len(data)
                await queue.put((time.monotonic() + self.delay_s, data))
            await queue.put(None)
            await sender
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
            writer.transport.abort()
            self._connections.discard(conn)

    @staticmethod
    async def _deliver(queue: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter) -> None:
        while (item := await queue.get()) is not None:
            due, data = item
            wait_s = due - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()
