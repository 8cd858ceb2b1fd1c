"""Per-endpoint keep-alive pools of upstream HTTP/1.1 connections.

:class:`UpstreamConnection` is an ``asyncio.Protocol`` that sends one request at a time and parses
the response with ``httptools.HttpResponseParser``, handing headers, body chunks and completion to
its current :class:`UpstreamHandler` (the downstream side of the proxy). :class:`ConnectionPool`
keeps the idle ones of an endpoint, last-in first-out so warm connections are reused first.

Rules that keep a pool honest:
- A connection goes back to the pool only when the response allowed keep-alive *and* the whole
  request was written. ``should_keep_alive()`` and the status code are read inside the parser's
  callbacks: httptools resets its per-message state once ``feed_data()`` returns.
- A pooled connection the upstream closed is dropped in ``connection_lost`` and never handed out.
- Bytes arriving on an idle connection mean the upstream is confused: the connection is closed.
- Responses without a body: 1xx interim responses are skipped, 204 and 304 are known to the parser,
  and for HEAD (which the parser cannot know about) the message is finished at headers-complete and
  the parser replaced by a fresh one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from sidecar import quickack
from sidecar.upstream.stats import ClusterStats

DEFAULT_MAX_IDLE = 1024  # idle connections kept per endpoint and worker (Envoy's max_connections default)
DEFAULT_IDLE_TIMEOUT = 3600.0  # Envoy's upstream idle_timeout default: 1 h
MAX_RESPONSE_HEADERS_BYTES = 60 * 1024  # Envoy's max_response_headers_kb default

# How the response body is delimited, decided at headers-complete.
BODY_NONE = 0  # HEAD, 1xx, 204, 304
BODY_LENGTH = 1  # Content-Length
BODY_CHUNKED = 2
BODY_EOF = 3  # neither: the body ends when the upstream closes

# Response headers with special handling: hop-by-hop ones (RFC 9110 §7.6.1, plus the legacy ones)
# are never forwarded; Transfer-Encoding is re-applied by the downstream side as needed.
_DROP, _TRANSFER_ENCODING, _CONTENT_LENGTH, _CONNECTION = 1, 2, 3, 4
_RESPONSE_HEADER_KIND = {
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"upgrade": _DROP,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"content-length": _CONTENT_LENGTH,
}

# A request waiting for a connection of this endpoint (max_connections reached): called soon after a
# connection comes free (with it) or one closes (with None: a connection may be opened now).
Waiter = Callable[["UpstreamConnection | None"], None]

# ``connector(protocol_factory, host, port)``; ``loop.create_connection`` unless a test injects one.
Connector = Callable[..., Awaitable[tuple[Any, Any]]]


class ConnectFailure(Exception):
    """Connecting to an endpoint failed or timed out (Envoy's UF)."""

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class UpstreamHandler(Protocol):
    """What an :class:`UpstreamConnection` reports to while it serves a request.

    ``head`` is a list of header pieces whose first element is left empty for the status line; the
    handler fills it, appends framing headers and joins once. Reset flags are ``"UC"`` (closed or
    reset before the response finished) and ``"UPE"`` (unparseable response).
    """

    def on_upstream_headers(self, conn: UpstreamConnection, status: int, head: list[bytes], body_kind: int) -> None: ...

    def on_upstream_body(self, data: bytes) -> None: ...

    def on_upstream_complete(self, conn: UpstreamConnection) -> None: ...

    def on_upstream_reset(self, conn: UpstreamConnection, flag: str) -> None: ...

    def on_upstream_write_paused(self, paused: bool) -> None: ...

    def batch_begin(self) -> None: ...

    def batch_end(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to an endpoint; serves one request at a time."""

    __slots__ = (
        "pool", "transport", "handler", "requests", "idle_since", "closed", "request_done",
        "_parser", "_is_head", "_head", "_head_size", "_head_raw", "_read_len", "_in_head", "_body_kind",
        "_conn_tokens",
        "_interim", "_finished", "_reset_parser", "_read_paused", "write_paused",
    )

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.handler: UpstreamHandler | None = None
        self.requests = 0  # responses completed on this connection; > 0 means "reused"
        self.idle_since = 0.0
        self.closed = False
        self.request_done = False  # the whole request (head and body) has been written
        self.write_paused = False
        self._parser = HttpResponseParser(self)
        self._is_head = False
        self._head: list[bytes] = [b""]
        self._head_size = 0  # bytes of dropped headers (the forwarded ones are counted on demand)
        self._head_raw = 0  # bytes of earlier reads that were all head
        self._read_len = 0
        self._conn_tokens: set[bytes] | None = None  # headers named by Connection: dropped too
        self._in_head = False
        self._body_kind = BODY_NONE
        self._interim = False
        self._finished = True
        self._reset_parser = False
        self._read_paused = False

    # --- used by the downstream side -------------------------------------------------------

    def send_request(self, handler: UpstreamHandler, data: bytes, is_head: bool, request_done: bool) -> None:
        """Attach ``handler`` and write the request head (and any buffered body) in one go."""
        self.handler = handler
        self.request_done = request_done
        self._is_head = is_head
        self._finished = False
        self._in_head = True
        self._head_raw = 0
        self._head_size = 0
        self._head = [b""]
        self._conn_tokens = None
        self._body_kind = BODY_NONE
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Reset the connection (in-flight request abandoned); the handler is not told."""
        self.handler = None
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True
            transport.abort()

    def close(self) -> None:
        self.handler = None
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True
            transport.close()

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # a TCP transport: asyncio.Transport
        self.pool.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self.pool.lost(self)
        handler = self.handler
        if handler is None:
            return
        self.handler = None
        if self._body_kind == BODY_EOF and not self._in_head and not self._finished:
            # A close-delimited body ends here: the response is complete.
            self._finished = True
            handler.batch_begin()
            handler.on_upstream_complete(self)
            handler.batch_end()
            return
        self.pool.stats.upstream_cx_destroy_remote_with_active_rq += 1
        handler.on_upstream_reset(self, "UC")

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.handler is not None:
            self.handler.on_upstream_write_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.handler is not None:
            self.handler.on_upstream_write_paused(False)

    def data_received(self, data: bytes) -> None:
        handler = self.handler
        if handler is None:
            # Nothing was asked: a late or unsolicited response. Never reuse this connection.
            self.close()
            return
        counting = self._in_head
        self._read_len = len(data)
        handler.batch_begin()
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade:
            self._protocol_error()  # we never ask for an upgrade
        except HttpParserError:
            self._protocol_error()
        else:
            if self._reset_parser:
                self._reset_parser = False
                self._parser = HttpResponseParser(self)
            elif counting and self._in_head and self.handler is not None:
                self._head_raw += len(data)
                if self._head_raw > MAX_RESPONSE_HEADERS_BYTES:
                    self._protocol_error()
            if not self._finished and self.handler is not None and self.transport is not None:
                # More of this response is to come: an app that wrote the head and then the body
                # with Nagle on waits for our ACK of what we just read (sidecar.quickack).
                quickack.ack_now(self.transport)
        handler.batch_end()

    # --- parser callbacks ---------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # trailers of a chunked response are dropped (HTTP/1 default of Envoy)
        kind = _RESPONSE_HEADER_KIND.get(name.lower())
        if kind is None:
            self._head += (name, b": ", value, b"\r\n")
            return
        if kind == _CONTENT_LENGTH:
            if self._body_kind != BODY_CHUNKED:
                self._body_kind = BODY_LENGTH
            self._head += (name, b": ", value, b"\r\n")
            return
        self._head_size += len(name) + len(value)
        if kind == _TRANSFER_ENCODING:
            if value.lower().endswith(b"chunked"):
                self._body_kind = BODY_CHUNKED
        elif kind == _CONNECTION:
            for token in value.lower().split(b","):
                token = token.strip()
                if token not in (b"close", b"keep-alive", b""):
                    if self._conn_tokens is None:
                        self._conn_tokens = set()
                    self._conn_tokens.add(token)

    def on_headers_complete(self) -> None:
        handler = self.handler
        if handler is None:
            return
        status = self._parser.get_status_code()
        self._in_head = False
        if status < 200:
            # 100 Continue (we answer that ourselves) and other interim responses are not
            # forwarded; the parser treats them as complete bodiless messages.
            self._interim = True
            self._in_head = True
            self._head = [b""]
            self._conn_tokens = None
            self._head_size = 0
            self._body_kind = BODY_NONE
            return
        if (self._head_raw + self._read_len > MAX_RESPONSE_HEADERS_BYTES
                and self._head_size + sum(map(len, self._head)) > MAX_RESPONSE_HEADERS_BYTES):
            self._protocol_error()
            return
        if self._conn_tokens is not None:
            self._head = _strip_named(self._head, self._conn_tokens)
            self._conn_tokens = None
        kind = self._body_kind
        if self._is_head or status == 204 or status == 304:
            kind = BODY_NONE
        elif kind == BODY_NONE:
            kind = BODY_EOF
        self._body_kind = kind
        handler.on_upstream_headers(self, status, self._head, kind)
        if self._is_head and self.handler is handler:
            # The parser expects a body that a HEAD response never carries: finish here and
            # start a fresh parser for the next response on this connection.
            self._reset_parser = True
            self._finish(self._parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        handler = self.handler
        if handler is not None and not self._finished:
            handler.on_upstream_body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._finished or self.handler is None:
            return
        # Read keep-alive here: httptools forgets it once feed_data() returns.
        self._finish(self._parser.should_keep_alive())

    # --- internals ----------------------------------------------------------------------------

    def _finish(self, keep_alive: bool) -> None:
        handler = self.handler
        self._finished = True
        self._body_kind = BODY_NONE
        self.handler = None
        self.requests += 1
        # Release before telling the handler, so a pipelined next request can reuse this
        # connection straight away.
        if keep_alive and self.request_done and not self.closed:
            self.pool.release(self)
        else:
            self.close()
        if handler is not None:
            handler.on_upstream_complete(self)

    def _protocol_error(self) -> None:
        handler = self.handler
        self.pool.stats.upstream_cx_protocol_error += 1
        self.abort()
        if handler is not None and not self._finished:
            self._finished = True
            handler.on_upstream_reset(self, "UPE")


def _strip_named(head: list[bytes], names: set[bytes]) -> list[bytes]:
    """Drop (name, ": ", value, CRLF) pieces whose name a Connection header listed."""
    out = head[:1]
    for i in range(1, len(head), 4):
        if head[i].lower() not in names:
            out += head[i : i + 4]
    return out


class ConnectionPool:
    """Connections to one endpoint: the idle ones in a LIFO list, plus a count of all open ones."""

    __slots__ = ("host", "port", "connect_timeout", "stats", "max_idle", "idle_timeout", "closed",
                 "cx_active", "opening", "_idle", "_connector", "_waiters")

    def __init__(self, host: str, port: int, *, connect_timeout: float, stats: ClusterStats | None = None,
                 max_idle: int = DEFAULT_MAX_IDLE, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 connector: Connector | None = None) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.stats = stats if stats is not None else ClusterStats()
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.closed = False
        self.cx_active = 0
        self.opening = 0  # connect tasks under way (opening_started / opening_done)
        self._idle: list[UpstreamConnection] = []
        self._connector = connector
        self._waiters: deque[Waiter] = deque()

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def acquire(self) -> UpstreamConnection | None:
        """An idle connection to reuse, or None (then call :meth:`connect`)."""
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

    async def connect(self) -> UpstreamConnection:
        """Open a new connection within the cluster's connect timeout; raises :class:`ConnectFailure`."""
        return await self.connect_with(lambda: UpstreamConnection(self))

    async def connect_with(self, protocol_factory: Callable[[], Any]) -> Any:
        """:meth:`connect` with another protocol (the L4 proxy's, ``sidecar.l4``): the same connect
        timeout and failure counters. The protocol must call :meth:`opened` once connected and
        :meth:`lost` when its connection is gone, as :class:`UpstreamConnection` does."""
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

    def release(self, conn: UpstreamConnection) -> None:
        """Take back a connection whose last response allowed keep-alive."""
        if conn.closed:
            return
        if self.closed or len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.handler = None
        conn.resume_reading()  # an idle connection must notice the upstream closing it
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

    def wait(self, waiter: Waiter, first: bool = False) -> None:
        """Queue ``waiter`` for the next connection of this endpoint that comes free (FIFO;
        ``first`` puts a woken waiter that still could not connect back at the head)."""
        if first:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)

    def cancel_wait(self, waiter: Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def close_idle(self) -> None:
        """Close every idle connection now; busy ones close when their request finishes."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        """The endpoint is gone: close idle connections and pool nothing from now on."""
        self.closed = True
        self.close_idle()
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:  # they connect on their own (or fail) rather than wait forever
            asyncio.get_running_loop().call_soon(waiter, None)

    # --- called by UpstreamConnection ---------------------------------------------------------

    def opened(self, conn: UpstreamConnection) -> None:
        self.cx_active += 1
        self.stats.upstream_cx_total += 1
        self.stats.upstream_cx_active += 1

    def lost(self, conn: UpstreamConnection) -> None:
        self.cx_active -= 1
        self.stats.upstream_cx_active -= 1
        if conn in self._idle:
            self._idle.remove(conn)
        if self._waiters:
            # A connection slot came free: the oldest waiter may open a connection now.
            asyncio.get_running_loop().call_soon(self._waiters.popleft(), None)
