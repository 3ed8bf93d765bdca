"""Vitals trends since first contact, read back from the telemetry store, so that they survive a board restart.

The board keeps its trends in memory (:class:`hospital_board.state.BoardState`, one point per ``trend_step_s``);
a board that restarts, or that first hears of a unit when the crew has been with the patient for a while, has
only what it received since.  The telemetry store keeps every vitals reading (LOINC-coded, UCUM units, see
:mod:`broker_config.codes`), and its read API summarises them per minute
(:meth:`telemetry.store.Store.vitals_per_minute`).  This module turns those per-minute means into trend points
that the state merges where it has nothing of its own (:meth:`BoardState.merge_trend`).

The board only reads the store, never writes it; a store that is down or slow costs the page its older trend
(counted and logged with the unit id only), never the live view.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from broker_config.codes import VITAL_CODES
from hospital_board.schemas import TrendPointPublic

if TYPE_CHECKING:
    from telemetry.records import VitalsBin

__all__ = ["TREND_FIELDS", "StoreTrends", "points_from_bins"]

logger = logging.getLogger(__name__)

TREND_FIELDS: tuple[str, ...] = (
    "heart_rate_bpm",
    "spo2_pct",
    "sbp_mmhg",
    "dbp_mmhg",
    "resp_rate_per_min",
    "etco2_mmhg",
)
"""The :class:`TrendPointPublic` fields, each a :class:`broker_config.payloads.Vitals` field of the same name."""

_FIELD_BY_LOINC = {c.loinc: c.field for c in VITAL_CODES if c.field in TREND_FIELDS}
_UCUM_BY_LOINC = {c.loinc: c.ucum for c in VITAL_CODES if c.field in TREND_FIELDS}


def points_from_bins(bins: Sequence[VitalsBin], bin_s: int) -> list[TrendPointPublic]:
    """Trend points from the store's per-bin summaries (:class:`telemetry.records.VitalsBin`).

    One point per bin, placed at the bin's middle (``bin_start + bin_s / 2``), each field the bin's mean; a code
    the trend does not chart, or one stored in another UCUM unit than the contract's, is skipped (never converted
    silently).  A field without a reading in that bin stays None (a hole on the chart).

    Returns:
        The points, oldest first.
    """
    by_start: dict[datetime, dict[str, float]] = {}
    for b in bins:
        name = _FIELD_BY_LOINC.get(b.loinc)
        if name is None or b.ucum != _UCUM_BY_LOINC[b.loinc] or b.n <= 0:
            continue
        by_start.setdefault(b.bin_start, {})[name] = float(b.mean)
    half = timedelta(seconds=bin_s / 2)
    return [TrendPointPublic(at=start + half, **values) for start, values in sorted(by_start.items())]


class StoreTrends:
    """Reads a unit's per-minute vitals from the telemetry store (read only).

    Args:
        database_url: the telemetry store's URL (``postgresql://...`` or ``sqlite:///path``), as the ingest's.
        timeout_s: deadline of one read; a slower store is given up on for that request.
        bin_s: bin width of the summaries (60: per minute).

    ``stats`` counts reads ``ok``, ``failed`` (store unavailable or refused) and ``timeout``.
    Raises (constructor): :class:`telemetry.errors.UnsupportedStoreError` for an unknown URL scheme.
    """

    def __init__(self, database_url: str, *, timeout_s: float = 3.0, bin_s: int = 60) -> None:
        from telemetry.store import open_store  # the board needs the telemetry package only when configured

        self.store = open_store(database_url)
        self.timeout_s = timeout_s
        self.bin_s = bin_s
        self.stats: Counter[str] = Counter()

    async def points(self, unit_id: str, since: datetime) -> list[TrendPointPublic] | None:
        """The unit's trend points measured at or after ``since`` (timezone-aware), oldest first; None when the
        store could not answer in time (the caller may try again later)."""
        from telemetry.errors import StoreUnavailableError, WriteError

        try:
            async with asyncio.timeout(self.timeout_s):
                bins = await self.store.vitals_per_minute(unit_id, since, bin_s=self.bin_s)
        except TimeoutError:
            self.stats["timeout"] += 1
            logger.warning("trend history read timed out unit=%s", unit_id)
            return None
        except (StoreUnavailableError, WriteError) as exc:
            self.stats["failed"] += 1
            logger.warning("trend history unavailable unit=%s reason=%s", unit_id, type(exc).__name__)
            return None
        self.stats["ok"] += 1
        return points_from_bins(bins, self.bin_s)

    async def close(self) -> None:
        """Release the store's connections (idempotent)."""
        await self.store.close()
