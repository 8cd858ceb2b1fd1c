"""Registry watch: ZooKeeper watches -> debounced, immutable :class:`RegistrySnapshot` s.

Watched (one-shot ZooKeeper watches, re-armed by every read; no polling)::

    /meshkeeper                               children  (namespaces)
    /meshkeeper/<ns>/services                 children  (services; exists-watch while absent)
    /meshkeeper/<ns>/services/<svc>           data      (ServiceRecord)
    .../<svc>/policy                          data      (Policy; exists-watch while absent)
    .../<svc>/peer_authentication, .../authz  data      (meshkeeper.security; exists-watch while absent)
    .../<svc>/instances, .../<svc>/overrides  children  (exists-watch while absent)
    .../instances/<key>, .../overrides/<key>  data
    /meshkeeper/<ns>/config                   children  (runtime configs; exists-watch while absent)
    /meshkeeper/<ns>/config/<svc>             data      (RuntimeValues; independent of services/<svc>)
    /meshkeeper/<ns>/vips                     children  (virtual IPs; exists-watch while absent)
    /meshkeeper/<ns>/vips/<svc>               data      (VipRecord, written by controlplane.vips)
    /meshkeeper/<ns>/alerts                   children  (alert rules; exists-watch while absent)
    /meshkeeper/<ns>/alerts/<name>            data      (AlertRule, controlplane.alerts.rule)
    /meshkeeper/<ns>/peer_authentication      data      (the namespace's PeerAuthentication; exists-watch
                                                         while absent; a data znode, not a table)

kazoo calls back on its own threads; :class:`KazooSource` only hands events and read results to
the loop with ``call_soon_threadsafe``. All state lives on the loop, in :class:`RegistryWatch`.

Why not kazoo's ``DataWatch``/``ChildrenWatch`` recipes: on session expiry kazoo clears its
watcher tables and fires every watcher once with ``EventType.NONE`` and no path; ``DataWatch``
then re-reads on every CONNECTED, ``ChildrenWatch`` only when its watch was lost. Each re-reads on
its own, so nothing tells when the whole tree is consistent again. Here every (re)connect starts a
new *generation*: the tree is re-read from the root, results of older generations are dropped, and
a snapshot is published only when no read is outstanding. While ZooKeeper is SUSPENDED or LOST
nothing is published: sidecars keep the last snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from controlplane.metrics import Metrics
from controlplane.snapshot import RegistrySnapshot, RegistryTree
from meshkeeper.registry import ROOT

log = logging.getLogger("meshkeeper.controlplane.watch")

DEFAULT_DEBOUNCE = 0.1
RETRY_DELAY = 0.5  # a read that failed while connected is retried after this
# A read that fails this many times in a row for a reason other than the connection (an ACL the
# control plane cannot pass, say) stops holding back snapshots: the znode is counted as bad
# ("unreadable") and its last good state is served, while reads keep being retried.
MAX_BLOCKING_RETRIES = 5
# Children of a namespace read as side tables of the tree: znode name -> kind (RegistryTree.TABLES).
SIDE_TABLES = {"config": "config", "vips": "vip", "alerts": "alert"}
NS_PEER_AUTHENTICATION = "peer_authentication"  # a data child of a namespace (DESIGN §14)
# A service's optional data children: znode name -> what _classify calls it.
SERVICE_DATA = {"policy": "policy", "peer_authentication": "service_security", "authz": "service_security"}


class ZkSource(Protocol):
    """What the watch needs from ZooKeeper. All methods run on the event loop."""

    def start(self, on_event: Callable[[str], None], on_state: Callable[[str], None]) -> None:
        """Begin connecting. ``on_event(path, kind)`` fires for every triggered watch (``kind``: the
        event type, ``CREATED``/``DELETED``/``CHANGED``/``CHILD``), ``on_state`` with
        ``CONNECTED``/``SUSPENDED``/``LOST``; both are called on the loop."""

    async def children(self, path: str) -> list[str] | None:
        """Child names with a child watch armed, or None (and an exists watch) if absent."""

    async def data(self, path: str, watch_absent: bool = False) -> tuple[bytes, int] | None:
        """(payload, mzxid) with a data watch armed, or None if absent (then with an exists
        watch armed when ``watch_absent``: for optional nodes such as ``policy``)."""

    async def stop(self) -> None: ...


def _classify(path: str) -> tuple | None:
    """Map a watched path to what it holds (see the module docstring); None if not ours."""
    if path == ROOT:
        return ("root",)
    if not path.startswith(ROOT + "/"):
        return None
    parts = path[len(ROOT) + 1:].split("/")
    n = len(parts)
    if n == 2 and parts[1] == NS_PEER_AUTHENTICATION:
        return ("ns_peer_authentication", parts[0])
    if n >= 2 and parts[1] in SIDE_TABLES:
        if n == 2:
            return ("table", SIDE_TABLES[parts[1]], parts[0])
        if n == 3:
            return ("table_entry", SIDE_TABLES[parts[1]], parts[0], parts[2])
        return None
    if n < 2 or parts[1] != "services":
        return None
    ns = parts[0]
    if n == 2:
        return ("services", ns)
    svc = parts[2]
    if n == 3:
        return ("service", ns, svc)
    if n == 4 and parts[3] in SERVICE_DATA:
        if parts[3] == "policy":
            return ("policy", ns, svc)
        return ("service_security", ns, svc, parts[3])
    kinds = {"instances": "instance", "overrides": "override"}
    if parts[3] not in kinds:
        return None
    if n == 4:
        return ("keys", kinds[parts[3]], ns, svc)
    if n == 5:
        return ("entry", kinds[parts[3]], ns, svc, parts[4])
    return None


class RegistryWatch:
    """Keeps a :class:`RegistryTree` in step with ZooKeeper and publishes snapshots.

    ``on_snapshot`` is called on the loop with each new snapshot; the first one only once the
    initial read of the whole tree is done. ``latest`` is the last published snapshot.
    """

    def __init__(self, source: ZkSource, on_snapshot: Callable[[RegistrySnapshot], None],
                 *, metrics: Metrics | None = None, debounce: float = DEFAULT_DEBOUNCE,
                 on_state: Callable[[str], None] | None = None) -> None:
        self._source = source
        self._on_snapshot = on_snapshot
        # Told each connection state (CONNECTED / SUSPENDED / LOST): the control plane's event stream
        # says when ZooKeeper went away and came back (a leader change, an outage).
        self._on_state_change = on_state or (lambda state: None)
        self._metrics = metrics or Metrics()
        self._debounce = debounce
        self._tree = RegistryTree(on_bad=self._count_bad)
        self._gen = 0
        self._connected = False
        self._state = "LOST"
        self._running: set[str] = set()  # paths being read in this generation
        self._again: set[str] = set()  # paths whose watch fired during their read
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._failures: dict[str, int] = {}  # path -> consecutive failed reads
        self._unreadable: set[str] = set()  # paths retried without holding back snapshots
        self._tasks: set[asyncio.Task] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._dirty = False
        self._version = 0
        self.latest: RegistrySnapshot | None = None

    @property
    def state(self) -> str:
        return self._state

    def start(self) -> None:
        self._source.start(self._on_event, self._on_state)

    async def stop(self) -> None:
        self._connected = False
        self._gen += 1
        self._cancel_timers()
        for t in list(self._tasks):
            t.cancel()
        await self._source.stop()

    # -- ZooKeeper callbacks (already on the loop)

    def _on_state(self, state: str) -> None:
        log.info("zookeeper %s", state)
        self._metrics.zk_event(state)
        self._state = state
        self._metrics.set_zk_state(state)
        self._on_state_change(state)
        self._gen += 1  # whatever is in flight belongs to the old connection
        self._running.clear()
        self._again.clear()
        self._cancel_timers()
        if state != "CONNECTED":
            self._connected = False
            return
        # Re-read everything, even after a reconnect within the session: cheap, and the only way
        # to know when the tree is whole again.
        self._connected = True
        self._metrics.zk_resyncs.inc()
        self._tree.reset()
        self._dirty = True
        self._schedule(ROOT)

    def _on_event(self, path: str, kind: str = "OTHER") -> None:
        self._metrics.zk_event(kind)
        if self._connected and path:
            self._schedule(path)

    def _count_bad(self, kind: str, path: str, reason: str) -> None:
        self._metrics.bad_znodes.labels(kind=kind).inc()

    # -- reads

    def _schedule(self, path: str) -> None:
        if path in self._running:
            self._again.add(path)
            return
        handle = self._retries.pop(path, None)
        if handle is not None:
            handle.cancel()
        self._running.add(path)
        task = asyncio.get_running_loop().create_task(self._refresh(path, self._gen))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, path: str, gen: int) -> None:
        try:
            while True:
                self._again.discard(path)
                await self._read(path, gen)
                if gen != self._gen or path not in self._again:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # connection loss, session expiry, ACLs: never crash the watch
            if gen == self._gen and self._connected:
                n = self._failures[path] = self._failures.get(path, 0) + 1
                if n == MAX_BLOCKING_RETRIES:
                    log.warning("reading %s keeps failing (%s: %s); serving its last good state and "
                                "retrying in the background", path, type(exc).__name__, exc)
                    self._unreadable.add(path)
                    self._count_bad("unreadable", path, str(exc))
                elif n < MAX_BLOCKING_RETRIES:
                    log.warning("reading %s failed (%s: %s); retrying", path, type(exc).__name__, exc)
                delay = RETRY_DELAY if n < MAX_BLOCKING_RETRIES else RETRY_DELAY * 10
                self._retries[path] = asyncio.get_running_loop().call_later(delay, self._retry, path, gen)
        else:
            self._failures.pop(path, None)
            self._unreadable.discard(path)
        finally:
            if gen == self._gen:
                self._running.discard(path)
                self._maybe_publish()

    def _retry(self, path: str, gen: int) -> None:
        if self._retries.pop(path, None) is not None and gen == self._gen:
            self._schedule(path)

    async def _read(self, path: str, gen: int) -> None:
        what = _classify(path)
        if what is None:
            return
        kind = what[0]
        tree = self._tree
        if kind == "root":
            names = await self._source.children(path)
            if gen != self._gen:
                return
            new = tree.set_namespaces(ROOT, names or [])
            follow = [f"{ROOT}/{ns}/{sub}" for ns in new
                      for sub in ("services", *SIDE_TABLES, NS_PEER_AUTHENTICATION)]
        elif kind == "services":
            ns = what[1]
            names = await self._source.children(path)
            if gen != self._gen:
                return
            new = tree.set_services(ns, path, names or [])
            follow = [f"{path}/{s}{sub}" for s in new
                      for sub in ("", "/instances", "/overrides", *(f"/{d}" for d in SERVICE_DATA))]
        elif kind == "service":
            _, ns, svc = what
            got = await self._source.data(path)
            if gen != self._gen:
                return
            if got is not None:  # a deleted service leaves through its parent's children
                tree.set_service_data(ns, svc, path, got[0], got[1])
            follow = []
        elif kind == "table":
            _, table, ns = what
            names = await self._source.children(path)
            if gen != self._gen:
                return
            follow = [f"{path}/{s}" for s in tree.set_table_names(table, ns, path, names or [])]
        elif kind == "table_entry":
            _, table, ns, svc = what
            got = await self._source.data(path)
            if gen != self._gen:
                return
            if got is None:
                tree.remove_table_entry(table, ns, svc, path)
            else:
                tree.set_table_entry(table, ns, svc, path, got[0], got[1])
            follow = []
        elif kind == "policy":
            _, ns, svc = what
            got = await self._source.data(path, watch_absent=True)
            if gen != self._gen:
                return
            tree.set_policy(ns, svc, path, *(got if got is not None else (None, 0)))
            follow = []
        elif kind == "service_security":
            _, ns, svc, name = what
            got = await self._source.data(path, watch_absent=True)
            if gen != self._gen:
                return
            tree.set_service_security(name, ns, svc, path, *(got if got is not None else (None, 0)))
            follow = []
        elif kind == "ns_peer_authentication":
            ns = what[1]
            got = await self._source.data(path, watch_absent=True)
            if gen != self._gen:
                return
            tree.set_namespace_peer_authentication(ns, path, *(got if got is not None else (None, 0)))
            follow = []
        elif kind == "keys":
            _, ekind, ns, svc = what
            keys = await self._source.children(path)
            if gen != self._gen:
                return
            follow = [f"{path}/{k}" for k in tree.set_keys(ekind, ns, svc, path, keys or [])]
        else:
            _, ekind, ns, svc, key = what
            got = await self._source.data(path)
            if gen != self._gen:
                return
            if got is None:
                tree.remove_entry(ekind, ns, svc, key, path)
            else:
                tree.set_entry(ekind, ns, svc, key, path, got[0], got[1])
            follow = []
        for p in follow:
            self._schedule(p)
        self._changed()

    # -- publishing

    def _changed(self) -> None:
        self._dirty = True
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._debounce, self._debounced)

    def _debounced(self) -> None:
        self._timer = None
        self._maybe_publish()

    def _cancel_timers(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for h in self._retries.values():
            h.cancel()
        self._retries.clear()

    def _maybe_publish(self) -> None:
        if (not self._dirty or self._timer is not None or not self._connected
                or self._running - self._unreadable or set(self._retries) - self._unreadable):
            return
        self._dirty = False
        started = time.perf_counter()
        snap = self._tree.build(self._version + 1)
        self._metrics.snapshot_build.labels(stage="registry").observe(time.perf_counter() - started)
        self._metrics.bad_znodes_current.set(len(self._tree.bad))
        if snap.same_content(self.latest):
            return
        self._version = snap.version
        self.latest = snap
        services, instances = snap.counts()
        self._metrics.snapshot_version.set(snap.version)
        self._metrics.snapshot_services.set(services)
        self._metrics.snapshot_instances.set(instances)
        log.info("registry snapshot %d: %d services, %d instances", snap.version, services, instances)
        self._on_snapshot(snap)
