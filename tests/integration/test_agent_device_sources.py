"""Device sources over real sockets and devices: HL7 monitor over MLLP, NMEA over TCP, a PTY and a FIFO; and the
agent wired to them publishing Vitals and GpsFix through the embedded broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from conftest import shared_data

from ambulance_agent.app import Agent
from ambulance_agent.devices.mllp import send_mllp
from ambulance_agent.devices.nmea_gps import NmeaGpsReader
from ambulance_agent.sources.base import GpsReading, VitalsReading
from ambulance_agent.sources.monitor import Hl7MonitorSource
from ambulance_agent.sources.nmea import EpochMerger, NmeaGpsSource
from broker_config import BrokerSettings, GpsFix, Stream, TopicSpace, Vitals, decode

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NMEA = ROOT / "tests" / "data" / "nmea"

PCD01 = "\r".join(
    [
        "MSH|^~\\&|MONITOR|AMB12|GOLDENHOUR|VEH|{t}+0000||ORU^R01^ORU_R01|{cid}|P|2.6",
        "OBR|1||VS1|69965^MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS^MDC|||{t}+0000",
        "OBX|1|NM|150021^MDC_PRESS_BLD_NONINV_SYS^MDC|1.1.1.5|92|266016^MDC_DIM_MMHG^MDC|||||F",
        "OBX|2|NM|150022^MDC_PRESS_BLD_NONINV_DIA^MDC|1.1.1.6|58|266016^MDC_DIM_MMHG^MDC|||||F",
        "OBX|3|NM|149530^MDC_PULS_OXIM_PULS_RATE^MDC|1.3.1.2|121|264864^MDC_DIM_BEAT_PER_MIN^MDC|||||F",
        "OBX|4|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1.3.1.1|88|262688^MDC_DIM_PERCENT^MDC|||||F",
        "OBX|5|NM|151708^MDC_AWAY_CO2_ET^MDC|1.4.1.1|31|266016^MDC_DIM_MMHG^MDC|||||F",
        "OBX|6|NM|8310-5^Body temperature^LN|1|38.4|Cel^Cel^UCUM|||||F",
    ]
)
ALARM = "\r".join(
    [
        "MSH|^~\\&|MONITOR|AMB12|GOLDENHOUR|VEH|20250314093015+0000||ORU^R40^ORU_R40|{cid}|P|2.6",
        "OBR|1|1^MONITOR|ALM7^MONITOR|196616^MDC_EVT_ALARM^MDC|||20250314093015+0000",
        "OBX|1|CWE|196616^MDC_EVT_ALARM^MDC|1.0.0.0.1|196648^MDC_EVT_LO^MDC^^^^^^SpO2 low|||||F",
        "OBX|2|ST|68481^MDC_ATTR_EVENT_PHASE^MDC|1.0.0.0.2|{phase}||||||F",
        "OBX|3|ST|68484^MDC_ATTR_ALARM_PRIORITY^MDC|1.0.0.0.3|PH||||||F",
    ]
)


async def take(source: Any, n: int, timeout_s: float = 10) -> list[Any]:
    out: list[Any] = []
    async with asyncio.timeout(timeout_s):
        async for item in source:
            out.append(item)
            if len(out) >= n:
                break
    return out


class NmeaFeed:
    """A TCP NMEA feed: sends ``lines`` to each client, ``per_connection`` lines per connection, then closes."""

    def __init__(self, lines: list[bytes], per_connection: int | None = None, gap_s: float = 0.0) -> None:
        self.lines = lines
        self.per_connection = per_connection
        self.gap_s = gap_s
        self.connections = 0
        self._pos = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        sent = 0
        try:
            while self._pos < len(self.lines) and (self.per_connection is None or sent < self.per_connection):
                writer.write(self.lines[self._pos])
                self._pos += 1
                sent += 1
                await writer.drain()
                if self.gap_s:
                    await asyncio.sleep(self.gap_s)  # a receiver's pace between sentences
            if self.per_connection is None:
                await reader.read()  # keep the connection open and silent
        except ConnectionError:
            pass  # the source went away
        finally:
            self.writers.discard(writer)
            writer.close()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()


def log_lines(name: str) -> list[bytes]:
    return [line + b"\n" for line in (NMEA / name).read_bytes().splitlines() if line.startswith(b"$")]


async def test_hl7_monitor_source_maps_codes_and_counts_alarms() -> None:
    source = Hl7MonitorSource("127.0.0.1", 0)
    await source.start()
    try:
        first = await send_mllp("127.0.0.1", source.port, PCD01.format(t="20250314093000", cid="M1"), 5)
        assert first.code.value == "AA"
        again = await send_mllp("127.0.0.1", source.port, PCD01.format(t="20250314093000", cid="M1"), 5)
        assert again.code.value == "AA"  # a resend after a lost ACK: acknowledged, not a second reading
        await send_mllp("127.0.0.1", source.port, ALARM.format(cid="A1", phase="start"), 5)
        await send_mllp("127.0.0.1", source.port, PCD01.format(t="20250314093100", cid="M2"), 5)
        readings: list[VitalsReading] = await take(source, 2)
        assert [r.measured_at.minute for r in readings] == [30, 31]
        r = readings[0]
        assert (r.sbp_mmhg, r.dbp_mmhg, r.spo2_pct, r.etco2_mmhg, r.temp_c) == (92, 58, 88, 31, 38.4)
        assert (r.heart_rate_bpm, r.heart_rate_source) == (121, "oximeter")
        summary = source.alarms.summary()
        assert (summary.alarms, summary.by_priority) == (1, {"high": 1})
        assert [a.text for a in summary.active] == ["SpO2 low"]
        await send_mllp("127.0.0.1", source.port, ALARM.format(cid="A2", phase="end"), 5)
        assert source.alarms.summary().active == ()
        assert source.input.duplicates == 1
    finally:
        await source.close()


async def test_hl7_monitor_source_reads_the_ihe_philips_example() -> None:
    path = shared_data("hl7/ihe_pcd01_philips_monitor_numerics.hl7")
    source = Hl7MonitorSource("127.0.0.1", 0)
    await source.start()
    try:
        await send_mllp("127.0.0.1", source.port, path.read_bytes(), 5)
        readings: list[VitalsReading] = await take(source, 1)
    finally:
        await source.close()
    values = {(r.sbp_mmhg, r.dbp_mmhg, r.map_mmhg) for r in readings} | {(r.resp_rate_per_min,) for r in readings}
    assert (117, 82, 90) in values


async def test_nmea_tcp_feed_one_reading_per_epoch_with_no_fix_first_and_reconnects() -> None:
    lines = log_lines("myguide-3100.log")
    feed = NmeaFeed(lines, per_connection=len(lines) // 2)
    async with feed as port:
        source = NmeaGpsSource(tcp=("127.0.0.1", port), hold_s=0.2, silence_s=3.0, reconnect_min_s=0.05)
        readings: list[GpsReading] = await take(source, 12, timeout_s=20)
    assert feed.connections >= 2, "the source reconnected after the feed closed"
    assert not readings[0].fix, "the log starts without a fix"
    assert readings[0].lat_deg is None
    fixed = [r for r in readings if r.fix]
    assert fixed, "then a stationary fix"
    assert all(r.lat_deg is not None and r.lat_deg != 0 for r in fixed)
    assert all(r.clock_suspect for r in readings), "a 2011 log received today: the receiver clock is suspect"


async def test_nmea_silence_is_reported_as_no_fix() -> None:
    feed = NmeaFeed([])
    async with feed as port:
        source = NmeaGpsSource(tcp=("127.0.0.1", port), hold_s=0.05, silence_s=0.3)
        readings: list[GpsReading] = await take(source, 2, timeout_s=10)
    assert all(not r.fix and r.lat_deg is None for r in readings)
    assert source.silence_reports >= 2


async def wait_open(source: NmeaGpsSource) -> None:
    """pyserial discards what a port buffered before it opened it: a receiver streams on, a test must wait."""
    async with asyncio.timeout(10):
        while not source.connected:  # noqa: ASYNC110 - the source has no event for it; bounded by the deadline
            await asyncio.sleep(0.01)


async def test_nmea_from_a_serial_pty_and_a_fifo(tmp_path: Path) -> None:
    lines = log_lines("bu353s4.log")[:12]
    master, slave = os.openpty()
    try:
        source = NmeaGpsSource(device=Path(os.ttyname(slave)), baud=9600, hold_s=0.2)
        reader = asyncio.create_task(take(source, 3))
        await wait_open(source)
        for line in lines:
            os.write(master, line.replace(b"\n", b"\r\n"))
        readings: list[GpsReading] = await reader
    finally:
        os.close(master)
        os.close(slave)
    assert all(r.fix for r in readings)
    assert readings[0].lat_deg == pytest.approx(-(37 + 47.0873 / 60))
    assert readings[0].hdop == 1.1

    fifo = tmp_path / "gps.fifo"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a writer that is there before the reader
    try:
        os.write(writer, b"".join(lines))
        fifo_readings: list[GpsReading] = await take(NmeaGpsSource(device=fifo, hold_s=0.2), 3)
    finally:
        os.close(writer)
    assert [r.fix for r in fifo_readings] == [True, True, True]


def offline_epochs(data: bytes) -> list[GpsReading]:
    """The epochs of a log through the same reader and merger without any I/O (the reference)."""
    reader = NmeaGpsReader(clock=None)  # old logs: no receive-clock check, on either side
    merger = EpochMerger(hold_s=3600, monotonic=lambda: 0.0)
    out = [e for line in data.splitlines(keepends=True) if (f := reader.feed(line)) and (e := merger.add(f))]
    last = merger.flush()
    return out + ([last] if last else [])


@pytest.mark.parametrize("log", ["gps/nmea/bu353s4.log", "gps/nmea/mt3339.log"])
async def test_a_real_receiver_log_through_a_serial_pty_loses_nothing(log: str) -> None:
    """A whole real receiver log written into a pseudo-terminal at 9600 baud and read by pyserial-asyncio-fast:
    every epoch arrives with the positions the log holds."""
    data = b"".join(ln + b"\r\n" for ln in shared_data(log).read_bytes().splitlines() if ln.startswith(b"$"))
    expected = offline_epochs(data)
    assert len(expected) >= 10
    master, slave = os.openpty()
    try:
        source = NmeaGpsSource(
            device=Path(os.ttyname(slave)), baud=9600, hold_s=2.0, silence_s=30.0, reader=NmeaGpsReader(clock=None)
        )
        reader = asyncio.create_task(take(source, len(expected) - 1, timeout_s=60))
        await wait_open(source)
        await asyncio.to_thread(os.write, master, data)  # blocks while the PTY buffer is full: off the loop
        readings: list[GpsReading] = await reader
    finally:
        os.close(master)
        os.close(slave)
    # the last epoch stays open until the next sentence or hold_s; every earlier one arrived, equal to the reference
    key = [(r.fix, r.lat_deg, r.lon_deg, r.device_time, r.hdop) for r in readings]
    assert key == [(r.fix, r.lat_deg, r.lon_deg, r.device_time, r.hdop) for r in expected[: len(readings)]]
    assert any(r.fix for r in readings)


@contextlib.asynccontextmanager
async def collector(
    broker: BrokerSettings, space: TopicSpace, unit: str
) -> AsyncIterator[tuple[list[Any], Callable[[Callable[[], bool]], Any]]]:
    got: list[Any] = []
    changed = asyncio.Event()
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"c-{uuid.uuid4().hex[:8]}") as client:
        await client.subscribe([(space.filter(s, unit), 1) for s in (Stream.VITALS, Stream.GPS)])

        async def pump() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                got.append(decode(space, message.topic.value, message.payload)[1])
                changed.set()

        async def wait(predicate: Callable[[], bool]) -> None:
            async with asyncio.timeout(15):
                while not predicate():
                    changed.clear()
                    await changed.wait()

        task = asyncio.create_task(pump())
        try:
            yield got, wait
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_agent_with_monitor_and_gps_devices_publishes_vitals_and_fixes(
    embedded_broker: BrokerSettings, topic_space: TopicSpace, tmp_path: Path
) -> None:
    unit = f"amb-{uuid.uuid4().hex[:8]}"
    monitor = Hl7MonitorSource("127.0.0.1", 0)
    await monitor.start()
    feed = NmeaFeed(log_lines("myguide-3100.log"), gap_s=0.01)
    async with feed as port, collector(embedded_broker, topic_space, unit) as (got, wait):
        gps = NmeaGpsSource(tcp=("127.0.0.1", port), hold_s=0.2)
        agent = Agent(
            unit, embedded_broker, topic_space, outbox_path=tmp_path / "o.db", ecg=None, vitals=monitor, gps=gps
        )
        task = asyncio.create_task(agent.run())
        try:
            await agent.link.wait_connected(10)
            await send_mllp("127.0.0.1", monitor.port, PCD01.format(t="20250314093000", cid="M1"), 5)
            await wait(lambda: any(isinstance(m, Vitals) for m in got))
            await wait(lambda: any(isinstance(m, GpsFix) and m.fix for m in got))
        finally:
            agent.stop()
            async with asyncio.timeout(10):
                await task
            agent.close()
    vitals = next(m for m in got if isinstance(m, Vitals))
    assert (vitals.sbp_mmhg, vitals.spo2_pct, vitals.etco2_mmhg, vitals.temp_c) == (92, 88, 31, 38.4)
    assert (vitals.heart_rate_bpm, vitals.heart_rate_source) == (121, "oximeter")
    fixes = [m for m in got if isinstance(m, GpsFix)]
    assert not fixes[0].fix, "no fix first, published as such"
    assert fixes[0].lat_deg is None
    assert all(f.lat_deg != 0 for f in fixes if f.fix), "never Null Island"
    assert all(f.clock_suspect for f in fixes)
