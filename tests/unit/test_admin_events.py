"""WatchEvents over a real in-process gRPC server: a stalled watcher is dropped, not buffered."""

from __future__ import annotations

import asyncio
import time

import grpc

from controlplane.admin import AdminService
from controlplane.auth import Authorizer
from controlplane.events import QUEUE_LIMIT, EventBus
from controlplane.proxies import ProxyRegistry
from meshkeeper.admin.v1 import admin_pb2 as pb
from meshkeeper.admin.v1 import admin_pb2_grpc


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_watcher_that_stops_reading_is_dropped_and_told_why():
    bus = EventBus()
    server = grpc.aio.server()
    # WatchEvents reads no ZooKeeper: no store is needed.
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminService(None, Authorizer(None), proxies=ProxyRegistry(), events=bus), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = admin_pb2_grpc.AdminServiceStub(channel).WatchEvents(pb.WatchEventsRequest())
            await until(lambda: bus.active)
            big = "x" * 20_000  # a few of these fill the HTTP/2 windows: the stream stalls on sending
            for i in range(QUEUE_LIMIT * 3):
                bus.publish("push", summary=big)
                if i % 100 == 0:
                    await asyncio.sleep(0)  # let the stream send what it can
            await until(lambda: not bus.active)  # dropped while the client still reads nothing
            received = 0
            try:
                async for _ in call:
                    received += 1
                raise AssertionError("the stream ended without a status")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert f"more than {QUEUE_LIMIT} events behind" in exc.details()
            assert 0 < received <= QUEUE_LIMIT + 1
    finally:
        await server.stop(None)
