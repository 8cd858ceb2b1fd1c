"""The foundation end to end: real ZooKeeper, a real control plane, real sidecars and apps.

Topology per test: ``catalog`` (three app instances, each beside its own sidecar, weights 1, 2, 7)
and a ``frontend`` sidecar whose outbound listener the test talks to with ``Host: catalog``.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from kazoo.client import KazooClient

from meshkeeper.registry import Override, Paths
from tests.harness import free_port, http_get, wait_until

pytestmark = pytest.mark.integration
SESSION_TIMEOUT = "2"  # seconds; the harness's ZooKeeper allows sessions down to 1 s


class Client:
    """A keep-alive HTTP/1.1 client to one sidecar's outbound listener."""

    def __init__(self, port: int, host: str = "catalog") -> None:
        self.port, self.host = port, host
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def get(self, path: str = "/") -> tuple[int, dict[str, str], bytes]:
        for attempt in (0, 1):
            try:
                self.conn.request("GET", path, headers={"Host": self.host})
                resp = self.conn.getresponse()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def split(self, n: int) -> tuple[Counter, Counter]:
        """(instances that answered 200, status codes) over n requests."""
        who, codes = Counter(), Counter()
        for _ in range(n):
            status, headers, _ = self.get()
            codes[status] += 1
            if status == 200:
                who[headers["x-app-instance"]] += 1
        return who, codes


@dataclass
class Mesh:
    ns: str
    zk: str
    cp: object
    catalog: list  # (app, sidecar) pairs
    frontend: object
    kz: KazooClient

    @property
    def cp_target(self) -> str:
        return f"127.0.0.1:{self.cp.port('xds_port')}"

    def clusters(self, sidecar=None) -> dict:
        status, _, body = http_get(f"{(sidecar or self.frontend).admin_url}/clusters")
        assert status == 200
        return {c["name"]: c for c in json.loads(body)["clusters"]}

    def serving(self, sidecar=None) -> dict[str, int]:
        """Serving catalog endpoints seen by the frontend sidecar: {host:port: weight}."""
        c = self.clusters(sidecar).get(f"outbound|catalog.{self.ns}")
        if not c:
            return {}
        return {f"{e['address']}:{e['port']}": e["weight"] for e in c["endpoints"] if e["serving"]}

    def instance_key(self, i: int) -> str:
        return f"127.0.0.1:{self.catalog[i][1].port('inbound_port')}"

    def app_instance(self, i: int) -> str:
        return f"127.0.0.1:{self.catalog[i][0].port('port')}"

    def proxies(self) -> list[dict]:
        status, _, body = http_get(f"http://127.0.0.1:{self.cp.port('http_port')}/api/proxies")
        assert status == 200
        return json.loads(body)

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.cp.port('http_port')}/metrics")[2].decode()


def start_mesh(procs, zk_hosts: str, ns: str, kz: KazooClient, xds_port: int = 0,
               cp_args: tuple[str, ...] = ()) -> Mesh:
    cp = procs.meshkeeper("controlplane", "--zk", zk_hosts, "--xds-port", str(xds_port), "--http-port", "0",
                          *cp_args, name="controlplane")
    target = f"127.0.0.1:{cp.port('xds_port')}"
    catalog = []
    for version, weight in (("v1", 1), ("v1", 2), ("v2", 7)):
        app = procs.app("catalog", version=version)
        sc = procs.sidecar("catalog", app.port("port"), cp=target, zk=zk_hosts, namespace=ns, version=version,
                           weight=weight, zk_session_timeout=SESSION_TIMEOUT)
        catalog.append((app, sc))
    fe_app = procs.app("frontend")
    frontend = procs.sidecar("frontend", fe_app.port("port"), cp=target, zk=zk_hosts, namespace=ns,
                             zk_session_timeout=SESSION_TIMEOUT)
    mesh = Mesh(ns=ns, zk=zk_hosts, cp=cp, catalog=catalog, frontend=frontend, kz=kz)
    wait_until(lambda: len(mesh.serving()) == 3, 10, message="frontend sees three catalog endpoints")
    return mesh


@pytest.fixture
def mesh(procs, zk_server, zk_client, namespace) -> Mesh:
    return start_mesh(procs, zk_server.hosts, namespace, zk_client)


def shares(who: Counter, mesh: Mesh) -> list[float]:
    total = sum(who.values())
    return [who[mesh.app_instance(i)] / total for i in range(3)]


def test_weights_1_2_7_split_traffic_10_20_70(mesh):
    who, codes = Client(mesh.frontend.port("outbound_port")).split(2000)
    assert codes == {200: 2000}
    for got, want in zip(shares(who, mesh), (0.10, 0.20, 0.70), strict=True):
        assert abs(got - want) <= 0.03, (shares(who, mesh), who)


def test_absolute_form_through_http_proxy_reaches_the_service(mesh):
    # What requests/httpx/urllib send when HTTP_PROXY points at the outbound listener.
    conn = http.client.HTTPConnection("127.0.0.1", mesh.frontend.port("outbound_port"), timeout=5)
    conn.request("GET", "http://catalog/items?x=1", headers={"Host": "catalog"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 200 and body["service"] == "catalog" and body["path"] == "/items"


def test_override_weight_and_disable_change_the_split_within_a_second(mesh):
    paths = Paths(mesh.ns)
    heavy = mesh.instance_key(2)
    mesh.kz.create(paths.override("catalog", heavy), Override(weight=1).encode(), makepath=True)
    wait_until(lambda: mesh.serving().get(heavy) == 1, 1.0, 0.02, message="weight override applied")
    who, _ = Client(mesh.frontend.port("outbound_port")).split(400)
    for got, want in zip(shares(who, mesh), (0.25, 0.50, 0.25), strict=True):
        assert abs(got - want) <= 0.03, who

    light = mesh.instance_key(0)
    mesh.kz.create(paths.override("catalog", light), Override(enabled=False).encode())
    wait_until(lambda: light not in mesh.serving(), 1.0, 0.02, message="disabled endpoint leaves balancing")
    who, codes = Client(mesh.frontend.port("outbound_port")).split(300)
    assert codes == {200: 300} and who[mesh.app_instance(0)] == 0

    mesh.kz.delete(paths.override("catalog", light))
    wait_until(lambda: light in mesh.serving(), 1.0, 0.02, message="deleted override restores the endpoint")


def test_sigkill_of_a_sidecar_removes_its_endpoint_after_session_expiry(mesh):
    victim = mesh.instance_key(1)
    mesh.catalog[1][1].kill()
    wait_until(lambda: victim not in mesh.serving(), 10, message="killed instance leaves the cluster")
    who, codes = Client(mesh.frontend.port("outbound_port")).split(300)
    assert codes == {200: 300}
    assert who[mesh.app_instance(1)] == 0


def test_unhealthy_app_is_deregistered_and_comes_back(mesh):
    app, _ = mesh.catalog[0]
    key = mesh.instance_key(0)
    base = f"http://127.0.0.1:{app.port('port')}"
    assert http_get(f"{base}/fail?status=503&health=1")[0] == 200
    wait_until(lambda: key not in mesh.serving(), 10, message="unhealthy instance deregistered")
    assert not mesh.kz.exists(Paths(mesh.ns).instance("catalog", key))
    assert http_get(f"{base}/fail?status=0")[0] == 200
    wait_until(lambda: key in mesh.serving(), 10, message="recovered instance registered again")


def test_sigterm_deregisters_first_and_callers_see_no_errors(mesh):
    """A rolling restart: the instance leaves the registry at once, keeps serving while callers
    learn of it (--drain-delay), and no caller request fails."""
    _, sc = mesh.catalog[2]
    path = Paths(mesh.ns).instance("catalog", mesh.instance_key(2))
    assert mesh.kz.exists(path)
    failures: list = []
    answered = Counter()
    stop = threading.Event()

    def traffic():
        c = Client(mesh.frontend.port("outbound_port"))
        while not stop.is_set():
            status, headers, _ = c.get()
            answered[status] += 1
            if status != 200:
                failures.append((status, headers.get("x-meshkeeper-flags")))

    t = threading.Thread(target=traffic)
    t.start()
    try:
        sc.signal(signal.SIGTERM)
        wait_until(lambda: not mesh.kz.exists(path), 1.0, 0.02, message="znode deleted on SIGTERM")
        assert sc.running()  # still draining
        wait_until(lambda: mesh.instance_key(2) not in mesh.serving(), 2, message="endpoint removed")
        assert sc.wait(15) == 0
        before = sum(answered.values())
        wait_until(lambda: sum(answered.values()) > before + 50, 5, message="traffic continues")
    finally:
        stop.set()
        t.join()
    assert failures == []


def test_malformed_instance_znode_is_skipped_and_counted(mesh):
    bad = Paths(mesh.ns).instance("catalog", "127.0.0.1:1")
    mesh.kz.create(bad, b"{not json")
    wait_until(lambda: "meshkeeper_registry_bad_znodes_total" in mesh.metrics()
               and _metric(mesh.metrics(), "meshkeeper_registry_bad_znodes_total") >= 1, 5,
               message="bad znode counted")
    assert len(mesh.serving()) == 3
    _, codes = Client(mesh.frontend.port("outbound_port")).split(100)
    assert codes == {200: 100}


def test_policy_the_sidecar_cannot_honour_is_nacked_and_old_config_stays(mesh):
    path = Paths(mesh.ns).policy("catalog")
    mesh.kz.create(path, json.dumps({"lb": {"policy": "maglev"}}).encode())

    def nacked():
        for p in mesh.proxies():
            if p["node_id"] == mesh.frontend.info["node"]:
                nack = p["types"]["CDS"]["nack"]
                return nack and "MAGLEV" in nack["error"]
        return False

    wait_until(nacked, 5, message="CDS NACK visible in /api/proxies")
    dump = json.loads(http_get(f"{mesh.frontend.admin_url}/config_dump")[2])
    assert "MAGLEV" in dump["configs"]["clusters"]["last_nack"]
    who, codes = Client(mesh.frontend.port("outbound_port")).split(1000)
    assert codes == {200: 1000}
    for got, want in zip(shares(who, mesh), (0.10, 0.20, 0.70), strict=True):
        assert abs(got - want) <= 0.03


def test_control_plane_restart_keeps_routing_and_resyncs(procs, zk_server, zk_client, namespace):
    xds_port = free_port()
    mesh = start_mesh(procs, zk_server.hosts, namespace, zk_client, xds_port=xds_port)
    client = Client(mesh.frontend.port("outbound_port"))
    # Settled: the frontend's own registration has reached its config too.
    wait_until(lambda: f"outbound|frontend.{namespace}" in mesh.clusters(), 5, message="frontend cluster")
    before = json.loads(http_get(f"{mesh.frontend.admin_url}/config_dump")[2])["configs"]

    failures: list = []
    stop = threading.Event()

    def traffic():
        c = Client(mesh.frontend.port("outbound_port"))
        while not stop.is_set():
            status, _, _ = c.get()
            if status != 200:
                failures.append(status)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        mesh.cp.kill()
        _, codes = client.split(200)
        assert codes == {200: 200}
        cp2 = procs.meshkeeper("controlplane", "--zk", zk_server.hosts, "--xds-port", str(xds_port),
                               "--http-port", "0", name="controlplane-2")
        mesh.cp = cp2
        wait_until(lambda: {p["node_id"] for p in mesh.proxies()} >= {mesh.frontend.info["node"]}, 20,
                   message="sidecar reconnected to the new control plane")
        wait_until(lambda: all(t["version_acked"] for p in mesh.proxies() for t in p["types"].values()
                               if t["version_sent"]), 10, message="resync ACKed")
    finally:
        stop.set()
        t.join()
    assert failures == []
    after = json.loads(http_get(f"{mesh.frontend.admin_url}/config_dump")[2])["configs"]
    assert len(after["clusters"]["resources"]) == len(before["clusters"]["resources"])
    assert len(mesh.serving()) == 3
    # A restarted control plane computes the same content, so the versions are the same.
    assert after["endpoints"]["version_info"] == before["endpoints"]["version_info"]


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_workers_share_the_listeners_and_stop_together(procs, zk_server, zk_client, namespace):
    mesh = start_mesh(procs, zk_server.hosts, namespace, zk_client)
    app = procs.app("frontend")
    sc = procs.sidecar("frontend", app.port("port"), cp=mesh.cp_target, zk=zk_server.hosts, namespace=namespace,
                       workers=2, name="sidecar-2workers", access_log="-")
    node = sc.info["node"]
    wait_until(lambda: {p["node_id"] for p in mesh.proxies()} >= {node, f"{node}~w1"}, 10,
               message="both workers hold an ADS stream")
    # Both workers must have their config before the split is exact on each of them.
    wait_until(lambda: all(t["version_acked"] for p in mesh.proxies() if p["node_id"].startswith(node)
                           for t in p["types"].values() if t["version_sent"]), 10, message="workers ACKed")
    statuses = Counter()
    for _ in range(20):  # new connections land on either worker (SO_REUSEPORT)
        c = Client(sc.port("outbound_port"))
        statuses.update(c.split(10)[1])
        c.conn.close()
    assert statuses == {200: 200}

    def access_log_lines() -> list[dict]:
        lines = [x for x in sc.stdout_path.read_text().splitlines() if x.startswith("{")]
        return [json.loads(x) for x in lines] if len(lines) >= 200 else []

    # Both workers' access logs reach the sidecar's stdout, whole lines each (worker 1 writes to
    # the stdout it shares with worker 0; its ready line goes over a pipe of its own).
    logged = wait_until(access_log_lines, 5, message="200 access log lines from the two workers")
    assert len(logged) == 200 and all(x["response_code"] == 200 and x["listener"] == "outbound" for x in logged)
    pids = sc.group_pids()
    assert len(pids) >= 2
    assert sc.terminate() == 0
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]


def test_a_second_sidecar_cannot_join_the_ports_of_one_with_workers(procs, zk_server, namespace):
    cp = procs.controlplane(zk_server.hosts)
    app = procs.app("catalog")
    port = free_port()
    target = f"127.0.0.1:{cp.port('xds_port')}"
    procs.sidecar("catalog", app.port("port"), cp=target, zk=zk_server.hosts, namespace=namespace,
                  workers=2, inbound_port=port)
    with pytest.raises(Exception, match="cannot bind a listener.*Address already in use"):
        procs.sidecar("other", app.port("port"), cp=target, zk=zk_server.hosts, namespace=namespace,
                      workers=2, inbound_port=port, name="sidecar-intruder")


def test_session_expiry_reregisters_and_the_mesh_recovers(mesh):
    """A sidecar frozen past its session timeout (a long GC pause, a VM stall) loses its session:
    ZooKeeper deletes its ephemeral znode. Once it runs again it must notice the expiry, open a
    new session and re-create the znode, and callers route to it again."""
    _, sc = mesh.catalog[0]
    key = mesh.instance_key(0)
    path = Paths(mesh.ns).instance("catalog", key)
    sc.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: not mesh.kz.exists(path), 10, message="session expired, znode deleted")
        wait_until(lambda: key not in mesh.serving(), 5, message="endpoint left the cluster")
    finally:
        sc.signal(signal.SIGCONT)
    wait_until(lambda: mesh.kz.exists(path), 10, message="znode re-created with a new session")
    wait_until(lambda: key in mesh.serving(), 5, message="endpoint back in the cluster")
    info = json.loads(http_get(f"{sc.admin_url}/server_info")[2])
    assert info["registration"]["registrations"] == 2 and info["registration"]["registered"]
    who, codes = Client(mesh.frontend.port("outbound_port")).split(200)
    assert codes == {200: 200} and who[mesh.app_instance(0)] > 0
