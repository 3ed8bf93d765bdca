"""MLLP (HL7 v2 Minimal Lower Layer Protocol) framing, an asyncio listener and a resending client.

Frame: ``<VT> payload <FS><CR>`` (0x0B ... 0x1C 0x0D; HL7 v2.6 Appendix C "Lower Layer Protocols", C.4 MLLP).
Both directions accumulate bytes until ``<FS><CR>`` under an overall deadline and a maximum frame size, discard
bytes outside frames, and handle two frames in one read as well as a frame split anywhere, including between
``<FS>`` and ``<CR>`` (FF-08: python-hl7 0.4.5's client returns after a single ``recv``).  The framing bytes are
python-hl7's own constants (:mod:`hl7.mllp`).

The client resends the *same bytes* (so the same MSH-10 control id) after a timeout; the receiver de-duplicates
by MSH-10 (:class:`ambulance_agent.devices.hl7_monitor.Hl7MonitorInput`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

from hl7.mllp.streams import CARRIAGE_RETURN, END_BLOCK, START_BLOCK

from ambulance_agent.devices.errors import DeviceInputError, RejectTally
from ambulance_agent.devices.hl7_message import AckCode, Hl7InputError, normalise_segments, parse_message, read_ack
from broker_config.topics import loggable

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "MllpAck",
    "MllpDecoder",
    "MllpError",
    "MllpHandler",
    "MllpListener",
    "MllpNackError",
    "MllpReason",
    "MllpTimeoutError",
    "frame",
    "send_mllp",
]

logger = logging.getLogger(__name__)

_START: bytes = START_BLOCK
_END: bytes = END_BLOCK + CARRIAGE_RETURN
_VT: int = START_BLOCK[0]
_FS: int = END_BLOCK[0]
_CR: int = CARRIAGE_RETURN[0]

DEFAULT_MAX_FRAME_BYTES = 1_048_576
"""1 MiB: far above a PCD-01 numerics message (2 KB in the IHE examples) yet bounded against a runaway peer."""

_READ_BYTES = 65_536

MllpHandler = Callable[[bytes], Awaitable[bytes | None]]
"""Called with each frame's payload (framing removed); returns the response payload (an ACK) or ``None``."""


class MllpReason(StrEnum):
    """Why bytes or a frame were dropped, or an exchange failed."""

    FRAME_TOO_LARGE = "frame_too_large"
    FS_WITHOUT_CR = "fs_without_cr"
    UNTERMINATED_FRAME = "unterminated_frame"
    FRAME_TIMEOUT = "frame_timeout"
    HANDLER_FAILED = "handler_failed"
    NO_ACK = "no_ack"
    NACK = "nack"


class MllpError(DeviceInputError):
    """An MLLP exchange failed."""


class MllpTimeoutError(MllpError):
    """No acknowledgement after every attempt.  ``control_id`` is the MSH-10 that was sent."""

    def __init__(self, control_id: str, attempts: int) -> None:
        self.control_id = control_id
        self.attempts = attempts
        super().__init__(MllpReason.NO_ACK, f"control id {control_id!r}, {attempts} attempt(s)")


class MllpNackError(MllpError):
    """The receiver answered with an error or reject code (AE, AR, CE, CR)."""

    def __init__(self, control_id: str, code: AckCode) -> None:
        self.control_id = control_id
        self.code = code
        super().__init__(MllpReason.NACK, f"control id {control_id!r}, MSA-1 {code.value}")


def frame(payload: bytes) -> bytes:
    """Wrap one payload in MLLP framing: ``<VT> payload <FS><CR>``."""
    return _START + payload + _END


class MllpDecoder:
    """Incremental, I/O-free MLLP deframer.

    Feed it whatever a socket read returned; it returns the payloads of every frame completed by those bytes.
    Bytes outside a frame are discarded and counted (``discarded_bytes``); a frame that grows beyond
    ``max_frame_bytes``, that is interrupted by a new ``<VT>``, or whose ``<FS>`` is not followed by ``<CR>`` is
    dropped and counted in ``rejects``.

    Args:
        max_frame_bytes: the largest payload accepted (bytes between ``<VT>`` and ``<FS>``).
        rejects: a tally to count dropped frames in (shared with the owner); a private one by default.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, rejects: RejectTally | None = None) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be >= 1")
        self.max_frame_bytes = max_frame_bytes
        self.discarded_bytes = 0
        self.rejects = rejects if rejects is not None else RejectTally()
        self._buf: bytearray | None = None
        self._fs_pending = False

    @property
    def in_frame(self) -> bool:
        """A frame has started and not yet ended (the read deadline applies)."""
        return self._buf is not None

    def _drop(self, reason: MllpReason) -> None:
        self.rejects.record(reason)
        logger.warning("mllp: dropped a frame (%s)", reason.value)
        self._buf = None
        self._fs_pending = False

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data``; return the payloads of the frames it completed, oldest first."""
        frames: list[bytes] = []
        i, n = 0, len(data)
        while i < n:
            if self._buf is None:
                start = data.find(_START, i)
                if start < 0:
                    self.discarded_bytes += n - i
                    break
                self.discarded_bytes += start - i
                self._buf = bytearray()
                i = start + 1
                continue
            if self._fs_pending:
                if data[i] == _CR:
                    frames.append(bytes(self._buf))
                    self._buf = None
                    self._fs_pending = False
                    i += 1
                else:
                    self._drop(MllpReason.FS_WITHOUT_CR)  # byte i is looked at again, outside a frame
                continue
            end = _first_of(data, i, _FS, _VT)
            chunk_end = n if end < 0 else end
            if len(self._buf) + (chunk_end - i) > self.max_frame_bytes:
                self._drop(MllpReason.FRAME_TOO_LARGE)
                self.discarded_bytes += chunk_end - i
                i = chunk_end
                continue
            self._buf += data[i:chunk_end]
            if end < 0:
                break
            if data[end] == _VT:
                self._drop(MllpReason.UNTERMINATED_FRAME)
                self._buf = bytearray()
            else:
                self._fs_pending = True
            i = end + 1
        return frames


def _first_of(data: bytes, start: int, a: int, b: int) -> int:
    ia = data.find(bytes((a,)), start)
    ib = data.find(bytes((b,)), start)
    if ia < 0:
        return ib
    if ib < 0:
        return ia
    return min(ia, ib)


class MllpListener:
    """An asyncio MLLP server: one task per connection, one handler call per frame, responses framed back.

    The handler is the per-message error boundary's inner part: if it raises, the failure is logged (reason
    only), counted, and no response is sent (the sender times out and resends); the connection and the
    listener live on.  A frame that does not complete within ``frame_timeout_s`` of its first byte closes the
    connection (a stalled or malicious peer cannot hold a half frame forever).

    Args:
        host: address to bind (``127.0.0.1`` for the in-vehicle loopback).
        port: TCP port; 0 picks a free one (read :attr:`port` after :meth:`start`).
        handler: see :data:`MllpHandler`.
        max_frame_bytes: largest accepted payload.
        frame_timeout_s: overall deadline for one frame, from its ``<VT>`` to its ``<FS><CR>``.
        idle_timeout_s: close a connection silent this long between frames; ``None`` keeps it open (monitors
            usually hold one connection for hours).
    """

    def __init__(
        self,
        host: str,
        port: int,
        handler: MllpHandler,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        frame_timeout_s: float = 30.0,
        idle_timeout_s: float | None = None,
    ) -> None:
        self.host = host
        self._port = port
        self.handler = handler
        self.max_frame_bytes = max_frame_bytes
        self.frame_timeout_s = frame_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.rejects = RejectTally()
        self.frames_received = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with 0)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        """Bind and start accepting connections."""
        self._server = await asyncio.start_server(self._on_connect, self.host, self._port)
        logger.info("mllp: listening on %s:%d", self.host, self.port)

    async def serve_forever(self) -> None:
        """Start (if needed) and serve until cancelled."""
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop accepting, close every open connection, and wait (up to ``grace_s``) for their tasks to end."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()  # the connection's read then sees end-of-stream and its task ends normally
        tasks = list(self._connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:  # a handler that does not return: last resort
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MllpListener:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._writers.add(writer)
        peer = writer.get_extra_info("peername")
        decoder = MllpDecoder(self.max_frame_bytes, self.rejects)
        try:
            while True:
                deadline = self.frame_timeout_s if decoder.in_frame else self.idle_timeout_s
                try:
                    async with asyncio.timeout(deadline):
                        data = await reader.read(_READ_BYTES)
                except TimeoutError:
                    reason = MllpReason.FRAME_TIMEOUT if decoder.in_frame else None
                    if reason is not None:
                        self.rejects.record(reason)
                        logger.warning("mllp: %s from %s, closing the connection", reason.value, peer)
                    break
                if not data:
                    break
                for payload in decoder.feed(data):
                    self.frames_received += 1
                    await self._answer(payload, writer)
        except (ConnectionError, OSError) as exc:
            logger.info("mllp: connection from %s ended (%s)", peer, type(exc).__name__)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            self._connections.discard(task)
            self._writers.discard(writer)

    async def _answer(self, payload: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            response = await self.handler(payload)
        except Exception as exc:  # noqa: BLE001 - the per-message boundary: one bad message never stops the listener
            self.rejects.record(MllpReason.HANDLER_FAILED)
            logger.warning("mllp: handler failed (%s); no acknowledgement sent", type(exc).__name__)
            return
        if response is not None:
            writer.write(frame(response))
            await writer.drain()


@dataclass(frozen=True, slots=True)
class MllpAck:
    """A positive acknowledgement received by :func:`send_mllp`.

    ``control_id`` is the MSH-10 of the message sent (echoed in MSA-2); ``code`` is MSA-1 (AA or CA);
    ``attempts`` counts the sends it took (1 = no resend).
    """

    control_id: str
    code: AckCode
    attempts: int
    ack_payload: bytes


async def send_mllp(
    host: str,
    port: int,
    message: str | bytes,
    timeout_s: float,
    *,
    attempts: int = 3,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> MllpAck:
    """Send one HL7 v2 message over MLLP and wait for its acknowledgement, resending on timeout.

    The message's segment terminators are normalised to ``<CR>`` first (FF-09).  Each attempt opens a
    connection, sends the frame and accumulates bytes until a complete frame whose MSA-2 equals the message's
    MSH-10 arrives (other frames, such as a late ACK of an earlier message, are skipped), all within
    ``timeout_s``.  A timeout or connection error leads to the next attempt with the same bytes, hence the same
    control id (FF-08).

    Args:
        host, port: the receiver.
        message: one HL7 v2 message (str is encoded UTF-8).
        timeout_s: overall deadline of one attempt (connect + send + full ACK frame), seconds.
        attempts: sends before giving up (>= 1).
        max_frame_bytes: the largest ACK payload accepted.

    Returns:
        The :class:`MllpAck` for MSA-1 ``AA`` or ``CA``.

    Raises:
        Hl7InputError: ``message`` is not a parseable HL7 v2 message with an MSH-10.
        MllpNackError: the receiver answered AE, AR, CE or CR (not resent: the receiver has decided).
        MllpTimeoutError: no matching acknowledgement after ``attempts`` tries.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    text = normalise_segments(message)
    control_id = parse_message(text).header.control_id
    payload = text.encode("utf-8")
    for attempt in range(1, attempts + 1):
        try:
            async with asyncio.timeout(timeout_s):
                ack_payload, code = await _exchange(host, port, payload, control_id, max_frame_bytes)
        except TimeoutError:
            logger.warning(
                "mllp: no ACK for %s within %.1f s (attempt %d/%d)",
                loggable(control_id, 64),
                timeout_s,
                attempt,
                attempts,
            )
            continue
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            logger.warning(
                "mllp: send of %s failed (%s, attempt %d/%d)",
                loggable(control_id, 64),
                type(exc).__name__,
                attempt,
                attempts,
            )
            continue
        if code in (AckCode.AA, AckCode.CA):
            return MllpAck(control_id=control_id, code=code, attempts=attempt, ack_payload=ack_payload)
        raise MllpNackError(control_id, code)
    raise MllpTimeoutError(control_id, attempts)


async def _exchange(
    host: str, port: int, payload: bytes, control_id: str, max_frame_bytes: int
) -> tuple[bytes, AckCode]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(frame(payload))
        await writer.drain()
        decoder = MllpDecoder(max_frame_bytes)
        while True:
            data = await reader.read(_READ_BYTES)
            if not data:
                raise ConnectionResetError("peer closed before the acknowledgement")
            for ack_payload in decoder.feed(data):
                try:
                    ack = read_ack(ack_payload)
                except Hl7InputError as exc:
                    logger.warning("mllp: unreadable response frame (%s)", exc.reason.value)
                    continue
                if ack.acked_control_id == control_id:
                    return ack_payload, ack.code
                logger.info("mllp: skipped an ACK for another control id")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
