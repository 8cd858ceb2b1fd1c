"""ClusterManager: CDS/EDS updates keep runtime state, picks follow weights over serving endpoints."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from sidecar.config import CircuitBreakerConfig, ClusterConfig, EndpointConfig
from sidecar.upstream.cluster import ClusterManager
from tests.support.fakes import FakeConnector, RecordingDecoder, async_test, until


def ep(port: int, weight: int = 1, serving: bool = True) -> EndpointConfig:
    return EndpointConfig("127.0.0.1", port, weight=weight, serving=serving)


def test_picks_follow_weights_over_serving_endpoints_only() -> None:
    cm = ClusterManager()
    cm.update_clusters({"c": ClusterConfig("c")})
    cm.update_endpoints("c", (ep(1, 1), ep(2, 2), ep(3, 7), ep(4, 5, serving=False)))
    cluster = cm.get("c")
    picks = Counter(cluster.pick().config.port for _ in range(100))
    assert picks == {1: 10, 2: 20, 3: 70}


def test_no_serving_endpoint_picks_none() -> None:
    cm = ClusterManager()
    cm.update_clusters({"c": ClusterConfig("c")})
    assert cm.get("c").pick() is None
    cm.update_endpoints("c", (ep(1, serving=False),))
    assert cm.get("c").pick() is None
    assert cm.get("missing") is None


def test_static_cluster_takes_its_static_endpoints() -> None:
    cm = ClusterManager()
    cm.update_clusters({"inbound|8080": ClusterConfig("inbound|8080", discovery="STATIC",
                                                     static_endpoints=(ep(8080),))})
    assert cm.get("inbound|8080").pick().config.port == 8080
    cm.update_endpoints("inbound|8080", (ep(9999),))  # EDS never overrides a STATIC cluster
    assert cm.get("inbound|8080").pick().config.port == 8080


def test_endpoints_arriving_before_their_cluster_are_kept() -> None:
    cm = ClusterManager()
    cm.update_endpoints("c", (ep(1),))
    cm.update_clusters({"c": ClusterConfig("c")})
    assert cm.get("c").pick().config.port == 1


def test_update_keeps_state_of_unchanged_endpoints() -> None:
    cm = ClusterManager()
    cm.update_clusters({"c": ClusterConfig("c")})
    cm.update_endpoints("c", (ep(1), ep(2)))
    cluster = cm.get("c")
    first = cluster.endpoints["127.0.0.1:1"]
    first.total_requests = 5
    cm.update_endpoints("c", (ep(1, weight=3), ep(3)))
    kept = cluster.endpoints["127.0.0.1:1"]
    assert kept is first and kept.total_requests == 5 and kept.config.weight == 3
    assert set(cluster.endpoints) == {"127.0.0.1:1", "127.0.0.1:3"}
    assert Counter(cluster.pick().config.port for _ in range(8)) == {1: 6, 3: 2}


def test_cds_update_keeps_cluster_stats_and_endpoints_and_removes_missing() -> None:
    cm = ClusterManager()
    cm.update_clusters({"a": ClusterConfig("a"), "b": ClusterConfig("b")})
    cm.update_endpoints("a", (ep(1),))
    a = cm.get("a")
    a.stats.upstream_rq_total = 7
    cm.update_clusters({"a": ClusterConfig("a", connect_timeout=0.25)})
    assert cm.get("a") is a and a.stats.upstream_rq_total == 7
    assert a.config.connect_timeout == 0.25 and a.endpoints["127.0.0.1:1"].pool.connect_timeout == 0.25
    assert a.pick() is not None
    assert cm.get("b") is None and cm.names() == ["a"]


@async_test
async def test_removed_endpoint_closes_idle_connections_and_in_flight_finishes() -> None:
    connector = FakeConnector()
    cm = ClusterManager(connector=connector)
    cm.update_clusters({"c": ClusterConfig("c")})
    cm.update_endpoints("c", (ep(1),))
    endpoint = cm.get("c").pick()
    idle = await endpoint.pool.connect()
    busy = await endpoint.pool.connect()
    endpoint.pool.stats.upstream_rq_active += 2  # as new_stream counts the two streams below
    idle.attach(RecordingDecoder()).encode_headers(b"GET", b"a", b"/", [], end_stream=True, chunked=False,
                                                   is_head=False)
    idle.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    handler = RecordingDecoder()
    busy.attach(handler).encode_headers(b"GET", b"a", b"/", [], end_stream=True, chunked=False, is_head=False)
    cm.update_endpoints("c", (ep(2),))
    assert idle.closed and not busy.closed
    busy.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert handler.events[-1] == ("complete",) and handler.body == b"ok"
    assert busy.closed  # not pooled by a removed endpoint
    await until(lambda: endpoint.pool.cx_active == 0)


def test_admin_view_is_json_able() -> None:
    cm = ClusterManager()
    cm.update_clusters({"b": ClusterConfig("b"), "a": ClusterConfig("a")})
    cm.update_endpoints("a", (ep(1, 3), ep(2, serving=False)))
    view = json.loads(json.dumps(cm.admin_view()))
    assert [c["name"] for c in view] == ["a", "b"]
    endpoints = view[0]["endpoints"]
    assert endpoints[0]["weight"] == 3 and endpoints[0]["health_status"] == "HEALTHY"
    assert endpoints[1]["serving"] is False and endpoints[1]["health_status"] == "DRAINING"
    assert {"active_requests", "total_requests", "rq_error", "cx_active"} <= endpoints[0].keys()
    assert view[0]["stats"]["upstream_rq_total"] == 0


def test_config_timeouts_reach_the_pools_and_retries_active_starts_at_zero() -> None:
    cm = ClusterManager()
    cm.update_clusters({"c": ClusterConfig("c", idle_timeout=30.0)})
    cm.update_endpoints("c", (ep(1),))
    cluster = cm.get("c")
    assert cluster.endpoints["127.0.0.1:1"].pool.idle_timeout == 30.0 and cluster.retries_active == 0
    cm.update_clusters({"c": ClusterConfig("c", idle_timeout=5.0, connect_timeout=0.5)})
    pool = cluster.endpoints["127.0.0.1:1"].pool
    assert pool.idle_timeout == 5.0 and pool.connect_timeout == 0.5


def test_lb_policy_is_chosen_per_cluster_and_unknown_ones_are_refused_before_any_change() -> None:
    draws = iter([0.05, 0.15, 0.95] * 10)
    cm = ClusterManager(random=lambda: next(draws))
    cm.update_clusters({"r": ClusterConfig("r", lb_policy="random")})
    cm.update_endpoints("r", (ep(1, 1), ep(2, 1), ep(3, 8)))
    assert [cm.get("r").pick().config.port for _ in range(3)] == [1, 2, 3]
    cm.get("r").endpoints["127.0.0.1:3"].active_requests = 100
    cm.update_clusters({"r": ClusterConfig("r", lb_policy="least_request")})  # weighted: 8 / 101 against 1 / 1
    assert Counter(cm.get("r").pick().config.port for _ in range(20)) == {1: 10, 2: 10}
    with pytest.raises(ValueError, match="MAGLEV"):
        cm.update_clusters({"r": ClusterConfig("r"), "new": ClusterConfig("new", lb_policy="MAGLEV")})
    assert cm.names() == ["r"] and cm.get("r").config.lb_policy == "least_request"


def test_admin_view_has_resilience_fields() -> None:
    cm = ClusterManager()
    cm.update_clusters({"a": ClusterConfig("a", circuit_breakers=CircuitBreakerConfig(max_requests=7))})
    cm.update_endpoints("a", (ep(1),))
    view = json.loads(json.dumps(cm.admin_view()))[0]
    assert view["panic"] is False and view["healthy_panic_threshold"] == 50.0
    assert view["circuit_breakers"]["max_requests"] == 7 and view["outlier_detection"] is None
    endpoint = view["endpoints"][0]
    assert endpoint["ejected"] is False and endpoint["ejections"] == 0 and endpoint["ejected_until"] is None
