"""Virtual IPs against a real ZooKeeper: two replicas allocating at once never collide and agree,
a VIP stays while its service exists and is released only once the service znode is gone
(controlplane.vips)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator

import pytest
from envoy.extensions.filters.udp.dns_filter.v3 import dns_filter_pb2
from kazoo.client import KazooClient

from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from controlplane.vips import VipAllocator, candidates, parse_cidr
from controlplane.zkstore import ZkStore
from meshkeeper import xds
from meshkeeper.registry import (
    VIP_CLAIMS,
    InstanceRecord,
    Paths,
    ServiceRecord,
    VipClaim,
    VipRecord,
    vip_claim,
)
from meshkeeper.xds import NodeInfo
from tests.harness import wait_until
from tests.harness.ads import AdsStream, unpack

pytestmark = pytest.mark.integration

# Ranges of their own per test, apart from the default one other tests of the session use.
CIDR = parse_cidr("240.241.7.0/24")
CIDR_SKIP = parse_cidr("240.241.8.0/24")
CIDR_REPAIR = parse_cidr("240.241.9.0/24")


@pytest.fixture
def clients(zk_server) -> Iterator[list[KazooClient]]:
    out = []
    try:
        for _ in range(2):
            c = KazooClient(hosts=zk_server.hosts, timeout=5.0)
            c.start(timeout=10)
            out.append(c)
        yield out
    finally:
        for c in out:
            c.stop()
            c.close()


def snapshot(ns: str, services: list[str], vips: dict[str, str] | None = None) -> RegistrySnapshot:
    svcs = {s: ServiceSnapshot(name=s, namespace=ns, record=ServiceRecord()) for s in services}
    return RegistrySnapshot(version=1, namespaces={ns: svcs}, vips={ns: vips or {}})


def records(client: KazooClient, ns: str) -> dict[str, str]:
    paths = Paths(ns)
    if not client.exists(paths.vips):
        return {}
    return {svc: VipRecord.decode(client.get(paths.vip(svc))[0]).address for svc in client.get_children(paths.vips)}


def test_two_replicas_allocating_at_once_give_each_service_one_address_of_its_own(clients, namespace):
    services = [f"svc-{i}" for i in range(60)]
    for c in clients[:1]:
        for s in services:
            c.create(Paths(namespace).service(s), ServiceRecord().encode(), makepath=True)

    async def both() -> None:
        allocators = [VipAllocator(ZkStore(c), CIDR) for c in clients]
        snap = snapshot(namespace, services)
        await asyncio.gather(*(a.reconcile(snap) for a in allocators))
        assert sum(a.allocated for a in allocators) == len(services)  # no service allocated twice

    asyncio.run(both())
    got = records(clients[1], namespace)
    assert sorted(got) == sorted(services)
    assert len(set(got.values())) == len(services)  # no address shared
    assert all(ipaddress.IPv4Address(a) in CIDR for a in got.values())
    for svc, address in got.items():  # every record has its claim, naming it
        assert VipClaim.decode(clients[0].get(vip_claim(address))[0]) == VipClaim(namespace, svc)


def test_the_first_candidate_is_the_same_everywhere_and_a_taken_one_is_skipped(clients, namespace):
    first = next(candidates(CIDR_SKIP, namespace, "catalog"))
    assert first == next(candidates(CIDR_SKIP, namespace, "catalog"))
    c = clients[0]
    c.ensure_path(VIP_CLAIMS)
    c.create(vip_claim(first), VipClaim(namespace, "someone-else").encode())
    try:
        c.create(Paths(namespace).service("catalog"), ServiceRecord().encode(), makepath=True)
        asyncio.run(VipAllocator(ZkStore(c), CIDR_SKIP).reconcile(snapshot(namespace, ["catalog"])))
        got = records(c, namespace)["catalog"]
        assert got != first and got == list(candidates(CIDR_SKIP, namespace, "catalog"))[1]
    finally:
        c.delete(vip_claim(first))


def test_a_vip_is_released_only_when_the_service_znode_is_gone(clients, namespace):
    c = clients[0]
    paths = Paths(namespace)
    for s in ("catalog", "billing"):
        c.create(paths.service(s), ServiceRecord().encode(), makepath=True)

    async def run() -> None:
        alloc = VipAllocator(ZkStore(c), CIDR)
        await alloc.reconcile(snapshot(namespace, ["catalog", "billing"]))
        vips = records(c, namespace)
        # a replica whose snapshot lacks billing while ZooKeeper still has it releases nothing
        await alloc.reconcile(snapshot(namespace, ["catalog"], vips))
        assert records(c, namespace) == vips and alloc.released == 0
        # billing deleted: its record and its claim go; catalog keeps its address
        c.delete(paths.service("billing"), recursive=True)
        await alloc.reconcile(snapshot(namespace, ["catalog"], vips))
        assert records(c, namespace) == {"catalog": vips["catalog"]}
        assert not c.exists(vip_claim(vips["billing"]))
        assert alloc.released == 1
        # the same snapshot again (the watch not caught up yet) changes nothing more
        await alloc.reconcile(snapshot(namespace, ["catalog"], vips))
        assert alloc.released == 1

    asyncio.run(run())


def test_the_control_plane_allocates_vips_and_sends_them_to_redirect_mode_sidecars(zk_server, zk_client, namespace,
                                                                                     procs):
    """A real control plane: a new service gets a VIP in ZooKeeper, a redirect-mode ADS client gets
    it in its DNS table and VIP filter chain, and deleting the service releases it."""
    paths = Paths(namespace)
    zk_client.create(paths.service("catalog"), b'{"protocol": "http"}', makepath=True)
    zk_client.create(paths.instance("catalog", "10.9.0.2:8080"),
                     InstanceRecord("10.9.0.2", 8080, app_port=8080).encode(), makepath=True)
    cp = procs.controlplane(zk_server.hosts)
    wait_until(lambda: records(zk_client, namespace).get("catalog"), 10, message="catalog's VIP allocated")
    vip = records(zk_client, namespace)["catalog"]
    assert ipaddress.IPv4Address(vip) in ipaddress.IPv4Network("240.240.0.0/16")

    node = NodeInfo(node_id=NodeInfo.make_id("10.9.0.3", "web", 15006, namespace), service="web",
                    namespace=namespace, app_port=8080, inbound_port=15006, outbound_port=15001,
                    interception="redirect")
    stream = AdsStream(cp.port("xds_port"), node)
    try:
        def table() -> dict[str, list[str]]:
            lds = unpack(stream.fetch(xds.LISTENER))
            if xds.DNS_LISTENER not in lds:
                return {}
            config = dns_filter_pb2.DnsFilterConfig()
            assert lds[xds.DNS_LISTENER].listener_filters[0].typed_config.Unpack(config)
            return {d.name: list(d.endpoint.address_list.address)
                    for d in config.server_config.inline_dns_table.virtual_domains}
        got = wait_until(lambda: table() or None, 10, message="the DNS table over LDS")
        assert got == {"catalog": [vip], f"catalog.{namespace}": [vip]}
        lds = unpack(stream.fetch(xds.LISTENER))
        chains = {c.name: c for c in lds[xds.VIRTUAL_OUTBOUND_LISTENER].filter_chains}
        assert chains[f"catalog.{namespace}|vip"].filter_chain_match.prefix_ranges[0].address_prefix == vip
        assert f"catalog.{namespace}|10.9.0.2:8080" in chains
    finally:
        stream.close()
    # the VIP stays while instances come and go, and goes with the service
    zk_client.delete(paths.service("catalog"), recursive=True)
    wait_until(lambda: "catalog" not in records(zk_client, namespace), 10, message="catalog's VIP released")
    assert not zk_client.exists(vip_claim(vip))


def test_a_record_that_lost_its_claim_gets_it_back_and_a_taken_one_is_counted(clients, namespace):
    c = clients[0]
    paths = Paths(namespace)
    for svc in ("catalog", "billing"):
        c.create(paths.service(svc), ServiceRecord().encode(), makepath=True)
    changes: list[str] = []

    async def run() -> None:
        await VipAllocator(ZkStore(c), CIDR_REPAIR).reconcile(snapshot(namespace, ["catalog", "billing"]))
        vips = records(c, namespace)
        c.delete(vip_claim(vips["catalog"]))  # by hand
        c.set(vip_claim(vips["billing"]), VipClaim(namespace, "someone-else").encode())
        fresh = VipAllocator(ZkStore(c), CIDR_REPAIR, on_change=lambda action, *_: changes.append(action))
        await fresh.reconcile(snapshot(namespace, ["catalog", "billing"], vips))
        assert VipClaim.decode(c.get(vip_claim(vips["catalog"]))[0]) == VipClaim(namespace, "catalog")
        assert changes == ["conflict"] and fresh.failures == 1

    asyncio.run(run())


def test_a_service_no_allocation_can_help_is_not_retried_every_snapshot(clients, namespace):
    c = clients[0]
    paths = Paths(namespace)
    c.create(paths.service("catalog"), ServiceRecord().encode(), makepath=True)
    c.create(paths.vip("catalog"), b'{"address": "not an ip"}', makepath=True)  # bad: the snapshot shows none

    class Counting(ZkStore):
        reads = 0

        async def children(self, path):
            Counting.reads += 1
            return await super().children(path)

    async def run() -> None:
        alloc = VipAllocator(Counting(c), CIDR_REPAIR)
        await alloc.reconcile(snapshot(namespace, ["catalog"]))
        first = Counting.reads
        for _ in range(3):  # the same snapshot again and again: no more reads of every claim
            await alloc.reconcile(snapshot(namespace, ["catalog"]))
        assert Counting.reads == first
        assert records_raw(c, namespace) == {"catalog": b'{"address": "not an ip"}'}  # left as it was

    asyncio.run(run())


def records_raw(client: KazooClient, ns: str) -> dict[str, bytes]:
    paths = Paths(ns)
    return {svc: client.get(paths.vip(svc))[0] for svc in client.get_children(paths.vips)}
