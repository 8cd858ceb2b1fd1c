"""Route matching: domain precedence, prefixes, weighted splits, refusals (a NACK upstream)."""

from __future__ import annotations

from collections import Counter

import pytest

from sidecar.config import HeaderMatch, Route, RouteConfig, VirtualHost, WeightedCluster
from sidecar.proxy.router import Router


def make_router() -> Router:
    return Router(RouteConfig("outbound", (
        VirtualHost("catalog", ("catalog", "catalog.default", "catalog:*", "Catalog.Prod:8080"), (
            Route("/api/v2", "catalog-v2"),
            Route("/api", "catalog-api", timeout=3.0),
            Route("/", "catalog"),
        )),
        VirtualHost("exact-port", ("catalog:9000",), (Route("/", "catalog-9000"),)),
        VirtualHost("default", ("*",), (Route("/health", "local"),)),
    )))


def cluster_of(router: Router, authority: str, path: str) -> str | None:
    entry = router.resolve(authority.encode(), path.encode())
    return entry.cluster() if entry is not None else None


def test_exact_domains_case_insensitive() -> None:
    r = make_router()
    assert cluster_of(r, "catalog", "/x") == "catalog"
    assert cluster_of(r, "CATALOG.default", "/x") == "catalog"
    assert cluster_of(r, "catalog.prod:8080", "/x") == "catalog"


def test_any_port_wildcard_and_exact_port_precedence() -> None:
    r = make_router()
    assert cluster_of(r, "catalog:8081", "/") == "catalog"
    assert cluster_of(r, "catalog:9000", "/") == "catalog-9000"  # exact beats name:*
    assert cluster_of(r, "catalog.default:80", "/health") == "local"  # no catalog.default:* domain


def test_default_virtual_host_and_no_match() -> None:
    r = make_router()
    assert cluster_of(r, "unknown", "/health/deep") == "local"
    assert cluster_of(r, "unknown", "/other") is None
    assert cluster_of(r, "", "/health") == "local"
    no_default = Router(RouteConfig("r", (VirtualHost("a", ("a",), (Route("/", "a"),)),)))
    assert no_default.resolve(b"b", b"/") is None


def test_first_matching_prefix_wins() -> None:
    r = make_router()
    assert cluster_of(r, "catalog", "/api/v2/items?x=1") == "catalog-v2"
    assert cluster_of(r, "catalog", "/api/v1") == "catalog-api"
    assert cluster_of(r, "catalog", "/apix") == "catalog-api"  # prefix, not path segment
    assert r.lookup("catalog", "/api/v1") == Route("/api", "catalog-api", timeout=3.0)
    assert r.lookup("nowhere", "/x") is None


def test_header_routes_share_first_match_wins_with_prefix_routes() -> None:
    r = Router(RouteConfig("r", (VirtualHost("catalog", ("catalog",), (
        Route("/api", "api-canary", headers=(HeaderMatch("x-canary", exact="1"),)),
        Route("/api", "api"),
        Route("/", "canary", headers=(HeaderMatch("x-canary", present=True),)),
        Route("/", "catalog"),
    )),)))
    assert r.lookup("catalog", "/api/x", {"x-canary": "1"}).cluster == "api-canary"
    assert r.lookup("catalog", "/api/x", {"x-canary": "2"}).cluster == "api"  # the prefix route comes first
    assert r.lookup("catalog", "/x", {"x-canary": "2"}).cluster == "canary"
    assert r.lookup("catalog", "/x").cluster == "catalog"
    assert cluster_of(r, "catalog", "/api/x") == "api"  # resolve without a head: no headers


def test_ipv6_authority() -> None:
    r = Router(RouteConfig("r", (VirtualHost("v6", ("[::1]", "[::1]:*"), (Route("/", "v6"),)),)))
    assert cluster_of(r, "[::1]", "/") == "v6"
    assert cluster_of(r, "[::1]:8080", "/") == "v6"


def test_weighted_clusters_split_exactly() -> None:
    r = Router(RouteConfig("r", (VirtualHost("v", ("*",), (
        Route("/", weighted_clusters=(WeightedCluster("v1", 90), WeightedCluster("v2", 10))),)),)))
    picks = [cluster_of(r, "x", "/") for _ in range(1000)]
    assert Counter(picks) == {"v1": 900, "v2": 100}
    for start in range(0, 990, 7):
        assert Counter(picks[start : start + 10]) == {"v1": 9, "v2": 1}
    assert r.cluster_names() == {"v1", "v2"}


def test_route_timeout_zero_disables() -> None:
    r = Router(RouteConfig("r", (VirtualHost("v", ("*",), (Route("/", "c", timeout=0),)),)))
    assert r.resolve(b"x", b"/").timeout == 0.0


@pytest.mark.parametrize("vhosts", [
    (VirtualHost("a", ("*.example.com",), (Route("/", "c"),)),),
    (VirtualHost("a", ("a",), (Route("/", "c"),)), VirtualHost("b", ("A",), (Route("/", "c"),))),
    (VirtualHost("a", ("*",), (Route("/", "c"),)), VirtualHost("b", ("*",), (Route("/", "c"),))),
    (VirtualHost("a", ("a",), (Route("/"),)),),
    (VirtualHost("a", ("a",), (Route("/", weighted_clusters=(WeightedCluster("x", 0),)),)),),
    (VirtualHost("a", ("a",), (Route("/", "c", headers=(HeaderMatch("host", exact="a"),)),)),),  # route on domains
])
def test_unsupported_configs_are_refused(vhosts: tuple[VirtualHost, ...]) -> None:
    with pytest.raises(ValueError):
        Router(RouteConfig("r", vhosts))
