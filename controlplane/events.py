"""The control plane's event stream (admin API ``WatchEvents``).

Events are ``meshkeeper.admin.v1.Event`` messages: ``registry`` (a service's record, instances,
overrides, policy or runtime config changed between two published snapshots; one event per
service), ``push`` (a response sent to a proxy), ``nack`` (a proxy refused one), ``admin_write``
``alert`` (a rule fired or resolved; controlplane.alerts.evaluate) and ``zookeeper`` (the control
plane's ZooKeeper connection went SUSPENDED, LOST or CONNECTED: a leader change, an outage). Producers call :meth:`EventBus.publish`; building an event is skipped while
nobody watches (``bus.active``), so pushes to many sidecars cost nothing extra.

Each subscriber has a bounded queue. One that falls :data:`QUEUE_LIMIT` events behind is dropped
at once (its queue freed, nothing more fed to it) and its stream ends with RESOURCE_EXHAUSTED when
it next reads, rather than buffering without bound or slowing producers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from google.protobuf import timestamp_pb2

from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from meshkeeper.admin.v1 import admin_pb2
from meshkeeper.registry import RuntimeValues

QUEUE_LIMIT = 1000
KINDS = ("registry", "push", "nack", "admin_write", "alert", "zookeeper")


class Overflow(Exception):
    """The subscriber fell too far behind."""


_OVERFLOW = object()
_END = object()


class Subscription:
    def __init__(self, bus: EventBus, namespace: str, kinds: Iterable[str]) -> None:
        self._bus = bus
        self.namespace = namespace
        self.kinds = frozenset(kinds)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.overflowed = False

    def wants(self, event: admin_pb2.Event) -> bool:
        return ((not self.kinds or event.kind in self.kinds)
                and (not self.namespace or not event.namespace or event.namespace == self.namespace))

    def offer(self, event: admin_pb2.Event) -> None:
        if self.overflowed or not self.wants(event):
            return
        if self.queue.qsize() >= QUEUE_LIMIT:
            # Done with this watcher: free what it holds and stop feeding it now, even if its
            # stream is stuck sending to a client that stopped reading; its next read ends it.
            self.overflowed = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(_OVERFLOW)
            self.close()
            return
        self.queue.put_nowait(event)

    async def next(self) -> admin_pb2.Event | None:
        """The next event; None when the bus closed (shutdown); :class:`Overflow` if behind."""
        event = await self.queue.get()
        if event is _OVERFLOW:
            raise Overflow(f"more than {QUEUE_LIMIT} events behind")
        return None if event is _END else event

    def close(self) -> None:
        self._bus._subs.discard(self)


class EventBus:
    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._subs: set[Subscription] = set()
        self._wall = wall
        self.published = 0

    @property
    def active(self) -> bool:
        return bool(self._subs)

    def subscribe(self, namespace: str = "", kinds: Iterable[str] = ()) -> Subscription:
        sub = Subscription(self, namespace, kinds)
        self._subs.add(sub)
        return sub

    def close(self) -> None:
        """End every subscription (shutdown): their streams finish with OK."""
        for sub in list(self._subs):
            sub.queue.put_nowait(_END)

    def publish(self, kind: str, *, namespace: str = "", service: str = "", node_id: str = "",
                who: str = "", summary: str = "", before: str = "", after: str = "", alert: str = "",
                state: str = "") -> None:
        if not self._subs:
            return
        at = timestamp_pb2.Timestamp()
        at.FromNanoseconds(int(self._wall() * 1e9))
        event = admin_pb2.Event(at=at, kind=kind, namespace=namespace, service=service, node_id=node_id,
                                who=who, summary=summary, before=before, after=after, alert=alert, state=state)
        self.published += 1
        for sub in list(self._subs):
            sub.offer(event)

    def zookeeper_state(self, state: str) -> None:
        """The control plane's ZooKeeper connection changed state (``SUSPENDED``: lost, sidecars keep
        the last snapshot; ``CONNECTED``: back, the tree is read again; ``LOST``: the session expired)."""
        self.publish("zookeeper", state=state, summary=f"ZooKeeper {state}")

    def registry_changed(self, old: RegistrySnapshot | None, new: RegistrySnapshot) -> None:
        """One ``registry`` event per service that differs between two published snapshots."""
        if not self._subs or old is None:
            return
        for ns, svc, summary in registry_diff(old, new):
            self.publish("registry", namespace=ns, service=svc, summary=summary)


def _keys_delta(what: str, before: Iterable[str], after: Iterable[str]) -> str:
    b, a = set(before), set(after)
    parts = [f"+{k}" for k in sorted(a - b)] + [f"-{k}" for k in sorted(b - a)]
    return f"{what} {len(b)}->{len(a)} ({', '.join(parts)})" if parts else ""


def _service_delta(old: ServiceSnapshot | None, new: ServiceSnapshot | None) -> str:
    if old is None:
        return f"service added ({len(new.instances)} instances)"
    if new is None:
        return "service removed"
    parts = []
    if old.record != new.record:
        parts.append(f"protocol {old.record.protocol}->{new.record.protocol}")
    delta = _keys_delta("instances", old.instances, new.instances)
    if delta:
        parts.append(delta)
    changed = [k for k in set(old.instances) & set(new.instances) if old.instances[k] != new.instances[k]]
    if changed:
        parts.append(f"instances changed: {', '.join(sorted(changed))}")
    if old.overrides != new.overrides:
        keys = sorted(k for k in set(old.overrides) | set(new.overrides)
                      if old.overrides.get(k) != new.overrides.get(k))
        parts.append(f"overrides changed: {', '.join(keys)}")
    if old.policy != new.policy:
        parts.append("policy changed")
    return "; ".join(parts)


def _config_delta(old: RuntimeValues | None, new: RuntimeValues | None) -> str:
    a = dict(old.values) if old is not None else {}
    b = dict(new.values) if new is not None else {}
    parts = ([f"+{k}" for k in sorted(set(b) - set(a))] + [f"-{k}" for k in sorted(set(a) - set(b))]
             + [f"~{k}" for k in sorted(set(a) & set(b)) if a[k] != b[k]])
    return f"config changed ({', '.join(parts)})" if parts else ""


def registry_diff(old: RegistrySnapshot, new: RegistrySnapshot) -> list[tuple[str, str, str]]:
    """(namespace, service, summary) for every service whose record, instances, overrides, policy
    or runtime config differ between two snapshots, sorted."""
    out = []
    for ns in sorted(set(old.namespaces) | set(new.namespaces) | set(old.configs) | set(new.configs)):
        a, b = old.services(ns), new.services(ns)
        ca, cb = old.configs_of(ns), new.configs_of(ns)
        for svc in sorted(set(a) | set(b) | set(ca) | set(cb)):
            parts = []
            if a.get(svc) != b.get(svc):
                parts.append(_service_delta(a.get(svc), b.get(svc)))
            if ca.get(svc) != cb.get(svc):
                parts.append(_config_delta(ca.get(svc), cb.get(svc)))
            summary = "; ".join(p for p in parts if p)
            if summary:
                out.append((ns, svc, summary))
    return out
