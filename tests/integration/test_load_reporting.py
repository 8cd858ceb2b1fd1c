"""Load reporting end to end: sidecars stream LRS reports, the control plane serves ``/api/load``.

Topology: a control plane reporting every 0.5 s, ``catalog`` (two app instances, each beside its
own sidecar, one of them answering 500) and ``web`` (an app and its sidecar with two workers, so
two reporters) whose outbound listener the test calls with ``Host: catalog``. No policy: no
retries, no outlier detection, so every request is exactly one try.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.harness import http_get, wait_until
from tests.harness.scrape import metric_value
from tests.integration.test_mesh import Client

pytestmark = pytest.mark.integration
REQUESTS = 60


def test_lrs_totals_at_the_control_plane_equal_the_requests_sent(procs, zk_server, namespace):
    cp = procs.controlplane(zk_server.hosts, "--load-report-interval", "0.5")
    target = f"127.0.0.1:{cp.port('xds_port')}"
    api = f"http://127.0.0.1:{cp.port('http_port')}"
    catalog = []
    for _ in range(2):
        app = procs.app("catalog")
        sc = procs.sidecar("catalog", app.port("port"), cp=target, zk=zk_server.hosts, namespace=namespace)
        catalog.append((app, sc))
    web_app = procs.app("web")
    web = procs.sidecar("web", web_app.port("port"), cp=target, zk=zk_server.hosts, namespace=namespace,
                        workers=2)
    node = web.info["node"]
    # catalog instance 0 answers 500 to every plain request (its health check still passes)
    failing_app = f"http://127.0.0.1:{catalog[0][0].port('port')}"
    assert http_get(f"{failing_app}/fail?mode=status&status=500")[0] == 200
    endpoint_of = {f"127.0.0.1:{app.port('port')}": f"127.0.0.1:{sc.port('inbound_port')}" for app, sc in catalog}

    def web_sees_both() -> bool:
        body = json.loads(http_get(f"{web.admin_url}/clusters")[2])
        [c] = [c for c in body["clusters"] if c["name"] == f"outbound|catalog.{namespace}"]
        return sum(e["serving"] for e in c["endpoints"]) == 2

    def workers_in_step() -> bool:
        streams = {p["node_id"]: p["types"] for p in json.loads(http_get(f"{api}/api/proxies")[2])}
        mine = [streams.get(node), streams.get(f"{node}~w1")]
        return all(mine) and all(t["EDS"]["version_acked"] == mine[0]["EDS"]["version_acked"] for t in mine)

    wait_until(web_sees_both, 10, message="web's sidecar balances over both catalog instances")
    wait_until(workers_in_step, 10, message="both web workers hold the same endpoints")

    sent, codes = Counter(), Counter()
    for _ in range(REQUESTS // 10):  # new connections land on either worker (SO_REUSEPORT)
        client = Client(web.port("outbound_port"))
        for _ in range(10):
            status, headers, _ = client.get("/items")
            codes[status] += 1
            sent[endpoint_of[headers["x-app-instance"]]] += 1
        client.conn.close()
    failing = endpoint_of[f"127.0.0.1:{catalog[0][0].port('port')}"]
    assert codes[500] == sent[failing] > 0 and codes[200] == REQUESTS - sent[failing] > 0, (codes, sent)

    def catalog_load() -> dict:
        status, _, body = http_get(f"{api}/api/load?namespace={namespace}")
        assert status == 200
        doc = json.loads(body)
        [svc] = [s for s in doc["services"] if s["service"] == "catalog"]
        t = svc["totals"]
        # settled: every try reported and none in flight
        return doc if t["issued"] == REQUESTS and t["success"] + t["error"] == REQUESTS else {}

    doc = wait_until(catalog_load, 10, message="catalog totals reach the requests sent")
    assert doc["interval_seconds"] == 0.5
    assert doc["reporters"] == 4  # one LRS stream per sidecar process: web has two workers
    [svc] = [s for s in doc["services"] if s["service"] == "catalog"]
    assert svc["namespace"] == namespace
    totals = svc["totals"]
    assert totals["error"] == codes[500] and totals["success"] == codes[200]
    assert totals["in_progress"] == 0
    assert totals["latency_sum_seconds"] > 0 and totals["mean_latency_seconds"] > 0
    by_address = {e["address"]: e["totals"] for e in svc["endpoints"]}
    assert {a: t["issued"] for a, t in by_address.items()} == dict(sent)
    assert by_address[failing]["error"] == sent[failing] and by_address[failing]["success"] == 0
    assert set(svc["rates"]) == {"rps", "success_rps", "error_rps", "error_ratio", "mean_latency_seconds",
                                 "p99_latency_seconds"}
    # nobody called web: it is listed (its cluster was reported), with nothing in it
    [web_svc] = [s for s in doc["services"] if s["service"] == "web"]
    assert web_svc["totals"]["issued"] == 0 and web_svc["endpoints"] == []

    metrics = http_get(f"{api}/metrics")[2].decode()
    assert metric_value(metrics, "meshkeeper_lrs_reports_total") > 0
    assert metric_value(metrics, "meshkeeper_lrs_streams") == 4
    for node_id in (node, f"{node}~w1", *(sc.info["node"] for _, sc in catalog)):
        assert metric_value(metrics, "meshkeeper_xds_proxy_pushes_total", node_id=node_id) > 0, node_id
    info = json.loads(http_get(f"{web.admin_url}/server_info")[2])
    assert info["load_reporting"]["connected"] and info["load_reporting"]["interval_seconds"] == 0.5
