"""Incidents and units, the pure part: unit ranking with reasons, the unit lifecycle and the geofences.  No I/O.

* Unit recommendation (:func:`rank_units`): the available units ranked by road ETA to the incident.  The ETAs
  come from one reverse Dijkstra search from the incident (:meth:`dispatch.routing.RoadRouter.eta_s_from_many`),
  not one search per unit.  A unit without a position is listed last as "no position", never placed at (0, 0)
  (FF-05, FF-15).
* Lifecycle (:data:`LIFECYCLE_RANK`): the crew's status taps (NEMSIS v3.5 eTimes in
  :data:`STATUS_TIME_POINTS`) and the GPS geofences move a unit forward through one incident; a late or repeated
  tap never moves it back.
* Geofences (:data:`GEOFENCE_RADIUS_M`): a fix within 100 m of the incident is "on scene" (eTimes.06), within
  100 m of the destination hospital (after patient contact) "at destination" (eTimes.11), each recorded with
  source ``geofence``.  100 m is an assumption: a GNSS fix in a city is good to a few tens of metres, and a
  hospital's OSM point may lie a little away from its ambulance bay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from broker_config import CrewStatus
from dispatch.errors import OutsideNetworkError
from dispatch.external_routing import Router
from dispatch.geo import haversine_m, valid_position_deg
from dispatch.repository import UnitRecord
from dispatch.timeline import TimePoint

__all__ = [
    "GEOFENCE_RADIUS_M",
    "LIFECYCLE_RANK",
    "STALE_POSITION_S",
    "STATUS_TIME_POINTS",
    "UnitRecommendation",
    "advances",
    "format_duration",
    "rank_units",
    "recommend_units",
    "within_geofence",
]

GEOFENCE_RADIUS_M = 100.0
"""Distance in metres within which a fix counts as arrived (on scene, at the destination hospital)."""

STALE_POSITION_S = 300.0
"""A unit's last fix older than this (seconds) is called stale in the recommendation's reasons."""

STATUS_TIME_POINTS: Mapping[CrewStatus, TimePoint] = {
    CrewStatus.EN_ROUTE: TimePoint.EN_ROUTE,  # eTimes.05
    CrewStatus.ON_SCENE: TimePoint.ON_SCENE,  # eTimes.06
    CrewStatus.PATIENT_CONTACT: TimePoint.PATIENT_CONTACT,  # eTimes.07, FMC
    CrewStatus.TRANSPORTING: TimePoint.LEFT_SCENE,  # eTimes.09
    CrewStatus.AT_HOSPITAL: TimePoint.AT_DESTINATION,  # eTimes.11
    CrewStatus.HANDED_OVER: TimePoint.TRANSFER_OF_CARE,  # eTimes.12
    CrewStatus.BACK_IN_SERVICE: TimePoint.BACK_IN_SERVICE,  # eTimes.13
}
"""The case time point each crew status tap records (NEMSIS v3.5 eTimes)."""

LIFECYCLE_RANK: Mapping[CrewStatus, int] = {
    CrewStatus.AVAILABLE: 0,
    CrewStatus.ASSIGNED: 1,
    CrewStatus.EN_ROUTE: 2,
    CrewStatus.ON_SCENE: 3,
    CrewStatus.PATIENT_CONTACT: 4,
    CrewStatus.TRANSPORTING: 5,
    CrewStatus.AT_HOSPITAL: 6,
    CrewStatus.HANDED_OVER: 7,
    CrewStatus.BACK_IN_SERVICE: 8,
}
"""Order of the lifecycle stages through one incident."""


def advances(current: CrewStatus | None, new: CrewStatus) -> bool:
    """True when ``new`` is a later stage than ``current`` (None = not started)."""
    return current is None or LIFECYCLE_RANK[new] > LIFECYCLE_RANK[current]


def within_geofence(
    position_deg: tuple[float, float] | None, target_deg: tuple[float, float], radius_m: float = GEOFENCE_RADIUS_M
) -> bool:
    """True when a valid position lies within ``radius_m`` metres (great circle) of ``target_deg``."""
    return valid_position_deg(position_deg) and haversine_m(position_deg, target_deg) <= radius_m  # type: ignore[arg-type]


def format_duration(seconds: float) -> str:
    """``"4 min 05 s"`` for 245.0 (reasons shown to a dispatcher)."""
    total = round(seconds)
    return f"{total // 60} min {total % 60:02d} s"


@dataclass(frozen=True, slots=True)
class UnitRecommendation:
    """One available unit for an incident: road ETA in seconds (None = unknown), straight-line distance in metres
    (None = no position), age of its position in seconds, and the reasons in plain words."""

    unit_id: str
    eta_s: float | None
    distance_m: float | None
    position_age_s: float | None
    reasons: tuple[str, ...]


def rank_units(
    incident_deg: tuple[float, float],
    units: Sequence[UnitRecord],
    eta_s_by_unit: Mapping[str, float | None],
    now: datetime,
) -> list[UnitRecommendation]:
    """Rank ``units`` (the caller passes the available ones) for an incident, fastest road ETA first.

    Units with a position but no road ETA (off the network, no router) follow, nearest first; units with no
    position at all come last, by id.  Reasons name the ETA, the distance, the fix age and anything doubtful.
    """
    out: list[tuple[tuple[int, float, str], UnitRecommendation]] = []
    for unit in units:
        reasons: list[str] = []
        position = unit.position_deg if valid_position_deg(unit.position_deg) else None
        age_s = (now - unit.position_at).total_seconds() if unit.position_at is not None and position else None
        eta = eta_s_by_unit.get(unit.unit_id) if position else None
        distance = haversine_m(position, incident_deg) if position else None
        if position is None:
            reasons.append("no position: ETA unknown")
            key = (2, math.inf, unit.unit_id)
        elif eta is None:
            reasons.append(f"no road ETA; {distance / 1000:.1f} km straight line")  # type: ignore[operator]
            key = (1, distance or 0.0, unit.unit_id)
        else:
            reasons.append(f"road ETA {format_duration(eta)}")
            reasons.append(f"{distance / 1000:.1f} km straight line")  # type: ignore[operator]
            key = (0, eta, unit.unit_id)
        if position is not None and not unit.gps_fix:
            reasons.append("no GPS fix now: last known position used")
        if age_s is not None and age_s > STALE_POSITION_S:
            reasons.append(f"position {format_duration(age_s)} old")
        if unit.online is None:
            reasons.append("online state not reported")
        out.append((key, UnitRecommendation(unit.unit_id, eta, distance, age_s, tuple(reasons))))
    out.sort(key=lambda item: item[0])
    return [rec for _key, rec in out]


def recommend_units(
    router: Router | None, incident_deg: tuple[float, float], units: Sequence[UnitRecord], now: datetime
) -> list[UnitRecommendation]:
    """ETAs of every positioned unit to the incident by one reverse Dijkstra search, then :func:`rank_units`.

    CPU-bound (a few milliseconds on a city graph): call it through ``asyncio.to_thread`` from the event loop.
    An incident off the road network, or no router, ranks by straight-line distance.
    """
    positioned = [u for u in units if valid_position_deg(u.position_deg)]
    etas: dict[str, float | None] = {}
    if router is not None and positioned:
        try:
            values = router.eta_s_from_many([u.position_deg for u in positioned], incident_deg)  # type: ignore[misc]
        except OutsideNetworkError:
            values = [None] * len(positioned)
        etas = {u.unit_id: v for u, v in zip(positioned, values, strict=True)}
    return rank_units(incident_deg, units, etas, now)
