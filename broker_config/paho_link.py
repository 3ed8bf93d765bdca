"""The receiving services' MQTT connection (ingest, dispatch, hospital board): paho-mqtt driven by the asyncio
event loop itself (no network thread), with back-pressure instead of loss.

Why not :class:`broker_config.connection.MqttLink` (aiomqtt) for a service that receives: aiomqtt hands each message
to asyncio separately (a queue put and a task wake-up per message), and when its bounded queue is full it *discards*
the message after paho has already sent the PUBACK, so a service that stalls for a while (a slow database, a burst)
loses messages the broker believes delivered: a vitals set, or a pre-alert.  MqttLink remains the vehicle's link
(last will, birth).

Here paho runs in paho's documented external-loop mode: the event loop watches the socket (``add_reader``; a writer
only while paho has bytes to send, through ``on_socket_register_write``/``on_socket_unregister_write``) and calls
``loop_read``/``loop_write``, and ``loop_misc`` once a second for the keep-alive.  A readable socket is drained in
one go (every whole packet it holds), received messages are appended to a list, and the session task hands the list
to the handler in arrival order.

Flow control is MQTT's own: messages are acknowledged by hand (paho's ``manual_ack``), each PUBACK sent only once
the handler has taken the message (returned, or finished waiting for room in the service's own queue).  A service
that stalls stops acknowledging, the broker stops sending once its in-flight window for the client is full
(``max_inflight_messages``) and keeps the rest queued (FF-19); the socket is always read, so the PUBACKs of the
service's own publishes, the SUBACK and the keep-alive still get through while the handler waits.  A message
taken from the socket but not yet acknowledged when the connection drops is still delivered (at least once: the
broker redelivers it to a persistent session, and the consumers are idempotent).  QoS 0 messages have no
acknowledgement to withhold: beyond ``max_pending`` waiting they are dropped and counted.  The handler starts
receiving while the subscription is being made: a persistent session's backlog arrives before the SUBACK.

Same contract as MqttLink where the ingest uses it: ``connected``, ``sessions``, ``rejected``, ``backoff``,
:meth:`run`, :meth:`publish` (bounded wait for the PUBACK), :meth:`wait_connected`; reconnects with capped
exponential back-off and full jitter, reset only on CONNACK; :class:`AuthError` when the broker refuses us.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import paho.mqtt.client as paho

from broker_config import BrokerSettings
from broker_config.connection import AuthError, Backoff, NotConnectedError
from broker_config.topics import loggable

__all__ = ["PahoLink", "ReceivedMessage"]

logger = logging.getLogger(__name__)


class ReceivedMessage(Protocol):
    """What a handler receives: a paho ``MQTTMessage`` (``str(topic)`` is the topic name; an aiomqtt ``Message``
    fits too, which unit tests use)."""

    @property
    def topic(self) -> object: ...

    @property
    def payload(self) -> bytes | bytearray: ...


OnConnect = Callable[["PahoLink"], Awaitable[None]]
OnMessage = Callable[[paho.MQTTMessage], Awaitable[None] | None]

_AUTH_CODES = {4, 5, 0x86, 0x87, 0x8C}  # v3.1.1 bad credentials / not authorised; v5 same meanings
_CONNECT_TIMEOUT_S = 10.0
_YIELD_EVERY = 500
_MISC_INTERVAL_S = 1.0
"""How often paho's ``loop_misc`` runs (keep-alive PINGREQ, and noticing a broker that stopped answering)."""
_READS_PER_WAKEUP = 1000
"""Packets read at most per readable event before the event loop gets a turn (the writer must not starve)."""


def _set_once(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _resolve_from_thread(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], *args: Any) -> None:
    """paho callback -> resolve ``future`` on the event loop with the reason code (thread-safe: ``connect`` runs in
    an executor thread and may already report).

    on_connect/on_disconnect are called with (client, userdata, flags, reason_code, properties), on_subscribe with
    (client, userdata, mid, reason_codes, properties): the fourth argument is the reason."""
    loop.call_soon_threadsafe(_set_once, future, args[3] if len(args) > 3 else None)


class PahoLink:
    """Owns a receiving service's MQTT client (MQTT 3.1.1) across reconnects, driven by the running event loop.

    Args:
        settings: where the broker is (host, port, credentials, TLS, keepalive, reconnect bounds).
        client_id: fixed client id (with ``clean_session=False`` the broker keeps the session while we are away).
        max_pending: messages received but not yet taken by the handler beyond which QoS 0 messages are dropped
            (QoS 1 ones are held back by the broker's in-flight window: they wait unacknowledged).
        max_inflight: QoS 1 publishes (receipts, gap records) in flight at once.

    Attributes:
        connected: set while a session is up (after CONNACK and ``on_connect``).
        sessions: how many sessions have been established.
        rejected: messages whose handler raised (counted, logged with the topic only, dropped).
        paused: how many times ``max_pending`` messages were waiting for the handler (acknowledgements withheld).
        dropped_qos0: QoS 0 messages dropped because ``max_pending`` were waiting.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        clean_session: bool = True,
        max_pending: int = 10_000,
        max_inflight: int = 100,
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be positive")
        self.settings = settings
        self.client_id = client_id
        self.clean_session = clean_session
        self.max_pending = max_pending
        self.max_inflight = max_inflight
        self.connected = asyncio.Event()
        self.sessions = 0
        self.rejected = 0
        self.paused = 0
        self.dropped_qos0 = 0
        self.backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: Any = None
        self._fd = -1
        self._reading = False
        self._progress = 0
        self._pending: list[paho.MQTTMessage] = []
        self._stale: list[paho.MQTTMessage] = []
        self._arrived = asyncio.Event()
        self._acks: dict[int, asyncio.Future[None]] = {}

    # --- paho callbacks (all on the event loop's thread once connected) -------------------------------------------

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        self._progress += 1
        waiting = len(self._pending)
        if waiting >= self.max_pending:
            if message.qos == 0:
                self.dropped_qos0 += 1
                return
            if waiting == self.max_pending:
                self.paused += 1
        if not waiting:
            self._arrived.set()
        self._pending.append(message)

    def _on_publish(self, _client: paho.Client, _userdata: Any, mid: int, *_: Any) -> None:
        # publish() registers its future before it yields, so the PUBACK (read on this same loop) never comes first
        self._progress += 1
        future = self._acks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(None)

    def _want_write(self, client: paho.Client, _userdata: Any, _sock: Any) -> None:
        if self._loop is not None and client is self._client and self._fd >= 0:
            self._loop.add_writer(self._fd, self._writable, client)

    def _no_write(self, _client: paho.Client, _userdata: Any, _sock: Any) -> None:
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_writer(self._fd)

    # --- socket events --------------------------------------------------------------------------------------------

    def _readable(self, client: paho.Client) -> None:
        """Read every whole packet the socket holds (bounded per wake-up)."""
        sock = self._sock
        for _ in range(_READS_PER_WAKEUP):
            before = self._progress
            rc = client.loop_read()
            if rc != paho.MQTT_ERR_SUCCESS:
                self._detach()  # paho closed the socket and reported the loss through on_disconnect
                return
            if self._sock is not sock:
                return
            if self._progress == before and not (hasattr(sock, "pending") and sock.pending()):
                return  # nothing more in the socket (or a packet still arriving): wait for the next event

    def _writable(self, client: paho.Client) -> None:
        if client.loop_write() != paho.MQTT_ERR_SUCCESS:
            self._detach()

    def _start_reading(self) -> None:
        if not self._reading and self._loop is not None and self._fd >= 0 and self._client is not None:
            self._loop.add_reader(self._fd, self._readable, self._client)
            self._reading = True

    def _detach(self) -> None:
        """Stop watching the current socket, by descriptor number (paho may have closed the socket already; the
        number must be unregistered before anything else can open a socket that reuses it)."""
        fd, self._fd = self._fd, -1
        self._sock = None
        self._reading = False
        if fd >= 0 and self._loop is not None:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)

    async def _misc(self, client: paho.Client) -> None:
        while True:
            await asyncio.sleep(_MISC_INTERVAL_S)
            if client.loop_misc() != paho.MQTT_ERR_SUCCESS:
                self._detach()
                return

    # --- event loop -----------------------------------------------------------------------------------------------

    def _take(self) -> list[paho.MQTTMessage]:
        batch, self._pending = self._pending, []
        return batch

    def _make_client(self) -> paho.Client:
        s = self.settings
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=self.clean_session,
            protocol=paho.MQTTv311,
            reconnect_on_failure=False,  # run() reconnects, with jitter
            manual_ack=True,  # PUBACK once the handler has taken the message (flow control, see the module doc)
        )
        if s.username is not None:
            client.username_pw_set(s.username, s.password.get_secret_value() if s.password else None)
        if s.tls:
            client.tls_set(
                ca_certs=str(s.ca_file) if s.ca_file else None,
                certfile=str(s.cert_file) if s.cert_file else None,
                keyfile=str(s.key_file) if s.key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.max_inflight_messages_set(self.max_inflight)
        client.max_queued_messages_set(0)
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    async def run(self, on_connect: OnConnect | None = None, on_message: OnMessage | None = None) -> None:
        """Connect, call ``on_connect(self)``, deliver messages to ``on_message`` on the event loop (in arrival
        order); reconnect forever.  Returns only when cancelled.  Raises :class:`AuthError` if the broker refuses
        the credentials."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        while True:
            client = self._make_client()
            connack: asyncio.Future[Any] = loop.create_future()
            lost: asyncio.Future[str] = loop.create_future()

            client.on_connect = functools.partial(_resolve_from_thread, loop, connack)
            client.on_disconnect = functools.partial(_resolve_from_thread, loop, lost)
            misc: asyncio.Task[None] | None = None
            try:
                try:
                    # the TCP (and TLS) connect blocks: off the loop; it writes CONNECT itself (no write callback yet)
                    await loop.run_in_executor(
                        None, client.connect, self.settings.host, self.settings.port, self.settings.keepalive_s
                    )
                    self._stale.extend(self._take())  # taken on an earlier connection, never delivered
                    self._client = client
                    self._sock = client.socket()
                    self._fd = self._sock.fileno() if self._sock is not None else -1
                    client.on_socket_register_write = self._want_write
                    client.on_socket_unregister_write = self._no_write
                    self._start_reading()
                    if client.want_write():
                        self._want_write(client, None, self._sock)
                    misc = asyncio.create_task(self._misc(client), name="mqtt-misc")
                    async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                        await asyncio.wait((connack, lost), return_when=asyncio.FIRST_COMPLETED)
                    if not connack.done():
                        raise ConnectionError("closed before CONNACK")
                    reason = connack.result()
                except (OSError, TimeoutError, ssl.SSLError) as exc:
                    logger.warning("mqtt link lost client=%s reason=%s", self.client_id, type(exc).__name__)
                else:
                    if reason.is_failure:
                        if reason.value in _AUTH_CODES:
                            raise AuthError(f"broker refused client {self.client_id}: not authorised")
                        logger.warning("mqtt connection refused client=%s reason=%s", self.client_id, reason)
                    else:
                        try:
                            await self._session(client, lost, on_connect, on_message)
                        except NotConnectedError as exc:  # the subscription was not acknowledged
                            logger.warning("mqtt session failed client=%s reason=%s", self.client_id, exc)
            finally:
                if misc is not None:
                    misc.cancel()
                self._client = None
                self.connected.clear()
                for future in self._acks.values():
                    if not future.done():
                        future.set_exception(NotConnectedError("broker link lost before the acknowledgement"))
                self._acks.clear()
                self._detach()
                client.on_socket_register_write = None
                client.on_socket_unregister_write = None
                client.disconnect()  # queues DISCONNECT (or does nothing when the socket is gone)
                client.loop_write()  # writes it and closes the socket
                sock = client.socket()
                if sock is not None:  # not closed by paho (the DISCONNECT could not be written)
                    sock.close()
            delay = self.backoff.next_delay_s()
            logger.info("mqtt reconnect client=%s in %.2f s", self.client_id, delay)
            await asyncio.sleep(delay)

    async def _session(
        self,
        client: paho.Client,
        lost: asyncio.Future[str],
        on_connect: OnConnect | None,
        on_message: OnMessage | None,
    ) -> None:
        self.backoff.reset()
        self.sessions += 1
        # the handler receives from the start: a persistent session's backlog comes before the SUBACK
        delivery = asyncio.create_task(self._delivery(client, lost, on_message), name="mqtt-delivery")
        try:
            if on_connect is not None:
                await on_connect(self)
            self.connected.set()
            logger.info("mqtt connected client=%s broker=%s", self.client_id, self.settings.url)
            await asyncio.wait((delivery, lost), return_when=asyncio.FIRST_COMPLETED)
            await delivery  # the messages taken before the loss are still delivered (at least once)
        finally:
            delivery.cancel()
        logger.warning("mqtt link lost client=%s reason=%s", self.client_id, lost.result())

    async def _delivery(self, client: paho.Client, lost: asyncio.Future[str], on_message: OnMessage | None) -> None:
        # taken on an earlier connection and not delivered (its subscription failed): delivered, not acknowledged
        # (their message ids belonged to that connection; a persistent session gets them again from the broker)
        stale, self._stale = self._stale, []
        await self._deliver(stale, on_message, None)
        while not lost.done():
            self._arrived.clear()
            batch = self._take()
            if not batch:
                waiter = asyncio.ensure_future(self._arrived.wait())
                await asyncio.wait((waiter, lost), return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                continue
            await self._deliver(batch, on_message, client)
        await self._deliver(self._take(), on_message, client)

    async def _deliver(
        self, batch: Sequence[paho.MQTTMessage], on_message: OnMessage | None, client: paho.Client | None
    ) -> None:
        """Hand ``batch`` to the handler in order, acknowledging each message on ``client`` (the connection it came
        on; None: none) once the handler has taken it, or refused it (a message the handler cannot use is not
        redelivered)."""
        for i, message in enumerate(batch):
            if i and not i % _YIELD_EVERY:
                await asyncio.sleep(0)  # a long batch must not starve the writer
            try:
                if on_message is not None:
                    result = on_message(message)
                    if result is not None:
                        await result
            except Exception:  # noqa: BLE001 - the per-message error boundary
                self.rejected += 1
                logger.warning("handler failed topic=%s bytes=%d", loggable(message.topic), len(message.payload))
            if message.qos and client is not None and client is self._client:
                client.ack(message.mid, message.qos)

    async def subscribe(self, filters: Sequence[str | tuple[str, int]], *, qos: int = 1, timeout_s: float = 10) -> None:
        """Subscribe to ``filters`` (each a filter at ``qos``, or a ``(filter, qos)`` pair) and wait for the SUBACK.

        Raises:
            NotConnectedError: the link is down, the broker refused, or no SUBACK came within ``timeout_s``.
        """
        client = self._client
        loop = asyncio.get_running_loop()
        if client is None:
            raise NotConnectedError("broker link is down")
        done: asyncio.Future[None] = loop.create_future()

        client.on_subscribe = functools.partial(_resolve_from_thread, loop, done)
        pairs = [f if isinstance(f, tuple) else (f, qos) for f in filters]
        rc, _mid = client.subscribe(pairs)
        if rc != paho.MQTT_ERR_SUCCESS:
            raise NotConnectedError(f"subscribe refused: {paho.error_string(rc)}")
        try:
            async with asyncio.timeout(timeout_s):
                await done
        except TimeoutError:
            raise NotConnectedError("subscription not acknowledged") from None

    async def publish(
        self, topic: str, payload: bytes, *, qos: int, retain: bool = False, timeout_s: float = 10
    ) -> None:
        """Publish and, for QoS 1, wait (bounded by ``timeout_s``) for the broker's PUBACK.

        Raises:
            NotConnectedError: the link is down, or it dropped or timed out before the acknowledgement.
        """
        client = self._client
        if client is None or not self.connected.is_set():
            raise NotConnectedError("broker link is down")
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise NotConnectedError(f"publish refused: {paho.error_string(info.rc)}")
        if qos == 0:
            return
        mid = info.mid
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks[mid] = future
        try:
            async with asyncio.timeout(timeout_s):
                await future
        except TimeoutError:
            raise NotConnectedError("publish not confirmed: TimeoutError") from None
        finally:
            self._acks.pop(mid, None)

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until a session is up.  Raises TimeoutError."""
        async with asyncio.timeout(timeout_s):
            await self.connected.wait()
