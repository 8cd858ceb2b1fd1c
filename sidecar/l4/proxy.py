"""The L4 data path: one downstream TCP connection proxied to one upstream connection, byte for byte.

Envoy's ``envoy.filters.network.tcp_proxy``. :class:`TcpProxy` is the downstream protocol; it is
given an accepted transport either by ``loop.create_server(lambda: TcpProxy(runtime), sock=...)``
or by a dispatching protocol that looked at the connection first (the original destination of a
redirected connection, Envoy's ``original_dst`` listener filter)::

    proxy = TcpProxy(runtime, original_dst=("10.0.0.7", 5432))   # or TcpProxy(runtime) for the cluster
    transport.set_protocol(proxy)
    proxy.connection_made(transport)
    if already_read:
        proxy.data_received(already_read)

Choosing the upstream:
- Without ``original_dst``: the filter's cluster picks an endpoint with ``Cluster.pick`` (the same
  balancer, ejections and panic as HTTP). No endpoint (``BlackHoleCluster`` is a cluster without
  endpoints): the downstream is closed at once, ``upstream_cx_none_healthy``. A connect failure or
  timeout is reported to outlier detection as a local-origin ``connect_failure``, a connect as a
  success (Envoy's ``LocalOriginConnectSuccessFinal``, which without the split counts as a 200);
  with ``max_connect_attempts`` > 1 the next attempt avoids the endpoints already tried.
- With ``original_dst``: that address (Envoy's ORIGINAL_DST cluster, as ``PassthroughCluster``
  uses it), with the filter's cluster's connect timeout, breakers and stats; one attempt. A
  cluster with a TLS ``transport_socket`` (``passthrough-mtls|<svc>.<ns>``) originates mTLS to it.

Every connect goes through a :class:`~sidecar.upstream.pool.ConnectionPool` (the endpoint's, or a
throwaway one for an original destination), so connect timeout, ``upstream_cx_total``,
``upstream_cx_active``, ``upstream_cx_opening`` and connect failures are counted where HTTP's are.
``max_connections`` counts active plus opening connections of the cluster; one more is refused at
once (``upstream_cx_overflow``), nothing queues (:func:`sidecar.upstream.breaker.cluster_connection_allowed`).

Bytes: as Envoy, nothing is read from downstream until the upstream is connected (bytes a
dispatcher already read are kept and written first). Flow control both ways: each transport's
write buffer is limited to ``buffer_limit`` (high water; low water half of it); over it the other
side's reading pauses until it drains, so a slow reader holds at most about ``buffer_limit`` plus
one read (uvloop reads up to 256 KiB) per direction in this process. Half-close: an EOF from one
side becomes ``write_eof`` on the other (after its buffer drains) and the other direction keeps
flowing; when both directions have ended both transports close, flushing. A connection lost with
an error (a reset) aborts the other side; lost cleanly, the other side is closed after a flush.

Load reports (LRS, ``sidecar.xds.lrs``) read per-endpoint counters. For a TCP cluster a *request*
is a connection attempt, as Envoy's TCP pool counts them: ``total_requests`` per attempt,
``active_requests`` from the attempt until the connection ends (least_request balances on it),
``rq_error`` for an attempt that failed to connect or a connection the upstream reset,
``rq_success`` for a connection that ended otherwise, and ``rq_latency_total`` the connect time
(pick to connected, or to the failure), added when the attempt is counted as success or error.

Zero copy: not adopted. ``os.splice`` (socket -> pipe -> socket, 1 MiB pipe, readiness from
uvloop's add_reader/add_writer: ``bench/l4_proxy.py --splice``) moved a 100 MB download at
1003 MB/s against 1365 MB/s for this transport path (median of 3, proxy alone on one core,
``bench/l4.py``; a noisier second run: 418 against 809). A Python call per splice, two per chunk,
and a pipe of 1 MiB against uvloop's 256 KiB reads straight into its buffer win nothing, and it
would bypass the transports that flow control, half-close and abort are built on.

Outcome hook (``on_upstream``, for a protocol that hands its transport over and must answer the
client first, as the HTTP connection manager does for ``CONNECT``): called once with ``""`` when
the upstream is connected (before any byte is relayed either way), or with the Envoy flag of the
failure before the downstream is closed: ``UO`` (max_connections), ``UH`` (no endpoint), ``NC``
(no such cluster), ``UF`` (connect failure or timeout), ``DC`` (the downstream left first). What
it writes to the downstream transport is flushed by the close that follows.

Callbacks never raise, never log on success; a failure logs once per cause and is counted.
Transports keep ``TCP_NODELAY``, which uvloop and asyncio set on every TCP transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sidecar.l4.runtime import TcpProxyRuntime, TcpProxyStats, log_once
from sidecar.upstream import breaker
from sidecar.upstream.cluster import Cluster
from sidecar.upstream.host import Endpoint, LocalOriginFailure
from sidecar.upstream.pool import ConnectFailure, ConnectionPool
from sidecar.upstream.stats import ClusterStats

CONNECT_SUCCESS_STATUS = 200  # what a connect is worth to outlier detection (Envoy, without the split)


class TcpUpstream(asyncio.Protocol):
    """The upstream connection of a :class:`TcpProxy`: forwards what it reads to the downstream."""

    __slots__ = ("proxy", "pool", "cstats", "transport")

    def __init__(self, proxy: TcpProxy, pool: ConnectionPool) -> None:
        self.proxy = proxy
        self.pool = pool
        self.cstats = pool.stats
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # a TCP transport
        self.pool.opened(self)  # counted as the HTTP pool's connections are
        self.proxy._upstream_connected(self, transport)

    def data_received(self, data: bytes) -> None:
        proxy = self.proxy
        proxy._activity += 1
        down = proxy._down
        if down is not None:
            down.write(data)
        n = len(data)
        self.cstats.upstream_cx_rx_bytes_total += n
        proxy._stats.downstream_cx_tx_bytes_total += n

    def eof_received(self) -> bool:
        self.proxy._upstream_eof()
        return True  # keep writing to it: the other direction may still be flowing

    def pause_writing(self) -> None:
        self.proxy._pause_downstream()

    def resume_writing(self) -> None:
        self.proxy._resume_downstream()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.lost(self)
        self.proxy._upstream_lost(self, exc)


class TcpProxy(asyncio.Protocol):
    """One downstream connection and its upstream: Envoy's tcp_proxy filter instance."""

    __slots__ = (
        # per filter
        "_rt", "_stats", "_loop",
        # upstream choice
        "_original_dst", "_source", "_cluster", "_cstats", "_endpoint", "_tried", "_attempts", "_pool", "_connecting",
        "_t0", "_connect_time",
        # the pair
        "_down", "_up", "_upstream", "_early", "_down_eof", "_up_eof", "_down_write_paused",
        "_flow_paused", "_closed", "_open", "_up_reset",
        # idle sweep
        "_activity", "_swept", "_swept_at",
        "_on_upstream",
    )

    def __init__(self, runtime: TcpProxyRuntime, original_dst: tuple[str, int] | None = None,
                 on_upstream: Callable[[str], None] | None = None, source: str | None = None) -> None:
        self._rt = runtime
        self._stats: TcpProxyStats = runtime.stats
        self._loop: asyncio.AbstractEventLoop | None = None
        self._original_dst = original_dst
        self._source = source  # the local address to connect to original_dst from (None: any)
        self._cluster: Cluster | None = None
        self._cstats: ClusterStats | None = None
        self._endpoint: Endpoint | None = None  # the endpoint of the attempt or connection counted on it
        self._tried: list[Endpoint] = []
        self._attempts = 0
        self._pool: ConnectionPool | None = None  # of the current attempt
        self._connecting: asyncio.Task[None] | None = None
        self._t0 = 0.0
        self._connect_time = 0.0
        self._down: asyncio.Transport | None = None
        self._up: asyncio.Transport | None = None
        self._upstream: TcpUpstream | None = None
        self._early: list[bytes] = []  # read before the upstream was connected (a dispatcher's bytes)
        self._down_eof = False
        self._up_eof = False
        self._down_write_paused = False  # downstream's write buffer is full: upstream reading paused
        self._flow_paused = False  # upstream's write buffer is full: downstream reading paused
        self._closed = False
        self._open = 0  # transports not yet lost; the runtime forgets us at 0
        self._up_reset = False
        self._activity = 0  # reads and drains, for the idle sweep
        self._swept = -1
        self._swept_at = 0.0
        self._on_upstream = on_upstream  # the outcome hook (see the module doc); None once called

    # --- asyncio.Protocol (downstream) ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._down = transport  # a TCP transport
        self._open = 1
        self._loop = asyncio.get_running_loop()
        rt = self._rt
        rt.connection_opened(self)
        limit = rt.config.buffer_limit
        try:
            transport.set_write_buffer_limits(high=limit, low=limit // 2)
            transport.pause_reading()  # until the upstream is connected
        except Exception as exc:  # not a stream transport: nothing to proxy
            log_once("l4-transport", "tcp_proxy: unusable downstream transport: %r", exc)
            self._close(abort=True)
            return
        cluster = rt.clusters.get(rt.config.cluster)
        if cluster is None:
            self._stats.downstream_cx_no_route += 1
            self._report("NC")
            self._close(abort=False)
            return
        self._cluster = cluster
        self._cstats = cluster.stats
        self._connect_next()

    def data_received(self, data: bytes) -> None:
        self._activity += 1
        up = self._up
        if up is None:
            if not self._closed:
                self._early.append(data)
                # uvloop starts reading an accepted connection even when connection_made paused it:
                # pause here, so that what waits for the upstream is one read, not all a client sends.
                down = self._down
                if down is not None:
                    try:
                        down.pause_reading()
                    except Exception:  # closing already
                        pass
            return
        up.write(data)
        n = len(data)
        self._cstats.upstream_cx_tx_bytes_total += n
        self._stats.downstream_cx_rx_bytes_total += n

    def eof_received(self) -> bool:
        self._down_eof = True
        if self._up is not None:
            self._forward_eof(self._up)
            if self._up_eof:
                self._close(abort=False)
        return True

    def pause_writing(self) -> None:
        self._down_write_paused = True
        up = self._up
        if up is not None and not self._up_eof:
            up.pause_reading()

    def resume_writing(self) -> None:
        self._down_write_paused = False
        self._activity += 1
        up = self._up
        if up is not None and not self._up_eof and not self._closed:
            up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._down = None
        if not self._closed:
            self._close(abort=exc is not None)
        task = self._connecting
        if task is not None:
            self._connecting = None
            task.cancel()
        self._transport_gone()

    # --- the upstream side ------------------------------------------------------------------------

    def _connect_next(self) -> None:
        """Pick an upstream and start connecting, or close the downstream if none may be had."""
        cluster = self._cluster
        stats = cluster.stats
        if not breaker.cluster_connection_allowed(cluster):
            stats.upstream_cx_overflow += 1
            self._report("UO")
            self._close(abort=False)
            return
        dst = self._original_dst
        if dst is not None:
            connector = self._rt.connector
            if self._source is not None:
                connector = _from_source(connector or self._loop.create_connection, self._source)
            pool = ConnectionPool(dst[0], dst[1], connect_timeout=cluster.config.connect_timeout,
                                  stats=stats, connector=connector, tls=cluster.upstream_tls())
        else:
            tried = self._tried
            endpoint = cluster.pick(tried) if tried else cluster.pick()
            if endpoint is None:
                stats.upstream_cx_none_healthy += 1
                self._report("UH")
                self._close(abort=False)
                return
            endpoint.total_requests += 1
            endpoint.active_requests += 1
            self._endpoint = endpoint
            pool = endpoint.pool
        self._attempts += 1
        self._pool = pool
        self._t0 = self._loop.time()
        pool.opening_started()
        self._connecting = task = self._loop.create_task(self._connect(pool))
        task.add_done_callback(pool.opening_done)

    async def _connect(self, pool: ConnectionPool) -> None:
        try:
            await pool.connect_with(lambda: TcpUpstream(self, pool))
        except ConnectFailure as exc:
            self._connect_failed(pool, exc)
        except Exception as exc:  # a bug: close rather than leave the downstream hanging
            log_once("l4-connect-bug", "tcp_proxy: unexpected error connecting upstream", exc_info=exc)
            if self._pool is pool and self._upstream is None:
                self._release(error=True)
                self._report("UF")
                self._close(abort=True)
        finally:
            if self._pool is pool:
                self._connecting = None

    def _connect_failed(self, pool: ConnectionPool, exc: ConnectFailure) -> None:
        if self._pool is not pool or self._upstream is not None:
            # Connected already (the timeout fired as the connection was made): its loss closes us.
            return
        endpoint = self._endpoint
        if endpoint is not None:
            detector = self._cluster.outlier
            if detector is not None:
                detector.report_local(endpoint, LocalOriginFailure.CONNECT_FAILURE)
            self._tried.append(endpoint)
            log_once(f"l4-uf:{endpoint.key}", "tcp_proxy: upstream connect failure: %s", exc)
        else:
            log_once(f"l4-uf:{self._cluster.name}", "tcp_proxy: connect failure (%s): %s",
                     self._cluster.name, exc)
        self._connect_time = self._loop.time() - self._t0
        self._release(error=True)
        if self._closed:
            return
        if self._original_dst is None and self._attempts < self._rt.config.max_connect_attempts:
            self._connect_next()
            return
        self._cstats.upstream_cx_connect_attempts_exceeded += 1
        self._report("UF")
        self._close(abort=False)

    def _upstream_connected(self, upstream: TcpUpstream, transport: asyncio.Transport) -> None:
        if self._closed or upstream.pool is not self._pool:
            transport.close()  # the downstream went away while we were connecting
            return
        self._open += 1
        self._upstream = upstream
        self._up = transport
        self._connect_time = self._loop.time() - self._t0
        endpoint = self._endpoint
        if endpoint is not None:
            detector = self._cluster.outlier
            if detector is not None:
                detector.report_status(endpoint, CONNECT_SUCCESS_STATUS)
        limit = self._rt.config.buffer_limit
        transport.set_write_buffer_limits(high=limit, low=limit // 2)
        if self._on_upstream is not None:
            self._report("")
        if self._down_write_paused:
            transport.pause_reading()
        early = self._early
        if early:
            self._early = []
            for data in early:
                self.data_received(data)
        if self._down_eof:
            self._forward_eof(transport)
        elif self._down is not None and not self._flow_paused:
            self._down.resume_reading()

    def _upstream_eof(self) -> None:
        self._up_eof = True
        down = self._down
        if down is not None:
            self._forward_eof(down)
        if self._down_eof:
            self._close(abort=False)

    def _upstream_lost(self, upstream: TcpUpstream, exc: Exception | None) -> None:
        if upstream is self._upstream:
            self._up = None
            if exc is not None and not self._closed:
                self._up_reset = True
            if not self._closed:
                self._close(abort=exc is not None)
            self._transport_gone()

    def _pause_downstream(self) -> None:
        """The upstream's write buffer is over the limit: stop reading from downstream."""
        down = self._down
        if down is not None and not self._flow_paused and not self._down_eof:
            self._flow_paused = True
            self._stats.downstream_flow_control_paused_reading_total += 1
            down.pause_reading()

    def _resume_downstream(self) -> None:
        self._activity += 1
        if self._flow_paused:
            self._flow_paused = False
            down = self._down
            if down is not None and not self._closed:
                self._stats.downstream_flow_control_resumed_reading_total += 1
                down.resume_reading()

    # --- idle sweep (TcpProxyRuntime) ---------------------------------------------------------

    def check_idle(self, now: float, idle_timeout: float) -> None:
        """Close both sides if nothing moved since the sweep that saw this state ``idle_timeout`` ago.

        Closed pairs still flushing are checked too: a peer that stopped reading is aborted."""
        if self._up is None and not self._closed:
            return  # still connecting: the connect timeout applies
        activity = self._activity
        if activity != self._swept:
            self._swept = activity
            self._swept_at = now
            return
        if now - self._swept_at < idle_timeout:
            return
        if not self._closed:
            self._stats.idle_timeout += 1
            self._cstats.upstream_cx_idle_timeout += 1
        self._close(abort=True)

    # --- internals ----------------------------------------------------------------------------

    def _forward_eof(self, transport: asyncio.Transport) -> None:
        """One direction has ended: pass the EOF on (after the buffer drains), or close if we cannot."""
        try:
            if transport.can_write_eof():
                transport.write_eof()
                return
        except (OSError, RuntimeError):
            pass  # the transport is closing: its connection_lost will follow
        transport.close()

    def _close(self, abort: bool) -> None:
        """End the pair: both transports closed (flushed) or aborted. Safe to call again: a second
        call with ``abort`` aborts what a flushing close left open."""
        first = not self._closed
        self._closed = True
        if first:
            if self._on_upstream is not None:
                self._report("DC")  # no outcome was reported: the downstream went away first
            self._release(error=self._up_reset)
            self._early = []
        for transport in (self._down, self._up):
            if transport is not None:
                if abort:
                    transport.abort()
                elif first:
                    transport.close()

    def _report(self, flag: str) -> None:
        """Call the outcome hook, once (see the module doc)."""
        hook = self._on_upstream
        if hook is None:
            return
        self._on_upstream = None
        try:
            hook(flag)
        except Exception as exc:  # a bug in the hook: the pair goes on (or closes) without it
            log_once("l4-hook-bug", "tcp_proxy: unexpected error in the upstream outcome hook", exc_info=exc)

    def _release(self, error: bool) -> None:
        """Count the attempt or connection on its endpoint (LRS, least_request), once."""
        endpoint = self._endpoint
        if endpoint is None:
            return
        self._endpoint = None
        endpoint.active_requests -= 1
        if self._upstream is None and not error:
            return  # never connected and never failed (the downstream left while connecting)
        endpoint.rq_latency_total += self._connect_time
        if error:
            endpoint.rq_error += 1
        else:
            endpoint.rq_success += 1

    def _transport_gone(self) -> None:
        self._open -= 1
        if self._open == 0:
            self._rt.connection_closed(self)


def _from_source(connector: Callable[..., Any], source: str) -> Callable[..., Any]:
    """``connector`` with the connection's local address bound to ``source`` (any port)."""
    def connect(protocol_factory: Callable[[], Any], host: str, port: int, **kwargs: Any) -> Any:
        return connector(protocol_factory, host, port, local_addr=(source, 0), **kwargs)
    return connect
