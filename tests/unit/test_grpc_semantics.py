"""gRPC on the request path (sidecar.proxy.grpc), driven through the connection manager with fake
transports: local replies as gRPC statuses, grpc-timeout, retries and outlier detection by
grpc-status. The codec is HTTP/1.1 here (a request with content-type application/grpc): what is
tested is the path behind the codec; HTTP/2 framing has its own tests (test_http2_codec)."""

from __future__ import annotations

import time

import pytest

from sidecar.config import ClusterConfig, EndpointConfig, OutlierConfig
from sidecar.proxy import grpc
from tests.support.fakes import async_test, until
from tests.unit.test_http_proxy import Mesh, parse_responses
from tests.unit.test_router_retries import A, B, RetryMesh, policy

CALL = (b"POST /pkg.Catalog/Get HTTP/1.1\r\nHost: svc\r\ncontent-type: application/grpc\r\n"
        b"te: trailers\r\ncontent-length: 5\r\n%s\r\n\x00\x00\x00\x00\x00")
OK_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ncontent-length: 7\r\n\r\n"
               b"\x00\x00\x00\x00\x02hi")


def call(extra: bytes = b"") -> bytes:
    return CALL % extra


def trailers_only(code: int) -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: %d\r\n"
            b"grpc-message: down\r\ncontent-length: 0\r\n\r\n" % code)


# --- the module's tables ------------------------------------------------------------------------


@pytest.mark.parametrize("value, seconds", [
    (b"100m", 0.1), (b"2S", 2.0), (b"1M", 60.0), (b"1H", 3600.0), (b"250000u", 0.25), (b"5n", 5e-9),
    (b"", None), (b"10", None), (b"10x", None), (b"123456789S", None), (b"-1S", None),
])
def test_grpc_timeout_is_read_as_grpc_specifies_it(value: bytes, seconds: float | None) -> None:
    assert grpc.timeout([b"grpc-timeout", b": ", value, b"\r\n"]) == seconds
    assert grpc.timeout([b"Grpc-Timeout", b": ", value, b"\r\n"]) == seconds  # an HTTP/1.1 name keeps its case


def test_statuses_map_as_envoy_maps_them() -> None:
    assert [grpc.http_status(c) for c in (0, 1, 4, 8, 13, 14, 16)] == [200, 499, 504, 429, 500, 503, 401]
    assert grpc.http_status(99) == 500
    assert grpc.status_for_reply(503, "UH") == grpc.UNAVAILABLE
    assert grpc.status_for_reply(429, "RL") == grpc.UNAVAILABLE
    assert grpc.status_for_reply(404, "NR") == grpc.UNIMPLEMENTED
    assert grpc.status_for_reply(504, "UT") == grpc.DEADLINE_EXCEEDED
    assert grpc.status_for_reply(500, "FI") == grpc.UNKNOWN


def test_status_of_a_head_or_trailers() -> None:
    assert grpc.status_of([b"grpc-status", b": ", b"14", b"\r\n"]) == 14
    assert grpc.status_of([b"grpc-status", b": ", b"x", b"\r\n"]) == grpc.UNKNOWN
    assert grpc.status_of([b"content-type", b": ", b"application/grpc", b"\r\n"]) is None


# --- local replies -------------------------------------------------------------------------------


@async_test
async def test_local_replies_to_a_grpc_call_are_trailers_only_statuses() -> None:
    mesh = Mesh()
    client = mesh.client()
    client.send(call().replace(b"Host: svc", b"Host: empty"))  # a cluster without endpoints: 503 UH
    client.send(call().replace(b"Host: svc", b"Host: nowhere"))  # no route: 404 NR
    first, second = parse_responses(client.received())
    assert first["status"] == 200 and first["body"] == b""
    assert first["headers"]["grpc-status"] == str(grpc.UNAVAILABLE)
    assert first["headers"]["grpc-message"] == "no healthy upstream"
    assert first["headers"]["x-meshkeeper-flags"] == "UH"
    assert first["headers"]["content-type"] == "application/grpc"
    assert second["headers"]["grpc-status"] == str(grpc.UNIMPLEMENTED)
    assert not client.transport.closed  # a local reply to a gRPC call keeps the connection
    assert sorted(code for (_, _, code) in mesh.runtime.grpc_stats) == [grpc.UNIMPLEMENTED, grpc.UNAVAILABLE]


@async_test
async def test_grpc_timeout_bounds_the_route_timeout_and_answers_deadline_exceeded() -> None:
    mesh = Mesh(timeout=15.0)
    client = mesh.client()
    start = time.monotonic()
    client.send(call(b"grpc-timeout: 50m\r\n"))
    up = await mesh.upstream()
    assert b"grpc-timeout: 50m" in up.received()  # forwarded: the app sees the caller's deadline too
    await until(lambda: client.transport.out, limit=2.0)
    elapsed = time.monotonic() - start
    (resp,) = parse_responses(client.received())
    assert resp["headers"]["grpc-status"] == str(grpc.DEADLINE_EXCEEDED)
    assert resp["headers"]["x-meshkeeper-flags"] == "UT"
    assert 0.04 <= elapsed < 1.0, elapsed


@async_test
async def test_a_route_without_a_timeout_takes_the_callers_deadline() -> None:
    mesh = Mesh(timeout=0.0)
    client = mesh.client()
    client.send(call(b"grpc-timeout: 30m\r\n"))
    await mesh.upstream()
    await until(lambda: client.transport.out, limit=2.0)
    (resp,) = parse_responses(client.received())
    assert resp["headers"]["grpc-status"] == str(grpc.DEADLINE_EXCEEDED)


@async_test
async def test_an_http_request_ignores_grpc_timeout() -> None:
    mesh = Mesh(timeout=15.0)
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\ngrpc-timeout: 1m\r\n\r\n")
    up = await mesh.upstream()
    up.received()
    assert not client.transport.out  # no 1 ms deadline for a request that is not gRPC
    up.respond(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert parse_responses(client.received())[0]["status"] == 200


# --- retries and outlier detection by grpc-status ---------------------------------------------


@async_test
async def test_unavailable_trailers_only_is_retried_on_another_endpoint() -> None:
    mesh = RetryMesh(retry=policy("unavailable", num_retries=1, avoid_previous_hosts=True),
                     endpoints=((A, 1), (B, 1)))
    client = mesh.client()
    client.send(call())
    first = await mesh.upstream(0)
    first.respond(trailers_only(grpc.UNAVAILABLE))
    second = await mesh.upstream(1)
    assert {mesh.host_of(first), mesh.host_of(second)} == {A, B}
    second.respond(OK_RESPONSE)
    (resp,) = parse_responses(client.received())
    assert resp["status"] == 200 and resp["body"] == b"\x00\x00\x00\x00\x02hi"
    assert mesh.cluster.stats.upstream_rq_retry == 1
    assert mesh.ep(mesh.host_of(first)).rq_error == 1  # the UNAVAILABLE try counts as an error (LRS)


@async_test
async def test_a_status_the_policy_does_not_name_is_passed_on() -> None:
    mesh = RetryMesh(retry=policy("unavailable", num_retries=1), endpoints=((A, 1), (B, 1)))
    client = mesh.client()
    client.send(call())
    up = await mesh.upstream(0)
    up.respond(trailers_only(grpc.INTERNAL))
    (resp,) = parse_responses(client.received())
    assert resp["headers"]["grpc-status"] == str(grpc.INTERNAL)  # unchanged, not retried
    assert mesh.cluster.stats.upstream_rq_retry == 0


@async_test
async def test_consecutive_unavailable_statuses_eject_the_endpoint() -> None:
    mesh = Mesh()
    clusters = mesh.clusters
    clusters.update_clusters({"svc": ClusterConfig("svc", outlier=OutlierConfig(consecutive_5xx=3))})
    clusters.update_endpoints("svc", (EndpointConfig("10.0.0.1", 8080), EndpointConfig("10.0.0.2", 8080)))
    client = mesh.client()
    for _ in range(6):  # round robin: three calls land on each endpoint
        client.send(call())
        await until(lambda: any(p.decoder is not None for p, _ in mesh.connector.connections))
        conn = next(p for p, _ in mesh.connector.connections if p.decoder is not None)
        conn.data_received(trailers_only(grpc.UNAVAILABLE) if conn.pool.host == "10.0.0.1" else OK_RESPONSE)
        (resp,) = parse_responses(client.received())
        assert resp["status"] == 200  # the HTTP status says nothing of the outcome...
    ejected = [ep.config.address for ep in clusters.get("svc").endpoints.values() if ep.ejected]
    assert ejected == ["10.0.0.1"]  # ...the grpc-status does
    assert clusters.get("svc").stats.outlier_detection_ejections_enforced_consecutive_5xx == 1
