"""Header matches on routes: xDS conversion (accepted and NACKed), matcher semantics, first match
wins, and a canary route (``x-canary: 1`` to a subset cluster) through the connection manager."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import range_pb2

from sidecar.config import (
    ClusterConfig,
    EndpointConfig,
    HeaderMatch,
    Route,
    RouteConfig,
    VirtualHost,
    WeightedCluster,
)
from sidecar.proxy.context import ListenerContext
from sidecar.proxy.router import Router, head_of
from sidecar.upstream.cluster import ClusterManager
from sidecar.xds import convert
from sidecar.xds.convert import XdsError
from tests.support.fakes import FakeConnector, async_test, until
from tests.unit.test_http_proxy import OK, Client, parse_responses

V1 = "outbound|catalog.default|v1"
V2 = "outbound|catalog.default|v2"
HM = route_components_pb2.HeaderMatcher
SM = string_pb2.StringMatcher


def route_config(*headers: route_components_pb2.HeaderMatcher, split: bool = True) -> route_pb2.RouteConfiguration:
    """What the control plane sends for a canary: the header route first, then the default route,
    v1 75% / v2 25% (or v1 alone without ``split``)."""
    canary = route_components_pb2.Route(
        name="canary", match=route_components_pb2.RouteMatch(prefix="/", headers=list(headers)),
        route=route_components_pb2.RouteAction(cluster=V2))
    action = route_components_pb2.RouteAction(cluster=V1)
    if split:
        action = route_components_pb2.RouteAction(weighted_clusters=route_components_pb2.WeightedCluster(clusters=[
            route_components_pb2.WeightedCluster.ClusterWeight(name=V1, weight={"value": 75}),
            route_components_pb2.WeightedCluster.ClusterWeight(name=V2, weight={"value": 25})]))
    default = route_components_pb2.Route(name="default", match=route_components_pb2.RouteMatch(prefix="/"), route=action)
    return route_pb2.RouteConfiguration(name="outbound", virtual_hosts=[route_components_pb2.VirtualHost(
        name="catalog.default", domains=["catalog", "catalog.default"], routes=[canary, default])])


def converted(*headers: route_components_pb2.HeaderMatcher) -> tuple[HeaderMatch, ...]:
    return convert.route_configuration(route_config(*headers)).virtual_hosts[0].routes[0].headers


# --- conversion ----------------------------------------------------------------------------------


@pytest.mark.parametrize("matcher, expected", [
    (HM(name="x-canary", string_match=SM(exact="1")), HeaderMatch("x-canary", exact="1")),
    (HM(name="X-Canary", string_match=SM(exact="")), HeaderMatch("x-canary", exact="")),
    (HM(name="x-user", string_match=SM(prefix="Ann", ignore_case=True)),
     HeaderMatch("x-user", prefix="Ann", ignore_case=True)),
    (HM(name="x-canary", present_match=True), HeaderMatch("x-canary", present=True)),
    (HM(name="x-canary", present_match=False), HeaderMatch("x-canary", present=False)),
    (HM(name="x-canary", string_match=SM(exact="1"), invert_match=True),
     HeaderMatch("x-canary", exact="1", invert=True)),
    (HM(name="x-canary"), HeaderMatch("x-canary", present=True)),  # no specifier: Envoy's presence match
    (HM(name="x-canary", exact_match="1"), HeaderMatch("x-canary", exact="1")),  # deprecated fields
    (HM(name="x-canary", exact_match=""), HeaderMatch("x-canary", present=True)),  # Envoy: any value
    (HM(name="x-canary", prefix_match="1"), HeaderMatch("x-canary", prefix="1")),
    (HM(name=":method", string_match=SM(exact="POST")), HeaderMatch(":method", exact="POST")),
    (HM(name="content-length", string_match=SM(exact="0")), HeaderMatch("content-length", exact="0")),
])
def test_conversion_accepts_the_supported_matchers(matcher: HM, expected: HeaderMatch) -> None:
    assert converted(matcher) == (expected,)


def test_conversion_keeps_every_matcher_of_a_route_in_order() -> None:
    got = converted(HM(name="x-a", string_match=SM(exact="1")), HM(name="x-b", present_match=True))
    assert got == (HeaderMatch("x-a", exact="1"), HeaderMatch("x-b", present=True))
    rc = convert.route_configuration(route_config(HM(name="x-a", string_match=SM(exact="1"))))
    assert rc.virtual_hosts[0].routes[1].headers == ()  # the default route matches on the path alone


@pytest.mark.parametrize("matcher, named", [
    (HM(name="x-canary", safe_regex_match=regex_pb2.RegexMatcher(regex="1.*")), "'safe_regex_match'"),
    (HM(name="x-canary", range_match=range_pb2.Int64Range(start=1, end=2)), "'range_match'"),
    (HM(name="x-canary", contains_match="1"), "'contains_match'"),
    (HM(name="x-canary", suffix_match="1"), "'suffix_match'"),
    (HM(name="x-canary", string_match=SM(exact="1"), treat_missing_header_as_empty=True),
     "'treat_missing_header_as_empty'"),
    (HM(name="x-canary", string_match=SM(suffix="1")), "string_match: field 'suffix'"),
    (HM(name="x-canary", string_match=SM(contains="1")), "string_match: field 'contains'"),
    (HM(name="x-canary", string_match=SM(safe_regex=regex_pb2.RegexMatcher(regex="1"))), "string_match: field 'safe_regex'"),
    (HM(name="x-canary", string_match=SM(ignore_case=True)), "string_match: needs exact or prefix"),
    (HM(name="x-canary", string_match=SM(prefix="")), "prefix must not be empty"),
    (HM(name="x-canary", prefix_match=""), "prefix must not be empty"),
    (HM(name=":authority", string_match=SM(exact="catalog")), "pseudo-header ':authority'"),
    (HM(name=":path", string_match=SM(prefix="/api")), "pseudo-header ':path'"),
    (HM(name=":method", string_match=SM(prefix="PO")), ":method may only be matched exactly"),
    (HM(name=":method", present_match=True), ":method may only be matched exactly"),
    (HM(name="x canary", present_match=True), "name 'x canary' is not a valid header name"),
    (HM(name="", present_match=True), "name '' is not a valid header name"),
    (HM(name="Host", string_match=SM(exact="catalog")), "header 'Host' is consumed by the sidecar"),
    (HM(name="connection", present_match=True), "header 'connection' is consumed by the sidecar"),
    (HM(name="traceparent", present_match=True), "header 'traceparent' is consumed by the sidecar"),
    (HM(name="x-request-id", present_match=True), "header 'x-request-id' is consumed by the sidecar"),
])
def test_conversion_nacks_unsupported_matchers_naming_the_route_and_the_field(matcher: HM, named: str) -> None:
    with pytest.raises(XdsError) as err:
        convert.route_configuration(route_config(HM(name="x-ok", present_match=True), matcher))
    message = str(err.value)
    assert "virtual_host 'catalog.default' route 'canary' match header" in message
    assert named in message


def test_other_route_match_fields_are_still_refused() -> None:
    rc = route_config(HM(name="x-canary", string_match=SM(exact="1")))
    rc.virtual_hosts[0].routes[0].match.query_parameters.add(name="canary", present_match=True)
    with pytest.raises(XdsError, match=r"route 'canary' match: field 'query_parameters'"):
        convert.route_configuration(rc)


@pytest.mark.parametrize("kwargs", [
    {"name": "X-Canary", "exact": "1"},  # config names are lower-case (convert lower-cases them)
    {"name": "x-canary"},
    {"name": "x-canary", "exact": "1", "present": True},
    {"name": "x-canary", "prefix": ""},
    {"name": ":authority", "exact": "catalog"},
    {"name": ":method", "present": True},
])
def test_header_match_config_refuses_what_it_cannot_mean(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        HeaderMatch(**kwargs)


@pytest.mark.parametrize("name", ["host", "connection", "transfer-encoding", "expect", "b3", "x-request-id"])
def test_router_refuses_headers_the_connection_manager_consumes(name: str) -> None:
    with pytest.raises(ValueError, match="consumes"):
        Router(RouteConfig("r", (VirtualHost("v", ("*",), (Route("/", "c", headers=(HeaderMatch(name, present=True),)),)),)))


# --- matcher semantics -----------------------------------------------------------------------------


def matches(match: HeaderMatch, headers: list[tuple[str, str]], method: str = "GET") -> bool:
    """Whether a route with only ``match`` takes a request with ``headers``."""
    router = Router(RouteConfig("r", (VirtualHost("v", ("*",), (
        Route("/", "hit", headers=(match,)), Route("/", "miss"))),)))
    route = router.lookup("x", "/", headers, method)
    assert route is not None
    return route.cluster == "hit"


CANARY = [("x-canary", "1")]
ABSENT: list[tuple[str, str]] = [("x-other", "1")]


@pytest.mark.parametrize("match, headers, expected", [
    # exact: byte for byte, names case-insensitive, whitespace around the value ignored
    (HeaderMatch("x-canary", exact="1"), CANARY, True),
    (HeaderMatch("x-canary", exact="1"), [("X-CANARY", "1 \t")], True),
    (HeaderMatch("x-canary", exact="1"), [("x-canary", "10")], False),
    (HeaderMatch("x-canary", exact="1"), ABSENT, False),
    (HeaderMatch("x-canary", exact=""), [("x-canary", "")], True),
    (HeaderMatch("x-canary", exact=""), [("x-canary", "1")], False),
    (HeaderMatch("x-canary", exact="yes"), [("x-canary", "YES")], False),
    (HeaderMatch("x-canary", exact="yes", ignore_case=True), [("x-canary", "YES")], True),
    (HeaderMatch("x-canary", exact="Yes", ignore_case=True), [("x-canary", "yEs")], True),
    # a name that is a prefix or an extension of another is a different header
    (HeaderMatch("x-canary", exact="1"), [("x-canary-x", "1"), ("x-canar", "1")], False),
    # prefix
    (HeaderMatch("x-user", prefix="ann"), [("x-user", "anna")], True),
    (HeaderMatch("x-user", prefix="ann"), [("x-user", "an")], False),
    (HeaderMatch("x-user", prefix="ann"), [("x-user", "Anna")], False),
    (HeaderMatch("x-user", prefix="ann", ignore_case=True), [("x-user", "ANNA")], True),
    (HeaderMatch("x-user", prefix="ann"), ABSENT, False),
    # present
    (HeaderMatch("x-canary", present=True), [("x-canary", "")], True),
    (HeaderMatch("x-canary", present=True), ABSENT, False),
    (HeaderMatch("x-canary", present=False), ABSENT, True),
    (HeaderMatch("x-canary", present=False), CANARY, False),
    # invert: flips the outcome of a header that is there; a missing header still fails (Envoy)
    (HeaderMatch("x-canary", exact="1", invert=True), CANARY, False),
    (HeaderMatch("x-canary", exact="1", invert=True), [("x-canary", "2")], True),
    (HeaderMatch("x-canary", exact="1", invert=True), ABSENT, False),
    (HeaderMatch("x-user", prefix="ann", invert=True), [("x-user", "bob")], True),
    (HeaderMatch("x-canary", present=True, invert=True), ABSENT, True),
    (HeaderMatch("x-canary", present=True, invert=True), CANARY, False),
    (HeaderMatch("x-canary", present=False, invert=True), CANARY, True),
    # repeated header: any one value matching is enough (inverted: none may match)
    (HeaderMatch("x-canary", exact="1"), [("x-canary", "0"), ("x-canary", "1")], True),
    (HeaderMatch("x-canary", exact="1"), [("x-canary", "0, 1")], False),  # one value, not split on commas
    (HeaderMatch("x-canary", exact="1", invert=True), [("x-canary", "0"), ("x-canary", "1")], False),
    (HeaderMatch("x-canary", exact="1", invert=True), [("x-canary", "0"), ("x-canary", "2")], True),
    # content-length is forwarded, so it can be matched
    (HeaderMatch("content-length", exact="0"), [("Content-Length", "0")], True),
])
def test_header_match_semantics(match: HeaderMatch, headers: list[tuple[str, str]], expected: bool) -> None:
    assert matches(match, headers) is expected


@pytest.mark.parametrize("match, method, expected", [
    (HeaderMatch(":method", exact="POST"), "POST", True),
    (HeaderMatch(":method", exact="POST"), "GET", False),
    (HeaderMatch(":method", exact="post"), "POST", False),
    (HeaderMatch(":method", exact="post", ignore_case=True), "POST", True),
    (HeaderMatch(":method", exact="GET", invert=True), "POST", True),
    (HeaderMatch(":method", exact="GET", invert=True), "GET", False),
])
def test_method_pseudo_header_is_matched_exactly(match: HeaderMatch, method: str, expected: bool) -> None:
    assert matches(match, [("x-method", method)], method) is expected


def test_all_matchers_of_a_route_must_hold_and_the_prefix_too() -> None:
    router = Router(RouteConfig("r", (VirtualHost("v", ("*",), (
        Route("/api", "both", headers=(HeaderMatch("x-a", exact="1"), HeaderMatch("x-b", present=True))),
        Route("/", "rest"))),)))
    assert router.lookup("x", "/api/items", [("x-a", "1"), ("x-b", "")]).cluster == "both"
    assert router.lookup("x", "/api/items", [("x-b", ""), ("x-a", "1")]).cluster == "both"
    assert router.lookup("x", "/api/items", [("x-a", "1")]).cluster == "rest"
    assert router.lookup("x", "/api/items", [("x-a", "2"), ("x-b", "")]).cluster == "rest"
    assert router.lookup("x", "/other", [("x-a", "1"), ("x-b", "")]).cluster == "rest"


def test_first_matching_route_wins_in_order() -> None:
    red, blue = HeaderMatch("x-color", exact="red"), HeaderMatch("x-team", exact="blue")
    router = Router(RouteConfig("r", (VirtualHost("v", ("*",), (
        Route("/a", "red-a", headers=(red,)),
        Route("/", "blue", headers=(blue,)),
        Route("/", "red", headers=(red,)),
        Route("/", "default"),
        Route("/", "shadowed", headers=(HeaderMatch("x-never-reached", present=True),)),
    )),)))
    both = [("x-color", "red"), ("x-team", "blue")]
    assert router.lookup("x", "/a", both).cluster == "red-a"  # earlier route, though others match too
    assert router.lookup("x", "/b", both).cluster == "blue"
    assert router.lookup("x", "/b", [("x-color", "red")]).cluster == "red"
    assert router.lookup("x", "/a", [("x-team", "blue")]).cluster == "blue"
    assert router.lookup("x", "/a", []).cluster == "default"
    assert router.lookup("x", "/a", [("x-never-reached", "1")]).cluster == "default"  # after a catch-all


def test_no_route_when_header_routes_do_not_match() -> None:
    router = Router(RouteConfig("r", (VirtualHost("v", ("*",), (
        Route("/", "v2", headers=(HeaderMatch("x-canary", exact="1"),)),)),)))
    assert router.lookup("x", "/", CANARY).cluster == "v2"
    assert router.lookup("x", "/", []) is None
    assert router.resolve(b"x", b"/") is None  # no head given: no headers


class Untouchable(list):
    """A head that fails the test if anything reads it."""

    def __len__(self) -> int:
        raise AssertionError("the head was read")

    def __getitem__(self, index: Any) -> Any:
        raise AssertionError("the head was read")

    def __iter__(self) -> Any:
        raise AssertionError("the head was read")


def test_virtual_hosts_without_header_matches_never_read_the_head() -> None:
    router = Router(RouteConfig("r", (
        VirtualHost("plain", ("plain",), (Route("/api", "api"), Route("/", "plain"))),
        VirtualHost("canary", ("canary",), (Route("/", "v2", headers=(HeaderMatch("x-canary", exact="1"),)),
                                            Route("/", "v1"))),
    )))
    assert router.resolve(b"plain", b"/api/x", Untouchable(), b"GET").cluster() == "api"
    assert router.resolve(b"plain", b"/x", Untouchable(), b"GET").cluster() == "plain"
    with pytest.raises(AssertionError, match="the head was read"):  # the guard itself works
        router.resolve(b"canary", b"/", Untouchable(), b"GET")
    assert router.resolve(b"canary", b"/", head_of(CANARY), b"GET").cluster() == "v2"


# --- through the connection manager ---------------------------------------------------------------


class AddressedConnector(FakeConnector):
    """A FakeConnector that also records the address of every connection it opens."""

    def __init__(self) -> None:
        super().__init__()
        self.addresses: list[str] = []

    async def __call__(self, factory: Callable[[], Any], host: str, port: int) -> Any:
        self.addresses.append(f"{host}:{port}")
        return await super().__call__(factory, host, port)


CLUSTER_AT = {"10.0.1.1:8080": V1, "10.0.2.1:8080": V2}


class Canary:
    """An outbound listener with the converted canary RouteConfiguration; v1 and v2 have one
    endpoint each behind an AddressedConnector."""

    def __init__(self, *headers: route_components_pb2.HeaderMatcher, split: bool = True) -> None:
        self.connector = AddressedConnector()
        clusters = ClusterManager(connector=self.connector)
        clusters.update_clusters({V1: ClusterConfig(V1), V2: ClusterConfig(V2)})
        clusters.update_endpoints(V1, (EndpointConfig("10.0.1.1", 8080),))
        clusters.update_endpoints(V2, (EndpointConfig("10.0.2.1", 8080),))
        self.runtime = ListenerContext("outbound", clusters)
        self.runtime.set_route_config(convert.route_configuration(
            route_config(*(headers or (HM(name="x-canary", string_match=SM(exact="1")),)), split=split)))
        self.client = Client(self.runtime)

    async def send(self, headers: bytes = b"") -> tuple[str, bytes]:
        """One keep-alive request, answered by whichever endpoint got it: (its cluster, the head)."""
        self.client.send(b"GET /items HTTP/1.1\r\nHost: catalog.default\r\n" + headers + b"\r\n")
        conns = self.connector.connections
        await until(lambda: any(transport.out for _, transport in conns))
        got = [i for i, (_, transport) in enumerate(conns) if transport.out]
        assert len(got) == 1, got
        protocol, transport = conns[got[0]]
        head = transport.take()
        protocol.data_received(OK)
        resp = parse_responses(self.client.received())
        assert [(r["status"], r["body"]) for r in resp] == [(200, b"ok")]
        return CLUSTER_AT[self.connector.addresses[got[0]]], head


@async_test
async def test_canary_header_goes_to_v2_and_the_rest_follow_the_weighted_default() -> None:
    mesh = Canary()
    plain = Counter([(await mesh.send())[0] for _ in range(4)])
    assert plain == {V1: 3, V2: 1}  # the 75/25 split of the default route, exactly
    for _ in range(4):
        cluster, head = await mesh.send(b"x-canary: 1\r\n")
        assert cluster == V2
        assert b"\r\nx-canary: 1\r\n" in head  # the matched header is forwarded as it came
    # Other values, and the header on its own, follow the default route; the canary requests did
    # not move its split.
    others = [b"x-canary: 0\r\n", b"x-canary: 11\r\n", b"x-canary-x: 1\r\n", b"x-canary:\r\n"] * 2
    assert Counter([(await mesh.send(h))[0] for h in others]) == {V1: 6, V2: 2}
    assert (await mesh.send(b"X-Canary:  1 \r\n"))[0] == V2  # any case of the name, whitespace around the value
    assert (await mesh.send(b"x-canary: 0\r\nx-canary: 1\r\n"))[0] == V2  # any of the values
    stats = {name: mesh.runtime.clusters.get(name).stats.upstream_rq_2xx for name in (V1, V2)}
    assert stats == {V1: 9, V2: 9}
    assert mesh.runtime.stats.no_route == 0


@async_test
async def test_inverted_and_method_matches_through_the_connection_manager() -> None:
    mesh = Canary(HM(name="x-env", string_match=SM(exact="prod"), invert_match=True),
                  HM(name=":method", string_match=SM(exact="GET")), split=False)  # the default: v1 alone
    assert (await mesh.send(b"x-env: staging\r\n"))[0] == V2
    assert (await mesh.send(b"x-env: prod\r\n"))[0] == V1  # inverted: prod is excluded
    assert (await mesh.send())[0] == V1  # a missing header never matches, inverted or not
    mesh.client.send(b"DELETE /items HTTP/1.1\r\nHost: catalog.default\r\nx-env: staging\r\n\r\n")
    await until(lambda: any(t.out for _, t in mesh.connector.connections))
    got = [mesh.connector.addresses[i] for i, (_, t) in enumerate(mesh.connector.connections) if t.out]
    assert [CLUSTER_AT[a] for a in got] == [V1]  # not a GET


@async_test
async def test_a_request_no_route_takes_is_404_nr() -> None:
    mesh = Canary()
    rc = route_config(HM(name="x-canary", string_match=SM(exact="1")))
    del rc.virtual_hosts[0].routes[1]  # the canary route alone
    mesh.runtime.set_route_config(convert.route_configuration(rc))
    mesh.client.send(b"GET /items HTTP/1.1\r\nHost: catalog\r\nx-canary: 2\r\n\r\n")
    resp = parse_responses(mesh.client.received())
    assert resp[0]["status"] == 404 and resp[0]["headers"]["x-meshkeeper-flags"] == "NR"
    assert mesh.runtime.stats.no_route == 1
    assert (await mesh.send(b"x-canary: 1\r\n"))[0] == V2  # same connection, kept alive


def test_weighted_cluster_names_include_header_routes() -> None:
    rc = convert.route_configuration(route_config(HM(name="x-canary", string_match=SM(exact="1"))))
    assert Router(rc).cluster_names() == {V1, V2}
    assert rc.virtual_hosts[0].routes[1].weighted_clusters == (WeightedCluster(V1, 75), WeightedCluster(V2, 25))
