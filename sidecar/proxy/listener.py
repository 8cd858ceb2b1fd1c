"""Listeners: what the sidecar's main and xDS layer hold to run, reconfigure and drain one.

A :class:`ListenerRuntime` is the state shared by every connection of a listener: the current
:class:`Router` (swapped whole by the xDS layer; each request reads it once), the
:class:`ClusterManager`, the listener's stats and its drain state. :func:`start_listener` serves a
socket the sidecar bound itself (port 0 allowed) and returns a :class:`Listener` that can drain::

    runtime = ListenerRuntime("outbound", clusters)
    runtime.set_route_config(route_config)          # on every RDS update (raises ValueError -> NACK)
    # or: router = Router(route_config) while validating, then runtime.set_router(router)
    listener = await start_listener(runtime, sock)
    ...
    await listener.drain(drain_time=5.0)                # on SIGTERM: stop accepting, let requests finish
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from sidecar.config import RouteConfig
from sidecar.proxy.http import HttpConnectionManager
from sidecar.proxy.router import Router
from sidecar.upstream.cluster import ClusterManager
from sidecar.upstream.stats import Counters

DEFAULT_DRAIN_TIME = 5.0
DEFAULT_BACKLOG = 1024

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
)


class ListenerStats(Counters):
    __slots__ = LISTENER_STATS
    FIELDS = LISTENER_STATS


class ListenerRuntime:
    """Shared state of one listener's connections. Create it inside the event loop's thread."""

    def __init__(self, name: str, clusters: ClusterManager, router: Router | None = None) -> None:
        self.name = name
        self.clusters = clusters
        # Read by every request; replaced whole (an attribute store is atomic for the loop).
        self.router: Router | None = router
        self.stats = ListenerStats()
        self.draining = False
        self.connections: set[HttpConnectionManager] = set()
        self._idle: asyncio.Event | None = None

    def set_route_config(self, config: RouteConfig) -> Router:
        """Compile ``config`` and make it current; raises ValueError (a NACK) if it cannot be honoured."""
        router = Router(config)
        self.router = router
        return router

    def set_router(self, router: Router | None) -> None:
        """Swap in a Router compiled earlier (validate every resource first, then swap all)."""
        self.router = router

    # --- called by connections -----------------------------------------------------------

    def connection_opened(self, conn: HttpConnectionManager) -> None:
        self.connections.add(conn)
        self.stats.downstream_cx_total += 1
        self.stats.downstream_cx_active += 1
        # A connection accepted while the listener drains is served: its response says
        # ``Connection: close`` (callers that have not yet learnt that this endpoint is leaving
        # still get their answer), so it closes after one exchange.

    def connection_closed(self, conn: HttpConnectionManager) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
            self.stats.downstream_cx_active -= 1
        if not self.connections and self._idle is not None:
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


class Listener:
    """A serving listener: its asyncio server, bound address and runtime."""

    def __init__(self, runtime: ListenerRuntime, server: asyncio.AbstractServer, sock: socket.socket) -> None:
        self.runtime = runtime
        self.server = server
        self.address: tuple[str, int] = sock.getsockname()[:2]

    @property
    def port(self) -> int:
        return self.address[1]

    async def drain(self, drain_time: float = DEFAULT_DRAIN_TIME) -> bool:
        """Stop accepting, let in-flight requests finish (at most ``drain_time`` s, as Envoy's
        ``--drain-time-s``), then reset what is left.

        Returns True if every connection finished on its own.
        """
        self.server.close()
        self.runtime.start_draining()
        finished = await self.runtime.wait_idle(drain_time)
        if not finished:
            self.runtime.abort_all()
        return finished

    async def close(self) -> None:
        """Stop at once: stop accepting and reset every connection."""
        self.server.close()
        self.runtime.abort_all()
        await asyncio.sleep(0)  # let the transports deliver connection_lost


async def start_listener(runtime: ListenerRuntime, sock: socket.socket, *, backlog: int = DEFAULT_BACKLOG) -> Listener:
    """Serve HTTP/1.1 on a socket the caller bound (and may have made SO_REUSEPORT)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    server = await loop.create_server(lambda: HttpConnectionManager(runtime), sock=sock, backlog=backlog)
    return Listener(runtime, server, sock)


def bind_socket(host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False,
                exclusive: bool = False) -> socket.socket:
    """A bound, not yet listening TCP socket for :func:`start_listener` (which listens).

    ``exclusive`` first claims the port without SO_REUSEPORT, so that a port another process
    already shares (another sidecar started with --workers) is refused instead of being joined,
    which would mix two services' traffic.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if exclusive and port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock
