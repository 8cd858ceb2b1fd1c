"""The control plane's trace store end to end: two real sidecars export to the control plane
itself, and its Jaeger query API finds the request; plus the store's bounds at scale."""

from __future__ import annotations

import gc
import http.client
import json
import tracemalloc
import urllib.parse

import pytest

from controlplane.tracestore.otlp import make_process
from controlplane.tracestore.store import SPAN_OVERHEAD, Scope, TraceStore
from tests.harness import free_port, http_get, wait_until
from tests.harness.scrape import metric_value
from tests.support.otlp_spans import T0, resource, two_hop_trace

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def get(port: int, path: str, host: str, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, **headers})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def api(cp, path: str, **query: str) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{cp.port('http_port')}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    status, _, body = http_get(url)
    return status, json.loads(body)


def test_sidecars_export_to_the_control_plane_and_jaegers_api_finds_the_trace(procs, zk_server, namespace):
    # frontend -> catalog, each beside a sidecar whose OTLP endpoint is the control plane's xDS port.
    cp = procs.controlplane(zk_server.hosts)
    xds = f"127.0.0.1:{cp.port('xds_port')}"
    common = {"otlp_endpoint": xds, "trace_sample_ratio": "1.0", "zk": zk_server.hosts, "namespace": namespace}
    catalog_app = procs.app("catalog")
    procs.sidecar("catalog", catalog_app.port("port"), cp=xds, **common)
    outbound = free_port()
    frontend_app = procs.app("frontend", call="http://catalog/",
                             env={"HTTP_PROXY": f"http://127.0.0.1:{outbound}", "NO_PROXY": ""})
    frontend = procs.sidecar("frontend", frontend_app.port("port"), cp=xds, outbound_port=outbound, **common)

    def catalog_routable() -> bool:
        _, _, body = http_get(f"{frontend.admin_url}/clusters")
        c = {c["name"]: c for c in json.loads(body)["clusters"]}.get(f"outbound|catalog.{namespace}")
        return bool(c and any(e["serving"] for e in c["endpoints"]))

    wait_until(catalog_routable, 10, message="frontend sees the catalog endpoint")
    status, body = get(frontend.port("inbound_port"), "/shop", "frontend",
                       {"traceparent": f"00-{TRACE_ID}-{PARENT}-01"})
    assert status == 200, body

    def whole_trace():
        status, obj = api(cp, f"/api/traces/{TRACE_ID}")
        return obj if status == 200 and len(obj["data"][0]["spans"]) >= 3 else None

    obj = wait_until(whole_trace, 15, message="the trace's three spans in the control plane's store")
    assert obj["errors"] is None and obj["total"] == 1
    (trace,) = obj["data"]
    assert trace["traceID"] == TRACE_ID

    def service_kind(s: dict) -> tuple[str, str]:
        tags = {t["key"]: t["value"] for t in s["tags"]}
        return trace["processes"][s["processID"]]["serviceName"], tags["span.kind"]

    spans = {service_kind(s): s for s in trace["spans"]}
    fe_server, fe_client = spans[("frontend", "server")], spans[("frontend", "client")]
    cat_server = spans[("catalog", "server")]
    assert fe_server["references"] == [{"refType": "CHILD_OF", "traceID": TRACE_ID, "spanID": PARENT}]
    assert cat_server["references"] == [{"refType": "CHILD_OF", "traceID": TRACE_ID, "spanID": fe_client["spanID"]}]
    assert fe_client["references"][0]["spanID"] == fe_server["spanID"]
    assert isinstance(cat_server["startTime"], int) and cat_server["startTime"] > 1_600_000_000_000_000  # µs
    assert 0 <= cat_server["duration"] <= fe_server["duration"]

    # Search: by service, by min duration, by tag.
    def ids(**query) -> list[str]:
        status, obj = api(cp, "/api/traces", **query)
        assert status == 200, obj
        return [t["traceID"] for t in obj["data"]]

    assert TRACE_ID in ids(service="catalog")
    assert TRACE_ID in ids(service="catalog", minDuration=f"{cat_server['duration']}us", lookback="1h")
    assert TRACE_ID not in ids(service="catalog", minDuration=f"{cat_server['duration'] + 1}us")
    assert TRACE_ID in ids(service="frontend", tags=json.dumps({"url.path": "/shop", "span.kind": "server"}))
    assert TRACE_ID not in ids(service="frontend", tags=json.dumps({"url.path": "/elsewhere"}))

    status, obj = api(cp, "/api/services")
    assert {"frontend", "catalog"} <= set(obj["data"])
    status, obj = api(cp, "/api/dependencies")
    assert {"parent": "frontend", "child": "catalog", "callCount": 1} in obj["data"]

    status, _, body = http_get(f"http://127.0.0.1:{cp.port('http_port')}/metrics")
    assert metric_value(body.decode(), "meshkeeper_tracestore_spans_received_total") >= 3
    assert metric_value(body.decode(), "meshkeeper_tracestore_spans") >= 3


def test_store_bounds_200k_spans_into_50k(request):
    """The newest traces kept, evictions counted, memory within the documented bound."""
    process = {s: make_process(resource(s)) for s in ("frontend", "catalog")}
    scope = Scope("meshkeeper.sidecar", "0.1.0")
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        store = TraceStore(max_spans=50_000, max_bytes=1 << 40)
        n_traces = 200_000 // 3 + 1  # three spans each
        # One request's spans, given each trace's id in turn (the store keeps its own copy).
        template = [(process[svc], s) for svc, spans in two_hop_trace(1, T0).items() for s in spans]
        for n in range(1, n_traces + 1):
            trace_id = n.to_bytes(16, "big")
            for p, s in template:
                s.trace_id = trace_id
                store.add(s, p, scope)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert store.span_count <= 50_000 and store.span_count >= 50_000 - 2
    kept = [int.from_bytes(t.key, "big") for t in store.traces()]
    assert kept == list(range(n_traces - len(kept) + 1, n_traces + 1))  # the newest, in order
    assert store.evicted_traces == n_traces - len(kept) and store.evicted_spans == 3 * store.evicted_traces
    # The store's own accounting bounds what it really holds (docs/tracing.md): measured memory
    # (the spans, the index, the ids) stays within the accounted bytes.
    assert used <= store.bytes, (used, store.bytes, SPAN_OVERHEAD)
    request.node.user_properties.append(("bytes_per_span", used / store.span_count))
