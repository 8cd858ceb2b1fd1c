"""xDS snapshot cache: the latest registry snapshot, translated incrementally and packed once.

The ADS servers (controlplane.ads_sotw, controlplane.ads_delta) depend only on
:class:`ConfigWatcher`, as go-control-plane's servers only know theirs: ``layers`` answers "what
does this node hold of this type" and ``subscribe`` says when to ask again.
:class:`SnapshotCache` is the implementation.

What a node holds of a type is three :class:`TypeView` layers, each shared by every node that
holds it:

* the namespace's shared resources (outbound clusters, their ClusterLoadAssignments,
  RouteConfiguration ``outbound``, one RTDS Runtime per service), kept between snapshots: a new
  snapshot translates again only the services whose :class:`ServiceSnapshot` changed, and a
  resource whose bytes did not change stays the same :class:`Resource` object;
* the namespace's resources for the node's interception mode (controlplane.transparent);
* the node's own (its listeners and inbound cluster), per node identity, own policy and own
  :class:`controlplane.identity_resources.NodeSecurity` (peer authentication mode and ``authz`` of its
  service): a change of those rebuilds that layer only.

With a :class:`meshkeeper.security.MeshIdentity` (``SnapshotCache(identity=...)``: the control
plane has a CA) the resources carry mTLS (docs/identity.md); without one they are as before.

A scoped node (``--egress`` or ``policy.egress``: DESIGN §13) gets, instead of the namespace's
layer, one of only the services in its scope (:meth:`NamespaceTranslation.scoped`), shared by every
node of that scope; a Delta stream may widen it with services asked for on demand.

A view is immutable and derived from the previous one, so what changed between the view a stream
was sent and the current one is found by identity (:meth:`TypeView.changes`, computed once per
pair of views however many streams ask), and a view is serialized into a response once
(:meth:`TypeView.sotw_blob`, :meth:`TypeView.delta_blob`): a push to K streams costs K cheap
sends, not K translations. Per stream, a server keeps only references to views.

Proxyless gRPC clients (nodes without Meshkeeper metadata) are served by resource name instead
(controlplane.proxyless: a Listener per target they ask for), each name packed once per snapshot,
through :meth:`SnapshotCache.fetch`.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane import identity_resources, proxyless, translate, transparent
from controlplane.metrics import Metrics
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from meshkeeper import xds
from meshkeeper.policy import Policy
from meshkeeper.registry import RuntimeValues
from meshkeeper.security import DEFAULT_MODE, MeshIdentity
from meshkeeper.xds import NodeInfo

log = logging.getLogger("meshkeeper.controlplane.xds")

# Push order on a change: CDS before EDS, LDS before RDS (as Envoy applies them), RTDS last.
SERVED_TYPES = (xds.CLUSTER, xds.ENDPOINT, xds.LISTENER, xds.ROUTE, xds.RUNTIME)


@dataclass(frozen=True, slots=True)
class Resource:
    name: str
    any: any_pb2.Any
    digest: bytes

    @property
    def version(self) -> str:
        """The resource's version (Delta xDS): its digest in hex."""
        return self.digest.hex()


@dataclass(frozen=True, slots=True)
class Response:
    """What a node should hold for one type: resources sorted by name, and their version."""

    type_url: str
    version: str
    resources: tuple[Resource, ...]


def pack(name: str, msg: Message, prev: Resource | None = None) -> Resource:
    """``msg`` packed into an ``Any`` (deterministic bytes); ``prev`` itself when its bytes are the same."""
    value = msg.SerializeToString(deterministic=True)
    digest = hashlib.sha256(value).digest()[:16]
    if prev is not None and prev.digest == digest and prev.name == name:
        return prev
    a = any_pb2.Any(type_url="type.googleapis.com/" + msg.DESCRIPTOR.full_name, value=value)
    return Resource(name, a, digest)


def version_of(resources: Iterable[Resource]) -> str:
    h = hashlib.sha256()
    for r in resources:
        h.update(r.name.encode())
        h.update(b"\0")
        h.update(r.digest)
    return h.hexdigest()[:12]


class TypeView:
    """An immutable set of packed resources of one type (name -> :class:`Resource`, in name
    order) and its version. See the module docstring for how views are shared."""

    __slots__ = ("type_url", "items", "version", "_names", "_changes", "_sotw", "_delta", "__weakref__")

    def __init__(self, type_url: str, items: Mapping[str, Resource]) -> None:
        self.type_url = type_url
        self.items = items
        self.version = version_of(items.values())
        self._names: frozenset[str] | None = None
        self._changes: weakref.WeakKeyDictionary[TypeView, tuple] = weakref.WeakKeyDictionary()
        self._sotw: bytes | None = None
        self._delta: bytes | None = None

    @classmethod
    def derive(cls, prev: TypeView | None, type_url: str, items: Mapping[str, Resource]) -> TypeView:
        """A view of ``items``; ``prev`` itself when it holds the very same resources."""
        if prev is not None and len(prev.items) == len(items):
            held = prev.items
            if all(held.get(n) is r for n, r in items.items()):
                return prev
        return cls(type_url, dict(sorted(items.items())))

    def names(self) -> frozenset[str]:
        if self._names is None:
            self._names = frozenset(self.items)
        return self._names

    def changes(self, old: TypeView) -> tuple[tuple[Resource, ...], tuple[str, ...]]:
        """(resources added or changed since ``old``, names removed since ``old``), computed once
        per pair of views."""
        if old is self:
            return (), ()
        got = self._changes.get(old)
        if got is None:
            before = old.items
            changed = tuple(r for n, r in self.items.items()
                            if (o := before.get(n)) is not r and (o is None or o.digest != r.digest))
            removed = tuple(n for n in before if n not in self.items)
            got = self._changes[old] = (changed, removed)
        return got

    def sotw_blob(self) -> bytes:
        """The view's resources as the ``resources`` field of a serialized DiscoveryResponse:
        concatenated with the serialized other fields it is a whole response (protobuf merges
        concatenated messages), so each stream adds only its version and nonce."""
        if self._sotw is None:
            self._sotw = discovery_pb2.DiscoveryResponse(
                resources=[r.any for r in self.items.values()]).SerializeToString()
        return self._sotw

    def delta_blob(self) -> bytes:
        """The same for the ``resources`` field of a DeltaDiscoveryResponse (name, version, resource)."""
        if self._delta is None:
            self._delta = discovery_pb2.DeltaDiscoveryResponse(
                resources=[delta_resource(r) for r in self.items.values()]).SerializeToString()
        return self._delta


def delta_resource(r: Resource) -> discovery_pb2.Resource:
    return discovery_pb2.Resource(name=r.name, version=r.version, resource=r.any)


EMPTY_VIEWS: Mapping[str, TypeView] = {t: TypeView(t, {}) for t in SERVED_TYPES}

Layers = tuple[TypeView, TypeView, TypeView]  # (namespace, interception mode, node)


def held(layers: Layers, names: frozenset[str] | None) -> tuple[Resource, ...]:
    """The resources of ``layers`` a node holds with subscription ``names`` (None: all), by name."""
    out = [r for view in layers for n, r in view.items.items() if names is None or n in names]
    out.sort(key=lambda r: r.name)
    return tuple(out)


def layers_version(layers: Layers) -> str:
    return "-".join(v.version for v in layers)


class ConfigWatcher(Protocol):
    def layers(self, node: NodeInfo, type_url: str, on_demand: frozenset[str] = frozenset()) -> Layers | None:
        """What ``node`` holds of ``type_url`` (every name of it), or None while no complete
        registry snapshot exists yet or for a proxyless node (served by :meth:`fetch`). A scoped
        node (``--egress``, ``policy.egress``) holds the services it declared and ``on_demand``."""

    def fetch(self, node: NodeInfo, type_url: str, names: frozenset[str] | None) -> Response | None:
        """The node's resources of ``type_url`` (``names`` None = all of them), or None while no
        complete registry snapshot exists yet."""

    def intern(self, names: frozenset[str]) -> frozenset[str]:
        """One object for equal subscriptions, so that a thousand streams hold one set."""

    def subscribe(self, notify: Callable[[], None]) -> Callable[[], None]:
        """Call ``notify()`` on the loop after each new snapshot; returns the unsubscribe call."""


def _derive_all(prev: Mapping[str, TypeView], res: Mapping[str, Mapping[str, Message]]) -> dict[str, TypeView]:
    """Views of ``res`` (type -> name -> message) derived from ``prev``: unchanged bytes keep their Resource."""
    out = {}
    for t in SERVED_TYPES:
        before = prev.get(t) or EMPTY_VIEWS[t]
        items = {n: pack(n, m, before.items.get(n)) for n, m in (res.get(t) or {}).items()}
        out[t] = TypeView.derive(before, t, items) if items else EMPTY_VIEWS[t]
    return out


@lru_cache(maxsize=8192)
def _own_views(node: NodeInfo, policy: Policy, sec: identity_resources.NodeSecurity) -> dict[str, TypeView]:
    # Per-node resources depend on the node and its own service's policy and security, not on the
    # rest of the registry.
    return _derive_all({}, transparent.node_resources(node, policy, sec))


@dataclass(frozen=True, slots=True)
class _Service:
    svc: ServiceSnapshot
    mode: str  # its effective peer authentication mode (the namespace's may change alone)
    clusters: Mapping[str, Resource]
    endpoints: Mapping[str, Resource]
    vhost: Message | None
    vhost_bytes: bytes


class NamespaceTranslation:
    """A namespace's shared resources, kept from one snapshot to the next (module docstring)."""

    def __init__(self, namespace: str, identity: MeshIdentity | None = None) -> None:
        self.namespace = namespace
        self.identity = identity
        self.views: dict[str, TypeView] = dict(EMPTY_VIEWS)
        self._services: dict[str, _Service] = {}
        self._runtime: dict[str, tuple[RuntimeValues | None, Resource]] = {}
        self._route: Resource | None = None
        self.translated = 0  # services translated by the last update
        # Scoped views (sidecars that call only some services), by scope: this snapshot's, and
        # the last one's to derive them from.
        self._scoped: dict[frozenset[str], tuple[dict[str, TypeView], tuple[_Service, ...], Resource]] = {}
        self._scoped_before: dict[frozenset[str], tuple[dict[str, TypeView], tuple[_Service, ...], Resource]] = {}

    def update(self, snapshot: RegistrySnapshot) -> dict[str, TypeView]:
        ns = self.namespace
        before = self._services
        now: dict[str, _Service] = {}
        clusters: dict[str, Resource] = {}
        endpoints: dict[str, Resource] = {}
        route_changed = self._route is None or len(before) != len(snapshot.services(ns))
        self.translated = 0
        for name, svc in sorted(snapshot.services(ns).items()):
            entry = before.get(name)
            mode = snapshot.peer_mode(ns, name) if self.identity is not None else DEFAULT_MODE
            if entry is None or entry.mode != mode or (entry.svc is not svc and entry.svc != svc):
                entry = self._translate(svc, mode, entry)
                route_changed = route_changed or before.get(name) is None or (
                    entry.vhost_bytes != before[name].vhost_bytes)
            now[name] = entry
            clusters.update(entry.clusters)
            endpoints.update(entry.endpoints)
        route_changed = route_changed or now.keys() != before.keys()
        self._services = now
        if route_changed:
            route = translate.outbound_route_configuration([e.vhost for e in now.values() if e.vhost is not None])
            self._route = pack(xds.OUTBOUND_ROUTE, route, self._route)
        runtime = {}
        for name in snapshot.runtime_services(ns):
            values = snapshot.config(ns, name)
            prev = self._runtime.get(name)
            if prev is None or prev[0] != values:
                prev = (values, pack(name, translate.runtime(name, values), prev[1] if prev else None))
            runtime[name] = prev
        self._runtime = runtime
        self._scoped_before, self._scoped = self._scoped, {}
        v = self.views
        self.views = {
            xds.CLUSTER: TypeView.derive(v[xds.CLUSTER], xds.CLUSTER, clusters),
            xds.ENDPOINT: TypeView.derive(v[xds.ENDPOINT], xds.ENDPOINT, endpoints),
            xds.LISTENER: EMPTY_VIEWS[xds.LISTENER],
            xds.ROUTE: TypeView.derive(v[xds.ROUTE], xds.ROUTE, {xds.OUTBOUND_ROUTE: self._route}),
            xds.RUNTIME: TypeView.derive(v[xds.RUNTIME], xds.RUNTIME, {n: r for n, (_, r) in runtime.items()}),
        }
        return self.views

    def scoped(self, scope: frozenset[str]) -> dict[str, TypeView]:
        """The views of a sidecar that may call only the services in ``scope``: their clusters,
        load assignments and virtual hosts (RTDS is not scoped: a sidecar names its own)."""
        got = self._scoped.get(scope)
        if got is None:
            views, members, route = self._scoped_before.get(scope) or (EMPTY_VIEWS, (), None)
            now = tuple(self._services[n] for n in sorted(scope) if n in self._services)
            clusters: dict[str, Resource] = {}
            endpoints: dict[str, Resource] = {}
            for e in now:
                clusters.update(e.clusters)
                endpoints.update(e.endpoints)
            if route is None or len(now) != len(members) or any(a is not b for a, b in zip(now, members, strict=True)):
                route = pack(xds.OUTBOUND_ROUTE, translate.outbound_route_configuration(
                    [e.vhost for e in now if e.vhost is not None]), route)
            views = {
                xds.CLUSTER: TypeView.derive(views[xds.CLUSTER], xds.CLUSTER, clusters),
                xds.ENDPOINT: TypeView.derive(views[xds.ENDPOINT], xds.ENDPOINT, endpoints),
                xds.LISTENER: EMPTY_VIEWS[xds.LISTENER],
                xds.ROUTE: TypeView.derive(views[xds.ROUTE], xds.ROUTE, {xds.OUTBOUND_ROUTE: route}),
                xds.RUNTIME: self.views[xds.RUNTIME],
            }
            got = self._scoped[scope] = (views, now, route)
        return got[0]

    def _translate(self, svc: ServiceSnapshot, mode: str, prev: _Service | None) -> _Service:
        self.translated += 1
        got = translate.service_resources(svc, self.identity, mode)
        old_c = prev.clusters if prev is not None else {}
        old_e = prev.endpoints if prev is not None else {}
        vhost = got.virtual_host
        return _Service(svc, mode, {n: pack(n, m, old_c.get(n)) for n, m in got.clusters.items()},
                        {n: pack(n, m, old_e.get(n)) for n, m in got.endpoints.items()},
                        vhost, vhost.SerializeToString(deterministic=True) if vhost is not None else b"")


class SnapshotCache:
    """Holds the latest :class:`RegistrySnapshot`; implements :class:`ConfigWatcher`."""

    INTERNED_MAX = 4096  # distinct subscriptions remembered (per snapshot, beyond which new ones are not shared)

    def __init__(self, metrics: Metrics | None = None, identity: MeshIdentity | None = None) -> None:
        self._metrics = metrics or Metrics()
        self._identity = identity
        self._snapshot: RegistrySnapshot | None = None
        self._namespaces: dict[str, NamespaceTranslation] = {}
        self._modes: dict[tuple[str, bool], dict[str, TypeView]] = {}  # interception-mode layers, kept across snapshots
        self._modes_now: dict[tuple[str, bool], dict[str, TypeView]] = {}
        self._nodes: dict[NodeInfo, tuple[frozenset[str] | None, dict[str, Layers]]] = {}
        self._proxyless: dict[tuple[str, str, str], Resource] = {}  # (type, name, namespace)
        self._interned: dict[frozenset[str], frozenset[str]] = {}
        self._listeners: list[Callable[[], None]] = []

    @property
    def identity(self) -> MeshIdentity | None:
        """The mesh's identity (None: no CA, plaintext)."""
        return self._identity

    @property
    def snapshot(self) -> RegistrySnapshot | None:
        return self._snapshot

    def set_snapshot(self, snapshot: RegistrySnapshot) -> None:
        """Publish a registry snapshot (on the loop) and tell every subscriber."""
        started = time.perf_counter()
        translated = 0
        for ns in sorted({*snapshot.namespaces, *snapshot.configs, *self._namespaces}):
            t = self._namespaces.get(ns)
            if t is None:
                t = self._namespaces[ns] = NamespaceTranslation(ns, self._identity)
            t.update(snapshot)
            translated += t.translated
        self._metrics.snapshot_build.labels(stage="xds").observe(time.perf_counter() - started)
        log.debug("snapshot %d: %d services translated again", snapshot.version, translated)
        self._snapshot, self._nodes, self._modes_now, self._proxyless = snapshot, {}, {}, {}
        if len(self._interned) > self.INTERNED_MAX:
            self._interned = {}
        for notify in list(self._listeners):
            notify()

    def _namespace(self, namespace: str) -> NamespaceTranslation:
        t = self._namespaces.get(namespace)
        if t is None:  # a namespace nobody registered in: same shape, no services
            t = self._namespaces[namespace] = NamespaceTranslation(namespace, self._identity)
            t.update(self._snapshot)
        return t

    def _mode_views(self, node: NodeInfo) -> Mapping[str, TypeView]:
        extra = transparent.shared_for(self._snapshot, node, self._identity)
        if extra is None:
            return EMPTY_VIEWS
        key = (node.namespace, node.interception == "redirect")
        got = self._modes_now.get(key)
        if got is None:
            got = self._modes_now[key] = self._modes[key] = _derive_all(self._modes.get(key, {}), extra)
        return got

    def scope(self, node: NodeInfo) -> frozenset[str] | None:
        """The services ``node`` may call (None: all): its ``--egress``, else its own service's
        ``policy.egress``."""
        declared = node.declared_egress
        if declared is None:
            egress = translate.node_policy(self._snapshot, node).egress
            declared = None if "*" in egress else frozenset(egress)
        return None if declared is None else self.intern(declared)

    def _node_layers(self, node: NodeInfo) -> tuple[frozenset[str] | None, dict[str, Layers]]:
        got = self._nodes.get(node)
        if got is None:
            scope = self.scope(node)
            ns = self._namespace(node.namespace)
            shared = ns.views if scope is None else ns.scoped(scope)
            mode = self._mode_views(node)
            own = _own_views(node, translate.node_policy(self._snapshot, node),
                             identity_resources.node_security(self._snapshot, node, self._identity))
            got = self._nodes[node] = (scope, {t: (shared[t], mode[t], own[t]) for t in SERVED_TYPES})
        return got

    def _layers(self, node: NodeInfo) -> dict[str, Layers]:
        return self._node_layers(node)[1]

    def layers(self, node: NodeInfo, type_url: str, on_demand: frozenset[str] = frozenset()) -> Layers | None:
        if self._snapshot is None or node.proxyless or type_url not in EMPTY_VIEWS:
            return None
        scope, layers = self._node_layers(node)
        got = layers[type_url]
        if scope is None or on_demand <= scope:
            return got
        shared = self._namespace(node.namespace).scoped(self.intern(scope | on_demand))
        return (shared[type_url], got[1], got[2])

    def intern(self, names: frozenset[str]) -> frozenset[str]:
        got = self._interned.get(names)
        if got is None:
            got = self._interned[names] = names
        return got

    def _proxyless_fetch(self, node: NodeInfo, type_url: str, names: frozenset[str] | None) -> Response:
        wanted = proxyless.wildcard_names(self._snapshot, type_url, node.namespace) if names is None else sorted(names)
        chosen = []
        for name in wanted:
            key = (type_url, name, node.namespace)
            got = self._proxyless.get(key)
            if got is None:  # names that exist are kept: a client asking for many others grows nothing
                msg = proxyless.resource(self._snapshot, type_url, name, node.namespace)
                if msg is None:
                    continue
                got = self._proxyless[key] = pack(name, msg)
            chosen.append(got)
        return Response(type_url, version_of(chosen), tuple(chosen))

    def fetch(self, node: NodeInfo, type_url: str, names: frozenset[str] | None) -> Response | None:
        if self._snapshot is None:
            return None
        if node.proxyless:
            return self._proxyless_fetch(node, type_url, names)
        chosen = held(self._layers(node)[type_url], names) if type_url in EMPTY_VIEWS else ()
        return Response(type_url, version_of(chosen), chosen)

    def resources(self, node: NodeInfo) -> dict[str, dict[str, Resource]] | None:
        """Everything ``node`` holds, by type and name (for the admin API and tests)."""
        if self._snapshot is None:
            return None
        return {t: {r.name: r for r in held(layers, None)} for t, layers in self._layers(node).items()}

    def subscribe(self, notify: Callable[[], None]) -> Callable[[], None]:
        self._listeners.append(notify)

        def unsubscribe() -> None:
            if notify in self._listeners:
                self._listeners.remove(notify)
        return unsubscribe
