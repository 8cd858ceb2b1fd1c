"""The state every connection of a listener shares: :class:`ListenerContext`.

A :class:`ListenerContext` holds the current :class:`Router` (swapped whole by the xDS layer; each
request reads it once), the :class:`ClusterManager`, the listener's stats, its limits, its
telemetry settings and its drain state::

    context = ListenerContext("outbound", clusters)
    context.set_route_config(route_config)          # on every RDS update (raises ValueError -> NACK)
    # or: router = Router(route_config) while validating, then context.set_router(router)

Listener-level limits, set from the ListenerConfig by :meth:`ListenerContext.set_limits`:

- ``rate_limit``: the local rate limit's :class:`TokenBucket` (None: unlimited); the connection
  manager takes a token per request and answers 429 RL when there is none.
- ``request_headers_timeout`` (HCM ``request_headers_timeout``, 0: none): a request head that began
  arriving and is not complete after this long gets 408 DT, after the responses of the requests
  before it, and the connection closes.
- ``idle_timeout`` (HCM ``common_http_protocol_options.idle_timeout``, default 1 h, 0: none): a
  connection without an active request for this long is closed (``downstream_cx_idle_timeout``).

Both timeouts are enforced by one sweep per listener instead of a timer per request, so a request
costs only a counter increment: every ``sweep_period`` (a tenth of the shortest timeout, at least
0.25 s) the sweep looks at each connection, and one seen in the same state (the same head not yet
complete, or idle with no request begun since) for the whole timeout is timed out. A timeout thus
fires between ``timeout`` and ``timeout`` plus two periods after it started, never early. The sweep
runs only while the listener has connections and a timeout is set.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.config import DEFAULT_IDLE_TIMEOUT, RateLimitConfig, RouteConfig
from sidecar.proxy import errors
from sidecar.proxy.ratelimit import TokenBucket
from sidecar.proxy.router import Router
from sidecar.sweep import Sweep
from sidecar.tracing.context import Sampler
from sidecar.tracing.export import CLIENT, SERVER
from sidecar.upstream.cluster import ClusterManager
from sidecar.upstream.stats import Counters, Histogram

if TYPE_CHECKING:
    from sidecar.accesslog import AccessLog
    from sidecar.l4 import TcpProxyRuntime
    from sidecar.proxy.authz import HttpPolicy
    from sidecar.proxy.on_demand import OnDemand
    from sidecar.tracing.export import Tracer

MIN_SWEEP_PERIOD = 0.25  # the listener timeouts' sweep runs at most this often


class Connection(Protocol):
    """A listener's downstream connection, as the context sees it (the connection manager)."""

    transport: Any

    def start_draining(self) -> None: ...

    def check_timeouts(self, now: float, headers_timeout: float, idle_timeout: float) -> None: ...


LISTENER_STATS: tuple[str, ...] = (
    "downstream_cx_total",
    "downstream_cx_active",
    "downstream_cx_protocol_error",  # malformed requests (400) and oversized headers (431)
    "downstream_cx_drain_close",  # connections closed because the listener drains
    "downstream_rq_total",
    "downstream_rq_active",
    "downstream_rq_2xx",
    "downstream_rq_3xx",
    "downstream_rq_4xx",
    "downstream_rq_5xx",
    "no_route",  # 404 NR
    "no_cluster",  # 503 NC: the route names a cluster this sidecar does not have
    "downstream_rq_overflow",  # 503 UO: a cluster's max_requests or max_pending_requests was full
    "downstream_rq_header_timeout",  # 408: the request head did not arrive within request_headers_timeout
    "downstream_cx_idle_timeout",  # connections closed after idle_timeout without a request
    "ratelimit_rate_limited",  # 429 RL from the listener's local rate limit
    "ratelimit_ok",
    "fault_delays_injected",
    "fault_aborts_injected",
    # on-demand discovery (sidecar.proxy.on_demand): requests held for a service not yet known, and how
    # they ended: routed once it arrived, 404 because it does not exist, 404 after the hold timed out
    "rq_on_demand_held",
    "rq_on_demand_routed",
    "rq_on_demand_missing",
    "rq_on_demand_timeout",
    # mTLS on the inbound listener (sidecar.tls.inspector; Envoy's names, dots as underscores)
    "no_filter_chain_match",  # STRICT: a plaintext connection matched no chain and was closed
    "downstream_pre_cx_timeout",  # no first byte within the listener filters' timeout
    "ssl_handshake",  # TLS handshakes done, the caller verified
    "ssl_connection_error",  # other handshake failures, or no certificate yet to terminate with
    "ssl_fail_verify_no_cert",  # the caller sent no client certificate
    "ssl_fail_verify_error",  # the caller's chain does not verify against the trust bundle
    "ssl_fail_verify_san",  # the caller's URI SAN is not one the chain accepts
    # envoy.filters.http.rbac (sidecar.proxy.authz): Envoy's http.<prefix>.rbac.allowed / .denied
    "rbac_allowed",
    "rbac_denied",
)


class ListenerStats(Counters):
    __slots__ = LISTENER_STATS
    FIELDS = LISTENER_STATS


class ListenerContext:
    """Shared state of one listener's connections. Create it inside the event loop's thread."""

    def __init__(self, name: str, clusters: ClusterManager, router: Router | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.clusters = clusters
        # Read by every request; replaced whole (an attribute store is atomic for the loop).
        self.router: Router | None = router
        self.stats = ListenerStats()
        self.draining = False
        self.connections: set[Connection] = set()
        self._idle: asyncio.Event | None = None
        # Listener limits (set_limits); read by connections and the sweep, replaced whole.
        self.rate_limit: TokenBucket | None = None
        self.random: Callable[[], float] = random.random  # fault injection and retry jitter
        self.request_headers_timeout = 0.0
        self.idle_timeout = DEFAULT_IDLE_TIMEOUT
        # XFCC and RBAC of the HCM (sidecar.proxy.authz), before routing; None: neither.
        self.http_policy: HttpPolicy | None = None
        self._clock = clock
        self._sweep = Sweep(self.sweep, lambda: bool(self.connections), sweep_period_for(0.0, DEFAULT_IDLE_TIMEOUT),
                            lambda exc: errors.log_once("sweep-bug", "unexpected error in the listener timeouts' sweep",
                                                        exc_info=exc))
        # Telemetry (sidecar.proxy.telemetry), set by the sidecar from its flags and the listener's
        # config: no tracer means tracing is off (trace headers pass through, no span ids are made).
        self.tracer: Tracer | None = None
        self.sampler: Sampler | None = None  # new traces: the HCM's tracing ratio, else the tracer's
        self.access_log: AccessLog | None = None
        self.span_kind = SERVER if name == "inbound" else CLIENT
        self.service = ""  # the mesh attributes of spans
        self.namespace = ""
        self.rq_time = Histogram()  # downstream request time: first byte in to last byte out
        # The cluster of the listener's default filter chain (the outbound policy: PassthroughCluster
        # or BlackHoleCluster), for proxy requests (absolute-form, CONNECT) to hosts outside the
        # mesh; None: no default chain, such requests get 404 NR.
        self.default_cluster: str | None = None
        # A scoped sidecar's outbound listener: requests for services not yet known are held while
        # they are discovered (sidecar.proxy.on_demand); None: they get 404 NR at once.
        self.on_demand: OnDemand | None = None
        # The tcp_proxy of that default chain, which tunnels CONNECT requests (set by the sidecar's
        # runtime with the dispatch tables); None: no tunnel can be made.
        self.default_tcp: TcpProxyRuntime | None = None
        # Responses by (route name, cluster name) and status class 1xx..5xx; a route never seen
        # has no entry. Names are bounded by the config, never by requests.
        self.route_stats: dict[tuple[str, str], list[int]] = {}
        # gRPC calls by (route name, cluster name, grpc-status), bounded the same way (17 statuses).
        self.grpc_stats: dict[tuple[str, str, int], int] = {}

    def set_route_config(self, config: RouteConfig) -> Router:
        """Compile ``config`` and make it current; raises ValueError (a NACK) if it cannot be honoured."""
        router = Router(config)
        self.router = router
        return router

    def set_router(self, router: Router | None) -> None:
        """Swap in a Router compiled earlier (validate every resource first, then swap all)."""
        self.router = router

    # --- limits ----------------------------------------------------------------------------

    def rate_limit_for(self, config: RateLimitConfig | None) -> TokenBucket | None:
        """The bucket to run ``config`` with: the current one (and its tokens) if its config is
        unchanged, else a new full one. Raises ValueError for a config it cannot run (a NACK)."""
        if config is None:
            return None
        current = self.rate_limit
        if current is not None and current.config == config:
            return current
        return TokenBucket(config, self._clock)

    def set_tracing(self, tracer: Tracer | None, ratio: float | None) -> None:
        """Tracing of this listener: ``ratio`` of new traces sampled (None: the tracer's own)."""
        self.tracer = tracer
        if tracer is None:
            self.sampler = None
        elif ratio is None:
            self.sampler = tracer.sampler
        elif self.sampler is None or self.sampler.ratio != ratio:
            self.sampler = Sampler(ratio)

    def set_limits(self, rate_limit: TokenBucket | None, request_headers_timeout: float, idle_timeout: float) -> None:
        """Swap in the listener's limits (timeouts in seconds, 0: none); applies to open connections."""
        self.rate_limit = rate_limit
        self.request_headers_timeout = request_headers_timeout
        self.idle_timeout = idle_timeout
        self._sweep.set_period(sweep_period_for(request_headers_timeout, idle_timeout))

    def sweep(self) -> None:
        """Time out the connections stuck in a request head or idle for too long (see the module doc)."""
        now = self._clock()
        headers_timeout = self.request_headers_timeout
        idle_timeout = self.idle_timeout
        for conn in list(self.connections):
            conn.check_timeouts(now, headers_timeout, idle_timeout)

    @property
    def sweeping(self) -> bool:
        """A sweep is scheduled (only while there are connections and a timeout is set)."""
        return self._sweep.scheduled

    @property
    def sweep_period(self) -> float:
        return self._sweep.period

    # --- called by connections -----------------------------------------------------------

    def connection_opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.stats.downstream_cx_total += 1
        self.stats.downstream_cx_active += 1
        self._sweep.start()
        # A connection accepted while the listener drains is served: its response says
        # ``Connection: close`` (callers that have not yet learnt that this endpoint is leaving
        # still get their answer), so it closes after one exchange.

    def connection_closed(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
            self.stats.downstream_cx_active -= 1
        if not self.connections:
            self._sweep.stop()
            if self._idle is not None:
                self._idle.set()

    # --- draining --------------------------------------------------------------------------

    def start_draining(self) -> None:
        """Idle connections close now; busy ones answer ``Connection: close`` and close after."""
        self.draining = True
        for conn in list(self.connections):
            conn.start_draining()

    async def wait_idle(self, limit: float) -> bool:
        """Wait until no downstream connection is left; False if ``limit`` seconds passed first."""
        if not self.connections:
            return True
        if self._idle is None:
            self._idle = asyncio.Event()
        self._idle.clear()
        try:
            async with asyncio.timeout(limit):
                await self._idle.wait()
        except TimeoutError:
            return not self.connections
        return True

    def abort_all(self) -> None:
        for conn in list(self.connections):
            transport = conn.transport
            if transport is not None:
                transport.abort()

    def admin_view(self) -> dict[str, Any]:
        return {"name": self.name, "draining": self.draining, "stats": self.stats.snapshot()}


def sweep_period_for(request_headers_timeout: float, idle_timeout: float) -> float:
    """How often the listener's sweep runs for these timeouts; 0: none is set, no sweep."""
    timeouts = [t for t in (request_headers_timeout, idle_timeout) if t > 0]
    return max(MIN_SWEEP_PERIOD, min(timeouts) / 10) if timeouts else 0.0


