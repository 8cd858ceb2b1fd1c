"""Upstream connections and their per-endpoint pool, driven through fake transports (no sockets).

``FakeTransport`` and ``FakeConnector`` are reused by the connection-manager tests.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from sidecar.upstream.pool import (
    BODY_CHUNKED,
    BODY_EOF,
    BODY_LENGTH,
    BODY_NONE,
    ConnectFailure,
    ConnectionPool,
)
from sidecar.upstream.stats import ClusterStats


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


async def until(cond: Callable[[], object], limit: float = 2.0) -> None:
    """Poll ``cond`` on every loop turn until it is true, failing after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


class FakeTransport(asyncio.Transport):
    """Records writes; simulates a write buffer with a high-water mark and pause/resume_writing."""

    def __init__(self, protocol: asyncio.Protocol, high_water: int | None = None) -> None:
        super().__init__()
        self.protocol = protocol
        self.out = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True
        self.high_water = high_water  # None: writes never fill the buffer
        self.write_paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.out += data
        if self.high_water is not None and len(self.out) > self.high_water and not self.write_paused:
            self.write_paused = True
            self.protocol.pause_writing()

    def writelines(self, lines: Any) -> None:
        for line in list(lines):
            self.write(line)

    def take(self) -> bytes:
        """What was written since the last take; emptying it drains the simulated buffer."""
        data = bytes(self.out)
        self.out.clear()
        if self.write_paused:
            self.write_paused = False
            self.protocol.resume_writing()
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def peer_close(self) -> None:
        """The other side closed the connection."""
        self.close()


class FakeConnector:
    """Stands in for ``loop.create_connection``; every connection is a FakeTransport pair."""

    def __init__(self) -> None:
        self.connections: list[tuple[Any, FakeTransport]] = []
        self.fail: Exception | None = None
        self.hang = False

    async def __call__(self, factory: Callable[[], asyncio.Protocol], host: str, port: int) -> tuple[FakeTransport, Any]:
        if self.hang:
            await asyncio.Event().wait()
        if self.fail is not None:
            raise self.fail
        protocol = factory()
        transport = FakeTransport(protocol)
        protocol.connection_made(transport)
        self.connections.append((protocol, transport))
        return transport, protocol


class RecordingHandler:
    """An UpstreamHandler that records what the connection reports."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.body = bytearray()

    def on_upstream_headers(self, conn: Any, status: int, head: list[bytes], body_kind: int) -> None:
        self.events.append(("headers", status, b"".join(head[1:]), body_kind))

    def on_upstream_body(self, data: bytes) -> None:
        self.body += data

    def on_upstream_complete(self, conn: Any) -> None:
        self.events.append(("complete",))

    def on_upstream_reset(self, conn: Any, flag: str) -> None:
        self.events.append(("reset", flag))

    def on_upstream_write_paused(self, paused: bool) -> None:
        self.events.append(("paused", paused))

    def batch_begin(self) -> None:
        pass

    def batch_end(self) -> None:
        pass


async def new_pool(**kwargs: Any) -> tuple[ConnectionPool, FakeConnector]:
    connector = FakeConnector()
    pool = ConnectionPool("10.0.0.1", 8080, connect_timeout=1.0, stats=ClusterStats(), connector=connector, **kwargs)
    return pool, connector


def send(conn: Any, handler: RecordingHandler, head: bytes = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n",
         is_head: bool = False) -> None:
    conn.send_request(handler, head, is_head, True)


@async_test
async def test_keep_alive_response_returns_connection_to_pool() -> None:
    pool, connector = await new_pool()
    conn = await pool.connect()
    handler = RecordingHandler()
    send(conn, handler)
    assert conn.transport.take() == b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
    # The whole response in one read: keep-alive must be read inside on_message_complete.
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\nok")
    assert handler.events == [("headers", 200, b"Content-Length: 2\r\nX-A: 1\r\n", BODY_LENGTH), ("complete",)]
    assert handler.body == b"ok"
    assert pool.idle_count == 1 and pool.acquire() is conn
    assert conn.requests == 1 and not conn.transport.closed


@async_test
async def test_connection_close_response_is_not_pooled() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingHandler()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert handler.events[-1] == ("complete",)
    assert pool.idle_count == 0 and conn.transport.closed


@async_test
async def test_http10_response_without_keep_alive_is_not_pooled() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    send(conn, RecordingHandler())
    conn.data_received(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert pool.idle_count == 0 and conn.closed


@async_test
async def test_request_not_fully_sent_is_not_pooled() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingHandler()
    conn.send_request(handler, b"POST / HTTP/1.1\r\ncontent-length: 10\r\n\r\n", False, False)
    conn.data_received(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
    assert handler.events[-1] == ("complete",)
    assert pool.idle_count == 0 and conn.closed


@async_test
async def test_chunked_response_body_is_dechunked_and_trailers_dropped() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingHandler()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    conn.data_received(b"2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert handler.events == [("headers", 200, b"", BODY_CHUNKED), ("complete",)]
    assert handler.body == b"abcde"
    assert pool.idle_count == 1


@async_test
async def test_head_response_finishes_at_headers_and_parser_is_reset() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingHandler()
    send(conn, handler, b"HEAD / HTTP/1.1\r\nhost: a\r\n\r\n", is_head=True)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert handler.events == [("headers", 200, b"Content-Length: 1000\r\n", BODY_NONE), ("complete",)]
    assert pool.idle_count == 1
    # The next response on the same connection parses normally (no 1000-byte body expected).
    assert pool.acquire() is conn
    second = RecordingHandler()
    send(conn, second)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert second.events[-1] == ("complete",) and second.body == b"abc"
    assert pool.idle_count == 1


@pytest.mark.parametrize("status", [204, 304])
@async_test
async def test_bodiless_statuses(status: int) -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingHandler()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status)
    assert handler.events == [("headers", status, b"Content-Length: 5\r\n", BODY_NONE), ("complete",)]
    assert pool.idle_count == 1


@async_test
async def test_interim_1xx_responses_are_skipped() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingHandler()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n"
                       b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nz")
    assert handler.events == [("headers", 201, b"Content-Length: 1\r\n", BODY_LENGTH), ("complete",)]
    assert handler.body == b"z"


@async_test
async def test_close_delimited_body_completes_on_close() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingHandler()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\npart1")
    conn.data_received(b"part2")
    assert handler.events == [("headers", 200, b"", BODY_EOF)]
    conn.transport.peer_close()
    await until(lambda: conn.closed and conn.transport is None)
    assert handler.events[-1] == ("complete",) and handler.body == b"part1part2"
    assert pool.idle_count == 0 and pool.cx_active == 0


@async_test
async def test_reset_before_complete_response_reports_uc() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingHandler()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    conn.transport.peer_close()
    await until(lambda: handler.events[-1] == ("reset", "UC"))
    assert pool.stats.upstream_cx_destroy_remote_with_active_rq == 1


@async_test
async def test_malformed_response_reports_upe() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingHandler()
    send(conn, handler)
    conn.data_received(b"NOT HTTP AT ALL\r\n\r\n")
    assert handler.events == [("reset", "UPE")]
    assert conn.transport is None or conn.transport.aborted
    assert pool.stats.upstream_cx_protocol_error == 1


@async_test
async def test_oversized_response_headers_report_upe() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingHandler()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (61 * 1024) + b"\r\n\r\n")
    assert handler.events == [("reset", "UPE")]


@async_test
async def test_closed_idle_connection_is_dropped_and_never_handed_out() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    send(conn, RecordingHandler())
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert pool.idle_count == 1
    conn.transport.peer_close()
    await until(lambda: pool.idle_count == 0)
    assert pool.acquire() is None
    assert pool.cx_active == 0 and pool.stats.upstream_cx_active == 0


@async_test
async def test_bytes_on_idle_connection_close_it() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    send(conn, RecordingHandler())
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\n")  # nobody asked
    assert conn.closed
    await until(lambda: pool.idle_count == 0)


@async_test
async def test_lifo_and_bounded_idle_list() -> None:
    pool, _ = await new_pool(max_idle=2)
    conns = [await pool.connect() for _ in range(3)]
    for conn in conns:
        send(conn, RecordingHandler())
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert pool.idle_count == 2 and conns[2].closed  # the third did not fit
    assert pool.acquire() is conns[1]  # last in, first out
    assert pool.acquire() is conns[0]
    assert pool.acquire() is None


@async_test
async def test_expired_idle_connection_is_closed_on_acquire() -> None:
    pool, _ = await new_pool(idle_timeout=0.01)
    conn = await pool.connect()
    send(conn, RecordingHandler())
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    conn.idle_since -= 1.0
    assert pool.acquire() is None and conn.closed


@async_test
async def test_released_connection_resumes_reading() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    send(conn, RecordingHandler())
    conn.pause_reading()
    assert not conn.transport.reading
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert conn.transport.reading and pool.idle_count == 1


@async_test
async def test_write_pause_is_reported_to_handler() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingHandler()
    send(conn, handler)
    conn.pause_writing()
    conn.resume_writing()
    assert handler.events == [("paused", True), ("paused", False)]


@async_test
async def test_closed_pool_keeps_nothing() -> None:
    pool, _ = await new_pool()
    a = await pool.connect()
    b = await pool.connect()
    send(a, RecordingHandler())
    a.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    send(b, RecordingHandler())
    pool.close()  # endpoint removed: idle closes now, busy closes when done
    assert a.closed and not b.closed
    b.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert b.closed and pool.idle_count == 0


@async_test
async def test_connect_failure_and_timeout() -> None:
    pool, connector = await new_pool()
    connector.fail = ConnectionRefusedError(111, "refused")
    with pytest.raises(ConnectFailure) as info:
        await pool.connect()
    assert not info.value.timed_out
    connector.fail = None
    connector.hang = True
    pool.connect_timeout = 0.02
    with pytest.raises(ConnectFailure) as info:
        await pool.connect()
    assert info.value.timed_out
    assert pool.stats.upstream_cx_connect_fail == 2 and pool.stats.upstream_cx_connect_timeout == 1


@async_test
async def test_connect_with_real_loop_refused() -> None:
    # A real connect to a closed port: the default connector is loop.create_connection.
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    pool = ConnectionPool("127.0.0.1", port, connect_timeout=1.0)
    with pytest.raises(ConnectFailure):
        await pool.connect()


@async_test
async def test_headers_named_by_connection_are_dropped() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingHandler()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 200 OK\r\nX-Hop: 1\r\nConnection: keep-alive, X-Hop\r\nX-End: 2\r\n"
                       b"Content-Length: 0\r\n\r\n")
    assert handler.events[0] == ("headers", 200, b"X-End: 2\r\nContent-Length: 0\r\n", BODY_LENGTH)
