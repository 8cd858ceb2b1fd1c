"""Virtual IPs: one stable address per (namespace, service), allocated by the control plane.

The mesh DNS answers a service's names with its VIP, and a sidecar in transparent mode tells which
service an app dialled by the original destination of the connection (DESIGN §10). So a VIP must
be the same on every replica, never shared by two services, and never change while the service
exists. ZooKeeper holds them (:mod:`meshkeeper.registry`):

* ``/meshkeeper/_vips/<ip>`` -- the mesh-wide claim (:class:`VipClaim`): a ``create`` that fails
  when the address is taken is what makes an address collision-free across replicas;
* ``/meshkeeper/<ns>/vips/<svc>`` -- the service's record (:class:`VipRecord`), which the registry
  watch reads into the snapshot like any other znode.

Both are created in one ZooKeeper transaction, so neither exists without the other.

Allocation has no leader. After every snapshot, each replica's :class:`VipAllocator` looks for
services without a VIP and tries addresses in an order that depends only on the service's name
(a hash of ``<ns>/<svc>`` into the range, then the next addresses), skipping the claimed ones. Two
replicas racing for one service try the same address first: one transaction wins, the other finds
the record there and stops. A claim naming a service that holds no record is reused for it. A
record left without its claim (the claim deleted by hand) gets its claim back the first time a
control plane reconciles after it starts (then a whole read of the claims is paid once); if another
service holds that address by then, the record is left alone and the conflict logged and counted.

Release: a VIP is released only when its service znode is deleted (instances coming and going
change nothing). Before releasing, the allocator checks in ZooKeeper itself that the service znode
is gone, so a replica with an older snapshot never frees the VIP of a service that exists.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
from collections.abc import Callable, Iterator
from typing import Any

from kazoo.exceptions import NodeExistsError

from controlplane.snapshot import RegistrySnapshot
from controlplane.zkstore import Unavailable, ZkStore
from meshkeeper.registry import VIP_CLAIMS, Paths, RecordError, VipClaim, VipRecord, vip_claim

log = logging.getLogger("meshkeeper.controlplane.vips")

DEFAULT_VIP_CIDR = "240.240.0.0/16"  # class E: never routed, so a VIP never shadows a real host
RETRY_DELAY = 1.0  # seconds before a reconcile that met an unavailable ZooKeeper runs again


def parse_cidr(text: str) -> ipaddress.IPv4Network:
    """``--vip-cidr``: an IPv4 network of at least 4 addresses."""
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"--vip-cidr {text!r}: {exc}") from None
    if net.num_addresses < 4:
        raise ValueError(f"--vip-cidr {text!r}: too small, at least a /30")
    return net


def candidates(net: ipaddress.IPv4Network, namespace: str, service: str) -> Iterator[str]:
    """The addresses a service tries, in order: the same on every replica. Skips the network and
    broadcast addresses."""
    size = net.num_addresses - 2
    start = int.from_bytes(hashlib.sha256(f"{namespace}/{service}".encode()).digest()[:8], "big") % size
    base = int(net.network_address) + 1
    for i in range(size):
        yield str(ipaddress.IPv4Address(base + (start + i) % size))


class VipAllocator:
    """Allocates and releases VIPs after each snapshot (:meth:`on_snapshot`, on the loop).

    Reconciles run one at a time; a snapshot that arrives meanwhile is reconciled next (only the
    newest). ``on_error`` counts failures (for metrics)."""

    def __init__(self, store: ZkStore, cidr: ipaddress.IPv4Network,
                 on_change: Callable[[str, str, str, str], None] | None = None) -> None:
        self.store = store
        self.cidr = cidr
        self._on_change = on_change  # (action, namespace, service, address)
        self._pending: RegistrySnapshot | None = None
        self._repaired = False  # claims of existing records checked (once, at the first reconcile)
        # Services an allocation cannot help (the range is exhausted, or a record exists that the
        # snapshot does not show: a bad payload, counted by the watch). They are not retried, nor the
        # claims read again for them, until they leave the snapshot's list of services without a VIP.
        self._stuck: set[tuple[str, str]] = set()
        self._task: asyncio.Task | None = None
        self._retry: asyncio.TimerHandle | None = None
        self.allocated = 0
        self.released = 0
        self.failures = 0

    def on_snapshot(self, snapshot: RegistrySnapshot) -> None:
        self._pending = snapshot
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while self._pending is not None:
            snapshot, self._pending = self._pending, None
            try:
                await self.reconcile(snapshot)
            except asyncio.CancelledError:
                raise
            except Unavailable as exc:
                self._failed()
                log.warning("virtual IPs: ZooKeeper unavailable (%s); retrying", exc)
                self._schedule_retry(snapshot)
            except Exception:  # never let the allocator die: the next snapshot retries
                self._failed()
                log.exception("virtual IPs: reconcile failed; retrying")
                self._schedule_retry(snapshot)

    def _failed(self) -> None:
        self.failures += 1
        if self._on_change is not None:
            self._on_change("failed", "", "", "")

    def _schedule_retry(self, snapshot: RegistrySnapshot) -> None:
        if self._retry is not None:
            self._retry.cancel()

        def again() -> None:
            self._retry = None
            if self._pending is None:
                self.on_snapshot(snapshot)
        self._retry = asyncio.get_running_loop().call_later(RETRY_DELAY, again)

    async def reconcile(self, snapshot: RegistrySnapshot) -> None:
        """Give every service of ``snapshot`` a VIP and release the VIPs of deleted services."""
        missing = [(ns, svc) for ns, svcs in sorted(snapshot.namespaces.items())
                   for svc in sorted(svcs) if snapshot.vip(ns, svc) is None]
        self._stuck &= set(missing)
        missing = [m for m in missing if m not in self._stuck]
        gone = [(ns, svc, address) for ns, vips in sorted(snapshot.vips.items())
                for svc, address in sorted(vips.items()) if svc not in snapshot.services(ns)]
        if not missing and not gone and self._repaired:
            return
        await self.store.ensure(VIP_CLAIMS)
        claims = await self._claims()
        if not self._repaired:
            await self._repair(snapshot, claims)
            self._repaired = True
        for ns, svc in missing:
            if not await self._allocate(ns, svc, claims):
                self._stuck.add((ns, svc))
        for ns, svc, address in gone:
            await self._release(ns, svc, address)

    async def _repair(self, snapshot: RegistrySnapshot, claims: dict[str, VipClaim | None]) -> None:
        """Give back their claims to records that lost them; count records whose address another
        service claims (the sidecars then see two services on one VIP: the control plane sends
        the first one's chain only)."""
        for ns, vips in sorted(snapshot.vips.items()):
            for svc, address in sorted(vips.items()):
                want = VipClaim(ns, svc)
                claim = claims.get(address, False)
                if claim == want:
                    continue
                if claim is False:
                    results = await self.store.transaction([("create", vip_claim(address), want.encode())])
                    if not any(isinstance(r, Exception) for r in results):
                        claims[address] = want
                        log.warning("virtual IP %s of %s.%s had lost its claim; claimed again", address, svc, ns)
                        continue
                self.failures += 1
                log.error("virtual IP %s of %s.%s is claimed by %s: two services share it; delete the "
                          "record of the wrong one to give it a new address", address, svc, ns, claim)
                if self._on_change is not None:
                    self._on_change("conflict", ns, svc, address)

    async def _claims(self) -> dict[str, VipClaim | None]:
        names = await self.store.children(VIP_CLAIMS) or []
        nodes = await self.store.get_many([vip_claim(n) for n in names])
        out: dict[str, VipClaim | None] = {}
        for name, node in zip(names, nodes, strict=True):
            if node is None:
                continue
            try:
                out[name] = VipClaim.decode(node.data)
            except RecordError:
                out[name] = None  # unreadable: never reused, never deleted by us
        return out

    async def _allocate(self, ns: str, svc: str, claims: dict[str, VipClaim | None]) -> bool:
        """Give ``svc`` a VIP; False when no allocation can (see ``_stuck``)."""
        paths = Paths(ns)
        await self.store.ensure(paths.vips)
        want = VipClaim(ns, svc)
        for address in candidates(self.cidr, ns, svc):
            claim = claims.get(address, False)
            if claim is not False and claim != want:
                continue  # taken by another service (or unreadable)
            record = VipRecord(address).encode()
            ops: list[tuple[str, ...]] = [("create", paths.vip(svc), record)]
            if claim is False:
                ops.insert(0, ("create", vip_claim(address), want.encode()))
            results = await self.store.transaction(ops)
            if not any(isinstance(r, Exception) for r in results):
                claims[address] = want
                self.allocated += 1
                log.info("virtual IP %s allocated to %s.%s", address, svc, ns)
                if self._on_change is not None:
                    self._on_change("allocated", ns, svc, address)
                return True
            record_result = results[-1]
            if isinstance(record_result, NodeExistsError):
                return False  # another replica allocated it meanwhile (the watch brings it), or a bad record
            if claim is False and isinstance(results[0], NodeExistsError):
                claims[address] = None  # claimed meanwhile by someone: look at the next address
                continue
            raise Unavailable(f"allocating a virtual IP for {svc}.{ns}: {_reasons(results)}")
        log.error("virtual IPs: --vip-cidr %s is exhausted; %s.%s has none", self.cidr, svc, ns)
        self._failed()
        return False

    async def _release(self, ns: str, svc: str, address: str) -> None:
        paths = Paths(ns)
        if await self.store.get(paths.service(svc)) is not None:
            return  # the service exists (this replica's snapshot is older than ZooKeeper)
        record = await self.store.get(paths.vip(svc))
        if record is None:
            return
        claim = await self.store.get(vip_claim(address))
        ops: list[tuple[str, ...]] = [("delete", paths.vip(svc), record.version)]
        if claim is not None and _decodes_to(claim.data, VipClaim(ns, svc)):
            ops.append(("delete", vip_claim(address), claim.version))
        results = await self.store.transaction(ops)
        if any(isinstance(r, Exception) for r in results):
            return  # changed meanwhile: the next snapshot looks again
        self.released += 1
        log.info("virtual IP %s of deleted service %s.%s released", address, svc, ns)
        if self._on_change is not None:
            self._on_change("released", ns, svc, address)


def _decodes_to(data: bytes, want: VipClaim) -> bool:
    try:
        return VipClaim.decode(data) == want
    except RecordError:
        return False


def _reasons(results: list[Any]) -> str:
    return ", ".join(type(r).__name__ for r in results if isinstance(r, Exception)) or "refused"
