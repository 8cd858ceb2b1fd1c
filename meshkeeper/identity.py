"""Workload identity names shared by the control plane and the sidecar (DESIGN §14, docs/identity.md).

A workload's identity is the SPIFFE ID ``spiffe://<trust-domain>/ns/<ns>/sa/<svc>``. Certificates
reach sidecars over SDS as two Secrets with Istio's names: ``default`` (the workload's chain; its
key never leaves the sidecar) and ``ROOTCA`` (the trust bundle).
"""

from __future__ import annotations

import re

from meshkeeper.registry import validate_name

DEFAULT_TRUST_DOMAIN = "meshkeeper.local"
SECRET_DEFAULT = "default"
SECRET_ROOTCA = "ROOTCA"
# Node metadata key of the sidecar's PKCS#10 CSR (PEM) and the gRPC metadata of its bootstrap token.
CSR_METADATA = "csr"
TOKEN_ENV = "MESHKEEPER_IDENTITY_TOKEN"

_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.\-_]{0,253}[a-z0-9])?$")
_SPIFFE_RE = re.compile(r"^spiffe://([^/]+)/ns/([^/]+)/sa/([^/]+)$")


class IdentityError(ValueError):
    """A SPIFFE ID, trust domain or token that is not valid; the message says which and why."""


def validate_trust_domain(td: str) -> str:
    if not isinstance(td, str) or not _TRUST_DOMAIN_RE.match(td):
        raise IdentityError(f"trust domain {td!r}: lower-case letters, digits, '.', '-' and '_' only")
    return td


def spiffe_id(trust_domain: str, namespace: str, service: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service}"


def namespace_prefix(trust_domain: str, namespace: str) -> str:
    """What every SPIFFE ID of ``namespace`` starts with (authz ``from: ["ns:<ns>"]``)."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/"


def parse_spiffe_id(uri: str) -> tuple[str, str, str]:
    """``(trust_domain, namespace, service)`` of a workload SPIFFE ID; IdentityError otherwise."""
    m = _SPIFFE_RE.match(uri) if isinstance(uri, str) else None
    if m is None:
        raise IdentityError(f"{uri!r} is not a workload SPIFFE ID (spiffe://<td>/ns/<ns>/sa/<svc>)")
    td, ns, svc = m.groups()
    try:
        validate_trust_domain(td)
        validate_name("namespace", ns)
        validate_name("service", svc)
    except ValueError as e:
        raise IdentityError(f"{uri!r}: {e}") from None
    return td, ns, svc
