"""Registry snapshot -> xDS resources, without a network (controlplane.translate)."""

from __future__ import annotations

from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from controlplane import translate as tr
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from meshkeeper import xds
from meshkeeper.registry import InstanceRecord, Override, ServiceRecord
from meshkeeper.xds import NodeInfo

NODE = NodeInfo(node_id=NodeInfo.make_id("10.0.0.9", "web", 15006, "default"), service="web",
                app_port=8080, inbound_port=15006, outbound_port=15001, advertise_host="10.0.0.9")
PROXYLESS = NodeInfo.from_node("grpc-client-1", "", {})


def inst(host: str, port: int = 15006, weight: int = 10, version: str = "", zone: str = "",
         app_port: int = 8080) -> InstanceRecord:
    labels = {k: v for k, v in (("version", version), ("zone", zone)) if v}
    return InstanceRecord(address=host, port=port, weight=weight, labels=labels, app_port=app_port)


def service(name: str, *instances: InstanceRecord, ns: str = "default", protocol: str = "http",
            overrides: dict[str, Override] | None = None) -> ServiceSnapshot:
    return ServiceSnapshot(name=name, namespace=ns, record=ServiceRecord(protocol=protocol),
                           instances=MappingProxyType({i.key: i for i in instances}),
                           overrides=MappingProxyType(dict(overrides or {})))


def snapshot(*services: ServiceSnapshot, version: int = 1) -> RegistrySnapshot:
    by_ns: dict[str, dict[str, ServiceSnapshot]] = {}
    for s in services:
        by_ns.setdefault(s.namespace, {})[s.name] = s
    return RegistrySnapshot(version, MappingProxyType(
        {ns: MappingProxyType(svcs) for ns, svcs in by_ns.items()}))


def endpoints(cla) -> dict[str, tuple[int, int, str]]:
    """host:port -> (weight, health_status, zone)."""
    out = {}
    for loc in cla.endpoints:
        for ep in loc.lb_endpoints:
            sa = ep.endpoint.address.socket_address
            out[f"{sa.address}:{sa.port_value}"] = (ep.load_balancing_weight.value, ep.health_status,
                                                    loc.locality.zone)
    return out


def unpack_hcm(listener) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


CATALOG = service("catalog", inst("10.0.0.1", version="v1", zone="a"), inst("10.0.0.2", version="v2", zone="b"),
                  inst("10.0.0.3", version="v1", zone="a", weight=30))


def test_outbound_clusters_and_version_subsets():
    res = tr.translate(snapshot(CATALOG), NODE)
    clusters = res[xds.CLUSTER]
    assert set(clusters) == {"outbound|catalog.default", "outbound|catalog.default|v1",
                             "outbound|catalog.default|v2", "inbound|8080"}
    c = clusters["outbound|catalog.default"]
    assert c.type == cluster_pb2.Cluster.EDS
    assert c.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert c.connect_timeout.seconds == 1
    assert c.eds_cluster_config.service_name == "outbound|catalog.default"
    assert c.eds_cluster_config.eds_config.HasField("ads")
    assert set(res[xds.ENDPOINT]) == {"outbound|catalog.default", "outbound|catalog.default|v1",
                                      "outbound|catalog.default|v2"}
    assert set(endpoints(res[xds.ENDPOINT]["outbound|catalog.default|v1"])) == {"10.0.0.1:15006", "10.0.0.3:15006"}
    assert set(endpoints(res[xds.ENDPOINT]["outbound|catalog.default|v2"])) == {"10.0.0.2:15006"}


def test_no_subset_without_version_label():
    res = tr.translate(snapshot(service("plain", inst("10.0.0.1"))), NODE)
    assert sorted(n for n in res[xds.CLUSTER] if n.startswith("outbound")) == ["outbound|plain.default"]


def test_localities_by_zone_with_weights():
    cla = tr.translate(snapshot(CATALOG), NODE)[xds.ENDPOINT]["outbound|catalog.default"]
    assert cla.cluster_name == "outbound|catalog.default"
    by_zone = {loc.locality.zone: loc for loc in cla.endpoints}
    assert set(by_zone) == {"a", "b"}
    assert by_zone["a"].load_balancing_weight.value == 40
    assert by_zone["b"].load_balancing_weight.value == 10
    assert endpoints(cla)["10.0.0.3:15006"] == (30, health_check_pb2.HEALTHY, "a")


def test_override_weight_wins_and_disabled_drains():
    svc = service("catalog", inst("10.0.0.1", zone="a"), inst("10.0.0.2", zone="a"), inst("10.0.0.3", zone="a"),
                  overrides={"10.0.0.1:15006": Override(weight=70),
                             "10.0.0.2:15006": Override(enabled=False),
                             "10.0.0.3:15006": Override(weight=0)})
    cla = tr.translate(snapshot(svc), NODE)[xds.ENDPOINT]["outbound|catalog.default"]
    eps = endpoints(cla)
    assert eps["10.0.0.1:15006"] == (70, health_check_pb2.HEALTHY, "a")
    assert eps["10.0.0.2:15006"] == (1, health_check_pb2.DRAINING, "a")  # xDS forbids weight 0
    assert eps["10.0.0.3:15006"] == (1, health_check_pb2.DRAINING, "a")
    assert cla.endpoints[0].load_balancing_weight.value == 70  # draining ones add nothing


def test_registered_weight_zero_drains_and_locality_keeps_weight_one():
    svc = service("catalog", inst("10.0.0.1", weight=0, zone="z"))
    cla = tr.translate(snapshot(svc), NODE)[xds.ENDPOINT]["outbound|catalog.default"]
    assert endpoints(cla)["10.0.0.1:15006"] == (1, health_check_pb2.DRAINING, "z")
    assert cla.endpoints[0].load_balancing_weight.value == 1  # proxyless gRPC drops weightless ones


def test_override_without_instance_is_harmless_and_enabled_override_keeps_weight():
    svc = service("catalog", inst("10.0.0.1", weight=5),
                  overrides={"10.0.0.1:15006": Override(enabled=True), "10.9.9.9:1": Override(weight=3)})
    eps = endpoints(tr.translate(snapshot(svc), NODE)[xds.ENDPOINT]["outbound|catalog.default"])
    assert eps == {"10.0.0.1:15006": (5, health_check_pb2.HEALTHY, "")}


def test_route_virtual_hosts_domains_and_timeout():
    snap = snapshot(CATALOG, service("db", inst("10.0.1.1", port=5432, app_port=5432), protocol="tcp"),
                    service("rpc", inst("10.0.2.1", app_port=50051), protocol="grpc"),
                    service("other", inst("10.0.3.1"), ns="prod"))
    route = tr.translate(snap, NODE)[xds.ROUTE]["outbound"]
    vhosts = {v.name: v for v in route.virtual_hosts}
    assert set(vhosts) == {"catalog.default", "rpc.default"}  # tcp and other namespaces: no vhost
    domains = list(vhosts["catalog.default"].domains)
    for d in xds.service_domains("catalog", "default", 8080) + ["catalog:15006", "catalog.default:15006"]:
        assert d in domains
    assert len(domains) == len(set(domains))
    r = vhosts["rpc.default"].routes[0]
    assert r.match.prefix == "/"
    assert r.route.cluster == "outbound|rpc.default"
    assert r.route.timeout.seconds == 15
    all_domains = [d for v in route.virtual_hosts for d in v.domains]
    assert len(all_domains) == len(set(all_domains))  # Envoy refuses duplicate domains


def test_namespace_isolation():
    snap = snapshot(CATALOG, service("catalog", inst("10.1.0.1"), ns="prod"))
    prod_node = NodeInfo(node_id="p", service="web", namespace="prod", app_port=8080, inbound_port=15006,
                         outbound_port=15001)
    prod = tr.translate(snap, prod_node)
    assert set(prod[xds.ENDPOINT]) == {"outbound|catalog.prod"}
    assert endpoints(prod[xds.ENDPOINT]["outbound|catalog.prod"]).keys() == {"10.1.0.1:15006"}


def test_per_node_listeners_and_inbound_cluster():
    res = tr.translate(snapshot(CATALOG), NODE)
    out = res[xds.LISTENER]["outbound"]
    assert out.address.socket_address.address == "127.0.0.1"
    assert out.address.socket_address.port_value == 15001
    hcm = unpack_hcm(out)
    assert hcm.stat_prefix == "outbound"
    assert hcm.rds.route_config_name == "outbound"
    assert hcm.rds.config_source.HasField("ads")
    assert [f.name for f in hcm.http_filters] == ["envoy.filters.http.router"]
    inbound = res[xds.LISTENER]["inbound"]
    assert (inbound.address.socket_address.address, inbound.address.socket_address.port_value) == ("10.0.0.9", 15006)
    ihcm = unpack_hcm(inbound)
    assert ihcm.route_config.name == "inbound"
    vh = ihcm.route_config.virtual_hosts[0]
    assert list(vh.domains) == ["*"]
    assert vh.routes[0].route.cluster == "inbound|8080"
    cluster = res[xds.CLUSTER]["inbound|8080"]
    assert cluster.type == cluster_pb2.Cluster.STATIC
    sa = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sa.address, sa.port_value) == ("127.0.0.1", 8080)


def test_node_without_app_gets_no_inbound():
    node = NodeInfo(node_id="n", service="client", outbound_port=15001)
    res = tr.translate(snapshot(CATALOG), node)
    assert set(res[xds.LISTENER]) == {"outbound"}
    assert not any(n.startswith("inbound") for n in res[xds.CLUSTER])


def test_proxyless_node_gets_only_shared_outbound():
    assert PROXYLESS.proxyless
    res = tr.translate(snapshot(CATALOG), PROXYLESS)
    assert res[xds.LISTENER] == {}
    assert set(res[xds.CLUSTER]) == {"outbound|catalog.default", "outbound|catalog.default|v1",
                                     "outbound|catalog.default|v2"}
    assert set(res[xds.ROUTE]) == {"outbound"}


def test_shared_parts_built_once_per_snapshot():
    snap = snapshot(CATALOG)
    a = tr.translate(snap, NODE)
    other = NodeInfo(node_id="o", service="api", app_port=9090, inbound_port=15007, outbound_port=15002)
    b = tr.translate(snap, other)
    assert a[xds.ENDPOINT]["outbound|catalog.default"] is b[xds.ENDPOINT]["outbound|catalog.default"]
    assert a[xds.LISTENER]["outbound"] is not b[xds.LISTENER]["outbound"]
    again = tr.translate(snapshot(CATALOG, version=2), NODE)  # a new snapshot is translated anew
    assert again[xds.ENDPOINT]["outbound|catalog.default"] == a[xds.ENDPOINT]["outbound|catalog.default"]


def test_empty_registry_still_has_route_and_listener():
    res = tr.translate(snapshot(), NODE)
    assert list(res[xds.ROUTE]) == ["outbound"]
    assert res[xds.ROUTE]["outbound"].virtual_hosts == []
    assert set(res[xds.LISTENER]) == {"outbound", "inbound"}


def test_translation_is_deterministic():
    a = tr.translate(snapshot(CATALOG), NODE)
    b = tr.translate(snapshot(CATALOG), NODE)
    for t in a:
        assert {n: m.SerializeToString(deterministic=True) for n, m in a[t].items()} == \
               {n: m.SerializeToString(deterministic=True) for n, m in b[t].items()}


def test_policy_sets_lb_policy_connect_timeout_and_route_timeout():
    from dataclasses import replace

    from meshkeeper.policy import decode_policy

    svc = replace(CATALOG, policy=decode_policy({"lb": {"policy": "maglev"}, "connect_timeout_ms": 250,
                                                 "timeout_ms": 1500}))
    res = tr.translate(snapshot(svc), NODE)
    for name in ("outbound|catalog.default", "outbound|catalog.default|v1"):
        c = res[xds.CLUSTER][name]
        assert c.lb_policy == cluster_pb2.Cluster.MAGLEV
        assert (c.connect_timeout.seconds, c.connect_timeout.nanos) == (0, 250_000_000)
    route = res[xds.ROUTE]["outbound"].virtual_hosts[0].routes[0].route
    assert (route.timeout.seconds, route.timeout.nanos) == (1, 500_000_000)
    default = tr.translate(snapshot(CATALOG), NODE)[xds.CLUSTER]["outbound|catalog.default"]
    assert default.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN and default.connect_timeout.seconds == 1
