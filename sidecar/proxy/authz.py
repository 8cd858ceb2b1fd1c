"""What the inbound HCM does with who called, before routing (docs/identity.md, DESIGN §14).

:class:`HttpPolicy` is built once per LDS update from the listener's config and put on its
:class:`~sidecar.proxy.context.ListenerContext` (None when the HCM has neither, so a listener
without them pays one attribute test per request). For each request, in Envoy's order:

1. ``forward_client_cert_details: SANITIZE_SET``: a caller's ``x-forwarded-client-cert`` is always
   removed; on an mTLS connection (``set_current_client_cert_details.uri``)
   ``x-forwarded-client-cert: By=<own SPIFFE ID>;Hash=<caller cert SHA-256>;URI=<caller SPIFFE ID>``
   is added, in Envoy's element order (:func:`xfcc_value`). ``Hash`` is the SHA-256 of the caller's
   certificate (DER, lower-case hex), computed once per connection by the tls_inspector
   (:mod:`sidecar.tls.inspector`). ``Subject``, ``Cert``, ``Chain`` and ``DNS`` are not produced:
   the xDS conversion accepts only ``uri`` among the details (:func:`sidecar.xds.security.xfcc`).
2. ``envoy.filters.http.rbac``: :meth:`sidecar.config.AuthzConfig.allows` with the request's
   method, path and the caller's SPIFFE ID ("" for plaintext, which matches only ``any``
   principals); refused: 403 ``RBAC`` (gRPC: PERMISSION_DENIED), counted ``rbac_denied``, else
   ``rbac_allowed``. Paths are matched as Envoy's HCM hands them to RBAC with Istio's default
   normalization (``normalize_path`` and ``merge_slashes``, :func:`normalized_path`), so a DENY of
   ``/admin`` is not dodged with ``//admin``, ``/./admin``, ``/x/../admin`` or ``/%61dmin``, and
   an ALLOW of ``/public`` does not let ``/public/../admin`` through. The path sent upstream is
   left as the caller wrote it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sidecar.config import AuthzConfig

if TYPE_CHECKING:
    from sidecar.proxy.stream import Stream
    from sidecar.tls.identity import TlsIdentity

XFCC = b"x-forwarded-client-cert"
# A percent-encoded unreserved character (RFC 3986 §2.3): the same character, decoded (§6.2.2.2).
_UNRESERVED_ESCAPE = re.compile(rb"%(4[1-9A-Fa-f]|5[0-9Aa]|6[1-9A-Fa-f]|7[0-9Aa]|3[0-9]|2[DdEe]|5[Ff]|7[Ee])")
_SLASHES = re.compile(rb"/{2,}")
_XFCC_LEN = len(XFCC)


class HttpPolicy:
    __slots__ = ("sanitize", "set_uri", "rbac", "identity")

    def __init__(self, *, sanitize: bool, set_uri: bool, rbac: AuthzConfig | None, identity: TlsIdentity) -> None:
        self.sanitize = sanitize
        self.set_uri = set_uri
        self.rbac = rbac
        self.identity = identity  # read per request: the own SPIFFE ID arrives with the certificate

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, HttpPolicy) and (self.sanitize, self.set_uri, self.rbac) ==
                (other.sanitize, other.set_uri, other.rbac) and self.identity is other.identity)

    def __hash__(self) -> int:
        return hash((self.sanitize, self.set_uri, self.rbac))

    def admit(self, stream: Stream, peer_id: str, stats, peer_cert_hash: str = "") -> bool:
        """Sanitize/set XFCC, then RBAC; False: refused (the caller answers 403 RBAC).

        ``peer_id`` and ``peer_cert_hash``: the caller's SPIFFE ID and the SHA-256 (hex) of its
        certificate on an mTLS connection, both "" on plaintext."""
        if self.sanitize:
            sanitize_xfcc(stream)
            if self.set_uri and peer_id:
                value = xfcc_value(self.identity.spiffe_id, peer_cert_hash, peer_id)
                stream.headers += (XFCC, b": ", value.encode("latin-1"), b"\r\n")
        rbac = self.rbac
        if rbac is None:
            return True
        if rbac.allows(stream.method, normalized_path(stream.path), peer_id):
            stats.rbac_allowed += 1
            return True
        stats.rbac_denied += 1
        return False


def xfcc_value(own: str, peer_cert_hash: str, peer_id: str) -> str:
    """The XFCC element Envoy sets under SANITIZE_SET with ``uri``: ``By`` (this sidecar's URI SAN),
    ``Hash`` (the caller's certificate's SHA-256), then the details asked for, here ``URI`` (the
    caller's URI SAN); an element is left out when there is nothing for it, as in Envoy."""
    by = f"By={own};" if own else ""
    digest = f"Hash={peer_cert_hash};" if peer_cert_hash else ""
    return f"{by}{digest}URI={peer_id}"


def sanitize_xfcc(stream: Stream) -> None:
    """Remove every ``x-forwarded-client-cert`` a caller sent (any case)."""
    headers = stream.headers
    for i in range(0, len(headers), 4):
        name = headers[i]
        if len(name) == _XFCC_LEN and name.lower() == XFCC:
            break
    else:
        return
    kept: list[bytes] = []
    for i in range(0, len(headers), 4):
        name = headers[i]
        if not (len(name) == _XFCC_LEN and name.lower() == XFCC):
            kept += headers[i:i + 4]
    stream.headers = kept


def policy_for(sanitize: bool, set_uri: bool, rbac: AuthzConfig | None, identity: TlsIdentity) -> HttpPolicy | None:
    """The policy of a listener's HCM, or None when it has nothing to do."""
    if not sanitize and rbac is None:
        return None
    return HttpPolicy(sanitize=sanitize, set_uri=set_uri, rbac=rbac, identity=identity)


def normalized_path(path: bytes) -> bytes:
    """``path`` without its query, unreserved characters decoded, slashes merged and dot segments
    removed (RFC 3986 §5.2.4), as Envoy's ``normalize_path`` + ``merge_slashes`` leave it."""
    q = path.find(b"?")
    if q >= 0:
        path = path[:q]
    if b"%" in path:
        path = _UNRESERVED_ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), path)
    if b"//" in path:
        path = _SLASHES.sub(b"/", path)
    if b"/." not in path:
        return path
    out: list[bytes] = []
    segments = path.split(b"/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == b".":
            if last:
                out.append(b"")
        elif seg == b"..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append(b"")
        else:
            out.append(seg)
    return b"/".join(out) if out and out[0] == b"" else b"/" + b"/".join(out)
