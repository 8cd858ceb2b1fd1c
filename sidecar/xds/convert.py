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
from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401  (registers the type for Any)
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401  (registers the type)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.service.runtime.v3 import rtds_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from meshkeeper import xds
from sidecar.codec.headers import UNMATCHABLE_HEADERS
from sidecar.config import (
    DEFAULT_CIRCUIT_BREAKERS,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_PANIC_THRESHOLD,
    DEFAULT_ROUTE_TIMEOUT,
    DISCOVERY_ORIGINAL_DST,
    LB_ROUND_ROBIN,
    RETRY_ON_SUPPORTED,
    AuthzConfig,
    CircuitBreakerConfig,
    ClusterConfig,
    EndpointConfig,
    FaultConfig,
    HeaderMatch,
    ListenerConfig,
    OutlierConfig,
    RateLimitConfig,
    RetryPolicyConfig,
    Route,
    RouteConfig,
    RuntimeConfig,
    TcpRoute,
    VirtualHost,
    WeightedCluster,
)
from sidecar.xds.proto import XdsError, duration, enum_name, only, seconds, unpack
from sidecar.xds.security import (
    RBAC,
    TLS_INSPECTOR_FILTER,
    endpoint_mtls,
    original_dst_tls,
    rbac_filter,
    tls_chains,
    tls_inspector_names,
    upstream_tls,
    with_tls,
    xfcc,
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


def _wrapped(msg: Message, name: str, default):
    """The value of a wrapper field (UInt32Value, BoolValue, Percent...), ``default`` when unset."""
    return getattr(msg, name).value if msg.HasField(name) else default


def _fraction(fp: percent_pb2.FractionalPercent, where: str) -> float:
    """A FractionalPercent as a percent 0..100; Envoy caps a numerator above its denominator."""
    denominator = _DENOMINATORS.get(fp.denominator)
    if denominator is None:
        raise XdsError(f"{where}: unknown denominator {fp.denominator}")
    return min(fp.numerator * 100 / denominator, 100.0)


# --------------------------------------------------------------------------- listeners


def listener(msg: listener_pb2.Listener) -> ListenerConfig:
    """A plain listener: one filter chain with one HTTP connection manager (transparent mode's
    listeners are :mod:`sidecar.xds.listeners`')."""
    where = f"listener {msg.name!r}"
    only(msg, ("name", "address", "filter_chains", "stat_prefix", "metadata", "traffic_direction",
                "listener_filters"), where)
    names = tls_inspector_names(msg, where)
    if names not in ([], [TLS_INSPECTOR_FILTER]):
        raise XdsError(f"{where}: listener_filters {names} are not supported (only {TLS_INSPECTOR_FILTER})")
    if not names:
        if len(msg.filter_chains) != 1:
            raise XdsError(f"{where}: exactly one filter chain is supported, got {len(msg.filter_chains)}")
        chain = msg.filter_chains[0]
        only(chain, ("filters", "name", "metadata"), f"{where} filter chain")
        return network_filter(msg.name, chain, where)
    chain, tls = filter_chains(msg, where, inspector=True)
    return with_tls(network_filter(msg.name, chain, where), tls, where)


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
    chain, plain_chain, tls = tls_chains(msg, where, match_fields)
    if plain_chain is not None and network_filter(msg.name, chain, where) != network_filter(msg.name, plain_chain, where):
        raise XdsError(f"{where}: the tls and plaintext chains must carry the same network filter")
    return chain, tls


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
    hcm = unpack(flt.typed_config, _HCM(), where, "http_connection_manager")
    where = f"{where} http_connection_manager"
    only(hcm, ("stat_prefix", "rds", "route_config", "http_filters", "codec_type", "request_headers_timeout",
                "common_http_protocol_options", "tracing", "forward_client_cert_details",
                "set_current_client_cert_details"), where)
    if hcm.codec_type not in (_HCM.AUTO, _HCM.HTTP1):
        raise XdsError(f"{where}: codec_type {enum_name(_HCM.CodecType, hcm.codec_type)} is not supported (HTTP/1.1 only)")
    rate_limit, fault_filter, rbac = _http_filters(hcm.http_filters, where)
    common = {
        "name": name, "rate_limit": rate_limit, "fault_filter": fault_filter, "rbac": rbac, **xfcc(hcm, where),
        "request_headers_timeout": duration(hcm, "request_headers_timeout", 0.0, where),
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
    msg = unpack(flt.typed_config, tcp_proxy_pb2.TcpProxy(), where, "tcp_proxy")
    where = f"{where} tcp_proxy"
    only(msg, ("stat_prefix", "cluster", "weighted_clusters", "idle_timeout"), where)
    which = msg.WhichOneof("cluster_specifier")
    if which == "cluster":
        clusters = (WeightedCluster(msg.cluster, 1),)
    elif which == "weighted_clusters":
        for w in msg.weighted_clusters.clusters:
            only(w, ("name", "weight"), f"{where} weighted_clusters")
        clusters = tuple(WeightedCluster(w.name, w.weight) for w in msg.weighted_clusters.clusters if w.weight)
    else:
        clusters = ()
    if not clusters or not all(c.name for c in clusters):
        raise XdsError(f"{where}: needs a cluster or weighted clusters with a weight")
    return TcpRoute(stat_prefix=msg.stat_prefix, clusters=clusters,
                    idle_timeout=duration(msg, "idle_timeout", DEFAULT_IDLE_TIMEOUT, where))


def _trace_sample_ratio(hcm: Message, where: str) -> float | None:
    """``tracing.random_sampling`` (Envoy's default 100% when unset) as a ratio; None: no tracing
    config (the sidecar's flag applies). The tracer itself comes from the sidecar's flags, so a
    ``provider`` and the other sampling knobs are refused rather than ignored."""
    if not hcm.HasField("tracing"):
        return None
    tr = hcm.tracing
    only(tr, ("random_sampling",), f"{where} tracing")
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
    only(opts, ("idle_timeout",), f"{where} {name}")
    return duration(opts, "idle_timeout", DEFAULT_IDLE_TIMEOUT, f"{where} {name}")


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
        only(f, ("name", "typed_config", "is_optional"), fwhere)
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
            rate_limit = local_rate_limit(unpack(f.typed_config, local_rate_limit_pb2.LocalRateLimit(), fwhere), fwhere)
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
    msg = unpack(f.typed_config, fault_pb2.HTTPFault(), where)
    only(msg, ("disable_downstream_cluster_stats",),
          f"{where} (faults of the whole listener are not supported; use the routes' typed_per_filter_config)")


def local_rate_limit(msg: local_rate_limit_pb2.LocalRateLimit, where: str) -> RateLimitConfig | None:
    """``envoy.filters.http.local_ratelimit`` of the whole listener, or None when it limits nothing.

    Envoy enables and enforces it for 0% of requests unless told otherwise; the sidecar honours
    0% (off) and 100% (on) of ``filter_enabled`` and ``filter_enforced``, not shadow mode. Without
    a token bucket the filter limits nothing (Envoy: the bucket may live on routes, refused here).
    """
    only(msg, ("stat_prefix", "status", "token_bucket", "filter_enabled", "filter_enforced",
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
    only(bucket, ("max_tokens", "tokens_per_fill", "fill_interval"), f"{where} token_bucket")
    tokens_per_fill = _wrapped(bucket, "tokens_per_fill", 1)
    fill_interval = duration(bucket, "fill_interval", 0.0, f"{where} token_bucket")
    if bucket.max_tokens < 1 or tokens_per_fill < 1:
        raise XdsError(f"{where} token_bucket: max_tokens and tokens_per_fill must be positive")
    if fill_interval < MIN_FILL_INTERVAL:
        raise XdsError(f"{where} token_bucket: fill_interval must be at least 50 ms")
    return RateLimitConfig(max_tokens=bucket.max_tokens, tokens_per_fill=tokens_per_fill, fill_interval=fill_interval)


def _runtime_percent(msg: Message, name: str, where: str) -> float:
    if not msg.HasField(name):
        return 0.0  # Envoy's default for both: off, "for safety"
    value: base_pb2.RuntimeFractionalPercent = getattr(msg, name)
    only(value, ("default_value",), f"{where} {name} (runtime overrides are not supported)")
    return _fraction(value.default_value, f"{where} {name}")


# --------------------------------------------------------------------------- routes


def route_configuration(msg: route_pb2.RouteConfiguration, fault_filter: bool = True) -> RouteConfig:
    """A RouteConfiguration; with ``fault_filter`` false (its HCM runs no fault filter) the routes'
    fault configs are validated but dropped, as Envoy would not apply them."""
    where = f"route_configuration {msg.name!r}"
    only(msg, ("name", "virtual_hosts", "validate_clusters"), where)
    vhosts = []
    seen: set[str] = set()
    for vh in msg.virtual_hosts:
        vwhere = f"{where} virtual_host {vh.name!r}"
        only(vh, ("name", "domains", "routes"), vwhere)
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
    only(r, ("name", "match", "route", "metadata", "typed_per_filter_config"), where)
    only(r.match, ("prefix", "headers"), f"{where} match")
    headers = tuple(header_match(h, f"{where} match") for h in r.match.headers)
    if r.WhichOneof("action") != "route":
        raise XdsError(f"{where}: only the route action is supported")
    action = r.route
    only(action, ("cluster", "weighted_clusters", "timeout", "retry_policy"), f"{where} action")
    fault = _route_fault(r, where)
    common = {
        "prefix": r.match.prefix or "/",
        "timeout": duration(action, "timeout", DEFAULT_ROUTE_TIMEOUT, f"{where} action"),
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
            only(c, ("name", "weight"), f"{where} weighted cluster {c.name!r}")
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
    only(msg, ("name", "string_match", "exact_match", "prefix_match", "present_match", "invert_match"), where)
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
        only(msg.string_match, ("exact", "prefix", "ignore_case"), swhere)
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
    only(msg, ("retry_on", "num_retries", "per_try_timeout", "retry_back_off", "retriable_status_codes",
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
        only(msg.retry_back_off, ("base_interval", "max_interval"), bwhere)
        base = duration(msg.retry_back_off, "base_interval", 0.0, bwhere)
        if base <= 0:
            raise XdsError(f"{bwhere}: base_interval must be positive")
        cap = duration(msg.retry_back_off, "max_interval", 10 * base, bwhere)
        if cap < base:
            raise XdsError(f"{bwhere}: max_interval must be at least base_interval")
    for p in msg.retry_host_predicate:
        only(p, ("name", "typed_config"), f"{where} retry_host_predicate {p.name!r}")
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
        per_try_timeout=duration(msg, "per_try_timeout", 0.0, where),
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
        fault = http_fault(unpack(config, fault_pb2.HTTPFault(), fwhere), fwhere)
    return fault


def http_fault(msg: fault_pb2.HTTPFault, where: str) -> FaultConfig | None:
    """A fixed delay and an HTTP abort, each for a percentage of requests; None when both are 0%."""
    only(msg, ("delay", "abort", "disable_downstream_cluster_stats"), where)
    delay = delay_percent = abort_percent = 0.0
    abort_status = 0
    if msg.HasField("delay"):
        dwhere = f"{where} delay"
        only(msg.delay, ("fixed_delay", "percentage"), dwhere)
        delay = duration(msg.delay, "fixed_delay", 0.0, dwhere)
        if delay <= 0:
            raise XdsError(f"{dwhere}: fixed_delay must be positive")
        delay_percent = _fraction(msg.delay.percentage, f"{dwhere} percentage")
    if msg.HasField("abort"):
        awhere = f"{where} abort"
        only(msg.abort, ("http_status", "percentage"), awhere)
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
    only(msg, ("name", "type", "eds_cluster_config", "connect_timeout", "lb_policy", "load_assignment",
                "alt_stat_name", "metadata", "outlier_detection", "circuit_breakers", "common_lb_config",
                "typed_extension_protocol_options", "transport_socket_matches", "transport_socket"), where)
    if msg.type == cluster_pb2.Cluster.ORIGINAL_DST:
        return _original_dst_cluster(msg, where)
    if msg.HasField("transport_socket"):
        raise XdsError(f"{where}: field 'transport_socket' is supported on ORIGINAL_DST clusters only "
                       "(the others: transport_socket_matches tlsMode-mutual)")
    if msg.lb_policy not in _LB_POLICIES:
        name = enum_name(cluster_pb2.Cluster.LbPolicy, msg.lb_policy)
        supported = ", ".join(cluster_pb2.Cluster.LbPolicy.Name(p) for p in _LB_POLICIES)
        raise XdsError(f"{where}: lb_policy {name} is not supported (supported: {supported})")
    timeout = seconds(msg.connect_timeout) if msg.HasField("connect_timeout") else DEFAULT_CONNECT_TIMEOUT
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
    raise XdsError(f"{where}: type {enum_name(cluster_pb2.Cluster.DiscoveryType, msg.type)} is not supported")


def _original_dst_cluster(msg: cluster_pb2.Cluster, where: str) -> ClusterConfig:
    """An ORIGINAL_DST cluster (lb_policy CLUSTER_PROVIDED): no endpoints of its own; each
    connection or request goes to its original destination. Outlier detection is refused: the
    hosts are whatever the app dialled. A ``transport_socket`` (an UpstreamTlsContext) means mTLS
    to every destination (transparent mode's ``passthrough-mtls|<svc>.<ns>``);
    ``transport_socket_matches`` are refused: its hosts carry no metadata to match."""
    only(msg, ("name", "type", "connect_timeout", "lb_policy", "alt_stat_name", "metadata", "circuit_breakers",
                "common_lb_config", "typed_extension_protocol_options", "transport_socket"), where)
    if msg.lb_policy != cluster_pb2.Cluster.CLUSTER_PROVIDED:
        raise XdsError(f"{where}: an ORIGINAL_DST cluster needs lb_policy CLUSTER_PROVIDED")
    timeout = seconds(msg.connect_timeout) if msg.HasField("connect_timeout") else DEFAULT_CONNECT_TIMEOUT
    if timeout <= 0:
        raise XdsError(f"{where}: connect_timeout must be positive")
    http = _upstream_http(msg, where)
    return ClusterConfig(name=msg.name, discovery=DISCOVERY_ORIGINAL_DST, connect_timeout=timeout,
                         circuit_breakers=circuit_breakers(msg.circuit_breakers, f"{where} circuit_breakers"),
                         tls=original_dst_tls(msg, http["http2"], where), **http)


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
    only(msg, [f.name for f in dataclasses.fields(OutlierConfig)] + [
        "enforcing_local_origin_success_rate", "enforcing_failure_percentage_local_origin",
        "max_ejection_time_jitter", "always_eject_one_host", "successful_active_health_check_uneject_host"], where)
    kwargs: dict = {"split_external_local_origin_errors": msg.split_external_local_origin_errors}
    for f in dataclasses.fields(OutlierConfig):
        if f.name == "split_external_local_origin_errors" or not msg.HasField(f.name):
            continue
        if f.name in _OUTLIER_DURATIONS:
            kwargs[f.name] = duration(msg, f.name, 0.0, where)
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
    if seconds(msg.max_ejection_time_jitter) != 0:
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
    only(msg, ("thresholds",), where)
    chosen = None
    for t in msg.thresholds:
        only(t, ("priority", "max_connections", "max_pending_requests", "max_requests", "max_retries",
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
        only(chosen.retry_budget, ("budget_percent", "min_retry_concurrency"), bwhere)
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
    only(msg.common_lb_config, ("healthy_panic_threshold",), f"{where} common_lb_config")
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
        opts = unpack(config, http_protocol_options_pb2.HttpProtocolOptions(), owhere)
        only(opts, ("common_http_protocol_options", "explicit_http_config"), owhere)
        if opts.HasField("explicit_http_config"):
            explicit = opts.explicit_http_config
            if explicit.HasField("http2_protocol_options"):
                only(explicit.http2_protocol_options, (), f"{owhere} http2_protocol_options")
                http2 = True
            else:
                only(explicit, ("http_protocol_options",), f"{owhere} explicit_http_config (HTTP/1.1 or HTTP/2)")
                only(explicit.http_protocol_options, (), f"{owhere} http_protocol_options")
        idle = _idle_timeout(opts, "common_http_protocol_options", owhere)
    return {"idle_timeout": idle, "http2": http2}


def endpoints(cla: endpoint_pb2.ClusterLoadAssignment, where: str = "") -> tuple[EndpointConfig, ...]:
    where = where or f"cluster_load_assignment {cla.cluster_name!r}"
    only(cla, ("cluster_name", "endpoints", "policy"), where)
    if cla.HasField("policy"):
        only(cla.policy, ("overprovisioning_factor", "weighted_priority_health"), f"{where} policy")
    out = []
    seen: set[str] = set()
    for loc in cla.endpoints:
        only(loc, ("locality", "lb_endpoints", "load_balancing_weight", "priority", "metadata"), f"{where} locality")
        if loc.priority != 0:
            raise XdsError(f"{where}: priority {loc.priority} is not supported (only priority 0)")
        zone = loc.locality.zone
        for lbe in loc.lb_endpoints:
            only(lbe, ("endpoint", "health_status", "load_balancing_weight", "metadata"), f"{where} endpoint")
            sa = lbe.endpoint.address.socket_address
            if not lbe.endpoint.address.HasField("socket_address") or not sa.address or not sa.port_value:
                raise XdsError(f"{where}: every endpoint needs a socket_address with address and port_value")
            only(sa, ("address", "port_value", "protocol"), f"{where} endpoint address")
            key = f"{sa.address}:{sa.port_value}"
            if key in seen:
                raise XdsError(f"{where}: endpoint {key} is listed twice")
            seen.add(key)
            weight = lbe.load_balancing_weight.value if lbe.HasField("load_balancing_weight") else 1
            if weight < 1:
                raise XdsError(f"{where}: endpoint {key}: load_balancing_weight must be at least 1")
            mtls = {"mtls": True} if endpoint_mtls(lbe, where) else {}
            out.append(EndpointConfig(address=sa.address, port=sa.port_value, weight=weight,
                                      serving=lbe.health_status in _SERVING, zone=zone, **mtls))
    return tuple(out)


# --------------------------------------------------------------------------- runtime (RTDS)

_JS_SAFE_INTEGER = 2 ** 53  # JSON text of a whole double below this is its integer digits


def runtime(msg: rtds_pb2.Runtime) -> RuntimeConfig:
    """An RTDS Runtime resource: ``name`` and ``layer``, flattened into ``{key: str}``."""
    where = f"runtime {msg.name!r}"
    only(msg, ("name", "layer"), where)
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
