"""NMEA over a real loopback TCP stream (a receiver's TCP bridge or gpsd's raw feed), delivered in odd chunks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ambulance_agent.devices.nmea_gps import NmeaGpsReader, NmeaReason

DATA = Path(__file__).resolve().parent.parent / "data" / "nmea"
TIMEOUT_S = 10.0


async def serve_once(payload: bytes, chunk_bytes: int) -> tuple[asyncio.Server, int]:
    """A server that writes ``payload`` in ``chunk_bytes`` pieces to the first client, then closes."""

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(0, len(payload), chunk_bytes):
            writer.write(payload[i : i + chunk_bytes])
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096])
async def test_stream_gives_the_same_fixes_as_the_file(chunk_bytes: int) -> None:
    payload = (DATA / "myguide-3100.log").read_bytes()
    expected = list(NmeaGpsReader(clock=None).read_lines(payload.splitlines(keepends=True)))
    server, port = await serve_once(payload, chunk_bytes)
    reader = NmeaGpsReader(clock=None)
    async with server, asyncio.timeout(TIMEOUT_S):
        stream, writer = await asyncio.open_connection("127.0.0.1", port)
        got = [fix async for fix in reader.aread_stream(stream)]
        writer.close()
    assert got == expected
    assert len(got) == 26
    assert reader.rejects.total == 0


async def test_noise_and_overlong_lines_are_counted_and_skipped() -> None:
    good = b"$GPRMC,101530.00,A,4807.0380,N,01131.0000,E,0.0,0.0,141000,,,A*5E\r\n"
    payload = b"\x00" * 3000 + b"\n" + b"$" + b"A" * 300 + b"\r\n" + good + b"$GPRMC,1015"  # cut last line
    server, port = await serve_once(payload, 512)
    reader = NmeaGpsReader(clock=None)
    async with server, asyncio.timeout(TIMEOUT_S):
        stream, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024)
        got = [fix async for fix in reader.aread_stream(stream)]
        writer.close()
    assert [(f.sentence, f.fix) for f in got] == [("RMC", True)]
    assert reader.rejects.by_reason == {NmeaReason.TOO_LONG.value: 2, NmeaReason.NO_CHECKSUM.value: 1}
