"""Identity between services (DESIGN §14, docs/identity.md) end to end: real ZooKeeper, a control
plane with a CA, sidecars that prove their service with bootstrap tokens and get certificates over
SDS, demo apps behind them.

Topology: ``catalog`` (one app + sidecar), ``frontend`` and ``inventory`` (sidecars the test calls
through, ``Host: catalog``), all meshed; the test itself is the plaintext caller and the caller
with a certificate from another CA, dialling catalog's inbound listener directly.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import serialization
from kazoo.client import KazooClient

from controlplane.ca import Issuer
from meshkeeper.registry import Paths
from tests.harness import http_get, wait_until
from tests.harness.load import paced
from tests.support.pki import cert_sha256

pytestmark = pytest.mark.integration
TD = "meshkeeper.local"


def spiffe(svc: str, ns: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{svc}"


def write_ca(issuer: Issuer, directory) -> tuple[str, str]:
    cert, key = directory / "ca.pem", directory / "ca-key.pem"
    a = issuer.authority
    cert.write_bytes(a.cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(a.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    return str(cert), str(key)


@dataclass
class SecureMesh:
    ns: str
    issuer: Issuer
    cp: object
    catalog_app: object
    catalog: object
    frontend: object
    inventory: object
    kz: KazooClient

    def write(self, path: str, obj: dict) -> None:
        data = json.dumps(obj).encode()
        if self.kz.exists(path):
            self.kz.set(path, data)
        else:
            self.kz.create(path, data, makepath=True)

    def peer_authentication(self, mode: str) -> None:
        self.write(f"{Paths(self.ns).service('catalog')}/peer_authentication", {"mode": mode})

    def authz(self, policy: dict) -> None:
        self.write(f"{Paths(self.ns).service('catalog')}/authz", policy)

    def inbound(self) -> int:
        return self.catalog.port("inbound_port")

    def certs(self, sidecar) -> dict:
        status, _, body = http_get(f"{sidecar.admin_url}/certs")
        assert status == 200
        return json.loads(body)

    def cert_hash(self, sidecar) -> str:
        status, _, body = http_get(f"{sidecar.admin_url}/config_dump")
        assert status == 200
        return served_cert_sha256(json.loads(body))


def get(sidecar, path: str = "/", host: str = "catalog") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.port("outbound_port"), timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, "x-forwarded-client-cert": "By=forged;URI=spiffe://evil"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def serial(sidecar_certs: dict) -> str:
    chains = sidecar_certs["certificates"]
    return chains[0]["cert_chain"][0]["serial_number"] if chains and chains[0]["cert_chain"] else ""


def served_cert_sha256(config_dump: dict) -> str:
    """XFCC's ``Hash`` of a sidecar's workload certificate: :func:`cert_sha256` of the chain it was
    given over SDS (the ``default`` secret in its ``/config_dump``)."""
    [secret] = [r for r in config_dump["configs"]["secrets"]["resources"] if r.get("name") == "default"]
    return cert_sha256(base64.b64decode(secret["tls_certificate"]["certificate_chain"]["inline_bytes"]))


def start_secure_mesh(procs, zk_server, zk_client, namespace, tmp_path, ttl: int = 3600) -> SecureMesh:
    issuer = Issuer.generate(trust_domain=TD, ttl=ttl)
    ca_cert, ca_key = write_ca(issuer, tmp_path)
    cp = procs.meshkeeper("controlplane", "--zk", zk_server.hosts, "--xds-port", "0", "--http-port", "0",
                          "--ca-cert", ca_cert, "--ca-key", ca_key, "--cert-ttl", str(ttl), name="controlplane")
    target = f"127.0.0.1:{cp.port('xds_port')}"

    def sidecar(svc: str, app_port: int):
        token = tmp_path / f"{svc}.token"
        token.write_text(issuer.mint_token(namespace, svc))
        return procs.sidecar(svc, app_port, cp=target, zk=zk_server.hosts, namespace=namespace,
                             identity_token_file=str(token), zk_session_timeout="2")

    catalog_app = procs.app("catalog")
    catalog = sidecar("catalog", catalog_app.port("port"))
    callers = [sidecar(svc, procs.app(svc).port("port")) for svc in ("frontend", "inventory")]
    mesh = SecureMesh(namespace, issuer, cp, catalog_app, catalog, *callers, kz=zk_client)
    wait_until(lambda: all(get(s)[0] == 200 for s in callers), 10, message="both callers reach catalog")
    return mesh


@pytest.fixture
def secure_mesh(procs, zk_server, zk_client, namespace, tmp_path) -> SecureMesh:
    return start_secure_mesh(procs, zk_server, zk_client, namespace, tmp_path)


def plaintext_refused(port: int) -> bool:
    """A plaintext request to ``port`` gets no response (the connection is closed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /headers HTTP/1.1\r\nHost: catalog\r\n\r\n")
            return s.recv(100) == b""
    except ConnectionError:
        return True


def foreign_client_context(tmp_path) -> ssl.SSLContext:
    """A client with a certificate for frontend, but from a CA the mesh does not trust."""
    from sidecar.identity.keys import new_key

    other = Issuer.generate(trust_domain=TD, ttl=3600)
    key_pem, csr_pem = new_key()
    cert = other.sign(csr_pem, "default", "frontend")
    (tmp_path / "foreign.pem").write_bytes(cert.chain_pem)
    (tmp_path / "foreign-key.pem").write_bytes(key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # it does not trust the mesh either; the server must refuse it
    ctx.load_cert_chain(tmp_path / "foreign.pem", tmp_path / "foreign-key.pem")
    return ctx


def foreign_refused(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
            s.sendall(b"GET /headers HTTP/1.1\r\nHost: catalog\r\n\r\n")
            return s.recv(100) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def test_strict_refuses_plaintext_and_foreign_certificates_and_tells_the_app_who_called(secure_mesh, tmp_path):
    m = secure_mesh
    # PERMISSIVE (the default): plaintext callers still get in.
    assert not plaintext_refused(m.inbound())

    m.peer_authentication("STRICT")
    wait_until(lambda: plaintext_refused(m.inbound()), 10, message="STRICT refuses a plaintext caller")
    assert foreign_refused(m.inbound(), foreign_client_context(tmp_path))

    status, _, body = get(m.frontend, "/headers")
    assert status == 200, body
    headers = json.loads(body)
    # The caller's forged header is gone; the sidecar says who called, as Envoy's XFCC.
    assert headers["x-forwarded-client-cert"] == \
        f"By={spiffe('catalog', m.ns)};Hash={m.cert_hash(m.frontend)};URI={spiffe('frontend', m.ns)}"

    certs = m.certs(m.catalog)["certificates"][0]
    assert certs["cert_chain"][0]["subject_alt_names"] == [{"uri": spiffe("catalog", m.ns)}]


def test_an_allow_policy_for_frontend_refuses_inventory_within_a_second(secure_mesh):
    m = secure_mesh
    m.authz({"action": "ALLOW", "rules": [{"from": [spiffe("frontend", m.ns)]}]})
    written = time.monotonic()
    wait_until(lambda: get(m.inventory)[0] == 403, 5, interval=0.02, message="inventory refused")
    took = time.monotonic() - written
    status, headers, body = get(m.inventory)
    assert status == 403 and headers["x-meshkeeper-flags"] == "RBAC", (headers, body)
    assert get(m.frontend)[0] == 200
    assert took <= 1.0, f"the policy took {took:.2f} s to apply"
    # A plaintext caller has no identity: a rule naming callers never matches it.
    with socket.create_connection(("127.0.0.1", m.inbound()), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: catalog\r\nConnection: close\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 403")


def test_rotation_under_load_loses_no_request(procs, zk_server, zk_client, namespace, tmp_path):
    m = start_secure_mesh(procs, zk_server, zk_client, namespace, tmp_path, ttl=10)
    m.peer_authentication("STRICT")  # every request must be mTLS: a failed handshake would fail it
    wait_until(lambda: plaintext_refused(m.inbound()), 10, message="STRICT in force")
    seen: dict[str, set[str]] = {"catalog": set(), "frontend": set()}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for name, sc in (("catalog", m.catalog), ("frontend", m.frontend)):
                s = serial(m.certs(sc))
                if s:
                    seen[name].add(s)
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        results = paced(m.frontend.port("outbound_port"), rate=100, duration=17.0, host="catalog")
    finally:
        stop.set()
        watcher.join(5)
    failed = [r for r in results if r.status != 200]
    assert results and not failed, f"{len(failed)} of {len(results)} failed: {failed[:5]}"
    # A 10 s certificate is replaced every ~5 s: at least three rotations on each side.
    assert len(seen["catalog"]) >= 4 and len(seen["frontend"]) >= 4, seen
