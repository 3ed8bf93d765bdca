"""Road routing on an OpenStreetMap extract: a directed graph of drivable ways, shortest travel time by Dijkstra.

Build (:meth:`RoadRouter.from_pbf`): one pass over the PBF with pyosmium (node locations cached), keeping ways
whose ``highway`` class a vehicle may use (:data:`DEFAULT_SPEEDS_KMH`), each pair of consecutive way nodes one
edge.  One-way handling follows the OSM wiki ``Key:oneway``: ``oneway=yes|true|1`` forward only, ``-1`` reverse
only, ``junction=roundabout|circular`` and ``highway=motorway`` imply one-way unless ``oneway=no``.
Edge speed is ``maxspeed`` when tagged, else the class default of the OSRM car profile
(``profiles/car.lua``), times an emergency-vehicle factor (an assumption, default 1.2, capped at
:data:`MAX_SPEED_KMH`).  The graph is a ``scipy.sparse`` CSR matrix of travel times in seconds, restricted to
its largest strongly connected component so that every snapped pair of points has a route.

Query: points snap to the nearest graph node with a ``scipy.spatial.cKDTree`` on locally projected metres;
``scipy.sparse.csgraph.dijkstra`` gives travel times from one source to every node, so an ETA to many
hospitals costs one search (:meth:`RoadRouter.eta_s_to_many`).  The stretch between a point and its snapped
node is added as a straight line at :data:`ACCESS_SPEED_MPS`.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import osmium
from numpy.typing import NDArray
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, dijkstra
from scipy.spatial import cKDTree

from dispatch.errors import NoRouteError, OutsideNetworkError
from dispatch.geo import EARTH_RADIUS_M, LocalProjection

__all__ = [
    "ACCESS_SPEED_MPS",
    "DEFAULT_SPEEDS_KMH",
    "MAX_SPEED_KMH",
    "RoadRouter",
    "Route",
    "parse_maxspeed_kmh",
]

logger = logging.getLogger(__name__)

DEFAULT_SPEEDS_KMH: dict[str, float] = {
    "motorway": 90,
    "motorway_link": 45,
    "trunk": 85,
    "trunk_link": 40,
    "primary": 65,
    "primary_link": 30,
    "secondary": 55,
    "secondary_link": 25,
    "tertiary": 40,
    "tertiary_link": 20,
    "unclassified": 25,
    "residential": 25,
    "living_street": 10,
    "service": 15,
    "road": 20,
}
"""Routable ``highway`` classes and their default speeds, from the OSRM car profile (``profiles/car.lua``).
Classes not listed (footway, steps, path, pedestrian, track, cycleway, construction...) are not routable."""

MAX_SPEED_KMH = 130.0
"""Upper bound of any edge speed after the emergency factor."""

ACCESS_SPEED_MPS = 15 / 3.6
"""Speed assumed off the graph, between a point and its snapped node (the OSRM ``service`` speed)."""

MIN_EDGE_TIME_S = 1e-3
"""Floor for an edge's travel time: a zero entry in a sparse matrix would read as "no edge"."""

_ONEWAY_FORWARD = {"yes", "true", "1"}
_ONEWAY_REVERSE = {"-1", "reverse"}
_IMPLIED_ONEWAY_JUNCTIONS = {"roundabout", "circular"}
_BLOCKED_ACCESS = {"no"}
_EMERGENCY_ALLOWED = {"yes", "designated", "permissive"}
_ZONE_SPEEDS_KMH = {"urban": 50.0, "rural": 80.0, "motorway": 130.0, "trunk": 110.0, "walk": 6.0, "zone30": 30.0}
_SPEED_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(mph|km/h|kmh|kph)?\s*$", re.IGNORECASE)


def parse_maxspeed_kmh(value: str | None) -> float | None:
    """Parse an OSM ``maxspeed`` value (``"50"``, ``"30 mph"``, ``"FR:urban"``, ``"walk"``) into km/h.

    Returns ``None`` for missing, ``none``/``signals``/``variable`` and anything unparseable
    (OSM wiki ``Key:maxspeed``).
    """
    if not value:
        return None
    text = value.split(";")[0].strip().lower()
    match = _SPEED_RE.match(text)
    if match:
        speed = float(match.group(1))
        if match.group(2) and match.group(2).lower() == "mph":
            speed *= 1.609344
        return speed if speed > 0 else None
    zone = text.split(":")[-1]
    return _ZONE_SPEEDS_KMH.get(zone)


@dataclass(frozen=True, slots=True)
class Route:
    """A road route: ``points_deg`` [(lat, lon), ...] from start to end, ``distance_m`` along the road,
    ``duration_s`` of emergency driving (including the off-road access stretches at both ends)."""

    points_deg: list[tuple[float, float]]
    distance_m: float
    duration_s: float


class _WayCollector:
    """Accumulates edges from the ways of one PBF pass."""

    def __init__(self, emergency_factor: float) -> None:
        self.factor = emergency_factor
        self.node_index: dict[int, int] = {}
        self.lat: list[float] = []
        self.lon: list[float] = []
        self.src: list[int] = []
        self.dst: list[int] = []
        self.speed_kmh: list[float] = []
        self.ways = 0

    def _index(self, ref: int, lat: float, lon: float) -> int:
        idx = self.node_index.get(ref)
        if idx is None:
            idx = len(self.lat)
            self.node_index[ref] = idx
            self.lat.append(lat)
            self.lon.append(lon)
        return idx

    def way(self, w: osmium.osm.Way) -> None:
        tags = w.tags
        highway = tags.get("highway")
        if highway not in DEFAULT_SPEEDS_KMH or tags.get("area") == "yes":
            return
        emergency_ok = tags.get("emergency") in _EMERGENCY_ALLOWED
        if not emergency_ok and (tags.get("access") in _BLOCKED_ACCESS or tags.get("motor_vehicle") in _BLOCKED_ACCESS):
            return
        oneway = (tags.get("oneway") or "").lower()
        forward, backward = True, True
        if oneway in _ONEWAY_FORWARD:
            backward = False
        elif oneway in _ONEWAY_REVERSE:
            forward = False
        elif oneway != "no" and (highway == "motorway" or tags.get("junction") in _IMPLIED_ONEWAY_JUNCTIONS):
            backward = False
        speed = parse_maxspeed_kmh(tags.get("maxspeed")) or DEFAULT_SPEEDS_KMH[highway]
        speed = min(speed * self.factor, MAX_SPEED_KMH)
        ids: list[int] = []
        for node in w.nodes:
            loc = node.location
            if not loc.valid():
                continue
            ids.append(self._index(node.ref, loc.lat, loc.lon))
        if len(ids) < 2:
            return
        self.ways += 1
        for a, b in itertools.pairwise(ids):
            if a == b:
                continue
            if forward:
                self.src.append(a)
                self.dst.append(b)
                self.speed_kmh.append(speed)
            if backward:
                self.src.append(b)
                self.dst.append(a)
                self.speed_kmh.append(speed)


def _haversine_arrays_m(
    lat1: NDArray[np.float64], lon1: NDArray[np.float64], lat2: NDArray[np.float64], lon2: NDArray[np.float64]
) -> NDArray[np.float64]:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lon2 - lon1) / 2) ** 2
    return np.asarray(2 * EARTH_RADIUS_M * np.arcsin(np.minimum(1.0, np.sqrt(h))), dtype=np.float64)


class RoadRouter:
    """Shortest-time routing on a road graph; build with :meth:`from_pbf`.

    Attributes:
        n_nodes, n_edges: size of the routable graph (largest strongly connected component).
        build_time_s: wall time of :meth:`from_pbf`.
        max_snap_m: points farther than this from every graph node raise OutsideNetworkError.
    """

    def __init__(
        self,
        lat_deg: NDArray[np.float64],
        lon_deg: NDArray[np.float64],
        time_s: csr_matrix,
        distance_m: csr_matrix,
        *,
        max_snap_m: float = 1_000.0,
        build_time_s: float = 0.0,
    ) -> None:
        self._lat = lat_deg
        self._lon = lon_deg
        self._time = time_s
        self._dist = distance_m
        self._proj = LocalProjection(float(np.mean(lat_deg)))
        self._tree = cKDTree(self._proj.project(lat_deg, lon_deg))
        self.max_snap_m = max_snap_m
        self.build_time_s = build_time_s
        self.n_nodes = int(lat_deg.shape[0])
        self.n_edges = int(time_s.nnz)
        self._time_reversed: csr_matrix | None = None

    @classmethod
    def from_pbf(cls, path: Path, *, emergency_factor: float = 1.2, max_snap_m: float = 1_000.0) -> RoadRouter:
        """Build the router from an OSM PBF file (a few seconds for a city extract; see the module docstring).

        Raises:
            ValueError: the file holds no routable road; OSError/RuntimeError from pyosmium for unreadable files.
        """
        started = time.perf_counter()
        collector = _WayCollector(emergency_factor)
        processor = osmium.FileProcessor(str(path), osmium.osm.NODE | osmium.osm.WAY).with_locations()
        for obj in processor:
            if isinstance(obj, osmium.osm.Way):
                collector.way(obj)
        if not collector.src:
            raise ValueError("no routable roads in the extract")
        lat = np.asarray(collector.lat, dtype=np.float64)
        lon = np.asarray(collector.lon, dtype=np.float64)
        src = np.asarray(collector.src, dtype=np.int64)
        dst = np.asarray(collector.dst, dtype=np.int64)
        dist_m = _haversine_arrays_m(lat[src], lon[src], lat[dst], lon[dst])
        time_s = np.maximum(dist_m / (np.asarray(collector.speed_kmh) / 3.6), MIN_EDGE_TIME_S)
        # Parallel edges (two ways sharing a segment): keep the fastest, never the sum a COO->CSR conversion makes.
        order = np.lexsort((time_s, dst, src))
        src, dst, dist_m, time_s = src[order], dst[order], dist_m[order], time_s[order]
        first = np.ones(src.shape[0], dtype=bool)
        first[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
        src, dst, dist_m, time_s = src[first], dst[first], dist_m[first], time_s[first]
        n = lat.shape[0]
        graph = csr_matrix((time_s, (src, dst)), shape=(n, n))
        # Keep the largest strongly connected component: a snapped point must be able to reach and be reached.
        _, labels = connected_components(graph, directed=True, connection="strong")
        keep = labels == np.bincount(labels).argmax()
        remap = np.full(n, -1, dtype=np.int64)
        remap[keep] = np.arange(int(keep.sum()))
        edge_keep = keep[src] & keep[dst]
        s2, d2 = remap[src[edge_keep]], remap[dst[edge_keep]]
        m = int(keep.sum())
        time_csr = csr_matrix((time_s[edge_keep], (s2, d2)), shape=(m, m))
        dist_csr = csr_matrix((np.maximum(dist_m[edge_keep], MIN_EDGE_TIME_S), (s2, d2)), shape=(m, m))
        router = cls(lat[keep], lon[keep], time_csr, dist_csr, max_snap_m=max_snap_m)
        router.build_time_s = time.perf_counter() - started
        logger.info(
            "road graph built ways=%d nodes=%d edges=%d in %.2f s",
            collector.ways,
            router.n_nodes,
            router.n_edges,
            router.build_time_s,
        )
        return router

    # --- queries --------------------------------------------------------------------------------------------------

    def snap(self, point_deg: tuple[float, float]) -> tuple[int, float]:
        """Nearest graph node to (lat, lon) degrees: ``(node_index, distance_m)``.

        Raises:
            OutsideNetworkError: farther than ``max_snap_m`` from the graph, or not a finite coordinate.
        """
        lat, lon = point_deg
        if not (math.isfinite(lat) and math.isfinite(lon)):
            raise OutsideNetworkError(point_deg, math.inf)
        xy = self._proj.project(np.array([lat]), np.array([lon]))[0]
        distance_m, index = self._tree.query(xy)
        if distance_m > self.max_snap_m:
            raise OutsideNetworkError(point_deg, float(distance_m))
        return int(index), float(distance_m)

    def graph_arrays(
        self,
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]]:
        """``(lat_deg, lon_deg, src, dst)``: node coordinates, shape (n_nodes,), and directed edges as node index
        arrays, shape (n_edges,).  Read-only views for drawing the network (:mod:`dispatch.roadmap`)."""
        coo = self._time.tocoo()
        return self._lat, self._lon, coo.row.astype(np.int64), coo.col.astype(np.int64)

    def node_deg(self, index: int) -> tuple[float, float]:
        """(lat, lon) of a graph node."""
        return (float(self._lat[index]), float(self._lon[index]))

    def route(self, from_deg: tuple[float, float], to_deg: tuple[float, float]) -> Route:
        """The fastest road route between two (lat, lon) points in degrees.

        Raises:
            OutsideNetworkError: a point is off the network; NoRouteError: no directed path (cannot happen
            inside one strongly connected component, kept as a guard).
        """
        src, src_off_m = self.snap(from_deg)
        dst, dst_off_m = self.snap(to_deg)
        times, pred = dijkstra(self._time, directed=True, indices=src, return_predecessors=True)
        if not np.isfinite(times[dst]):
            raise NoRouteError("no directed path between the snapped nodes")
        path = [dst]
        while path[-1] != src:
            path.append(int(pred[path[-1]]))
            if path[-1] < 0:
                raise NoRouteError("broken predecessor chain")
        path.reverse()
        idx = np.asarray(path, dtype=np.int64)
        road_m = float(np.asarray(self._dist[idx[:-1], idx[1:]]).sum()) if idx.shape[0] > 1 else 0.0
        points = [(float(self._lat[i]), float(self._lon[i])) for i in path]
        points = [tuple(from_deg), *points, tuple(to_deg)]  # type: ignore[list-item]
        off_m = src_off_m + dst_off_m
        return Route(
            points_deg=points,
            distance_m=road_m + off_m,
            duration_s=float(times[dst]) + off_m / ACCESS_SPEED_MPS,
        )

    def eta_s_to_many(
        self, from_deg: tuple[float, float], targets_deg: Sequence[tuple[float, float]]
    ) -> list[float | None]:
        """Driving time in seconds from one point to each target, by one Dijkstra search.

        Returns one entry per target, ``None`` for a target off the network.
        Raises OutsideNetworkError if ``from_deg`` itself is off the network.
        """
        src, src_off_m = self.snap(from_deg)
        times = dijkstra(self._time, directed=True, indices=src)
        out: list[float | None] = []
        for target in targets_deg:
            try:
                dst, dst_off_m = self.snap(target)
            except OutsideNetworkError:
                out.append(None)
                continue
            t = float(times[dst])
            out.append(t + (src_off_m + dst_off_m) / ACCESS_SPEED_MPS if math.isfinite(t) else None)
        return out

    def eta_s_from_many(
        self, sources_deg: Sequence[tuple[float, float]], to_deg: tuple[float, float]
    ) -> list[float | None]:
        """Driving time in seconds from each source to one point, by one Dijkstra search on the transposed graph.

        The units -> incident question: a search from the incident over reversed edges gives every node's time
        *to* the incident, respecting one-way streets.  Returns one entry per source, ``None`` for a source off
        the network.  Raises OutsideNetworkError if ``to_deg`` itself is off the network.
        """
        dst, dst_off_m = self.snap(to_deg)
        if self._time_reversed is None:
            self._time_reversed = self._time.transpose().tocsr()
        times = dijkstra(self._time_reversed, directed=True, indices=dst)
        out: list[float | None] = []
        for source in sources_deg:
            try:
                src, src_off_m = self.snap(source)
            except OutsideNetworkError:
                out.append(None)
                continue
            t = float(times[src])
            out.append(t + (src_off_m + dst_off_m) / ACCESS_SPEED_MPS if math.isfinite(t) else None)
        return out
