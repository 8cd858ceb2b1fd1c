"""xDS snapshot cache: the latest registry snapshot, translated and packed on demand.

The ADS server depends only on :class:`ConfigWatcher` (as go-control-plane's server only knows
its ConfigWatcher): ``fetch`` answers "what should this node have for this type and subscription"
and ``subscribe`` says when to ask again. :class:`SnapshotCache` is the implementation.

Resources are packed into ``Any`` with deterministic serialization once: shared ones once per
snapshot and namespace, per-node ones once per node identity. A response's version is a short
hash of the names and bytes it carries, so an unchanged set means an unchanged version and no push.

Proxyless gRPC clients (nodes without Meshkeeper metadata) are served by resource name instead
(controlplane.proxyless: a Listener per target they ask for), each name packed once per snapshot.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane import proxyless, translate, transparent
from controlplane.metrics import Metrics
from controlplane.snapshot import RegistrySnapshot
from meshkeeper import xds
from meshkeeper.policy import Policy
from meshkeeper.xds import NodeInfo

# Push order on a change: CDS before EDS, LDS before RDS (as Envoy applies them), RTDS last.
SERVED_TYPES = (xds.CLUSTER, xds.ENDPOINT, xds.LISTENER, xds.ROUTE, xds.RUNTIME)


@dataclass(frozen=True, slots=True)
class Resource:
    name: str
    any: any_pb2.Any
    digest: bytes


@dataclass(frozen=True, slots=True)
class Response:
    """What a node should hold for one type: resources sorted by name, and their version."""

    type_url: str
    version: str
    resources: tuple[Resource, ...]


class ConfigWatcher(Protocol):
    def fetch(self, node: NodeInfo, type_url: str, names: frozenset[str] | None) -> Response | None:
        """The node's resources of ``type_url`` (``names`` None = all of them), or None while no
        complete registry snapshot exists yet."""

    def subscribe(self, notify: Callable[[], None]) -> Callable[[], None]:
        """Call ``notify()`` on the loop after each new snapshot; returns the unsubscribe call."""


def pack(name: str, msg: Message) -> Resource:
    value = msg.SerializeToString(deterministic=True)
    a = any_pb2.Any(type_url="type.googleapis.com/" + msg.DESCRIPTOR.full_name, value=value)
    return Resource(name, a, hashlib.sha256(value).digest()[:16])


def version_of(resources: tuple[Resource, ...]) -> str:
    h = hashlib.sha256()
    for r in resources:
        h.update(r.name.encode())
        h.update(b"\0")
        h.update(r.digest)
    return h.hexdigest()[:12]


def _pack_all(res: Mapping[str, Mapping[str, Message]]) -> dict[str, dict[str, Resource]]:
    return {t: {n: pack(n, m) for n, m in sorted(items.items())} for t, items in res.items()}


@lru_cache(maxsize=8192)
def _node_packed(node: NodeInfo, policy: Policy) -> dict[str, dict[str, Resource]]:
    # Per-node resources depend on the node and its own service's policy, not on the rest of the registry.
    return _pack_all(transparent.node_resources(node, policy))


class SnapshotCache:
    """Holds the latest :class:`RegistrySnapshot`; implements :class:`ConfigWatcher`."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics or Metrics()
        self._snapshot: RegistrySnapshot | None = None
        self._shared: dict[str, dict[str, dict[str, Resource]]] = {}
        self._nodes: dict[NodeInfo, dict[str, dict[str, Resource]]] = {}
        self._transparent: dict[tuple[str, str], dict[str, dict[str, Resource]]] = {}
        self._proxyless: dict[tuple[str, str, str], Resource] = {}  # (type, name, namespace)
        self._listeners: list[Callable[[], None]] = []

    @property
    def snapshot(self) -> RegistrySnapshot | None:
        return self._snapshot

    def set_snapshot(self, snapshot: RegistrySnapshot) -> None:
        """Publish a registry snapshot (on the loop) and tell every subscriber."""
        started = time.perf_counter()
        shared = {ns: _pack_all(translate.shared_resources(snapshot, ns).resources)
                  for ns in {*snapshot.namespaces, *snapshot.configs}}
        self._metrics.snapshot_build.labels(stage="xds").observe(time.perf_counter() - started)
        self._snapshot, self._shared, self._nodes, self._transparent = snapshot, shared, {}, {}
        self._proxyless = {}
        for notify in list(self._listeners):
            notify()

    def _resources(self, node: NodeInfo) -> dict[str, dict[str, Resource]]:
        got = self._nodes.get(node)
        if got is None:
            shared = self._shared.get(node.namespace)
            if shared is None:  # a namespace nobody registered in: same shape, no services
                shared = self._shared[node.namespace] = _pack_all(
                    translate.shared_resources(self._snapshot, node.namespace).resources)
            policy = translate.node_policy(self._snapshot, node)
            got = {t: dict(items) for t, items in _node_packed(node, policy).items()}
            for t, items in shared.items():
                got[t].update(items)
            extra = transparent.shared_for(self._snapshot, node)
            if extra is not None:
                for t, items in self._transparent_packed((node.namespace, node.interception), extra).items():
                    got[t].update(items)
            self._nodes[node] = got
        return got

    def _transparent_packed(self, key: tuple[str, str], extra) -> dict[str, dict[str, Resource]]:
        """The namespace resources of an interception mode (controlplane.transparent), packed once
        per snapshot, namespace and mode."""
        got = self._transparent.get(key)
        if got is None:
            got = self._transparent[key] = _pack_all(extra)
        return got

    def resources(self, node: NodeInfo) -> dict[str, dict[str, Resource]] | None:
        return None if self._snapshot is None else self._resources(node)

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
        return Response(type_url, version_of(tuple(chosen)), tuple(chosen))

    def fetch(self, node: NodeInfo, type_url: str, names: frozenset[str] | None) -> Response | None:
        if self._snapshot is None:
            return None
        if node.proxyless:
            return self._proxyless_fetch(node, type_url, names)
        items = self._resources(node).get(type_url, {})
        if names is None:
            chosen = tuple(items[n] for n in sorted(items))
        else:
            chosen = tuple(items[n] for n in sorted(names) if n in items)
        return Response(type_url, version_of(chosen), chosen)

    def subscribe(self, notify: Callable[[], None]) -> Callable[[], None]:
        self._listeners.append(notify)

        def unsubscribe() -> None:
            if notify in self._listeners:
                self._listeners.remove(notify)
        return unsubscribe
