"""What the HTTP/2 server codec and client connection share: one ``h2`` connection (sans-IO) per
socket, batched writes, per-stream send queues and receive credit.

h2 keeps the protocol state (frames, HPACK, stream states, windows); a :class:`Session` owns the
socket and decides when to write and when to hand credit back:

- **Writes are batched.** Frames h2 produces are written with one ``transport.write`` per read of
  the socket and per encoder call made outside one; ``batch_begin``/``batch_end`` widen a batch, so
  an upstream read that becomes several downstream frames is one write (as the HTTP/1.1 side does).
- **Send flow control.** DATA that the peer's stream or connection window cannot take now waits in
  its stream's queue and goes out on WINDOW_UPDATE (or a larger SETTINGS_INITIAL_WINDOW_SIZE), the
  end of the stream (END_STREAM or trailers) behind it. Above :data:`WRITE_HIGH_WATER` queued bytes,
  or while the transport itself is paused, the stream's decoder gets ``on_write_paused(True)``, and
  ``False`` once the queue is down to :data:`WRITE_LOW_WATER`: Envoy's per-stream write buffer
  watermarks (low = high / 2), so a slow reader never grows memory without bound.
- **Receive flow control.** Credit (WINDOW_UPDATE) is handed back once a chunk has gone to its
  decoder, unless the stream is read-disabled: then it is held, and returned when the last reason
  clears, so the peer stops within one window (Envoy's ``readDisable`` on an HTTP/2 stream withholds
  ``consume`` the same way). Stream and connection credit are held together: the connection window
  (:data:`DEFAULT_CONNECTION_WINDOW_SIZE`) bounds what one connection's stalled streams can make us
  hold, the stream window (:data:`DEFAULT_INITIAL_WINDOW_SIZE`) what one stream can. h2 sends the
  WINDOW_UPDATE once half a window has been handed back.
- **GOAWAY.** h2 moves its connection to CLOSED when it sends or receives GOAWAY and then refuses
  every frame, so the streams in flight could not finish (python-hyper/h2 issue 1181). :class:`H2`
  receives GOAWAY as an event only and sends it without h2's state machine; RFC 9113 §6.8 semantics
  are then the session's (``http2`` and ``http2_client`` say what each side does).

h2 is used through its public API except for :class:`H2`'s two methods (one override, one write to
its output buffer), which is why pyproject pins h2 below 5.
"""

from __future__ import annotations

import asyncio
from collections import deque

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, Event
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings
from hyperframe.frame import Frame, GoAwayFrame

from sidecar.codec.headers import MAX_REQUEST_HEADERS_BYTES

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

UNLIMITED = 1 << 31

# Connection-specific header fields HTTP/2 forbids (RFC 9113 §8.2.2); TE only as "trailers".
FORBIDDEN = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))
FORBIDDEN_REQUEST = FORBIDDEN | {b"host"}  # :authority carries it


def h2_fields(pieces: list[bytes], out: list[tuple[bytes, bytes]], drop: frozenset[bytes] = FORBIDDEN,
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


def pieces_of(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """HTTP/2 fields as the header pieces of api.py, pseudo-headers left out."""
    pieces: list[bytes] = []
    for name, value in headers:
        if name[:1] != b":":
            pieces += (name, b": ", value, b"\r\n")
    return pieces


class H2(H2Connection):
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


def new_h2(client: bool, window: int, max_streams: int, max_header_list: int) -> H2:
    """An h2 connection with our SETTINGS, bytes in and out. Inbound fields are validated (RFC 9113
    §8.2); outbound ones are built valid by ``h2_fields``, and h2's checking them again would cost
    a generator chain per header."""
    conn = H2(H2Configuration(client_side=client, header_encoding=None, validate_inbound_headers=True,
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


class Stream:
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


class Session:
    """What both sides share: the h2 connection, batched writes, send queues and receive credit.

    A side supplies the hooks at the end: what a stream's end means for it (``_local_ended``), how
    its decoders hear of a failed send or a pause, and what follows when a stream is gone.
    """

    def __init__(self, h2: H2, connection_window: int) -> None:
        self._h2 = h2
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, Stream] = {}
        self._queued: dict[int, Stream] = {}  # streams with DATA waiting for window
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

    def _send_headers(self, s: Stream, fields: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        try:
            self._h2.send_headers(s.id, fields, end_stream=end_stream)
        except H2Error as e:
            self._send_failed(s, e)
            return
        if end_stream:
            s.local_done = True
            self._local_ended(s)

    def _send_data(self, s: Stream, data: bytes, end_stream: bool) -> None:
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

    def _send_trailers(self, s: Stream, fields: list[tuple[bytes, bytes]]) -> None:
        s.trailers = fields or None
        s.end_pending = True
        self._drain(s)
        if not s.finished:
            self._update_paused(s)

    def _drain(self, s: Stream) -> None:
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

    def _update_paused(self, s: Stream) -> None:
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

    def _consumed(self, s: Stream | None, stream_id: int, size: int) -> None:
        """A chunk went to its decoder: give the credit back, or hold it while read-disabled."""
        if not size:
            return
        if s is not None and s.disabled and not s.finished:
            s.held += size
        else:
            self._h2.acknowledge_received_data(size, stream_id)

    def _read_disable(self, s: Stream, reason: int, disabled: bool) -> None:
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

    def _finish(self, s: Stream) -> None:
        s.finished = True
        s.queue = None
        s.queued = 0
        self._streams.pop(s.id, None)
        self._queued.pop(s.id, None)
        if s.held:
            held, s.held = s.held, 0
            self._h2.acknowledge_received_data(held, s.id)  # the connection's share comes back
        self._stream_finished(s)

    def _reset(self, s: Stream, code: int) -> None:
        try:
            self._h2.reset_stream(s.id, code)
        except H2Error:
            pass  # h2 has closed it already
        self._finish(s)

    def _closing(self) -> None:
        """We are about to close the connection ourselves."""

    def _local_ended(self, s: Stream) -> None:
        raise NotImplementedError

    def _send_failed(self, s: Stream, error: H2Error) -> None:
        raise NotImplementedError

    def _tell_paused(self, s: Stream, paused: bool) -> None:
        raise NotImplementedError

    def _stream_finished(self, s: Stream) -> None:
        raise NotImplementedError
