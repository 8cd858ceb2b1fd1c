"""Mutual TLS to an endpoint (Istio's auto mTLS, docs/identity.md): what a connection pool needs.

A pool gets an :class:`UpstreamTls` when its cluster has an UpstreamTlsContext and its endpoint's
metadata says ``tlsMode: mutual``. Each new connection then asks for the identity's client
context: None (this sidecar has no certificate yet) means plaintext, as Istio does when it cannot
authenticate. After the handshake the server's URI SAN must be the cluster's expected one.
"""

from __future__ import annotations

import ssl

from sidecar.config import UpstreamTlsConfig
from sidecar.tls.identity import TlsIdentity
from sidecar.tls.peer import uri_sans


class UpstreamTls:
    __slots__ = ("config", "identity")

    def __init__(self, config: UpstreamTlsConfig, identity: TlsIdentity) -> None:
        self.config = config
        self.identity = identity

    def context(self) -> ssl.SSLContext | None:
        """The client context of a new connection; None: connect in plaintext (no identity yet)."""
        return self.identity.client_context(self.config.alpn)

    @property
    def server_hostname(self) -> str | None:
        return self.config.sni or None

    def san_ok(self, peercert: dict | None) -> bool:
        """The server's certificate carries the expected URI SAN."""
        return self.config.san in uri_sans(peercert)
