"""The upstream HTTP/2 connection (Envoy's ``Http2::ClientConnectionImpl`` in its ``CodecClient``):
one :class:`Http2ClientConnection` per pooled connection, streams multiplexed up to the peer's
SETTINGS_MAX_CONCURRENT_STREAMS, on the ``h2`` package (sans-IO).

A pool (:mod:`sidecar.upstream`) creates it with ``loop.create_connection`` and hears from it
through :class:`Http2PoolCallbacks`; it checks :attr:`~Http2ClientConnection.capacity` and calls
:meth:`~Http2ClientConnection.new_stream` with the router's
:class:`~sidecar.codec.api.ResponseDecoder`, which gets the stream object as its
:class:`~sidecar.codec.api.RequestEncoder`. Writes, send queues, write watermarks and receive credit
are :mod:`.http2_session`'s.

- **Requests.** ``:method``, ``:scheme`` (http), ``:authority`` and ``:path``, then the fields
  lower-cased, without connection-specific ones and Host (RFC 9113 §8.2.2, §8.3.1), ``te`` only as
  ``trailers``. A stream's id is taken when its headers go out (ids must rise in the order used).
- **Responses.** 1xx heads are skipped; the final head, DATA and trailers go to the decoder, all
  the calls of one read between ``batch_begin`` and ``batch_end``. A response that ends before its
  request was sent whole cancels the rest (RST_STREAM(CANCEL)). The pool hears ``stream_done`` before
  the decoder hears the end, so the place is free when the router moves on.
- **Resets.** RST_STREAM from the peer: ``on_upstream_reset("UC")``, with ``refused=True`` for
  REFUSED_STREAM (Envoy's ``refused-stream`` retry condition); ``reset()`` sends CANCEL.
- **GOAWAY from the peer.** No new streams (capacity 0, ``capacity_changed``); streams above its last
  stream id were never processed: ``on_upstream_reset("UC", refused=True)``; the others finish, and
  the connection closes once none is left. ``go_away()`` drains from our side, ``close()`` at once.
- **Errors.** A protocol error: GOAWAY, ``on_upstream_reset("UPE")`` to every stream, close. The
  socket lost: ``on_upstream_reset("UC")`` to every stream, then ``lost``.

No PING keepalive yet: a dead peer is found by the request timeouts and by the kernel.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error

from sidecar.codec.api import RESET_PROTOCOL_ERROR, RESET_TERMINATION, ResponseDecoder
from sidecar.codec.http2_session import (
    ASSUMED_PEER_MAX_STREAMS,
    DEFAULT_CONNECTION_WINDOW_SIZE,
    DEFAULT_INITIAL_WINDOW_SIZE,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_HEADER_LIST_SIZE,
    FORBIDDEN_REQUEST,
    UNLIMITED,
    Session,
    Stream,
    h2_fields,
    new_h2,
    pieces_of,
)


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


class _ClientStream(Stream):
    """One upstream request: the :class:`~sidecar.codec.api.RequestEncoder` a router writes to. Its
    stream id is taken when the headers go out (HTTP/2 ids must be used in order)."""

    __slots__ = ("conn", "decoder", "started")

    def __init__(self, conn: Http2ClientConnection, decoder: ResponseDecoder) -> None:
        super().__init__(0)
        self.conn = conn
        self.decoder = decoder
        self.started = False

    def encode_headers(self, method: bytes, authority: bytes, path: bytes, headers: list[bytes], *,
                       end_stream: bool, chunked: bool, is_head: bool, body: list[bytes] | None = None) -> None:
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
        if body:
            conn._start_stream(self, h2_fields(headers, fields, FORBIDDEN_REQUEST), False)
            data = b"".join(body)
            if not self.finished:
                conn._send_data(self, data, end_stream)
        else:
            conn._start_stream(self, h2_fields(headers, fields, FORBIDDEN_REQUEST), end_stream)
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


def _touch(s: _ClientStream, touched: dict[_ClientStream, ResponseDecoder]) -> ResponseDecoder:
    """The decoder of ``s``, its batch begun the first time a read reaches it (``touched`` ends
    every begun batch once the read is handled)."""
    decoder = s.decoder
    if s not in touched:
        touched[s] = decoder
        decoder.batch_begin()
    return decoder


class Http2ClientConnection(Session, asyncio.Protocol):
    """One pooled upstream HTTP/2 connection: streams multiplexed up to the peer's
    SETTINGS_MAX_CONCURRENT_STREAMS (:attr:`capacity`). Create it with
    ``loop.create_connection(lambda: Http2ClientConnection(pool), host, port)``."""

    def __init__(self, owner: Http2PoolCallbacks, *,
                 initial_window_size: int = DEFAULT_INITIAL_WINDOW_SIZE,
                 connection_window_size: int = DEFAULT_CONNECTION_WINDOW_SIZE,
                 max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        super().__init__(new_h2(True, initial_window_size, DEFAULT_MAX_CONCURRENT_STREAMS, max_header_list_size),
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
            except H2Error as e:
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
                    decoder = _touch(s, touched)
                    ended = event.stream_ended is not None
                    if ended:
                        self._remote_ended(s)
                    decoder.on_response_data(event.data, ended)
                    self._consumed(s, sid, event.flow_controlled_length)
                elif kind is ResponseReceived:
                    s = streams.get(event.stream_id)
                    if s is None:
                        continue
                    decoder = _touch(s, touched)
                    headers = event.headers
                    status = 0
                    for name, value in headers:
                        if name == b":status":
                            status = int(value)
                            break
                    ended = event.stream_ended is not None
                    if ended:
                        self._remote_ended(s)
                    decoder.on_response_headers(status, pieces_of(headers), ended)
                elif kind is TrailersReceived:
                    s = streams.get(event.stream_id)
                    if s is None:
                        continue
                    decoder = _touch(s, touched)
                    self._remote_ended(s)
                    decoder.on_response_trailers(pieces_of(event.headers))
                elif kind is WindowUpdated:
                    self._window_opened(event.stream_id)
                elif kind is StreamReset:
                    s = streams.get(event.stream_id)
                    if s is None:
                        continue
                    decoder = _touch(s, touched)
                    self._finish(s)
                    if event.error_code == ErrorCodes.REFUSED_STREAM:
                        decoder.on_upstream_reset(RESET_TERMINATION, refused=True)
                    else:
                        decoder.on_upstream_reset(RESET_TERMINATION)
                elif kind is RemoteSettingsChanged:
                    self._peer_max_streams = min(self._h2.remote_settings.max_concurrent_streams, UNLIMITED)
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

    def _remote_ended(self, s: Stream) -> None:
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
            decoder = _touch(s, touched)
            self._finish(s)
            decoder.on_upstream_reset(RESET_TERMINATION, refused=True)
        if not self._streams:
            self._close_after_write = True
        self._owner.capacity_changed(self)

    def _protocol_error(self, error: H2Error) -> None:
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

    # --- Session hooks --------------------------------------------------------------------------

    def _local_ended(self, s: Stream) -> None:
        if s.remote_done:
            self._finish(s)

    def _send_failed(self, s: Stream, error: H2Error) -> None:
        if not s.finished:
            self._reset(s, ErrorCodes.CANCEL)
            s.decoder.on_upstream_reset(RESET_TERMINATION)

    def _tell_paused(self, s: Stream, paused: bool) -> None:
        s.decoder.on_write_paused(paused)

    def _stream_finished(self, s: Stream) -> None:
        if not s.id:
            self._unstarted.pop(s, None)
        if not self._closed:
            if self._goaway and not self._streams and not self._unstarted:
                self._close_after_write = True
            self._owner.stream_done(self)
