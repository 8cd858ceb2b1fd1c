"""Envoy protos -> sidecar config: what is honoured, and what is refused with a reason."""

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from sidecar.xds import convert
from sidecar.xds.convert import XdsError


def hcm_listener(name="outbound", **hcm_fields):
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=name, **hcm_fields)
    if not hcm_fields:
        hcm.rds.route_config_name = "outbound"
        hcm.rds.config_source.ads.SetInParent()
    router = any_pb2.Any()
    router.Pack(router_pb2.Router())
    hcm.http_filters.add(name="envoy.filters.http.router", typed_config=router)
    typed = any_pb2.Any()
    typed.Pack(hcm)
    return listener_pb2.Listener(name=name, filter_chains=[listener_components_pb2.FilterChain(
        filters=[listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager",
                                                typed_config=typed)])])


def cla(name, *eps, priority=0):
    loc = endpoint_components_pb2.LocalityLbEndpoints(locality=base_pb2.Locality(zone="a"), priority=priority,
                                                      load_balancing_weight=wrappers_pb2.UInt32Value(value=10))
    for host, port, weight, health in eps:
        loc.lb_endpoints.add(
            endpoint=endpoint_components_pb2.Endpoint(address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=host, port_value=port))),
            load_balancing_weight=wrappers_pb2.UInt32Value(value=weight), health_status=health)
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[loc])


def test_listener_with_rds():
    cfg = convert.listener(hcm_listener())
    assert cfg.name == "outbound" and cfg.rds_name == "outbound" and cfg.route_config is None


def test_listener_with_inline_routes():
    rc = route_pb2.RouteConfiguration(name="inbound", virtual_hosts=[route_components_pb2.VirtualHost(
        name="inbound", domains=["*"], routes=[route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(cluster="inbound|8080"))])])
    cfg = convert.listener(hcm_listener("inbound", route_config=rc))
    assert cfg.route_config.virtual_hosts[0].routes[0].cluster == "inbound|8080"


def test_listener_with_unknown_network_filter_is_refused():
    msg = hcm_listener()
    msg.filter_chains[0].filters[0].typed_config.type_url = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
    with pytest.raises(XdsError, match="tcp_proxy"):
        convert.listener(msg)


def test_listener_with_tls_is_refused_naming_the_field():
    msg = hcm_listener()
    msg.filter_chains[0].transport_socket.name = "envoy.transport_sockets.tls"
    with pytest.raises(XdsError, match="transport_socket"):
        convert.listener(msg)


def test_route_fields_the_sidecar_cannot_honour_are_refused():
    route = route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix="/"),
                                       route=route_components_pb2.RouteAction(cluster="c"))
    route.route.retry_policy.num_retries.value = 2
    rc = route_pb2.RouteConfiguration(name="outbound", virtual_hosts=[route_components_pb2.VirtualHost(
        name="c", domains=["c"], routes=[route])])
    with pytest.raises(XdsError, match="'retry_policy'"):
        convert.route_configuration(rc)


def test_route_timeout_and_weighted_clusters():
    action = route_components_pb2.RouteAction(timeout=duration_pb2.Duration(seconds=2, nanos=500_000_000))
    action.weighted_clusters.clusters.add(name="a", weight=wrappers_pb2.UInt32Value(value=90))
    action.weighted_clusters.clusters.add(name="b", weight=wrappers_pb2.UInt32Value(value=10))
    rc = route_pb2.RouteConfiguration(name="outbound", virtual_hosts=[route_components_pb2.VirtualHost(
        name="c", domains=["C", "c:*"], routes=[route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/api"), route=action)])])
    cfg = convert.route_configuration(rc)
    vh = cfg.virtual_hosts[0]
    assert vh.domains == ("c", "c:*")
    assert vh.routes[0].timeout == 2.5 and vh.routes[0].prefix == "/api"
    assert [(w.name, w.weight) for w in vh.routes[0].weighted_clusters] == [("a", 90), ("b", 10)]


def test_duplicate_domain_is_refused():
    vhs = [route_components_pb2.VirtualHost(name=n, domains=["x"]) for n in ("a", "b")]
    with pytest.raises(XdsError, match="domain 'x'"):
        convert.route_configuration(route_pb2.RouteConfiguration(name="r", virtual_hosts=vhs))


def test_eds_cluster_and_unsupported_lb_policy():
    c = cluster_pb2.Cluster(name="outbound|catalog.default", type=cluster_pb2.Cluster.EDS,
                            connect_timeout=duration_pb2.Duration(seconds=1))
    c.eds_cluster_config.eds_config.CopyFrom(config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource()))
    cfg = convert.cluster(c)
    assert cfg.discovery == "EDS" and cfg.connect_timeout == 1.0 and cfg.lb_policy == "round_robin"
    c.lb_policy = cluster_pb2.Cluster.MAGLEV
    with pytest.raises(XdsError, match="MAGLEV"):
        convert.cluster(c)


def test_static_cluster_carries_its_endpoints():
    c = cluster_pb2.Cluster(name="inbound|8080", type=cluster_pb2.Cluster.STATIC,
                            load_assignment=cla("inbound|8080", ("127.0.0.1", 8080, 1, health_check_pb2.HEALTHY)))
    cfg = convert.cluster(c)
    assert cfg.discovery == "STATIC"
    assert [(e.address, e.port) for e in cfg.static_endpoints] == [("127.0.0.1", 8080)]


def test_endpoints_weights_health_and_zone():
    eps = convert.endpoints(cla("c", ("10.0.0.1", 80, 7, health_check_pb2.HEALTHY),
                                ("10.0.0.2", 80, 1, health_check_pb2.DRAINING),
                                ("10.0.0.3", 80, 2, health_check_pb2.UNKNOWN)))
    assert [(e.key, e.weight, e.serving, e.zone) for e in eps] == [
        ("10.0.0.1:80", 7, True, "a"), ("10.0.0.2:80", 1, False, "a"), ("10.0.0.3:80", 2, True, "a")]


def test_endpoints_refuse_priorities_and_duplicates():
    with pytest.raises(XdsError, match="priority 1"):
        convert.endpoints(cla("c", ("10.0.0.1", 80, 1, 0), priority=1))
    with pytest.raises(XdsError, match="listed twice"):
        convert.endpoints(cla("c", ("10.0.0.1", 80, 1, 0), ("10.0.0.1", 80, 1, 0)))
