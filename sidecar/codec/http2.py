"""The downstream HTTP/2 codec (Envoy's ``Http2::ServerConnectionImpl``): h2c with prior knowledge,
one :class:`Http2ServerCodec` per client connection, on the ``h2`` package (sans-IO).

The connection manager creates it once it has seen the client preface, and feeds it every read
(:meth:`~Http2ServerCodec.dispatch`, the preface first). Each request stream becomes a
:class:`~sidecar.codec.api.RequestDecoder` (from ``ServerCallbacks.new_stream``) and the stream
object itself is its :class:`~sidecar.codec.api.ResponseEncoder`. Writes, send queues, write
watermarks and receive credit are :mod:`.http2_session`'s.

- **The request head.** ``:method``, ``:authority`` (else Host) and ``:path`` fill the head; other
  fields become pieces, less those the connection manager consumes (:data:`REQUEST_HEADER_KIND`:
  Host, hop-by-hop ones, Expect; trace context and ``x-request-id`` while tracing is on, forwarded
  while it is off). ``te: trailers`` is forwarded: gRPC servers require it. ``chunked`` means no
  content-length; ``grpc`` a content-type of ``application/grpc*``.
- **Responses.** Names are lower-cased and connection-specific fields dropped (RFC 9113 §8.2.2).
  A response that ends before its request is followed by RST_STREAM(NO_ERROR) (RFC 9113 §8.1: the
  rest of the request is not needed), as Envoy does. ``reset()`` sends RST_STREAM(INTERNAL_ERROR): a
  gRPC client reads it as INTERNAL, not as a clean end.
- **Drain.** ``go_away()`` is RFC 9113 §6.8's graceful shutdown, as Envoy drains: GOAWAY(NO_ERROR,
  2^31-1) says "no new streams" while refusing none, and a PING follows it; the PING's ACK comes
  after every stream the client opened before it read the notice, so the final GOAWAY it triggers
  names the highest stream id received. Streams up to it finish, a later one is refused with
  REFUSED_STREAM (safe for the client to retry), and the connection closes once none is left. With
  one GOAWAY only, requests crossing it on the wire were refused, and on a connection opened while
  draining (the preface read before the first HEADERS) even the first request was.
- **Limits.** SETTINGS advertise :data:`DEFAULT_MAX_CONCURRENT_STREAMS` and the header list limit
  (Envoy's 60 KiB ``max_request_headers_kb``). A request over the limit is answered 431 (flag DPE)
  here and reported as ``on_local_reply`` and ``protocol_error``; the connection stays up (RFC 9113
  §10.5.1), and HPACK itself stops only a bomb (twice the limit: ENHANCE_YOUR_CALM). h2 treats a
  stream over the concurrency limit and a malformed request as connection errors: it checks before
  decoding HPACK, whose state would otherwise be lost.
- **Errors.** A bad preface, a bad frame or a flow-control violation: GOAWAY with h2's error code,
  ``protocol_error``, ``on_reset`` to every open stream, and the codec closes the connection
  (``closing`` first). PING is answered by h2.

Calls into decoders never raise (api.py); an encoder call that h2 refuses (the stream is gone, the
fields are invalid) resets the stream and the decoder gets ``on_reset``, possibly inside its own
``encode_*`` call.

The upstream side, :class:`Http2ClientConnection` and the pool interface
:class:`Http2PoolCallbacks`, lives in :mod:`.http2_client` and is exported here too.
"""

from __future__ import annotations

import asyncio
import json

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import FrameTooLargeError, H2Error

from sidecar.codec.api import RequestDecoder, ServerCallbacks
from sidecar.codec.headers import (
    H_CONNECTION,
    H_CONTENT_LENGTH,
    H_DROP,
    H_EXPECT,
    H_HOST,
    H_REQUEST_ID,
    H_TRACE,
    H_TRANSFER_ENCODING,
    REQUEST_HEADER_KIND,
)
from sidecar.codec.http2_client import Http2ClientConnection, Http2PoolCallbacks
from sidecar.codec.http2_session import (
    DEFAULT_CONNECTION_WINDOW_SIZE,
    DEFAULT_INITIAL_WINDOW_SIZE,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_HEADER_LIST_SIZE,
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    Session,
    Stream,
    h2_fields,
    new_h2,
    pieces_of,
)
from sidecar.tracing.context import TRACE_HEADERS

__all__ = [
    "DEFAULT_CONNECTION_WINDOW_SIZE", "DEFAULT_INITIAL_WINDOW_SIZE", "DEFAULT_MAX_CONCURRENT_STREAMS",
    "DEFAULT_MAX_HEADER_LIST_SIZE", "WRITE_HIGH_WATER", "WRITE_LOW_WATER",
    "Http2ClientConnection", "Http2PoolCallbacks", "Http2ServerCodec",
]

# Kinds of REQUEST_HEADER_KIND an HTTP/2 request forwards: all but those consumed below (Host, the
# hop-by-hop ones, Expect, and trace context while tracing is on); a kind added for HTTP/1.1's sake
# (Content-Length, Content-Type) is forwarded.
_CONSUMED_KINDS = frozenset((H_HOST, H_CONNECTION, H_DROP, H_TRANSFER_ENCODING, H_EXPECT, H_TRACE, H_REQUEST_ID))
_FORWARDED_KINDS = frozenset(REQUEST_HEADER_KIND.values()) - _CONSUMED_KINDS

_STATUS = [b"%d" % code for code in range(1000)]
_HEADERS_TOO_LARGE = json.dumps({"error": "request headers too large", "flags": "DPE"}).encode()
_MAX_STREAM_ID = 2**31 - 1  # the drain notice's last stream id: refuses nothing
_DRAIN_PING = b"drain\x00\x00\x00"  # the PING after it, told from others by its data



class _ServerStream(Stream):
    """One request stream: the :class:`~sidecar.codec.api.ResponseEncoder` its decoder writes to."""

    __slots__ = ("codec", "decoder", "headers_sent")

    def __init__(self, codec: Http2ServerCodec, stream_id: int) -> None:
        super().__init__(stream_id)
        self.codec = codec
        self.decoder: RequestDecoder | None = None
        self.headers_sent = False

    def encode_headers(self, status: int, headers: list[bytes], end_stream: bool) -> None:
        if self.finished or self.headers_sent:
            return
        self.headers_sent = True
        codec = self.codec
        codec._send_headers(self, h2_fields(headers, [(b":status", _STATUS[status])]), end_stream)
        codec._flush()

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        if self.finished or self.end_pending or self.local_done:
            return
        codec = self.codec
        codec._send_data(self, data, end_stream)
        codec._flush()

    def encode_trailers(self, trailers: list[bytes]) -> None:
        if self.finished or self.end_pending or self.local_done:
            return
        codec = self.codec
        codec._send_trailers(self, h2_fields(trailers, []))
        codec._flush()

    def encode_100_continue(self) -> None:
        pass  # the head says expect=False: an HTTP/2 client sends its body without waiting

    def encode_local_reply(self, status: int, flag: str, body: bytes, close: bool) -> None:
        """``close`` is for HTTP/1.1: one stream's error does not end an HTTP/2 connection."""
        if self.finished or self.headers_sent:
            return
        self.headers_sent = True
        codec = self.codec
        fields = [(b":status", _STATUS[status]), (b"content-type", b"application/json"),
                  (b"content-length", b"%d" % len(body)), (b"x-meshkeeper-flags", flag.encode())]
        codec._send_headers(self, fields, not body)
        if body and not self.finished:
            codec._send_data(self, body, True)
        codec._flush()

    def reset(self) -> None:
        if not self.finished:
            codec = self.codec
            codec._reset(self, ErrorCodes.INTERNAL_ERROR)
            codec._flush()

    def read_disable(self, reason: int, disabled: bool) -> None:
        self.codec._read_disable(self, reason, disabled)


class Http2ServerCodec(Session):
    """One downstream HTTP/2 connection (:class:`~sidecar.codec.api.ServerCodec`). The server
    preface (SETTINGS) is written when it is created; the connection manager then feeds it every
    read, starting with the client preface it sniffed."""

    def __init__(self, callbacks: ServerCallbacks, transport: asyncio.Transport, *, tracing: bool,
                 max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
                 initial_window_size: int = DEFAULT_INITIAL_WINDOW_SIZE,
                 connection_window_size: int = DEFAULT_CONNECTION_WINDOW_SIZE,
                 max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        super().__init__(new_h2(False, initial_window_size, max_concurrent_streams, max_header_list_size),
                         connection_window_size)
        self._callbacks = callbacks
        self._transport = transport
        self._tracing = tracing
        self._max_header_list_size = max_header_list_size
        self._goaway_last: int | None = None  # the last stream id of our final GOAWAY
        self._goaway_notice = False  # the first GOAWAY (2^31-1) and its PING are sent
        self._peer_goaway = False
        self._start()
        self._write()

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def dispatch(self, data: bytes) -> None:
        if self._closed:
            return
        self._batching += 1
        try:
            try:
                events = self._h2.receive_data(data)
            except H2Error as e:
                self._protocol_error(e)
                return
            for event in events:
                kind = type(event)
                if kind is DataReceived:
                    self._on_data(event)
                elif kind is RequestReceived:
                    self._on_request(event)
                elif kind is TrailersReceived:
                    s = self._streams.get(event.stream_id)
                    if s is not None and not s.remote_done:
                        s.remote_done = True
                        s.decoder.decode_trailers(pieces_of(event.headers))
                elif kind is WindowUpdated:
                    self._window_opened(event.stream_id)
                elif kind is StreamReset:
                    s = self._streams.get(event.stream_id)
                    if s is not None:
                        self._finish(s)
                        s.decoder.on_reset()
                elif kind is RemoteSettingsChanged:
                    self._drain_all()  # the initial window or the frame size may have grown
                elif kind is ConnectionTerminated:
                    self._peer_goaway = True  # the client opens no more streams
                    if not self._streams:
                        self._close_after_write = True
                elif kind is PingAckReceived and event.ping_data == _DRAIN_PING and self._goaway_last is None:
                    self._final_goaway()
                if self._closed:
                    return
            # h2 checks a frame's length only once the whole frame is in: a header that declares
            # more than SETTINGS_MAX_FRAME_SIZE is refused now, not after up to 16 MiB are buffered.
            pending = self._h2.incoming_buffer._data
            if len(pending) >= 9 and int.from_bytes(pending[:3], "big") > self._h2.max_inbound_frame_size:
                self._h2.close_connection(ErrorCodes.FRAME_SIZE_ERROR)
                self._protocol_error(FrameTooLargeError("a frame longer than SETTINGS_MAX_FRAME_SIZE"))
        finally:
            self.batch_end()

    def go_away(self) -> None:
        if self._goaway_notice or self._closed:
            return
        self._goaway_notice = True
        self._h2.send_goaway(ErrorCodes.NO_ERROR, _MAX_STREAM_ID)
        self._h2.ping(_DRAIN_PING)
        self._flush()

    def _final_goaway(self) -> None:
        self._goaway_last = last = self._h2.highest_inbound_stream_id
        self._h2.send_goaway(ErrorCodes.NO_ERROR, last)
        if not self._streams:
            self._close_after_write = True
        self._flush()

    def connection_lost(self) -> None:
        self._closed = True
        self._transport = None
        streams = list(self._streams.values())
        self._streams.clear()
        self._queued.clear()
        for s in streams:
            s.finished = True
            s.decoder.on_reset()

    def write_paused(self, paused: bool) -> None:
        self._set_write_blocked(paused)

    # --- events ----------------------------------------------------------------------------------

    def _on_request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        ended = event.stream_ended is not None
        if (self._goaway_last is not None and sid > self._goaway_last) or self._peer_goaway:
            self._h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)  # opened after our GOAWAY: retry elsewhere
            return
        headers = event.headers
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 32  # RFC 9113 §6.5.2's measure
        s = _ServerStream(self, sid)
        s.remote_done = ended
        self._streams[sid] = s
        decoder = self._callbacks.new_stream(s)
        s.decoder = decoder
        self._set_head(decoder, headers, ended)
        if size > self._max_header_list_size:
            # Answered here, as the HTTP/1.1 codec answers an oversized head; the connection lives on.
            s.encode_local_reply(431, "DPE", _HEADERS_TOO_LARGE, False)
            decoder.on_local_reply(431, "DPE")
            self._callbacks.protocol_error("HTTP/2: request headers too large")
            return
        decoder.decode_headers(ended)

    def _set_head(self, decoder: RequestDecoder, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        method = authority = path = b""
        host = None
        pieces: list[bytes] = []
        trace_in: list[tuple[int, bytes]] | None = None
        request_id = None
        length_known = grpc = False
        tracing = self._tracing
        for name, value in headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue
            kind = REQUEST_HEADER_KIND.get(name)
            if kind is None or kind in _FORWARDED_KINDS:
                if kind == H_CONTENT_LENGTH:
                    length_known = True
                elif name == b"content-type" and value.startswith(b"application/grpc"):
                    grpc = True
                pieces += (name, b": ", value, b"\r\n")
            elif kind == H_TRACE:
                if tracing:
                    if trace_in is None:
                        trace_in = []
                    trace_in.append((TRACE_HEADERS[name], value))
                else:
                    pieces += (name, b": ", value, b"\r\n")
            elif kind == H_REQUEST_ID:
                if not tracing:
                    pieces += (name, b": ", value, b"\r\n")
                elif request_id is None and value:
                    request_id = value  # the first non-empty one, as Envoy
            elif kind == H_HOST:
                if host is None:
                    host = value
            elif name == b"te":
                pieces += (name, b": ", value, b"\r\n")  # h2 let it through: it says "trailers" (gRPC)
            # the rest (trailer, expect; connection-specific ones h2 refuses) is consumed
        decoder.method = method
        decoder.authority = authority or host or b""
        decoder.path = path
        decoder.headers = pieces
        decoder.version = 20
        decoder.has_body = not ended
        decoder.chunked = not ended and not length_known
        decoder.grpc = grpc
        decoder.expect = False
        decoder.trace_in = trace_in
        decoder.request_id = request_id

    def _on_data(self, event: DataReceived) -> None:
        sid = event.stream_id
        s = self._streams.get(sid)
        if s is None or s.remote_done:
            self._h2.acknowledge_received_data(event.flow_controlled_length, sid)
            return
        ended = event.stream_ended is not None
        if ended:
            s.remote_done = True
        s.decoder.decode_data(event.data, ended)
        self._consumed(s, sid, event.flow_controlled_length)

    def _protocol_error(self, error: H2Error) -> None:
        self._closed = True
        self._goaway_on_error()
        self._close_after_write = True
        self._callbacks.protocol_error(f"HTTP/2: {error}")
        streams = list(self._streams.values())
        self._streams.clear()
        self._queued.clear()
        for s in streams:
            s.finished = True
            s.decoder.on_reset()

    # --- Session hooks --------------------------------------------------------------------------

    def _closing(self) -> None:
        self._callbacks.closing()

    def _local_ended(self, s: Stream) -> None:
        if s.remote_done:
            self._finish(s)
        else:
            self._reset(s, ErrorCodes.NO_ERROR)  # the response is whole: the rest of the request is not needed

    def _send_failed(self, s: Stream, error: H2Error) -> None:
        if not s.finished:
            self._reset(s, ErrorCodes.INTERNAL_ERROR)
            s.decoder.on_reset()

    def _tell_paused(self, s: Stream, paused: bool) -> None:
        s.decoder.on_write_paused(paused)

    def _stream_finished(self, s: Stream) -> None:
        if not self._streams and (self._goaway_last is not None or self._peer_goaway):
            self._close_after_write = True
