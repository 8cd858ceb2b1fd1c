"""HTTP/2 codecs on the ``h2`` package (sans-IO): a server codec per downstream connection and a
client connection per pooled upstream connection (Envoy's ``Http2::ServerConnectionImpl`` and
``ClientConnectionImpl``).

h2 keeps the protocol state (frames, HPACK, stream states, windows); this module owns the socket,
turns h2's events into the calls of :mod:`sidecar.codec.api` and decides when to write:

- **Writes are batched.** Frames h2 produces are written with one ``transport.write`` per
  :meth:`Http2ServerCodec.dispatch` (per read, on the client side), and per encoder call made
  outside one; ``batch_begin``/``batch_end`` widen a batch, so an upstream read that becomes several
  downstream frames is one write (as the HTTP/1.1 side batches).
- **Send flow control.** DATA that the peer's stream or connection window cannot take now waits in
  a per-stream queue and goes out on WINDOW_UPDATE (or a larger SETTINGS_INITIAL_WINDOW_SIZE).
  Above :data:`WRITE_HIGH_WATER` queued bytes (or while the transport itself is paused) the stream's
  decoder gets ``on_write_paused(True)``, and ``False`` once the queue falls to
  :data:`WRITE_LOW_WATER`: Envoy's per-stream write buffer watermarks, so a slow reader never grows
  memory without bound.
- **Receive flow control.** Receive credit (WINDOW_UPDATE) is handed back once a chunk has been
  given to its decoder, unless the stream is read-disabled: then the credit is held and returned when
  the last reason clears, so the peer stops within one window (Envoy: ``readDisable`` on an HTTP/2
  stream withholds ``consume``). Stream and connection credit are held together; the connection
  window (:data:`DEFAULT_CONNECTION_WINDOW_SIZE`) is what one connection can make us hold in all.
- **Stream ends.** A server stream whose response ended before its request is reset with
  RST_STREAM(NO_ERROR) (RFC 9113 §8.1); a client stream whose response ended before its request
  was sent whole is reset with CANCEL. ``reset()`` sends INTERNAL_ERROR downstream (a response cut
  short) and CANCEL upstream (a request abandoned).
- **GOAWAY.** ``go_away()`` sends GOAWAY(NO_ERROR) with the last stream id; streams in flight
  finish, later ones are refused (REFUSED_STREAM, safe to retry) and the connection closes when none
  is left (Envoy's drain). A client connection that receives GOAWAY opens no stream; streams above
  the last stream id end with ``on_upstream_reset("UC", refused=True)``, the others finish. h2 moves
  its connection to CLOSED on sending or receiving GOAWAY and then refuses every frame
  (python-hyper/h2 issue 1181), so :class:`_H2` sends and receives GOAWAY without its state machine.
- **Limits.** SETTINGS_MAX_CONCURRENT_STREAMS and SETTINGS_MAX_HEADER_LIST_SIZE are advertised. A
  request whose header list is over the limit is answered 431 (flag DPE) and its stream reset, and
  the connection stays up (RFC 9113 §10.5.1); HPACK itself stops at twice the limit, a connection
  error (ENHANCE_YOUR_CALM). h2 treats streams over the concurrency limit and malformed requests
  as connection errors (it checks before decoding HPACK, whose state would otherwise be lost).
- **Protocol errors** (a bad preface, a bad frame, flow-control violations): GOAWAY with h2's error
  code, then ``protocol_error`` (server) or ``on_upstream_reset("UPE")`` for every stream (client),
  and the connection closes. PING is answered by h2.

Calls into decoders never raise (api.py); an encoder call that h2 refuses (the stream is gone, or
the headers are invalid) resets the stream, and the decoder hears of it at once: ``on_reset`` or
``on_upstream_reset`` may come inside its own ``encode_*`` call.

Nothing here imports the request path (:mod:`sidecar.proxy`) or the pools (:mod:`sidecar.upstream`):
a pool drives :class:`Http2ClientConnection` through :class:`Http2PoolCallbacks`.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Protocol, cast

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import Frame, GoAwayFrame

from sidecar.codec.api import (
    RESET_PROTOCOL_ERROR,
    RESET_TERMINATION,
    RequestDecoder,
    ResponseDecoder,
    ServerCallbacks,
)
from sidecar.codec.headers import (
    H_CONNECTION,
    H_CONTENT_LENGTH,
    H_DROP,
    H_EXPECT,
    H_HOST,
    H_REQUEST_ID,
    H_TRACE,
    H_TRANSFER_ENCODING,
    MAX_REQUEST_HEADERS_BYTES,
    REQUEST_HEADER_KIND,
)
from sidecar.tracing.context import TRACE_HEADERS

DEFAULT_MAX_CONCURRENT_STREAMS = 100  # h2's and nghttp2's usual default (Envoy's is unbounded)
# A stream may have this much request (or response) data in flight to us unacknowledged: with credit
# held while read-disabled, it is what one stalled stream can make us buffer. 1 MiB keeps a 20 MB
# gRPC message moving on a loopback RTT; Envoy's default (256 MiB) leaves the bound to its buffers.
DEFAULT_INITIAL_WINDOW_SIZE = 1 << 20
# The connection window: what all of a connection's streams can make us hold together.
DEFAULT_CONNECTION_WINDOW_SIZE = 8 << 20
DEFAULT_MAX_HEADER_LIST_SIZE = MAX_REQUEST_HEADERS_BYTES  # Envoy's max_request_headers_kb (60 KiB)
# Streams a client connection may open before the peer's SETTINGS say how many (RFC 9113 §5.1.2
# recommends allowing at least 100).
ASSUMED_PEER_MAX_STREAMS = 100

WRITE_HIGH_WATER = 64 * 1024  # queued bytes of one stream that pause its decoder
WRITE_LOW_WATER = WRITE_HIGH_WATER // 2  # ... and resume it

_UNLIMITED = 1 << 31

# Connection-specific header fields HTTP/2 forbids (RFC 9113 §8.2.2); TE only as "trailers".
_FORBIDDEN = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))
_FORBIDDEN_REQUEST = _FORBIDDEN | {b"host"}  # :authority carries it

# Kinds of REQUEST_HEADER_KIND an HTTP/2 request forwards: all but those consumed below (Host, the
# hop-by-hop ones, Expect, and trace context while tracing is on); a kind added for HTTP/1.1's sake
# (Content-Length, Content-Type) is forwarded.
_CONSUMED_KINDS = frozenset((H_HOST, H_CONNECTION, H_DROP, H_TRANSFER_ENCODING, H_EXPECT, H_TRACE, H_REQUEST_ID))
_FORWARDED_KINDS = frozenset(REQUEST_HEADER_KIND.values()) - _CONSUMED_KINDS

_STATUS = [b"%d" % code for code in range(1000)]
_HEADERS_TOO_LARGE = json.dumps({"error": "request headers too large", "flags": "DPE"}).encode()


def h2_fields(pieces: list[bytes], out: list[tuple[bytes, bytes]], drop: frozenset[bytes] = _FORBIDDEN,
              ) -> list[tuple[bytes, bytes]]:
    """Append header *pieces* to ``out`` as HTTP/2 fields: names lower-cased, connection-specific
    ones dropped, TE kept only as ``trailers``."""
    for i in range(0, len(pieces), 4):
        name = pieces[i].lower()
        if name in drop:
            continue
        value = pieces[i + 2]
        if name == b"te" and value.strip().lower() != b"trailers":
            continue
        out.append((name, value))
    return out


def _pieces(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    pieces: list[bytes] = []
    for name, value in headers:
        if name[:1] != b":":
            pieces += (name, b": ", value, b"\r\n")
    return pieces


class _H2(H2Connection):
    """h2 with GOAWAY as RFC 9113 §6.8 has it: after GOAWAY, either way, frames of the streams in
    flight are still processed (h2 closes its connection state machine instead)."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        event = ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def send_goaway(self, error_code: int, last_stream_id: int) -> None:
        frame = GoAwayFrame(0, last_stream_id=last_stream_id, error_code=error_code)
        self._data_to_send += frame.serialize()


def _new_h2(client: bool, window: int, max_streams: int, max_header_list: int) -> _H2:
    conn = _H2(H2Configuration(client_side=client, header_encoding=None, validate_inbound_headers=True,
                               validate_outbound_headers=False, normalize_outbound_headers=False))
    values = {
        SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
        SettingCodes.INITIAL_WINDOW_SIZE: window,
        SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list,
    }
    if client:
        values[SettingCodes.ENABLE_PUSH] = 0
    conn.local_settings = Settings(client=client, initial_values=values)
    # The advertised limit is checked per request (431); HPACK stops only a bomb.
    conn.decoder.max_header_list_size = 2 * max_header_list
    return conn


class _Stream:
    """Send and receive state of one stream, common to both sides."""

    __slots__ = ("id", "queue", "queued", "end_pending", "trailers", "paused", "local_done", "remote_done",
                 "finished", "disabled", "held")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.queue: deque[bytes] | None = None  # DATA waiting for window
        self.queued = 0
        self.end_pending = False  # the end (END_STREAM or trailers) waits behind the queue
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.paused = False  # the decoder was told on_write_paused(True)
        self.local_done = False  # our END_STREAM went out
        self.remote_done = False  # the peer's END_STREAM came in
        self.finished = False  # gone from the session: encoder calls are no-ops
        self.disabled = 0  # read_disable reasons
        self.held = 0  # receive credit withheld while disabled


class _Session:
    """What both sides share: the h2 connection, batched writes, send queues and receive credit."""

    def __init__(self, h2: _H2, connection_window: int) -> None:
        self._h2 = h2
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, _Stream] = {}
        self._queued: dict[int, _Stream] = {}  # streams with DATA waiting for window
        self._batching = 0
        self._write_blocked = False  # the transport is above its high-water mark
        self._closed = False
        self._close_after_write = False
        self._connection_window = connection_window

    def _start(self) -> None:
        h2 = self._h2
        h2.initiate_connection()
        if self._connection_window > 65535:
            h2.increment_flow_control_window(self._connection_window - 65535)

    # --- writes ----------------------------------------------------------------------------------

    def batch_begin(self) -> None:
        self._batching += 1

    def batch_end(self) -> None:
        self._batching -= 1
        if not self._batching:
            self._write()

    def _write(self) -> None:
        data = self._h2.data_to_send()
        transport = self._transport
        if transport is None:
            return
        if data:
            transport.write(data)
        if self._close_after_write:
            self._close_after_write = False
            self._closing()
            transport.close()

    def _flush(self) -> None:
        if not self._batching:
            self._write()

    # --- sending ---------------------------------------------------------------------------------

    def _send_headers(self, s: _Stream, fields: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        try:
            self._h2.send_headers(s.id, fields, end_stream=end_stream)
        except H2Error as e:
            self._send_failed(s, e)
            return
        if end_stream:
            s.local_done = True
            self._local_ended(s)

    def _send_data(self, s: _Stream, data: bytes, end_stream: bool) -> None:
        if data:
            if not s.queue and not self._write_blocked:
                h2 = self._h2
                try:
                    room = h2.local_flow_control_window(s.id)
                    if len(data) <= room and len(data) <= h2.max_outbound_frame_size:
                        h2.send_data(s.id, data, end_stream=end_stream)  # the usual case: it fits
                        if end_stream:
                            s.local_done = True
                            self._local_ended(s)
                        return
                except H2Error as e:
                    self._send_failed(s, e)
                    return
            if s.queue is None:
                s.queue = deque()
            s.queue.append(data)
            s.queued += len(data)
        if end_stream:
            s.end_pending = True
        self._drain(s)
        if not s.finished:
            self._update_paused(s)

    def _send_trailers(self, s: _Stream, fields: list[tuple[bytes, bytes]]) -> None:
        s.trailers = fields or None
        s.end_pending = True
        self._drain(s)
        if not s.finished:
            self._update_paused(s)

    def _drain(self, s: _Stream) -> None:
        """Send what the windows allow of a stream's queue, then its end once the queue is empty."""
        h2 = self._h2
        q = s.queue
        sid = s.id
        ended = False
        try:
            if q and not self._write_blocked:
                frame = h2.max_outbound_frame_size
                while q:
                    room = h2.local_flow_control_window(sid)
                    if room <= 0:
                        break
                    room = min(room, frame)
                    chunk = q[0]
                    if len(chunk) <= room:
                        q.popleft()
                        s.queued -= len(chunk)
                        ended = not q and s.end_pending and s.trailers is None
                        h2.send_data(sid, chunk, end_stream=ended)
                    else:
                        h2.send_data(sid, chunk[:room])
                        q[0] = chunk[room:]
                        s.queued -= room
            if not q and s.end_pending and not ended:
                if s.trailers is not None:
                    h2.send_headers(sid, s.trailers, end_stream=True)
                else:
                    h2.end_stream(sid)
                ended = True
        except H2Error as e:
            self._send_failed(s, e)
            return
        if q:
            self._queued[sid] = s
        else:
            self._queued.pop(sid, None)
        if ended:
            s.local_done = True
            s.end_pending = False
            self._local_ended(s)

    def _drain_all(self) -> None:
        for s in list(self._queued.values()):
            if not s.finished:
                self._drain(s)
                if not s.finished:
                    self._update_paused(s)

    def _update_paused(self, s: _Stream) -> None:
        if s.paused:
            if not self._write_blocked and s.queued <= WRITE_LOW_WATER:
                s.paused = False
                self._tell_paused(s, False)
        elif self._write_blocked or s.queued > WRITE_HIGH_WATER:
            s.paused = True
            self._tell_paused(s, True)

    def _set_write_blocked(self, blocked: bool) -> None:
        if blocked == self._write_blocked:
            return
        self._write_blocked = blocked
        if not blocked:
            self._drain_all()
        for s in list(self._streams.values()):
            if not s.finished:
                self._update_paused(s)
        self._flush()

    def _window_opened(self, stream_id: int) -> None:
        if stream_id:
            s = self._queued.get(stream_id)
            if s is not None:
                self._drain(s)
                if not s.finished:
                    self._update_paused(s)
        else:
            self._drain_all()

    # --- receive credit --------------------------------------------------------------------------

    def _consumed(self, s: _Stream | None, stream_id: int, size: int) -> None:
        """A chunk went to its decoder: give the credit back, or hold it while read-disabled."""
        if not size:
            return
        if s is not None and s.disabled and not s.finished:
            s.held += size
        else:
            self._h2.acknowledge_received_data(size, stream_id)

    def _read_disable(self, s: _Stream, reason: int, disabled: bool) -> None:
        before = s.disabled
        s.disabled = before | reason if disabled else before & ~reason
        if before and not s.disabled and s.held and not s.finished:
            held, s.held = s.held, 0
            self._h2.acknowledge_received_data(held, s.id)
            self._flush()

    def _goaway_on_error(self) -> None:
        """h2 queues GOAWAY for the errors of the frames it parsed (and closes its state machine),
        not for a bad preface."""
        h2 = self._h2
        if h2.state_machine.state is not ConnectionState.CLOSED:
            h2.send_goaway(ErrorCodes.PROTOCOL_ERROR, 0)

    # --- stream ends -----------------------------------------------------------------------------

    def _finish(self, s: _Stream) -> None:
        s.finished = True
        s.queue = None
        s.queued = 0
        self._streams.pop(s.id, None)
        self._queued.pop(s.id, None)
        if s.held:
            held, s.held = s.held, 0
            self._h2.acknowledge_received_data(held, s.id)  # the connection's share comes back
        self._stream_finished(s)

    def _reset(self, s: _Stream, code: int) -> None:
        try:
            self._h2.reset_stream(s.id, code)
        except H2Error:
            pass  # h2 has closed it already
        self._finish(s)

    def _closing(self) -> None:
        """We are about to close the connection ourselves."""

    def _local_ended(self, s: _Stream) -> None:
        raise NotImplementedError

    def _send_failed(self, s: _Stream, error: H2Error) -> None:
        raise NotImplementedError

    def _tell_paused(self, s: _Stream, paused: bool) -> None:
        raise NotImplementedError

    def _stream_finished(self, s: _Stream) -> None:
        raise NotImplementedError


# --- downstream --------------------------------------------------------------------------------------


class _ServerStream(_Stream):
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


class Http2ServerCodec(_Session):
    """One downstream HTTP/2 connection (:class:`~sidecar.codec.api.ServerCodec`). The server
    preface (SETTINGS) is written when it is created; the connection manager then feeds it every
    read, starting with the client preface it sniffed."""

    def __init__(self, callbacks: ServerCallbacks, transport: asyncio.Transport, *, tracing: bool,
                 max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
                 initial_window_size: int = DEFAULT_INITIAL_WINDOW_SIZE,
                 connection_window_size: int = DEFAULT_CONNECTION_WINDOW_SIZE,
                 max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        super().__init__(_new_h2(False, initial_window_size, max_concurrent_streams, max_header_list_size),
                         connection_window_size)
        self._callbacks = callbacks
        self._transport = transport
        self._tracing = tracing
        self._max_header_list_size = max_header_list_size
        self._goaway_last: int | None = None  # the last stream id of our GOAWAY
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
            except ProtocolError as e:
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
                        s.decoder.decode_trailers(_pieces(event.headers))
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
                if self._closed:
                    return
        finally:
            self.batch_end()

    def go_away(self) -> None:
        if self._goaway_last is not None or self._closed:
            return
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

    def _protocol_error(self, error: ProtocolError) -> None:
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

    # --- _Session hooks --------------------------------------------------------------------------

    def _closing(self) -> None:
        self._callbacks.closing()

    def _local_ended(self, s: _Stream) -> None:
        if s.remote_done:
            self._finish(s)
        else:
            self._reset(s, ErrorCodes.NO_ERROR)  # the response is whole: the rest of the request is not needed

    def _send_failed(self, s: _Stream, error: H2Error) -> None:
        if not s.finished:
            self._reset(s, ErrorCodes.INTERNAL_ERROR)
            s.decoder.on_reset()

    def _tell_paused(self, s: _Stream, paused: bool) -> None:
        s.decoder.on_write_paused(paused)

    def _stream_finished(self, s: _Stream) -> None:
        if not self._streams and (self._goaway_last is not None or self._peer_goaway):
            self._close_after_write = True


# --- upstream ----------------------------------------------------------------------------------------


class Http2PoolCallbacks(Protocol):
    """What an :class:`Http2ClientConnection` tells the pool that owns it (Envoy's
    ``ConnectionPool`` hears the same from its ``CodecClient``)."""

    def opened(self, conn: Http2ClientConnection) -> None:
        """Connected and the preface sent: streams may be opened up to ``conn.capacity``."""

    def capacity_changed(self, conn: Http2ClientConnection) -> None:
        """The peer's SETTINGS changed how many streams it takes, or its GOAWAY stopped new ones."""

    def stream_done(self, conn: Http2ClientConnection) -> None:
        """A stream ended or was reset: its place is free (if ``capacity`` says so)."""

    def lost(self, conn: Http2ClientConnection) -> None:
        """The connection closed; its open streams have had ``on_upstream_reset``."""


class _ClientStream(_Stream):
    """One upstream request: the :class:`~sidecar.codec.api.RequestEncoder` a router writes to. Its
    stream id is taken when the headers go out (HTTP/2 ids must be used in order)."""

    __slots__ = ("conn", "decoder", "started")

    def __init__(self, conn: Http2ClientConnection, decoder: ResponseDecoder) -> None:
        super().__init__(0)
        self.conn = conn
        self.decoder = decoder
        self.started = False

    def encode_headers(self, method: bytes, authority: bytes, path: bytes, headers: list[bytes], *,
                       end_stream: bool, chunked: bool, is_head: bool) -> None:
        """``chunked`` means nothing in HTTP/2 (DATA frames delimit the body); h2 knows a HEAD
        response has no body from ``:method``."""
        if self.finished or self.started:
            return
        self.started = True
        fields = [(b":method", method), (b":scheme", b"http")]
        if authority:
            fields.append((b":authority", authority))
        fields.append((b":path", path))
        conn = self.conn
        conn._start_stream(self, h2_fields(headers, fields, _FORBIDDEN_REQUEST), end_stream)
        conn._flush()

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        if self.finished or not self.started or self.end_pending or self.local_done:
            return
        conn = self.conn
        conn._send_data(self, data, end_stream)
        conn._flush()

    def encode_trailers(self, trailers: list[bytes]) -> None:
        if self.finished or not self.started or self.end_pending or self.local_done:
            return
        conn = self.conn
        conn._send_trailers(self, h2_fields(trailers, []))
        conn._flush()

    def reset(self) -> None:
        if self.finished:
            return
        conn = self.conn
        if self.id:
            conn._reset(self, ErrorCodes.CANCEL)
        else:
            conn._finish(self)
        conn._flush()

    def read_disable(self, disabled: bool) -> None:
        self.conn._read_disable(self, 1, disabled)


class Http2ClientConnection(_Session, asyncio.Protocol):
    """One pooled upstream HTTP/2 connection: streams multiplexed up to the peer's
    SETTINGS_MAX_CONCURRENT_STREAMS (:attr:`capacity`). Create it with
    ``loop.create_connection(lambda: Http2ClientConnection(pool), host, port)``."""

    def __init__(self, owner: Http2PoolCallbacks, *,
                 initial_window_size: int = DEFAULT_INITIAL_WINDOW_SIZE,
                 connection_window_size: int = DEFAULT_CONNECTION_WINDOW_SIZE,
                 max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        super().__init__(_new_h2(True, initial_window_size, DEFAULT_MAX_CONCURRENT_STREAMS, max_header_list_size),
                         connection_window_size)
        self._owner = owner
        self._unstarted: dict[_ClientStream, None] = {}
        self._peer_max_streams = ASSUMED_PEER_MAX_STREAMS
        self._goaway = False  # the peer's GOAWAY, or ours: no new streams

    # --- for the pool ----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """How many more streams may be opened now (0 once closed or going away)."""
        if self._goaway or self._closed or self._transport is None:
            return 0
        return max(0, self._peer_max_streams - len(self._streams) - len(self._unstarted))

    @property
    def active_streams(self) -> int:
        return len(self._streams) + len(self._unstarted)

    @property
    def going_away(self) -> bool:
        return self._goaway

    def new_stream(self, decoder: ResponseDecoder) -> _ClientStream:
        """A stream for one request; check :attr:`capacity` first (a stream over it is refused
        with ``on_upstream_reset("UC", refused=True)`` when its headers are encoded)."""
        s = _ClientStream(self, decoder)
        self._unstarted[s] = None
        return s

    def go_away(self) -> None:
        """Drain: open no stream, close once the streams in flight are done."""
        if self._goaway or self._closed:
            return
        self._goaway = True
        self._h2.send_goaway(ErrorCodes.NO_ERROR, 0)
        if not self._streams and not self._unstarted:
            self._close_after_write = True
        self._flush()

    def close(self) -> None:
        """Close now (an idle timeout, a pool going away): GOAWAY, then the socket; streams still in
        flight get ``on_upstream_reset("UC")`` when it is gone."""
        if self._closed or self._transport is None:
            return
        self._goaway = True
        self._h2.send_goaway(ErrorCodes.NO_ERROR, 0)
        self._close_after_write = True
        self._flush()

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._start()
        self._write()
        self._owner.opened(self)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._batching += 1
        touched: dict[_ClientStream, ResponseDecoder] = {}
        try:
            try:
                events = self._h2.receive_data(data)
            except ProtocolError as e:
                self._protocol_error(e)
                return
            streams = self._streams
            for event in events:
                kind = type(event)
                if kind is DataReceived:
                    sid = event.stream_id
                    s = streams.get(sid)
                    if s is None:
                        self._h2.acknowledge_received_data(event.flow_controlled_length, sid)
                        continue
                    decoder = s.decoder
                    if s not in touched:
                        touched[s] = decoder
                        decoder.batch_begin()
                    ended = event.stream_ended is not None
                    if ended:
                        self._remote_ended(s)
                    decoder.on_response_data(event.data, ended)
                    self._consumed(s, sid, event.flow_controlled_length)
                elif kind is ResponseReceived:
                    s = streams.get(event.stream_id)
                    if s is None:
                        continue
                    decoder = s.decoder
                    if s not in touched:
                        touched[s] = decoder
                        decoder.batch_begin()
                    headers = event.headers
                    status = 0
                    for name, value in headers:
                        if name == b":status":
                            status = int(value)
                            break
                    ended = event.stream_ended is not None
                    if ended:
                        self._remote_ended(s)
                    decoder.on_response_headers(status, _pieces(headers), ended)
                elif kind is TrailersReceived:
                    s = streams.get(event.stream_id)
                    if s is None:
                        continue
                    decoder = s.decoder
                    if s not in touched:
                        touched[s] = decoder
                        decoder.batch_begin()
                    self._remote_ended(s)
                    decoder.on_response_trailers(_pieces(event.headers))
                elif kind is WindowUpdated:
                    self._window_opened(event.stream_id)
                elif kind is StreamReset:
                    s = streams.get(event.stream_id)
                    if s is None:
                        continue
                    decoder = s.decoder
                    if s not in touched:
                        touched[s] = decoder
                        decoder.batch_begin()
                    self._finish(s)
                    if event.error_code == ErrorCodes.REFUSED_STREAM:
                        decoder.on_upstream_reset(RESET_TERMINATION, refused=True)
                    else:
                        decoder.on_upstream_reset(RESET_TERMINATION)
                elif kind is RemoteSettingsChanged:
                    self._peer_max_streams = min(self._h2.remote_settings.max_concurrent_streams, _UNLIMITED)
                    self._drain_all()
                    self._owner.capacity_changed(self)
                elif kind is ConnectionTerminated:
                    self._on_goaway(event.last_stream_id, touched)
                if self._closed:
                    return
        finally:
            for decoder in touched.values():
                decoder.batch_end()
            self.batch_end()

    def pause_writing(self) -> None:
        self._set_write_blocked(True)

    def resume_writing(self) -> None:
        self._set_write_blocked(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._transport = None
        self._reset_all(RESET_TERMINATION)
        self._owner.lost(self)

    # --- internals -------------------------------------------------------------------------------

    def _start_stream(self, s: _ClientStream, fields: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        self._unstarted.pop(s, None)
        h2 = self._h2
        if self._goaway or self._closed or self._transport is None or len(self._streams) >= self._peer_max_streams:
            self._refuse(s)
            return
        try:
            sid = h2.get_next_available_stream_id()
            h2.send_headers(sid, fields, end_stream=end_stream)
        except H2Error:
            self._refuse(s)  # nothing reached the peer: safe to retry
            return
        s.id = sid
        self._streams[sid] = s
        if end_stream:
            s.local_done = True

    def _refuse(self, s: _ClientStream) -> None:
        s.finished = True
        self._stream_finished(s)
        s.decoder.on_upstream_reset(RESET_TERMINATION, refused=True)

    def _remote_ended(self, s: _Stream) -> None:
        s.remote_done = True
        if s.local_done:
            self._finish(s)
        else:
            self._reset(s, ErrorCodes.CANCEL)  # the response is whole: the rest of the request is not needed

    def _on_goaway(self, last_stream_id: int, touched: dict[_ClientStream, ResponseDecoder]) -> None:
        """Streams above ``last_stream_id`` were never processed: refused (a retry is safe)."""
        self._goaway = True
        doomed = [s for sid, s in self._streams.items() if sid > last_stream_id]
        doomed += self._unstarted
        self._unstarted.clear()
        for s in doomed:
            decoder = s.decoder
            if s not in touched:
                touched[s] = decoder
                decoder.batch_begin()
            self._finish(s)
            decoder.on_upstream_reset(RESET_TERMINATION, refused=True)
        if not self._streams:
            self._close_after_write = True
        self._owner.capacity_changed(self)

    def _protocol_error(self, error: ProtocolError) -> None:
        self._closed = True
        self._goaway_on_error()
        self._close_after_write = True
        self._reset_all(RESET_PROTOCOL_ERROR)

    def _reset_all(self, flag: str) -> None:
        streams: list[_ClientStream] = [*self._streams.values(), *self._unstarted]
        self._streams.clear()
        self._unstarted.clear()
        self._queued.clear()
        for s in streams:
            s.finished = True
            decoder = s.decoder
            decoder.batch_begin()
            decoder.on_upstream_reset(flag)
            decoder.batch_end()

    # --- _Session hooks --------------------------------------------------------------------------

    def _local_ended(self, s: _Stream) -> None:
        if s.remote_done:
            self._finish(s)

    def _send_failed(self, s: _Stream, error: H2Error) -> None:
        if not s.finished:
            self._reset(s, ErrorCodes.CANCEL)
            s.decoder.on_upstream_reset(RESET_TERMINATION)

    def _tell_paused(self, s: _Stream, paused: bool) -> None:
        s.decoder.on_write_paused(paused)

    def _stream_finished(self, s: _Stream) -> None:
        if not s.id:
            self._unstarted.pop(s, None)
        if not self._closed:
            if self._goaway and not self._streams and not self._unstarted:
                self._close_after_write = True
            self._owner.stream_done(self)
