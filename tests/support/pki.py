"""A throwaway PKI for TLS tests: a CA and workload certificates as the control plane makes them
(EC P-256, one URI SAN ``spiffe://meshkeeper.local/ns/<ns>/sa/<svc>``, serverAuth + clientAuth)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "meshkeeper.local"


def spiffe(svc: str, ns: str = "default") -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{svc}"


def cert_sha256(chain_pem: bytes) -> str:
    """XFCC's ``Hash`` for a chain: the SHA-256 of its leaf certificate's DER, lower-case hex."""
    return x509.load_pem_x509_certificates(chain_pem)[0].fingerprint(hashes.SHA256()).hex()


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Workload:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    spiffe_id: str

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)

    @property
    def chain_pem(self) -> bytes:
        return cert_pem(self.cert)


class Ca:
    """A self-signed CA (``O=<trust domain>``) that signs workload certificates."""

    def __init__(self, name: str = TRUST_DOMAIN) -> None:
        self.key = new_key()
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(seconds=60))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))

    @property
    def bundle_pem(self) -> bytes:
        return cert_pem(self.cert)

    def sign(self, public_key, uri: str, ttl: float = 3600.0) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([])).issuer_name(self.cert.subject)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(seconds=60))
                .not_valid_after(now + datetime.timedelta(seconds=ttl))
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))

    def workload(self, svc: str, ns: str = "default", key: ec.EllipticCurvePrivateKey | None = None) -> Workload:
        key = key or new_key()
        uri = spiffe(svc, ns)
        return Workload(key, self.sign(key.public_key(), uri), uri)
