"""The outbound policy for proxy requests (sidecar.proxy.passthrough), through fake transports.

The connection manager, router, clusters, pools and the L4 proxy are the real ones; only the
connector (``loop.create_connection``) is a fake, so no socket is opened.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from sidecar.config import CircuitBreakerConfig, ClusterConfig
from sidecar.l4 import TcpProxyConfig, TcpProxyRuntime
from sidecar.proxy.passthrough import split_authority
from tests.support.fakes import FakeConnector, FakeTransport, async_test, until
from tests.unit.test_http_proxy import Mesh, assert_local_reply, parse_responses

PASSTHROUGH = "PassthroughCluster"
BLACKHOLE = "BlackHoleCluster"


class StreamTransport(FakeTransport):
    """A FakeTransport that can change protocols and has the stream methods tcp_proxy uses."""

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


class StreamConnector(FakeConnector):
    """FakeConnector with StreamTransports; records the (host, port) of every connect."""

    def __init__(self) -> None:
        super().__init__()
        self.dialled: list[tuple[str, int]] = []

    async def __call__(self, factory: Any, host: str, port: int) -> tuple[StreamTransport, Any]:
        self.dialled.append((host, port))
        if self.hang:
            await asyncio.Event().wait()
        if self.fail is not None:
            raise self.fail
        protocol = factory()
        transport = StreamTransport(protocol)
        protocol.connection_made(transport)
        self.connections.append((protocol, transport))
        return transport, protocol


class PolicyMesh(Mesh):
    """test_http_proxy's Mesh (cluster ``svc`` behind ``Host: svc``) plus the policy clusters."""

    def __init__(self, policy: str | None = PASSTHROUGH, max_connections: int = 1024) -> None:
        super().__init__()
        self.connector = StreamConnector()
        self.clusters._connector = self.connector
        for cluster in (self.clusters.get("svc"),):
            for endpoint in cluster.endpoints.values():
                endpoint.pool._connector = self.connector
        configs = {name: self.clusters.get(name).config for name in self.clusters.names()}
        configs[PASSTHROUGH] = ClusterConfig(PASSTHROUGH, discovery="ORIGINAL_DST", connect_timeout=1.0,
                                             circuit_breakers=CircuitBreakerConfig(max_connections=max_connections))
        configs[BLACKHOLE] = ClusterConfig(BLACKHOLE, discovery="STATIC")
        self.clusters.update_clusters(configs)
        self.runtime.default_cluster = policy
        if policy is not None:
            self.tcp = TcpProxyRuntime(TcpProxyConfig(policy, policy), self.clusters, connector=self.connector)
            self.runtime.default_tcp = self.tcp

    def client(self, high_water: int | None = None) -> Any:
        client = super().client(high_water)
        transport = StreamTransport(client.protocol, high_water)
        client.transport = transport
        client.protocol.transport = transport
        client.protocol.codec.transport = transport
        return client

    def stats(self, cluster: str) -> Any:
        return self.clusters.get(cluster).stats


def body(resp: dict[str, Any]) -> dict[str, Any]:
    return json.loads(resp["body"])


# --- absolute-form requests ---------------------------------------------------------------------


@async_test
async def test_absolute_form_to_an_unknown_host_is_forwarded_to_it_on_the_passthrough_cluster() -> None:
    mesh = PolicyMesh()
    client = mesh.client()
    client.send(b"GET http://example.com:8080/a?b=1 HTTP/1.1\r\nHost: example.com:8080\r\n\r\n")
    up = await mesh.upstream()
    assert mesh.connector.dialled == [("example.com", 8080)]
    assert up.received(request_ids=1) == b"GET /a?b=1 HTTP/1.1\r\nhost: example.com:8080\r\n\r\n"
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nout")
    resp = parse_responses(client.received())[0]
    assert (resp["status"], resp["body"]) == (200, b"out")
    assert mesh.stats(PASSTHROUGH).upstream_rq_2xx == 1
    assert mesh.runtime.route_stats[("allow_any", PASSTHROUGH)][1] == 1
    assert not client.transport.closed  # keep-alive, as any request


@async_test
async def test_default_port_is_80_and_the_route_has_envoys_default_timeout() -> None:
    mesh = PolicyMesh()
    client = mesh.client()
    client.send(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    await mesh.upstream()
    assert mesh.connector.dialled == [("example.com", 80)]
    ex = next(iter(client.protocol.streams))
    assert ex.entry.timeout == 15.0 and ex.entry.retry is None and ex.entry.name == "allow_any"


@async_test
async def test_absolute_form_to_a_mesh_service_still_routes_to_the_mesh() -> None:
    mesh = PolicyMesh()
    client = mesh.client()
    client.send(b"GET http://svc/x HTTP/1.1\r\nHost: svc\r\n\r\n")
    await mesh.upstream()
    assert mesh.connector.dialled == [("10.0.0.1", 8080)]
    assert mesh.stats(PASSTHROUGH).upstream_rq_total == 0


@async_test
async def test_origin_form_with_an_unknown_host_stays_404_nr() -> None:
    mesh = PolicyMesh()
    client = mesh.client()
    client.send(b"GET /x HTTP/1.1\r\nHost: scv\r\n\r\n")
    assert_local_reply(parse_responses(client.received())[0], 404, "NR")
    assert mesh.connector.dialled == []


@async_test
async def test_without_a_default_cluster_absolute_form_to_an_unknown_host_is_404_nr() -> None:
    mesh = PolicyMesh(policy=None)
    client = mesh.client()
    client.send(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert_local_reply(parse_responses(client.received())[0], 404, "NR")


@async_test
async def test_a_connect_failure_to_an_outside_host_is_503_uf() -> None:
    mesh = PolicyMesh()
    mesh.connector.fail = OSError("[Errno -2] Name or service not known")
    client = mesh.client()
    client.send(b"GET http://no-such-host.invalid/ HTTP/1.1\r\nHost: no-such-host.invalid\r\n\r\n")
    await until(lambda: client.transport.out)
    assert_local_reply(parse_responses(client.received())[0], 503, "UF")
    assert mesh.stats(PASSTHROUGH).upstream_cx_connect_fail == 1


@async_test
async def test_registry_only_refuses_with_502_uh_naming_host_and_policy() -> None:
    mesh = PolicyMesh(policy=BLACKHOLE)
    client = mesh.client()
    client.send(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    resp = parse_responses(client.received())[0]
    assert_local_reply(resp, 502, "UH")
    assert "example.com" in body(resp)["error"] and "registry_only" in body(resp)["error"]
    assert mesh.stats(BLACKHOLE).upstream_cx_none_healthy == 1
    assert mesh.runtime.route_stats[("block_all", BLACKHOLE)][4] == 1
    assert mesh.connector.dialled == []


# --- CONNECT -----------------------------------------------------------------------------------


@async_test
async def test_connect_hands_the_connection_to_the_l4_proxy_and_waits_for_the_upstream() -> None:
    mesh = PolicyMesh()
    mesh.connector.hang = True
    client = mesh.client()
    client.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nEARLY")
    await until(lambda: mesh.connector.dialled)
    assert mesh.connector.dialled == [("example.com", 443)]
    assert client.received() == b""  # no 200 before the upstream is connected
    assert client.transport.protocol is not client.protocol  # the L4 proxy has the connection
    assert mesh.runtime.stats.downstream_cx_active == 0 and mesh.tcp.stats.downstream_cx_active == 1
    assert client.protocol._timer is None  # no route timeout left running on the handed-over manager

    client.transport.abort()
    await until(lambda: mesh.tcp.stats.downstream_cx_active == 0)


@async_test
async def test_connect_answers_200_then_relays_both_ways() -> None:
    mesh = PolicyMesh()
    client = mesh.client()
    client.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nEARLY")
    await until(lambda: mesh.connector.connections)
    up_protocol, up = mesh.connector.connections[0]
    assert client.received() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert bytes(up.out) == b"EARLY"
    client.transport.protocol.data_received(b"more")
    assert bytes(up.out) == b"EARLYmore"
    up_protocol.data_received(b"back")
    assert client.received() == b"back"
    stats = mesh.runtime.stats
    assert (stats.downstream_rq_2xx, stats.downstream_rq_active) == (1, 0)
    assert mesh.runtime.route_stats[("allow_any", PASSTHROUGH)][1] == 1
    assert mesh.stats(PASSTHROUGH).upstream_cx_total == 1


@async_test
async def test_connect_whose_upstream_connect_fails_is_503_uf_and_closed() -> None:
    mesh = PolicyMesh()
    mesh.connector.fail = OSError("connection refused")
    client = mesh.client()
    client.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    await until(lambda: client.transport.closed)
    assert_local_reply(parse_responses(client.received())[0], 503, "UF")
    assert (mesh.runtime.stats.downstream_rq_5xx, mesh.runtime.stats.downstream_rq_active) == (1, 0)
    assert mesh.stats(PASSTHROUGH).upstream_cx_connect_fail == 1


@async_test
async def test_connect_over_max_connections_is_503_uo() -> None:
    mesh = PolicyMesh(max_connections=0)
    client = mesh.client()
    client.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    await until(lambda: client.transport.closed)
    assert_local_reply(parse_responses(client.received())[0], 503, "UO")
    assert mesh.connector.dialled == []


@async_test
async def test_connect_under_registry_only_is_refused_and_closed() -> None:
    mesh = PolicyMesh(policy=BLACKHOLE)
    client = mesh.client()
    client.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    resp = parse_responses(client.received())[0]
    assert_local_reply(resp, 502, "UH")
    assert "example.com:443" in body(resp)["error"]
    assert client.transport.closed and mesh.connector.dialled == []


@async_test
async def test_connect_to_a_mesh_name_is_404_nr() -> None:
    mesh = PolicyMesh()
    client = mesh.client()
    client.send(b"CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n")
    resp = parse_responses(client.received())[0]
    assert_local_reply(resp, 404, "NR")
    assert "mesh service" in body(resp)["error"]
    assert mesh.connector.dialled == []


@async_test
async def test_connect_without_a_port_or_pipelined_behind_a_request_is_400() -> None:
    mesh = PolicyMesh()
    client = mesh.client()
    client.send(b"CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert_local_reply(parse_responses(client.received())[0], 400, "DPE")

    client = mesh.client()
    client.send(b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\nCONNECT example.com:443 HTTP/1.1\r\nHost: e\r\n\r\n")
    up = await mesh.upstream()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    first, second = parse_responses(client.received())
    assert first["status"] == 200
    assert_local_reply(second, 400, "DPE")
    assert mesh.connector.dialled == [("10.0.0.1", 8080)]


@async_test
async def test_client_leaving_while_the_tunnel_connects_is_counted_once() -> None:
    mesh = PolicyMesh()
    mesh.connector.hang = True
    client = mesh.client()
    client.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    await until(lambda: mesh.connector.dialled)
    client.transport.abort()
    await until(lambda: mesh.tcp.stats.downstream_cx_active == 0)
    stats = mesh.runtime.stats
    assert stats.downstream_rq_active == 0 and stats.downstream_rq_5xx == 0
    assert mesh.runtime.route_stats == {}


@pytest.mark.parametrize(("authority", "default", "expected"), [
    (b"example.com", 80, ("example.com", 80)),
    (b"example.com:8443", None, ("example.com", 8443)),
    (b"[::1]:8080", None, ("::1", 8080)),
    (b"[::1]", 80, ("::1", 80)),
    (b"example.com", None, None),
    (b"example.com:0", 80, None),
    (b"example.com:99999", 80, None),
    (b"::1:80", 80, None),
    (b":80", 80, None),
    (b"a b:80", 80, None),
])
def test_split_authority(authority: bytes, default: int | None, expected: tuple[str, int] | None) -> None:
    assert split_authority(authority, default) == expected

