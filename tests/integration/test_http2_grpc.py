"""The HTTP/2 codecs on real sockets with grpcio at the other end: Http2ClientConnection calls a real
grpcio server's health service (grpcio-health-checking) by hand, and a stock grpcio client calls
Http2ServerCodec, behind a stand-in connection manager that answers the health check itself.

A unary gRPC call is a POST of one length-prefixed message (a 5-byte prefix: compressed flag, then
the length, big-endian) with ``content-type: application/grpc`` and ``te: trailers``; the status
comes in trailers.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sidecar.codec.http2 import Http2ClientConnection, Http2ServerCodec
from tests.support.fakes import RecordingPool
from tests.support.polling import until

pytestmark = pytest.mark.integration

CHECK = b"/grpc.health.v1.Health/Check"
HEADERS = [b"content-type", b": ", b"application/grpc", b"\r\n", b"te", b": ", b"trailers", b"\r\n"]


@pytest.fixture
def health_server() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set("catalog", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


class Call:
    """One unary call's response, as the router's upstream request would see it."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.trailers: dict[bytes, bytes] | None = None
        self.reset: str | None = None

    def on_response_headers(self, status: int, headers: list[bytes], end_stream: bool) -> None:
        self.status = status
        self.headers = dict(zip(headers[0::4], headers[2::4], strict=True))
        if end_stream:
            self.trailers = self.headers  # trailers-only

    def on_response_data(self, data: bytes, end_stream: bool) -> None:
        self.body += data

    def on_response_trailers(self, trailers: list[bytes]) -> None:
        self.trailers = dict(zip(trailers[0::4], trailers[2::4], strict=True))

    def on_upstream_reset(self, flag: str, refused: bool = False) -> None:
        self.reset = flag

    def on_write_paused(self, paused: bool) -> None:
        pass

    def batch_begin(self) -> None:
        pass

    def batch_end(self) -> None:
        pass

    @property
    def done(self) -> bool:
        return self.trailers is not None or self.reset is not None

    def message(self) -> health_pb2.HealthCheckResponse:
        flag, length = struct.unpack(">BI", self.body[:5])
        assert flag == 0 and len(self.body) == 5 + length
        return health_pb2.HealthCheckResponse.FromString(bytes(self.body[5:]))


def check(conn: Http2ClientConnection, port: int, service: str) -> Call:
    call = Call()
    encoder = conn.new_stream(call)
    message = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    encoder.encode_headers(b"POST", b"127.0.0.1:%d" % port, CHECK, HEADERS, end_stream=False, chunked=True,
                           is_head=False)
    encoder.encode_data(struct.pack(">BI", 0, len(message)) + message, True)
    return call


async def connect(port: int) -> tuple[Http2ClientConnection, RecordingPool]:
    pool = RecordingPool()
    _, conn = await asyncio.get_running_loop().create_connection(lambda: Http2ClientConnection(pool),
                                                                 "127.0.0.1", port)
    return conn, pool


async def test_a_unary_call_gets_its_message_and_grpc_status_0_in_trailers(health_server: int) -> None:
    conn, pool = await connect(health_server)
    assert pool.calls == ["opened"] and conn.capacity > 0
    call = check(conn, health_server, "catalog")
    await until(lambda: call.done, limit=5.0)
    assert call.reset is None and call.status == 200
    assert call.headers[b"content-type"].startswith(b"application/grpc")
    assert call.trailers[b"grpc-status"] == b"0"
    assert call.message().status == health_pb2.HealthCheckResponse.SERVING
    await until(lambda: "stream_done" in pool.calls, limit=5.0)
    assert conn.active_streams == 0
    conn.go_away()
    await until(lambda: "lost" in pool.calls, limit=5.0)


async def test_an_error_status_arrives_in_trailers(health_server: int) -> None:
    conn, pool = await connect(health_server)
    call = check(conn, health_server, "no-such-service")
    await until(lambda: call.done, limit=5.0)
    assert call.reset is None and call.status == 200
    assert call.trailers[b"grpc-status"] == b"5"  # NOT_FOUND
    conn.close()
    await until(lambda: "lost" in pool.calls, limit=5.0)


async def test_many_calls_share_one_connection(health_server: int) -> None:
    conn, pool = await connect(health_server)
    calls = [check(conn, health_server, "catalog") for _ in range(50)]
    await until(lambda: all(c.done for c in calls), limit=5.0)
    assert all(c.trailers[b"grpc-status"] == b"0" and c.message().status == 1 for c in calls)
    assert pool.calls.count("stream_done") == 50 and conn.active_streams == 0
    conn.close()
    await until(lambda: "lost" in pool.calls, limit=5.0)


class EchoHealthManager:
    """A connection manager that answers every Health/Check itself: SERVING, in gRPC framing."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, list[bytes]]] = []
        self.errors: list[str] = []

    def new_stream(self, encoder) -> Request:
        return Request(self, encoder)

    def protocol_error(self, detail: str) -> None:
        self.errors.append(detail)

    def closing(self) -> None:
        pass


class Request:
    def __init__(self, manager: EchoHealthManager, encoder) -> None:
        self.manager = manager
        self.encoder = encoder
        self.body = bytearray()

    def decode_headers(self, end_stream: bool) -> None:
        self.manager.requests.append((self.method, self.path, self.headers))

    def decode_data(self, data: bytes, end_stream: bool) -> None:
        self.body += data
        if end_stream:
            self._answer()

    def decode_trailers(self, trailers: list[bytes]) -> None:
        self._answer()

    def _answer(self) -> None:
        flag, length = struct.unpack(">BI", self.body[:5])
        request = health_pb2.HealthCheckRequest.FromString(bytes(self.body[5:5 + length]))
        reply = health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if request.service == "catalog"
            else health_pb2.HealthCheckResponse.SERVICE_UNKNOWN).SerializeToString()
        self.encoder.encode_headers(200, [b"content-type", b": ", b"application/grpc", b"\r\n"], False)
        self.encoder.encode_data(struct.pack(">BI", 0, len(reply)) + reply, False)
        self.encoder.encode_trailers([b"grpc-status", b": ", b"0", b"\r\n"])

    def on_reset(self) -> None:
        pass

    def on_local_reply(self, status: int, flag: str) -> None:
        pass

    def on_write_paused(self, paused: bool) -> None:
        pass


class Downstream(asyncio.Protocol):
    """The connection manager's socket side, reduced to what the codec needs."""

    def __init__(self, manager: EchoHealthManager) -> None:
        self.manager = manager
        self.codec: Http2ServerCodec | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.codec = Http2ServerCodec(self.manager, transport, tracing=False)

    def data_received(self, data: bytes) -> None:
        self.codec.dispatch(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.codec.connection_lost()


async def test_a_grpcio_client_is_served_through_the_server_codec() -> None:
    manager = EchoHealthManager()
    server = await asyncio.get_running_loop().create_server(lambda: Downstream(manager), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        loop = asyncio.get_running_loop()
        for service, status in (("catalog", 1), ("billing", 3)):
            reply = await loop.run_in_executor(
                None, lambda s=service: stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=5))
            assert reply.status == status
        method, path, headers = manager.requests[0]
        assert (method, path) == (b"POST", CHECK)
        assert b"te" in headers[0::4] and manager.errors == []
    finally:
        channel.close()
        server.close()
        await server.wait_closed()
