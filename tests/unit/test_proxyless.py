"""Registry snapshot -> the resources of proxyless gRPC clients, without a network
(controlplane.proxyless, and the cache's by-name serving of them)."""

from __future__ import annotations

import json
from types import MappingProxyType

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from controlplane import proxyless as px
from controlplane.cache import SnapshotCache
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from meshkeeper import xds
from meshkeeper.policy import DEFAULT_POLICY, Retry, decode_policy
from meshkeeper.registry import InstanceRecord, Override, RecordError, ServiceRecord
from meshkeeper.xds import NodeInfo

GRPCIO = NodeInfo.from_node("proxyless~host~frontend.default", "frontend", {})
MAIN = "outbound|catalog.default"


def inst(port: int, weight: int = 10, version: str = "", zone: str = "") -> InstanceRecord:
    labels = {k: v for k, v in (("version", version), ("zone", zone)) if v}
    return InstanceRecord(address="127.0.0.1", port=port, weight=weight, labels=labels, protocol="grpc",
                          app_port=port)


def service(*instances: InstanceRecord, name: str = "catalog", ns: str = "default", protocol: str = "grpc",
            overrides: dict[str, Override] | None = None, policy: dict | None = None) -> ServiceSnapshot:
    return ServiceSnapshot(name=name, namespace=ns, record=ServiceRecord(protocol=protocol),
                           instances=MappingProxyType({i.key: i for i in instances}),
                           overrides=MappingProxyType(dict(overrides or {})),
                           policy=decode_policy(json.dumps(policy).encode()) if policy else DEFAULT_POLICY)


def snapshot(*services: ServiceSnapshot, version: int = 1) -> RegistrySnapshot:
    by_ns: dict[str, dict[str, ServiceSnapshot]] = {}
    for s in services:
        by_ns.setdefault(s.namespace, {})[s.name] = s
    return RegistrySnapshot(version, MappingProxyType({ns: MappingProxyType(v) for ns, v in by_ns.items()}))


def localities(cla) -> list[tuple[str, str, int, int, int]]:
    """(zone, sub_zone, locality weight, endpoint weight, health) per locality."""
    out = []
    for loc in cla.endpoints:
        [ep] = loc.lb_endpoints
        out.append((loc.locality.zone, loc.locality.sub_zone, loc.load_balancing_weight.value,
                    ep.load_balancing_weight.value, ep.health_status))
    return out


def route_of(snap: RegistrySnapshot, name: str = "catalog.default"):
    return px.resource(snap, xds.ROUTE, name, "default")


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name, want", [
    ("catalog.default", ("catalog", "default")),
    ("catalog.prod:50051", ("catalog", "prod")),
    ("catalog", ("catalog", "mine")),
    ("catalog:8080", ("catalog", "mine")),
    ("catalog.default:0", None), ("catalog.default:65536", None), ("catalog.default:050", None),
    ("catalog.default:", None), ("Catalog.default", None), ("catalog.a.b", None), ("", None),
])
def test_targets_name_a_service_and_a_namespace(name, want):
    assert px.parse_target(name, "mine") == want


def test_a_node_without_meshkeeper_metadata_is_proxyless_and_may_name_its_namespace():
    assert GRPCIO.proxyless and GRPCIO.namespace == "default" and GRPCIO.service == "frontend"
    prod = NodeInfo.from_node("n", "", {"namespace": "prod"})
    assert prod.proxyless and prod.namespace == "prod"
    with pytest.raises(RecordError):
        NodeInfo.from_node("n", "", {"namespace": "Not A Name"})


# --------------------------------------------------------------------------- LDS and RDS


def test_the_listener_is_an_api_listener_named_as_the_target_with_rds_of_the_same_name():
    snap = snapshot(service(inst(9001)))
    for name in ("catalog.default", "catalog.default:50051"):
        lis = px.resource(snap, xds.LISTENER, name, "default")
        assert lis.name == name and not lis.HasField("address") and not lis.filter_chains
        hcm = hcm_pb2.HttpConnectionManager()
        assert lis.api_listener.api_listener.Unpack(hcm)
        assert hcm.rds.route_config_name == name and hcm.rds.config_source.HasField("ads")
        assert [(f.name, f.typed_config.type_url) for f in hcm.http_filters] == [
            (xds.FAULT_FILTER, xds.FAULT), (xds.ROUTER_FILTER, xds.ROUTER)]


def test_the_route_matches_exactly_the_target_and_bounds_the_stream_by_the_timeout():
    rc = route_of(snapshot(service(inst(9001))), "catalog.default:50051")
    [vh] = rc.virtual_hosts
    assert rc.name == "catalog.default:50051" and list(vh.domains) == ["catalog.default:50051"]
    [route] = vh.routes
    assert route.match.prefix == "/" and route.route.cluster == MAIN
    msd = route.route.max_stream_duration  # gRFC A31: grpcio reads this, not ``timeout``
    assert msd.max_stream_duration.seconds == msd.grpc_timeout_header_max.seconds == 15
    assert not route.route.HasField("timeout") and not route.route.HasField("retry_policy")
    assert not route.route.hash_policy and not route.typed_per_filter_config


def test_no_timeout_means_no_max_stream_duration():
    [route] = route_of(snapshot(service(inst(9001), policy={"timeout_ms": 0}))).virtual_hosts[0].routes
    assert not route.route.HasField("max_stream_duration")


@pytest.mark.parametrize("on, want", [
    (["5xx", "gateway-error", "connect-failure", "reset"], "unavailable"),
    (["refused-stream"], "unavailable"),
    (["retriable-4xx", "retriable-status-codes"], None),  # nothing gRPC can retry on
])
def test_retries_are_grpc_status_codes(on, want):
    policy = {"retry": {"attempts": 3, "on": on, "per_try_timeout_ms": 100}}
    [route] = route_of(snapshot(service(inst(9001), policy=policy))).virtual_hosts[0].routes
    if want is None:
        assert not route.route.HasField("retry_policy")
        return
    rp = route.route.retry_policy
    assert rp.retry_on == want and rp.num_retries.value == 3
    assert (rp.retry_back_off.base_interval.ToMilliseconds(), rp.retry_back_off.max_interval.ToMilliseconds()) == (25, 250)
    # per-try timeouts and host predicates are not grpcio's: left out
    assert not rp.HasField("per_try_timeout") and not rp.retry_host_predicate


def test_grpc_retry_conditions_pass_as_they_are():
    # (a policy may name them once the policy schema knows gRPC's conditions)
    assert px.retry_policy(Retry(attempts=2, on=("unavailable", "cancelled", "5xx"))).retry_on == "cancelled,unavailable"
    assert px.retry_policy(Retry(attempts=0)) is None


def test_split_and_header_matches_go_to_the_subsets_and_faults_ride_along():
    svc = service(inst(9001, version="v1"), inst(9002, version="v2"),
                  policy={"split": {"v1": 90, "v2": 10}, "match": [{"header": "x-canary", "equals": "1", "subset": "v2"}],
                          "fault": {"abort_status": 503, "abort_percent": 5}})
    routes = route_of(snapshot(svc)).virtual_hosts[0].routes
    assert [r.name for r in routes] == ["match-0", "default"]
    assert routes[0].route.cluster == MAIN + "|v2"
    assert routes[0].match.headers[0].name == "x-canary" and routes[0].match.headers[0].string_match.exact == "1"
    assert [(c.name, c.weight.value) for c in routes[1].route.weighted_clusters.clusters] == [
        (MAIN + "|v1", 90), (MAIN + "|v2", 10)]
    fault = fault_pb2.HTTPFault()
    assert routes[1].typed_per_filter_config[xds.FAULT_FILTER].Unpack(fault)
    assert fault.abort.http_status == 503 and fault.abort.percentage.numerator == 5


@pytest.mark.parametrize("lb, want_policy, want_hash", [
    ({"policy": "ring_hash", "hash_on": "header:X-User"}, cluster_pb2.Cluster.RING_HASH, ("header", "x-user")),
    ({"policy": "ring_hash", "hash_on": "source_ip"}, cluster_pb2.Cluster.RING_HASH, ("filter_state", px.CHANNEL_ID_KEY)),
    ({"policy": "ring_hash", "hash_on": "cookie:session"}, cluster_pb2.Cluster.RING_HASH, None),
    ({"policy": "maglev", "hash_on": "header:x-user"}, cluster_pb2.Cluster.RING_HASH, ("header", "x-user")),
    ({"policy": "least_request"}, cluster_pb2.Cluster.ROUND_ROBIN, None),
    ({"policy": "random"}, cluster_pb2.Cluster.ROUND_ROBIN, None),
])
def test_lb_policies_become_what_grpcio_runs(lb, want_policy, want_hash):
    snap = snapshot(service(inst(9001), policy={"lb": lb}))
    assert px.resource(snap, xds.CLUSTER, MAIN, "default").lb_policy == want_policy
    [route] = route_of(snap).virtual_hosts[0].routes
    if want_hash is None:
        assert not route.route.hash_policy
        return
    [hp] = route.route.hash_policy
    kind = hp.WhichOneof("policy_specifier")
    assert (kind, hp.header.header_name if kind == "header" else hp.filter_state.key) == want_hash


# --------------------------------------------------------------------------- CDS and EDS


def test_the_cluster_carries_only_what_grpcio_honours():
    policy = {"outlier": {"consecutive_5xx": 3, "interval_ms": 2000, "base_ejection_ms": 5000,
                          "max_ejection_ms": 10000, "max_ejection_percent": 50,
                          "success_rate": {"minimum_hosts": 3, "request_volume": 10},
                          "failure_percentage": {"threshold": 60, "enforcing_percent": 100}},
              "circuit_breaker": {"max_requests": 77}, "connect_timeout_ms": 250, "panic_threshold_percent": 20}
    c = px.resource(snapshot(service(inst(9001), policy=policy)), xds.CLUSTER, MAIN, "default")
    assert c.type == cluster_pb2.Cluster.EDS and c.eds_cluster_config.service_name == MAIN
    assert c.eds_cluster_config.eds_config.HasField("ads")
    [t] = c.circuit_breakers.thresholds
    assert t.max_requests.value == 77 and not t.HasField("max_connections") and not t.HasField("retry_budget")
    assert not c.HasField("connect_timeout") and not c.HasField("common_lb_config")
    od = c.outlier_detection
    assert not od.HasField("consecutive_5xx") and not od.split_external_local_origin_errors
    assert (od.interval.ToMilliseconds(), od.base_ejection_time.ToMilliseconds(),
            od.max_ejection_time.ToMilliseconds(), od.max_ejection_percent.value) == (2000, 5000, 10000, 50)
    assert (od.success_rate_minimum_hosts.value, od.success_rate_request_volume.value,
            od.enforcing_success_rate.value) == (3, 10, 100)
    assert (od.failure_percentage_threshold.value, od.enforcing_failure_percentage.value) == (60, 100)


def test_no_outlier_policy_no_outlier_detection():
    c = px.resource(snapshot(service(inst(9001))), xds.CLUSTER, MAIN, "default")
    assert not c.HasField("outlier_detection") and c.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN


def test_each_serving_endpoint_is_a_locality_weighted_by_its_effective_weight():
    svc = service(inst(9001, weight=1, zone="a"), inst(9002, weight=2), inst(9003, weight=7),
                  inst(9004, weight=5), inst(9005, weight=0), inst(9006, weight=3),
                  overrides={"127.0.0.1:9003": Override(weight=70), "127.0.0.1:9004": Override(enabled=False),
                             "127.0.0.1:9006": Override(weight=0)})
    cla = px.resource(snapshot(svc), xds.ENDPOINT, MAIN, "default")
    healthy = health_check_pb2.HEALTHY
    # disabled, weight 0 and overridden to weight 0 are left out; endpoint weights are 1 (ring hash
    # multiplies locality and endpoint weights)
    assert localities(cla) == [("a", "127.0.0.1:9001", 1, 1, healthy), ("", "127.0.0.1:9002", 2, 1, healthy),
                               ("", "127.0.0.1:9003", 70, 1, healthy)]
    assert cla.cluster_name == MAIN and all(loc.priority == 0 for loc in cla.endpoints)


def test_subset_clusters_hold_their_version_only():
    snap = snapshot(service(inst(9001, version="v1"), inst(9002, version="v2", weight=4)))
    cla = px.resource(snap, xds.ENDPOINT, MAIN + "|v2", "default")
    assert [loc[1:3] for loc in localities(cla)] == [("127.0.0.1:9002", 4)]
    assert px.resource(snap, xds.CLUSTER, MAIN + "|v3", "default") is None


# --------------------------------------------------------------------------- by name


def test_unknown_and_tcp_services_have_no_listener_and_targets_resolve_in_the_node_namespace():
    snap = snapshot(service(inst(9001)), service(inst(9101), name="ledger", protocol="tcp"),
                    service(inst(9201), ns="prod"))
    assert px.resource(snap, xds.LISTENER, "nosuch.default", "default") is None
    assert px.resource(snap, xds.LISTENER, "ledger.default", "default") is None
    assert px.resource(snap, xds.LISTENER, "catalog", "prod") is not None
    assert px.resource(snap, xds.ROUTE, "catalog", "prod").virtual_hosts[0].routes[0].route.cluster == \
        "outbound|catalog.prod"
    assert px.resource(snap, xds.CLUSTER, "not-a-cluster", "default") is None
    assert px.resource(snap, xds.RUNTIME, "catalog", "default") is None
    assert px.wildcard_names(snap, xds.LISTENER, "default") == ["catalog.default"]
    assert px.wildcard_names(snap, xds.CLUSTER, "default") == [MAIN, "outbound|ledger.default"]


def test_the_cache_serves_proxyless_nodes_by_name_and_a_change_moves_only_what_changed():
    cache = SnapshotCache()
    svc = service(inst(9001, weight=1), inst(9002, weight=9))
    cache.set_snapshot(snapshot(svc))
    lds = cache.fetch(GRPCIO, xds.LISTENER, frozenset({"catalog.default", "nosuch.default"}))
    assert [r.name for r in lds.resources] == ["catalog.default"]
    eds = cache.fetch(GRPCIO, xds.ENDPOINT, frozenset({MAIN}))
    assert [r.name for r in eds.resources] == [MAIN]
    disabled = ServiceSnapshot(svc.name, svc.namespace, svc.record, svc.instances,
                               MappingProxyType({"127.0.0.1:9002": Override(enabled=False)}))
    cache.set_snapshot(snapshot(disabled, version=2))
    assert cache.fetch(GRPCIO, xds.ENDPOINT, frozenset({MAIN})).version != eds.version
    assert cache.fetch(GRPCIO, xds.LISTENER, frozenset({"catalog.default", "nosuch.default"})).version == lds.version
    # a sidecar of the same namespace still gets its own shapes
    sidecar = NodeInfo(node_id="s", service="web", app_port=8080, inbound_port=15006, outbound_port=15001)
    assert "outbound" in {r.name for r in cache.fetch(sidecar, xds.LISTENER, None).resources}
