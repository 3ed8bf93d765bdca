"""GPS through a real gpsd: gpsd reads a real receiver log from a pseudo-terminal (as from a USB receiver), the
agent's source asks it for NMEA (``?WATCH``) over a real socket, skips gpsd's JSON reports and gets the same
positions as from the file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import service_missing

from ambulance_agent.devices.nmea_gps import NmeaGpsReader
from ambulance_agent.sources.nmea import NmeaGpsSource

pytestmark = pytest.mark.integration

LOG = Path(__file__).resolve().parent.parent / "data" / "nmea" / "myguide-3100.log"


def gpsd_binary() -> str:
    path = shutil.which("gpsd") or ("/usr/sbin/gpsd" if os.access("/usr/sbin/gpsd", os.X_OK) else None)
    if path is None:
        service_missing("gpsd (apt-get install -y gpsd)")
    assert path is not None
    return path


@contextlib.asynccontextmanager
async def gpsd_on_a_pty(tmp_path: Path) -> AsyncIterator[tuple[int, int]]:
    """A real gpsd reading a pseudo-terminal; yields (its TCP port, the pty master fd to write NMEA into)."""
    master, slave = os.openpty()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["-N", "-n", "-b", "-S", str(port), "-F", str(tmp_path / "gpsd.sock"), os.ttyname(slave)]
    proc = await asyncio.create_subprocess_exec(
        gpsd_binary(), *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(10):
            while True:
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                await asyncio.sleep(0.05)
        yield port, master
    finally:
        proc.terminate()
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        os.close(master)
        os.close(slave)


async def test_positions_through_a_real_gpsd_equal_the_files(tmp_path: Path) -> None:
    lines = LOG.read_bytes().splitlines(keepends=True)
    expected = {
        (round(f.lat_deg, 6), round(f.lon_deg, 6))
        for f in NmeaGpsReader(clock=None).read_lines(lines)
        if f.fix and f.lat_deg is not None and f.lon_deg is not None
    }
    assert expected
    async with gpsd_on_a_pty(tmp_path) as (port, master):
        source = NmeaGpsSource(gpsd=("127.0.0.1", port), hold_s=0.2, silence_s=5.0)

        async def feed() -> None:
            while True:  # the receiver: the log, a line at a time, looping
                for line in lines:
                    await asyncio.to_thread(os.write, master, line)
                    await asyncio.sleep(0.02)

        feeder = asyncio.create_task(feed())
        got: list[tuple[float, float]] = []
        try:
            async with asyncio.timeout(30), contextlib.aclosing(source.__aiter__()) as readings:
                async for reading in readings:
                    if reading.fix and reading.lat_deg is not None and reading.lon_deg is not None:
                        got.append((round(reading.lat_deg, 6), round(reading.lon_deg, 6)))
                        if len(got) >= 5:
                            break
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
    assert set(got) <= expected, "every position is one the receiver sent"
    assert source.reader.rejects.total == 0, "gpsd's JSON reports are not counted as bad NMEA"
