"""Per-endpoint connection pools: they own the circuit breakers' request and connection limits.

The router asks an endpoint's :class:`ConnectionPool` for a stream (:meth:`~ConnectionPool.new_stream`)
and hears back, as Envoy's conn_pool_base answers: *ready* with a
:class:`~sidecar.codec.api.RequestEncoder` (at once when a pooled connection is free, else once one
is connected or comes free) or *failure*: ``overflow`` (a breaker refused), ``connection_failure``
or ``timeout`` (the connect). The limits (:mod:`sidecar.upstream.breaker`) are the cluster's:

- ``max_requests``: streams attached to a connection (``upstream_rq_active``); checked before a
  connection is looked for, and again when a waiting stream gets one;
- ``max_pending_requests``: streams waiting for a connection (``upstream_rq_pending_active``);
- ``max_connections``: open and opening connections; past it a stream waits for a connection of
  its endpoint to come free (``upstream_cx_overflow``), FIFO.

HTTP/1.1 connections (:class:`~sidecar.codec.http1_client.Http1ClientConnection`) carry one
stream at a time. Idle ones are kept last-in first-out so warm connections are reused first; one
the upstream closed is dropped in ``lost`` and never handed out; one idle past ``idle_timeout``
is closed when it would be reused (no timer per connection).

HTTP/2 connections (:class:`~sidecar.codec.http2_client.Http2ClientConnection`, a cluster whose
protocol options say HTTP/2) multiplex streams up to the peer's SETTINGS_MAX_CONCURRENT_STREAMS: a
stream goes to the first connection with room; a new connection is opened only when none has room
and none is being opened (a connection being opened will take the streams waiting for it), within
``max_connections``. A connection the peer sends GOAWAY on takes no new stream and leaves the pool
when its streams are done.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.codec.http1_client import Http1ClientConnection
from sidecar.codec.http2_client import Http2ClientConnection
from sidecar.config import CircuitBreakerConfig
from sidecar.upstream import breaker
from sidecar.upstream.stats import ClusterStats

if TYPE_CHECKING:
    from sidecar.codec.api import RequestEncoder
    from sidecar.tls.upstream import UpstreamTls

DEFAULT_MAX_IDLE = 1024  # idle connections kept per endpoint and worker (Envoy's max_connections default)
DEFAULT_IDLE_TIMEOUT = 3600.0  # Envoy's upstream idle_timeout default: 1 h

# ``connector(protocol_factory, host, port)``; ``loop.create_connection`` unless a test injects one.
Connector = Callable[..., Awaitable[tuple[Any, Any]]]


class ConnectFailure(Exception):
    """Connecting to an endpoint failed or timed out (Envoy's UF)."""

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class PoolFailure(StrEnum):
    """Why a pool could not give a stream (Envoy's ConnectionPool::PoolFailureReason)."""

    OVERFLOW = "overflow"
    CONNECTION_FAILURE = "connection_failure"
    TIMEOUT = "timeout"


class PoolCallbacks(Protocol):
    """The router's upstream request, as a pool answers it (and as a ResponseDecoder its stream)."""

    def on_pool_ready(self, encoder: RequestEncoder, conn: Http1ClientConnection) -> None: ...

    def on_pool_failure(self, reason: PoolFailure, detail: str) -> None: ...


class _Unlimited:
    """The limits of a pool made without a cluster (tests, tools): none."""

    breakers = CircuitBreakerConfig(max_connections=1 << 62, max_pending_requests=1 << 62, max_requests=1 << 62)

    def __init__(self, stats: ClusterStats) -> None:
        self.stats = stats
        self.retries_active = 0


class Pending:
    """A stream waiting for a connection; :meth:`cancel` takes it back."""

    __slots__ = ("pool", "callbacks", "task", "waiting", "done")

    def __init__(self, pool: ConnectionPool, callbacks: PoolCallbacks) -> None:
        self.pool = pool
        self.callbacks = callbacks
        self.task: asyncio.Task[None] | None = None  # the connect opened for it
        self.waiting = False  # queued for a connection to come free
        self.done = False

    def cancel(self) -> None:
        if self.done:
            return
        self.pool._leave(self)
        if self.waiting:
            self.waiting = False
            self.pool._cancel_wait(self)
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def __call__(self, conn: Http1ClientConnection | Http2ClientConnection | None) -> None:
        """Woken in the queue: a connection came free or, HTTP/2, has room (``conn``), or a slot did (None)."""
        self.waiting = False
        pool = self.pool
        if self.done:
            if conn is not None:
                if pool.http2:
                    pool._serve_waiters(conn)  # the room it was woken for goes to the next waiter
                else:
                    pool.release(conn)
            return
        if conn is not None and (pool.http2 or not conn.closed):  # HTTP/2: _ready checks its capacity
            self.pool._ready(self, conn)
        else:
            self.pool._connect_or_wait(self, first=True)


class ConnectionPool:
    """Connections to one endpoint: the idle ones in a LIFO list, plus a count of all open ones."""

    __slots__ = ("host", "port", "connect_timeout", "stats", "limits", "max_idle", "idle_timeout", "closed",
                 "cx_active", "opening", "http2", "tls", "_idle", "_connector", "_waiters", "_loop", "_h2")

    def __init__(self, host: str, port: int, *, connect_timeout: float, stats: ClusterStats | None = None,
                 limits: breaker.Limited | None = None, max_idle: int = DEFAULT_MAX_IDLE,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT, connector: Connector | None = None,
                 http2: bool = False, tls: UpstreamTls | None = None) -> None:
        self.http2 = http2
        # mTLS to this endpoint (sidecar.tls.upstream); None: plaintext. Fixed for the pool's life:
        # a change makes a new pool (sidecar.upstream.cluster), so pooled connections stay what they are.
        self.tls = tls
        self._h2: list[Http2ClientConnection] = []  # HTTP/2: the open connections, oldest first
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        if limits is not None:
            stats = limits.stats
        self.stats = stats if stats is not None else ClusterStats()
        # The cluster (its breakers are read per stream: a CDS update replaces them whole).
        self.limits: breaker.Limited = limits if limits is not None else _Unlimited(self.stats)
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.closed = False
        self.cx_active = 0
        self.opening = 0  # connect tasks under way (opening_started / opening_done)
        self._idle: list[Http1ClientConnection] = []
        self._connector = connector
        self._waiters: deque[Pending] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    # --- streams --------------------------------------------------------------------------------

    def new_stream(self, callbacks: PoolCallbacks) -> Pending | None:
        """A stream for ``callbacks``: ``on_pool_ready`` or ``on_pool_failure`` is called, at once
        (then None is returned) or later (then the :class:`Pending` to cancel it by)."""
        limits = self.limits
        stats = self.stats
        if stats.upstream_rq_active >= limits.breakers.max_requests:
            stats.upstream_rq_pending_overflow += 1
            callbacks.on_pool_failure(PoolFailure.OVERFLOW, "max_requests")
            return None
        conn = self._take_idle() if not self.http2 else self._with_room()
        if conn is not None:
            stats.upstream_rq_total += 1
            stats.upstream_rq_active += 1
            callbacks.on_pool_ready(conn.new_stream(callbacks) if self.http2 else conn.attach(callbacks), conn)
            return None
        if not breaker.pending_allowed(limits):
            stats.upstream_rq_pending_overflow += 1
            callbacks.on_pool_failure(PoolFailure.OVERFLOW, "max_pending_requests")
            return None
        pending = Pending(self, callbacks)
        stats.upstream_rq_pending_total += 1
        stats.upstream_rq_pending_active += 1
        self._connect_or_wait(pending)
        return pending

    def stream_done(self, conn: Any, reusable: bool = True) -> None:
        """A stream of ``conn`` ended; ``reusable``: the connection may carry another (HTTP/2: as
        its capacity says)."""
        self.stats.upstream_rq_active -= 1
        if self.http2:
            self._serve_waiters(conn)
        elif reusable:
            self.release(conn)

    def capacity_changed(self, conn: Http2ClientConnection) -> None:
        """HTTP/2: the peer's SETTINGS or GOAWAY changed how many streams ``conn`` takes."""
        self._serve_waiters(conn)

    def _with_room(self) -> Http2ClientConnection | None:
        for conn in self._h2:
            if conn.capacity > 0:
                return conn
        return None

    def _stream_on(self, conn: Any, callbacks: PoolCallbacks) -> RequestEncoder:
        return conn.new_stream(callbacks) if self.http2 else conn.attach(callbacks)

    def _serve_waiters(self, conn: Http2ClientConnection) -> None:
        """HTTP/2: give waiting streams the room ``conn`` has (on the next loop turn, FIFO)."""
        waiters = self._waiters
        if not waiters:
            return
        room = conn.capacity
        loop = asyncio.get_running_loop()
        while waiters and room > 0:
            pending = waiters.popleft()
            loop.call_soon(pending, conn)
            room -= 1

    def _connect_or_wait(self, pending: Pending, first: bool = False) -> None:
        """Open a connection if ``max_connections`` allows, else queue for one of this endpoint's
        (HTTP/2: also while one is being opened, which will take the waiting streams)."""
        if self.http2 and self.opening and len(self._waiters) < self.opening * 100:
            pending.waiting = True
            self._waiters.append(pending)
            return
        if breaker.connection_allowed(self.limits, self):
            self.opening_started()
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            pending.task = task = self._loop.create_task(self._connect_for(pending))
            task.add_done_callback(self.opening_done)
            return
        if not first:
            self.stats.upstream_cx_overflow += 1
        pending.waiting = True
        if first:
            self._waiters.appendleft(pending)
        else:
            self._waiters.append(pending)

    async def _connect_for(self, pending: Pending) -> None:
        try:
            conn = await self.connect()
        except ConnectFailure as exc:
            pending.task = None
            if not pending.done:
                self._leave(pending)
                reason = PoolFailure.TIMEOUT if exc.timed_out else PoolFailure.CONNECTION_FAILURE
                pending.callbacks.on_pool_failure(reason, str(exc))
            return
        pending.task = None
        if pending.done:
            if self.http2:
                self._serve_waiters(conn)
            else:
                self.release(conn)  # fresh and unused: keep it for the next stream
            return
        self._ready(pending, conn)
        if self.http2:
            self._serve_waiters(conn)

    def _ready(self, pending: Pending, conn: Any) -> None:
        """A connection for a waiting stream: a stream on it, unless ``max_requests`` filled
        meanwhile (or, HTTP/2, the connection has no room left: then it waits again)."""
        if self.http2 and conn.capacity <= 0:
            self._connect_or_wait(pending, first=True)
            return
        self._leave(pending)
        stats = self.stats
        if not breaker.request_allowed(self.limits):
            if not self.http2:
                self.release(conn)  # unused: it stays pooled
            stats.upstream_rq_pending_overflow += 1
            pending.callbacks.on_pool_failure(PoolFailure.OVERFLOW, "max_requests")
            return
        stats.upstream_rq_total += 1
        stats.upstream_rq_active += 1
        pending.callbacks.on_pool_ready(self._stream_on(conn, pending.callbacks), conn)

    def _leave(self, pending: Pending) -> None:
        pending.done = True
        self.stats.upstream_rq_pending_active -= 1

    def _cancel_wait(self, pending: Pending) -> None:
        try:
            self._waiters.remove(pending)
        except ValueError:
            pass

    def _take_idle(self) -> Http1ClientConnection | None:
        """An idle connection to reuse, or None."""
        idle = self._idle
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if self.idle_timeout and now - conn.idle_since > self.idle_timeout:  # 0: no idle timeout
                # Checked when a connection would be reused: one that idled past the timeout is
                # closed then, not by a timer (the pool keeps no timer per connection).
                self.stats.upstream_cx_idle_timeout += 1
                conn.close()
                continue
            return conn
        return None

    # --- connections ----------------------------------------------------------------------------

    async def connect(self) -> Any:
        """Open a new connection within the cluster's connect timeout; raises :class:`ConnectFailure`."""
        if self.http2:
            return await self.connect_with(lambda: Http2ClientConnection(self))
        return await self.connect_with(lambda: Http1ClientConnection(self))

    async def _connect_tls(self, factory: Callable[[], Any], tls: UpstreamTls, ctx: ssl.SSLContext) -> Any:
        """:meth:`connect` with mTLS: a handshake that fails, or a server whose URI SAN is not the
        expected one, is a connect failure (UF), counted as Envoy counts it on the cluster."""
        connector = self._connector or asyncio.get_running_loop().create_connection
        stats = self.stats
        try:
            async with asyncio.timeout(self.connect_timeout if self.connect_timeout > 0 else None):
                transport, protocol = await connector(factory, self.host, self.port, ssl=ctx,
                                                      server_hostname=tls.server_hostname)
        except TimeoutError:
            stats.upstream_cx_connect_fail += 1
            stats.upstream_cx_connect_timeout += 1
            raise ConnectFailure(f"connect to {self.host}:{self.port} timed out", timed_out=True) from None
        except ssl.SSLCertVerificationError as exc:
            stats.upstream_cx_connect_fail += 1
            stats.ssl_fail_verify_error += 1
            raise ConnectFailure(f"TLS to {self.host}:{self.port}: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            stats.upstream_cx_connect_fail += 1
            stats.ssl_connection_error += 1
            raise ConnectFailure(f"TLS to {self.host}:{self.port} failed: {exc}") from None
        except OSError as exc:
            stats.upstream_cx_connect_fail += 1
            raise ConnectFailure(f"connect to {self.host}:{self.port} failed: {exc}") from None
        except (ValueError, UnicodeError) as exc:  # an SNI the ssl module refuses
            stats.upstream_cx_connect_fail += 1
            stats.ssl_connection_error += 1
            raise ConnectFailure(f"TLS to {self.host}:{self.port} failed: {exc}") from None
        if not tls.san_ok(transport.get_extra_info("peercert")):
            stats.upstream_cx_connect_fail += 1
            stats.ssl_fail_verify_san += 1
            transport.abort()
            raise ConnectFailure(f"TLS to {self.host}:{self.port}: the server is not {tls.config.san}")
        stats.ssl_handshake += 1
        return protocol

    async def connect_with(self, protocol_factory: Callable[[], Any]) -> Any:
        """:meth:`connect` with another protocol (the L4 proxy's, ``sidecar.l4``): the same connect
        timeout and failure counters. The protocol must call :meth:`opened` once connected and
        :meth:`lost` when its connection is gone, as the HTTP connections do. A pool with mTLS
        connects with TLS once the sidecar has a certificate (a tcp_proxy's bytes too)."""
        tls = self.tls
        if tls is not None:
            ctx = tls.context()
            if ctx is not None:
                return await self._connect_tls(protocol_factory, tls, ctx)
        connector = self._connector or asyncio.get_running_loop().create_connection
        try:
            async with asyncio.timeout(self.connect_timeout if self.connect_timeout > 0 else None):
                _, protocol = await connector(protocol_factory, self.host, self.port)
        except TimeoutError:
            self.stats.upstream_cx_connect_fail += 1
            self.stats.upstream_cx_connect_timeout += 1
            raise ConnectFailure(f"connect to {self.host}:{self.port} timed out", timed_out=True) from None
        except OSError as exc:
            self.stats.upstream_cx_connect_fail += 1
            raise ConnectFailure(f"connect to {self.host}:{self.port} failed: {exc}") from None
        return protocol

    def release(self, conn: Http1ClientConnection) -> None:
        """Take back a connection that can carry another stream."""
        if conn.closed:
            return
        if self.closed or len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.decoder = None
        if conn._read_paused:
            conn.read_disable(False)  # an idle connection must notice the upstream closing it
        if self._waiters:
            # Handed to the oldest waiter on the next loop turn, outside the parser's callback that
            # released it; not idle meanwhile, so nobody else takes it.
            asyncio.get_running_loop().call_soon(self._waiters.popleft(), conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def opening_started(self) -> None:
        self.opening += 1
        self.stats.upstream_cx_opening += 1

    def opening_done(self, _task: object = None) -> None:
        self.opening -= 1
        self.stats.upstream_cx_opening -= 1
        if self._waiters:
            # A connect ended (made, failed or cancelled): either way a slot may have come free,
            # and a failed one releases nothing that would wake the queue otherwise.
            asyncio.get_running_loop().call_soon(self._waiters.popleft(), None)

    def close_idle(self) -> None:
        """Close every idle connection now; busy ones close when their stream finishes (HTTP/2:
        they take no new stream and close when their streams are done)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in list(self._h2):
            if conn.active_streams:
                conn.go_away()
            else:
                conn.close()

    def close(self) -> None:
        """The endpoint is gone: close idle connections and pool nothing from now on."""
        self.closed = True
        self.close_idle()
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:  # they connect on their own (or fail) rather than wait forever
            asyncio.get_running_loop().call_soon(waiter, None)

    # --- called by connections --------------------------------------------------------------------

    def opened(self, conn: Any) -> None:
        self.cx_active += 1
        self.stats.upstream_cx_total += 1
        self.stats.upstream_cx_active += 1
        if self.http2 and isinstance(conn, Http2ClientConnection):
            self._h2.append(conn)

    def lost(self, conn: Any) -> None:
        self.cx_active -= 1
        self.stats.upstream_cx_active -= 1
        if conn in self._idle:
            self._idle.remove(conn)
        if self.http2 and conn in self._h2:
            self._h2.remove(conn)
        if self._waiters:
            # A connection slot came free: the oldest waiter may open a connection now.
            asyncio.get_running_loop().call_soon(self._waiters.popleft(), None)
