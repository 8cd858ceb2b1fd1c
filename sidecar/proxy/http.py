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
shares (router, clusters, stats, drain state) lives in its ``ListenerRuntime``. The upstream half
(routing, endpoint, upstream request, response relay, route timeout) is in ``router_filter``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from sidecar import quickack
from sidecar.codec import headers as codec
from sidecar.proxy import errors, telemetry
from sidecar.proxy.exchange import Exchange
from sidecar.proxy.router_filter import BUFFER_LIMIT, R_BUFFER, R_PIPELINE, R_UPSTREAM, RouterFilter
from sidecar.tracing.context import TRACE_HEADERS

if TYPE_CHECKING:
    from sidecar.proxy.listener import ListenerRuntime

MAX_PIPELINED = 16  # requests parsed ahead of the one being answered

_REQUEST_HEADER_KIND = codec.REQUEST_HEADER_KIND


class HttpConnectionManager(RouterFilter, asyncio.Protocol):
    """One downstream HTTP/1.1 connection."""

    __slots__ = (
        # per listener
        "_rt", "_loop",
        # per connection
        "transport", "_parser", "_active", "_queue", "_parsing", "_closing", "_input_closed",
        "_read_paused", "_write_paused", "_buffered", "_batch", "_batching", "_error_after",
        "_awaiting_head", "_count_raw", "_head_size", "_head_raw", "_read_len", "_timer", "_timer_at",
        "_rq_begun", "_swept", "_swept_at",  # listener timeouts (check_timeouts)
        "original_dst",  # transparent mode: where the app dialled (set before connection_made)
        "_tunnel",  # the protocol a CONNECT handed the connection to (sidecar.proxy.passthrough)
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
        # Header size limit: exact sizes are only summed when a cheap bound (the bytes of the reads
        # that carried the head) exceeds the limit.
        self._awaiting_head = True
        self._count_raw = False
        self._head_size = 0  # bytes of headers not forwarded
        self._head_raw = 0  # bytes of earlier reads that were all head
        self._read_len = 0
        # One route-timeout timer per connection, re-armed lazily (see _arm_timeout).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.original_dst: tuple[str, int] | None = None
        self._tunnel: asyncio.Protocol | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # a TCP transport
        self._loop = asyncio.get_running_loop()
        self._rq_begun = 0  # requests begun on this connection: the sweep's sign of progress
        self._swept = -1  # the state the listener's sweep last saw (see check_timeouts); -1: busy
        self._swept_at = 0.0
        self._rt.connection_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._input_closed = True
        active = self._active
        if active is not None and not active.done and not active.flags:
            active.flags = "DC"  # the client went away before the response was complete (Envoy's DC)
        for ex in (active, *self._queue, self._parsing):
            if ex is not None:
                self._end(ex)
        self._active = self._parsing = None
        self._queue.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
        self._read_len = len(data)
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
            if self._parsing is not None and not self._input_closed and self.transport is not None:
                # More of this request is to come: a client that wrote the head and then the body
                # with Nagle on waits for our ACK of what we just read (sidecar.quickack).
                quickack.ack_now(self.transport)
        self.batch_end()

    # --- request parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        ex = Exchange()
        ex.original_dst = self.original_dst
        self._parsing = ex
        self._rq_begun += 1
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
        ex.url = url if not ex.url else ex.url + url

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self._parsing
        if ex.headers_done:
            return  # trailers of a chunked request are dropped
        lname = name.lower()
        kind = _REQUEST_HEADER_KIND.get(lname)
        if kind is None:
            ex.headers += (name, b": ", value, b"\r\n")
            return
        self._head_size += len(name) + len(value)
        if kind == codec.H_TRACE:
            if self._rt.tracer is None:  # tracing off: trace headers pass through untouched
                ex.headers += (name, b": ", value, b"\r\n")
                self._head_size -= len(name) + len(value)
            elif ex.trace_in is None:
                ex.trace_in = [(TRACE_HEADERS[lname], value)]
            else:
                ex.trace_in.append((TRACE_HEADERS[lname], value))
        elif kind == codec.H_REQUEST_ID:
            if ex.request_id is None and value:  # the first one, as Envoy; an empty one is none
                ex.request_id = value
        elif kind == codec.H_HOST:
            # A second Host header makes the target ambiguous (RFC 9112 §3.2): refused below.
            ex.host = value if not ex.host else None
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
        if (self._head_raw + self._read_len > codec.MAX_REQUEST_HEADERS_BYTES
                and self._head_size + len(ex.url) + sum(map(len, ex.headers)) > codec.MAX_REQUEST_HEADERS_BYTES):
            self._reject(errors.HEADERS_TOO_LARGE)
            return
        parser = self._parser
        if not ex.host and ex.url[:1] == b"/" and parser.get_http_version() != "1.0":
            self._reject(errors.BAD_HOST)  # missing or repeated (RFC 9112 §3.2)
            return
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
        ex.bytes_in += len(body)
        conn = ex.conn
        if conn is not None:
            transport = conn.transport
            framed = codec.chunk(body) if ex.chunked else None
            if transport is not None:
                if framed is not None:
                    transport.writelines(framed)
                else:
                    transport.write(body)
            sent = ex.sent
            if sent is not None:  # kept for a retry
                if framed is not None:
                    sent += framed
                else:
                    sent.append(body)
                self._retain(ex, len(body))
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
                if ex.sent is not None:
                    ex.sent.append(codec.LAST_CHUNK)
            else:
                if ex.pending is None:
                    ex.pending = []
                ex.pending.append(codec.LAST_CHUNK)
        if ex.conn is not None:
            ex.conn.request_done = True
        entry = ex.entry
        if entry is not None and entry.timed:
            self._request_complete(ex)

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
                # One write: a join is cheaper than writelines for the usual few small pieces.
                transport.write(batch[0] if len(batch) == 1 else b"".join(batch))
            batch.clear()
        if self._closing and self._active is None and self.transport is not None and not self._queue:
            self._close()

    # --- endings ---------------------------------------------------------------------------------

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
        ex.flags = reply.flag
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
        if ex.pending is not None:
            self._buffered -= ex.pending_size
            ex.pending = None
            if self._read_paused & R_BUFFER and self._buffered <= BUFFER_LIMIT:
                self._resume(R_BUFFER)  # the rest of that body is read and dropped
        if not ex.discard:
            self._rt.stats.downstream_rq_active -= 1
        if ex.wait is not None:  # a retry back-off or a fault delay
            ex.wait.cancel()
            ex.wait = None
        # The try's connection or connect task, its timers and counters go with it: an exchange
        # only ever holds a connection or a connect task while a try has its endpoint.
        endpoint = ex.endpoint
        if endpoint is not None or ex.retry_active:
            failed = ex.failed or (ex.started and ex.status >= 500)
            if ex.started and not failed and endpoint is not None:
                endpoint.rq_success += 1
            self._release_try(ex, failed)
        if ex.headers_done and not ex.discard:
            try:
                telemetry.end(self._rt, ex, self._peer() if ex.sampled else None)
            except Exception as exc:  # a bug: never let accounting break the connection
                errors.log_once("telemetry-bug", "unexpected error recording a request", exc_info=exc)

    def _reject(self, reply: errors.LocalReply, protocol_error: bool = True) -> None:
        """A protocol error (400, 431) or a request head timeout (408): answer once every earlier
        request is answered, then close."""
        self._input_closed = True
        self._closing = True
        if protocol_error:
            self._rt.stats.downstream_cx_protocol_error += 1
        bad = self._parsing
        if bad is not None and not bad.done and not bad.discard:
            if bad is self._active:
                self._local_reply(bad, reply)
                return
            if bad in self._queue:
                self._queue.remove(bad)
                bad.status, bad.flags = reply.status, reply.flag  # answered after those before it
                self._end(bad)
        if self._active is None:
            self._write(reply.close_bytes)
            self._close()
        else:
            self._error_after = reply

    def _after_upgrade(self, data: bytes, exc: HttpParserUpgrade) -> None:
        # Upgrades are not proxied (Upgrade is hop-by-hop and stripped); CONNECT was answered or
        # tunnelled in _dispatch. The parser stops after such a message: what follows it is the
        # tunnel's, or parsed as the next request.
        offset = exc.args[0] if exc.args else len(data)
        tunnel = self._tunnel
        if tunnel is not None:
            if offset < len(data):
                tunnel.data_received(data[offset:])
            return
        if self._closing or self._input_closed:
            return
        if offset < len(data):
            self.data_received(data[offset:])

    def hand_over(self, protocol: asyncio.Protocol) -> asyncio.Transport | None:
        """Give the connection to ``protocol`` (a CONNECT tunnel, ``sidecar.proxy.passthrough``),
        which the caller then installs on the returned transport. What this connection batched is
        written first; the active exchange leaves with its new owner, who accounts for it; the
        listener forgets the connection. None, nothing changed, if the exchange being parsed is
        not the active one (a CONNECT pipelined behind another request: what followed it was read
        as HTTP) or the connection is closing."""
        transport = self.transport
        if transport is None or self._input_closed or self._parsing is not self._active:
            return None
        batch = self._batch
        if batch:
            transport.write(b"".join(batch))
            batch.clear()
        self._tunnel = protocol
        self.transport = None
        self._input_closed = self._closing = True
        self._active = None  # the parser still completes the message (on_message_complete)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._rt.connection_closed(self)
        return transport

    def handed_over_done(self, ex: Exchange) -> None:
        """The outcome of the exchange given away with :meth:`hand_over` is known (``ex.status``,
        or none if the client left first): account for it as :meth:`_finish` would."""
        if ex.done:
            return
        self._end(ex)
        status = ex.status
        if status:
            stats = self._rt.stats
            if status < 300:
                stats.downstream_rq_2xx += 1
            elif status < 500:
                stats.downstream_rq_4xx += 1
            else:
                stats.downstream_rq_5xx += 1

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

    def _peer(self) -> tuple | None:
        transport = self.transport
        return transport.get_extra_info("peername") if transport is not None else None

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

    # --- listener timeouts -----------------------------------------------------------------

    def check_timeouts(self, now: float, headers_timeout: float, idle_timeout: float) -> None:
        """The listener's sweep: time out a request head or an idle connection (0: no timeout).

        No timer is armed per request: the sweep notes the state it sees (the head of request
        number n in progress, or idle after n requests) and when it first saw it; a connection
        found in the same state ``timeout`` seconds later has made no progress all that time.
        A head is only timed while the connection reads (a paused read is our doing, not the
        client's); a connection that has sent nothing yet is idle, not in a head.
        """
        if self._input_closed or self.transport is None:
            return
        ex = self._parsing
        if ex is not None:
            if not headers_timeout or ex.headers_done or ex.discard or self._read_paused:
                self._swept = -1
                return
            state = 2 * self._rq_begun + 1
            timeout = headers_timeout
        elif self._active is None and idle_timeout:
            state = 2 * self._rq_begun
            timeout = idle_timeout
        else:
            self._swept = -1
            return
        if self._swept != state:
            self._swept = state
            self._swept_at = now
        elif now - self._swept_at >= timeout:
            self._swept = -1
            if state & 1:
                self._rt.stats.downstream_rq_header_timeout += 1
                self._reject(errors.REQUEST_HEADER_TIMEOUT, protocol_error=False)
            else:
                self._rt.stats.downstream_cx_idle_timeout += 1
                self._close()

