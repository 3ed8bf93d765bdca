"""MLLP over real loopback sockets: listener + HL7 input + resending client (FF-08, FF-09, dedup by MSH-10).

These cross a real TCP socket but need no external service (no Mosquitto, no PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from conftest import shared_data

from ambulance_agent.devices.hl7_message import AckCode, Hl7InputError, read_ack
from ambulance_agent.devices.hl7_monitor import DeviceReport, Hl7MonitorInput, MonitorReport
from ambulance_agent.devices.mllp import (
    MllpDecoder,
    MllpListener,
    MllpNackError,
    MllpReason,
    MllpTimeoutError,
    frame,
    send_mllp,
)

MESSAGE = (
    "MSH|^~\\&|MONITOR|AMB12|EDBOARD|CITYHOSP|20250314093015||ORU^R01^ORU_R01|MSG00042|P|2.5\r\n"
    "PID|1||TEST0001^^^CITYHOSP^MR||TESTPATIENT^ALEX||19700101|U\r\n"
    "OBR|1||VS0042|85353-1^Vital signs panel^LN|||20250314093000\r\n"
    "OBX|1|NM|8867-4^Heart rate^LN||118|/min^/min^UCUM|||||F\r\n"
)
FF08_ACK = b"MSH|^~\\&|EDBOARD|CITYHOSP|MONITOR|AMB12|20250314093016||ACK^R01^ACK|ACK00042|P|2.6\rMSA|AA|MSG00042\r"
TIMEOUT_S = 5.0


@contextlib.asynccontextmanager
async def fake_peer(
    respond: Callable[[bytes, asyncio.StreamWriter, int], Awaitable[None]],
) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A raw TCP server on a free loopback port: deframes what it receives and lets ``respond`` answer."""
    received: list[bytes] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = MllpDecoder()
        try:
            while data := await reader.read(4096):
                for payload in decoder.feed(data):
                    received.append(payload)
                    await respond(payload, writer, len(received))
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        await server.wait_closed()


async def ignore(payload: bytes, writer: asyncio.StreamWriter, n: int) -> None:
    """A peer that never answers."""
    return None


@pytest.fixture
def reports() -> list[DeviceReport]:
    return []


@pytest.fixture
async def listener(reports: list[DeviceReport]) -> AsyncIterator[MllpListener]:
    async with MllpListener("127.0.0.1", 0, Hl7MonitorInput(reports.append), frame_timeout_s=2.0) as server:
        yield server


async def test_round_trip_over_loopback(listener: MllpListener, reports: list[DeviceReport]) -> None:
    ack = await send_mllp("127.0.0.1", listener.port, MESSAGE, TIMEOUT_S)
    assert (ack.code, ack.control_id, ack.attempts) == (AckCode.AA, "MSG00042", 1)
    info = read_ack(ack.ack_payload)
    assert info.acked_control_id == "MSG00042"
    (report,) = reports
    assert isinstance(report, MonitorReport)
    assert report.groups[0].heart_rate_bpm == 118.0
    assert listener.frames_received == 1


async def test_round_trip_of_the_philips_example(listener: MllpListener, reports: list[DeviceReport]) -> None:
    raw = await asyncio.to_thread(Path(shared_data("hl7/ihe_pcd01_philips_monitor_numerics.hl7")).read_bytes)
    ack = await send_mllp("127.0.0.1", listener.port, raw, TIMEOUT_S)
    assert ack.control_id == "HP0122182658686QQ000CND119C0WS61"
    (report,) = reports
    assert isinstance(report, MonitorReport)
    nibp, numerics = report.groups
    assert (nibp.sbp_mmhg, nibp.dbp_mmhg, numerics.heart_rate_bpm, numerics.spo2_pct) == (117.0, 82.0, 80.0, 99.0)


@pytest.mark.parametrize(
    "pieces",
    [
        [b"\x0b", FF08_ACK, b"\x1c\r"],
        [b"\x0b", FF08_ACK, b"\x1c", b"\r"],
        [b"stale bytes\x0b", FF08_ACK[:40], FF08_ACK[40:] + b"\x1c", b"\r"],
    ],
    ids=["three-writes", "split-fs-cr", "garbage-and-mid-body-split"],
)
async def test_ff08_client_accumulates_an_ack_sent_in_pieces(pieces: list[bytes]) -> None:
    async def respond(payload: bytes, writer: asyncio.StreamWriter, n: int) -> None:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            # The peer of FF-08 pauses between writes so they reach the client as separate segments; this delay is
            # part of the simulated peer, the test itself waits only on the client's result.
            await asyncio.sleep(0.05)

    async with fake_peer(respond) as (port, received):
        ack = await send_mllp("127.0.0.1", port, MESSAGE, TIMEOUT_S)
    assert (ack.code, ack.control_id, ack.attempts) == (AckCode.AA, "MSG00042", 1)
    assert ack.ack_payload == FF08_ACK
    assert len(received) == 1


async def test_client_skips_an_ack_for_another_message() -> None:
    async def respond(payload: bytes, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(frame(FF08_ACK.replace(b"MSA|AA|MSG00042", b"MSA|AA|MSG00041")) + frame(FF08_ACK))
        await writer.drain()

    async with fake_peer(respond) as (port, _):
        ack = await send_mllp("127.0.0.1", port, MESSAGE, TIMEOUT_S)
    assert ack.ack_payload == FF08_ACK


async def test_lost_ack_is_resent_with_the_same_control_id_and_deduplicated(reports: list[DeviceReport]) -> None:
    hl7_input = Hl7MonitorInput(reports.append)
    calls: list[bytes] = []

    async def lossy(payload: bytes) -> bytes | None:
        calls.append(payload)
        ack = await hl7_input(payload)
        return None if len(calls) == 1 else ack  # the first ACK is lost on the way back

    async with MllpListener("127.0.0.1", 0, lossy) as server:
        ack = await send_mllp("127.0.0.1", server.port, MESSAGE, 0.5, attempts=3)
    assert (ack.code, ack.attempts) == (AckCode.AA, 2)
    assert calls[0] == calls[1]  # the very same bytes, so the same MSH-10
    assert len(reports) == 1  # processed once
    assert hl7_input.duplicates == 1


async def test_no_ack_at_all_raises_after_every_attempt() -> None:
    async with fake_peer(ignore) as (port, received):
        with pytest.raises(MllpTimeoutError) as info:
            await send_mllp("127.0.0.1", port, MESSAGE, 0.2, attempts=2)
    assert info.value.control_id == "MSG00042"
    assert info.value.attempts == 2
    assert len(received) == 2
    assert received[0] == received[1]


async def test_connection_refused_counts_as_a_failed_attempt() -> None:
    async with fake_peer(ignore) as (port, _):
        pass  # the port is free again now
    with pytest.raises(MllpTimeoutError):
        await send_mllp("127.0.0.1", port, MESSAGE, 0.5, attempts=2)


async def test_nack_is_raised_not_resent(listener: MllpListener, reports: list[DeviceReport]) -> None:
    no_obx = MESSAGE.rsplit("OBX", 1)[0]
    with pytest.raises(MllpNackError) as info:
        await send_mllp("127.0.0.1", listener.port, no_obx, TIMEOUT_S)
    assert (info.value.code, info.value.control_id) == (AckCode.AE, "MSG00042")
    assert listener.frames_received == 1
    assert reports == []


async def test_client_refuses_to_send_a_message_without_control_id() -> None:
    with pytest.raises(Hl7InputError):
        await send_mllp("127.0.0.1", 9, MESSAGE.replace("MSG00042", ""), TIMEOUT_S)


async def test_listener_answers_two_frames_sent_in_one_write(listener: MllpListener) -> None:
    second = MESSAGE.replace("MSG00042", "MSG00043").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(frame(MESSAGE.encode()) + frame(second))
    await writer.drain()
    decoder = MllpDecoder()
    acks: list[bytes] = []
    async with asyncio.timeout(TIMEOUT_S):
        while len(acks) < 2:
            acks += decoder.feed(await reader.read(4096))
    writer.close()
    assert [read_ack(a).acked_control_id for a in acks] == ["MSG00042", "MSG00043"]


async def test_listener_survives_a_failing_handler_and_garbage() -> None:
    seen: list[bytes] = []

    async def handler(payload: bytes) -> bytes | None:
        seen.append(payload)
        if len(seen) == 1:
            raise RuntimeError("boom")
        return b"MSH|^~\\&|A|B|C|D|2025||ACK|K1|P|2.6\rMSA|AA|MSG00042\r"

    async with MllpListener("127.0.0.1", 0, handler) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"junk\x00\xff" + frame(b"first") + b"more junk" + frame(b"second"))
        await writer.drain()
        decoder = MllpDecoder()
        async with asyncio.timeout(TIMEOUT_S):
            acks: list[bytes] = []
            while not acks:
                acks += decoder.feed(await reader.read(4096))
        writer.close()
        assert server.rejects.count(MllpReason.HANDLER_FAILED) == 1
    assert seen == [b"first", b"second"]


async def test_a_stalled_half_frame_is_cut_off_after_the_frame_timeout() -> None:
    async def handler(payload: bytes) -> bytes | None:
        return None

    async with MllpListener("127.0.0.1", 0, handler, frame_timeout_s=0.2) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"\x0bMSH|^~\\&|half a message")
        await writer.drain()
        async with asyncio.timeout(TIMEOUT_S):
            assert await reader.read() == b""  # the listener closed the connection
        writer.close()
        assert server.rejects.count(MllpReason.FRAME_TIMEOUT) == 1


async def test_an_oversized_frame_is_dropped_and_the_connection_goes_on(reports: list[DeviceReport]) -> None:
    async with MllpListener("127.0.0.1", 0, Hl7MonitorInput(reports.append), max_frame_bytes=1024) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(frame(b"x" * 5000) + frame(MESSAGE.encode()))
        await writer.drain()
        decoder = MllpDecoder()
        async with asyncio.timeout(TIMEOUT_S):
            acks: list[bytes] = []
            while not acks:
                acks += decoder.feed(await reader.read(4096))
        writer.close()
        assert server.rejects.count(MllpReason.FRAME_TOO_LARGE) == 1
    assert read_ack(acks[0]).code is AckCode.AA
    assert len(reports) == 1


async def test_close_ends_open_connections() -> None:
    async def handler(payload: bytes) -> bytes | None:
        return None

    server = MllpListener("127.0.0.1", 0, handler)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"\x0bpartial")
    await writer.drain()
    async with asyncio.timeout(TIMEOUT_S):
        await server.close()
        # End of stream, or a reset when the listener closed before reading what was sent: either way, closed.
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""
    writer.close()
