"""The CA (controlplane.ca): workload certificates and bootstrap tokens, without a network."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from controlplane.ca import CAError, Issuer
from controlplane.ca.authority import from_files, from_pem, generate
from meshkeeper.identity import IdentityError
from meshkeeper.registry import is_reserved_root_child

NOW = 1_800_000_000.0


def clock() -> float:
    return NOW


def csr_of(key, subject: str = "", san: str | None = None) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]) if subject else x509.Name([]))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def forged_csr(victim_key, signer_key) -> bytes:
    """The request body of ``victim_key``'s CSR with a signature made by ``signer_key``."""
    body = x509.load_pem_x509_csr(csr_of(victim_key)).tbs_certrequest_bytes
    sig = x509.load_pem_x509_csr(csr_of(signer_key)).signature
    alg = bytes.fromhex("300a06082a8648ce3d040302")  # ecdsa-with-SHA256
    bits = b"\x03" + _der_len(len(sig) + 1) + b"\x00" + sig
    inner = body + alg + bits
    der = b"\x30" + _der_len(len(inner)) + inner
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)


def leaf_of(chain_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain_pem)[0]


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer.generate(trust_domain="example.org", ttl=10, clock=clock)


# -------------------------------------------------------------------- signing


def test_the_certificate_names_only_the_spiffe_id_and_carries_the_csr_key(issuer: Issuer) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    # What the CSR asks for is ignored: another name, another SAN.
    issued = issuer.sign(csr_of(key, "admin", "spiffe://example.org/ns/prod/sa/db"), "shop", "web")
    leaf = leaf_of(issued.chain_pem)
    assert issued.spiffe_id == "spiffe://example.org/ns/shop/sa/web"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [issued.spiffe_id]
    assert len(list(san.value)) == 1
    assert leaf.subject == x509.Name([])
    assert san.critical  # an empty subject makes the SAN critical (RFC 5280)
    assert leaf.public_key() == key.public_key()
    assert leaf.serial_number == issued.serial


def test_validity_window_and_extensions(issuer: Issuer) -> None:
    issued = issuer.sign(csr_of(ec.generate_private_key(ec.SECP256R1())), "shop", "web")
    leaf = leaf_of(issued.chain_pem)
    assert leaf.not_valid_before_utc.timestamp() == NOW - 60
    assert leaf.not_valid_after_utc.timestamp() == NOW + 10 == issued.not_after
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign


def test_the_chain_verifies_against_the_bundle(issuer: Issuer, tmp_path: Path) -> None:
    issued = issuer.sign(csr_of(ec.generate_private_key(ec.SECP256R1())), "shop", "web")
    certs = x509.load_pem_x509_certificates(issued.chain_pem)
    roots = x509.load_pem_x509_certificates(issuer.bundle_pem)
    verifier = (PolicyBuilder().store(Store(roots))
                .time(datetime.datetime.fromtimestamp(NOW, datetime.UTC)).build_client_verifier())
    verified = verifier.verify(certs[0], certs[1:])
    assert verified.subjects == [x509.UniformResourceIdentifier(issued.spiffe_id)]
    # openssl agrees (at the certificate's own time), for both purposes.
    (tmp_path / "chain.pem").write_bytes(issued.chain_pem)
    (tmp_path / "roots.pem").write_bytes(issuer.bundle_pem)
    for purpose in ("sslclient", "sslserver"):
        out = subprocess.run(["openssl", "verify", "-attime", str(int(NOW)), "-purpose", purpose,
                              "-CAfile", str(tmp_path / "roots.pem"), str(tmp_path / "chain.pem")],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr


def test_a_chain_does_not_verify_against_another_ca(issuer: Issuer) -> None:
    issued = issuer.sign(csr_of(ec.generate_private_key(ec.SECP256R1())), "shop", "web")
    other = x509.load_pem_x509_certificates(Issuer.generate(clock=clock).bundle_pem)
    verifier = (PolicyBuilder().store(Store(other))
                .time(datetime.datetime.fromtimestamp(NOW, datetime.UTC)).build_client_verifier())
    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(leaf_of(issued.chain_pem), [])


def test_a_csr_with_a_forged_signature_is_refused(issuer: Issuer) -> None:
    victim, attacker = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(IdentityError, match="signature does not verify"):
        issuer.sign(forged_csr(victim, attacker), "shop", "web")


@pytest.mark.parametrize(("csr", "reason"), [
    (b"", "not a PEM PKCS#10"),
    (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "not a PEM PKCS#10"),
    (lambda: csr_of(ec.generate_private_key(ec.SECP521R1())), "not P-256"),
    (lambda: csr_of(ed25519.Ed25519PrivateKey.generate()), "Ed25519"),
])
def test_bad_csrs_are_refused_with_a_reason(issuer: Issuer, csr, reason: str) -> None:
    pem = csr() if callable(csr) else csr
    with pytest.raises(IdentityError, match=reason):
        issuer.sign(pem, "shop", "web")


def test_names_are_validated(issuer: Issuer) -> None:
    with pytest.raises(IdentityError, match="service"):
        issuer.sign(csr_of(ec.generate_private_key(ec.SECP256R1())), "shop", "Web/x")


def test_certificates_never_outlive_the_ca() -> None:
    issuer = Issuer.generate(ttl=20 * 365 * 86400, clock=clock)
    issued = issuer.sign(csr_of(ec.generate_private_key(ec.SECP256R1())), "shop", "web")
    assert issued.not_after == issuer.authority.cert.not_valid_after_utc.timestamp()


# -------------------------------------------------------------------- tokens


def test_token_round_trip(issuer: Issuer) -> None:
    token = issuer.mint_token("shop", "web")
    assert token.startswith("mk1.shop.web.") and len(token.rsplit(".", 1)[1]) == 43
    assert issuer.verify_token(token) == ("shop", "web")
    assert issuer.verify_token(token + "\n") == ("shop", "web")  # as read from a file


def test_a_token_is_for_one_service_only(issuer: Issuer) -> None:
    mac = issuer.mint_token("shop", "web").rsplit(".", 1)[1]
    for other in (f"mk1.shop.db.{mac}", f"mk1.prod.web.{mac}"):
        with pytest.raises(IdentityError, match="not minted by this CA"):
            issuer.verify_token(other)


@pytest.mark.parametrize("mutate", [
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
    lambda t: t.replace("mk1.", "mk2.", 1),
    lambda t: t.rsplit(".", 1)[0],
    lambda t: t + "=",
    lambda t: "",
    lambda t: "Bearer " + t,
])
def test_a_tampered_token_is_refused(issuer: Issuer, mutate) -> None:
    with pytest.raises(IdentityError):
        issuer.verify_token(mutate(issuer.mint_token("shop", "web")))


def test_another_cas_token_is_refused(issuer: Issuer) -> None:
    other = Issuer.generate(trust_domain="example.org", clock=clock)
    with pytest.raises(IdentityError, match="not minted by this CA"):
        issuer.verify_token(other.mint_token("shop", "web"))


def test_the_same_ca_key_mints_the_same_tokens(issuer: Issuer) -> None:
    # Replicas sharing one CA verify each other's tokens; the TTL and the trust domain do not matter.
    twin = Issuer(issuer.authority, trust_domain="other.org", ttl=99, clock=clock)
    assert twin.verify_token(issuer.mint_token("shop", "web")) == ("shop", "web")
    assert twin.mint_token("shop", "web") == issuer.mint_token("shop", "web")


def test_mint_validates_names(issuer: Issuer) -> None:
    with pytest.raises(IdentityError, match="namespace"):
        issuer.mint_token("a.b", "web")


# -------------------------------------------------------------------- CA from files


def _pem_key(key, password: bytes | None = None) -> bytes:
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _intermediate(root, name: str = "intermediate"):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(root.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(root.cert.not_valid_before_utc).not_valid_after(root.cert.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), critical=False)
            .sign(root.key, hashes.SHA256()))
    return cert, key


def test_an_intermediate_ca_from_files_chains_to_its_root(tmp_path: Path) -> None:
    root = generate("example.org", clock)
    cert, key = _intermediate(root)
    (tmp_path / "ca.pem").write_bytes(_pem(cert))
    (tmp_path / "ca.key").write_bytes(_pem_key(key))
    (tmp_path / "root.pem").write_bytes(root.bundle_pem)
    issuer = Issuer(from_files(str(tmp_path / "ca.pem"), str(tmp_path / "ca.key"), str(tmp_path / "root.pem")),
                    trust_domain="example.org", ttl=10, clock=clock)
    assert issuer.bundle_pem == root.bundle_pem
    issued = issuer.sign(csr_of(ec.generate_private_key(ec.SECP256R1())), "shop", "web")
    certs = x509.load_pem_x509_certificates(issued.chain_pem)
    assert [c.subject for c in certs[1:]] == [cert.subject]  # leaf, intermediate; never the root
    verifier = (PolicyBuilder().store(Store([root.cert]))
                .time(datetime.datetime.fromtimestamp(NOW, datetime.UTC)).build_client_verifier())
    verifier.verify(certs[0], certs[1:])


def test_an_intermediate_without_its_roots_is_refused() -> None:
    cert, key = _intermediate(generate("example.org", clock))
    with pytest.raises(CAError, match="intermediate .* --ca-bundle"):
        from_pem(_pem(cert), _pem_key(key))


def test_ca_files_that_do_not_fit_are_refused_in_one_line(tmp_path: Path) -> None:
    a, b = generate("example.org", clock), generate("example.org", clock)
    with pytest.raises(CAError, match="does not belong to the certificate"):
        from_pem(_pem(a.cert), _pem_key(b.key))
    with pytest.raises(CAError, match="encrypted"):
        from_pem(_pem(a.cert), _pem_key(a.key, b"secret"))
    assert from_pem(_pem(a.cert), _pem_key(a.key, b"secret"), password=b"secret").cert == a.cert
    with pytest.raises(CAError, match="no PEM certificate"):
        from_pem(b"junk", _pem_key(a.key))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    issued = Issuer(a, clock=clock).sign(csr_of(leaf_key), "shop", "web")
    with pytest.raises(CAError, match="not a CA certificate"):
        from_pem(_pem(leaf_of(issued.chain_pem)), _pem_key(leaf_key))
    (tmp_path / "ca.pem").write_bytes(_pem(a.cert))
    with pytest.raises(CAError, match=r"^--ca-key .*missing.key: No such file or directory$"):
        from_files(str(tmp_path / "ca.pem"), str(tmp_path / "missing.key"))


def test_the_ca_znode_is_not_a_namespace() -> None:
    assert is_reserved_root_child("_ca")
