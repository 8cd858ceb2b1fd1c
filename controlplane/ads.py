"""The ADS server: ``envoy.service.discovery.v3.AggregatedDiscoveryService`` on grpc.aio, both
variants over one :class:`controlplane.cache.ConfigWatcher` and the proxy registry:
``StreamAggregatedResources`` (State of the World, controlplane.ads_sotw) and
``DeltaAggregatedResources`` (incremental, controlplane.ads_delta).

Responses are sent as the streams make them: a message, or bytes that already hold the shared,
pre-serialized resources of a view (controlplane.ads_stream.serialize).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.ads_delta import DeltaStream
from controlplane.ads_sotw import SotwStream
from controlplane.ads_stream import CHANGED, EOF_, AdsStream, Outgoing, serialize
from controlplane.cache import ConfigWatcher
from controlplane.proxies import ProxyRegistry
from controlplane.sds import StreamSecrets, TrustBundle

if TYPE_CHECKING:
    from controlplane.ca import Issuer

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

# grpc.aio cancels calls beyond ~1,000 pending unless raised (DESIGN §4): size for many sidecars.
SERVER_OPTIONS = [
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 40_000),
    ("grpc.max_concurrent_streams", 100_000),
    # Find dead sidecars within ~1.5 min; let sidecars ping every 10 s without being refused.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


# A client with other replicas left to try says so on the stream (sidecar.xds.client.TRY_OTHERS).
TRY_OTHERS = "x-meshkeeper-try-others"


class AdsServer:
    """``serving()`` says whether this replica is in step with ZooKeeper (False: it lost it after
    its first snapshot). While it is not, a new stream whose client has other replicas left to try
    (metadata ``x-meshkeeper-try-others: 1``) is refused with UNAVAILABLE, so that the sidecar
    goes to its next ``--cp``; other clients (one control plane, the last replica of a round,
    Envoy, grpcio) are served what it last knew, as are the streams it has."""

    def __init__(self, watcher: ConfigWatcher, proxies: ProxyRegistry,
                 serving: Callable[[], bool] = lambda: True, issuer: Issuer | None = None) -> None:
        self.watcher, self.proxies = watcher, proxies
        # The CA (controlplane.ca): SDS secrets and CSR signing; None: no CA, no secrets (docs/identity.md).
        self.issuer = issuer
        self._bundle = TrustBundle(issuer) if issuer is not None else None
        self.serving = serving
        self._streams: set[AdsStream] = set()
        self.refused = 0  # streams refused while not serving

    def _secrets(self) -> StreamSecrets:
        return StreamSecrets(self.issuer, self._bundle)

    def close_streams(self) -> None:
        """End every open stream with status OK (shutdown): sidecars reconnect, to us or a peer."""
        for stream in self._streams:
            stream.queue.put_nowait(EOF_)

    # A response sent is dropped at once (``resp = None``, and gRPC gets it in an Outgoing it
    # empties): a stream must not keep its last one, which may be the whole mesh, until its next.

    async def StreamAggregatedResources(self, request_iterator, context):  # noqa: N802 (gRPC name)
        async for resp in self._serve(SotwStream(self.watcher, self.proxies, context, self._secrets()), request_iterator):
            yield resp
            resp = None

    async def DeltaAggregatedResources(self, request_iterator, context):  # noqa: N802 (gRPC name)
        async for resp in self._serve(DeltaStream(self.watcher, self.proxies, context, self._secrets()), request_iterator):
            yield resp
            resp = None

    async def _serve(self, stream: AdsStream, request_iterator):
        if not self.serving() and _tries_others(stream.context):
            self.refused += 1
            await stream.context.abort(grpc.StatusCode.UNAVAILABLE,
                                       "this control plane lost ZooKeeper: try another replica")
        self._streams.add(stream)
        unsubscribe = self.watcher.subscribe(stream.notify)
        reader = asyncio.get_running_loop().create_task(stream.read(request_iterator))
        try:
            while True:
                item = await stream.queue.get()
                if item is EOF_:
                    return
                if item is CHANGED:
                    responses = stream.changed()
                    while responses:
                        yield Outgoing(responses.pop(0))
                    continue
                resp = await stream.on_request(item)
                item = None
                if resp is not None:
                    yield Outgoing(resp)
                    resp = None
        finally:
            self._streams.discard(stream)
            unsubscribe()
            reader.cancel()
            if stream.status is not None:
                self.proxies.disconnect(stream.status)


def _tries_others(context: grpc.aio.ServicerContext) -> bool:
    return any(k == TRY_OTHERS and v == "1" for k, v in context.invocation_metadata() or ())


def add_to_server(server: grpc.aio.Server, ads: AdsServer) -> None:
    handlers = {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            ads.StreamAggregatedResources, request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=serialize),
        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
            ads.DeltaAggregatedResources, request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=serialize),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
