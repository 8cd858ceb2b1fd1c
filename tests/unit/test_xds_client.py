"""The sidecar's ADS client against a scripted in-process ADS server (real gRPC on 127.0.0.1)."""

import asyncio

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from meshkeeper import xds
from meshkeeper.xds import NodeInfo
from sidecar.xds.client import AdsClient
from tests.unit.test_xds_convert import cla, hcm_listener


class Sink:
    def __init__(self):
        self.clusters, self.endpoints, self.listeners, self.routes = {}, {}, {}, {}

    def apply_clusters(self, c):
        self.clusters = c

    def apply_endpoints(self, a):
        self.endpoints.update(a)

    def apply_listeners(self, listeners):
        self.listeners = listeners

    def apply_routes(self, r):
        self.routes.update(r)


class ScriptedAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """Records every request; the test pushes responses into the current stream's queue. Serves
    both ADS variants alike (the responses pushed say which)."""

    def __init__(self):
        self.requests: asyncio.Queue = asyncio.Queue()
        self.streams: asyncio.Queue = asyncio.Queue()

    async def StreamAggregatedResources(self, request_iterator, context):
        async for item in self._serve(request_iterator):
            yield item

    async def DeltaAggregatedResources(self, request_iterator, context):
        async for item in self._serve(request_iterator):
            yield item

    async def _serve(self, request_iterator):
        out: asyncio.Queue = asyncio.Queue()
        await self.streams.put(out)

        async def pump():
            async for req in request_iterator:
                await self.requests.put(req)

        reader = asyncio.ensure_future(pump())
        try:
            while True:
                item = await out.get()
                if item is None:  # end the stream: the client must reconnect
                    return
                yield item
        finally:
            reader.cancel()


def response(type_url, version, nonce, *msgs):
    resp = discovery_pb2.DiscoveryResponse(type_url=type_url, version_info=version, nonce=nonce)
    for m in msgs:
        a = any_pb2.Any()
        a.Pack(m)
        resp.resources.append(a)
    return resp


def eds_cluster(name, lb=cluster_pb2.Cluster.ROUND_ROBIN):
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS, lb_policy=lb)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    return c


async def next_request(server, type_url, timeout=5):
    async with asyncio.timeout(timeout):
        while True:
            req = await server.requests.get()
            if req.type_url == type_url:
                return req


@pytest.fixture
async def ads():
    server = grpc.aio.server()
    servicer = ScriptedAds()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


def node():
    return NodeInfo(node_id="sidecar~127.0.0.1~frontend-1.default", service="frontend", app_port=8080)


async def test_ack_subscribe_nack_and_keep_last_config(ads):
    server, target = ads
    sink = Sink()
    client = AdsClient(target, node(), sink, backoff_base=0.01, backoff_max=0.05)
    client.start()
    try:
        first = await next_request(server, xds.CLUSTER)
        assert first.node.id == "sidecar~127.0.0.1~frontend-1.default"
        assert first.node.metadata.fields["service"].string_value == "frontend"
        assert list(first.resource_names) == [] and first.response_nonce == ""
        stream = await server.streams.get()

        await stream.put(response(xds.CLUSTER, "c1", "n1", eds_cluster("outbound|catalog.default")))
        ack = await next_request(server, xds.CLUSTER)
        assert (ack.version_info, ack.response_nonce, ack.HasField("error_detail")) == ("c1", "n1", False)
        sub = await next_request(server, xds.ENDPOINT)
        assert list(sub.resource_names) == ["outbound|catalog.default"]
        assert set(sink.clusters) == {"outbound|catalog.default"}

        await stream.put(response(xds.ENDPOINT, "e1", "n2", cla("outbound|catalog.default", ("127.0.0.1", 9001, 3, 1))))
        ack = await next_request(server, xds.ENDPOINT)
        assert ack.version_info == "e1"
        assert [e.weight for e in sink.endpoints["outbound|catalog.default"]] == [3]

        await stream.put(response(xds.LISTENER, "l1", "n3", hcm_listener()))
        await next_request(server, xds.LISTENER)
        rds = await next_request(server, xds.ROUTE)
        assert list(rds.resource_names) == ["outbound"]

        # A cluster the sidecar cannot honour: NACK naming it; the old set stays applied.
        await stream.put(response(xds.CLUSTER, "c2", "n4", eds_cluster("outbound|catalog.default", cluster_pb2.Cluster.MAGLEV)))
        nack = await next_request(server, xds.CLUSTER)
        assert nack.response_nonce == "n4" and nack.version_info == "c1"
        assert "MAGLEV" in nack.error_detail.message and "outbound|catalog.default" in nack.error_detail.message
        assert sink.clusters["outbound|catalog.default"].lb_policy == "round_robin"
        assert client.state[xds.CLUSTER].rejected == 1

        # The control plane goes away: the client keeps its config and comes back with its versions.
        await stream.put(None)
        again = await next_request(server, xds.CLUSTER)
        assert again.version_info == "c1" and again.node.id
        eds = await next_request(server, xds.ENDPOINT)
        assert list(eds.resource_names) == ["outbound|catalog.default"]
        assert set(sink.endpoints) == {"outbound|catalog.default"}
    finally:
        await client.stop()


async def test_synced_waits_for_referenced_routes_and_endpoints(ads):
    server, target = ads
    client = AdsClient(target, node(), Sink())
    client.start()
    try:
        await next_request(server, xds.CLUSTER)
        stream = await server.streams.get()
        await stream.put(response(xds.CLUSTER, "1", "a", eds_cluster("outbound|x.default")))
        await stream.put(response(xds.LISTENER, "1", "b", hcm_listener()))
        await next_request(server, xds.ROUTE)
        assert not client.synced
        await stream.put(response(xds.ENDPOINT, "1", "c", cla("outbound|x.default", ("127.0.0.1", 1, 1, 1))))
        await next_request(server, xds.ENDPOINT)
        assert not client.synced  # RDS "outbound" still missing
        from envoy.config.route.v3 import route_pb2
        await stream.put(response(xds.ROUTE, "1", "d", route_pb2.RouteConfiguration(name="outbound")))
        ack = await next_request(server, xds.ROUTE)
        assert ack.response_nonce == "d"
        assert client.synced
    finally:
        await client.stop()


async def test_one_bad_cluster_is_refused_alone_and_the_rest_applies(ads):
    """Envoy / gRFC A46: the valid resources of a NACKed response still apply, so an unsupported
    setting on one service neither freezes the others nor keeps a new sidecar from starting."""
    server, target = ads
    sink = Sink()
    client = AdsClient(target, node(), sink)
    client.start()
    try:
        await next_request(server, xds.CLUSTER)
        stream = await server.streams.get()
        await stream.put(response(xds.CLUSTER, "v1", "n1", eds_cluster("outbound|good.default"),
                                  eds_cluster("outbound|odd.default", cluster_pb2.Cluster.MAGLEV)))
        nack = await next_request(server, xds.CLUSTER)
        assert nack.response_nonce == "n1" and nack.version_info == ""
        assert "outbound|odd.default" in nack.error_detail.message
        assert set(sink.clusters) == {"outbound|good.default"}
        sub = await next_request(server, xds.ENDPOINT)
        assert list(sub.resource_names) == ["outbound|good.default"]
        await stream.put(response(xds.LISTENER, "l1", "n2", hcm_listener()))
        await next_request(server, xds.LISTENER)
        from envoy.config.route.v3 import route_pb2
        await stream.put(response(xds.ROUTE, "r1", "n3", route_pb2.RouteConfiguration(name="outbound")))
        await stream.put(response(xds.ENDPOINT, "e1", "n4", cla("outbound|good.default", ("127.0.0.1", 1, 1, 1))))
        await next_request(server, xds.ENDPOINT)
        assert client.initialized  # the refused cluster does not block readiness

        # The odd cluster becomes valid, the good one turns bad: the good one keeps its last value.
        await stream.put(response(xds.CLUSTER, "v2", "n5",
                                  eds_cluster("outbound|good.default", cluster_pb2.Cluster.RING_HASH),
                                  eds_cluster("outbound|odd.default")))
        nack = await next_request(server, xds.CLUSTER)
        assert "outbound|good.default" in nack.error_detail.message
        assert set(sink.clusters) == {"outbound|good.default", "outbound|odd.default"}
        assert sink.clusters["outbound|good.default"].lb_policy == "round_robin"

        # A resource that does not even decode is NACKed too, and the stream stays up.
        bad = discovery_pb2.DiscoveryResponse(type_url=xds.CLUSTER, version_info="v3", nonce="n6")
        bad.resources.add(type_url=xds.CLUSTER, value=b"\xff\xff\xff")
        await stream.put(bad)
        nack = await next_request(server, xds.CLUSTER)
        assert nack.response_nonce == "n6" and "does not decode" in nack.error_detail.message
        assert set(sink.clusters) == {"outbound|good.default", "outbound|odd.default"}  # nothing deleted
        assert client.connects == 1
    finally:
        await client.stop()
