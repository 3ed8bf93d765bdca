"""One MQTT connection per process, kept alive by one shared loop: capped exponential back-off with full
jitter (reset only on CONNACK, so a fleet never reconnects in lock-step), resubscribe, then birth.

Usage::

    link = MqttLink(settings, client_id="ingest-1", clean_session=False)
    async def on_connect(client): await client.subscribe(...); await publish_birth(client)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(link.run(on_connect, on_message))
        ...
        await link.publish(topic, payload, qos=1, retain=False, timeout_s=5)

``on_message`` must return quickly (enqueue and return); it runs in the receive loop (FF-01).  Any exception it
raises is logged (ids only) and the loop goes on: one bad message never stops it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiomqtt

from broker_config.settings import BrokerSettings
from broker_config.topics import loggable

__all__ = ["AuthError", "Backoff", "MqttLink", "NotConnectedError", "Will"]

logger = logging.getLogger(__name__)

OnConnect = Callable[[aiomqtt.Client], Awaitable[None]]
OnMessage = Callable[[aiomqtt.Message], Awaitable[None] | None]

_AUTH_CODES = {4, 5, 0x86, 0x87, 0x8C}  # v3.1.1 bad credentials / not authorised; v5 same meanings


def _reraise_if_cancelling() -> None:
    """Python 3.11's ``asyncio.wait_for`` (used inside aiomqtt) can swallow a cancellation that lands with a
    CONNACK or PUBACK, and an MqttError raised while disconnecting can replace it: never reconnect after a cancel."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class NotConnectedError(ConnectionError):
    """Publishing while the broker link is down: the caller keeps the message (outbox) and retries."""


class AuthError(PermissionError):
    """The broker refused our credentials: retrying will not help, the service exits non-zero."""


@dataclass(frozen=True, slots=True)
class Will:
    """A last-will message, registered with the broker at CONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Backoff:
    """Capped exponential back-off with full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter").

    ``next_delay_s()`` returns a uniform random delay in [0, min(cap, base * 2**attempt)].
    """

    def __init__(self, base_s: float, cap_s: float, rng: random.Random | None = None) -> None:
        if base_s <= 0 or cap_s < base_s:
            raise ValueError("need 0 < base_s <= cap_s")
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def next_delay_s(self) -> float:
        """The delay before the next attempt; grows the ceiling for the one after."""
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.attempt, 32))
        self.attempt += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        """Back to the base delay (call on CONNACK only)."""
        self.attempt = 0


class MqttLink:
    """Owns the process's MQTT client across reconnects.

    Attributes:
        connected: set while a session is up (after CONNACK and ``on_connect``).
        sessions: how many sessions have been established (a birth/death counter).
        rejected: messages whose handler raised (counted, logged, dropped).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        clean_session: bool = True,
        will: Callable[[], Will | None] | None = None,
        max_queued_incoming: int = 10_000,
        max_inflight: int = 100,
        protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V311,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.clean_session = clean_session
        self._will = will
        self._max_queued_incoming = max_queued_incoming
        self._max_inflight = max_inflight
        self._protocol = protocol
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.sessions = 0
        self.rejected = 0
        self.backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)

    def _tls(self) -> aiomqtt.TLSParameters | None:
        s = self.settings
        if not s.tls:
            return None
        return aiomqtt.TLSParameters(
            ca_certs=str(s.ca_file) if s.ca_file else None,
            certfile=str(s.cert_file) if s.cert_file else None,
            keyfile=str(s.key_file) if s.key_file else None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        will = self._will() if self._will else None
        return aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password.get_secret_value() if s.password else None,
            identifier=self.client_id,
            clean_session=self.clean_session if self._protocol != aiomqtt.ProtocolVersion.V5 else None,
            protocol=self._protocol,
            will=aiomqtt.Will(will.topic, will.payload, will.qos, will.retain) if will else None,
            keepalive=s.keepalive_s,
            tls_params=self._tls(),
            max_queued_incoming_messages=self._max_queued_incoming,
            max_inflight_messages=self._max_inflight,
            timeout=10,
        )

    async def run(self, on_connect: OnConnect | None = None, on_message: OnMessage | None = None) -> None:
        """Connect, call ``on_connect``, deliver messages to ``on_message``; reconnect forever.

        Returns only when cancelled.  Raises :class:`AuthError` if the broker refuses the credentials.
        """
        while True:
            client = self._make_client()
            try:
                async with client:
                    self.backoff.reset()
                    self._client = client
                    self.sessions += 1
                    if on_connect is not None:
                        await on_connect(client)
                    _reraise_if_cancelling()
                    self.connected.set()
                    logger.info("mqtt connected client=%s broker=%s", self.client_id, self.settings.url)
                    async for message in client.messages:
                        if on_message is None:
                            continue
                        try:
                            result = on_message(message)
                            if result is not None:
                                await result
                        except Exception:  # noqa: BLE001 - the per-message error boundary
                            self.rejected += 1
                            size = len(message.payload or b"")
                            logger.warning("handler failed topic=%s bytes=%d", loggable(str(message.topic)), size)
            except aiomqtt.MqttCodeError as exc:
                _reraise_if_cancelling()
                if getattr(exc, "rc", None) in _AUTH_CODES:
                    raise AuthError(f"broker refused client {self.client_id}: not authorised") from None
                logger.warning("mqtt link lost client=%s reason=%s", self.client_id, exc)
            except aiomqtt.MqttError as exc:
                _reraise_if_cancelling()
                logger.warning("mqtt link lost client=%s reason=%s", self.client_id, exc)
            finally:
                self._client = None
                self.connected.clear()
            delay = self.backoff.next_delay_s()
            logger.info("mqtt reconnect client=%s in %.2f s", self.client_id, delay)
            await asyncio.sleep(delay)

    async def publish(
        self, topic: str, payload: bytes, *, qos: int, retain: bool = False, timeout_s: float = 10
    ) -> None:
        """Publish and, for QoS 1, wait (bounded by ``timeout_s``) for the broker's PUBACK.

        Raises:
            NotConnectedError: the link is down, or it dropped or timed out before the acknowledgement.
        """
        client = self._client
        if client is None:
            raise NotConnectedError("broker link is down")
        try:
            async with asyncio.timeout(timeout_s):
                await client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout_s)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            _reraise_if_cancelling()
            raise NotConnectedError(f"publish not confirmed: {type(exc).__name__}") from None
        _reraise_if_cancelling()  # a cancel that landed with the PUBACK must still cancel the caller

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until a session is up.  Raises TimeoutError."""
        async with asyncio.timeout(timeout_s):
            await self.connected.wait()
