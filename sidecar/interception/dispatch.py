"""Transparent mode's accept path: the filter chain of a connection, by its original destination.

A listener in transparent mode (``--interception redirect``) serves its socket with
:class:`Dispatcher`: on accept it reads the connection's original destination (SO_ORIGINAL_DST,
Envoy's ``original_dst`` listener filter), picks a :class:`Target` from the current
:class:`DispatchTable` and hands the transport to that target's protocol (``set_protocol``), so
the connection costs one lookup and nothing per byte afterwards:

* not redirected (the app dialled the sidecar's port itself, explicit mode) or redirected to the
  listener's ``explicit_port`` (the inbound listener's app port): the listener's own filter
  (``main``: its HTTP connection manager, or tcp_proxy);
* else the first of: a chain for that address and port (a registered instance), a chain for that
  address on any port (a service VIP), the listener's default chain (``PassthroughCluster``,
  ``BlackHoleCluster``, or for the inbound listener ``InboundPassthroughCluster``);
* nothing at all (no config yet): the connection is closed and counted.

An HTTP target is an :class:`~sidecar.proxy.connection_manager.ConnectionManager` on the chain's listener
runtime, told the original destination (ORIGINAL_DST clusters send there). A TCP target is a
:class:`~sidecar.l4.proxy.TcpProxy`: for an ORIGINAL_DST cluster it connects to the original
destination (for the inbound listener's default chain, from source 127.0.0.6, which the capture
rules never capture, so the proxy's own connection is not redirected again and services the app
bound to loopback only stay unreachable from outside), else it balances over the cluster.
Weighted clusters of a tcp_proxy are chosen per connection by weight.

The table is built by :mod:`sidecar.server` on every LDS update and swapped whole.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sidecar.interception.original_dst import original_dst
from sidecar.l4 import TcpProxy, TcpProxyRuntime
from sidecar.proxy.connection_manager import ConnectionManager
from sidecar.proxy.context import ListenerContext
from sidecar.tls.inspector import InboundTls, TlsInspector

# The inbound passthrough's source address, as Istio's (the capture rules never capture traffic
# from it on lo): a pod's other ports are dialled on the pod IP from here, so a service the app bound
# to loopback only stays unreachable from outside, as it was without the mesh.
INBOUND_PASSTHROUGH_SOURCE = "127.0.0.6"

_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Target:
    """Where a connection goes: an HCM on ``http``, or a tcp_proxy over ``tcp`` (runtime, weight)."""

    name: str
    http: ListenerContext | None = None
    tcp: tuple[tuple[TcpProxyRuntime, int], ...] = ()
    inbound_passthrough: bool = False
    # The inbound listener's mTLS chains (sidecar.tls.inspector): the connection's first bytes
    # choose TLS termination or (PERMISSIVE) plaintext; None: the HCM or tcp_proxy takes the
    # connection at once.
    tls: InboundTls | None = None

    def protocol(self, dst: tuple[str, int] | None, rand: Callable[[], float]) -> asyncio.Protocol:
        if self.tls is not None:
            return TlsInspector(self.tls, lambda peer_id, cert_hash: self._protocol(dst, rand, peer_id, cert_hash))
        return self._protocol(dst, rand)

    def _protocol(self, dst: tuple[str, int] | None, rand: Callable[[], float], peer_id: str = "",
                  peer_cert_hash: str = "") -> asyncio.Protocol:
        if self.http is not None:
            hcm = ConnectionManager(self.http)
            hcm.original_dst = dst
            hcm.peer_id = peer_id
            hcm.peer_cert_hash = peer_cert_hash
            return hcm
        runtime = self._choose(rand)
        # Whether the cluster sends to the original destination is read per connection (the
        # cluster may have arrived, or changed, after this table was built).
        cluster = runtime.clusters.get(runtime.config.cluster)
        if dst is None or cluster is None or not cluster.original_dst:
            return TcpProxy(runtime)
        if not self.inbound_passthrough:
            return TcpProxy(runtime, original_dst=dst)
        if ":" in dst[0]:  # IPv6 has no second loopback address to dial from: the app's ::1, as before
            return TcpProxy(runtime, original_dst=("::1", dst[1]))
        return TcpProxy(runtime, original_dst=dst, source=INBOUND_PASSTHROUGH_SOURCE)

    def _choose(self, rand: Callable[[], float]) -> TcpProxyRuntime:
        choices = self.tcp
        if len(choices) == 1:
            return choices[0][0]
        point = rand() * sum(w for _, w in choices)
        for runtime, weight in choices:
            point -= weight
            if point < 0:
                return runtime
        return choices[-1][0]


@dataclass(frozen=True, slots=True)
class DispatchTable:
    main: Target | None = None
    explicit_port: int = 0
    exact: Mapping[tuple[str, int], Target] = field(default_factory=lambda: _EMPTY)
    any_port: Mapping[str, Target] = field(default_factory=lambda: _EMPTY)
    default: Target | None = None
    # The listener's stats when it has mTLS chains: a connection no chain takes (transparent
    # STRICT has no default chain) also counts as its ``no_filter_chain_match``, as in Envoy.
    unmatched: Any = None

    def target(self, dst: tuple[str, int] | None, local: tuple[str, int]) -> tuple[Target | None, bool]:
        """(the target, whether the connection was redirected)."""
        if dst is None or dst == local or dst[1] == self.explicit_port:
            return self.main, False
        got = self.exact.get(dst)
        if got is None:
            got = self.any_port.get(dst[0], self.default)
        return got, True


class DispatchStats:
    __slots__ = ("redirected", "not_redirected", "no_chain")

    def __init__(self) -> None:
        self.redirected = 0
        self.not_redirected = 0
        self.no_chain = 0  # no table yet, or no chain and no default: closed

    def snapshot(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class DispatchHolder:
    """The current table of one listener (swapped whole by the xDS layer) and its counters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.table = DispatchTable()
        self.stats = DispatchStats()
        self.random: Callable[[], float] = random.random


class Dispatcher(asyncio.Protocol):
    """Installed per accepted connection; replaces itself with the target's protocol at once."""

    __slots__ = ("_holder",)

    def __init__(self, holder: DispatchHolder) -> None:
        self._holder = holder

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        holder = self._holder
        sock = transport.get_extra_info("socket")
        try:
            dst = original_dst(sock) if sock is not None else None
            local = sock.getsockname()[:2] if sock is not None else ("", 0)
        except OSError:  # the peer is already gone
            transport.abort()
            return
        table = holder.table
        target, redirected = table.target(dst, local)
        if target is None:
            holder.stats.no_chain += 1
            if table.unmatched is not None:
                table.unmatched.no_filter_chain_match += 1
            transport.abort()
            return
        if redirected:
            holder.stats.redirected += 1
        else:
            holder.stats.not_redirected += 1
        proto = target.protocol(dst if redirected else None, holder.random)
        transport.set_protocol(proto)
        proto.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # never: the target's protocol took over
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass


async def serve(holder: DispatchHolder, sock, backlog: int) -> asyncio.AbstractServer:
    """Serve a bound socket with :class:`Dispatcher` (it listens from now on)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    return await loop.create_server(lambda: Dispatcher(holder), sock=sock, backlog=backlog)
