"""The authz and peer-authentication admin RPCs on a real control plane process over real ZooKeeper:
roles, the audit lines on its stderr, and what it writes is what its own registry watch accepts.
(tests/unit/test_admin_security.py has the rest, on an in-process server.)"""

from __future__ import annotations

import json

import grpc
import pytest

from meshkeeper.admin.v1 import admin_pb2 as pb
from meshkeeper.registry import Paths
from tests.harness import wait_until
from tests.integration.test_admin import ORDER, TOKENS, admin_of, register, write_tokens

pytestmark = pytest.mark.integration

FRONTEND = "spiffe://meshkeeper.local/ns/shop/sa/frontend"
POLICY = {"action": "ALLOW", "rules": [{"from": [FRONTEND], "methods": ["GET", "POST"], "paths": ["/"]}]}


@pytest.fixture
def admin_cp(procs, zk_server, tmp_path):
    return procs.controlplane(zk_server.hosts, "--admin-tokens", write_tokens(tmp_path / "tokens"))


def audit_of(cp) -> list[dict]:
    return [json.loads(line.split("audit ", 1)[1]) for line in cp.stderr_text().splitlines()
            if "meshkeeper.controlplane.audit" in line]


def test_role_matrix_of_the_security_rpcs(admin_cp, zk_client, namespace):
    register(zk_client, namespace, "catalog", (7101, "v1"))
    admin = admin_of(admin_cp)
    svc = dict(namespace=namespace, service="catalog")
    # In order, so that each write finds what it needs (a delete: the znode the set before wrote).
    matrix = [
        ("GetAuthz", "viewer", pb.GetAuthzRequest(**svc)),
        ("SetAuthz", "admin", pb.SetAuthzRequest(**svc, json=json.dumps(POLICY))),
        ("DeleteAuthz", "admin", pb.DeleteAuthzRequest(**svc)),
        ("GetPeerAuthentication", "viewer", pb.GetPeerAuthenticationRequest(**svc)),
        ("SetPeerAuthentication", "admin", pb.SetPeerAuthenticationRequest(**svc, mode="STRICT")),
        ("DeletePeerAuthentication", "admin", pb.DeletePeerAuthenticationRequest(**svc)),
    ]
    got, want = {}, {}
    for rpc, least, request in matrix:
        for role in ORDER:
            code = admin.as_(role).code(rpc, request)
            if code == grpc.StatusCode.OK and rpc.startswith("Delete"):  # put it back for the next role
                setter = rpc.replace("Delete", "Set")
                redo = next(r for name, _, r in matrix if name == setter)
                admin.as_("admin").code(setter, redo)
            got[rpc, role] = code
            want[rpc, role] = (grpc.StatusCode.UNAUTHENTICATED if role is None else
                               grpc.StatusCode.OK if ORDER.index(role) >= ORDER.index(least)
                               else grpc.StatusCode.PERMISSION_DENIED)
    assert got == want
    audit = audit_of(admin_cp)
    assert TOKENS["admin"] not in admin_cp.stderr_text()
    refused = [(a["rpc"], a["result"]) for a in audit if a["result"] != "ok"]
    assert refused == [(rpc, result) for rpc, least, _ in matrix if least == "admin"
                       for result in ("unauthenticated", "permission_denied", "permission_denied")]
    ok = [(a["rpc"], a["who"], a["role"]) for a in audit if a["result"] == "ok"]
    assert ("SetAuthz", "ada", "admin") in ok and ("DeletePeerAuthentication", "ada", "admin") in ok


def test_what_the_api_writes_the_registry_watch_accepts(admin_cp, zk_client, namespace):
    register(zk_client, namespace, "catalog", (7102, "v1"))
    register(zk_client, namespace, "orders", (7103, "v1"))
    admin = admin_of(admin_cp, "admin")
    paths = Paths(namespace)
    admin.SetAuthz(pb.SetAuthzRequest(namespace=namespace, service="catalog", json=json.dumps(POLICY)))
    admin.SetPeerAuthentication(pb.SetPeerAuthenticationRequest(namespace=namespace, mode="STRICT"))
    admin.SetPeerAuthentication(pb.SetPeerAuthenticationRequest(namespace=namespace, service="catalog",
                                                                mode="PERMISSIVE"))
    # A bad znode written by hand after them: once the watch has logged it, it has read ours too.
    bad = paths.authz("orders")
    zk_client.create(bad, b'{"action": "ALLOW", "rules": [{"from": ["orders"]}]}')
    wait_until(lambda: f"znode {bad}" in admin_cp.stderr_text(), 10, message="the watch refusing the bad znode")
    refused = [line for line in admin_cp.stderr_text().splitlines() if "skipping bad" in line]
    ours = (paths.authz("catalog"), paths.peer_authentication(), paths.peer_authentication("catalog"))
    assert not [line for line in refused if any(f"znode {p} " in line for p in ours)], refused

    viewer = admin_of(admin_cp, "viewer")
    shown = viewer.GetAuthz(pb.GetAuthzRequest(namespace=namespace, service="orders"))
    assert shown.version == 0 and "authz.rules[0].from[0]" in shown.error
    pa = viewer.GetPeerAuthentication(pb.GetPeerAuthenticationRequest(namespace=namespace, service="orders"))
    assert (pa.mode, pa.effective_mode, pa.effective_from) == ("", "STRICT", "namespace")
    assert [(a["rpc"], a["result"]) for a in audit_of(admin_cp)] == [
        ("SetAuthz", "ok"), ("SetPeerAuthentication", "ok"), ("SetPeerAuthentication", "ok")]
