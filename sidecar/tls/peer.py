"""Who is on the other end of a TLS connection: the URI SANs of its verified certificate.

``ssl.SSLObject.getpeercert()`` returns the certificate of a verified peer as a dict whose
``subjectAltName`` is a tuple of ``(kind, value)``; a SPIFFE ID is its ``URI`` entry (docs/identity.md:
a workload certificate carries that one URI SAN and nothing else).
"""

from __future__ import annotations

from typing import Any


def uri_sans(cert: dict[str, Any] | None) -> tuple[str, ...]:
    """The URI SANs of a certificate as ``getpeercert()`` returns it (None or {}: none)."""
    if not cert:
        return ()
    return tuple(value for kind, value in cert.get("subjectAltName", ()) if kind == "URI")


def peer_spiffe_id(transport: Any) -> str:
    """The peer's SPIFFE ID (its first URI SAN) on a TLS transport; "" when plaintext, unverified
    or without a URI SAN. Never raises (data path)."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return ""
    try:
        sans = uri_sans(ssl_object.getpeercert())
    except ValueError:  # handshake not done
        return ""
    return sans[0] if sans else ""
