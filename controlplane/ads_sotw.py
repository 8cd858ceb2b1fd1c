"""State-of-the-world ADS (``StreamAggregatedResources``) on one stream.

Per type the stream keeps the subscription, the nonce and version of its last response, whether
that response still awaits its ACK/NACK, and the :class:`controlplane.cache.TypeView` layers it
was built from (what the client now holds). The rules (xDS protocol, as Envoy and go-control-plane
apply them):

* Nothing is sent before the first complete registry snapshot: requests wait.
* A request whose ``response_nonce`` is not the latest one sent for its type is stale and ignored.
* Answering the latest response: ``error_detail`` set means NACK (logged with the detail, counted,
  shown in /api/proxies; the refused resources are not sent again until they change), else
  ``version_info`` equal to the version sent means ACK. Either way the next change of that type may
  go out.
* One response per type in flight. The first request of a type, and a request that changes the
  subscription, is answered in full.
* LDS and CDS are wildcard when ``resource_names`` is empty and each response carries the node's
  full set (leaving one out deletes it at the client); RTDS carries its subscribed names in full.
  EDS and RDS responses carry only the subscribed resources that changed since the last response
  (the protocol groups them as Delta does), so one endpoint's change costs one resource per
  stream, whatever the size of the mesh.
* On a registry change types are pushed in the order CDS, EDS, LDS, RDS, RTDS.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import Message

from controlplane.ads_stream import CONTROL_PLANE, STREAM_TYPES, AdsStream
from controlplane.cache import Layers, held, layers_version, version_of
from meshkeeper import xds
from meshkeeper.xds import SHORT_TYPE, WILDCARD_TYPES

log = logging.getLogger("meshkeeper.controlplane.xds")

# Types whose SotW responses may carry only some of the subscribed names.
MERGED_TYPES = frozenset({xds.ENDPOINT, xds.ROUTE})


@dataclass(slots=True)
class _TypeState:
    names: frozenset[str] | None = None  # None: wildcard
    nonce: str = ""
    version: str | None = None
    in_flight: bool = False
    layers: Layers | None = None  # what the last response was built from
    sent_names: frozenset[str] | None = None  # the subscription the last response answered


class SotwStream(AdsStream):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.types: dict[str, _TypeState] = {}

    async def on_request(self, req: discovery_pb2.DiscoveryRequest) -> Message | bytes | None:
        t = await self.served_type(req)
        if t is None:
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
        if t in WILDCARD_TYPES and (not names or "*" in req.resource_names):
            st.names = None
        else:
            st.names = self.watcher.intern(names)
        if initial:
            st.in_flight = False
        return self.push(t, force=initial)

    def push(self, t: str, force: bool = False) -> Message | bytes | None:
        st = self.types.get(t)
        if st is None or st.in_flight:
            return None
        if self.node.proxyless:
            return self._push_fetched(t, st, force)
        layers = self.layers(t)
        if layers is None:
            return None
        names = st.names
        if (t in MERGED_TYPES and not force and st.layers is not None
                and (names is st.sent_names or names == st.sent_names)):
            changed = []
            for new, old in zip(layers, st.layers, strict=True):
                got, _ = new.changes(old)  # a resource gone from EDS/RDS goes with its CDS/LDS reference
                changed += got if names is None else [r for r in got if r.name in names]
            st.layers = layers
            if not changed:
                return None
            return self._respond(t, st, layers_version(layers), layers, [r.any for r in changed], [])
        version = layers_version(layers) if names is None else version_of(held(layers, names))
        if not force and version == st.version:
            st.layers = layers
            return None
        anys, blobs = [], []
        for view in layers:
            if names is None or view.names() <= names:
                if view.items:
                    blobs.append(view)
            else:
                anys += [r.any for n, r in view.items.items() if n in names]
        return self._respond(t, st, version, layers, anys, blobs)

    def _respond(self, t: str, st: _TypeState, version: str, layers: Layers, anys: list, blobs: list) -> Message | bytes:
        nonce = self.next_nonce()
        st.nonce, st.version, st.in_flight, st.layers, st.sent_names = nonce, version, True, layers, st.names
        count = len(anys) + sum(len(v.items) for v in blobs)
        self.proxies.sent(self.status, t, version, nonce, count, partial(held, layers, st.names))
        head = discovery_pb2.DiscoveryResponse(version_info=version, type_url=t, nonce=nonce, resources=anys,
                                               control_plane=CONTROL_PLANE)
        if not blobs:
            return head
        return head.SerializeToString() + b"".join(v.sotw_blob() for v in blobs)

    def _push_fetched(self, t: str, st: _TypeState, force: bool) -> Message | None:
        """A proxyless client: its resources by name (controlplane.proxyless), whole each time."""
        got = self.watcher.fetch(self.node, t, st.names)
        if got is None or (not force and got.version == st.version):
            return None
        nonce = self.next_nonce()
        st.nonce, st.version, st.in_flight = nonce, got.version, True
        self.proxies.sent(self.status, t, got.version, nonce, len(got.resources), lambda: got.resources)
        return discovery_pb2.DiscoveryResponse(
            version_info=got.version, type_url=t, nonce=nonce, resources=[r.any for r in got.resources],
            control_plane=CONTROL_PLANE)

    def on_change(self) -> list[Message | bytes]:
        return [r for t in STREAM_TYPES if (r := self.push(t)) is not None]
