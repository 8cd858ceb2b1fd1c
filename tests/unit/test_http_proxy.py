"""The HTTP/1.1 connection manager, driven through fake transports on both sides (no sockets)."""

from __future__ import annotations

import json
import re
from typing import Any

import httptools

from sidecar.codec.http1 import MAX_PIPELINED
from sidecar.config import ClusterConfig, EndpointConfig, Route, RouteConfig, VirtualHost
from sidecar.proxy.body import BUFFER_LIMIT
from sidecar.proxy.connection_manager import ConnectionManager
from sidecar.proxy.context import ListenerContext
from sidecar.upstream.cluster import ClusterManager
from tests.support.fakes import FakeConnector, FakeTransport, async_test, until

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
# Every request head sent upstream carries a generated x-request-id (a UUID4, Envoy's
# generate_request_id): Upstream.received() checks it and takes it out, so that tests compare the
# rest byte for byte. tests/unit/test_telemetry.py tests the header itself.
_REQUEST_ID = re.compile(
    rb"x-request-id: [0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\r\n(?=(?:[^\r\n]+\r\n)*\r\n)")


class Upstream:
    """The far end of one fake upstream connection."""

    def __init__(self, protocol: Any, transport: FakeTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def received(self, request_ids: int | None = None) -> bytes:
        """What arrived since the last call, each head's generated x-request-id taken out.
        ``request_ids``: how many request heads must have had one (default: do not check)."""
        data, n = _REQUEST_ID.subn(b"", self.transport.take())
        if request_ids is not None:
            assert n == request_ids, (n, data)
        return data

    def respond(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def reset(self) -> None:
        self.transport.peer_close()


class Client:
    """A downstream connection: a connection manager on a fake transport."""

    def __init__(self, runtime: ListenerContext, high_water: int | None = None) -> None:
        self.protocol = ConnectionManager(runtime)
        self.transport = FakeTransport(self.protocol, high_water)
        self.protocol.connection_made(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def received(self) -> bytes:
        return self.transport.take()


class Mesh:
    """A listener runtime whose cluster ``svc`` has one endpoint behind a FakeConnector."""

    def __init__(self, timeout: float = 15.0, connect_timeout: float = 1.0) -> None:
        self.connector = FakeConnector()
        self.clusters = ClusterManager(connector=self.connector)
        self.clusters.update_clusters({
            "svc": ClusterConfig("svc", connect_timeout=connect_timeout),
            "empty": ClusterConfig("empty"),
        })
        self.clusters.update_endpoints("svc", (EndpointConfig("10.0.0.1", 8080),))
        self.runtime = ListenerContext("outbound", self.clusters)
        self.runtime.set_route_config(RouteConfig("outbound", (
            VirtualHost("svc", ("svc", "svc:*"), (Route("/", "svc", timeout=timeout),)),
            VirtualHost("empty", ("empty",), (Route("/", "empty"),)),
            VirtualHost("ghost", ("ghost",), (Route("/", "no-such-cluster"),)),
        )))

    def client(self, high_water: int | None = None) -> Client:
        return Client(self.runtime, high_water)

    async def upstream(self, index: int = 0) -> Upstream:
        await until(lambda: len(self.connector.connections) > index)
        return Upstream(*self.connector.connections[index])

    @property
    def cluster_stats(self) -> Any:
        return self.clusters.get("svc").stats

    @property
    def endpoint(self) -> Any:
        return self.clusters.get("svc").endpoints["10.0.0.1:8080"]


def parse_responses(data: bytes) -> list[dict[str, Any]]:
    """Responses in ``data`` as dicts: status, headers (lowercased names), body, complete."""
    out: list[dict[str, Any]] = []

    class Collector:
        def on_message_begin(self) -> None:
            out.append({"status": 0, "headers": {}, "body": b"", "complete": False})

        def on_header(self, name: bytes, value: bytes) -> None:
            out[-1]["headers"][name.decode().lower()] = value.decode()

        def on_headers_complete(self) -> None:
            out[-1]["status"] = parser.get_status_code()

        def on_body(self, body: bytes) -> None:
            out[-1]["body"] += body

        def on_message_complete(self) -> None:
            out[-1]["complete"] = True

    parser = httptools.HttpResponseParser(Collector())
    parser.feed_data(data)
    return out


def assert_local_reply(resp: dict[str, Any], status: int, flag: str) -> None:
    assert resp["status"] == status
    assert resp["headers"]["x-meshkeeper-flags"] == flag
    assert json.loads(resp["body"])["flags"] == flag
    assert resp["headers"]["content-type"] == "application/json"


def assert_quiet(mesh: Mesh) -> None:
    """Every counter of in-flight work is back to zero."""
    assert mesh.runtime.stats.downstream_rq_active == 0
    assert mesh.cluster_stats.upstream_rq_active == 0
    assert mesh.endpoint.active_requests == 0


# --- forwarding ----------------------------------------------------------------------------------


@async_test
async def test_forwards_request_and_reuses_the_pooled_connection() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET /items?x=1 HTTP/1.1\r\nHost: svc\r\nUser-Agent: t\r\n\r\n")
    up = await mesh.upstream()
    assert up.received() == b"GET /items?x=1 HTTP/1.1\r\nhost: svc\r\nUser-Agent: t\r\n\r\n"
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-App: 1\r\n\r\nhello")
    resp = parse_responses(client.received())
    assert resp == [{"status": 200, "headers": {"content-length": "5", "x-app": "1"}, "body": b"hello", "complete": True}]
    client.send(b"GET /again HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert up.received().startswith(b"GET /again HTTP/1.1\r\n")  # no new connection: reused at once
    up.respond(OK)
    assert parse_responses(client.received())[0]["body"] == b"ok"
    assert len(mesh.connector.connections) == 1
    assert mesh.cluster_stats.upstream_rq_2xx == 2 and mesh.endpoint.total_requests == 2
    assert mesh.endpoint.rq_success == 2
    assert_quiet(mesh)


@async_test
async def test_hop_by_hop_headers_are_stripped_both_ways() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Private\r\nKeep-Alive: timeout=5\r\n"
                b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Private: secret\r\nX-Kept: 1\r\n\r\n")
    up = await mesh.upstream()
    assert up.received() == b"GET / HTTP/1.1\r\nhost: svc\r\nX-Kept: 1\r\n\r\n"
    up.respond(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=60\r\nContent-Length: 2\r\n"
               b"Upgrade: nothing\r\n\r\nok")
    resp = parse_responses(client.received())[0]
    assert resp["headers"] == {"content-length": "2"}


@async_test
async def test_absolute_form_is_routed_by_its_authority_and_rewritten() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET http://svc:8080/items?q=1 HTTP/1.1\r\nHost: elsewhere\r\nAccept: */*\r\n\r\n")
    up = await mesh.upstream()
    assert up.received() == b"GET /items?q=1 HTTP/1.1\r\nhost: svc:8080\r\nAccept: */*\r\n\r\n"
    up.respond(OK)
    client.send(b"GET http://SVC?x=2 HTTP/1.1\r\n\r\n")
    assert up.received() == b"GET /?x=2 HTTP/1.1\r\nhost: SVC\r\n\r\n"


@async_test
async def test_route_swap_applies_to_the_next_request() -> None:
    mesh = Mesh()
    client = mesh.client()
    mesh.runtime.set_route_config(RouteConfig("outbound", (VirtualHost("x", ("other",), (Route("/", "svc"),)),)))
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert_local_reply(parse_responses(client.received())[0], 404, "NR")
    client.send(b"GET / HTTP/1.1\r\nHost: other\r\n\r\n")
    await mesh.upstream()


# --- local replies -------------------------------------------------------------------------------


@async_test
async def test_no_route_404_keeps_the_connection() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n")
    resp = parse_responses(client.received())[0]
    assert_local_reply(resp, 404, "NR")
    assert not client.transport.closed
    assert mesh.runtime.stats.no_route == 1 and mesh.runtime.stats.downstream_rq_4xx == 1


@async_test
async def test_no_serving_endpoint_503_uh_and_missing_cluster_503_nc() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: empty\r\n\r\nGET / HTTP/1.1\r\nHost: ghost\r\n\r\n")
    uh, nc = parse_responses(client.received())
    assert_local_reply(uh, 503, "UH")
    assert_local_reply(nc, 503, "NC")
    assert mesh.clusters.get("empty").stats.upstream_cx_none_healthy == 1


@async_test
async def test_connect_failure_503_uf() -> None:
    mesh = Mesh()
    mesh.connector.fail = ConnectionRefusedError(111, "refused")
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    await until(lambda: client.transport.out)
    assert_local_reply(parse_responses(client.received())[0], 503, "UF")
    assert mesh.cluster_stats.upstream_cx_connect_fail == 1 and mesh.endpoint.rq_error == 1
    assert_quiet(mesh)


@async_test
async def test_connect_timeout_503_uf() -> None:
    mesh = Mesh(connect_timeout=0.02)
    mesh.connector.hang = True
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    await until(lambda: client.transport.out)
    assert_local_reply(parse_responses(client.received())[0], 503, "UF")
    assert mesh.cluster_stats.upstream_cx_connect_timeout == 1


@async_test
async def test_upstream_reset_before_response_502_uc() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-")  # part of a head, then the upstream goes away
    up.reset()
    await until(lambda: client.transport.out)
    assert_local_reply(parse_responses(client.received())[0], 502, "UC")
    assert mesh.cluster_stats.upstream_rq_rx_reset == 1 and mesh.endpoint.rq_error == 1
    assert not client.transport.closed


@async_test
async def test_stale_pooled_connection_is_replayed_once_for_idempotent_requests() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET /1 HTTP/1.1\r\nHost: svc\r\n\r\n")
    first = await mesh.upstream()
    first.received()
    first.respond(OK)
    client.received()
    client.send(b"GET /2 HTTP/1.1\r\nHost: svc\r\n\r\n")  # goes to the pooled connection...
    first.reset()  # ...which the upstream had closed
    second = await mesh.upstream(1)
    await until(lambda: second.transport.out)
    assert second.received().startswith(b"GET /2 HTTP/1.1")
    second.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    assert mesh.cluster_stats.upstream_rq_retry_stale == 1


@async_test
async def test_upstream_reset_after_response_started_resets_downstream() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    up.reset()
    await until(lambda: client.transport.aborted)
    await until(lambda: mesh.runtime.stats.downstream_cx_active == 0)
    assert_quiet(mesh)


@async_test
async def test_route_timeout_504_ut() -> None:
    mesh = Mesh(timeout=0.05)
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    await until(lambda: client.transport.out)
    assert_local_reply(parse_responses(client.received())[0], 504, "UT")
    assert up.transport.aborted  # the upstream request is abandoned
    assert mesh.cluster_stats.upstream_rq_timeout == 1
    assert not client.transport.closed
    assert_quiet(mesh)


@async_test
async def test_route_timeout_after_response_head_resets_downstream() -> None:
    mesh = Mesh(timeout=0.05)
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nslow")
    await until(lambda: client.transport.aborted)


@async_test
async def test_http11_request_without_or_with_two_host_headers_is_400() -> None:
    for head in (b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nHost: svc\r\nHost: evil\r\n\r\n"):
        mesh = Mesh()
        client = mesh.client()
        client.send(head)
        assert_local_reply(parse_responses(client.received())[0], 400, "DPE")
        assert client.transport.closed
    # HTTP/1.0 may leave Host out; it then matches only the default virtual host (none here: 404).
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.0\r\n\r\n")
    assert_local_reply(parse_responses(client.received())[0], 404, "NR")


@async_test
async def test_malformed_request_400_and_close() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost svc\r\n\r\n")
    assert_local_reply(parse_responses(client.received())[0], 400, "DPE")
    assert client.transport.closed
    assert mesh.runtime.stats.downstream_cx_protocol_error == 1


@async_test
async def test_oversized_headers_431_and_close() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\nX-Big: " + b"a" * (61 * 1024) + b"\r\n\r\n")
    resp = parse_responses(client.received())[0]
    assert_local_reply(resp, 431, "DPE")
    assert resp["headers"]["connection"] == "close" and client.transport.closed
    assert mesh.connector.connections == []


@async_test
async def test_headers_growing_over_many_reads_431() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\nX-Big: ")
    for _ in range(70):
        client.send(b"a" * 1024)  # one header value that never ends
        if client.transport.out:
            break
    assert_local_reply(parse_responses(client.received())[0], 431, "DPE")
    assert client.transport.closed


@async_test
async def test_connect_method_is_not_routed() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n")
    resp = parse_responses(client.received())[0]
    assert_local_reply(resp, 404, "NR")
    assert client.transport.closed


# --- framing -------------------------------------------------------------------------------------


@async_test
async def test_chunked_request_is_rechunked_and_buffered_while_connecting() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    up = await mesh.upstream()  # the first chunk was held while connecting
    assert up.received() == (b"POST /up HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n")
    client.send(b"6\r\n world\r\n0\r\nX-Trailer: dropped\r\n\r\n")
    assert up.received() == b"6\r\n world\r\n0\r\n\r\n"
    up.respond(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert parse_responses(client.received())[0]["status"] == 201
    assert mesh.endpoint.pool.idle_count == 1


@async_test
async def test_content_length_request_body_passes_through() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"PUT /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\n01234")
    up = await mesh.upstream()
    client.send(b"56789")
    assert up.received() == b"PUT /x HTTP/1.1\r\nhost: svc\r\nContent-Length: 10\r\n\r\n0123456789"


@async_test
async def test_chunked_and_close_delimited_responses_are_chunked_downstream() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    up.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    data = client.received()
    assert b"transfer-encoding: chunked\r\n" in data and data.endswith(b"3\r\nabc\r\n0\r\n\r\n")
    client.send(b"GET /b HTTP/1.1\r\nHost: svc\r\n\r\n")
    up.received()
    up.respond(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-eof")
    up.reset()
    await until(lambda: client.transport.out.endswith(b"0\r\n\r\n"))
    resp = parse_responses(client.received())[0]
    assert resp["body"] == b"until-eof" and resp["complete"] and not client.transport.closed


@async_test
async def test_http10_client_gets_close_delimited_body() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.0\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    assert up.received().startswith(b"GET / HTTP/1.1\r\n")  # always HTTP/1.1 upstream
    up.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    data = client.received()
    assert b"transfer-encoding" not in data.lower() and data.endswith(b"\r\n\r\nabc")
    assert b"connection: close" in data and client.transport.closed


@async_test
async def test_http10_keep_alive_is_honoured() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\n\r\n")
    up = await mesh.upstream()
    up.respond(OK)
    assert b"connection: keep-alive\r\n" in client.received() and not client.transport.closed


@async_test
async def test_head_request_response_has_no_body() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"HEAD /file HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    assert up.received().startswith(b"HEAD /file HTTP/1.1\r\n")
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    # Content-Length comes back lower-cased, as Envoy writes every header name.
    assert client.received() == b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"
    client.send(b"GET /next HTTP/1.1\r\nHost: svc\r\n\r\n")  # same upstream connection, clean parser
    assert up.received().startswith(b"GET /next")
    up.respond(OK)
    assert parse_responses(client.received())[0]["body"] == b"ok"
    assert_quiet(mesh)


@async_test
async def test_204_and_304_have_no_body() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    up.respond(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert client.received() == b"HTTP/1.1 204 No Content\r\n\r\n"
    client.send(b"GET /b HTTP/1.1\r\nHost: svc\r\n\r\n")
    up.respond(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
    assert client.received() == b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n"


# --- connection management -------------------------------------------------------------------


@async_test
async def test_pipelined_requests_are_answered_in_order() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET /1 HTTP/1.1\r\nHost: svc\r\n\r\nPOST /2 HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc")
    up = await mesh.upstream()
    assert up.received() == b"GET /1 HTTP/1.1\r\nhost: svc\r\n\r\n"  # one at a time upstream
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
    # The second goes out on the connection the first released, with its buffered body.
    assert up.received() == b"POST /2 HTTP/1.1\r\nhost: svc\r\nContent-Length: 3\r\n\r\nabc"
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
    bodies = [r["body"] for r in parse_responses(client.received())]
    assert bodies == [b"first", b"second"]
    assert len(mesh.connector.connections) == 1
    assert_quiet(mesh)


@async_test
async def test_pipelined_local_replies_keep_order() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET /1 HTTP/1.1\r\nHost: svc\r\n\r\nGET /2 HTTP/1.1\r\nHost: nowhere\r\n\r\n")
    up = await mesh.upstream()
    assert client.transport.out == b""  # the 404 waits for the first response
    up.respond(OK)
    statuses = [r["status"] for r in parse_responses(client.received())]
    assert statuses == [200, 404]


@async_test
async def test_parse_ahead_is_bounded() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n" * (MAX_PIPELINED + 2))
    assert not client.transport.reading
    up = await mesh.upstream()
    for _ in range(MAX_PIPELINED + 2):
        up.received()
        up.respond(OK)
    assert client.transport.reading
    assert len(parse_responses(client.received())) == MAX_PIPELINED + 2


@async_test
async def test_client_connection_close() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\nGET /ignored HTTP/1.1\r\n\r\n")
    up = await mesh.upstream()
    assert up.received() == b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n"  # Connection is hop-by-hop
    up.respond(OK)
    resp = parse_responses(client.received())
    assert len(resp) == 1 and resp[0]["headers"]["connection"] == "close"
    assert client.transport.closed
    assert mesh.endpoint.pool.idle_count == 1  # the upstream connection is still good
    await until(lambda: mesh.runtime.stats.downstream_cx_active == 0)
    assert_quiet(mesh)


@async_test
async def test_upstream_connection_close_keeps_downstream_open() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    assert "connection" not in parse_responses(client.received())[0]["headers"]
    assert up.transport.closed and not client.transport.closed
    assert mesh.endpoint.pool.idle_count == 0


@async_test
async def test_expect_100_continue_is_answered_and_stripped() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert client.received() == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.send(b"data")
    up = await mesh.upstream()
    assert up.received() == b"POST / HTTP/1.1\r\nhost: svc\r\nContent-Length: 4\r\n\r\ndata"
    up.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200


@async_test
async def test_expect_100_continue_refused_closes() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"POST / HTTP/1.1\r\nHost: nowhere\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    resp = parse_responses(client.received())
    assert [r["status"] for r in resp] == [404]  # no 100 Continue before a final answer
    assert resp[0]["headers"]["connection"] == "close" and client.transport.closed


@async_test
async def test_early_response_discards_the_rest_of_the_request_body() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\n01234")
    up = await mesh.upstream()
    up.respond(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
    assert parse_responses(client.received())[0]["status"] == 413
    assert up.transport.closed  # the request was not fully sent: never reuse
    client.send(b"56789GET /next HTTP/1.1\r\nHost: svc\r\n\r\n")
    nxt = await mesh.upstream(1)
    assert nxt.received().startswith(b"GET /next")


@async_test
async def test_upgrade_request_is_forwarded_without_upgrade() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                b"GET /after HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    assert up.received() == b"GET /ws HTTP/1.1\r\nhost: svc\r\n\r\n"
    up.respond(OK)
    assert up.received().startswith(b"GET /after")


@async_test
async def test_client_disconnect_abandons_the_upstream_request() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    client.transport.peer_close()
    await until(lambda: up.transport.aborted)
    assert_quiet(mesh)
    assert mesh.runtime.stats.downstream_cx_active == 0


# --- flow control --------------------------------------------------------------------------------


@async_test
async def test_slow_client_pauses_upstream_reading() -> None:
    mesh = Mesh()
    client = mesh.client(high_water=1024)
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n" + b"x" * 2048)
    assert not up.transport.reading
    client.received()  # the client drains its buffer
    assert up.transport.reading
    up.respond(b"y" * 2048)
    assert mesh.endpoint.pool.idle_count == 1


@async_test
async def test_a_client_still_slow_after_one_response_pauses_the_next_ones_upstream() -> None:
    mesh = Mesh()
    client = mesh.client(high_water=1024)
    client.send(b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2048\r\n\r\n" + b"x" * 2048)  # the client reads none of it
    assert client.transport.write_paused
    up.received()
    client.send(b"GET /b HTTP/1.1\r\nHost: svc\r\n\r\n")  # same upstream connection, pooled
    assert not up.transport.reading  # the downstream is still full: the second response waits upstream
    client.received()
    assert up.transport.reading


@async_test
async def test_slow_upstream_pauses_client_reading() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"PUT / HTTP/1.1\r\nHost: svc\r\nContent-Length: 100000\r\n\r\n")
    up = await mesh.upstream()
    up.transport.high_water = 1024
    client.send(b"z" * 2048)
    assert not client.transport.reading
    up.received()
    assert client.transport.reading


@async_test
async def test_body_buffered_while_connecting_is_bounded() -> None:
    mesh = Mesh()
    mesh.connector.hang = True
    client = mesh.client()
    client.send(b"PUT / HTTP/1.1\r\nHost: svc\r\nContent-Length: 200000\r\n\r\n" + b"z" * (BUFFER_LIMIT + 1))
    assert not client.transport.reading
    mesh.connector.hang = False
    client.transport.peer_close()
    await until(lambda: mesh.runtime.stats.downstream_cx_active == 0)
    assert not client.protocol.streams  # the stream, and the body it held, are gone


# --- draining ------------------------------------------------------------------------------------


@async_test
async def test_drain_closes_idle_now_and_busy_after_their_response() -> None:
    mesh = Mesh()
    idle = mesh.client()
    busy = mesh.client()
    busy.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    mesh.runtime.start_draining()
    assert idle.transport.closed and not busy.transport.closed
    up.respond(OK)
    resp = parse_responses(busy.received())[0]
    assert resp["status"] == 200 and resp["headers"]["connection"] == "close"
    assert busy.transport.closed
    assert await mesh.runtime.wait_idle(1.0)
    assert mesh.runtime.stats.downstream_cx_drain_close == 2


@async_test
async def test_refused_request_with_buffered_body_resumes_reading_to_discard_it() -> None:
    mesh = Mesh()
    mesh.connector.fail = ConnectionRefusedError(111, "refused")
    client = mesh.client()
    client.send(b"PUT / HTTP/1.1\r\nHost: svc\r\nContent-Length: 200000\r\n\r\n" + b"z" * (BUFFER_LIMIT + 1))
    assert not client.transport.reading
    await until(lambda: client.transport.out)
    assert_local_reply(parse_responses(client.received())[0], 503, "UF")
    assert client.transport.reading  # the rest of the body is read and dropped...
    client.send(b"z" * (200000 - BUFFER_LIMIT - 1) + b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n")
    assert_local_reply(parse_responses(client.received())[0], 404, "NR")  # ...and the connection lives on


@async_test
async def test_route_timeout_of_a_later_request_on_the_same_connection() -> None:
    # The connection's one timer, armed for the first request, is re-armed for the second.
    mesh = Mesh(timeout=0.05)
    client = mesh.client()
    client.send(b"GET /fast HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    up.received()
    up.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    client.send(b"GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert up.received().startswith(b"GET /slow")
    await until(lambda: client.transport.out)
    assert_local_reply(parse_responses(client.received())[0], 504, "UT")


@async_test
async def test_invalid_upstream_response_502_upe() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    up.respond(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (61 * 1024) + b"\r\n\r\n")
    assert_local_reply(parse_responses(client.received())[0], 502, "UPE")
    assert mesh.cluster_stats.upstream_cx_protocol_error == 1
    assert_quiet(mesh)


@async_test
async def test_http10_request_without_host_gets_the_endpoint_as_host() -> None:
    mesh = Mesh()
    mesh.runtime.set_route_config(RouteConfig("r", (VirtualHost("any", ("*",), (Route("/", "svc"),)),)))
    client = mesh.client()
    client.send(b"GET / HTTP/1.0\r\n\r\n")
    up = await mesh.upstream()
    assert up.received() == b"GET / HTTP/1.1\r\nhost: 10.0.0.1:8080\r\n\r\n"
