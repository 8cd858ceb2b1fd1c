"""The real ``meshkeeper injector`` over real HTTPS: recorded AdmissionReviews in, golden answers out.

The webhook runs as its own process on a free port with a certificate from tests/harness/tls.py;
requests are made as the API server makes them (POST /inject, TLS verified against the test CA).
tests/golden/webhook/<case>.request.json is what Kubernetes sends, <case>.response.json the exact
AdmissionReview expected back, <case>.patch.json its patch decoded (for people; the unit tests
apply it). ``MESHKEEPER_REFRESH_GOLDEN=1`` rewrites responses and patches: review the diff.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import ssl
from pathlib import Path

import pytest

from tests.harness import ProcessGroup, wait_until
from tests.harness.tls import TlsFiles, make_tls

pytestmark = pytest.mark.integration

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "webhook"
CASES = sorted(p.name.removesuffix(".request.json") for p in GOLDEN.glob("*.request.json"))
REFRESH = os.environ.get("MESHKEEPER_REFRESH_GOLDEN") == "1"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("injector-tls"))


@pytest.fixture
def injector(procs: ProcessGroup, tls: TlsFiles, tmp_path: Path) -> tuple[int, Path, Path]:
    """The webhook's port, and its certificate and key files (copies, which a test may replace)."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(tls.server_cert, cert)
    shutil.copy(tls.server_key, key)
    proc = procs.meshkeeper("injector", "--port", "0", "--bind", "127.0.0.1", "--cert", str(cert), "--key", str(key))
    return proc.port("port"), cert, key


def call(port: int, ca: Path, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_recorded_requests_get_the_golden_answers(injector: tuple[int, Path, Path], tls: TlsFiles) -> None:
    port = injector[0]
    assert {"replicaset-pod", "v1beta1", "opt-out", "hostnetwork", "kube-system", "already-injected",
            "bad-annotation", "no-object"} <= set(CASES)
    for case in CASES:
        request = (GOLDEN / f"{case}.request.json").read_bytes()
        status, body = call(port, tls.ca, "POST", "/inject", request)
        assert status == 200, (case, body)
        answer = json.loads(body)
        patch = json.loads(base64.b64decode(answer["response"]["patch"])) if "patch" in answer["response"] else None
        if REFRESH:
            (GOLDEN / f"{case}.response.json").write_text(json.dumps(answer, indent=2) + "\n")
            patch_file = GOLDEN / f"{case}.patch.json"
            if patch is not None:
                patch_file.write_text(json.dumps(patch, indent=2) + "\n")
            elif patch_file.exists():
                patch_file.unlink()
        assert answer == json.loads((GOLDEN / f"{case}.response.json").read_text()), case
        if patch is not None:
            assert patch == json.loads((GOLDEN / f"{case}.patch.json").read_text()), case
        sent = json.loads(request)
        assert answer["apiVersion"] == sent["apiVersion"] and answer["kind"] == "AdmissionReview", case
        assert answer["response"]["uid"] == sent["request"]["uid"], case


def test_what_is_and_is_not_injected(injector: tuple[int, Path, Path], tls: TlsFiles) -> None:
    def answer(case: str) -> dict:
        return json.loads(call(injector[0], tls.ca, "POST", "/inject",
                               (GOLDEN / f"{case}.request.json").read_bytes())[1])["response"]

    for case in ("replicaset-pod", "v1beta1"):
        response = answer(case)
        assert response["allowed"] is True and response["patchType"] == "JSONPatch", case
    for case in ("opt-out", "hostnetwork", "kube-system", "already-injected", "update"):
        response = answer(case)
        assert response["allowed"] is True and "patch" not in response and "status" not in response, case
    refused = answer("bad-annotation")
    assert refused["allowed"] is False and refused["status"]["code"] == 400
    assert "sidecar.meshkeeper.io/protocol" in refused["status"]["message"]
    assert answer("no-port")["warnings"][0].startswith("meshkeeper sidecar not injected: no container port")


@pytest.mark.parametrize(("body", "api_version", "uid", "message"), [
    (b"this is not json", "admission.k8s.io/v1", "", "the body is not JSON"),
    (b"[1, 2]", "admission.k8s.io/v1", "", "not a JSON object"),
    (b'{"apiVersion": "v1", "kind": "Pod", "metadata": {}}', "admission.k8s.io/v1", "", "not an AdmissionReview"),
    (b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}', "admission.k8s.io/v1beta1", "",
     "no request with a uid"),
    (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u-1", '
     b'"kind": {"kind": "Service"}, "object": {"kind": "Service", "spec": {}}}}', "admission.k8s.io/v1", "u-1",
     "holds no pod"),
    (b"", "admission.k8s.io/v1", "", "the body is not JSON"),
])
def test_malformed_requests_are_allowed_with_a_message(injector: tuple[int, Path, Path], tls: TlsFiles, body: bytes,
                                                       api_version: str, uid: str, message: str) -> None:
    status, raw = call(injector[0], tls.ca, "POST", "/inject", body)
    assert status == 200
    answer = json.loads(raw)
    assert answer["apiVersion"] == api_version and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == uid and response["allowed"] is True and "patch" not in response
    assert message in response["status"]["message"]


def test_health_paths_and_tls(injector: tuple[int, Path, Path], tls: TlsFiles) -> None:
    port = injector[0]
    assert call(port, tls.ca, "GET", "/healthz") == (200, b"ok\n")
    assert call(port, tls.ca, "GET", "/readyz") == (200, b"ok\n")
    assert call(port, tls.ca, "GET", "/inject")[0] == 404
    assert call(port, tls.ca, "POST", "/elsewhere", b"{}")[0] == 404
    with pytest.raises(ssl.SSLCertVerificationError):
        call(port, tls.other_ca, "GET", "/healthz")


def test_a_rotated_certificate_is_served_without_a_restart(injector: tuple[int, Path, Path], tmp_path: Path) -> None:
    port, cert, key = injector
    fresh = make_tls(tmp_path / "rotated")
    shutil.copy(fresh.server_key, key)
    shutil.copy(fresh.server_cert, cert)
    wait_until(lambda: call(port, fresh.ca, "GET", "/healthz")[0] == 200, 10,
               message="the injector serves the rotated certificate")


def test_sigterm_stops_it_cleanly(procs: ProcessGroup, tls: TlsFiles) -> None:
    proc = procs.meshkeeper("injector", "--port", "0", "--bind", "127.0.0.1", "--cert", str(tls.server_cert),
                            "--key", str(tls.server_key))
    assert call(proc.port("port"), tls.ca, "GET", "/healthz")[0] == 200
    assert proc.terminate() == 0
