"""AdmissionReview in, AdmissionReview out: the injector's answer to one request, as a pure function.

The answer is in the apiVersion of the request (``admission.k8s.io/v1``, or ``v1beta1`` from old
API servers), echoes its ``uid``, and is always ``allowed`` except when the pod's own annotations
ask for something injection cannot do (then ``allowed: false`` with code 400 and the reason: the
user fixes the manifest, as Istio's injector answers). A pod we inject gets ``patchType: JSONPatch``
and the base64 RFC 6902 patch; a pod left alone gets no patch (a warning when it is not what the
user asked for).

A malformed request (not JSON, not an AdmissionReview, no pod in it) is answered ``allowed: true``
with ``status.message`` saying what was wrong, never an HTTP error: the API server does not send
such requests, so one means version skew or a bug of ours, and with ``failurePolicy: Fail`` an error
would block every pod of every labelled namespace because of it. The pod is then created without
the sidecar, and the message is logged by the caller.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from controlplane.injector.diff import json_patch
from controlplane.injector.patch import InjectConfig, InjectError, inject_pod

API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
DEFAULT_API_VERSION = API_VERSIONS[0]


@dataclass(frozen=True)
class Answer:
    """The AdmissionReview to send, and a line for the log (None: nothing worth logging)."""

    review: dict[str, Any]
    log: str | None = None

    def body(self) -> bytes:
        return json.dumps(self.review, separators=(",", ":")).encode()


def _review(api_version: str, response: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "AdmissionReview", "response": response}


def _malformed(api_version: str, uid: str, message: str) -> Answer:
    return Answer(_review(api_version, {"uid": uid, "allowed": True, "status": {"message": message}}),
                  f"malformed admission request (allowed, not injected): {message}")


def review(body: bytes, config: InjectConfig) -> Answer:
    """The answer to one POST body."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return _malformed(DEFAULT_API_VERSION, "", f"the body is not JSON: {exc}")
    if not isinstance(doc, dict):
        return _malformed(DEFAULT_API_VERSION, "", "the body is not an AdmissionReview (not a JSON object)")
    api_version, uid = _envelope(doc)
    request = doc.get("request")
    if doc.get("kind") != "AdmissionReview" or doc.get("apiVersion") not in API_VERSIONS:
        return _malformed(api_version, uid, f"not an AdmissionReview of {' or '.join(API_VERSIONS)} "
                                            f"(apiVersion {doc.get('apiVersion')!r}, kind {doc.get('kind')!r})")
    if not isinstance(request, dict) or not uid:
        return _malformed(api_version, uid, "the AdmissionReview has no request with a uid")
    pod = request.get("object")
    kind = (request.get("kind") or {}).get("kind") if isinstance(request.get("kind"), dict) else None
    if not isinstance(pod, dict) or not isinstance(pod.get("spec"), dict) or (kind or pod.get("kind")) != "Pod":
        return _malformed(api_version, uid, "the request holds no pod (request.object is not a Pod)")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if request.get("operation", "CREATE") != "CREATE":
        return Answer(_review(api_version, response))
    meta = pod.get("metadata") or {}
    namespace = request.get("namespace") or meta.get("namespace")
    name = f"{namespace}/{meta.get('name') or meta.get('generateName') or '?'}"
    try:
        result = inject_pod(pod, config, namespace=namespace, workload=workload_name(meta))
    except InjectError as exc:
        response.update(allowed=False, status={"code": 400, "reason": "BadRequest",
                                               "message": f"meshkeeper sidecar injection: {exc}"})
        return Answer(_review(api_version, response), f"pod {name}: refused: {exc}")
    if result.skipped:
        if result.warn:
            response["warnings"] = [f"meshkeeper sidecar not injected: {result.skipped}"]
        return Answer(_review(api_version, response), f"pod {name}: not injected: {result.skipped}")
    patch = json.dumps(json_patch(pod, result.pod), separators=(",", ":")).encode()
    response.update(patchType="JSONPatch", patch=base64.b64encode(patch).decode("ascii"))
    return Answer(_review(api_version, response), f"pod {name}: injected")


def internal_error(body: bytes, exc: Exception) -> Answer:
    """The answer when :func:`review` itself failed (a bug of ours): allowed, for the same reason."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    api_version, uid = _envelope(doc) if isinstance(doc, dict) else (DEFAULT_API_VERSION, "")
    return _malformed(api_version, uid, f"meshkeeper injector error: {exc!r}")


def _envelope(doc: dict[str, Any]) -> tuple[str, str]:
    """The apiVersion to answer in and the request's uid, as far as they can be read."""
    api_version = doc.get("apiVersion") if doc.get("apiVersion") in API_VERSIONS else DEFAULT_API_VERSION
    request = doc.get("request")
    uid = request.get("uid") if isinstance(request, dict) and isinstance(request.get("uid"), str) else ""
    return api_version, uid


def workload_name(meta: dict[str, Any]) -> str | None:
    """The name of what made the pod: ``web`` for ``web-7d9f8c6b5d-x2x4z`` (ReplicaSet hash dropped).

    Pods made by controllers arrive with ``generateName`` only; a Deployment's pods carry the
    ``pod-template-hash`` label, whose value is the last segment of the ReplicaSet's name.
    """
    name = meta.get("name") or (meta.get("generateName") or "").rstrip("-")
    hash_ = (meta.get("labels") or {}).get("pod-template-hash")
    if hash_ and f"-{hash_}" in name:
        name = name[: name.rindex(f"-{hash_}")]
    return name or None
