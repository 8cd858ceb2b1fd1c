"""The HTTP/1.1 server codec on httptools: a client connection's bytes to request streams and back.

One :class:`Http1ServerCodec` per downstream connection, fed by its connection manager
(:meth:`dispatch`). It is also the :class:`~sidecar.codec.api.ResponseEncoder` of its streams:
HTTP/1.1 answers one request at a time, so every encoder call is about the active stream.

Behaviour, in Envoy's terms:
- Keep-alive and pipelining: requests are answered strictly in order. A request parsed while an
  earlier one is being answered gets its stream at once (it counts as a downstream request) but is
  only decoded when it becomes the active one; meanwhile its events wait here, its body buffered
  up to ``BUFFER_LIMIT`` across the queue, past which reading pauses; at most ``MAX_PIPELINED``
  requests wait.
- Framing: Content-Length passes through; chunked bodies are re-chunked; a response without a
  length is chunked for HTTP/1.1 clients and close-delimited for HTTP/1.0 ones. Hop-by-hop headers
  never cross (:mod:`.headers`); trailers of a chunked request are dropped (Envoy's HTTP/1 default).
- Errors: malformed requests get 400, oversized heads 431, a head that takes too long 408
  (the listener's sweep calls :meth:`check_timeouts`), each after the responses of the requests
  before it, then the connection closes. Header sizes are summed only when a cheap bound (the
  bytes of the reads that carried the head) passes the limit.
- Draining (:meth:`go_away`): the active response says ``Connection: close`` and the connection
  closes after it; an idle connection closes at once.

Writes made while a read (or an upstream read, through :meth:`batch_begin`) is processed are
gathered and written once at its end.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from sidecar import quickack
from sidecar.codec import headers as h
from sidecar.codec.api import R_BUFFER, R_PIPELINE, R_UPSTREAM
from sidecar.tracing.context import TRACE_HEADERS

if TYPE_CHECKING:
    from sidecar.codec.api import RequestDecoder, ServerCallbacks

MAX_PIPELINED = 16  # requests parsed ahead of the one being answered
BUFFER_LIMIT = 64 * 1024  # request body bytes held per connection for requests not yet decoded
R_QUEUE = 8  # read_disable reason of the codec's own: the queued requests' bodies passed BUFFER_LIMIT

_REQUEST_HEADER_KIND = h.REQUEST_HEADER_KIND
_STATUS_LINES = h.STATUS_LINES
_CRLF = h.CRLF
_LAST_CHUNK = h.LAST_CHUNK
_chunk = h.chunk


class _Queued:
    """What a pipelined request did while it waited: replayed to its stream when it is active."""

    __slots__ = ("decoder", "headers_done", "keep_alive", "body", "size", "complete")

    def __init__(self, decoder: RequestDecoder) -> None:
        self.decoder = decoder
        self.headers_done = False
        self.keep_alive = True
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False


class _Parsing:
    """Per-message parse state (what the head said about framing and the connection)."""

    __slots__ = ("decoder", "queued", "headers_done", "ka_token", "conn_tokens", "discard", "url")

    def __init__(self, decoder: RequestDecoder | None, queued: _Queued | None) -> None:
        self.decoder = decoder
        self.queued = queued
        self.headers_done = False
        self.ka_token = False  # "Connection: keep-alive" was sent
        self.conn_tokens: set[bytes] | None = None  # header names listed in Connection
        self.discard = decoder is None  # after "Connection: close" or a refusal: read and dropped
        self.url = b""


class Http1ServerCodec:
    """One downstream HTTP/1.1 connection's codec (and the encoder of its active stream)."""

    __slots__ = (
        "_cb", "transport", "_parser", "_tracing", "_draining",
        "_active", "_queue", "_parsing", "_closing", "_input_closed", "_read_paused", "_buffered",
        "_batch", "_batching", "_error_after", "_awaiting_head", "_count_raw", "_head_size", "_head_raw",
        "_read_len", "_keep_alive", "_http10", "_expect", "_complete", "_is_head", "_resp_chunked",
        "_started", "_rq_begun", "_swept", "_swept_at", "_tunnel", "_write_paused",
    )

    def __init__(self, callbacks: ServerCallbacks, transport: asyncio.Transport, *, tracing: bool,
                 draining: bool = False) -> None:
        self._cb = callbacks
        self.transport: asyncio.Transport | None = transport
        self._parser = HttpRequestParser(self)
        self._tracing = tracing
        self._draining = draining  # responses say "Connection: close"
        self._active: RequestDecoder | None = None  # the stream being answered
        self._queue: deque[_Queued] = deque()  # parsed ahead, answered after it
        self._parsing: _Parsing | None = None
        self._closing = False  # no further requests are accepted on this connection
        self._input_closed = False  # ignore any further bytes from downstream
        self._read_paused = 0
        self._buffered = 0
        self._batch: list[bytes] = []
        self._batching = 0
        self._error_after: bytes | None = None  # a refusal to write once the active stream is answered
        self._awaiting_head = True
        self._count_raw = False
        self._head_size = 0  # bytes of headers not forwarded
        self._head_raw = 0  # bytes of earlier reads that were all head
        self._read_len = 0
        # The active stream's exchange, as this codec frames it.
        self._keep_alive = True
        self._http10 = False
        self._expect = False
        self._complete = False
        self._is_head = False
        self._resp_chunked = False
        self._started = False
        self._rq_begun = 0  # requests begun on this connection: the sweep's sign of progress
        self._swept = -1
        self._swept_at = 0.0
        self._tunnel: asyncio.Protocol | None = None
        self._write_paused = False  # the transport is above its high-water mark

    # --- ServerCodec --------------------------------------------------------------------------

    @property
    def active_streams(self) -> int:
        return (self._active is not None) + len(self._queue)

    @property
    def idle(self) -> bool:
        return self._active is None and self._parsing is None

    def dispatch(self, data: bytes) -> None:
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
                self._cb.protocol_error(f"malformed request: {exc}")
                self._reject(h.BAD_REQUEST)
        else:
            parsing = self._parsing
            if parsing is not None:
                # A head still incomplete after a read that started in it: every byte was head.
                if self._count_raw:
                    self._head_raw += len(data)
                    if self._head_raw > h.MAX_REQUEST_HEADERS_BYTES:
                        self._cb.protocol_error("request headers too large")
                        self._reject(h.HEADERS_TOO_LARGE)
                if not self._input_closed and self.transport is not None:
                    # More of this request is to come: a client that wrote the head and then the
                    # body with Nagle on waits for our ACK of what we just read (sidecar.quickack).
                    quickack.ack_now(self.transport)
        self.batch_end()

    def go_away(self) -> None:
        self._draining = True
        self._closing = True
        if self._active is None and self._parsing is None and not self._batching:
            self._close()

    def connection_lost(self) -> None:
        self.transport = None
        self._input_closed = True
        active, self._active = self._active, None
        queued = [q.decoder for q in self._queue]
        self._queue.clear()
        self._parsing = None
        if active is not None:
            active.on_reset()
        for decoder in queued:
            decoder.on_reset()

    def write_paused(self, paused: bool) -> None:
        self._write_paused = paused
        active = self._active
        if active is not None:
            active.on_write_paused(paused)

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

    # --- request parser callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._rq_begun += 1
        self._head_size = 0
        self._head_raw = 0
        if self._closing:
            self._parsing = _Parsing(None, None)
            return
        decoder = self._cb.new_stream(self)
        if self._active is None:
            self._active = decoder
            self._parsing = _Parsing(decoder, None)
        else:
            queued = _Queued(decoder)
            self._queue.append(queued)
            self._parsing = _Parsing(decoder, queued)
            if len(self._queue) >= MAX_PIPELINED:
                self._pause(R_PIPELINE)

    def on_url(self, url: bytes) -> None:
        p = self._parsing
        p.url = url if not p.url else p.url + url

    def on_header(self, name: bytes, value: bytes) -> None:
        p = self._parsing
        if p.headers_done or p.discard:
            return  # trailers of a chunked request are dropped
        ex = p.decoder
        lname = name.lower()
        kind = _REQUEST_HEADER_KIND.get(lname)
        if kind is None:
            ex.headers += (name, b": ", value, b"\r\n")
            return
        self._head_size += len(name) + len(value)
        if kind == h.H_TRACE:
            if not self._tracing:  # tracing off: trace headers pass through untouched
                ex.headers += (name, b": ", value, b"\r\n")
                self._head_size -= len(name) + len(value)
            elif ex.trace_in is None:
                ex.trace_in = [(TRACE_HEADERS[lname], value)]
            else:
                ex.trace_in.append((TRACE_HEADERS[lname], value))
        elif kind == h.H_REQUEST_ID:
            if ex.request_id is None and value:  # the first one, as Envoy; an empty one is none
                ex.request_id = value
        elif kind == h.H_HOST:
            # A second Host header makes the target ambiguous (RFC 9112 §3.2): refused below.
            ex.authority = value if not ex.authority else None
        elif kind == h.H_CONTENT_LENGTH:
            ex.has_body = value.strip() not in (b"0", b"")
            ex.headers += (name, b": ", value, b"\r\n")
        elif kind == h.H_TRANSFER_ENCODING:
            ex.chunked = ex.has_body = True  # the parser rejects a Transfer-Encoding not ending in chunked
        elif kind == h.H_EXPECT:
            if value.lower() == b"100-continue":
                ex.expect = True
            else:
                ex.headers += (name, b": ", value, b"\r\n")
        elif kind == h.H_CONNECTION:
            for token in value.lower().split(b","):
                token = token.strip()
                if token == b"keep-alive":
                    p.ka_token = True
                elif token not in h.CONNECTION_OPTIONS:
                    if p.conn_tokens is None:
                        p.conn_tokens = set()
                    p.conn_tokens.add(token)
        elif kind == h.H_CONTENT_TYPE:
            ex.grpc = value[:16].lower() == b"application/grpc"
            ex.headers += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        p = self._parsing
        p.headers_done = True
        self._awaiting_head = False
        self._count_raw = False
        if p.discard:
            return
        ex = p.decoder
        parser = self._parser
        ex.method = parser.get_method()
        ex.path = p.url
        if (self._head_raw + self._read_len > h.MAX_REQUEST_HEADERS_BYTES
                and self._head_size + len(p.url) + sum(map(len, ex.headers)) > h.MAX_REQUEST_HEADERS_BYTES):
            self._cb.protocol_error("request headers too large")
            self._reject(h.HEADERS_TOO_LARGE)
            return
        keep_alive = parser.should_keep_alive()
        # An HTTP/1.1 request is keep-alive unless it says close; only the others need the version
        # read (a string the parser formats on each call).
        http10 = False
        if not keep_alive or p.ka_token:
            version = parser.get_http_version()
            if version != "1.0" and version != "1.1":
                # HTTP/0.9 (a request line without a version, which the parser takes): not served,
                # nor sent on as HTTP/1.1 (it let "PRI http://svc/" through as a request).
                self._cb.protocol_error(f"HTTP/{version} is not supported")
                self._reject(h.BAD_REQUEST)
                return
            http10 = version == "1.0"
        if not ex.authority and p.url[:1] == b"/" and not http10:
            self._cb.protocol_error("an HTTP/1.1 request needs exactly one Host header")
            self._reject(h.BAD_HOST)  # missing or repeated (RFC 9112 §3.2)
            return
        if ex.has_body and parser.should_upgrade():
            # The parser reads no body after an Upgrade (or CONNECT) head: the bytes are the new
            # protocol's. Upgrades are not proxied, so its body would be parsed as the next request
            # while the head went upstream promising it (a smuggling vector): refused.
            self._cb.protocol_error("an Upgrade or CONNECT request with a body")
            self._reject(h.BAD_REQUEST)
            return
        if ex.authority is None:
            ex.authority = b""
        if p.conn_tokens:
            ex.headers = h.strip_named(ex.headers, p.conn_tokens)
        if http10:
            ex.version = 10
            ex.expect = False
        if not keep_alive:
            self._closing = True
        queued = p.queued
        if queued is None:
            self._keep_alive = keep_alive
            self._http10 = ex.version == 10
            self._expect = ex.expect
            self._is_head = ex.method == b"HEAD"
            # No Content-Length and no chunked: the request ends with its head (RFC 9112 §6.3).
            self._complete = end = not ex.has_body
            ex.decode_headers(end)
            if self._write_paused and self._active is ex:
                ex.on_write_paused(True)  # still full from the response before: its upstream waits too
        else:
            queued.headers_done = True
            queued.keep_alive = keep_alive

    def on_body(self, body: bytes) -> None:
        p = self._parsing
        if p.discard:
            return
        queued = p.queued
        if queued is None:
            p.decoder.decode_data(body, False)
            return
        queued.body.append(body)
        queued.size += len(body)
        self._buffered += len(body)
        if self._buffered > BUFFER_LIMIT:
            self._pause(R_QUEUE)

    def on_message_complete(self) -> None:
        p = self._parsing
        self._parsing = None
        self._awaiting_head = True
        if p.discard:
            return
        queued = p.queued
        if queued is None:
            if p.decoder is self._active and not self._complete:
                self._complete = True
                p.decoder.decode_data(b"", True)
            return
        queued.complete = True

    # --- ResponseEncoder (of the active stream) -------------------------------------------------

    def encode_headers(self, status: int, headers: list[bytes], end_stream: bool) -> None:
        out = [_STATUS_LINES[status] if status < 1000 else _STATUS_LINES[500]]
        out += headers
        self._started = True
        names = headers[0::4]
        if self._is_head or status == 204 or status == 304 or b"content-length" in names:
            pass
        elif end_stream:
            out.append(b"content-length: 0\r\n")  # (an HTTP/2 head with END_STREAM: a trailers-only gRPC reply)
        else:
            if self._http10:
                self._keep_alive = False  # HTTP/1.0 has no chunked: the body ends when we close
            else:
                self._resp_chunked = True
                out.append(h.CHUNKED_HEADER)
        if self._draining:
            self._keep_alive = False
        if not self._keep_alive:
            self._closing = True
            out.append(h.CONNECTION_CLOSE)
        elif self._http10:
            out.append(h.CONNECTION_KEEP_ALIVE)
        out.append(_CRLF)
        if self._batching:
            self._batch += out
        elif self.transport is not None:
            self.transport.writelines(out)
        if end_stream:
            self._response_done()

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        if data and not self._is_head:  # (an HTTP/2 upstream may send a body with its answer to HEAD)
            if self._resp_chunked:
                if self._batching:
                    self._batch += _chunk(data)
                elif self.transport is not None:
                    self.transport.writelines(_chunk(data))
            else:
                self._write(data)
        if end_stream:
            if self._resp_chunked:
                self._write(_LAST_CHUNK)
            self._response_done()

    def encode_trailers(self, trailers: list[bytes]) -> None:
        self.encode_data(b"", True)  # an HTTP/1.1 client gets no trailers: the body just ends

    def encode_100_continue(self) -> None:
        if self._expect and not self._complete:
            self._expect = False
            self._write(h.CONTINUE_100)

    def encode_local_reply(self, status: int, flag: str, body: bytes, close: bool) -> None:
        # A client waiting for 100 Continue may or may not send its body now: close to be safe.
        if close or self._draining or (self._expect and not self._complete):
            self._keep_alive = False
        data = h.local_reply_bytes(status, flag, body, not self._keep_alive)
        if self._is_head and body:
            data = data[: -len(body)]  # the answer to HEAD has the head of the reply, no body (RFC 9110 §9.3.2)
        self._write(data)
        if not self._keep_alive:
            self._closing = True
        self._response_done()

    def reset(self) -> None:
        """Reset the downstream connection (a response was cut short)."""
        self._input_closed = True
        self._closing = True
        transport = self.transport
        if transport is not None:
            self._batch.clear()
            self.transport = None
            transport.abort()  # connection_lost resets what is left

    def read_disable(self, reason: int, disabled: bool) -> None:
        if disabled:
            self._pause(reason)
        else:
            self._resume(reason)

    # --- the next request ---------------------------------------------------------------------

    def _response_done(self) -> None:
        """The active stream's response is written: serve the next request, or close."""
        self._active = None
        self._resp_chunked = False
        self._started = False
        if self._read_paused & (R_BUFFER | R_UPSTREAM):
            self._resume(R_BUFFER | R_UPSTREAM)  # what the answered stream paused is over with it
        if not self._keep_alive or self._draining:
            self._closing = True
            queue = [q.decoder for q in self._queue]
            self._queue.clear()
            self._buffered = 0
            for decoder in queue:
                decoder.on_reset()
            self._close()
            return
        queue = self._queue
        if self._read_paused & R_PIPELINE and len(queue) <= MAX_PIPELINED:
            self._resume(R_PIPELINE)
        if not queue:
            if self._error_after is not None:
                self._write(self._error_after)
                self._close()
            return
        nxt = queue.popleft()
        self._active = nxt.decoder
        self._keep_alive = True
        self._complete = False
        if not nxt.headers_done:
            # Its head is still arriving: on_headers_complete decodes it, as the active request now.
            p = self._parsing
            if p is not None and p.queued is nxt:
                p.queued = None
            return
        self._replay(nxt)

    def _replay(self, queued: _Queued) -> None:
        decoder = queued.decoder
        body = queued.body
        self._keep_alive = queued.keep_alive
        self._http10 = decoder.version == 10
        self._expect = decoder.expect
        self._is_head = decoder.method == b"HEAD"
        if self._parsing is not None and self._parsing.queued is queued:
            self._parsing.queued = None  # the rest of it goes straight to the stream
        self._buffered -= queued.size
        if self._read_paused & R_QUEUE and self._buffered <= BUFFER_LIMIT:
            self._resume(R_QUEUE)
        decoder.decode_headers(False)
        if self._write_paused and self._active is decoder:
            decoder.on_write_paused(True)
        for chunk in body:
            if self._active is not decoder:
                return
            decoder.decode_data(chunk, False)
        if queued.complete and self._active is decoder:
            self._complete = True
            decoder.decode_data(b"", True)

    def _reject(self, reply: h.CodecReply) -> None:
        """A protocol error (400, 431) or a request head timeout (408): answer once every earlier
        request is answered, then close."""
        self._input_closed = True
        self._closing = True
        data = h.local_reply_bytes(reply.status, reply.flag, reply.body, True)
        p = self._parsing
        bad = p.decoder if p is not None and not p.discard else None
        if bad is not None and bad.method == b"HEAD":
            data = data[: -len(reply.body)]  # a HEAD whose head was read: no body in the answer either
        if bad is not None:
            if bad is self._active:
                self._active = None
                bad.on_local_reply(reply.status, reply.flag)
                if not self._started:
                    self._write(data)
                    self._close()
                else:
                    self.reset()
                return
            if p.queued is not None and p.queued in self._queue:
                self._queue.remove(p.queued)
                self._buffered -= p.queued.size
                bad.on_local_reply(reply.status, reply.flag)  # answered after those before it
            elif p.queued is None:
                # Answered already (a reply before its body ended): a request gets one response.
                self._close()
                return
        if self._active is None:
            self._write(data)
            self._close()
        else:
            self._error_after = data

    def _after_upgrade(self, data: bytes, exc: HttpParserUpgrade) -> None:
        # Upgrades are not proxied (Upgrade is hop-by-hop and stripped); CONNECT was answered or
        # tunnelled when decoded. The parser stops after such a message: what follows it is the
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
            self.dispatch(data[offset:])

    def hand_over(self, protocol: asyncio.Protocol) -> asyncio.Transport | None:
        """Give the connection to ``protocol`` (a CONNECT tunnel), which the caller installs on
        the returned transport. What was batched is written first. None, nothing changed, if the
        request being parsed is not the active one (a CONNECT pipelined behind another request)."""
        transport = self.transport
        p = self._parsing
        if transport is None or self._input_closed or p is None or p.decoder is not self._active:
            return None
        batch = self._batch
        if batch:
            transport.write(b"".join(batch))
            batch.clear()
        self._tunnel = protocol
        self.transport = None
        self._input_closed = self._closing = True
        self._active = None
        p.discard = True  # the parser still completes the message
        return transport

    # --- helpers ------------------------------------------------------------------------------

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

    def _close(self) -> None:
        self._input_closed = True
        self._closing = True
        transport = self.transport
        if transport is None or self._batching:
            return  # batch_end closes once the batch is written
        self._cb.closing()
        transport.close()

    # --- listener timeouts --------------------------------------------------------------------

    def check_timeouts(self, now: float, headers_timeout: float, idle_timeout: float) -> str:
        """The listener's sweep: time out a request head or an idle connection (0: no timeout).
        Returns ``"head"`` or ``"idle"`` for what timed out, else ``""``.

        No timer is armed per request: the sweep notes the state it sees (the head of request
        number n in progress, or idle after n requests) and when it first saw it; a connection
        found in the same state ``timeout`` seconds later has made no progress all that time.
        A head is only timed while the connection reads (a paused read is our doing, not the
        client's); a connection that has sent nothing yet is idle, not in a head.
        """
        if self._input_closed or self.transport is None:
            return ""
        p = self._parsing
        if p is not None:
            if not headers_timeout or p.headers_done or p.discard or self._read_paused:
                self._swept = -1
                return ""
            state = 2 * self._rq_begun + 1
            timeout = headers_timeout
        elif self._active is None and idle_timeout:
            state = 2 * self._rq_begun
            timeout = idle_timeout
        else:
            self._swept = -1
            return ""
        if self._swept != state:
            self._swept = state
            self._swept_at = now
            return ""
        if now - self._swept_at < timeout:
            return ""
        self._swept = -1
        if state & 1:
            self._reject(h.REQUEST_HEADER_TIMEOUT)
            return "head"
        self._close()
        return "idle"
