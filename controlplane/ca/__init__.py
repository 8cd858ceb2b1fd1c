"""The control plane's certificate authority (docs/identity.md): workload certificates for SDS and
the bootstrap tokens that let a sidecar obtain one.

- controlplane.ca.authority: the CA certificate and key, from files or generated.
- controlplane.ca.shared: one generated CA shared by the replicas through ZooKeeper ``/meshkeeper/_ca``.
- controlplane.ca.tokens: bootstrap tokens ``mk1.<ns>.<svc>.<mac>``.
- controlplane.ca.issuer: :class:`Issuer`, what the ADS streams and the admin API call.
"""

from controlplane.ca.authority import Authority, CAError
from controlplane.ca.issuer import DEFAULT_CERT_TTL, IssuedCertificate, Issuer
from controlplane.ca.shared import CA_ZNODE

__all__ = ["CA_ZNODE", "DEFAULT_CERT_TTL", "Authority", "CAError", "IssuedCertificate", "Issuer"]
