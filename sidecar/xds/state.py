"""What the sidecar holds of xDS, whichever variant of ADS brings it.

Both clients (State of the World in :mod:`sidecar.xds.client`, Delta in :mod:`sidecar.xds.delta`)
keep one :class:`TypeState` per resource type and read each response through an :class:`Update`:
resources are decoded, named and converted one by one, and a resource that cannot be honoured is
refused alone, keeping its last accepted value (Envoy's behaviour, and gRPC's since gRFC A46).
Nothing here touches a stream or the sink: the clients' shared base
(:class:`sidecar.xds.client.XdsClient`) applies an accepted update to the :class:`ConfigSink`,
writes it into the TypeState and ACKs or NACKs in its variant's words.

The one difference the variants make here: a State-of-the-World response is the whole set of its
type (LDS, CDS, RTDS) or of the names it carries (EDS, RDS), so an error that cannot be pinned on a
resource name refuses the response whole, since applying the rest would delete that resource;
a Delta response carries changes only (``incremental``), so leaving a resource out deletes nothing
and every error is pinned on its own resource.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.runtime.v3 import rtds_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from meshkeeper import xds
from sidecar.config import ClusterConfig, EndpointConfig, ListenerConfig, RouteConfig, SecretConfig
from sidecar.xds import convert, listeners, secrets

log = logging.getLogger("meshkeeper.sidecar.xds")

CONVERTERS = {
    xds.LISTENER: listeners.listener,
    xds.ROUTE: convert.route_configuration,
    xds.CLUSTER: convert.cluster,
    xds.ENDPOINT: convert.endpoints,
    xds.RUNTIME: convert.runtime,
    xds.SECRET: secrets.secret,
}
MESSAGES = {
    xds.LISTENER: listener_pb2.Listener,
    xds.ROUTE: route_pb2.RouteConfiguration,
    xds.CLUSTER: cluster_pb2.Cluster,
    xds.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    xds.RUNTIME: rtds_pb2.Runtime,
    xds.SECRET: secret_pb2.Secret,
}
# Types whose sink calls carry only the resources of one response, merged into what the sink
# holds. LDS and CDS (and RTDS, whose one resource the sink is given) are always applied whole.
MERGED_TYPES = (xds.ROUTE, xds.ENDPOINT)
# The order of a stream's first requests: SDS (with a bootstrap token only), CDS before EDS, LDS
# before RDS, RTDS last.
SUBSCRIBE_ORDER = (xds.SECRET, xds.CLUSTER, xds.ENDPOINT, xds.LISTENER, xds.ROUTE, xds.RUNTIME)


class ConfigSink(Protocol):
    """Where accepted config goes. A call carries the complete, validated set of its type, except
    ``apply_endpoints`` and ``apply_routes``, whose assignments and route configurations are merged
    into those already applied (what is no longer referenced stays there, unused)."""

    def apply_clusters(self, clusters: dict[str, ClusterConfig]) -> None: ...

    def apply_endpoints(self, assignments: dict[str, tuple[EndpointConfig, ...]]) -> None: ...

    def apply_listeners(self, listeners: dict[str, ListenerConfig]) -> None: ...

    def apply_routes(self, routes: dict[str, RouteConfig]) -> None: ...

    def apply_secrets(self, secrets: dict[str, SecretConfig]) -> None:
        """The SDS secrets (``default``, ``ROOTCA``); a chain for no key of this sidecar raises
        ValueError (NACK) and the last good ones stay."""

    def apply_runtime(self, values: Mapping[str, str], version: str) -> None:
        """The service's runtime values (empty when its resource is absent), as of the RTDS
        version being accepted; called only for a response that will be ACKed."""


@dataclass
class TypeState:
    """What the client holds of one resource type."""

    version: str = ""  # last accepted (SotW version_info; Delta system_version_info)
    nonce: str = ""  # of the last response seen
    names: tuple[str, ...] = ()  # subscribed (empty = wildcard for LDS/CDS; RTDS: the own service)
    received: bool = False  # a response was accepted at least once
    accepted: int = 0
    rejected: int = 0
    last_error: str = ""
    resources: dict[str, Any] = field(default_factory=dict)  # name -> converted config
    raw: dict[str, Any] = field(default_factory=dict)  # name -> proto, for /config_dump
    versions: dict[str, str] = field(default_factory=dict)  # Delta: name -> version of the held value
    updated_at: float = 0.0

    def subscribe(self, names: tuple[str, ...]) -> tuple[list[str], list[str]]:
        """Take ``names`` as the subscription and forget what is no longer subscribed, so that
        ``synced``, the dump and a Delta reconnect's versions stay exact; (added, gone), sorted."""
        old = set(self.names)
        added, gone = sorted(set(names) - old), sorted(old - set(names))
        self.names = names
        for held in (self.resources, self.raw, self.versions):
            for name in gone:
                held.pop(name, None)
        return added, gone


def unpack(type_url: str, any_msg: any_pb2.Any) -> Message:
    """The resource in ``any_msg``; XdsError if it is of another type or does not decode."""
    short = xds.SHORT_TYPE[type_url]
    if any_msg.type_url != type_url:
        raise convert.XdsError(f"resource of type {any_msg.type_url} in a {short} response")
    msg = MESSAGES[type_url]()
    try:
        if not any_msg.Unpack(msg):
            raise convert.XdsError("cannot decode it")
    except Exception as exc:  # DecodeError is not a ValueError
        raise convert.XdsError(f"a {short} resource does not decode: {exc}") from None
    return msg


def resource_name(type_url: str, msg: Message) -> str:
    return msg.cluster_name if type_url == xds.ENDPOINT else msg.name


def referenced_names(type_url: str, resources: Mapping[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    """(type, names) of what the accepted CDS or LDS ``resources`` reference: the load assignments
    of EDS clusters, the route configurations of RDS listeners; None for the other types."""
    if type_url == xds.CLUSTER:
        return xds.ENDPOINT, tuple(sorted(n for n, c in resources.items() if c.discovery == "EDS"))
    if type_url == xds.LISTENER:
        return xds.ROUTE, tuple(sorted({c.rds_name for c in resources.values() if c.rds_name}))
    return None


class Update:
    """One response's resources of one type, converted, or refused one by one.

    ``converted`` holds what the response brings plus, for each refused resource the client held,
    its last accepted value; ``errors`` the reasons, which become the NACK. ``whole`` is set when
    an error cannot be pinned on a resource name in a State-of-the-World response: nothing of it may
    be applied. ``removed`` names what the response takes away (Delta's ``removed_resources``;
    for a State-of-the-World set, what it no longer lists).
    """

    def __init__(self, type_url: str, held: TypeState, *, incremental: bool) -> None:
        self.type_url = type_url
        self.short = xds.SHORT_TYPE[type_url]
        self.held = held
        self.incremental = incremental
        # RTDS is always by name; Delta drops what it did not ask for (an answer crossing an unsubscribe).
        self.subscribed_only = type_url == xds.RUNTIME or (incremental and type_url not in xds.WILDCARD_TYPES)
        self.converted: dict[str, Any] = {}
        self.raw: dict[str, Message] = {}
        self.versions: dict[str, str] = {}
        self.removed: set[str] = set()
        self.errors: list[str] = []
        self.whole = False
        self._seen: set[str] = set()

    def add(self, name: str, msg: Message, version: str = "") -> None:
        """Convert resource ``name`` (of ``version``, Delta); refused, it keeps its last value."""
        if self.subscribed_only and name not in self.held.names:
            log.debug("ignoring %s resource %r: not subscribed", self.short, name)
            return
        if name in self._seen:
            self.refuse(f"{self.short} resource {name!r} appears twice", name if self.incremental else None)
            return
        self._seen.add(name)
        try:
            self.converted[name] = CONVERTERS[self.type_url](msg)
        except Exception as exc:
            if not isinstance(exc, ValueError):
                log.exception("converting %s %r failed", self.short, name)
            self.refuse(str(exc), name)
            return
        self.raw[name] = msg
        if version:
            self.versions[name] = version

    def refuse(self, reason: str, name: str | None = None) -> None:
        """Refuse resource ``name`` (it keeps its last accepted value), or, with no name, a
        resource that cannot be attributed."""
        self.errors.append(reason)
        if name is None:
            self.whole = self.whole or not self.incremental
            return
        for out in (self.converted, self.raw, self.versions):
            out.pop(name, None)
        if name in self.held.resources:  # keep serving the last accepted value
            self.converted[name], self.raw[name] = self.held.resources[name], self.held.raw[name]

    def remove(self, name: str) -> None:
        if name in self.held.resources:
            self.removed.add(name)

    def remove_unlisted(self) -> None:
        """A State-of-the-World set: what it does not carry is gone."""
        self.removed = set(self.held.resources) - set(self.converted)

    def held_after(self) -> tuple[dict[str, Any], dict[str, Message], dict[str, str]]:
        """(resources, protos, versions) held once this update is accepted: held - removed + converted."""
        out: tuple[dict[str, Any], dict[str, Message], dict[str, str]] = (
            dict(self.converted), dict(self.raw), dict(self.versions))
        for new, old in zip(out, (self.held.resources, self.held.raw, self.held.versions), strict=True):
            for name, value in old.items():
                if name not in self.removed:
                    new.setdefault(name, value)
        return out
