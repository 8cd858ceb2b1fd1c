"""Runtime config (RTDS) and traffic splits: registry snapshot -> xDS -> the sidecar's converter.

controlplane.translate builds one ``Runtime`` per service and the split's weighted clusters;
controlplane.cache serves RTDS by name. The sidecar's own converter
(sidecar.xds.convert.route_configuration) must accept every split route emitted here.
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest
from envoy.service.runtime.v3 import rtds_pb2
from google.protobuf import any_pb2, json_format

from controlplane import translate as tr
from controlplane.cache import SERVED_TYPES, SnapshotCache
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from meshkeeper import xds
from meshkeeper.policy import PolicyError, decode_policy
from meshkeeper.registry import InstanceRecord, RuntimeValues, ServiceRecord
from meshkeeper.xds import NodeInfo
from sidecar.config import FaultConfig, Route, WeightedCluster
from sidecar.xds import convert

NODE = NodeInfo(node_id=NodeInfo.make_id("10.0.0.9", "web", 15006, "default"), service="web",
                app_port=8080, inbound_port=15006, outbound_port=15001, advertise_host="10.0.0.9")
PROXYLESS = NodeInfo.from_node("grpc-client-1", "", {})
MAIN = "outbound|catalog.default"


def inst(host: str, version: str = "") -> InstanceRecord:
    return InstanceRecord(address=host, port=15006, labels={"version": version} if version else {}, app_port=8080)


def service(name: str, *instances: InstanceRecord, ns: str = "default", policy: dict | None = None,
            protocol: str = "http") -> ServiceSnapshot:
    return ServiceSnapshot(name=name, namespace=ns, record=ServiceRecord(protocol=protocol),
                           instances=MappingProxyType({i.key: i for i in instances}),
                           policy=decode_policy(policy or {}))


def snapshot(*services: ServiceSnapshot, configs: dict[str, dict[str, dict[str, str]]] | None = None,
             version: int = 1) -> RegistrySnapshot:
    """``configs``: namespace -> service -> values."""
    by_ns: dict[str, dict[str, ServiceSnapshot]] = {}
    for s in services:
        by_ns.setdefault(s.namespace, {})[s.name] = s
    cfg = {ns: MappingProxyType({svc: RuntimeValues(v) for svc, v in svcs.items()})
           for ns, svcs in (configs or {}).items()}
    return RegistrySnapshot(version, MappingProxyType({ns: MappingProxyType(s) for ns, s in by_ns.items()}),
                            MappingProxyType(cfg))


def layers(res: tr.Resources) -> dict[str, dict]:
    out = {}
    for name, rt in res[xds.RUNTIME].items():
        assert isinstance(rt, rtds_pb2.Runtime) and rt.name == name
        out[name] = json_format.MessageToDict(rt.layer)
    return out


CATALOG = service("catalog", inst("10.0.0.1", "v1"), inst("10.0.0.2", "v2"), inst("10.0.0.3", "v1"),
                  inst("10.0.0.4"))


# --------------------------------------------------------------------------- Runtime resources


def test_one_runtime_per_service_or_config_with_the_values_as_string_layer():
    snap = snapshot(CATALOG, service("web"), service("api", ns="prod"),
                    configs={"default": {"catalog": {"color": "blue", "feature.x": "on", "n": "10"},
                                         "billing": {"mode": "dry"}},
                             "prod": {"api": {"color": "red"}}})
    res = tr.translate(snap, NODE)
    assert layers(res) == {"billing": {"mode": "dry"},  # a config without a service znode
                           "catalog": {"color": "blue", "feature.x": "on", "n": "10"},
                           "web": {}}  # a service without a config znode: an empty layer
    rt = res[xds.RUNTIME]["catalog"]
    assert {k: v.WhichOneof("kind") for k, v in rt.layer.fields.items()} == dict.fromkeys(
        ("color", "feature.x", "n"), "string_value")  # values stay strings, "10" included
    # the other namespace gets its own, and only its own
    prod = NodeInfo(node_id="p", service="api", namespace="prod", app_port=8080, inbound_port=15006,
                    outbound_port=15001)
    assert layers(tr.translate(snap, prod)) == {"api": {"color": "red"}}
    # shared by every node of the namespace, proxyless ones included
    assert tr.translate(snap, PROXYLESS)[xds.RUNTIME]["catalog"] is rt


def test_no_service_and_no_config_means_no_runtime():
    assert tr.translate(snapshot(), NODE)[xds.RUNTIME] == {}
    assert set(tr.empty_resources()) == set(SERVED_TYPES)
    assert SERVED_TYPES[-1] == xds.RUNTIME


def test_runtime_serializes_deterministically():
    values = {f"k{i}": str(i) for i in range(50)}
    a = tr.runtime("catalog", RuntimeValues(values))
    b = tr.runtime("catalog", RuntimeValues(dict(reversed(list(values.items())))))
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    empty = tr.runtime("catalog", None)
    assert empty.name == "catalog" and empty.HasField("layer") and not empty.layer.fields  # an empty Struct


# --------------------------------------------------------------------------- traffic split


def catalog_route(svc: ServiceSnapshot):
    res = tr.translate(snapshot(svc), NODE)
    [vh] = [vh for vh in res[xds.ROUTE]["outbound"].virtual_hosts if vh.name == "catalog.default"]
    return res, vh.routes[-1]  # the default route: policy.match routes come before it


def split_of(route) -> list[tuple[str, int]]:
    return [(c.name, c.weight.value) for c in route.route.weighted_clusters.clusters]


def over_the_wire(msg):
    a = any_pb2.Any()
    a.Pack(msg)
    out = type(msg)()
    assert any_pb2.Any.FromString(a.SerializeToString(deterministic=True)).Unpack(out)
    return out


def sidecar_route(svc: ServiceSnapshot) -> Route:
    """The catalog route as the sidecar's own converter makes it (it raises XdsError on what it refuses)."""
    res = tr.translate(snapshot(svc), NODE)
    routes = convert.route_configuration(over_the_wire(res[xds.ROUTE]["outbound"]))
    [vh] = [vh for vh in routes.virtual_hosts if vh.name == "catalog.default"]
    return vh.routes[-1]


def test_split_becomes_weighted_clusters_over_the_subset_clusters():
    res, route = catalog_route(replace(CATALOG, policy=decode_policy({"split": {"v2": 10, "v1": 90}})))
    assert route.route.WhichOneof("cluster_specifier") == "weighted_clusters"
    assert split_of(route) == [(f"{MAIN}|v1", 90), (f"{MAIN}|v2", 10)]
    assert {n for n, _ in split_of(route)} <= set(res[xds.CLUSTER])  # names of clusters that exist
    wc = route.route.weighted_clusters
    assert [f.name for f, _ in wc.ListFields()] == ["clusters"]  # no total_weight & co
    assert all([f.name for f, _ in c.ListFields()] == ["name", "weight"] for c in wc.clusters)


def test_missing_subsets_and_zero_weights_are_left_out_the_rest_keep_their_weights():
    svc = replace(CATALOG, policy=decode_policy({"split": {"v1": 60, "v2": 0, "v3": 40}}))  # no v3 instance
    _, route = catalog_route(svc)
    assert split_of(route) == [(f"{MAIN}|v1", 60)]
    assert sidecar_route(svc).weighted_clusters == (WeightedCluster(f"{MAIN}|v1", 60),)


@pytest.mark.parametrize("split", [{"v3": 100}, {"v3": 50, "v4": 50}, {"v1": 0, "v2": 0, "v3": 100}])
def test_nothing_left_of_the_split_goes_to_the_whole_service(split):
    svc = replace(CATALOG, policy=decode_policy({"split": split}))
    _, route = catalog_route(svc)
    assert route.route.WhichOneof("cluster_specifier") == "cluster" and route.route.cluster == MAIN
    assert sidecar_route(svc).cluster == MAIN


def test_no_split_and_no_versions_route_to_the_service_cluster():
    _, route = catalog_route(CATALOG)
    assert route.route.cluster == MAIN
    unlabelled = service("catalog", inst("10.0.0.1"), policy={"split": {"v1": 100}})
    _, route = catalog_route(unlabelled)
    assert route.route.cluster == MAIN


def test_split_keeps_timeout_retry_and_fault_and_the_sidecar_accepts_it():
    svc = replace(CATALOG, policy=decode_policy({
        "split": {"v1": 75, "v2": 25}, "timeout_ms": 2500, "retry": {"attempts": 3},
        "fault": {"abort_status": 503, "abort_percent": 5}, "match": [{"header": "x-canary", "equals": "1",
                                                                       "subset": "v2"}]}))
    _, route = catalog_route(svc)
    assert route.route.timeout.seconds == 2 and route.route.timeout.nanos == 500_000_000
    assert route.route.retry_policy.num_retries.value == 3
    assert xds.FAULT_FILTER in route.typed_per_filter_config
    assert (route.name, route.match.prefix, len(route.match.headers)) == ("default", "/", 0)
    got = sidecar_route(svc)
    assert got.weighted_clusters == (WeightedCluster(f"{MAIN}|v1", 75), WeightedCluster(f"{MAIN}|v2", 25))
    assert got.cluster == "" and got.timeout == 2.5
    assert got.retry_policy is not None and got.retry_policy.num_retries == 3
    assert got.fault == FaultConfig(abort_status=503, abort_percent=5.0)


def test_subset_clusters_do_not_change_with_the_split():
    plain = tr.translate(snapshot(CATALOG), NODE)
    split = tr.translate(snapshot(replace(CATALOG, policy=decode_policy({"split": {"v1": 50, "v2": 50}}))), NODE)
    assert set(plain[xds.CLUSTER]) == set(split[xds.CLUSTER])
    assert plain[xds.ENDPOINT] == split[xds.ENDPOINT]


# --------------------------------------------------------------------------- the cache serves RTDS by name


def test_rtds_fetch_by_name_and_its_version_changes_only_with_the_values():
    cache = SnapshotCache()
    names = frozenset({"web"})
    assert cache.fetch(NODE, xds.RUNTIME, names) is None  # no snapshot yet

    def fetch(snap: RegistrySnapshot, subscribed=names):
        cache.set_snapshot(snap)
        return cache.fetch(NODE, xds.RUNTIME, subscribed)

    first = fetch(snapshot(CATALOG, service("web"), configs={"default": {"web": {"color": "blue"}}}))
    assert [r.name for r in first.resources] == ["web"]
    rt = rtds_pb2.Runtime()
    assert first.resources[0].any.Unpack(rt)
    assert rt.name == "web" and json_format.MessageToDict(rt.layer) == {"color": "blue"}

    # unrelated changes (another service's config, a new instance, a new snapshot number): same version
    other = fetch(snapshot(replace(CATALOG, instances=MappingProxyType({})), service("web"),
                           configs={"default": {"web": {"color": "blue"}, "catalog": {"x": "y"}}}, version=2))
    assert other.version == first.version
    # a changed value: a new version
    changed = fetch(snapshot(CATALOG, service("web"), configs={"default": {"web": {"color": "green"}}}, version=3))
    assert changed.version != first.version
    # config deleted: the resource stays (the service exists), empty, under yet another version
    empty = fetch(snapshot(CATALOG, service("web"), version=4))
    assert [r.name for r in empty.resources] == ["web"] and empty.version not in (first.version, changed.version)
    assert empty.resources[0].any.Unpack(rt) and json_format.MessageToDict(rt.layer) == {}


def test_rtds_fetch_of_a_name_that_does_not_exist_is_empty_until_it_appears():
    cache = SnapshotCache()
    cache.set_snapshot(snapshot(CATALOG))
    names = frozenset({"search"})
    none = cache.fetch(NODE, xds.RUNTIME, names)
    assert none.resources == ()
    cache.set_snapshot(snapshot(CATALOG, version=2))
    assert cache.fetch(NODE, xds.RUNTIME, names).version == none.version
    cache.set_snapshot(snapshot(CATALOG, configs={"default": {"search": {"limit": "5"}}}, version=3))
    got = cache.fetch(NODE, xds.RUNTIME, names)
    assert [r.name for r in got.resources] == ["search"] and got.version != none.version
    # a wildcard fetch (names None) has every Runtime of the namespace
    assert [r.name for r in cache.fetch(NODE, xds.RUNTIME, None).resources] == ["catalog", "search"]


def test_match_routes_go_first_to_their_subset_with_the_same_policy():
    svc = replace(CATALOG, policy=decode_policy({
        "split": {"v1": 90, "v2": 10}, "timeout_ms": 2500, "retry": {"attempts": 1},
        "match": [{"header": "x-canary", "equals": "1", "subset": "v2"}, {"header": "x-debug", "subset": "v1"},
                  {"header": "x-gone", "equals": "y", "subset": "v9"}]}))
    res = tr.translate(snapshot(svc), NODE)
    [vh] = [vh for vh in res[xds.ROUTE]["outbound"].virtual_hosts if vh.name == "catalog.default"]
    assert [r.name for r in vh.routes] == ["match-0", "match-1", "default"]  # v9 has no instance: left out
    canary, debug, _ = vh.routes
    assert canary.route.cluster == f"{MAIN}|v2" and debug.route.cluster == f"{MAIN}|v1"
    assert (canary.match.headers[0].name, canary.match.headers[0].string_match.exact) == ("x-canary", "1")
    assert debug.match.headers[0].present_match
    assert canary.route.timeout.seconds == 2 and canary.route.retry_policy.num_retries.value == 1
    # The sidecar's converter accepts the whole route configuration.
    routes = convert.route_configuration(over_the_wire(res[xds.ROUTE]["outbound"]))
    [got] = [vh for vh in routes.virtual_hosts if vh.name == "catalog.default"]
    assert [r.cluster for r in got.routes[:2]] == [f"{MAIN}|v2", f"{MAIN}|v1"]
    assert got.routes[2].weighted_clusters == (WeightedCluster(f"{MAIN}|v1", 90), WeightedCluster(f"{MAIN}|v2", 10))


@pytest.mark.parametrize(("match", "message"), [
    ({"header": "X-Canary", "subset": "v2"}, "policy.match[0].header: 'X-Canary' is not a lower-case header name"),
    ({"header": "host", "equals": "a", "subset": "v2"}, "policy.match[0].header: 'host' cannot be matched"),
    ({"header": "x-a", "subset": "v 2"}, "policy.match[0].subset: 'v 2' is not a version label"),
])
def test_match_entries_the_sidecar_could_not_honour_are_refused_by_the_policy(match, message):
    with pytest.raises(PolicyError) as info:
        decode_policy({"match": [match]})
    assert str(info.value).startswith(message)


def test_the_policy_refuses_every_header_the_sidecar_cannot_match():
    from meshkeeper.policy import UNMATCHABLE_HEADERS
    from sidecar.codec.headers import UNMATCHABLE_HEADERS as SIDECAR_UNMATCHABLE

    assert SIDECAR_UNMATCHABLE <= UNMATCHABLE_HEADERS
