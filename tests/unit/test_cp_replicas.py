"""Control-plane replicas (DESIGN §13): a sidecar given several ``--cp`` addresses fails over to
the next, and a replica that lost ZooKeeper refuses new streams while serving the ones it has.
Real gRPC on 127.0.0.1."""

from __future__ import annotations

import grpc
import pytest

from controlplane.ads import SERVER_OPTIONS, AdsServer, add_to_server
from controlplane.cache import SnapshotCache
from controlplane.proxies import ProxyRegistry
from meshkeeper import xds
from sidecar.xds.client import TRY_OTHERS, AdsClient, Targets
from sidecar.xds.delta import DeltaAdsClient
from tests.support.ads_streams import DeltaClient
from tests.support.fakes import async_test, until
from tests.unit.test_ads import NODE_INFO, node_proto
from tests.unit.test_ads_delta import mesh


class Replica:
    def __init__(self) -> None:
        self.cache = SnapshotCache()
        self.proxies = ProxyRegistry()
        self.zk_connected = True
        self.ads = AdsServer(self.cache, self.proxies,
                             serving=lambda: self.cache.snapshot is None or self.zk_connected)

    async def start(self) -> str:
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        add_to_server(self.server, self.ads)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.server.stop(None)


class Sink:
    def __init__(self) -> None:
        self.clusters: dict = {}

    def apply_clusters(self, c):
        self.clusters = c

    def apply_endpoints(self, a):
        pass

    def apply_listeners(self, listeners):
        pass

    def apply_routes(self, r):
        pass

    def apply_runtime(self, values, version):
        pass


def test_targets_go_round_in_order_and_know_when_none_is_left_to_try():
    t = Targets("a:1, b:2,c:3")
    assert t.others_left
    t.failed = 2  # two refused in a row: the third is the last of the round
    assert not t.others_left
    assert not Targets("a:1").others_left
    assert [t.current, (t.advance(), t.current)[1], (t.advance(), t.current)[1], (t.advance(), t.current)[1]] == [
        "a:1", "b:2", "c:3", "a:1"]
    with pytest.raises(ValueError):
        Targets(" , ")


@pytest.mark.parametrize("client_class", [AdsClient, DeltaAdsClient])
@async_test
async def test_a_sidecar_fails_over_to_the_next_replica_and_back(client_class):
    a, b = Replica(), Replica()
    for r in (a, b):
        r.cache.set_snapshot(mesh(1, 2))
    ta, tb = await a.start(), await b.start()
    sink = Sink()
    client = client_class(f"{ta},{tb}", NODE_INFO, sink, backoff_base=0.01, backoff_max=0.05)
    client.start()
    try:
        await until(lambda: client.connected and "outbound|svc1.default" in sink.clusters)
        assert client.target == ta and len(a.proxies) == 1
        await a.stop()  # the first replica goes away: the stream moves to the second
        await until(lambda: len(b.proxies) == 1, 5)
        assert client.target == tb
        b.cache.set_snapshot(mesh(2, 3))  # and follows its pushes
        await until(lambda: "outbound|svc2.default" in sink.clusters, 5)
    finally:
        await client.stop()
        await b.stop()


@async_test
async def test_a_replica_that_lost_zookeeper_refuses_new_streams_and_keeps_serving_its_own():
    r = Replica()
    r.cache.set_snapshot(mesh(1, 2))
    target = await r.start()
    channel = grpc.aio.insecure_channel(target)
    try:
        kept = DeltaClient(channel)
        kept.send(xds.CLUSTER, ["*"], node=node_proto())
        first = await kept.recv()
        kept.ack(first)
        r.zk_connected = False
        refused = DeltaClient(channel, TRY_OTHERS)  # a sidecar with other replicas left to try
        refused.send(xds.CLUSTER, ["*"], node=node_proto())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await refused.reader
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "another replica" in err.value.details()
        assert r.ads.refused == 1 and len(r.proxies) == 1
        # One with no other replica (the last of its round, one --cp, Envoy, grpcio): what it last knew.
        last = DeltaClient(channel)
        last.send(xds.CLUSTER, ["*"], node=node_proto())
        assert "outbound|svc1.default" in [res.name for res in (await last.recv()).resources]
        await last.close()
        # The stream it has is still served (what it last knew; here a change it was given).
        r.cache.set_snapshot(mesh(2, 3))
        got = await kept.recv()
        assert "outbound|svc2.default" in [res.name for res in got.resources]
        await kept.close()
    finally:
        await channel.close()
        await r.stop()


@async_test
async def test_a_control_plane_without_its_first_snapshot_takes_streams_and_answers_once_it_has_one():
    r = Replica()
    r.zk_connected = False  # not connected yet at start: streams wait rather than bounce
    target = await r.start()
    channel = grpc.aio.insecure_channel(target)
    try:
        c = DeltaClient(channel)
        c.send(xds.CLUSTER, ["*"], node=node_proto())
        await until(lambda: len(r.proxies) == 1)  # taken, waiting for a snapshot
        r.zk_connected = True
        r.cache.set_snapshot(mesh(1, 1))
        got = await c.recv()
        assert got.type_url == xds.CLUSTER
        await c.close()
    finally:
        await channel.close()
        await r.stop()
