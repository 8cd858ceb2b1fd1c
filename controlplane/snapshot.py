"""The control plane's view of the registry: an immutable :class:`RegistrySnapshot`, and the
mutable :class:`RegistryTree` that the ZooKeeper watch fills in and snapshots are built from.

Only ``controlplane.watch`` mutates a tree, on the event loop. Everything downstream (translation,
the xDS cache, the admin API) reads published snapshots, which never change once built.

Runtime configs (``<ns>/config/<svc>``) and virtual IPs (``<ns>/vips/<svc>``) live beside the
services, not inside them: such a znode exists on its own, with or without a service znode of the
same name (:attr:`RegistrySnapshot.configs`, :attr:`RegistrySnapshot.vips`). The tree keeps both
in one shape, a *side table* per kind: namespace -> service -> last good record.

Decoding happens here, once per znode version: a payload that does not validate
(:class:`meshkeeper.registry.RecordError`) is skipped, logged once per path and ``mzxid``, and
counted; the path keeps its last good record if it had one, so a bad write never empties a service.

Peer authentication and authorization (DESIGN §14): a service's own ``peer_authentication`` and
``authz`` znodes ride on its :class:`ServiceSnapshot`; the namespace's ``peer_authentication``
(``/meshkeeper/<ns>/peer_authentication``, a data znode beside ``services`` and ``config``) is
:attr:`RegistrySnapshot.peer_authentication`. :meth:`RegistrySnapshot.peer_mode` combines them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from controlplane.alerts.rule import AlertRule
from meshkeeper.policy import DEFAULT_POLICY, Policy, PolicyError, decode_policy
from meshkeeper.registry import (
    InstanceRecord,
    Override,
    RecordError,
    RuntimeValues,
    ServiceRecord,
    VipRecord,
    is_reserved_root_child,
    parse_endpoint_key,
    validate_name,
)
from meshkeeper.security import AuthzPolicy, PeerAuthentication, effective_mode

log = logging.getLogger("meshkeeper.controlplane.registry")

_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ServiceSnapshot:
    """One service of one namespace: its record, live instances and operator overrides (by key)."""

    name: str
    namespace: str
    record: ServiceRecord
    instances: Mapping[str, InstanceRecord] = field(default_factory=lambda: _EMPTY)
    overrides: Mapping[str, Override] = field(default_factory=lambda: _EMPTY)
    policy: Policy = DEFAULT_POLICY
    peer_authentication: PeerAuthentication | None = None  # its own znode's; None: the namespace's
    authz: AuthzPolicy | None = None  # None: no znode, everything allowed


@dataclass(frozen=True, eq=False)
class RegistrySnapshot:
    """Namespace -> service -> :class:`ServiceSnapshot`, as published under ``version``; and
    ``configs``: namespace -> service -> :class:`RuntimeValues` of each ``config/<svc>`` znode that
    ever had a good payload (independent of ``namespaces``: a config may name a service without a
    service znode, and a service without a config znode has no entry; a namespace without
    configs has no entry either); and ``vips``: namespace -> service -> virtual IP, in the same
    shape (a service whose VIP is not allocated yet has no entry); and ``alerts``: namespace ->
    rule name -> :class:`AlertRule` (``alerts/<name>``), in the same shape; and
    ``peer_authentication``: namespace -> its ``<ns>/peer_authentication`` record (no entry: none).

    Hashed by identity so translation caches can key on it; compare contents with
    :meth:`same_content`. ``version`` only ever grows within one control-plane process.
    """

    version: int
    namespaces: Mapping[str, Mapping[str, ServiceSnapshot]] = field(default_factory=lambda: _EMPTY)
    configs: Mapping[str, Mapping[str, RuntimeValues]] = field(default_factory=lambda: _EMPTY)
    vips: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: _EMPTY)
    alerts: Mapping[str, Mapping[str, AlertRule]] = field(default_factory=lambda: _EMPTY)
    peer_authentication: Mapping[str, PeerAuthentication] = field(default_factory=lambda: _EMPTY)

    def peer_mode(self, namespace: str, service: str) -> str:
        """The service's effective peer authentication mode: its own znode's, else its
        namespace's, else PERMISSIVE (a service without a service znode: its namespace's)."""
        svc = self.services(namespace).get(service)
        return effective_mode(svc.peer_authentication if svc is not None else None,
                              self.peer_authentication.get(namespace))

    def services(self, namespace: str) -> Mapping[str, ServiceSnapshot]:
        return self.namespaces.get(namespace, _EMPTY)

    def configs_of(self, namespace: str) -> Mapping[str, RuntimeValues]:
        """The runtime configs of a namespace, by service name."""
        return self.configs.get(namespace, _EMPTY)

    def config(self, namespace: str, service: str) -> RuntimeValues | None:
        """A service's runtime config; None without a (good) config znode."""
        return self.configs_of(namespace).get(service)

    def vip(self, namespace: str, service: str) -> str | None:
        """The service's virtual IP; None until the control plane has allocated one."""
        return self.vips.get(namespace, _EMPTY).get(service)

    def runtime_services(self, namespace: str) -> list[str]:
        """Services that get a Runtime resource: those with a service record or a config, sorted."""
        return sorted({*self.services(namespace), *self.configs_of(namespace)})

    def same_content(self, other: RegistrySnapshot | None) -> bool:
        return (other is not None and self.namespaces == other.namespaces and self.configs == other.configs
                and self.vips == other.vips and self.alerts == other.alerts
                and self.peer_authentication == other.peer_authentication)

    def counts(self) -> tuple[int, int]:
        """(services, instances) over all namespaces."""
        svcs = [s for ns in self.namespaces.values() for s in ns.values()]
        return len(svcs), sum(len(s.instances) for s in svcs)


def _freeze(d: dict) -> Mapping:
    return MappingProxyType(dict(sorted(d.items())))


# --------------------------------------------------------------------------- the mutable tree

BadZnodeHook = Callable[[str, str, str], None]  # (kind, path, reason)


@dataclass
class _ServiceNode:
    record: ServiceRecord | None = None
    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    overrides: dict[str, Override] = field(default_factory=dict)
    policy: Policy | None = None
    peer_authentication: PeerAuthentication | None = None
    authz: AuthzPolicy | None = None


# A service's optional data znodes beside ``policy``: znode name -> decoder.
SERVICE_SECURITY: Mapping[str, Callable[[bytes | None], object]] = MappingProxyType(
    {"peer_authentication": PeerAuthentication.decode, "authz": AuthzPolicy.decode})


class RegistryTree:
    """What the watch has read so far. Methods take raw znode names and payloads.

    ``last_good`` (path -> record) outlives :meth:`reset`, so that a resync after a reconnect
    that finds a bad payload still keeps the record served before. ``bad`` holds the paths whose
    current payload is refused; ``on_bad`` is called once per (path, mzxid).

    ``tables`` holds the side tables: kind (``config``, ``vip``, ``alert``) -> namespace -> the znodes seen
    (service name -> last good record, None while the znode never had a good payload).
    """

    TABLES: Mapping[str, Callable[[bytes | None], object]] = MappingProxyType(
        {"config": RuntimeValues.decode, "vip": VipRecord.decode, "alert": AlertRule.decode})

    def __init__(self, on_bad: BadZnodeHook | None = None) -> None:
        self._on_bad = on_bad
        self._logged: dict[str, int] = {}  # path -> mzxid of the payload last refused
        self.last_good: dict[str, object] = {}
        self.bad: set[str] = set()
        self.namespaces: dict[str, dict[str, _ServiceNode]] = {}
        self.tables: dict[str, dict[str, dict[str, object | None]]] = {k: {} for k in self.TABLES}
        self.peer_authentication: dict[str, PeerAuthentication] = {}  # namespace -> its own record

    def reset(self) -> None:
        """Forget the tree (a full re-read follows); keep last good records and log memory."""
        self.namespaces = {}
        self.tables = {k: {} for k in self.TABLES}
        self.peer_authentication = {}
        self.bad = set()

    # -- refusals

    def _refuse(self, kind: str, path: str, mzxid: int, reason: str) -> None:
        self.bad.add(path)
        if self._logged.get(path) == mzxid:
            return
        self._logged[path] = mzxid
        log.warning("skipping bad %s znode %s (mzxid %#x): %s", kind, path, mzxid, reason)
        if self._on_bad is not None:
            self._on_bad(kind, path, reason)

    def _decode(self, kind: str, path: str, data: bytes | None, mzxid: int, decode: Callable):
        try:
            rec = decode(data)
        except RecordError as exc:
            self._refuse(kind, path, mzxid, str(exc))
            return self.last_good.get(path)
        self.bad.discard(path)
        self._logged.pop(path, None)
        self.last_good[path] = rec
        return rec

    def _prune(self, parent: str, names: list[str]) -> None:
        """Forget what was remembered about children of ``parent`` that no longer exist."""
        present = set(names)
        for p in [p for p in {*self.last_good, *self.bad, *self._logged} if p.startswith(parent + "/")]:
            if p[len(parent) + 1:].partition("/")[0] not in present:
                self._forget(p)

    def _valid_name(self, kind: str, path: str, name: str, check: Callable[[str], object]) -> bool:
        try:
            check(name)
        except RecordError as exc:
            self._refuse(kind, path, 0, str(exc))
            return False
        return True

    # -- namespaces and services (children lists)

    def set_namespaces(self, root: str, names: list[str]) -> list[str]:
        """Replace the namespace list; returns the names that are new (to be read)."""
        names = [n for n in names if not is_reserved_root_child(n)]
        ok = {n for n in names if self._valid_name("namespace", f"{root}/{n}", n,
                                                     lambda v: validate_name("namespace", v))}
        for gone in set(self.namespaces) - ok:
            del self.namespaces[gone]
            for table in self.tables.values():
                table.pop(gone, None)
            self.peer_authentication.pop(gone, None)
        self._prune(root, names)
        new = sorted(ok - set(self.namespaces))
        for n in new:
            self.namespaces[n] = {}
            for table in self.tables.values():
                table[n] = {}
        return new

    def set_services(self, ns: str, services_path: str, names: list[str]) -> list[str]:
        """Replace the service list of ``ns``; returns the new names (to be read)."""
        svcs = self.namespaces.get(ns)
        if svcs is None:
            return []
        return self._replace_children("service", services_path, names, svcs, _ServiceNode)

    def _replace_children(self, kind: str, parent: str, names: list[str], entries: dict,
                          make: Callable[[], object]) -> list[str]:
        """Keep the ``entries`` named in ``names`` (service names; others are refused as
        ``kind``), add the new ones as ``make()``; returns the new names, to be read."""
        ok = {n for n in names if self._valid_name(kind, f"{parent}/{n}", n,
                                                     lambda v: validate_name("service", v))}
        for gone in set(entries) - ok:
            del entries[gone]
        self._prune(parent, names)
        new = sorted(ok - set(entries))
        for n in new:
            entries[n] = make()
        return new

    def _service(self, ns: str, svc: str) -> _ServiceNode | None:
        return self.namespaces.get(ns, {}).get(svc)

    def set_service_data(self, ns: str, svc: str, path: str, data: bytes | None, mzxid: int) -> None:
        node = self._service(ns, svc)
        if node is not None:
            node.record = self._decode("service", path, data, mzxid, ServiceRecord.decode)

    def set_policy(self, ns: str, svc: str, path: str, data: bytes | None, mzxid: int) -> None:
        """The service's traffic policy; None (no znode) means the defaults. An invalid policy
        is refused, counted and logged once, and the last valid one stays."""
        node = self._service(ns, svc)
        if node is None:
            return
        if data is None:
            node.policy = None
            self._forget(path)
            return
        node.policy = self._decode("policy", path, data, mzxid, _decode_policy)

    def set_service_security(self, kind: str, ns: str, svc: str, path: str, data: bytes | None,
                             mzxid: int) -> None:
        """The service's ``peer_authentication`` or ``authz`` (``kind``); None: no znode. Refused,
        counted and logged once when invalid; the last valid one stays."""
        node = self._service(ns, svc)
        if node is None:
            return
        if data is None:
            rec = None
            self._forget(path)
        else:
            rec = self._decode(kind, path, data, mzxid, SERVICE_SECURITY[kind])
        setattr(node, kind, rec)

    def set_namespace_peer_authentication(self, ns: str, path: str, data: bytes | None, mzxid: int) -> None:
        """``<ns>/peer_authentication``; None: no znode (services default to PERMISSIVE)."""
        if ns not in self.namespaces:
            return
        rec = None
        if data is None:
            self._forget(path)
        else:
            rec = self._decode("peer_authentication", path, data, mzxid, PeerAuthentication.decode)
        if rec is None:
            self.peer_authentication.pop(ns, None)
        else:
            self.peer_authentication[ns] = rec

    # -- side tables: runtime configs (``<ns>/config``) and virtual IPs (``<ns>/vips``)

    def set_table_names(self, kind: str, ns: str, parent: str, names: list[str]) -> list[str]:
        """Replace the znode names of a side table of ``ns`` (empty while its parent is absent);
        returns the new names (to be read). A name that is not a valid service name is refused."""
        table = self.tables[kind].get(ns)
        if table is None:
            return []
        return self._replace_children(kind, parent, names, table, lambda: None)

    def set_table_entry(self, kind: str, ns: str, svc: str, path: str, data: bytes | None, mzxid: int) -> None:
        """A side-table znode's payload: refused, counted and logged once when invalid, and then
        its last good record stays."""
        table = self.tables[kind].get(ns)
        if table is None or svc not in table:  # its name was refused, or it left meanwhile
            return
        table[svc] = self._decode(kind, path, data, mzxid, self.TABLES[kind])

    def remove_table_entry(self, kind: str, ns: str, svc: str, path: str) -> None:
        table = self.tables[kind].get(ns)
        if table is not None:
            table.pop(svc, None)
        self._forget(path)

    # -- instances and overrides (children lists + payloads)

    def _entries(self, ns: str, svc: str, kind: str) -> dict | None:
        node = self._service(ns, svc)
        if node is None:
            return None
        return node.instances if kind == "instance" else node.overrides

    def set_keys(self, kind: str, ns: str, svc: str, parent: str, keys: list[str]) -> list[str]:
        """Replace the instance or override keys of a service; returns the keys to read: new
        ones (and refused ones that are not in the tree, which costs a harmless re-read)."""
        entries = self._entries(ns, svc, kind)
        if entries is None:
            return []
        ok = {k for k in keys if self._valid_name(kind, f"{parent}/{k}", k, parse_endpoint_key)}
        new = sorted(ok - set(entries))
        for gone in set(entries) - ok:
            del entries[gone]
        self._prune(parent, keys)
        return new

    def set_entry(self, kind: str, ns: str, svc: str, key: str, path: str,
                  data: bytes | None, mzxid: int) -> None:
        entries = self._entries(ns, svc, kind)
        if entries is None:
            return
        if kind == "instance":
            rec = self._decode(kind, path, data, mzxid, _instance_decoder(key))
        else:
            rec = self._decode(kind, path, data, mzxid, Override.decode)
        if rec is None:
            entries.pop(key, None)
        else:
            entries[key] = rec

    def remove_entry(self, kind: str, ns: str, svc: str, key: str, path: str) -> None:
        entries = self._entries(ns, svc, kind)
        if entries is not None:
            entries.pop(key, None)
        self._forget(path)

    def _forget(self, path: str) -> None:
        """A znode is gone: drop its last good record and its refusal memory."""
        self.last_good.pop(path, None)
        self.bad.discard(path)
        self._logged.pop(path, None)

    # -- building

    def build(self, version: int) -> RegistrySnapshot:
        out: dict[str, Mapping[str, ServiceSnapshot]] = {}
        for ns, svcs in self.namespaces.items():
            built = {}
            for name, node in svcs.items():
                if node.record is None:  # never had a good record: nothing to serve
                    continue
                built[name] = ServiceSnapshot(name=name, namespace=ns, record=node.record,
                                              instances=_freeze(node.instances),
                                              overrides=_freeze(node.overrides),
                                              policy=node.policy or DEFAULT_POLICY,
                                              peer_authentication=node.peer_authentication,
                                              authz=node.authz)
            out[ns] = _freeze(built)
        configs = self._built_table("config", lambda rec: rec)
        vips = self._built_table("vip", lambda rec: rec.address)
        alerts = self._built_table("alert", lambda rec: rec)
        return RegistrySnapshot(version=version, namespaces=_freeze(out), configs=configs, vips=vips,
                                alerts=alerts, peer_authentication=_freeze(self.peer_authentication))

    def _built_table(self, kind: str, value: Callable[[object], object]) -> Mapping:
        """namespace -> service -> value of the good records; namespaces without one left out."""
        return _freeze({ns: _freeze(good) for ns, entries in self.tables[kind].items()
                        if (good := {svc: value(rec) for svc, rec in entries.items() if rec is not None})})


def _instance_decoder(key: str) -> Callable[[bytes | None], InstanceRecord]:
    def decode(data: bytes | None) -> InstanceRecord:
        rec = InstanceRecord.decode(data)
        if rec.key != key:
            raise RecordError(f"instance {key!r}: record says {rec.key!r}; the znode is named by "
                              "the address and port callers dial")
        return rec
    return decode


def _decode_policy(data: bytes | None) -> Policy:
    try:
        return decode_policy(data)
    except PolicyError as exc:
        raise RecordError(str(exc)) from None
