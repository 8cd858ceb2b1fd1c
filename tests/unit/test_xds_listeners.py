"""Transparent mode's listeners and ORIGINAL_DST clusters, from the control plane's own protos to
the sidecar's config (sidecar.xds.listeners, sidecar.xds.convert), and what is refused."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2

from controlplane import transparent
from meshkeeper import xds
from sidecar.config import WeightedCluster
from sidecar.upstream.cluster import MAX_ORIGINAL_DST_HOSTS, Cluster
from sidecar.xds import convert, listeners
from sidecar.xds.convert import XdsError
from tests.unit.test_transparent_translate import REDIRECT, STRICT, snap


def wire(msg):
    """As the sidecar receives it: serialised and parsed again."""
    out = type(msg)()
    out.ParseFromString(msg.SerializeToString())
    return out


def converted(node=REDIRECT):
    res = transparent.translate(snap(), node)
    return {n: listeners.listener(wire(m)) for n, m in res[xds.LISTENER].items()}, res


def test_the_control_planes_transparent_listeners_convert_whole():
    got, _ = converted()
    outbound = got[xds.OUTBOUND_LISTENER]
    assert outbound.rds_name == xds.OUTBOUND_ROUTE  # explicit connections: the HCM as before
    assert outbound.transparent.explicit_port == REDIRECT.outbound_port
    assert outbound.transparent.default_chain.tcp.clusters == (WeightedCluster(xds.PASSTHROUGH_CLUSTER, 1),)
    chains = {c.name: c for c in got[xds.VIRTUAL_OUTBOUND_LISTENER].chains}
    vip = chains["catalog.default|vip"]
    assert (vip.address, vip.port) == ("240.240.0.7", 0) and vip.http.route_config is not None
    assert vip.http.route_config.virtual_hosts[0].domains == ("*",)
    direct = chains["orders.default|10.1.0.4:9090"]
    assert (direct.address, direct.port, direct.http) == ("10.1.0.4", 9090, None)
    assert direct.tcp.clusters == (WeightedCluster("passthrough|orders.default", 1),)
    assert got[xds.DNS_LISTENER].dns.names["catalog.default"] == ("240.240.0.7",)
    inbound = got[xds.INBOUND_LISTENER].transparent
    assert inbound.explicit_port == REDIRECT.app_port  # the app's port through the inbound HCM ...
    assert inbound.default_chain.tcp.clusters[0].name == xds.INBOUND_PASSTHROUGH_CLUSTER  # ... the rest passed


def test_registry_only_sends_the_rest_to_the_black_hole():
    got, _ = converted(STRICT)
    assert got[xds.OUTBOUND_LISTENER].transparent.default_chain.tcp.clusters[0].name == xds.BLACKHOLE_CLUSTER


def test_original_dst_clusters_convert_and_refuse_outlier_detection():
    _, res = converted()
    passthrough = convert.cluster(wire(res[xds.CLUSTER][xds.PASSTHROUGH_CLUSTER]))
    assert passthrough.discovery == "ORIGINAL_DST"
    bad = wire(res[xds.CLUSTER]["passthrough|catalog.default"])
    bad.outlier_detection.consecutive_5xx.value = 3
    with pytest.raises(XdsError, match="outlier_detection"):
        convert.cluster(bad)
    bad = wire(res[xds.CLUSTER][xds.PASSTHROUGH_CLUSTER])
    bad.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
    with pytest.raises(XdsError, match="CLUSTER_PROVIDED"):
        convert.cluster(bad)


@pytest.mark.parametrize("change, message", [
    (lambda lst: setattr(lst.filter_chains[0].filter_chain_match.prefix_ranges[0].prefix_len, "value", 24), "prefix_len 24"),
    (lambda lst: setattr(lst.filter_chains[0].filter_chain_match.prefix_ranges[0], "address_prefix", "catalog"),
     "not an IP address"),
    (lambda lst: lst.filter_chains[1].filter_chain_match.CopyFrom(lst.filter_chains[0].filter_chain_match), "like an earlier"),
    (lambda lst: lst.filter_chains[0].filter_chain_match.server_names.append("x"), "server_names"),
])
def test_virtual_chains_that_cannot_be_honoured_are_nacked(change, message):
    _, res = converted()
    msg = wire(res[xds.LISTENER][xds.VIRTUAL_OUTBOUND_LISTENER])
    change(msg)
    with pytest.raises(XdsError, match=message):
        listeners.listener(msg)


def test_an_outbound_listener_with_other_listener_filters_or_an_http_default_chain_is_nacked():
    _, res = converted()
    msg = wire(res[xds.LISTENER][xds.OUTBOUND_LISTENER])
    msg.listener_filters.add(name="envoy.filters.listener.tls_inspector")
    with pytest.raises(XdsError, match="listener_filters"):
        listeners.listener(msg)
    msg = wire(res[xds.LISTENER][xds.OUTBOUND_LISTENER])
    msg.default_filter_chain.filters[0].CopyFrom(msg.filter_chains[0].filters[0])
    with pytest.raises(XdsError, match="only tcp_proxy"):
        listeners.listener(msg)


def test_a_dns_table_with_a_name_that_is_not_an_address_is_nacked():
    from envoy.extensions.filters.udp.dns_filter.v3 import dns_filter_pb2

    _, res = converted()
    msg = wire(res[xds.LISTENER][xds.DNS_LISTENER])
    config = dns_filter_pb2.DnsFilterConfig()
    msg.listener_filters[0].typed_config.Unpack(config)
    config.server_config.inline_dns_table.virtual_domains[0].endpoint.address_list.address[0] = "catalog.local"
    msg.listener_filters[0].typed_config.Pack(config)
    with pytest.raises(XdsError, match="not an IPv4 address"):
        listeners.listener(msg)


def test_an_original_dst_cluster_makes_hosts_on_demand_and_stays_bounded():
    _, res = converted()
    cluster = Cluster(convert.cluster(wire(res[xds.CLUSTER][xds.PASSTHROUGH_CLUSTER])))
    assert cluster.original_dst and cluster.pick() is None
    a = cluster.original_dst_host("10.1.0.9", 80)
    assert a is cluster.original_dst_host("10.1.0.9", 80) and a.key == "10.1.0.9:80"
    busy = a
    busy.active_requests = 1
    for i in range(MAX_ORIGINAL_DST_HOSTS + 10):
        assert cluster.original_dst_host(f"10.2.{i // 250}.{i % 250}", 80) is not None
    assert len(cluster.endpoints) <= MAX_ORIGINAL_DST_HOSTS
    assert cluster.endpoints.get("10.1.0.9:80") is busy  # a host in use is never dropped
