"""The sidecar's workload identity and mutual TLS (docs/identity.md).

- :mod:`.identity`: :class:`TlsIdentity`, the key(s), certificate chain and trust bundle SDS
  delivered, and the ``ssl.SSLContext`` objects made from them.
- :mod:`.peer`: who is on the other end of a TLS connection (its URI SAN, the SPIFFE ID).
"""

from sidecar.tls.identity import TlsIdentity
from sidecar.tls.peer import peer_spiffe_id, uri_sans

__all__ = ["TlsIdentity", "peer_spiffe_id", "uri_sans"]
