"""Incremental xDS: the cache's shared views, SotW's partial EDS/RDS responses, and Delta ADS
(``DeltaAggregatedResources``) with Envoy's semantics, over a real in-process grpc.aio server."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import MappingProxyType

import grpc
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2

from controlplane.cache import SERVED_TYPES, SnapshotCache
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from meshkeeper import xds
from meshkeeper.registry import InstanceRecord, Override, ServiceRecord
from tests.support.ads_streams import DeltaClient
from tests.unit.test_ads import NODE_INFO, Env, names_of, node_proto

MAIN = "outbound|svc0.default"


def mesh(version: int, services: int, *, weights: dict[str, int] | None = None, gone: str = "",
         extra: str = "") -> RegistrySnapshot:
    """``services`` services svc0..svcN of two instances (10.<i>.0.1 and .2) each; ``weights``:
    instance key -> override weight (a key of svc0's); ``gone``: a service left out; ``extra``: one more."""
    svcs = {}
    names = [f"svc{i}" for i in range(services)] + ([extra] if extra else [])
    for i, name in enumerate(names):
        if name == gone:
            continue
        recs = {f"10.{i}.0.{h}:8080": InstanceRecord(address=f"10.{i}.0.{h}", port=8080) for h in (1, 2)}
        ovr = {k: Override(weight=w) for k, w in (weights or {}).items()} if name == "svc0" else {}
        svcs[name] = ServiceSnapshot(name, "default", ServiceRecord(), MappingProxyType(recs), MappingProxyType(ovr))
    return RegistrySnapshot(version, MappingProxyType({"default": MappingProxyType(svcs)}))


def eds_names(n: int) -> list[str]:
    return [f"outbound|svc{i}.default" for i in range(n)]


def weights_of(any_msg) -> dict[str, int]:
    cla = endpoint_pb2.ClusterLoadAssignment()
    assert any_msg.Unpack(cla)
    return {e.endpoint.address.socket_address.address: e.load_balancing_weight.value
            for loc in cla.endpoints for e in loc.lb_endpoints}


# --------------------------------------------------------------------------- the cache


def test_a_new_snapshot_translates_only_the_service_that_changed_and_keeps_the_rest_shared():
    cache = SnapshotCache()
    cache.set_snapshot(mesh(1, 50))
    before = {t: cache.layers(NODE_INFO, t) for t in SERVED_TYPES}
    cache.set_snapshot(mesh(2, 50, weights={"10.0.0.1:8080": 5}))
    after = {t: cache.layers(NODE_INFO, t) for t in SERVED_TYPES}
    ns = cache._namespaces["default"]
    assert ns.translated == 1
    # Clusters, routes and listeners did not change: the very same views (no stream is pushed).
    for t in (xds.CLUSTER, xds.LISTENER, xds.ROUTE, xds.RUNTIME):
        assert after[t] == before[t]
    old, new = before[xds.ENDPOINT][0], after[xds.ENDPOINT][0]
    assert new is not old
    changed, removed = new.changes(old)
    assert [r.name for r in changed] == [MAIN] and removed == ()
    assert new.changes(old) is new.changes(old)  # once per pair of views, however many streams ask
    assert new.items["outbound|svc7.default"] is old.items["outbound|svc7.default"]
    assert weights_of(changed[0].any) == {"10.0.0.1": 5, "10.0.0.2": 10}


def test_nodes_of_a_namespace_share_its_views_and_a_removed_service_shows_as_removed():
    cache = SnapshotCache()
    cache.set_snapshot(mesh(1, 5))
    other = replace(NODE_INFO, node_id="sidecar~127.0.0.2~web-15006.default", advertise_host="127.0.0.2")
    assert cache.layers(NODE_INFO, xds.CLUSTER)[0] is cache.layers(other, xds.CLUSTER)[0]
    assert cache.layers(NODE_INFO, xds.LISTENER)[2] is not cache.layers(other, xds.LISTENER)[2]
    old = cache.layers(NODE_INFO, xds.CLUSTER)[0]
    cache.set_snapshot(mesh(2, 5, gone="svc3"))
    changed, removed = cache.layers(NODE_INFO, xds.CLUSTER)[0].changes(old)
    assert changed == () and removed == ("outbound|svc3.default",)


# --------------------------------------------------------------------------- SotW, incrementally


async def sotw_synced(env: Env, services: int):
    """A SotW stream that holds everything (ACKed), and what it received first."""
    c = env.client()
    first = {}
    subs = {xds.CLUSTER: [], xds.ENDPOINT: eds_names(services), xds.LISTENER: [], xds.ROUTE: ["outbound"],
            xds.RUNTIME: ["web"]}
    for i, (t, names) in enumerate(subs.items()):
        c.send(t, names, node=node_proto() if i == 0 else None)
        first[t] = await c.recv()
        c.ack(first[t], names)
    return c, first, subs


@pytest.mark.parametrize("services", [10, 200])
def test_sotw_sends_one_endpoint_change_as_one_resource_whatever_the_mesh_size(services):
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(mesh(1, services))
            c, first, subs = await sotw_synced(env, services)
            assert len(first[xds.ENDPOINT].resources) == services
            env.cache.set_snapshot(mesh(2, services, weights={"10.0.0.1:8080": 3}))
            eds = await c.recv()
            assert eds.type_url == xds.ENDPOINT and names_of(eds) == [MAIN]
            assert weights_of(eds.resources[0]) == {"10.0.0.1": 3, "10.0.0.2": 10}
            assert eds.ByteSize() < 600  # one ClusterLoadAssignment, not the mesh's
            c.ack(eds, subs[xds.ENDPOINT])
            await c.nothing()
            # a new service: CDS is the full set again, EDS has nothing the stream subscribed to
            env.cache.set_snapshot(mesh(3, services, weights={"10.0.0.1:8080": 3}, extra="late"))
            cds = await c.recv()
            assert cds.type_url == xds.CLUSTER and len(cds.resources) == len(first[xds.CLUSTER].resources) + 1
            assert "outbound|late.default" in names_of(cds)
            c.ack(cds)
            rds = await c.recv()  # its virtual host
            assert rds.type_url == xds.ROUTE
            c.ack(rds, ["outbound"])
            await c.nothing()
            await c.close()
    asyncio.run(main())


# --------------------------------------------------------------------------- Delta


def delta_client(env: Env) -> DeltaClient:
    return DeltaClient(env.channel)


def rnames(resp) -> list[str]:
    return sorted(r.name for r in resp.resources)


async def delta_synced(env: Env, services: int, **initial):
    """A Delta stream: wildcard CDS and LDS, EDS for every service, RDS outbound, RTDS web; all ACKed."""
    c = delta_client(env)
    first = {}
    subs = {xds.CLUSTER: ["*"], xds.ENDPOINT: eds_names(services), xds.LISTENER: ["*"], xds.ROUTE: ["outbound"],
            xds.RUNTIME: ["web"]}
    for i, (t, names) in enumerate(subs.items()):
        c.send(t, names, node=node_proto() if i == 0 else None, initial=initial.get(t))
        first[t] = await c.recv()
        assert first[t].type_url == t
        c.ack(first[t])
    return c, first


def test_delta_sends_what_changed_and_names_what_was_removed():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(mesh(1, 20))
            c, first = await delta_synced(env, 20)
            assert len(first[xds.ENDPOINT].resources) == 20
            assert all(r.version for r in first[xds.CLUSTER].resources)
            env.cache.set_snapshot(mesh(2, 20, weights={"10.0.0.2:8080": 4}))
            eds = await c.recv()
            assert eds.type_url == xds.ENDPOINT and rnames(eds) == [MAIN] and not eds.removed_resources
            assert weights_of(eds.resources[0].resource) == {"10.0.0.1": 10, "10.0.0.2": 4}
            c.ack(eds)
            await c.nothing()
            env.cache.set_snapshot(mesh(3, 20, weights={"10.0.0.2:8080": 4}, gone="svc5"))
            cds = await c.recv()
            assert cds.type_url == xds.CLUSTER and list(cds.resources) == []
            assert list(cds.removed_resources) == ["outbound|svc5.default"]
            c.ack(cds)
            got = [await c.recv() for _ in range(2)]
            assert [r.type_url for r in got] == [xds.ENDPOINT, xds.ROUTE]
            assert list(got[0].removed_resources) == ["outbound|svc5.default"]
            assert rnames(got[1]) == ["outbound"]
            for r in got:
                c.ack(r)
            await env.until(lambda: env.sample("meshkeeper_xds_acks_total", "EDS") == 3)
            await c.nothing()
            await c.close()
    asyncio.run(main())


def test_a_delta_reconnect_is_sent_only_what_it_does_not_hold():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(mesh(1, 10))
            c, first = await delta_synced(env, 10)
            held = {t: {r.name: r.version for r in resp.resources} for t, resp in first.items()}
            await c.close()
            # Meanwhile one weight changes and svc9 goes away.
            env.cache.set_snapshot(mesh(2, 10, weights={"10.0.0.1:8080": 2}, gone="svc9"))
            c2, again = await delta_synced(env, 10, **held)
            assert rnames(again[xds.ENDPOINT]) == [MAIN]
            assert list(again[xds.ENDPOINT].removed_resources) == ["outbound|svc9.default"]
            assert list(again[xds.CLUSTER].resources) == []
            assert list(again[xds.CLUSTER].removed_resources) == ["outbound|svc9.default"]
            assert rnames(again[xds.ROUTE]) == ["outbound"]  # without svc9's virtual host
            assert list(again[xds.LISTENER].resources) == [] and list(again[xds.LISTENER].removed_resources) == []
            assert list(again[xds.RUNTIME].resources) == []
            assert list(again[xds.RUNTIME].removed_resources) == ["web"]  # web has no runtime: it does not exist
            await c2.close()
    asyncio.run(main())


def test_delta_subscriptions_follow_subscribe_and_unsubscribe_and_a_late_name_arrives():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(mesh(1, 3))
            c = delta_client(env)
            c.send(xds.ENDPOINT, ["outbound|svc1.default", "outbound|late.default"], node=node_proto())
            eds = await c.recv()
            assert rnames(eds) == ["outbound|svc1.default"]
            assert list(eds.removed_resources) == ["outbound|late.default"]  # it does not exist (yet)
            c.ack(eds, subscribe=["outbound|svc2.default"], unsubscribe=["outbound|svc1.default"])
            eds = await c.recv()
            assert rnames(eds) == ["outbound|svc2.default"]
            c.ack(eds)
            env.cache.set_snapshot(mesh(2, 3, weights={"10.0.0.1:8080": 9}))  # svc0: not subscribed
            await c.nothing()
            env.cache.set_snapshot(mesh(3, 3, weights={"10.0.0.1:8080": 9}, extra="late"))
            eds = await c.recv()
            assert rnames(eds) == ["outbound|late.default"]
            await c.close()
    asyncio.run(main())


def test_a_delta_nack_is_counted_and_the_refused_resource_is_not_sent_again_until_it_changes():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(mesh(1, 3))
            c, _ = await delta_synced(env, 3)
            env.cache.set_snapshot(mesh(2, 3, weights={"10.0.0.1:8080": 9}))
            eds = await c.recv()
            c.ack(eds, error="refused for the test")
            await env.until(lambda: env.sample("meshkeeper_xds_nacks_total", "EDS") == 1)
            status = env.proxies.list()[0].types["EDS"]
            assert status.nack is not None and status.nack.error == "refused for the test"
            env.cache.set_snapshot(mesh(3, 3, weights={"10.0.0.1:8080": 9}))  # the same content
            await c.nothing()
            env.cache.set_snapshot(mesh(4, 3, weights={"10.0.0.1:8080": 8}))
            eds = await c.recv()
            assert rnames(eds) == [MAIN]
            await c.close()
    asyncio.run(main())


def test_delta_refuses_a_proxyless_client():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(mesh(1, 1))
            c = delta_client(env)
            c.send(xds.LISTENER, ["svc0.default"], node=node_proto(None))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.reader
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    asyncio.run(main())


@pytest.mark.parametrize("interception", ["none", "redirect"])
def test_delta_and_sotw_serve_the_same_resources_for_every_type(interception):
    node = replace(NODE_INFO, interception=interception)

    async def main():
        async with Env() as env:
            env.cache.set_snapshot(mesh(1, 4))
            sotw, delta = {}, {}
            s = env.client()
            d = delta_client(env)
            subs = {xds.CLUSTER: [], xds.LISTENER: [], xds.ENDPOINT: eds_names(4), xds.ROUTE: ["outbound"],
                    xds.RUNTIME: ["web", "svc1"]}
            for i, (t, names) in enumerate(subs.items()):
                s.send(t, names, node=node_proto(node) if i == 0 else None)
                d.send(t, names or ["*"], node=node_proto(node) if i == 0 else None)
                got = await s.recv()
                sotw[t] = sorted((name, a.value) for name, a in zip(names_of(got), got.resources, strict=True))
                got = await d.recv()
                delta[t] = sorted((r.name, r.resource.value) for r in got.resources)
                assert sotw[t] == delta[t], t
                assert len(sotw[t]) == len({n for n, _ in sotw[t]}), "a name twice"
            assert {n for n, _ in sotw[xds.LISTENER]} >= {"outbound", "inbound"}
            await s.close()
            await d.close()
    asyncio.run(main())


def test_a_delta_request_before_the_first_snapshot_is_answered_once_there_is_one_even_empty():
    async def main():
        async with Env() as env:
            c = delta_client(env)
            c.send(xds.RUNTIME, ["web"], node=node_proto())  # web has no runtime config: nothing to send
            await c.nothing()
            env.cache.set_snapshot(mesh(1, 1))
            got = await c.recv()
            assert got.type_url == xds.RUNTIME and list(got.resources) == [] and got.nonce
            assert list(got.removed_resources) == ["web"]
            await c.close()
    asyncio.run(main())


# --------------------------------------------------------------------------- scoping


SCOPED = replace(NODE_INFO, egress="svc1,svc2")


def vhost_domains(route_any) -> set[str]:
    from envoy.config.route.v3 import route_pb2

    rc = route_pb2.RouteConfiguration()
    assert route_any.Unpack(rc)
    return {vh.name for vh in rc.virtual_hosts}


def test_a_scoped_node_holds_only_the_services_it_declared_and_nodes_with_one_scope_share_views():
    cache = SnapshotCache()
    cache.set_snapshot(mesh(1, 50))
    held = cache.resources(SCOPED)
    assert sorted(n for n in held[xds.CLUSTER] if n.startswith("outbound|")) == [
        "outbound|svc1.default", "outbound|svc2.default"]
    assert sorted(held[xds.ENDPOINT]) == ["outbound|svc1.default", "outbound|svc2.default"]
    assert vhost_domains(held[xds.ROUTE]["outbound"].any) == {"svc1.default", "svc2.default"}
    twin = replace(SCOPED, node_id="sidecar~127.0.0.9~web-15006.default", advertise_host="127.0.0.9")
    assert cache.layers(twin, xds.CLUSTER)[0] is cache.layers(SCOPED, xds.CLUSTER)[0]
    # A weight change elsewhere leaves the scoped views as they were: nothing to push.
    before = {t: cache.layers(SCOPED, t) for t in SERVED_TYPES}
    cache.set_snapshot(mesh(2, 50, weights={"10.0.0.1:8080": 3}))
    assert {t: cache.layers(SCOPED, t) for t in SERVED_TYPES} == before
    # The own service's policy.egress scopes a sidecar that declares nothing ("*").
    from meshkeeper.policy import decode_policy

    snap = mesh(3, 50)
    web = ServiceSnapshot("web", "default", ServiceRecord(), policy=decode_policy({"egress": ["svc7"]}))
    svcs = dict(snap.namespaces["default"]) | {"web": web}
    cache.set_snapshot(RegistrySnapshot(3, MappingProxyType({"default": MappingProxyType(svcs)})))
    assert sorted(cache.resources(NODE_INFO)[xds.ENDPOINT]) == ["outbound|svc7.default"]
    assert len(cache.resources(replace(NODE_INFO, egress="*"))[xds.ENDPOINT]) == 1
    assert len(cache.resources(replace(NODE_INFO, egress="svc1"))[xds.ENDPOINT]) == 1


def test_a_scoped_delta_sidecar_discovers_a_service_on_demand_and_hears_at_once_of_one_that_does_not_exist():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(mesh(1, 30))
            c = delta_client(env)
            c.send(xds.CLUSTER, ["*"], node=node_proto(SCOPED))
            cds = await c.recv()
            assert [n for n in rnames(cds) if n.startswith("outbound|")] == ["outbound|svc1.default",
                                                                            "outbound|svc2.default"]
            c.ack(cds)
            c.send(xds.ROUTE, ["outbound"])
            rds = await c.recv()
            assert vhost_domains(rds.resources[0].resource) == {"svc1.default", "svc2.default"}
            c.ack(rds)
            # A first request for svc9: the sidecar subscribes to its cluster by name.
            c.send(xds.CLUSTER, ["outbound|svc9.default"])
            cds = await c.recv()
            assert rnames(cds) == ["outbound|svc9.default"] and not cds.removed_resources
            c.ack(cds)
            rds = await c.recv()  # its virtual host joins the stream's route configuration
            assert rds.type_url == xds.ROUTE
            assert vhost_domains(rds.resources[0].resource) == {"svc1.default", "svc2.default", "svc9.default"}
            c.ack(rds)
            c.send(xds.ENDPOINT, ["outbound|svc9.default"])
            eds = await c.recv()
            assert rnames(eds) == ["outbound|svc9.default"]
            c.ack(eds)
            # A service that does not exist: said at once.
            c.send(xds.CLUSTER, ["outbound|nosuch.default"])
            cds = await c.recv()
            assert list(cds.resources) == [] and list(cds.removed_resources) == ["outbound|nosuch.default"]
            c.ack(cds)
            await c.nothing()
            # A change to a service outside the scope reaches nobody; to svc9, this stream.
            env.cache.set_snapshot(mesh(2, 30, weights={"10.0.0.1:8080": 3}))
            await c.nothing()
            await c.close()
    asyncio.run(main())


def test_a_scoped_sotw_sidecar_gets_its_declared_services():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(mesh(1, 30))
            c = env.client()
            c.send(xds.CLUSTER, node=node_proto(SCOPED))
            cds = await c.recv()
            assert [n for n in names_of(cds) if n.startswith("outbound|")] == ["outbound|svc1.default",
                                                                              "outbound|svc2.default"]
            await c.close()
    asyncio.run(main())
