"""gRPC over mutual TLS (issue 16: "ALPN carries h2 / http/1.1"), explicit mode: a grpcio server
behind a ``--protocol grpc`` catalog sidecar (service record protocol grpc, peer authentication
STRICT), a frontend sidecar the grpcio client dials with ``:authority catalog``; both sidecars hold
bootstrap tokens for a control plane with a CA (docs/identity.md).

The sidecar has no statistic of the ALPN a connection negotiated: the test reads the cluster's
UpstreamTlsContext ALPN from the frontend's ``/config_dump`` (``[h2]``, a grpc service's), checks
that the frontend's endpoint is ``tls_mode: mutual`` and counts handshakes on both sides, then
offers that ALPN list itself, with a mesh certificate, to catalog's inbound listener: it selects h2.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from kazoo.client import KazooClient

from controlplane.ca import Issuer
from meshkeeper.registry import Paths, ServiceRecord
from tests.harness import ProcessGroup, http_get, wait_until
from tests.harness.grpc_rich import BIDI, CLIENT_STREAM, SERVER_STREAM, UNARY, RichServer
from tests.integration.test_identity import TD, served_cert_sha256, write_ca

pytestmark = pytest.mark.integration

CALL_TIMEOUT = 10.0


@dataclass
class Mesh:
    ns: str
    issuer: Issuer
    kz: KazooClient
    server: RichServer
    catalog: object  # the server's sidecar
    frontend: object
    channel: grpc.Channel

    def spiffe(self, svc: str) -> str:
        return f"spiffe://{TD}/ns/{self.ns}/sa/{svc}"

    def write(self, leaf: str, obj: dict) -> None:
        path, data = f"{Paths(self.ns).service('catalog')}/{leaf}", json.dumps(obj).encode()
        if self.kz.exists(path):
            self.kz.set(path, data)
        else:
            self.kz.create(path, data, makepath=True)

    def call(self) -> dict:
        return json.loads(self.channel.unary_unary(UNARY)(b"{}", timeout=CALL_TIMEOUT))


def admin_json(sidecar, path: str) -> dict:
    status, _, body = http_get(f"{sidecar.admin_url}{path}")
    assert status == 200, (path, status)
    return json.loads(body)


def stat(sidecar, name: str, **labels: str) -> float:
    names = (name, name + "_total")
    total = 0.0
    for line in http_get(f"{sidecar.admin_url}/stats/prometheus")[2].decode().splitlines():
        sample = line.split("{", 1)[0].split(" ", 1)[0]
        if sample in names and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def mesh(procs: ProcessGroup, zk_server, zk_client, namespace, tmp_path) -> Iterator[Mesh]:
    ns = namespace
    zk_client.create(Paths(ns).service("catalog"), ServiceRecord(protocol="grpc").encode(), makepath=True)
    zk_client.create(f"{Paths(ns).service('catalog')}/peer_authentication", json.dumps({"mode": "STRICT"}).encode())
    issuer = Issuer.generate(trust_domain=TD, ttl=3600)
    ca_cert, ca_key = write_ca(issuer, tmp_path)
    cp = procs.controlplane(zk_server.hosts, "--ca-cert", ca_cert, "--ca-key", ca_key)
    xds = f"127.0.0.1:{cp.port('xds_port')}"

    def token(svc: str) -> str:
        path = tmp_path / f"{svc}.token"
        path.write_text(issuer.mint_token(ns, svc))
        return str(path)

    server = RichServer("a").start()
    channel = None
    try:
        catalog = procs.sidecar("catalog", server.port, cp=xds, zk=zk_server.hosts, namespace=ns, protocol="grpc",
                                identity_token_file=token("catalog"), drain_delay=0, health_interval=0.2)
        fe_app = procs.app("frontend")
        frontend = procs.sidecar("frontend", fe_app.port("port"), cp=xds, zk=zk_server.hosts, namespace=ns,
                                 identity_token_file=token("frontend"), drain_delay=0)
        channel = grpc.insecure_channel(f"127.0.0.1:{frontend.port('outbound_port')}",
                                        options=[("grpc.default_authority", "catalog")])
        m = Mesh(ns, issuer, zk_client, server, catalog, frontend, channel)

        def called() -> bool:
            try:
                return m.call()["name"] == "a"
            except grpc.RpcError:
                return False

        wait_until(called, 15, 0.1, message="the grpc call reaches catalog through both sidecars")
        yield m
    finally:
        if channel is not None:
            channel.close()
        server.stop(None)


def probe_alpn(m: Mesh, port: int, alpn: list[str], tmp_path) -> tuple[str | None, tuple]:
    """A TLS connection to catalog's inbound listener with a mesh certificate for frontend, offering
    ``alpn``: (the protocol the server selected, the server's URI SANs)."""
    from sidecar.identity.keys import new_key

    key_pem, csr_pem = new_key()
    cert = m.issuer.sign(csr_pem, m.ns, "frontend")
    (tmp_path / "probe.pem").write_bytes(cert.chain_pem)
    (tmp_path / "probe-key.pem").write_bytes(key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # a workload certificate has only its URI SAN
    ctx.load_verify_locations(cadata=m.issuer.authority.cert.public_bytes(serialization.Encoding.PEM).decode())
    ctx.load_cert_chain(tmp_path / "probe.pem", tmp_path / "probe-key.pem")
    ctx.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
        sans = tuple(v for k, v in s.getpeercert().get("subjectAltName", ()) if k == "URI")
        return s.selected_alpn_protocol(), sans


def test_grpc_over_strict_mtls_negotiates_h2_and_a_deny_gives_permission_denied(mesh: Mesh, tmp_path) -> None:
    m = mesh
    cluster = f"outbound|catalog.{m.ns}"
    answer = m.call()
    assert answer["name"] == "a"
    # the server sidecar terminated mTLS and told the app who called (x-* metadata echoed back)
    assert answer["metadata"].get("x-forwarded-client-cert") == \
        f"By={m.spiffe('catalog')};Hash={served_cert_sha256(admin_json(m.frontend, '/config_dump'))};" \
        f"URI={m.spiffe('frontend')}", answer["metadata"]
    # the other call kinds, with HTTP/2 flow control across both TLS hops (5 MB each way)
    messages = list(m.channel.unary_stream(SERVER_STREAM)(json.dumps({"count": 80, "size": 65536}).encode(),
                                                         timeout=CALL_TIMEOUT))
    assert len(messages) == 80 and all(len(x) == 65536 for x in messages)
    upload = [bytes([i]) * 65536 for i in range(80)]
    assert json.loads(m.channel.stream_unary(CLIENT_STREAM)(iter(upload), timeout=CALL_TIMEOUT))["bytes"] == 80 * 65536
    assert list(m.channel.stream_stream(BIDI)(iter([b"m1", b"m2"]), timeout=CALL_TIMEOUT)) == [b"a:m1", b"a:m2"]

    # handshakes on both sides; the frontend's endpoint is an mTLS one
    assert stat(m.catalog, "meshkeeper_listener_ssl_handshake", listener="inbound") > 0
    assert stat(m.frontend, "meshkeeper_ssl_handshake", cluster=cluster) > 0
    [c] = [c for c in admin_json(m.frontend, "/clusters")["clusters"] if c["name"] == cluster]
    assert [e["tls_mode"] for e in c["endpoints"]] == ["mutual"], c

    # the ALPN the frontend offers for a grpc service's cluster, and what catalog's listener selects
    dump = admin_json(m.frontend, "/config_dump")["configs"]["clusters"]["resources"]
    [cfg] = [r for r in dump if r.get("name") == cluster]
    [match] = cfg["transport_socket_matches"]
    alpn = match["transport_socket"]["typed_config"]["common_tls_context"]["alpn_protocols"]
    assert alpn == ["h2"], cfg
    selected, sans = probe_alpn(m, m.catalog.port("inbound_port"), alpn, tmp_path)
    assert selected == "h2" and sans == (m.spiffe("catalog"),)
    assert probe_alpn(m, m.catalog.port("inbound_port"), ["http/1.1"], tmp_path)[0] == "http/1.1"

    # under STRICT, a plaintext gRPC client dialling catalog's inbound listener is refused
    with grpc.insecure_channel(f"127.0.0.1:{m.catalog.port('inbound_port')}",
                               options=[("grpc.default_authority", "catalog")]) as direct:
        with pytest.raises(grpc.RpcError) as err:
            direct.unary_unary(UNARY)(b"{}", timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value

    # an authz DENY for the caller: PERMISSION_DENIED (7), counted, and the server never called
    denied_before = stat(m.catalog, "meshkeeper_listener_rbac_denied", listener="inbound")
    m.write("authz", {"action": "DENY", "rules": [{"from": [m.spiffe("frontend")]}]})

    def denied() -> grpc.RpcError | None:
        try:
            m.call()
        except grpc.RpcError as exc:
            return exc if exc.code() == grpc.StatusCode.PERMISSION_DENIED else None
        return None

    exc = wait_until(denied, 5, 0.05, message="the DENY policy applies")
    assert exc.code().value[0] == 7
    assert stat(m.catalog, "meshkeeper_listener_rbac_denied", listener="inbound") > denied_before
    before = len(m.server.deadlines)  # one per Unary call the server got
    with pytest.raises(grpc.RpcError) as err:
        m.call()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert len(m.server.deadlines) == before  # refused by the server's sidecar, not by the server
    # a DENY for someone else lets frontend through again
    m.write("authz", {"action": "DENY", "rules": [{"from": [m.spiffe("inventory")]}]})
    wait_until(lambda: m.call()["name"] == "a", 5, 0.05, message="frontend allowed again")
