"""The trace store's Jaeger query API (shapes of Jaeger's model/json and query envelope) and its
OTLP Export over a real grpc.aio server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from controlplane.auth import Authorizer, TokenFile
from controlplane.metrics import Metrics
from controlplane.tracestore.otlp import TraceService, add_to_server
from controlplane.tracestore.query import JaegerQuery, parse_duration
from controlplane.tracestore.store import BUCKET_NS, TraceStore
from controlplane.web import Web
from tests.support.otlp_spans import SERVER, T0, export_request, span, two_hop_trace
from tests.support.otlp_spans import add_to_store as add

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
MS = 1_000_000
NOW = T0 + 60 * BUCKET_NS

# Jaeger's model/json: field -> JSON type(s).
SPAN_FIELDS = {"traceID": str, "spanID": str, "operationName": str, "references": list, "startTime": int,
               "duration": int, "tags": list, "logs": list, "processID": str, "warnings": type(None)}
KV_TYPES = {"string": str, "bool": bool, "int64": int, "float64": float, "binary": str}


@pytest.fixture
def store() -> TraceStore:
    s = TraceStore()
    trace = two_hop_trace(TRACE, T0 + MS, duration=5 * MS, n=7)
    trace["catalog"][0].events.add(name="retry", time_unix_nano=T0 + 2 * MS + 999)
    trace["catalog"][0].events[0].attributes.add(key="attempt").value.int_value = 2
    trace["catalog"][0].trace_state = "vendor=x"
    add(s, trace)
    add(s, two_hop_trace(2, T0 + 10 * MS, duration=50 * MS, error=True, n=8))
    add(s, {"catalog": [span(trace_id=3, span_id=9, name="GET /slow", kind=SERVER, start=T0 + 20 * MS,
                             duration=1500 * MS, attrs={"ratio": 0.25, "ok": True}, status_message="boom",
                             error=True)]})
    return s


def get(api: JaegerQuery, path: str, headers: dict | None = None, **query: str):
    reply = api("GET", path, query, {k.lower(): v for k, v in (headers or {}).items()})
    assert reply is not None
    status, ctype, body, *extra = reply
    assert ctype == "application/json"
    return status, json.loads(body), (extra[0] if extra else {})


@pytest.fixture
def api(store) -> JaegerQuery:
    return JaegerQuery(store, clock=lambda: NOW)


def check_envelope(obj: dict) -> None:
    assert set(obj) == {"data", "total", "limit", "offset", "errors"}
    assert obj["limit"] == 0 and obj["offset"] == 0 and obj["errors"] is None


def check_trace_shape(trace: dict) -> None:
    assert set(trace) == {"traceID", "spans", "processes", "warnings"}
    for s in trace["spans"]:
        assert set(s) == set(SPAN_FIELDS)
        for k, t in SPAN_FIELDS.items():
            assert isinstance(s[k], t), (k, s[k])
        assert s["processID"] in trace["processes"]
        for kv in s["tags"] + [f for log in s["logs"] for f in log["fields"]]:
            assert set(kv) == {"key", "type", "value"} and isinstance(kv["value"], KV_TYPES[kv["type"]])
        for ref in s["references"]:
            assert set(ref) == {"refType", "traceID", "spanID"} and ref["refType"] in ("CHILD_OF", "FOLLOWS_FROM")
    for p in trace["processes"].values():
        assert set(p) == {"serviceName", "tags"}


def test_trace_by_id_in_jaegers_shapes(api):
    status, obj, _ = get(api, f"/api/traces/{TRACE:032x}")
    assert status == 200
    check_envelope(obj)
    (trace,) = obj["data"]
    check_trace_shape(trace)
    assert trace["traceID"] == f"{TRACE:032x}" and obj["total"] == 1
    spans = {(trace["processes"][s["processID"]]["serviceName"], dict((t["key"], t["value"]) for t in s["tags"])
              ["span.kind"]): s for s in trace["spans"]}
    fe_server, fe_client, cat = spans[("frontend", "server")], spans[("frontend", "client")], spans[("catalog", "server")]
    assert fe_server["references"] == []
    assert cat["references"] == [{"refType": "CHILD_OF", "traceID": f"{TRACE:032x}", "spanID": fe_client["spanID"]}]
    assert len(cat["spanID"]) == 16
    # microseconds, truncated
    assert fe_server["startTime"] == (T0 + MS) // 1000 and fe_server["duration"] == 5000
    assert cat["startTime"] == (T0 + MS + 150_000) // 1000 and cat["duration"] == 4700
    tags = {t["key"]: t for t in cat["tags"]}
    assert tags["http.response.status_code"] == {"key": "http.response.status_code", "type": "int64", "value": 200}
    assert tags["otel.scope.name"]["value"] == "meshkeeper.sidecar"
    assert tags["w3c.tracestate"]["value"] == "vendor=x"
    assert "error" not in tags and "otel.status_code" not in tags
    assert cat["logs"] == [{"timestamp": (T0 + 2 * MS + 999) // 1000, "fields": [
        {"key": "event", "type": "string", "value": "retry"}, {"key": "attempt", "type": "int64", "value": 2}]}]
    process = trace["processes"][cat["processID"]]
    ptags = {t["key"]: t["value"] for t in process["tags"]}
    assert process["serviceName"] == "catalog" and "service.name" not in ptags
    assert ptags["service.namespace"] == "default"
    # 16 hex digits find it too (Jaeger pads), and upper case.
    assert get(api, f"/api/traces/{TRACE:X}")[0] == 200


def test_error_status_as_jaegers_otlp_translator_writes_it(api):
    _, obj, _ = get(api, f"/api/traces/{3:032x}")
    (trace,) = obj["data"]
    assert trace["traceID"] == "0000000000000003"  # high 64 bits zero: 16 digits, as Jaeger
    tags = {t["key"]: t for t in trace["spans"][0]["tags"]}
    assert tags["error"] == {"key": "error", "type": "bool", "value": True}
    assert tags["otel.status_code"]["value"] == "ERROR"
    assert tags["otel.status_description"]["value"] == "boom"
    assert tags["ratio"] == {"key": "ratio", "type": "float64", "value": 0.25}
    assert tags["ok"] == {"key": "ok", "type": "bool", "value": True}


def test_unknown_and_bad_trace_ids(api):
    status, obj, _ = get(api, f"/api/traces/{5:032x}")
    assert status == 404
    assert obj == {"data": None, "total": 0, "limit": 0, "offset": 0, "errors": [{"code": 404, "msg": "trace not found"}]}
    status, obj, _ = get(api, "/api/traces/xyz")
    assert status == 400 and obj["errors"][0]["code"] == 400 and "xyz" in obj["errors"][0]["msg"]
    assert get(api, "/api/traces/" + "1" * 33)[0] == 400


def test_services_and_operations(api):
    status, obj, _ = get(api, "/api/services")
    check_envelope(obj)
    assert status == 200 and obj["data"] == ["catalog", "frontend"] and obj["total"] == 2
    _, obj, _ = get(api, "/api/services/catalog/operations")
    assert obj["data"] == ["GET", "GET /slow"] and obj["total"] == 2
    _, obj, _ = get(api, "/api/operations", service="frontend")
    assert obj["data"] == [{"name": "GET", "spanKind": "client"}, {"name": "GET", "spanKind": "server"}]
    _, obj, _ = get(api, "/api/operations", service="frontend", spanKind="client")
    assert obj["data"] == [{"name": "GET", "spanKind": "client"}]
    status, obj, _ = get(api, "/api/operations")
    assert status == 400 and obj["errors"] == [{"code": 400, "msg": "parameter 'service' is required"}]
    assert get(api, "/api/operations", service="x", spanKind="sideways")[0] == 400


def test_search(api):
    def found(**query) -> list[str]:
        status, obj, _ = get(api, "/api/traces", **query)
        assert status == 200, obj
        check_envelope(obj)
        assert obj["total"] == len(obj["data"])
        for t in obj["data"]:
            check_trace_shape(t)
        return [t["traceID"] for t in obj["data"]]

    assert found(service="catalog") == ["0000000000000003", "0000000000000002", f"{TRACE:032x}"]
    assert found(service="catalog", limit="1") == ["0000000000000003"]
    assert found(service="catalog", operation="GET") == ["0000000000000002", f"{TRACE:032x}"]
    assert found(service="catalog", minDuration="1.2s") == ["0000000000000003"]
    assert found(service="catalog", minDuration="40ms", maxDuration="1s") == ["0000000000000002"]
    assert found(service="catalog", maxDuration="4800us") == [f"{TRACE:032x}"]
    assert found(service="catalog", tags=json.dumps({"error": "true"})) == ["0000000000000003", "0000000000000002"]
    assert found(service="catalog", tags=json.dumps({"error": "true", "http.response.status_code": "500"})) == [
        "0000000000000002"]
    assert found(service="catalog", tag="ok:true") == ["0000000000000003"]
    assert found(service="frontend", tags='{"span.kind": "client", "server.address": "catalog"}') == [
        "0000000000000002", f"{TRACE:032x}"]
    # start/end in µs; lookback when start is absent
    assert found(service="catalog", start=str((T0 + 9 * MS) // 1000), end=str((T0 + 15 * MS) // 1000)) == [
        "0000000000000002"]
    assert found(service="catalog", lookback="59m") == []  # NOW is an hour after T0, the spans a few ms
    assert len(found(service="catalog", lookback="2h")) == 3
    assert found(service="nobody") == []


@pytest.mark.parametrize("query, msg", [
    ({}, "parameter 'service' is required"),
    ({"service": "c", "minDuration": "fast"}, "unable to parse param 'minDuration'"),
    ({"service": "c", "maxDuration": "10"}, "unable to parse param 'maxDuration'"),
    ({"service": "c", "minDuration": "2s", "maxDuration": "1s"}, "'maxDuration' should be greater than 'minDuration'"),
    ({"service": "c", "start": "yesterday"}, "unable to parse param 'start'"),
    ({"service": "c", "limit": "-1"}, "unable to parse param 'limit'"),
    ({"service": "c", "tags": "{not json"}, "malformed 'tags' parameter"),
    ({"service": "c", "tags": "[1]"}, "malformed 'tags' parameter"),
    ({"service": "c", "tag": "novalue"}, "malformed 'tag' parameter"),
    ({"service": "c", "lookback": "1 week"}, "unable to parse param 'lookback'"),
])
def test_bad_parameters_are_400_in_jaegers_error_envelope(api, query, msg):
    status, obj, _ = get(api, "/api/traces", **query)
    assert status == 400
    assert obj["data"] is None and obj["errors"][0]["code"] == 400 and obj["errors"][0]["msg"].startswith(msg)


def test_durations_parse_as_go_does():
    assert parse_duration("1.2s", "x") == 1_200_000_000
    assert parse_duration("100ms", "x") == 100 * MS
    assert parse_duration("500us", "x") == parse_duration("500µs", "x") == 500_000
    assert parse_duration("1h30m", "x") == 5400 * 10**9
    assert parse_duration("0", "x") == 0


def test_dependencies(api):
    status, obj, _ = get(api, "/api/dependencies", endTs=str(NOW // MS), lookback=str(2 * 3600 * 1000))
    assert status == 200
    check_envelope(obj)
    assert obj["data"] == [{"parent": "frontend", "child": "catalog", "callCount": 2}]
    _, obj, _ = get(api, "/api/dependencies", endTs=str(NOW // MS), lookback="1000")
    assert obj["data"] == []
    assert get(api, "/api/dependencies", endTs="soon")[0] == 400


def test_other_paths_are_not_the_mounts(api):
    assert api("GET", "/api/proxies", {}, {}) is None
    assert api("GET", "/healthz", {}, {}) is None
    assert api("POST", "/api/services", {}, {})[0] == 405


def test_reads_need_a_viewer_token_when_the_control_plane_has_tokens(store, tmp_path: Path):
    f = tmp_path / "tokens"
    f.write_text("viewer-token-0123456789 alice viewer\n")
    api = JaegerQuery(store, Authorizer(TokenFile(str(f))), clock=lambda: NOW)
    status, obj, extra = get(api, "/api/services")
    assert status == 401 and obj["errors"][0]["code"] == 401 and "Bearer" in extra["WWW-Authenticate"]
    assert get(api, "/api/services", {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
    status, obj, _ = get(api, "/api/services", {"Authorization": "Bearer viewer-token-0123456789"})
    assert status == 200 and obj["data"] == ["catalog", "frontend"]
    # No token file: reads are open (as the admin API's).
    assert get(JaegerQuery(store), "/api/services")[0] == 200


def test_web_routes_to_the_mount(store):
    from controlplane.cache import SnapshotCache
    from controlplane.proxies import ProxyRegistry
    metrics = Metrics()
    web = Web(SnapshotCache(metrics), ProxyRegistry(metrics), metrics, lambda: "CONNECTED")
    web.mounts.append(JaegerQuery(store))
    status, _, body, *_ = asyncio.run(web("GET", "/api/services", {}, {}, b""))  # mounts are awaited
    assert status == 200 and json.loads(body)["data"] == ["catalog", "frontend"]
    assert asyncio.run(web("GET", "/api/nothing", {}, {}, b""))[0] == 404
    assert web("GET", "/healthz", {}, {}, b"")[0] == 200


# -- OTLP Export over a real grpc.aio server


@pytest.fixture
async def otlp():
    metrics = Metrics()
    store = TraceStore(max_spans=1000)
    server = grpc.aio.server()
    add_to_server(server, TraceService(store, metrics, max_batch_spans=10))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield store, metrics, trace_service_pb2_grpc.TraceServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


def metric(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_export_stores_spans_and_counts(otlp):
    store, metrics, stub = otlp
    resp = await stub.Export(export_request(two_hop_trace(TRACE, T0)))
    assert not resp.HasField("partial_success")
    assert store.span_count == 3 and store.services() == ["catalog", "frontend"]
    assert metric(metrics, "meshkeeper_tracestore_spans_received_total") == 3


async def test_export_rejects_malformed_spans_and_keeps_the_rest(otlp):
    store, metrics, stub = otlp
    req = export_request({"catalog": [span(trace_id=1, span_id=1), span(trace_id=0, span_id=2),
                                      span(trace_id=1, span_id=3, duration=-1)]})
    resp = await stub.Export(req)
    assert resp.partial_success.rejected_spans == 2
    assert "trace_id must be 16 bytes" in resp.partial_success.error_message
    assert store.span_count == 1
    assert metric(metrics, "meshkeeper_tracestore_spans_refused_total", reason="malformed") == 2


async def test_export_over_the_batch_limit_is_refused_whole(otlp):
    store, metrics, stub = otlp
    req = export_request({"catalog": [span(trace_id=1, span_id=n) for n in range(1, 12)]})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Export(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "11 spans in one Export" in info.value.details() and "at most 10" in info.value.details()
    assert store.span_count == 0
    assert metric(metrics, "meshkeeper_tracestore_spans_refused_total", reason="batch_too_large") == 11
