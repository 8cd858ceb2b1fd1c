"""Envoy protos -> the sidecar's config objects, refusing what the sidecar cannot honour.

Each converter checks the fields that are set on a message against the list the sidecar
honours (docs/xds-support.md). A field outside that list raises :class:`XdsError`, which the
xDS client turns into a NACK that names the resource and the field, and the previous config stays
in force. Fields whose presence does not change behaviour (names, stat prefixes, metadata) are
accepted and ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401  (registers the type for Any)
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from google.protobuf.message import Message

from meshkeeper import xds
from sidecar.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_ROUTE_TIMEOUT,
    LB_ROUND_ROBIN,
    ClusterConfig,
    EndpointConfig,
    ListenerConfig,
    Route,
    RouteConfig,
    VirtualHost,
    WeightedCluster,
)

_HCM = http_connection_manager_pb2.HttpConnectionManager
_SERVING = (health_check_pb2.UNKNOWN, health_check_pb2.HEALTHY, health_check_pb2.DEGRADED)
_LB_POLICIES = {cluster_pb2.Cluster.ROUND_ROBIN: LB_ROUND_ROBIN}


class XdsError(ValueError):
    """A resource the sidecar cannot honour; the message becomes the NACK's error_detail."""


def _only(msg: Message, allowed: Iterable[str], where: str) -> None:
    allowed = set(allowed)
    for fd, _ in msg.ListFields():
        if fd.name not in allowed:
            raise XdsError(f"{where}: field '{fd.name}' is not supported by this sidecar")


def _seconds(duration) -> float:
    return duration.seconds + duration.nanos / 1e9


# --------------------------------------------------------------------------- listeners


def listener(msg: listener_pb2.Listener) -> ListenerConfig:
    where = f"listener {msg.name!r}"
    _only(msg, ("name", "address", "filter_chains", "stat_prefix", "metadata", "traffic_direction"), where)
    if len(msg.filter_chains) != 1:
        raise XdsError(f"{where}: exactly one filter chain is supported, got {len(msg.filter_chains)}")
    chain = msg.filter_chains[0]
    _only(chain, ("filters", "name", "metadata"), f"{where} filter chain")
    if len(chain.filters) != 1:
        raise XdsError(f"{where}: exactly one network filter (http_connection_manager) is supported")
    flt = chain.filters[0]
    if flt.typed_config.type_url != xds.HCM:
        raise XdsError(f"{where}: network filter {flt.typed_config.type_url or flt.name!r} is not supported")
    hcm = _HCM()
    if not flt.typed_config.Unpack(hcm):
        raise XdsError(f"{where}: cannot decode http_connection_manager")
    _only(hcm, ("stat_prefix", "rds", "route_config", "http_filters", "codec_type"), f"{where} http_connection_manager")
    if hcm.codec_type not in (_HCM.AUTO, _HCM.HTTP1):
        raise XdsError(f"{where}: codec_type {_HCM.CodecType.Name(hcm.codec_type)} is not supported (HTTP/1.1 only)")
    for f in hcm.http_filters:
        if f.typed_config.type_url != xds.ROUTER and not f.is_optional:
            raise XdsError(f"{where}: http filter {f.name!r} is not supported")
    which = hcm.WhichOneof("route_specifier")
    if which == "rds":
        src = hcm.rds.config_source
        if not (src.HasField("ads") or src.HasField("self")):
            raise XdsError(f"{where}: rds config_source must be ads")
        if not hcm.rds.route_config_name:
            raise XdsError(f"{where}: rds.route_config_name is empty")
        return ListenerConfig(name=msg.name, rds_name=hcm.rds.route_config_name)
    if which == "route_config":
        return ListenerConfig(name=msg.name, route_config=route_configuration(hcm.route_config))
    raise XdsError(f"{where}: http_connection_manager needs rds or route_config")


# --------------------------------------------------------------------------- routes


def route_configuration(msg: route_pb2.RouteConfiguration) -> RouteConfig:
    where = f"route_configuration {msg.name!r}"
    _only(msg, ("name", "virtual_hosts", "validate_clusters"), where)
    vhosts = []
    seen: set[str] = set()
    for vh in msg.virtual_hosts:
        vwhere = f"{where} virtual_host {vh.name!r}"
        _only(vh, ("name", "domains", "routes"), vwhere)
        if not vh.domains:
            raise XdsError(f"{vwhere}: no domains")
        for d in vh.domains:
            if d.lower() in seen:
                raise XdsError(f"{vwhere}: domain {d!r} is used by two virtual hosts")
            seen.add(d.lower())
        vhosts.append(VirtualHost(name=vh.name, domains=tuple(d.lower() for d in vh.domains),
                                  routes=tuple(_route(r, vwhere) for r in vh.routes)))
    return RouteConfig(name=msg.name, virtual_hosts=tuple(vhosts))


def _route(r: route_components_pb2.Route, where: str) -> Route:
    where = f"{where} route {r.name!r}" if r.name else f"{where} route"
    _only(r, ("name", "match", "route", "metadata"), where)
    _only(r.match, ("prefix",), f"{where} match")
    if r.WhichOneof("action") != "route":
        raise XdsError(f"{where}: only the route action is supported")
    action = r.route
    _only(action, ("cluster", "weighted_clusters", "timeout"), f"{where} action")
    timeout = _seconds(action.timeout) if action.HasField("timeout") else DEFAULT_ROUTE_TIMEOUT
    which = action.WhichOneof("cluster_specifier")
    if which == "cluster":
        return Route(prefix=r.match.prefix or "/", cluster=action.cluster, timeout=timeout)
    if which == "weighted_clusters":
        wcs = []
        for c in action.weighted_clusters.clusters:
            _only(c, ("name", "weight"), f"{where} weighted cluster {c.name!r}")
            wcs.append(WeightedCluster(name=c.name, weight=c.weight.value))
        if not wcs or sum(w.weight for w in wcs) <= 0:
            raise XdsError(f"{where}: weighted_clusters need a positive total weight")
        return Route(prefix=r.match.prefix or "/", weighted_clusters=tuple(wcs), timeout=timeout)
    raise XdsError(f"{where}: route action needs cluster or weighted_clusters")


# --------------------------------------------------------------------------- clusters


def cluster(msg: cluster_pb2.Cluster) -> ClusterConfig:
    where = f"cluster {msg.name!r}"
    _only(msg, ("name", "type", "eds_cluster_config", "connect_timeout", "lb_policy", "load_assignment",
                "alt_stat_name", "metadata"), where)
    if msg.lb_policy not in _LB_POLICIES:
        name = cluster_pb2.Cluster.LbPolicy.Name(msg.lb_policy)
        raise XdsError(f"{where}: lb_policy {name} is not supported (supported: ROUND_ROBIN)")
    timeout = _seconds(msg.connect_timeout) if msg.HasField("connect_timeout") else DEFAULT_CONNECT_TIMEOUT
    if timeout <= 0:
        raise XdsError(f"{where}: connect_timeout must be positive")
    common = {"name": msg.name, "lb_policy": _LB_POLICIES[msg.lb_policy], "connect_timeout": timeout}
    if msg.type == cluster_pb2.Cluster.EDS:
        src = msg.eds_cluster_config.eds_config
        if msg.eds_cluster_config.HasField("eds_config") and not (src.HasField("ads") or src.HasField("self")):
            raise XdsError(f"{where}: eds_config must be ads")
        if msg.eds_cluster_config.service_name and msg.eds_cluster_config.service_name != msg.name:
            raise XdsError(f"{where}: eds service_name different from the cluster name is not supported")
        return ClusterConfig(discovery="EDS", **common)
    if msg.type == cluster_pb2.Cluster.STATIC:
        return ClusterConfig(discovery="STATIC", static_endpoints=endpoints(msg.load_assignment, where), **common)
    raise XdsError(f"{where}: type {cluster_pb2.Cluster.DiscoveryType.Name(msg.type)} is not supported")


def endpoints(cla: endpoint_pb2.ClusterLoadAssignment, where: str = "") -> tuple[EndpointConfig, ...]:
    where = where or f"cluster_load_assignment {cla.cluster_name!r}"
    _only(cla, ("cluster_name", "endpoints", "policy"), where)
    if cla.HasField("policy"):
        _only(cla.policy, ("overprovisioning_factor", "weighted_priority_health"), f"{where} policy")
    out = []
    seen: set[str] = set()
    for loc in cla.endpoints:
        _only(loc, ("locality", "lb_endpoints", "load_balancing_weight", "priority", "metadata"), f"{where} locality")
        if loc.priority != 0:
            raise XdsError(f"{where}: priority {loc.priority} is not supported (only priority 0)")
        zone = loc.locality.zone
        for lbe in loc.lb_endpoints:
            _only(lbe, ("endpoint", "health_status", "load_balancing_weight", "metadata"), f"{where} endpoint")
            sa = lbe.endpoint.address.socket_address
            if not lbe.endpoint.address.HasField("socket_address") or not sa.address or not sa.port_value:
                raise XdsError(f"{where}: every endpoint needs a socket_address with address and port_value")
            _only(sa, ("address", "port_value", "protocol"), f"{where} endpoint address")
            key = f"{sa.address}:{sa.port_value}"
            if key in seen:
                raise XdsError(f"{where}: endpoint {key} is listed twice")
            seen.add(key)
            weight = lbe.load_balancing_weight.value if lbe.HasField("load_balancing_weight") else 1
            if weight < 1:
                raise XdsError(f"{where}: endpoint {key}: load_balancing_weight must be at least 1")
            out.append(EndpointConfig(address=sa.address, port=sa.port_value, weight=weight,
                                      serving=lbe.health_status in _SERVING, zone=zone))
    return tuple(out)
