"""The sidecar's own view of its configuration: immutable, validated objects built from xDS.

``sidecar.xds`` turns Envoy protos into these (refusing, with a NACK, what the sidecar cannot
honour); the data path only ever reads them. An update never mutates one of these objects: it
builds new ones and swaps them in whole.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

DEFAULT_CONNECT_TIMEOUT = 5.0  # Envoy's Cluster.connect_timeout default
DEFAULT_ROUTE_TIMEOUT = 15.0  # Envoy's RouteAction.timeout default
DEFAULT_IDLE_TIMEOUT = 3600.0  # Envoy's HttpProtocolOptions.idle_timeout default (both directions)
DEFAULT_PANIC_THRESHOLD = 50.0  # Envoy's common_lb_config.healthy_panic_threshold default, percent
LB_ROUND_ROBIN = "round_robin"
DISCOVERY_ORIGINAL_DST = "ORIGINAL_DST"  # each connection or request goes where it was dialled


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """``Cluster.outlier_detection``, Envoy's fields and defaults (times in seconds, percents 0..100).

    A detector whose ``enforcing_*`` is 0 still tracks the statistic but never ejects for it.
    With ``split_external_local_origin_errors`` local-origin failures (connect failure, timeout,
    reset) count only towards ``consecutive_local_origin_failure``; without it they count as 5xx
    (a connect failure or reset as 503, a timeout as 504), Envoy's default.
    """

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    consecutive_local_origin_failure: int = 5
    enforcing_consecutive_5xx: int = 100
    enforcing_consecutive_gateway_failure: int = 0
    enforcing_consecutive_local_origin_failure: int = 100
    split_external_local_origin_errors: bool = False
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: int = 1900  # thousandths: 1900 means mean - 1.9 * stdev
    enforcing_success_rate: int = 100
    failure_percentage_threshold: int = 85
    failure_percentage_minimum_hosts: int = 5
    failure_percentage_request_volume: int = 50
    enforcing_failure_percentage: int = 0


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    """The DEFAULT-priority ``circuit_breakers.thresholds`` entry, Envoy's defaults.

    With ``retry_budget_percent`` > 0 a retry budget replaces ``max_retries`` (as in Envoy): active
    retries may be at most that percent of active plus pending requests, but at least
    ``min_retry_concurrency``.
    """

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    retry_budget_percent: float = 0.0  # 0: no budget, max_retries applies
    min_retry_concurrency: int = 3


DEFAULT_CIRCUIT_BREAKERS = CircuitBreakerConfig()

# retry_on conditions the sidecar honours (Envoy's x-envoy-retry-on names).
RETRY_ON_SUPPORTED = frozenset({"5xx", "gateway-error", "connect-failure", "reset", "retriable-status-codes",
                                "refused-stream", "retriable-4xx",
                                # gRPC statuses of a trailers-only response (sidecar.proxy.grpc)
                                "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"})


@dataclass(frozen=True, slots=True)
class RetryPolicyConfig:
    """``RouteAction.retry_policy``: Envoy's defaults (one retry, 25 ms base back-off, 10x cap)."""

    retry_on: frozenset[str] = frozenset()
    num_retries: int = 1
    per_try_timeout: float = 0.0  # 0: each try may use what is left of the route timeout
    base_interval: float = 0.025
    max_interval: float = 0.25
    retriable_status_codes: frozenset[int] = frozenset()
    avoid_previous_hosts: bool = False  # retry_host_predicate envoy.retry_host_predicates.previous_hosts
    host_selection_retry_max_attempts: int = 1


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """The route's ``envoy.filters.http.fault`` config: a fixed delay and/or an abort, each with a
    percentage of requests (0..100, fractional allowed) it applies to."""

    delay: float = 0.0
    delay_percent: float = 0.0
    abort_status: int = 0
    abort_percent: float = 0.0


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """``envoy.filters.http.local_ratelimit``'s token bucket: ``max_tokens`` is the burst; the
    bucket gains ``tokens_per_fill`` every ``fill_interval`` seconds."""

    max_tokens: int
    tokens_per_fill: int
    fill_interval: float


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """One upstream host of a cluster.

    ``serving`` is false for endpoints the control plane marks DRAINING (weight 0 or disabled by an
    operator): they take no new requests, but their in-flight requests finish.
    """

    address: str
    port: int
    weight: int = 1
    serving: bool = True
    zone: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Istio's auto mTLS: the endpoint's metadata ``envoy.transport_socket_match`` says ``tlsMode:
    # mutual`` (its sidecar has an identity), so a cluster with an UpstreamTlsContext uses it.
    mtls: bool = False

    @property
    def key(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str
    discovery: str = "EDS"  # "EDS", "STATIC" or "ORIGINAL_DST" (endpoints made per original destination)
    lb_policy: str = LB_ROUND_ROBIN
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    outlier: OutlierConfig | None = None  # None: no outlier detection
    circuit_breakers: CircuitBreakerConfig = DEFAULT_CIRCUIT_BREAKERS
    healthy_panic_threshold: float = DEFAULT_PANIC_THRESHOLD  # percent; 0 disables panic mode
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # upstream connections idle this long are closed
    http2: bool = False  # HTTP/2 (h2c) to the endpoints: explicit_http_config.http2_protocol_options
    # STATIC clusters carry their endpoints inline; EDS clusters get them from a ClusterLoadAssignment.
    static_endpoints: tuple[EndpointConfig, ...] = ()
    # ``transport_socket_matches`` tlsMode-mutual: mTLS to the endpoints marked ``mtls``; None: plaintext.
    # An ORIGINAL_DST cluster's ``transport_socket``: mTLS to every destination.
    tls: UpstreamTlsConfig | None = None


@dataclass(frozen=True, slots=True)
class UpstreamTlsConfig:
    """A cluster's UpstreamTlsContext (docs/identity.md): the server's URI SAN must be ``san``
    exactly; ``alpn`` is offered in the handshake, ``sni`` sent as the server name."""

    san: str
    alpn: tuple[str, ...] = ()
    sni: str = ""


TLS_PERMISSIVE = "PERMISSIVE"  # the inbound listener's chains: mTLS and plaintext
TLS_STRICT = "STRICT"  # only the mTLS chain: plaintext matches no chain and is closed


@dataclass(frozen=True, slots=True)
class DownstreamTlsConfig:
    """The inbound listener's ``inbound-mtls`` chain (tls_inspector + DownstreamTlsContext): a
    client certificate is required and its URI SAN must start with ``san_prefix``; ``mode`` says
    whether a ``inbound-plaintext`` chain takes plaintext connections too."""

    mode: str
    san_prefix: str


@dataclass(frozen=True, slots=True)
class PrincipalMatch:
    """An RBAC principal: ``any``, or ``authenticated.principal_name`` matched ``exact`` or by ``prefix``
    against the caller's SPIFFE ID (a plaintext caller has none and matches only ``any``)."""

    any: bool = False
    exact: str = ""
    prefix: str = ""

    def matches(self, principal: str) -> bool:
        if self.any:
            return True
        if not principal:
            return False
        return principal == self.exact if self.exact else principal.startswith(self.prefix)


@dataclass(frozen=True, slots=True)
class PermissionMatch:
    """An RBAC permission: the request's method is one of ``methods`` and its path (without the
    query) starts with one of ``path_prefixes``; an empty set or tuple matches anything."""

    methods: frozenset[bytes] = frozenset()
    path_prefixes: tuple[bytes, ...] = ()

    def matches(self, method: bytes, path: bytes) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.path_prefixes:
            q = path.find(b"?")
            if q >= 0:
                path = path[:q]
            return path.startswith(self.path_prefixes)
        return True


@dataclass(frozen=True, slots=True)
class AuthzPolicy:
    """One RBAC policy: it matches when any permission and any principal match."""

    name: str
    permissions: tuple[PermissionMatch, ...]
    principals: tuple[PrincipalMatch, ...]

    def matches(self, method: bytes, path: bytes, principal: str) -> bool:
        return (any(p.matches(principal) for p in self.principals)
                and any(p.matches(method, path) for p in self.permissions))


AUTHZ_ALLOW = "ALLOW"
AUTHZ_DENY = "DENY"


@dataclass(frozen=True, slots=True)
class AuthzConfig:
    """``envoy.filters.http.rbac``'s rules: ALLOW lets through only requests some policy matches
    (no policy: nothing), DENY refuses the requests some policy matches."""

    action: str
    policies: tuple[AuthzPolicy, ...] = ()

    def allows(self, method: bytes, path: bytes, principal: str) -> bool:
        matched = any(p.matches(method, path, principal) for p in self.policies)
        return matched if self.action == AUTHZ_ALLOW else not matched


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    name: str
    weight: int


# A header name as RFC 9110 writes a token, lower-case (as HTTP/2 and Envoy's matchers use them).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
# Pseudo-headers a HeaderMatch may name: the request method, matched exactly.
PSEUDO_HEADERS = frozenset({":method"})


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One ``RouteMatch.headers`` entry: exactly one of ``exact``, ``prefix``, ``present``.

    Envoy's semantics: a missing header fails every match except ``present``; ``invert`` flips
    the outcome of a header that is there (``present`` flips either way). ``ignore_case`` compares
    ASCII letters case-insensitively. With a header repeated, the match holds if any one value
    matches (Envoy would match the values joined with commas). Values are compared without the
    whitespace around them. ``:method`` (the request method) may only be matched exactly.
    """

    name: str
    exact: str | None = None
    prefix: str | None = None
    present: bool | None = None  # True: the header is there; False: it is not
    invert: bool = False
    ignore_case: bool = False

    def __post_init__(self) -> None:
        if not (_HEADER_NAME.fullmatch(self.name) or self.name in PSEUDO_HEADERS):
            raise ValueError(f"header match: {self.name!r} is not a lower-case header name")
        if sum(x is not None for x in (self.exact, self.prefix, self.present)) != 1:
            raise ValueError(f"header match {self.name!r}: needs exactly one of exact, prefix, present")
        if self.prefix == "":
            raise ValueError(f"header match {self.name!r}: an empty prefix")
        if self.name in PSEUDO_HEADERS and self.exact is None:
            raise ValueError(f"header match {self.name!r}: a pseudo-header may only be matched exactly")


@dataclass(frozen=True, slots=True)
class Route:
    """A route: a path-prefix match, header matches (all must hold), and where it goes."""

    prefix: str = "/"
    cluster: str = ""
    weighted_clusters: tuple[WeightedCluster, ...] = ()
    timeout: float = DEFAULT_ROUTE_TIMEOUT  # 0 disables, as in Envoy
    retry_policy: RetryPolicyConfig | None = None
    fault: FaultConfig | None = None
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    virtual_hosts: tuple[VirtualHost, ...] = ()


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """A listener as far as the sidecar uses it: which route configuration its HCM reads.

    Either ``rds_name`` names a RouteConfiguration delivered by RDS, or ``route_config`` is inline.
    The socket itself is bound from the sidecar's flags (like Envoy's bootstrap), matched by name.
    """

    name: str
    rds_name: str = ""
    route_config: RouteConfig | None = None
    rate_limit: RateLimitConfig | None = None  # local rate limit of the whole listener
    request_headers_timeout: float = 0.0  # 0: none (Envoy's default); else 408 and close
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # downstream connections idle this long are closed
    # The HCM runs envoy.filters.http.fault. Without it, as in Envoy, routes' fault configs do not
    # apply: drop Route.fault of this listener's routes (an inline route_config has them dropped already).
    fault_filter: bool = True
    # HCM tracing.random_sampling as a ratio (0..1) for new traces; None: the HCM has no tracing
    # config and the sidecar's --trace-sample-ratio applies.
    trace_sample_ratio: float | None = None
    # A listener whose only network filter is tcp_proxy (then no rds_name / route_config).
    tcp: TcpRoute | None = None
    # Transparent mode: the outbound listener's original_dst filter and default chain.
    transparent: TransparentConfig | None = None
    # ``virtual_outbound`` (bind_to_port false): the chains redirected connections are matched against.
    chains: tuple[FilterChain, ...] = ()
    # ``dns`` (a UDP listener with the DNS filter): the mesh names it answers.
    dns: DnsTableConfig | None = None
    # Listeners the sidecar binds from their address (explicit mode's ``tcp|<svc>.<ns>``): (host, port).
    bind: tuple[str, int] | None = None
    # mTLS (docs/identity.md): the inbound listener's tls_inspector and its mTLS chain; None: plaintext only.
    tls: DownstreamTlsConfig | None = None
    # HCM forward_client_cert_details SANITIZE_SET (with set_current_client_cert_details.uri): a
    # caller's x-forwarded-client-cert is removed and, on mTLS, By=<own ID>;Hash=<caller cert
    # SHA-256>;URI=<caller ID> set.
    xfcc_sanitize_set: bool = False
    xfcc_uri: bool = False
    # The HCM's envoy.filters.http.rbac, evaluated before routing; None: no filter, all allowed.
    rbac: AuthzConfig | None = None


@dataclass(frozen=True, slots=True)
class TcpRoute:
    """A ``tcp_proxy`` network filter: the cluster (or weighted clusters) connections go to."""

    stat_prefix: str
    clusters: tuple[WeightedCluster, ...]
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # 0: none


@dataclass(frozen=True, slots=True)
class FilterChain:
    """One filter chain of a listener: what it matches (the connection's original destination:
    an exact address, ``port`` 0 for any) and its network filter, an HTTP connection manager
    (``http``) or a ``tcp_proxy`` (``tcp``)."""

    name: str
    address: str = ""  # "" matches any address
    port: int = 0
    http: ListenerConfig | None = None
    tcp: TcpRoute | None = None


@dataclass(frozen=True, slots=True)
class DnsTableConfig:
    """The ``dns`` listener's inline table: name (lower case, no trailing dot) -> addresses."""

    names: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class TransparentConfig:
    """What makes a bound listener a transparent one (DESIGN §10): it reads each connection's
    original destination; the HCM of the listener serves connections dialled to ``explicit_port``
    (apps that dial the sidecar themselves), the others are matched against the chains of
    ``virtual_outbound``, and what matches none goes to ``default_chain``. Without
    ``original_dst`` (explicit mode) only ``default_chain`` is set: the outbound policy, which
    the HCM applies to proxy requests (absolute-form, CONNECT) for hosts outside the mesh."""

    explicit_port: int = 0
    default_chain: FilterChain | None = None
    original_dst: bool = True  # False: explicit mode, only the default chain (the outbound policy)


@dataclass(frozen=True, slots=True)
class SecretConfig:
    """An SDS ``Secret`` (docs/identity.md): ``default`` carries ``certificate_chain`` (PEM, leaf
    first; never a private key: the sidecar made its own), ``ROOTCA`` carries ``trusted_ca`` (PEM)."""

    name: str
    certificate_chain: bytes = b""
    trusted_ca: bytes = b""


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """An RTDS ``Runtime`` resource: its name (the service) and its layer flattened into strings.

    Nested Structs are joined with dots (``{"a": {"b": 1}}`` is ``a.b = "1"``); numbers and
    booleans are their JSON text. The values are what the sidecar serves the app at ``/runtime``.
    """

    name: str
    values: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not isinstance(self.values, MappingProxyType):
            object.__setattr__(self, "values", MappingProxyType(dict(sorted(self.values.items()))))
