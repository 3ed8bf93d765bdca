"""The road network as simplified polylines for the dispatcher console's canvas map.  Pure, no I/O.

The router's directed edges are folded into undirected segments, chained into polylines through nodes of degree
two (a polyline ends at every junction and dead end), and each polyline is simplified by Douglas-Peucker
(Douglas & Peucker 1973) in local metres with a tolerance of :data:`DEFAULT_TOLERANCE_M`.  Coordinates are
rounded to 5 decimals (about 1 m).  The result is computed once per router and cached by the API.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from dispatch.geo import LocalProjection
from dispatch.routing import RoadRouter

__all__ = ["DEFAULT_TOLERANCE_M", "RoadMap", "road_map", "simplify"]

DEFAULT_TOLERANCE_M = 4.0
"""Douglas-Peucker tolerance in metres: invisible at city scale on a 1920 px screen, a third of the points."""


@dataclass(frozen=True, slots=True)
class RoadMap:
    """Polylines ``[[[lat, lon], ...], ...]`` in degrees, the bounding box, and point counts before/after."""

    polylines: list[list[tuple[float, float]]]
    min_lat_deg: float
    min_lon_deg: float
    max_lat_deg: float
    max_lon_deg: float
    points_in: int
    points_out: int


def simplify(xy_m: NDArray[np.float64], tolerance_m: float) -> list[int]:
    """Indices of the points Douglas-Peucker keeps for a polyline ``xy_m`` of shape (n, 2) in metres."""
    n = xy_m.shape[0]
    if n <= 2:
        return list(range(n))
    keep = np.zeros(n, dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        first, last = stack.pop()
        if last - first < 2:
            continue
        a, b = xy_m[first], xy_m[last]
        seg = b - a
        pts = xy_m[first + 1 : last] - a
        length = float(np.hypot(seg[0], seg[1]))
        if length == 0.0:
            dist = np.hypot(pts[:, 0], pts[:, 1])
        else:
            dist = np.abs(seg[0] * pts[:, 1] - seg[1] * pts[:, 0]) / length
        i = int(np.argmax(dist))
        if dist[i] > tolerance_m:
            mid = first + 1 + i
            keep[mid] = True
            stack.append((first, mid))
            stack.append((mid, last))
    return [int(i) for i in np.flatnonzero(keep)]


def road_map(router: RoadRouter, tolerance_m: float = DEFAULT_TOLERANCE_M) -> RoadMap:
    """The router's network as simplified polylines (see the module docstring)."""
    lat, lon, src, dst = router.graph_arrays()
    a, b = np.minimum(src, dst), np.maximum(src, dst)
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    neighbours: dict[int, list[int]] = defaultdict(list)
    for u, v in pairs.tolist():
        neighbours[u].append(v)
        neighbours[v].append(u)
    used: set[tuple[int, int]] = set()
    chains: list[list[int]] = []

    def walk(start: int, nxt: int) -> list[int]:
        chain = [start, nxt]
        used.add((min(start, nxt), max(start, nxt)))
        prev, cur = start, nxt
        while len(neighbours[cur]) == 2 and cur != start:
            step = neighbours[cur][0] if neighbours[cur][1] == prev else neighbours[cur][1]
            key = (min(cur, step), max(cur, step))
            if key in used:
                break
            used.add(key)
            chain.append(step)
            prev, cur = cur, step
        return chain

    for node in sorted(neighbours):
        if len(neighbours[node]) == 2:
            continue
        for nxt in neighbours[node]:
            if (min(node, nxt), max(node, nxt)) not in used:
                chains.append(walk(node, nxt))
    for node in sorted(neighbours):  # closed loops of degree-two nodes only
        for nxt in neighbours[node]:
            if (min(node, nxt), max(node, nxt)) not in used:
                chains.append(walk(node, nxt))
    projection = LocalProjection(float(np.mean(lat)))
    polylines: list[list[tuple[float, float]]] = []
    points_in = 0
    for chain in chains:
        idx = np.asarray(chain, dtype=np.int64)
        points_in += idx.shape[0]
        kept = idx[simplify(projection.project(lat[idx], lon[idx]), tolerance_m)]
        polylines.append([(round(float(lat[i]), 5), round(float(lon[i]), 5)) for i in kept])
    return RoadMap(
        polylines=polylines,
        min_lat_deg=float(lat.min()),
        min_lon_deg=float(lon.min()),
        max_lat_deg=float(lat.max()),
        max_lon_deg=float(lon.max()),
        points_in=points_in,
        points_out=sum(len(p) for p in polylines),
    )
