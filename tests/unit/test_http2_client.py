"""The upstream HTTP/2 connection (sidecar.codec.http2.Http2ClientConnection) against a real h2 server.

Sans-IO both ways, as in test_http2_codec: the connection writes into a fake transport, the
server is an ``h2`` connection driven by the test, and :meth:`Wire.pump` moves the bytes. The pool
and the router's upstream requests are fakes that record what the connection calls on them.
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes

from sidecar.codec.http2 import WRITE_HIGH_WATER, Http2ClientConnection
from sidecar.codec.http2_session import H2
from tests.support.fakes import ByteSink, RecordingPool

GRPC_HEADERS = [b"Content-Type", b": ", b"application/grpc", b"\r\n", b"TE", b": ", b"trailers", b"\r\n",
                b"Connection", b": ", b"keep-alive", b"\r\n", b"Keep-Alive", b": ", b"5", b"\r\n",
                b"Host", b": ", b"catalog.shop", b"\r\n", b"X-Tenant", b": ", b"7", b"\r\n"]


class FakeUpstreamRequest:
    """The router's side of one upstream stream: records every call."""

    def __init__(self, batches: list | None = None) -> None:
        self.calls: list[tuple] = []
        self.body = bytearray()
        self.paused = False
        self.depth = 0
        self.batches = batches  # shared by the requests of a test: the order of batch_begin calls

    def on_response_headers(self, status: int, headers: list[bytes], end_stream: bool) -> None:
        assert self.depth > 0, "outside a batch"
        self.calls.append(("headers", status, headers, end_stream))

    def on_response_data(self, data: bytes, end_stream: bool) -> None:
        assert self.depth > 0, "outside a batch"
        self.body += data
        self.calls.append(("data", len(data), end_stream))

    def on_response_trailers(self, trailers: list[bytes]) -> None:
        self.calls.append(("trailers", trailers))

    def on_upstream_reset(self, flag: str, refused: bool = False) -> None:
        self.calls.append(("reset", flag, refused))

    def on_write_paused(self, paused: bool) -> None:
        self.paused = paused
        self.calls.append(("paused", paused))

    def batch_begin(self) -> None:
        self.depth += 1
        if self.batches is not None:
            self.batches.append(self)

    def batch_end(self) -> None:
        self.depth -= 1


class Wire:
    def __init__(self, server: H2Connection | None = None, settings: dict | None = None) -> None:
        self.server = server or H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.server.initiate_connection()
        if settings:
            self.server.update_settings(settings)
        self.transport = ByteSink()
        self.pool = RecordingPool()
        self.conn = Http2ClientConnection(self.pool)
        self.conn.connection_made(self.transport)
        self.events: list = []
        self.pump()

    def pump(self) -> list:
        events: list = []
        for _ in range(100):
            out = self.transport.take()
            if out:
                events += self.server.receive_data(out)
            back = self.server.data_to_send()
            if back:
                self.conn.data_received(back)
            if not out and not back:
                break
        self.events += events
        return events

    def start(self, end_stream: bool = True, headers: list[bytes] | None = None,
              batches: list | None = None) -> tuple[FakeUpstreamRequest, object]:
        request = FakeUpstreamRequest(batches)
        encoder = self.conn.new_stream(request)
        encoder.encode_headers(b"POST", b"catalog.shop", b"/pkg.Svc/Get", GRPC_HEADERS if headers is None else headers,
                               end_stream=end_stream, chunked=True, is_head=False)
        self.pump()
        return request, encoder

    def of(self, kind: type, stream_id: int | None = None) -> list:
        return [e for e in self.events if isinstance(e, kind) and (stream_id is None or e.stream_id == stream_id)]


def test_a_request_and_a_response_with_trailers() -> None:
    wire = Wire()
    assert wire.pool.calls[0] == "opened"
    request, encoder = wire.start(end_stream=False)
    (received,) = wire.of(RequestReceived)
    assert received.headers == [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"catalog.shop"),
                                (b":path", b"/pkg.Svc/Get"), (b"content-type", b"application/grpc"),
                                (b"te", b"trailers"), (b"x-tenant", b"7")]
    encoder.encode_data(b"\x00\x00\x00\x00\x02hi", False)
    encoder.encode_trailers([b"X-Sum", b": ", b"1", b"\r\n"])
    wire.pump()
    sid = received.stream_id
    assert b"".join(e.data for e in wire.of(DataReceived, sid)) == b"\x00\x00\x00\x00\x02hi"
    assert wire.of(TrailersReceived, sid)[0].headers == [(b"x-sum", b"1")]

    wire.server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    wire.server.send_data(sid, b"\x00\x00\x00\x00\x01!")
    wire.server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    wire.pump()
    assert request.calls == [("headers", 200, [b"content-type", b": ", b"application/grpc", b"\r\n"], False),
                             ("data", 6, False), ("trailers", [b"grpc-status", b": ", b"0", b"\r\n"])]
    assert request.depth == 0
    assert wire.pool.calls[-1] == "stream_done" and wire.conn.active_streams == 0


def test_te_other_than_trailers_is_not_sent() -> None:
    wire = Wire()
    wire.start(headers=[b"te", b": ", b"gzip", b"\r\n", b"transfer-encoding", b": ", b"chunked", b"\r\n",
                        b"upgrade", b": ", b"h2c", b"\r\n", b"proxy-connection", b": ", b"close", b"\r\n"])
    (received,) = wire.of(RequestReceived)
    assert [name for name, _ in received.headers] == [b":method", b":scheme", b":authority", b":path"]


def test_informational_responses_are_skipped() -> None:
    wire = Wire()
    request, _ = wire.start()
    wire.server.send_headers(1, [(b":status", b"100")])
    wire.server.send_headers(1, [(b":status", b"204")], end_stream=True)
    wire.pump()
    assert request.calls == [("headers", 204, [], True)]


def test_capacity_follows_the_peers_settings() -> None:
    wire = Wire(settings={SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    assert "capacity_changed" in wire.pool.calls
    assert wire.conn.capacity == 2
    first, _ = wire.start()
    assert wire.conn.capacity == 1
    wire.start()
    assert wire.conn.capacity == 0
    wire.server.send_headers(1, [(b":status", b"200")], end_stream=True)
    wire.pump()
    assert first.calls == [("headers", 200, [], True)] and wire.conn.capacity == 1
    assert wire.pool.calls.count("stream_done") == 1


def test_a_stream_over_capacity_is_refused_without_reaching_the_peer() -> None:
    wire = Wire(settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    wire.start()
    request, _ = wire.start()
    assert request.calls == [("reset", "UC", True)]
    assert len(wire.of(RequestReceived)) == 1


def test_refused_stream_is_marked_refused_and_other_resets_are_not() -> None:
    wire = Wire()
    refused, _ = wire.start()
    cancelled, _ = wire.start()
    wire.server.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    wire.server.reset_stream(3, ErrorCodes.INTERNAL_ERROR)
    wire.pump()
    assert refused.calls == [("reset", "UC", True)]
    assert cancelled.calls == [("reset", "UC", False)]
    assert wire.pool.calls.count("stream_done") == 2 and wire.conn.capacity == 100


def test_encoder_reset_sends_cancel() -> None:
    wire = Wire()
    request, encoder = wire.start(end_stream=False)
    encoder.reset()
    wire.pump()
    (reset,) = wire.of(StreamReset, 1)
    assert reset.error_code == ErrorCodes.CANCEL
    assert request.calls == [] and wire.conn.active_streams == 0
    encoder.encode_data(b"late", True)  # a no-op
    assert not wire.pump()


def test_a_response_that_ends_before_the_request_cancels_the_rest() -> None:
    wire = Wire()
    request, encoder = wire.start(end_stream=False)
    wire.server.send_headers(1, [(b":status", b"200"), (b"grpc-status", b"3")], end_stream=True)
    wire.pump()
    assert request.calls == [("headers", 200, [b"grpc-status", b": ", b"3", b"\r\n"], True)]
    assert wire.of(StreamReset, 1)[0].error_code == ErrorCodes.CANCEL
    assert wire.conn.active_streams == 0 and wire.pool.calls[-1] == "stream_done"


def test_goaway_refuses_streams_above_the_last_id_and_lets_the_others_finish() -> None:
    wire = Wire(server=H2(H2Configuration(client_side=False, header_encoding=None)))
    kept, _ = wire.start()
    dropped, _ = wire.start()
    wire.server.send_goaway(ErrorCodes.NO_ERROR, 1)
    wire.pump()
    assert dropped.calls == [("reset", "UC", True)]
    assert wire.conn.capacity == 0 and wire.conn.going_away and "capacity_changed" in wire.pool.calls
    late, _ = wire.start()
    assert late.calls == [("reset", "UC", True)]
    assert not wire.transport.closed
    wire.server.send_headers(1, [(b":status", b"200")])
    wire.server.send_data(1, b"ok", end_stream=True)
    wire.pump()
    assert kept.calls == [("headers", 200, [], False), ("data", 2, True)]
    assert wire.transport.closed  # nothing left in flight


def test_go_away_drains_then_closes() -> None:
    wire = Wire(server=H2(H2Configuration(client_side=False, header_encoding=None)))
    request, _ = wire.start()
    wire.conn.go_away()
    wire.pump()
    assert wire.of(ConnectionTerminated) and wire.conn.capacity == 0 and not wire.transport.closed
    wire.server.send_headers(1, [(b":status", b"200")], end_stream=True)
    wire.pump()
    assert request.calls == [("headers", 200, [], True)] and wire.transport.closed


def test_a_protocol_error_resets_every_stream_with_upe() -> None:
    wire = Wire()
    first, _ = wire.start()
    second, _ = wire.start()
    wire.conn.data_received(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")  # DATA on stream 0
    assert first.calls == [("reset", "UPE", False)] and second.calls == [("reset", "UPE", False)]
    events = wire.server.receive_data(wire.transport.take())
    assert [e.error_code for e in events if isinstance(e, ConnectionTerminated)] == [ErrorCodes.PROTOCOL_ERROR]
    assert wire.transport.closed and wire.conn.capacity == 0
    wire.conn.connection_lost(None)
    assert wire.pool.calls[-1] == "lost" and first.calls == [("reset", "UPE", False)]


def test_connection_lost_resets_open_streams_with_uc() -> None:
    wire = Wire()
    started, _ = wire.start()
    unstarted = FakeUpstreamRequest()
    wire.conn.new_stream(unstarted)
    wire.conn.connection_lost(None)
    assert started.calls == [("reset", "UC", False)] and unstarted.calls == [("reset", "UC", False)]
    assert wire.pool.calls[-1] == "lost" and wire.conn.capacity == 0


def test_a_slow_upstream_reader_pauses_the_request_and_the_queue_stays_bounded() -> None:
    wire = Wire()
    request, encoder = wire.start(end_stream=False)
    chunk = b"u" * 16384
    sent = 0
    for _ in range(100):
        if request.paused:
            break
        encoder.encode_data(chunk, False)
        sent += len(chunk)
        wire.pump()
    received = sum(len(e.data) for e in wire.of(DataReceived, 1))
    assert request.paused and received == 65535
    assert sent - received <= WRITE_HIGH_WATER + len(chunk)
    wire.server.acknowledge_received_data(received, 1)
    wire.server.increment_flow_control_window(1 << 20)
    wire.server.increment_flow_control_window(1 << 20, 1)
    wire.pump()
    assert not request.paused
    assert sum(len(e.data) for e in wire.of(DataReceived, 1)) == sent


def test_read_disable_withholds_credit_for_the_response() -> None:
    wire = Wire()
    request, encoder = wire.start()
    wire.server.send_headers(1, [(b":status", b"200")])
    encoder.read_disable(True)
    for _ in range(40):
        wire.server.send_data(1, b"d" * 16384)
    wire.pump()
    assert len(request.body) == 40 * 16384
    assert wire.server.local_flow_control_window(1) == (1 << 20) - 40 * 16384
    encoder.read_disable(False)
    wire.pump()
    assert wire.server.local_flow_control_window(1) == 1 << 20


def test_reads_of_one_batch_reach_each_decoder_in_one_batch() -> None:
    wire = Wire()
    batches: list = []
    a, _ = wire.start(batches=batches)
    b, _ = wire.start(batches=batches)
    wire.server.send_headers(1, [(b":status", b"200")])
    wire.server.send_headers(3, [(b":status", b"200")])
    wire.server.send_data(1, b"1", end_stream=True)
    wire.server.send_data(3, b"3", end_stream=True)
    wire.conn.data_received(wire.server.data_to_send())
    assert batches == [a, b] and a.depth == 0 and b.depth == 0
    assert a.body == b"1" and b.body == b"3"
