"""A patient monitor as an agent source: HL7 v2 over MLLP in (IHE PCD-01 numerics, PCD-04 alarms), vitals out.

The monitor (or its gateway) connects to :class:`~ambulance_agent.devices.mllp.MllpListener` on the vehicle's
loopback or in-vehicle network; every frame passes :class:`~ambulance_agent.devices.hl7_monitor.Hl7MonitorInput`
(parse, map LOINC / IEEE 11073 MDC codes and units to the contract's fields, de-duplicate by MSH-10, ACK).  Each
:class:`~ambulance_agent.devices.hl7_monitor.VitalsGroup` (one observation time) becomes one
:class:`~ambulance_agent.sources.base.VitalsReading`; PCD-04 alarms are counted and kept as the monitor's current
alarm list (:class:`MonitorAlarms`) for the crew screen.  The contract has no unit-to-hospital device-alarm stream,
so alarms stay on the vehicle (a remote display is not the primary alarm system anyway, DOMAIN.md section 8).

The HL7 sink must not block (it runs inside the MLLP connection task): readings go into a bounded queue; when the
agent does not keep up the oldest reading is dropped and counted (newest vitals matter most).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime

from ambulance_agent.devices.hl7_monitor import (
    AlarmReport,
    DeviceAlarm,
    DeviceReport,
    Hl7MonitorInput,
    MonitorReport,
    VitalsGroup,
)
from ambulance_agent.devices.mllp import MllpListener
from ambulance_agent.sources.base import VitalsReading
from broker_config import Priority, utc_now
from broker_config.topics import loggable

__all__ = ["ActiveAlarm", "AlarmSummary", "Hl7MonitorSource", "MonitorAlarms", "reading_from_group"]

logger = logging.getLogger(__name__)

_IDLE_S = 1.0
_ENDED_PHASES = frozenset({"end", "stop", "cancel", "reset"})


def reading_from_group(group: VitalsGroup) -> VitalsReading:
    """One monitor observation set as a :class:`VitalsReading` (units already the contract's; None = absent)."""
    return VitalsReading(
        measured_at=group.measured.at,
        heart_rate_bpm=group.heart_rate_bpm,
        heart_rate_source=group.heart_rate_source,
        spo2_pct=group.spo2_pct,
        sbp_mmhg=group.sbp_mmhg,
        dbp_mmhg=group.dbp_mmhg,
        map_mmhg=group.map_mmhg,
        resp_rate_per_min=group.resp_rate_per_min,
        etco2_mmhg=group.etco2_mmhg,
        temp_c=group.temp_c,
    )


@dataclass(frozen=True, slots=True)
class ActiveAlarm:
    """A device alarm the monitor reported and has not yet ended.

    ``text`` is the device's own alarm text: it may carry patient values, so it is shown on the crew screen (as
    text) but never logged.
    """

    alert_id: str
    event_code: int
    event_ref: str
    priority: Priority | None
    alert_type: str | None
    phase: str | None
    since: datetime
    text: str


@dataclass(frozen=True, slots=True)
class AlarmSummary:
    """PCD-04 alarm counts since start and the alarms active now (newest first)."""

    reports: int
    alarms: int
    by_priority: dict[str, int]
    active: tuple[ActiveAlarm, ...]


class MonitorAlarms:
    """Counts PCD-04 alarms and keeps the set of active ones (keyed by OBR-3, which links start and end).

    Args:
        capacity: at most this many active alarms are kept (the oldest is forgotten first).
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self.reports = 0
        self.alarms = 0
        self.by_priority: Counter[str] = Counter()
        self._active: OrderedDict[str, ActiveAlarm] = OrderedDict()

    def update(self, report: AlarmReport) -> None:
        """Apply one ORU^R40 report."""
        self.reports += 1
        for alarm in report.alarms:
            self._apply(alarm)

    def _apply(self, alarm: DeviceAlarm) -> None:
        key = alarm.alert_id or f"{alarm.event_code}"
        ended = (alarm.phase in _ENDED_PHASES) or alarm.state == "inactive"
        if ended:
            self._active.pop(key, None)
            return
        if key not in self._active:
            self.alarms += 1
            self.by_priority[alarm.priority.value if alarm.priority else "none"] += 1
            # which alarm (its event code) says something about the patient: only the priority and kind are logged
            logger.info(
                "monitor alarm started priority=%s type=%s", loggable(str(alarm.priority_code), 16),
                loggable(str(alarm.alert_type), 64),
            )  # fmt: skip
        previous = self._active.pop(key, None)
        self._active[key] = ActiveAlarm(
            alert_id=key,
            event_code=alarm.event_code,
            event_ref=alarm.event_ref,
            priority=alarm.priority,
            alert_type=alarm.alert_type,
            phase=alarm.phase,
            since=previous.since if previous else alarm.time.at,
            text=alarm.text[:200],
        )
        while len(self._active) > self.capacity:
            self._active.popitem(last=False)

    def summary(self) -> AlarmSummary:
        """Counts and the active alarms, newest first."""
        return AlarmSummary(
            reports=self.reports,
            alarms=self.alarms,
            by_priority=dict(self.by_priority),
            active=tuple(reversed(self._active.values())),
        )


class Hl7MonitorSource:
    """Vital signs from a patient monitor speaking HL7 v2 over MLLP (see the module docstring).

    ``async for reading in source`` starts the listener (if :meth:`start` was not called) and yields readings as
    monitors send them; the owner closes the listener with :meth:`close`.

    Args:
        host: address to listen on (the vehicle's loopback or in-vehicle LAN address).
        port: TCP port (0 = a free one; read :attr:`port` after :meth:`start`).
        queue_max: readings buffered for the agent; beyond it the oldest is dropped and counted.
        alarm_capacity: active alarms remembered.
        clock: aware-UTC receive clock (readings without an observation time use it, flagged by the input).
        frame_timeout_s, idle_timeout_s: MLLP deadlines (see :class:`MllpListener`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 2575,
        *,
        queue_max: int = 256,
        alarm_capacity: int = 64,
        clock: Callable[[], datetime] = utc_now,
        frame_timeout_s: float = 30.0,
        idle_timeout_s: float | None = None,
    ) -> None:
        if queue_max < 1:
            raise ValueError("queue_max must be >= 1")
        self.input = Hl7MonitorInput(self._sink, clock=clock)
        self.listener = MllpListener(
            host, port, self.input, frame_timeout_s=frame_timeout_s, idle_timeout_s=idle_timeout_s
        )
        self.alarms = MonitorAlarms(alarm_capacity)
        self.readings = 0
        self.dropped = 0
        self._queue: asyncio.Queue[VitalsReading] = asyncio.Queue(maxsize=queue_max)
        self._started = False

    @property
    def port(self) -> int:
        """The bound port."""
        return self.listener.port

    async def start(self) -> None:
        """Bind the MLLP listener now (so the port is known before iterating)."""
        if not self._started:
            await self.listener.start()
            self._started = True

    async def close(self) -> None:
        """Close the listener and its connections."""
        if self._started:
            await self.listener.close()
            self._started = False

    def _sink(self, report: DeviceReport) -> None:
        # Called from the MLLP connection task: never blocks, never raises.
        if isinstance(report, AlarmReport):
            self.alarms.update(report)
            return
        if not isinstance(report, MonitorReport):
            return
        for group in report.groups:
            reading = reading_from_group(group)
            if self._queue.full():
                self._queue.get_nowait()
                self.dropped += 1
                logger.warning(
                    "monitor readings piling up: oldest dropped (control id %s)", loggable(report.control_id, 64)
                )
            self._queue.put_nowait(reading)
            self.readings += 1

    def __aiter__(self) -> AsyncIterator[VitalsReading]:
        return self._readings()

    async def _readings(self) -> AsyncIterator[VitalsReading]:
        await self.start()
        while True:
            try:
                async with asyncio.timeout(_IDLE_S):
                    reading = await self._queue.get()
            except TimeoutError:
                continue  # every wait bounded (FF-03); a silent monitor is not an error
            yield reading
