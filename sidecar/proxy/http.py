"""The HTTP/1.1 connection manager: one ``asyncio.Protocol`` per downstream connection.

Used by both listeners (outbound 15001 and inbound 15006). For each request it routes by the Host
header or the authority of an absolute-form URI (``GET http://catalog/items HTTP/1.1`` from apps
using ``HTTP_PROXY``, rewritten to origin-form upstream), picks an endpoint of the route's cluster,
takes a pooled upstream connection (or opens one, the only case that needs a task), forwards the
head and streams bodies both ways.

Behaviour, in Envoy's terms:
- Keep-alive and pipelining: requests are answered strictly in order; requests parsed ahead wait
  in a bounded queue with their bodies buffered up to ``BUFFER_LIMIT``, beyond which reading pauses.
- Flow control: when one side's write buffer passes its high-water mark (``pause_writing``), the
  other side stops reading until it drains. Bodies are never buffered whole.
- Framing: Content-Length passes through; chunked bodies are re-chunked; close-delimited upstream
  bodies are chunked for HTTP/1.1 clients and close-delimited for HTTP/1.0 ones. Hop-by-hop headers
  are stripped. ``Expect: 100-continue`` is answered here and stripped (Envoy's default).
- Local replies (see ``errors``): 404 NR, 503 NC/UH/UF, 502 UC/UPE, 504 UT, 400 and 431 (DPE, then
  close). If the response had already started, the downstream connection is reset instead.
- The route timeout (default 15 s, 0 disables) runs from the end of the downstream request to the
  end of the upstream response, as Envoy's ``RouteAction.timeout``.

Callbacks never raise: they answer or close, count, and log once per cause. Everything a listener
shares (router, clusters, stats, drain state) lives in its ``ListenerRuntime``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from sidecar.proxy import codec, errors
from sidecar.proxy.exchange import Exchange
from sidecar.upstream.pool import BODY_CHUNKED, BODY_EOF, ConnectFailure, UpstreamConnection

if TYPE_CHECKING:
    from sidecar.proxy.listener import ListenerRuntime
    from sidecar.upstream.cluster import Endpoint

BUFFER_LIMIT = 64 * 1024  # request bytes held per connection while no upstream can take them
MAX_PIPELINED = 16  # requests parsed ahead of the one being answered

# Reasons to stop reading from the downstream socket (a bit mask: reading resumes when all clear).
R_BUFFER = 1
R_UPSTREAM = 2
R_PIPELINE = 4


class HttpConnectionManager(asyncio.Protocol):
    """One downstream HTTP/1.1 connection."""

    __slots__ = (
        # per listener
        "_rt", "_loop",
        # per connection
        "transport", "_parser", "_active", "_queue", "_parsing", "_closing", "_input_closed",
        "_read_paused", "_write_paused", "_buffered", "_batch", "_batching", "_error_after",
        "_awaiting_head", "_count_raw", "_head_size", "_head_raw",
    )

    def __init__(self, runtime: ListenerRuntime) -> None:
        self._rt = runtime
        self._loop: asyncio.AbstractEventLoop | None = None
        self.transport: asyncio.Transport | None = None
        self._parser = HttpRequestParser(self)
        self._active: Exchange | None = None  # the request being answered
        self._queue: deque[Exchange] = deque()  # parsed ahead, answered after it
        self._parsing: Exchange | None = None  # the request the parser is in
        self._closing = False  # no further requests are accepted on this connection
        self._input_closed = False  # ignore any further bytes from downstream
        self._read_paused = 0
        self._write_paused = False
        self._buffered = 0
        self._batch: list[bytes] = []
        self._batching = 0
        self._error_after: errors.LocalReply | None = None
        self._awaiting_head = True
        self._count_raw = False
        self._head_size = 0
        self._head_raw = 0

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # a TCP transport
        self._loop = asyncio.get_running_loop()
        self._rt.connection_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._input_closed = True
        for ex in (self._active, *self._queue, self._parsing):
            if ex is not None:
                self._end(ex)
        self._active = self._parsing = None
        self._queue.clear()
        self._rt.connection_closed(self)

    def eof_received(self) -> bool:
        return False  # a half-closed client is a closed client (HTTP/1 default of Envoy)

    def pause_writing(self) -> None:
        self._write_paused = True
        ex = self._active
        if ex is not None and ex.conn is not None:
            ex.conn.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        ex = self._active
        if ex is not None and ex.conn is not None:
            ex.conn.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._input_closed:
            return
        self._batching += 1
        self._count_raw = self._awaiting_head
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._after_upgrade(data, exc)
        except HttpParserError as exc:
            if not self._input_closed:
                errors.log_once(f"dpe:{type(exc).__name__}", "malformed request: %s", exc, exc_info=exc.__context__)
                self._reject(errors.BAD_REQUEST)
        else:
            # A head still incomplete after a read that started in it: every byte was head.
            if self._count_raw and self._parsing is not None:
                self._head_raw += len(data)
                if self._head_raw > codec.MAX_REQUEST_HEADERS_BYTES:
                    self._reject(errors.HEADERS_TOO_LARGE)
        self.batch_end()

    # --- request parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        ex = Exchange()
        self._parsing = ex
        self._head_size = 0
        self._head_raw = 0
        if self._closing:
            ex.discard = True
            return
        stats = self._rt.stats
        stats.downstream_rq_total += 1
        stats.downstream_rq_active += 1
        if self._active is None:
            self._active = ex
        else:
            self._queue.append(ex)
            if len(self._queue) >= MAX_PIPELINED:
                self._pause(R_PIPELINE)

    def on_url(self, url: bytes) -> None:
        ex = self._parsing
        self._head_size += len(url)
        ex.url = url if not ex.url else ex.url + url

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self._parsing
        if ex.headers_done:
            return  # trailers of a chunked request are dropped
        self._head_size += len(name) + len(value)
        lname = name.lower()
        kind = codec.REQUEST_HEADER_KIND.get(lname)
        if kind is None:
            ex.headers += (name, b": ", value, b"\r\n")
        elif kind == codec.H_HOST:
            ex.host = value
        elif kind == codec.H_CONTENT_LENGTH:
            ex.has_body = value.strip() not in (b"0", b"")
            ex.headers += (name, b": ", value, b"\r\n")
        elif kind == codec.H_TRANSFER_ENCODING:
            ex.chunked = ex.has_body = True  # the parser rejects a Transfer-Encoding not ending in chunked
        elif kind == codec.H_EXPECT:
            if value.lower() == b"100-continue":
                ex.expect = True
            else:
                ex.headers += (name, b": ", value, b"\r\n")
        elif kind == codec.H_CONNECTION:
            for token in value.lower().split(b","):
                token = token.strip()
                if token == b"keep-alive":
                    ex.ka_token = True
                elif token not in codec.CONNECTION_OPTIONS:
                    if ex.conn_tokens is None:
                        ex.conn_tokens = set()
                    ex.conn_tokens.add(token)

    def on_headers_complete(self) -> None:
        ex = self._parsing
        ex.headers_done = True
        self._awaiting_head = False
        self._count_raw = False
        if ex.discard:
            return
        if self._head_size > codec.MAX_REQUEST_HEADERS_BYTES:
            self._reject(errors.HEADERS_TOO_LARGE)
            return
        parser = self._parser
        ex.method = parser.get_method()
        ex.keep_alive = keep_alive = parser.should_keep_alive()
        if not keep_alive or ex.ka_token:
            ex.http10 = parser.get_http_version() == "1.0"
            if ex.http10:
                ex.expect = False
        if not keep_alive:
            self._closing = True
        if ex is self._active:
            self._dispatch(ex)

    def on_body(self, body: bytes) -> None:
        ex = self._parsing
        if ex.done or ex.discard:
            return  # answered already (or refused): the rest of the body is read and dropped
        conn = ex.conn
        if conn is not None:
            if ex.chunked:
                conn.transport.writelines(codec.chunk(body))
            else:
                conn.transport.write(body)
            return
        if ex.pending is None:
            ex.pending = []
        if ex.chunked:
            ex.pending += codec.chunk(body)
        else:
            ex.pending.append(body)
        ex.pending_size += len(body)
        self._buffered += len(body)
        if self._buffered > BUFFER_LIMIT:
            self._pause(R_BUFFER)

    def on_message_complete(self) -> None:
        ex = self._parsing
        self._parsing = None
        self._awaiting_head = True
        ex.complete = True
        if ex.done or ex.discard:
            return
        if ex.chunked:
            if ex.conn is not None:
                ex.conn.write(codec.LAST_CHUNK)
            else:
                if ex.pending is None:
                    ex.pending = []
                ex.pending.append(codec.LAST_CHUNK)
        if ex.conn is not None:
            ex.conn.request_done = True
        if ex.entry is not None and ex.entry.timeout:
            ex.timer = self._loop.call_later(ex.entry.timeout, self._on_route_timeout, ex)

    # --- dispatch ------------------------------------------------------------------------------

    def _dispatch(self, ex: Exchange) -> None:
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
        head[4] = ex.host or endpoint.key.encode()
        if ex.chunked:
            head.append(codec.CHUNKED_HEADER)
        head.append(codec.CRLF)

        if ex.expect and not ex.complete:
            ex.expect = False
            self._write(errors.CONTINUE_100)
        if ex.complete and entry.timeout:
            ex.timer = self._loop.call_later(entry.timeout, self._on_route_timeout, ex)
        conn = endpoint.pool.acquire()
        if conn is not None:
            self._attach(ex, conn)
        else:
            ex.connecting = self._loop.create_task(self._connect(ex, endpoint))

    def _attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        ex.conn = conn
        data = ex.headers
        if ex.pending is not None:
            data = data + ex.pending
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

    # --- upstream callbacks (UpstreamHandler) --------------------------------------------------

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

    def batch_begin(self) -> None:
        self._batching += 1

    def batch_end(self) -> None:
        self._batching -= 1
        if self._batching:
            return
        batch = self._batch
        if batch:
            transport = self.transport
            if transport is not None:
                transport.writelines(batch)
            batch.clear()
        if self._closing and self._active is None and self.transport is not None and not self._queue:
            self._close()

    # --- endings ---------------------------------------------------------------------------------

    def _on_route_timeout(self, ex: Exchange) -> None:
        ex.timer = None
        if ex.done:
            return
        ex.cluster.stats.upstream_rq_timeout += 1
        ex.failed = True
        if ex.conn is not None:
            ex.conn.abort()
            ex.conn = None
        if ex.started:
            self._abort()
        else:
            self._local_reply(ex, errors.UPSTREAM_TIMEOUT)

    def _local_reply(self, ex: Exchange, reply: errors.LocalReply) -> None:
        if ex.done:
            return
        if ex.started:
            self._abort()
            return
        # A client waiting for 100 Continue may or may not send its body now: close to be safe.
        if reply.always_close or self._rt.draining or (ex.expect and not ex.complete):
            ex.keep_alive = False
        if not ex.keep_alive:
            self._closing = True
        self._write(reply.keep_alive_bytes if ex.keep_alive else reply.close_bytes)
        ex.status = reply.status
        if ex.conn is not None:
            ex.conn.abort()
            ex.conn = None
        self._finish(ex)

    def _finish(self, ex: Exchange) -> None:
        """The response of the active exchange is complete: account, then serve the next one."""
        self._end(ex)
        status = ex.status
        stats = self._rt.stats
        if status < 300:
            stats.downstream_rq_2xx += 1
        elif status < 400:
            stats.downstream_rq_3xx += 1
        elif status < 500:
            stats.downstream_rq_4xx += 1
        else:
            stats.downstream_rq_5xx += 1
        if self._read_paused & R_UPSTREAM:
            self._resume(R_UPSTREAM)
        if not ex.keep_alive or self._rt.draining:
            self._active = None
            for queued in self._queue:
                self._end(queued)
            self._queue.clear()
            self._close()
            return
        queue = self._queue
        nxt = self._active = queue.popleft() if queue else None
        if self._read_paused & R_PIPELINE and len(queue) < MAX_PIPELINED:
            self._resume(R_PIPELINE)
        if nxt is None:
            if self._error_after is not None:
                self._write(self._error_after.close_bytes)
                self._close()
        elif nxt.headers_done:
            self._dispatch(nxt)

    def _end(self, ex: Exchange) -> None:
        """Release what an exchange holds; counts it once, whichever way it ended."""
        if ex.done:
            return
        ex.done = True
        if ex.timer is not None:
            ex.timer.cancel()
            ex.timer = None
        if ex.connecting is not None:
            ex.connecting.cancel()
            ex.connecting = None
        if ex.conn is not None:
            ex.conn.abort()
            ex.conn = None
        if ex.pending is not None:
            self._buffered -= ex.pending_size
            ex.pending = None
            if self._read_paused & R_BUFFER and self._buffered <= BUFFER_LIMIT:
                self._resume(R_BUFFER)  # the rest of that body is read and dropped
        if not ex.discard:
            self._rt.stats.downstream_rq_active -= 1
        endpoint = ex.endpoint
        if endpoint is not None:
            ex.cluster.stats.upstream_rq_active -= 1
            endpoint.active_requests -= 1
            if ex.failed or (ex.started and ex.status >= 500):
                endpoint.rq_error += 1
            elif ex.started:
                endpoint.rq_success += 1

    def _reject(self, reply: errors.LocalReply) -> None:
        """A protocol error (400, 431): answer once every earlier request is answered, then close."""
        self._input_closed = True
        self._closing = True
        self._rt.stats.downstream_cx_protocol_error += 1
        bad = self._parsing
        if bad is not None and not bad.done and not bad.discard:
            if bad is self._active:
                self._local_reply(bad, reply)
                return
            if bad in self._queue:
                self._queue.remove(bad)
                self._end(bad)
        if self._active is None:
            self._write(reply.close_bytes)
            self._close()
        else:
            self._error_after = reply

    def _after_upgrade(self, data: bytes, exc: HttpParserUpgrade) -> None:
        # Upgrades are not proxied (Upgrade is hop-by-hop and stripped); CONNECT was answered in
        # _dispatch. The parser stops after such a message: parse what follows it.
        if self._closing or self._input_closed:
            return
        offset = exc.args[0] if exc.args else len(data)
        if offset < len(data):
            self.data_received(data[offset:])

    def _abort(self) -> None:
        """Reset the downstream connection (a response was cut short)."""
        self._input_closed = True
        self._closing = True
        transport = self.transport
        if transport is not None:
            self._batch.clear()
            self.transport = None  # nothing more is written; connection_lost cleans up
            transport.abort()

    def _close(self) -> None:
        self._input_closed = True
        self._closing = True
        transport = self.transport
        if transport is None or self._batching:
            return  # batch_end closes once the batch is written
        if self._rt.draining:
            self._rt.stats.downstream_cx_drain_close += 1
        transport.close()

    # --- helpers -----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._batching:
            self._batch.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def _pause(self, reason: int) -> None:
        if not self._read_paused and self.transport is not None:
            self.transport.pause_reading()
        self._read_paused |= reason

    def _resume(self, reason: int) -> None:
        if self._read_paused & reason:
            self._read_paused &= ~reason
            if not self._read_paused and self.transport is not None and not self._input_closed:
                self.transport.resume_reading()

    def start_draining(self) -> None:
        """Listener drain: close now if idle, else after the current response."""
        self._closing = True
        if self._active is None and self._parsing is None and not self._batching:
            self._close()

    @property
    def idle(self) -> bool:
        return self._active is None and self._parsing is None


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
