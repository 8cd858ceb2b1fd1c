"""The real control plane process against a real ZooKeeper, seen through a real ADS stream."""

from __future__ import annotations

import asyncio
import json
import queue
import time

import pytest
from envoy.config.cluster.v3 import cluster_pb2  # noqa: F401 (registers the type for unpacking)
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.runtime.v3 import rtds_pb2  # noqa: F401 (registers the type for unpacking)
from google.protobuf import json_format
from kazoo.client import KazooClient
from prometheus_client.parser import text_string_to_metric_families

from controlplane.metrics import Metrics
from controlplane.watch import RegistryWatch
from controlplane.zksource import KazooSource
from meshkeeper import xds
from meshkeeper.registry import Paths
from meshkeeper.xds import NodeInfo
from tests.harness import ZooKeeper, http_get, wait_until
from tests.harness.ads import AdsStream, unpack

pytestmark = pytest.mark.integration

QUIET = 1.5  # how long an open stream is watched for a push that must not come


def weights(cla: endpoint_pb2.ClusterLoadAssignment) -> dict[str, int]:
    return {f"{e.endpoint.address.socket_address.address}:{e.endpoint.address.socket_address.port_value}":
            e.load_balancing_weight.value for loc in cla.endpoints for e in loc.lb_endpoints}


def metric(http_port: int, name: str, **labels: str) -> float | None:
    _, _, body = http_get(f"http://127.0.0.1:{http_port}/metrics")
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def node_for(ns: str) -> NodeInfo:
    return NodeInfo(node_id=NodeInfo.make_id("127.0.0.1", "web", 15006, ns), service="web", namespace=ns,
                    app_port=8080, inbound_port=15006, outbound_port=15001)


def register(k: KazooClient, paths: Paths, svc: str, host: str, port: int, **labels: str) -> None:
    rec = {"address": host, "port": port, "weight": 10, "labels": labels, "app_port": 8080}
    k.ensure_path(paths.instances(svc))
    k.create(paths.instance(svc, f"{host}:{port}"), json.dumps(rec).encode())


def seed(k: KazooClient, paths: Paths) -> None:
    k.create(paths.service("catalog"), b'{"protocol": "http"}', makepath=True)
    register(k, paths, "catalog", "127.0.0.1", 9001, version="v1", zone="a")
    register(k, paths, "catalog", "127.0.0.2", 9001, version="v2", zone="b")


def subscribe(stream: AdsStream, ns: str) -> dict[str, discovery_pb2.DiscoveryResponse]:
    cds = stream.fetch(xds.CLUSTER)
    eds_names = sorted(n for n in unpack(cds) if n.startswith("outbound|"))
    eds = stream.fetch(xds.ENDPOINT, eds_names)
    return {"cds": cds, "eds": eds, "eds_names": eds_names}


def test_endpoints_overrides_and_bad_znodes(zk_server, zk_client, namespace, procs):
    paths = Paths(namespace)
    seed(zk_client, paths)
    cp = procs.controlplane(zk_server.hosts)
    xds_port, http_port = cp.port("xds_port"), cp.port("http_port")
    main = xds.outbound_cluster("catalog", namespace)

    stream = AdsStream(xds_port, node_for(namespace))
    try:
        got = subscribe(stream, namespace)
        assert set(unpack(got["cds"])) >= {main, f"{main}|v1", f"{main}|v2", "inbound|8080"}
        assert weights(unpack(got["eds"])[main]) == {"127.0.0.1:9001": 10, "127.0.0.2:9001": 10}

        # an operator override changes the endpoint weight within a second
        started = time.monotonic()
        zk_client.create(paths.override("catalog", "127.0.0.1:9001"), b'{"weight": 42}', makepath=True)
        eds = stream.recv(timeout=5)
        assert time.monotonic() - started < 1.0
        assert eds.type_url == xds.ENDPOINT
        assert weights(unpack(eds)[main]) == {"127.0.0.1:9001": 42, "127.0.0.2:9001": 10}
        stream.send(xds.ENDPOINT, got["eds_names"], eds.version_info, eds.nonce)

        # a malformed instance is skipped and counted; the others stay
        zk_client.create(paths.instance("catalog", "127.0.0.3:9001"), b'{"address": "127.0.0.3", "port": ')
        wait_until(lambda: (metric(http_port, "meshkeeper_registry_bad_znodes_total", kind="instance") or 0) >= 1,
                   10, message="bad znode counted")
        register(zk_client, paths, "catalog", "127.0.0.4", 9001, version="v1", zone="a")
        eds = stream.recv(timeout=5)
        assert weights(unpack(eds)[main]) == {"127.0.0.1:9001": 42, "127.0.0.2:9001": 10, "127.0.0.4:9001": 10}
        stream.send(xds.ENDPOINT, got["eds_names"], eds.version_info, eds.nonce)

        # the proxy shows up with what it ACKed
        def acked() -> bool:
            _, _, body = http_get(f"http://127.0.0.1:{http_port}/api/proxies")
            [p] = [p for p in json.loads(body) if p["namespace"] == namespace]
            return p["types"]["EDS"]["version_acked"] == eds.version_info and p["types"]["CDS"]["nack"] is None
        wait_until(acked, 10, message="EDS ACK visible in /api/proxies")
        status, _, body = http_get(f"http://127.0.0.1:{http_port}/healthz")
        assert status == 200 and json.loads(body)["registry_snapshot"]["version"] >= 1
    finally:
        stream.close()


def layers(resp: discovery_pb2.DiscoveryResponse) -> dict[str, dict]:
    assert resp.type_url == xds.RUNTIME
    return {name: json_format.MessageToDict(rt.layer) for name, rt in unpack(resp).items()}


def test_runtime_config_reaches_an_rtds_subscriber(zk_server, zk_client, namespace, procs):
    paths = Paths(namespace)
    seed(zk_client, paths)  # catalog has a service znode; web (the node's service) has none
    cp = procs.controlplane(zk_server.hosts)
    xds_port, http_port = cp.port("xds_port"), cp.port("http_port")

    stream = AdsStream(xds_port, node_for(namespace))
    try:
        def push(names: list[str]) -> dict[str, dict]:
            resp = stream.recv(timeout=5)
            stream.send(xds.RUNTIME, names, resp.version_info, resp.nonce)
            return layers(resp)

        assert layers(stream.fetch(xds.RUNTIME, ["catalog"])) == {"catalog": {}}  # no config yet: empty
        zk_client.create(paths.config("catalog"), b'{"color": "blue", "feature.x": "on"}', makepath=True)
        assert push(["catalog"]) == {"catalog": {"color": "blue", "feature.x": "on"}}
        zk_client.set(paths.config("catalog"), b'{"color": "green"}')
        assert push(["catalog"]) == {"catalog": {"color": "green"}}

        # a bad payload is counted and pushes nothing: the next push carries the next good value
        zk_client.set(paths.config("catalog"), b'{"color": 1}')
        wait_until(lambda: (metric(http_port, "meshkeeper_registry_bad_znodes_total", kind="config") or 0) >= 1,
                   10, message="bad config counted")
        zk_client.set(paths.config("catalog"), b'{"color": "red"}')
        assert push(["catalog"]) == {"catalog": {"color": "red"}}

        # a name with no service znode: answered empty, then served once its config appears
        stream.send(xds.RUNTIME, ["catalog", "web"])
        assert push(["catalog", "web"]) == {"catalog": {"color": "red"}}
        zk_client.create(paths.config("web"), b'{"mode": "dark"}')
        assert push(["catalog", "web"]) == {"catalog": {"color": "red"}, "web": {"mode": "dark"}}
        zk_client.delete(paths.config("catalog"))
        assert push(["catalog", "web"]) == {"catalog": {}, "web": {"mode": "dark"}}
    finally:
        stream.close()


def test_zookeeper_outage_keeps_the_last_snapshot(zk, namespace, procs):
    paths = Paths(namespace)
    k = KazooClient(hosts=zk.hosts, timeout=5.0)
    k.start(timeout=10)
    try:
        seed(k, paths)
    finally:
        k.stop()
        k.close()
    cp = procs.controlplane(zk.hosts, "--zk-session-timeout", "4")
    xds_port, http_port = cp.port("xds_port"), cp.port("http_port")
    main = xds.outbound_cluster("catalog", namespace)
    both = {"127.0.0.1:9001": 10, "127.0.0.2:9001": 10}

    stream = AdsStream(xds_port, node_for(namespace))
    try:
        got = subscribe(stream, namespace)
        assert weights(unpack(got["eds"])[main]) == both

        zk.stop()
        wait_until(lambda: metric(http_port, "meshkeeper_zookeeper_connected") == 0, 10,
                   message="control plane sees ZooKeeper gone")
        # (Read once the outage is seen: a snapshot of what was read before it may still land
        # after the first push on a loaded machine; from here on none may.)
        version = metric(http_port, "meshkeeper_registry_snapshot_version")
        with pytest.raises(queue.Empty):  # no push at all, let alone an emptied one
            resp = stream.responses.get(timeout=QUIET)
            pytest.fail(f"pushed during the outage: {resp.type_url} {unpack(resp)}")
        assert metric(http_port, "meshkeeper_registry_snapshot_version") == version

        # a sidecar connecting during the outage gets the last snapshot
        late = AdsStream(xds_port, node_for(namespace))
        try:
            got2 = subscribe(late, namespace)
            assert unpack(got2["cds"]).keys() == unpack(got["cds"]).keys()
            assert weights(unpack(got2["eds"])[main]) == both
        finally:
            late.close()

        # ZooKeeper back: the tree is re-read, and watches work again
        zk.start()
        wait_until(lambda: metric(http_port, "meshkeeper_zookeeper_connected") == 1, 30,
                   message="control plane reconnects")
        k = KazooClient(hosts=zk.hosts, timeout=5.0)
        k.start(timeout=10)
        try:
            k.create(paths.override("catalog", "127.0.0.2:9001"), b'{"enabled": false}', makepath=True)
        finally:
            k.stop()
            k.close()
        eds = stream.recv(timeout=10)
        assert eds.type_url == xds.ENDPOINT
        assert weights(unpack(eds)[main]) == {"127.0.0.1:9001": 10, "127.0.0.2:9001": 1}  # DRAINING
    finally:
        stream.close()


def test_starts_while_zookeeper_is_down(tmp_path, namespace, procs):
    zk = ZooKeeper(tmp_path / "zk-late")  # port chosen now, server started later
    try:
        cp = procs.controlplane(zk.hosts)
        xds_port, http_port = cp.port("xds_port"), cp.port("http_port")
        status, _, body = http_get(f"http://127.0.0.1:{http_port}/healthz")
        assert status == 200 and json.loads(body)["registry_snapshot"] is None
        stream = AdsStream(xds_port, node_for(namespace))
        try:
            stream.send(xds.CLUSTER)
            with pytest.raises(queue.Empty):  # nothing before the first complete snapshot
                stream.responses.get(timeout=QUIET)
            zk.start()
            k = KazooClient(hosts=zk.hosts, timeout=5.0)
            k.start(timeout=10)
            try:
                seed(k, Paths(namespace))
            finally:
                k.stop()
                k.close()
            cds = stream.recv(timeout=20)
            assert cds.type_url == xds.CLUSTER and "inbound|8080" in unpack(cds)
        finally:
            stream.close()
        assert cp.running()
    finally:
        zk.close()


def test_session_expiry_rereads_and_rearms_watches(zk_server, zk_client, namespace):
    """In-process: RegistryWatch on KazooSource, with the session expired under it on purpose."""
    paths = Paths(namespace)
    seed(zk_client, paths)

    async def main() -> None:
        published: list = []
        metrics = Metrics()
        source = KazooSource(zk_server.hosts, session_timeout=4.0)
        watch = RegistryWatch(source, published.append, metrics=metrics, debounce=0.02)
        watch.start()
        try:
            async def until(cond, what: str, within: float = 15.0):
                deadline = time.monotonic() + within
                while not cond():
                    assert time.monotonic() < deadline, what
                    await asyncio.sleep(0.02)

            def instances() -> set[str]:
                svc = published[-1].services(namespace).get("catalog") if published else None
                return set(svc.instances) if svc else set()

            await until(lambda: len(instances()) == 2, "first snapshot")
            session_id, passwd = source.client.client_id
            # Expire the session: a second client attaches to it and closes it (the ZooKeeper
            # test suites' trick). kazoo sees EXPIRED_SESSION, i.e. LOST, then a new session.
            twin = KazooClient(hosts=zk_server.hosts, client_id=(session_id, passwd))
            await asyncio.get_running_loop().run_in_executor(None, twin.start)
            await asyncio.get_running_loop().run_in_executor(None, twin.stop)
            twin.close()
            await until(lambda: watch.state == "CONNECTED" and source.client.client_id[0] != session_id,
                        "a new session")
            assert metrics.registry.get_sample_value("meshkeeper_zookeeper_resyncs_total") == 2
            # the tree was re-read: a write after the new session arrives through new watches
            zk_client.set(paths.instance("catalog", "127.0.0.1:9001"), json.dumps(
                {"address": "127.0.0.1", "port": 9001, "weight": 77}).encode())
            await until(lambda: published[-1].services(namespace)["catalog"]
                        .instances["127.0.0.1:9001"].weight == 77, "change after expiry")
            register(zk_client, paths, "catalog", "127.0.0.5", 9001)
            await until(lambda: "127.0.0.5:9001" in instances(), "new instance after expiry")
        finally:
            await watch.stop()

    asyncio.run(main())
