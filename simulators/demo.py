"""``goldenhour demo``: the whole path in one process on real data.

Broker (embedded amqtt, or ``--mqtt-url``), telemetry ingest into SQLite (or ``--database-url``), dispatch with its
API, the ED board, and three simulated ambulances replaying different real MIT-BIH records over real Monaco roads.
AMB1 raises a STEMI pre-alert; AMB2 and AMB3 are inbound cardiac patients (atrial fibrillation, ventricular
bigeminy) whose crews chose the cardiac centre.  Dispatch routes the STEMI to the 24/7 PCI hospital.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from broker_config import BrokerSettings, CaseType, Findings, TopicSpace
from broker_config.embedded import EmbeddedBroker, free_port
from broker_config.identity import SecurityMode
from broker_config.web import server_config
from dispatch.accounts import DemoAccount, create_demo_accounts
from dispatch.api import create_app as create_dispatch_app
from dispatch.hospitals import DATA_DIR as DISPATCH_DATA
from dispatch.hospitals import HospitalRegistry
from dispatch.routing import RoadRouter
from dispatch.security import DispatchSecurity
from dispatch.service import DispatchService
from hospital_board.main import create_app as create_board_app
from hospital_board.settings import BoardSettings
from simulators.fleet import CaseScript, SimulatedUnit, UnitPlan, build_unit
from telemetry.ingest import Ingest
from telemetry.service import run_ingest
from telemetry.settings import TelemetrySettings

__all__ = ["DEMO_HOSPITAL_ID", "DEMO_UNITS", "DemoOptions", "DemoRunning", "run_demo"]

logger = logging.getLogger(__name__)

DEMO_HOSPITAL_ID = "MC-CCM"
"""Centre Cardio-Thoracique de Monaco: the demo's only 24/7 PCI hospital (a demo assumption)."""

DEMO_UNITS: tuple[UnitPlan, ...] = (
    UnitPlan(
        unit_id="AMB1",
        record="100",
        scenes_deg=((43.7396, 7.4275), (43.7283, 7.4158), (43.7449, 7.4331)),
        case_type=CaseType.STEMI,
        findings=Findings(
            age_years=64,
            sex="male",
            ecg_st_elevation=True,
            sbp_mmhg=128,
            heart_rate_bpm=74,
            note="Crushing chest pain for 40 min; ST elevation II, III, aVF on the 12-lead",
        ),
        contact_to_prealert_s=4.0,
    ),
    UnitPlan(
        unit_id="AMB2",
        record="201",
        scenes_deg=((43.7283, 7.4158), (43.7449, 7.4331), (43.7396, 7.4275)),
        case_type=CaseType.MEDICAL,
        findings=Findings(age_years=78, sex="female", note="Palpitations, irregular rhythm, known AF"),
        requested_hospital_id=DEMO_HOSPITAL_ID,
        ecg_start_s=120.0,
        numerics_start_min=20,
        contact_to_prealert_s=2.0,
    ),
    UnitPlan(
        unit_id="AMB3",
        record="119",
        scenes_deg=((43.7449, 7.4331), (43.7396, 7.4275), (43.7283, 7.4158)),
        case_type=CaseType.MEDICAL,
        findings=Findings(age_years=55, sex="male", note="Syncope at work, frequent ventricular ectopy"),
        requested_hospital_id=DEMO_HOSPITAL_ID,
        ecg_start_s=300.0,
        numerics_start_min=45,
        contact_to_prealert_s=1.0,
    ),
)


@dataclass(slots=True)
class DemoOptions:
    """What ``goldenhour demo`` was asked for."""

    mqtt_url: str | None = None
    """None: an embedded broker on a free loopback port."""
    database_url: str | None = None
    """None: SQLite in ``state_dir``."""
    host: str = "127.0.0.1"
    board_port: int = 8080
    dispatch_port: int = 8081
    pace: float = 1.0
    duration_s: float | None = None
    state_dir: Path = field(default_factory=lambda: Path("var") / "demo")
    hospital_id: str = DEMO_HOSPITAL_ID
    topic_prefix: str = ""


@dataclass(slots=True)
class DemoRunning:
    """Handles on a running demo (for tests and the startup banner)."""

    broker: BrokerSettings
    database_url: str
    board_url: str
    dispatch_url: str
    dispatch: DispatchService
    units: list[SimulatedUnit]
    scripts: list[CaseScript]
    accounts: list[DemoAccount] = field(default_factory=list)
    """Development accounts, one per role, with random passwords (printed once by :func:`banner`)."""


def _port_or_free(host: str, port: int) -> int:
    if port == 0:
        return free_port(host)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as uvicorn binds: connections of a demo stopped a moment ago (TIME_WAIT) do not make the port busy, so a
        # restarted demo keeps its addresses (open board tabs, bookmarks)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            chosen = free_port(host)
            logger.warning("port %d is busy, using %d", port, chosen)
            return chosen
    return port


def _server(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    server = uvicorn.Server(server_config(app, host=host, port=port, log_level="warning", lifespan="on"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # the CLI owns signals
    return server


async def run_demo(options: DemoOptions, on_ready: Callable[[DemoRunning], None] | None = None) -> None:
    """Run the demo until cancelled (or for ``options.duration_s``).  Calls ``on_ready`` once everything is up."""
    options.state_dir.mkdir(parents=True, exist_ok=True)
    space = TopicSpace(prefix=options.topic_prefix)
    # A topic prefix (tests) gets its own MQTT client ids too: persistent sessions must never be shared between runs.
    suffix = "-" + "".join(c for c in options.topic_prefix if c.isalnum())[:20] if options.topic_prefix else ""
    async with contextlib.AsyncExitStack() as stack:
        if options.mqtt_url:
            broker = BrokerSettings.from_url(options.mqtt_url, reconnect_min_s=0.2, reconnect_max_s=5.0)
        else:
            embedded = await stack.enter_async_context(EmbeddedBroker())
            broker = BrokerSettings(host=embedded.host, port=embedded.port, reconnect_min_s=0.2, reconnect_max_s=5.0)
        database_url = options.database_url or f"sqlite:///{(options.state_dir / 'telemetry.sqlite3').resolve()}"

        router = await asyncio.to_thread(RoadRouter.from_pbf, DISPATCH_DATA / "monaco.osm.pbf")
        registry = HospitalRegistry.load()
        positions = {h.hospital_id: h.position_deg for h in registry.hospitals()}
        dispatch = DispatchService(broker, space, registry, router, client_id=f"goldenhour-dispatch{suffix}")
        dispatch_port = _port_or_free(options.host, options.dispatch_port)
        board_port = _port_or_free(options.host, options.board_port)
        dispatch_url = f"http://{options.host}:{dispatch_port}"
        # Development mode (the demo only): a signing key for this run, random demo passwords, loopback only.
        security = DispatchSecurity.development()
        board_secret = secrets.token_urlsafe(32)
        board_settings = BoardSettings(
            broker=broker,
            topic_prefix=options.topic_prefix,
            default_hospital_id=options.hospital_id,
            dispatch_url=dispatch_url,
            security_mode=SecurityMode.DEVELOPMENT,
            http_host=options.host,
            verify_keys=(security.verify_key_text,),
            dispatch_client_id="board",
            dispatch_client_secret=board_secret,
            telemetry_database_url=database_url,  # trends since first contact survive a board restart
        )
        servers = [
            _server(create_dispatch_app(service=dispatch, security=security), options.host, dispatch_port),
            _server(create_board_app(board_settings), options.host, board_port),
        ]
        units = [
            build_unit(plan, broker, space, state_dir=options.state_dir, pace=options.pace, client_suffix=suffix)
            for plan in DEMO_UNITS
        ]
        ingest_settings = TelemetrySettings(database_url=database_url, client_id=f"goldenhour-ingest{suffix}")
        scripts = [
            CaseScript(u, router, positions, pace=options.pace, handover_s=120.0, turnaround_s=40.0) for u in units
        ]
        for unit in units:
            stack.callback(unit.agent.close)
        running = DemoRunning(
            broker=broker,
            database_url=database_url,
            board_url=f"http://{options.host}:{board_port}/?hospital={options.hospital_id}",
            dispatch_url=dispatch_url,
            dispatch=dispatch,
            units=units,
            scripts=scripts,
        )
        ingest_built: asyncio.Queue[Ingest] = asyncio.Queue(maxsize=1)
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(
                    run_ingest(
                        database_url, broker, space, settings=ingest_settings, on_ingest=ingest_built.put_nowait
                    ),
                    name="ingest",
                ),
                tg.create_task(dispatch.run(), name="dispatch"),
                *(tg.create_task(s.serve(), name="http") for s in servers),
            ]
            async with asyncio.timeout(60):
                while not all(s.started for s in servers):  # noqa: ASYNC110 - uvicorn offers only a flag
                    await asyncio.sleep(0.05)
                await dispatch.wait_ready(60)  # the repository is open: the accounts can be stored
                running.accounts = await create_demo_accounts(
                    security.account_service(dispatch.repo),
                    hospital_id=options.hospital_id,
                    unit_id=DEMO_UNITS[0].unit_id,
                    board_service=("board", board_secret),
                )
                # The store must be subscribed before the first ambulance speaks, or its first messages have no
                # session to wait in.
                ingest = await ingest_built.get()
                await ingest.link.wait_connected(60)
            tasks += [tg.create_task(u.agent.run(), name=f"agent-{u.plan.unit_id}") for u in units]
            tasks += [tg.create_task(s.run(), name=f"crew-{s.unit.plan.unit_id}") for s in scripts]
            if on_ready is not None:
                on_ready(running)
            try:
                if options.duration_s is not None:
                    await asyncio.sleep(options.duration_s)
                else:
                    await asyncio.Event().wait()
            finally:
                for server in servers:
                    server.should_exit = True
                for task in tasks:
                    if task.get_name() != "http":
                        task.cancel()


def banner(running: DemoRunning) -> None:
    """Tell the person at the terminal where to look."""
    sys.stdout.write(
        "\nGoldenHour demo is running.\n"
        f"  ED board (Centre Cardio-Thoracique de Monaco): {running.board_url}\n"
        f"  Dispatcher console: {running.dispatch_url}/console   (API: {running.dispatch_url}/docs)\n"
        f"  Telemetry store: {running.database_url.split('@')[-1]}\n"
        f"  Broker: {running.broker.url}\n"
        "Three ambulances are streaming real MIT-BIH ECG; AMB1 will raise a STEMI pre-alert. Ctrl-C stops.\n"
        "Development accounts (random passwords, shown only now; sign in as 'ed' on the board):\n"
        f"  {'user':<11} {'role':<18} {'scope':<8} password\n"
        + "".join(
            f"  {a.username:<11} {a.role.value:<18} {a.hospital_id or a.unit_id or '':<8} {a.password}\n"
            for a in running.accounts
        )
        + "\n"
    )
    sys.stdout.flush()
