"""The interfaces between codecs and the request path (the seam HTTP/1.1 and HTTP/2 share).

Every call is made on the event loop and never raises into the codec: a callee that fails answers
or resets. Headers are *pieces* (:mod:`sidecar.codec.headers`): ``[name, b": ", value, b"\\r\\n", ...]``,
names as the peer sent them (HTTP/2 ones are lower case; an HTTP/2 encoder lower-cases what it
writes), pseudo-headers never among them.

Downstream: a server codec per client connection
-------------------------------------------------
The connection manager creates it with itself as :class:`ServerCallbacks` and feeds it the
connection's bytes (:meth:`ServerCodec.dispatch`). For each request the codec calls
:meth:`ServerCallbacks.new_stream` with the stream's :class:`ResponseEncoder` and gets the
:class:`RequestDecoder` to fill and feed:

1. it sets the request head on the decoder (:class:`RequestHead`'s fields), then calls
   ``decode_headers(end_stream)``;
2. ``decode_data(data, end_stream)`` for each piece of body, ``decode_trailers(trailers)`` for
   trailers (which end the request);
3. ``on_reset()`` if the client reset the stream or the connection went away before the response
   ended: the stream is over, the decoder stops using its encoder.

The response goes back through the encoder: ``encode_headers`` (a status >= 200), then
``encode_data`` and ``encode_trailers``; ``end_stream`` on the last of them. ``reset`` cuts a
response short (HTTP/1.1 resets the connection; HTTP/2 sends RST_STREAM).

Flow control, both ways, never buffers without bound:
- into the client: ``read_disable(reason, True)`` asks the codec to stop taking request data for
  this stream until every reason is cleared (HTTP/1.1 stops reading the socket; HTTP/2 withholds
  WINDOW_UPDATE for the stream);
- out to the client: the codec calls ``RequestDecoder.on_write_paused(True)`` when the response
  cannot be written on without buffering past the high-water mark (HTTP/1.1: the socket's write
  buffer; HTTP/2: the stream's or the connection's send window is spent), ``False`` when it can.

Upstream: a client codec per pooled connection
-----------------------------------------------
A pool (:mod:`sidecar.upstream.pool`) hands the router a :class:`RequestEncoder` once a
connection can take a stream (``PoolCallbacks.on_pool_ready``) or says why not (``on_pool_failure``).
The codec reports the response to the router's :class:`ResponseDecoder`.
"""

from __future__ import annotations

from typing import Protocol

# read_disable reasons (a bit mask: reading resumes when all are clear).
R_BUFFER = 1  # the router holds this stream's request bytes while no upstream can take them
R_UPSTREAM = 2  # the upstream's write buffer passed its high-water mark
R_PIPELINE = 4  # HTTP/1.1: too many pipelined requests wait to be answered

# Upstream reset flags, Envoy's response flags: the connection closed or the stream was reset before
# the response ended (UC), or the response could not be parsed (UPE). An HTTP/2 REFUSED_STREAM is UC
# too, with ``refused`` set on the reset so a retry policy with ``refused-stream`` can take it.
RESET_TERMINATION = "UC"
RESET_PROTOCOL_ERROR = "UPE"


class RequestHead(Protocol):
    """The request head a server codec sets on a :class:`RequestDecoder` before ``decode_headers``."""

    method: bytes
    authority: bytes  # Host or :authority; b"" when the request had none (HTTP/1.0)
    path: bytes  # the request target: origin-form, or absolute-form from an HTTP/1.1 proxy client
    headers: list[bytes]  # forwardable headers as pieces: no hop-by-hop, no pseudo-headers
    version: int  # 10, 11 or 20
    chunked: bool  # a body of unknown length follows (HTTP/1.1 chunked; HTTP/2 without content-length)
    has_body: bool
    grpc: bool  # content-type application/grpc*: local replies are gRPC statuses
    expect: bool  # "Expect: 100-continue" waits for encode_100_continue (HTTP/1.1)
    trace_in: list[tuple[int, bytes]] | None  # trace context headers (kind, value) while tracing is on
    request_id: bytes | None  # the first non-empty x-request-id


class RequestDecoder(RequestHead, Protocol):
    """One request stream as the connection manager holds it."""

    def decode_headers(self, end_stream: bool) -> None: ...

    def decode_data(self, data: bytes, end_stream: bool) -> None: ...

    def decode_trailers(self, trailers: list[bytes]) -> None: ...

    def on_reset(self) -> None: ...

    def on_local_reply(self, status: int, flag: str) -> None:
        """The codec answered this stream itself (400, 431, 408: a request it cannot pass on) or
        will once the streams before it are answered; the stream is over."""

    def on_write_paused(self, paused: bool) -> None: ...


class ResponseEncoder(Protocol):
    """A server codec's side of one stream."""

    def encode_headers(self, status: int, headers: list[bytes], end_stream: bool) -> None:
        """``headers`` carries content-length when the length is known; HTTP/1.1 chunks the body
        otherwise (or delimits it by closing, for an HTTP/1.0 client)."""

    def encode_data(self, data: bytes, end_stream: bool) -> None: ...

    def encode_trailers(self, trailers: list[bytes]) -> None:
        """End the response with trailers (HTTP/1.1 drops them: a chunked body just ends)."""

    def encode_100_continue(self) -> None:
        """Invite the body of a request that said ``Expect: 100-continue`` (a no-op for HTTP/2)."""

    def encode_local_reply(self, status: int, flag: str, body: bytes, close: bool) -> None:
        """A whole response the proxy made itself (JSON ``body``, flag in ``x-meshkeeper-flags``);
        ``close``: HTTP/1.1 closes the connection after it."""

    def reset(self) -> None: ...

    def read_disable(self, reason: int, disabled: bool) -> None: ...


class ServerCallbacks(Protocol):
    """What a server codec calls on its connection manager."""

    def new_stream(self, encoder: ResponseEncoder) -> RequestDecoder: ...

    def protocol_error(self, detail: str) -> None:
        """The client broke the protocol (counted as downstream_cx_protocol_error; the codec has
        answered or closed as its protocol says)."""

    def closing(self) -> None:
        """The codec is closing the connection itself (not the client: after ``Connection: close``,
        a drain, an idle timeout or an error)."""


class ServerCodec(Protocol):
    """One downstream connection's codec."""

    def dispatch(self, data: bytes) -> None: ...

    def go_away(self) -> None:
        """Drain: no new streams (HTTP/1.1: ``Connection: close`` on the next response; HTTP/2:
        GOAWAY with the last stream id); streams in flight finish."""

    def connection_lost(self) -> None:
        """The socket is gone: every open stream gets ``on_reset``."""

    def write_paused(self, paused: bool) -> None:
        """The transport passed (or fell back under) its high-water mark."""

    @property
    def active_streams(self) -> int: ...


class ResponseDecoder(Protocol):
    """What a client codec reports one response to (the router's upstream request)."""

    def on_response_headers(self, status: int, headers: list[bytes], end_stream: bool) -> None: ...

    def on_response_data(self, data: bytes, end_stream: bool) -> None: ...

    def on_response_trailers(self, trailers: list[bytes]) -> None: ...

    def on_upstream_reset(self, flag: str, refused: bool = False) -> None:
        """The stream is over before the response ended (``flag``: UC or UPE). ``refused``: the
        upstream never processed the request (HTTP/2 REFUSED_STREAM, a stream above a GOAWAY's last
        stream id, or one the connection could no longer open), so any retry policy may retry it
        (Envoy's ``refused-stream``); HTTP/1.1 codecs never set it."""

    def on_write_paused(self, paused: bool) -> None: ...

    def batch_begin(self) -> None: ...

    def batch_end(self) -> None: ...


class RequestEncoder(Protocol):
    """A client codec's side of one stream, for the router."""

    def encode_headers(self, method: bytes, authority: bytes, path: bytes, headers: list[bytes], *,
                       end_stream: bool, chunked: bool, is_head: bool, body: list[bytes] | None = None) -> None:
        """The request head; ``body``: request bytes received already (a retry's replay, or what
        arrived while the connection was made), sent right after it (HTTP/1.1: in the same write);
        ``end_stream`` then ends the request after them."""

    def encode_data(self, data: bytes, end_stream: bool) -> None: ...

    def encode_trailers(self, trailers: list[bytes]) -> None: ...

    def reset(self) -> None:
        """Abandon the stream (HTTP/1.1: the connection is reset and never pooled again)."""

    def read_disable(self, disabled: bool) -> None: ...
