"""Mutual TLS in transparent mode (issue 16, DESIGN §10 + §14, docs/identity.md): unmodified apps in
pods, their sidecars started with ``--interception redirect`` after ``meshkeeper iptables`` and
holding bootstrap tokens, a control plane with a CA.

Pods: ``a`` (frontend: a plain urllib client calling ``http://catalog:8080`` by its mesh name),
``b`` (catalog: the demo app on 8080), both captured, sidecars as uid 1337 with
``MESHKEEPER_IDENTITY_TOKEN``; ``g`` a grpc service (inventory, STRICT); ``t`` a thrift service
(orders, protocol tcp, PERMISSIVE); ``x`` a pod with neither capture nor sidecar (a caller outside
the mesh). ZooKeeper and the control plane run on the host, on the bridge. Needs root; skipped where
pods cannot be made. The pod network removes its namespaces, veths and rules at close, whatever
the test did (tests/harness/pods.py).
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from kazoo.client import KazooClient

from controlplane.ca import Issuer
from meshkeeper.demo.process import app_argv, wait_until
from meshkeeper.registry import InstanceRecord, Paths, ServiceRecord
from tests.harness.pods import PodNetwork, PodNetworkUnavailable, unavailable_reason
from tests.harness.processes import ProcessGroup
from tests.harness.thrift_apps import call_argv, serve_argv
from tests.integration.test_identity import TD, served_cert_sha256, write_ca
from tests.integration.test_transparent import admin, stat

pytestmark = pytest.mark.integration

NS = "mtls-shop"
APP_UID = 1000
APP_PORT = 8080
GRPC_PORT = 9090
THRIFT_PORT = 9191

# A grpcio server for pod g (service inventory, protocol grpc): the health service (SERVING) and
# /meshkeeper.test.Echo/Who, whose answer is the x-* metadata it got, as JSON.
GRPC_SERVER = """
import json, signal, sys, threading, grpc
from concurrent import futures
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
def who(request, context):
    return json.dumps({k: v for k, v in context.invocation_metadata() if k.startswith("x-")}).encode()
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("meshkeeper.test.Echo", {
    "Who": grpc.unary_unary_rpc_method_handler(who)})])
checker = health.HealthServicer()
checker.set("", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(checker, server)
port = server.add_insecure_port("0.0.0.0:" + sys.argv[1])
server.start()
print(f"meshkeeper app listening port={port}", flush=True)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
done.wait()
server.stop(0)
"""

# An unmodified grpcio client (pod a): one call of Who on inventory:9090, by its mesh name.
GRPC_CLIENT = """
import json, os, sys, grpc
os.environ["GRPC_DNS_RESOLVER"] = "native"
with grpc.insecure_channel("inventory:" + sys.argv[1]) as ch:
    try:
        print(json.dumps({"ok": json.loads(ch.unary_unary("/meshkeeper.test.Echo/Who")(b"", timeout=5))}))
    except grpc.RpcError as exc:
        print(json.dumps({"code": exc.code().name, "details": exc.details()}))
"""


def spiffe(svc: str) -> str:
    return f"spiffe://{TD}/ns/{NS}/sa/{svc}"


def xfcc(own: str, caller_pod, caller: str) -> str:
    """The XFCC the app behind ``own``'s sidecar gets from ``caller`` in ``caller_pod``: Hash is the
    SHA-256 of the certificate the caller's sidecar holds (from its ``/config_dump``)."""
    digest = served_cert_sha256(json.loads(admin(caller_pod, "/config_dump")))
    return f"By={spiffe(own)};Hash={digest};URI={spiffe(caller)}"


@pytest.fixture(autouse=True)
def _needs_pods() -> None:
    if reason := unavailable_reason():
        pytest.skip(f"no pod network: {reason}")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("mtls-transparent")
    group = ProcessGroup(tmp / "logs")
    net = PodNetwork(group=group)
    try:
        net.open()
    except PodNetworkUnavailable as exc:
        pytest.skip(f"no pod network: {exc}")
    try:
        issuer = Issuer.generate(trust_domain=TD, ttl=3600)
        ca_cert, ca_key = write_ca(issuer, tmp)
        zk = net.zookeeper(tmp / "zk")
        cp = net.controlplane(zk.hosts, "--ca-cert", ca_cert, "--ca-key", ca_key)
        cp_addr = f"{net.host_ip}:{cp.port('xds_port')}"
        pods = {}
        for name, service in (("b", "catalog"), ("a", "frontend")):
            pod = pods[name] = net.add_pod(name)
            pod.set_resolv_conf([net.host_ip])  # nobody answers there: the mesh DNS must
            pod.capture()
            pod.start(app_argv("--name", service, "--version", f"v{name}", "--host", "0.0.0.0",
                               "--port", str(APP_PORT)), role="app", uid=APP_UID, name=f"{name}-app")
            # as uid 1337: the token by the environment (a file under the test's tmp is not readable)
            pod.sidecar(service, APP_PORT, cp=cp_addr, zk=zk.hosts, namespace=NS, interception="redirect",
                        env={"MESHKEEPER_IDENTITY_TOKEN": issuer.mint_token(NS, service)})
        # a grpc service in pod g: its record (protocol grpc) first, STRICT from the start
        kz0 = KazooClient(hosts=zk.hosts, timeout=5.0)
        kz0.start(timeout=10)
        try:
            inventory = Paths(NS).service("inventory")
            kz0.create(inventory, ServiceRecord(protocol="grpc").encode(), makepath=True)
            kz0.create(f"{inventory}/peer_authentication", json.dumps({"mode": "STRICT"}).encode())
        finally:
            kz0.stop()
            kz0.close()
        g = pods["g"] = net.add_pod("g")
        g.set_resolv_conf([net.host_ip])
        g.capture()
        g.start([sys.executable, "-c", GRPC_SERVER, str(GRPC_PORT)], role="app", uid=APP_UID, name="g-app")
        g.sidecar("inventory", GRPC_PORT, cp=cp_addr, zk=zk.hosts, namespace=NS, interception="redirect",
                  protocol="grpc", env={"MESHKEEPER_IDENTITY_TOKEN": issuer.mint_token(NS, "inventory")})
        # a thrift service in pod t (orders, protocol tcp), PERMISSIVE
        t = pods["t"] = net.add_pod("t")
        t.set_resolv_conf([net.host_ip])
        t.capture()
        t.start(serve_argv("t", THRIFT_PORT), role="app", uid=APP_UID, name="t-app")
        t.sidecar("orders", THRIFT_PORT, cp=cp_addr, zk=zk.hosts, namespace=NS, interception="redirect",
                  protocol="tcp", env={"MESHKEEPER_IDENTITY_TOKEN": issuer.mint_token(NS, "orders")})
        pods["x"] = net.add_pod("x")  # outside the mesh: no capture, no sidecar
        kz = KazooClient(hosts=zk.hosts, timeout=5.0)
        kz.start(timeout=10)
        try:
            yield SimpleNamespace(net=net, kz=kz, pods=pods, group=group)
        finally:
            kz.stop()
            kz.close()
    finally:
        net.close()


def urllib_get(pod, url: str, timeout: float = 5.0) -> dict:
    """One GET of ``url`` by a plain urllib client in ``pod`` (uid 1000, no proxy settings):
    {"status", "body"} or {"error": <exception type>}."""
    code = f"""
import json, urllib.request, urllib.error
try:
    with urllib.request.urlopen({url!r}, timeout={timeout}) as r:
        print(json.dumps({{"status": r.status, "body": r.read().decode()}}))
except urllib.error.HTTPError as exc:
    print(json.dumps({{"status": exc.code, "body": exc.read().decode()}}))
except Exception as exc:
    print(json.dumps({{"error": type(exc).__name__ + ": " + str(exc)}}))
"""
    return json.loads(pod.check_output([sys.executable, "-c", code], uid=APP_UID, timeout=60))


def plaintext_answer(connect, host: str, port: int) -> bytes:
    """What a plaintext HTTP/1.1 request to host:port gets back (b"": closed without an answer)."""
    try:
        with connect(host, port) as s:
            s.settimeout(5)
            s.sendall(b"GET /headers HTTP/1.1\r\nHost: catalog\r\nConnection: close\r\n\r\n")
            return s.recv(100)
    except ConnectionError:
        return b""


def host_connect(host: str, port: int) -> socket.socket:
    return socket.create_connection((host, port), timeout=5)


def strict(mesh) -> None:
    """catalog STRICT, in force (a plaintext caller from pod x is closed)."""
    path = f"{Paths(NS).service('catalog')}/peer_authentication"
    if not mesh.kz.exists(path):
        mesh.kz.create(path, json.dumps({"mode": "STRICT"}).encode(), makepath=True)
    b, x = mesh.pods["b"], mesh.pods["x"]
    wait_until(lambda: plaintext_answer(x.connect, b.ip, APP_PORT) == b"", 10, 0.05,
               message="STRICT refuses a plaintext caller from a pod without a sidecar")


def test_strict_catalog_is_called_over_mtls_and_refuses_plaintext_callers(mesh):
    a, b, x = mesh.pods["a"], mesh.pods["b"], mesh.pods["x"]
    url = f"http://catalog:{APP_PORT}/headers"
    wait_until(lambda: urllib_get(a, url).get("status") == 200, 20, 0.1, message="catalog reachable by name from a")
    # PERMISSIVE (the default): a plaintext caller from outside the mesh still gets in
    assert plaintext_answer(x.connect, b.ip, APP_PORT).startswith(b"HTTP/1.1 200")

    strict(mesh)

    refused_before = stat(b, "meshkeeper_listener_no_filter_chain_match", listener="inbound")
    got = urllib_get(a, url)
    assert got.get("status") == 200, got
    headers = json.loads(got["body"])
    assert headers["x-forwarded-client-cert"] == xfcc("catalog", a, "frontend"), headers

    # server side: the caller's handshake counted on b's inbound listener; client side on a's cluster
    # (under STRICT the request could only have come in over mTLS)
    assert stat(b, "meshkeeper_listener_ssl_handshake", listener="inbound") > 0
    assert stat(a, "meshkeeper_ssl_handshake", cluster=f"outbound|catalog.{NS}") > 0
    catalog = next(c for c in json.loads(admin(a, "/clusters"))["clusters"] if c["name"] == f"outbound|catalog.{NS}")
    assert [ep["tls_mode"] for ep in catalog["endpoints"]] == ["mutual"], catalog
    dump = json.loads(admin(a, "/config_dump"))["configs"]["clusters"]["resources"]
    [cfg] = [r for r in dump if r.get("name") == f"outbound|catalog.{NS}"]
    [match] = cfg["transport_socket_matches"]
    assert match["transport_socket"]["typed_config"]["common_tls_context"]["alpn_protocols"] == ["http/1.1"]

    # plaintext to the pod IP and app port is closed, from a pod without a sidecar and from the host
    assert plaintext_answer(x.connect, b.ip, APP_PORT) == b""
    assert plaintext_answer(host_connect, b.ip, APP_PORT) == b""
    wait_until(lambda: stat(b, "meshkeeper_listener_no_filter_chain_match", listener="inbound")
               >= refused_before + 2, 5, 0.05, message="plaintext callers counted as no_filter_chain_match")
    # ... and so is plaintext to the pod's other ports (no InboundPassthroughCluster under STRICT)
    b.start([sys.executable, "-c",
             "import socket\ns = socket.create_server(('0.0.0.0', 9101))\n"
             "print('meshkeeper app listening port=9101', flush=True)\n"
             "while True:\n    c, _ = s.accept(); c.sendall(b'hello'); c.close()\n"],
            role="app", uid=APP_UID, name="b-extra")
    assert plaintext_answer(x.connect, b.ip, 9101) == b""
    # the mTLS caller still gets through afterwards
    assert urllib_get(a, url).get("status") == 200


def test_an_unmodified_grpc_client_calls_a_strict_grpc_service_over_mtls_with_h2(mesh):
    a, g, x = mesh.pods["a"], mesh.pods["g"], mesh.pods["x"]
    cluster = f"outbound|inventory.{NS}"

    def call() -> dict:
        return json.loads(a.check_output([sys.executable, "-c", GRPC_CLIENT, str(GRPC_PORT)], uid=APP_UID, timeout=60))

    got = wait_until(lambda: (r := call()).get("ok") is not None and r, 20, 0.1,
                     message="inventory reachable by name from a's grpc client")
    assert got["ok"].get("x-forwarded-client-cert") == xfcc("inventory", a, "frontend"), got
    assert stat(g, "meshkeeper_listener_ssl_handshake", listener="inbound") > 0
    assert stat(a, "meshkeeper_ssl_handshake", cluster=cluster) > 0
    dump = json.loads(admin(a, "/config_dump"))["configs"]["clusters"]["resources"]
    [cfg] = [r for r in dump if r.get("name") == cluster]
    [match] = cfg["transport_socket_matches"]
    assert match["transport_socket"]["typed_config"]["common_tls_context"]["alpn_protocols"] == ["h2"]
    # STRICT: plaintext (an HTTP/2 preface) from outside the mesh to g's grpc port is closed
    with x.connect(g.ip, GRPC_PORT) as s:
        s.settimeout(5)
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        try:
            assert s.recv(100) == b""
        except ConnectionError:
            pass


def test_a_meshed_app_dialling_a_strict_instance_address_goes_through_mtls(mesh):
    """The Dubbo/thrift style (test_transparent.py): an app that read ZooKeeper dials b's pod IP
    and app port; its sidecar takes it (the instance chain: b registered with ``mtls``, so
    ``passthrough-mtls|catalog``, an ORIGINAL_DST cluster with a TLS transport_socket) and
    originates mTLS to b, as a call by name would."""
    a, b = mesh.pods["a"], mesh.pods["b"]
    secure = f"passthrough-mtls|catalog.{NS}"
    strict(mesh)
    handshakes = stat(b, "meshkeeper_listener_ssl_handshake", listener="inbound")
    got = wait_until(lambda: (r := urllib_get(a, f"http://{b.ip}:{APP_PORT}/headers")).get("status") == 200 and r,
                     20, 0.1, message="b's address reachable from a under STRICT")
    assert json.loads(got["body"])["x-forwarded-client-cert"] == xfcc("catalog", a, "frontend")
    assert stat(a, "meshkeeper_ssl_handshake", cluster=secure) > 0
    assert stat(b, "meshkeeper_listener_ssl_handshake", listener="inbound") > handshakes
    dump = json.loads(admin(a, "/config_dump"))["configs"]["clusters"]["resources"]
    [cfg] = [r for r in dump if r.get("name") == secure]
    ctx = cfg["transport_socket"]["typed_config"]
    assert ctx["sni"] == f"outbound_.catalog.{NS}" and ctx["common_tls_context"]["alpn_protocols"] == ["http/1.1"]
    [host] = next(c for c in json.loads(admin(a, "/clusters"))["clusters"] if c["name"] == secure)["endpoints"]
    assert host["tls_mode"] == "mutual", host


def test_a_thrift_client_dialling_an_instance_address_goes_through_mtls(mesh):
    """A tcp (thrift) service dialled by address: a's tcp_proxy to ``passthrough-mtls|orders``
    originates mTLS to t, PERMISSIVE too (a call by name would), where it used to arrive in plaintext."""
    a, t = mesh.pods["a"], mesh.pods["t"]
    secure = f"passthrough-mtls|orders.{NS}"

    def whoami() -> str:
        try:
            return a.check_output(call_argv(t.ip, THRIFT_PORT, "whoami"), uid=APP_UID, timeout=60).strip()
        except Exception as exc:  # not reachable yet: the client exits 1
            return repr(exc)

    wait_until(lambda: whoami() == "t", 30, 0.2,
               message="t's address reachable from a's thrift client")
    handshakes = stat(t, "meshkeeper_listener_ssl_handshake", listener="inbound")
    before = stat(a, "meshkeeper_ssl_handshake", cluster=secure)
    assert whoami() == "t"
    assert stat(a, "meshkeeper_ssl_handshake", cluster=secure) == before + 1
    assert stat(t, "meshkeeper_listener_ssl_handshake", listener="inbound") == handshakes + 1


def test_an_instance_registered_without_an_identity_is_still_dialled_in_plaintext(mesh):
    """A mixed service: catalog also has an instance registered without a sidecar identity (as
    ``meshkeeper register`` writes it, no ``mtls``): the app in pod x, which has no sidecar. By its
    address a's sidecar calls it in plaintext (``passthrough|catalog``), while b's address keeps
    going over mTLS."""
    a, b, x = mesh.pods["a"], mesh.pods["b"], mesh.pods["x"]
    x.start(app_argv("--name", "catalog", "--version", "vx", "--host", "0.0.0.0", "--port", str(APP_PORT)),
            role="app", uid=APP_UID, name="x-app")
    record = InstanceRecord(address=x.ip, port=APP_PORT, app_port=APP_PORT)
    path = Paths(NS).instance("catalog", record.key)
    mesh.kz.create(path, record.encode(), ephemeral=True, makepath=True)
    try:
        # Until a's sidecar has x's instance chain, a call to x's address is an unknown destination
        # (PassthroughCluster, allow_any) and answers 200 too: poll until one went by passthrough|catalog.
        def through_passthrough():
            r = urllib_get(a, f"http://{x.ip}:{APP_PORT}/headers")
            counted = stat(a, "meshkeeper_upstream_rq_total", cluster=f"passthrough|catalog.{NS}") >= 1
            return r.get("status") == 200 and counted and r

        got = wait_until(through_passthrough, 20, 0.1, message="x's address called through passthrough|catalog")
        assert "x-forwarded-client-cert" not in json.loads(got["body"])
        got = urllib_get(a, f"http://{b.ip}:{APP_PORT}/headers")
        assert got.get("status") == 200, got
        assert json.loads(got["body"])["x-forwarded-client-cert"] == xfcc("catalog", a, "frontend")
    finally:
        mesh.kz.delete(path)
