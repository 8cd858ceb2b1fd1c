"""The outbound policy for proxy requests: what explicit mode does with hosts outside the mesh.

An app with ``HTTP_PROXY``/``HTTPS_PROXY`` pointing at the outbound listener sends every call
there, mesh or not: absolute-form requests (``GET http://example.com/x HTTP/1.1``) for plain
HTTP, and ``CONNECT example.com:443`` for a tunnel (how such clients reach https sites). The
listener's default filter chain says what happens to those whose authority matches no virtual
host (``ListenerContext.default_cluster``, Istio's ``outboundTrafficPolicy``):

- ``PassthroughCluster`` (an ORIGINAL_DST cluster; ``--outbound-policy allow_any``):
  an absolute-form request goes through the router to ``host:port`` (port 80 by default) on a
  route named ``allow_any`` (Istio's virtual host) with Envoy's route defaults: 15 s timeout, no
  retries, no faults; the host name is resolved when the pool connects (a name that does not
  resolve is a connect failure: 503 UF). The cluster's circuit breakers and stats apply as for
  any request. A ``CONNECT`` is tunnelled by the listener's tcp_proxy runtime for that cluster
  (``ListenerContext.default_tcp``): ``200 Connection established`` once the upstream is
  connected, a 503 local reply (UF, UO, UH, NC) if it cannot be; then the connection is the L4
  proxy's (with the bytes that followed the CONNECT head), under its idle timeout.
- any other cluster (``BlackHoleCluster``, ``registry_only``): refused with 502 UH naming the
  host and the policy (see :mod:`sidecar.proxy.errors`), route ``block_all``, counted as
  ``upstream_cx_none_healthy`` of that cluster (what the L4 path counts for it).
- none: 404 NR, as before.

Requests whose authority does match a virtual host are the mesh's, never passed through: a route
miss there is 404 NR, and so is a CONNECT to a mesh name (tunnelling it would skip the route's
retries, timeouts, faults and per-request telemetry; send plain HTTP to a mesh service). Origin-form
requests (``GET /x`` with ``Host: catalog``) with an unknown Host stay 404 NR: a typo in a service
name must remain a clear error, not a DNS lookup.

Only called after a failed route lookup (or for CONNECT), so mesh requests pay nothing for it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.config import DEFAULT_ROUTE_TIMEOUT, Route
from sidecar.l4 import TcpProxy, TcpProxyRuntime
from sidecar.proxy import errors
from sidecar.proxy.router import RouteEntry, Router
from sidecar.upstream.cluster import ClusterManager

if TYPE_CHECKING:
    from sidecar.proxy.stream import Stream
    from sidecar.upstream.cluster import Cluster


class PolicyListener(Protocol):
    """What the policy reads of a listener (``sidecar.proxy.context.ListenerContext``)."""

    router: Router | None
    clusters: ClusterManager
    stats: Any  # ListenerStats: no_route, no_cluster
    default_cluster: str | None
    default_tcp: TcpProxyRuntime | None


class Connection(Protocol):
    """What a CONNECT needs of its connection manager (``sidecar.proxy.connection_manager``)."""

    def hand_over(self, protocol: asyncio.Protocol) -> asyncio.Transport | None: ...

    def handed_over_done(self, ex: Stream) -> None: ...


ALLOW_ANY = "allow_any"  # the route of passed-through requests (Istio's virtual host name)
BLOCK_ALL = "block_all"  # the route of refused ones
HTTP_PORT = 80
CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
# The tunnel's connect outcomes (TcpProxy's on_upstream flags) as local replies.
_CONNECT_FAILURES = {
    "UF": errors.CONNECT_FAILURE,
    "UO": errors.OVERFLOW,
    "UH": errors.NO_HEALTHY_UPSTREAM,
    "NC": errors.NO_CLUSTER,
}

_entries: dict[tuple[str, str], RouteEntry] = {}  # bounded: two route names by the config's default clusters


def route_entry(name: str, cluster: str) -> RouteEntry:
    """The route of proxy requests outside the mesh: Envoy's defaults (15 s, no retries)."""
    entry = _entries.get((name, cluster))
    if entry is None:
        entry = _entries[(name, cluster)] = RouteEntry(Route("/", cluster, timeout=DEFAULT_ROUTE_TIMEOUT),
                                                       faults=False, vhost_name=name)
    return entry


def outside_mesh(rt: PolicyListener, ex: Stream, authority: bytes) -> RouteEntry | errors.LocalReply:
    """An absolute-form request no route matched (``rt.default_cluster`` is set): the route to
    forward it on (``ex.original_dst`` set to its host and port), or the local reply to answer."""
    router = rt.router
    if router is None or router.virtual_host(authority) is not None:
        rt.stats.no_route += 1  # a mesh host (or no routes yet): the mesh's own 404
        return errors.NO_ROUTE
    target = split_authority(authority, HTTP_PORT)
    if target is None:
        return errors.BAD_REQUEST
    cluster = rt.clusters.get(rt.default_cluster)
    if cluster is None:
        rt.stats.no_cluster += 1
        return errors.NO_CLUSTER
    if not cluster.original_dst:
        return _refuse(ex, cluster, authority)
    ex.original_dst = target
    return route_entry(ALLOW_ANY, cluster.name)


def connect(hcm: Connection, rt: PolicyListener, ex: Stream) -> errors.LocalReply | None:
    """A ``CONNECT`` (``rt.default_cluster`` is set): hand the connection to a tunnel and return
    None, or return the local reply to answer (the connection closes after it)."""
    authority = ex.path
    target = split_authority(authority, None)
    if target is None:
        return errors.BAD_CONNECT
    ex.authority = authority
    router = rt.router
    if router is not None and router.virtual_host(authority) is not None:
        rt.stats.no_route += 1
        return errors.CONNECT_TO_MESH
    cluster = rt.clusters.get(rt.default_cluster)
    if cluster is None or (cluster.original_dst and rt.default_tcp is None):
        rt.stats.no_cluster += 1
        return errors.NO_CLUSTER
    if not cluster.original_dst:
        return _refuse(ex, cluster, authority)
    tunnel = Tunnel(hcm, ex, cluster)
    proxy = TcpProxy(rt.default_tcp, original_dst=target, on_upstream=tunnel.on_upstream)
    transport = hcm.hand_over(proxy)
    if transport is None:  # parsed behind another request: what followed it was read as HTTP
        return errors.BAD_CONNECT
    tunnel.transport = transport
    transport.set_protocol(proxy)
    proxy.connection_made(transport)
    return None


class Tunnel:
    """A CONNECT exchange after the hand-over: answers the client when the tunnel's upstream
    connect ends, then lets the connection manager account for the exchange.

    The exchange gets its route only then: the connection manager, which still parses the end of
    the CONNECT message, would otherwise start the route timeout of a request it no longer has."""

    __slots__ = ("hcm", "ex", "cluster", "transport")

    def __init__(self, hcm: Connection, ex: Stream, cluster: Cluster) -> None:
        self.hcm = hcm
        self.ex = ex
        self.cluster = cluster
        self.transport: asyncio.Transport | None = None

    def on_upstream(self, flag: str) -> None:
        """TcpProxy's outcome hook: ``""`` connected, else the failure's flag (see sidecar.l4.proxy)."""
        ex = self.ex
        ex.entry = route_entry(ALLOW_ANY, self.cluster.name)
        ex.cluster = self.cluster
        transport = self.transport
        if not flag:
            ex.status = 200
            if transport is not None:
                transport.write(CONNECT_ESTABLISHED)
        else:
            reply = _CONNECT_FAILURES.get(flag)
            if reply is not None:
                ex.status = reply.status
                if transport is not None:
                    transport.write(reply.close_bytes)  # the tunnel closes the connection next
            ex.flags = flag
        self.hcm.handed_over_done(ex)


def _refuse(ex: Stream, cluster: Cluster, authority: bytes) -> errors.LocalReply:
    cluster.stats.upstream_cx_none_healthy += 1
    ex.entry = route_entry(BLOCK_ALL, cluster.name)
    ex.cluster = cluster
    return errors.outside_mesh_refused(authority.decode("ascii", "replace"), cluster.name)


def split_authority(authority: bytes, default_port: int | None) -> tuple[str, int] | None:
    """``host[:port]`` (``[v6]:port`` too) -> (host, port); None if malformed, or if the port is
    missing and ``default_port`` is None (CONNECT's authority-form needs one)."""
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end < 0:
            return None
        host, rest = authority[1:end], authority[end + 1:]
        if rest and not rest.startswith(b":"):
            return None
        port = rest[1:] if rest else b""
    else:
        host, sep, port = authority.rpartition(b":")
        if not sep:
            host, port = authority, b""
        elif b":" in host:
            return None  # an IPv6 literal needs brackets
    if not port:
        if default_port is None:
            return None
        number = default_port
    elif port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536:
        number = int(port)
    else:
        return None
    if not host or not host.isascii() or any(c in host for c in b" /\\@"):
        return None
    return host.decode("ascii"), number
