"""The HTTP/2 side of the per-endpoint pool (sidecar.upstream.pool, ``http2=True``): streams that
wait while the first connection opens are handed that connection, through fake transports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sidecar.upstream.pool import ConnectionPool
from sidecar.upstream.stats import ClusterStats
from tests.support.fakes import FakeConnector, async_test, until


class Callbacks:
    def __init__(self, on_ready: Callable[[], None] | None = None) -> None:
        self.ready: list[Any] = []
        self.failed: list[str] = []
        self.on_ready = on_ready

    def on_pool_ready(self, encoder: Any, conn: Any) -> None:
        self.ready.append(conn)
        if self.on_ready is not None:
            self.on_ready()

    def on_pool_failure(self, reason: Any, detail: str) -> None:
        self.failed.append(detail)


@async_test
async def test_streams_waiting_for_the_opening_connection_all_get_it() -> None:
    connector = FakeConnector()
    pool = ConnectionPool("10.0.0.1", 8080, connect_timeout=1.0, stats=ClusterStats(), connector=connector,
                          http2=True)
    callbacks = [Callbacks() for _ in range(5)]
    pending = [pool.new_stream(cb) for cb in callbacks]
    assert all(p is not None for p in pending) and pool.waiting == 4  # one connect, four wait for it
    await until(lambda: all(cb.ready or cb.failed for cb in callbacks))
    assert [cb.failed for cb in callbacks] == [[]] * 5
    assert len(connector.connections) == 1
    assert all(cb.ready == [connector.connections[0][0]] for cb in callbacks)
    assert pool.stats.upstream_rq_active == 5 and pool.stats.upstream_rq_pending_active == 0


@async_test
async def test_a_waiting_stream_cancelled_before_its_turn_leaves_the_connection_to_the_others() -> None:
    connector = FakeConnector()
    pool = ConnectionPool("10.0.0.1", 8080, connect_timeout=1.0, stats=ClusterStats(), connector=connector,
                          http2=True)
    pending: list[Any] = []
    # The first stream's readiness queues a cancel of the second ahead of the waiters' turns, which
    # the pool queues right after it: the second is woken with the connection after it was cancelled.
    cancel_second = lambda: asyncio.get_running_loop().call_soon(pending[1].cancel)  # noqa: E731
    callbacks = [Callbacks(cancel_second), Callbacks(), Callbacks()]
    pending += [pool.new_stream(cb) for cb in callbacks]
    await until(lambda: callbacks[0].ready and callbacks[2].ready)
    assert callbacks[1].ready == [] and pool.idle_count == 0  # an HTTP/2 connection is never "idle"
    assert pool.stats.upstream_rq_active == 2 and pool.stats.upstream_rq_pending_active == 0
