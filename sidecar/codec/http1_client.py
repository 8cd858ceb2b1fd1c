"""The HTTP/1.1 client codec on httptools: one upstream connection, one request at a time.

:class:`Http1ClientConnection` is an ``asyncio.Protocol`` and the
:class:`~sidecar.codec.api.RequestEncoder` of the stream it carries: the router writes the request
through it and its parser reports the response to the stream's
:class:`~sidecar.codec.api.ResponseDecoder`. Its pool (:mod:`sidecar.upstream.pool`) is told when
it opens, comes free (the response allowed keep-alive and the whole request was written) or closes.

Rules that keep a pool honest:
- ``should_keep_alive()`` and the status code are read inside the parser's callbacks: httptools
  resets its per-message state once ``feed_data()`` returns.
- Bytes arriving on an idle connection mean the upstream is confused: the connection is closed.
  So do bytes after a response in the read that ended it (an answer to a request not sent yet: we
  never pipeline), even when the next stream took the connection in the meantime: a protocol error.
- Responses without a body: 1xx interim responses are skipped, 204 and 304 are known to the parser,
  and for HEAD (which the parser cannot know about) the message is finished at headers-complete and
  the parser replaced by a fresh one. Trailers of a chunked response are dropped (Envoy's HTTP/1
  default). ``content-length`` is handed on with a lower-case name, so the other side can tell a
  body of known length with one lookup.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from sidecar import quickack
from sidecar.codec import headers as h
from sidecar.codec.api import RESET_PROTOCOL_ERROR, RESET_TERMINATION, ResponseDecoder

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
_REQUEST_LINE_HOST = b" HTTP/1.1\r\nhost: "


class ConnectionOwner(Protocol):
    """What a client connection tells its pool."""

    stats: object  # upstream_cx_protocol_error, upstream_cx_destroy_remote_with_active_rq

    def opened(self, conn: Http1ClientConnection) -> None: ...

    def lost(self, conn: Http1ClientConnection) -> None: ...

    def stream_done(self, conn: Http1ClientConnection, reusable: bool) -> None:
        """The stream ended (response complete, reset or abandoned); ``reusable``: the connection
        may carry another request."""


class Http1ClientConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to an endpoint; serves one request at a time."""

    __slots__ = (
        "pool", "transport", "decoder", "requests", "idle_since", "closed", "request_done",
        "_parser", "_is_head", "_head", "_head_size", "_head_raw", "_read_len", "_in_head", "_body_kind",
        "_conn_tokens", "_chunked", "_interim", "_finished", "_reset_parser", "_read_paused", "write_paused",
        "_held", "_head_ended", "_ended_in_read",
    )

    def __init__(self, pool: ConnectionOwner) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.decoder: ResponseDecoder | None = None
        self.requests = 0  # responses completed on this connection; > 0 means "reused"
        self.idle_since = 0.0
        self.closed = False
        self.request_done = False  # the whole request (head and body) has been written
        self.write_paused = False
        self._parser = HttpResponseParser(self)
        self._is_head = False
        self._head: list[bytes] = []
        self._head_size = 0  # bytes of dropped headers (the forwarded ones are counted on demand)
        self._head_raw = 0  # bytes of earlier reads that were all head
        self._read_len = 0
        self._conn_tokens: set[bytes] | None = None  # headers named by Connection: dropped too
        self._chunked = False  # the request body is sent chunked
        self._in_head = False
        self._body_kind = BODY_NONE
        self._interim = False
        self._finished = True
        self._reset_parser = False
        self._read_paused = False
        # The last body piece of a read, held until the read is parsed: when the message ends in the
        # same read it goes out with the end (one call instead of two, the usual whole response).
        self._held: bytes | None = None
        # The response ended at its head (HEAD, 204, 304): the parser's on_message_complete for it
        # is not about the stream the connection may carry by then.
        self._head_ended = False
        self._ended_in_read = False  # a response ended in the read being parsed

    @property
    def capacity(self) -> int:
        """Streams this connection can take now: one when idle, else none."""
        return 1 if self.decoder is None and not self.closed else 0

    def attach(self, decoder: ResponseDecoder) -> Http1ClientConnection:
        """Carry ``decoder``'s stream; returns its encoder (this connection)."""
        self.decoder = decoder
        self.request_done = False
        self._finished = False
        self._in_head = True
        self._head_raw = 0
        self._head_size = 0
        self._head = []
        self._conn_tokens = None
        self._body_kind = BODY_NONE
        return self

    # --- RequestEncoder -----------------------------------------------------------------------

    def encode_headers(self, method: bytes, authority: bytes, path: bytes, headers: list[bytes], *,
                       end_stream: bool, chunked: bool, is_head: bool, body: list[bytes] | None = None) -> None:
        """The request head in one write, with ``body`` (already received request bytes) after it."""
        self._is_head = is_head
        self._chunked = chunked = chunked and not (end_stream and not body)
        if end_stream and not body and not chunked:  # the usual GET: one join, no list to grow
            self.request_done = True
            transport = self.transport
            if transport is not None:
                transport.write(b"".join((method, b" ", path, _REQUEST_LINE_HOST, authority, h.CRLF,
                                          *headers, h.CRLF)))
            return
        parts = [method, b" ", path, _REQUEST_LINE_HOST, authority, h.CRLF]
        parts += headers
        if chunked:
            parts.append(h.CHUNKED_HEADER)
        parts.append(h.CRLF)
        if body:
            if chunked:
                for data in body:
                    if data:
                        parts += h.chunk(data)
            else:
                parts += body
        if end_stream:
            self.request_done = True
            if chunked:
                parts.append(h.LAST_CHUNK)
        transport = self.transport
        if transport is not None:
            transport.write(b"".join(parts))

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        transport = self.transport
        if transport is not None:
            if self._chunked:
                if data:
                    transport.writelines(h.chunk(data))
                if end_stream:
                    transport.write(h.LAST_CHUNK)
            elif data:
                transport.write(data)
        if end_stream:
            self.request_done = True

    def encode_trailers(self, trailers: list[bytes]) -> None:
        self.encode_data(b"", True)  # trailers are not sent on HTTP/1.1

    def reset(self) -> None:
        """Abandon the stream: the connection is reset and never pooled again (a no-op once the
        stream has ended: the connection may carry another by now)."""
        if self.decoder is None:
            return
        self.decoder = None
        self.pool.stream_done(self, False)
        self.abort()

    def read_disable(self, disabled: bool) -> None:
        if disabled:
            if not self._read_paused and self.transport is not None:
                self._read_paused = True
                self.transport.pause_reading()
        elif self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    # --- for the pool -------------------------------------------------------------------------

    def abort(self) -> None:
        """Reset the connection; no decoder is told."""
        self.decoder = None
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True
            transport.abort()

    def close(self) -> None:
        self.decoder = None
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
        decoder = self.decoder
        self.decoder = None
        if decoder is not None:
            self.pool.stream_done(self, False)
        self.pool.lost(self)
        if decoder is None:
            return
        if self._body_kind == BODY_EOF and not self._in_head and not self._finished:
            # A close-delimited body ends here: the response is complete.
            self._finished = True
            held, self._held = self._held, None
            decoder.batch_begin()
            decoder.on_response_data(held or b"", True)
            decoder.batch_end()
            return
        self.pool.stats.upstream_cx_destroy_remote_with_active_rq += 1
        decoder.on_upstream_reset(RESET_TERMINATION)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.decoder is not None:
            self.decoder.on_write_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.decoder is not None:
            self.decoder.on_write_paused(False)

    def data_received(self, data: bytes) -> None:
        decoder = self.decoder
        if decoder is None:
            # Nothing was asked: a late or unsolicited response. Never reuse this connection.
            self.close()
            return
        counting = self._in_head
        self._read_len = len(data)
        self._head_ended = self._ended_in_read = False
        decoder.batch_begin()
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
            elif counting and self._in_head and self.decoder is not None:
                self._head_raw += len(data)
                if self._head_raw > MAX_RESPONSE_HEADERS_BYTES:
                    self._protocol_error()
            held = self._held
            if held is not None:
                self._held = None
                if self.decoder is not None and not self._finished:
                    self.decoder.on_response_data(held, False)
            if not self._finished and self.decoder is not None and self.transport is not None:
                # More of this response is to come: an app that wrote the head and then the body
                # with Nagle on waits for our ACK of what we just read (sidecar.quickack).
                quickack.ack_now(self.transport)
        decoder.batch_end()

    # --- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._ended_in_read:
            # A response in the read that ended the one before: an answer to a request not sent
            # yet (we never pipeline). Never the next stream's: a protocol error (HttpParserCallbackError).
            raise ValueError("unsolicited response")

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
            self._head += (b"content-length", b": ", value, b"\r\n")
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
        decoder = self.decoder
        if decoder is None:
            return
        status = self._parser.get_status_code()
        self._in_head = False
        if status < 200:
            # 100 Continue (we answer that ourselves) and other interim responses are not
            # forwarded; the parser treats them as complete bodiless messages.
            self._interim = True
            self._in_head = True
            self._head = []
            self._conn_tokens = None
            self._head_size = 0
            self._body_kind = BODY_NONE
            return
        if (self._head_raw + self._read_len > MAX_RESPONSE_HEADERS_BYTES
                and self._head_size + sum(map(len, self._head)) > MAX_RESPONSE_HEADERS_BYTES):
            self._protocol_error()
            return
        if self._conn_tokens is not None:
            self._head = h.strip_named(self._head, self._conn_tokens)
            self._conn_tokens = None
        kind = self._body_kind
        if self._is_head or status == 204 or status == 304:
            kind = BODY_NONE
        elif kind == BODY_NONE:
            kind = BODY_EOF
        self._body_kind = kind
        if kind == BODY_NONE:
            # The parser expects a body that a HEAD response never carries: finish here (and,
            # for HEAD, start a fresh parser for the next response on this connection).
            if self._is_head:
                self._reset_parser = True
            self._head_ended = True
            self._finish(self._parser.should_keep_alive(), status)
            return
        decoder.on_response_headers(status, self._head, False)

    def on_body(self, body: bytes) -> None:
        if self._interim:
            # A 1xx has no body (RFC 9110 §15.2); the parser reads one after 104..199 with a length.
            # It must not reach the client ahead of the final head: a protocol error.
            raise ValueError("a body on an interim (1xx) response")
        decoder = self.decoder
        if decoder is not None and not self._finished:
            held = self._held
            self._held = body
            if held is not None:
                decoder.on_response_data(held, False)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._head_ended:
            self._head_ended = False
            return
        if self._finished or self.decoder is None:
            return
        # Read keep-alive here: httptools forgets it once feed_data() returns.
        self._finish(self._parser.should_keep_alive())

    # --- internals ----------------------------------------------------------------------------

    def _finish(self, keep_alive: bool, head_status: int = 0) -> None:
        """The response is complete (``head_status``: it was a head alone, which ends it)."""
        decoder = self.decoder
        self._finished = True
        self._ended_in_read = True
        self._body_kind = BODY_NONE
        self.decoder = None
        self.requests += 1
        # Released before the decoder hears of it, so the next request can reuse this connection.
        reusable = keep_alive and self.request_done and not self.closed
        if not reusable:
            self.close()
        self.pool.stream_done(self, reusable)
        held, self._held = self._held, None
        if decoder is not None:
            if head_status:
                decoder.on_response_headers(head_status, self._head, True)
            else:
                decoder.on_response_data(held or b"", True)

    def _protocol_error(self) -> None:
        self._held = None
        decoder = self.decoder
        self.pool.stats.upstream_cx_protocol_error += 1
        self.decoder = None
        if decoder is not None:
            self.pool.stream_done(self, False)
        self.abort()
        if decoder is not None and not self._finished:
            self._finished = True
            decoder.on_upstream_reset(RESET_PROTOCOL_ERROR)
