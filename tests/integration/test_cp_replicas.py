"""Control-plane replicas end to end (DESIGN §13, docs/contracts.md "Control plane replicas"):
a sidecar given two ``--cp`` addresses moves to the second when the first dies and follows its
pushes; a replica that lost ZooKeeper keeps the stream it has but sends a new sidecar on to a
healthy replica. A 3-server ZooKeeper ensemble, real control planes, sidecars and apps."""

from __future__ import annotations

import json

import pytest

from tests.harness import http_get, wait_until

pytestmark = pytest.mark.integration


def healthz(cp) -> dict:
    return json.loads(http_get(f"http://127.0.0.1:{cp.port('http_port')}/healthz")[2])


def proxies(cp) -> set[str]:
    return {p["service"] for p in json.loads(http_get(f"http://127.0.0.1:{cp.port('http_port')}/api/proxies")[2])}


def serving(sidecar, cluster: str) -> int:
    status, _, body = http_get(f"{sidecar.admin_url}/clusters")
    assert status == 200
    found = [c for c in json.loads(body)["clusters"] if c["name"] == cluster]
    return sum(e["serving"] for e in found[0]["endpoints"]) if found else 0


def test_sidecars_fail_over_between_replicas_and_one_without_zookeeper_sends_new_ones_on(
        procs, zk_ensemble, namespace):
    s1, s2, s3 = zk_ensemble.servers
    zk = zk_ensemble.hosts
    # Replica A watches ZooKeeper through server 1 alone, replica B through the two others.
    cp_a = procs.controlplane(s1.hosts, name="cp-a")
    cp_b = procs.controlplane(f"{s2.hosts},{s3.hosts}", name="cp-b")
    a, b = (f"127.0.0.1:{cp.port('xds_port')}" for cp in (cp_a, cp_b))
    app = procs.app("catalog")
    procs.sidecar("catalog", app.port("port"), cp=b, zk=zk, namespace=namespace)
    fe_app = procs.app("frontend")
    fe = procs.sidecar("frontend", fe_app.port("port"), cp=f"{a},{b}", zk=zk, namespace=namespace)
    cluster = f"outbound|catalog.{namespace}"
    wait_until(lambda: serving(fe, cluster) == 1, 10, message="the frontend sees catalog")
    assert "frontend" in proxies(cp_a)  # the first --cp

    # A dies: the frontend's stream moves to B, and B's pushes reach it.
    cp_a.kill()
    wait_until(lambda: "frontend" in proxies(cp_b), 10, message="the frontend reconnects to replica B")
    app2 = procs.app("catalog")
    procs.sidecar("catalog", app2.port("port"), cp=b, zk=zk, namespace=namespace, name="sidecar-catalog-2")
    wait_until(lambda: serving(fe, cluster) == 2, 10, message="the frontend follows B: a second catalog")

    # A new replica A' loses ZooKeeper (server 1 stops; the ensemble keeps its quorum): a new
    # sidecar given A' first is sent on to B, and is served.
    cp_a2 = procs.controlplane(s1.hosts, name="cp-a2")
    wait_until(lambda: healthz(cp_a2)["registry_snapshot"] is not None, 10, message="A' has a snapshot")
    a2 = f"127.0.0.1:{cp_a2.port('xds_port')}"
    s1.stop()
    wait_until(lambda: healthz(cp_a2)["zookeeper"] != "CONNECTED", 10, message="A' lost ZooKeeper")
    late_app = procs.app("reports")
    late = procs.sidecar("reports", late_app.port("port"), cp=f"{a2},{b}", zk=zk, namespace=namespace)
    wait_until(lambda: serving(late, cluster) == 2, 10, message="the new sidecar is served by B")
    assert "reports" in proxies(cp_b) and "reports" not in proxies(cp_a2)
