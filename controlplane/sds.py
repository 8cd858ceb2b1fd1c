"""SDS on the ADS stream: one stream's workload certificate and the mesh's trust bundle.

docs/identity.md is the contract. A sidecar that holds a bootstrap token sends it on its ADS stream
(gRPC metadata ``authorization: Bearer <token>``) and a CSR in ``node.metadata.csr``; this module
authenticates the stream once, when it opens, and signs every new CSR the stream carries for the
token's identity, whatever the CSR or the node claim. Two Secrets are served, with Istio's names:

* ``ROOTCA``: the CA's bundle, one :class:`~controlplane.cache.Resource` shared by every stream;
* ``default``: the stream's own certificate chain, without a private key (the key never leaves
  the sidecar that made it).

Secrets are per stream, never shared through the snapshot cache: :meth:`StreamSecrets.layers`
gives the stream's :class:`~controlplane.cache.TypeView` layers in the cache's shape (namespace,
interception mode, node), so both ADS variants push them as any other type, with their ACK/NACK
and version rules.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from controlplane.cache import Layers, Resource, TypeView, pack
from meshkeeper import xds
from meshkeeper.identity import CSR_METADATA, SECRET_DEFAULT, SECRET_ROOTCA, IdentityError
from meshkeeper.xds import NodeInfo

if TYPE_CHECKING:
    from controlplane.ca import IssuedCertificate, Issuer

log = logging.getLogger("meshkeeper.controlplane.sds")

_EMPTY = TypeView(xds.SECRET, {})
_NO_SECRETS: Layers = (_EMPTY, _EMPTY, _EMPTY)


class StreamRefused(Exception):
    """The stream's credentials do not hold: ``code`` is the gRPC status name to end it with."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def bearer_token(metadata) -> str | None:
    """The token of ``authorization: Bearer <token>`` in a call's metadata, or None."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return None


class TrustBundle:
    """The ``ROOTCA`` Secret of an issuer, packed once and shared by every stream."""

    def __init__(self, issuer: Issuer) -> None:
        msg = secret_pb2.Secret(name=SECRET_ROOTCA)
        msg.validation_context.trusted_ca.inline_bytes = issuer.bundle_pem
        self.resource: Resource = pack(SECRET_ROOTCA, msg)
        self.view = TypeView(xds.SECRET, {SECRET_ROOTCA: self.resource})


class StreamSecrets:
    """One stream's identity: authenticated from its token when the stream opens
    (:meth:`authenticate`), its certificate signed anew whenever a request's node carries a CSR it
    has not seen (:meth:`observe`)."""

    def __init__(self, issuer: Issuer | None, bundle: TrustBundle | None) -> None:
        self.issuer, self.bundle = issuer, bundle
        self.identity: tuple[str, str] | None = None  # (namespace, service) the token proves
        self.certificate: IssuedCertificate | None = None
        self._csr = ""
        self._own = _EMPTY

    def authenticate(self, node: NodeInfo, metadata) -> None:
        """Check the stream's bootstrap token, if any; raise :class:`StreamRefused` when it is not
        valid, or is valid for another service than the node's."""
        token = bearer_token(metadata)
        if token is None or self.issuer is None:
            return  # no identity: the trust bundle only (or, without a CA, nothing)
        try:
            ns, svc = self.issuer.verify_token(token)
        except IdentityError as exc:
            raise StreamRefused("UNAUTHENTICATED", f"bootstrap token refused: {exc}") from None
        if (ns, svc) != (node.namespace, node.service):
            raise StreamRefused("PERMISSION_DENIED",
                                f"the bootstrap token is for {svc}.{ns}, not {node.service}.{node.namespace}")
        self.identity = (ns, svc)

    def observe(self, metadata: dict) -> bool:
        """Sign the CSR in a request's node metadata if it is new; True when ``default`` changed.
        Raises :class:`StreamRefused` (INVALID_ARGUMENT) for a CSR that does not verify."""
        csr = metadata.get(CSR_METADATA)
        if not isinstance(csr, str) or not csr or csr == self._csr or self.identity is None:
            return False
        try:
            issued = self.issuer.sign(csr.encode("ascii", "replace"), *self.identity)
        except IdentityError as exc:
            raise StreamRefused("INVALID_ARGUMENT", f"certificate signing request refused: {exc}") from None
        self._csr, self.certificate = csr, issued
        msg = secret_pb2.Secret(name=SECRET_DEFAULT)
        msg.tls_certificate.certificate_chain.inline_bytes = issued.chain_pem
        self._own = TypeView(xds.SECRET, {SECRET_DEFAULT: pack(SECRET_DEFAULT, msg)})
        log.info("issued %s (serial %x) until %.0f", issued.spiffe_id, issued.serial, issued.not_after)
        return True

    def layers(self) -> Layers:
        if self.bundle is None:
            return _NO_SECRETS
        return (_EMPTY, self.bundle.view, self._own)
