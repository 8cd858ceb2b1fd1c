"""The L4 proxy (sidecar.l4) on real sockets on 127.0.0.1, under uvloop, all in one process.

Backends and clients use asyncio streams (test code); the proxy is the real TcpProxy served by
``loop.create_server``, or installed by a dispatching protocol with ``set_protocol``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from sidecar.config import ClusterConfig, EndpointConfig, OutlierConfig
from sidecar.l4 import TcpProxy, TcpProxyConfig, TcpProxyRuntime
from sidecar.upstream.cluster import ClusterManager
from tests.support import polling

MB = 1024 * 1024
UVLOOP_READ = 256 * 1024  # uvloop reads at most this much per data_received

until = functools.partial(polling.until, limit=5.0)  # real sockets: a more generous deadline


def uvloop_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        uvloop.run(fn(*args, **kwargs))

    return wrapper


def refused_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def static_cluster(name: str, ports: list[tuple[int, int]], **kwargs: Any) -> ClusterManager:
    clusters = ClusterManager()
    endpoints = tuple(EndpointConfig("127.0.0.1", port, weight=weight) for port, weight in ports)
    clusters.update_clusters({name: ClusterConfig(name, discovery="STATIC", static_endpoints=endpoints, **kwargs)})
    return clusters


async def serve_proxy(runtime: TcpProxyRuntime) -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(lambda: TcpProxy(runtime), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def echo_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo as it reads; after the client's EOF, finish and close (a half-close round trip)."""
    while data := await reader.read(256 * 1024):
        writer.write(data)
        await writer.drain()
    writer.close()


async def named_backend(name: bytes) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(name)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def ask(port: int, data: bytes = b"hi") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    answer = await reader.read()
    writer.close()
    return answer


@uvloop_test
async def test_50mb_both_ways_byte_exact_with_half_close() -> None:
    backend = await asyncio.start_server(echo_until_eof, "127.0.0.1", 0)
    clusters = static_cluster("tcp", [(backend.sockets[0].getsockname()[1], 1)])
    runtime = TcpProxyRuntime(TcpProxyConfig("tcp", "tcp"), clusters)
    server, port = await serve_proxy(runtime)
    payload = random.randbytes(50 * MB)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(payload), MB):
            writer.write(view[i : i + MB])
            await writer.drain()
        writer.write_eof()  # the client is done sending; the answer keeps coming

    async def receive() -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        while data := await reader.read(MB):
            digest.update(data)
            size += len(data)
        return digest.hexdigest(), size

    _, (digest, size) = await asyncio.wait_for(asyncio.gather(send(), receive()), 60)
    assert size == len(payload)
    assert digest == hashlib.sha256(payload).hexdigest()
    writer.close()
    stats = clusters.get("tcp").stats
    await until(lambda: stats.upstream_cx_active == 0 and runtime.stats.downstream_cx_active == 0)
    assert stats.upstream_cx_tx_bytes_total == stats.upstream_cx_rx_bytes_total == len(payload)
    assert runtime.stats.downstream_cx_rx_bytes_total == runtime.stats.downstream_cx_tx_bytes_total == len(payload)
    assert stats.upstream_cx_total == 1
    endpoint = next(iter(clusters.get("tcp").endpoints.values()))
    assert (endpoint.total_requests, endpoint.rq_success, endpoint.rq_error, endpoint.active_requests) == (1, 1, 0, 0)
    server.close()
    backend.close()


@uvloop_test
async def test_upstream_half_closes_first() -> None:
    """A server that speaks first and shuts down its write side; the client's later bytes still get through."""
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"greeting")
        writer.write_eof()
        got.append(await reader.read())  # until the client's EOF
        writer.close()

    backend = await asyncio.start_server(handle, "127.0.0.1", 0)
    clusters = static_cluster("tcp", [(backend.sockets[0].getsockname()[1], 1)])
    runtime = TcpProxyRuntime(TcpProxyConfig("tcp", "tcp"), clusters)
    server, port = await serve_proxy(runtime)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 5) == b"greeting"  # EOF came through
    writer.write(b"late answer")
    writer.write_eof()
    await until(lambda: got)
    assert got == [b"late answer"]
    await until(lambda: runtime.stats.downstream_cx_active == 0)
    writer.close()
    server.close()
    backend.close()


@uvloop_test
async def test_weighted_balancing_across_two_backends() -> None:
    a, port_a = await named_backend(b"a")
    b, port_b = await named_backend(b"b")
    clusters = static_cluster("tcp", [(port_a, 1), (port_b, 3)])
    runtime = TcpProxyRuntime(TcpProxyConfig("tcp", "tcp"), clusters)
    server, port = await serve_proxy(runtime)
    answers = [await ask(port) for _ in range(400)]
    assert abs(answers.count(b"a") / 400 - 0.25) < 0.03
    assert answers.count(b"a") + answers.count(b"b") == 400
    server.close()
    a.close()
    b.close()


@uvloop_test
async def test_refusing_backend_is_ejected_and_connections_go_elsewhere() -> None:
    good, good_port = await named_backend(b"good")
    bad_port = refused_port()
    outlier = OutlierConfig(consecutive_5xx=3, interval=10.0, max_ejection_percent=50)
    clusters = static_cluster("tcp", [(good_port, 1), (bad_port, 1)], outlier=outlier)
    runtime = TcpProxyRuntime(TcpProxyConfig("tcp", "tcp"), clusters)
    server, port = await serve_proxy(runtime)
    cluster = clusters.get("tcp")
    answers = [await ask(port) for _ in range(6)]
    assert answers.count(b"good") == 3 and answers.count(b"") == 3  # refused ones closed at once
    bad = cluster.endpoints[f"127.0.0.1:{bad_port}"]
    assert bad.ejected
    assert cluster.stats.upstream_cx_connect_fail == 3
    assert cluster.stats.outlier_detection_ejections_enforced_consecutive_5xx == 1
    assert [await ask(port) for _ in range(20)] == [b"good"] * 20
    assert (bad.total_requests, bad.rq_error) == (3, 3)
    server.close()
    good.close()


@uvloop_test
async def test_connect_retry_on_another_endpoint() -> None:
    good, good_port = await named_backend(b"good")
    clusters = static_cluster("tcp", [(good_port, 1), (refused_port(), 1)])
    runtime = TcpProxyRuntime(TcpProxyConfig("tcp", "tcp", max_connect_attempts=2), clusters)
    server, port = await serve_proxy(runtime)
    assert [await ask(port) for _ in range(10)] == [b"good"] * 10
    # Every connection that met the refusing endpoint first was retried on the other one (how
    # many did depends on the balancer's rotation, which the retry's pick also advances).
    assert clusters.get("tcp").stats.upstream_cx_connect_fail >= 1
    assert clusters.get("tcp").stats.upstream_cx_connect_attempts_exceeded == 0
    server.close()
    good.close()


@uvloop_test
async def test_idle_timeout_closes_both_sides() -> None:
    backend_saw_eof = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never sends; returns at the proxy's close
        backend_saw_eof.set()
        writer.close()

    backend = await asyncio.start_server(silent, "127.0.0.1", 0)
    clusters = static_cluster("tcp", [(backend.sockets[0].getsockname()[1], 1)])
    runtime = TcpProxyRuntime(TcpProxyConfig("tcp", "tcp", idle_timeout=0.3), clusters)
    server, port = await serve_proxy(runtime)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"anyone there?")
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert time.monotonic() - started >= 0.3
    await asyncio.wait_for(backend_saw_eof.wait(), 5)
    assert runtime.stats.idle_timeout == 1
    assert clusters.get("tcp").stats.upstream_cx_idle_timeout == 1
    await until(lambda: runtime.stats.downstream_cx_active == 0 and not runtime.sweeping)
    writer.close()
    server.close()
    backend.close()


@uvloop_test
async def test_slow_reader_keeps_proxy_buffers_bounded() -> None:
    received = 0

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while data := await reader.read(256 * 1024):
            received += len(data)
            await asyncio.sleep(0.002)  # about 100 MB/s at most, slower than loopback
        writer.close()

    backend = await asyncio.start_server(slow, "127.0.0.1", 0)
    clusters = static_cluster("tcp", [(backend.sockets[0].getsockname()[1], 1)])
    config = TcpProxyConfig("tcp", "tcp")
    runtime = TcpProxyRuntime(config, clusters)
    server, port = await serve_proxy(runtime)
    peak = 0
    done = False

    async def sample() -> None:
        nonlocal peak
        while not done:
            for proxy in list(runtime.connections):
                for transport in (proxy._down, proxy._up):
                    if transport is not None:
                        peak = max(peak, transport.get_write_buffer_size())
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = b"x" * MB
    for _ in range(50):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 60) == b""
    done = True
    await sampler
    assert received == 50 * MB
    assert runtime.stats.downstream_flow_control_paused_reading_total > 0
    assert runtime.stats.downstream_flow_control_resumed_reading_total > 0
    assert 0 < peak <= config.buffer_limit + UVLOOP_READ, peak
    server.close()
    backend.close()


@uvloop_test
async def test_both_sides_keep_tcp_nodelay() -> None:
    hold = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await hold.wait()
        writer.close()

    backend = await asyncio.start_server(handle, "127.0.0.1", 0)
    clusters = static_cluster("tcp", [(backend.sockets[0].getsockname()[1], 1)])
    runtime = TcpProxyRuntime(TcpProxyConfig("tcp", "tcp"), clusters)
    server, port = await serve_proxy(runtime)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    await until(lambda: runtime.connections and next(iter(runtime.connections))._up is not None)
    proxy = next(iter(runtime.connections))
    for transport in (proxy._down, proxy._up):
        sock = transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    hold.set()
    writer.close()
    server.close()
    backend.close()


class Dispatcher(asyncio.Protocol):
    """Reads the first bytes, then hands the connection to a TcpProxy for a fixed address
    (what a listener does with the original destination of a redirected connection)."""

    def __init__(self, runtime: TcpProxyRuntime, dst: tuple[str, int]) -> None:
        self.runtime = runtime
        self.dst = dst
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        proxy = TcpProxy(self.runtime, original_dst=self.dst)
        self.transport.set_protocol(proxy)
        proxy.connection_made(self.transport)
        proxy.data_received(data)


@uvloop_test
async def test_original_destination_via_set_protocol_counts_on_passthrough() -> None:
    backend = await asyncio.start_server(echo_until_eof, "127.0.0.1", 0)
    dst = ("127.0.0.1", backend.sockets[0].getsockname()[1])
    clusters = ClusterManager()
    clusters.update_clusters({"PassthroughCluster": ClusterConfig("PassthroughCluster", discovery="STATIC")})
    runtime = TcpProxyRuntime(TcpProxyConfig("passthrough", "PassthroughCluster"), clusters)
    server = await asyncio.get_running_loop().create_server(lambda: Dispatcher(runtime, dst), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    writer.write(b"first bytes")
    await until(lambda: runtime.connections)
    writer.write(b", then more")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"first bytes, then more"
    stats = clusters.get("PassthroughCluster").stats
    await until(lambda: stats.upstream_cx_active == 0)
    assert (stats.upstream_cx_total, stats.upstream_cx_tx_bytes_total) == (1, 22)
    writer.close()
    server.close()
    backend.close()


@uvloop_test
async def test_black_hole_and_refused_original_destination_close_at_once() -> None:
    clusters = ClusterManager()
    clusters.update_clusters({"BlackHoleCluster": ClusterConfig("BlackHoleCluster", discovery="STATIC")})
    runtime = TcpProxyRuntime(TcpProxyConfig("blackhole", "BlackHoleCluster"), clusters)
    server, port = await serve_proxy(runtime)
    assert await asyncio.wait_for(ask(port), 5) == b""
    assert clusters.get("BlackHoleCluster").stats.upstream_cx_none_healthy == 1
    server.close()
    dead = ("127.0.0.1", refused_port())
    server = await asyncio.get_running_loop().create_server(lambda: TcpProxy(runtime, original_dst=dead),
                                                            "127.0.0.1", 0)
    assert await asyncio.wait_for(ask(server.sockets[0].getsockname()[1]), 5) == b""
    stats = clusters.get("BlackHoleCluster").stats
    assert (stats.upstream_cx_connect_fail, stats.upstream_cx_connect_attempts_exceeded) == (1, 1)
    await until(lambda: runtime.stats.downstream_cx_active == 0)
    server.close()


@uvloop_test
async def test_a_client_writing_while_the_upstream_connects_is_held_to_one_read() -> None:
    """uvloop reads an accepted connection even though connection_made paused it: what waits for
    the upstream's connect must stay one read, however much the client sends meanwhile."""
    connecting = asyncio.Event()

    async def never(*args: Any, **kwargs: Any):
        connecting.set()
        await asyncio.sleep(3600)

    clusters = ClusterManager()
    clusters.update_clusters({"PassthroughCluster": ClusterConfig("PassthroughCluster", discovery="STATIC",
                                                                  connect_timeout=30.0)})
    runtime = TcpProxyRuntime(TcpProxyConfig("passthrough", "PassthroughCluster"), clusters, connector=never)
    proxies: list[TcpProxy] = []

    def make() -> TcpProxy:
        proxies.append(TcpProxy(runtime, original_dst=("127.0.0.1", refused_port())))
        return proxies[-1]

    server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
    sock = socket.create_connection(("127.0.0.1", server.sockets[0].getsockname()[1]))
    sock.setblocking(False)
    await asyncio.wait_for(connecting.wait(), 5)
    sent, chunk = 0, b"x" * 65536
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and sent < 64 * MB:  # until the kernel's buffers are full
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            await asyncio.sleep(0.01)
    held = sum(len(d) for d in proxies[0]._early)
    assert 0 < held <= UVLOOP_READ, held
    assert sent < 64 * MB  # the client was held back by TCP, not by our memory
    sock.close()
    server.close()
