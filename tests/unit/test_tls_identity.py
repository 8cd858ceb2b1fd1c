"""TlsIdentity: pairing chains with keys by public key, rotation, NACK of a foreign chain."""

from __future__ import annotations

import ssl

import pytest

from sidecar.config import SecretConfig
from sidecar.server import Server
from sidecar.tls import TlsIdentity, peer_spiffe_id, uri_sans
from sidecar.xds.convert import XdsError
from tests.support.pki import Ca, new_key, spiffe


def secrets(chain: bytes = b"", bundle: bytes = b"") -> dict[str, SecretConfig]:
    out = {}
    if chain:
        out["default"] = SecretConfig("default", certificate_chain=chain)
    if bundle:
        out["ROOTCA"] = SecretConfig("ROOTCA", trusted_ca=bundle)
    return out


@pytest.fixture(scope="module")
def ca() -> Ca:
    return Ca()


def test_no_identity_until_key_chain_and_bundle(ca):
    ident = TlsIdentity()
    assert ident.server_context() is None and ident.client_context(("h2",)) is None
    w = ca.workload("a")
    ident.apply_secrets(secrets(bundle=ca.bundle_pem))  # the bundle alone: still none
    assert ident.server_context() is None and not ident.ready
    ident.set_pending_key(w.key_pem)
    ident.apply_secrets(secrets(chain=w.chain_pem))
    assert ident.ready and not ident.has_pending_key
    assert ident.spiffe_id == spiffe("a")
    assert ident.not_after == w.cert.not_valid_after_utc
    server = ident.server_context()
    assert isinstance(server, ssl.SSLContext) and server.verify_mode == ssl.CERT_REQUIRED
    client = ident.client_context(("h2",))
    assert client.verify_mode == ssl.CERT_REQUIRED and not client.check_hostname
    assert ident.client_context(("h2",)) is client  # cached
    assert ident.client_context(("http/1.1",)) is not client


def test_chain_for_a_foreign_key_is_refused_and_nothing_changes(ca):
    ident = TlsIdentity()
    w = ca.workload("a")
    ident.set_pending_key(w.key_pem)
    ident.apply_secrets(secrets(w.chain_pem, ca.bundle_pem))
    ctx, gen = ident.server_context(), ident.generation
    other = ca.workload("a")  # same name, another key
    with pytest.raises(ValueError, match="key this sidecar does not have"):
        ident.apply_secrets(secrets(other.chain_pem))
    with pytest.raises(ValueError, match="key this sidecar does not have"):  # bundle in the same set: not applied
        ident.apply_secrets(secrets(other.chain_pem, Ca().bundle_pem))
    assert ident.server_context() is ctx and ident.generation == gen and ident.trust_bundle == ca.bundle_pem


def test_chain_before_any_key_is_refused(ca):
    with pytest.raises(ValueError):
        TlsIdentity().apply_secrets(secrets(ca.workload("a").chain_pem, ca.bundle_pem))


def test_rotation_promotes_the_pending_key_and_forgets_the_old(ca):
    ident = TlsIdentity()
    changes = []
    ident.on_change.append(lambda: changes.append(ident.generation))
    first = ca.workload("a")
    ident.set_pending_key(first.key_pem)
    ident.apply_secrets(secrets(first.chain_pem, ca.bundle_pem))
    old_server = ident.server_context()
    second_key = new_key()
    second = ca.workload("a", key=second_key)
    ident.set_pending_key(second.key_pem)
    assert ident.has_pending_key
    # The current certificate again (a SotW re-send) still pairs with the current key.
    ident.apply_secrets(secrets(first.chain_pem))
    assert ident.server_context() is old_server and ident.has_pending_key
    ident.apply_secrets(secrets(second.chain_pem))
    assert not ident.has_pending_key and ident.server_context() is not old_server
    assert ident.certificate_chain == second.chain_pem
    # The old key is gone: its chain is now foreign.
    with pytest.raises(ValueError):
        ident.apply_secrets(secrets(first.chain_pem))
    assert len(changes) == 2


def test_a_second_pending_key_replaces_the_first(ca):
    ident = TlsIdentity()
    a, b = ca.workload("a"), ca.workload("a")
    ident.set_pending_key(a.key_pem)
    ident.set_pending_key(b.key_pem)
    with pytest.raises(ValueError):
        ident.apply_secrets(secrets(a.chain_pem, ca.bundle_pem))
    ident.apply_secrets(secrets(b.chain_pem, ca.bundle_pem))
    assert ident.ready


@pytest.mark.parametrize("bad", [
    {"default": SecretConfig("default", certificate_chain=b"not pem")},
    {"ROOTCA": SecretConfig("ROOTCA", trusted_ca=b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")},
    {"ROOTCA": SecretConfig("ROOTCA")},
    {"default": SecretConfig("default")},
    {"other": SecretConfig("other", trusted_ca=b"x")},
])
def test_malformed_secrets_are_refused(bad):
    ident = TlsIdentity()
    ident.set_pending_key(Ca().workload("a").key_pem)
    with pytest.raises(ValueError):
        ident.apply_secrets(bad)


def test_bad_pending_key():
    with pytest.raises(ValueError):
        TlsIdentity().set_pending_key(b"nonsense")


def test_a_failing_change_callback_does_not_undo_the_change(ca):
    ident = TlsIdentity()
    ident.on_change.append(lambda: 1 / 0)
    ident.apply_secrets(secrets(bundle=ca.bundle_pem))
    assert ident.trust_bundle == ca.bundle_pem


def test_server_apply_secrets_nacks_with_xds_error(ca):
    from meshkeeper.xds import NodeInfo

    server = Server(NodeInfo(node_id="n", service="a", namespace="default"))
    w = ca.workload("a")
    with pytest.raises(XdsError):
        server.apply_secrets(secrets(w.chain_pem, ca.bundle_pem))
    server.tls.set_pending_key(w.key_pem)
    server.apply_secrets(secrets(w.chain_pem, ca.bundle_pem))
    assert server.tls.ready and server.tls.spiffe_id == spiffe("a")


def test_uri_sans_and_peer_id():
    cert = {"subjectAltName": (("DNS", "x"), ("URI", "spiffe://td/ns/a/sa/b"))}
    assert uri_sans(cert) == ("spiffe://td/ns/a/sa/b",)
    assert uri_sans(None) == () and uri_sans({}) == ()

    class Obj:
        def getpeercert(self):
            return cert

    class Tr:
        def __init__(self, obj):
            self.obj = obj

        def get_extra_info(self, name):
            return self.obj if name == "ssl_object" else None

    assert peer_spiffe_id(Tr(Obj())) == "spiffe://td/ns/a/sa/b"
    assert peer_spiffe_id(Tr(None)) == "" and peer_spiffe_id(None) == ""


def test_identity_metrics(ca):
    from meshkeeper.xds import NodeInfo

    server = Server(NodeInfo(node_id="n", service="a"))
    fams = {f.name: f for f in server.stats.collect()}
    assert fams["meshkeeper_identity_ready"].samples[0].value == 0
    w = ca.workload("a")
    server.tls.set_pending_key(w.key_pem)
    server.apply_secrets(secrets(w.chain_pem, ca.bundle_pem))
    fams = {f.name: f for f in server.stats.collect()}
    assert fams["meshkeeper_identity_ready"].samples[0].value == 1
    assert fams["meshkeeper_identity_cert_expiry_timestamp_seconds"].samples[0].value == w.cert.not_valid_after_utc.timestamp()
