"""The board's live transport: server-sent events, one bounded queue and one sender per connected board.

Why this shape (field failures FF-13 and FF-14):

* Fan-out never awaits a client.  :meth:`FeedHub.publish` only appends to each board's own bounded queue, so a
  board that stopped reading (a tablet on bad Wi-Fi, a paused debugger) cannot slow the others.
* Vitals, positions and unit state are coalesced latest-wins per unit while they wait; ECG segments and alerts
  are delivered one by one, in order.  Alerts are never coalesced and never dropped: a board that cannot take
  them is disconnected instead, and its browser reconnects and receives a full snapshot (resync), so the alert
  reaches it anyway.
* A board whose queue overflows, whose oldest waiting event is older than ``max_lag_s``, or whose socket write
  does not complete within ``send_timeout_s`` is disconnected.
* Each connection has a reader alongside its sender (a completed receive = the board went away) and, when idle,
  a heartbeat every ``heartbeat_s`` (a comment plus a ``tick`` event carrying the server's time, so the page
  itself can tell a silent link from a quiet one), so a vanished board leaves the registry within a heartbeat
  (FF-13).
* Writes are gathered: after a write, a board's next write waits until ``send_every_s`` (20 ms) has passed, and
  carries everything that came meanwhile, unless an alert (or a card's removal) is waiting, which goes at once.
  Each write costs the browser a network task of its own; a unit's vitals and ECG chunk, which come together, go in
  one write instead of two, and fifty units' events, spread over each second, in at most fifty writes a second, for
  at most 20 ms more latency on vitals and ECG.
* A stream ends when the viewer's access token expires (``expires_at``); the page reconnects with its refreshed
  cookie and resyncs, so a stream never outlives the authorisation it was opened with.
* A feed is either a hospital's big-screen board (every inbound unit, first ECG lead) or one patient's detail
  view (``unit_id`` set: that unit only, every ECG lead, trends, trail, timeline); see
  :data:`hospital_board.schemas.DETAIL_ONLY_KINDS` and :data:`~hospital_board.schemas.BOARD_ONLY_KINDS`.
* A board shows about ten ECG strips of its fifty cards at a time.  A board feed opened with a ``key`` (random,
  chosen by the page) may be told which units' strips are on screen (:meth:`FeedHub.set_strips`); it then receives
  the ``ecg`` events of those units only (everything else is unchanged: every card's vitals, alerts, positions).
  A unit coming into view gets its last ECG window first, in order, then its live chunks.  Until told, and after
  every reconnection, a feed receives every unit's ECG.

Wire format (the W3C/WHATWG "Server-sent events" stream): on connect ``retry: 2000`` and one ``snapshot`` (board)
or ``detail`` (patient) event, then events named after :class:`hospital_board.schemas.EventKind` whose ``data`` is
one line of JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from hospital_board.schemas import BOARD_ONLY_KINDS, DETAIL_ONLY_KINDS, EventKind, TickEvent
from hospital_board.state import BoardEvent

__all__ = ["ClientFeed", "FeedHub", "SseResponse", "sse_frame"]

logger = logging.getLogger(__name__)

_RETRY_MS = 2_000
_MAX_BATCH_BYTES = 256 * 1024
_SEND_EVERY_S = 0.02
"""A board's writes are at least this far apart (seconds), unless an alert or a removal is waiting."""
_URGENT_KINDS = frozenset({EventKind.ALERT, EventKind.REMOVED})


def sse_frame(kind: EventKind | str, payload: BaseModel) -> bytes:
    """One SSE event: ``event: <kind>`` and a single ``data:`` line of JSON (no newline can occur in it)."""
    return b"event: " + str(kind).encode() + b"\ndata: " + payload.model_dump_json().encode() + b"\n\n"


@dataclass(slots=True)
class _Slot:
    enqueued_s: float
    key: tuple[str, str] | None
    frame: bytes


class ClientFeed:
    """One connected board: a bounded outbound queue with latest-wins coalescing per (kind, unit).

    Args:
        hospital_id: whose data this board may receive.
        unit_id: a patient-detail feed of this unit only (None: the hospital's whole board).
        max_items: queue bound in events; one more and the board is disconnected.
        max_lag_s: the oldest waiting event may be at most this old (monotonic seconds), else disconnect.
        clock: monotonic clock in seconds (injectable for tests).
    """

    def __init__(
        self,
        hospital_id: str,
        *,
        max_items: int,
        max_lag_s: float,
        clock: Callable[[], float] = time.monotonic,
        unit_id: str | None = None,
        key: str | None = None,
        owner: str | None = None,
    ) -> None:
        if max_items < 1 or max_lag_s <= 0:
            raise ValueError("max_items must be >= 1 and max_lag_s > 0")
        self.hospital_id = hospital_id
        self.unit_id = unit_id
        self.key = key
        """The page's own key for this board feed (None: it cannot be told which strips are on screen)."""
        self.owner = owner
        """Who opened it (the token's subject): only they may change its strips."""
        self.ecg_units: frozenset[str] | None = None
        """Units whose first-lead ECG this board feed receives (None: every unit's)."""
        self.max_items = max_items
        self.max_lag_s = max_lag_s
        self._clock = clock
        self._queue: deque[_Slot] = deque()
        self._pending: dict[tuple[str, str], _Slot] = {}
        self._ready = asyncio.Event()
        self._urgent = asyncio.Event()
        self.close_reason: str | None = None
        self.sent_events = 0
        self.coalesced_events = 0

    @property
    def closed(self) -> bool:
        """True once the board is to be disconnected (it will resync when it reconnects)."""
        return self.close_reason is not None

    def __len__(self) -> int:
        return len(self._queue)

    def wants(self, event: BoardEvent) -> bool:
        """Whether this feed receives ``event`` (its hospital is checked by the hub)."""
        if self.unit_id is None:
            if event.kind == EventKind.ECG and self.ecg_units is not None:
                return event.unit_id in self.ecg_units
            return event.kind not in DETAIL_ONLY_KINDS
        return event.unit_id == self.unit_id and event.kind not in BOARD_ONLY_KINDS

    def lag_s(self) -> float:
        """Age of the oldest waiting event in seconds (0 when nothing waits)."""
        return self._clock() - self._queue[0].enqueued_s if self._queue else 0.0

    def offer(self, kind: EventKind, unit_id: str, frame: bytes, *, coalesce: bool) -> bool:
        """Queue one encoded event without waiting.  Returns False if the board is (now) disconnected."""
        if self.closed:
            return False
        if self._queue and self.lag_s() > self.max_lag_s:
            self.close("lagging")
            return False
        if coalesce:
            key = (str(kind), unit_id)
            slot = self._pending.get(key)
            if slot is not None:
                slot.frame = frame
                self.coalesced_events += 1
                return True
        else:
            key = None
        if len(self._queue) >= self.max_items:
            self.close("queue overflow")
            return False
        slot = _Slot(self._clock(), key, frame)
        self._queue.append(slot)
        if key is not None:
            self._pending[key] = slot
        self._ready.set()
        if kind in _URGENT_KINDS:
            self._urgent.set()
        return True

    @property
    def urgent(self) -> bool:
        """True while an alert or a removal waits (it is sent without waiting for the next write slot)."""
        return self._urgent.is_set()

    def close(self, reason: str) -> None:
        """Mark the board for disconnection and free its queue (idempotent; the first reason wins)."""
        if self.close_reason is None:
            self.close_reason = reason
        self._queue.clear()
        self._pending.clear()
        self._ready.set()
        self._urgent.set()

    def take(self, max_bytes: int = _MAX_BATCH_BYTES) -> bytes:
        """Everything waiting (up to about ``max_bytes``) as one write; empty when nothing waits."""
        parts: list[bytes] = []
        size = 0
        while self._queue and size < max_bytes:
            slot = self._queue.popleft()
            if slot.key is not None:
                self._pending.pop(slot.key, None)
            parts.append(slot.frame)
            size += len(slot.frame)
        self.sent_events += len(parts)
        if not self._queue:
            self._ready.clear()
            if not self.closed:
                self._urgent.clear()
        return b"".join(parts)

    async def hold(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s``, less if an alert or a removal comes (or the board is closed)."""
        if self._urgent.is_set() or timeout_s <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._urgent.wait()

    async def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for something to send (or for closure).  False on timeout."""
        if self._queue or self.closed:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self._ready.wait()
        except TimeoutError:
            return False
        return True


class FeedHub:
    """Registry of connected boards per hospital; fans events out without ever awaiting a board.

    Attributes:
        disconnects: boards disconnected, by reason (``lagging``, ``queue overflow``, ``send timeout``,
            ``client gone``, ``server shutdown``).
    """

    def __init__(
        self, *, max_items: int = 2_000, max_lag_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_items = max_items
        self.max_lag_s = max_lag_s
        self._clock = clock
        self._clients: dict[str, set[ClientFeed]] = {}
        self._keyed: dict[str, ClientFeed] = {}
        self._changed = asyncio.Event()
        self.disconnects: Counter[str] = Counter()

    def connect(
        self, hospital_id: str, unit_id: str | None = None, *, key: str | None = None, owner: str | None = None
    ) -> ClientFeed:
        """Register a new board for ``hospital_id`` (or a detail view of one of its inbound units).

        ``key``: the page's own key for a board feed, for :meth:`feed` and :meth:`set_strips` (a feed registered
        under the same key before by the same ``owner``, i.e. the page's previous connection, no longer answers to
        it; a key held by another owner is not taken over: the new feed then has no key and gets every unit's ECG);
        ``owner``: who opens it.
        """
        if key is not None and unit_id is None:
            held = self._keyed.get(key)
            if held is not None and held.owner != owner:
                logger.warning("board feed key already held by another viewer hospital=%s", hospital_id)
                key = None
        client = ClientFeed(
            hospital_id,
            max_items=self.max_items,
            max_lag_s=self.max_lag_s,
            clock=self._clock,
            unit_id=unit_id,
            key=key if unit_id is None else None,
            owner=owner,
        )
        self._clients.setdefault(hospital_id, set()).add(client)
        if client.key is not None:
            self._keyed[client.key] = client
        self._notify()
        logger.info(
            "board connected hospital=%s view=%s boards=%d",
            hospital_id,
            "detail" if unit_id else "board",
            self.count(hospital_id),
        )
        return client

    def disconnect(self, client: ClientFeed, reason: str = "client gone") -> None:
        """Remove a board from the registry (idempotent)."""
        client.close(reason)
        if client.key is not None and self._keyed.get(client.key) is client:
            del self._keyed[client.key]
        boards = self._clients.get(client.hospital_id)
        if boards is None or client not in boards:
            return
        boards.discard(client)
        if not boards:
            del self._clients[client.hospital_id]
        self.disconnects[client.close_reason or reason] += 1
        self._notify()
        logger.info(
            "board disconnected hospital=%s reason=%s sent=%d",
            client.hospital_id,
            client.close_reason,
            client.sent_events,
        )

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[FeedHub], bool], timeout_s: float) -> None:
        """Wait until ``predicate(hub)`` holds, re-checked at every connect/disconnect.  Raises TimeoutError."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                await self._changed.wait()

    def count(self, hospital_id: str | None = None) -> int:
        """Connected boards of one hospital, or of all."""
        if hospital_id is not None:
            return len(self._clients.get(hospital_id, ()))
        return sum(len(boards) for boards in self._clients.values())

    def publish(self, events: Iterable[BoardEvent]) -> None:
        """Queue each event for every board of the hospitals it is addressed to (encoded once per event)."""
        for event in events:
            frame: bytes | None = None
            for hospital_id in event.hospital_ids:
                for client in list(self._clients.get(hospital_id, ())):
                    if not client.wants(event):
                        continue
                    if frame is None:
                        frame = sse_frame(event.kind, event.payload)
                    if not client.offer(event.kind, event.unit_id, frame, coalesce=event.coalesced):
                        reason = client.close_reason
                        logger.warning("board falling behind, disconnecting hospital=%s reason=%s", hospital_id, reason)
                        self.disconnect(client)

    def feed(self, key: str) -> ClientFeed | None:
        """The connected board feed opened with ``key``, if any."""
        client = self._keyed.get(key)
        return None if client is None or client.closed else client

    def set_strips(self, client: ClientFeed, units: Iterable[str], windows: Callable[[str], list[BoardEvent]]) -> int:
        """Send ``client`` (a board feed) the ``ecg`` events of ``units`` only, from now on.

        ``windows(unit_id)`` gives the unit's last ECG window as ``ecg`` events, oldest first.  A unit whose ECG
        the feed was not receiving gets its window queued first (in order, before any live chunk), so that its
        strip is whole when it comes into view; the page restarts the strip of a unit it had stopped receiving, so
        the jump from its old samples to the window is never drawn as a gap.

        Returns:
            The number of ECG events queued for units coming into view (the feed may be disconnected instead if
            its queue overflows, as for any event).
        """
        wanted = frozenset(units)
        before = client.ecg_units
        client.ecg_units = wanted
        queued = 0
        for unit_id in sorted(wanted - before) if before is not None else ():
            for event in windows(unit_id):
                if event.kind != EventKind.ECG or event.unit_id != unit_id:
                    continue
                if client.hospital_id not in event.hospital_ids:
                    continue
                if not client.offer(event.kind, unit_id, sse_frame(event.kind, event.payload), coalesce=False):
                    self.disconnect(client)
                    return queued
                queued += 1
        return queued

    def close_all(self) -> None:
        """Disconnect every board (shutdown)."""
        for boards in list(self._clients.values()):
            for client in list(boards):
                self.disconnect(client, "server shutdown")


class SseResponse(Response):
    """A ``text/event-stream`` response driving one :class:`ClientFeed`: a sender and a disconnect reader.

    Every socket write is bounded by ``send_timeout_s``; on expiry the board is dropped and the connection is
    abandoned (the server then closes it).  The board is removed from the hub whatever way the stream ends.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        hub: FeedHub,
        client: ClientFeed,
        first_frame: bytes,
        *,
        heartbeat_s: float,
        send_timeout_s: float,
        server_clock: Callable[[], datetime] | None = None,
        background: BackgroundTask | None = None,
        expires_at: datetime | None = None,
        send_every_s: float = _SEND_EVERY_S,
    ) -> None:
        super().__init__(
            content=None,
            media_type=self.media_type,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", "Connection": "keep-alive"},
            background=background,
        )
        # an endless stream has no length (Starlette declares 0 for an empty body)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.hub = hub
        self.client = client
        self.first_frame = first_frame
        self.heartbeat_s = heartbeat_s
        self.send_timeout_s = send_timeout_s
        self.server_clock = server_clock or (lambda: datetime.now(UTC))
        self.expires_at = expires_at
        self.send_every_s = send_every_s
        """Writes at least this far apart (seconds) unless an alert or a removal waits (0: write at once)."""
        """When the viewer's token expires: the stream ends then, and the browser reconnects with its refreshed
        cookie (and gets a full snapshot), so an expired or revoked session stops receiving patient data."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry: stream until the board goes, falls behind, or the server shuts down."""
        client = self.client
        try:
            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(self._read(receive))
                completed = await self._pump(send)
                reader.cancel()
            if completed:
                await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.hub.disconnect(client, client.close_reason or "client gone")
        if self.background is not None:
            await self.background()

    async def _read(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.client.close("client gone")
                return

    async def _send(self, send: Send, message: Message) -> bool:
        try:
            async with asyncio.timeout(self.send_timeout_s):
                await send(message)
        except TimeoutError:
            self.client.close("send timeout")
            logger.warning("board send timed out hospital=%s; dropping the connection", self.client.hospital_id)
            return False
        except OSError:
            self.client.close("client gone")
            return False
        return True

    async def _pump(self, send: Send) -> bool:
        """Send headers, the resync, then events and heartbeats.  True if the stream may be ended politely."""
        start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        first = f"retry: {_RETRY_MS}\n\n".encode() + self.first_frame
        if not await self._send(send, start) or not await self._send(send, _body(first)):
            return False
        client = self.client
        loop = asyncio.get_running_loop()
        last_write = loop.time()
        while not client.closed:
            wait_s = self.heartbeat_s
            if self.expires_at is not None:
                left_s = (self.expires_at - self.server_clock()).total_seconds()
                if left_s <= 0:
                    client.close("token expired")
                    break
                wait_s = min(wait_s, left_s)
            if not await client.wait(wait_s):
                if self.expires_at is not None and self.server_clock() >= self.expires_at:
                    continue
                chunk = b": heartbeat\n" + sse_frame(EventKind.TICK, TickEvent(server_time=self.server_clock()))
            else:
                await client.hold(self.send_every_s - (loop.time() - last_write))
                chunk = client.take()
                if not chunk:
                    continue
            if not await self._send(send, _body(chunk)):
                return False
            last_write = loop.time()
        return client.close_reason not in {"send timeout", "client gone"}


def _body(data: bytes) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": True}
