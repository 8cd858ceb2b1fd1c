"""Registry snapshot + node -> xDS resources (DESIGN §4, docs/contracts.md). Pure functions.

:func:`shared_resources` builds what every sidecar of a namespace gets (outbound clusters, their
ClusterLoadAssignments, RouteConfiguration ``outbound``); it is memoised per (snapshot,
namespace), so a thousand sidecars cost one translation. :func:`node_resources` builds the few
per-node ones (listeners ``outbound`` and ``inbound``, the static cluster ``inbound|<app_port>``).
:func:`translate` merges both.

Messages are Envoy's generated protos (xds-protos). Returned messages may be shared between nodes
and snapshots: callers must treat them as read-only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from meshkeeper import xds
from meshkeeper.policy import DEFAULT_POLICY, Policy
from meshkeeper.registry import InstanceRecord, effective_weight, is_serving
from meshkeeper.xds import NodeInfo

CONNECT_TIMEOUT_S = 1  # DESIGN §3 policy default connect_timeout_ms
ROUTE_TIMEOUT_S = 15  # DESIGN §3 policy default timeout_ms (Envoy's route timeout default)
LOCAL_APP_HOST = "127.0.0.1"
OUTBOUND_BIND = "127.0.0.1"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
ROUTER_FILTER = "envoy.filters.http.router"
LB_METADATA = "envoy.lb"  # endpoint labels, where Envoy's subset load balancer looks for them
HTTP_PROTOCOLS = ("http", "grpc")

Resources = dict[str, dict[str, Message]]  # type URL -> resource name -> message


def empty_resources() -> Resources:
    return {xds.CLUSTER: {}, xds.ENDPOINT: {}, xds.LISTENER: {}, xds.ROUTE: {}}


# --------------------------------------------------------------------------- small builders


def _seconds(s: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=s)


def _socket(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def _ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.ApiVersion.V3)


def _pack(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _router_filter() -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=_pack(router_pb2.Router()))


def _http_listener(name: str, address: address_pb2.Address, direction: int,
                   hcm: hcm_pb2.HttpConnectionManager) -> listener_pb2.Listener:
    hcm.http_filters.append(_router_filter())
    return listener_pb2.Listener(
        name=name, address=address, traffic_direction=direction,
        filter_chains=[listener_components_pb2.FilterChain(filters=[
            listener_components_pb2.Filter(name=HCM_FILTER, typed_config=_pack(hcm))])])


def _route_to(cluster: str, timeout: duration_pb2.Duration | None = None) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        name="default",
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster=cluster, timeout=timeout or _seconds(ROUTE_TIMEOUT_S)))


def _millis(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


# Policy LB names -> Envoy's Cluster.LbPolicy (DESIGN §3).
LB_POLICIES = {
    "round_robin": cluster_pb2.Cluster.ROUND_ROBIN,
    "least_request": cluster_pb2.Cluster.LEAST_REQUEST,
    "random": cluster_pb2.Cluster.RANDOM,
    "ring_hash": cluster_pb2.Cluster.RING_HASH,
    "maglev": cluster_pb2.Cluster.MAGLEV,
}


# --------------------------------------------------------------------------- outbound (shared)


def eds_cluster(name: str, policy: Policy = DEFAULT_POLICY) -> cluster_pb2.Cluster:
    """An outbound EDS cluster; the service's policy sets its LB policy and connect timeout."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads_source(), service_name=name),
        lb_policy=LB_POLICIES[policy.lb.policy],
        connect_timeout=_millis(policy.connect_timeout_ms))


def _lb_endpoint(inst: InstanceRecord, svc: ServiceSnapshot) -> tuple[endpoint_components_pb2.LbEndpoint, int]:
    """The endpoint and the weight it adds to its locality (0 when it takes no new requests)."""
    override = svc.overrides.get(inst.key)
    serving = is_serving(inst, override)
    weight = effective_weight(inst, override) if serving else 1  # xDS forbids weight 0
    ep = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=_socket(inst.address, inst.port)),
        health_status=health_check_pb2.HEALTHY if serving else health_check_pb2.DRAINING,
        load_balancing_weight=wrappers_pb2.UInt32Value(value=weight))
    if inst.labels:
        labels = struct_pb2.Struct()
        labels.update(dict(inst.labels))
        ep.metadata.filter_metadata[LB_METADATA].CopyFrom(labels)
    return ep, weight if serving else 0


def load_assignment(name: str, svc: ServiceSnapshot,
                    instances: Iterable[InstanceRecord]) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints grouped into one locality per zone label; each locality weighs the sum of its
    serving endpoints' weights, at least 1 (proxyless gRPC drops localities without a weight)."""
    zones: dict[str, list[InstanceRecord]] = defaultdict(list)
    for inst in sorted(instances, key=lambda i: i.key):
        zones[inst.zone].append(inst)
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    for zone in sorted(zones):
        loc = cla.endpoints.add(locality=base_pb2.Locality(zone=zone))
        total = 0
        for inst in zones[zone]:
            ep, w = _lb_endpoint(inst, svc)
            loc.lb_endpoints.append(ep)
            total += w
        loc.load_balancing_weight.value = max(total, 1)
    return cla


def service_ports(svc: ServiceSnapshot) -> list[int]:
    """Ports registered for a service: what callers may write after ``<svc>:`` in a Host header."""
    return sorted({i.port for i in svc.instances.values()} |
                  {i.app_port for i in svc.instances.values() if i.app_port})


def virtual_host(svc: ServiceSnapshot) -> route_components_pb2.VirtualHost:
    domains = list(xds.service_domains(svc.name, svc.namespace))
    for port in service_ports(svc):
        domains += [d for d in xds.service_domains(svc.name, svc.namespace, port) if d not in domains]
    return route_components_pb2.VirtualHost(
        name=f"{svc.name}.{svc.namespace}", domains=domains,
        routes=[_route_to(xds.outbound_cluster(svc.name, svc.namespace), _millis(svc.policy.timeout_ms))])


@dataclass(frozen=True)
class SharedResources:
    """What every node of one namespace gets, built once per snapshot."""

    namespace: str
    resources: Mapping[str, Mapping[str, Message]]


@lru_cache(maxsize=16)
def shared_resources(snapshot: RegistrySnapshot, namespace: str) -> SharedResources:
    out = empty_resources()
    clusters, endpoints = out[xds.CLUSTER], out[xds.ENDPOINT]
    route = route_pb2.RouteConfiguration(name=xds.OUTBOUND_ROUTE)
    for name, svc in sorted(snapshot.services(namespace).items()):
        main = xds.outbound_cluster(name, namespace)
        clusters[main] = eds_cluster(main, svc.policy)
        endpoints[main] = load_assignment(main, svc, svc.instances.values())
        by_version: dict[str, list[InstanceRecord]] = defaultdict(list)
        for inst in svc.instances.values():
            if inst.version:
                by_version[inst.version].append(inst)
        for version in sorted(by_version):
            sub = xds.outbound_cluster(name, namespace, version)
            clusters[sub] = eds_cluster(sub, svc.policy)
            endpoints[sub] = load_assignment(sub, svc, by_version[version])
        if svc.record.protocol in HTTP_PROTOCOLS:
            route.virtual_hosts.append(virtual_host(svc))
    out[xds.ROUTE][route.name] = route
    return SharedResources(namespace, MappingProxyType({t: MappingProxyType(r) for t, r in out.items()}))


# --------------------------------------------------------------------------- per node


def outbound_listener(port: int) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="outbound",
        rds=hcm_pb2.Rds(config_source=_ads_source(), route_config_name=xds.OUTBOUND_ROUTE))
    return _http_listener(xds.OUTBOUND_LISTENER, _socket(OUTBOUND_BIND, port), base_pb2.OUTBOUND, hcm)


def inbound_listener(host: str, port: int, app_port: int) -> listener_pb2.Listener:
    route = route_pb2.RouteConfiguration(name=xds.INBOUND_ROUTE, virtual_hosts=[
        route_components_pb2.VirtualHost(name="inbound", domains=["*"],
                                         routes=[_route_to(xds.inbound_cluster(app_port))])])
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="inbound", route_config=route)
    return _http_listener(xds.INBOUND_LISTENER, _socket(host, port), base_pb2.INBOUND, hcm)


def inbound_cluster(app_port: int) -> cluster_pb2.Cluster:
    name = xds.inbound_cluster(app_port)
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    loc = cla.endpoints.add()
    loc.lb_endpoints.add(endpoint=endpoint_components_pb2.Endpoint(address=_socket(LOCAL_APP_HOST, app_port)))
    loc.load_balancing_weight.value = 1
    return cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC,
                               connect_timeout=_seconds(CONNECT_TIMEOUT_S), load_assignment=cla)


def node_resources(node: NodeInfo) -> Resources:
    """Per-node resources. Proxyless clients get none (their api_listeners come later); a sidecar
    without an app (app_port 0) gets no inbound listener or cluster."""
    out = empty_resources()
    if node.proxyless:
        return out
    out[xds.LISTENER][xds.OUTBOUND_LISTENER] = outbound_listener(node.outbound_port)
    if node.app_port:
        out[xds.LISTENER][xds.INBOUND_LISTENER] = inbound_listener(
            node.advertise_host, node.inbound_port, node.app_port)
        cluster = inbound_cluster(node.app_port)
        out[xds.CLUSTER][cluster.name] = cluster
    return out


def translate(snapshot: RegistrySnapshot, node: NodeInfo) -> Resources:
    """All resources of ``node`` by type URL and name."""
    out = node_resources(node)
    for type_url, items in shared_resources(snapshot, node.namespace).resources.items():
        out[type_url].update(items)
    return out
