"""The sidecar's ADS client, Delta (incremental) variant: ``DeltaAggregatedResources``.

Envoy's semantics (api_type DELTA_GRPC), on the shared part in :class:`sidecar.xds.client.XdsClient`:

- A type's first request on a stream subscribes with ``resource_names_subscribe``: ``["*"]`` for
  LDS and CDS (wildcard), the names CDS and LDS reference for EDS and RDS, the own service for
  RTDS; ``initial_resource_versions`` gives the version of every resource still held from an
  earlier stream, so that a reconnect is not sent what the sidecar has. The stream's first request
  carries the node.
- A response carries ``resources`` added or changed (each with its own version) and
  ``removed_resources`` (names). The client keeps each resource's version. The sink still gets
  the complete set of LDS and CDS (held + changed - removed) on each response; EDS and RDS are
  merged into what it holds (a removed one is forgotten here); RTDS's one resource removed means
  empty values. Resources of a type the client did not subscribe to by that name are ignored.
- ACK: a request with ``type_url`` and ``response_nonce``; NACK: the same with ``error_detail``
  (INVALID_ARGUMENT naming every refused resource). A refused resource keeps its last accepted
  value and version; the rest of the response applies.
- When CDS or LDS change the EDS or RDS names referenced, one request subscribes the new names
  and unsubscribes the gone ones (no nonce: it answers no response).

``TypeState.version`` is the ``system_version_info`` of the last response ACKed. A resource without
its ``resource`` field is a TTL heartbeat (Envoy's reading): the held value stays.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshkeeper import xds
from sidecar.xds import convert
from sidecar.xds.client import XdsClient, nack_status
from sidecar.xds.state import Update, resource_name, unpack

log = logging.getLogger("meshkeeper.sidecar.xds")

WILDCARD = "*"  # xDS's explicit wildcard subscription (an empty first list is the legacy form)


class DeltaAdsClient(XdsClient):
    """Delta ADS; constructed, started and read exactly as :class:`sidecar.xds.client.AdsClient`.

    On-demand discovery (sidecar.proxy.on_demand): :meth:`request_cluster` subscribes to a cluster
    by name beside the CDS wildcard (a scoped sidecar is then sent that service); when the control
    plane answers that it does not exist (``removed_resources`` naming a cluster not held),
    ``on_missing(name)`` is called and the name unsubscribed.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_demand: set[str] = set()  # clusters subscribed by name, beside the wildcard
        self.on_missing: Callable[[str], None] = lambda name: None

    def request_cluster(self, name: str) -> None:
        if name not in self.on_demand:
            self.on_demand.add(name)
            self._send_subscription(xds.CLUSTER, [name], [])

    def _open_stream(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub, requests: AsyncIterator[Any],
                     metadata: tuple | None) -> Any:
        return stub.DeltaAggregatedResources(requests, metadata=metadata)

    def _first_request(self, type_url: str) -> discovery_pb2.DeltaDiscoveryRequest:
        st = self.state[type_url]
        names = [WILDCARD] if type_url in xds.WILDCARD_TYPES else list(st.names)
        if type_url == xds.CLUSTER:
            names += sorted(self.on_demand)
        return discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=names,
                                                   initial_resource_versions=st.versions)

    def _send_ack(self, type_url: str, nonce: str, error: str) -> None:
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce)
        if error:
            req.error_detail.CopyFrom(nack_status(error))
        self._send(req)

    def _send_subscription(self, type_url: str, added: list[str], gone: list[str]) -> None:
        self._send(discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=added,
                                                       resource_names_unsubscribe=gone))

    def _on_response(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> None:
        type_url = resp.type_url
        up = self._update(type_url, incremental=True)
        if up is None:
            return
        st = up.held
        for res in resp.resources:
            _read(up, res)
        for name in resp.removed_resources:
            up.remove(name)
        missing = []
        if type_url == xds.CLUSTER and self.on_demand:
            missing = sorted(n for n in resp.removed_resources if n in self.on_demand and n not in st.resources)
        self._settle(up, resp.nonce, resp.system_version_info, len(resp.resources))
        if missing:
            self.on_demand.difference_update(missing)
            self._send_subscription(xds.CLUSTER, [], missing)
            for name in missing:
                self.on_missing(name)


def _read(up: Update, res: discovery_pb2.Resource) -> None:
    """Add one Resource to ``up``; an error is pinned on its name when it has one."""
    if not res.HasField("resource"):
        return  # a heartbeat: nothing changes
    pin = res.name or None
    try:
        msg = unpack(up.type_url, res.resource)
    except convert.XdsError as exc:
        up.refuse(f"{up.short} resource {res.name!r}: {exc}" if pin else str(exc), pin)
        return
    inner = resource_name(up.type_url, msg)
    name = res.name or inner
    if not name:
        up.refuse(f"a {up.short} resource has no name")
    elif inner and inner != name:
        up.refuse(f"{up.short} resource {name!r} holds a resource named {inner!r}", name)
    else:
        up.add(name, msg, res.version)
