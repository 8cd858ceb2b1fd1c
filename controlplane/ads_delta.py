"""Incremental ADS (``DeltaAggregatedResources``) on one stream, with Envoy's semantics.

Per type the stream keeps the subscription (wildcard and/or names), the nonce and
``system_version_info`` of its last response, whether that response awaits its ACK/NACK, and the
:class:`controlplane.cache.TypeView` layers it was built from: what the client holds is those
layers' subscribed resources, each at its own version (the resource's digest), so the stream keeps
references to shared views, not a version per resource.

* Each type's first request may carry ``initial_resource_versions`` (a reconnect): the first
  response leaves out what the client already holds at the current version, and lists as
  ``removed_resources`` what it holds that no longer exists.
* LDS and CDS are wildcard when their first request subscribes to nothing, or to ``*`` (Envoy's
  legacy and explicit wildcard); ``*`` may be unsubscribed. Other names are subscribed and
  unsubscribed with ``resource_names_subscribe`` / ``resource_names_unsubscribe``, in any request,
  stale nonce or not; a newly subscribed name that exists is sent in the next response.
* A response carries the subscribed resources added or changed since the last one, and the names
  of subscribed resources removed. The first response of a type is sent even when empty, so the
  client knows it is up to date.
* ACK is a request with the latest ``response_nonce`` and no ``error_detail``; NACK has one (logged,
  counted, shown in /api/proxies; the refused resources are not sent again until they change).
  One response per type in flight, as in SotW; types are pushed in the order CDS, EDS, LDS, RDS, RTDS.
* A subscribed name that does not exist is listed in ``removed_resources`` of the response that
  answers the subscription ("does not exist"), so a client waiting for it need not time out.
* A scoped sidecar (DESIGN §13: ``--egress``, ``policy.egress``) is sent only the services it
  declared. Subscribing by name to the cluster of another service of its namespace
  (``outbound|<svc>.<ns>``, beside the CDS wildcard: Envoy's on-demand CDS) adds that service to
  what this stream is sent, clusters, load assignments and virtual host; unsubscribing removes it.
* Proxyless gRPC clients speak SotW: a proxyless node on this stream is refused (UNIMPLEMENTED).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import Message

from controlplane.ads_stream import CONTROL_PLANE, STREAM_TYPES, AdsStream
from controlplane.cache import Layers, delta_resource, held, layers_version
from meshkeeper import xds
from meshkeeper.xds import SHORT_TYPE, WILDCARD_TYPES

log = logging.getLogger("meshkeeper.controlplane.xds")


@dataclass(slots=True)
class _DeltaType:
    wildcard: bool = False
    names: frozenset[str] = frozenset()  # subscribed by name (beside or without the wildcard)
    nonce: str = ""
    version: str = ""
    in_flight: bool = False
    layers: Layers | None = None  # what the client holds (None: nothing sent on this stream yet)
    initial: dict[str, str] = field(default_factory=dict)  # initial_resource_versions, until the first response
    added: set[str] = field(default_factory=set)  # subscribed since the last response: sent whole

    def subscribed(self, name: str) -> bool:
        return self.wildcard or name in self.names


class DeltaStream(AdsStream):
    PROXYLESS = False  # grpcio speaks SotW

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.types: dict[str, _DeltaType] = {}
        self.on_demand: frozenset[str] = frozenset()  # services a scoped sidecar asked for by cluster name

    async def on_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> Message | bytes | None:
        t = await self.served_type(req)
        if t is None:
            return None
        st = self.types.get(t)
        first = st is None
        if first:
            st = self.types[t] = _DeltaType(initial=dict(req.initial_resource_versions))
            if t in WILDCARD_TYPES and not req.resource_names_subscribe:
                st.wildcard = True  # the legacy wildcard: a first request naming nothing
        elif req.response_nonce:
            if req.response_nonce != st.nonce:
                log.debug("%s: stale nonce %s for %s (latest %s)", self.node.node_id, req.response_nonce,
                          SHORT_TYPE[t], st.nonce)
            elif st.in_flight:
                st.in_flight = False
                if req.HasField("error_detail"):
                    self.proxies.nacked(self.status, t, st.version, req.error_detail.message)
                else:
                    self.proxies.acked(self.status, t, st.version)
        self._subscribe(st, req.resource_names_subscribe, req.resource_names_unsubscribe)
        if t == xds.CLUSTER:
            self._follow_on_demand(st)
        return self.push(t)

    def _follow_on_demand(self, st: _DeltaType) -> None:
        """A scoped sidecar subscribes by name to the cluster of a service it was not sent (a
        first request for it, as Envoy's on-demand CDS): the service joins its scope, so its
        clusters, load assignments and virtual host follow in every type."""
        ns = self.node.namespace
        wanted = frozenset(s for n in st.names if (s := xds.outbound_service(n, ns)) is not None)
        if wanted != self.on_demand:
            self.on_demand = self.watcher.intern(wanted)
            self.notify()  # EDS and RDS change with the scope

    def _subscribe(self, st: _DeltaType, subscribe, unsubscribe) -> None:
        if not subscribe and not unsubscribe:
            return
        if "*" in subscribe:
            st.wildcard = True
        if "*" in unsubscribe:
            st.wildcard = False
        add = {n for n in subscribe if n != "*"} - st.names
        drop = {n for n in unsubscribe if n != "*"} & st.names
        if add or drop:
            st.names = self.watcher.intern(frozenset((st.names | add) - drop))
            st.added |= add
            st.added -= drop

    def push(self, t: str) -> Message | bytes | None:
        st = self.types.get(t)
        if st is None or st.in_flight:
            return None
        layers = self.layers(t, self.on_demand)
        if layers is None:
            return None
        resources: list = []
        blobs: list = []
        removed: list[str] = []
        initial = st.layers is None
        if initial:  # the first response on this stream: everything subscribed
            known = st.initial
            for view in layers:
                if not known and view.items and (st.wildcard or view.names() <= st.names):
                    blobs.append(view)
                    continue
                resources += [r for n, r in view.items.items() if st.subscribed(n) and known.get(n) != r.version]
            removed = [n for n in known if st.subscribed(n) and not any(n in v.items for v in layers)]
            # A name subscribed that does not exist is said so (removed), not left unanswered.
            removed += [n for n in sorted(st.names) if n not in known and not any(n in v.items for v in layers)]
            st.initial = {}
        else:
            for new, old in zip(layers, st.layers, strict=True):
                changed, gone = new.changes(old)
                resources += [r for r in changed if st.subscribed(r.name)]
                removed += [n for n in gone if st.subscribed(n)]
            if st.added:
                sent = {r.name for r in resources}
                for view in layers:
                    resources += [view.items[n] for n in st.added if n in view.items and n not in sent]
                removed += [n for n in sorted(st.added) if not any(n in v.items for v in layers) and n not in removed]
        st.added = set()
        st.layers = layers
        if not (resources or blobs or removed or initial):  # the first is sent even empty
            return None
        version = layers_version(layers)
        nonce = self.next_nonce()
        st.nonce, st.version, st.in_flight = nonce, version, True
        count = len(resources) + sum(len(v.items) for v in blobs)
        self.proxies.sent(self.status, t, version, nonce, count,
                          partial(held, layers, None if st.wildcard else st.names))
        head = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version, type_url=t, nonce=nonce, resources=[delta_resource(r) for r in resources],
            removed_resources=removed, control_plane=CONTROL_PLANE)
        if not blobs:
            return head
        return head.SerializeToString() + b"".join(v.delta_blob() for v in blobs)

    def on_change(self) -> list[Message | bytes]:
        return [r for t in STREAM_TYPES if (r := self.push(t)) is not None]
