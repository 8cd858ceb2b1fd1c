"""The L4 proxy (sidecar.l4) driven through fake transports and a fake clock: no sockets.

The clusters, balancer, outlier detector and pools are the real ones; only the connector
(``loop.create_connection``) is replaced, by one that hands out fake transports.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from sidecar.config import CircuitBreakerConfig, ClusterConfig, EndpointConfig, OutlierConfig
from sidecar.l4 import TcpProxy, TcpProxyConfig, TcpProxyRuntime
from sidecar.upstream.cluster import ClusterManager
from tests.support.polling import until


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


class FakeTransport(asyncio.Transport):
    """A stream transport whose peer reads only when told (``stalled``/``drain``)."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.out = bytearray()
        self.buffered = 0  # written but not taken by the peer (while stalled)
        self.stalled = False
        self.high = 64 * 1024
        self.low = 16 * 1024
        self.write_paused = False
        self.reading = True
        self.eof_written = False
        self.closed = False
        self.aborted = False
        self.lost = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high, self.low = high, low

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        assert not self.closed and not self.eof_written, "write after close or write_eof"
        self.out += data
        if self.stalled:
            self.buffered += len(data)
            if self.buffered > self.high and not self.write_paused:
                self.write_paused = True
                self.protocol.pause_writing()

    def drain(self) -> None:
        self.stalled = False
        self.buffered = 0
        if self.write_paused:
            self.write_paused = False
            self.protocol.resume_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self._lose, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def peer_reset(self) -> None:
        self.closed = True
        self._lose(ConnectionResetError("reset by peer"))

    def _lose(self, exc: Exception | None) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(exc)


class FakeConnector:
    """``loop.create_connection`` with fake transports; ``refuse`` and ``hang`` per port."""

    def __init__(self) -> None:
        self.made: list[tuple[int, FakeTransport]] = []
        self.refuse: set[int] = set()
        self.hang: set[int] = set()
        self.gate: asyncio.Event | None = None  # connects wait for it when set

    async def __call__(self, factory: Callable[[], asyncio.Protocol], host: str, port: int) -> tuple[Any, Any]:
        if port in self.hang:
            await asyncio.Event().wait()
        if self.gate is not None:
            await self.gate.wait()
        if port in self.refuse:
            raise ConnectionRefusedError(111, "Connection refused")
        protocol = factory()
        transport = FakeTransport(protocol)
        protocol.connection_made(transport)
        self.made.append((port, transport))
        return transport, protocol


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def setup(ports: tuple[int, ...] = (1,), *, tcp: dict[str, Any] | None = None, **cluster: Any,
          ) -> tuple[TcpProxyRuntime, ClusterManager, FakeConnector, Clock]:
    connector = FakeConnector()
    clock = Clock()
    clusters = ClusterManager(connector=connector)
    endpoints = tuple(EndpointConfig("10.0.0.1", port) for port in ports)
    clusters.update_clusters({"c": ClusterConfig("c", discovery="STATIC", static_endpoints=endpoints, **cluster)})
    runtime = TcpProxyRuntime(TcpProxyConfig("t", "c", **(tcp or {})), clusters, clock=clock, connector=connector)
    return runtime, clusters, connector, clock


async def accept(runtime: TcpProxyRuntime, **kwargs: Any) -> tuple[TcpProxy, FakeTransport]:
    proxy = TcpProxy(runtime, **kwargs)
    down = FakeTransport(proxy)
    proxy.connection_made(down)
    await turns()
    return proxy, down


async def connected(runtime: TcpProxyRuntime, connector: FakeConnector) -> tuple[TcpProxy, FakeTransport, FakeTransport]:
    proxy, down = await accept(runtime)
    _, up = connector.made[-1]
    return proxy, down, up


@async_test
async def test_reads_nothing_until_connected_then_copies_both_ways() -> None:
    runtime, clusters, connector, _ = setup()
    connector.gate = asyncio.Event()
    proxy, down = await accept(runtime)
    stats = clusters.get("c").stats
    assert not down.reading and stats.upstream_cx_opening == 1
    connector.gate.set()
    await turns()
    _, up = connector.made[-1]
    assert down.reading
    proxy.data_received(b"ping")
    up.protocol.data_received(b"pong")
    assert (bytes(up.out), bytes(down.out)) == (b"ping", b"pong")
    assert (stats.upstream_cx_tx_bytes_total, stats.upstream_cx_rx_bytes_total) == (4, 4)
    assert (stats.upstream_cx_total, stats.upstream_cx_active, stats.upstream_cx_opening) == (1, 1, 0)
    assert (runtime.stats.downstream_cx_rx_bytes_total, runtime.stats.downstream_cx_tx_bytes_total) == (4, 4)


@async_test
async def test_downstream_gone_while_connecting_cancels_the_connect() -> None:
    runtime, clusters, connector, _ = setup()
    connector.hang.add(1)
    proxy, down = await accept(runtime)
    down.peer_reset()
    await turns()
    stats = clusters.get("c").stats
    assert (stats.upstream_cx_opening, stats.upstream_cx_connect_fail) == (0, 0)
    endpoint = clusters.get("c").endpoints["10.0.0.1:1"]
    assert (endpoint.total_requests, endpoint.active_requests, endpoint.rq_error) == (1, 0, 0)
    assert not runtime.connections


@async_test
async def test_early_bytes_are_written_first() -> None:
    runtime, _, connector, _ = setup()
    proxy = TcpProxy(runtime)
    down = FakeTransport(proxy)
    proxy.connection_made(down)
    proxy.data_received(b"first")
    await turns()
    _, up = connector.made[-1]
    proxy.data_received(b" second")
    assert bytes(up.out) == b"first second"


@async_test
async def test_flow_control_upstream_full_pauses_downstream_reading() -> None:
    runtime, _, connector, _ = setup(tcp={"buffer_limit": 64 * 1024})
    proxy, down, up = await connected(runtime, connector)
    assert (up.high, up.low, down.high, down.low) == (65536, 32768, 65536, 32768)
    up.stalled = True
    proxy.data_received(b"x" * 40_000)
    assert down.reading
    proxy.data_received(b"x" * 40_000)
    assert not down.reading
    up.drain()
    assert down.reading
    assert runtime.stats.downstream_flow_control_paused_reading_total == 1
    assert runtime.stats.downstream_flow_control_resumed_reading_total == 1


@async_test
async def test_flow_control_downstream_full_pauses_upstream_reading() -> None:
    runtime, _, connector, _ = setup(tcp={"buffer_limit": 64 * 1024})
    proxy, down, up = await connected(runtime, connector)
    down.stalled = True
    up.protocol.data_received(b"y" * 70_000)
    assert not up.reading and down.reading
    down.drain()
    assert up.reading


@async_test
async def test_downstream_full_before_connect_pauses_the_new_upstream() -> None:
    runtime, _, connector, _ = setup()
    connector.gate = asyncio.Event()
    proxy, down = await accept(runtime)
    proxy.pause_writing()
    connector.gate.set()
    await turns()
    _, up = connector.made[-1]
    assert not up.reading
    proxy.resume_writing()
    assert up.reading


@async_test
async def test_half_close_downstream_first() -> None:
    runtime, _, connector, _ = setup()
    proxy, down, up = await connected(runtime, connector)
    proxy.data_received(b"request")
    assert proxy.eof_received() is True  # keep the downstream open for the answer
    assert up.eof_written and not up.closed and not down.closed
    up.protocol.data_received(b"answer")
    assert bytes(down.out) == b"answer"
    assert up.protocol.eof_received() is True
    assert down.eof_written and down.closed and up.closed
    await turns()
    assert runtime.stats.downstream_cx_active == 0 and not runtime.connections


@async_test
async def test_half_close_upstream_first() -> None:
    runtime, clusters, connector, _ = setup()
    proxy, down, up = await connected(runtime, connector)
    up.protocol.data_received(b"greeting")
    assert up.protocol.eof_received() is True
    assert down.eof_written and not down.closed and not up.closed
    proxy.data_received(b"late")
    assert bytes(up.out) == b"late"
    proxy.eof_received()
    assert up.eof_written and up.closed and down.closed
    await turns()
    endpoint = clusters.get("c").endpoints["10.0.0.1:1"]
    assert (endpoint.total_requests, endpoint.rq_success, endpoint.rq_error, endpoint.active_requests) == (1, 1, 0, 0)
    assert clusters.get("c").stats.upstream_cx_active == 0


@async_test
async def test_reset_on_one_side_aborts_the_other() -> None:
    runtime, clusters, connector, _ = setup()
    _, down, up = await connected(runtime, connector)
    up.peer_reset()
    assert down.aborted
    await turns()
    endpoint = clusters.get("c").endpoints["10.0.0.1:1"]
    assert (endpoint.rq_success, endpoint.rq_error, endpoint.active_requests) == (0, 1, 0)
    _, down, up = await connected(runtime, connector)
    down.peer_reset()
    assert up.aborted
    await turns()
    assert runtime.stats.downstream_cx_active == 0 and clusters.get("c").stats.upstream_cx_active == 0


@async_test
async def test_idle_timeout_with_a_fake_clock() -> None:
    runtime, clusters, connector, clock = setup(tcp={"idle_timeout": 10.0})
    proxy, down, up = await connected(runtime, connector)
    assert runtime.sweeping and runtime.sweep_period == 1.0
    runtime.sweep()  # first look
    clock.now += 9.0
    proxy.data_received(b"x")  # activity: the next sweep starts counting again
    runtime.sweep()
    clock.now += 9.9
    runtime.sweep()
    assert not down.closed
    clock.now += 0.1
    runtime.sweep()
    assert down.aborted and up.aborted
    assert runtime.stats.idle_timeout == 1
    assert clusters.get("c").stats.upstream_cx_idle_timeout == 1
    await turns()
    assert not runtime.connections and not runtime.sweeping


@async_test
async def test_a_draining_slow_reader_is_not_idle() -> None:
    runtime, _, connector, clock = setup(tcp={"idle_timeout": 10.0})
    proxy, down, up = await connected(runtime, connector)
    runtime.sweep()
    down.stalled = True
    up.protocol.data_received(b"y" * 70_000)
    clock.now += 20.0
    down.drain()  # resume_writing: bytes went out
    runtime.sweep()
    assert not down.closed


@async_test
async def test_zero_idle_timeout_disables_the_sweep() -> None:
    runtime, _, connector, _ = setup(tcp={"idle_timeout": 0.0})
    await connected(runtime, connector)
    assert not runtime.sweeping


@async_test
async def test_overflow_closes_at_once() -> None:
    runtime, clusters, connector, _ = setup(circuit_breakers=CircuitBreakerConfig(max_connections=1))
    await connected(runtime, connector)
    proxy, down = await accept(runtime)
    assert down.closed and len(connector.made) == 1
    stats = clusters.get("c").stats
    assert (stats.upstream_cx_overflow, stats.upstream_cx_active) == (1, 1)


@async_test
async def test_opening_connections_count_against_max_connections() -> None:
    runtime, clusters, connector, _ = setup(circuit_breakers=CircuitBreakerConfig(max_connections=1))
    connector.hang.add(1)
    await accept(runtime)
    _, down = await accept(runtime)
    assert down.closed and clusters.get("c").stats.upstream_cx_overflow == 1


@async_test
async def test_none_healthy_and_no_route() -> None:
    runtime, clusters, _, _ = setup(ports=())
    _, down = await accept(runtime)
    assert down.closed and clusters.get("c").stats.upstream_cx_none_healthy == 1
    runtime.set_config(TcpProxyConfig("t", "missing"))
    _, down = await accept(runtime)
    assert down.closed and runtime.stats.downstream_cx_no_route == 1


@async_test
async def test_connect_failure_is_reported_to_outlier_detection() -> None:
    runtime, clusters, connector, _ = setup(outlier=OutlierConfig(consecutive_5xx=2))
    connector.refuse.add(1)
    _, down = await accept(runtime)
    assert down.closed
    cluster = clusters.get("c")
    endpoint = cluster.endpoints["10.0.0.1:1"]
    assert endpoint.outlier.local_origin_failure == 1 and not endpoint.ejected
    assert (endpoint.total_requests, endpoint.rq_error, endpoint.active_requests) == (1, 1, 0)
    assert cluster.stats.upstream_cx_connect_fail == 1
    assert cluster.stats.upstream_cx_connect_attempts_exceeded == 1
    await accept(runtime)
    assert endpoint.ejected


@async_test
async def test_connect_success_is_reported_to_outlier_detection() -> None:
    runtime, clusters, connector, _ = setup(outlier=OutlierConfig(consecutive_5xx=2))
    connector.refuse.add(1)
    await accept(runtime)
    connector.refuse.clear()
    await connected(runtime, connector)
    monitor = clusters.get("c").endpoints["10.0.0.1:1"].outlier
    assert (monitor.success, monitor.consecutive_5xx) == (1, 0)


@async_test
async def test_connect_timeout_is_a_connect_failure() -> None:
    runtime, clusters, connector, _ = setup(outlier=OutlierConfig(), connect_timeout=0.01)
    connector.hang.add(1)
    _, down = await accept(runtime)
    stats = clusters.get("c").stats
    await until(lambda: down.closed and stats.upstream_cx_opening == 0)
    assert (stats.upstream_cx_connect_fail, stats.upstream_cx_connect_timeout, stats.upstream_cx_opening) == (1, 1, 0)
    assert clusters.get("c").endpoints["10.0.0.1:1"].outlier.local_origin_failure == 1


@async_test
async def test_max_connect_attempts_tries_another_endpoint() -> None:
    runtime, clusters, connector, _ = setup(ports=(1, 2), tcp={"max_connect_attempts": 2})
    connector.refuse.add(1)
    for _ in range(4):
        _, down, up = await connected(runtime, connector)
        assert not down.closed and connector.made[-1][0] == 2
        up.peer_reset()
    assert clusters.get("c").stats.upstream_cx_connect_attempts_exceeded == 0


@async_test
async def test_original_destination_uses_the_address_and_the_clusters_stats() -> None:
    runtime, clusters, connector, _ = setup(ports=())
    proxy, down = await accept(runtime, original_dst=("192.0.2.7", 5432))
    port, up = connector.made[-1]
    assert port == 5432 and down.reading
    proxy.data_received(b"abc")
    stats = clusters.get("c").stats
    assert (stats.upstream_cx_total, stats.upstream_cx_tx_bytes_total, stats.upstream_cx_none_healthy) == (1, 3, 0)
    connector.refuse.add(9)
    _, down = await accept(runtime, original_dst=("192.0.2.7", 9))
    assert down.closed and stats.upstream_cx_connect_fail == 1


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        TcpProxyConfig("t", "")
    with pytest.raises(ValueError):
        TcpProxyConfig("t", "c", max_connect_attempts=0)
    with pytest.raises(ValueError):
        TcpProxyConfig("t", "c", idle_timeout=-1)
    assert TcpProxyConfig("t", "c").buffer_limit == 1024 * 1024



async def test_original_destination_of_a_tls_cluster_gets_an_mtls_pool() -> None:
    from sidecar.config import UpstreamTlsConfig
    from sidecar.tls import TlsIdentity

    connector = FakeConnector()
    clusters = ClusterManager(connector=connector, identity=TlsIdentity())
    tls = UpstreamTlsConfig(san="spiffe://meshkeeper.local/ns/default/sa/b")
    clusters.update_clusters({"c": ClusterConfig("c", discovery="ORIGINAL_DST", tls=tls)})
    runtime = TcpProxyRuntime(TcpProxyConfig("t", "c"), clusters, connector=connector)
    proxy, down = await accept(runtime, original_dst=("192.0.2.7", 5432))
    assert proxy._pool.tls.config is tls  # mTLS once the sidecar has a certificate
    port, _ = connector.made[-1]  # none yet: plaintext, as Istio's auto mTLS
    assert port == 5432 and down.reading
