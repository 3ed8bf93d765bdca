"""Partition maintenance of the PostgreSQL telemetry store: create partitions ahead, drop expired ones.

Run it periodically (hourly is plenty; daily partitions are created two days ahead by default)::

    report = await telemetry.maintenance.run("postgresql://...", datetime.now(UTC))
    # or from a shell / cron / systemd timer:
    python -m telemetry.maintenance --database-url postgresql://... [--ecg-days 30 --vitals-days 365 --gps-days 365]

Retention is per stream (``telemetry_retention``; defaults: raw ECG 30 days, vitals and GPS 365 days) and enforced
per partition: a partition is dropped once its newest possible row is older than the retention, so up to one
partition width (a day) of older data may remain readable; the writer refuses new rows older than the retention
(counted, never an error).  With TimescaleDB the extension's own policies do this and ``run`` reports nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg

from broker_config import Stream
from telemetry.errors import StoreUnavailableError
from telemetry.postgres_store import utc_conninfo

__all__ = ["DEFAULT_RETENTION", "MaintenanceReport", "main", "run", "set_retention"]

logger = logging.getLogger(__name__)

DEFAULT_RETENTION: Mapping[Stream, timedelta] = {
    Stream.ECG: timedelta(days=30),
    Stream.VITALS: timedelta(days=365),
    Stream.GPS: timedelta(days=365),
}
"""Retention of each time-partitioned stream unless configured otherwise."""


@dataclass(frozen=True, slots=True)
class MaintenanceReport:
    """What one maintenance run did: partition names created and dropped."""

    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


async def set_retention(url: str, retention: Mapping[Stream, timedelta]) -> None:
    """Set the retention of some streams (the next maintenance run and the writers, within a minute, apply it).

    Raises:
        ValueError: a stream that is not time-partitioned, or a non-positive duration.
        StoreUnavailableError: the database cannot be reached.
    """
    for stream, keep in retention.items():
        if stream not in DEFAULT_RETENTION or keep <= timedelta(0):
            raise ValueError(f"retention must be positive and for ecg, vitals or gps, not {stream}")
    try:
        conninfo = utc_conninfo(url, application_name="goldenhour-maint")
        async with await psycopg.AsyncConnection.connect(conninfo) as conn:
            for stream, keep in retention.items():
                await conn.execute("UPDATE telemetry_retention SET retain = %s WHERE stream = %s", (keep, stream.value))
    except psycopg.OperationalError as exc:
        raise StoreUnavailableError(f"psycopg.{type(exc).__name__}") from exc


async def run(url: str, now: datetime) -> MaintenanceReport:
    """Create partitions from ``now`` to ``now`` + premake and drop partitions wholly older than the retention.

    Args:
        url: ``postgresql://...`` of a migrated telemetry store.
        now: the reference time (timezone-aware); pass the current UTC time in production.

    Raises:
        ValueError: ``now`` is naive.
        StoreUnavailableError: the database cannot be reached.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    report = MaintenanceReport()
    try:
        async with await psycopg.AsyncConnection.connect(
            utc_conninfo(url, application_name="goldenhour-maint"), autocommit=True
        ) as conn:
            cur = await conn.execute(
                "SELECT action, table_name, partition_name FROM telemetry_maintain(%s)", (now.astimezone(UTC),)
            )
            for action, table, name in await cur.fetchall():
                (report.created if action == "created" else report.dropped).append(name)
                logger.info("partition %s table=%s partition=%s", action, table, name)
    except psycopg.OperationalError as exc:
        raise StoreUnavailableError(f"psycopg.{type(exc).__name__}") from exc
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--database-url`` [``--ecg-days`` ``--vitals-days`` ``--gps-days``]; exit 0 on success."""
    parser = argparse.ArgumentParser(prog="goldenhour db maintain", description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", required=True)
    for stream in DEFAULT_RETENTION:
        parser.add_argument(f"--{stream.value}-days", type=float, help=f"retention of {stream.value} in days")
    args = parser.parse_args(argv)
    retention = {
        stream: timedelta(days=days)
        for stream in DEFAULT_RETENTION
        if (days := getattr(args, f"{stream.value}_days")) is not None
    }

    async def _go() -> MaintenanceReport:
        if retention:
            await set_retention(args.database_url, retention)
        return await run(args.database_url, datetime.now(UTC))

    try:
        report = asyncio.run(_go())
    except (StoreUnavailableError, ValueError) as exc:
        logger.error("maintenance failed: %s", exc)
        return 1
    logger.info("maintenance done created=%d dropped=%d", len(report.created), len(report.dropped))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    raise SystemExit(main())
