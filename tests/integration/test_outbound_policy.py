"""The outbound policy in explicit mode, end to end: an unmodified ``requests`` client whose proxy is
the sidecar's outbound listener reaches servers outside the mesh (allow_any) or is refused
(registry_only). Real ZooKeeper, control plane, sidecars and sockets; the outside servers are the
test's own (plain http.server, and one wrapped in TLS with a certificate of a test CA).
"""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.harness import http_get, wait_until
from tests.harness.tls import make_tls

pytestmark = pytest.mark.integration


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = json.dumps({"outside": True, "path": self.path, "host": self.headers["Host"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def serve(server: http.server.HTTPServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def plain_server() -> Iterator[int]:
    yield from serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello))


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    tls = make_tls(tmp_path / "tls")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    for port in serve(server):
        yield port, tls.ca


def proxy_session(sidecar) -> requests.Session:
    """What an app with HTTP_PROXY/HTTPS_PROXY set to the outbound listener does (trust_env off so
    the test's own NO_PROXY cannot take 127.0.0.1 away from the proxy)."""
    session = requests.Session()
    session.trust_env = False
    url = f"http://127.0.0.1:{sidecar.port('outbound_port')}"
    session.proxies = {"http": url, "https": url}
    return session


def clusters(sidecar) -> dict:
    status, _, body = http_get(f"{sidecar.admin_url}/clusters")
    assert status == 200
    return {c["name"]: c for c in json.loads(body)["clusters"]}


def metrics(sidecar) -> str:
    return http_get(f"{sidecar.admin_url}/stats/prometheus")[2].decode()


def policy_applied(session: requests.Session, url: str) -> bool:
    """The default chain (LDS) has arrived: an outside request is no longer 404 NR."""
    try:
        resp = session.get(url, timeout=5)
    except requests.RequestException:
        return False
    return resp.headers.get("x-meshkeeper-flags") != "NR"


def test_outside_hosts_through_the_proxy_allow_any_and_registry_only(
        procs, zk_server, namespace, plain_server, tls_server) -> None:
    tls_port, ca = tls_server
    cp = procs.controlplane(zk_server.hosts)
    xds_target = f"127.0.0.1:{cp.port('xds_port')}"
    app = procs.app("frontend")
    allow = procs.sidecar("frontend", app.port("port"), cp=xds_target, zk=zk_server.hosts, namespace=namespace)
    plain_url = f"http://127.0.0.1:{plain_server}/hello?x=1"
    tls_url = f"https://127.0.0.1:{tls_port}/secure"

    # (a) plain HTTP to a host outside the mesh: forwarded, counted on PassthroughCluster.
    session = proxy_session(allow)
    wait_until(lambda: policy_applied(session, plain_url), 10, message="outbound policy applied")
    resp = session.get(plain_url, timeout=10)
    assert resp.status_code == 200
    assert resp.json() == {"outside": True, "path": "/hello?x=1", "host": f"127.0.0.1:{plain_server}"}
    stats = clusters(allow)["PassthroughCluster"]["stats"]
    assert stats["upstream_rq_2xx"] >= 2 and stats["upstream_cx_total"] >= 1
    text = metrics(allow)
    assert 'route="allow_any"' in text and 'cluster="PassthroughCluster"' in text

    # (b) https through CONNECT, the certificate checked against the test's CA end to end.
    resp = session.get(tls_url, timeout=10, verify=str(ca))
    assert resp.status_code == 200 and resp.json()["path"] == "/secure"
    assert clusters(allow)["PassthroughCluster"]["stats"]["upstream_cx_tx_bytes_total"] > 0

    # A name that does not resolve is a clean 503 UF, not a hang or a reset.
    resp = session.get("http://no-such-host.invalid/", timeout=20)
    assert resp.status_code == 503 and resp.headers["x-meshkeeper-flags"] == "UF"

    # (c) registry_only: both refused, 502 UH, counted on BlackHoleCluster.
    blocked = procs.sidecar("frontend", app.port("port"), cp=xds_target, zk=zk_server.hosts, namespace=namespace,
                            outbound_policy="registry_only", name="sidecar-registry-only")
    session = proxy_session(blocked)
    wait_until(lambda: policy_applied(session, plain_url), 10, message="registry_only applied")
    resp = session.get(plain_url, timeout=10)
    assert resp.status_code == 502 and resp.headers["x-meshkeeper-flags"] == "UH"
    assert f"127.0.0.1:{plain_server}" in resp.json()["error"] and "registry_only" in resp.json()["error"]
    with pytest.raises(requests.exceptions.ProxyError, match="502"):
        session.get(tls_url, timeout=10, verify=str(ca))
    assert clusters(blocked)["BlackHoleCluster"]["stats"]["upstream_cx_none_healthy"] >= 3
    assert 'route="block_all"' in metrics(blocked)
    assert clusters(blocked)["PassthroughCluster"]["stats"]["upstream_cx_total"] == 0
