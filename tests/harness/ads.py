"""A blocking ADS client for tests that talk to a real control plane over real gRPC."""

from __future__ import annotations

import queue
import threading

import grpc
from envoy.config.cluster.v3 import cluster_pb2  # noqa: F401 (registers the types for unpacking)
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2  # noqa: F401
from envoy.config.route.v3 import route_pb2  # noqa: F401
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.runtime.v3 import rtds_pb2  # noqa: F401
from google.protobuf import struct_pb2, symbol_database

from meshkeeper.xds import NodeInfo


class AdsStream:
    """A blocking ADS client: requests go in through a queue, a thread collects responses."""

    def __init__(self, xds_port: int, info: NodeInfo) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{xds_port}")
        self.requests: queue.Queue = queue.Queue()
        self.responses: queue.Queue = queue.Queue()
        md = struct_pb2.Struct()
        md.update(info.metadata())
        self.node = base_pb2.Node(id=info.node_id, cluster=info.service, metadata=md)
        self.first = True
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.StreamAggregatedResources(iter(self.requests.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                self.responses.put(resp)
        except grpc.RpcError:
            pass

    def send(self, type_url: str, names=(), version: str = "", nonce: str = "") -> None:
        req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=list(names),
                                             version_info=version, response_nonce=nonce)
        if self.first:
            req.node.CopyFrom(self.node)
            self.first = False
        self.requests.put(req)

    def recv(self, timeout: float = 10.0) -> discovery_pb2.DiscoveryResponse:
        try:
            return self.responses.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no DiscoveryResponse within {timeout}s") from None

    def fetch(self, type_url: str, names=()) -> discovery_pb2.DiscoveryResponse:
        """Subscribe, take the response, ACK it."""
        self.send(type_url, names)
        resp = self.recv()
        assert resp.type_url == type_url
        self.send(type_url, names, resp.version_info, resp.nonce)
        return resp

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()


def unpack(resp: discovery_pb2.DiscoveryResponse) -> dict[str, object]:
    cls = symbol_database.Default().GetSymbol(resp.type_url.rpartition("/")[2])
    out = {}
    for a in resp.resources:
        msg = cls()
        assert a.Unpack(msg)
        out[msg.cluster_name if isinstance(msg, endpoint_pb2.ClusterLoadAssignment) else msg.name] = msg
    return out
