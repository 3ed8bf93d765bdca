"""Road routing by an external engine over HTTP, for regions too large for the embedded router.

:class:`Router` is the one interface dispatch routes through; :class:`dispatch.routing.RoadRouter` (embedded,
OpenStreetMap PBF) and :class:`OsrmRouter` (an OSRM server, HTTP API v1) both satisfy it.  Valhalla and
GraphHopper offer the same two questions (a route, a one-to-many time table) and fit the same interface.

OSRM HTTP API v1 (project-osrm.org/docs/v5.24.0/api): ``GET /route/v1/{profile}/{lon},{lat};{lon},{lat}
?overview=full&geometries=geojson`` and ``GET /table/v1/{profile}/{coords}?sources=..&destinations=..
&annotations=duration``.  Coordinates are lon,lat in that API; ours are (lat, lon) everywhere else.
Durations are the engine's car profile divided by ``emergency_factor`` (lights and sirens), as in the embedded router.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import httpx

from dispatch.errors import NoRouteError, OutsideNetworkError, RoutingError
from dispatch.routing import Route

__all__ = ["OsrmRouter", "Router"]


@runtime_checkable
class Router(Protocol):
    """What dispatch asks of a road router.  Points are (lat_deg, lon_deg); times are seconds of emergency driving."""

    def route(self, from_deg: tuple[float, float], to_deg: tuple[float, float]) -> Route:
        """The fastest route.  Raises OutsideNetworkError or NoRouteError."""
        ...

    def eta_s_to_many(
        self, from_deg: tuple[float, float], targets_deg: Sequence[tuple[float, float]]
    ) -> list[float | None]:
        """Times from one point to each target (None: unreachable)."""
        ...

    def eta_s_from_many(
        self, sources_deg: Sequence[tuple[float, float]], to_deg: tuple[float, float]
    ) -> list[float | None]:
        """Times from each source to one point (None: unreachable)."""
        ...


def _coords(points: Sequence[tuple[float, float]]) -> str:
    for lat, lon in points:
        if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180):
            raise OutsideNetworkError((lat, lon), math.inf)
    return ";".join(f"{lon:.6f},{lat:.6f}" for lat, lon in points)


class OsrmRouter:
    """An OSRM server as the router (synchronous, like the embedded one: call it through ``asyncio.to_thread``).

    Args:
        base_url: e.g. ``http://osrm.internal:5000``.
        profile: the OSRM profile name (``driving``).
        emergency_factor: engine durations are divided by it (>= 1).
        timeout_s: bound of each HTTP request.
        client: an ``httpx.Client`` to use (tests, connection pooling); one is created otherwise.

    Raises (from the queries):
        RoutingError: the engine is unreachable, timed out, or answered with an error or malformed JSON.
        OutsideNetworkError / NoRouteError: the engine's ``NoSegment`` / ``NoRoute`` answers.
    """

    def __init__(
        self,
        base_url: str,
        *,
        profile: str = "driving",
        emergency_factor: float = 1.2,
        timeout_s: float = 5.0,
        client: httpx.Client | None = None,
    ) -> None:
        if emergency_factor < 1:
            raise ValueError("emergency_factor must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.profile = profile
        self.emergency_factor = emergency_factor
        self._client = client or httpx.Client(timeout=timeout_s)

    def _get(self, service: str, coords: str, params: dict[str, str]) -> dict[str, Any]:
        url = f"{self.base_url}/{service}/v1/{self.profile}/{coords}"
        try:
            response = self._client.get(url, params=params)
        except httpx.HTTPError as exc:
            raise RoutingError(f"routing engine unreachable: {type(exc).__name__}") from None
        try:
            body = response.json()
        except ValueError:
            raise RoutingError(f"routing engine answered HTTP {response.status_code} without JSON") from None
        code = body.get("code") if isinstance(body, dict) else None
        if code == "NoSegment":
            raise OutsideNetworkError((math.nan, math.nan), math.inf)
        if code == "NoRoute":
            raise NoRouteError("the routing engine found no route")
        if code != "Ok":
            raise RoutingError(f"routing engine error {str(code)[:40]!r} (HTTP {response.status_code})")
        return body

    def route(self, from_deg: tuple[float, float], to_deg: tuple[float, float]) -> Route:
        """The fastest route between two points (see :class:`Router`)."""
        body = self._get(
            "route", _coords([from_deg, to_deg]), {"overview": "full", "geometries": "geojson", "steps": "false"}
        )
        try:
            best = body["routes"][0]
            points = [(float(lat), float(lon)) for lon, lat in best["geometry"]["coordinates"]]
            return Route(
                points_deg=points,
                distance_m=float(best["distance"]),
                duration_s=float(best["duration"]) / self.emergency_factor,
            )
        except (KeyError, IndexError, TypeError, ValueError):
            raise RoutingError("routing engine answer lacks a usable route") from None

    def _table(self, points: list[tuple[float, float]], sources: str, destinations: str) -> list[list[Any]]:
        body = self._get(
            "table",
            _coords(points),
            {"sources": sources, "destinations": destinations, "annotations": "duration"},
        )
        durations = body.get("durations")
        if not isinstance(durations, list) or not all(isinstance(row, list) for row in durations):
            raise RoutingError("routing engine answer lacks a duration table")
        return durations

    def _seconds(self, value: Any) -> float | None:
        return float(value) / self.emergency_factor if isinstance(value, int | float) else None

    def eta_s_to_many(
        self, from_deg: tuple[float, float], targets_deg: Sequence[tuple[float, float]]
    ) -> list[float | None]:
        """Times from one point to each target by one table request (see :class:`Router`)."""
        if not targets_deg:
            return []
        n = len(targets_deg)
        table = self._table([from_deg, *targets_deg], "0", ";".join(str(i) for i in range(1, n + 1)))
        row = table[0] if table else []
        if len(row) != n:
            raise RoutingError("routing engine duration table has the wrong shape")
        return [self._seconds(v) for v in row]

    def eta_s_from_many(
        self, sources_deg: Sequence[tuple[float, float]], to_deg: tuple[float, float]
    ) -> list[float | None]:
        """Times from each source to one point by one table request (see :class:`Router`)."""
        if not sources_deg:
            return []
        n = len(sources_deg)
        table = self._table([*sources_deg, to_deg], ";".join(str(i) for i in range(n)), str(n))
        if len(table) != n or any(len(row) != 1 for row in table):
            raise RoutingError("routing engine duration table has the wrong shape")
        return [self._seconds(row[0]) for row in table]

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()
