"""The sidecar's own key and its certificate signing request (docs/identity.md).

A key is made in memory (EC P-256, as the control plane's certificates) and never written or sent:
only the CSR, which carries its public half, goes to the control plane, in the ADS node's metadata.
The control plane reads nothing of the CSR but the public key and its signature, so the CSR names
nothing: the identity comes from the stream's bootstrap token.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


def new_key() -> tuple[bytes, bytes]:
    """``(key_pem, csr_pem)``: a new private key (PKCS#8, unencrypted: it stays in this process)
    and a CSR signed by it."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)
