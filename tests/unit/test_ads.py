"""SotW ADS protocol semantics over a real in-process grpc.aio server and client stream."""

from __future__ import annotations

import asyncio
from types import MappingProxyType

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.runtime.v3 import rtds_pb2
from google.protobuf import json_format, struct_pb2, symbol_database

from controlplane.ads import SERVER_OPTIONS, AdsServer, add_to_server
from controlplane.cache import SnapshotCache
from controlplane.metrics import Metrics
from controlplane.proxies import ProxyRegistry
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from meshkeeper import xds
from meshkeeper.registry import InstanceRecord, Override, RuntimeValues, ServiceRecord
from meshkeeper.xds import NodeInfo
from tests.support.ads_streams import SotwClient

NODE_INFO = NodeInfo(node_id=NodeInfo.make_id("127.0.0.1", "web", 15006, "default"), service="web",
                     app_port=8080, inbound_port=15006, outbound_port=15001)


def registry(version: int, *instances: tuple[str, str], overrides: dict | None = None,
             extra_service: bool = False, configs: dict[str, dict[str, str]] | None = None) -> RegistrySnapshot:
    """catalog with (host, version-label) instances; optionally a second service and runtime
    configs (service -> values) in ``default``."""
    recs = {f"{h}:15006": InstanceRecord(address=h, port=15006, labels={"version": v} if v else {})
            for h, v in instances}
    svcs = {"catalog": ServiceSnapshot("catalog", "default", ServiceRecord(), MappingProxyType(recs),
                                       MappingProxyType(dict(overrides or {})))}
    if extra_service:
        svcs["search"] = ServiceSnapshot("search", "default", ServiceRecord(), MappingProxyType({}))
    cfg = {"default": MappingProxyType({k: RuntimeValues(v) for k, v in configs.items()})} if configs else {}
    return RegistrySnapshot(version, MappingProxyType({"default": MappingProxyType(svcs)}), MappingProxyType(cfg))


def node_proto(info: NodeInfo | None = NODE_INFO) -> base_pb2.Node:
    if info is None:
        return base_pb2.Node(id="proxyless-1")
    md = struct_pb2.Struct()
    md.update(info.metadata())
    return base_pb2.Node(id=info.node_id, cluster=info.service, metadata=md)


class Env:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.cache = SnapshotCache(self.metrics)
        self.proxies = ProxyRegistry(self.metrics)

    async def __aenter__(self) -> Env:
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        add_to_server(self.server, AdsServer(self.cache, self.proxies))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.server.stop(None)

    def client(self) -> SotwClient:
        return SotwClient(self.channel)

    def sample(self, name: str, type_: str) -> float:
        return self.metrics.registry.get_sample_value(name, {"type": type_}) or 0

    async def until(self, cond, within: float = 3.0):
        deadline = asyncio.get_running_loop().time() + within
        while not (got := cond()):
            assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
            await asyncio.sleep(0.005)
        return got


def names_of(resp: discovery_pb2.DiscoveryResponse) -> list[str]:
    """Resource names of a response, in the order sent."""
    cls = symbol_database.Default().GetSymbol(resp.type_url.rpartition("/")[2])
    out = []
    for a in resp.resources:
        msg = cls()
        assert a.Unpack(msg)
        out.append(msg.cluster_name if resp.type_url == xds.ENDPOINT else msg.name)
    return out


def run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------- tests


def test_nothing_is_sent_before_the_first_snapshot_then_ack_is_recorded():
    async def main():
        async with Env() as env:
            c = env.client()
            c.send(xds.CLUSTER, node=node_proto())
            await c.nothing()
            await env.until(lambda: len(env.proxies) == 1)
            env.cache.set_snapshot(registry(1, ("10.0.0.1", "v1")))
            resp = await c.recv()
            assert resp.type_url == xds.CLUSTER and resp.nonce
            assert sorted(names_of(resp)) == ["BlackHoleCluster", "PassthroughCluster", "inbound|8080",
                                              "outbound|catalog.default", "outbound|catalog.default|v1"]
            c.ack(resp)
            await env.until(lambda: env.sample("meshkeeper_xds_acks_total", "CDS") == 1)
            [p] = env.proxies.to_json()
            assert p["node_id"] == NODE_INFO.node_id and p["service"] == "web" and p["namespace"] == "default"
            assert p["types"]["CDS"]["version_sent"] == resp.version_info
            assert p["types"]["CDS"]["version_acked"] == resp.version_info
            assert p["types"]["CDS"]["nack"] is None
            assert env.metrics.registry.get_sample_value(
                "meshkeeper_xds_push_ack_latency_seconds_count", {"type": "CDS"}) == 1
            assert env.sample("meshkeeper_xds_pushes_total", "CDS") == 1
            await c.close()
            await env.until(lambda: len(env.proxies) == 0)
            assert env.metrics.registry.get_sample_value("meshkeeper_xds_connected_proxies") == 0
    run(main())


def test_nack_is_recorded_and_the_refused_version_not_resent():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(registry(1, ("10.0.0.1", "")))
            c = env.client()
            c.send(xds.LISTENER, node=node_proto())
            resp = await c.recv()
            c.send(xds.LISTENER, version="", nonce=resp.nonce, error="listener inbound: unsupported filter")
            await env.until(lambda: env.sample("meshkeeper_xds_nacks_total", "LDS") == 1)
            lds = env.proxies.to_json()[0]["types"]["LDS"]
            assert lds["nack"]["error"] == "listener inbound: unsupported filter"
            assert lds["nack"]["version"] == resp.version_info
            assert lds["nack"]["at"] and lds["version_acked"] == ""
            assert env.sample("meshkeeper_xds_acks_total", "LDS") == 0
            await c.nothing()  # the same version is not pushed again
            env.cache.set_snapshot(registry(2, ("10.0.0.1", "")))  # listeners unchanged
            await c.nothing()
            await c.close()
    run(main())


def test_unchanged_version_is_not_pushed_and_changes_are_pushed_in_order():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(registry(1, ("10.0.0.1", "v1")))
            c = env.client()
            c.send(xds.CLUSTER, node=node_proto())
            cds = await c.recv()
            c.ack(cds)
            eds_names = ["outbound|catalog.default", "outbound|catalog.default|v1"]
            c.send(xds.ENDPOINT, eds_names)
            eds = await c.recv()
            c.ack(eds, eds_names)
            c.send(xds.LISTENER)
            lds = await c.recv()
            c.ack(lds)
            c.send(xds.ROUTE, ["outbound"])
            rds = await c.recv()
            c.ack(rds, ["outbound"])
            await env.until(lambda: env.sample("meshkeeper_xds_acks_total", "RDS") == 1)

            env.cache.set_snapshot(registry(2, ("10.0.0.1", "v1")))  # same content, new number
            await c.nothing()

            # a new service (CDS, RDS) and a new endpoint of a subscribed cluster (EDS)
            env.cache.set_snapshot(registry(3, ("10.0.0.1", "v1"), ("10.0.0.2", "v1"), extra_service=True))
            got = [await c.recv() for _ in range(3)]
            assert [r.type_url for r in got] == [xds.CLUSTER, xds.ENDPOINT, xds.ROUTE]  # LDS unchanged
            assert "outbound|search.default" in names_of(got[0])
            assert got[0].version_info != cds.version_info
            for r, names in zip(got, ([], eds_names, ["outbound"]), strict=True):
                c.ack(r, names)
            await c.nothing()

            env.cache.set_snapshot(registry(4, ("10.0.0.1", "v1"), ("10.0.0.2", "v1"), extra_service=True,
                                            overrides={"10.0.0.1:15006": Override(weight=3)}))
            eds2 = await c.recv()
            assert eds2.type_url == xds.ENDPOINT
            cla = endpoint_pb2.ClusterLoadAssignment()
            eds2.resources[0].Unpack(cla)
            weights = {e.endpoint.address.socket_address.address: e.load_balancing_weight.value
                       for e in cla.endpoints[0].lb_endpoints}
            assert weights == {"10.0.0.1": 3, "10.0.0.2": 10}
            await c.nothing()
            await c.close()
    run(main())


def test_eds_follows_resource_names_and_wildcard_cds_is_complete():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(registry(1, ("10.0.0.1", "v1"), ("10.0.0.2", "v2")))
            c = env.client()
            c.send(xds.ENDPOINT, ["outbound|catalog.default|v2", "outbound|nope.default"], node=node_proto())
            eds = await c.recv()
            assert names_of(eds) == ["outbound|catalog.default|v2"]
            more = ["outbound|catalog.default|v1", "outbound|catalog.default|v2"]
            c.ack(eds, more)  # an ACK that also widens the subscription
            eds2 = await c.recv()
            assert names_of(eds2) == more
            c.ack(eds2, more)
            c.ack(eds2, ["outbound|catalog.default|v1", "outbound|catalog.default|v2", "outbound|nope.default"])
            await c.nothing()  # a name we do not have changes nothing
            c.send(xds.CLUSTER, [])
            cds = await c.recv()
            assert sorted(names_of(cds)) == ["BlackHoleCluster", "PassthroughCluster", "inbound|8080",
                                             "outbound|catalog.default", "outbound|catalog.default|v1",
                                             "outbound|catalog.default|v2"]
            await c.close()
    run(main())


def test_stale_nonce_is_ignored():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(registry(1, ("10.0.0.1", "")))
            c = env.client()
            c.send(xds.CLUSTER, node=node_proto())
            first = await c.recv()
            c.send(xds.CLUSTER, version="old", nonce="999")
            await c.nothing()
            assert env.sample("meshkeeper_xds_acks_total", "CDS") == 0
            assert env.sample("meshkeeper_xds_nacks_total", "CDS") == 0
            c.ack(first)
            await env.until(lambda: env.sample("meshkeeper_xds_acks_total", "CDS") == 1)
            await c.close()
    run(main())


def test_proxyless_node_is_served_by_resource_name():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(registry(1, ("10.0.0.1", "")))
            c = env.client()
            # grpcio asks for the listener named as its target, then walks RDS, CDS, EDS by name.
            c.send(xds.LISTENER, ["catalog.default:50051", "nosuch.default"], node=node_proto(None))
            assert names_of(await c.recv()) == ["catalog.default:50051"]
            c.send(xds.ROUTE, ["catalog.default:50051"])
            assert names_of(await c.recv()) == ["catalog.default:50051"]
            c.send(xds.CLUSTER, ["outbound|catalog.default"])
            assert names_of(await c.recv()) == ["outbound|catalog.default"]
            c.send(xds.ENDPOINT, ["outbound|catalog.default"])
            eds = await c.recv()
            cla = endpoint_pb2.ClusterLoadAssignment()
            assert eds.resources[0].Unpack(cla)
            assert [loc.locality.sub_zone for loc in cla.endpoints] == ["10.0.0.1:15006"]
            assert env.proxies.to_json()[0]["proxyless"] is True
            await c.close()
    run(main())


def test_first_request_without_node_is_refused():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(registry(1))
            c = env.client()
            c.send(xds.CLUSTER)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.reader
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(env.proxies) == 0
    run(main())


def test_bad_node_metadata_is_refused():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(registry(1))
            c = env.client()
            node = node_proto()
            node.metadata.fields["inbound_port"].number_value = 70000
            c.send(xds.CLUSTER, node=node)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.reader
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    run(main())


def runtime_layers(resp: discovery_pb2.DiscoveryResponse) -> dict[str, dict]:
    out = {}
    for a in resp.resources:
        rt = rtds_pb2.Runtime()
        assert a.Unpack(rt)
        out[rt.name] = json_format.MessageToDict(rt.layer)
    return out


def test_rtds_subscription_to_a_missing_name_is_answered_empty_then_gets_the_resource():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(registry(1, ("10.0.0.1", "")))
            c = env.client()
            c.send(xds.RUNTIME, ["web"], node=node_proto())  # web has neither a service nor a config
            empty = await c.recv()
            assert empty.type_url == xds.RUNTIME and list(empty.resources) == []
            c.ack(empty, ["web"])
            await env.until(lambda: env.sample("meshkeeper_xds_acks_total", "RTDS") == 1)
            env.cache.set_snapshot(registry(2, ("10.0.0.1", ""), configs={"catalog": {"a": "b"}}))
            await c.nothing()  # not subscribed to catalog's config
            env.cache.set_snapshot(registry(3, ("10.0.0.1", ""), configs={"catalog": {"a": "b"},
                                                                          "web": {"color": "blue"}}))
            got = await c.recv()
            assert got.type_url == xds.RUNTIME and runtime_layers(got) == {"web": {"color": "blue"}}
            c.ack(got, ["web"])
            env.cache.set_snapshot(registry(4, ("10.0.0.1", ""), configs={"catalog": {"a": "c"},
                                                                          "web": {"color": "blue"}}))
            await c.nothing()  # only catalog's values changed
            env.cache.set_snapshot(registry(5, ("10.0.0.1", ""), configs={"web": {"color": "red"}}))
            got = await c.recv()
            assert runtime_layers(got) == {"web": {"color": "red"}}
            c.ack(got, ["web"])
            env.cache.set_snapshot(registry(6, ("10.0.0.1", "")))  # config deleted, no service: gone
            got = await c.recv()
            assert list(got.resources) == []
            await c.close()
    run(main())


def test_rtds_is_pushed_after_the_other_types():
    async def main():
        async with Env() as env:
            env.cache.set_snapshot(registry(1, ("10.0.0.1", "v1")))
            c = env.client()
            subs = {xds.CLUSTER: [], xds.ENDPOINT: ["outbound|catalog.default"], xds.LISTENER: [],
                    xds.ROUTE: ["outbound"], xds.RUNTIME: ["catalog"]}
            first = True
            for t, names in subs.items():
                c.send(t, names, node=node_proto() if first else None)
                first = False
                resp = await c.recv()
                assert resp.type_url == t
                c.ack(resp, names)
            assert runtime_layers(resp) == {"catalog": {}}  # the service exists: an empty layer
            # a new endpoint (CDS, EDS) and a config for catalog in one snapshot: RTDS goes last
            env.cache.set_snapshot(registry(2, ("10.0.0.1", "v1"), ("10.0.0.2", "v2"),
                                            configs={"catalog": {"k": "v"}}))
            got = [await c.recv() for _ in range(3)]
            assert [r.type_url for r in got] == [xds.CLUSTER, xds.ENDPOINT, xds.RUNTIME]
            assert runtime_layers(got[2]) == {"catalog": {"k": "v"}}
            await c.close()
    run(main())
