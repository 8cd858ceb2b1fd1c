"""The sidecar's live state, and the one place where accepted xDS config meets the data path.

:class:`Server` (Envoy's server instance) is the ADS client's ``ConfigSink``. Each ``apply_*`` call
gets the complete, converted set of one type; it compiles everything it needs first (routers) and
only then swaps, so a config that fails to compile raises before anything changed and is NACKed.
The service's runtime config (RTDS) is :class:`sidecar.runtime.RuntimeLayer`'s.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from meshkeeper import xds
from meshkeeper.xds import NodeInfo
from sidecar import metrics
from sidecar.config import (
    DEFAULT_IDLE_TIMEOUT,
    ClusterConfig,
    EndpointConfig,
    FilterChain,
    ListenerConfig,
    RouteConfig,
    SecretConfig,
    TcpRoute,
)
from sidecar.interception import dispatch
from sidecar.interception.dispatch import DispatchHolder, DispatchTable, Target
from sidecar.l4 import TcpProxyConfig, TcpProxyRuntime
from sidecar.metrics import SidecarMetrics
from sidecar.proxy.authz import policy_for
from sidecar.proxy.context import ListenerContext
from sidecar.proxy.listener import DEFAULT_BACKLOG, Listener
from sidecar.proxy.on_demand import OnDemand
from sidecar.proxy.ratelimit import TokenBucket
from sidecar.proxy.router import Router
from sidecar.runtime import RuntimeLayer
from sidecar.stats import StatsStore
from sidecar.tls import TlsIdentity
from sidecar.tls.inspector import InboundTls
from sidecar.upstream.cluster import ClusterManager
from sidecar.xds.convert import XdsError

if TYPE_CHECKING:
    from sidecar.accesslog import AccessLog
    from sidecar.dns import MeshDns
    from sidecar.registration import Registration
    from sidecar.tracing.export import Tracer
    from sidecar.xds.client import XdsClient
    from sidecar.xds.lrs import LoadReporter

log = logging.getLogger("meshkeeper.sidecar")

BOUND_LISTENERS = (xds.OUTBOUND_LISTENER, xds.INBOUND_LISTENER)
# Transparent mode's listeners (DESIGN §10): accepted only from a sidecar with --interception redirect.
TRANSPARENT_LISTENERS = (xds.VIRTUAL_OUTBOUND_LISTENER, xds.DNS_LISTENER)


class BoundTcpListener:
    """A socket bound from an LDS address (explicit mode's tcp service listeners), served through a
    dispatcher whose table holds its tcp_proxy."""

    def __init__(self, name: str, bind: tuple[str, int]) -> None:
        from sidecar.proxy.listener import bind_socket

        self.name, self.bind = name, bind
        self.holder = DispatchHolder(name)
        self.sock = bind_socket(*bind)
        self.server: asyncio.AbstractServer | None = None
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        self.server = await dispatch.serve(self.holder, self.sock, DEFAULT_BACKLOG)

    def close(self) -> None:
        self._task.cancel()
        if self.server is not None:
            self.server.close()
        else:
            self.sock.close()


class Server:
    def __init__(self, node: NodeInfo, *, tracer: Tracer | None = None, access_log: AccessLog | None = None) -> None:
        self.node = node
        # What every component counts is registered here; /stats/prometheus reads the store alone.
        self.stats = StatsStore()
        self.metrics = SidecarMetrics(self.stats)
        self.stats.register(node, lambda: metrics.node_families(node))
        # The workload identity (docs/identity.md): the SDS side sets its keys, apply_secrets its
        # certificate and bundle; listeners and pools read its TLS contexts.
        self.tls = TlsIdentity()
        self.clusters = ClusterManager(identity=self.tls)
        self.stats.register(self.tls, lambda: metrics.identity_families(self.tls))
        self.stats.register(self.clusters, lambda: metrics.cluster_families(self.clusters))
        self.listener_contexts = {name: ListenerContext(name, self.clusters) for name in BOUND_LISTENERS}
        for ctx in self.listener_contexts.values():
            self._register_listener(ctx)
        self.tracer = tracer  # None: tracing off (no --otlp-endpoint)
        if tracer is not None:
            self.stats.register(tracer, lambda: metrics.tracer_families(tracer))
        self.access_log = access_log
        if access_log is not None:
            self.stats.register(access_log, lambda: metrics.access_log_families(access_log))
        for rt in self.listener_contexts.values():
            rt.service, rt.namespace = node.service, node.namespace
            rt.access_log = access_log
            rt.set_tracing(tracer, None)
        self.listeners: list[Listener] = []
        # Every accepted connection goes through a dispatcher (sidecar.interception.dispatch): in
        # explicit mode always to the listener's own filter, in transparent mode by its original
        # destination to a filter chain. Chains have runtimes of their own, kept across updates.
        self.transparent = node.interception == "redirect"
        self.dispatch = {name: DispatchHolder(name) for name in BOUND_LISTENERS}
        self.chain_contexts: dict[str, ListenerContext] = {}
        self.tcp_runtimes: dict[tuple[str, str], TcpProxyRuntime] = {}
        # Explicit mode's listeners of tcp services (tcp|<svc>.<ns>), bound from their LDS address.
        self.tcp_listeners: dict[str, BoundTcpListener] = {}
        self.tcp_listener_errors = 0
        self._dns: MeshDns | None = None  # the mesh DNS (transparent mode), started by sidecar.main
        self.dns_domain = ""
        self.listener_configs: dict[str, ListenerConfig] = {}
        self.route_configs: dict[str, RouteConfig] = {}
        self._ads: XdsClient | None = None
        self.lrs: LoadReporter | None = None
        self._registration: Registration | None = None
        self.draining = False
        self.runtime_layer = RuntimeLayer()

    # ------------------------------------------------------------------ components set by sidecar.main

    @property
    def dns(self) -> MeshDns | None:
        return self._dns

    @dns.setter
    def dns(self, dns: MeshDns | None) -> None:
        self._dns = self._component(self._dns, dns, metrics.dns_families)

    @property
    def ads(self) -> XdsClient | None:
        return self._ads

    @ads.setter
    def ads(self, ads: XdsClient | None) -> None:
        self._ads = self._component(self._ads, ads, metrics.ads_families)

    def enable_on_demand(self, subscribe: Callable[[str], None]) -> None:
        """Hold outbound requests for services not yet known while ``subscribe(cluster)`` asks the
        control plane for them (sidecar.proxy.on_demand; needs Delta xDS)."""
        ctx = self.listener_contexts[xds.OUTBOUND_LISTENER]
        ctx.on_demand = OnDemand(self.node.namespace, subscribe, self._routable, ctx.stats)

    def _routable(self, service: str) -> bool:
        """The outbound listener routes to ``service``, whose cluster and load assignment are in."""
        router = self.listener_contexts[xds.OUTBOUND_LISTENER].router
        if router is None or self._ads is None or router.resolve(service.encode(), b"/") is None:
            return False
        cluster = xds.outbound_cluster(service, self.node.namespace)
        eds = self._ads.state[xds.ENDPOINT]
        return self.clusters.get(cluster) is not None and (cluster not in eds.names or cluster in eds.resources)

    def xds_changed(self) -> None:
        """The ADS client applied a response: held requests whose service arrived are routed."""
        on_demand = self.listener_contexts[xds.OUTBOUND_LISTENER].on_demand
        if on_demand is not None:
            on_demand.config_changed()

    def on_demand_missing(self, cluster: str) -> None:
        on_demand = self.listener_contexts[xds.OUTBOUND_LISTENER].on_demand
        if on_demand is not None:
            on_demand.missing(cluster)

    @property
    def registration(self) -> Registration | None:
        return self._registration

    @registration.setter
    def registration(self, registration: Registration | None) -> None:
        self._registration = self._component(self._registration, registration, metrics.registration_families)

    def _component(self, old: Any, new: Any, families: Any) -> Any:
        """Swap a component, its stats registration with it."""
        if old is not None:
            self.stats.unregister(old)
        if new is not None:
            self.stats.register(new, lambda: families(new))
        return new

    def _register_listener(self, ctx: ListenerContext) -> None:
        self.stats.register(ctx, lambda: metrics.listener_families(ctx))

    # ------------------------------------------------------------------ lifecycle

    async def start_listeners(self, outbound: socket.socket, inbound: socket.socket) -> None:
        self.listeners = []
        for name, sock in ((xds.OUTBOUND_LISTENER, outbound), (xds.INBOUND_LISTENER, inbound)):
            server = await dispatch.serve(self.dispatch[name], sock, DEFAULT_BACKLOG)
            self.listeners.append(Listener(self.listener_contexts[name], server, sock))

    async def drain(self, delay: float, limit: float) -> bool:
        """Drain like Istio's terminationDrainDuration, then Envoy's drain.

        For ``delay`` seconds the listeners keep accepting (callers learn of the deregistration
        only after the registry watch, the snapshot and the EDS push), but every response says
        ``Connection: close`` and idle connections close; then they stop accepting and in-flight
        requests get up to ``limit`` seconds before the rest are reset.
        """
        self.draining = True
        for bound in self.tcp_listeners.values():
            bound.close()
        self.tcp_listeners = {}
        chains = list(self.chain_contexts.values())
        for rt in (*self.listener_contexts.values(), *chains):
            rt.start_draining()
        if delay > 0:
            await asyncio.sleep(delay)
        results = await asyncio.gather(*(lst.drain(limit) for lst in self.listeners),
                                       *(rt.wait_idle(limit) for rt in chains))
        for rt, finished in zip(chains, results[len(self.listeners):], strict=True):
            if not finished:
                rt.abort_all()
        return all(results)

    # ------------------------------------------------------------------ ConfigSink

    def apply_clusters(self, clusters: dict[str, ClusterConfig]) -> None:
        self._lrs_sync()
        self.clusters.update_clusters(clusters)
        on_demand = self.listener_contexts[xds.OUTBOUND_LISTENER].on_demand
        if on_demand is not None:
            on_demand.clusters_changed()

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
        known = (*BOUND_LISTENERS, *TRANSPARENT_LISTENERS) if self.transparent else BOUND_LISTENERS
        unknown = sorted(n for n in set(listeners) - set(known) if listeners[n].bind is None or self.transparent)
        if unknown:
            raise XdsError(f"listener {unknown[0]!r}: this sidecar binds only {', '.join(known)}"
                           + ("" if self.transparent else " (transparent mode's listeners need --interception redirect)"))
        for name in BOUND_LISTENERS:
            cfg = listeners.get(name)
            if cfg is not None and cfg.transparent is not None and cfg.transparent.original_dst and not self.transparent:
                raise XdsError(f"listener {name!r}: original_dst needs --interception redirect")
        routers = self._routers(listeners, self.route_configs)
        buckets = self._rate_limits(listeners)
        plan = self._plan_dispatch(listeners)  # raises before anything changed
        dns_table = self._dns_table(listeners.get(xds.DNS_LISTENER))
        self.listener_configs = dict(listeners)
        self._swap(routers)
        self._swap_dispatch(*plan)
        if dns_table is not None and self.dns is not None:
            self.dns.set_table(dns_table)
        for name, bucket in buckets.items():
            cfg = listeners.get(name)
            self.listener_contexts[name].http_policy = (
                policy_for(cfg.xfcc_sanitize_set, cfg.xfcc_uri, cfg.rbac, self.tls) if cfg is not None else None)
            self.listener_contexts[name].set_tracing(self.tracer, cfg.trace_sample_ratio if cfg is not None else None)
            self.listener_contexts[name].set_limits(
                bucket,
                cfg.request_headers_timeout if cfg is not None else 0.0,
                cfg.idle_timeout if cfg is not None else DEFAULT_IDLE_TIMEOUT)

    def apply_routes(self, routes: dict[str, RouteConfig]) -> None:
        merged = {**self.route_configs, **routes}
        routers = self._routers(self.listener_configs, merged)
        self.route_configs = merged
        self._swap(routers)

    def apply_secrets(self, secrets: Mapping[str, SecretConfig]) -> None:
        """SDS secrets (``default``, ``ROOTCA``): a chain for a key this sidecar does not have, or
        anything malformed, raises XdsError (a NACK) and the last good identity stays."""
        try:
            self.tls.apply_secrets(secrets)
        except ValueError as exc:
            raise XdsError(str(exc)) from None

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
                out[name] = Router(rc, faults=cfg.fault_filter) if rc is not None else self.listener_contexts[name].router
        return out

    def _rate_limits(self, listeners: dict[str, ListenerConfig]) -> dict[str, TokenBucket | None]:
        """The rate limit bucket of every bound listener, kept (with its tokens) if unchanged."""
        out: dict[str, TokenBucket | None] = {}
        for name in BOUND_LISTENERS:
            cfg = listeners.get(name)
            out[name] = self.listener_contexts[name].rate_limit_for(cfg.rate_limit if cfg is not None else None)
        return out

    def _swap(self, routers: dict[str, Router | None]) -> None:
        for name, router in routers.items():
            self.listener_contexts[name].router = router

    # ------------------------------------------------------------------ dispatch (transparent mode)

    def _plan_dispatch(self, listeners: dict[str, ListenerConfig]):
        """The dispatch tables of the bound listeners, with the chain and tcp_proxy runtimes they
        use (new ones built, kept ones reused); raises ValueError before anything is swapped."""
        chain_rts: dict[str, tuple[ListenerContext, Router, ListenerConfig]] = {}
        tcp_rts: dict[tuple[str, str], tuple[TcpProxyRuntime, TcpProxyConfig]] = {}
        tables: dict[str, DispatchTable] = {}

        def http_target(name: str, cfg: ListenerConfig) -> Target:
            if cfg.tls is not None or cfg.rbac is not None or cfg.xfcc_sanitize_set:
                raise XdsError(f"filter chain {name!r}: mTLS, RBAC and XFCC are supported on the bound listeners only")
            # One runtime (stats, router) per route configuration, not per chain: every instance chain
            # of a service carries the same one, and metrics stay bounded by services, not pods.
            key = cfg.route_config.name or name
            planned = chain_rts.get(key)
            if planned is not None:
                if replace(planned[2], name=cfg.name) != cfg:
                    raise XdsError(f"filter chain {name!r}: route configuration {key!r} differs from another chain's")
                return Target(key, http=planned[0])
            rt = self.chain_contexts.get(key) or self._chain_context(key)
            chain_rts[key] = (rt, Router(cfg.route_config), cfg)
            return Target(key, http=rt)

        def tcp_target(name: str, route: TcpRoute, local: bool = False) -> Target:
            choices = []
            for wc in route.clusters:
                key = (route.stat_prefix or name, wc.name)
                cfg = TcpProxyConfig(stat_prefix=key[0], cluster=wc.name, idle_timeout=route.idle_timeout)
                planned = tcp_rts.get(key)
                rt = planned[0] if planned else self.tcp_runtimes.get(key) or TcpProxyRuntime(cfg, self.clusters)
                tcp_rts[key] = (rt, cfg)  # the config is set at the swap, once nothing can refuse the update
                choices.append((rt, wc.weight))
            return Target(name, tcp=tuple(choices), inbound_passthrough=local)

        def chain_target(chain: FilterChain, local: bool = False) -> Target:
            if chain.http is not None:
                if chain.http.route_config is None:
                    raise XdsError(f"filter chain {chain.name!r}: its HTTP connection manager needs an inline route_config")
                return http_target(chain.name, chain.http)
            return tcp_target(chain.name, chain.tcp, local)

        virtual = listeners.get(xds.VIRTUAL_OUTBOUND_LISTENER)
        for name, cfg in listeners.items():  # explicit mode's tcp service listeners
            if cfg.bind is not None:
                tables[name] = DispatchTable(main=tcp_target(name, cfg.tcp))
        for name in BOUND_LISTENERS:
            cfg = listeners.get(name)
            if cfg is None:
                tables[name] = DispatchTable()
                continue
            ctx = self.listener_contexts[name]
            tls = InboundTls(cfg.tls, self.tls, ctx.stats) if cfg.tls is not None else None
            main = replace(tcp_target(name, cfg.tcp), tls=tls) if cfg.tcp is not None else Target(name, http=ctx, tls=tls)
            t = cfg.transparent
            if t is None or not t.original_dst:
                tables[name] = DispatchTable(main=main)
                if t is not None and t.default_chain is not None and t.default_chain.tcp is not None:
                    tcp_target(t.default_chain.name, t.default_chain.tcp)  # its runtime tunnels CONNECT
                continue
            exact: dict[tuple[str, int], Target] = {}
            any_port: dict[str, Target] = {}
            if name == xds.OUTBOUND_LISTENER and virtual is not None:
                for chain in virtual.chains:
                    target = chain_target(chain)
                    if chain.port:
                        exact[(chain.address, chain.port)] = target
                    else:
                        any_port[chain.address] = target
            default = None
            if t.default_chain is not None:
                default = chain_target(t.default_chain, local=name == xds.INBOUND_LISTENER)
            tables[name] = DispatchTable(main=main, explicit_port=t.explicit_port, exact=MappingProxyType(exact),
                                         any_port=MappingProxyType(any_port), default=default,
                                         unmatched=ctx.stats if tls is not None else None)
        return tables, chain_rts, tcp_rts

    def _sync_tcp_listeners(self, tables: dict[str, DispatchTable]) -> None:
        """Bind, update and close explicit mode's tcp service listeners. Not this sidecar's own
        service's (its app holds that port). A port that cannot be bound is logged and counted
        (``listener_bind_errors`` on /listeners) and tried again on the next update."""
        own = xds.tcp_listener(self.node.service, self.node.namespace)
        binds = {n: c.bind for n, c in self.listener_configs.items() if c.bind is not None}
        for name in [n for n, b in self.tcp_listeners.items() if binds.get(n) != b.bind]:
            self.tcp_listeners.pop(name).close()
        for name, table in tables.items():
            if name == own or binds[name][1] == self.node.app_port:
                continue  # this sidecar's app holds that port
            bound = self.tcp_listeners.get(name)
            if bound is None:
                try:
                    bound = BoundTcpListener(name, binds[name])
                except OSError as exc:
                    self.tcp_listener_errors += 1
                    log.warning("listener %s: cannot bind %s:%d (%s); not served", name, *binds[name], exc)
                    continue
                self.tcp_listeners[name] = bound
            bound.holder.table = table

    def _chain_context(self, name: str) -> ListenerContext:
        rt = ListenerContext(name, self.clusters)
        rt.service, rt.namespace = self.node.service, self.node.namespace
        rt.access_log = self.access_log
        if self.draining:
            rt.start_draining()
        return rt

    def _swap_dispatch(self, tables, chain_rts, tcp_rts) -> None:
        for rt, router, cfg in chain_rts.values():
            rt.router = router
            rt.set_tracing(self.tracer, cfg.trace_sample_ratio)
            rt.set_limits(rt.rate_limit_for(cfg.rate_limit), cfg.request_headers_timeout, cfg.idle_timeout)
        old, self.chain_contexts = self.chain_contexts, {name: rt for name, (rt, _, _) in chain_rts.items()}
        for ctx in old.values():  # a chain's stats leave with it
            if ctx not in self.chain_contexts.values():
                self.stats.unregister(ctx)
        for ctx in self.chain_contexts.values():
            if ctx not in self.stats:
                self._register_listener(ctx)
        for key, rt in self.tcp_runtimes.items():
            if key not in tcp_rts:
                rt.close()
        for rt, cfg in tcp_rts.values():
            if rt.config != cfg:
                rt.set_config(cfg)
        self.tcp_runtimes = {key: rt for key, (rt, _) in tcp_rts.items()}
        for name, table in tables.items():
            if name in self.dispatch:
                self.dispatch[name].table = table
        self._sync_tcp_listeners({n: t for n, t in tables.items() if n not in self.dispatch})
        for name in BOUND_LISTENERS:
            cfg = self.listener_configs.get(name)
            default = cfg.transparent.default_chain if cfg is not None and cfg.transparent is not None else None
            if name != xds.OUTBOUND_LISTENER or default is None or default.tcp is None:
                default = None  # the inbound default chain is the pod's other ports, no policy for proxy requests
            lrt = self.listener_contexts[name]
            lrt.default_cluster = default.tcp.clusters[0].name if default is not None else None
            # The default chain's tcp_proxy (kept in tcp_runtimes above) tunnels the HCM's CONNECTs.
            lrt.default_tcp = (self.tcp_runtimes.get((default.tcp.stat_prefix or default.name, lrt.default_cluster))
                               if default is not None else None)

    def _dns_table(self, cfg: ListenerConfig | None):
        """The mesh DNS's table from the ``dns`` listener: its names, and the qualified ones
        (``<svc>.<ns>``) also under ``--dns-domain``. None: no table (no listener, or no DNS)."""
        if cfg is None or cfg.dns is None or self.dns is None:
            return None
        from sidecar.dns import DnsTable

        names = dict(cfg.dns.names)
        if self.dns_domain:
            for name, addresses in cfg.dns.names.items():
                if "." in name:
                    names.setdefault(f"{name}.{self.dns_domain}", addresses)
        try:
            return DnsTable(names)
        except ValueError as exc:
            raise XdsError(f"listener {xds.DNS_LISTENER!r}: {exc}") from None

    # ------------------------------------------------------------------ views

    def clusters_view(self) -> list[dict[str, Any]]:
        return self.clusters.admin_view()

    def listeners_view(self) -> list[dict[str, Any]]:
        out = [rt.admin_view() for rt in (*self.listener_contexts.values(), *self.chain_contexts.values())]
        for holder in self.dispatch.values():
            out.append({"name": f"{holder.name} (original destination)", "draining": self.draining,
                        "stats": holder.stats.snapshot()})
        for name, bound in sorted(self.tcp_listeners.items()):
            out.append({"name": name, "address": f"{bound.bind[0]}:{bound.bind[1]}", "draining": self.draining,
                        "stats": bound.holder.stats.snapshot()})
        if self.tcp_listener_errors:
            out.append({"name": "tcp service listeners", "draining": self.draining,
                        "stats": {"listener_bind_errors": self.tcp_listener_errors}})
        for (prefix, cluster), rt in sorted(self.tcp_runtimes.items()):
            out.append({"name": f"tcp_proxy {prefix} -> {cluster}", "draining": self.draining,
                        "stats": rt.stats.snapshot()})
        return out
