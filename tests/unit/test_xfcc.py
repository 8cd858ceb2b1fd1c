"""x-forwarded-client-cert SANITIZE_SET and the RBAC step (sidecar.proxy.authz), with fake streams."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

from sidecar.config import AuthzConfig, AuthzPolicy, PermissionMatch, PrincipalMatch, SecretConfig
from sidecar.proxy.authz import policy_for, xfcc_value
from sidecar.proxy.context import ListenerStats
from sidecar.tls import TlsIdentity
from tests.support.pki import Ca, cert_sha256, spiffe


def stream(*pairs: tuple[bytes, bytes], method: bytes = b"GET", path: bytes = b"/"):
    headers: list[bytes] = []
    for name, value in pairs:
        headers += (name, b": ", value, b"\r\n")
    return SimpleNamespace(headers=headers, method=method, path=path)


def names(s) -> list[bytes]:
    return [s.headers[i] for i in range(0, len(s.headers), 4)]


def identity() -> TlsIdentity:
    ca = Ca()
    w = ca.workload("b")
    ident = TlsIdentity()
    ident.set_pending_key(w.key_pem)
    ident.apply_secrets({"default": SecretConfig("default", certificate_chain=w.chain_pem),
                         "ROOTCA": SecretConfig("ROOTCA", trusted_ca=ca.bundle_pem)})
    return ident


def test_nothing_configured_is_no_policy():
    assert policy_for(False, False, None, TlsIdentity()) is None


def test_sanitize_removes_every_callers_xfcc_in_any_case():
    policy = policy_for(True, False, None, TlsIdentity())
    s = stream((b"a", b"1"), (b"X-Forwarded-Client-Cert", b"By=x"), (b"x-forwarded-client-cert", b"URI=y"), (b"b", b"2"))
    assert policy.admit(s, spiffe("a"), ListenerStats())
    assert names(s) == [b"a", b"b"]


def test_set_uri_on_mtls_only():
    ident = identity()
    policy = policy_for(True, True, None, ident)
    digest = cert_sha256(Ca().workload("a").chain_pem)
    s = stream((b"x-forwarded-client-cert", b"forged"))
    policy.admit(s, spiffe("a"), ListenerStats(), digest)
    value = f"By={spiffe('b')};Hash={digest};URI={spiffe('a')}"
    assert s.headers == [b"x-forwarded-client-cert", b": ", value.encode(), b"\r\n"]
    plain = stream((b"x-forwarded-client-cert", b"forged"), (b"c", b"3"))
    policy.admit(plain, "", ListenerStats())
    assert names(plain) == [b"c"]


def test_xfcc_value_is_by_hash_uri_in_envoys_order():
    der = b"not really a certificate, but hashed as its DER would be"
    digest = hashlib.sha256(der).hexdigest()
    assert xfcc_value(spiffe("b"), digest, spiffe("a")) == f"By={spiffe('b')};Hash={digest};URI={spiffe('a')}"
    # an element with nothing to say is left out, as Envoy leaves By out without a local URI SAN
    assert xfcc_value("", digest, spiffe("a")) == f"Hash={digest};URI={spiffe('a')}"
    assert xfcc_value(spiffe("b"), "", spiffe("a")) == f"By={spiffe('b')};URI={spiffe('a')}"


def test_a_forged_xfcc_is_replaced_by_one_with_the_hash():
    policy = policy_for(True, True, None, identity())
    digest = hashlib.sha256(b"caller").hexdigest()
    s = stream((b"X-Forwarded-Client-Cert", f"By={spiffe('b')};Hash={'0' * 64};URI=spiffe://evil".encode()),
               (b"a", b"1"), (b"x-forwarded-client-cert", b"Hash=forged"))
    assert policy.admit(s, spiffe("a"), ListenerStats(), digest)
    assert names(s) == [b"a", b"x-forwarded-client-cert"]
    assert s.headers[-2] == f"By={spiffe('b')};Hash={digest};URI={spiffe('a')}".encode()
    # plaintext: the forged ones removed, none set (no certificate, so no Hash either)
    plain = stream((b"x-forwarded-client-cert", f"Hash={digest}".encode()))
    assert policy.admit(plain, "", ListenerStats())
    assert plain.headers == []


def test_a_stream_without_xfcc_keeps_its_header_list():
    policy = policy_for(True, False, None, TlsIdentity())
    s = stream((b"a", b"1"))
    before = s.headers
    policy.admit(s, "", ListenerStats())
    assert s.headers is before


def test_rbac_counts_and_refuses():
    table = (AuthzPolicy("rule-0", (PermissionMatch(path_prefixes=(b"/api",)),), (PrincipalMatch(exact=spiffe("a")),)),)
    stats = ListenerStats()
    policy = policy_for(False, False, AuthzConfig("ALLOW", table), TlsIdentity())
    assert policy.admit(stream(path=b"/api/1"), spiffe("a"), stats)
    assert not policy.admit(stream(path=b"/api/1"), "", stats)
    assert (stats.rbac_allowed, stats.rbac_denied) == (1, 1)
