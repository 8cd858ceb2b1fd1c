"""HTTP/1.1 client connections (sidecar.codec.http1_client) and their per-endpoint pool
(sidecar.upstream.pool), driven through fake transports (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.upstream.pool import ConnectFailure, ConnectionPool
from sidecar.upstream.stats import ClusterStats
from tests.support.fakes import FakeConnector, RecordingDecoder, async_test, until


async def new_pool(**kwargs: Any) -> tuple[ConnectionPool, FakeConnector]:
    connector = FakeConnector()
    pool = ConnectionPool("10.0.0.1", 8080, connect_timeout=1.0, stats=ClusterStats(), connector=connector, **kwargs)
    return pool, connector


def send(conn: Any, handler: RecordingDecoder, method: bytes = b"GET", end_stream: bool = True,
         headers: list[bytes] | None = None) -> None:
    """A request on ``conn`` as the pool would attach it: ``METHOD / HTTP/1.1`` to host ``a``."""
    conn.pool.stats.upstream_rq_active += 1  # what new_stream counts (stream_done uncounts it)
    conn.attach(handler).encode_headers(method, b"a", b"/", headers or [], end_stream=end_stream,
                                        chunked=False, is_head=method == b"HEAD")


@async_test
async def test_keep_alive_response_returns_connection_to_pool() -> None:
    pool, connector = await new_pool()
    conn = await pool.connect()
    handler = RecordingDecoder()
    send(conn, handler)
    assert conn.transport.take() == b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
    # The whole response in one read: keep-alive must be read inside on_message_complete.
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\nok")
    assert handler.events == [("headers", 200, b"content-length: 2\r\nX-A: 1\r\n", False), ("complete",)]
    assert handler.body == b"ok"
    assert pool.idle_count == 1 and pool._take_idle() is conn
    assert conn.requests == 1 and not conn.transport.closed


@async_test
async def test_connection_close_response_is_not_pooled() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingDecoder()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert handler.events[-1] == ("complete",)
    assert pool.idle_count == 0 and conn.transport.closed


@async_test
async def test_http10_response_without_keep_alive_is_not_pooled() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    send(conn, RecordingDecoder())
    conn.data_received(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert pool.idle_count == 0 and conn.closed


@async_test
async def test_request_not_fully_sent_is_not_pooled() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingDecoder()
    send(conn, handler, b"POST", end_stream=False, headers=[b"content-length", b": ", b"10", b"\r\n"])
    conn.data_received(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
    assert handler.events[-1] == ("complete",)
    assert pool.idle_count == 0 and conn.closed


@async_test
async def test_chunked_response_body_is_dechunked_and_trailers_dropped() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingDecoder()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    conn.data_received(b"2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert handler.events == [("headers", 200, b"", False), ("complete",)]
    assert handler.body == b"abcde"
    assert pool.idle_count == 1


@async_test
async def test_head_response_finishes_at_headers_and_parser_is_reset() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingDecoder()
    send(conn, handler, b"HEAD")
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert handler.events == [("headers", 200, b"content-length: 1000\r\n", True), ("complete",)]
    assert pool.idle_count == 1
    # The next response on the same connection parses normally (no 1000-byte body expected).
    assert pool._take_idle() is conn
    second = RecordingDecoder()
    send(conn, second)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert second.events[-1] == ("complete",) and second.body == b"abc"
    assert pool.idle_count == 1


@pytest.mark.parametrize("status", [204, 304])
@async_test
async def test_bodiless_statuses(status: int) -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingDecoder()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status)
    assert handler.events == [("headers", status, b"content-length: 5\r\n", True), ("complete",)]
    assert pool.idle_count == 1


@async_test
async def test_interim_1xx_responses_are_skipped() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingDecoder()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n"
                       b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nz")
    assert handler.events == [("headers", 201, b"content-length: 1\r\n", False), ("complete",)]
    assert handler.body == b"z"


@async_test
async def test_close_delimited_body_completes_on_close() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingDecoder()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\npart1")
    conn.data_received(b"part2")
    assert handler.events == [("headers", 200, b"", False)]
    conn.transport.peer_close()
    await until(lambda: conn.closed and conn.transport is None)
    assert handler.events[-1] == ("complete",) and handler.body == b"part1part2"
    assert pool.idle_count == 0 and pool.cx_active == 0


@async_test
async def test_reset_before_complete_response_reports_uc() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingDecoder()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    conn.transport.peer_close()
    await until(lambda: handler.events[-1] == ("reset", "UC"))
    assert pool.stats.upstream_cx_destroy_remote_with_active_rq == 1


@async_test
async def test_malformed_response_reports_upe() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingDecoder()
    send(conn, handler)
    conn.data_received(b"NOT HTTP AT ALL\r\n\r\n")
    assert handler.events == [("reset", "UPE")]
    assert conn.transport is None or conn.transport.aborted
    assert pool.stats.upstream_cx_protocol_error == 1


@async_test
async def test_oversized_response_headers_report_upe() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingDecoder()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (61 * 1024) + b"\r\n\r\n")
    assert handler.events == [("reset", "UPE")]


@async_test
async def test_closed_idle_connection_is_dropped_and_never_handed_out() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    send(conn, RecordingDecoder())
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert pool.idle_count == 1
    conn.transport.peer_close()
    await until(lambda: pool.idle_count == 0)
    assert pool._take_idle() is None
    assert pool.cx_active == 0 and pool.stats.upstream_cx_active == 0


@async_test
async def test_bytes_on_idle_connection_close_it() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    send(conn, RecordingDecoder())
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\n")  # nobody asked
    assert conn.closed
    await until(lambda: pool.idle_count == 0)


@async_test
async def test_lifo_and_bounded_idle_list() -> None:
    pool, _ = await new_pool(max_idle=2)
    conns = [await pool.connect() for _ in range(3)]
    for conn in conns:
        send(conn, RecordingDecoder())
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert pool.idle_count == 2 and conns[2].closed  # the third did not fit
    assert pool._take_idle() is conns[1]  # last in, first out
    assert pool._take_idle() is conns[0]
    assert pool._take_idle() is None


@async_test
async def test_expired_idle_connection_is_closed_on_acquire() -> None:
    pool, _ = await new_pool(idle_timeout=0.01)
    conn = await pool.connect()
    send(conn, RecordingDecoder())
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    conn.idle_since -= 1.0
    assert pool._take_idle() is None and conn.closed


@async_test
async def test_released_connection_resumes_reading() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    send(conn, RecordingDecoder())
    conn.read_disable(True)
    assert not conn.transport.reading
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert conn.transport.reading and pool.idle_count == 1


@async_test
async def test_write_pause_is_reported_to_handler() -> None:
    pool, _ = await new_pool()
    conn = await pool.connect()
    handler = RecordingDecoder()
    send(conn, handler)
    conn.pause_writing()
    conn.resume_writing()
    assert handler.events == [("paused", True), ("paused", False)]


@async_test
async def test_closed_pool_keeps_nothing() -> None:
    pool, _ = await new_pool()
    a = await pool.connect()
    b = await pool.connect()
    send(a, RecordingDecoder())
    a.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    send(b, RecordingDecoder())
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
    handler = RecordingDecoder()
    send(conn, handler)
    conn.data_received(b"HTTP/1.1 200 OK\r\nX-Hop: 1\r\nConnection: keep-alive, X-Hop\r\nX-End: 2\r\n"
                       b"Content-Length: 0\r\n\r\n")
    assert handler.events[0] == ("headers", 200, b"X-End: 2\r\ncontent-length: 0\r\n", False)
