"""A simulated GNSS receiver that drives along a route polyline at a constant speed."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta

from ambulance_agent.sources.base import Clock, GpsReading, Pacer, default_clock

__all__ = ["EARTH_RADIUS_M", "RouteGpsReplay", "haversine_m", "initial_bearing_deg"]

EARTH_RADIUS_M = 6_371_008.8
"""Mean Earth radius (IUGG), metres."""


def haversine_m(lat1_deg: float, lon1_deg: float, lat2_deg: float, lon2_deg: float) -> float:
    """Great-circle distance in metres between two WGS 84 points (haversine formula, spherical Earth)."""
    p1, p2 = math.radians(lat1_deg), math.radians(lat2_deg)
    dp, dl = p2 - p1, math.radians(lon2_deg - lon1_deg)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def initial_bearing_deg(lat1_deg: float, lon1_deg: float, lat2_deg: float, lon2_deg: float) -> float:
    """Initial great-circle bearing from point 1 to point 2, degrees clockwise from true north in [0, 360)."""
    p1, p2 = math.radians(lat1_deg), math.radians(lat2_deg)
    dl = math.radians(lon2_deg - lon1_deg)
    y = math.sin(dl) * math.cos(p2)
    x = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return math.degrees(math.atan2(y, x)) % 360.0


class RouteGpsReplay:
    """Positions along a polyline of (lat_deg, lon_deg) points at ``speed_mps``, one every ``interval_s``.

    Within a segment the position is interpolated linearly in latitude/longitude (segments of a road route are
    short, so the error against the great circle is negligible); distances use the haversine formula.  After the
    last point the unit stays there with speed 0 and keeps reporting (until ``stop_s``, if given).

    Args:
        points_deg: at least one (lat_deg, lon_deg) point, each within [-90, 90] x [-180, 180].
        speed_mps: constant speed along the route (>= 0).
        interval_s: report interval in seconds of data time (> 0).
        pace: 1.0 real time, 20.0 twenty times faster, 0 as fast as possible.
        stop_s: end after this many seconds of data (None: never).
        clock, monotonic, sleep: injectable time (tests).

    Raises:
        ValueError: an empty route, a coordinate out of range, or bad speed/interval.
    """

    def __init__(
        self,
        points_deg: Sequence[tuple[float, float]],
        *,
        speed_mps: float,
        interval_s: float = 1.0,
        pace: float = 1.0,
        stop_s: float | None = None,
        clock: Clock = default_clock,
        monotonic: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.points_deg = [(float(lat), float(lon)) for lat, lon in points_deg]
        if not self.points_deg:
            raise ValueError("a route needs at least one point")
        for lat, lon in self.points_deg:
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise ValueError("route point out of range")
        if not (math.isfinite(speed_mps) and speed_mps >= 0) or not interval_s > 0:
            raise ValueError("speed_mps must be >= 0 and interval_s > 0")
        Pacer(pace)
        self.speed_mps = speed_mps
        self.interval_s = interval_s
        self.stop_s = stop_s
        self._pace = pace
        self._clock = clock
        self._pacer_kwargs = {k: v for k, v in (("monotonic", monotonic), ("sleep", sleep)) if v is not None}
        self.segment_m = [haversine_m(*a, *b) for a, b in zip(self.points_deg, self.points_deg[1:], strict=False)]
        self.length_m = sum(self.segment_m)

    def position_at(self, distance_m: float) -> tuple[float, float, float | None, bool]:
        """(lat_deg, lon_deg, heading_deg, arrived) after driving ``distance_m`` along the route."""
        remaining = max(0.0, distance_m)
        for (a, b), seg_m in zip(zip(self.points_deg, self.points_deg[1:], strict=False), self.segment_m, strict=True):
            if seg_m == 0:
                continue
            if remaining < seg_m:
                f = remaining / seg_m
                lat = a[0] + f * (b[0] - a[0])
                lon = a[1] + f * (b[1] - a[1])
                return lat, lon, initial_bearing_deg(*a, *b), False
            remaining -= seg_m
        lat, lon = self.points_deg[-1]
        return lat, lon, None, True

    def __aiter__(self) -> AsyncIterator[GpsReading]:
        return self._fixes()

    async def _fixes(self) -> AsyncIterator[GpsReading]:
        pacer = Pacer(self._pace, **self._pacer_kwargs)  # type: ignore[arg-type]
        anchor = self._clock()
        pacer.start()
        k = 0
        while True:
            offset_s = k * self.interval_s
            if self.stop_s is not None and offset_s >= self.stop_s:
                return
            lat, lon, heading, arrived = self.position_at(self.speed_mps * offset_s)
            await pacer.until(offset_s)
            at = anchor + timedelta(seconds=offset_s)
            yield GpsReading(
                at=at,
                fix=True,
                lat_deg=lat,
                lon_deg=lon,
                speed_mps=0.0 if arrived else self.speed_mps,
                heading_deg=heading,
                device_time=at,
                fix_quality=1,
            )
            k += 1
