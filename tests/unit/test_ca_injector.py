"""Injection gives the proxy a bootstrap token for the pod's service when the injector has the CA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from controlplane.ca import Issuer
from controlplane.ca.authority import generate
from controlplane.injector.patch import A_NAMESPACE, A_SERVICE, InjectConfig, inject_pod
from meshkeeper.cli import main as cli_main

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: catalog, namespace: shop}
spec:
  template:
    metadata: {labels: {app.kubernetes.io/name: catalog}}
    spec:
      containers: [{name: app, image: "catalog:1", ports: [{containerPort: 8080}]}]
"""


def pod(annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"annotations": annotations or {}, "labels": labels or {}},
            "spec": {"containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}]}}


def proxy_env(result: dict[str, Any]) -> dict[str, Any]:
    (proxy,) = [c for c in result["spec"]["initContainers"] if c["name"] == "meshkeeper-proxy"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in proxy["env"]}


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer.generate(trust_domain="example.org")


def test_the_token_is_for_the_pods_mesh_namespace_and_service(issuer: Issuer) -> None:
    config = InjectConfig(identity_tokens=issuer.mint_token)
    got = inject_pod(pod({A_SERVICE: "catalog", A_NAMESPACE: "prod"}), config, namespace="shop")
    env = proxy_env(got.pod)
    assert issuer.verify_token(env["MESHKEEPER_IDENTITY_TOKEN"]) == ("prod", "catalog")
    assert "POD_IP" in env  # the other env stays
    # From the workload's name and the Kubernetes namespace when the pod names neither.
    env = proxy_env(inject_pod(pod(), config, namespace="shop", workload="web").pod)
    assert issuer.verify_token(env["MESHKEEPER_IDENTITY_TOKEN"]) == ("shop", "web")


def test_without_a_ca_there_is_no_token() -> None:
    env = proxy_env(inject_pod(pod({A_SERVICE: "catalog"}), InjectConfig(), namespace="shop").pod)
    assert "MESHKEEPER_IDENTITY_TOKEN" not in env


def _write_ca(tmp_path: Path):
    ca = generate("example.org", lambda: 1_800_000_000.0)
    (tmp_path / "ca.pem").write_bytes(ca.bundle_pem)
    (tmp_path / "ca.key").write_bytes(ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca


def test_meshkeeper_inject_with_the_ca_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = _write_ca(tmp_path)
    (tmp_path / "deploy.yaml").write_text(DEPLOYMENT)
    code = cli_main(["inject", "-f", str(tmp_path / "deploy.yaml"), "--ca-cert", str(tmp_path / "ca.pem"),
                     "--ca-key", str(tmp_path / "ca.key")])
    out, err = capsys.readouterr()
    assert code == 0, err
    template = yaml.safe_load(out)["spec"]["template"]
    token = proxy_env(template)["MESHKEEPER_IDENTITY_TOKEN"]
    assert Issuer(ca).verify_token(token) == ("shop", "catalog")  # what the control plane will accept


@pytest.mark.parametrize("extra", [["--ca-cert", "x.pem"], ["--ca-cert", "/nonexistent.pem", "--ca-key", "/nonexistent.key"],
                                   ["--ca-passphrase-file", "/nonexistent/pass"]])
def test_bad_ca_flags_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    (tmp_path / "deploy.yaml").write_text(DEPLOYMENT)
    with pytest.raises(SystemExit) as exc:
        cli_main(["inject", "-f", str(tmp_path / "deploy.yaml"), *extra])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("meshkeeper inject: "), err
