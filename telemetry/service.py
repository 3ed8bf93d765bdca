"""Runnable composition of the ingest: open the store, migrate (waiting politely for the database), run."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from broker_config import BrokerSettings, TopicSpace
from broker_config.connection import Backoff
from telemetry.errors import StoreUnavailableError
from telemetry.ingest import Ingest
from telemetry.settings import TelemetrySettings
from telemetry.store import Store, open_store

__all__ = ["migrate_when_ready", "run_ingest"]

logger = logging.getLogger(__name__)


async def migrate_when_ready(store: Store, *, deadline_s: float = 60.0) -> list[int]:
    """Apply migrations, retrying with back-off while the database is unreachable, for at most ``deadline_s``.

    Raises:
        TimeoutError: the database did not come up in time.
        telemetry.errors.MigrationError: the schema is newer than this code.
    """
    backoff = Backoff(0.2, 5.0)
    async with asyncio.timeout(deadline_s):
        while True:
            try:
                return await store.migrate()
            except StoreUnavailableError as exc:
                delay = max(0.2, backoff.next_delay_s())
                logger.warning("database not ready (%s); retry in %.2f s", exc.cause, delay)
                await asyncio.sleep(delay)


async def run_ingest(
    database_url: str,
    broker: BrokerSettings,
    space: TopicSpace,
    *,
    settings: TelemetrySettings | None = None,
    on_ingest: Callable[[Ingest], None] | None = None,
) -> None:
    """Migrate the store at ``database_url`` then run the ingest until cancelled (the CLI's entry).

    ``settings`` tunes batching and the client id; ``database_url`` wins over ``settings.database_url``.
    ``on_ingest`` is called with the :class:`Ingest` once it is built (to expose its ``stats`` on a health
    endpoint, or for a test to wait on ``ingest.link.wait_connected``).
    Raises what :func:`migrate_when_ready` and :meth:`telemetry.ingest.Ingest.run` raise.
    """
    options = settings or TelemetrySettings(database_url=database_url)
    store = open_store(database_url)
    try:
        applied = await migrate_when_ready(store)
        logger.info("telemetry store ready migrations_applied=%s", applied)
        ingest = Ingest(
            store,
            broker,
            space,
            client_id=options.client_id,
            batch_max=options.batch_max,
            batch_age_s=options.batch_age_s,
            queue_max=options.queue_max,
            write_timeout_s=options.write_timeout_s,
            share_group=options.share_group,
            publish_receipts=options.publish_receipts,
            receipt_interval_s=options.receipt_interval_s,
        )
        if on_ingest is not None:
            on_ingest(ingest)
        await ingest.run()
    finally:
        await store.close()
