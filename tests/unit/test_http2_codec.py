"""The downstream HTTP/2 codec (sidecar.codec.http2.Http2ServerCodec) against a real h2 client.

Both sides are sans-IO: the codec writes into a fake transport, the client is an ``h2``
``H2Connection``, and :meth:`Wire.pump` moves bytes between them until neither has more to say.
The connection manager is a fake that records what the codec calls on it.
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes

from sidecar.codec.api import R_BUFFER, R_UPSTREAM
from sidecar.codec.http2 import WRITE_HIGH_WATER, WRITE_LOW_WATER, Http2ServerCodec
from sidecar.codec.http2_session import H2
from sidecar.tracing.context import TP
from tests.support.fakes import ByteSink

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"catalog.shop"), (b":path", b"/items")]


class FakeDecoder:
    """A request stream as the connection manager holds it: records every call."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.calls: list[tuple] = []
        self.body = bytearray()
        self.paused = False

    def decode_headers(self, end_stream: bool) -> None:
        self.calls.append(("headers", end_stream))

    def decode_data(self, data: bytes, end_stream: bool) -> None:
        self.body += data
        self.calls.append(("data", len(data), end_stream))

    def decode_trailers(self, trailers: list[bytes]) -> None:
        self.calls.append(("trailers", trailers))

    def on_reset(self) -> None:
        self.calls.append(("reset",))

    def on_local_reply(self, status: int, flag: str) -> None:
        self.calls.append(("local_reply", status, flag))

    def on_write_paused(self, paused: bool) -> None:
        self.paused = paused
        self.calls.append(("paused", paused))


class FakeManager:
    def __init__(self) -> None:
        self.streams: list[FakeDecoder] = []
        self.errors: list[str] = []
        self.closing_calls = 0

    def new_stream(self, encoder) -> FakeDecoder:
        decoder = FakeDecoder(encoder)
        self.streams.append(decoder)
        return decoder

    def protocol_error(self, detail: str) -> None:
        self.errors.append(detail)

    def closing(self) -> None:
        self.closing_calls += 1


class Wire:
    def __init__(self, client: H2Connection | None = None, **codec_options) -> None:
        self.transport = ByteSink()
        self.manager = FakeManager()
        codec_options.setdefault("tracing", True)
        self.codec = Http2ServerCodec(self.manager, self.transport, **codec_options)
        self.client = client or H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.events: list = []
        self.pump()

    def pump(self) -> list:
        """Move bytes both ways until quiet; the client's events are returned (and kept)."""
        events: list = []
        for _ in range(100):
            out = self.client.data_to_send()
            if out:
                self.codec.dispatch(out)
            back = self.transport.take()
            if back:
                events += self.client.receive_data(back)
            if not out and not back:
                break
        self.events += events
        return events

    def request(self, headers=REQUEST, end_stream: bool = False) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers, end_stream=end_stream)
        self.pump()
        return sid

    def of(self, kind: type, stream_id: int | None = None) -> list:
        return [e for e in self.events if isinstance(e, kind) and (stream_id is None or e.stream_id == stream_id)]

    def received(self, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.of(DataReceived, stream_id))


def test_request_head_body_and_trailers_reach_the_decoder() -> None:
    wire = Wire()
    headers = [*REQUEST, (b"content-type", b"application/grpc+proto"), (b"te", b"trailers"),
               (b"x-custom", b"1"), (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
               (b"x-request-id", b""), (b"x-request-id", b"abc"), (b"trailer", b"grpc-status")]
    sid = wire.request(headers)
    (decoder,) = wire.manager.streams
    assert (decoder.method, decoder.authority, decoder.path) == (b"POST", b"catalog.shop", b"/items")
    assert decoder.headers == [b"content-type", b": ", b"application/grpc+proto", b"\r\n",
                               b"te", b": ", b"trailers", b"\r\n", b"x-custom", b": ", b"1", b"\r\n"]
    assert decoder.version == 20 and decoder.has_body and decoder.chunked and decoder.grpc
    assert not decoder.expect
    assert decoder.trace_in == [(TP, b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]
    assert decoder.request_id == b"abc"
    assert decoder.calls == [("headers", False)]

    wire.client.send_data(sid, b"hello ")
    wire.client.send_data(sid, b"world")
    wire.client.send_headers(sid, [(b"x-checksum", b"42")], end_stream=True)
    wire.pump()
    assert decoder.body == b"hello world"
    assert decoder.calls[1:] == [("data", 6, False), ("data", 5, False),
                                 ("trailers", [b"x-checksum", b": ", b"42", b"\r\n"])]


def test_without_tracing_trace_headers_are_forwarded_and_a_length_is_not_chunked() -> None:
    wire = Wire(tracing=False)
    wire.request([(b":method", b"PUT"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"legacy.shop"),
                  (b"content-length", b"3"), (b"b3", b"1-2-1"), (b"x-request-id", b"r1")])
    (decoder,) = wire.manager.streams
    assert decoder.authority == b"legacy.shop"  # no :authority: Host stands in, and is consumed
    assert decoder.headers == [b"content-length", b": ", b"3", b"\r\n", b"b3", b": ", b"1-2-1", b"\r\n",
                               b"x-request-id", b": ", b"r1", b"\r\n"]
    assert decoder.has_body and not decoder.chunked and not decoder.grpc
    assert decoder.trace_in is None and decoder.request_id is None


def test_a_request_without_body_ends_with_its_headers() -> None:
    wire = Wire()
    wire.request([(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")],
                 end_stream=True)
    (decoder,) = wire.manager.streams
    assert not decoder.has_body and not decoder.chunked
    assert decoder.calls == [("headers", True)]


def test_concurrent_streams_are_answered_independently() -> None:
    wire = Wire()
    ids = [wire.request(end_stream=True) for _ in range(3)]
    assert ids == [1, 3, 5] and wire.codec.active_streams == 3
    first, second, third = wire.manager.streams
    third.encoder.encode_headers(200, [b"content-length", b": ", b"1", b"\r\n"], False)
    first.encoder.encode_headers(404, [], True)
    third.encoder.encode_data(b"3", True)
    second.encoder.encode_headers(200, [], False)
    wire.pump()
    assert wire.codec.active_streams == 1
    statuses = {e.stream_id: dict(e.headers)[b":status"] for e in wire.of(ResponseReceived)}
    assert statuses == {1: b"404", 3: b"200", 5: b"200"}
    assert wire.received(5) == b"3"
    assert {e.stream_id for e in wire.of(StreamEnded)} == {1, 5}
    second.encoder.encode_data(b"two", True)
    wire.pump()
    assert wire.received(3) == b"two" and wire.codec.active_streams == 0


def test_response_headers_are_lower_cased_without_connection_headers_and_end_with_trailers() -> None:
    wire = Wire()
    sid = wire.request(end_stream=True)
    encoder = wire.manager.streams[0].encoder
    encoder.encode_headers(200, [b"Content-Type", b": ", b"application/grpc", b"\r\n",
                                 b"Connection", b": ", b"keep-alive", b"\r\n", b"Keep-Alive", b": ", b"5", b"\r\n",
                                 b"Transfer-Encoding", b": ", b"chunked", b"\r\n", b"Upgrade", b": ", b"h2c", b"\r\n",
                                 b"Proxy-Connection", b": ", b"close", b"\r\n", b"X-Served-By", b": ", b"a", b"\r\n"],
                           False)
    encoder.encode_data(b"\x00\x00\x00\x00\x00", False)
    encoder.encode_trailers([b"Grpc-Status", b": ", b"0", b"\r\n", b"grpc-message", b": ", b"", b"\r\n"])
    wire.pump()
    (response,) = wire.of(ResponseReceived)
    assert response.headers == [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                (b"x-served-by", b"a")]
    (trailers,) = wire.of(TrailersReceived)
    assert trailers.headers == [(b"grpc-status", b"0"), (b"grpc-message", b"")]
    assert trailers.stream_ended is not None
    assert wire.received(sid) == b"\x00" * 5 and wire.codec.active_streams == 0


def test_local_reply_is_a_whole_json_response() -> None:
    wire = Wire()
    sid = wire.request(end_stream=True)
    body = b'{"error": "no healthy upstream", "flags": "UH"}'
    wire.manager.streams[0].encoder.encode_local_reply(503, "UH", body, True)
    wire.pump()
    (response,) = wire.of(ResponseReceived)
    assert response.headers == [(b":status", b"503"), (b"content-type", b"application/json"),
                                (b"content-length", b"%d" % len(body)), (b"x-meshkeeper-flags", b"UH")]
    assert wire.received(sid) == body
    assert not wire.transport.closed  # close is HTTP/1.1's: one stream's error keeps the connection


def test_a_slow_reader_pauses_the_decoder_and_the_queue_stays_bounded() -> None:
    """The client acknowledges nothing: its 64 KiB windows fill, the rest waits in the stream's queue,
    which never passes the high-water mark by more than one write of the (obedient) upstream."""
    wire = Wire()
    sid = wire.request(end_stream=True)
    decoder = wire.manager.streams[0]
    encoder = decoder.encoder
    encoder.encode_headers(200, [], False)
    chunk = b"x" * 16384
    sent = 0
    for _ in range(1000):  # an upstream that writes while it may
        if decoder.paused:
            break
        encoder.encode_data(chunk, False)
        sent += len(chunk)
        wire.pump()
        queued = sent - len(wire.received(sid))
        assert queued <= WRITE_HIGH_WATER + len(chunk)
    assert decoder.paused and ("paused", True) in decoder.calls
    assert len(wire.received(sid)) == 65535  # the client's initial stream window, no more

    # The reader catches up: each acknowledgement opens the window, the queue drains, the decoder resumes.
    total = sent
    for _ in range(100):
        got = len(wire.received(sid))
        wire.client.acknowledge_received_data(got - getattr(wire, "acked", 0), sid)
        wire.acked = got
        wire.pump()
        if not decoder.paused and total < 10 * 65536:
            encoder.encode_data(chunk, False)
            total += len(chunk)
        assert total - len(wire.received(sid)) <= WRITE_HIGH_WATER + len(chunk)
        if total >= 10 * 65536 and len(wire.received(sid)) == total:
            break
    assert len(wire.received(sid)) == total
    assert decoder.calls.count(("paused", False)) >= 1 and not decoder.paused
    encoder.encode_data(b"", True)
    wire.pump()
    assert wire.of(StreamEnded, sid) and wire.codec.active_streams == 0


def test_trailers_wait_behind_queued_data() -> None:
    wire = Wire()
    sid = wire.request(end_stream=True)
    encoder = wire.manager.streams[0].encoder
    encoder.encode_headers(200, [], False)
    encoder.encode_data(b"y" * 100_000, False)
    encoder.encode_trailers([b"grpc-status", b": ", b"0", b"\r\n"])
    wire.pump()
    assert not wire.of(TrailersReceived) and len(wire.received(sid)) == 65535
    wire.client.acknowledge_received_data(65535, sid)
    wire.client.increment_flow_control_window(65535)  # the connection window too
    wire.pump()
    assert len(wire.received(sid)) == 100_000 and wire.of(TrailersReceived, sid)


def test_write_paused_pauses_every_stream_until_the_transport_drains() -> None:
    wire = Wire()
    wire.request(end_stream=True)
    wire.request(end_stream=True)
    first, second = wire.manager.streams
    first.encoder.encode_headers(200, [], False)
    wire.codec.write_paused(True)
    assert first.paused and second.paused
    first.encoder.encode_data(b"held", False)  # queued while the transport is full
    wire.pump()
    assert wire.received(1) == b""
    wire.codec.write_paused(False)
    wire.pump()
    assert wire.received(1) == b"held" and not first.paused and not second.paused


def test_read_disable_withholds_window_updates_until_every_reason_clears() -> None:
    wire = Wire()
    sid = wire.request()
    wire.pump()
    assert wire.client.remote_settings.initial_window_size == 1 << 20
    decoder = wire.manager.streams[0]
    encoder = decoder.encoder
    encoder.read_disable(R_BUFFER, True)
    encoder.read_disable(R_UPSTREAM, True)
    data = b"z" * 16384
    for _ in range(40):  # 640 KiB: past half the window, which would have been acknowledged
        wire.client.send_data(sid, data)
    wire.pump()
    assert len(decoder.body) == 40 * 16384  # delivered, but not acknowledged
    assert wire.client.local_flow_control_window(sid) == (1 << 20) - 40 * 16384
    encoder.read_disable(R_BUFFER, False)
    wire.pump()
    assert wire.client.local_flow_control_window(sid) == (1 << 20) - 40 * 16384
    encoder.read_disable(R_UPSTREAM, False)
    wire.pump()
    assert wire.client.local_flow_control_window(sid) == 1 << 20


def test_credit_comes_back_as_data_is_consumed() -> None:
    wire = Wire()
    sid = wire.request()
    for _ in range(40):
        wire.client.send_data(sid, b"q" * 16384)
    wire.pump()
    # h2 hands credit back in steps of half a window: 512 KiB of the 640 KiB are back.
    assert wire.client.local_flow_control_window(sid) == (1 << 20) - 128 * 1024


def test_client_reset_reaches_the_decoder() -> None:
    wire = Wire()
    sid = wire.request()
    wire.client.reset_stream(sid, ErrorCodes.CANCEL)
    wire.pump()
    assert wire.manager.streams[0].calls[-1] == ("reset",)
    assert wire.codec.active_streams == 0
    wire.manager.streams[0].encoder.encode_headers(200, [], True)  # too late: a no-op
    assert not wire.pump()


def test_encoder_reset_sends_rst_stream_internal_error() -> None:
    wire = Wire()
    sid = wire.request(end_stream=True)
    encoder = wire.manager.streams[0].encoder
    encoder.encode_headers(200, [], False)
    encoder.encode_data(b"part", False)
    encoder.reset()
    wire.pump()
    (reset,) = wire.of(StreamReset, sid)
    assert reset.error_code == ErrorCodes.INTERNAL_ERROR
    assert ("reset",) not in wire.manager.streams[0].calls  # the decoder asked for it
    assert wire.codec.active_streams == 0


def test_a_response_that_ends_before_its_request_resets_with_no_error() -> None:
    wire = Wire()
    sid = wire.request()  # the body is still coming
    wire.manager.streams[0].encoder.encode_local_reply(404, "NR", b"{}", False)
    wire.client.send_data(sid, b"late")  # crosses the reply on the wire
    wire.pump()
    assert wire.received(sid) == b"{}"
    (reset,) = wire.of(StreamReset, sid)
    assert reset.error_code == ErrorCodes.NO_ERROR
    assert wire.codec.active_streams == 0
    assert wire.manager.streams[0].calls == [("headers", False)]


def test_go_away_lets_streams_in_flight_finish_then_closes() -> None:
    wire = Wire(client=H2(H2Configuration(client_side=True, header_encoding=None)))
    first = wire.request(end_stream=True)
    second = wire.request()
    wire.codec.go_away()
    crossing = wire.client.get_next_available_stream_id()
    wire.client.send_headers(crossing, REQUEST, end_stream=True)  # sent before the client read the notice
    wire.pump()
    notice, final = wire.of(ConnectionTerminated)  # RFC 9113 §6.8: a notice, then after a PING the final one
    assert notice.error_code == final.error_code == ErrorCodes.NO_ERROR
    assert notice.last_stream_id == 2**31 - 1 and final.last_stream_id == crossing
    late = wire.client.get_next_available_stream_id()
    wire.client.send_headers(late, REQUEST, end_stream=True)  # crossed the final GOAWAY on the wire
    wire.pump()
    (refused,) = wire.of(StreamReset, late)
    assert refused.error_code == ErrorCodes.REFUSED_STREAM
    assert len(wire.manager.streams) == 3 and not wire.transport.closed

    a, b, c = wire.manager.streams
    a.encoder.encode_headers(200, [], True)
    c.encoder.encode_headers(200, [], True)
    wire.pump()
    assert not wire.transport.closed
    wire.client.send_data(second, b"rest", end_stream=True)
    wire.pump()
    b.encoder.encode_headers(200, [], False)
    b.encoder.encode_data(b"done", True)
    wire.pump()
    assert b.body == b"rest" and wire.received(second) == b"done"
    assert wire.of(StreamEnded, first) and wire.of(StreamEnded, second) and wire.of(StreamEnded, crossing)
    assert wire.transport.closed and wire.manager.closing_calls == 1


def test_go_away_on_a_connection_whose_first_request_is_still_on_the_wire_serves_it() -> None:
    """A connection opened while the listener drains: the preface is read, the drain notice sent,
    and the client's first request (sent with its preface) arrives after it."""
    wire = Wire(client=H2(H2Configuration(client_side=True, header_encoding=None)))
    wire.codec.go_away()
    sid = wire.client.get_next_available_stream_id()
    wire.client.send_headers(sid, REQUEST, end_stream=True)
    wire.pump()
    assert not wire.of(StreamReset, sid) and len(wire.manager.streams) == 1
    assert [e.last_stream_id for e in wire.of(ConnectionTerminated)] == [2**31 - 1, sid]
    wire.manager.streams[0].encoder.encode_headers(200, [], True)
    wire.pump()
    assert wire.of(StreamEnded, sid) and wire.transport.closed


def test_go_away_without_streams_closes_after_the_ping_round_trip() -> None:
    wire = Wire(client=H2(H2Configuration(client_side=True, header_encoding=None)))  # stock h2 stops at GOAWAY
    wire.codec.go_away()
    assert not wire.transport.closed  # a request may be on its way: the PING's ACK says none is
    wire.pump()
    assert wire.transport.closed and wire.manager.closing_calls == 1


def test_header_list_over_the_limit_is_answered_431_and_the_connection_lives_on() -> None:
    wire = Wire(max_header_list_size=1024)
    assert wire.client.remote_settings.max_header_list_size == 1024
    sid = wire.request([*REQUEST, (b"x-big", b"b" * 1200)])
    (decoder,) = wire.manager.streams
    assert decoder.calls == [("local_reply", 431, "DPE")]
    response = dict(wire.of(ResponseReceived, sid)[0].headers)
    assert response[b":status"] == b"431" and response[b"x-meshkeeper-flags"] == b"DPE"
    assert b"too large" in wire.received(sid)
    assert wire.of(StreamReset, sid)[0].error_code == ErrorCodes.NO_ERROR  # its body is not wanted
    assert wire.manager.errors == ["HTTP/2: request headers too large"]
    wire.request(end_stream=True)
    assert wire.manager.streams[1].calls == [("headers", True)] and not wire.transport.closed


def test_max_concurrent_streams_is_advertised_and_enforced() -> None:
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    transport = ByteSink()
    manager = FakeManager()
    codec = Http2ServerCodec(manager, transport, tracing=False, max_concurrent_streams=2)
    # A client that has not read our SETTINGS yet opens three streams.
    for sid in (1, 3, 5):
        client.send_headers(sid, REQUEST)
    codec.dispatch(client.data_to_send())
    events = client.receive_data(transport.take())
    assert client.remote_settings.max_concurrent_streams == 2
    (goaway,) = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert transport.closed and manager.errors


def test_a_bad_preface_is_a_protocol_error() -> None:
    transport = ByteSink()
    manager = FakeManager()
    codec = Http2ServerCodec(manager, transport, tracing=False)
    transport.take()  # our SETTINGS
    codec.dispatch(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert manager.errors and "preamble" in manager.errors[0].lower()
    assert transport.closed and manager.closing_calls == 1
    assert transport.take()[3] == 0x7  # a GOAWAY frame
    codec.dispatch(b"more")  # ignored after the error
    assert not transport.take()


def test_a_protocol_error_resets_open_streams_with_goaway() -> None:
    wire = Wire()
    wire.request()
    # A DATA frame on stream 0 is a connection error (RFC 9113 §6.1).
    wire.codec.dispatch(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    events = wire.client.receive_data(wire.transport.take())
    (goaway,) = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR and goaway.last_stream_id == 1
    assert wire.manager.streams[0].calls[-1] == ("reset",)
    assert wire.transport.closed and wire.manager.errors


def test_ping_is_answered() -> None:
    wire = Wire()
    wire.client.ping(b"12345678")
    events = wire.pump()
    assert [e.ping_data for e in events if isinstance(e, PingAckReceived)] == [b"12345678"]


def test_connection_lost_resets_open_streams() -> None:
    wire = Wire()
    wire.request()
    wire.request(end_stream=True)
    wire.codec.connection_lost()
    assert [d.calls[-1] for d in wire.manager.streams] == [("reset",), ("reset",)]
    assert wire.codec.active_streams == 0


def test_a_batch_is_one_write() -> None:
    wire = Wire()
    wire.request(end_stream=True)
    encoder = wire.manager.streams[0].encoder
    before = wire.transport.writes
    wire.codec.batch_begin()
    encoder.encode_headers(200, [], False)
    encoder.encode_data(b"a", False)
    encoder.encode_data(b"b", False)
    encoder.encode_trailers([b"grpc-status", b": ", b"0", b"\r\n"])
    assert wire.transport.writes == before
    wire.codec.batch_end()
    assert wire.transport.writes == before + 1
    wire.pump()
    assert wire.received(1) == b"ab" and wire.of(TrailersReceived, 1)


def test_a_larger_initial_window_from_the_client_releases_queued_data() -> None:
    wire = Wire()
    sid = wire.request(end_stream=True)
    encoder = wire.manager.streams[0].encoder
    encoder.encode_headers(200, [], False)
    encoder.encode_data(b"w" * 70_000, True)
    wire.pump()
    assert len(wire.received(sid)) == 65535
    wire.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 200_000})
    wire.client.increment_flow_control_window(100_000)
    wire.pump()
    assert len(wire.received(sid)) == 70_000 and wire.of(StreamEnded, sid)


def test_watermarks_are_ordered() -> None:
    assert WRITE_LOW_WATER < WRITE_HIGH_WATER
