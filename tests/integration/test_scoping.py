"""Scoping end to end (DESIGN §13): a sidecar that declares the services it calls (``--egress``)
holds only those, and a first request for another service of its namespace is held while the
sidecar discovers it over Delta xDS (on-demand CDS), then routed; a service that does not exist gets
404 NR at once. Real ZooKeeper, control plane, sidecars and apps."""

from __future__ import annotations

import http.client
import json
import time

import pytest

from tests.harness import http_get, wait_until

pytestmark = pytest.mark.integration


def request(port: int, host: str, method: str = "GET", body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, "/", body=body or None, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def clusters(sidecar) -> set[str]:
    status, _, body = http_get(f"{sidecar.admin_url}/clusters")
    assert status == 200
    return {c["name"] for c in json.loads(body)["clusters"]}


def stat(sidecar, name: str) -> float:
    _, _, body = http_get(f"{sidecar.admin_url}/stats/prometheus")
    for line in body.decode().splitlines():
        if line.startswith(f'{name}{{listener="outbound"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_scoped_sidecar_holds_its_declared_services_and_discovers_another_on_its_first_request(
        procs, zk_server, namespace):
    zk = zk_server.hosts
    cp = procs.controlplane(zk)
    target = f"127.0.0.1:{cp.port('xds_port')}"
    for svc in ("catalog", "search", "orders"):
        app = procs.app(svc)
        procs.sidecar(svc, app.port("port"), cp=target, zk=zk, namespace=namespace)
    fe_app = procs.app("frontend")
    fe = procs.sidecar("frontend", fe_app.port("port"), cp=target, zk=zk, namespace=namespace, egress="catalog")
    port = fe.port("outbound_port")
    wait_until(lambda: request(port, "catalog")[0] == 200, 10, message="frontend routes to catalog")
    outbound = {c for c in clusters(fe) if c.startswith("outbound|")}
    assert outbound == {f"outbound|catalog.{namespace}"}  # declared: catalog alone

    # A first POST to search: held while discovered, then routed with its whole body (past the
    # 64 KiB the hold buffers before it stops reading).
    body = b"x" * 200_000
    status, headers, got = request(port, "search", "POST", body)
    assert status == 200, (status, headers, got)
    answer = json.loads(got)
    assert answer["service"] == "search" and answer["body_bytes"] == len(body)
    assert f"outbound|search.{namespace}" in clusters(fe)
    assert request(port, f"search.{namespace}:80")[0] == 200  # known now: no hold

    # A service that does not exist: 404 NR at once, not after the hold's timeout.
    started = time.monotonic()
    status, headers, _ = request(port, "nosuch")
    assert status == 404 and headers.get("x-meshkeeper-flags") == "NR"
    assert time.monotonic() - started < 2.0
    assert f"outbound|orders.{namespace}" not in clusters(fe)  # never asked for: never sent
    assert stat(fe, "meshkeeper_listener_rq_on_demand_held_total") == 2
    assert stat(fe, "meshkeeper_listener_rq_on_demand_routed_total") == 1
    assert stat(fe, "meshkeeper_listener_rq_on_demand_missing_total") == 1
