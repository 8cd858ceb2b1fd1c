"""Runtime clusters and endpoints, and the ClusterManager that the xDS layer updates.

Config objects (``sidecar.config``) are immutable; these are the live objects behind them: an
:class:`Endpoint` carries its counters and its connection pool, a :class:`Cluster` its endpoints,
its load balancer and its stats. The data path calls :meth:`ClusterManager.get` and
:meth:`Cluster.pick` and bumps plain integers; nothing here logs or touches Prometheus.

Updates (CDS via :meth:`ClusterManager.update_clusters`, EDS via
:meth:`ClusterManager.update_endpoints`) keep the runtime state of whatever survives: a cluster
keeps its stats and endpoints across a CDS update, and an endpoint whose ``address:port`` is
unchanged keeps its counters and its pool. A removed endpoint's pool closes its idle connections at
once; requests in flight on it finish, and their connections close when they do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sidecar.config import ClusterConfig, EndpointConfig
from sidecar.upstream.lb import SmoothWeightedRoundRobin
from sidecar.upstream.pool import DEFAULT_MAX_IDLE, ConnectionPool, Connector
from sidecar.upstream.stats import ClusterStats

DISCOVERY_STATIC = "STATIC"


class Endpoint:
    """One upstream host of a cluster, as the data path sees it."""

    __slots__ = ("config", "key", "authority", "pool", "active_requests", "total_requests", "rq_error",
                 "rq_success")

    def __init__(self, config: EndpointConfig, pool: ConnectionPool) -> None:
        self.config = config
        self.key = config.key
        # Host header for requests that came without one (HTTP/1.0).
        host = f"[{config.address}]" if ":" in config.address else config.address
        self.authority = f"{host}:{config.port}".encode()
        self.pool = pool
        self.active_requests = 0
        self.total_requests = 0
        self.rq_error = 0  # 5xx answers and resets, timeouts, protocol errors
        self.rq_success = 0

    @property
    def serving(self) -> bool:
        return self.config.serving and self.config.weight > 0

    def admin_view(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "address": cfg.address,
            "port": cfg.port,
            "weight": cfg.weight,
            "serving": self.serving,
            "health_status": "HEALTHY" if self.serving else "DRAINING",
            "zone": cfg.zone,
            "labels": dict(cfg.labels),
            "active_requests": self.active_requests,
            "total_requests": self.total_requests,
            "rq_error": self.rq_error,
            "rq_success": self.rq_success,
            "cx_active": self.pool.cx_active,
            "cx_idle": self.pool.idle_count,
        }


class Cluster:
    """A named group of endpoints behind one load balancer."""

    __slots__ = ("name", "config", "stats", "endpoints", "_lb", "_connector", "_max_idle")

    def __init__(self, config: ClusterConfig, *, connector: Connector | None = None,
                 max_idle: int = DEFAULT_MAX_IDLE) -> None:
        self.name = config.name
        self.config = config
        self.stats = ClusterStats()
        self.endpoints: dict[str, Endpoint] = {}
        self._lb: SmoothWeightedRoundRobin[Endpoint] | None = None
        self._connector = connector
        self._max_idle = max_idle
        if config.discovery == DISCOVERY_STATIC:
            self.set_endpoints(config.static_endpoints)

    def pick(self) -> Endpoint | None:
        """The next serving endpoint by smooth weighted round robin, or None if there is none."""
        lb = self._lb
        return lb.pick() if lb is not None else None

    def set_config(self, config: ClusterConfig) -> None:
        """A CDS update of this cluster: new settings, same runtime state."""
        self.config = config
        for endpoint in self.endpoints.values():
            endpoint.pool.connect_timeout = config.connect_timeout
        if config.discovery == DISCOVERY_STATIC:
            self.set_endpoints(config.static_endpoints)

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
                pool = ConnectionPool(cfg.address, cfg.port, connect_timeout=self.config.connect_timeout,
                                      stats=self.stats, max_idle=self._max_idle, connector=self._connector)
                endpoint = Endpoint(cfg, pool)
            else:
                endpoint.config = cfg
            new[key] = endpoint
        for key, endpoint in old.items():
            if key not in new:
                endpoint.pool.close()
        self.endpoints = new
        serving = [(ep, ep.config.weight) for ep in new.values() if ep.serving]
        self._lb = SmoothWeightedRoundRobin(serving) if serving else None

    def close(self) -> None:
        for endpoint in self.endpoints.values():
            endpoint.pool.close()

    def admin_view(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "name": self.name,
            "discovery": cfg.discovery,
            "lb_policy": cfg.lb_policy,
            "connect_timeout": cfg.connect_timeout,
            "stats": self.stats.snapshot(),
            "endpoints": [ep.admin_view() for ep in self.endpoints.values()],
        }


class ClusterManager:
    """All clusters of a sidecar worker, by name. Owned by the xDS layer, read by listeners."""

    __slots__ = ("_clusters", "_pending_endpoints", "_connector", "_max_idle")

    def __init__(self, *, connector: Connector | None = None, max_idle: int = DEFAULT_MAX_IDLE) -> None:
        self._clusters: dict[str, Cluster] = {}
        # EDS assignments that arrived before their cluster (applied when it appears).
        self._pending_endpoints: dict[str, tuple[EndpointConfig, ...]] = {}
        self._connector = connector
        self._max_idle = max_idle

    def get(self, name: str) -> Cluster | None:
        return self._clusters.get(name)

    def names(self) -> list[str]:
        return list(self._clusters)

    def update_clusters(self, configs: Mapping[str, ClusterConfig]) -> None:
        """Make the cluster set exactly ``configs`` (SotW CDS): add, update in place, remove.

        A cluster whose config changes keeps its stats and endpoints (EDS clusters keep serving
        their last assignment until EDS says otherwise; STATIC ones take their new static
        endpoints). Removed clusters close their idle connections; in-flight requests finish.
        """
        clusters = self._clusters
        for name in [n for n in clusters if n not in configs]:
            clusters.pop(name).close()
        for name, config in configs.items():
            cluster = clusters.get(name)
            if cluster is None:
                cluster = Cluster(config, connector=self._connector, max_idle=self._max_idle)
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
        if cluster.config.discovery == DISCOVERY_STATIC:
            return  # a STATIC cluster's endpoints come from its own config only
        cluster.set_endpoints(endpoints)

    def close(self) -> None:
        for cluster in self._clusters.values():
            cluster.close()
        self._clusters.clear()

    def admin_view(self) -> list[dict[str, Any]]:
        """JSON-able list for the admin ``/clusters`` page, sorted by cluster name."""
        return [self._clusters[name].admin_view() for name in sorted(self._clusters)]
