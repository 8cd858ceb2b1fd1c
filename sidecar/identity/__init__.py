"""The sidecar's side of workload identity (docs/identity.md): it makes its own keys and asks the
control plane, over its ADS stream, to certify them; :mod:`sidecar.tls` holds what comes back and
makes the TLS contexts of the data path.

- :mod:`.keys`: a new private key and its CSR.
- :mod:`.agent`: :class:`IdentityAgent`, which asks for the first certificate and for the next at
  half of the current one's remaining life.
"""

from sidecar.identity.agent import IdentityAgent, read_token

__all__ = ["IdentityAgent", "read_token"]
