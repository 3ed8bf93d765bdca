"""Errors of the dispatch service: one root class, attributes instead of message parsing (STYLE.md, Errors)."""

from __future__ import annotations

__all__ = [
    "DispatchError",
    "RegistryError",
    "UnknownHospitalError",
    "RoutingError",
    "OutsideNetworkError",
    "NoRouteError",
]


class DispatchError(Exception):
    """Root of every error raised by the dispatch package."""


class RegistryError(DispatchError):
    """The hospital data files are inconsistent (for example a kept hospital has no capabilities entry).

    Attributes:
        path: the file at fault, as given by the caller.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{reason} ({path})")
        self.path = path
        self.reason = reason


class UnknownHospitalError(DispatchError, KeyError):
    """No hospital with this id in the registry.  ``hospital_id`` holds the id asked for."""

    def __init__(self, hospital_id: str) -> None:
        super().__init__(hospital_id)
        self.hospital_id = hospital_id


class RoutingError(DispatchError):
    """Root of road-routing failures."""


class OutsideNetworkError(RoutingError):
    """A point is farther than the snapping limit from every road of the graph.

    Attributes:
        point_deg: the (lat, lon) asked for; snap_distance_m: distance to the nearest routable node.
    """

    def __init__(self, point_deg: tuple[float, float], snap_distance_m: float) -> None:
        super().__init__(f"point is {snap_distance_m:.0f} m from the road network")
        self.point_deg = point_deg
        self.snap_distance_m = snap_distance_m


class NoRouteError(RoutingError):
    """The two points snap to nodes with no directed path between them."""
