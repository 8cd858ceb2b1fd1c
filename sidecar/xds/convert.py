"""Envoy protos -> the sidecar's config objects, refusing what the sidecar cannot honour.

Each converter checks the fields that are set on a message against the list the sidecar
honours (docs/xds-support.md). A field outside that list raises :class:`XdsError`, which the
xDS client turns into a NACK that names the resource and the field, and the previous config stays
in force. Fields whose presence does not change behaviour (names, stat prefixes, metadata) are
accepted and ignored. Unset fields take Envoy's defaults (the defaults of ``sidecar.config``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable
from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, health_check_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_http_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401  (registers the type for Any)
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401  (registers the type)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.service.runtime.v3 import rtds_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError, Message

from meshkeeper import xds
from sidecar.codec.headers import UNMATCHABLE_HEADERS
from sidecar.config import (
    AUTHZ_ALLOW,
    AUTHZ_DENY,
    DEFAULT_CIRCUIT_BREAKERS,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_PANIC_THRESHOLD,
    DEFAULT_ROUTE_TIMEOUT,
    DISCOVERY_ORIGINAL_DST,
    LB_ROUND_ROBIN,
    RETRY_ON_SUPPORTED,
    TLS_PERMISSIVE,
    TLS_STRICT,
    AuthzConfig,
    AuthzPolicy,
    CircuitBreakerConfig,
    ClusterConfig,
    DownstreamTlsConfig,
    EndpointConfig,
    FaultConfig,
    HeaderMatch,
    ListenerConfig,
    OutlierConfig,
    PermissionMatch,
    PrincipalMatch,
    RateLimitConfig,
    RetryPolicyConfig,
    Route,
    RouteConfig,
    RuntimeConfig,
    TcpRoute,
    UpstreamTlsConfig,
    VirtualHost,
    WeightedCluster,
)

_HCM = http_connection_manager_pb2.HttpConnectionManager
_SERVING = (health_check_pb2.UNKNOWN, health_check_pb2.HEALTHY, health_check_pb2.DEGRADED)
_LB_POLICIES = {
    cluster_pb2.Cluster.ROUND_ROBIN: LB_ROUND_ROBIN,
    cluster_pb2.Cluster.LEAST_REQUEST: "least_request",
    cluster_pb2.Cluster.RANDOM: "random",
}
# Envoy's defaults where sidecar.config has no named one.
DEFAULT_RETRY_BUDGET_PERCENT = 20.0
DEFAULT_MIN_RETRY_CONCURRENCY = 3
MIN_FILL_INTERVAL = 0.05  # Envoy refuses a local rate limit fill_interval under 50 ms
_DENOMINATORS = {percent_pb2.FractionalPercent.HUNDRED: 100, percent_pb2.FractionalPercent.TEN_THOUSAND: 10_000,
                 percent_pb2.FractionalPercent.MILLION: 1_000_000}
# mTLS and authz (docs/identity.md)
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
UPSTREAM_TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
DOWNSTREAM_TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
TLS_INSPECTOR_FILTER = "envoy.filters.listener.tls_inspector"
TLS_INSPECTOR = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"  # the endpoint metadata filter auto mTLS reads
TLS_MODE_KEY, TLS_MODE_MUTUAL = "tlsMode", "mutual"
_CERTIFICATE_SECRET, _TRUST_BUNDLE_SECRET = "default", "ROOTCA"
_SERVER_ALPN = ("h2", "http/1.1")  # what the sidecar's TLS server negotiates (sidecar.tls.identity)
_SNI = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*")
_UPSTREAM_ALPN = {("h2",), ("http/1.1",), ("h2", "http/1.1")}


class XdsError(ValueError):
    """A resource the sidecar cannot honour; the message becomes the NACK's error_detail."""


def _only(msg: Message, allowed: Iterable[str], where: str) -> None:
    allowed = set(allowed)
    for fd, _ in msg.ListFields():
        if fd.name not in allowed:
            raise XdsError(f"{where}: field '{fd.name}' is not supported by this sidecar")


def _seconds(duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def _duration(msg: Message, name: str, default: float, where: str) -> float:
    """A Duration field in seconds; ``default`` when unset; negative durations are refused."""
    if not msg.HasField(name):
        return default
    value = _seconds(getattr(msg, name))
    if value < 0:
        raise XdsError(f"{where}: {name} must not be negative")
    return value


def _wrapped(msg: Message, name: str, default):
    """The value of a wrapper field (UInt32Value, BoolValue, Percent...), ``default`` when unset."""
    return getattr(msg, name).value if msg.HasField(name) else default


def _fraction(fp: percent_pb2.FractionalPercent, where: str) -> float:
    """A FractionalPercent as a percent 0..100; Envoy caps a numerator above its denominator."""
    denominator = _DENOMINATORS.get(fp.denominator)
    if denominator is None:
        raise XdsError(f"{where}: unknown denominator {fp.denominator}")
    return min(fp.numerator * 100 / denominator, 100.0)


def _unpack(any_msg, message: Message, where: str, what: str = "") -> Message:
    try:
        ok = any_msg.Unpack(message)
    except DecodeError:  # bytes that are not the message (DecodeError is not a ValueError)
        ok = False
    if not ok:
        raise XdsError(f"{where}: cannot decode {what or any_msg.type_url}")
    return message


# --------------------------------------------------------------------------- listeners


def listener(msg: listener_pb2.Listener) -> ListenerConfig:
    """A plain listener: one filter chain with one HTTP connection manager (transparent mode's
    listeners are :mod:`sidecar.xds.listeners`')."""
    where = f"listener {msg.name!r}"
    _only(msg, ("name", "address", "filter_chains", "stat_prefix", "metadata", "traffic_direction",
                "listener_filters"), where)
    names = tls_inspector_names(msg, where)
    if names not in ([], [TLS_INSPECTOR_FILTER]):
        raise XdsError(f"{where}: listener_filters {names} are not supported (only {TLS_INSPECTOR_FILTER})")
    if not names:
        if len(msg.filter_chains) != 1:
            raise XdsError(f"{where}: exactly one filter chain is supported, got {len(msg.filter_chains)}")
        chain = msg.filter_chains[0]
        _only(chain, ("filters", "name", "metadata"), f"{where} filter chain")
        return network_filter(msg.name, chain, where)
    chain, tls = filter_chains(msg, where, inspector=True)
    return with_tls(network_filter(msg.name, chain, where), tls, where)


def with_tls(config: ListenerConfig, tls: DownstreamTlsConfig | None, where: str) -> ListenerConfig:
    """``config`` (an HTTP connection manager or a tcp_proxy) served behind the mTLS chains."""
    if tls is None:
        return config
    return dataclasses.replace(config, tls=tls)


def network_filter(name: str, chain, where: str) -> ListenerConfig:
    """A filter chain's one network filter: an HTTP connection manager (as a listener config with
    its routes) or, when ``tcp_proxy`` converts too, a tcp_proxy."""
    if len(chain.filters) != 1:
        raise XdsError(f"{where}: exactly one network filter (http_connection_manager or tcp_proxy) is supported")
    flt = chain.filters[0]
    if flt.typed_config.type_url == xds.TCP_PROXY:
        return ListenerConfig(name=name, tcp=tcp_proxy(flt, where))
    if flt.typed_config.type_url != xds.HCM:
        raise XdsError(f"{where}: network filter {flt.typed_config.type_url or flt.name!r} is not supported")
    hcm = _unpack(flt.typed_config, _HCM(), where, "http_connection_manager")
    where = f"{where} http_connection_manager"
    _only(hcm, ("stat_prefix", "rds", "route_config", "http_filters", "codec_type", "request_headers_timeout",
                "common_http_protocol_options", "tracing", "forward_client_cert_details",
                "set_current_client_cert_details"), where)
    if hcm.codec_type not in (_HCM.AUTO, _HCM.HTTP1):
        raise XdsError(f"{where}: codec_type {_HCM.CodecType.Name(hcm.codec_type)} is not supported (HTTP/1.1 only)")
    rate_limit, fault_filter, rbac = _http_filters(hcm.http_filters, where)
    common = {
        "name": name, "rate_limit": rate_limit, "fault_filter": fault_filter, "rbac": rbac, **_xfcc(hcm, where),
        "request_headers_timeout": _duration(hcm, "request_headers_timeout", 0.0, where),
        "idle_timeout": _idle_timeout(hcm, "common_http_protocol_options", where),
        "trace_sample_ratio": _trace_sample_ratio(hcm, where),
    }
    which = hcm.WhichOneof("route_specifier")
    if which == "rds":
        src = hcm.rds.config_source
        if not (src.HasField("ads") or src.HasField("self")):
            raise XdsError(f"{where}: rds config_source must be ads")
        if not hcm.rds.route_config_name:
            raise XdsError(f"{where}: rds.route_config_name is empty")
        return ListenerConfig(rds_name=hcm.rds.route_config_name, **common)
    if which == "route_config":
        return ListenerConfig(route_config=route_configuration(hcm.route_config, fault_filter), **common)
    raise XdsError(f"{where}: http_connection_manager needs rds or route_config")


def tcp_proxy(flt, where: str) -> TcpRoute:
    """``envoy.filters.network.tcp_proxy``: its cluster or weighted clusters, and its idle timeout."""
    msg = _unpack(flt.typed_config, tcp_proxy_pb2.TcpProxy(), where, "tcp_proxy")
    where = f"{where} tcp_proxy"
    _only(msg, ("stat_prefix", "cluster", "weighted_clusters", "idle_timeout"), where)
    which = msg.WhichOneof("cluster_specifier")
    if which == "cluster":
        clusters = (WeightedCluster(msg.cluster, 1),)
    elif which == "weighted_clusters":
        for w in msg.weighted_clusters.clusters:
            _only(w, ("name", "weight"), f"{where} weighted_clusters")
        clusters = tuple(WeightedCluster(w.name, w.weight) for w in msg.weighted_clusters.clusters if w.weight)
    else:
        clusters = ()
    if not clusters or not all(c.name for c in clusters):
        raise XdsError(f"{where}: needs a cluster or weighted clusters with a weight")
    return TcpRoute(stat_prefix=msg.stat_prefix, clusters=clusters,
                    idle_timeout=_duration(msg, "idle_timeout", DEFAULT_IDLE_TIMEOUT, where))


def _trace_sample_ratio(hcm: Message, where: str) -> float | None:
    """``tracing.random_sampling`` (Envoy's default 100% when unset) as a ratio; None: no tracing
    config (the sidecar's flag applies). The tracer itself comes from the sidecar's flags, so a
    ``provider`` and the other sampling knobs are refused rather than ignored."""
    if not hcm.HasField("tracing"):
        return None
    tr = hcm.tracing
    _only(tr, ("random_sampling",), f"{where} tracing")
    if not tr.HasField("random_sampling"):
        return 1.0
    value = tr.random_sampling.value
    if not 0.0 <= value <= 100.0:
        raise XdsError(f"{where} tracing.random_sampling: {value} is outside 0..100")
    return value / 100.0


def _idle_timeout(msg: Message, name: str, where: str) -> float:
    """``common_http_protocol_options.idle_timeout`` (HCM or upstream): Envoy's 1 h when unset, 0 disables."""
    if not msg.HasField(name):
        return DEFAULT_IDLE_TIMEOUT
    opts: protocol_pb2.HttpProtocolOptions = getattr(msg, name)
    _only(opts, ("idle_timeout",), f"{where} {name}")
    return _duration(opts, "idle_timeout", DEFAULT_IDLE_TIMEOUT, f"{where} {name}")


# HTTP filters the sidecar runs, by type URL, in the order it runs them: RBAC and the rate limit
# before routing, the fault after it, the router last.
_FILTER_ORDER = (RBAC, xds.LOCAL_RATELIMIT, xds.FAULT, xds.ROUTER)


def _http_filters(filters, where: str) -> tuple[RateLimitConfig | None, bool, AuthzConfig | None]:
    """The HCM's filter chain -> (the listener's rate limit, whether it runs the fault filter, its RBAC).

    Filters are known by their typed_config's type URL, as in Envoy; an unknown one is refused
    unless ``is_optional`` (then skipped, as Envoy does). The known ones must come in the order the
    sidecar runs them, each once, and the router must be the last filter.
    """
    rate_limit: RateLimitConfig | None = None
    fault_filter = False
    rbac: AuthzConfig | None = None
    last_rank = -1
    for f in filters:
        fwhere = f"{where} http filter {f.name!r}"
        _only(f, ("name", "typed_config", "is_optional"), fwhere)
        type_url = f.typed_config.type_url
        if type_url not in _FILTER_ORDER:
            if f.is_optional:
                continue
            raise XdsError(f"{where}: http filter {f.name!r} ({type_url or 'no typed_config'}) is not supported")
        rank = _FILTER_ORDER.index(type_url)
        if rank <= last_rank:
            order = ", ".join(t.rsplit(".", 1)[-1] for t in _FILTER_ORDER)
            raise XdsError(f"{fwhere}: out of order or repeated (supported order: {order})")
        last_rank = rank
        if type_url == xds.LOCAL_RATELIMIT:
            rate_limit = local_rate_limit(_unpack(f.typed_config, local_rate_limit_pb2.LocalRateLimit(), fwhere), fwhere)
        elif type_url == xds.FAULT:
            _listener_fault(f, fwhere)
            fault_filter = True
        elif type_url == RBAC:
            rbac = rbac_filter(f, fwhere)
    if filters and filters[-1].typed_config.type_url != xds.ROUTER:
        raise XdsError(f"{where}: the last http filter must be the router ({xds.ROUTER_FILTER})")
    return rate_limit, fault_filter, rbac


def _listener_fault(f, where: str) -> None:
    """The HCM's fault filter only enables routes' fault configs, which find it by its name."""
    if f.name != xds.FAULT_FILTER:
        raise XdsError(f"{where}: the fault filter must be named {xds.FAULT_FILTER!r} (routes name it)")
    msg = _unpack(f.typed_config, fault_pb2.HTTPFault(), where)
    _only(msg, ("disable_downstream_cluster_stats",),
          f"{where} (faults of the whole listener are not supported; use the routes' typed_per_filter_config)")


def local_rate_limit(msg: local_rate_limit_pb2.LocalRateLimit, where: str) -> RateLimitConfig | None:
    """``envoy.filters.http.local_ratelimit`` of the whole listener, or None when it limits nothing.

    Envoy enables and enforces it for 0% of requests unless told otherwise; the sidecar honours
    0% (off) and 100% (on) of ``filter_enabled`` and ``filter_enforced``, not shadow mode. Without
    a token bucket the filter limits nothing (Envoy: the bucket may live on routes, refused here).
    """
    _only(msg, ("stat_prefix", "status", "token_bucket", "filter_enabled", "filter_enforced",
                "always_consume_default_token_bucket"), where)  # the last matters with descriptors only
    if msg.HasField("status") and msg.status.code >= 400 and msg.status.code != 429:
        raise XdsError(f"{where}: status {msg.status.code} is not supported (429 only)")
    enabled = _runtime_percent(msg, "filter_enabled", where)
    enforced = _runtime_percent(msg, "filter_enforced", where)
    if enabled == 0 or not msg.HasField("token_bucket"):
        return None
    if (enabled, enforced) != (100, 100):
        raise XdsError(f"{where}: filter_enabled {enabled:g}% / filter_enforced {enforced:g}% is not supported "
                       "(0% or 100% of requests, enforced)")
    bucket = msg.token_bucket
    _only(bucket, ("max_tokens", "tokens_per_fill", "fill_interval"), f"{where} token_bucket")
    tokens_per_fill = _wrapped(bucket, "tokens_per_fill", 1)
    fill_interval = _duration(bucket, "fill_interval", 0.0, f"{where} token_bucket")
    if bucket.max_tokens < 1 or tokens_per_fill < 1:
        raise XdsError(f"{where} token_bucket: max_tokens and tokens_per_fill must be positive")
    if fill_interval < MIN_FILL_INTERVAL:
        raise XdsError(f"{where} token_bucket: fill_interval must be at least 50 ms")
    return RateLimitConfig(max_tokens=bucket.max_tokens, tokens_per_fill=tokens_per_fill, fill_interval=fill_interval)


def _runtime_percent(msg: Message, name: str, where: str) -> float:
    if not msg.HasField(name):
        return 0.0  # Envoy's default for both: off, "for safety"
    value: base_pb2.RuntimeFractionalPercent = getattr(msg, name)
    _only(value, ("default_value",), f"{where} {name} (runtime overrides are not supported)")
    return _fraction(value.default_value, f"{where} {name}")


# --------------------------------------------------------------------------- routes


def route_configuration(msg: route_pb2.RouteConfiguration, fault_filter: bool = True) -> RouteConfig:
    """A RouteConfiguration; with ``fault_filter`` false (its HCM runs no fault filter) the routes'
    fault configs are validated but dropped, as Envoy would not apply them."""
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
                                  routes=tuple(_route(r, vwhere, fault_filter) for r in vh.routes)))
    return RouteConfig(name=msg.name, virtual_hosts=tuple(vhosts))


def _route(r: route_components_pb2.Route, where: str, fault_filter: bool) -> Route:
    where = f"{where} route {r.name!r}" if r.name else f"{where} route"
    _only(r, ("name", "match", "route", "metadata", "typed_per_filter_config"), where)
    _only(r.match, ("prefix", "headers"), f"{where} match")
    headers = tuple(header_match(h, f"{where} match") for h in r.match.headers)
    if r.WhichOneof("action") != "route":
        raise XdsError(f"{where}: only the route action is supported")
    action = r.route
    _only(action, ("cluster", "weighted_clusters", "timeout", "retry_policy"), f"{where} action")
    fault = _route_fault(r, where)
    common = {
        "prefix": r.match.prefix or "/",
        "timeout": _duration(action, "timeout", DEFAULT_ROUTE_TIMEOUT, f"{where} action"),
        "retry_policy": retry_policy(action.retry_policy, f"{where} retry_policy")
        if action.HasField("retry_policy") else None,
        "fault": fault if fault_filter else None,
        "headers": headers,
    }
    which = action.WhichOneof("cluster_specifier")
    if which == "cluster":
        return Route(cluster=action.cluster, **common)
    if which == "weighted_clusters":
        wcs = []
        for c in action.weighted_clusters.clusters:
            _only(c, ("name", "weight"), f"{where} weighted cluster {c.name!r}")
            wcs.append(WeightedCluster(name=c.name, weight=c.weight.value))
        if not wcs or sum(w.weight for w in wcs) <= 0:
            raise XdsError(f"{where}: weighted_clusters need a positive total weight")
        return Route(weighted_clusters=tuple(wcs), **common)
    raise XdsError(f"{where}: route action needs cluster or weighted_clusters")


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an RFC 9110 token


def header_match(msg: route_components_pb2.HeaderMatcher, where: str) -> HeaderMatch:
    """One ``RouteMatch.headers`` entry: ``string_match`` ``exact`` or ``prefix`` (``ignore_case``
    allowed), ``present_match``, the deprecated ``exact_match`` / ``prefix_match``, and
    ``invert_match``; no specifier at all is a presence match, as in Envoy. The name is lower-cased
    (Envoy matches names case-insensitively); of the pseudo-headers only ``:method`` is honoured,
    matched exactly. Headers the sidecar consumes itself (Host, hop-by-hop, trace context,
    x-request-id) cannot be matched."""
    name = msg.name.lower()
    where = f"{where} header {msg.name!r}"
    _only(msg, ("name", "string_match", "exact_match", "prefix_match", "present_match", "invert_match"), where)
    if name.startswith(":"):
        if name != ":method":
            raise XdsError(f"{where}: pseudo-header {msg.name!r} is not supported (only :method, matched exactly)")
    elif not _HEADER_NAME.fullmatch(name):
        raise XdsError(f"{where}: name {msg.name!r} is not a valid header name")
    elif name in UNMATCHABLE_HEADERS:
        raise XdsError(f"{where}: header {msg.name!r} is consumed by the sidecar itself and cannot be matched"
                       + (" (route on virtual host domains)" if name == "host" else ""))
    kind = msg.WhichOneof("header_match_specifier")
    exact = prefix = present = None
    ignore_case = False
    if kind == "string_match":
        swhere = f"{where} string_match"
        _only(msg.string_match, ("exact", "prefix", "ignore_case"), swhere)
        pattern = msg.string_match.WhichOneof("match_pattern")
        if pattern == "exact":
            exact = msg.string_match.exact
        elif pattern == "prefix":
            prefix = msg.string_match.prefix
        else:
            raise XdsError(f"{swhere}: needs exact or prefix")
        ignore_case = msg.string_match.ignore_case
    elif kind == "exact_match":
        exact = msg.exact_match
        if not exact:  # Envoy: an empty exact_match matches any value
            exact, present = None, True
    elif kind == "prefix_match":
        prefix = msg.prefix_match
    else:  # present_match, or nothing: present
        present = msg.present_match if kind == "present_match" else True
    if prefix == "":
        raise XdsError(f"{where}: prefix must not be empty")
    if name == ":method" and exact is None:
        raise XdsError(f"{where}: :method may only be matched exactly (string_match.exact)")
    try:
        return HeaderMatch(name=name, exact=exact, prefix=prefix, present=present, invert=msg.invert_match,
                           ignore_case=ignore_case)
    except ValueError as exc:
        raise XdsError(f"{where}: {exc}") from None


def retry_policy(msg: route_components_pb2.RetryPolicy, where: str) -> RetryPolicyConfig:
    """``RouteAction.retry_policy`` with Envoy's defaults: one retry, 25 ms base back-off capped at
    10x, no host predicate, one host selection attempt."""
    _only(msg, ("retry_on", "num_retries", "per_try_timeout", "retry_back_off", "retriable_status_codes",
                "retry_host_predicate", "host_selection_retry_max_attempts"), where)
    conditions = frozenset(c.strip() for c in msg.retry_on.split(",") if c.strip())
    unsupported = sorted(conditions - RETRY_ON_SUPPORTED)
    if unsupported:
        raise XdsError(f"{where}: retry_on {', '.join(unsupported)} is not supported "
                       f"(supported: {', '.join(sorted(RETRY_ON_SUPPORTED))})")
    defaults = RetryPolicyConfig()
    base, cap = defaults.base_interval, defaults.max_interval
    if msg.HasField("retry_back_off"):
        bwhere = f"{where} retry_back_off"
        _only(msg.retry_back_off, ("base_interval", "max_interval"), bwhere)
        base = _duration(msg.retry_back_off, "base_interval", 0.0, bwhere)
        if base <= 0:
            raise XdsError(f"{bwhere}: base_interval must be positive")
        cap = _duration(msg.retry_back_off, "max_interval", 10 * base, bwhere)
        if cap < base:
            raise XdsError(f"{bwhere}: max_interval must be at least base_interval")
    for p in msg.retry_host_predicate:
        _only(p, ("name", "typed_config"), f"{where} retry_host_predicate {p.name!r}")
        known = p.typed_config.type_url == xds.PREVIOUS_HOSTS or (
            not p.HasField("typed_config") and p.name == xds.PREVIOUS_HOSTS_PREDICATE)
        if not known:
            raise XdsError(f"{where}: retry_host_predicate {p.name!r} is not supported "
                           f"(only {xds.PREVIOUS_HOSTS_PREDICATE})")
    if msg.host_selection_retry_max_attempts < 0:
        raise XdsError(f"{where}: host_selection_retry_max_attempts must not be negative")
    return RetryPolicyConfig(
        retry_on=conditions,
        num_retries=_wrapped(msg, "num_retries", defaults.num_retries),
        per_try_timeout=_duration(msg, "per_try_timeout", 0.0, where),
        base_interval=base, max_interval=cap,
        retriable_status_codes=frozenset(msg.retriable_status_codes),
        avoid_previous_hosts=bool(msg.retry_host_predicate),
        host_selection_retry_max_attempts=msg.host_selection_retry_max_attempts or 1)  # proto3 0: unset


def _route_fault(r: route_components_pb2.Route, where: str) -> FaultConfig | None:
    """The route's ``typed_per_filter_config``: only the fault filter's, keyed by its name."""
    fault = None
    for key, config in sorted(r.typed_per_filter_config.items()):
        fwhere = f"{where} typed_per_filter_config {key!r}"
        if key != xds.FAULT_FILTER or config.type_url != xds.FAULT:
            raise XdsError(f"{fwhere}: only {xds.FAULT_FILTER} with an HTTPFault is supported, "
                           f"got {config.type_url or 'nothing'}")
        fault = http_fault(_unpack(config, fault_pb2.HTTPFault(), fwhere), fwhere)
    return fault


def http_fault(msg: fault_pb2.HTTPFault, where: str) -> FaultConfig | None:
    """A fixed delay and an HTTP abort, each for a percentage of requests; None when both are 0%."""
    _only(msg, ("delay", "abort", "disable_downstream_cluster_stats"), where)
    delay = delay_percent = abort_percent = 0.0
    abort_status = 0
    if msg.HasField("delay"):
        dwhere = f"{where} delay"
        _only(msg.delay, ("fixed_delay", "percentage"), dwhere)
        delay = _duration(msg.delay, "fixed_delay", 0.0, dwhere)
        if delay <= 0:
            raise XdsError(f"{dwhere}: fixed_delay must be positive")
        delay_percent = _fraction(msg.delay.percentage, f"{dwhere} percentage")
    if msg.HasField("abort"):
        awhere = f"{where} abort"
        _only(msg.abort, ("http_status", "percentage"), awhere)
        abort_status = msg.abort.http_status
        if not 200 <= abort_status < 600:
            raise XdsError(f"{awhere}: http_status must be 200..599, got {abort_status}")
        abort_percent = _fraction(msg.abort.percentage, f"{awhere} percentage")
    if not (delay_percent or abort_percent):
        return None
    return FaultConfig(delay=delay, delay_percent=delay_percent, abort_status=abort_status,
                       abort_percent=abort_percent)


# --------------------------------------------------------------------------- clusters


def cluster(msg: cluster_pb2.Cluster) -> ClusterConfig:
    where = f"cluster {msg.name!r}"
    _only(msg, ("name", "type", "eds_cluster_config", "connect_timeout", "lb_policy", "load_assignment",
                "alt_stat_name", "metadata", "outlier_detection", "circuit_breakers", "common_lb_config",
                "typed_extension_protocol_options", "transport_socket_matches"), where)
    if msg.type == cluster_pb2.Cluster.ORIGINAL_DST:
        return _original_dst_cluster(msg, where)
    if msg.lb_policy not in _LB_POLICIES:
        name = cluster_pb2.Cluster.LbPolicy.Name(msg.lb_policy)
        supported = ", ".join(cluster_pb2.Cluster.LbPolicy.Name(p) for p in _LB_POLICIES)
        raise XdsError(f"{where}: lb_policy {name} is not supported (supported: {supported})")
    timeout = _seconds(msg.connect_timeout) if msg.HasField("connect_timeout") else DEFAULT_CONNECT_TIMEOUT
    if timeout <= 0:
        raise XdsError(f"{where}: connect_timeout must be positive")
    common = {
        "name": msg.name, "lb_policy": _LB_POLICIES[msg.lb_policy], "connect_timeout": timeout,
        "outlier": outlier_detection(msg.outlier_detection, f"{where} outlier_detection")
        if msg.HasField("outlier_detection") else None,
        "circuit_breakers": circuit_breakers(msg.circuit_breakers, f"{where} circuit_breakers"),
        "healthy_panic_threshold": _panic_threshold(msg, where),
        **_upstream_http(msg, where),
    }
    tls = upstream_tls(msg, common["http2"], where)
    if tls is not None:
        common["tls"] = tls
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


def _original_dst_cluster(msg: cluster_pb2.Cluster, where: str) -> ClusterConfig:
    """An ORIGINAL_DST cluster (lb_policy CLUSTER_PROVIDED): no endpoints of its own; each
    connection or request goes to its original destination. Outlier detection is refused: the
    hosts are whatever the app dialled."""
    _only(msg, ("name", "type", "connect_timeout", "lb_policy", "alt_stat_name", "metadata", "circuit_breakers",
                "common_lb_config", "typed_extension_protocol_options"), where)
    if msg.lb_policy != cluster_pb2.Cluster.CLUSTER_PROVIDED:
        raise XdsError(f"{where}: an ORIGINAL_DST cluster needs lb_policy CLUSTER_PROVIDED")
    timeout = _seconds(msg.connect_timeout) if msg.HasField("connect_timeout") else DEFAULT_CONNECT_TIMEOUT
    if timeout <= 0:
        raise XdsError(f"{where}: connect_timeout must be positive")
    return ClusterConfig(name=msg.name, discovery=DISCOVERY_ORIGINAL_DST, connect_timeout=timeout,
                         circuit_breakers=circuit_breakers(msg.circuit_breakers, f"{where} circuit_breakers"),
                         **_upstream_http(msg, where))


_OUTLIER_DURATIONS = ("interval", "base_ejection_time", "max_ejection_time")
_OUTLIER_PERCENTS = ("max_ejection_percent", "failure_percentage_threshold")


def outlier_detection(msg: outlier_detection_pb2.OutlierDetection, where: str) -> OutlierConfig:
    """``Cluster.outlier_detection``; :class:`OutlierConfig` uses Envoy's field names and defaults.

    Refused because the sidecar would behave differently: with ``split_external_local_origin_errors``,
    a local-origin success-rate detector (Envoy enforces it at 100% unless
    ``enforcing_local_origin_success_rate`` is 0) or local-origin failure percentage; ejection
    time jitter; ``always_eject_one_host``; monitors. ``successful_active_health_check_uneject_host``
    is accepted and ignored: without active health checks it never applies.
    """
    _only(msg, [f.name for f in dataclasses.fields(OutlierConfig)] + [
        "enforcing_local_origin_success_rate", "enforcing_failure_percentage_local_origin",
        "max_ejection_time_jitter", "always_eject_one_host", "successful_active_health_check_uneject_host"], where)
    kwargs: dict = {"split_external_local_origin_errors": msg.split_external_local_origin_errors}
    for f in dataclasses.fields(OutlierConfig):
        if f.name == "split_external_local_origin_errors" or not msg.HasField(f.name):
            continue
        if f.name in _OUTLIER_DURATIONS:
            kwargs[f.name] = _duration(msg, f.name, 0.0, where)
            if kwargs[f.name] <= 0:
                raise XdsError(f"{where}: {f.name} must be positive")
        else:
            kwargs[f.name] = getattr(msg, f.name).value
            if (f.name.startswith("enforcing_") or f.name in _OUTLIER_PERCENTS) and kwargs[f.name] > 100:
                raise XdsError(f"{where}: {f.name} must be a percent 0..100, got {kwargs[f.name]}")
    if msg.split_external_local_origin_errors:
        if _wrapped(msg, "enforcing_local_origin_success_rate", 100):
            raise XdsError(f"{where}: enforcing_local_origin_success_rate must be 0 with "
                           "split_external_local_origin_errors (no local-origin success-rate detector here)")
        if _wrapped(msg, "enforcing_failure_percentage_local_origin", 0):
            raise XdsError(f"{where}: enforcing_failure_percentage_local_origin is not supported")
    if _seconds(msg.max_ejection_time_jitter) != 0:
        raise XdsError(f"{where}: max_ejection_time_jitter is not supported")
    if _wrapped(msg, "always_eject_one_host", False):
        raise XdsError(f"{where}: always_eject_one_host is not supported")
    cfg = OutlierConfig(**kwargs)
    if cfg.max_ejection_time < cfg.base_ejection_time:
        raise XdsError(f"{where}: max_ejection_time must be at least base_ejection_time")
    return cfg


def circuit_breakers(msg: circuit_breaker_pb2.CircuitBreakers, where: str) -> CircuitBreakerConfig:
    """The DEFAULT-priority thresholds (Envoy's defaults when absent). A HIGH-priority entry is
    accepted and ignored: no route of this sidecar is high priority, so Envoy would never use it."""
    _only(msg, ("thresholds",), where)
    chosen = None
    for t in msg.thresholds:
        _only(t, ("priority", "max_connections", "max_pending_requests", "max_requests", "max_retries",
                  "retry_budget", "track_remaining"), f"{where} thresholds")
        if t.priority == base_pb2.HIGH:
            continue
        if chosen is not None:
            raise XdsError(f"{where}: two thresholds for priority DEFAULT")
        chosen = t
    if chosen is None:
        return DEFAULT_CIRCUIT_BREAKERS
    d = DEFAULT_CIRCUIT_BREAKERS
    budget_percent, min_concurrency = 0.0, d.min_retry_concurrency
    if chosen.HasField("retry_budget"):
        bwhere = f"{where} retry_budget"
        _only(chosen.retry_budget, ("budget_percent", "min_retry_concurrency"), bwhere)
        budget_percent = _wrapped(chosen.retry_budget, "budget_percent", DEFAULT_RETRY_BUDGET_PERCENT)
        min_concurrency = _wrapped(chosen.retry_budget, "min_retry_concurrency", DEFAULT_MIN_RETRY_CONCURRENCY)
        if not 0 < budget_percent <= 100:
            raise XdsError(f"{bwhere}: budget_percent must be above 0 and at most 100, got {budget_percent:g}")
    return CircuitBreakerConfig(
        max_connections=_wrapped(chosen, "max_connections", d.max_connections),
        max_pending_requests=_wrapped(chosen, "max_pending_requests", d.max_pending_requests),
        max_requests=_wrapped(chosen, "max_requests", d.max_requests),
        max_retries=_wrapped(chosen, "max_retries", d.max_retries),
        retry_budget_percent=budget_percent, min_retry_concurrency=min_concurrency)


def _panic_threshold(msg: cluster_pb2.Cluster, where: str) -> float:
    if not msg.HasField("common_lb_config"):
        return DEFAULT_PANIC_THRESHOLD
    _only(msg.common_lb_config, ("healthy_panic_threshold",), f"{where} common_lb_config")
    value = _wrapped(msg.common_lb_config, "healthy_panic_threshold", DEFAULT_PANIC_THRESHOLD)
    if not 0 <= value <= 100:
        raise XdsError(f"{where} common_lb_config: healthy_panic_threshold must be 0..100, got {value:g}")
    return value


def _upstream_http(msg: cluster_pb2.Cluster, where: str) -> dict[str, Any]:
    """``typed_extension_protocol_options`` HttpProtocolOptions: HTTP/1.1 (explicit or left to
    default) or HTTP/2 (``explicit_http_config.http2_protocol_options``, h2c; its window and stream
    settings are left to the sidecar's defaults and refused when set), and
    ``common_http_protocol_options.idle_timeout``; nothing else."""
    idle = DEFAULT_IDLE_TIMEOUT
    http2 = False
    for key, config in msg.typed_extension_protocol_options.items():
        owhere = f"{where} typed_extension_protocol_options {key!r}"
        if key != xds.HTTP_PROTOCOL_OPTIONS_KEY or config.type_url != xds.HTTP_PROTOCOL_OPTIONS:
            raise XdsError(f"{owhere}: only {xds.HTTP_PROTOCOL_OPTIONS_KEY} is supported")
        opts = _unpack(config, http_protocol_options_pb2.HttpProtocolOptions(), owhere)
        _only(opts, ("common_http_protocol_options", "explicit_http_config"), owhere)
        if opts.HasField("explicit_http_config"):
            explicit = opts.explicit_http_config
            if explicit.HasField("http2_protocol_options"):
                _only(explicit.http2_protocol_options, (), f"{owhere} http2_protocol_options")
                http2 = True
            else:
                _only(explicit, ("http_protocol_options",), f"{owhere} explicit_http_config (HTTP/1.1 or HTTP/2)")
                _only(explicit.http_protocol_options, (), f"{owhere} http_protocol_options")
        idle = _idle_timeout(opts, "common_http_protocol_options", owhere)
    return {"idle_timeout": idle, "http2": http2}


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
            mtls = {"mtls": True} if _endpoint_mtls(lbe, where) else {}
            out.append(EndpointConfig(address=sa.address, port=sa.port_value, weight=weight,
                                      serving=lbe.health_status in _SERVING, zone=zone, **mtls))
    return tuple(out)


# --------------------------------------------------------------------------- runtime (RTDS)

_JS_SAFE_INTEGER = 2 ** 53  # JSON text of a whole double below this is its integer digits


def runtime(msg: rtds_pb2.Runtime) -> RuntimeConfig:
    """An RTDS Runtime resource: ``name`` and ``layer``, flattened into ``{key: str}``."""
    where = f"runtime {msg.name!r}"
    _only(msg, ("name", "layer"), where)
    values: dict[str, str] = {}
    _flatten(msg.layer, "", values, where)
    return RuntimeConfig(name=msg.name, values=values)


def _flatten(layer: struct_pb2.Struct, prefix: str, out: dict[str, str], where: str) -> None:
    for key in sorted(layer.fields):
        value = layer.fields[key]
        path = f"{prefix}{key}"
        if not key:
            raise XdsError(f"{where} layer: an empty key under {prefix.rstrip('.')!r}" if prefix
                           else f"{where} layer: an empty key")
        kind = value.WhichOneof("kind")
        if kind == "struct_value":
            _flatten(value.struct_value, f"{path}.", out, where)
            continue
        if kind == "string_value":
            text = value.string_value
        elif kind == "bool_value":
            text = "true" if value.bool_value else "false"
        elif kind == "number_value":
            text = _number_text(value.number_value, path, where)
        elif kind == "null_value":
            raise XdsError(f"{where} layer: key {path!r} is null (values must be strings, numbers or booleans)")
        elif kind == "list_value":
            raise XdsError(f"{where} layer: key {path!r} is a list (values must be strings, numbers or booleans)")
        else:
            raise XdsError(f"{where} layer: key {path!r} has no value")
        if path in out:
            raise XdsError(f"{where} layer: key {path!r} appears twice once nested Structs are joined with dots")
        out[path] = text


def _number_text(v: float, path: str, where: str) -> str:
    """A double as JSON writes it: 5 -> "5", 0.5 -> "0.5", 1e300 -> "1e+300"."""
    if not math.isfinite(v):
        raise XdsError(f"{where} layer: key {path!r} is not a finite number")
    if v.is_integer() and abs(v) < _JS_SAFE_INTEGER:
        return str(int(v))
    return json.dumps(v)


# --------------------------------------------------------------------------- mTLS and authz (docs/identity.md)
#
# Exactly the shapes docs/identity.md describes: SDS secrets ``default`` / ``ROOTCA`` over ADS, URI
# SAN matchers (exact upstream, prefix downstream), Istio's tlsMode-mutual transport socket match,
# the inbound listener's tls_inspector with an mTLS chain (and a plaintext one when PERMISSIVE),
# XFCC SANITIZE_SET with the URI, and RBAC principals / permissions as the control plane writes them.



def _sds(msg: Message, name: str, where: str) -> None:
    """An SdsSecretConfig: ``name`` delivered on the ADS stream."""
    _only(msg, ("name", "sds_config"), where)
    if msg.name != name:
        raise XdsError(f"{where}: secret {msg.name!r} is not supported (this sidecar's secrets are "
                       f"{_CERTIFICATE_SECRET!r} and {_TRUST_BUNDLE_SECRET!r})")
    src = msg.sds_config
    _only(src, ("ads", "resource_api_version"), f"{where} sds_config")
    if not src.HasField("ads"):
        raise XdsError(f"{where}: sds_config must be ads")
    if src.resource_api_version not in (config_source_pb2.AUTO, config_source_pb2.V3):
        raise XdsError(f"{where}: sds_config resource_api_version must be V3")


def _common_tls(msg: Message, where: str, san_kind: str) -> tuple[str, tuple[str, ...]]:
    """A CommonTlsContext as docs/identity.md writes it -> (the URI SAN matcher's value, ALPN)."""
    _only(msg, ("tls_certificate_sds_secret_configs", "combined_validation_context", "alpn_protocols"), where)
    if len(msg.tls_certificate_sds_secret_configs) != 1:
        raise XdsError(f"{where}: exactly one tls_certificate_sds_secret_configs ({_CERTIFICATE_SECRET!r}) is supported")
    _sds(msg.tls_certificate_sds_secret_configs[0], _CERTIFICATE_SECRET, f"{where} tls_certificate_sds_secret_configs")
    if not msg.HasField("combined_validation_context"):
        raise XdsError(f"{where}: needs combined_validation_context (the {_TRUST_BUNDLE_SECRET!r} bundle and a SAN matcher)")
    cvc = msg.combined_validation_context
    vwhere = f"{where} combined_validation_context"
    _only(cvc, ("default_validation_context", "validation_context_sds_secret_config"), vwhere)
    if not cvc.HasField("validation_context_sds_secret_config"):
        raise XdsError(f"{vwhere}: needs validation_context_sds_secret_config {_TRUST_BUNDLE_SECRET!r}")
    _sds(cvc.validation_context_sds_secret_config, _TRUST_BUNDLE_SECRET, f"{vwhere} validation_context_sds_secret_config")
    dvc = cvc.default_validation_context
    _only(dvc, ("match_typed_subject_alt_names",), f"{vwhere} default_validation_context")
    if len(dvc.match_typed_subject_alt_names) != 1:
        raise XdsError(f"{vwhere}: exactly one match_typed_subject_alt_names (a URI SAN {san_kind}) is supported")
    san = dvc.match_typed_subject_alt_names[0]
    swhere = f"{vwhere} match_typed_subject_alt_names"
    _only(san, ("san_type", "matcher"), swhere)
    if san.san_type != common_pb2.SubjectAltNameMatcher.URI:
        raise XdsError(f"{swhere}: only san_type URI is supported")
    _only(san.matcher, (san_kind,), f"{swhere} matcher (only {san_kind})")
    value = getattr(san.matcher, san_kind)
    if not value:
        raise XdsError(f"{swhere}: an empty {san_kind}")
    return value, tuple(msg.alpn_protocols)


def upstream_tls(cluster_msg: cluster_pb2.Cluster, http2: bool, where: str) -> UpstreamTlsConfig | None:
    """``transport_socket_matches``: one tlsMode-mutual match with an UpstreamTlsContext, or none."""
    matches = cluster_msg.transport_socket_matches
    if not matches:
        return None
    where = f"{where} transport_socket_matches"
    if len(matches) != 1:
        raise XdsError(f"{where}: exactly one entry (tlsMode-mutual) is supported, got {len(matches)}")
    m = matches[0]
    _only(m, ("name", "match", "transport_socket"), where)
    criteria = {k: v.string_value if v.WhichOneof("kind") == "string_value" else None for k, v in m.match.fields.items()}
    if criteria != {TLS_MODE_KEY: TLS_MODE_MUTUAL}:
        raise XdsError(f"{where}: match must be {{{TLS_MODE_KEY}: {TLS_MODE_MUTUAL}}}")
    ts = m.transport_socket
    _only(ts, ("name", "typed_config"), f"{where} transport_socket")
    if ts.typed_config.type_url != UPSTREAM_TLS_CONTEXT:
        raise XdsError(f"{where}: transport_socket must be {TLS_TRANSPORT_SOCKET} with an UpstreamTlsContext")
    ctx = _unpack(ts.typed_config, tls_pb2.UpstreamTlsContext(), where, "UpstreamTlsContext")
    cwhere = f"{where} UpstreamTlsContext"
    _only(ctx, ("common_tls_context", "sni"), cwhere)
    san, alpn = _common_tls(ctx.common_tls_context, f"{cwhere} common_tls_context", "exact")
    if alpn and alpn not in _UPSTREAM_ALPN:
        raise XdsError(f"{cwhere}: alpn_protocols {list(alpn)} are not supported (h2 and/or http/1.1)")
    if alpn and ("h2" if http2 else "http/1.1") not in alpn:
        raise XdsError(f"{cwhere}: alpn_protocols {list(alpn)} do not offer the cluster's protocol "
                       f"({'HTTP/2' if http2 else 'HTTP/1.1'})")
    if ctx.sni and not _SNI.fullmatch(ctx.sni):
        raise XdsError(f"{cwhere}: sni {ctx.sni!r} is not a host name")
    return UpstreamTlsConfig(san=san, alpn=alpn, sni=ctx.sni)


def _endpoint_mtls(lbe, where: str) -> bool:
    """The endpoint's ``envoy.transport_socket_match`` metadata says ``tlsMode: mutual``."""
    md = lbe.metadata.filter_metadata.get(TRANSPORT_SOCKET_MATCH) if lbe.HasField("metadata") else None
    if md is None:
        return False
    value = md.fields.get(TLS_MODE_KEY)
    return value is not None and value.WhichOneof("kind") == "string_value" and value.string_value == TLS_MODE_MUTUAL


def _downstream_tls(chain, where: str) -> str:
    """The mTLS chain's transport_socket -> the SAN prefix callers' certificates must have."""
    ts = chain.transport_socket
    _only(ts, ("name", "typed_config"), f"{where} transport_socket")
    if ts.typed_config.type_url != DOWNSTREAM_TLS_CONTEXT:
        raise XdsError(f"{where}: transport_socket must be {TLS_TRANSPORT_SOCKET} with a DownstreamTlsContext")
    ctx = _unpack(ts.typed_config, tls_pb2.DownstreamTlsContext(), where, "DownstreamTlsContext")
    cwhere = f"{where} DownstreamTlsContext"
    _only(ctx, ("common_tls_context", "require_client_certificate"), cwhere)
    if not ctx.require_client_certificate.value:
        raise XdsError(f"{cwhere}: require_client_certificate must be true (mutual TLS only)")
    prefix, alpn = _common_tls(ctx.common_tls_context, f"{cwhere} common_tls_context", "prefix")
    if alpn != _SERVER_ALPN:
        raise XdsError(f"{cwhere}: alpn_protocols must be {list(_SERVER_ALPN)}, got {list(alpn)}")
    return prefix


def tls_inspector_names(msg: listener_pb2.Listener, where: str) -> list[str]:
    """The listener filters' names; a tls_inspector must carry nothing but its (empty) config."""
    names = []
    for f in msg.listener_filters:
        if f.name == TLS_INSPECTOR_FILTER:
            _only(f, ("name", "typed_config"), f"{where} listener filter {f.name!r}")
            if f.HasField("typed_config"):
                if f.typed_config.type_url != TLS_INSPECTOR:
                    raise XdsError(f"{where} listener filter {f.name!r}: typed_config must be a TlsInspector")
                _only(_unpack(f.typed_config, tls_inspector_pb2.TlsInspector(), where), (),
                      f"{where} listener filter {f.name!r}")
        names.append(f.name)
    return names


def filter_chains(msg: listener_pb2.Listener, where: str, inspector: bool, match_fields: tuple[str, ...] = ()):
    """A listener's filter chains -> (the chain whose network filter serves, its TLS config or None).

    Without ``inspector`` (tls_inspector): exactly one chain, as always. With it: the mTLS chain
    (``filter_chain_match.transport_protocol: tls`` and a DownstreamTlsContext) and, when
    PERMISSIVE, a plaintext chain with no transport protocol; both with the same network filter.
    ``match_fields`` are the other filter_chain_match fields allowed (the same on both chains).
    """
    chains = msg.filter_chains
    if not inspector:
        if len(chains) != 1:
            raise XdsError(f"{where}: exactly one filter chain is supported, got {len(chains)}")
        return chains[0], None
    if len(chains) not in (1, 2):
        raise XdsError(f"{where}: with {TLS_INSPECTOR_FILTER} one (STRICT) or two (PERMISSIVE) filter chains "
                       f"are supported, got {len(chains)}")
    tls_chain = plain_chain = None
    for i, chain in enumerate(chains):
        cwhere = f"{where} filter chain {chain.name or i!r}"
        _only(chain, ("filters", "name", "metadata", "filter_chain_match", "transport_socket"), cwhere)
        _only(chain.filter_chain_match, ("transport_protocol", *match_fields), f"{cwhere} filter_chain_match")
        proto = chain.filter_chain_match.transport_protocol
        if proto == "tls":
            if tls_chain is not None:
                raise XdsError(f"{where}: two chains match transport_protocol tls")
            if not chain.HasField("transport_socket"):
                raise XdsError(f"{cwhere}: a tls chain needs a transport_socket (DownstreamTlsContext)")
            tls_chain = (chain, _downstream_tls(chain, cwhere))
        elif proto in ("", "raw_buffer"):
            if plain_chain is not None:
                raise XdsError(f"{where}: two plaintext chains")
            if chain.HasField("transport_socket"):
                raise XdsError(f"{cwhere}: a plaintext chain has no transport_socket")
            plain_chain = chain
        else:
            raise XdsError(f"{cwhere}: transport_protocol {proto!r} is not supported (tls, or none)")
    if tls_chain is None:
        raise XdsError(f"{where}: listener_filters {TLS_INSPECTOR_FILTER} needs a filter chain matching transport_protocol tls")
    chain, prefix = tls_chain
    if plain_chain is not None:
        for name in match_fields:
            if getattr(chain.filter_chain_match, name) != getattr(plain_chain.filter_chain_match, name):
                raise XdsError(f"{where}: the tls and plaintext chains must match the same {name}")
        if network_filter(msg.name, chain, where) != network_filter(msg.name, plain_chain, where):
            raise XdsError(f"{where}: the tls and plaintext chains must carry the same network filter")
    return chain, DownstreamTlsConfig(mode=TLS_STRICT if plain_chain is None else TLS_PERMISSIVE, san_prefix=prefix)


def _xfcc(hcm: Message, where: str) -> dict[str, bool]:
    """``forward_client_cert_details`` SANITIZE_SET with ``set_current_client_cert_details.uri``
    (the default, SANITIZE, is today's: the header is left as the caller sent it)."""
    mode = hcm.forward_client_cert_details
    if mode not in (_HCM.SANITIZE, _HCM.SANITIZE_SET):
        name = _HCM.ForwardClientCertDetails.Name(mode)
        raise XdsError(f"{where}: forward_client_cert_details {name} is not supported (SANITIZE_SET)")
    if hcm.HasField("set_current_client_cert_details"):
        details = hcm.set_current_client_cert_details
        _only(details, ("uri",), f"{where} set_current_client_cert_details (only uri)")
        if mode != _HCM.SANITIZE_SET:
            raise XdsError(f"{where}: set_current_client_cert_details needs forward_client_cert_details SANITIZE_SET")
        return {"xfcc_sanitize_set": True, "xfcc_uri": details.uri}
    return {"xfcc_sanitize_set": mode == _HCM.SANITIZE_SET, "xfcc_uri": False}


def rbac_filter(f, where: str) -> AuthzConfig | None:
    """``envoy.filters.http.rbac`` -> AuthzConfig; None: no ``rules`` (Envoy: the filter does nothing)."""
    msg = _unpack(f.typed_config, rbac_http_pb2.RBAC(), where, "RBAC")
    _only(msg, ("rules",), where)
    if not msg.HasField("rules"):
        return None
    rules = msg.rules
    _only(rules, ("action", "policies"), f"{where} rules")
    if rules.action not in (rbac_pb2.RBAC.ALLOW, rbac_pb2.RBAC.DENY):
        raise XdsError(f"{where} rules: action {rbac_pb2.RBAC.Action.Name(rules.action)} is not supported (ALLOW, DENY)")
    policies = []
    for name in sorted(rules.policies):
        p = rules.policies[name]
        pwhere = f"{where} policy {name!r}"
        _only(p, ("permissions", "principals"), pwhere)
        if not p.permissions or not p.principals:
            raise XdsError(f"{pwhere}: needs permissions and principals")
        principals: list[PrincipalMatch] = []
        for pr in p.principals:
            principals.extend(_principal(pr, f"{pwhere} principal", nested=False))
        policies.append(AuthzPolicy(name=name, permissions=tuple(_permission(pm, f"{pwhere} permission")
                                                                 for pm in p.permissions),
                                    principals=tuple(principals)))
    action = AUTHZ_ALLOW if rules.action == rbac_pb2.RBAC.ALLOW else AUTHZ_DENY
    return AuthzConfig(action=action, policies=tuple(policies))


def _principal(msg, where: str, nested: bool) -> list[PrincipalMatch]:
    """``any``, ``authenticated.principal_name`` exact/prefix, or (not nested) ``or_ids`` of those."""
    which = msg.WhichOneof("identifier")
    if which == "any" and msg.any:
        return [PrincipalMatch(any=True)]
    if which == "authenticated":
        _only(msg.authenticated, ("principal_name",), f"{where} authenticated")
        sm = msg.authenticated.principal_name
        _only(sm, ("exact", "prefix"), f"{where} principal_name (exact or prefix)")
        kind = sm.WhichOneof("match_pattern")
        if kind is None or not getattr(sm, kind):
            raise XdsError(f"{where} principal_name: an empty matcher")
        return [PrincipalMatch(exact=sm.exact) if kind == "exact" else PrincipalMatch(prefix=sm.prefix)]
    if which == "or_ids" and not nested:
        if not msg.or_ids.ids:
            raise XdsError(f"{where} or_ids: empty")
        return [m for p in msg.or_ids.ids for m in _principal(p, f"{where} or_ids", nested=True)]
    raise XdsError(f"{where}: {which or 'nothing'} is not supported (any, authenticated, or_ids of authenticated)")


def _permission(msg, where: str) -> PermissionMatch:
    """``any``, or ``and_rules`` of at most one method part and one path part, each an ``or_rules``
    of ``header ":method"`` exact / ``url_path`` path prefix matchers (or one such matcher)."""
    which = msg.WhichOneof("rule")
    if which == "any" and msg.any:
        return PermissionMatch()
    parts = msg.and_rules.rules if which == "and_rules" else [msg]
    if which == "and_rules" and not parts:
        raise XdsError(f"{where} and_rules: empty")
    methods: set[bytes] | None = None
    paths: list[bytes] | None = None
    for part in parts:
        kind, values = _permission_part(part, where)
        if kind == "method":
            if methods is not None:
                raise XdsError(f"{where}: two method parts")
            methods = set(values)
        else:
            if paths is not None:
                raise XdsError(f"{where}: two path parts")
            paths = list(values)
    return PermissionMatch(methods=frozenset(methods or ()), path_prefixes=tuple(paths or ()))


def _permission_part(msg, where: str) -> tuple[str, list[bytes]]:
    which = msg.WhichOneof("rule")
    if which == "or_rules":
        got = [_permission_leaf(r, f"{where} or_rules") for r in msg.or_rules.rules]
        if not got or len({k for k, _ in got}) != 1:
            raise XdsError(f"{where} or_rules: needs matchers of one kind (methods, or paths)")
        return got[0][0], [v for _, v in got]
    kind, value = _permission_leaf(msg, where)
    return kind, [value]


def _permission_leaf(msg, where: str) -> tuple[str, bytes]:
    which = msg.WhichOneof("rule")
    if which == "header":
        h = msg.header
        _only(h, ("name", "string_match", "exact_match"), f"{where} header")
        value = h.string_match.exact if h.HasField("string_match") else h.exact_match
        if h.HasField("string_match"):
            _only(h.string_match, ("exact",), f"{where} header string_match (exact only)")
        if h.name != ":method" or not value:
            raise XdsError(f"{where} header: only \":method\" matched exactly is supported")
        return "method", value.encode("latin-1")
    if which == "url_path":
        up = msg.url_path
        _only(up, ("path",), f"{where} url_path")
        _only(up.path, ("prefix",), f"{where} url_path path (prefix only)")
        if not up.path.prefix:
            raise XdsError(f"{where} url_path: an empty prefix")
        return "path", up.path.prefix.encode("latin-1")
    raise XdsError(f"{where}: {which or 'nothing'} is not supported (header :method, url_path prefix)")
