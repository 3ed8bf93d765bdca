"""The raw-stream ECG adapter over a real local TCP socket and a real pseudo-terminal: real MIT-BIH samples (read
with wfdb here, in the test, never in the agent) come out exactly; lead-off sentinels and ADC rails are flagged per
lead and block; a dropped connection is reconnected and the blocks after it are stamped from the receive clock."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import wfdb

from ambulance_agent.sources.base import EcgBlock
from ambulance_agent.sources.ecg_stream import MAX_AHEAD_S, RawEcgStreamSource, parse_stream_target

pytestmark = pytest.mark.integration

MITDB = Path(__file__).resolve().parents[2] / "simulators" / "data" / "mitdb"
T0 = datetime(2026, 11, 30, 9, 30, tzinfo=UTC)
MITBIH = {"fs_hz": 360.0, "leads": ("MLII", "V5"), "gain_adc_per_mv": 200.0, "baseline_adc": 1024}
"""MIT-BIH's out-of-band description: 360 Hz, 200 ADC units/mV, 11-bit ADC with zero 1024 (rails 0 and 2047)."""


def record(name: str, seconds: int) -> np.ndarray:
    """(n_leads, n) int16 digital samples of a MIT-BIH record."""
    rec = wfdb.rdrecord(str(MITDB / name), physical=False, sampto=seconds * 360)
    return np.ascontiguousarray(rec.d_signal.T.astype(np.int16))


def frames(samples: np.ndarray) -> bytes:
    """The monitor's wire form: one little-endian int16 per lead per sampling instant, interleaved."""
    return np.ascontiguousarray(samples.T).astype("<i2").tobytes()


class Monitor:
    """A TCP waveform server: each connection sends what the test queues (``None`` closes that connection)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _client(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError):
            while (data := await self.queue.get()) is not None:
                writer.write(data)
                await writer.drain()
        writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Monitor]:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        try:
            yield self
        finally:
            self._server.close()
            self.queue.put_nowait(None)


async def collect(source: RawEcgStreamSource, n_samples: int, timeout_s: float = 20) -> list[EcgBlock]:
    out: list[EcgBlock] = []
    async with asyncio.timeout(timeout_s):
        async for block in source:
            out.append(block)
            if sum(b.n_samples for b in out) >= n_samples:
                break
    return out


async def test_tcp_stream_of_a_real_record_comes_out_exactly_with_partial_frames_at_read_boundaries() -> None:
    samples = record("100", 20)
    data = frames(samples)
    async with Monitor().serving() as monitor:
        for k in range(0, len(data), 1001):  # odd sizes: frames split across reads
            monitor.queue.put_nowait(data[k : k + 1001])
        source = RawEcgStreamSource(("127.0.0.1", monitor.port), **MITBIH, adc_min=0, adc_max=2047)
        blocks = await collect(source, samples.shape[1])
    assert [b.n_samples for b in blocks] == [360] * 20
    got = np.concatenate([b.samples for b in blocks], axis=1)
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, samples)
    assert all(b.lead_off == (False, False) and b.saturated == (False, False) for b in blocks)
    assert all(not b.samples.flags.writeable and b.leads == ("MLII", "V5") for b in blocks)
    for a, b in itertools.pairwise(blocks):  # stamped from the receive clock, never overlapping
        assert b.start_at >= a.start_at + timedelta(seconds=1)
        assert b.start_at.tzinfo is not None
    assert source.connections == 1
    assert source.partial_frames_dropped == 0


async def test_a_real_record_through_a_serial_pseudo_terminal_comes_out_exactly() -> None:
    samples = record("119", 10)
    data = frames(samples)
    master, slave = os.openpty()
    try:
        source = RawEcgStreamSource(Path(os.ttyname(slave)), **MITBIH, adc_min=0, adc_max=2047, chunk_s=0.5)
        reading = asyncio.create_task(collect(source, samples.shape[1]))
        async with asyncio.timeout(10):
            while not source.connected:  # noqa: ASYNC110 - pyserial drops what came before the open; bounded
                await asyncio.sleep(0.01)
        for k in range(0, len(data), 777):  # blocks while the PTY buffer is full: off the loop
            await asyncio.to_thread(os.write, master, data[k : k + 777])
        blocks = await reading
    finally:
        os.close(master)
        os.close(slave)
    assert [b.n_samples for b in blocks] == [180] * 20
    np.testing.assert_array_equal(np.concatenate([b.samples for b in blocks], axis=1), samples)
    assert all(b.lead_off == (False, False) and b.saturated == (False, False) for b in blocks)


async def test_a_sentinel_run_flags_lead_off_on_that_lead_only_and_a_rail_flags_saturation() -> None:
    samples = record("201", 6)
    samples[1, 2 * 360 + 10 : 2 * 360 + 200] = -32768  # V1 electrode off during second 2
    samples[0, 4 * 360 + 7] = 2047  # MLII at the upper rail in second 4
    samples[1, 5 * 360 + 300] = 0  # V1 at the lower rail in second 5
    async with Monitor().serving() as monitor:
        monitor.queue.put_nowait(frames(samples))
        source = RawEcgStreamSource(("127.0.0.1", monitor.port), **MITBIH, adc_min=0, adc_max=2047)
        blocks = await collect(source, samples.shape[1])
    assert [b.lead_off for b in blocks] == [(False, False)] * 2 + [(False, True)] + [(False, False)] * 3
    assert [b.saturated for b in blocks] == ([(False, False)] * 4 + [(True, False), (False, True)])
    # flagged, not hidden: the sentinel and the rail values are passed on as they came
    np.testing.assert_array_equal(np.concatenate([b.samples for b in blocks], axis=1), samples)


async def test_a_dropped_connection_reconnects_and_the_blocks_after_it_start_at_the_right_time() -> None:
    samples = record("100", 6)
    data = frames(samples)
    second = 360 * 4  # bytes of one second of 2-lead frames
    now = [T0]
    async with Monitor().serving() as monitor:
        source = RawEcgStreamSource(
            ("127.0.0.1", monitor.port), **MITBIH, adc_min=0, adc_max=2047, reconnect_min_s=0.05,
            reconnect_max_s=0.1, clock=lambda: now[0],
        )  # fmt: skip
        blocks = aiter(source)
        got: list[EcgBlock] = []

        async def step(payload: bytes | None, at: datetime) -> None:
            now[0] = at
            monitor.queue.put_nowait(payload)

        async with asyncio.timeout(20):
            await step(data[:second], T0 + timedelta(seconds=1))
            got.append(await anext(blocks))
            await step(data[second : 2 * second], T0 + timedelta(seconds=2))
            got.append(await anext(blocks))
            # half a second and half a frame, then the monitor's link drops
            await step(data[2 * second : 2 * second + second // 2 + 3], T0 + timedelta(seconds=2.5))
            monitor.queue.put_nowait(None)
            got.append(await anext(blocks))  # the complete frames before the drop, as a shorter block
            # the link comes back 7.5 s later; the stream resumes with the samples the monitor sends now
            await step(data[3 * second : 4 * second], T0 + timedelta(seconds=11))
            got.append(await anext(blocks))
            await step(data[4 * second : 5 * second], T0 + timedelta(seconds=12))
            got.append(await anext(blocks))
        await blocks.aclose()  # type: ignore[attr-defined]
    assert [b.n_samples for b in got] == [360, 360, 180, 360, 360]
    assert [b.start_at for b in got] == [
        T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=2), T0 + timedelta(seconds=10),
        T0 + timedelta(seconds=11),
    ]  # fmt: skip
    expected = np.concatenate((samples[:, : 2 * 360 + 180], samples[:, 3 * 360 : 5 * 360]), axis=1)
    np.testing.assert_array_equal(np.concatenate([b.samples for b in got], axis=1), expected)
    assert source.connections == 2
    assert source.drops == 1
    assert source.partial_frames_dropped == 1
    assert monitor.connections == 2


async def test_a_stream_faster_than_its_rate_is_re_anchored_not_pushed_into_the_future() -> None:
    """Seconds of samples arriving every half second (a wrong rate, a monitor dumping its buffer) used to push the
    block clock ahead without bound (hostile tester): it stays within MAX_AHEAD_S of the receive clock."""
    samples = record("100", 12)
    data = frames(samples)
    second = 360 * 4
    now = [T0]
    async with Monitor().serving() as monitor:
        source = RawEcgStreamSource(("127.0.0.1", monitor.port), **MITBIH, clock=lambda: now[0])
        blocks = aiter(source)
        got: list[tuple[datetime, EcgBlock]] = []
        async with asyncio.timeout(20):
            for k in range(12):  # one second of samples every half second: twice real time
                now[0] = T0 + timedelta(seconds=1 + 0.5 * k)
                monitor.queue.put_nowait(data[k * second : (k + 1) * second])
                got.append((now[0], await anext(blocks)))
        await blocks.aclose()  # type: ignore[attr-defined]
    for arrival, block in got:
        end = block.start_at + timedelta(seconds=block.n_samples / block.fs_hz)
        assert (end - arrival).total_seconds() <= MAX_AHEAD_S
    assert source.rate_resyncs >= 1
    np.testing.assert_array_equal(np.concatenate([b.samples for _, b in got], axis=1), samples)  # nothing lost


async def test_an_unreachable_monitor_is_retried_without_raising() -> None:
    with socket_port() as port:  # a port nobody listens on
        source = RawEcgStreamSource(
            ("127.0.0.1", port), **MITBIH, reconnect_min_s=0.05, reconnect_max_s=0.05
        )  # fmt: skip
        with pytest.raises(TimeoutError):
            await collect(source, 1, timeout_s=0.5)
    assert source.open_failures >= 2
    assert source.connections == 0


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_stream_targets_and_bad_arguments(tmp_path: Path) -> None:
    assert parse_stream_target("10.0.0.5:5000") == ("10.0.0.5", 5000)
    assert parse_stream_target("tcp://monitor.local:5000") == ("monitor.local", 5000)
    assert parse_stream_target("/dev/ttyUSB1") == Path("/dev/ttyUSB1")
    with pytest.raises(ValueError):
        parse_stream_target("monitor")
    capture = tmp_path / "capture.bin"
    capture.write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="regular file"):
        RawEcgStreamSource(capture, **MITBIH)
    with pytest.raises(ValueError):
        RawEcgStreamSource(("127.0.0.1", 1), **{**MITBIH, "fs_hz": 0})
    with pytest.raises(ValueError):
        RawEcgStreamSource(("127.0.0.1", 1), **MITBIH, adc_min=10, adc_max=10)
