"""A monitor's raw ECG waveform output as an agent source: interleaved int16 sample frames from a byte stream.

Framing (the monitor's waveform output, nothing in band but samples):

* the stream is a sequence of frames, one per sampling instant; a frame is ``n_leads`` little-endian int16 values,
  one per lead in the configured lead order (``leads[0]`` first), 2 x ``n_leads`` bytes, no header, no checksum;
* configured out of band (the monitor's export settings): the sampling rate ``fs_hz``, the lead names, the gain
  (ADC units per mV), the baseline (ADC units; mV = (adc - baseline) / gain), the lead-off sentinel code (default
  -32768, the usual "invalid sample" code, WFDB's too) and the ADC rails (lowest and highest code the converter
  outputs; default -32767 and 32767).

Blocks of ``chunk_s`` seconds (``round(chunk_s * fs_hz)`` frames) are cut from the stream and stamped from the
receive clock: the time of a block's first sample is the arrival time of its last byte minus the block's duration
(n / fs_hz).  The arrival time of a read is the receive clock when the read returns; when one read completes
several blocks (a burst after a stall), each earlier block's last byte is placed back from the read's arrival by the
nominal duration of the frames after it; and a block never starts before the previous block ended, so consecutive
blocks never overlap (data arriving faster than real time then runs on the sample clock, but never more than
:data:`MAX_AHEAD_S` ahead of the receive clock: beyond it the block is re-anchored to its arrival, counted in
``rate_resyncs`` and logged).  The clock is the
vehicle's (the monitor's own clock is not in the stream); the transport's buffering delay (typically milliseconds)
is included.

Each block flags, per lead: ``lead_off`` when the sentinel code appears in it (empty when no sentinel is
configured: not reported), ``saturated`` when a sample equals a rail (the sentinel is not a rail).  Samples are
passed on unaltered, the sentinel too (flagged, not hidden).

A frame split across two reads is completed by the next read.  When the stream ends or fails (end of stream, an
I/O error, nothing received for ``silence_s``), the complete frames of the unfinished block are yielded as a
shorter block and a trailing partial frame is dropped (``partial_frames_dropped``); the source then reconnects with
capped exponential back-off and jitter (:class:`broker_config.connection.Backoff`), counting ``connections``,
``drops`` and ``open_failures``.  Errors never propagate into the agent; logs carry reasons and counts, never
samples.  Reads are asynchronous: a silent or slow stream never blocks the agent's other sources.

Transports (``EMS_AGENT_ECG_STREAM``): ``host:port`` or ``tcp://host:port`` (the monitor's waveform TCP server, or a
serial-to-TCP bridge such as ``ser2net``); a path: a serial device or pseudo-terminal (pyserial-asyncio-fast, 8N1,
raw, at ``baud``; USB CDC-ACM devices ignore the rate) or a FIFO (named pipe) written by a capture tool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from ambulance_agent.sources.base import Clock, EcgBlock, default_clock
from ambulance_agent.sources.nmea import open_device, parse_host_port
from broker_config.connection import Backoff

__all__ = ["STANDARD_12_LEADS", "RawEcgStreamSource", "parse_stream_target"]

logger = logging.getLogger(__name__)

STANDARD_12_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
"""The default lead order of a 12-lead waveform output."""

_READ_BYTES = 65_536


MAX_AHEAD_S = 2.0
"""How far the no-overlap rule may push a block's time ahead of its arrival before the stream is re-anchored to
the receive clock (a stream faster than its declared rate must not drift into the future: the store refuses
future data and the board orders live ECG by sample time)."""


def parse_stream_target(value: str) -> tuple[str, int] | Path:
    """``host:port`` / ``tcp://host:port`` -> ``(host, port)``; a path (absolute or starting with ``.``) -> Path.

    Raises:
        ValueError: neither form, or a port outside 1-65535.
    """
    text = value.strip()
    if text.startswith("tcp://"):
        return parse_host_port(text.removeprefix("tcp://"))
    if text.startswith(("/", ".")):
        return Path(text)
    return parse_host_port(text)


class RawEcgStreamSource:
    """ECG blocks from a monitor's raw int16 waveform stream (see the module docstring for framing and timing).

    Args:
        target: ``(host, port)`` of a TCP stream, or the path of a serial device, pseudo-terminal or FIFO.
        fs_hz: sampling rate, Hz (> 0, <= 20000).
        leads: lead names in frame order (1-16).
        gain_adc_per_mv: ADC units per mV (> 0).
        baseline_adc: ADC code of 0 mV.
        lead_off_code: the sentinel a lead carries while its electrode is off; None = the monitor reports none.
        adc_min, adc_max: the converter's rails (int16, ``adc_min < adc_max``).
        chunk_s: block length in seconds (> 0, <= 10).
        baud: serial rate for a TTY.
        silence_s: nothing received for this long counts as a dropped stream (then reconnect).
        connect_timeout_s: bound of one TCP connect.
        reconnect_min_s, reconnect_max_s: back-off bounds.
        clock: the receive clock (aware UTC).

    Raises:
        ValueError: bad arguments, or a target that is a regular file (replay a recording with a FIFO).
    """

    def __init__(
        self,
        target: tuple[str, int] | Path,
        *,
        fs_hz: float,
        leads: Sequence[str] = STANDARD_12_LEADS,
        gain_adc_per_mv: float,
        baseline_adc: int = 0,
        lead_off_code: int | None = -32768,
        adc_min: int = -32767,
        adc_max: int = 32767,
        chunk_s: float = 1.0,
        baud: int = 921_600,
        silence_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 10.0,
        clock: Clock = default_clock,
    ) -> None:
        if not 0 < fs_hz <= 20_000:
            raise ValueError("fs_hz must be in (0, 20000]")
        if not 1 <= len(leads) <= 16 or any(not name for name in leads):
            raise ValueError("give 1 to 16 non-empty lead names")
        if not gain_adc_per_mv > 0:
            raise ValueError("gain_adc_per_mv must be > 0")
        if not -32768 <= adc_min < adc_max <= 32767:
            raise ValueError("need -32768 <= adc_min < adc_max <= 32767")
        if lead_off_code is not None and not -32768 <= lead_off_code <= 32767:
            raise ValueError("lead_off_code must fit int16")
        if not 0 < chunk_s <= 10 or not silence_s > 0 or baud <= 0:
            raise ValueError("need 0 < chunk_s <= 10, silence_s > 0, baud > 0")
        if isinstance(target, Path) and target.is_file():
            raise ValueError("a regular file is not a stream: give a FIFO, a serial device or host:port")
        self.target = target
        self.fs_hz = float(fs_hz)
        self.leads = tuple(leads)
        self.gain_adc_per_mv = float(gain_adc_per_mv)
        self.baseline_adc = int(baseline_adc)
        self.lead_off_code = lead_off_code
        self.adc_min, self.adc_max = adc_min, adc_max
        self.chunk_n = max(1, round(chunk_s * self.fs_hz))
        self.frame_bytes = 2 * len(self.leads)
        self.baud = baud
        self.silence_s = silence_s
        self.connect_timeout_s = connect_timeout_s
        self._clock = clock
        self._backoff = Backoff(reconnect_min_s, reconnect_max_s)
        self._limit = max(4 * self.chunk_n * self.frame_bytes, _READ_BYTES)
        self.connected = False
        self.connections = 0
        self.drops = 0
        self.open_failures = 0
        self.partial_frames_dropped = 0
        self.samples_received = 0
        self.rate_resyncs = 0
        """Times the block clock was pulled back to the receive clock (see :data:`MAX_AHEAD_S`)."""
        self._last_end: datetime | None = None
        if isinstance(target, Path) and self.fs_hz * self.frame_bytes * 10 > baud:
            logger.warning("ecg stream: %d baud is below the stream's rate (fine for a PTY or USB CDC-ACM)", baud)

    def __aiter__(self) -> AsyncIterator[EcgBlock]:
        return self._blocks()

    async def _open(self) -> tuple[asyncio.StreamReader, Callable[[], None]]:
        if isinstance(self.target, Path):
            if stat.S_ISREG(os.stat(self.target).st_mode):
                raise OSError("a regular file is not a stream")
            return await open_device(self.target, self.baud, limit=self._limit)
        host, port = self.target
        async with asyncio.timeout(self.connect_timeout_s):
            stream, writer = await asyncio.open_connection(host, port, limit=self._limit)
        return stream, writer.close

    async def _blocks(self) -> AsyncIterator[EcgBlock]:
        while True:
            try:
                stream, close = await self._open()
            except (OSError, TimeoutError) as exc:
                self.open_failures += 1
                logger.warning("ecg stream: cannot open (%s), open failures=%d", type(exc).__name__, self.open_failures)
            else:
                self.connected = True
                self.connections += 1
                self._backoff.reset()
                logger.info("ecg stream: open, connections=%d", self.connections)
                try:
                    async for block in self._read(stream):
                        yield block
                finally:
                    self.connected = False
                    close()
                self.drops += 1
                logger.warning("ecg stream: dropped, drops=%d", self.drops)
            await asyncio.sleep(max(self._backoff.next_delay_s(), 0.05))

    async def _read(self, stream: asyncio.StreamReader) -> AsyncIterator[EcgBlock]:
        buf = bytearray()
        block_bytes = self.chunk_n * self.frame_bytes
        arrival = None
        while True:
            try:
                async with asyncio.timeout(self.silence_s):
                    data = await stream.read(_READ_BYTES)
            except TimeoutError:
                logger.warning("ecg stream: nothing received for %.1f s", self.silence_s)
                break
            except OSError as exc:
                logger.warning("ecg stream: read error (%s)", type(exc).__name__)
                break
            if not data:
                break
            arrival = self._clock()
            buf += data
            n_blocks = len(buf) // block_bytes
            for k in range(n_blocks):
                frames_after = (len(buf) - (k + 1) * block_bytes) // self.frame_bytes
                end_at = arrival - timedelta(seconds=frames_after / self.fs_hz)
                yield self._block(bytes(buf[k * block_bytes : (k + 1) * block_bytes]), end_at)
            del buf[: n_blocks * block_bytes]
        whole = len(buf) // self.frame_bytes * self.frame_bytes
        if len(buf) > whole:
            self.partial_frames_dropped += 1
        if whole and arrival is not None:
            yield self._block(bytes(buf[:whole]), arrival)

    def _block(self, raw: bytes, end_at: datetime) -> EcgBlock:
        frames = np.frombuffer(raw, dtype="<i2").reshape(-1, len(self.leads))
        samples = np.ascontiguousarray(frames.T, dtype=np.int16)
        samples.flags.writeable = False
        n = samples.shape[1]
        rails = (samples == self.adc_min) | (samples == self.adc_max)
        if self.lead_off_code is not None:
            off = samples == self.lead_off_code
            rails &= ~off
            lead_off: tuple[bool, ...] = tuple(bool(v) for v in off.any(axis=1))
        else:
            lead_off = ()
        arrived_start = end_at - timedelta(seconds=n / self.fs_hz)
        start_at = arrived_start
        if self._last_end is not None and start_at < self._last_end:
            start_at = self._last_end
        if (start_at - arrived_start).total_seconds() > MAX_AHEAD_S:
            # samples keep arriving faster than fs_hz says (a wrong rate, or a monitor dumping its buffer): the
            # sample clock would run into the future without bound; back to the receive clock, and say so
            self.rate_resyncs += 1
            logger.warning("ecg stream: samples arrive faster than %.0f Hz; time re-anchored (%d)", self.fs_hz,
                           self.rate_resyncs)  # fmt: skip
            start_at = arrived_start
        self._last_end = start_at + timedelta(seconds=n / self.fs_hz)
        block = EcgBlock(
            start_at=start_at,
            fs_hz=self.fs_hz,
            leads=self.leads,
            gain_adc_per_mv=self.gain_adc_per_mv,
            baseline_adc=self.baseline_adc,
            samples=samples,
            sample_index=self.samples_received,
            lead_off=lead_off,
            saturated=tuple(bool(v) for v in rails.any(axis=1)),
        )
        self.samples_received += n
        return block
