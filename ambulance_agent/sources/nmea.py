"""A GNSS receiver as an agent source: NMEA 0183 from a TCP feed or a serial device, one position per epoch.

The bytes go through :class:`~ambulance_agent.devices.nmea_gps.NmeaGpsReader` (checksums required, field counts
checked, no fix = no position, receiver clock judged against the receive clock: FF-05, FF-06, FF-07).  A receiver
sends several position sentences per epoch (RMC, GGA, GSA, GLL, ...); they are merged into one
:class:`~ambulance_agent.sources.base.GpsReading` per epoch (same device time of day), so the unit reports one
position per second, not three:

* the epoch has a fix only if every position sentence of it says so (a receiver that reports RMC ``A`` and GGA
  quality 0 in one epoch is not trusted); coordinates come from the first sentence with a fix; speed and heading
  from RMC; HDOP and fix quality from GGA/GNS; ``clock_suspect`` if any sentence's clock was suspect;
* an epoch is emitted when a sentence of the next epoch arrives, or ``hold_s`` after its first sentence.

No position for ``silence_s`` (receiver unplugged, TCP feed down, only rejected lines) yields an explicit
``fix=False`` reading, repeated every ``silence_s``: the board then greys out the last known position instead of
believing it (FF-05).  Never (0, 0).

Transports:

* ``tcp=(host, port)``: a TCP NMEA feed (``ser2net``, a receiver's own TCP server);
* ``gpsd=(host, port)``: a gpsd daemon (port 2947): the source asks it for the NMEA its receivers send
  (``?WATCH={"enable":true,"nmea":true}``, gpsd's client protocol) and skips gpsd's own JSON reports, so the
  sentences go through the same checks as from a serial port (gpsd shares the receiver with other programs);
* ``device=Path``: a serial device (``/dev/ttyUSB0``, ``/dev/ttyACM0``) or a pseudo-terminal, opened with pyserial
  through ``pyserial-asyncio-fast`` (8N1, raw, no flow control, at ``baud``; pyserial discards what was buffered
  before the open, which the next epoch replaces within a second), or a FIFO, read as a pipe; neither blocks the loop.

Either transport reconnects with capped exponential back-off and jitter after an error or end of stream.
Logs carry reasons and counts only, never positions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from ambulance_agent.devices.nmea_gps import NmeaFix, NmeaGpsReader, NmeaReason
from ambulance_agent.sources.base import GpsReading
from broker_config import utc_now
from broker_config.connection import Backoff

__all__ = ["EpochMerger", "NmeaGpsSource", "parse_host_port"]

logger = logging.getLogger(__name__)

_MAX_LINE_BYTES = 256
_BAUD_RATES = (4800, 9600, 19200, 38400, 57600, 115200)


def parse_host_port(value: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``.  Raises ValueError."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("expected host:port with a port in 1-65535")
    return host.strip("[]"), int(port_text)


GPSD_WATCH = b'?WATCH={"enable":true,"nmea":true};\n'
"""gpsd client protocol: stream the NMEA sentences of every receiver gpsd reads (gpsd(8), "?WATCH")."""


class EpochMerger:
    """Merges the position sentences of one receiver epoch into one :class:`GpsReading` (I/O free).

    Args:
        hold_s: an epoch is complete at the latest this long after its first sentence.
        monotonic: clock for ``hold_s`` (seconds).
    """

    def __init__(self, hold_s: float = 0.5, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = hold_s
        self._monotonic = monotonic
        self._fixes: list[NmeaFix] = []
        self._opened_at = 0.0

    @staticmethod
    def _key(fix: NmeaFix) -> object:
        return None if fix.device_time is None else fix.device_time.time()

    def _same_epoch(self, fix: NmeaFix) -> bool:
        """An undated sentence (a GGA before the first RMC) joins the open epoch; dated ones must match its time."""
        key = self._key(fix)
        keys = {k for f in self._fixes if (k := self._key(f)) is not None}
        return key is None or not keys or key in keys

    def add(self, fix: NmeaFix) -> GpsReading | None:
        """Add a sentence's fix; returns the previous epoch if this one starts a new epoch."""
        done = None
        if self._fixes and (not self._same_epoch(fix) or self.due()):
            done = self.flush()
        if not self._fixes:
            self._opened_at = self._monotonic()
        self._fixes.append(fix)
        return done

    def due(self) -> bool:
        """The open epoch has waited ``hold_s``."""
        return bool(self._fixes) and self._monotonic() - self._opened_at >= self.hold_s

    def flush(self) -> GpsReading | None:
        """Close the open epoch and return it (None if empty)."""
        fixes, self._fixes = self._fixes, []
        if not fixes:
            return None
        return merge_epoch(fixes)


def merge_epoch(fixes: list[NmeaFix]) -> GpsReading:
    """One reading from the position sentences of one epoch (rules in the module docstring)."""
    with_fix = [f for f in fixes if f.fix]
    has_fix = len(with_fix) == len(fixes)
    first = with_fix[0] if has_fix else None
    rmc = next((f for f in fixes if f.sentence == "RMC"), None)
    gga = next((f for f in fixes if f.sentence in ("GGA", "GNS")), None)
    dated = [f for f in fixes if f.device_time is not None] + [f for f in fixes if f.device_time is None]
    authoritative = next((f.time for f in dated if f.time is not None), None)
    received = next((f.received_at for f in fixes if f.received_at is not None), None)
    at = authoritative or received or utc_now()
    speed = heading = None
    if has_fix and rmc is not None:
        speed, heading = rmc.speed_mps, rmc.heading_deg
    return GpsReading(
        at=at,
        fix=has_fix,
        lat_deg=first.lat_deg if first else None,
        lon_deg=first.lon_deg if first else None,
        speed_mps=speed,
        heading_deg=heading,
        device_time=authoritative,
        hdop=gga.hdop if gga is not None else None,
        fix_quality=gga.fix_quality if gga is not None else None,
        clock_suspect=any(f.clock_suspect for f in fixes),
    )


class NmeaGpsSource:
    """Positions from an NMEA 0183 receiver over TCP or a serial device (see the module docstring).

    Args:
        tcp: ``(host, port)`` of a TCP NMEA feed; exactly one of ``tcp`` and ``device``.
        device: path of a serial device, pseudo-terminal or FIFO.
        baud: serial speed for a TTY (4800 is NMEA 0183's standard rate; many receivers use 9600).
        hold_s: epoch merge deadline.
        silence_s: without a position for this long, a ``fix=False`` reading is yielded (and again every
            ``silence_s``).
        connect_timeout_s: bound of one TCP connect.
        reconnect_min_s, reconnect_max_s: back-off bounds after an error or end of stream.
        reader: the NMEA reader (its ``clock`` is the receive clock for FF-07); a default one if None.
        clock: aware-UTC clock for silence readings.
        monotonic: seconds clock for ``hold_s``/``silence_s``.

    Raises:
        ValueError: neither or both transports, or an unsupported baud rate.
    """

    def __init__(
        self,
        *,
        tcp: tuple[str, int] | None = None,
        device: Path | None = None,
        gpsd: tuple[str, int] | None = None,
        baud: int = 4800,
        hold_s: float = 0.5,
        silence_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 10.0,
        reader: NmeaGpsReader | None = None,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if sum(x is not None for x in (tcp, device, gpsd)) != 1:
            raise ValueError("give exactly one of tcp=(host, port), gpsd=(host, port) and device=path")
        if baud not in _BAUD_RATES:
            raise ValueError(f"unsupported baud rate {baud}; one of {sorted(_BAUD_RATES)}")
        if hold_s <= 0 or silence_s <= hold_s:
            raise ValueError("need 0 < hold_s < silence_s")
        self.tcp = tcp
        self.gpsd = gpsd
        self.device = device
        self.baud = baud
        self.hold_s = hold_s
        self.silence_s = silence_s
        self.connect_timeout_s = connect_timeout_s
        self.reader = reader or NmeaGpsReader()
        self._clock = clock
        self._monotonic = monotonic
        self._backoff = Backoff(reconnect_min_s, reconnect_max_s)
        self.connected = False
        self.connections = 0
        self.epochs = 0
        self.silence_reports = 0

    def __aiter__(self) -> AsyncIterator[GpsReading]:
        return self._readings()

    async def _open(self) -> tuple[asyncio.StreamReader, Callable[[], None]]:
        if self.tcp is not None or self.gpsd is not None:
            host, port = self.tcp or self.gpsd  # type: ignore[misc]
            async with asyncio.timeout(self.connect_timeout_s):
                stream, writer = await asyncio.open_connection(host, port, limit=_MAX_LINE_BYTES * 4)
                if self.gpsd is not None:
                    writer.write(GPSD_WATCH)
                    await writer.drain()
            return stream, writer.close
        assert self.device is not None
        return await open_device(self.device, self.baud)

    async def _readings(self) -> AsyncIterator[GpsReading]:
        merger = EpochMerger(self.hold_s, self._monotonic)
        last_position = self._monotonic()
        while True:
            try:
                stream, close = await self._open()
            except (OSError, TimeoutError) as exc:
                logger.warning("nmea: cannot open the receiver feed (%s)", type(exc).__name__)
                stream = None
            if stream is not None:
                self.connected = True
                self.connections += 1
                self._backoff.reset()
                logger.info("nmea: receiver feed open")
                try:
                    async with contextlib.aclosing(self._read(stream, merger)) as epochs:
                        async for reading in epochs:
                            if reading is None:
                                if self._monotonic() - last_position >= self.silence_s:
                                    last_position = self._monotonic()
                                    yield self._silence()
                                continue
                            last_position = self._monotonic()
                            self.epochs += 1
                            yield reading
                finally:
                    self.connected = False
                    close()
                logger.info("nmea: receiver feed ended")
            pending = merger.flush()
            if pending is not None:
                last_position = self._monotonic()
                yield pending
            # reconnect after a bounded pause, still reporting silence meanwhile
            deadline = self._monotonic() + max(self._backoff.next_delay_s(), 0.05)
            while (remaining := deadline - self._monotonic()) > 0:
                await asyncio.sleep(min(remaining, self.silence_s))
                if self._monotonic() - last_position >= self.silence_s:
                    last_position = self._monotonic()
                    yield self._silence()

    def _silence(self) -> GpsReading:
        self.silence_reports += 1
        logger.info("nmea: no position for %.0f s, reporting no fix", self.silence_s)
        return GpsReading(at=self._clock(), fix=False)

    async def _read(self, stream: asyncio.StreamReader, merger: EpochMerger) -> AsyncGenerator[GpsReading | None, None]:
        """Merged epochs from the stream; ``None`` ticks at least every ``hold_s`` (for the silence check)."""
        while True:
            try:
                async with asyncio.timeout(self.hold_s):
                    line = await stream.readuntil(b"\n")
            except TimeoutError:
                line = None
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    fix = self.reader.feed(exc.partial)
                    if fix is not None and (done := merger.add(fix)) is not None:
                        yield done
                return
            except asyncio.LimitOverrunError as exc:
                await _discard_through_newline(stream, exc.consumed)
                self.reader.rejects.record(NmeaReason.TOO_LONG)
                logger.warning("nmea: rejected a line: %s", NmeaReason.TOO_LONG.value)
                continue
            except OSError as exc:
                logger.warning("nmea: receiver feed error (%s)", type(exc).__name__)
                return
            if line is not None:
                if len(line) > _MAX_LINE_BYTES:
                    self.reader.rejects.record(NmeaReason.TOO_LONG)
                    logger.warning("nmea: rejected a line: %s", NmeaReason.TOO_LONG.value)
                    line = b""
                if self.gpsd is not None and line.startswith(b"{"):
                    line = b""  # gpsd's own JSON report (VERSION, DEVICES, WATCH): not a sentence, not a reject
                fix = self.reader.feed(line) if line else None
                if fix is not None and (done := merger.add(fix)) is not None:
                    yield done
                    continue
            # the open epoch is due, or nothing came out of this line/timeout: a tick for the silence check
            yield merger.flush() if merger.due() else None


async def _discard_through_newline(stream: asyncio.StreamReader, consumed: int) -> None:
    await stream.readexactly(consumed)
    while True:
        try:
            await stream.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as exc:
            await stream.readexactly(exc.consumed)


async def open_device(
    path: Path, baud: int, *, limit: int = _MAX_LINE_BYTES * 4
) -> tuple[asyncio.StreamReader, Callable[[], None]]:
    """Open a serial device / PTY (pyserial-asyncio-fast, 8N1 raw) or a FIFO (a pipe) as an asyncio stream
    (``limit``: the stream's buffer limit in bytes).  Returns ``(reader, close)``.  Shared by the byte-stream sources.

    Raises OSError (pyserial's SerialException is one) when the device cannot be opened."""
    if stat.S_ISFIFO(os.stat(path).st_mode):
        return await _open_fifo(path, limit)
    import serial_asyncio_fast

    stream, writer = await serial_asyncio_fast.open_serial_connection(
        url=str(path), baudrate=baud, limit=limit, exclusive=True
    )
    return stream, writer.close


async def _open_fifo(path: Path, limit: int = _MAX_LINE_BYTES * 4) -> tuple[asyncio.StreamReader, Callable[[], None]]:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        fileobj: BinaryIO = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    loop = asyncio.get_running_loop()
    stream = asyncio.StreamReader(limit=limit)
    try:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), fileobj)
    except BaseException:
        fileobj.close()
        raise

    def close() -> None:
        transport.close()
        with contextlib.suppress(OSError):
            fileobj.close()

    return stream, close
