"""The CA's own certificate and key (docs/identity.md, "The certificate authority").

An :class:`Authority` is what signs: the signing certificate and its key, the certificates that
go after a leaf in its chain (intermediates up to, not including, the root), and the trust bundle
sidecars get as ``ROOTCA``. It comes from files (``--ca-cert/--ca-key[/--ca-bundle]``: a real PKI)
or is generated here, self-signed (shared by the replicas through ZooKeeper, controlplane.ca.shared).
Nothing here reads flags or ZooKeeper.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

Clock = Callable[[], float]  # seconds since the epoch (time.time); injected by tests

CA_VALIDITY = 10 * 365 * 86400.0  # a generated CA: 10 years
CLOCK_SKEW = 60.0  # not_before is this far in the past, for peers whose clocks are behind


class CAError(ValueError):
    """A CA that cannot be used; the message is one line naming the file or znode and why."""


SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: SigningKey
    chain: tuple[x509.Certificate, ...]  # after the leaf: the signing cert and its intermediates
    bundle_pem: bytes                    # the roots sidecars trust (ROOTCA)

    def key_der(self) -> bytes:
        """The private key as unencrypted PKCS#8 DER: what bootstrap-token keys derive from."""
        return self.key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()


def utc(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, datetime.UTC)


def generate(trust_domain: str, clock: Clock) -> Authority:
    """A new self-signed CA: EC P-256, ``O=<trust domain>``, 10 years."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
    now = clock()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(utc(now - CLOCK_SKEW))
        .not_valid_after(utc(now + CA_VALIDITY))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key, (cert,), cert.public_bytes(serialization.Encoding.PEM))


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CAError(f"{flag} {path}: {exc.strerror}") from None


def _certs(flag: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise CAError(f"{flag} {path}: no PEM certificate in it")
    return certs


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def from_pem(cert_pem: bytes, key_pem: bytes, bundle_pem: bytes | None = None,
             password: bytes | None = None, *, names: tuple[str, str, str] = ("--ca-cert", "--ca-key", "--ca-bundle"),
             paths: tuple[str, str, str] = ("", "", ""), require_roots: bool = True) -> Authority:
    """An Authority from PEM: ``cert_pem`` is the signing certificate, optionally followed by its
    intermediates; ``bundle_pem`` the roots (required when the signing certificate is not
    self-signed, unless ``require_roots`` is False: for what only mints tokens, the bundle is then
    empty). ``names``/``paths`` only word the errors."""
    cert_flag, key_flag, bundle_flag = names
    cert_path, key_path, bundle_path = paths
    certs = _certs(cert_flag, cert_path, cert_pem)
    cert = certs[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=password)
    except TypeError:
        raise CAError(f"{key_flag} {key_path}: the key is encrypted: give its passphrase "
                      "(--ca-passphrase-file or MESHKEEPER_CA_PASSPHRASE)") from None
    except ValueError:
        raise CAError(f"{key_flag} {key_path}: not a PEM private key, or the passphrase is wrong") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CAError(f"{key_flag} {key_path}: an EC or RSA key is needed, not {type(key).__name__}")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise CAError(f"{key_flag} {key_path}: this key does not belong to the certificate of {cert_flag} {cert_path}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CAError(f"{cert_flag} {cert_path}: {cert.subject.rfc4514_string() or 'the certificate'} "
                      "is not a CA certificate (basicConstraints CA:TRUE)")
    if bundle_pem is not None:
        _certs(bundle_flag, bundle_path, bundle_pem)
        bundle = bundle_pem
    elif _is_self_signed(certs[-1]):
        bundle = certs[-1].public_bytes(serialization.Encoding.PEM)
    elif not require_roots:
        bundle = b""
    else:
        raise CAError(f"{cert_flag} {cert_path}: {cert.subject.rfc4514_string()} is an intermediate "
                      f"(issued by {certs[-1].issuer.rfc4514_string()}): give the roots with {bundle_flag}")
    # The chain after a leaf: the signing certificate and its intermediates, never a root.
    chain = tuple(c for c in certs if c is cert or not _is_self_signed(c))
    return Authority(cert, key, chain, bundle)


def from_files(cert_path: str, key_path: str, bundle_path: str | None = None,
               password: bytes | None = None, require_roots: bool = True) -> Authority:
    return from_pem(_read("--ca-cert", cert_path), _read("--ca-key", key_path),
                    _read("--ca-bundle", bundle_path) if bundle_path else None, password,
                    paths=(cert_path, key_path, bundle_path or ""), require_roots=require_roots)
