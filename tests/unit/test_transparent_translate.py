"""Transparent mode's xDS, without a network (controlplane.transparent): what a redirect-mode
sidecar gets, and that an explicit-mode one gets none of it."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.data.dns.v3 import dns_table_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.filters.udp.dns_filter.v3 import dns_filter_pb2

from controlplane import translate as tr
from controlplane import transparent
from controlplane.cache import SnapshotCache
from controlplane.snapshot import RegistrySnapshot
from meshkeeper import xds
from meshkeeper.policy import decode_policy
from meshkeeper.xds import NodeInfo
from tests.unit.test_translate import NODE, inst, service

REDIRECT = replace(NODE, interception="redirect")
STRICT = replace(NODE, interception="redirect", outbound_policy="registry_only")

CATALOG = service("catalog", inst("10.1.0.2", port=8080, version="v1"), inst("10.1.0.3", port=8080, version="v2"))
THRIFT = replace(service("orders", inst("10.1.0.4", port=9090), inst("127.0.0.1", port=15016), protocol="tcp"),
                 policy=decode_policy({"split": {"v1": 100}, "connect_timeout_ms": 250}))
NOVIP = service("billing", inst("10.1.0.5", port=8080))


def snap() -> RegistrySnapshot:
    svcs = {s.name: s for s in (CATALOG, THRIFT, NOVIP)}
    return RegistrySnapshot(1, MappingProxyType({"default": MappingProxyType(svcs)}),
                            vips=MappingProxyType({"default": MappingProxyType(
                                {"catalog": "240.240.0.7", "orders": "240.240.0.8"})}))


def chains(res) -> dict:
    return {c.name: c for c in res[xds.LISTENER][xds.VIRTUAL_OUTBOUND_LISTENER].filter_chains}


def unpack(msg, filt):
    assert filt.typed_config.Unpack(msg)
    return msg


def test_an_explicit_mode_sidecar_gets_only_the_outbound_policy():
    res = transparent.translate(snap(), NODE)
    # ... and a local listener per tcp service, on its app port (the app dials 127.0.0.1:<port>)
    assert set(res[xds.LISTENER]) == {xds.OUTBOUND_LISTENER, xds.INBOUND_LISTENER, "tcp|orders.default"}
    tcp = res[xds.LISTENER]["tcp|orders.default"]
    assert (tcp.address.socket_address.address, tcp.address.socket_address.port_value) == ("127.0.0.1", 8080)
    assert unpack(tcp_proxy_pb2.TcpProxy(), tcp.filter_chains[0].filters[0]).cluster == "outbound|orders.default"
    assert xds.INBOUND_PASSTHROUGH_CLUSTER not in res[xds.CLUSTER]
    plain = tr.translate(snap(), NODE)
    assert set(res[xds.CLUSTER]) - set(plain[xds.CLUSTER]) == {xds.PASSTHROUGH_CLUSTER, xds.BLACKHOLE_CLUSTER}
    outbound = res[xds.LISTENER][xds.OUTBOUND_LISTENER]
    assert not outbound.listener_filters  # no original_dst: apps dial the sidecar
    proxy = unpack(tcp_proxy_pb2.TcpProxy(), outbound.default_filter_chain.filters[0])
    assert proxy.cluster == xds.PASSTHROUGH_CLUSTER
    strict = replace(NODE, outbound_policy="registry_only")
    outbound = transparent.translate(snap(), strict)[xds.LISTENER][xds.OUTBOUND_LISTENER]
    assert unpack(tcp_proxy_pb2.TcpProxy(), outbound.default_filter_chain.filters[0]).cluster == xds.BLACKHOLE_CLUSTER


def test_a_vip_chain_carries_the_services_own_routes_whatever_the_host():
    c = chains(transparent.translate(snap(), REDIRECT))["catalog.default|vip"]
    assert [(r.address_prefix, r.prefix_len.value) for r in c.filter_chain_match.prefix_ranges] == [("240.240.0.7", 32)]
    assert not c.filter_chain_match.HasField("destination_port")  # any port
    hcm = unpack(hcm_pb2.HttpConnectionManager(), c.filters[0])
    vhost = hcm.route_config.virtual_hosts[0]
    assert list(vhost.domains) == ["*"]
    assert list(vhost.routes) == list(tr.virtual_host(CATALOG).routes)
    assert [f.name for f in hcm.http_filters][-1] == xds.ROUTER_FILTER


def test_instance_chains_go_to_that_instance_through_the_services_passthrough_cluster():
    res = transparent.translate(snap(), REDIRECT)
    c = chains(res)["catalog.default|10.1.0.2:8080"]
    assert c.filter_chain_match.prefix_ranges[0].address_prefix == "10.1.0.2"
    assert c.filter_chain_match.destination_port.value == 8080
    route = unpack(hcm_pb2.HttpConnectionManager(), c.filters[0]).route_config.virtual_hosts[0].routes[0]
    assert route.route.cluster == "passthrough|catalog.default"
    direct = res[xds.CLUSTER]["passthrough|catalog.default"]
    assert direct.type == cluster_pb2.Cluster.ORIGINAL_DST and direct.lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED
    # a loopback registration (explicit mode) is never an original destination: no chain
    assert not [n for n in chains(res) if "127.0.0.1" in n]


def test_a_tcp_service_gets_tcp_proxy_with_its_split_and_policy():
    res = transparent.translate(snap(), REDIRECT)
    proxy = unpack(tcp_proxy_pb2.TcpProxy(), chains(res)["orders.default|vip"].filters[0])
    assert [(w.name, w.weight) for w in proxy.weighted_clusters.clusters] == []  # v1 has no instance: no split
    direct = unpack(tcp_proxy_pb2.TcpProxy(), chains(res)["orders.default|10.1.0.4:9090"].filters[0])
    assert direct.cluster == "passthrough|orders.default"
    assert res[xds.CLUSTER]["passthrough|orders.default"].connect_timeout.ToMilliseconds() == 250
    split = replace(THRIFT, instances=MappingProxyType({i.key: replace(i, labels={"version": "v1"})
                                                        for i in THRIFT.instances.values()}))
    s = replace(snap(), namespaces=MappingProxyType({"default": MappingProxyType({"orders": split})}))
    proxy = unpack(tcp_proxy_pb2.TcpProxy(), chains(transparent.translate(s, REDIRECT))["orders.default|vip"].filters[0])
    assert [(w.name, w.weight) for w in proxy.weighted_clusters.clusters] == [("outbound|orders.default|v1", 100)]


def test_a_service_without_a_vip_yet_has_no_vip_chain_and_no_dns_name():
    res = transparent.translate(snap(), REDIRECT)
    assert "billing.default|vip" not in chains(res)
    config = unpack(dns_filter_pb2.DnsFilterConfig(), res[xds.LISTENER][xds.DNS_LISTENER].listener_filters[0])
    table: dns_table_pb2.DnsTable = config.server_config.inline_dns_table
    assert {d.name: list(d.endpoint.address_list.address) for d in table.virtual_domains} == {
        "catalog": ["240.240.0.7"], "catalog.default": ["240.240.0.7"],
        "orders": ["240.240.0.8"], "orders.default": ["240.240.0.8"]}


@pytest.mark.parametrize("node, target", [(REDIRECT, xds.PASSTHROUGH_CLUSTER), (STRICT, xds.BLACKHOLE_CLUSTER)])
def test_the_outbound_listener_reads_the_original_destination_and_sends_the_rest_by_policy(node, target):
    res = transparent.translate(snap(), node)
    outbound = res[xds.LISTENER][xds.OUTBOUND_LISTENER]
    assert [f.name for f in outbound.listener_filters] == [xds.ORIGINAL_DST_FILTER]
    assert outbound.filter_chains[0].filter_chain_match.destination_port.value == node.outbound_port
    proxy = unpack(tcp_proxy_pb2.TcpProxy(), outbound.default_filter_chain.filters[0])
    assert proxy.cluster == target
    assert res[xds.CLUSTER][xds.BLACKHOLE_CLUSTER].type == cluster_pb2.Cluster.STATIC
    assert not res[xds.CLUSTER][xds.BLACKHOLE_CLUSTER].load_assignment.endpoints


def test_the_cache_serves_the_same_and_packs_the_namespace_part_once():
    cache = SnapshotCache()
    cache.set_snapshot(snap())
    a, b = cache.resources(REDIRECT), cache.resources(replace(REDIRECT, node_id="other"))
    assert a[xds.LISTENER][xds.VIRTUAL_OUTBOUND_LISTENER] is b[xds.LISTENER][xds.VIRTUAL_OUTBOUND_LISTENER]
    want = transparent.translate(snap(), REDIRECT)
    assert set(a[xds.LISTENER]) == set(want[xds.LISTENER]) and set(a[xds.CLUSTER]) == set(want[xds.CLUSTER])
    assert xds.VIRTUAL_OUTBOUND_LISTENER not in cache.resources(NODE)[xds.LISTENER]


def test_node_metadata_names_the_mode_and_refuses_unknown_values():
    meta = REDIRECT.metadata()
    assert NodeInfo.from_node(REDIRECT.node_id, "web", meta) == REDIRECT
    older = NodeInfo.from_node(NODE.node_id, "web", {k: v for k, v in meta.items()
                                                     if k not in ("interception", "outbound_policy")})
    assert older == replace(NODE, outbound_policy="")
    # a sidecar older than the outbound policy gets what it got before (it would NACK the rest)
    assert transparent.translate(snap(), older) == tr.translate(snap(), older)
    with pytest.raises(ValueError, match="interception"):
        NodeInfo.from_node(NODE.node_id, "web", {**meta, "interception": "tproxy"})


def test_a_tcp_sidecar_gets_an_l4_inbound_listener_in_both_modes():
    tcp_node = replace(NODE, protocol="tcp")
    for node in (tcp_node, replace(tcp_node, interception="redirect")):
        res = transparent.translate(snap(), node)
        proxy = unpack(tcp_proxy_pb2.TcpProxy(), res[xds.LISTENER][xds.INBOUND_LISTENER].filter_chains[0].filters[0])
        assert proxy.cluster == xds.inbound_cluster(node.app_port) and proxy.cluster in res[xds.CLUSTER]


def test_two_services_never_share_a_chain_or_a_dns_answer():
    twin = service("shadow", inst("10.1.0.2", port=8080))  # catalog's instance address, registered twice
    s = snap()
    svcs = {**s.namespaces["default"], "shadow": twin}
    vips = {**s.vips["default"], "shadow": "240.240.0.7"}  # and catalog's VIP (a claim deleted by hand)
    s = RegistrySnapshot(2, MappingProxyType({"default": MappingProxyType(svcs)}),
                         vips=MappingProxyType({"default": MappingProxyType(vips)}))
    res = transparent.translate(s, REDIRECT)
    keys = [(c.filter_chain_match.prefix_ranges[0].address_prefix, c.filter_chain_match.destination_port.value)
            for c in res[xds.LISTENER][xds.VIRTUAL_OUTBOUND_LISTENER].filter_chains]
    assert len(keys) == len(set(keys))
    assert "catalog.default|vip" in chains(res) and "shadow.default|vip" not in chains(res)
    config = unpack(dns_filter_pb2.DnsFilterConfig(), res[xds.LISTENER][xds.DNS_LISTENER].listener_filters[0])
    assert "shadow" not in {d.name for d in config.server_config.inline_dns_table.virtual_domains}


def test_instance_addresses_that_no_connection_can_have_get_no_chain_and_the_sidecar_takes_the_rest():
    from sidecar.xds import listeners

    odd = service("odd", inst("api-1.example.internal", port=8080), inst("fd00::1", port=8080),
                  inst("fd00:0::1", port=8080), inst("fd00::2", port=9090), inst("127.0.0.1", port=15006))
    s = RegistrySnapshot(3, MappingProxyType({"default": MappingProxyType({"odd": odd})}))
    msg = transparent.translate(s, REDIRECT)[xds.LISTENER][xds.VIRTUAL_OUTBOUND_LISTENER]
    wire = type(msg)()
    wire.ParseFromString(msg.SerializeToString())
    converted = listeners.listener(wire)  # no NACK: no host name, no duplicate match
    assert sorted((c.address, c.port) for c in converted.chains) == [("fd00::1", 8080), ("fd00::2", 9090)]


def test_two_tcp_services_on_one_port_get_one_explicit_listener():
    other = service("ledger", inst("10.1.0.9", port=9090, app_port=8080), protocol="tcp")  # orders' port too
    s = snap()
    svcs = {**s.namespaces["default"], "ledger": other}
    s = RegistrySnapshot(4, MappingProxyType({"default": MappingProxyType(svcs)}), vips=s.vips)
    res = transparent.translate(s, NODE)
    assert [n for n in res[xds.LISTENER] if n.startswith("tcp|")] == ["tcp|ledger.default"]  # first by name
