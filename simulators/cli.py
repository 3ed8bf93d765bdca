"""The ``goldenhour`` command: one entry point for the demo, each service, migrations and benchmarks.

goldenhour demo [--mqtt-url URL] [--database-url URL] [--pace X] [--duration-s S]
goldenhour ingest --database-url URL [--mqtt-url URL]
goldenhour dispatch [--mqtt-url URL] [--port 8081]
goldenhour board [--mqtt-url URL] [--port 8080] [--hospital ID]
goldenhour db migrate --database-url URL
goldenhour bench codec
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from broker_config import BrokerSettings, TopicSpace

__all__ = ["main"]


def _broker(url: str | None) -> BrokerSettings:
    return BrokerSettings.from_url(url) if url else BrokerSettings()


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("amqtt", "transitions", "uvicorn.access", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="goldenhour", description="GoldenHour emergency-care integration")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the live demo (embedded broker and SQLite by default)")
    demo.add_argument("--mqtt-url", help="use this broker instead of the embedded one, e.g. mqtt://127.0.0.1:1883")
    demo.add_argument("--database-url", help="postgresql://... or sqlite:///file (default: SQLite in --state-dir)")
    demo.add_argument("--host", default="127.0.0.1", help="address the web pages listen on")
    demo.add_argument("--board-port", type=int, default=8080)
    demo.add_argument("--dispatch-port", type=int, default=8081)
    demo.add_argument("--pace", type=float, default=1.0, help="replay speed, 1.0 = real time")
    demo.add_argument("--duration-s", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
    demo.add_argument("--state-dir", type=Path, default=Path("var") / "demo", help="outboxes and the SQLite store")

    ingest = sub.add_parser("ingest", help="run the telemetry ingest service")
    ingest.add_argument("--mqtt-url")
    ingest.add_argument("--database-url", default=os.environ.get("EMS_TELEMETRY_DATABASE_URL"), required=False)

    dispatch = sub.add_parser("dispatch", help="run the dispatch service and its API")
    dispatch.add_argument("--mqtt-url")
    dispatch.add_argument("--host", default="127.0.0.1")
    dispatch.add_argument("--port", type=int, default=8081)

    board = sub.add_parser("board", help="run the ED board")
    board.add_argument("--mqtt-url")
    board.add_argument("--host", default="127.0.0.1")
    board.add_argument("--port", type=int, default=8080)
    board.add_argument("--hospital", default="MC-CCM", help="the hospital shown by default")
    board.add_argument("--dispatch-url", help="dispatch API for hospital names, e.g. http://127.0.0.1:8081")

    broker = sub.add_parser("broker", help="broker credentials: CA, certificates, passwords, ACL, revocation")
    broker_sub = broker.add_subparsers(dest="broker_command", required=True)
    provision = broker_sub.add_parser("provision", help="create a fleet's CA, certificates, password file, ACL, CRL")
    provision.add_argument("--out", type=Path, required=True, help="folder for the credentials (must be new)")
    provision.add_argument("--units", required=True, help="unit ids, comma-separated (AMB1,AMB2)")
    provision.add_argument("--services", default="ingest,dispatch,board", help="service accounts, comma-separated")
    provision.add_argument("--server-names", default="localhost,127.0.0.1", help="broker DNS names / addresses")
    provision.add_argument("--broker-group", help="the broker's group (e.g. mosquitto), to read its files")
    add_unit = broker_sub.add_parser("add-unit", help="add one unit to provisioned credentials")
    add_unit.add_argument("--out", type=Path, required=True)
    add_unit.add_argument("unit_id")
    revoke = broker_sub.add_parser("revoke", help="revoke a unit or service (CRL, password, ACL); then SIGHUP")
    revoke.add_argument("--out", type=Path, required=True)
    revoke.add_argument("account")
    renew = broker_sub.add_parser("renew-crl", help="re-sign the CRL with a fresh nextUpdate (monthly); then SIGHUP")
    renew.add_argument("--out", type=Path, required=True)
    renew.add_argument("--if-due", action="store_true", help="only when check-crl would warn (for a daily timer)")
    check_crl = broker_sub.add_parser("check-crl", help="exit 0 ok, 1 renewal due (30 days), 2 CRL expired")
    check_crl.add_argument("--out", type=Path, required=True, help="the provisioning folder or the crl.pem")
    check_crl.add_argument("--warn-days", type=int, default=30)

    sub.add_parser("agent", help="run the in-vehicle agent (EMS_AGENT_* settings; crew screen on 127.0.0.1:8080)")

    db = sub.add_parser("db", help="database chores")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    migrate = db_sub.add_parser("migrate", help="apply the numbered SQL migrations")
    migrate.add_argument("--database-url", required=True)
    db_sub.add_parser("maintain", help="create future partitions and drop expired ones (run hourly)", add_help=False)

    bench = sub.add_parser("bench", help="benchmarks (figures as ratios to a baseline measured in the same run)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    codec = bench_sub.add_parser("codec", help="ECG on the wire: bytes per sample and codec time")
    codec.add_argument("--seconds", type=int, default=120)
    bench_sub.add_parser("ingest", help="fleet -> Mosquitto -> PostgreSQL ingest, vs a naive baseline", add_help=False)
    return parser


async def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from simulators.demo import DemoOptions, banner, run_demo

        options = DemoOptions(
            mqtt_url=args.mqtt_url,
            database_url=args.database_url,
            host=args.host,
            board_port=args.board_port,
            dispatch_port=args.dispatch_port,
            pace=args.pace,
            duration_s=args.duration_s,
            state_dir=args.state_dir,
        )
        await _until_signalled(run_demo(options, on_ready=banner), grace_s=10.0)
    elif args.command == "ingest":
        from telemetry.service import run_ingest

        if not args.database_url:
            sys.stderr.write("goldenhour ingest: --database-url (or EMS_TELEMETRY_DATABASE_URL) is required\n")
            return 2
        await run_ingest(args.database_url, _broker(args.mqtt_url), TopicSpace())
    elif args.command == "dispatch":
        import uvicorn

        from broker_config.web import server_config
        from dispatch.api import create_app
        from dispatch.settings import DispatchSettings

        settings = DispatchSettings(broker=_broker(args.mqtt_url), http_host=args.host, http_port=args.port)
        await uvicorn.Server(server_config(create_app(settings), host=args.host, port=args.port)).serve()
    elif args.command == "board":
        import uvicorn

        from broker_config.web import server_config
        from hospital_board.main import create_app as create_board
        from hospital_board.settings import BoardSettings

        board_settings = BoardSettings(
            broker=_broker(args.mqtt_url), default_hospital_id=args.hospital, dispatch_url=args.dispatch_url
        )
        await uvicorn.Server(server_config(create_board(board_settings), host=args.host, port=args.port)).serve()
    elif args.command == "db" and args.db_command == "migrate":
        from telemetry.migrate import migrate

        applied = await migrate(args.database_url)
        sys.stdout.write(f"applied migrations: {applied or 'none (up to date)'}\n")
    elif args.command == "bench" and args.bench_command == "codec":
        from simulators.bench_codec import run as bench_codec

        bench_codec(args.seconds)
    return 0


async def _until_signalled(main: Coroutine[Any, Any, None], *, grace_s: float) -> None:
    """Run ``main`` until it ends or SIGINT/SIGTERM arrives; then cancel it and give it ``grace_s`` to finish
    (agents and the store flush what they hold).  A second signal, or a shutdown that overruns, exits at once:
    Ctrl-C always stops the demo."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.ensure_future(main)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()
        return
    sys.stdout.write("\nstopping (Ctrl-C again to exit at once)...\n")
    sys.stdout.flush()
    for sig in signals:
        loop.add_signal_handler(sig, _exit_now)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=grace_s)
    if not done:
        logging.getLogger(__name__).warning("shutdown took longer than %.0f s; exiting", grace_s)
    _exit_now()


def _exit_now() -> None:
    """Leave without waiting for stragglers (every store and outbox write is its own committed transaction)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_sync(args: argparse.Namespace, extra: Sequence[str]) -> int | None:
    """Commands that run their own event loop or processes, or none."""
    if args.command == "agent":
        from ambulance_agent.__main__ import main as agent_main

        return int(agent_main())
    if args.command == "broker":
        from broker_config import provision as prov

        if args.broker_command == "provision":
            result = prov.provision(
                args.out,
                [u for u in args.units.split(",") if u],
                [s for s in args.services.split(",") if s],
                server_names=[n for n in args.server_names.split(",") if n],
                broker_group=args.broker_group,
            )
            sys.stdout.write(f"provisioned {len(result.clients)} accounts in {result.out_dir}\n")
        elif args.broker_command == "add-unit":
            prov.add_unit(args.out, args.unit_id)
            sys.stdout.write(f"added {args.unit_id}; send SIGHUP to the broker to load it\n")
        elif args.broker_command == "revoke":
            prov.revoke(args.out, args.account)
            sys.stdout.write(f"revoked {args.account}; send SIGHUP to the broker to apply it\n")
        elif args.broker_command == "check-crl":
            status = prov.check_crl(args.out, renew_before=timedelta(days=args.warn_days))
            sys.stdout.write(f"CRL {status.state}: nextUpdate {status.next_update.isoformat()}\n")
            return {"ok": 0, "renew": 1}.get(status.state, 2)
        else:  # renew-crl
            if args.if_due and prov.check_crl(args.out).state == "ok":
                sys.stdout.write("CRL not due for renewal\n")
                return 0
            crl_file = prov.renew_crl(args.out)
            status = prov.check_crl(crl_file)
            sys.stdout.write(f"CRL renewed: nextUpdate {status.next_update.isoformat()}; send SIGHUP to the broker\n")
        return 0
    if args.command == "db" and args.db_command == "maintain":
        from telemetry import maintenance

        return int(maintenance.main(list(extra)))
    if args.command == "bench" and args.bench_command == "ingest":
        from telemetry import bench

        return int(bench.main(list(extra)))
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``goldenhour`` console script."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    passthrough = (args.command, getattr(args, "db_command", None) or getattr(args, "bench_command", None))
    if extra and passthrough not in {("db", "maintain"), ("bench", "ingest")}:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _configure_logging(args.verbose)
    code = _run_sync(args, extra)
    if code is None:
        code = 0
        with contextlib.suppress(KeyboardInterrupt):
            code = asyncio.run(_run(args))
    sys.exit(code)
