"""Observability end to end: traces into a real OTLP/gRPC receiver, metrics, access logs.

Topology: ``frontend`` (the demo app with ``--call http://catalog/``, its outbound calls going
through its sidecar via ``HTTP_PROXY`` like any unmodified app, passing trace headers on) and
``catalog`` (one instance), each beside its own sidecar exporting spans to an
:class:`~tests.harness.otlp.OtlpReceiver`, the OTLP TraceService that Jaeger implements.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from meshkeeper.registry import Paths
from tests.harness import free_port, http_get, wait_until
from tests.harness.otlp import OtlpReceiver
from tests.harness.scrape import find_key, metric_value

pytestmark = pytest.mark.integration

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@dataclass
class TracedMesh:
    ns: str
    cp: object
    catalog_app: object
    catalog: object  # sidecar
    frontend_app: object
    frontend: object  # sidecar

    def inbound(self, host: str = "frontend"):
        return http.client.HTTPConnection("127.0.0.1", self.frontend.port("inbound_port"), timeout=10)

    def stats(self, sidecar) -> str:
        status, _, body = http_get(f"{sidecar.admin_url}/stats/prometheus")
        assert status == 200
        return body.decode()


def start_traced_mesh(procs, zk_hosts: str, ns: str, endpoint: str, *, ratio: str = "1.0",
                      policy: dict | None = None, kz=None, **flags) -> TracedMesh:
    cp = procs.controlplane(zk_hosts)
    target = f"127.0.0.1:{cp.port('xds_port')}"
    if policy is not None:
        kz.create(Paths(ns).policy("catalog"), json.dumps(policy).encode(), makepath=True)
    common = {"otlp_endpoint": endpoint, "trace_sample_ratio": ratio, "zk_session_timeout": "2", **flags}
    catalog_app = procs.app("catalog")
    catalog = procs.sidecar("catalog", catalog_app.port("port"), cp=target, zk=zk_hosts, namespace=ns, **common)
    outbound = free_port()
    frontend_app = procs.app("frontend", call="http://catalog/",
                             env={"HTTP_PROXY": f"http://127.0.0.1:{outbound}", "NO_PROXY": ""})
    frontend = procs.sidecar("frontend", frontend_app.port("port"), cp=target, zk=zk_hosts, namespace=ns,
                             outbound_port=outbound, **common)
    mesh = TracedMesh(ns, cp, catalog_app, catalog, frontend_app, frontend)

    def catalog_routable() -> bool:
        _, _, body = http_get(f"{frontend.admin_url}/clusters")
        clusters = {c["name"]: c for c in json.loads(body)["clusters"]}
        c = clusters.get(f"outbound|catalog.{ns}")
        return bool(c and any(e["serving"] for e in c["endpoints"]))

    wait_until(catalog_routable, 10, message="frontend sees the catalog endpoint")
    return mesh


def get(port: int, path: str = "/", host: str = "catalog", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def receiver():
    with OtlpReceiver() as r:
        yield r


def by_service(spans) -> dict[tuple[str, str], list]:
    out: dict[tuple[str, str], list] = {}
    for s in spans:
        out.setdefault((s.resource["service.name"], s.kind), []).append(s)
    return out


def test_two_hops_make_one_trace_with_linked_spans(procs, zk_server, namespace, receiver):
    mesh = start_traced_mesh(procs, zk_server.hosts, namespace, receiver.endpoint)
    # A request from outside the mesh at the frontend's inbound listener: a new, sampled trace.
    status, _, body = get(mesh.frontend.port("inbound_port"), "/shop?item=7", host="frontend")
    assert status == 200, body
    spans = receiver.wait_for(3, timeout=15)
    assert len({s.trace_id for s in spans}) == 1, spans
    groups = by_service(spans)
    (fe_server,) = groups[("frontend", "SERVER")]
    (fe_client,) = groups[("frontend", "CLIENT")]
    (cat_server,) = groups[("catalog", "SERVER")]
    # frontend SERVER (root) -> [frontend app] -> frontend CLIENT -> catalog SERVER
    assert fe_server.parent_span_id == ""
    assert fe_client.parent_span_id == fe_server.span_id
    assert cat_server.parent_span_id == fe_client.span_id
    assert fe_server.start_ns <= fe_client.start_ns <= cat_server.start_ns <= cat_server.end_ns <= fe_server.end_ns

    assert fe_server.name == "GET" and fe_server.attributes["url.path"] == "/shop"
    assert fe_server.attributes["url.query"] == "item=7"
    assert fe_server.attributes["http.response.status_code"] == 200
    assert fe_server.attributes["meshkeeper.upstream_cluster"] == f"inbound|{mesh.frontend_app.port('port')}"
    catalog_host = f"127.0.0.1:{mesh.catalog.port('inbound_port')}"
    a = fe_client.attributes
    assert a["http.request.method"] == "GET" and a["url.full"] == "http://catalog/"
    assert a["server.address"] == "catalog" and a["http.response.status_code"] == 200
    assert a["meshkeeper.upstream_cluster"] == f"outbound|catalog.{namespace}"
    assert a["meshkeeper.upstream_host"] == catalog_host
    assert a["network.peer.address"] == "127.0.0.1" and a["network.peer.port"] == mesh.catalog.port("inbound_port")
    assert a["meshkeeper.service"] == "frontend" and a["meshkeeper.namespace"] == namespace
    assert UUID4.match(a["meshkeeper.request_id"])
    # One request id end to end.
    assert cat_server.attributes["meshkeeper.request_id"] == a["meshkeeper.request_id"]
    assert fe_server.attributes["meshkeeper.request_id"] == a["meshkeeper.request_id"]
    assert cat_server.attributes["meshkeeper.service"] == "catalog"
    assert cat_server.attributes["client.address"] == "127.0.0.1"
    for s in spans:
        assert s.status_code == "UNSET" and "meshkeeper.response_flags" not in s.attributes
    r = cat_server.resource
    assert r["service.name"] == "catalog" and r["service.namespace"] == namespace
    assert r["service.instance.id"].startswith("sidecar~127.0.0.1~catalog")


def test_b3_only_request_continues_its_trace_and_unsampled_parent_exports_nothing(procs, zk_server, namespace,
                                                                                  receiver):
    mesh = start_traced_mesh(procs, zk_server.hosts, namespace, receiver.endpoint)
    port = mesh.frontend.port("outbound_port")
    # B3 multi header, 64-bit trace id (left-padded to 128 bits), sampled.
    status, _, body = get(port, "/headers", headers={"X-B3-TraceId": "a3ce929d0e0e4736",
                                                     "X-B3-SpanId": "00f067aa0ba902b7", "X-B3-Sampled": "1"})
    assert status == 200
    seen = json.loads(body)
    # The app behind catalog's sidecar got this hop's context in both formats, same trace.
    assert seen["traceparent"].startswith("00-0000000000000000a3ce929d0e0e4736-")
    assert seen["x-b3-traceid"] == "0000000000000000a3ce929d0e0e4736"
    spans = receiver.wait_for(lambda ss: len([s for s in ss if s.trace_id.endswith("a3ce929d0e0e4736")]) == 2)
    client = next(s for s in spans if s.kind == "CLIENT")
    assert client.parent_span_id == "00f067aa0ba902b7"
    # B3 single header.
    single = "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1"
    get(port, "/", headers={"b3": single})
    receiver.wait_for(lambda ss: any(s.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" for s in ss))

    # An unsampled W3C parent: nothing of that trace is exported. A sampled request sent after it
    # goes through the same exporter queue; once its spans are in, the unsampled ones would be too.
    unsampled = "11111111111111111111111111111111"
    status, _, body = get(port, "/headers", headers={"traceparent": f"00-{unsampled}-2222222222222222-00"})
    assert status == 200
    assert json.loads(body)["traceparent"].endswith("-00")  # the decision travels on
    marker = "33333333333333333333333333333333"
    get(port, "/", headers={"traceparent": f"00-{marker}-4444444444444444-01"})
    spans = receiver.wait_for(lambda ss: len([s for s in ss if s.trace_id == marker]) == 2)
    assert not [s for s in spans if s.trace_id == unsampled]


def test_request_id_is_generated_when_missing_and_kept_end_to_end(procs, zk_server, namespace, receiver):
    mesh = start_traced_mesh(procs, zk_server.hosts, namespace, receiver.endpoint, ratio="0", access_log="-")
    port = mesh.frontend.port("outbound_port")
    _, _, body = get(port, "/headers", headers={"X-Request-Id": "req-abc-1"})
    assert json.loads(body)["x-request-id"] == "req-abc-1"
    _, _, body = get(port, "/headers")
    generated = json.loads(body)
    assert UUID4.match(generated["x-request-id"])
    # Ratio 0: new traces are not sampled, yet they carry a trace context with the decision.
    assert re.match(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-00$", generated["traceparent"])
    # The access log line of that request names the same request id and trace.
    trace_id = generated["traceparent"].split("-")[1]

    def logged():
        lines = [json.loads(x) for x in mesh.frontend.stdout_path.read_text().splitlines() if x.startswith("{")]
        return [x for x in lines if x["request_id"] == generated["x-request-id"]]

    (line,) = wait_until(logged, 5, message="the access log line of the request")
    assert line["trace_id"] == trace_id and line["response_code"] == 200 and line["method"] == "GET"
    assert line["path"] == "/headers" and line["authority"] == "catalog" and line["protocol"] == "HTTP/1.1"
    assert line["upstream_host"] == f"127.0.0.1:{mesh.catalog.port('inbound_port')}"
    assert line["upstream_cluster"] == f"outbound|catalog.{namespace}" and line["listener"] == "outbound"
    assert line["response_flags"] == "-" and line["bytes_sent"] > 0 and line["duration"] >= 0
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", line["start_time"])
    assert receiver.requests == 0  # nothing sampled, nothing exported


def test_metrics_count_exactly_the_requests_sent(procs, zk_server, zk_client, namespace, receiver):
    """A known sequence of 200s, 500s and 429s: the frontend's and the catalog's counters and
    histograms equal what the client saw, class by class."""
    mesh = start_traced_mesh(procs, zk_server.hosts, namespace, receiver.endpoint, ratio="0",
                             policy={"rate_limit": {"rps": 1, "burst": 10}}, kz=zk_client)
    wait_until(lambda: list(find_key(json.loads(http_get(f"{mesh.catalog.admin_url}/config_dump")[2]),
                                     "token_bucket")), 10, message="catalog's inbound rate limit is in force")
    port = mesh.frontend.port("outbound_port")
    app = f"http://127.0.0.1:{mesh.catalog_app.port('port')}"
    seen: Counter = Counter()

    def send(n: int) -> None:
        for _ in range(n):
            status, headers, _ = get(port, "/")
            seen[status] += 1

    send(5)
    assert http_get(f"{app}/fail?mode=status&status=500")[0] == 200
    send(3)
    assert http_get(f"{app}/fail?mode=ok")[0] == 200
    send(8)  # the bucket (burst 10, 1 token a second) runs dry
    assert seen[500] == 3 and seen[429] >= 4 and sum(seen.values()) == 16, seen
    classes = Counter({f"{s // 100}xx": n for s, n in seen.items()})
    cluster = f"outbound|catalog.{namespace}"
    fe = mesh.stats(mesh.frontend)
    for cls in ("2xx", "4xx", "5xx"):
        assert metric_value(fe, "meshkeeper_requests", listener="outbound", cluster=cluster, code_class=cls) == classes[cls]
        assert metric_value(fe, "meshkeeper_upstream_rq", cluster=cluster, code_class=cls) == classes[cls]
        assert metric_value(fe, f"meshkeeper_listener_downstream_rq_{cls}", listener="outbound") == classes[cls]
    assert metric_value(fe, "meshkeeper_downstream_rq_duration_seconds_count", listener="outbound") == 16
    assert metric_value(fe, "meshkeeper_upstream_rq_duration_seconds_count", cluster=cluster) == 16
    assert metric_value(fe, "meshkeeper_requests", listener="outbound", route=f"catalog.{namespace}") == 16
    cat = mesh.stats(mesh.catalog)
    inbound = f"inbound|{mesh.catalog_app.port('port')}"
    assert metric_value(cat, "meshkeeper_requests", listener="inbound", cluster=inbound, code_class="2xx") == seen[200]
    assert metric_value(cat, "meshkeeper_requests", listener="inbound", cluster=inbound, code_class="5xx") == 3
    # 429 RL is answered before routing: no route, no cluster.
    assert metric_value(cat, "meshkeeper_requests", listener="inbound", route="", cluster="", code_class="4xx") == seen[429]
    assert metric_value(cat, "meshkeeper_listener_ratelimit_rate_limited", listener="inbound") == seen[429]
    assert metric_value(cat, "meshkeeper_downstream_rq_duration_seconds_count", listener="inbound") == 16

    # LRS: the control plane's load for catalog adds up to the requests sent.
    def load():
        _, _, body = http_get(f"http://127.0.0.1:{mesh.cp.port('http_port')}/api/load")
        svc = [s for s in json.loads(body)["services"] if s["service"] == "catalog" and s["namespace"] == namespace]
        return svc[0]["totals"] if svc and svc[0]["totals"]["issued"] == 16 else None

    totals = wait_until(load, 15, message="LRS totals for catalog reach 16")
    assert totals["success"] + totals["error"] == 16 and totals["error"] == 3, totals


def test_dead_collector_never_slows_requests_and_drops_are_counted(procs, zk_server, namespace):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    mesh = start_traced_mesh(procs, zk_server.hosts, namespace, dead, otlp_timeout="1", access_log="off")
    port = mesh.frontend.port("outbound_port")
    slowest = 0.0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(300):
        t = time.perf_counter()
        conn.request("GET", "/", headers={"Host": "catalog"})
        resp = conn.getresponse()
        resp.read()
        slowest = max(slowest, time.perf_counter() - t)
        assert resp.status == 200
    conn.close()
    # A bound on blocking, not a benchmark: export happens off the request path.
    assert slowest < 0.5, slowest

    def dropped():
        text = mesh.stats(mesh.frontend)
        return metric_value(text, "meshkeeper_tracing_spans_dropped") >= 300 and text

    text = wait_until(dropped, 20, message="the frontend counts its 300 spans as dropped")
    assert metric_value(text, "meshkeeper_tracing_spans_sampled") == 300
    assert metric_value(text, "meshkeeper_tracing_spans_exported") == 0
    # --access-log off: stdout has the ready lines only.
    assert not [x for x in mesh.frontend.stdout_path.read_text().splitlines() if x.startswith("{")]
