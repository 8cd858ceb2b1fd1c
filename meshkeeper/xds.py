"""xDS contracts shared by the control plane and the sidecar (DESIGN §4).

Resource names, type URLs and the node identity a sidecar presents on its ADS stream. The
control plane builds per-node resources (the inbound listener and cluster) from the node
metadata below; everything else is shared by all sidecars of a namespace.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshkeeper.registry import DEFAULT_NAMESPACE, validate_name

# Type URLs, in the order a client must apply them (CDS before EDS, LDS before RDS).
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
RUNTIME = "type.googleapis.com/envoy.service.runtime.v3.Runtime"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # SDS (docs/identity.md)
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
LOCAL_RATELIMIT = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
PREVIOUS_HOSTS = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
HTTP_PROTOCOL_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# Extension names. A route's typed_per_filter_config is keyed by the HTTP filter's name.
ROUTER_FILTER = "envoy.filters.http.router"
FAULT_FILTER = "envoy.filters.http.fault"
LOCAL_RATELIMIT_FILTER = "envoy.filters.http.local_ratelimit"
PREVIOUS_HOSTS_PREDICATE = "envoy.retry_host_predicates.previous_hosts"
# Cluster.typed_extension_protocol_options key of the upstream HTTP protocol options.
HTTP_PROTOCOL_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

SHORT_TYPE = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS", RUNTIME: "RTDS", SECRET: "SDS"}
# Wildcard types: an empty resource_names list means "everything" (SotW, DESIGN §4).
WILDCARD_TYPES = (LISTENER, CLUSTER)

# Load reporting (LRS): the named load metric that carries request latency, in
# UpstreamEndpointStats.load_metric_stats (and summed per locality): num_requests_finished_with_metric
# counts the requests that finished (succeeded or errored) in the interval, total_metric_value sums
# their latencies in seconds. Envoy reports only ORCA metrics there; this name is ours.
LRS_LATENCY_METRIC = "rq_latency_seconds"
# The same requests by latency bucket, so that the control plane can add reports up and derive
# quantiles (p99) as Prometheus' histogram_quantile does: one entry per non-empty bucket, named
# "rq_latency_seconds_bucket:<upper bound>" ("+Inf" last), NOT cumulative: num_requests_finished_with_metric
# counts the requests whose latency fell in (previous bound, bound]; total_metric_value repeats that
# count (each request contributes 1). Bounds are the sidecar's upstream_rq_time buckets; the bucket
# below a non-empty one is sent too (with 0 when empty), so every bucket's lower bound is known.
LRS_LATENCY_BUCKET_PREFIX = LRS_LATENCY_METRIC + "_bucket:"


def lrs_bucket_name(bound: float) -> str:
    return LRS_LATENCY_BUCKET_PREFIX + ("+Inf" if bound == float("inf") else repr(bound))


def parse_lrs_bucket(metric_name: str) -> float | None:
    """The upper bound a bucket metric names (inf for "+Inf"), or None for any other metric."""
    if not metric_name.startswith(LRS_LATENCY_BUCKET_PREFIX):
        return None
    text = metric_name[len(LRS_LATENCY_BUCKET_PREFIX):]
    try:
        bound = float("inf") if text == "+Inf" else float(text)
    except ValueError:
        return None
    return bound if bound > 0 else None

OUTBOUND_LISTENER = "outbound"
INBOUND_LISTENER = "inbound"
OUTBOUND_ROUTE = "outbound"
INBOUND_ROUTE = "inbound"
# Transparent mode (DESIGN §10), sent only to sidecars with interception "redirect": the filter
# chains a redirected connection is matched against by its original destination (service VIPs and
# registered instance addresses), the mesh DNS's table, and where the rest goes.
VIRTUAL_OUTBOUND_LISTENER = "virtual_outbound"
DNS_LISTENER = "dns"
PASSTHROUGH_CLUSTER = "PassthroughCluster"  # ORIGINAL_DST: to wherever the app dialled (allow_any)
BLACKHOLE_CLUSTER = "BlackHoleCluster"  # no endpoints: refused and counted (registry_only)
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"  # the pod's other ports, to the app unchanged
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
DNS_FILTER = "type.googleapis.com/envoy.extensions.filters.udp.dns_filter.v3.DnsFilterConfig"
ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"
INTERCEPTION_MODES = ("none", "redirect")
OUTBOUND_POLICIES = ("allow_any", "registry_only")


def outbound_cluster(svc: str, ns: str, subset: str = "") -> str:
    """``outbound|<svc>.<ns>`` or, for a version subset, ``outbound|<svc>.<ns>|<version>``."""
    base = f"outbound|{svc}.{ns}"
    return f"{base}|{subset}" if subset else base


def outbound_service(cluster: str, ns: str) -> str | None:
    """The service of namespace ``ns`` that ``outbound|<svc>.<ns>[|<version>]`` names, else None."""
    kind, _, rest = cluster.partition("|")
    host = rest.partition("|")[0]
    svc, dot, cluster_ns = host.partition(".")
    if kind != "outbound" or not dot or cluster_ns != ns or not svc:
        return None
    return svc


def service_of_authority(authority: str, ns: str) -> str | None:
    """The service of namespace ``ns`` a Host header names by one of its domains (``svc``,
    ``svc.ns``, either with a port: :func:`service_domains`), else None."""
    host = authority.lower()
    if host.startswith("["):
        return None
    host = host.rpartition(":")[0] if ":" in host else host
    svc, dot, rest = host.partition(".")
    if dot and rest != ns:
        return None
    try:
        return validate_name("service", svc)
    except ValueError:
        return None


def passthrough_cluster(svc: str, ns: str) -> str:
    """``passthrough|<svc>.<ns>``: an ORIGINAL_DST cluster with the service's policy, for apps that
    dial one of its instances by address (the Dubbo/thrift style): the call goes to that instance,
    through the mesh, counted under the service."""
    return f"passthrough|{svc}.{ns}"


def tcp_listener(svc: str, ns: str) -> str:
    """``tcp|<svc>.<ns>``: explicit mode's local listener of a ``tcp`` service (127.0.0.1:<its port>)."""
    return f"tcp|{svc}.{ns}"


def inbound_cluster(app_port: int) -> str:
    return f"inbound|{app_port}"


def parse_outbound_cluster(name: str) -> tuple[str, str, str]:
    """``outbound|svc.ns[|subset]`` -> (svc, ns, subset); raises ValueError otherwise."""
    parts = name.split("|")
    if len(parts) not in (2, 3) or parts[0] != "outbound" or "." not in parts[1]:
        raise ValueError(f"not an outbound cluster name: {name!r}")
    svc, _, ns = parts[1].partition(".")
    return svc, ns, parts[2] if len(parts) == 3 else ""


def service_domains(svc: str, ns: str, port: int | None = None) -> list[str]:
    """Virtual-host domains of a service: ``svc``, ``svc.ns``, and each with ``:port`` when given.

    ``<svc>:*`` is added so that a ``Host: catalog:8080`` header routes whatever port the
    app used, as with Istio's service domains.
    """
    names = [svc, f"{svc}.{ns}"]
    out = list(names)
    out += [f"{n}:*" for n in names]
    if port:
        out += [f"{n}:{port}" for n in names]
    return out


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a sidecar tells the control plane about itself in ``Node.metadata``.

    ``node.id`` is ``sidecar~<advertise_host>~<service>-<inbound_port>.<namespace>`` and
    ``node.cluster`` is the service name, as with Envoy's ``--service-cluster``. The ports are
    the ones actually bound (flags may say 0).
    """

    node_id: str
    service: str
    namespace: str = DEFAULT_NAMESPACE
    app_port: int = 0
    inbound_port: int = 0
    outbound_port: int = 0
    admin_port: int = 0
    advertise_host: str = "127.0.0.1"
    version: str = ""
    protocol: str = "http"
    interception: str = "none"  # "redirect": transparent mode (DESIGN §10)
    # Where traffic for no known service goes: allow_any | registry_only; "" from a sidecar older than
    # the outbound policy (it would NACK the default chain and the ORIGINAL_DST clusters: it gets neither).
    outbound_policy: str = "allow_any"
    # The services of its namespace this sidecar may call (Istio's Sidecar egress hosts), comma-
    # separated, "*" for all; with any other value it is scoped (DESIGN §13): it is sent only those
    # services, and discovers others on demand. "*" (the default, and from older sidecars) defers
    # to the own service's ``policy.egress``.
    egress: str = "*"
    proxyless: bool = False

    META_FIELDS = ("service", "namespace", "app_port", "inbound_port", "outbound_port", "admin_port",
                   "advertise_host", "version", "protocol", "interception", "outbound_policy", "egress")

    @staticmethod
    def make_id(advertise_host: str, service: str, inbound_port: int, namespace: str) -> str:
        return f"sidecar~{advertise_host}~{service}-{inbound_port}.{namespace}"

    def metadata(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.META_FIELDS}

    @classmethod
    def from_node(cls, node_id: str, cluster: str, metadata: Mapping[str, Any]) -> NodeInfo:
        """Build from a Node's id, cluster and metadata (a dict from ``MessageToDict``).

        Proxies that send no ``service`` in their metadata (proxyless gRPC clients) are marked
        ``proxyless``: they are served by resource name (controlplane.proxyless), and their
        metadata may name the namespace in which targets without one (``xds:///catalog``) resolve.
        """
        if "service" not in metadata:
            ns = str(metadata.get("namespace") or DEFAULT_NAMESPACE)
            validate_name("namespace", ns)
            return cls(node_id=node_id, service=cluster or "", namespace=ns, proxyless=True)
        ns = str(metadata.get("namespace") or DEFAULT_NAMESPACE)
        svc = str(metadata["service"])
        validate_name("namespace", ns)
        validate_name("service", svc)

        def port(key: str) -> int:
            v = metadata.get(key, 0)
            try:
                n = int(v)
            except (TypeError, ValueError):
                raise ValueError(f"node metadata {key}: expected a port, got {v!r}") from None
            if not 0 <= n < 65536:
                raise ValueError(f"node metadata {key}: {n} is not a port")
            return n

        return cls(
            node_id=node_id, service=svc, namespace=ns,
            app_port=port("app_port"), inbound_port=port("inbound_port"),
            outbound_port=port("outbound_port"), admin_port=port("admin_port"),
            advertise_host=str(metadata.get("advertise_host") or "127.0.0.1"),
            version=str(metadata.get("version") or ""),
            protocol=str(metadata.get("protocol") or "http"),
            interception=_one_of(metadata, "interception", INTERCEPTION_MODES),
            outbound_policy=_one_of(metadata, "outbound_policy", OUTBOUND_POLICIES) if "outbound_policy" in metadata else "",
            egress=",".join(parse_egress(str(metadata.get("egress", "*")))),
        )

    @property
    def declared_egress(self) -> frozenset[str] | None:
        """The services this sidecar declared it calls; None: all ("*")."""
        names = parse_egress(self.egress)
        return None if "*" in names else frozenset(names)


def parse_egress(value: str) -> list[str]:
    """``--egress`` / node metadata ``egress``: service names separated by commas, or ``*``; empty
    means none (everything on demand). Raises ValueError naming a bad entry."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    for n in names:
        if n != "*":
            try:
                validate_name("service", n)
            except ValueError as exc:
                raise ValueError(f"egress: {exc}") from None
    return sorted(set(names))


def _one_of(metadata: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    """A metadata value from ``allowed``; absent means the first (older sidecars send none)."""
    v = metadata.get(key) or allowed[0]
    if v not in allowed:
        raise ValueError(f"node metadata {key}: {v!r} is not one of {', '.join(allowed)}")
    return str(v)
