"""Control-plane replicas share one CA through ZooKeeper ``/meshkeeper/_ca`` (docs/identity.md)."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.ca import CA_ZNODE, CAError, Issuer
from controlplane.ca.shared import load_or_create
from meshkeeper.demo.process import meshkeeper_argv, wait_until

pytestmark = pytest.mark.integration

NOW = 1_800_000_000.0


def clock() -> float:
    return NOW


def csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM))


@pytest.fixture
def fresh_zk(zk_client):
    """The session ZooKeeper without a CA record (tests here create and delete it)."""
    if zk_client.exists(CA_ZNODE):
        zk_client.delete(CA_ZNODE)
    yield zk_client
    if zk_client.exists(CA_ZNODE):
        zk_client.delete(CA_ZNODE)


def test_two_replicas_share_one_ca_and_a_wrong_passphrase_is_refused(fresh_zk) -> None:
    first, created = load_or_create(fresh_zk, b"correct horse", "example.org", clock)
    second, created_again = load_or_create(fresh_zk, b"correct horse", "example.org", clock)
    assert created and not created_again
    assert second.cert == first.cert and second.key_der() == first.key_der()
    a, b = Issuer(first, "example.org", 10, clock), Issuer(second, "example.org", 10, clock)
    assert a.bundle_pem == b.bundle_pem
    # A token minted by one replica is good at the other; a certificate of one verifies with the other's bundle.
    assert b.verify_token(a.mint_token("shop", "web")) == ("shop", "web")
    issued = b.sign(csr(), "shop", "web")
    assert issued.chain_pem.endswith(a.bundle_pem)

    with pytest.raises(CAError) as exc:
        load_or_create(fresh_zk, b"wrong", "example.org", clock)
    assert "passphrase is wrong" in str(exc.value) and "\n" not in str(exc.value)


def test_the_key_in_zookeeper_is_encrypted(fresh_zk) -> None:
    load_or_create(fresh_zk, b"s3cret", "example.org", clock)
    payload, _ = fresh_zk.get(CA_ZNODE)
    assert b"BEGIN PRIVATE KEY" not in payload and b"BEGIN EC PRIVATE KEY" not in payload
    doc = json.loads(payload)
    assert set(doc) == {"cert", "key"}
    assert doc["key"].startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")


def test_replicas_starting_together_agree_on_one_ca(zk_server, fresh_zk) -> None:
    from kazoo.client import KazooClient

    clients = [KazooClient(hosts=zk_server.hosts, timeout=5.0) for _ in range(4)]
    results: list = [None] * len(clients)
    try:
        for c in clients:
            c.start(timeout=10)
        barrier = threading.Barrier(len(clients))

        def start(i: int) -> None:
            barrier.wait()
            results[i] = load_or_create(clients[i], b"pass", "example.org", clock)

        threads = [threading.Thread(target=start, args=(i,)) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        for c in clients:
            c.stop()
            c.close()
    assert sum(created for _, created in results) == 1
    assert len({authority.key_der() for authority, _ in results}) == 1


def test_the_control_plane_refuses_a_wrong_passphrase_in_one_line(zk_server, fresh_zk, tmp_path: Path) -> None:
    load_or_create(fresh_zk, b"right", "meshkeeper.local", clock)
    wrong = tmp_path / "pass"
    wrong.write_text("wrong\n")
    argv = meshkeeper_argv("controlplane", "--zk", zk_server.hosts, "--xds-port", "0", "--http-port", "0",
                           "--ca-passphrase-file", str(wrong))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "listening" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "passphrase is wrong" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_replicas_log_where_their_ca_comes_from(procs, zk_server, fresh_zk, tmp_path: Path) -> None:
    passphrase = tmp_path / "pass"
    passphrase.write_text("right\n")
    first = procs.controlplane(zk_server.hosts, "--ca-passphrase-file", str(passphrase), name="cp-a")
    second = procs.meshkeeper("controlplane", "--zk", zk_server.hosts, "--xds-port", "0", "--http-port", "0",
                              env={"MESHKEEPER_CA_PASSPHRASE": "right"}, name="cp-b")
    wait_until(lambda: "CA: " in first.stderr_text() and "CA: " in second.stderr_text(), timeout=10)
    assert "CA: a self-signed CA created in ZooKeeper /meshkeeper/_ca (O=meshkeeper.local)" in first.stderr_text()
    assert "CA: a self-signed CA shared through ZooKeeper /meshkeeper/_ca" in second.stderr_text()


POD = """\
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, annotations: {sidecar.meshkeeper.io/service: web}}
spec:
  containers: [{name: app, image: "web:1", ports: [{containerPort: 8080}]}]
"""


def test_the_injector_reads_the_shared_ca_and_never_creates_it(zk_server, fresh_zk, tmp_path: Path) -> None:
    (tmp_path / "pod.yaml").write_text(POD)
    (tmp_path / "pass").write_text("right\n")
    argv = meshkeeper_argv("inject", "-f", str(tmp_path / "pod.yaml"), "--zk", zk_server.hosts,
                           "--ca-passphrase-file", str(tmp_path / "pass"))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no CA in ZooKeeper" in proc.stderr, proc.stderr
    assert fresh_zk.exists(CA_ZNODE) is None

    authority, _ = load_or_create(fresh_zk, b"right", "meshkeeper.local", clock)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (proxy,) = [c for c in yaml.safe_load(proc.stdout)["spec"]["initContainers"] if c["name"] == "meshkeeper-proxy"]
    token = {e["name"]: e.get("value") for e in proxy["env"]}["MESHKEEPER_IDENTITY_TOKEN"]
    assert Issuer(authority).verify_token(token) == ("shop", "web")

    (tmp_path / "pass").write_text("wrong\n")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "passphrase is wrong" in proc.stderr and proc.stderr.count("\n") == 1
