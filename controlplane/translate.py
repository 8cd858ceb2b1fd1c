"""Registry snapshot + node -> xDS resources (DESIGN §4, docs/contracts.md). Pure functions.

:func:`shared_resources` builds what every sidecar of a namespace gets (outbound clusters, their
ClusterLoadAssignments, RouteConfiguration ``outbound``, and one RTDS ``Runtime`` per service);
it is memoised per (snapshot, namespace), so a thousand sidecars cost one translation.
:func:`node_resources` builds the few per-node ones (listeners ``outbound`` and ``inbound``, the
static cluster ``inbound|<app_port>``) from the node and its own service's policy
(:func:`node_policy`, for the inbound rate limit). :func:`translate` merges both.

A service's traffic policy (``meshkeeper.policy``) lands in Envoy's own fields: the cluster's
``outlier_detection``, ``circuit_breakers`` and ``common_lb_config``, the route's ``retry_policy``
and fault ``typed_per_filter_config``, the route's ``weighted_clusters`` (``split``), header-matched
routes to subsets ahead of it (``match``), and the inbound listener's local rate limit
(docs/xds-support.md lists what the sidecar honours).

Identity (docs/identity.md): with a :class:`meshkeeper.security.MeshIdentity` (the control plane
has a CA), outbound clusters carry a ``tlsMode-mutual`` transport socket match, endpoints of
``mtls`` instances the metadata it matches, and a node's inbound listener the mTLS chains and
``x-forwarded-client-cert``; a service's ``authz`` becomes the inbound HCM's RBAC filter. Those
builders are :mod:`controlplane.identity_resources`. Without identity and authz every resource is
as before.

Messages are Envoy's generated protos (xds-protos). Returned messages may be shared between nodes
and snapshots: callers must treat them as read-only.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.service.runtime.v3 import rtds_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from controlplane.identity_resources import (
    NO_SECURITY,
    TLS_MODE,
    TRANSPORT_SOCKET_MATCH,
    NodeSecurity,
    node_security,
    rbac_filter,
    secure_inbound,
    set_client_cert_details,
    tls_socket_match,
    upstream_tls_context,
)
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from controlplane.xdsbuild import ads_source, pack
from meshkeeper import security, xds
from meshkeeper.policy import (
    DEFAULT_POLICY,
    CircuitBreaker,
    FailurePercentage,
    Fault,
    Match,
    Outlier,
    Policy,
    RateLimit,
    Retry,
    SuccessRate,
    Tracing,
)
from meshkeeper.registry import InstanceRecord, RuntimeValues, effective_weight, is_serving
from meshkeeper.security import MeshIdentity
from meshkeeper.xds import NodeInfo

CONNECT_TIMEOUT_S = 1  # DESIGN §3 policy default connect_timeout_ms
ROUTE_TIMEOUT_S = 15  # DESIGN §3 policy default timeout_ms (Envoy's route timeout default)
LOCAL_APP_HOST = "127.0.0.1"
OUTBOUND_BIND = "127.0.0.1"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
ROUTER_FILTER = xds.ROUTER_FILTER
# Both listeners. Envoy has no request_headers_timeout by default; 10 s keeps a slowloris client
# from holding a connection open by trickling its request head.
REQUEST_HEADERS_TIMEOUT_S = 10
DOWNSTREAM_IDLE_TIMEOUT_S = 3600  # Envoy's default HCM common_http_protocol_options.idle_timeout
# Retry back-off: Envoy's defaults (25 ms base, 10x cap), written out so a config dump shows them.
RETRY_BASE_INTERVAL_MS = 25
RETRY_MAX_INTERVAL_MS = 250
# How often a retry may re-pick a host the request already tried (Istio's value).
HOST_SELECTION_RETRY_MAX_ATTEMPTS = 5
# The local rate limit refills its token bucket 20 times a second at most: Envoy refuses a
# fill_interval under 50 ms.
RATE_LIMIT_FILLS_PER_SECOND = 20
RATE_LIMIT_STAT_PREFIX = "http_local_rate_limiter"
LB_METADATA = "envoy.lb"  # endpoint labels, where Envoy's subset load balancer looks for them
HTTP_PROTOCOLS = ("http", "grpc")

Resources = dict[str, dict[str, Message]]  # type URL -> resource name -> message


def empty_resources() -> Resources:
    return {xds.CLUSTER: {}, xds.ENDPOINT: {}, xds.LISTENER: {}, xds.ROUTE: {}, xds.RUNTIME: {}}


# --------------------------------------------------------------------------- small builders


def _seconds(s: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=s)


def _socket(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def _router_filter() -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=pack(router_pb2.Router()))


def _http_listener(name: str, address: address_pb2.Address, direction: int,
                   hcm: hcm_pb2.HttpConnectionManager) -> listener_pb2.Listener:
    """A listener with one HCM; the router filter goes last (Envoy requires the terminal filter last),
    and both directions get the request-head and idle timeouts."""
    hcm.http_filters.append(_router_filter())
    hcm.request_headers_timeout.CopyFrom(_seconds(REQUEST_HEADERS_TIMEOUT_S))
    hcm.common_http_protocol_options.CopyFrom(_http_options())
    return listener_pb2.Listener(
        name=name, address=address, traffic_direction=direction,
        filter_chains=[listener_components_pb2.FilterChain(filters=[
            listener_components_pb2.Filter(name=HCM_FILTER, typed_config=pack(hcm))])])


def _route_to(cluster: str, timeout: duration_pb2.Duration | None = None) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        name="default",
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster=cluster, timeout=timeout or _seconds(ROUTE_TIMEOUT_S)))


# --------------------------------------------------------------------------- policy -> Envoy fields


def _enforcing(count: int) -> wrappers_pb2.UInt32Value:
    """A consecutive-failure detector ejects at 100% unless the policy disables it with a count of 0."""
    return _u32(100 if count else 0)


def outlier_detection(o: Outlier) -> outlier_detection_pb2.OutlierDetection:
    """``Cluster.outlier_detection`` from the policy; every field written out.

    Where this departs from Envoy's defaults, and why:

    - ``split_external_local_origin_errors`` is true, so ``consecutive_local_origin_failure``
      counts connect failures, timeouts and resets, and HTTP 5xx responses count as external.
    - ``enforcing_consecutive_gateway_failure`` is 100 (Envoy: 0): the policy names the detector,
      so a user who sets it expects ejections. A count of 0 disables a detector (enforcing 0).
    - ``enforcing_local_origin_success_rate`` is 0 (Envoy: 100): the sidecar has no local-origin
      success-rate detector, and the split would otherwise switch Envoy's on.

    No ``success_rate`` or ``failure_percentage`` in the policy means Envoy's defaults for them
    (success rate enforced at 100%, failure percentage at 0%).
    """
    sr = o.success_rate or SuccessRate()
    fp = o.failure_percentage or FailurePercentage()
    return outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=_u32(o.consecutive_5xx),
        enforcing_consecutive_5xx=_enforcing(o.consecutive_5xx),
        consecutive_gateway_failure=_u32(o.consecutive_gateway_failure),
        enforcing_consecutive_gateway_failure=_enforcing(o.consecutive_gateway_failure),
        consecutive_local_origin_failure=_u32(o.consecutive_local_origin_failure),
        enforcing_consecutive_local_origin_failure=_enforcing(o.consecutive_local_origin_failure),
        split_external_local_origin_errors=True,
        enforcing_local_origin_success_rate=_u32(0),
        interval=_millis(o.interval_ms),
        base_ejection_time=_millis(o.base_ejection_ms),
        max_ejection_time=_millis(o.max_ejection_ms),
        max_ejection_percent=_u32(o.max_ejection_percent),
        success_rate_minimum_hosts=_u32(sr.minimum_hosts),
        success_rate_request_volume=_u32(sr.request_volume),
        success_rate_stdev_factor=_u32(sr.stdev_factor),
        enforcing_success_rate=_u32(sr.enforcing_percent),
        failure_percentage_threshold=_u32(fp.threshold),
        failure_percentage_minimum_hosts=_u32(fp.minimum_hosts),
        failure_percentage_request_volume=_u32(fp.request_volume),
        enforcing_failure_percentage=_u32(fp.enforcing_percent))


def circuit_breakers(cb: CircuitBreaker) -> circuit_breaker_pb2.CircuitBreakers:
    """One DEFAULT-priority threshold, always written: the policy's defaults are Envoy's but for
    ``max_retries`` (2^32-1, no cap, as Istio writes). With a retry budget, Envoy ignores
    ``max_retries``; it is still written, for the config dump."""
    t = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        priority=base_pb2.DEFAULT,
        max_connections=_u32(cb.max_connections),
        max_pending_requests=_u32(cb.max_pending),
        max_requests=_u32(cb.max_requests),
        max_retries=_u32(cb.max_retries))
    if cb.retry_budget is not None:
        t.retry_budget.budget_percent.CopyFrom(_percent(cb.retry_budget.percent))
        t.retry_budget.min_retry_concurrency.CopyFrom(_u32(cb.retry_budget.min_concurrency))
    return circuit_breaker_pb2.CircuitBreakers(thresholds=[t])


def retry_policy(r: Retry) -> route_components_pb2.RetryPolicy:
    """``RouteAction.retry_policy``: ``attempts`` is Envoy's ``num_retries`` (retries after the first
    try). Like Istio, a retry avoids the hosts already tried (``previous_hosts``), re-picking up to
    :data:`HOST_SELECTION_RETRY_MAX_ATTEMPTS` times."""
    rp = route_components_pb2.RetryPolicy(
        retry_on=",".join(r.on),
        num_retries=_u32(r.attempts),
        retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
            base_interval=_millis(RETRY_BASE_INTERVAL_MS), max_interval=_millis(RETRY_MAX_INTERVAL_MS)),
        retriable_status_codes=r.retriable_status_codes,
        retry_host_predicate=[route_components_pb2.RetryPolicy.RetryHostPredicate(
            name=xds.PREVIOUS_HOSTS_PREDICATE, typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()))],
        host_selection_retry_max_attempts=HOST_SELECTION_RETRY_MAX_ATTEMPTS)
    if r.per_try_timeout_ms:
        rp.per_try_timeout.CopyFrom(_millis(r.per_try_timeout_ms))
    return rp


def http_fault(f: Fault) -> fault_pb2.HTTPFault | None:
    """The route's ``envoy.filters.http.fault`` config, or None when the policy injects nothing."""
    if not (f.delay_percent or f.abort_percent):
        return None
    msg = fault_pb2.HTTPFault()
    if f.delay_percent:
        msg.delay.CopyFrom(common_fault_pb2.FaultDelay(fixed_delay=_millis(f.delay_ms),
                                                       percentage=_fraction(f.delay_percent)))
    if f.abort_percent:
        msg.abort.CopyFrom(fault_pb2.FaultAbort(http_status=f.abort_status, percentage=_fraction(f.abort_percent)))
    return msg


def token_bucket(rl: RateLimit) -> token_bucket_pb2.TokenBucket:
    """A bucket that refills smoothly: ``ceil(rps / 20)`` tokens every ``tokens / rps`` seconds (so at
    least 50 ms, Envoy's minimum; rounded to the millisecond, Envoy's resolution). rps 100 gives
    5 tokens every 50 ms. ``max_tokens`` is the burst (the rps when 0), raised to one refill if
    smaller, or the bucket could never reach the rps."""
    tokens = math.ceil(rl.rps / RATE_LIMIT_FILLS_PER_SECOND)
    return token_bucket_pb2.TokenBucket(
        max_tokens=max(rl.burst or rl.rps, tokens),
        tokens_per_fill=_u32(tokens),
        fill_interval=_millis(round(1000 * tokens / rl.rps)))


def local_rate_limit(rl: RateLimit) -> local_rate_limit_pb2.LocalRateLimit:
    """The inbound listener's ``envoy.filters.http.local_ratelimit``, enabled and enforced for all
    requests (Envoy's default for both is 0%, i.e. off)."""
    everyone = base_pb2.RuntimeFractionalPercent(default_value=_fraction(100))
    return local_rate_limit_pb2.LocalRateLimit(
        stat_prefix=RATE_LIMIT_STAT_PREFIX, token_bucket=token_bucket(rl),
        filter_enabled=everyone, filter_enforced=everyone)


def _fault_filter() -> hcm_pb2.HttpFilter:
    # Empty: it injects nothing unless a route's typed_per_filter_config says so.
    return hcm_pb2.HttpFilter(name=xds.FAULT_FILTER, typed_config=pack(fault_pb2.HTTPFault()))


def _millis(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def _u32(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=value)


def _percent(value: float) -> percent_pb2.Percent:
    return percent_pb2.Percent(value=value)


def _fraction(percent: int) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(numerator=percent, denominator=percent_pb2.FractionalPercent.HUNDRED)


def _http_options() -> protocol_pb2.HttpProtocolOptions:
    return protocol_pb2.HttpProtocolOptions(idle_timeout=_seconds(DOWNSTREAM_IDLE_TIMEOUT_S))


# Policy LB names -> Envoy's Cluster.LbPolicy (DESIGN §3).
LB_POLICIES = {
    "round_robin": cluster_pb2.Cluster.ROUND_ROBIN,
    "least_request": cluster_pb2.Cluster.LEAST_REQUEST,
    "random": cluster_pb2.Cluster.RANDOM,
    "ring_hash": cluster_pb2.Cluster.RING_HASH,
    "maglev": cluster_pb2.Cluster.MAGLEV,
}


# --------------------------------------------------------------------------- outbound (shared)


def eds_cluster(name: str, policy: Policy = DEFAULT_POLICY, protocol: str = "http") -> cluster_pb2.Cluster:
    """An outbound EDS cluster; the service's policy sets its LB policy, connect timeout, circuit
    breakers, panic threshold and (when the policy has it) outlier detection; a ``grpc`` service
    is reached over HTTP/2 (:func:`http2_options`)."""
    c = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source(), service_name=name),
        lb_policy=LB_POLICIES[policy.lb.policy],
        connect_timeout=_millis(policy.connect_timeout_ms),
        circuit_breakers=circuit_breakers(policy.circuit_breaker),
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            healthy_panic_threshold=_percent(policy.panic_threshold_percent)))
    if policy.outlier is not None:
        c.outlier_detection.CopyFrom(outlier_detection(policy.outlier))
    if protocol == "grpc":
        http2_options(c)
    return c


def http2_options(c: cluster_pb2.Cluster) -> None:
    """HTTP/2 (h2c) to the cluster's endpoints, as Envoy is told it: ``typed_extension_protocol_options``
    with ``explicit_http_config.http2_protocol_options``."""
    opts = http_protocol_options_pb2.HttpProtocolOptions()
    opts.explicit_http_config.http2_protocol_options.SetInParent()
    c.typed_extension_protocol_options[xds.HTTP_PROTOCOL_OPTIONS_KEY].Pack(opts)


def _lb_endpoint(inst: InstanceRecord, svc: ServiceSnapshot,
                 identity: MeshIdentity | None = None) -> tuple[endpoint_components_pb2.LbEndpoint, int]:
    """The endpoint and the weight it adds to its locality (0 when it takes no new requests). With
    identity, an instance registered with ``mtls`` carries ``envoy.transport_socket_match``
    ``{tlsMode: mutual}``: its cluster's ``tlsMode-mutual`` transport socket applies to it."""
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
    if identity is not None and inst.mtls:
        ep.metadata.filter_metadata[TRANSPORT_SOCKET_MATCH].update(TLS_MODE)
    return ep, weight if serving else 0


def load_assignment(name: str, svc: ServiceSnapshot, instances: Iterable[InstanceRecord],
                    identity: MeshIdentity | None = None) -> endpoint_pb2.ClusterLoadAssignment:
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
            ep, w = _lb_endpoint(inst, svc, identity)
            loc.lb_endpoints.append(ep)
            total += w
        loc.load_balancing_weight.value = max(total, 1)
    return cla


def service_ports(svc: ServiceSnapshot) -> list[int]:
    """Ports registered for a service: what callers may write after ``<svc>:`` in a Host header."""
    return sorted({i.port for i in svc.instances.values()} |
                  {i.app_port for i in svc.instances.values() if i.app_port})


def subset_versions(svc: ServiceSnapshot) -> dict[str, list[InstanceRecord]]:
    """The service's instances by ``version`` label, sorted by version: one subset cluster each.
    Instances without the label belong to no subset."""
    by_version: dict[str, list[InstanceRecord]] = defaultdict(list)
    for inst in svc.instances.values():
        if inst.version:
            by_version[inst.version].append(inst)
    return dict(sorted(by_version.items()))


def split_clusters(svc: ServiceSnapshot) -> list[tuple[str, int]]:
    """``policy.split`` as (subset cluster, weight), sorted by version: subsets without an instance
    (no subset cluster) and weights of 0 are left out, the rest keep their weights. Empty: no split,
    or nothing of it left; the route then goes to the whole service."""
    versions = subset_versions(svc)
    return [(xds.outbound_cluster(svc.name, svc.namespace, v), w)
            for v, w in sorted(svc.policy.split.items()) if w > 0 and v in versions]


def weighted_clusters(split: Iterable[tuple[str, int]]) -> route_components_pb2.WeightedCluster:
    """``RouteAction.weighted_clusters``: names and weights only, all the sidecar reads. No
    ``total_weight``: deprecated in Envoy, which then sums the weights."""
    return route_components_pb2.WeightedCluster(clusters=[
        route_components_pb2.WeightedCluster.ClusterWeight(name=name, weight=_u32(w)) for name, w in split])


def _apply_policy(route: route_components_pb2.Route, policy: Policy) -> route_components_pb2.Route:
    """Retry policy and fault injection of the service's policy, on one of its routes."""
    if policy.retry is not None:
        route.route.retry_policy.CopyFrom(retry_policy(policy.retry))
    fault = http_fault(policy.fault)
    if fault is not None:
        route.typed_per_filter_config[xds.FAULT_FILTER].Pack(fault)
    return route


def outbound_route(svc: ServiceSnapshot) -> route_components_pb2.Route:
    """The service's route: timeout, retry policy and fault injection from its policy, and with a
    ``split`` weighted clusters over its version subsets (:func:`split_clusters`)."""
    policy = svc.policy
    route = _route_to(xds.outbound_cluster(svc.name, svc.namespace), _millis(policy.timeout_ms))
    split = split_clusters(svc)
    if split:
        route.route.weighted_clusters.CopyFrom(weighted_clusters(split))  # replaces ``cluster`` (a oneof)
    return _apply_policy(route, policy)


def header_matcher(m: Match) -> route_components_pb2.HeaderMatcher:
    """``{"header": h, "equals": v}``: header ``h`` is exactly ``v``; without ``equals``: present."""
    if m.equals:
        return route_components_pb2.HeaderMatcher(name=m.header, string_match=string_pb2.StringMatcher(exact=m.equals))
    return route_components_pb2.HeaderMatcher(name=m.header, present_match=True)


def match_routes(svc: ServiceSnapshot) -> list[route_components_pb2.Route]:
    """``policy.match``, in order: one route per entry, sending requests with the header to the
    subset cluster, ahead of the default route (the first matching route wins, as in Envoy). An
    entry whose subset has no instance (no subset cluster) is left out: its requests follow the
    default route."""
    policy, versions = svc.policy, subset_versions(svc)
    routes = []
    for i, m in enumerate(policy.match):
        if m.subset not in versions:
            continue
        route = _route_to(xds.outbound_cluster(svc.name, svc.namespace, m.subset), _millis(policy.timeout_ms))
        route.name = f"match-{i}"
        route.match.headers.append(header_matcher(m))
        routes.append(_apply_policy(route, policy))
    return routes


def virtual_host(svc: ServiceSnapshot) -> route_components_pb2.VirtualHost:
    domains = list(xds.service_domains(svc.name, svc.namespace))
    for port in service_ports(svc):
        domains += [d for d in xds.service_domains(svc.name, svc.namespace, port) if d not in domains]
    return route_components_pb2.VirtualHost(
        name=f"{svc.name}.{svc.namespace}", domains=domains, routes=[*match_routes(svc), outbound_route(svc)])


def runtime(svc: str, values: RuntimeValues | None) -> rtds_pb2.Runtime:
    """The RTDS ``Runtime`` named ``<svc>``: its ``layer`` is a Struct of the config's string
    values, empty without a config znode."""
    layer = struct_pb2.Struct()
    if values is not None:
        layer.update(dict(values.values))
    return rtds_pb2.Runtime(name=svc, layer=layer)


@dataclass(frozen=True)
class SharedResources:
    """What every node of one namespace gets, built once per snapshot."""

    namespace: str
    resources: Mapping[str, Mapping[str, Message]]


@dataclass(frozen=True)
class ServiceResources:
    """What one service adds to its namespace's shared resources: its outbound clusters (the
    service and one per version subset), their ClusterLoadAssignments, and its virtual host of
    RouteConfiguration ``outbound`` (None for a service that is not HTTP). It depends on the
    :class:`ServiceSnapshot` alone, so a service that did not change need not be translated again."""

    clusters: Mapping[str, cluster_pb2.Cluster]
    endpoints: Mapping[str, endpoint_pb2.ClusterLoadAssignment]
    virtual_host: route_components_pb2.VirtualHost | None


def service_resources(svc: ServiceSnapshot, identity: MeshIdentity | None = None,
                      mode: str = security.DEFAULT_MODE) -> ServiceResources:
    """The service's :class:`ServiceResources`; with ``identity``, mTLS to it unless its effective
    peer authentication ``mode`` (:meth:`RegistrySnapshot.peer_mode`) is DISABLE."""
    clusters, endpoints = {}, {}
    tls = identity is not None and mode != security.DISABLE
    main = xds.outbound_cluster(svc.name, svc.namespace)
    clusters[main] = eds_cluster(main, svc.policy, svc.record.protocol)
    endpoints[main] = load_assignment(main, svc, svc.instances.values(), identity)
    for version, instances in subset_versions(svc).items():
        sub = xds.outbound_cluster(svc.name, svc.namespace, version)
        clusters[sub] = eds_cluster(sub, svc.policy, svc.record.protocol)
        endpoints[sub] = load_assignment(sub, svc, instances, identity)
    if tls:
        match = tls_socket_match(upstream_tls_context(identity, svc.name, svc.namespace, svc.record.protocol))
        for c in clusters.values():
            c.transport_socket_matches.append(match)
    vhost = virtual_host(svc) if svc.record.protocol in HTTP_PROTOCOLS else None
    return ServiceResources(clusters, endpoints, vhost)


def outbound_route_configuration(vhosts: Iterable[route_components_pb2.VirtualHost]) -> route_pb2.RouteConfiguration:
    """RouteConfiguration ``outbound``: the namespace's virtual hosts, in service name order."""
    return route_pb2.RouteConfiguration(name=xds.OUTBOUND_ROUTE, virtual_hosts=vhosts)


@lru_cache(maxsize=16)
def shared_resources(snapshot: RegistrySnapshot, namespace: str,
                     identity: MeshIdentity | None = None) -> SharedResources:
    out = empty_resources()
    vhosts = []
    for name, svc in sorted(snapshot.services(namespace).items()):
        got = service_resources(svc, identity, snapshot.peer_mode(namespace, name))
        out[xds.CLUSTER].update(got.clusters)
        out[xds.ENDPOINT].update(got.endpoints)
        if got.virtual_host is not None:
            vhosts.append(got.virtual_host)
    out[xds.ROUTE][xds.OUTBOUND_ROUTE] = outbound_route_configuration(vhosts)
    for name in snapshot.runtime_services(namespace):
        out[xds.RUNTIME][name] = runtime(name, snapshot.config(namespace, name))
    return SharedResources(namespace, MappingProxyType({t: MappingProxyType(r) for t, r in out.items()}))


# --------------------------------------------------------------------------- per node


def tracing(policy_tracing: Tracing | None) -> hcm_pb2.HttpConnectionManager.Tracing | None:
    """The HCM's tracing from the service's ``policy.tracing``: ``random_sampling`` is the share of
    new traces sampled. None (no policy): the HCM carries no tracing and the sidecar's
    ``--trace-sample-ratio`` applies."""
    if policy_tracing is None:
        return None
    out = hcm_pb2.HttpConnectionManager.Tracing()
    out.random_sampling.value = policy_tracing.sample_percent
    return out


def outbound_listener(port: int, policy_tracing: Tracing | None = None) -> listener_pb2.Listener:
    """The outbound HCM carries the fault filter so that routes' fault configs apply (Envoy ignores
    a route's typed_per_filter_config for a filter the HCM does not run)."""
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="outbound",
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=xds.OUTBOUND_ROUTE),
        http_filters=[_fault_filter()], tracing=tracing(policy_tracing))
    return _http_listener(xds.OUTBOUND_LISTENER, _socket(OUTBOUND_BIND, port), base_pb2.OUTBOUND, hcm)


def inbound_listener(host: str, port: int, app_port: int,
                     rate_limit: RateLimit = DEFAULT_POLICY.rate_limit,
                     policy_tracing: Tracing | None = None,
                     sec: NodeSecurity = NO_SECURITY) -> listener_pb2.Listener:
    """The inbound HCM; with ``rate_limit.rps`` > 0 a local rate limit guards the local app; with
    an ``authz`` the RBAC filter comes first (a refused request costs no token); with identity
    the client-certificate details and the mTLS chains (:func:`secure_inbound`)."""
    route = route_pb2.RouteConfiguration(name=xds.INBOUND_ROUTE, virtual_hosts=[
        route_components_pb2.VirtualHost(name="inbound", domains=["*"],
                                         routes=[_route_to(xds.inbound_cluster(app_port))])])
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="inbound", route_config=route, tracing=tracing(policy_tracing))
    if sec.identity is not None:
        set_client_cert_details(hcm)
    if sec.authz is not None:
        hcm.http_filters.append(rbac_filter(sec.authz, sec.trust_domain))
    if rate_limit.rps > 0:
        hcm.http_filters.add(name=xds.LOCAL_RATELIMIT_FILTER, typed_config=pack(local_rate_limit(rate_limit)))
    listener = _http_listener(xds.INBOUND_LISTENER, _socket(host, port), base_pb2.INBOUND, hcm)
    return secure_inbound(listener, sec.identity, sec.mode)


def inbound_tcp_listener(host: str, port: int, app_port: int, sec: NodeSecurity = NO_SECURITY) -> listener_pb2.Listener:
    """The inbound listener of a ``tcp`` service: ``tcp_proxy`` to the local app (an L7 listener
    would answer a thrift client with an HTTP 400); mTLS chains as for HTTP (an ``authz``, made of
    HTTP rules, does not apply)."""
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix="inbound", cluster=xds.inbound_cluster(app_port))
    listener = listener_pb2.Listener(
        name=xds.INBOUND_LISTENER, address=_socket(host, port), traffic_direction=base_pb2.INBOUND,
        filter_chains=[listener_components_pb2.FilterChain(filters=[
            listener_components_pb2.Filter(name=TCP_PROXY_FILTER, typed_config=pack(proxy))])])
    return secure_inbound(listener, sec.identity, sec.mode)


def inbound_cluster(app_port: int, protocol: str = "http") -> cluster_pb2.Cluster:
    """The local app, over HTTP/2 when the sidecar runs with ``--protocol grpc``."""
    name = xds.inbound_cluster(app_port)
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    loc = cla.endpoints.add()
    loc.lb_endpoints.add(endpoint=endpoint_components_pb2.Endpoint(address=_socket(LOCAL_APP_HOST, app_port)))
    loc.load_balancing_weight.value = 1
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC,
                            connect_timeout=_seconds(CONNECT_TIMEOUT_S), load_assignment=cla)
    if protocol == "grpc":
        http2_options(c)
    return c


def node_policy(snapshot: RegistrySnapshot, node: NodeInfo) -> Policy:
    """The policy of the node's own service (its inbound side), the default one while unregistered."""
    svc = snapshot.services(node.namespace).get(node.service)
    return svc.policy if svc is not None else DEFAULT_POLICY


def node_resources(node: NodeInfo, policy: Policy = DEFAULT_POLICY, sec: NodeSecurity = NO_SECURITY) -> Resources:
    """Per-node resources, from the node, its own service's policy (:func:`node_policy`) and
    identity settings (:func:`node_security`); all three hash, so a caller may memoise on them. Proxyless clients get none (they are served by resource
    name: controlplane/proxyless.py); a sidecar without an app (app_port 0) gets no inbound listener or cluster."""
    out = empty_resources()
    if node.proxyless:
        return out
    out[xds.LISTENER][xds.OUTBOUND_LISTENER] = outbound_listener(node.outbound_port, policy.tracing)
    if not node.app_port:
        return out
    if node.protocol == "tcp" and node.outbound_policy:  # (a sidecar older than tcp_proxy sends no policy)
        listener = inbound_tcp_listener(node.advertise_host, node.inbound_port, node.app_port, sec)
    else:
        listener = inbound_listener(node.advertise_host, node.inbound_port, node.app_port, policy.rate_limit,
                                    policy.tracing, sec)
    out[xds.LISTENER][xds.INBOUND_LISTENER] = listener
    cluster = inbound_cluster(node.app_port, node.protocol)
    out[xds.CLUSTER][cluster.name] = cluster
    return out


def translate(snapshot: RegistrySnapshot, node: NodeInfo, identity: MeshIdentity | None = None) -> Resources:
    """All resources of ``node`` by type URL and name (``identity``: the mesh's, None without a CA)."""
    out = node_resources(node, node_policy(snapshot, node), node_security(snapshot, node, identity))
    for type_url, items in shared_resources(snapshot, node.namespace, identity).resources.items():
        out[type_url].update(items)
    return out
