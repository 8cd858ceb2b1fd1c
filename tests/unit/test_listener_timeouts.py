"""The listener's request-header timeout (408 DT) and downstream idle timeout, on fake transports.

The listener's sweep is driven by hand on a fake clock: ``sweeps`` advances the clock one sweep
period at a time and sweeps, as the listener's timer would.
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.codec.http1 import MAX_PIPELINED
from sidecar.proxy.context import ListenerContext
from tests.support.fakes import async_test, until
from tests.unit.test_http_proxy import OK, Client, Mesh, assert_local_reply, parse_responses
from tests.unit.test_ratelimit import FakeClock


def timed_mesh(headers_timeout: float, idle_timeout: float = 0.0) -> tuple[Mesh, FakeClock]:
    """A Mesh whose listener runs on a fake clock with these timeouts."""
    mesh = Mesh()
    clock = FakeClock(1000.0)
    mesh.runtime = ListenerContext("outbound", mesh.clusters, mesh.runtime.router, clock=clock)
    mesh.runtime.set_limits(None, headers_timeout, idle_timeout)
    return mesh, clock


def sweeps(rt: ListenerContext, clock: FakeClock, seconds: float, stop: Callable[[], bool] = lambda: False) -> float:
    """Sweep every period for ``seconds`` (or until ``stop()``); returns the seconds it took."""
    start = clock.now
    while clock.now - start < seconds - 1e-9:
        clock.now += rt.sweep_period
        rt.sweep()
        if stop():
            break
    return clock.now - start


# --- request_headers_timeout -----------------------------------------------------------------------------


@async_test
async def test_slowloris_head_gets_408_and_close_within_the_sweep_precision() -> None:
    mesh, clock = timed_mesh(headers_timeout=10.0)
    rt = mesh.runtime
    assert rt.sweep_period == 1.0
    client = mesh.client()
    sweeps(rt, clock, 2.5)  # a connection that has sent nothing is not in a head
    assert not client.transport.closed
    clock.now += 0.5
    started = clock.now
    client.send(b"GET / HTTP/1.1\r\n")
    for i in range(30):  # a header line now and then: still the same head
        clock.now += 0.5
        client.send(b"X-Slow-%d: 1\r\n" % i)
        rt.sweep()
        if client.transport.closed:
            break
    elapsed = clock.now - started
    assert client.transport.closed
    assert 10.0 <= elapsed <= 10.0 + 2 * rt.sweep_period
    resp = parse_responses(client.received())
    assert len(resp) == 1
    assert_local_reply(resp[0], 408, "DT")
    assert resp[0]["headers"]["connection"] == "close"
    stats = rt.stats
    assert (stats.downstream_rq_header_timeout, stats.downstream_rq_4xx, stats.downstream_cx_protocol_error) == (1, 1, 0)
    await until(lambda: stats.downstream_cx_active == 0)
    assert stats.downstream_rq_active == 0
    assert not rt.sweeping  # the last connection took the sweep with it


@async_test
async def test_a_head_completed_before_the_timeout_is_unaffected() -> None:
    mesh, clock = timed_mesh(headers_timeout=10.0)
    rt = mesh.runtime
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\n")
    sweeps(rt, clock, 8.0)
    client.send(b"Host: svc\r\n\r\n")  # 9 s for the head: in time
    up = await mesh.upstream()
    sweeps(rt, clock, 30.0)  # the request itself may take longer than the head timeout
    assert not client.transport.closed
    assert up.received().startswith(b"GET / HTTP/1.1\r\n")
    up.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    # Each new head gets the whole timeout again.
    client.send(b"GET /2 HTTP/1.1\r\n")
    sweeps(rt, clock, 8.0)
    client.send(b"Host: svc\r\n\r\n")
    up.respond(OK)
    assert [r["status"] for r in parse_responses(client.received())] == [200]
    assert not client.transport.closed
    assert rt.stats.downstream_rq_header_timeout == 0


@async_test
async def test_408_of_a_pipelined_head_comes_after_the_earlier_responses() -> None:
    mesh, clock = timed_mesh(headers_timeout=5.0)
    rt = mesh.runtime
    client = mesh.client()
    client.send(b"GET /first HTTP/1.1\r\nHost: svc\r\n\r\nGET /second HTTP/1.1\r\nHo")
    up = await mesh.upstream()
    sweeps(rt, clock, 10.0, stop=lambda: rt.stats.downstream_rq_header_timeout > 0)
    assert rt.stats.downstream_rq_header_timeout == 1
    assert client.received() == b""  # the first request is still being answered
    assert not client.transport.closed
    up.respond(OK)
    resp = parse_responses(client.received())
    assert [r["status"] for r in resp] == [200, 408]
    assert_local_reply(resp[1], 408, "DT")
    assert client.transport.closed
    assert up.received() == b"GET /first HTTP/1.1\r\nhost: svc\r\n\r\n"  # the second never went upstream
    await until(lambda: rt.stats.downstream_cx_active == 0)
    assert rt.stats.downstream_rq_active == 0


@async_test
async def test_a_head_is_not_timed_while_the_proxy_does_not_read() -> None:
    mesh, clock = timed_mesh(headers_timeout=5.0)
    rt = mesh.runtime
    client = mesh.client()
    # The first request waits for its upstream; enough are parsed ahead that reading pauses in a head.
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n" * (MAX_PIPELINED + 1) + b"GET / HTTP/1.1\r\n")
    assert not client.transport.reading
    await mesh.upstream()
    sweeps(rt, clock, 20.0)
    assert rt.stats.downstream_rq_header_timeout == 0
    assert not client.transport.closed


# --- idle_timeout --------------------------------------------------------------------------------------------


@async_test
async def test_idle_connection_is_closed_after_idle_timeout() -> None:
    mesh, clock = timed_mesh(headers_timeout=0.0, idle_timeout=30.0)
    rt = mesh.runtime
    assert rt.sweep_period == 3.0
    silent = mesh.client()
    used = mesh.client()
    used.send(b"GET / HTTP/1.1\r\nHost: ghost-host\r\n\r\n")
    assert parse_responses(used.received())[0]["status"] == 404
    took = sweeps(rt, clock, 60.0, stop=lambda: silent.transport.closed and used.transport.closed)
    assert 30.0 <= took <= 30.0 + 2 * rt.sweep_period
    assert silent.received() == used.received() == b""  # HTTP/1.1: closed without a response
    assert rt.stats.downstream_cx_idle_timeout == 2
    await until(lambda: rt.stats.downstream_cx_active == 0)


@async_test
async def test_requests_now_and_then_or_a_long_one_keep_a_connection_open() -> None:
    mesh, clock = timed_mesh(headers_timeout=0.0, idle_timeout=30.0)
    rt = mesh.runtime
    client = mesh.client()
    for _ in range(6):  # idle at every sweep, but never for 30 s in a row
        sweeps(rt, clock, 20.0)
        client.send(b"GET / HTTP/1.1\r\nHost: ghost-host\r\n\r\n")
        assert parse_responses(client.received())[0]["status"] == 404
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    sweeps(rt, clock, 100.0)  # an active request is not idle
    assert not client.transport.closed
    up.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    took = sweeps(rt, clock, 60.0, stop=lambda: client.transport.closed)
    assert client.transport.closed and 30.0 <= took <= 36.0
    assert rt.stats.downstream_cx_idle_timeout == 1


@async_test
async def test_an_idle_connection_is_not_a_slow_head() -> None:
    mesh, clock = timed_mesh(headers_timeout=1.0, idle_timeout=0.0)
    client = mesh.client()
    sweeps(mesh.runtime, clock, 100.0)
    assert not client.transport.closed
    assert mesh.runtime.stats.downstream_rq_header_timeout == mesh.runtime.stats.downstream_cx_idle_timeout == 0


# --- cost ----------------------------------------------------------------------------------------------------


@async_test
async def test_no_sweep_without_timeouts_and_none_without_connections() -> None:
    mesh = Mesh()
    rt = mesh.runtime
    assert (rt.request_headers_timeout, rt.idle_timeout, rt.sweep_period) == (0.0, 3600.0, 360.0)  # Envoy's defaults
    assert not rt.sweeping
    first = mesh.client()
    second = mesh.client()
    assert rt.sweeping
    rt.set_limits(None, 0.0, 0.0)
    assert not rt.sweeping and rt.sweep_period == 0.0
    third = Client(rt)
    assert not rt.sweeping
    rt.set_limits(None, 2.0, 0.0)
    assert rt.sweeping and rt.sweep_period == 0.25
    for client in (first, second, third):
        client.transport.close()
    await until(lambda: not rt.connections)
    assert not rt.sweeping
