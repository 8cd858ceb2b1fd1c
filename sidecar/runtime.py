"""The sidecar's live state, and the one place where accepted xDS config meets the data path.

:class:`SidecarRuntime` is the ADS client's ``ConfigSink``. Each ``apply_*`` call gets the
complete, converted set of one type; it compiles everything it needs first (routers) and only then
swaps, so a config that fails to compile raises before anything changed and is NACKed.

:class:`RuntimeLayer` holds the service's runtime config (RTDS) that the admin port serves the app
at ``/runtime``, and wakes the long polls waiting for its version to change.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from meshkeeper import xds
from meshkeeper.xds import NodeInfo
from sidecar.config import DEFAULT_IDLE_TIMEOUT, ClusterConfig, EndpointConfig, ListenerConfig, RouteConfig
from sidecar.metrics import SidecarMetrics
from sidecar.proxy.listener import Listener, ListenerRuntime, start_listener
from sidecar.proxy.ratelimit import TokenBucket
from sidecar.proxy.router import Router
from sidecar.upstream.cluster import ClusterManager
from sidecar.xds.convert import XdsError

if TYPE_CHECKING:
    from sidecar.accesslog import AccessLog
    from sidecar.registration import Registration
    from sidecar.tracing.export import Tracer
    from sidecar.xds.client import AdsClient
    from sidecar.xds.lrs import LoadReporter

log = logging.getLogger("meshkeeper.sidecar")

BOUND_LISTENERS = (xds.OUTBOUND_LISTENER, xds.INBOUND_LISTENER)


class RuntimeLayer:
    """The accepted RTDS values of the sidecar's own service and their version.

    ``version`` is the RTDS version accepted last ("" before the first). Waiters park on an
    :class:`asyncio.Event` that is set (and replaced) whenever the version moves, so any number of
    long polls wait without polling and all wake at once.
    """

    def __init__(self) -> None:
        self.version = ""
        self.values: Mapping[str, str] = MappingProxyType({})
        self.updates = 0  # times the version moved
        self.waiting = 0  # long polls parked now
        self._changed = asyncio.Event()

    def apply(self, values: Mapping[str, str], version: str) -> bool:
        """Take ``values`` as of ``version``; True (and waiters woken) when the version moved."""
        values = MappingProxyType(dict(sorted(values.items())))
        if version == self.version:
            # The same version again (a reconnect re-sends it): values follow, no one is woken.
            self.values = values
            return False
        self.version, self.values = version, values
        self.updates += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    async def wait_change(self, version: str, timeout: float) -> None:
        """Return once ``self.version`` differs from ``version``, or after ``timeout`` seconds."""
        if self.version != version or timeout <= 0:
            return
        event = self._changed
        self.waiting += 1
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self.waiting -= 1


class SidecarRuntime:
    def __init__(self, node: NodeInfo, *, tracer: Tracer | None = None, access_log: AccessLog | None = None) -> None:
        self.node = node
        self.clusters = ClusterManager()
        self.listener_runtimes = {name: ListenerRuntime(name, self.clusters) for name in BOUND_LISTENERS}
        self.tracer = tracer  # None: tracing off (no --otlp-endpoint)
        self.access_log = access_log
        for rt in self.listener_runtimes.values():
            rt.service, rt.namespace = node.service, node.namespace
            rt.access_log = access_log
            rt.set_tracing(tracer, None)
        self.listeners: list[Listener] = []
        self.listener_configs: dict[str, ListenerConfig] = {}
        self.route_configs: dict[str, RouteConfig] = {}
        self.ads: AdsClient | None = None
        self.lrs: LoadReporter | None = None
        self.registration: Registration | None = None
        self.draining = False
        self.runtime_layer = RuntimeLayer()
        self.metrics = SidecarMetrics(self)

    # ------------------------------------------------------------------ lifecycle

    async def start_listeners(self, outbound: socket.socket, inbound: socket.socket) -> None:
        self.listeners = [await start_listener(self.listener_runtimes[xds.OUTBOUND_LISTENER], outbound),
                          await start_listener(self.listener_runtimes[xds.INBOUND_LISTENER], inbound)]

    async def drain(self, delay: float, limit: float) -> bool:
        """Drain like Istio's terminationDrainDuration, then Envoy's drain.

        For ``delay`` seconds the listeners keep accepting (callers learn of the deregistration
        only after the registry watch, the snapshot and the EDS push), but every response says
        ``Connection: close`` and idle connections close; then they stop accepting and in-flight
        requests get up to ``limit`` seconds before the rest are reset.
        """
        self.draining = True
        for rt in self.listener_runtimes.values():
            rt.start_draining()
        if delay > 0:
            await asyncio.sleep(delay)
        results = await asyncio.gather(*(lst.drain(limit) for lst in self.listeners))
        return all(results)

    # ------------------------------------------------------------------ ConfigSink

    def apply_clusters(self, clusters: dict[str, ClusterConfig]) -> None:
        self._lrs_sync()
        self.clusters.update_clusters(clusters)

    def apply_endpoints(self, assignments: dict[str, tuple[EndpointConfig, ...]]) -> None:
        self._lrs_sync()
        for name, endpoints in assignments.items():
            self.clusters.update_endpoints(name, endpoints)

    def _lrs_sync(self) -> None:
        """Let load reporting see the endpoints about to be replaced, so that the load of one that
        came and went within a reporting interval is still reported."""
        if self.lrs is not None:
            self.lrs.sync()

    def apply_listeners(self, listeners: dict[str, ListenerConfig]) -> None:
        unknown = sorted(set(listeners) - set(BOUND_LISTENERS))
        if unknown:
            raise XdsError(f"listener {unknown[0]!r}: this sidecar binds only {', '.join(BOUND_LISTENERS)}")
        routers = self._routers(listeners, self.route_configs)
        buckets = self._rate_limits(listeners)
        self.listener_configs = dict(listeners)
        self._swap(routers)
        for name, bucket in buckets.items():
            cfg = listeners.get(name)
            self.listener_runtimes[name].set_tracing(self.tracer, cfg.trace_sample_ratio if cfg is not None else None)
            self.listener_runtimes[name].set_limits(
                bucket,
                cfg.request_headers_timeout if cfg is not None else 0.0,
                cfg.idle_timeout if cfg is not None else DEFAULT_IDLE_TIMEOUT)

    def apply_routes(self, routes: dict[str, RouteConfig]) -> None:
        merged = {**self.route_configs, **routes}
        routers = self._routers(self.listener_configs, merged)
        self.route_configs = merged
        self._swap(routers)

    def apply_runtime(self, values: Mapping[str, str], version: str) -> None:
        if self.runtime_layer.apply(values, version):
            log.info("runtime config version %s: %d keys", version, len(values))

    def _routers(self, listeners: dict[str, ListenerConfig], routes: dict[str, RouteConfig]) -> dict[str, Router | None]:
        """Compile the router of every bound listener; raises ValueError before anything changes."""
        out: dict[str, Router | None] = {}
        for name in BOUND_LISTENERS:
            cfg = listeners.get(name)
            if cfg is None:
                out[name] = None
            elif cfg.route_config is not None:
                out[name] = Router(cfg.route_config)
            else:
                rc = routes.get(cfg.rds_name)
                # Until RDS delivers it, keep the listener's current router (Envoy's warming).
                out[name] = Router(rc, faults=cfg.fault_filter) if rc is not None else self.listener_runtimes[name].router
        return out

    def _rate_limits(self, listeners: dict[str, ListenerConfig]) -> dict[str, TokenBucket | None]:
        """The rate limit bucket of every bound listener, kept (with its tokens) if unchanged."""
        out: dict[str, TokenBucket | None] = {}
        for name in BOUND_LISTENERS:
            cfg = listeners.get(name)
            out[name] = self.listener_runtimes[name].rate_limit_for(cfg.rate_limit if cfg is not None else None)
        return out

    def _swap(self, routers: dict[str, Router | None]) -> None:
        for name, router in routers.items():
            self.listener_runtimes[name].router = router

    # ------------------------------------------------------------------ views

    def clusters_view(self) -> list[dict[str, Any]]:
        return self.clusters.admin_view()

    def listeners_view(self) -> list[dict[str, Any]]:
        return [rt.admin_view() for rt in self.listener_runtimes.values()]
