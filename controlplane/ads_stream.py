"""What both ADS variants (controlplane.ads_sotw, controlplane.ads_delta) do alike on one stream:
identify the node from its first request, read requests into the stream's queue, and coalesce
snapshot changes into one pending re-check.

A stream's responses are messages, or bytes already serialized (a message's fields followed by a
:class:`controlplane.cache.TypeView`'s pre-serialized resources); :func:`serialize` sends either.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane.cache import SERVED_TYPES, ConfigWatcher, Layers
from controlplane.proxies import ProxyRegistry, ProxyStatus
from controlplane.sds import StreamRefused, StreamSecrets
from meshkeeper import __version__, xds
from meshkeeper.identity import CSR_METADATA
from meshkeeper.registry import RecordError
from meshkeeper.xds import NodeInfo

log = logging.getLogger("meshkeeper.controlplane.xds")

CONTROL_PLANE_ID = f"meshkeeper-controlplane/{__version__}"
CONTROL_PLANE = base_pb2.ControlPlane(identifier=CONTROL_PLANE_ID)

# What a stream serves, in push order: SDS first (a cluster's TLS context names its secrets, as
# Envoy warms a cluster until they arrive), then the snapshot's types (CDS, EDS, LDS, RDS, RTDS).
STREAM_TYPES = (xds.SECRET, *SERVED_TYPES)

EOF_ = object()  # the client's side of the stream ended (or the server closes it)
CHANGED = object()  # a new snapshot: re-check every type


class Outgoing:
    """A response on its way to gRPC. gRPC's server loop keeps the last object a handler yielded
    until the next one (measured: ~180 KiB per stream held after a full push, on 1,000 streams);
    :func:`serialize` takes the payload out, so what is kept is this empty shell."""

    __slots__ = ("payload",)

    def __init__(self, payload: Message | bytes) -> None:
        self.payload = payload


def serialize(response: Outgoing | Message | bytes) -> bytes:
    if response.__class__ is Outgoing:
        payload, response.payload = response.payload, None
        response = payload
    return response if response.__class__ is bytes else response.SerializeToString()


class AdsStream:
    """One ADS stream's node, queue and nonces; the variants add their per-type state."""

    PROXYLESS = True  # whether proxyless gRPC clients are served on this variant

    def __init__(self, watcher: ConfigWatcher, proxies: ProxyRegistry, context: grpc.aio.ServicerContext,
                 secrets: StreamSecrets | None = None):
        self.watcher, self.proxies, self.context = watcher, proxies, context
        self.secrets = secrets or StreamSecrets(None, None)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.node: NodeInfo | None = None
        self.status: ProxyStatus | None = None
        self._nonces = itertools.count(1)
        self._change_queued = False

    def notify(self) -> None:
        if not self._change_queued:  # coalesce: one pending re-check is enough
            self._change_queued = True
            self.queue.put_nowait(CHANGED)

    def next_nonce(self) -> str:
        return str(next(self._nonces))

    async def read(self, requests: AsyncIterator) -> None:
        try:
            async for req in requests:
                self.queue.put_nowait(req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away mid-read
            log.debug("ADS stream read ended: %s", exc)
        finally:
            self.queue.put_nowait(EOF_)

    async def identify(self, node: base_pb2.Node) -> None:
        """Take the node of the stream's first request, or end the stream with INVALID_ARGUMENT."""
        if not node.id:
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.id")
        try:
            meta = json_format.MessageToDict(node.metadata)
            self.node = NodeInfo.from_node(node.id, node.cluster, meta)
        except (ValueError, RecordError) as exc:
            log.warning("refusing ADS stream of %s: %s", node.id, exc)
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad node metadata: {exc}")
        if self.node.proxyless and not self.PROXYLESS:
            await self.context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                     "proxyless gRPC clients are served over StreamAggregatedResources")
        if not self.node.proxyless:
            try:
                self.secrets.authenticate(self.node, self.context.invocation_metadata())
            except StreamRefused as exc:
                log.warning("refusing ADS stream of %s: %s", node.id, exc)
                await self.context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        self.status = self.proxies.connect(self.node, self.context.peer() or "")

    async def served_type(self, req) -> str | None:
        """The type a request is about, the node taken from the stream's first request; None for a
        type this control plane does not serve (the request is ignored)."""
        if self.node is None:
            await self.identify(req.node)
        if CSR_METADATA in req.node.metadata.fields and not self.node.proxyless:
            await self._take_csr(req.node)
        t = req.type_url
        if not t:
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ADS requests must set type_url")
        if t not in STREAM_TYPES or (t == xds.SECRET and self.node.proxyless):
            log.debug("%s subscribed to %s, which is not served", self.node.node_id, t)
            return None
        return t

    async def _take_csr(self, node: base_pb2.Node) -> None:
        """A node carrying a CSR (the first request, or a rotation): signed if new, then ``default``
        goes out with the next re-check (docs/identity.md)."""
        try:
            changed = self.secrets.observe(json_format.MessageToDict(node.metadata))
        except StreamRefused as exc:
            log.warning("refusing ADS stream of %s: %s", self.node.node_id, exc)
            await self.context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        if changed:
            cert = self.secrets.certificate
            self.status.spiffe_id, self.status.cert_serial = cert.spiffe_id, format(cert.serial, "x")
            self.status.cert_expires = cert.not_after
            self.notify()

    def layers(self, type_url: str, on_demand: frozenset[str] = frozenset()) -> Layers | None:
        """What this stream's node holds of ``type_url``: its own secrets, or the cache's layers."""
        if type_url == xds.SECRET:
            return self.secrets.layers()
        return self.watcher.layers(self.node, type_url, on_demand)

    async def on_request(self, req) -> Message | bytes | None:
        raise NotImplementedError

    def on_change(self) -> list[Message | bytes]:
        raise NotImplementedError

    def changed(self) -> list[Message | bytes]:
        self._change_queued = False
        if self.node is None:
            return []
        return self.on_change()
