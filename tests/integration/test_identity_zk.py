"""Peer authentication and authz znodes in a real ZooKeeper, through the registry watch and the xDS
cache with a mesh identity, seen on a real ADS stream (in-process: the control plane's flags for a
CA are wired elsewhere; this checks the ZooKeeper -> xDS path)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from controlplane.ads import SERVER_OPTIONS, AdsServer, add_to_server
from controlplane.cache import SnapshotCache
from controlplane.metrics import Metrics
from controlplane.proxies import ProxyRegistry
from controlplane.watch import RegistryWatch
from controlplane.zksource import KazooSource
from meshkeeper import xds
from meshkeeper.registry import Paths
from meshkeeper.security import MeshIdentity
from meshkeeper.xds import NodeInfo
from tests.support.ads_streams import SotwClient

pytestmark = pytest.mark.integration

WITHIN = 15.0  # seconds for a write to reach the stream


def node_proto(ns: str) -> base_pb2.Node:
    info = NodeInfo(node_id=NodeInfo.make_id("127.0.0.1", "web", 15006, ns), service="web", namespace=ns,
                    app_port=8080, inbound_port=15006, outbound_port=15001)
    md = struct_pb2.Struct()
    md.update(info.metadata())
    return base_pb2.Node(id=info.node_id, cluster=info.service, metadata=md)


def unpacked(resp: discovery_pb2.DiscoveryResponse, cls) -> dict:
    out = {}
    for a in resp.resources:
        msg = cls()
        assert a.Unpack(msg)
        out[msg.name] = msg
    return out


class Pushes:
    """One SotW stream subscribed to LDS and CDS: every response is acked and kept, latest per type."""

    def __init__(self, client: SotwClient) -> None:
        self.client = client
        self.latest: dict[str, discovery_pb2.DiscoveryResponse] = {}

    async def until(self, type_url: str, cond, what: str) -> discovery_pb2.DiscoveryResponse:
        deadline = asyncio.get_running_loop().time() + WITHIN
        while not ((resp := self.latest.get(type_url)) is not None and cond(resp)):
            left = deadline - asyncio.get_running_loop().time()
            assert left > 0, f"not seen in {WITHIN} s: {what}"
            try:
                got = await self.client.recv(within=left)
            except TimeoutError:
                continue
            self.latest[got.type_url] = got
            self.client.ack(got)
        return resp


def inbound(resp) -> listener_pb2.Listener:
    return unpacked(resp, listener_pb2.Listener)[xds.INBOUND_LISTENER]


def chains(resp) -> list[str]:
    return [c.name for c in inbound(resp).filter_chains]


def http_filters(resp) -> list[str]:
    hcm = hcm_pb2.HttpConnectionManager()
    assert inbound(resp).filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return [f.name for f in hcm.http_filters]


def catalog_tls(resp, ns: str) -> bool:
    return bool(unpacked(resp, cluster_pb2.Cluster)[f"outbound|catalog.{ns}"].transport_socket_matches)


def test_peer_authentication_and_authz_writes_reach_the_sidecars_xds(zk_server, zk_client, namespace):
    paths = Paths(namespace)
    k = zk_client
    k.create(paths.service("catalog"), b'{"protocol": "http"}', makepath=True)
    k.create(paths.instance("catalog", "127.0.0.1:9001"), json.dumps(
        {"address": "127.0.0.1", "port": 9001, "mtls": True}).encode(), makepath=True)
    k.create(paths.service("web"), b'{"protocol": "http"}', makepath=True)

    async def main() -> None:
        metrics = Metrics()
        cache = SnapshotCache(metrics, identity=MeshIdentity("example.org"))
        watch = RegistryWatch(KazooSource(zk_server.hosts), cache.set_snapshot, metrics=metrics, debounce=0.02)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        add_to_server(server, AdsServer(cache, ProxyRegistry(metrics)))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        watch.start()
        client = SotwClient(channel)
        try:
            client.send(xds.LISTENER, node=node_proto(namespace))
            client.send(xds.CLUSTER)
            s = Pushes(client)
            # No znode: PERMISSIVE; catalog (an mtls instance) is reached over mTLS.
            await s.until(xds.LISTENER, lambda r: chains(r) == ["inbound-mtls", "inbound-plaintext"], "PERMISSIVE")
            await s.until(xds.CLUSTER, lambda r: catalog_tls(r, namespace), "tlsMode-mutual on catalog")

            # The namespace goes STRICT: web's inbound listener takes mTLS only.
            k.create(paths.peer_authentication(), b'{"mode": "STRICT"}')
            await s.until(xds.LISTENER, lambda r: chains(r) == ["inbound-mtls"], "STRICT from the namespace")

            # web's own znode wins.
            k.create(paths.peer_authentication("web"), b'{"mode": "DISABLE"}')
            await s.until(xds.LISTENER, lambda r: chains(r) == [""], "DISABLE from the service")

            # An authz znode adds the RBAC filter before the router.
            k.create(paths.authz("web"), json.dumps(
                {"action": "ALLOW", "rules": [{"from": ["ns:" + namespace], "methods": ["GET"]}]}).encode())
            await s.until(xds.LISTENER, lambda r: http_filters(r) == ["envoy.filters.http.rbac", "envoy.filters.http.router"],
                          "RBAC filter")

            # A bad authz is skipped and counted; the last good one stays.
            k.set(paths.authz("web"), b'{"action": "ALLOW", "rules": [{"methods": ["get"]}]}')
            deadline = asyncio.get_running_loop().time() + WITHIN
            while not metrics.registry.get_sample_value("meshkeeper_registry_bad_znodes_total", {"kind": "authz"}):
                assert asyncio.get_running_loop().time() < deadline, "bad authz not counted"
                await asyncio.sleep(0.02)
            assert "envoy.filters.http.rbac" in http_filters(s.latest[xds.LISTENER])

            # catalog's DISABLE: callers stop offering TLS to it.
            k.create(paths.peer_authentication("catalog"), b'{"mode": "DISABLE"}')
            await s.until(xds.CLUSTER, lambda r: not catalog_tls(r, namespace), "catalog DISABLE")

            # Deleting the znodes returns to the defaults.
            k.delete(paths.authz("web"))
            k.delete(paths.peer_authentication("web"))
            k.delete(paths.peer_authentication())
            await s.until(xds.LISTENER, lambda r: chains(r) == ["inbound-mtls", "inbound-plaintext"]
                          and http_filters(r) == ["envoy.filters.http.router"], "back to PERMISSIVE, no RBAC")
            assert cache.snapshot.services(namespace)["catalog"].instances["127.0.0.1:9001"].mtls is True
        finally:
            await client.close()
            await channel.close()
            await server.stop(None)
            await watch.stop()

    asyncio.run(main())
