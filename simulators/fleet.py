"""Simulated ambulances: a real agent (``ambulance_agent.Agent``) fed by real recordings, driving real roads.

Each simulated unit is a composite patient: ECG from a real MIT-BIH record, other vital signs from the real MIMIC-II
numerics trend, GPS along a road route computed on the OpenStreetMap extract.  A :class:`CaseScript` plays the crew:
patient contact, pre-alert, transport to the destination dispatch chose, arrival, hand-over, back in service.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ambulance_agent.app import Agent
from ambulance_agent.crypto import UnitCipher, development_unit_key
from ambulance_agent.sources.base import GpsReading
from ambulance_agent.sources.ecg import WfdbEcgReplay
from ambulance_agent.sources.gps import RouteGpsReplay
from ambulance_agent.sources.vitals import NumericsVitalsReplay
from broker_config import BrokerSettings, CaseType, CrewStatus, Findings, Notice, NoticeKind, TopicSpace, utc_now
from dispatch.routing import RoadRouter

__all__ = ["DATA_DIR", "CaseScript", "DrivingGps", "SimulatedUnit", "UnitPlan", "build_unit"]

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
NUMERICS = DATA_DIR / "mimic2wdb_numerics" / "s25047-2704-05-04-10-44n"


class DrivingGps:
    """A GPS source whose route can be changed while it runs (the crew drives where dispatch sends it).

    Positions come from :class:`RouteGpsReplay` legs; ``drive(points_deg, speed_mps)`` starts a new leg from the
    current position.  ``arrived`` is set when the current leg's last point is reached.
    """

    def __init__(self, start_deg: tuple[float, float], *, pace: float = 1.0, interval_s: float = 1.0) -> None:
        self.pace = pace
        self.interval_s = interval_s
        self.position_deg = start_deg
        self._leg = RouteGpsReplay([start_deg], speed_mps=0.0, interval_s=interval_s, pace=pace)
        self._changed = asyncio.Event()
        self.arrived = asyncio.Event()

    def drive(self, points_deg: Sequence[tuple[float, float]], speed_mps: float) -> None:
        """Start driving along ``points_deg`` (lat, lon) at ``speed_mps``."""
        self._leg = RouteGpsReplay(points_deg, speed_mps=speed_mps, interval_s=self.interval_s, pace=self.pace)
        self.arrived.clear()
        self._changed.set()

    def __aiter__(self) -> AsyncIterator[GpsReading]:
        return self._fixes()

    async def _fixes(self) -> AsyncIterator[GpsReading]:
        while True:
            self._changed.clear()
            leg = self._leg
            async for reading in leg:
                if reading.lat_deg is not None and reading.lon_deg is not None:
                    self.position_deg = (reading.lat_deg, reading.lon_deg)
                if self.position_deg == leg.points_deg[-1] and len(leg.points_deg) > 1:
                    self.arrived.set()
                yield reading
                if self._changed.is_set():
                    break


@dataclass(frozen=True, slots=True)
class UnitPlan:
    """Who a simulated unit is and what its cases look like."""

    unit_id: str
    record: str
    """MIT-BIH record name shipped in simulators/data/mitdb."""
    scenes_deg: tuple[tuple[float, float], ...]
    case_type: CaseType
    findings: Findings
    requested_hospital_id: str | None = None
    ecg_start_s: float = 0.0
    numerics_start_min: int = 0
    contact_to_prealert_s: float = 3.0


@dataclass(slots=True)
class SimulatedUnit:
    """A running simulated unit: its agent, its GPS and the notices it got."""

    plan: UnitPlan
    agent: Agent
    gps: DrivingGps
    destination: asyncio.Queue[Notice] = field(default_factory=lambda: asyncio.Queue(maxsize=16))


def build_unit(
    plan: UnitPlan,
    broker: BrokerSettings,
    space: TopicSpace,
    *,
    state_dir: Path,
    pace: float = 1.0,
    client_suffix: str = "",
) -> SimulatedUnit:
    """Assemble the agent and its sources for one simulated unit (MQTT client id ``agent-{unit}{suffix}``)."""
    gps = DrivingGps(plan.scenes_deg[0], pace=pace)
    holder: list[SimulatedUnit] = []

    def on_notice(notice: Notice) -> None:
        if notice.kind is NoticeKind.DESTINATION and holder:
            try:
                holder[0].destination.put_nowait(notice)
            except asyncio.QueueFull:
                logger.warning("destination notices piling up unit=%s", plan.unit_id)

    agent = Agent(
        plan.unit_id,
        broker,
        space,
        outbox_path=state_dir / f"{plan.unit_id}.outbox.sqlite3",
        ecg=WfdbEcgReplay(DATA_DIR / "mitdb" / plan.record, start_s=plan.ecg_start_s, pace=pace),
        vitals=NumericsVitalsReplay(NUMERICS, start_min=plan.numerics_start_min, pace=pace),
        gps=gps,
        on_notice=on_notice,
        client_id=f"agent-{plan.unit_id}{client_suffix}",
        # the outbox is sealed as on a real vehicle; the simulated unit's key lives beside it (development only)
        cipher=UnitCipher(plan.unit_id, development_unit_key(state_dir / f"{plan.unit_id}.key")),
    )
    unit = SimulatedUnit(plan, agent, gps)
    holder.append(unit)
    return unit


class CaseScript:
    """Plays the crew of one unit, case after case, at ``pace`` times real time.

    Per case: patient contact (FMC) at the scene, a pre-alert after ``contact_to_prealert_s``, transport along the
    road route to the destination that dispatch names, arrival, hand-over after ``handover_s``, back in service, and
    the next scene after ``turnaround_s``.
    """

    def __init__(
        self,
        unit: SimulatedUnit,
        router: RoadRouter,
        hospital_positions: Mapping[str, tuple[float, float]],
        *,
        pace: float = 1.0,
        speed_mps: float = 12.0,
        handover_s: float = 90.0,
        turnaround_s: float = 30.0,
        notice_timeout_s: float = 60.0,
    ) -> None:
        self.unit = unit
        self.router = router
        self.hospital_positions = hospital_positions
        self.pace = pace if pace > 0 else 1000.0
        self.speed_mps = speed_mps
        self.handover_s = handover_s
        self.turnaround_s = turnaround_s
        self.notice_timeout_s = notice_timeout_s
        self.cases_started = 0
        self.alert_ids: list[str] = []

    async def _wait(self, seconds: float) -> None:
        await asyncio.sleep(seconds / self.pace)

    async def run(self) -> None:
        """Play cases until cancelled."""
        plan, agent = self.unit.plan, self.unit.agent
        for scene in itertools.cycle(plan.scenes_deg):
            self.cases_started += 1
            if self.unit.gps.position_deg != scene:
                route = await asyncio.to_thread(self.router.route, self.unit.gps.position_deg, scene)
                self.unit.gps.drive(route.points_deg, self.speed_mps)
                await agent.set_status(CrewStatus.EN_ROUTE)
                await self._arrive()
            await agent.set_status(CrewStatus.ON_SCENE)
            await agent.set_status(CrewStatus.PATIENT_CONTACT)
            fmc_at = utc_now()
            await self._wait(plan.contact_to_prealert_s)
            findings = plan.findings.model_copy(update={"fmc_at": fmc_at})
            alert_id = await agent.prealert(plan.case_type, findings)
            self.alert_ids.append(alert_id)
            notice = await self._destination_for(alert_id)
            if notice is None or notice.hospital_id is None:
                logger.warning("no destination from dispatch unit=%s alert=%s", plan.unit_id, alert_id)
                await self._wait(self.turnaround_s)
                continue
            target = self.router.node_deg(self.router.snap(self._hospital_position(notice))[0])
            route = await asyncio.to_thread(self.router.route, self.unit.gps.position_deg, target)
            await agent.set_status(CrewStatus.TRANSPORTING, destination_hospital_id=notice.hospital_id)
            self.unit.gps.drive(route.points_deg, self.speed_mps)
            await self._arrive()
            await agent.set_status(CrewStatus.AT_HOSPITAL, destination_hospital_id=notice.hospital_id)
            await self._wait(self.handover_s)
            await agent.set_status(CrewStatus.HANDED_OVER, destination_hospital_id=notice.hospital_id)
            await agent.set_status(CrewStatus.BACK_IN_SERVICE)
            await self._wait(self.turnaround_s)

    def _hospital_position(self, notice: Notice) -> tuple[float, float]:
        position = self.hospital_positions.get(notice.hospital_id or "")
        if position is None:
            raise LookupError("destination hospital has no known position")
        return position

    async def _arrive(self) -> None:
        async with asyncio.timeout(3600):
            await self.unit.gps.arrived.wait()

    async def _destination_for(self, alert_id: str) -> Notice | None:
        try:
            async with asyncio.timeout(self.notice_timeout_s):
                while True:
                    notice = await self.unit.destination.get()
                    if notice.alert_id == alert_id:
                        return notice
        except TimeoutError:
            return None
