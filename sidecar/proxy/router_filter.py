"""The router filter: sends a routed request to an upstream endpoint and its response back.

In Envoy's terms this is ``envoy.filters.http.router`` as the connection manager runs it: resolve
the route, pick the cluster (weighted split) and an endpoint (the cluster's load balancer), take a
pooled connection or open one, write the request head in one piece, then relay what the upstream
reports (:class:`~sidecar.upstream.pool.UpstreamHandler`) as the downstream response. It also owns
the route timeout. It is a mixin of :class:`~sidecar.proxy.http.HttpConnectionManager`, whose
state it uses; the split only keeps each file readable.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from sidecar.proxy import codec, errors
from sidecar.proxy.exchange import Exchange
from sidecar.upstream.pool import BODY_CHUNKED, BODY_EOF, ConnectFailure, UpstreamConnection

if TYPE_CHECKING:
    from sidecar.proxy.listener import ListenerRuntime
    from sidecar.upstream.cluster import Endpoint

BUFFER_LIMIT = 64 * 1024  # request bytes held per connection while no upstream can take them

# Reasons to stop reading from the downstream socket (a bit mask: reading resumes when all clear).
R_BUFFER = 1  # request bytes held without an upstream to take them passed BUFFER_LIMIT
R_UPSTREAM = 2  # the upstream connection's write buffer passed its high-water mark
R_PIPELINE = 4  # too many pipelined requests wait to be answered


class RouterFilter:
    """Mixin: the upstream half of a downstream connection's request handling."""

    __slots__ = ()

    # State owned by HttpConnectionManager.
    _rt: ListenerRuntime
    _loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport | None
    _active: Exchange | None
    _queue: deque[Exchange]
    _batch: list[bytes]
    _batching: int
    _closing: bool
    _read_paused: int
    _write_paused: bool
    _buffered: int
    _timer: asyncio.TimerHandle | None
    _timer_at: float

    if TYPE_CHECKING:  # provided by HttpConnectionManager
        def _local_reply(self, ex: Exchange, reply: errors.LocalReply) -> None: ...
        def _finish(self, ex: Exchange) -> None: ...
        def _abort(self) -> None: ...
        def _write(self, data: bytes) -> None: ...
        def _pause(self, reason: int) -> None: ...
        def _resume(self, reason: int) -> None: ...

    def _dispatch(self, ex: Exchange) -> None:
        """Route the active exchange and send it upstream, or answer it locally."""
        rt = self._rt
        url = ex.url
        if url[:1] == b"/":
            path = url
            authority = ex.host
        else:
            authority, path = _absolute_form(url)
            if authority is None:
                ex.keep_alive = False
                self._local_reply(ex, errors.NO_ROUTE if ex.method == b"CONNECT" else errors.BAD_REQUEST)
                return
            ex.host = authority
        router = rt.router
        entry = router.resolve(authority, path) if router is not None else None
        if entry is None:
            rt.stats.no_route += 1
            self._local_reply(ex, errors.NO_ROUTE)
            return
        cluster = rt.clusters.get(entry.cluster())
        if cluster is None:
            rt.stats.no_cluster += 1
            self._local_reply(ex, errors.NO_CLUSTER)
            return
        endpoint = cluster.pick()
        if endpoint is None:
            cluster.stats.upstream_cx_none_healthy += 1
            self._local_reply(ex, errors.NO_HEALTHY_UPSTREAM)
            return
        ex.entry = entry
        ex.cluster = cluster
        ex.endpoint = endpoint
        cluster.stats.upstream_rq_total += 1
        cluster.stats.upstream_rq_active += 1
        endpoint.active_requests += 1
        endpoint.total_requests += 1

        head = ex.headers
        if ex.conn_tokens:
            head = ex.headers = codec.strip_connection_named(head, ex.conn_tokens)
        head[0] = ex.method
        head[2] = path
        head[4] = ex.host or endpoint.authority
        if ex.chunked:
            head.append(codec.CHUNKED_HEADER)
        head.append(codec.CRLF)

        if ex.expect and not ex.complete:
            ex.expect = False
            self._write(errors.CONTINUE_100)
        if ex.complete and entry.timeout:
            self._arm_timeout(ex, entry.timeout)
        conn = endpoint.pool.acquire()
        if conn is not None:
            self._attach(ex, conn)
        else:
            ex.connecting = self._loop.create_task(self._connect(ex, endpoint))

    def _attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        ex.conn = conn
        if ex.pending is None:
            data = b"".join(ex.headers)
        else:
            data = b"".join(ex.headers + ex.pending)
            ex.pending = None
            self._buffered -= ex.pending_size
            ex.pending_size = 0
        conn.send_request(self, data, ex.method == b"HEAD", ex.complete)
        if self._write_paused:
            conn.pause_reading()
        if self._read_paused & R_BUFFER and self._buffered <= BUFFER_LIMIT:
            self._resume(R_BUFFER)

    async def _connect(self, ex: Exchange, endpoint: Endpoint) -> None:
        try:
            conn = await endpoint.pool.connect()
        except ConnectFailure as exc:
            ex.connecting = None
            if not ex.done and self.transport is not None:
                ex.failed = True
                errors.log_once(f"uf:{endpoint.key}", "upstream connect failure: %s", exc)
                self._local_reply(ex, errors.CONNECT_FAILURE)
            return
        except Exception as exc:  # a bug: answer rather than leave the request hanging
            ex.connecting = None
            errors.log_once("connect-bug", "unexpected error connecting upstream", exc_info=exc)
            if not ex.done and self.transport is not None:
                ex.failed = True
                self._local_reply(ex, errors.CONNECT_FAILURE)
            return
        ex.connecting = None
        if ex.done or self.transport is None or ex is not self._active:
            endpoint.pool.release(conn)  # fresh and unused: keep it for the next request
            return
        self._attach(ex, conn)

    # --- UpstreamHandler: what the upstream connection reports ---------------------------------

    def on_upstream_headers(self, conn: UpstreamConnection, status: int, head: list[bytes], body_kind: int) -> None:
        ex = self._active
        if ex is None or ex.conn is not conn:
            conn.abort()
            return
        ex.status = status
        ex.started = True
        ex.cluster.stats.count_status(status)
        head[0] = codec.STATUS_LINES[status] if status < 1000 else codec.STATUS_LINES[500]
        if body_kind in (BODY_CHUNKED, BODY_EOF):
            if ex.http10:
                ex.keep_alive = False  # HTTP/1.0 has no chunked: the body ends when we close
            else:
                ex.resp_chunked = True
                head.append(codec.CHUNKED_HEADER)
        if self._rt.draining:
            ex.keep_alive = False
        if not ex.keep_alive:
            self._closing = True
            head.append(codec.CONNECTION_CLOSE)
        elif ex.http10:
            head.append(codec.CONNECTION_KEEP_ALIVE)
        head.append(codec.CRLF)
        if self._batching:
            self._batch += head
        elif self.transport is not None:
            self.transport.writelines(head)

    def on_upstream_body(self, data: bytes) -> None:
        ex = self._active
        if ex is None:
            return
        if ex.resp_chunked:
            if self._batching:
                self._batch += codec.chunk(data)
            elif self.transport is not None:
                self.transport.writelines(codec.chunk(data))
        else:
            self._write(data)

    def on_upstream_complete(self, conn: UpstreamConnection) -> None:
        ex = self._active
        if ex is None or ex.conn is not conn:
            return
        ex.conn = None
        if ex.resp_chunked:
            self._write(codec.LAST_CHUNK)
        self._finish(ex)

    def on_upstream_reset(self, conn: UpstreamConnection, flag: str) -> None:
        ex = self._active
        if ex is None or ex.conn is not conn:
            return
        ex.conn = None
        stats = ex.cluster.stats
        stats.upstream_rq_rx_reset += 1
        ex.failed = True
        if ex.started:
            self._abort()
            return
        if (flag == "UC" and conn.requests > 0 and not ex.retried and not ex.has_body and ex.complete
                and ex.method in codec.IDEMPOTENT_METHODS):
            # The pooled connection was closed by the upstream as we reused it: replay once.
            ex.retried = True
            ex.failed = False
            stats.upstream_rq_retry_stale += 1
            ex.connecting = self._loop.create_task(self._connect(ex, ex.endpoint))
            return
        errors.log_once(f"{flag}:{ex.endpoint.key}", "upstream %s reset the request (%s)", ex.endpoint.key, flag)
        self._local_reply(ex, errors.UPSTREAM_RESETS[flag])

    def on_upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self._pause(R_UPSTREAM)
        else:
            self._resume(R_UPSTREAM)


    # --- route timeout -----------------------------------------------------------------------

    def _arm_timeout(self, ex: Exchange, timeout: float) -> None:
        """Start the route timeout of the active exchange.

        A timer per request would cost a heap insert and a cancel each time; instead the
        connection keeps one timer and, when it fires early for a later request, re-arms it.
        """
        deadline = self._loop.time() + timeout
        ex.deadline = deadline
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        ex = self._active
        if ex is None or ex.done or not ex.deadline:
            return
        if self._loop.time() < ex.deadline:
            self._timer_at = ex.deadline
            self._timer = self._loop.call_at(ex.deadline, self._on_timer)
            return
        self._on_route_timeout(ex)

    def _on_route_timeout(self, ex: Exchange) -> None:
        ex.cluster.stats.upstream_rq_timeout += 1
        ex.failed = True
        if ex.conn is not None:
            ex.conn.abort()
            ex.conn = None
        if ex.started:
            self._abort()
        else:
            self._local_reply(ex, errors.UPSTREAM_TIMEOUT)


def _absolute_form(url: bytes) -> tuple[bytes | None, bytes]:
    """``http://authority/path?q`` -> (authority, origin-form path); (None, b"") if unsupported."""
    if url[:7].lower() != b"http://":
        return None, b""
    rest = url[7:]
    end = len(rest)
    for sep in (b"/", b"?", b"#"):
        i = rest.find(sep)
        if 0 <= i < end:
            end = i
    authority = rest[:end]
    at = authority.rfind(b"@")
    if at >= 0:
        authority = authority[at + 1 :]
    path = rest[end:].split(b"#", 1)[0]
    if not path.startswith(b"/"):
        path = b"/" + path
    if not authority:
        return None, b""
    return authority, path
