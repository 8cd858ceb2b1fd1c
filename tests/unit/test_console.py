"""controlplane.console: the JSON documents over in-memory state, reads under the admin API's rule,
static files, the SSE feed, and writes run through AdminService.invoke (auth and audit included)."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest
from envoy.config.endpoint.v3 import load_report_pb2

from controlplane.admin import AdminService
from controlplane.auth import Authorizer, TokenFile
from controlplane.console import Console, views
from controlplane.events import EventBus
from controlplane.lrs import LoadStore
from controlplane.proxies import ProxyRegistry
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from meshkeeper.httpd import Stream
from meshkeeper.registry import InstanceRecord, Override, ServiceRecord

NS = "shop"
OPERATOR, VIEWER = "operator-token-0123456789", "viewer-token-0123456789"


def snapshot() -> RegistrySnapshot:
    instances = {f"10.0.0.{n}:15006": InstanceRecord(f"10.0.0.{n}", 15006, weight=w,
                                                      labels={"version": "v1", "zone": "<b>z</b>"})
                 for n, w in ((1, 1), (2, 7))}
    catalog = ServiceSnapshot("catalog", NS, ServiceRecord(), instances,
                              {"10.0.0.2:15006": Override(enabled=False)})
    frontend = ServiceSnapshot("frontend", NS, ServiceRecord(), {"10.0.0.9:15006": InstanceRecord("10.0.0.9", 15006)})
    return RegistrySnapshot(3, {NS: {"catalog": catalog, "frontend": frontend}})


def stats(issued: int, errors: int, address: str = "10.0.0.1:15006") -> load_report_pb2.ClusterStats:
    cs = load_report_pb2.ClusterStats(cluster_name=f"outbound|catalog.{NS}", total_dropped_requests=0)
    cs.load_report_interval.FromSeconds(1)
    loc = cs.upstream_locality_stats.add(total_issued_requests=issued, total_successful_requests=issued - errors,
                                         total_error_requests=errors)
    ep = loc.upstream_endpoint_stats.add(total_issued_requests=issued, total_successful_requests=issued - errors,
                                         total_error_requests=errors)
    host, port = address.split(":")
    ep.address.socket_address.address, ep.address.socket_address.port_value = host, int(port)
    return cs


def loaded(issued: int = 10, errors: int = 0) -> LoadStore:
    load = LoadStore(1.0)
    rid = load.connect(f"sidecar~10.0.0.9~frontend-15006.{NS}")
    load.report(rid, [stats(issued, errors)])
    idle = load.connect(f"sidecar~10.0.0.1~catalog-15006.{NS}")
    load.report(idle, [stats(0, 0)])  # every sidecar reports every cluster: no edge from idle ones
    return load


def test_caller_of_node_ids():
    assert views.caller_of("sidecar~10.0.0.1~web-api-15006.prod") == ("prod", "web-api")
    assert views.caller_of("grpc-client") is None and views.caller_of("sidecar~h~noport.ns") is None


def test_graph_nodes_edges_and_health():
    doc = views.graph(snapshot(), loaded(10, 3))
    assert [n["id"] for n in doc["nodes"]] == [f"{NS}/catalog", f"{NS}/frontend"]
    (edge,) = doc["edges"]
    assert (edge["source"], edge["target"]) == (f"{NS}/frontend", f"{NS}/catalog")
    assert edge["rates"]["rps"] == 10 and edge["rates"]["error_ratio"] == 0.3
    catalog = doc["nodes"][0]
    assert (catalog["instances"], catalog["serving"], catalog["health"]) == (2, 1, "failing")
    assert views.graph(snapshot(), loaded(100, 2))["nodes"][0]["health"] == "degraded"
    assert views.graph(snapshot(), loaded(100, 0))["nodes"][0]["health"] == "healthy"
    assert views.graph(None, LoadStore()) == {"version": None, "interval_seconds": 10.0, "nodes": [], "edges": []}


def test_service_document_weights_switches_and_load():
    doc = views.service(snapshot(), loaded(), ProxyRegistry(), NS, "catalog")
    one, two = doc["endpoints"]
    assert (one["address"], one["registered_weight"], one["effective_weight"], one["enabled"]) == ("10.0.0.1:15006", 1, 1, True)
    assert one["zone"] == "<b>z</b>" and one["rates"]["rps"] == 10
    assert two["override"] == {"weight": None, "enabled": False} and not two["serving"] and not two["enabled"]
    assert doc["policy"] == {} and doc["config"] is None
    assert views.service(snapshot(), loaded(), ProxyRegistry(), NS, "nope") is None


def console(tmp_path, admin=None) -> Console:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{OPERATOR} ops operator\n{VIEWER} dev viewer\n")
    auth = Authorizer(TokenFile(str(tokens)))
    admin = admin or AdminService(None, auth, proxies=ProxyRegistry(), events=EventBus())
    return Console(snapshot, loaded(), ProxyRegistry(), EventBus(), admin, auth, tick=0.05)


def call(c: Console, method: str, path: str, token: str = "", body: bytes = b"", query=None):
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return asyncio.run(c(method, path, query or {}, headers, body))


def test_reads_need_a_viewer_when_there_are_tokens_and_pages_do_not(tmp_path):
    c = console(tmp_path)
    status, _, body, headers = call(c, "GET", "/api/console/graph")
    assert status == 401 and json.loads(body)["code"] == "UNAUTHENTICATED" and "WWW-Authenticate" in headers
    status, _, body, _ = call(c, "GET", "/api/console/graph", VIEWER)
    assert status == 200 and json.loads(body)["edges"]
    assert call(c, "GET", "/api/console/services/shop/catalog", VIEWER)[0] == 200
    assert call(c, "GET", "/api/console/services/shop/nope", VIEWER)[0] == 404
    assert call(c, "GET", "/api/alerts", VIEWER)[0] == 200
    for page in ("/", "/ui/services/shop/catalog", "/ui/traces/abc"):
        status, ctype, body, headers = call(c, "GET", page)
        assert status == 200 and ctype.startswith("text/html") and b"/static/js/app.js" in body
        assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert call(c, "GET", "/static/vendor/cytoscape.min.js")[1].startswith("text/javascript")
    assert call(c, "GET", "/static/../__init__.py")[0] == 404
    assert call(c, "GET", "/api/services") is None  # the Jaeger API's, not ours


def test_event_stream_sends_the_graph_then_events_and_ticks(tmp_path):
    c = console(tmp_path)

    async def main():
        assert (await c("GET", "/api/console/events", {}, {}, b""))[0] == 401  # EventSource sends no header
        status, ctype, stream, _ = await c("GET", "/api/console/events", {"access_token": VIEWER}, {}, b"")
        assert status == 200 and ctype.startswith("text/event-stream") and isinstance(stream, Stream)
        chunks = stream.chunks
        first = await chunks.__anext__()
        assert first.startswith(b"retry: ") and b"event: graph\ndata: {" in first
        c.live.events.publish("admin_write", namespace=NS, service="catalog", who="ops", summary="SetEnabled")
        c.live.events.publish("push", namespace=NS, service="catalog")  # left out: too many
        event = await chunks.__anext__()
        assert event.startswith(b"event: mesh\n") and json.loads(event.split(b"data: ")[1])["summary"] == "SetEnabled"
        assert (await asyncio.wait_for(chunks.__anext__(), 1)).startswith(b"event: graph\n")
        await chunks.aclose()
        assert not c.live.events.active  # the subscription went with the stream
    asyncio.run(main())


class RecordingStore:
    """Only what SetEnabled needs before it writes: the service's znodes."""

    async def get(self, path):
        return None  # no such service: the RPC answers NOT_FOUND after auth


def test_writes_run_the_admin_rpc_with_its_auth_and_audit(tmp_path, caplog):
    c = console(tmp_path)
    c.admin.store = RecordingStore()
    path = "/api/console/services/shop/catalog/endpoints/10.0.0.1:15006/disable"
    caplog.set_level(logging.INFO, logger="meshkeeper.controlplane.audit")
    status, _, body, _ = call(c, "POST", path)
    assert status == 401 and "no token" in json.loads(body)["error"]
    status, _, body, _ = call(c, "POST", path, VIEWER)
    assert status == 403 and json.loads(body)["error"] == "dev has the viewer role; this needs operator"
    status, _, body, _ = call(c, "POST", path, OPERATOR)
    assert status == 404 and "not registered" in json.loads(body)["error"]
    audits = [json.loads(r.getMessage().split(" ", 1)[1]) for r in caplog.records if r.name.endswith("audit")]
    assert [(a["rpc"], a["result"]) for a in audits] == [
        ("SetEnabled", "unauthenticated"), ("SetEnabled", "permission_denied"), ("SetEnabled", "not_found")]
    assert audits[-1]["who"] == "ops"
    assert call(c, "POST", path.replace("disable", "weight"), OPERATOR, b'{"weight": "x"}')[0] == 400
    assert call(c, "GET", path, OPERATOR)[0] == 405


@pytest.mark.parametrize("code,http", [(grpc.StatusCode.ABORTED, 409), (grpc.StatusCode.UNAVAILABLE, 503)])
def test_write_failures_keep_the_apis_words(tmp_path, code, http):
    from controlplane.admin import RpcFailure

    class Refusing:
        async def invoke(self, rpc, request, metadata, peer):
            raise RpcFailure(code, f"{rpc}: the words of the API")

    status, _, body, _ = call(console(tmp_path, Refusing()), "POST",
                              "/api/console/services/shop/catalog/endpoints/10.0.0.1:15006/weight",
                              OPERATOR, b'{"weight": 3}')
    assert status == http and json.loads(body) == {"error": "SetWeight: the words of the API", "code": code.name}


def test_vendored_libraries_match_their_versions_file():
    import hashlib

    from controlplane.console import STATIC

    vendor = STATIC / "vendor"
    for line in (vendor / "VERSIONS").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, version, licence, file, sha256 = line.split()
        assert hashlib.sha256((vendor / file).read_bytes()).hexdigest() == sha256, f"{file}: run make console-vendor"
        assert (vendor / f"{name}.LICENSE").read_text().strip() and version and licence
