"""Road routing on the real Monaco OSM extract (pyosmium -> scipy.sparse -> Dijkstra)."""

from __future__ import annotations

import logging
import statistics
import time

import pytest

from dispatch.errors import OutsideNetworkError
from dispatch.geo import haversine_m
from dispatch.hospitals import DATA_DIR, HospitalRegistry
from dispatch.routing import RoadRouter, parse_maxspeed_kmh

logger = logging.getLogger(__name__)

# Boulevard Rainier III (OSM way 176531067, highway=secondary, oneway=yes): its first and last node.
RAINIER_III_START = (43.7320057, 7.4164982)
RAINIER_III_END = (43.7313991, 7.4158592)


@pytest.fixture(scope="module")
def router() -> RoadRouter:
    return RoadRouter.from_pbf(DATA_DIR / "monaco.osm.pbf")


@pytest.fixture(scope="module")
def registry() -> HospitalRegistry:
    return HospitalRegistry.load()


@pytest.mark.parametrize(
    ("raw", "kmh"),
    [
        ("50", 50.0),
        ("30 mph", 48.28),
        ("FR:urban", 50.0),
        ("FR:rural", 80.0),
        ("walk", 6.0),
        ("none", None),
        ("signals", None),
        (None, None),
        ("50;30", 50.0),
        ("0", None),
    ],
)
def test_parse_maxspeed(raw: str | None, kmh: float | None) -> None:
    got = parse_maxspeed_kmh(raw)
    assert got == kmh if kmh is None else got == pytest.approx(kmh, abs=0.01)


def test_graph_size_and_build_time(router: RoadRouter) -> None:
    logger.info("measured build_time_s=%s", round(router.build_time_s, 3))
    logger.info("measured nodes=%s", router.n_nodes)
    logger.info("measured edges=%s", router.n_edges)
    assert router.n_nodes > 10_000
    assert router.n_edges > router.n_nodes
    assert router.build_time_s < 10


def test_routes_between_every_pair_of_hospitals(router: RoadRouter, registry: HospitalRegistry) -> None:
    hospitals = registry.hospitals()
    timings_ms = []
    for a in hospitals:
        for b in hospitals:
            if a is b:
                continue
            started = time.perf_counter()
            route = router.route(a.position_deg, b.position_deg)
            timings_ms.append((time.perf_counter() - started) * 1000)
            straight_m = haversine_m(a.position_deg, b.position_deg)
            assert route.distance_m >= straight_m
            assert route.distance_m < 3 * straight_m + 500  # plausible detour factor on a coastal road net
            assert route.points_deg[0] == a.position_deg
            assert route.points_deg[-1] == b.position_deg
            speed_kmh = route.distance_m / route.duration_s * 3.6
            assert 15 < speed_kmh < 130
    logger.info("measured route_query_median_ms=%s", round(statistics.median(timings_ms), 2))


def test_chpg_to_ccm_is_a_short_city_drive(router: RoadRouter, registry: HospitalRegistry) -> None:
    route = router.route(registry.get("MC-CHPG").position_deg, registry.get("MC-CCM").position_deg)
    assert 1_347 <= route.distance_m < 4_000
    assert 60 < route.duration_s < 600


def test_one_way_street_is_respected(router: RoadRouter) -> None:
    forward = router.route(RAINIER_III_START, RAINIER_III_END)
    backward = router.route(RAINIER_III_END, RAINIER_III_START)
    assert forward.distance_m < 150  # along the one-way street
    assert backward.distance_m > 10 * forward.distance_m  # must go round


def test_eta_to_many_matches_single_routes(router: RoadRouter, registry: HospitalRegistry) -> None:
    start = registry.get("MC-CHPG").position_deg
    targets = [h.position_deg for h in registry.hospitals()]
    etas = router.eta_s_to_many(start, [*targets, (48.85, 2.35)])  # the last one is Paris: off the network
    assert etas[-1] is None
    for target, eta in zip(targets, etas[:-1], strict=True):
        assert eta == pytest.approx(router.route(start, target).duration_s, rel=1e-6)


def test_eta_from_many_on_the_transposed_graph_matches_single_routes(
    router: RoadRouter, registry: HospitalRegistry
) -> None:
    """Units -> incident: one reverse search gives each source's time to the target, one-way streets respected."""
    target = registry.get("MC-CCM").position_deg
    sources = [h.position_deg for h in registry.hospitals()]
    etas = router.eta_s_from_many([*sources, (48.85, 2.35)], target)
    assert etas[-1] is None
    for source, eta in zip(sources, etas[:-1], strict=True):
        assert eta == pytest.approx(router.route(source, target).duration_s, rel=1e-6)
    # a one-way pair: to and from differ, and each matches its own direction
    a, b = registry.get("MC-CHPG").position_deg, target
    assert router.eta_s_from_many([a], b)[0] == pytest.approx(router.eta_s_to_many(a, [b])[0], rel=1e-6)


def test_point_off_the_network_raises(router: RoadRouter) -> None:
    with pytest.raises(OutsideNetworkError) as info:
        router.route((43.60, 7.40), (43.7304054, 7.4114082))  # 14 km out at sea
    assert info.value.snap_distance_m > router.max_snap_m
    with pytest.raises(OutsideNetworkError):
        router.snap((float("nan"), 7.41))


def test_baltimore_graph_from_the_shared_data() -> None:
    """A second, US city: build and query times on Valhalla's Baltimore extract; JHH -> Bayview by road."""
    from conftest import shared_data

    pbf = shared_data("osm/baltimore.osm.pbf")
    baltimore = RoadRouter.from_pbf(pbf)
    registry = HospitalRegistry.load((DATA_DIR / "baltimore_hospitals.csv",))
    jhh, bayview = registry.get("BA-JHH").position_deg, registry.get("BA-JHBMC").position_deg
    started = time.perf_counter()
    route = baltimore.route(jhh, bayview)
    query_ms = (time.perf_counter() - started) * 1000
    logger.info("measured baltimore_build_time_s=%s", round(baltimore.build_time_s, 3))
    logger.info("measured baltimore_nodes=%s", baltimore.n_nodes)
    logger.info("measured baltimore_route_ms=%s", round(query_ms, 2))
    assert route.distance_m >= haversine_m(jhh, bayview)
    assert 120 < route.duration_s < 1_200
    etas = baltimore.eta_s_to_many(jhh, [h.position_deg for h in registry.hospitals()])
    assert all(eta is not None for eta in etas)
