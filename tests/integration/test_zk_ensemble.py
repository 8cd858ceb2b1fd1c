"""A mesh on a 3-server ZooKeeper ensemble loses the leader, then restarts every server (issue 15).

Topology: a control plane and three sidecars (``catalog`` twice, ``frontend``), each with its app,
all given the ensemble as ``--zk 127.0.0.1:a,127.0.0.1:b,127.0.0.1:c`` and their default session
timeout (10 s). No traffic policy is written: the default one, which retries nothing.

Three observers run from before the first fault to the end:

* traffic: a thread sends ``GET / Host: catalog`` to the frontend's outbound listener about every
  10 ms and keeps every answer that is not a 200;
* pushes: a SotW ADS stream (tests/harness/ads.py) ACKs every CDS and EDS response of the control
  plane and keeps what each says of catalog, so a push of an empty or partial snapshot is caught
  whenever it happens, not only when sampled;
* the data path's view: the frontend's ``/clusters`` sampled every 20 ms, the catalog endpoints it
  balances over.

Steps: (a) SIGKILL of the leader; the two others elect a new one; traffic goes on for a few hundred
requests; the old leader starts again and rejoins as a follower. (b) A rolling restart of all three
(SIGTERM, start, wait until it serves again; followers first, the leader last). After each step:
every instance znode is still held by the session that created it (the sessions survived: the
sidecars' kazoo clients moved to another server within the session timeout), every client is
connected again, and the control plane published no new registry snapshot (its re-reads after each
reconnect found the same registry).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
from envoy.config.core.v3 import health_check_pb2
from kazoo.client import KazooClient

from meshkeeper import xds
from meshkeeper.registry import Paths
from meshkeeper.xds import NodeInfo
from tests.harness import ZooKeeperEnsemble, http_get, wait_until
from tests.harness.ads import AdsStream, unpack
from tests.harness.load import Connection, Result
from tests.harness.scrape import metric_value

pytestmark = pytest.mark.integration

REQUEST_INTERVAL = 0.01  # seconds between two requests of the traffic thread (pacing)
SAMPLE_INTERVAL = 0.02  # seconds between two reads of the frontend's /clusters
AFTER_ELECTION = 300  # requests answered under the new leader before the old one returns
RECONNECT_TIMEOUT = 15.0  # seconds; the sessions (10 s) must have survived well before that
SERVING = (health_check_pb2.UNKNOWN, health_check_pb2.HEALTHY)


class Traffic:
    """Paced requests through the frontend's sidecar in a thread; every failure is kept."""

    def __init__(self, port: int) -> None:
        self.conn = Connection(port, "catalog")
        self.answered: Counter[str] = Counter()  # 200s by app instance
        self.failures: list[Result] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            r = self.conn.get("/")
            if r.status == 200:
                self.answered[r.instance] += 1
            else:
                self.failures.append(r)
            self._stop.wait(REQUEST_INTERVAL)  # pacing, not waiting for state

    @property
    def total(self) -> int:
        return sum(self.answered.values()) + len(self.failures)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(10)
            self.conn.close()


class PushRecorder:
    """Subscribes to CDS and catalog's EDS over SotW, ACKs every response, records catalog in each."""

    def __init__(self, xds_port: int, ns: str) -> None:
        node = NodeInfo(node_id=NodeInfo.make_id("127.0.0.1", "observer", 15006, ns), service="observer",
                        namespace=ns, app_port=8080, inbound_port=15006, outbound_port=15001)
        self.cluster = xds.outbound_cluster("catalog", ns)
        self.stream = AdsStream(xds_port, node)
        self.clusters: list[set[str]] = []  # outbound cluster names in each CDS response
        self.endpoints: list[set[str]] = []  # catalog's serving endpoints in each EDS response carrying it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ads-recorder", daemon=True)

    def start(self) -> PushRecorder:
        self.stream.send(xds.CLUSTER)
        self.stream.send(xds.ENDPOINT, [self.cluster])
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                resp = self.stream.recv(timeout=0.2)
            except AssertionError:  # nothing pushed in that time
                continue
            resources = unpack(resp)
            if resp.type_url == xds.CLUSTER:
                self.clusters.append({n for n in resources if n.startswith("outbound|")})
                self.stream.send(xds.CLUSTER, (), resp.version_info, resp.nonce)
            elif resp.type_url == xds.ENDPOINT:
                cla = resources.get(self.cluster)
                if cla is not None:
                    self.endpoints.append({
                        f"{e.endpoint.address.socket_address.address}:{e.endpoint.address.socket_address.port_value}"
                        for loc in cla.endpoints for e in loc.lb_endpoints if e.health_status in SERVING})
                self.stream.send(xds.ENDPOINT, [self.cluster], resp.version_info, resp.nonce)

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(10)
            self.stream.close()


class ClusterSampler:
    """The catalog endpoints the frontend's sidecar balances over, read from /clusters in a thread."""

    def __init__(self, admin_url: str, ns: str) -> None:
        self.url = f"{admin_url}/clusters"
        self.cluster = xds.outbound_cluster("catalog", ns)
        self.samples: list[frozenset[str]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clusters-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, _, body = http_get(self.url, timeout=2)
                clusters = {c["name"]: c for c in json.loads(body)["clusters"]} if status == 200 else {}
            except OSError:
                self.errors += 1
            else:
                eps = clusters.get(self.cluster, {}).get("endpoints", [])
                self.samples.append(frozenset(f"{e['address']}:{e['port']}" for e in eps if e["serving"]))
            self._stop.wait(SAMPLE_INTERVAL)

    def start(self) -> ClusterSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_the_mesh_survives_the_loss_of_the_leader_and_a_rolling_restart(zk_ensemble: ZooKeeperEnsemble, procs,
                                                                        namespace):
    hosts = zk_ensemble.hosts
    assert hosts.count(",") == 2
    cp = procs.controlplane(hosts)
    target, http_port = f"127.0.0.1:{cp.port('xds_port')}", cp.port("http_port")
    sidecars, apps = [], set()
    for _ in range(2):
        app = procs.app("catalog")
        apps.add(f"127.0.0.1:{app.port('port')}")
        sidecars.append(procs.sidecar("catalog", app.port("port"), cp=target, zk=hosts, namespace=namespace,
                                      drain_delay=0))
    frontend = procs.sidecar("frontend", procs.app("frontend").port("port"), cp=target, zk=hosts,
                             namespace=namespace, drain_delay=0)
    sidecars.append(frontend)
    catalog = {f"127.0.0.1:{s.port('inbound_port')}" for s in sidecars[:2]}
    paths = Paths(namespace)
    znodes = [paths.instance("catalog", key) for key in sorted(catalog)]
    znodes.append(paths.instance("frontend", f"127.0.0.1:{frontend.port('inbound_port')}"))

    def cp_metric(name: str, **labels: str) -> float:
        return metric_value(http_get(f"http://127.0.0.1:{http_port}/metrics")[2].decode(), name, **labels)

    def published() -> int | None:
        """The control plane's snapshot version once it holds the whole mesh, VIPs included (it
        allocates them after the services appear, which takes one more snapshot)."""
        got = {svc: json.loads(http_get(f"http://127.0.0.1:{http_port}/api/console/services/{namespace}/{svc}")[2])
               for svc in ("catalog", "frontend")}
        whole = got["catalog"]["serving"] == 2 and got["frontend"]["serving"] == 1 and all(
            g["vip"] for g in got.values())
        return got["catalog"]["snapshot_version"] if whole else None

    kz = KazooClient(hosts=hosts, timeout=10.0)
    kz.start(timeout=10)
    recorder = sampler = traffic = None
    try:
        def owners() -> dict[str, int]:
            """Instance znode -> the session holding it; only once every znode reads back."""
            return {path: kz.retry(kz.get, path)[1].ephemeralOwner for path in znodes}

        def settled(step: str) -> None:
            """Every client connected again, each znode held by its first session, no new snapshot."""
            wait_until(lambda: cp_metric("meshkeeper_zookeeper_connected") == 1, RECONNECT_TIMEOUT,
                       message=f"{step}: the control plane reconnects to ZooKeeper")
            for sc in sidecars:
                wait_until(lambda sc=sc: registration(sc)["zookeeper"] == "CONNECTED", RECONNECT_TIMEOUT,
                           message=f"{step}: {sc.name} reconnects to ZooKeeper")
                assert registration(sc)["registrations"] == 1, (step, sc.name, registration(sc))
            assert wait_until(owners, RECONNECT_TIMEOUT, message=f"{step}: instance znodes") == first_owners, step
            assert cp_metric("meshkeeper_registry_snapshot_version") == snapshot_version, step

        wait_until(lambda: catalog_serving(frontend, namespace) == catalog, 10,
                   message="the frontend balances over both catalog instances")
        first_owners = wait_until(owners, 10)
        snapshot_version = wait_until(published, 10, message="the control plane's snapshot holds the mesh")
        recorder = PushRecorder(cp.port("xds_port"), namespace).start()
        sampler = ClusterSampler(frontend.admin_url, namespace).start()
        traffic = Traffic(frontend.port("outbound_port")).start()
        wait_until(lambda: recorder.endpoints and sampler.samples and traffic.total >= 50, 10,
                   message="observers running")
        suspended = cp_metric("meshkeeper_zookeeper_events", type="SUSPENDED")

        # (a) the leader crashes: the two others elect a new one while the mesh serves
        old = zk_ensemble.leader()
        assert old is not None
        old.kill()
        killed_at = time.monotonic()
        new = zk_ensemble.wait_quorum(10)
        elected_in = time.monotonic() - killed_at
        assert new is not old
        served = traffic.total
        wait_until(lambda: traffic.total >= served + AFTER_ELECTION, 20,
                   message=f"{AFTER_ELECTION} requests under the new leader")
        settled("leader killed")
        old.start()
        assert zk_ensemble.wait_quorum(10) is new and old.mode() == "follower"
        settled("old leader rejoined")

        # (b) a rolling restart: followers first, the leader last
        served = traffic.total
        zk_ensemble.rolling_restart(20, on_restarted=lambda s: settled(f"server {s.myid} restarted"))
        wait_until(lambda: traffic.total >= served + 100, 10, message="traffic after the rolling restart")

        traffic.stop()
        sampler.stop()
        recorder.stop()
        # Every client lost its server at least once (a follower drops its clients while it has no leader).
        assert cp_metric("meshkeeper_zookeeper_events", type="SUSPENDED") > suspended
        assert traffic.failures == [], f"{len(traffic.failures)} of {traffic.total} failed: {traffic.failures[:5]}"
        assert set(traffic.answered) == apps, traffic.answered
        assert recorder.clusters and all(xds.outbound_cluster("catalog", namespace) in c for c in recorder.clusters)
        assert recorder.endpoints and all(eps == catalog for eps in recorder.endpoints), recorder.endpoints
        assert sampler.samples and all(s == catalog for s in sampler.samples), Counter(sampler.samples)
        print(f"election after SIGKILL of the leader: {elected_in:.2f}s; {traffic.total} requests, "
              f"{len(recorder.clusters)} CDS and {len(recorder.endpoints)} EDS pushes, "
              f"{len(sampler.samples)} /clusters samples")
    finally:
        for observer in (traffic, sampler, recorder):
            if observer is not None:
                observer.stop()
        kz.stop()
        kz.close()


def registration(sidecar) -> dict:
    return json.loads(http_get(f"{sidecar.admin_url}/server_info")[2])["registration"]


def catalog_serving(sidecar, ns: str) -> set[str]:
    body = json.loads(http_get(f"{sidecar.admin_url}/clusters")[2])
    for c in body["clusters"]:
        if c["name"] == xds.outbound_cluster("catalog", ns):
            return {f"{e['address']}:{e['port']}" for e in c["endpoints"] if e["serving"]}
    return set()
