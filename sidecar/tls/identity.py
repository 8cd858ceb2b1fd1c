"""The sidecar's identity store: its private key(s), the ``default`` chain and the ``ROOTCA`` bundle.

Who changes what (docs/identity.md):

- The SDS side (``sidecar.xds.secrets``, the lead's) makes a key and a CSR and calls
  :meth:`TlsIdentity.set_pending_key` before it asks for a certificate; SDS then delivers the
  chain and :meth:`TlsIdentity.apply_secrets` pairs it with a key *by public key*: the pending
  key (it is promoted, the old key forgotten) or the current one (the same certificate again, or a
  re-signed one). A chain for neither raises ValueError: the xDS client NACKs it and the last good
  identity stays in force.
- The data path only reads :meth:`server_context` / :meth:`client_context`, which are built here
  once per change (never per connection). A change replaces the contexts: connections opened
  before keep theirs (an ``SSLObject`` holds its context), new ones use the new certificate.

``ssl.SSLContext.load_cert_chain`` reads files only, so the chain and key go through an anonymous
in-memory file (``memfd_create``, read back as ``/proc/self/fd/N``): the key never touches a disk.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
from collections.abc import Callable, Mapping

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID

from sidecar.config import SecretConfig

log = logging.getLogger("meshkeeper.sidecar.tls")

CERTIFICATE_SECRET = "default"  # Istio's names (docs/identity.md)
TRUST_BUNDLE_SECRET = "ROOTCA"
SERVER_ALPN = ("h2", "http/1.1")  # the inbound DownstreamTlsContext's alpn_protocols


class _Key:
    __slots__ = ("pem", "public")

    def __init__(self, pem: bytes) -> None:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not an unencrypted PEM private key: {exc}") from None
        self.pem = pem
        self.public = _spki(key.public_key())


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _public(cert: x509.Certificate, what: str) -> bytes:
    """The certificate's public key (SPKI DER); ValueError for a key type or curve not supported."""
    try:
        return _spki(cert.public_key())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{what}: the certificate's public key is not supported: {exc}") from None


def _certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ValueError(f"{what}: not PEM certificates ({exc})") from None
    if not certs:
        raise ValueError(f"{what}: no certificate")
    return certs


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


def _load_chain(ctx: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    """Load a PEM chain and key into ``ctx`` from memory (an anonymous memfd, never a disk file)."""
    fd = os.memfd_create("meshkeeper-tls", os.MFD_CLOEXEC)
    try:
        data = chain + (b"" if chain.endswith(b"\n") else b"\n") + key
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as exc:
        raise ValueError(f"the certificate chain and key do not load: {exc}") from None
    finally:
        os.close(fd)


class TlsIdentity:
    """Key, certificate and trust bundle of this sidecar, and the TLS contexts made from them.

    ``server_context()`` / ``client_context(alpn)`` are None until there is a key, its chain and a
    bundle ("no identity yet": the sidecar calls in plaintext and cannot terminate mTLS).
    ``on_change`` callbacks run after every accepted change (a callback that raises is logged).
    """

    def __init__(self) -> None:
        self._key: _Key | None = None
        self._pending: _Key | None = None
        self._chain = b""
        self._bundle = b""
        self._server: ssl.SSLContext | None = None
        self._clients: dict[tuple[str, ...], ssl.SSLContext] = {}
        self.spiffe_id = ""  # own SPIFFE ID: the leaf's URI SAN
        self.not_after: datetime.datetime | None = None
        self.on_change: list[Callable[[], None]] = []
        self.generation = 0  # bumped by every accepted change of key, chain or bundle

    # --- state ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Key, chain and bundle are all here: mTLS works both ways."""
        return self._server is not None

    @property
    def has_pending_key(self) -> bool:
        return self._pending is not None

    @property
    def certificate_chain(self) -> bytes:
        return self._chain

    @property
    def trust_bundle(self) -> bytes:
        return self._bundle

    def set_pending_key(self, key_pem: bytes) -> None:
        """The key whose CSR was just sent: its chain, when SDS delivers it, is accepted and the key
        becomes current. A second call before that replaces the pending key (at most one).
        Raises ValueError for something that is not an unencrypted PEM private key."""
        self._pending = _Key(key_pem)

    def apply_secrets(self, secrets: Mapping[str, SecretConfig]) -> None:
        """Apply SDS secrets by name (``default``, ``ROOTCA``); a name absent keeps its last value.

        Validates everything and builds the new contexts before changing anything: raises
        ValueError (-> NACK, the old identity stays) for an unknown name, a malformed PEM, a chain
        whose leaf matches neither the current nor the pending key, or a chain and key that do not
        load.
        """
        key, pending, chain, bundle = self._key, self._pending, self._chain, self._bundle
        leaf: x509.Certificate | None = None
        for name, secret in secrets.items():
            if name == CERTIFICATE_SECRET:
                if not secret.certificate_chain or secret.trusted_ca:
                    raise ValueError(f"secret {name!r}: needs a certificate_chain and nothing else")
                leaf = _certificates(secret.certificate_chain, f"secret {name!r}")[0]
                public = _public(leaf, f"secret {name!r}")
                if pending is not None and public == pending.public:
                    key, pending = pending, None
                elif key is None or public != key.public:
                    raise ValueError(f"secret {name!r}: the certificate is for a key this sidecar does not have")
                chain = secret.certificate_chain
            elif name == TRUST_BUNDLE_SECRET:
                if not secret.trusted_ca or secret.certificate_chain:
                    raise ValueError(f"secret {name!r}: needs a trusted_ca and nothing else")
                _certificates(secret.trusted_ca, f"secret {name!r}")
                bundle = secret.trusted_ca
            else:
                raise ValueError(f"secret {name!r}: this sidecar uses only {CERTIFICATE_SECRET!r} and "
                                 f"{TRUST_BUNDLE_SECRET!r}")
        if (key, chain, bundle) == (self._key, self._chain, self._bundle):
            self._pending = pending
            return
        server = _server_context(chain, key.pem, bundle) if key is not None and chain and bundle else None
        if leaf is None and chain:
            leaf = _certificates(chain, CERTIFICATE_SECRET)[0]
        spiffe_id, not_after = self.spiffe_id, self.not_after
        if leaf is not None:  # read before anything changes: a leaf's extensions parse only now
            try:
                sans = _uri_sans(leaf)
            except ValueError as exc:
                raise ValueError(f"secret {CERTIFICATE_SECRET!r}: the certificate's extensions do not parse: "
                                 f"{exc}") from None
            spiffe_id, not_after = (sans[0] if sans else ""), leaf.not_valid_after_utc
        self._key, self._pending, self._chain, self._bundle = key, pending, chain, bundle
        self._server, self._clients = server, {}
        self.spiffe_id, self.not_after = spiffe_id, not_after
        self.generation += 1
        log.info("identity %s: certificate until %s, %s", self.spiffe_id or "(none)",
                 self.not_after.isoformat() if self.not_after else "-", "ready" if server else "not complete yet")
        for callback in list(self.on_change):
            try:
                callback()
            except Exception:  # a listener of changes must not undo an accepted change
                log.exception("identity change callback failed")

    # --- contexts (read by the data path) ---------------------------------------------------

    def server_context(self) -> ssl.SSLContext | None:
        """The inbound listener's TLS server context (client certificate required, ALPN h2 /
        http/1.1); None: no identity yet."""
        return self._server

    def client_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext | None:
        """A TLS client context presenting our chain, verifying the peer against the bundle (its
        SAN is checked by the caller), offering ``alpn``; None: no identity yet. One per ALPN list,
        built on first use after each change."""
        ctx = self._clients.get(alpn)
        if ctx is None and self._server is not None:
            ctx = self._clients[alpn] = _client_context(self._chain, self._key.pem, self._bundle, alpn)
        return ctx


def _base_context(protocol: int, chain: bytes, key: bytes, bundle: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=bundle.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        raise ValueError(f"secret {TRUST_BUNDLE_SECRET!r}: the bundle does not load: {exc}") from None
    _load_chain(ctx, chain, key)
    return ctx


def _server_context(chain: bytes, key: bytes, bundle: bytes) -> ssl.SSLContext:
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, chain, key, bundle)
    ctx.set_alpn_protocols(list(SERVER_ALPN))
    return ctx


def _client_context(chain: bytes, key: bytes, bundle: bytes, alpn: tuple[str, ...]) -> ssl.SSLContext:
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, chain, key, bundle)
    ctx.check_hostname = False  # the peer is known by its URI SAN, checked after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx
