"""RBAC evaluation (sidecar.config.AuthzConfig), Envoy's semantics, as a table."""

from __future__ import annotations

import pytest

from sidecar.config import AUTHZ_ALLOW, AUTHZ_DENY, AuthzConfig, AuthzPolicy, PermissionMatch, PrincipalMatch

A = "spiffe://meshkeeper.local/ns/default/sa/a"
B = "spiffe://meshkeeper.local/ns/default/sa/b"
OPS = "spiffe://meshkeeper.local/ns/ops/sa/robot"

# rule-0: a, GET|HEAD under /api; rule-1: anyone from namespace ops, anything; rule-2: anyone, /health
POLICIES = (
    AuthzPolicy("rule-0", (PermissionMatch(frozenset({b"GET", b"HEAD"}), (b"/api",)),), (PrincipalMatch(exact=A),)),
    AuthzPolicy("rule-1", (PermissionMatch(),), (PrincipalMatch(prefix="spiffe://meshkeeper.local/ns/ops/sa/"),)),
    AuthzPolicy("rule-2", (PermissionMatch(path_prefixes=(b"/health",)),), (PrincipalMatch(any=True),)),
)


@pytest.mark.parametrize("method, path, principal, matched", [
    (b"GET", b"/api/x", A, True),
    (b"HEAD", b"/api", A, True),
    (b"POST", b"/api/x", A, False),  # method not listed
    (b"GET", b"/other", A, False),  # path outside the prefix
    (b"GET", b"/other?/api", A, False),  # the query is not the path
    (b"GET", b"/api/x?y=1", A, True),
    (b"GET", b"/api/x", B, False),  # another principal
    (b"GET", b"/api/x", "", False),  # plaintext: no principal
    (b"DELETE", b"/anything", OPS, True),  # namespace prefix, any permission
    (b"DELETE", b"/anything", "spiffe://meshkeeper.local/ns/opsx/sa/y", False),  # prefix ends at the slash
    (b"GET", b"/health", "", True),  # any principal, plaintext included
    (b"GET", b"/healthz", B, True),  # a prefix, as Envoy's path prefix
])
def test_allow_and_deny_are_mirror_images(method, path, principal, matched):
    assert AuthzConfig("ALLOW", POLICIES).allows(method, path, principal) is matched
    assert AuthzConfig("DENY", POLICIES).allows(method, path, principal) is not matched


def test_allow_without_policies_refuses_everything_and_deny_without_policies_allows_everything():
    assert not AuthzConfig("ALLOW").allows(b"GET", b"/", A)
    assert AuthzConfig("DENY").allows(b"GET", b"/", A)


def test_permissions_and_principals_are_ored():
    policy = AuthzPolicy("p", (PermissionMatch(frozenset({b"GET"})), PermissionMatch(path_prefixes=(b"/w", b"/x"))),
                         (PrincipalMatch(exact=A), PrincipalMatch(exact=B)))
    cfg = AuthzConfig("ALLOW", (policy,))
    assert cfg.allows(b"GET", b"/", B)
    assert cfg.allows(b"POST", b"/x1", A)
    assert not cfg.allows(b"POST", b"/y", A)
    assert not cfg.allows(b"GET", b"/", OPS)


@pytest.mark.parametrize("sent", [b"/admin", b"//admin", b"/./admin", b"/x/../admin", b"/%61dmin", b"/%2e%2e/admin",
                                  b"/public/../admin?next=/public", b"/admin/", b"/admin/."])
def test_a_deny_of_a_path_is_not_dodged_by_spelling_it_otherwise(sent):
    from sidecar.proxy.authz import normalized_path

    deny = AuthzConfig(AUTHZ_DENY, (AuthzPolicy("rule-0", (PermissionMatch(path_prefixes=(b"/admin",)),), (PrincipalMatch(any=True),)),))
    allow = AuthzConfig(AUTHZ_ALLOW, (AuthzPolicy("rule-0", (PermissionMatch(path_prefixes=(b"/public",)),), (PrincipalMatch(any=True),)),))
    assert not deny.allows(b"GET", normalized_path(sent), "")
    assert not allow.allows(b"GET", normalized_path(sent), "")


def test_path_normalization_keeps_what_rfc_3986_keeps():
    from sidecar.proxy.authz import normalized_path

    assert normalized_path(b"/a/b/../c/./d?x=/../y") == b"/a/c/d"
    assert normalized_path(b"/../..") == b"/"
    assert normalized_path(b"/%2Fadmin") == b"/%2Fadmin"  # an encoded slash is not a separator (Envoy's default)
    assert normalized_path(b"/caf%C3%A9/%7Euser") == b"/caf%C3%A9/~user"  # only unreserved characters decode
