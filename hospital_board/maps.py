"""Road polylines for the board's route map, read from the local OpenStreetMap extract with pyosmium.

``dispatch.routing`` builds a routing graph but exposes no polyline reader (and the board imports only
``broker_config``), so the board reads the PBF itself, once, off the event loop.  Pure parts:

* :func:`simplify_m` - Douglas-Peucker simplification in local metres (tolerance ``tolerance_m``).
* :class:`RoadMap.query` - the ways crossing a bounding box, thinned by zoom so a page never gets the whole
  region at full detail: minor streets only below :data:`MINOR_MAX_SPAN_M` of box diagonal.

Classes follow OSM ``highway`` values a vehicle uses (the same families as the OSRM car profile): ``major``
(motorway, trunk, primary and their links), ``secondary`` (secondary, tertiary and links), ``minor``
(unclassified, residential, living_street, service, road).  Footways, steps, paths and tracks are left out.

The page draws these on a canvas with the unit's validated positions; a unit without a fix is listed as
"no position" and never drawn (FF-15), and no text from the data is ever parsed as HTML (FF-16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import osmium
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict

__all__ = [
    "MAJOR",
    "MINOR",
    "MINOR_MAX_SPAN_M",
    "SECONDARY",
    "SECONDARY_MAX_SPAN_M",
    "Bbox",
    "RoadMap",
    "RoadsPublic",
    "WayPublic",
    "parse_bbox",
    "simplify_m",
]

MAJOR = frozenset({"motorway", "motorway_link", "trunk", "trunk_link", "primary", "primary_link"})
SECONDARY = frozenset({"secondary", "secondary_link", "tertiary", "tertiary_link"})
MINOR = frozenset({"unclassified", "residential", "living_street", "service", "road"})
MINOR_MAX_SPAN_M = 8_000.0
"""Boxes wider (diagonal) than this get no minor streets."""
SECONDARY_MAX_SPAN_M = 40_000.0
"""Boxes wider than this get major roads only."""
_EARTH_RADIUS_M = 6_371_008.8
_MAX_SPAN_DEG = 5.0


class WayPublic(BaseModel):
    """One road polyline: ``kind`` major/secondary/minor, ``points`` [[lat, lon], ...] (5 decimals, ~1 m)."""

    model_config = ConfigDict(frozen=True)

    kind: str
    points: list[tuple[float, float]]


class RoadsPublic(BaseModel):
    """``GET /api/map/roads``: the ways crossing ``bbox`` (south, west, north, east); ``truncated`` when capped."""

    model_config = ConfigDict(frozen=True)

    bbox: tuple[float, float, float, float]
    ways: list[WayPublic]
    truncated: bool
    source: str


@dataclass(frozen=True, slots=True)
class Bbox:
    """A box in degrees: ``south <= north``, ``west <= east`` (no antimeridian crossing)."""

    south: float
    west: float
    north: float
    east: float

    def diagonal_m(self) -> float:
        """Length of the box's diagonal in metres (haversine)."""
        return _haversine_m(self.south, self.west, self.north, self.east)


def parse_bbox(text: str) -> Bbox:
    """``"south,west,north,east"`` in degrees (the Overpass order).  Raises ValueError for anything else."""
    parts = text.split(",")
    if len(parts) != 4:
        raise ValueError("bbox must be south,west,north,east")
    south, west, north, east = (float(p) for p in parts)
    if not all(math.isfinite(v) for v in (south, west, north, east)):
        raise ValueError("bbox values must be finite")
    if not (-90 <= south < north <= 90 and -180 <= west < east <= 180):
        raise ValueError("bbox must have south < north and west < east, within range")
    if north - south > _MAX_SPAN_DEG or east - west > _MAX_SPAN_DEG:
        raise ValueError(f"bbox wider than {_MAX_SPAN_DEG} degrees")
    return Bbox(south, west, north, east)


def _haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * _EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def simplify_m(lat_deg: NDArray[np.float64], lon_deg: NDArray[np.float64], tolerance_m: float) -> NDArray[np.intp]:
    """Douglas-Peucker on a local equirectangular projection: indices of the points to keep (ends always kept).

    Every dropped point lies within ``tolerance_m`` of the kept polyline.
    """
    n = lat_deg.shape[0]
    if n <= 2:
        return np.arange(n)
    k = math.cos(math.radians(float(np.mean(lat_deg))))
    x = np.radians(lon_deg) * _EARTH_RADIUS_M * k
    y = np.radians(lat_deg) * _EARTH_RADIUS_M
    keep = np.zeros(n, dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        dx, dy = x[b] - x[a], y[b] - y[a]
        seg = math.hypot(dx, dy)
        xs, ys = x[a + 1 : b] - x[a], y[a + 1 : b] - y[a]
        dist = np.hypot(xs, ys) if seg == 0 else np.abs(xs * dy - ys * dx) / seg
        i = int(np.argmax(dist))
        if dist[i] > tolerance_m:
            mid = a + 1 + i
            keep[mid] = True
            stack.append((a, mid))
            stack.append((mid, b))
    return np.flatnonzero(keep)


@dataclass(frozen=True, slots=True)
class _Way:
    kind: str
    lat: NDArray[np.float64]
    lon: NDArray[np.float64]
    south: float
    west: float
    north: float
    east: float


class RoadMap:
    """Simplified road polylines of one extract, queried by bounding box.

    Build with :meth:`from_pbf` (blocking: call it through ``asyncio.to_thread``).
    """

    def __init__(self, ways: list[_Way], source: str) -> None:
        self._ways = ways
        self.source = source

    def __len__(self) -> int:
        return len(self._ways)

    @property
    def bounds(self) -> Bbox | None:
        """The box around every road, or None for an empty map."""
        if not self._ways:
            return None
        return Bbox(
            min(w.south for w in self._ways),
            min(w.west for w in self._ways),
            max(w.north for w in self._ways),
            max(w.east for w in self._ways),
        )

    @classmethod
    def from_pbf(cls, path: Path, *, tolerance_m: float = 3.0) -> RoadMap:
        """Read every drivable way of an OSM PBF and simplify it.

        Raises:
            OSError, RuntimeError: the file cannot be read (pyosmium's errors).
        """
        wanted = MAJOR | SECONDARY | MINOR
        ways: list[_Way] = []
        processor = osmium.FileProcessor(str(path), osmium.osm.NODE | osmium.osm.WAY).with_locations()
        for obj in processor:
            if not isinstance(obj, osmium.osm.Way):
                continue
            highway = obj.tags.get("highway")
            if highway not in wanted or obj.tags.get("area") == "yes":
                continue
            pts = [(n.location.lat, n.location.lon) for n in obj.nodes if n.location.valid()]
            if len(pts) < 2:
                continue
            lat = np.array([p[0] for p in pts], dtype=np.float64)
            lon = np.array([p[1] for p in pts], dtype=np.float64)
            idx = simplify_m(lat, lon, tolerance_m)
            lat, lon = lat[idx], lon[idx]
            kind = "major" if highway in MAJOR else "secondary" if highway in SECONDARY else "minor"
            ways.append(_Way(kind, lat, lon, float(lat.min()), float(lon.min()), float(lat.max()), float(lon.max())))
        return cls(ways, path.name)

    def query(self, bbox: Bbox, *, max_points: int = 60_000) -> RoadsPublic:
        """The ways crossing ``bbox`` (whole ways, so lines run off the edge), thinned by the box's size."""
        span = bbox.diagonal_m()
        kinds = {"major"}
        if span <= SECONDARY_MAX_SPAN_M:
            kinds.add("secondary")
        if span <= MINOR_MAX_SPAN_M:
            kinds.add("minor")
        order = {"major": 0, "secondary": 1, "minor": 2}
        hits = [
            w
            for w in self._ways
            if w.kind in kinds
            and w.north >= bbox.south
            and w.south <= bbox.north
            and w.east >= bbox.west
            and w.west <= bbox.east
        ]
        hits.sort(key=lambda w: order[w.kind])
        out: list[WayPublic] = []
        total = 0
        truncated = False
        for w in hits:
            if total + len(w.lat) > max_points:
                truncated = True
                break
            total += len(w.lat)
            points = [(round(float(a), 5), round(float(b), 5)) for a, b in zip(w.lat, w.lon, strict=True)]
            out.append(WayPublic(kind=w.kind, points=points))
        return RoadsPublic(
            bbox=(bbox.south, bbox.west, bbox.north, bbox.east), ways=out, truncated=truncated, source=self.source
        )
