"""The Issuer: signs workload certificates and checks bootstrap tokens (docs/identity.md).

The ADS streams call :meth:`Issuer.verify_token` with a stream's token and :meth:`Issuer.sign` with
its CSR; the admin API calls :meth:`Issuer.mint_token`. A certificate is issued for the identity
the caller passes (the token's), never for anything the CSR says: only its public key is used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from controlplane.ca.authority import CLOCK_SKEW, Authority, Clock, generate, utc
from controlplane.ca.tokens import TokenKey, derive_key
from meshkeeper.identity import DEFAULT_TRUST_DOMAIN, IdentityError, spiffe_id, validate_trust_domain
from meshkeeper.registry import validate_name

DEFAULT_CERT_TTL = 86400.0  # seconds (--cert-ttl)
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)
_MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class IssuedCertificate:
    chain_pem: bytes  # the leaf first, then the CA's chain (the ``default`` Secret)
    spiffe_id: str
    not_after: float  # seconds since the epoch
    serial: int


class Issuer:
    """``origin`` says where the CA came from, for the control plane's start line."""

    def __init__(self, authority: Authority, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 ttl: float = DEFAULT_CERT_TTL, clock: Clock = time.time, origin: str = "") -> None:
        if not ttl > 0:
            raise ValueError(f"certificate ttl {ttl!r}: must be > 0 seconds")
        self.authority = authority
        self.trust_domain = validate_trust_domain(trust_domain)
        self.ttl = float(ttl)
        self.clock = clock
        self.origin = origin or authority.subject
        self.bundle_pem: bytes = authority.bundle_pem
        self._chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in authority.chain)
        self._tokens = TokenKey(derive_key(authority.key_der()))
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.cert.public_key())
        self._ca_not_after = authority.cert.not_valid_after_utc.timestamp()

    @classmethod
    def generate(cls, trust_domain: str = DEFAULT_TRUST_DOMAIN, ttl: float = DEFAULT_CERT_TTL,
                 clock: Clock = time.time) -> Issuer:
        """An Issuer over a new self-signed CA kept in memory only (tests, one-off demos)."""
        return cls(generate(validate_trust_domain(trust_domain), clock), trust_domain, ttl, clock,
                   origin="a self-signed CA in memory")

    # -- bootstrap tokens

    def mint_token(self, namespace: str, service: str) -> str:
        return self._tokens.mint(namespace, service)

    def verify_token(self, token: str) -> tuple[str, str]:
        return self._tokens.verify(token)

    # -- certificates

    def sign(self, csr_pem: bytes, namespace: str, service: str) -> IssuedCertificate:
        """A certificate for ``spiffe://<td>/ns/<namespace>/sa/<service>`` over the CSR's public
        key; IdentityError for a CSR that does not parse, whose signature does not verify, or whose
        key is not EC P-256/P-384 or RSA >= 2048."""
        try:
            validate_name("namespace", namespace)
            validate_name("service", service)
        except ValueError as exc:
            raise IdentityError(str(exc)) from None
        if isinstance(csr_pem, str):
            csr_pem = csr_pem.encode()
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except (ValueError, TypeError):
            raise IdentityError("CSR: not a PEM PKCS#10 certificate request") from None
        try:
            valid = csr.is_signature_valid
            public_key = csr.public_key()
        except (ValueError, TypeError):  # an unsupported key or signature algorithm
            raise IdentityError("CSR: unsupported key or signature algorithm") from None
        if not valid:
            raise IdentityError("CSR: its signature does not verify (it was not signed by its own key)")
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if not isinstance(public_key.curve, _EC_CURVES):
                raise IdentityError(f"CSR: EC curve {public_key.curve.name} is not P-256 or P-384")
        elif isinstance(public_key, rsa.RSAPublicKey):
            if public_key.key_size < _MIN_RSA_BITS:
                raise IdentityError(f"CSR: RSA key of {public_key.key_size} bits (at least {_MIN_RSA_BITS})")
        else:
            raise IdentityError(f"CSR: unsupported key type {type(public_key).__name__}; EC P-256 is expected")
        uri = spiffe_id(self.trust_domain, namespace, service)
        now = self.clock()
        not_after = min(now + self.ttl, self._ca_not_after)  # never past the CA's own end
        serial = x509.random_serial_number()
        is_ec = isinstance(public_key, ec.EllipticCurvePublicKey)
        cert = (
            x509.CertificateBuilder()
            # An empty subject, as Istio's: the identity is the URI SAN alone (then critical, RFC 5280).
            .subject_name(x509.Name([]))
            .issuer_name(self.authority.cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(utc(now - CLOCK_SKEW))
            .not_valid_after(utc(not_after))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=not is_ec,
                                         key_agreement=is_ec, content_commitment=False,
                                         data_encipherment=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self.authority.key, hashes.SHA256())
        )
        return IssuedCertificate(cert.public_bytes(serialization.Encoding.PEM) + self._chain_pem,
                                 uri, not_after, serial)
