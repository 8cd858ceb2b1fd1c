"""Retries, per-try timeouts, the retry budget, circuit breakers and fault injection of the router
filter, driven through fake transports on both sides (no sockets), as ``test_http_proxy`` does.

Envoy's router and connection pool are the reference: ``RetryStateImpl`` (retry_on conditions,
``upstream_rq_retry*`` stats, retry budget), ``UpstreamRequest`` (per-try timeout),
``ConnPoolImplBase`` (circuit breakers) and the fault filter. Randomness comes from
``ListenerContext.random`` (0.0 unless a test says otherwise: no back-off, faults always apply).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import pytest

from sidecar.config import (
    DEFAULT_CIRCUIT_BREAKERS,
    CircuitBreakerConfig,
    ClusterConfig,
    EndpointConfig,
    FaultConfig,
    RetryPolicyConfig,
    Route,
    RouteConfig,
    VirtualHost,
)
from sidecar.proxy.context import ListenerContext
from sidecar.proxy.router_filter import RETRY_BUFFER_LIMIT
from sidecar.upstream.cluster import Cluster, ClusterManager
from sidecar.upstream.host import Endpoint
from tests.support.fakes import FakeConnector, FakeTransport, async_test, until
from tests.unit.test_http_proxy import OK, Mesh, Upstream, assert_local_reply, assert_quiet, parse_responses

GET = b"GET /r HTTP/1.1\r\nHost: svc\r\n\r\n"
GET_UPSTREAM = b"GET /r HTTP/1.1\r\nhost: svc\r\n\r\n"
A = "10.0.0.1"
B = "10.0.0.2"


class Connector(FakeConnector):
    """A FakeConnector that can refuse connects to a host, be slow, or wait for a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: dict[str, int] = {}  # host -> how many more connects to it are refused
        self.delay = 0.0  # seconds every connect takes
        self.gate: asyncio.Event | None = None  # connects complete once it is set
        self.attempts: list[str] = []  # hosts, one per connect attempt

    async def __call__(self, factory: Callable[[], asyncio.Protocol], host: str, port: int) -> Any:
        self.attempts.append(host)
        if self.refuse.get(host):
            self.refuse[host] -= 1
            raise ConnectionRefusedError(111, "refused")
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        return await super().__call__(factory, host, port)


class RetryMesh(Mesh):
    """A listener whose route ``svc`` has a retry policy / fault, over a cluster with breakers."""

    def __init__(self, *, retry: RetryPolicyConfig | None = None, fault: FaultConfig | None = None,
                 breakers: CircuitBreakerConfig = DEFAULT_CIRCUIT_BREAKERS,
                 endpoints: tuple[tuple[str, int], ...] = ((A, 1),), timeout: float = 15.0,
                 connect_timeout: float = 1.0) -> None:
        self.connector = Connector()
        self.clusters = ClusterManager(connector=self.connector)
        self.clusters.update_clusters({
            "svc": ClusterConfig("svc", connect_timeout=connect_timeout, circuit_breakers=breakers),
        })
        self.clusters.update_endpoints("svc", tuple(EndpointConfig(addr, 8080, weight=w) for addr, w in endpoints))
        self.runtime = ListenerContext("outbound", self.clusters)
        self.runtime.random = lambda: 0.0
        self.runtime.set_route_config(RouteConfig("outbound", (
            VirtualHost("svc", ("svc",), (Route("/", "svc", timeout=timeout, retry_policy=retry, fault=fault),)),
        )))

    @property
    def cluster(self) -> Cluster:
        return self.clusters.get("svc")

    def ep(self, host: str) -> Endpoint:
        return self.cluster.endpoints[f"{host}:8080"]

    def host_of(self, up: Upstream) -> str:
        return up.protocol.pool.host


def policy(*retry_on: str, **kw: Any) -> RetryPolicyConfig:
    return RetryPolicyConfig(retry_on=frozenset(retry_on), **kw)


def response(status: int, body: bytes = b"") -> bytes:
    phrase = HTTPStatus(status).phrase.encode()
    return b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n\r\n%s" % (status, phrase, len(body), body)


async def assert_settled(mesh: RetryMesh) -> None:
    """Nothing in flight is left counted: requests, retries, pending requests, pool waiters."""
    await asyncio.sleep(0)  # closes scheduled with call_soon
    assert_quiet(mesh)
    cluster = mesh.cluster
    assert cluster.retries_active == 0
    assert cluster.stats.upstream_rq_pending_active == 0
    for endpoint in cluster.endpoints.values():
        assert endpoint.active_requests == 0
        assert endpoint.pool.waiting == 0


# --- retry_on ------------------------------------------------------------------------------------


@async_test
async def test_503_is_retried_on_another_endpoint_and_its_connection_is_pooled() -> None:
    # Weights 3:1 make round robin pick A twice in a row: only previous_hosts sends the retry to B.
    mesh = RetryMesh(retry=policy("5xx", avoid_previous_hosts=True), endpoints=((A, 3), (B, 1)))
    client = mesh.client()
    client.send(GET)
    first = await mesh.upstream(0)
    assert mesh.host_of(first) == A
    assert first.received() == GET_UPSTREAM
    first.respond(response(503, b"overloaded-503-body"))
    second = await mesh.upstream(1)
    assert mesh.host_of(second) == B
    assert second.received() == GET_UPSTREAM
    assert client.transport.out == b""  # nothing of the 503 was relayed
    second.respond(response(200, b"from-b"))
    data = client.received()
    assert b"overloaded" not in data and b"503" not in data
    resp = parse_responses(data)
    assert resp == [{"status": 200, "headers": {"content-length": "6"}, "body": b"from-b", "complete": True}]
    stats = mesh.cluster_stats
    assert (stats.upstream_rq_retry, stats.upstream_rq_retry_success) == (1, 1)
    assert (stats.upstream_rq_5xx, stats.upstream_rq_2xx, stats.upstream_rq_total) == (1, 1, 2)
    assert stats.upstream_rq_retry_limit_exceeded == 0 and stats.upstream_rq_retry_overflow == 0
    # The 503 was read whole: its connection went back to A's pool instead of being aborted.
    assert not first.transport.closed and mesh.ep(A).pool.idle_count == 1
    assert mesh.ep(A).rq_error == 1 and mesh.ep(B).rq_success == 1
    assert mesh.runtime.stats.downstream_rq_2xx == 1 and mesh.runtime.stats.downstream_rq_5xx == 0
    await assert_settled(mesh)


@async_test
async def test_retry_without_previous_hosts_reuses_the_pooled_connection_of_the_503() -> None:
    mesh = RetryMesh(retry=policy("5xx"))
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    assert up.received() == GET_UPSTREAM
    up.respond(response(503, b"busy"))
    assert up.received() == GET_UPSTREAM  # replayed at once on the connection the 503 freed
    up.respond(OK)
    assert parse_responses(client.received())[0]["body"] == b"ok"
    assert len(mesh.connector.connections) == 1 and not up.transport.closed
    assert mesh.cluster_stats.upstream_rq_retry == 1 and mesh.cluster_stats.upstream_rq_retry_success == 1
    await assert_settled(mesh)


@async_test
async def test_chunked_503_is_read_whole_and_dropped_before_the_retry() -> None:
    mesh = RetryMesh(retry=policy("5xx"))
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    up.received()
    up.respond(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnope\r\n")
    assert up.received() == b"" and client.transport.out == b""  # still reading the 503
    up.respond(b"0\r\n\r\n")
    assert up.received() == GET_UPSTREAM
    up.respond(OK)
    resp = parse_responses(client.received())
    assert [r["status"] for r in resp] == [200] and resp[0]["body"] == b"ok"
    await assert_settled(mesh)


@async_test
async def test_last_503_is_forwarded_as_is_when_retries_are_exhausted() -> None:
    mesh = RetryMesh(retry=policy("5xx", num_retries=2))
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    for n in (1, 2):
        assert up.received() == GET_UPSTREAM
        up.respond(response(503, b"try-%d" % n))
    assert up.received() == GET_UPSTREAM
    up.respond(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nX-App: 3\r\n\r\ntry-3")
    data = client.received()
    assert b"try-1" not in data and b"try-2" not in data
    resp = parse_responses(data)
    assert resp == [{"status": 503, "headers": {"content-length": "5", "x-app": "3"}, "body": b"try-3",
                     "complete": True}]  # the upstream's answer, not a local reply
    stats = mesh.cluster_stats
    assert (stats.upstream_rq_retry, stats.upstream_rq_retry_limit_exceeded, stats.upstream_rq_retry_success) == (2, 1, 0)
    assert stats.upstream_rq_5xx == 3 and stats.upstream_rq_total == 3
    assert mesh.endpoint.rq_error == 3
    await assert_settled(mesh)


@pytest.mark.parametrize("status", [502, 503, 504])
@async_test
async def test_gateway_error_retries_502_503_504(status: int) -> None:
    mesh = RetryMesh(retry=policy("gateway-error"))
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    up.received()
    up.respond(response(status, b"gw"))
    assert up.received() == GET_UPSTREAM
    up.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    assert mesh.cluster_stats.upstream_rq_retry == 1
    await assert_settled(mesh)


@pytest.mark.parametrize(("retry_on", "status"), [
    (("gateway-error",), 500),
    (("gateway-error",), 501),
    (("5xx",), 409),
    (("retriable-4xx",), 404),
    (("retriable-4xx",), 503),
    (("connect-failure",), 503),
    (("reset",), 503),
    (("retriable-status-codes",), 503),  # the policy lists no code
])
@async_test
async def test_responses_the_policy_does_not_name_are_not_retried(retry_on: tuple[str, ...], status: int) -> None:
    mesh = RetryMesh(retry=policy(*retry_on))
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    up.received()
    up.respond(response(status, b"as-is"))
    resp = parse_responses(client.received())
    assert resp == [{"status": status, "headers": {"content-length": "5"}, "body": b"as-is", "complete": True}]
    assert up.received() == b""
    stats = mesh.cluster_stats
    assert (stats.upstream_rq_retry, stats.upstream_rq_retry_limit_exceeded, stats.upstream_rq_retry_overflow) == (0, 0, 0)
    await assert_settled(mesh)


@pytest.mark.parametrize(("retry_on", "codes", "status"), [
    (("5xx",), (), 500),
    (("5xx",), (), 501),
    (("retriable-4xx",), (), 409),
    (("retriable-status-codes",), (418, 429), 418),
    (("retriable-status-codes",), (418, 429), 429),
    (("gateway-error", "retriable-status-codes"), (500,), 500),
])
@async_test
async def test_responses_the_policy_names_are_retried(retry_on: tuple[str, ...], codes: tuple[int, ...],
                                                     status: int) -> None:
    mesh = RetryMesh(retry=policy(*retry_on, retriable_status_codes=frozenset(codes)))
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    up.received()
    up.respond(response(status, b"dropped"))
    assert up.received() == GET_UPSTREAM
    up.respond(OK)
    data = client.received()
    assert b"dropped" not in data and parse_responses(data)[0]["status"] == 200
    assert mesh.cluster_stats.upstream_rq_retry == 1 and mesh.cluster_stats.upstream_rq_retry_success == 1
    await assert_settled(mesh)


@async_test
async def test_retriable_status_codes_need_the_retry_on_condition() -> None:
    mesh = RetryMesh(retry=policy("5xx", retriable_status_codes=frozenset({418})))
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    up.received()
    up.respond(response(418))
    assert parse_responses(client.received())[0]["status"] == 418
    assert mesh.cluster_stats.upstream_rq_retry == 0
    await assert_settled(mesh)


@async_test
async def test_retry_success_counts_a_retried_request_whose_response_is_not_retried() -> None:
    # Envoy's RetryStateImpl::shouldRetry counts upstream_rq_retry_success when a retry was sent and
    # the next response would not be retried, whatever its status; a retriable response that runs
    # into num_retries is not a success.
    mesh = RetryMesh(retry=policy("retriable-4xx"))
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    up.received()
    up.respond(response(409, b"conflict-1"))
    assert up.received() == GET_UPSTREAM
    up.respond(response(409, b"conflict-2"))
    resp = parse_responses(client.received())[0]
    assert resp["status"] == 409 and resp["body"] == b"conflict-2"
    stats = mesh.cluster_stats
    assert (stats.upstream_rq_retry, stats.upstream_rq_retry_limit_exceeded) == (1, 1)
    assert stats.upstream_rq_retry_success == 0
    await assert_settled(mesh)

    mesh = RetryMesh(retry=policy("gateway-error"))
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    up.received()
    up.respond(response(503))
    assert up.received() == GET_UPSTREAM
    up.respond(response(500, b"not-retriable"))  # gateway-error does not cover 500: the retry is over
    assert parse_responses(client.received())[0]["status"] == 500
    assert mesh.cluster_stats.upstream_rq_retry_success == 1
    await assert_settled(mesh)


# --- local-origin failures -------------------------------------------------------------------


@pytest.mark.parametrize("retry_on", ["connect-failure", "5xx", "gateway-error", "reset"])
@async_test
async def test_connect_failure_is_retried(retry_on: str) -> None:
    # Envoy's wouldRetryFromReset: a connection failure is a reset reason; reset, 5xx and
    # gateway-error retry every reset but an overflow, connect-failure only connection failures.
    mesh = RetryMesh(retry=policy(retry_on))
    mesh.connector.refuse[A] = 1
    client = mesh.client()
    client.send(GET)
    await until(lambda: mesh.connector.connections or client.transport.out)
    assert client.transport.out == b"", f"not retried: {parse_responses(client.received())}"
    up = await mesh.upstream()
    assert mesh.connector.attempts == [A, A]
    assert up.received() == GET_UPSTREAM
    up.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    stats = mesh.cluster_stats
    assert stats.upstream_cx_connect_fail == 1
    assert (stats.upstream_rq_retry, stats.upstream_rq_retry_success) == (1, 1)
    assert mesh.endpoint.rq_error == 1 and mesh.endpoint.rq_success == 1
    await assert_settled(mesh)


@pytest.mark.parametrize("retry_on", ["retriable-4xx", "retriable-status-codes"])
@async_test
async def test_connect_failure_is_not_retried_by_response_conditions(retry_on: str) -> None:
    mesh = RetryMesh(retry=policy(retry_on, retriable_status_codes=frozenset({503})))
    mesh.connector.refuse[A] = 1
    client = mesh.client()
    client.send(GET)
    await until(lambda: client.transport.out)
    assert_local_reply(parse_responses(client.received())[0], 503, "UF")
    assert mesh.connector.attempts == [A]
    assert mesh.cluster_stats.upstream_rq_retry == 0
    await assert_settled(mesh)


@async_test
async def test_connect_failures_past_num_retries_answer_503_uf() -> None:
    mesh = RetryMesh(retry=policy("connect-failure", num_retries=2))
    mesh.connector.refuse[A] = 5
    client = mesh.client()
    client.send(GET)
    await until(lambda: client.transport.out)
    assert_local_reply(parse_responses(client.received())[0], 503, "UF")
    assert mesh.connector.attempts == [A, A, A]
    stats = mesh.cluster_stats
    assert (stats.upstream_rq_retry, stats.upstream_rq_retry_limit_exceeded, stats.upstream_cx_connect_fail) == (2, 1, 3)
    await assert_settled(mesh)


@async_test
async def test_reset_before_the_response_is_retried() -> None:
    mesh = RetryMesh(retry=policy("reset"))
    client = mesh.client()
    client.send(GET)
    first = await mesh.upstream(0)
    first.received()
    first.respond(b"HTTP/1.1 200 OK\r\nContent-")  # part of a head, then the upstream goes away
    first.reset()
    second = await mesh.upstream(1)
    await until(lambda: second.transport.out)
    assert second.received() == GET_UPSTREAM
    second.respond(OK)
    resp = parse_responses(client.received())
    assert [r["status"] for r in resp] == [200]
    stats = mesh.cluster_stats
    assert (stats.upstream_rq_rx_reset, stats.upstream_rq_retry, stats.upstream_rq_retry_success) == (1, 1, 1)
    await assert_settled(mesh)


@async_test
async def test_reset_after_the_response_started_is_not_retried() -> None:
    mesh = RetryMesh(retry=policy("reset", "5xx"))
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    up.received()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    up.reset()
    await until(lambda: client.transport.aborted)
    assert len(mesh.connector.connections) == 1
    assert mesh.cluster_stats.upstream_rq_retry == 0
    await until(lambda: mesh.runtime.stats.downstream_cx_active == 0)
    await assert_settled(mesh)


@async_test
async def test_reset_is_not_retried_by_connect_failure() -> None:
    mesh = RetryMesh(retry=policy("connect-failure"))
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    up.received()
    up.reset()
    await until(lambda: client.transport.out)
    assert_local_reply(parse_responses(client.received())[0], 502, "UC")
    assert len(mesh.connector.connections) == 1 and mesh.cluster_stats.upstream_rq_retry == 0
    await assert_settled(mesh)


# --- request bodies ------------------------------------------------------------------------------


@async_test
async def test_content_length_body_is_replayed_whole() -> None:
    mesh = RetryMesh(retry=policy("5xx"))
    client = mesh.client()
    head = b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\n"
    client.send(head + b"01234")  # held while connecting...
    up = await mesh.upstream()
    client.send(b"56789")  # ...then streamed
    sent = b"POST /p HTTP/1.1\r\nhost: svc\r\nContent-Length: 10\r\n\r\n0123456789"
    assert up.received() == sent
    up.respond(response(503))
    assert up.received() == sent
    up.respond(response(201))
    assert parse_responses(client.received())[0]["status"] == 201
    assert mesh.cluster_stats.upstream_rq_retry == 1
    await assert_settled(mesh)


@async_test
async def test_chunked_body_is_replayed_whole() -> None:
    mesh = RetryMesh(retry=policy("5xx"), endpoints=((A, 1), (B, 1)))
    client = mesh.client()
    client.send(b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    first = await mesh.upstream(0)
    client.send(b"6\r\n world\r\n0\r\nX-Trailer: dropped\r\n\r\n")
    sent = (b"POST /up HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert first.received() == sent
    first.respond(response(502))
    second = await mesh.upstream(1)  # round robin: B, on a new connection
    await until(lambda: second.transport.out)
    assert second.received() == sent
    second.respond(response(200, b"done"))
    assert parse_responses(client.received())[0]["body"] == b"done"
    await assert_settled(mesh)


@async_test
async def test_retry_decided_before_the_body_is_complete_replays_it_then_streams_the_rest() -> None:
    mesh = RetryMesh(retry=policy("5xx"))
    client = mesh.client()
    client.send(b"PUT /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\n01234")
    first = await mesh.upstream(0)
    assert first.received().endswith(b"\r\n\r\n01234")
    first.respond(response(503))  # early: the request is not complete, so its connection closes
    second = await mesh.upstream(1)
    await until(lambda: second.transport.out)
    assert second.received() == b"PUT /p HTTP/1.1\r\nhost: svc\r\nContent-Length: 10\r\n\r\n01234"
    client.send(b"56789")
    assert second.received() == b"56789"
    assert first.received() == b""
    second.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    await assert_settled(mesh)


@async_test
async def test_body_longer_than_the_retry_buffer_is_not_retried() -> None:
    mesh = RetryMesh(retry=policy("5xx"))
    client = mesh.client()
    size = RETRY_BUFFER_LIMIT + 1
    client.send(b"POST /big HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % size)
    up = await mesh.upstream()
    piece = b"x" * 65536
    left = size
    while left:
        client.send(piece[:left])
        left -= min(left, len(piece))
    assert len(up.received()) > size
    assert mesh.cluster_stats.upstream_rq_retry_buffer_overflow == 1
    up.respond(response(503, b"full"))
    resp = parse_responses(client.received())[0]
    assert resp["status"] == 503 and resp["body"] == b"full"
    assert up.received() == b"" and len(mesh.connector.connections) == 1
    assert mesh.cluster_stats.upstream_rq_retry == 0
    await assert_settled(mesh)


@async_test
async def test_body_just_within_the_retry_buffer_is_retried() -> None:
    mesh = RetryMesh(retry=policy("5xx"))
    client = mesh.client()
    size = RETRY_BUFFER_LIMIT
    head = b"POST /big HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % size
    client.send(head)
    up = await mesh.upstream()
    client.send(b"y" * size)
    first = up.received()
    up.respond(response(503))
    assert up.received() == first
    up.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    assert mesh.cluster_stats.upstream_rq_retry_buffer_overflow == 0
    await assert_settled(mesh)


# --- per-try timeout -----------------------------------------------------------------------------


@async_test
async def test_per_try_timeout_cuts_a_hanging_try_and_the_retry_answers() -> None:
    mesh = RetryMesh(retry=policy("5xx", per_try_timeout=0.05))
    client = mesh.client()
    loop = asyncio.get_running_loop()
    start = loop.time()
    client.send(GET)
    first = await mesh.upstream(0)
    assert first.received() == GET_UPSTREAM
    second = await mesh.upstream(1)
    assert loop.time() - start >= 0.05
    assert first.transport.aborted  # the hanging try is abandoned
    await until(lambda: second.transport.out)
    assert second.received() == GET_UPSTREAM
    second.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    stats = mesh.cluster_stats
    assert (stats.upstream_rq_per_try_timeout, stats.upstream_rq_retry, stats.upstream_rq_retry_success) == (1, 1, 1)
    assert stats.upstream_rq_timeout == 0
    await assert_settled(mesh)


@async_test
async def test_per_try_timeout_without_a_retry_left_answers_504_ut() -> None:
    mesh = RetryMesh(retry=policy("reset", num_retries=1, per_try_timeout=0.03))
    client = mesh.client()
    client.send(GET)
    await until(lambda: client.transport.out)
    assert_local_reply(parse_responses(client.received())[0], 504, "UT")
    stats = mesh.cluster_stats
    assert (stats.upstream_rq_per_try_timeout, stats.upstream_rq_retry, stats.upstream_rq_retry_limit_exceeded) == (2, 1, 1)
    assert all(t.aborted for _, t in mesh.connector.connections) and len(mesh.connector.connections) == 2
    await assert_settled(mesh)


@async_test
async def test_route_timeout_bounds_all_tries() -> None:
    mesh = RetryMesh(retry=policy("5xx", num_retries=10, per_try_timeout=0.1), timeout=0.25)
    client = mesh.client()
    loop = asyncio.get_running_loop()
    start = loop.time()
    client.send(GET)
    await until(lambda: client.transport.out)
    assert loop.time() - start >= 0.25
    assert_local_reply(parse_responses(client.received())[0], 504, "UT")
    stats = mesh.cluster_stats
    assert stats.upstream_rq_timeout == 1
    assert stats.upstream_rq_retry == stats.upstream_rq_per_try_timeout >= 1
    assert stats.upstream_rq_retry_limit_exceeded == 0
    await asyncio.sleep(0)
    assert all(t.aborted for _, t in mesh.connector.connections)
    await assert_settled(mesh)


@async_test
async def test_per_try_timeout_starts_when_the_connection_is_ready() -> None:
    # Envoy's UpstreamRequest::onPoolReady arms the per-try timeout: connecting (bounded by the
    # cluster's connect_timeout) or waiting for a pooled connection is not part of a try.
    mesh = RetryMesh(retry=policy("5xx", per_try_timeout=0.05), connect_timeout=1.0)
    mesh.connector.delay = 0.1
    client = mesh.client()
    client.send(GET)
    await until(lambda: mesh.connector.connections or client.transport.out)
    assert client.transport.out == b"", f"cut while connecting: {parse_responses(client.received())}"
    up = await mesh.upstream()
    await until(lambda: up.transport.out)
    assert up.received() == GET_UPSTREAM
    up.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    assert mesh.cluster_stats.upstream_rq_per_try_timeout == 0
    assert mesh.connector.attempts == [A]
    await assert_settled(mesh)


# --- back-off ----------------------------------------------------------------------------------


@async_test
async def test_first_retry_waits_a_jittered_back_off_below_base_interval() -> None:
    mesh = RetryMesh(retry=policy("5xx", base_interval=0.2, max_interval=2.0))
    mesh.runtime.random = lambda: 0.5  # first retry: uniform in [0, base) -> 0.1 s
    client = mesh.client()
    loop = asyncio.get_running_loop()
    client.send(GET)
    up = await mesh.upstream()
    up.received()
    up.respond(response(503))
    failed_at = loop.time()
    assert up.received() == b""
    await until(lambda: up.transport.out)
    assert loop.time() - failed_at >= 0.1
    assert up.received() == GET_UPSTREAM
    up.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    assert mesh.cluster_stats.upstream_rq_retry_backoff_exponential == 1
    await assert_settled(mesh)


@async_test
async def test_client_leaving_during_a_back_off_cancels_the_retry() -> None:
    mesh = RetryMesh(retry=policy("5xx", base_interval=0.2, max_interval=2.0))
    mesh.runtime.random = lambda: 0.5  # 0.1 s back-off
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    up.received()
    up.respond(response(503))
    assert mesh.cluster.retries_active == 1  # the retry holds the budget during its back-off
    client.transport.peer_close()
    await until(lambda: mesh.runtime.stats.downstream_cx_active == 0)
    await assert_settled(mesh)
    await asyncio.sleep(0.15)
    assert up.received() == b"" and mesh.cluster_stats.upstream_rq_total == 1


@async_test
async def test_route_timeout_during_a_back_off_answers_504_ut() -> None:
    mesh = RetryMesh(retry=policy("5xx", base_interval=1.0, max_interval=10.0), timeout=0.05)
    mesh.runtime.random = lambda: 0.5  # 0.5 s back-off, longer than the route timeout
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    up.received()
    up.respond(response(503))
    await until(lambda: client.transport.out)
    assert_local_reply(parse_responses(client.received())[0], 504, "UT")
    assert mesh.cluster_stats.upstream_rq_timeout == 1
    await assert_settled(mesh)


# --- retry budget / max_retries ------------------------------------------------------------------


@async_test
async def test_max_retries_zero_refuses_the_retry() -> None:
    mesh = RetryMesh(retry=policy("5xx"), breakers=CircuitBreakerConfig(max_retries=0))
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    up.received()
    up.respond(response(503, b"as-is"))
    resp = parse_responses(client.received())[0]
    assert resp["status"] == 503 and resp["body"] == b"as-is"
    assert up.received() == b""
    stats = mesh.cluster_stats
    assert (stats.upstream_rq_retry_overflow, stats.upstream_rq_retry, stats.upstream_rq_retry_limit_exceeded) == (1, 0, 0)
    await assert_settled(mesh)


@async_test
async def test_retry_beyond_the_budget_is_not_sent() -> None:
    mesh = RetryMesh(retry=policy("5xx"),
                     breakers=CircuitBreakerConfig(retry_budget_percent=20.0, min_retry_concurrency=1))
    first, second = mesh.client(), mesh.client()
    first.send(GET)
    up1 = await mesh.upstream(0)
    second.send(GET)
    up2 = await mesh.upstream(1)
    up1.received()
    up2.received()
    up1.respond(response(503))
    assert up1.received() == GET_UPSTREAM  # the first retry fits min_retry_concurrency
    assert mesh.cluster.retries_active == 1
    up2.respond(response(503, b"second"))  # 20% of 2 requests < 1 active retry: over the budget
    resp = parse_responses(second.received())[0]
    assert resp["status"] == 503 and resp["body"] == b"second"
    assert up2.received() == b"" and len(mesh.connector.connections) == 2
    up1.respond(OK)
    assert parse_responses(first.received())[0]["status"] == 200
    stats = mesh.cluster_stats
    assert (stats.upstream_rq_retry, stats.upstream_rq_retry_overflow, stats.upstream_rq_retry_success) == (1, 1, 1)
    await assert_settled(mesh)


@async_test
async def test_retry_budget_is_a_whole_number_of_retries() -> None:
    # Envoy: max = max<uint64_t>(percent / 100 * (active + pending), min_retry_concurrency): 50% of 3
    # requests allows 1 concurrent retry, not 1.5.
    mesh = RetryMesh(retry=policy("5xx"),
                     breakers=CircuitBreakerConfig(retry_budget_percent=50.0, min_retry_concurrency=1))
    clients = [mesh.client() for _ in range(3)]
    ups = []
    for i, client in enumerate(clients):
        client.send(GET)
        ups.append(await mesh.upstream(i))
        ups[-1].received()
    ups[0].respond(response(503))
    assert ups[0].received() == GET_UPSTREAM  # 1 retry in flight; 3 requests active
    ups[1].respond(response(503, b"refused"))
    assert ups[1].received() == b"", "a second concurrent retry was sent"
    resp = parse_responses(clients[1].received())[0]
    assert resp["status"] == 503 and resp["body"] == b"refused"
    assert mesh.cluster_stats.upstream_rq_retry_overflow == 1
    ups[0].respond(OK)
    ups[2].respond(OK)
    await assert_settled(mesh)


@async_test
async def test_retry_refused_by_max_requests_after_its_back_off_answers_503_uo() -> None:
    mesh = RetryMesh(retry=policy("5xx", base_interval=0.1, max_interval=1.0),
                     breakers=CircuitBreakerConfig(max_requests=2))
    mesh.runtime.random = lambda: 0.5  # 0.05 s back-off
    a, b, c = mesh.client(), mesh.client(), mesh.client()
    a.send(GET)
    up_a = await mesh.upstream(0)
    b.send(GET)
    up_b = await mesh.upstream(1)
    up_a.received()
    up_b.received()
    up_b.respond(response(503))
    c.send(GET)  # takes the slot b's try gave back (and its pooled connection), during b's back-off
    assert up_b.received() == GET_UPSTREAM
    await until(lambda: b.transport.out)
    assert_local_reply(parse_responses(b.received())[0], 503, "UO")
    assert mesh.cluster_stats.upstream_rq_pending_overflow == 1
    assert len(mesh.connector.connections) == 2
    up_a.respond(OK)
    up_b.respond(OK)
    assert parse_responses(a.received())[0]["status"] == 200
    assert parse_responses(c.received())[0]["status"] == 200
    await assert_settled(mesh)


# --- circuit breakers ----------------------------------------------------------------------------


@async_test
async def test_max_requests_overflow_answers_503_uo_at_once() -> None:
    mesh = RetryMesh(breakers=CircuitBreakerConfig(max_requests=1))
    first, second = mesh.client(), mesh.client()
    first.send(GET)
    up = await mesh.upstream()
    second.send(GET)
    resp = parse_responses(second.received())[0]  # answered synchronously: nothing queues
    assert_local_reply(resp, 503, "UO")
    assert resp["headers"]["x-meshkeeper-flags"] == "UO"
    assert not second.transport.closed
    assert mesh.cluster_stats.upstream_rq_pending_overflow == 1
    assert mesh.runtime.stats.downstream_rq_overflow == 1
    assert len(mesh.connector.connections) == 1
    assert up.received() == GET_UPSTREAM
    up.respond(OK)
    assert parse_responses(first.received())[0]["status"] == 200
    second.send(GET)  # room again
    assert up.received() == GET_UPSTREAM
    up.respond(OK)
    assert parse_responses(second.received())[0]["status"] == 200
    await assert_settled(mesh)


@async_test
async def test_max_pending_requests_overflow_answers_503_uo() -> None:
    mesh = RetryMesh(breakers=CircuitBreakerConfig(max_pending_requests=1))
    mesh.connector.gate = asyncio.Event()
    first, second = mesh.client(), mesh.client()
    first.send(GET)  # pending: its connection is being opened
    assert mesh.cluster_stats.upstream_rq_pending_active == 1
    second.send(GET)
    assert_local_reply(parse_responses(second.received())[0], 503, "UO")
    assert mesh.cluster_stats.upstream_rq_pending_overflow == 1
    assert mesh.runtime.stats.downstream_rq_overflow == 1
    mesh.connector.gate.set()
    up = await mesh.upstream()
    await until(lambda: up.transport.out)
    assert mesh.cluster_stats.upstream_rq_pending_active == 0
    assert up.received() == GET_UPSTREAM
    up.respond(OK)
    assert parse_responses(first.received())[0]["status"] == 200
    assert len(mesh.connector.attempts) == 1
    assert mesh.cluster_stats.upstream_rq_pending_total == 1
    await assert_settled(mesh)


@async_test
async def test_max_connections_queues_a_request_for_the_busy_connection() -> None:
    mesh = RetryMesh(breakers=CircuitBreakerConfig(max_connections=1))
    first, second = mesh.client(), mesh.client()
    first.send(GET)
    up = await mesh.upstream()
    assert up.received() == GET_UPSTREAM
    second.send(b"GET /second HTTP/1.1\r\nHost: svc\r\n\r\n")
    stats = mesh.cluster_stats
    assert stats.upstream_cx_overflow == 1
    assert stats.upstream_rq_pending_active == 1 and mesh.endpoint.pool.waiting == 1
    await asyncio.sleep(0.01)
    assert len(mesh.connector.attempts) == 1 and second.transport.out == b""
    up.respond(response(200, b"first"))
    assert parse_responses(first.received())[0]["body"] == b"first"
    await until(lambda: up.transport.out)  # the freed connection is handed to the waiting request
    assert up.received() == b"GET /second HTTP/1.1\r\nhost: svc\r\n\r\n"
    assert stats.upstream_rq_pending_active == 0 and mesh.endpoint.pool.waiting == 0
    up.respond(response(200, b"second"))
    assert parse_responses(second.received())[0]["body"] == b"second"
    assert len(mesh.connector.connections) == 1 and stats.upstream_cx_total == 1
    assert stats.upstream_rq_pending_total == 2  # the first waited for its connection too
    await assert_settled(mesh)


@async_test
async def test_max_connections_counts_connections_still_being_opened() -> None:
    # Envoy counts a connecting client against max_connections (the ActiveClient takes the
    # resource when created), and its "an endpoint without connections may open one" exception
    # does not apply while the endpoint has a connecting one.
    mesh = RetryMesh(breakers=CircuitBreakerConfig(max_connections=1))
    first, second = mesh.client(), mesh.client()
    first.send(GET)
    second.send(GET)  # same loop turn: the first connection is not open yet
    up = await mesh.upstream()
    await asyncio.sleep(0.01)
    assert len(mesh.connector.attempts) == 1
    assert mesh.cluster_stats.upstream_cx_overflow == 1
    assert up.received() == GET_UPSTREAM
    up.respond(OK)
    await until(lambda: up.transport.out)
    assert up.received() == GET_UPSTREAM
    up.respond(OK)
    assert parse_responses(first.received())[0]["status"] == 200
    assert parse_responses(second.received())[0]["status"] == 200
    await assert_settled(mesh)


@async_test
async def test_max_connections_queue_is_bounded_by_max_pending_requests() -> None:
    mesh = RetryMesh(breakers=CircuitBreakerConfig(max_connections=1, max_pending_requests=1))
    a, b, c = mesh.client(), mesh.client(), mesh.client()
    a.send(GET)
    up = await mesh.upstream()
    b.send(GET)  # waits for a's connection
    c.send(GET)  # no room left in the queue
    assert_local_reply(parse_responses(c.received())[0], 503, "UO")
    assert mesh.cluster_stats.upstream_rq_pending_overflow == 1
    up.received()
    up.respond(OK)
    await until(lambda: up.transport.out)
    up.received()
    up.respond(OK)
    assert parse_responses(b.received())[0]["status"] == 200
    await assert_settled(mesh)


@async_test
async def test_waiter_whose_client_goes_away_leaves_the_queue() -> None:
    mesh = RetryMesh(breakers=CircuitBreakerConfig(max_connections=1))
    first, second = mesh.client(), mesh.client()
    first.send(GET)
    up = await mesh.upstream()
    up.received()
    second.send(GET)
    assert mesh.endpoint.pool.waiting == 1
    second.transport.peer_close()
    await until(lambda: mesh.endpoint.pool.waiting == 0)
    assert mesh.cluster_stats.upstream_rq_pending_active == 0
    assert mesh.cluster_stats.upstream_rq_active == 1
    up.respond(OK)
    assert parse_responses(first.received())[0]["status"] == 200
    await asyncio.sleep(0.01)
    assert up.received() == b"" and mesh.endpoint.pool.idle_count == 1  # nobody took it: idle
    await assert_settled(mesh)


# --- fault injection -----------------------------------------------------------------------------


@async_test
async def test_fault_abort_answers_the_configured_status_without_an_upstream() -> None:
    mesh = RetryMesh(fault=FaultConfig(abort_status=418, abort_percent=100.0),
                     retry=policy("5xx", "retriable-status-codes", retriable_status_codes=frozenset({418})))
    client = mesh.client()
    client.send(GET)
    resp = parse_responses(client.received())[0]
    assert_local_reply(resp, 418, "FI")
    assert not client.transport.closed
    await asyncio.sleep(0.01)
    assert mesh.connector.attempts == [] and mesh.cluster_stats.upstream_rq_total == 0
    assert mesh.runtime.stats.fault_aborts_injected == 1
    assert mesh.cluster_stats.upstream_rq_retry == 0  # a fault is not an upstream answer to retry
    await assert_settled(mesh)


@async_test
async def test_fault_abort_percent_follows_the_random_draw() -> None:
    mesh = RetryMesh(fault=FaultConfig(abort_status=503, abort_percent=50.0))
    client = mesh.client()
    mesh.runtime.random = lambda: 0.4  # 40 < 50: aborted
    client.send(GET)
    assert_local_reply(parse_responses(client.received())[0], 503, "FI")
    mesh.runtime.random = lambda: 0.6  # 60 >= 50: forwarded
    client.send(GET)
    up = await mesh.upstream()
    assert up.received() == GET_UPSTREAM
    up.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    assert mesh.runtime.stats.fault_aborts_injected == 1
    await assert_settled(mesh)


@async_test
async def test_fault_delay_holds_the_request_for_the_configured_delay() -> None:
    # The route timeout (shorter than the delay here) starts after the fault filter let it through.
    mesh = RetryMesh(fault=FaultConfig(delay=0.05, delay_percent=100.0), timeout=0.03)
    client = mesh.client()
    loop = asyncio.get_running_loop()
    start = loop.time()
    client.send(GET)
    await asyncio.sleep(0.01)
    assert mesh.connector.attempts == []
    up = await mesh.upstream()
    await until(lambda: up.transport.out)
    assert loop.time() - start >= 0.05
    assert up.received() == GET_UPSTREAM
    up.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    assert mesh.runtime.stats.fault_delays_injected == 1
    assert mesh.cluster_stats.upstream_rq_timeout == 0
    await assert_settled(mesh)


@async_test
async def test_fault_delay_percent_follows_the_random_draw() -> None:
    mesh = RetryMesh(fault=FaultConfig(delay=5.0, delay_percent=50.0))
    mesh.runtime.random = lambda: 0.6  # not delayed
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    assert up.received() == GET_UPSTREAM
    up.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    assert mesh.runtime.stats.fault_delays_injected == 0
    await assert_settled(mesh)


@async_test
async def test_fault_delay_then_abort() -> None:
    mesh = RetryMesh(fault=FaultConfig(delay=0.03, delay_percent=100.0, abort_status=500, abort_percent=100.0))
    client = mesh.client()
    client.send(GET)
    assert client.transport.out == b""
    await until(lambda: client.transport.out)
    assert_local_reply(parse_responses(client.received())[0], 500, "FI")
    assert mesh.connector.attempts == []
    stats = mesh.runtime.stats
    assert (stats.fault_delays_injected, stats.fault_aborts_injected) == (1, 1)
    await assert_settled(mesh)


@async_test
async def test_client_leaving_during_a_fault_delay() -> None:
    mesh = RetryMesh(fault=FaultConfig(delay=0.05, delay_percent=100.0))
    client = mesh.client()
    client.send(GET)
    client.transport.peer_close()
    await until(lambda: mesh.runtime.stats.downstream_cx_active == 0)
    await asyncio.sleep(0.08)
    assert mesh.connector.attempts == []
    await assert_settled(mesh)


# --- regressions found in review ------------------------------------------------------------------


@async_test
async def test_a_waiter_is_woken_when_the_connect_it_waited_behind_fails() -> None:
    # max_connections=1: the second request queues behind the first one's connect; that connect is
    # refused, so no connection is ever released. The waiter must still get its turn at once.
    mesh = RetryMesh(breakers=CircuitBreakerConfig(max_connections=1), timeout=5.0)
    mesh.connector.refuse[A] = 2
    first, second = mesh.client(), mesh.client()
    first.send(GET)
    second.send(GET)
    await until(lambda: first.transport.out and second.transport.out)
    assert_local_reply(parse_responses(first.received())[0], 503, "UF")
    assert_local_reply(parse_responses(second.received())[0], 503, "UF")  # not a 504 after 5 s
    await assert_settled(mesh)


@async_test
async def test_per_try_timeout_stops_once_the_response_has_started() -> None:
    mesh = RetryMesh(retry=policy("5xx", per_try_timeout=0.05))
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    up.received()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 0.15  # three per-try timeouts
    await until(lambda: loop.time() > deadline)
    assert not client.transport.aborted
    up.respond(b"cd")
    resp = parse_responses(client.received())[0]
    assert resp["status"] == 200 and resp["body"] == b"abcd" and resp["complete"]
    assert mesh.cluster_stats.upstream_rq_per_try_timeout == 0
    await assert_settled(mesh)


@async_test
async def test_a_retry_resumes_reading_a_body_paused_by_the_failed_try() -> None:
    # The first try's upstream write buffer fills (reading from the client pauses), then that
    # upstream resets: the retry on a fresh connection must read the rest of the body.
    mesh = RetryMesh(retry=policy("reset"))
    transports: list[FakeTransport] = []

    async def connector(factory: Any, host: str, port: int) -> tuple[Any, Any]:
        protocol = factory()
        transport = FakeTransport(protocol, high_water=10 if not transports else None)
        transports.append(transport)
        protocol.connection_made(transport)
        mesh.connector.connections.append((protocol, transport))
        return transport, protocol

    for endpoint in mesh.cluster.endpoints.values():
        endpoint.pool._connector = connector
    client = mesh.client()
    client.send(b"POST /r HTTP/1.1\r\nHost: svc\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
    await until(lambda: transports and not client.transport.reading)
    transports[0].peer_close()
    await until(lambda: len(transports) == 2)
    await until(lambda: client.transport.reading)
    client.send(b"y" * 50)
    sent = transports[1].take()
    assert sent.endswith(b"x" * 50 + b"y" * 50)
    Upstream(*mesh.connector.connections[1]).respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    await assert_settled(mesh)


@async_test
async def test_a_body_outgrowing_the_buffer_after_the_retry_was_decided_answers_503_urx() -> None:
    # The 503's head arrives while the upload is still small (retriable), its body is read and
    # dropped while the rest of the upload pushes the kept body past the limit: nothing to replay.
    mesh = RetryMesh(retry=policy("5xx"))
    client = mesh.client()
    client.send(b"POST /r HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % (RETRY_BUFFER_LIMIT + 10)
                + b"x" * 10)
    up = await mesh.upstream()
    up.received()
    up.respond(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nab")
    client.send(b"y" * RETRY_BUFFER_LIMIT)
    up.respond(b"cde")
    assert_local_reply(parse_responses(client.received())[0], 503, "URX")
    assert mesh.cluster_stats.upstream_rq_retry_buffer_overflow == 1
    assert len(mesh.connector.connections) == 1  # no retry was sent
    await assert_settled(mesh)
