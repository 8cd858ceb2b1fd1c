"""Per-request telemetry of the connection manager (sidecar.proxy.telemetry) on fake transports:
request ids, trace headers sent upstream, spans per attempt, access log lines, request metrics.

The tracer is a recording stand-in with the real :class:`~sidecar.tracing.context.Sampler`; the
export path itself is tested against a real OTLP receiver in test_tracing_export.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Any

from sidecar.accesslog import AccessLog
from sidecar.tracing.context import Sampler
from sidecar.tracing.export import CLIENT, SERVER
from tests.support.fakes import async_test
from tests.unit.test_http_proxy import OK, Mesh, parse_responses
from tests.unit.test_router_retries import GET, RetryMesh, policy, response

UUID4 = rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
TRACEPARENT = re.compile(rb"traceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-0([01])\r\n")


class RecordingTracer:
    def __init__(self, ratio: float = 1.0) -> None:
        self.sampler = Sampler(ratio)
        self.spans: list[dict[str, Any]] = []

    def record(self, name, kind, trace_id, span_id, parent_id, start_ns, end_ns, attributes, error, tracestate=b""):
        self.spans.append({"name": name, "kind": kind, "trace_id": trace_id, "span_id": span_id,
                           "parent_id": parent_id, "start_ns": start_ns, "end_ns": end_ns,
                           "attributes": attributes, "error": error, "tracestate": tracestate})


def traced(mesh: Mesh | RetryMesh, ratio: float = 1.0) -> RecordingTracer:
    tracer = RecordingTracer(ratio)
    mesh.runtime.set_tracing(tracer, None)
    mesh.runtime.service, mesh.runtime.namespace = "web", "prod"
    return tracer


def raw(up) -> bytes:
    return up.transport.take()


@async_test
async def test_request_id_is_generated_once_or_kept_and_trace_headers_pass_through_when_tracing_is_off():
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\ntraceparent: 00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01\r\n\r\n")
    up = await mesh.upstream()
    head = raw(up)
    assert len(re.findall(rb"x-request-id: " + UUID4 + rb"\r\n", head)) == 1
    assert b"traceparent: 00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01\r\n" in head  # untouched: no tracer
    up.respond(OK)
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\nX-Request-Id: caller-1\r\n\r\n")
    head = raw(up)
    assert head.count(b"x-request-id") == 1 and b"x-request-id: caller-1\r\n" in head
    assert b"X-Request-Id" not in head


@async_test
async def test_new_trace_is_sampled_by_ratio_and_injected_with_this_hops_span():
    mesh = Mesh()
    tracer = traced(mesh, ratio=1.0)
    client = mesh.client()
    client.send(b"GET /items?x=1 HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    m = TRACEPARENT.search(raw(up))
    assert m and m.group(3) == b"1"
    up.respond(OK)
    (span,) = tracer.spans
    assert span["kind"] == CLIENT and span["name"] == "GET" and not span["error"]
    assert f"{span['trace_id']:032x}".encode() == m.group(1) and f"{span['span_id']:016x}".encode() == m.group(2)
    assert span["parent_id"] == 0 and span["start_ns"] <= span["end_ns"]
    a = span["attributes"]
    assert a["url.full"] == "http://svc/items?x=1" and a["http.response.status_code"] == 200
    assert a["meshkeeper.upstream_cluster"] == "svc" and a["meshkeeper.upstream_host"] == "10.0.0.1:8080"
    assert a["meshkeeper.service"] == "web" and a["meshkeeper.namespace"] == "prod"
    assert re.fullmatch(UUID4.decode(), a["meshkeeper.request_id"])


@async_test
async def test_ratio_zero_still_propagates_an_unsampled_decision_and_records_nothing():
    mesh = Mesh()
    tracer = traced(mesh, ratio=0.0)
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    up = await mesh.upstream()
    m = TRACEPARENT.search(raw(up))
    assert m and m.group(3) == b"0"
    up.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    assert tracer.spans == []


@async_test
async def test_sampled_parent_is_followed_even_at_ratio_zero_and_b3_is_answered_in_kind():
    mesh = Mesh()
    tracer = traced(mesh, ratio=0.0)
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\nX-B3-TraceId: 463ac35c9f6413ad48485a3953bb6124\r\n"
                b"X-B3-SpanId: a2fb4a1d1a96d312\r\nX-B3-Sampled: 1\r\n\r\n")
    up = await mesh.upstream()
    head = raw(up)
    m = TRACEPARENT.search(head)
    assert m.group(1) == b"463ac35c9f6413ad48485a3953bb6124" and m.group(3) == b"1"
    assert b"x-b3-traceid: 463ac35c9f6413ad48485a3953bb6124\r\n" in head.lower()
    assert b"X-B3-SpanId: a2fb4a1d1a96d312" not in head  # replaced by this hop's span
    up.respond(OK)
    (span,) = tracer.spans
    assert span["parent_id"] == 0xA2FB4A1D1A96D312


@async_test
async def test_each_retry_is_a_span_of_its_own_with_its_resend_count():
    mesh = RetryMesh(retry=policy("5xx"))
    tracer = traced(mesh)
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\ntraceparent: 00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01\r\n\r\n")
    up = await mesh.upstream()
    first = TRACEPARENT.search(raw(up)).group(2)
    up.respond(response(503, b"busy"))
    second = TRACEPARENT.search(raw(up)).group(2)
    assert first != second  # the retry names its own span as the parent
    up.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    failed, ok = tracer.spans
    assert [f"{s['span_id']:016x}".encode() for s in tracer.spans] == [first, second]
    assert failed["parent_id"] == ok["parent_id"] == 0x2222222222222222
    assert failed["attributes"]["http.response.status_code"] == 503 and failed["error"]
    assert "http.request.resend_count" not in failed["attributes"]
    assert ok["attributes"]["http.request.resend_count"] == 1 and not ok["error"]
    assert failed["end_ns"] <= ok["start_ns"]


@async_test
async def test_local_reply_span_and_access_log_carry_the_response_flag():
    mesh = Mesh()
    tracer = traced(mesh)
    out = io.BytesIO()
    mesh.runtime.access_log = AccessLog(out)
    client = mesh.client()
    client.send(b"GET /nowhere HTTP/1.1\r\nHost: unknown\r\n\r\n")
    assert parse_responses(client.received())[0]["status"] == 404
    (span,) = tracer.spans
    assert span["error"] and span["attributes"]["meshkeeper.response_flags"] == "NR"
    assert span["attributes"]["error.type"] == "NR"
    mesh.runtime.access_log.close()
    (line,) = [json.loads(x) for x in out.getvalue().splitlines()]
    assert line["response_code"] == 404 and line["response_flags"] == "NR" and line["route_name"] is None
    assert line["trace_id"] == f"{span['trace_id']:032x}" and line["upstream_host"] is None
    assert line["listener"] == "outbound" and line["path"] == "/nowhere" and line["authority"] == "unknown"


@async_test
async def test_server_span_on_inbound_and_request_counts_by_route_cluster_and_class():
    mesh = Mesh()
    mesh.runtime.span_kind = SERVER
    tracer = traced(mesh)
    client = mesh.client()
    for body in (OK, b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n", OK):
        client.send(b"GET /p?q=1 HTTP/1.1\r\nHost: svc\r\n\r\n")
        up = await mesh.upstream()
        up.respond(body)
    statuses = [r["status"] for r in parse_responses(client.received())]
    assert statuses == [200, 500, 200]
    assert [s["kind"] for s in tracer.spans] == [SERVER] * 3
    assert [s["error"] for s in tracer.spans] == [False, True, False]
    a = tracer.spans[0]["attributes"]
    assert a["url.path"] == "/p" and a["url.query"] == "q=1" and a["url.scheme"] == "http"
    assert list(mesh.runtime.route_stats.values()) == [[0, 2, 0, 0, 1]]
    (route, cluster), = mesh.runtime.route_stats
    assert cluster == "svc" and route
    assert mesh.runtime.rq_time.count == 3
    assert mesh.clusters.get("svc").rq_time.count == 3


def log_lines(mesh: Mesh | RetryMesh, out: io.BytesIO) -> list[dict[str, Any]]:
    mesh.runtime.access_log.close()  # hands the lines to the writer and waits for it
    return [json.loads(x) for x in out.getvalue().splitlines()]


@async_test
async def test_a_client_leaving_while_a_retriable_503_is_dropped_is_logged_dc_not_503():
    mesh = RetryMesh(retry=policy("5xx"))
    out = io.BytesIO()
    mesh.runtime.access_log = AccessLog(out)
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    up.respond(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 100\r\n\r\npartial")  # being dropped
    client.transport.peer_close()
    await asyncio.sleep(0)
    (line,) = log_lines(mesh, out)
    assert line["response_code"] == 0 and line["response_flags"] == "DC", line
    assert mesh.runtime.route_stats == {}  # no response was sent: no status class counted


@async_test
async def test_a_pipelined_request_refused_400_is_logged_as_400_after_the_one_before_it():
    mesh = Mesh()
    out = io.BytesIO()
    mesh.runtime.access_log = AccessLog(out)
    client = mesh.client()
    client.send(b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\nGET /b HTTP/1.1\r\n\r\n")  # the second has no Host
    up = await mesh.upstream()
    up.respond(OK)
    assert [r["status"] for r in parse_responses(client.received())] == [200, 400]
    lines = log_lines(mesh, out)
    assert {(x["path"], x["response_code"], x["response_flags"]) for x in lines} == {("/a", 200, "-"),
                                                                                    ("/b", 400, "DPE")}


@async_test
async def test_a_response_cut_short_is_an_error_span_dc_when_the_client_left_uc_when_the_upstream_did():
    mesh = Mesh()
    out = io.BytesIO()
    mesh.runtime.access_log = AccessLog(out)
    tracer = traced(mesh)
    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    client.transport.peer_close()  # the client leaves mid-body
    await asyncio.sleep(0)
    (line,) = log_lines(mesh, out)
    assert (line["response_code"], line["response_flags"], line["bytes_sent"]) == (200, "DC", 7)
    assert tracer.spans[-1]["error"] and tracer.spans[-1]["attributes"]["meshkeeper.response_flags"] == "DC"

    client = mesh.client()
    client.send(GET)
    up = await mesh.upstream(1)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    up.reset()  # the upstream leaves mid-body: the downstream is reset
    for _ in range(5):
        await asyncio.sleep(0)
    span = tracer.spans[-1]
    assert span["error"] and span["attributes"]["meshkeeper.response_flags"] == "UC"


@async_test
async def test_the_first_request_id_is_kept_and_an_empty_one_counts_as_none():
    mesh = Mesh()
    client = mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\nX-Request-Id: one\r\nX-Request-Id: two\r\n\r\n")
    up = await mesh.upstream()
    head = raw(up)
    assert b"x-request-id: one\r\n" in head and b"two" not in head
    up.respond(OK)
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\nX-Request-Id:\r\n\r\n")
    head = raw(up)
    assert re.search(rb"x-request-id: " + UUID4 + rb"\r\n", head) and head.count(b"x-request-id") == 1
