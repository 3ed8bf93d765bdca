"""The OSRM adapter speaks OSRM's HTTP API v1 (answers faked by an httpx MockTransport: a unit test) and satisfies
the same Router interface as the embedded router."""

from __future__ import annotations

import httpx
import pytest

from dispatch.errors import NoRouteError, OutsideNetworkError, RoutingError
from dispatch.external_routing import OsrmRouter, Router
from dispatch.hospitals import DATA_DIR
from dispatch.routing import RoadRouter

CHPG = (43.7304054, 7.4114082)
CCM = (43.7376303, 7.4248591)


def _router(handler: httpx.MockTransport) -> OsrmRouter:
    return OsrmRouter("http://osrm.test:5000", client=httpx.Client(transport=handler), emergency_factor=1.25)


def test_route_asks_lon_lat_and_returns_lat_lon_with_emergency_time() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        geometry = {"type": "LineString", "coordinates": [[CHPG[1], CHPG[0]], [7.42, 43.734], [CCM[1], CCM[0]]]}
        return httpx.Response(200, json={"code": "Ok", "routes": [{"distance": 2400.0, "duration": 250.0,
                                                                    "geometry": geometry}]})  # fmt: skip

    route = _router(httpx.MockTransport(handle)).route(CHPG, CCM)
    assert seen[0].url.path == "/route/v1/driving/7.411408,43.730405;7.424859,43.737630"
    assert seen[0].url.params["geometries"] == "geojson"
    assert route.points_deg[0] == CHPG
    assert route.points_deg[-1] == CCM
    assert route.distance_m == 2400.0
    assert route.duration_s == pytest.approx(200.0)


def test_one_table_request_for_many_units_to_an_incident() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.params["sources"] == "0;1;2"
        assert request.url.params["destinations"] == "3"
        return httpx.Response(200, json={"code": "Ok", "durations": [[125.0], [None], [250.0]]})

    router = _router(httpx.MockTransport(handle))
    assert router.eta_s_from_many([CHPG, (43.75, 7.44), CCM], (43.74, 7.43)) == [100.0, None, 200.0]


def test_engine_errors_become_routing_errors() -> None:
    answers = iter(
        [
            httpx.Response(400, json={"code": "NoSegment", "message": "Could not find a matching segment"}),
            httpx.Response(200, json={"code": "NoRoute"}),
            httpx.Response(500, text="<html>bad gateway</html>"),
            httpx.Response(200, json={"code": "Ok", "durations": [[1.0, 2.0]]}),
        ]
    )
    router = _router(httpx.MockTransport(lambda _: next(answers)))
    with pytest.raises(OutsideNetworkError):
        router.route(CHPG, CCM)
    with pytest.raises(NoRouteError):
        router.route(CHPG, CCM)
    with pytest.raises(RoutingError):
        router.route(CHPG, CCM)
    with pytest.raises(RoutingError, match="wrong shape"):
        router.eta_s_to_many(CHPG, [CCM])


def test_unreachable_engine_and_bad_coordinates() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    router = _router(httpx.MockTransport(refuse))
    with pytest.raises(RoutingError, match="unreachable"):
        router.route(CHPG, CCM)
    with pytest.raises(OutsideNetworkError):
        router.route((91.0, 0.0), CCM)


def test_both_routers_satisfy_the_one_interface() -> None:
    assert isinstance(_router(httpx.MockTransport(lambda _: httpx.Response(200))), Router)
    assert isinstance(RoadRouter.from_pbf(DATA_DIR / "monaco.osm.pbf"), Router)
