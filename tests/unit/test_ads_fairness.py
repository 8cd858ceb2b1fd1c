"""Fairness and back-pressure of the ADS server (DESIGN §13): a stream whose client stops reading
does not delay the others, and what waits for it stays bounded (only the latest state is sent when
it reads again). Real gRPC on 127.0.0.1."""

from __future__ import annotations

import asyncio

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.ads import SERVER_OPTIONS, AdsServer, add_to_server
from controlplane.cache import SnapshotCache
from controlplane.proxies import ProxyRegistry
from meshkeeper import xds
from tests.support.ads_streams import DeltaClient
from tests.support.fakes import async_test, until
from tests.unit.test_ads import node_proto
from tests.unit.test_ads_delta import mesh


@async_test
async def test_a_stuck_stream_neither_delays_the_others_nor_queues_more_than_the_latest_state():
    cache, proxies = SnapshotCache(), ProxyRegistry()
    ads = AdsServer(cache, proxies)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_to_server(server, ads)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    services = 1500  # a CDS response of ~500 KB: a few of them fill a reader's flow-control window
    cache.set_snapshot(mesh(1, services))
    stuck_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    live_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        requests: asyncio.Queue = asyncio.Queue()

        async def stuck_requests():
            while (req := await requests.get()) is not None:
                yield req

        stuck = ads_pb2_grpc.AggregatedDiscoveryServiceStub(stuck_channel).DeltaAggregatedResources(stuck_requests())
        requests.put_nowait(discovery_pb2.DeltaDiscoveryRequest(type_url=xds.CLUSTER, resource_names_subscribe=["*"],
                                                                node=node_proto()))
        first = await asyncio.wait_for(stuck.read(), 10)  # it reads and ACKs its first response ...
        requests.put_nowait(discovery_pb2.DeltaDiscoveryRequest(type_url=xds.CLUSTER, response_nonce=first.nonce))
        # ... and then never reads again.
        live = DeltaClient(live_channel)
        live.send(xds.CLUSTER, ["*"], node=node_proto())
        live.ack(await live.recv(10))
        await until(lambda: len(proxies) == 2)
        stuck_stream = next(s for s in ads._streams if s.status.stream_id == 1)
        for version in range(2, 22):  # 20 new services, one at a time: each a new CDS for everyone
            cache.set_snapshot(mesh(version, services, extra=f"late{version}"))
            got = await live.recv(5)  # the live stream is answered each time, whatever the stuck one does
            assert got.type_url == xds.CLUSTER and f"outbound|late{version}.default" in [r.name for r in got.resources]
            live.ack(got)
            # Behind the stuck stream's one unanswered response, at most one "re-check" marker waits:
            # no response is built for it until it answers, and then from the latest state.
            assert stuck_stream.queue.qsize() <= 1
            assert stuck_stream.types[xds.CLUSTER].in_flight
        await live.close()
        requests.put_nowait(None)
        stuck.cancel()
    finally:
        await stuck_channel.close()
        await live_channel.close()
        await server.stop(None)
