"""Peer authentication and authz records (meshkeeper.security), InstanceRecord.mtls, their paths."""

from __future__ import annotations

import json

import pytest

from meshkeeper.identity import IdentityError
from meshkeeper.registry import InstanceRecord, Paths, RecordError
from meshkeeper.security import (
    MAX_RULE_ITEMS,
    MAX_RULES,
    AuthzPolicy,
    AuthzRule,
    MeshIdentity,
    PeerAuthentication,
    effective_mode,
)

WEB = "spiffe://meshkeeper.local/ns/default/sa/web"


def enc(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_paths_of_the_three_znodes():
    p = Paths("prod")
    assert p.peer_authentication() == "/meshkeeper/prod/peer_authentication"
    assert p.peer_authentication("catalog") == "/meshkeeper/prod/services/catalog/peer_authentication"
    assert p.authz("catalog") == "/meshkeeper/prod/services/catalog/authz"


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE", "DISABLE"])
def test_peer_authentication_modes_round_trip(mode):
    rec = PeerAuthentication.decode(enc({"mode": mode}))
    assert rec.mode == mode
    assert PeerAuthentication.decode(rec.encode()) == rec


@pytest.mark.parametrize("payload, names", [
    ({"mode": "strict"}, "peer_authentication.mode"),
    ({"mode": 1}, "peer_authentication.mode"),
    ({}, "peer_authentication.mode"),
    ({"mode": "STRICT", "mtls": {}}, "'mtls'"),
    ([], "expected a JSON object"),
])
def test_peer_authentication_refusals_name_the_field(payload, names):
    with pytest.raises(RecordError, match=names.replace(".", r"\.")):
        PeerAuthentication.decode(enc(payload))
    with pytest.raises(RecordError):
        PeerAuthentication.decode(b"{nope")


def test_effective_mode_service_wins_then_namespace_then_permissive():
    strict, disable = PeerAuthentication("STRICT"), PeerAuthentication("DISABLE")
    assert effective_mode(strict, disable) == "STRICT"
    assert effective_mode(None, disable) == "DISABLE"
    assert effective_mode(None, None) == "PERMISSIVE"


def test_authz_decodes_every_part_and_round_trips():
    payload = {"action": "ALLOW", "rules": [
        {"from": [WEB, "ns:prod"], "methods": ["GET", "POST"], "paths": ["/api", "/"]},
        {"methods": ["DELETE"]},
        {},
    ]}
    rec = AuthzPolicy.decode(enc(payload))
    assert rec.action == "ALLOW"
    assert rec.rules == (AuthzRule((WEB, "ns:prod"), ("GET", "POST"), ("/api", "/")),
                         AuthzRule((), ("DELETE",), ()), AuthzRule())
    assert AuthzPolicy.decode(rec.encode()) == rec
    assert hash(rec) == hash(AuthzPolicy.decode(enc(payload)))  # the cache keys on it
    assert AuthzPolicy.decode(enc({"action": "DENY"})).rules == ()


@pytest.mark.parametrize("payload, names", [
    ({"rules": []}, r"authz\.action"),
    ({"action": "allow"}, r"authz\.action"),
    ({"action": "ALLOW", "rule": []}, "'rule'"),
    ({"action": "ALLOW", "rules": {}}, r"authz\.rules"),
    ({"action": "ALLOW", "rules": ["x"]}, r"authz\.rules\[0\]"),
    ({"action": "ALLOW", "rules": [{"form": [WEB]}]}, r"authz\.rules\[0\].*'form'"),
    ({"action": "ALLOW", "rules": [{"from": WEB}]}, r"authz\.rules\[0\]\.from: expected a list"),
    ({"action": "ALLOW", "rules": [{"from": []}]}, r"authz\.rules\[0\]\.from: empty"),
    ({"action": "ALLOW", "rules": [{}, {"from": ["spiffe://x/y"]}]}, r"authz\.rules\[1\]\.from\[0\]"),
    ({"action": "ALLOW", "rules": [{"from": ["spiffe://Bad/ns/a/sa/b"]}]}, r"from\[0\]"),
    ({"action": "ALLOW", "rules": [{"from": [WEB, "ns:Prod"]}]}, r"from\[1\].*namespace"),
    ({"action": "ALLOW", "rules": [{"from": [7]}]}, r"from\[0\]"),
    ({"action": "ALLOW", "rules": [{"methods": ["get"]}]}, r"methods\[0\]"),
    ({"action": "ALLOW", "rules": [{"methods": ["GET", "GE T"]}]}, r"methods\[1\]"),
    ({"action": "ALLOW", "rules": [{"paths": ["api"]}]}, r"paths\[0\]"),
    ({"action": "ALLOW", "rules": [{"paths": ["/a b"]}]}, r"paths\[0\]"),
    ({"action": "ALLOW", "rules": [{"paths": ["/" + "a" * 2000]}]}, r"paths\[0\]"),
    ({"action": "ALLOW", "rules": [{}] * (MAX_RULES + 1)}, r"authz\.rules: .* at most"),
    ({"action": "ALLOW", "rules": [{"methods": ["GET"] * (MAX_RULE_ITEMS + 1)}]}, r"methods: .* at most"),
])
def test_authz_refusals_name_the_field(payload, names):
    with pytest.raises(RecordError, match=names):
        AuthzPolicy.decode(enc(payload))


def test_instance_mtls_is_optional_and_left_out_when_false():
    plain = InstanceRecord.decode(enc({"address": "10.0.0.1", "port": 15006}))
    assert plain.mtls is False
    assert b"mtls" not in plain.encode()  # the encoding of a record without identity is unchanged
    secure = InstanceRecord.decode(enc({"address": "10.0.0.1", "port": 15006, "mtls": True}))
    assert secure.mtls is True
    assert InstanceRecord.decode(secure.encode()) == secure
    with pytest.raises(RecordError, match=r"instance\.mtls"):
        InstanceRecord.decode(enc({"address": "10.0.0.1", "port": 15006, "mtls": "yes"}))


def test_mesh_identity_checks_its_trust_domain():
    assert MeshIdentity("example.org").trust_domain == "example.org"
    with pytest.raises(IdentityError):
        MeshIdentity("Not A Domain")
