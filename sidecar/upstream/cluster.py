"""Runtime clusters and endpoints, and the ClusterManager that the xDS layer updates.

Config objects (``sidecar.config``) are immutable; these are the live objects behind them: an
endpoint (:class:`~sidecar.upstream.host.Endpoint`) carries its counters and its connection pool,
a :class:`Cluster` its endpoints, its load balancer, its outlier detector and its stats. The data
path calls :meth:`ClusterManager.get` and :meth:`Cluster.pick`, reports results to
``Cluster.outlier`` when it is not None, and bumps plain integers; nothing here logs or touches
Prometheus (ejections are logged by :mod:`sidecar.upstream.outlier`).

Picking: the balancer (``lb_policy``, see :mod:`sidecar.upstream.lb`) runs over the *eligible*
endpoints: serving ones that outlier detection has not ejected. It is rebuilt when that set changes
(EDS, CDS, an ejection or a return), never per pick, so round robin keeps its exact shares. Panic
(Envoy's ``healthy_panic_threshold``): when fewer than that percent of the serving endpoints are
healthy (not ejected), the balancer runs over all serving endpoints, ejected ones included, and
each pick counts ``lb_healthy_panic``; 0 disables panic. Endpoints that are not serving (DRAINING:
weight 0, or disabled by an operator) are never picked, not even in panic, and do not count towards
the healthy share. That differs from Envoy, where a DRAINING host is merely unhealthy and panic
may pick it: here an operator's "disable" must take an endpoint out of traffic.

Updates (CDS via :meth:`ClusterManager.update_clusters`, EDS via
:meth:`ClusterManager.update_endpoints`) keep the runtime state of whatever survives: a cluster
keeps its stats, endpoints and outlier state across a CDS update (outlier state is dropped only when
the update removes outlier detection), and an endpoint whose ``address:port`` is unchanged keeps its
counters, its pool and its ejection. A removed endpoint's pool closes its idle connections at
once; requests in flight on it finish, and their connections close when they do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict
from operator import attrgetter
from random import random as default_random
from typing import TYPE_CHECKING, Any

from sidecar.config import DISCOVERY_ORIGINAL_DST, ClusterConfig, EndpointConfig, OutlierConfig
from sidecar.upstream.host import Endpoint
from sidecar.upstream.lb import LB_POLICIES, Balancer, make_balancer
from sidecar.upstream.lb_random import WeightedRandom
from sidecar.upstream.outlier import OutlierDetector, Scheduler
from sidecar.upstream.pool import DEFAULT_MAX_IDLE, ConnectionPool, Connector
from sidecar.upstream.stats import ClusterStats, Histogram

if TYPE_CHECKING:
    from sidecar.tls.identity import TlsIdentity
    from sidecar.tls.upstream import UpstreamTls

DISCOVERY_STATIC = "STATIC"
# An ORIGINAL_DST cluster makes an endpoint per destination on first use and keeps at most this
# many; beyond it the idle ones (no request, no connection) are dropped first.
MAX_ORIGINAL_DST_HOSTS = 1024

_active_requests = attrgetter("active_requests")


class Cluster:
    """A named group of endpoints behind one load balancer, with its outlier detector."""

    __slots__ = ("name", "config", "breakers", "stats", "rq_time", "endpoints", "outlier", "retries_active", "_lb", "_panic",
                 "_connector", "_max_idle", "_clock", "_random", "_scheduler", "_identity")

    def __init__(self, config: ClusterConfig, *, connector: Connector | None = None,
                 max_idle: int = DEFAULT_MAX_IDLE, clock: Callable[[], float] = time.monotonic,
                 random: Callable[[], float] = default_random, scheduler: Scheduler | None = None,
                 identity: TlsIdentity | None = None) -> None:
        self.name = config.name
        self.config = config
        self.breakers = config.circuit_breakers  # read per request (sidecar.upstream.breaker)
        self.stats = ClusterStats()
        self.rq_time = Histogram()  # upstream request time: a try's start to its response's end
        self.endpoints: dict[str, Endpoint] = {}
        self.outlier: OutlierDetector | None = None
        self.retries_active = 0  # retries in flight (the retry budget reads it)
        self._lb: Balancer[Endpoint] | None = None
        self._panic = False
        self._connector = connector
        self._max_idle = max_idle
        self._clock = clock
        self._random = random
        self._scheduler = scheduler
        self._identity = identity  # mTLS to endpoints marked mtls when the config has an UpstreamTlsContext
        self._set_outlier(config.outlier)
        if config.discovery == DISCOVERY_STATIC:
            self.set_endpoints(config.static_endpoints)

    @property
    def original_dst(self) -> bool:
        return self.config.discovery == DISCOVERY_ORIGINAL_DST

    @property
    def panic(self) -> bool:
        """True while too few endpoints are healthy and picks use all serving endpoints."""
        return self._panic

    def pick(self, exclude: Collection[Endpoint] | None = None) -> Endpoint | None:
        """The next eligible endpoint by the cluster's load balancer, or None if there is none.

        With ``exclude`` (endpoints already tried: Envoy's previous_hosts retry predicate), an
        eligible endpoint outside it is preferred; if there is none, any eligible one is returned.
        """
        lb = self._lb
        if lb is None:
            return None
        if self._panic:
            self.stats.lb_healthy_panic += 1
        if exclude:
            return self._pick_other(lb, exclude)
        return lb.pick()

    def original_dst_host(self, address: str, port: int) -> Endpoint | None:
        """ORIGINAL_DST clusters (Envoy's original destination load balancer): the endpoint for
        ``address:port``, made on first use with the cluster's pool settings; None when the cluster
        is full of busy hosts (the caller answers 503 UH, counted as upstream_cx_none_healthy)."""
        key = f"{address}:{port}"
        endpoint = self.endpoints.get(key)
        if endpoint is not None:
            return endpoint
        if len(self.endpoints) >= MAX_ORIGINAL_DST_HOSTS and not self._drop_idle_hosts():
            return None
        cfg = EndpointConfig(address, port)
        endpoint = self.endpoints[key] = Endpoint(cfg, self._pool(cfg))
        return endpoint

    def upstream_tls(self, mtls: bool = False) -> UpstreamTls | None:
        """mTLS for a connection of this cluster: when it has an UpstreamTlsContext, the sidecar an
        identity, and the host is marked ``mtls`` (auto mTLS) or the cluster is ORIGINAL_DST (its
        transport_socket applies to every host: also a tcp_proxy's own pool to its original
        destination); None: plaintext."""
        if self.config.tls is None or self._identity is None or not (mtls or self.original_dst):
            return None
        from sidecar.tls.upstream import UpstreamTls

        return UpstreamTls(self.config.tls, self._identity)

    def _drop_idle_hosts(self) -> bool:
        # Droppable: no request, and no connection but idle pooled ones (closing the pool closes those).
        idle = [k for k, ep in self.endpoints.items()
                if not ep.active_requests and ep.pool.cx_active == ep.pool.idle_count]
        for key in idle[: max(1, len(idle) // 2)]:
            self.endpoints.pop(key).pool.close()
        return bool(idle)

    def _pick_other(self, lb: Balancer[Endpoint], exclude: Collection[Endpoint]) -> Endpoint | None:
        # Ask the balancer first (keeps its rotation and shares); if it keeps answering tried
        # endpoints, choose among the untried ones by weight.
        endpoint = None
        for _ in range(len(lb)):
            endpoint = lb.pick()
            if endpoint not in exclude:
                return endpoint
        others = [(ep, ep.config.weight) for ep in lb.items if ep not in exclude]
        if not others:
            return endpoint
        return WeightedRandom(others, random=self._random).pick()

    def set_config(self, config: ClusterConfig) -> None:
        """A CDS update of this cluster: new settings, same runtime state."""
        old = self.config
        self.config = config
        self.breakers = config.circuit_breakers
        for endpoint in self.endpoints.values():
            if old.http2 != config.http2 or old.tls != config.tls:
                # Another protocol or TLS to the same hosts: new pools; requests in flight finish on the old.
                endpoint.pool.close()
                endpoint.pool = self._pool(endpoint.config)
            endpoint.pool.connect_timeout = config.connect_timeout
            endpoint.pool.idle_timeout = config.idle_timeout
        outlier_toggled = (old.outlier is None) != (config.outlier is None)
        self._set_outlier(config.outlier)
        if config.discovery == DISCOVERY_STATIC:
            self.set_endpoints(config.static_endpoints)
        elif (outlier_toggled or old.lb_policy != config.lb_policy
              or old.healthy_panic_threshold != config.healthy_panic_threshold):
            self._rebuild()

    def _set_outlier(self, config: OutlierConfig | None) -> None:
        detector = self.outlier
        if config is None:
            if detector is not None:
                self.outlier = None
                detector.close()
        elif detector is None:
            self.outlier = OutlierDetector(self.name, config, self.stats, on_change=self._rebuild,
                                           clock=self._clock, random=self._random, scheduler=self._scheduler)
            self.outlier.set_endpoints(self.endpoints.values())
        elif detector.config != config:
            detector.set_config(config)

    def set_endpoints(self, configs: Iterable[EndpointConfig]) -> None:
        """Replace the endpoint set, keeping endpoints whose ``address:port`` is unchanged."""
        old = self.endpoints
        new: dict[str, Endpoint] = {}
        for cfg in configs:
            key = cfg.key
            if key in new:
                continue  # a duplicate address: the first one wins
            endpoint = old.get(key)
            if endpoint is None:
                endpoint = Endpoint(cfg, self._pool(cfg))
            else:
                if endpoint.config.mtls != cfg.mtls and self.config.tls is not None:
                    endpoint.pool.close()  # its sidecar got (or lost) an identity: a pool of the other kind
                    endpoint.pool = self._pool(cfg)
                endpoint.config = cfg
            new[key] = endpoint
        for key, endpoint in old.items():
            if key not in new:
                endpoint.pool.close()
        self.endpoints = new
        if self.outlier is not None:
            self.outlier.set_endpoints(new.values())
        self._rebuild()

    def _pool(self, cfg: EndpointConfig) -> ConnectionPool:
        """A new pool to an endpoint, mTLS or plaintext as :meth:`upstream_tls` says."""
        config = self.config
        return ConnectionPool(cfg.address, cfg.port, connect_timeout=config.connect_timeout, limits=self,
                              max_idle=self._max_idle, http2=config.http2, idle_timeout=config.idle_timeout,
                              connector=self._connector, tls=self.upstream_tls(cfg.mtls))

    def close_idle_tls(self) -> None:
        """The sidecar just got its first certificate: idle connections of mTLS pools were made in
        plaintext; close them so that the next requests use mTLS (busy ones finish as they are)."""
        for endpoint in self.endpoints.values():
            if endpoint.pool.tls is not None:
                endpoint.pool.close_idle()

    def _rebuild(self) -> None:
        """Build the balancer over the eligible endpoints (called whenever that set may change)."""
        serving = [ep for ep in self.endpoints.values() if ep.serving]
        healthy = [ep for ep in serving if not ep.ejected]
        threshold = self.config.healthy_panic_threshold
        panic = bool(serving) and threshold > 0 and len(healthy) * 100 < threshold * len(serving)
        use = serving if panic else healthy
        self._panic = panic
        self._lb = make_balancer(self.config.lb_policy, [(ep, ep.config.weight) for ep in use],
                                 random=self._random, active=_active_requests) if use else None

    def close(self) -> None:
        for endpoint in self.endpoints.values():
            endpoint.pool.close()
        if self.outlier is not None:
            self.outlier.close()

    def admin_view(self) -> dict[str, Any]:
        cfg = self.config
        detector = self.outlier
        return {
            "name": self.name,
            "discovery": cfg.discovery,
            "lb_policy": cfg.lb_policy,
            "connect_timeout": cfg.connect_timeout,
            "idle_timeout": cfg.idle_timeout,
            "healthy_panic_threshold": cfg.healthy_panic_threshold,
            "panic": self._panic,
            "circuit_breakers": asdict(cfg.circuit_breakers),
            "retries_active": self.retries_active,
            "outlier_detection": detector.admin_view() if detector is not None else None,
            "stats": self.stats.snapshot(),
            "endpoints": [ep.admin_view(detector.host_view(ep) if detector is not None else None)
                          for ep in self.endpoints.values()],
        }


class ClusterManager:
    """All clusters of a sidecar worker, by name. Owned by the xDS layer, read by listeners."""

    __slots__ = ("_clusters", "_pending_endpoints", "_connector", "_max_idle", "_clock", "_random", "_scheduler",
                 "_identity", "_tls_ready")

    def __init__(self, *, connector: Connector | None = None, max_idle: int = DEFAULT_MAX_IDLE,
                 clock: Callable[[], float] = time.monotonic, random: Callable[[], float] = default_random,
                 scheduler: Scheduler | None = None, identity: TlsIdentity | None = None) -> None:
        self._clusters: dict[str, Cluster] = {}
        # EDS assignments that arrived before their cluster (applied when it appears).
        self._pending_endpoints: dict[str, tuple[EndpointConfig, ...]] = {}
        self._connector = connector
        self._max_idle = max_idle
        self._clock = clock  # clock, random source and scheduler of load balancers and outlier detectors
        self._random = random
        self._scheduler = scheduler
        # The sidecar's identity (sidecar.tls): pools to mTLS endpoints read its client contexts.
        self._identity = identity
        self._tls_ready = False
        if identity is not None:
            identity.on_change.append(self._identity_changed)

    def _identity_changed(self) -> None:
        ready = self._identity.ready
        if ready and not self._tls_ready:
            for cluster in self._clusters.values():
                cluster.close_idle_tls()
        self._tls_ready = ready

    def get(self, name: str) -> Cluster | None:
        return self._clusters.get(name)

    def names(self) -> list[str]:
        return list(self._clusters)

    def update_clusters(self, configs: Mapping[str, ClusterConfig]) -> None:
        """Make the cluster set exactly ``configs`` (SotW CDS): add, update in place, remove.

        A cluster whose config changes keeps its stats and endpoints (EDS clusters keep serving
        their last assignment until EDS says otherwise; STATIC ones take their new static
        endpoints). Removed clusters close their idle connections; in-flight requests finish.
        Raises ValueError, before changing anything, for a policy this sidecar cannot run.
        """
        for name, config in configs.items():
            if config.lb_policy not in LB_POLICIES:
                raise ValueError(f"cluster {name!r}: lb_policy {config.lb_policy!r} is not supported "
                                 f"(supported: {', '.join(LB_POLICIES)})")
        clusters = self._clusters
        for name in [n for n in clusters if n not in configs]:
            clusters.pop(name).close()
        for name, config in configs.items():
            cluster = clusters.get(name)
            if cluster is None:
                cluster = Cluster(config, connector=self._connector, max_idle=self._max_idle, clock=self._clock,
                                  random=self._random, scheduler=self._scheduler, identity=self._identity)
                pending = self._pending_endpoints.pop(name, None)
                if pending is not None and config.discovery != DISCOVERY_STATIC:
                    cluster.set_endpoints(pending)
                clusters[name] = cluster
            elif cluster.config != config:
                cluster.set_config(config)

    def update_endpoints(self, cluster_name: str, endpoints: tuple[EndpointConfig, ...]) -> None:
        """Apply a ClusterLoadAssignment to an EDS cluster (kept for later if the cluster is unknown)."""
        cluster = self._clusters.get(cluster_name)
        if cluster is None:
            self._pending_endpoints[cluster_name] = tuple(endpoints)
            return
        if cluster.config.discovery in (DISCOVERY_STATIC, DISCOVERY_ORIGINAL_DST):
            return  # their endpoints come from their own config, or from each connection
        cluster.set_endpoints(endpoints)

    def close(self) -> None:
        for cluster in self._clusters.values():
            cluster.close()
        self._clusters.clear()

    def admin_view(self) -> list[dict[str, Any]]:
        """JSON-able list for the admin ``/clusters`` page, sorted by cluster name."""
        return [self._clusters[name].admin_view() for name in sorted(self._clusters)]
