"""State-of-the-world ADS: ``envoy.service.discovery.v3.AggregatedDiscoveryService``
``StreamAggregatedResources`` on grpc.aio.

Per stream and type the server keeps the subscription, the nonce and version of its last response,
and whether that response still awaits its ACK/NACK. The rules (xDS protocol, as Envoy and
go-control-plane apply them):

* Nothing is sent before the first complete registry snapshot: requests wait.
* A request whose ``response_nonce`` is not the latest one sent for its type is stale and ignored.
* Answering the latest response: ``error_detail`` set means NACK (logged with the detail, counted,
  shown in /api/proxies; the refused version is not sent again), else ``version_info`` equal to the
  version sent means ACK. Either way the next change of that type may go out.
* One response per type in flight. A type is pushed when its version (a hash of what it would
  carry) differs from the last one sent; the first request of a type is always answered.
* LDS and CDS are wildcard when ``resource_names`` is empty and always carry the node's full set
  (leaving one out deletes it at the client); RDS and EDS carry the subscribed names that exist.
* On a registry change types are pushed in the order CDS, EDS, LDS, RDS, RTDS.

The server knows only :class:`controlplane.cache.ConfigWatcher` and the proxy registry.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format

from controlplane.cache import SERVED_TYPES, ConfigWatcher
from controlplane.proxies import ProxyRegistry, ProxyStatus
from meshkeeper import __version__
from meshkeeper.registry import RecordError
from meshkeeper.xds import SHORT_TYPE, WILDCARD_TYPES, NodeInfo

log = logging.getLogger("meshkeeper.controlplane.xds")

CONTROL_PLANE_ID = f"meshkeeper-controlplane/{__version__}"

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

_EOF = object()
_CHANGED = object()


@dataclass(slots=True)
class _TypeState:
    names: frozenset[str] | None = None  # None: wildcard
    nonce: str = ""
    version: str | None = None
    in_flight: bool = False


class _Stream:
    def __init__(self, watcher: ConfigWatcher, proxies: ProxyRegistry, context: grpc.aio.ServicerContext):
        self.watcher, self.proxies, self.context = watcher, proxies, context
        self.queue: asyncio.Queue = asyncio.Queue()
        self.types: dict[str, _TypeState] = {}
        self.node: NodeInfo | None = None
        self.status: ProxyStatus | None = None
        self._nonces = itertools.count(1)
        self._change_queued = False

    def notify(self) -> None:
        if not self._change_queued:  # coalesce: one pending re-check is enough
            self._change_queued = True
            self.queue.put_nowait(_CHANGED)

    async def read(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest]) -> None:
        try:
            async for req in requests:
                self.queue.put_nowait(req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away mid-read
            log.debug("ADS stream read ended: %s", exc)
        finally:
            self.queue.put_nowait(_EOF)

    async def _identify(self, req: discovery_pb2.DiscoveryRequest) -> None:
        if not req.node.id:
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.id")
        try:
            meta = json_format.MessageToDict(req.node.metadata)
            self.node = NodeInfo.from_node(req.node.id, req.node.cluster, meta)
        except (ValueError, RecordError) as exc:
            log.warning("refusing ADS stream of %s: %s", req.node.id, exc)
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad node metadata: {exc}")
        self.status = self.proxies.connect(self.node, self.context.peer() or "")

    async def on_request(self, req: discovery_pb2.DiscoveryRequest) -> discovery_pb2.DiscoveryResponse | None:
        if self.node is None:
            await self._identify(req)
        t = req.type_url
        if not t:
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ADS requests must set type_url")
        if t not in SERVED_TYPES:
            log.debug("%s subscribed to %s, which is not served", self.node.node_id, t)
            return None
        st = self.types.get(t)
        initial = st is None or not req.response_nonce
        if st is None:
            st = self.types[t] = _TypeState()
        elif req.response_nonce and req.response_nonce != st.nonce:
            log.debug("%s: stale nonce %s for %s (latest %s)", self.node.node_id, req.response_nonce,
                      SHORT_TYPE[t], st.nonce)
            return None
        elif req.response_nonce and st.in_flight:
            st.in_flight = False
            if req.HasField("error_detail"):
                self.proxies.nacked(self.status, t, st.version or "", req.error_detail.message)
            elif req.version_info == st.version:
                self.proxies.acked(self.status, t, req.version_info)
        names = frozenset(n for n in req.resource_names if n != "*")
        st.names = None if t in WILDCARD_TYPES and (not names or "*" in req.resource_names) else names
        if initial:
            st.in_flight = False
        return self.push(t, force=initial)

    def push(self, t: str, force: bool = False) -> discovery_pb2.DiscoveryResponse | None:
        st = self.types.get(t)
        if st is None or st.in_flight:
            return None
        got = self.watcher.fetch(self.node, t, st.names)
        if got is None or (not force and got.version == st.version):
            return None
        nonce = str(next(self._nonces))
        st.nonce, st.version, st.in_flight = nonce, got.version, True
        self.proxies.sent(self.status, t, got.version, nonce, got.resources)
        return discovery_pb2.DiscoveryResponse(
            version_info=got.version, type_url=t, nonce=nonce,
            resources=[r.any for r in got.resources],
            control_plane=base_pb2.ControlPlane(identifier=CONTROL_PLANE_ID))

    def on_change(self) -> list[discovery_pb2.DiscoveryResponse]:
        self._change_queued = False
        if self.node is None:
            return []
        return [r for t in SERVED_TYPES if (r := self.push(t)) is not None]


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """SotW ADS over a :class:`ConfigWatcher`. Delta ADS answers UNIMPLEMENTED (not yet served)."""

    def __init__(self, watcher: ConfigWatcher, proxies: ProxyRegistry) -> None:
        self.watcher, self.proxies = watcher, proxies
        self._streams: set[_Stream] = set()

    def close_streams(self) -> None:
        """End every open stream with status OK (shutdown): sidecars reconnect, to us or a peer."""
        for stream in self._streams:
            stream.queue.put_nowait(_EOF)

    async def StreamAggregatedResources(self, request_iterator, context):  # noqa: N802 (gRPC name)
        stream = _Stream(self.watcher, self.proxies, context)
        self._streams.add(stream)
        unsubscribe = self.watcher.subscribe(stream.notify)
        reader = asyncio.get_running_loop().create_task(stream.read(request_iterator))
        try:
            while True:
                item = await stream.queue.get()
                if item is _EOF:
                    return
                if item is _CHANGED:
                    for resp in stream.on_change():
                        yield resp
                    continue
                resp = await stream.on_request(item)
                if resp is not None:
                    yield resp
        finally:
            self._streams.discard(stream)
            unsubscribe()
            reader.cancel()
            if stream.status is not None:
                self.proxies.disconnect(stream.status)


def add_to_server(server: grpc.aio.Server, ads: AdsServer) -> None:
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
