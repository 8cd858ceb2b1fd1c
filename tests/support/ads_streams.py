"""ADS streams for tests against a real in-process control plane (grpc.aio on 127.0.0.1): requests
go in through a queue, a reader task collects the responses. :class:`SotwClient` speaks
``StreamAggregatedResources``, :class:`DeltaClient` ``DeltaAggregatedResources``."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

QUIET = 0.3  # how long "no push" is watched for


class _Stream:
    def __init__(self, call) -> None:
        self.call = call
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for resp in self.call:
            self.responses.put_nowait(resp)

    async def recv(self, within: float = 3.0):
        return await asyncio.wait_for(self.responses.get(), within)

    async def nothing(self, within: float = QUIET) -> None:
        with pytest.raises(TimeoutError):
            resp = await asyncio.wait_for(self.responses.get(), within)
            pytest.fail(f"unexpected push: {resp}")

    async def close(self) -> None:
        self.requests.put_nowait(None)
        self.call.cancel()
        self.reader.cancel()

    def _put(self, req, node, error: str | None) -> None:
        if node is not None:
            req.node.CopyFrom(node)
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self.requests.put_nowait(req)


async def _requests(queue: asyncio.Queue):
    while (req := await queue.get()) is not None:
        yield req


class SotwClient(_Stream):
    def __init__(self, channel: grpc.aio.Channel, metadata: tuple | None = None) -> None:
        self.requests: asyncio.Queue = asyncio.Queue()
        self.responses: asyncio.Queue = asyncio.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        super().__init__(stub.StreamAggregatedResources(_requests(self.requests), metadata=metadata))

    def send(self, type_url: str, names=(), *, version: str = "", nonce: str = "", node=None,
             error: str | None = None) -> None:
        self._put(discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=list(names),
                                                 version_info=version, response_nonce=nonce), node, error)

    def ack(self, resp: discovery_pb2.DiscoveryResponse, names=()) -> None:
        self.send(resp.type_url, names, version=resp.version_info, nonce=resp.nonce)


class DeltaClient(_Stream):
    def __init__(self, channel: grpc.aio.Channel, metadata: tuple | None = None) -> None:
        self.requests: asyncio.Queue = asyncio.Queue()
        self.responses: asyncio.Queue = asyncio.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        super().__init__(stub.DeltaAggregatedResources(_requests(self.requests), metadata=metadata))

    def send(self, type_url: str, subscribe=(), unsubscribe=(), *, nonce: str = "", node=None,
             initial: dict[str, str] | None = None, error: str | None = None) -> None:
        self._put(discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=list(subscribe), resource_names_unsubscribe=list(unsubscribe),
            response_nonce=nonce, initial_resource_versions=initial or {}), node, error)

    def ack(self, resp, **kw) -> None:
        self.send(resp.type_url, nonce=resp.nonce, **kw)
