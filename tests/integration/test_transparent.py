"""Transparent mode end to end (DESIGN §10, issue 12): unmodified apps in pods, beside sidecars
started with ``--interception redirect`` after ``meshkeeper iptables``.

One mesh for the module, as Kubernetes would run it: ZooKeeper and the control plane on the host
(the pods reach them over the bridge), pods ``a`` (a caller), ``b`` and ``c`` (catalog, weights 1
and 3), ``e`` (a caller whose sidecar says ``--outbound-policy registry_only``), each with the
capture rules, an app as uid 1000 and its sidecar as uid 1337; a resolver of the test's own on the
host is the pods' resolv.conf nameserver. The apps are the demo app and plain urllib clients:
nothing in them knows the mesh. Needs root (CI runs as root); skipped where pods cannot be made.

The tests share the mesh and run in file order (pytest's default), which two of them rely on: the
first checks that nothing was captured before any app called out, and the thrift instance killed
near the end stays dead for the tests after it (which do not use it).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSServer
from kazoo.client import KazooClient

from meshkeeper.demo.process import app_argv, http_get, wait_until
from meshkeeper.registry import Paths
from tests.harness.pods import PodNetwork, PodNetworkUnavailable, unavailable_reason
from tests.harness.processes import ProcessGroup
from tests.harness.thrift_apps import ThriftClient, blob_pattern, call_argv, serve_argv

pytestmark = pytest.mark.integration

NS = "shop"
APP_UID = 1000
APP_PORT = 8080
CALLS = 400
EXTERNAL = "external.test"  # a name only the test's resolver knows
THRIFT_PORT = 9090
FIFTY_MB = 50 * 1024 * 1024


@pytest.fixture(autouse=True)
def _needs_pods() -> None:
    if reason := unavailable_reason():
        pytest.skip(f"no pod network: {reason}")


class Resolver(BaseResolver):
    """The pods' "real" resolver: knows ``external.test``; NXDOMAIN for everything else."""

    def __init__(self, address: str) -> None:
        self.address = address

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        if name == EXTERNAL and request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(self.address), ttl=60))
        elif name != EXTERNAL:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class Hello(BaseHTTPRequestHandler):
    """A server outside the mesh."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"outside the mesh\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("transparent")
    group = ProcessGroup(tmp / "logs")
    net = PodNetwork(group=group)
    try:
        net.open()
    except PodNetworkUnavailable as exc:
        pytest.skip(f"no pod network: {exc}")
    servers: list = []
    try:
        zk = net.zookeeper(tmp / "zk")
        cp = net.controlplane(zk.hosts)
        cp_addr = f"{net.host_ip}:{cp.port('xds_port')}"
        dns = DNSServer(Resolver(net.host_ip), address=net.host_ip, port=53)
        dns.start_thread()
        servers.append(dns)
        outside = ThreadingHTTPServer((net.host_ip, 0), Hello)
        threading.Thread(target=outside.serve_forever, daemon=True).start()
        servers.append(outside)

        pods = {}
        for name, weight, service, flags in (("b", 1, "catalog", {}), ("c", 3, "catalog", {}),
                                             ("a", 10, "frontend", {}),
                                             ("e", 10, "audit", {"outbound_policy": "registry_only"})):
            pod = pods[name] = net.add_pod(name)
            pod.set_resolv_conf([net.host_ip])
            pod.capture()
            pod.start(app_argv("--name", service, "--version", f"v{name}", "--host", "0.0.0.0",
                               "--port", str(APP_PORT)), role="app", uid=APP_UID, name=f"{name}-app")
            pod.sidecar(service, APP_PORT, cp=cp_addr, zk=zk.hosts, namespace=NS, interception="redirect",
                        weight=weight, **flags)
        for name, weight in (("d1", 1), ("d2", 3)):  # a thrift service: protocol tcp, balanced at L4
            pod = pods[name] = net.add_pod(name)
            pod.set_resolv_conf([net.host_ip])
            pod.capture()
            pod.start(serve_argv(name, THRIFT_PORT), role="app", uid=APP_UID, name=f"{name}-app")
            pod.sidecar("orders", THRIFT_PORT, cp=cp_addr, zk=zk.hosts, namespace=NS, interception="redirect",
                        weight=weight, protocol="tcp")
        kz = KazooClient(hosts=zk.hosts, timeout=5.0)
        kz.start(timeout=10)
        try:
            yield SimpleNamespace(net=net, zk=zk, kz=kz, cp=cp, pods=pods, outside=outside, group=group)
        finally:
            kz.stop()
            kz.close()
    finally:
        for s in servers:
            (s.stop if isinstance(s, DNSServer) else s.shutdown)()
        net.close()


def urllib_calls(pod, url: str, n: int, key: str = "version", timeout: float = 5.0) -> dict[str, int]:
    """``n`` GETs of ``url`` by a plain urllib client in ``pod`` (uid 1000, no proxy settings):
    counts of the JSON field ``key`` of the answers, and of errors by type."""
    code = f"""
import collections, json, urllib.request
seen = collections.Counter()
for _ in range({n}):
    try:
        with urllib.request.urlopen({url!r}, timeout={timeout}) as r:
            body = r.read()
            seen[json.loads(body).get({key!r}, "?") if body.startswith(b"{{") else body.decode().strip()] += 1
    except Exception as exc:
        seen["error:" + type(exc).__name__] += 1
print(json.dumps(seen))
"""
    return json.loads(pod.check_output([sys.executable, "-c", code], uid=APP_UID, timeout=120))


def admin(pod, path: str) -> str:
    status, _, body = pod.http_get(f"http://127.0.0.1:15000{path}")
    assert status == 200, (path, status)
    return body.decode()


def stat(pod, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` (or ``name_total``, a counter) with these labels."""
    names = (name, name + "_total")
    total = 0.0
    for line in admin(pod, "/stats/prometheus").splitlines():
        sample = line.split("{", 1)[0].split(" ", 1)[0]
        if sample in names and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_the_sidecars_own_connections_are_never_captured(mesh):
    """Every sidecar has talked to ZooKeeper and the control plane (and b, c to their apps) by now;
    had any of that been captured, it would have gone out through its own PassthroughCluster."""
    for name, pod in mesh.pods.items():
        assert admin(pod, "/ready").strip() == "LIVE", name
        assert stat(pod, "meshkeeper_upstream_cx_total", cluster="PassthroughCluster") == 0, name
        assert stat(pod, "meshkeeper_listener_redirected", listener="outbound (original destination)") == 0, name


def test_an_unmodified_client_calls_a_service_by_name_balanced_by_weight(mesh):
    a = mesh.pods["a"]
    got = wait_until(lambda: (r := urllib_calls(a, f"http://catalog:{APP_PORT}/", 1)) and "error" not in
                     next(iter(r)) and r, 30, message="catalog reachable by name from pod a")
    assert set(got) <= {"vb", "vc"}
    counts = urllib_calls(a, f"http://catalog:{APP_PORT}/", CALLS)
    assert sum(counts.values()) == CALLS and set(counts) == {"vb", "vc"}, counts
    share_c = counts["vc"] / CALLS
    assert abs(share_c - 0.75) <= 0.06, counts
    # through a's sidecar: counted on the catalog cluster there
    assert stat(a, "meshkeeper_upstream_rq_total", cluster=f"outbound|catalog.{NS}") >= CALLS


def test_disabling_an_endpoint_takes_it_out_within_a_second(mesh):
    a, c = mesh.pods["a"], mesh.pods["c"]
    path = Paths(NS).override("catalog", f"{c.ip}:{APP_PORT}")
    mesh.kz.create(path, json.dumps({"enabled": False}).encode(), makepath=True)
    written = time.monotonic()
    try:
        def c_out() -> bool:
            clusters = json.loads(admin(a, "/clusters"))["clusters"]
            [cl] = [x for x in clusters if x["name"] == f"outbound|catalog.{NS}"]
            return any(ep["address"] == c.ip and not ep["serving"] for ep in cl["endpoints"])
        wait_until(c_out, 5, 0.02, message="c drained in a's sidecar")
        assert time.monotonic() - written < 1.0
        assert urllib_calls(a, f"http://catalog:{APP_PORT}/", 40) == {"vb": 40}
    finally:
        mesh.kz.delete(path)


def test_calls_outside_the_mesh_pass_through_or_are_refused_by_policy(mesh):
    a, e = mesh.pods["a"], mesh.pods["e"]
    host, port = mesh.outside.server_address[:2]
    before = stat(a, "meshkeeper_upstream_cx_total", cluster="PassthroughCluster")
    assert urllib_calls(a, f"http://{host}:{port}/", 3) == {"outside the mesh": 3}
    assert stat(a, "meshkeeper_upstream_cx_total", cluster="PassthroughCluster") >= before + 3
    # by a name the pod's own resolver answers: forwarded by the mesh DNS, then passed through
    assert urllib_calls(a, f"http://{EXTERNAL}:{port}/", 2) == {"outside the mesh": 2}
    # registry_only: refused and counted
    got = urllib_calls(e, f"http://{host}:{port}/", 3)
    assert "outside the mesh" not in got and sum(got.values()) == 3, got
    assert stat(e, "meshkeeper_upstream_cx_none_healthy", cluster="BlackHoleCluster") >= 3
    # ... while mesh services still work from there
    assert set(urllib_calls(e, f"http://catalog:{APP_PORT}/", 4)) <= {"vb", "vc"}


def test_dialling_an_instance_address_goes_through_both_sidecars(mesh):
    """The Dubbo/thrift style: a client that read ZooKeeper dials b's pod IP and app port."""
    a, b = mesh.pods["a"], mesh.pods["b"]
    direct = f"passthrough|catalog.{NS}"
    before_a = stat(a, "meshkeeper_upstream_rq_total", cluster=direct)
    before_b = stat(b, "meshkeeper_listener_downstream_rq_total", listener="inbound")
    assert urllib_calls(a, f"http://{b.ip}:{APP_PORT}/", 5) == {"vb": 5}
    assert stat(a, "meshkeeper_upstream_rq_total", cluster=direct) >= before_a + 5
    assert stat(b, "meshkeeper_listener_downstream_rq_total", listener="inbound") >= before_b + 5


def test_a_caller_outside_the_mesh_reaches_the_app_through_its_inbound_sidecar(mesh):
    b = mesh.pods["b"]
    before = stat(b, "meshkeeper_listener_downstream_rq_total", listener="inbound")
    status, _, body = http_get(f"http://{b.ip}:{APP_PORT}/from-outside", timeout=5)
    assert status == 200 and json.loads(body)["version"] == "vb"
    assert stat(b, "meshkeeper_listener_downstream_rq_total", listener="inbound") == before + 1


def test_the_pods_other_ports_pass_through_but_loopback_only_services_stay_private(mesh):
    """Inbound passthrough (InboundPassthroughCluster) dials the pod IP from 127.0.0.6: a port the
    app serves on all addresses is reached from outside, one bound to 127.0.0.1 only is not (as
    without the mesh)."""
    b = mesh.pods["b"]
    code = "import socket, sys, time\n" \
           "s = socket.create_server((sys.argv[1], int(sys.argv[2])))\n" \
           "print('meshkeeper app listening port=%d' % s.getsockname()[1], flush=True)\n" \
           "while True:\n    c, _ = s.accept(); c.sendall(b'hello from ' + sys.argv[1].encode()); c.close()\n"
    b.start([sys.executable, "-c", code, "0.0.0.0", "9101"], role="app", uid=APP_UID, name="b-extra-all")
    b.start([sys.executable, "-c", code, "127.0.0.1", "9102"], role="app", uid=APP_UID, name="b-extra-lo")

    def read(port: int) -> bytes:
        with socket.create_connection((b.ip, port), timeout=5) as conn:
            return conn.recv(100)

    before = stat(b, "meshkeeper_upstream_cx_total", cluster="InboundPassthroughCluster")
    assert read(9101) == b"hello from 0.0.0.0"
    assert stat(b, "meshkeeper_upstream_cx_total", cluster="InboundPassthroughCluster") >= before + 1
    try:
        got = read(9102)
    except OSError:
        got = b""
    assert got == b""  # accepted by the capture, then closed: nothing of the loopback-only service


def test_the_apps_calls_to_loopback_are_never_captured(mesh):
    a = mesh.pods["a"]
    before = stat(a, "meshkeeper_listener_redirected", listener="outbound (original destination)")
    assert urllib_calls(a, f"http://127.0.0.1:{APP_PORT}/", 3) == {"va": 3}
    assert stat(a, "meshkeeper_listener_redirected", listener="outbound (original destination)") == before


def test_mesh_dns_answers_mesh_names_forwards_the_rest_and_survives_garbage(mesh):
    a = mesh.pods["a"]
    vip = json.loads(mesh.kz.get(Paths(NS).vip("catalog"))[0])["address"]

    def query(name: str, qtype: str = "A") -> DNSRecord:
        sock = a.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.settimeout(3)
            sock.sendto(DNSRecord.question(name, qtype).pack(), ("127.0.0.1", 15053))
            return DNSRecord.parse(sock.recv(4096))
        finally:
            sock.close()

    for name in ("catalog", f"catalog.{NS}", f"catalog.{NS}.mesh.local"):
        assert [str(r.rdata) for r in query(name).rr] == [vip], name
    assert [str(r.rdata) for r in query(EXTERNAL).rr] == [mesh.net.host_ip]  # forwarded, as answered
    assert query("nope.test").header.rcode == RCODE.NXDOMAIN  # passed on
    # the app's own resolver path: getaddrinfo in the pod goes through the capture to the mesh DNS
    out = a.check_output([sys.executable, "-c", "import socket; print(socket.gethostbyname('catalog'))"], uid=APP_UID)
    assert out.strip() == vip
    # 10,000 malformed packets are dropped and counted; the server still answers
    # (sent in bursts of 100, each counted before the next: a faster sender only fills the socket
    # buffer, about 300 small datagrams, and what the kernel drops there never reaches the server)
    before = stat(a, "meshkeeper_dns_downstream_rx_invalid")
    sock = a.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for burst in range(100):
            for i in range(100):
                sock.sendto(b"\x01\x02garbage!!"[: 1 + (burst + i) % 11], ("127.0.0.1", 15053))  # < a header
            wait_until(lambda n=burst: stat(a, "meshkeeper_dns_downstream_rx_invalid") >= before + (n + 1) * 100, 10,
                       0.005, message="malformed packets counted")
    finally:
        sock.close()
    assert stat(a, "meshkeeper_dns_downstream_rx_invalid") == before + 10_000
    assert [str(r.rdata) for r in query("catalog").rr] == [vip]


def thrift_counts(pod, host: str, n: int) -> dict[str, int]:
    """``n`` whoami calls by the thrift client in ``pod`` (uid 1000), each on a new connection."""
    out = pod.check_output(call_argv(host, THRIFT_PORT, "whoami", count=n), uid=APP_UID, timeout=120)
    return json.loads(out) if n > 1 else {out.strip(): 1}


def test_a_thrift_service_is_balanced_by_weight_at_l4_and_carries_50mb_byte_exact(mesh):
    a = mesh.pods["a"]
    wait_until(lambda: thrift_counts(a, "orders", 1), 30, message="orders reachable by name from pod a")
    counts = thrift_counts(a, "orders", 200)
    assert sum(counts.values()) == 200 and abs(counts.get("d2", 0) / 200 - 0.75) <= 0.08, counts
    vip = json.loads(mesh.kz.get(Paths(NS).vip("orders"))[0])["address"]
    with ThriftClient(vip, THRIFT_PORT, timeout=60, connect=a.connect) as client:  # root in pod a: captured
        assert client.echo("ping") == "ping"
        data = client.blob(FIFTY_MB)
    assert len(data) == FIFTY_MB and data == blob_pattern(FIFTY_MB)
    cluster = f"outbound|orders.{NS}"
    assert stat(a, "meshkeeper_upstream_cx_rx_bytes_total", cluster=cluster) >= FIFTY_MB
    assert stat(a, "meshkeeper_upstream_cx_total", cluster=cluster) >= 201


def test_a_killed_thrift_instance_gets_no_new_connections(mesh):
    a = mesh.pods["a"]
    [app] = [p for p in mesh.group.processes if p.name == "d2-app"]
    app.kill()  # SIGKILL: the app is gone, its sidecar and pod stay
    def only_d1() -> bool:
        return thrift_counts(a, "orders", 30) == {"d1": 30}
    wait_until(only_d1, 20, 0.2, message="new connections go to d1 only")


def test_a_caller_outside_the_mesh_is_rate_limited_by_the_inbound_sidecar(mesh):
    b = mesh.pods["b"]
    policy = Paths(NS).policy("catalog")
    mesh.kz.create(policy, json.dumps({"rate_limit": {"rps": 1, "burst": 2}}).encode(), makepath=True)
    try:
        def limited() -> bool:
            codes = [http_get(f"http://{b.ip}:{APP_PORT}/", timeout=5)[0] for _ in range(5)]
            return 429 in codes
        wait_until(limited, 15, 0.2, message="the outside caller meets b's rate limit")
        assert stat(b, "meshkeeper_listener_ratelimit_rate_limited", listener="inbound") >= 1
    finally:
        mesh.kz.delete(policy)
