"""Registry snapshot -> xDS resources for proxyless gRPC clients (DESIGN §12). Pure functions.

A stock grpcio client (``GRPC_XDS_BOOTSTRAP`` naming the control plane, its Node without Meshkeeper
metadata) asks for the Listener named exactly as its target: ``xds:///catalog.default`` asks for
``catalog.default``, ``xds:///catalog.default:50051`` for ``catalog.default:50051``, and
``xds:///catalog`` for ``catalog`` (the node's namespace). It then walks LDS -> RDS -> CDS -> EDS by
the names each resource gives. So these resources are found by *name*, not by node:

- Listener ``<target>``: an ``api_listener`` holding an HttpConnectionManager with RDS
  ``<target>`` and the filters ``fault`` then ``router``.
- RouteConfiguration ``<target>``: one virtual host whose only domain is ``<target>`` (grpcio
  matches the target against it), with the same routes as the sidecars' virtual host of the
  service: header matches to version subsets, a split over them, fault injection; the route timeout
  as ``max_stream_duration`` (gRFC A31: grpcio ignores ``timeout``) and retries as gRPC status codes
  (gRFC A44).
- Cluster ``outbound|<svc>.<ns>`` (and ``|<version>`` subsets): EDS, ROUND_ROBIN or RING_HASH
  (gRFC A42), ``circuit_breakers.max_requests`` (gRFC A32) and the outlier detectors grpcio runs
  (success rate and failure percentage, gRFC A50).
- ClusterLoadAssignment of the same name: **one locality per serving endpoint**, weighted by the
  endpoint's effective weight. grpcio drops localities without a weight and its round_robin
  ignores endpoint weights, but it picks localities by weight (``xds_wrr_locality``), so this is how
  the registry's weights reach it; under RING_HASH it weighs each endpoint by locality weight times
  endpoint weight, so endpoints carry 1. Endpoints that do not serve (disabled, weight 0) are left
  out: grpcio has no draining state of its own to honour.

What grpcio cannot honour (connect timeout, panic threshold, consecutive-failure ejection, retry
budgets, LEAST_REQUEST, RANDOM, cookie hashing, per-try timeouts) is left out rather than NACKed;
docs/xds-support.md ("Proxyless gRPC") has the list. Returned messages are shared: read-only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf.message import Message

from controlplane import translate as tr
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from controlplane.xdsbuild import ads_source, pack
from meshkeeper import xds
from meshkeeper.policy import LoadBalancing, Outlier, Policy, Retry
from meshkeeper.registry import RecordError, effective_weight, is_serving, validate_name

# gRFC A44: the retry conditions grpcio knows (gRPC status codes, Envoy's spelling).
GRPC_RETRY_ON = ("cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable")
# The policy's HTTP conditions, as gRPC sees them: a 502/503/504, a refused or reset stream and a
# failed connect all reach a gRPC client as UNAVAILABLE (gRPC's HTTP-to-status mapping); a plain
# 5xx is UNKNOWN or INTERNAL from the app, which gRPC does not consider safe to retry.
_RETRY_ON_AS_GRPC = {"5xx": "unavailable", "gateway-error": "unavailable", "connect-failure": "unavailable",
                     "reset": "unavailable", "refused-stream": "unavailable"}
# gRFC A42: the hash the sidecars take from the client address, per client: grpcio's channel id.
CHANNEL_ID_KEY = "io.grpc.channel_id"
# Policy LB -> what grpcio runs. It refuses LEAST_REQUEST and RANDOM ("LB policy is not supported")
# and knows no MAGLEV: the closest it honours is round robin, and ring hash for maglev (both hash
# requests onto a consistent set of endpoints, only the table differs).
LB_POLICIES = {"round_robin": cluster_pb2.Cluster.ROUND_ROBIN, "least_request": cluster_pb2.Cluster.ROUND_ROBIN,
               "random": cluster_pb2.Cluster.ROUND_ROBIN, "ring_hash": cluster_pb2.Cluster.RING_HASH,
               "maglev": cluster_pb2.Cluster.RING_HASH}
MAX_PORT = 65535


def parse_target(name: str, default_namespace: str) -> tuple[str, str] | None:
    """``<svc>[.<ns>][:<port>]`` -> (svc, ns); None for a name that is no service target (the
    port, when given, is only part of the name: endpoints come with their own)."""
    host, sep, port = name.partition(":")
    if sep and not (port.isdigit() and 0 < int(port) <= MAX_PORT and port == str(int(port))):
        return None
    svc, dot, ns = host.partition(".")
    ns = ns if dot else default_namespace
    try:
        validate_name("service", svc)
        validate_name("namespace", ns)
    except RecordError:
        return None
    return svc, ns


# --------------------------------------------------------------------------- LDS and RDS


def api_listener(name: str) -> listener_pb2.Listener:
    """The Listener grpcio asks for by its target: no address, an ``api_listener`` whose HCM takes
    RouteConfiguration ``name`` over ADS. The fault filter is empty (routes carry the faults), the
    router is last, as grpcio requires."""
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name, rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=name),
        http_filters=[tr._fault_filter(), tr._router_filter()])
    return listener_pb2.Listener(name=name, api_listener=api_listener_pb2.ApiListener(api_listener=pack(hcm)))


def retry_policy(r: Retry) -> route_components_pb2.RetryPolicy | None:
    """gRFC A44: ``retry_on`` as gRPC status codes (the policy's HTTP conditions map to
    ``unavailable``; gRPC names pass as they are), ``num_retries`` (gRFC A6 limits a call to 5 attempts) and
    back-off. None when no condition maps, or no retry is asked for."""
    codes = sorted({c if c in GRPC_RETRY_ON else _RETRY_ON_AS_GRPC.get(c, "") for c in r.on} - {""})
    if not codes or not r.attempts:
        return None
    return route_components_pb2.RetryPolicy(
        retry_on=",".join(codes), num_retries=tr._u32(r.attempts),
        retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
            base_interval=tr._millis(tr.RETRY_BASE_INTERVAL_MS), max_interval=tr._millis(tr.RETRY_MAX_INTERVAL_MS)))


def hash_policy(lb: LoadBalancing) -> list[route_components_pb2.RouteAction.HashPolicy]:
    """gRFC A42: a header, or the channel (for ``source_ip``: one client, one endpoint); cookies
    are not hashed by grpcio (it then hashes randomly, per call)."""
    kind, _, name = lb.hash_on.partition(":")
    if kind == "header":
        return [route_components_pb2.RouteAction.HashPolicy(
            header=route_components_pb2.RouteAction.HashPolicy.Header(header_name=name.lower()))]
    if kind == "source_ip":
        return [route_components_pb2.RouteAction.HashPolicy(
            filter_state=route_components_pb2.RouteAction.HashPolicy.FilterState(key=CHANNEL_ID_KEY))]
    return []


def _route(name: str, cluster: str, policy: Policy) -> route_components_pb2.Route:
    action = route_components_pb2.RouteAction(cluster=cluster)
    if policy.timeout_ms:  # 0: no timeout, as for the sidecars
        action.max_stream_duration.max_stream_duration.CopyFrom(tr._millis(policy.timeout_ms))
        action.max_stream_duration.grpc_timeout_header_max.CopyFrom(tr._millis(policy.timeout_ms))
    retry = retry_policy(policy.retry) if policy.retry is not None else None
    if retry is not None:
        action.retry_policy.CopyFrom(retry)
    if LB_POLICIES[policy.lb.policy] == cluster_pb2.Cluster.RING_HASH:
        action.hash_policy.extend(hash_policy(policy.lb))
    route = route_components_pb2.Route(name=name, match=route_components_pb2.RouteMatch(prefix="/"),
                                       route=action)
    fault = tr.http_fault(policy.fault)
    if fault is not None:
        route.typed_per_filter_config[xds.FAULT_FILTER].Pack(fault)
    return route


def route_configuration(name: str, svc: ServiceSnapshot) -> route_pb2.RouteConfiguration:
    """RouteConfiguration ``name``: one virtual host with the domain ``name``; the service's
    header-matched routes to its subsets first, then the default route (a split over the subsets,
    or the whole service), as the sidecars route it."""
    policy, versions = svc.policy, tr.subset_versions(svc)
    routes = []
    for i, m in enumerate(policy.match):
        if m.subset in versions:
            route = _route(f"match-{i}", xds.outbound_cluster(svc.name, svc.namespace, m.subset), policy)
            route.match.headers.append(tr.header_matcher(m))
            routes.append(route)
    default = _route("default", xds.outbound_cluster(svc.name, svc.namespace), policy)
    split = tr.split_clusters(svc)
    if split:
        default.route.weighted_clusters.CopyFrom(tr.weighted_clusters(split))
    routes.append(default)
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[
        route_components_pb2.VirtualHost(name=f"{svc.name}.{svc.namespace}", domains=[name], routes=routes)])


# --------------------------------------------------------------------------- CDS and EDS


def outlier_detection(o: Outlier) -> outlier_detection_pb2.OutlierDetection:
    """gRFC A50: grpcio ejects by success rate and failure percentage only (the consecutive-failure
    detectors are not implemented, so they are not sent). Envoy's defaults otherwise: success rate
    enforced at 100%, failure percentage at 0%."""
    out = outlier_detection_pb2.OutlierDetection(
        interval=tr._millis(o.interval_ms), base_ejection_time=tr._millis(o.base_ejection_ms),
        max_ejection_time=tr._millis(o.max_ejection_ms), max_ejection_percent=tr._u32(o.max_ejection_percent))
    if o.success_rate is not None:
        sr = o.success_rate
        out.success_rate_minimum_hosts.value = sr.minimum_hosts
        out.success_rate_request_volume.value = sr.request_volume
        out.success_rate_stdev_factor.value = sr.stdev_factor
        out.enforcing_success_rate.value = sr.enforcing_percent
    if o.failure_percentage is not None:
        fp = o.failure_percentage
        out.failure_percentage_threshold.value = fp.threshold
        out.failure_percentage_minimum_hosts.value = fp.minimum_hosts
        out.failure_percentage_request_volume.value = fp.request_volume
        out.enforcing_failure_percentage.value = fp.enforcing_percent
    return out


def eds_cluster(name: str, policy: Policy) -> cluster_pb2.Cluster:
    """An EDS cluster with what grpcio honours of the policy: LB policy, ``max_requests`` and the
    outlier detectors it runs."""
    c = cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source(), service_name=name),
        lb_policy=LB_POLICIES[policy.lb.policy],
        circuit_breakers=circuit_breaker_pb2.CircuitBreakers(thresholds=[circuit_breaker_pb2.CircuitBreakers.Thresholds(
            priority=base_pb2.DEFAULT, max_requests=tr._u32(policy.circuit_breaker.max_requests))]))
    if policy.outlier is not None:
        c.outlier_detection.CopyFrom(outlier_detection(policy.outlier))
    return c


def load_assignment(name: str, svc: ServiceSnapshot, instances: Iterable) -> endpoint_pb2.ClusterLoadAssignment:
    """One locality per serving endpoint (zone: its zone label, sub_zone: ``host:port``), weighted
    by its effective weight; endpoints weigh 1 (see the module docstring)."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    for inst in sorted(instances, key=lambda i: i.key):
        override = svc.overrides.get(inst.key)
        if not is_serving(inst, override):
            continue
        loc = cla.endpoints.add(locality=base_pb2.Locality(zone=inst.zone, sub_zone=inst.key),
                                load_balancing_weight=tr._u32(effective_weight(inst, override)))
        loc.lb_endpoints.add(endpoint=endpoint_components_pb2.Endpoint(address=tr._socket(inst.address, inst.port)),
                             health_status=health_check_pb2.HEALTHY, load_balancing_weight=tr._u32(1))
    return cla


# --------------------------------------------------------------------------- by name


@lru_cache(maxsize=16)
def _clusters(snapshot: RegistrySnapshot, namespace: str) -> Mapping[str, tuple[Message, Message]]:
    """Cluster name -> (Cluster, ClusterLoadAssignment) of every service of a namespace, once per
    snapshot."""
    out: dict[str, tuple[Message, Message]] = {}
    for name, svc in sorted(snapshot.services(namespace).items()):
        main = xds.outbound_cluster(name, namespace)
        out[main] = (eds_cluster(main, svc.policy), load_assignment(main, svc, svc.instances.values()))
        for version, instances in tr.subset_versions(svc).items():
            sub = xds.outbound_cluster(name, namespace, version)
            out[sub] = (eds_cluster(sub, svc.policy), load_assignment(sub, svc, instances))
    return out


def resource(snapshot: RegistrySnapshot, type_url: str, name: str, namespace: str) -> Message | None:
    """The resource ``name`` of ``type_url`` for a proxyless client whose own namespace is
    ``namespace`` (targets without one resolve there); None when there is no such service."""
    if type_url in (xds.LISTENER, xds.ROUTE):
        target = parse_target(name, namespace)
        svc = snapshot.services(target[1]).get(target[0]) if target else None
        if svc is None or svc.record.protocol not in tr.HTTP_PROTOCOLS:
            return None
        return api_listener(name) if type_url == xds.LISTENER else route_configuration(name, svc)
    if type_url in (xds.CLUSTER, xds.ENDPOINT):
        try:
            _, ns, _ = xds.parse_outbound_cluster(name)
        except ValueError:
            return None
        got = _clusters(snapshot, ns).get(name)
        return None if got is None else got[0 if type_url == xds.CLUSTER else 1]
    return None


def wildcard_names(snapshot: RegistrySnapshot, type_url: str, namespace: str) -> list[str]:
    """What a wildcard subscription (no names) of a proxyless node means: the targets ``<svc>.<ns>``
    or the clusters of its own namespace. grpcio always names what it wants."""
    if type_url in (xds.LISTENER, xds.ROUTE):
        return [f"{name}.{namespace}" for name, svc in sorted(snapshot.services(namespace).items())
                if svc.record.protocol in tr.HTTP_PROTOCOLS]
    if type_url in (xds.CLUSTER, xds.ENDPOINT):
        return sorted(_clusters(snapshot, namespace))
    return []
