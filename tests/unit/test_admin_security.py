"""The authz and peer-authentication RPCs (GetAuthz/SetAuthz/DeleteAuthz,
Get/Set/DeletePeerAuthentication) and ``meshkeeper authz`` / ``meshkeeper peer-auth``: the real
AdminService on a real gRPC server over a real ZooKeeper (the session's, a namespace per test), the
CLI in-process."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.admin import MAX_AUTHZ_BYTES, AdminService
from controlplane.admin import add_to_server as add_admin_to_server
from controlplane.auth import Authorizer, TokenFile
from controlplane.events import EventBus
from controlplane.proxies import ProxyRegistry
from controlplane.zkstore import ZkStore
from meshkeeper import security
from meshkeeper.admin.v1 import admin_pb2 as pb
from meshkeeper.admin.v1 import admin_pb2_grpc
from meshkeeper.cli import main as cli_main
from meshkeeper.ctl.main import PEER_AUTH_MODES
from meshkeeper.registry import Paths, ServiceRecord
from meshkeeper.security import AuthzPolicy, PeerAuthentication

TOKENS = {"admin": "admin-token-0123456789", "operator": "operator-token-0123456789",
          "viewer": "viewer-token-0123456789"}
NAMES = {"admin": "ada", "operator": "otto", "viewer": "vera"}
FRONTEND = "spiffe://example.org/ns/shop/sa/frontend"
POLICY = {"action": "ALLOW", "rules": [{"from": [FRONTEND, "ns:ops"], "methods": ["GET"], "paths": ["/api/"]}]}
AUDIT = "meshkeeper.controlplane.audit"


class Served:
    """An AdminService on 127.0.0.1:<port 0> over ``ZkStore(kz)``, its loop on a thread of its own."""

    def __init__(self, kz: Any, auth: Authorizer) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.events = EventBus()
        self.admin = AdminService(ZkStore(kz), auth, proxies=ProxyRegistry(), events=self.events)

        async def start() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server()
            add_admin_to_server(server, self.admin)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        self.server, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.cp = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.cp)
        self.stub = admin_pb2_grpc.AdminServiceStub(self.channel)

    def call(self, role: str | None, rpc: str, request: Any) -> Any:
        metadata = () if role is None else (("authorization", f"Bearer {TOKENS[role]}"),)
        return getattr(self.stub, rpc)(request, metadata=metadata, timeout=10)

    def code(self, role: str | None, rpc: str, request: Any) -> tuple[grpc.StatusCode, str]:
        try:
            self.call(role, rpc, request)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
        return grpc.StatusCode.OK, ""

    def close(self) -> None:
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def served(tmp_path: Path, zk_client: Any) -> Iterator[Served]:
    path = tmp_path / "tokens"
    path.write_text("".join(f"{TOKENS[r]} {NAMES[r]} {r}\n" for r in TOKENS))
    s = Served(zk_client, Authorizer(TokenFile(str(path))))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def ns(namespace: str, zk_client: Any) -> str:
    """A namespace with the service ``catalog`` registered (no instances: the RPCs need none)."""
    paths = Paths(namespace)
    zk_client.create(paths.service("catalog"), ServiceRecord().encode(), makepath=True)
    return namespace


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage().split("audit ", 1)[1]) for r in caplog.records if r.name == AUDIT]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def drain(sub: Any) -> list[pb.Event]:
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait())
    return out


# --------------------------------------------------------------------------- authz over gRPC


def test_authz_set_get_delete_round_trip_with_audit_and_events(served: Served, ns: str, zk_client, caplog) -> None:
    caplog.set_level("INFO", logger=AUDIT)
    sub = served.events.subscribe(ns, ["admin_write"])
    req = dict(namespace=ns, service="catalog")
    path = Paths(ns).authz("catalog")

    none = served.call("viewer", "GetAuthz", pb.GetAuthzRequest(**req))
    assert (none.json, none.version, none.error) == ("", -1, "")

    got = served.call("admin", "SetAuthz", pb.SetAuthzRequest(**req, json=json.dumps(POLICY), expected_version=-1))
    assert (json.loads(got.json), got.version) == (POLICY, 0)
    # What the control plane's watch reads: the znode decodes with its own decoder.
    data, stat = zk_client.get(path)
    assert AuthzPolicy.decode(data) == AuthzPolicy.decode(json.dumps(POLICY)) and stat.version == 0

    deny = {"action": "DENY", "rules": [{"paths": ["/admin"]}]}
    got = served.call("admin", "SetAuthz", pb.SetAuthzRequest(**req, json=json.dumps(deny), expected_version=0))
    assert (json.loads(got.json), got.version) == (deny, 1)
    read = served.call("viewer", "GetAuthz", pb.GetAuthzRequest(**req))
    assert (json.loads(read.json), read.version) == (deny, 1)

    gone = served.call("admin", "DeleteAuthz", pb.DeleteAuthzRequest(**req, expected_version=1))
    assert (gone.json, gone.version) == ("", -1)
    assert zk_client.exists(path) is None
    assert served.call("viewer", "GetAuthz", pb.GetAuthzRequest(**req)).version == -1

    audit = audit_lines(caplog)
    assert [(a["rpc"], a["who"], a["role"], a["result"], a["path"]) for a in audit] == [
        ("SetAuthz", "ada", "admin", "ok", path), ("SetAuthz", "ada", "admin", "ok", path),
        ("DeleteAuthz", "ada", "admin", "ok", path)]
    assert (audit[0]["before"], audit[0]["after"], audit[0]["expected_version"]) == (None, POLICY, -1)
    assert (audit[1]["before"], audit[1]["after"]) == (POLICY, deny)
    assert (audit[2]["before"], audit[2]["after"], audit[2]["version"]) == (deny, None, -1)

    events = drain(sub)
    assert [(e.who, e.service) for e in events] == [("ada", "catalog")] * 3
    assert events[0].summary == "SetAuthz authz of catalog: ALLOW, 1 rule by ada"
    assert (events[0].before, json.loads(events[0].after)) == ("", POLICY)
    assert events[2].summary == "DeleteAuthz authz of catalog deleted by ada" and events[2].after == ""


@pytest.mark.parametrize(("body", "field"), [
    ({"action": "MAYBE"}, "authz.action: 'MAYBE' is not one of ALLOW, DENY"),
    ({"action": "ALLOW", "rule": []}, "authz: unknown field 'rule'"),
    ({"action": "ALLOW", "rules": [{"from": [FRONTEND], "method": ["GET"]}]}, "authz.rules[0]: unknown field 'method'"),
    ({"action": "ALLOW", "rules": [{"from": [FRONTEND, "frontend"]}]}, "authz.rules[0].from[1]"),
    ({"action": "DENY", "rules": [{"methods": ["get"]}]}, "authz.rules[0].methods[0]: 'get'"),
    ({"action": "DENY", "rules": [{"paths": ["admin"]}]}, "authz.rules[0].paths[0]: 'admin' is not a path prefix"),
    ({"action": "DENY", "rules": [{"paths": []}]}, "authz.rules[0].paths: empty"),
])
def test_an_invalid_authz_is_refused_naming_the_field_and_nothing_is_written(
        served: Served, ns: str, zk_client, caplog, body: dict, field: str) -> None:
    caplog.set_level("INFO", logger=AUDIT)
    req = dict(namespace=ns, service="catalog")
    path = Paths(ns).authz("catalog")
    served.call("admin", "SetAuthz", pb.SetAuthzRequest(**req, json=json.dumps(POLICY)))
    code, details = served.code("admin", "SetAuthz", pb.SetAuthzRequest(**req, json=json.dumps(body)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details, details
    data, stat = zk_client.get(path)
    assert (json.loads(data), stat.version) == (POLICY, 0)  # the old one stays, untouched
    assert [(a["rpc"], a["result"]) for a in audit_lines(caplog)] == [("SetAuthz", "ok"), ("SetAuthz", "invalid")]
    assert field in audit_lines(caplog)[1]["error"]


def test_more_refusals_write_nothing(served: Served, ns: str, zk_client) -> None:
    req = dict(namespace=ns, service="catalog")
    cases = [
        (pb.SetAuthzRequest(**req, json=""), grpc.StatusCode.INVALID_ARGUMENT, "json: required"),
        (pb.SetAuthzRequest(**req, json="{not json"), grpc.StatusCode.INVALID_ARGUMENT, "authz: not valid JSON"),
        (pb.SetAuthzRequest(**req, json="[]"), grpc.StatusCode.INVALID_ARGUMENT, "expected a JSON object"),
        (pb.SetAuthzRequest(namespace=ns, service="nope", json=json.dumps(POLICY)), grpc.StatusCode.NOT_FOUND,
         f"service 'nope' is not registered in namespace '{ns}'"),
        (pb.SetAuthzRequest(namespace=ns, service="Bad_Name", json=json.dumps(POLICY)),
         grpc.StatusCode.INVALID_ARGUMENT, "lowercase DNS label"),
        (pb.SetAuthzRequest(namespace=ns, json=json.dumps(POLICY)), grpc.StatusCode.INVALID_ARGUMENT, "service: required"),
        (pb.SetAuthzRequest(**req, json=json.dumps(POLICY), expected_version=-2), grpc.StatusCode.INVALID_ARGUMENT,
         "expected_version: -2"),
    ]
    for request, code, text in cases:
        got, details = served.code("admin", "SetAuthz", request)
        assert got == code and text in details, (request, got, details)
    assert zk_client.exists(Paths(ns).authz("catalog")) is None
    assert zk_client.exists(Paths(ns).service("nope")) is None  # never created as a side effect
    assert served.code("viewer", "GetAuthz", pb.GetAuthzRequest(namespace=ns, service="nope"))[0] == \
        grpc.StatusCode.NOT_FOUND
    assert served.code("admin", "DeleteAuthz", pb.DeleteAuthzRequest(**req)) == (
        grpc.StatusCode.NOT_FOUND, f"catalog has no authz policy in namespace '{ns}'")


def test_authz_on_a_tcp_service_is_refused_as_it_would_not_be_enforced(served: Served, ns: str, zk_client) -> None:
    zk_client.create(Paths(ns).service("cache"), ServiceRecord(protocol="tcp").encode())
    code, details = served.code("admin", "SetAuthz", pb.SetAuthzRequest(namespace=ns, service="cache",
                                                                        json=json.dumps(POLICY)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "cache is a tcp service" in details, details
    assert zk_client.exists(Paths(ns).authz("cache")) is None


def test_an_authz_too_large_for_a_znode_is_refused(served: Served, ns: str, zk_client) -> None:
    rules = [{"paths": [f"/{r}/{i}/" + "x" * 1000 for i in range(64)]} for r in range(10)]
    body = json.dumps({"action": "DENY", "rules": rules})
    AuthzPolicy.decode(body)  # valid as a record: the size is the admin API's limit
    code, details = served.code("admin", "SetAuthz", pb.SetAuthzRequest(namespace=ns, service="catalog", json=body))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"at most {MAX_AUTHZ_BYTES}" in details, details
    assert zk_client.exists(Paths(ns).authz("catalog")) is None


def test_versions_conflict_with_aborted_and_change_nothing(served: Served, ns: str, zk_client, caplog) -> None:
    caplog.set_level("INFO", logger=AUDIT)
    req = dict(namespace=ns, service="catalog")
    body = json.dumps(POLICY)
    served.call("admin", "SetAuthz", pb.SetAuthzRequest(**req, json=body))  # version 0
    served.call("admin", "SetAuthz", pb.SetAuthzRequest(**req, json=body))  # version 1
    deny = json.dumps({"action": "DENY"})
    for request, text in ((pb.SetAuthzRequest(**req, json=deny, expected_version=0), "is at version 1, not 0"),
                          (pb.SetAuthzRequest(**req, json=deny, expected_version=-1), "exists (version 1)"),
                          (pb.DeleteAuthzRequest(**req, expected_version=0), "is at version 1, not 0")):
        rpc = "SetAuthz" if isinstance(request, pb.SetAuthzRequest) else "DeleteAuthz"
        code, details = served.code("admin", rpc, request)
        assert code == grpc.StatusCode.ABORTED and text in details, details
    data, stat = zk_client.get(Paths(ns).authz("catalog"))
    assert (json.loads(data), stat.version) == (POLICY, 1)
    pa = dict(namespace=ns, service="")
    served.call("admin", "SetPeerAuthentication", pb.SetPeerAuthenticationRequest(**pa, mode="STRICT"))
    for rpc, request in (("SetPeerAuthentication", pb.SetPeerAuthenticationRequest(**pa, mode="DISABLE",
                                                                                     expected_version=-1)),
                         ("DeletePeerAuthentication", pb.DeletePeerAuthenticationRequest(**pa, expected_version=3))):
        assert served.code("admin", rpc, request)[0] == grpc.StatusCode.ABORTED
    assert PeerAuthentication.decode(zk_client.get(Paths(ns).peer_authentication())[0]).mode == "STRICT"
    results = [(a["rpc"], a["result"]) for a in audit_lines(caplog)]
    assert results == [("SetAuthz", "ok"), ("SetAuthz", "ok"), ("SetAuthz", "aborted"), ("SetAuthz", "aborted"),
                       ("DeleteAuthz", "aborted"), ("SetPeerAuthentication", "ok"),
                       ("SetPeerAuthentication", "aborted"), ("DeletePeerAuthentication", "aborted")]


def test_roles_viewers_read_and_only_admins_write(served: Served, ns: str, zk_client, caplog) -> None:
    caplog.set_level("INFO", logger=AUDIT)
    req = dict(namespace=ns, service="catalog")
    writes = [("SetAuthz", pb.SetAuthzRequest(**req, json=json.dumps(POLICY))),
              ("DeleteAuthz", pb.DeleteAuthzRequest(**req)),
              ("SetPeerAuthentication", pb.SetPeerAuthenticationRequest(**req, mode="STRICT")),
              ("SetPeerAuthentication", pb.SetPeerAuthenticationRequest(namespace=ns, mode="STRICT")),
              ("DeletePeerAuthentication", pb.DeletePeerAuthenticationRequest(**req))]
    reads = [("GetAuthz", pb.GetAuthzRequest(**req)), ("GetPeerAuthentication", pb.GetPeerAuthenticationRequest(**req)),
             ("GetPeerAuthentication", pb.GetPeerAuthenticationRequest(namespace=ns))]
    for role in ("viewer", "operator"):
        for rpc, request in writes:
            code, details = served.code(role, rpc, request)
            assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details, (role, rpc, details)
    for rpc, request in writes[:1] + reads:
        assert served.code(None, rpc, request)[0] == grpc.StatusCode.UNAUTHENTICATED
    for rpc, request in reads:
        assert served.code("viewer", rpc, request)[0] == grpc.StatusCode.OK
    assert zk_client.exists(Paths(ns).authz("catalog")) is None
    assert zk_client.exists(Paths(ns).peer_authentication("catalog")) is None
    assert zk_client.exists(Paths(ns).peer_authentication()) is None
    audit = audit_lines(caplog)  # every refused write is a line; refused reads are not
    assert [(a["rpc"], a["result"]) for a in audit] == (
        [(rpc, "permission_denied") for rpc, _ in writes] * 2 + [("SetAuthz", "unauthenticated")])
    assert all("who" not in a for a in audit)
    for rpc, request in writes:  # and an admin may
        assert served.code("admin", rpc, request)[0] == grpc.StatusCode.OK, rpc


def test_a_stored_authz_that_does_not_validate_is_shown_with_the_reason(served: Served, ns: str, zk_client) -> None:
    zk_client.create(Paths(ns).authz("catalog"), b'{"action": "ALLOW", "extra": 1}')
    got = served.call("viewer", "GetAuthz", pb.GetAuthzRequest(namespace=ns, service="catalog"))
    assert (got.json, got.version) == ('{"action": "ALLOW", "extra": 1}', 0)
    assert "authz: unknown field 'extra'" in got.error
    # Replacing it is an ordinary write.
    fixed = served.call("admin", "SetAuthz", pb.SetAuthzRequest(namespace=ns, service="catalog",
                                                                json=json.dumps(POLICY), expected_version=0))
    assert (json.loads(fixed.json), fixed.version, fixed.error) == (POLICY, 1, "")


# --------------------------------------------------------------------------- peer authentication over gRPC


def test_peer_authentication_of_a_namespace_and_of_a_service(served: Served, ns: str, zk_client, caplog) -> None:
    caplog.set_level("INFO", logger=AUDIT)
    sub = served.events.subscribe(ns, ["admin_write"])
    svc_req = dict(namespace=ns, service="catalog")
    ns_req = dict(namespace=ns)

    def get(**req: str) -> tuple:
        p = served.call("viewer", "GetPeerAuthentication", pb.GetPeerAuthenticationRequest(**req))
        return p.mode, p.version, p.effective_mode, p.effective_from

    assert get(**svc_req) == ("", -1, "PERMISSIVE", "default")
    assert get(**ns_req) == ("", -1, "PERMISSIVE", "default")

    got = served.call("admin", "SetPeerAuthentication", pb.SetPeerAuthenticationRequest(**ns_req, mode="STRICT"))
    assert (got.service, got.mode, got.version, got.effective_mode, got.effective_from) == (
        "", "STRICT", 0, "STRICT", "namespace")
    assert PeerAuthentication.decode(zk_client.get(Paths(ns).peer_authentication())[0]).mode == "STRICT"
    assert get(**svc_req) == ("", -1, "STRICT", "namespace")

    got = served.call("admin", "SetPeerAuthentication",
                      pb.SetPeerAuthenticationRequest(**svc_req, mode="PERMISSIVE", expected_version=-1))
    assert (got.mode, got.version, got.effective_mode, got.effective_from) == ("PERMISSIVE", 0, "PERMISSIVE", "service")
    assert PeerAuthentication.decode(zk_client.get(Paths(ns).peer_authentication("catalog"))[0]).mode == "PERMISSIVE"

    got = served.call("admin", "DeletePeerAuthentication", pb.DeletePeerAuthenticationRequest(**svc_req))
    assert (got.mode, got.version, got.effective_mode, got.effective_from) == ("", -1, "STRICT", "namespace")
    got = served.call("admin", "DeletePeerAuthentication", pb.DeletePeerAuthenticationRequest(**ns_req,
                                                                                             expected_version=0))
    assert (got.mode, got.version, got.effective_mode, got.effective_from) == ("", -1, "PERMISSIVE", "default")
    assert zk_client.exists(Paths(ns).peer_authentication()) is None
    code, details = served.code("admin", "DeletePeerAuthentication", pb.DeletePeerAuthenticationRequest(**ns_req))
    assert code == grpc.StatusCode.NOT_FOUND and f"namespace {ns} has no peer authentication" in details

    audit = audit_lines(caplog)
    assert [(a["rpc"], a["service"], a["path"], a["result"]) for a in audit] == [
        ("SetPeerAuthentication", "", Paths(ns).peer_authentication(), "ok"),
        ("SetPeerAuthentication", "catalog", Paths(ns).peer_authentication("catalog"), "ok"),
        ("DeletePeerAuthentication", "catalog", Paths(ns).peer_authentication("catalog"), "ok"),
        ("DeletePeerAuthentication", "", Paths(ns).peer_authentication(), "ok"),
        ("DeletePeerAuthentication", "", Paths(ns).peer_authentication(), "not_found")]
    assert (audit[0]["before"], audit[0]["after"], audit[0]["who"]) == (None, {"mode": "STRICT"}, "ada")
    assert [e.summary for e in drain(sub)] == [
        f"SetPeerAuthentication peer authentication of namespace {ns}: STRICT by ada",
        "SetPeerAuthentication peer authentication of catalog: PERMISSIVE by ada",
        "DeletePeerAuthentication peer authentication of catalog deleted by ada",
        f"DeletePeerAuthentication peer authentication of namespace {ns} deleted by ada"]


def test_peer_authentication_refusals_name_the_field_and_write_nothing(served: Served, ns: str, zk_client) -> None:
    cases = [
        (pb.SetPeerAuthenticationRequest(namespace=ns, mode="strict"), grpc.StatusCode.INVALID_ARGUMENT,
         "peer_authentication.mode: 'strict' is not one of STRICT, PERMISSIVE, DISABLE"),
        (pb.SetPeerAuthenticationRequest(namespace=ns, service="catalog"), grpc.StatusCode.INVALID_ARGUMENT,
         "peer_authentication.mode: '' is not one of"),
        (pb.SetPeerAuthenticationRequest(namespace=ns, service="nope", mode="STRICT"), grpc.StatusCode.NOT_FOUND,
         "service 'nope' is not registered"),
        (pb.SetPeerAuthenticationRequest(namespace="Bad.NS", mode="STRICT"), grpc.StatusCode.INVALID_ARGUMENT,
         "namespace"),
    ]
    for request, code, text in cases:
        got, details = served.code("admin", "SetPeerAuthentication", request)
        assert got == code and text in details, (request, got, details)
    assert zk_client.exists(Paths(ns).peer_authentication()) is None
    assert zk_client.exists(Paths(ns).peer_authentication("catalog")) is None
    assert zk_client.exists(Paths(ns).service("nope")) is None
    assert served.code("viewer", "GetPeerAuthentication",
                       pb.GetPeerAuthenticationRequest(namespace=ns, service="nope"))[0] == grpc.StatusCode.NOT_FOUND


def test_a_stored_peer_authentication_that_does_not_validate(served: Served, ns: str, zk_client) -> None:
    zk_client.create(Paths(ns).peer_authentication(), b'{"mode": "STRICT"}', makepath=True)
    zk_client.create(Paths(ns).peer_authentication("catalog"), b'{"mode": "MUTUAL"}')
    got = served.call("viewer", "GetPeerAuthentication", pb.GetPeerAuthenticationRequest(namespace=ns,
                                                                                         service="catalog"))
    # The control plane skips the bad record: the namespace's mode applies.
    assert (got.mode, got.version, got.effective_mode, got.effective_from) == ("", 0, "STRICT", "namespace")
    assert "peer_authentication.mode: 'MUTUAL'" in got.error


def test_the_cli_keeps_its_modes_in_step_with_the_schema() -> None:
    assert PEER_AUTH_MODES == security.MODES


# --------------------------------------------------------------------------- the CLI


def cli(served: Served, role: str = "admin") -> tuple[str, ...]:
    return ("--cp", served.cp, "--token", TOKENS[role])


def test_cli_authz_set_get_delete(served: Served, ns: str, zk_client, tmp_path: Path, capsys) -> None:
    f = tmp_path / "authz.yaml"
    f.write_text(f"action: ALLOW\nrules:\n- from: [{FRONTEND}, 'ns:ops']\n  methods: [GET]\n  paths: [/api/]\n")
    code, out, err = run(capsys, "authz", "set", "catalog", "-n", ns, "-f", str(f), "--if-version", "-1", *cli(served))
    assert code == 0, err
    assert out.startswith(f"# catalog.{ns}: authz version 0\n") and "action: ALLOW" in out
    assert json.loads(zk_client.get(Paths(ns).authz("catalog"))[0]) == POLICY

    code, out, err = run(capsys, "authz", "get", "catalog", "-n", ns, "-o", "json", *cli(served, "viewer"))
    assert code == 0, err
    doc = json.loads(out)
    assert (json.loads(doc["json"]), doc["version"], doc["service"]) == (POLICY, 0, "catalog")

    code, out, err = run(capsys, "ctl", "authz", "delete", "catalog", "-n", ns, *cli(served))
    assert (code, out) == (0, "") and "deleted" in err
    code, out, err = run(capsys, "authz", "get", "catalog", "-n", ns, *cli(served, "viewer"))
    assert code == 0 and "no authz policy, every caller is allowed" in out


def test_cli_peer_auth_set_get_delete(served: Served, ns: str, zk_client, capsys) -> None:
    code, out, err = run(capsys, "peer-auth", "set", "-n", ns, "--mode", "strict", *cli(served))
    assert code == 0, err
    assert out.split("\n")[0].split() == ["NAMESPACE", "SERVICE", "MODE", "VERSION", "EFFECTIVE", "FROM"]
    assert out.split("\n")[1].split() == [ns, "-", "STRICT", "0", "STRICT", "namespace"]
    code, out, err = run(capsys, "peer-auth", "get", "catalog", "-n", ns, *cli(served, "viewer"))
    assert code == 0 and out.split("\n")[1].split() == [ns, "catalog", "-", "-", "STRICT", "namespace"]
    code, out, err = run(capsys, "peer-auth", "set", "catalog", "-n", ns, "--mode", "DISABLE", "-o", "json",
                         *cli(served))
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["mode"], doc["effective_mode"], doc["effective_from"], doc["version"]) == (
        "DISABLE", "DISABLE", "service", 0)
    code, out, err = run(capsys, "peer-auth", "delete", "catalog", "-n", ns, "--if-version", "0", *cli(served))
    assert code == 0 and out.split("\n")[1].split() == [ns, "catalog", "-", "-", "STRICT", "namespace"]
    assert zk_client.exists(Paths(ns).peer_authentication("catalog")) is None


@pytest.mark.parametrize(("argv", "text"), [
    (["authz"], "required"),
    (["authz", "set", "catalog"], "-f/--filename"),
    (["authz", "get"], "SVC"),
    (["authz", "set", "catalog", "-f", "x", "--if-version", "soon"], "not a version"),
    (["authz", "frob", "catalog"], "invalid choice"),
    (["peer-auth", "set", "catalog"], "--mode"),
    (["peer-auth", "set", "--mode", "MUTUAL"], "invalid choice: 'MUTUAL'"),
    (["peer-auth", "get", "a", "b"], "unrecognized arguments"),
])
def test_cli_usage_mistakes_are_one_line(capsys, argv: list[str], text: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and text in err, err


def test_cli_refusals_are_one_line(served: Served, ns: str, zk_client, tmp_path: Path, capsys) -> None:
    bad_field = tmp_path / "bad.yaml"
    bad_field.write_text("action: ALLOW\nrules:\n- from: [frontend]\n")
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("action: [ALLOW\n")
    a_list = tmp_path / "list.json"
    a_list.write_text("[1, 2]")
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(POLICY))
    cases = [
        (["authz", "set", "catalog", "-f", str(bad_field)], "admin", "authz.rules[0].from[0]"),
        (["authz", "set", "catalog", "-f", str(not_yaml)], "admin", "not valid YAML or JSON"),
        (["authz", "set", "catalog", "-f", str(a_list)], "admin", "a mapping of fields, not a list"),
        (["authz", "set", "catalog", "-f", str(empty)], "admin", "is empty"),
        (["authz", "set", "catalog", "-f", str(tmp_path / "missing.yaml")], "admin", "cannot read"),
        (["authz", "set", "catalog", "-f", str(good)], "operator", "PERMISSION_DENIED"),
        (["authz", "set", "nope", "-f", str(good)], "admin", "'nope' is not registered"),
        (["authz", "set", "Bad_Name", "-f", str(good)], "admin", "lowercase DNS label"),
        (["authz", "delete", "catalog"], "admin", "has no authz policy"),
        (["peer-auth", "delete"], "admin", "has no peer authentication"),
        (["peer-auth", "set", "catalog", "--mode", "STRICT"], "viewer", "PERMISSION_DENIED"),
        (["peer-auth", "get", "nope"], "viewer", "not registered"),
    ]
    for argv, role, text in cases:
        code, out, err = run(capsys, *argv, "-n", ns, *cli(served, role))
        assert code == 1 and out == "", (argv, err)
        assert err.count("\n") == 1 and err.startswith("meshkeeper: ") and text in err, (argv, err)
    run(capsys, "authz", "set", "catalog", "-n", ns, "-f", str(good), *cli(served))
    run(capsys, "authz", "set", "catalog", "-n", ns, "-f", str(good), *cli(served))
    code, out, err = run(capsys, "authz", "set", "catalog", "-n", ns, "-f", str(good), "--if-version", "0", *cli(served))
    assert code == 1 and err.count("\n") == 1
    assert "the authz policy of catalog changed since version 0 was read" in err and "ABORTED" in err, err
    assert zk_client.get(Paths(ns).authz("catalog"))[1].version == 1


def test_list_services_shows_the_mode_in_effect_and_the_authz_action(served: Served, ns: str, zk_client,
                                                                      capsys) -> None:
    zk_client.create(Paths(ns).service("orders"), ServiceRecord().encode())
    zk_client.create(Paths(ns).service("legacy"), ServiceRecord().encode())
    served.call("admin", "SetPeerAuthentication", pb.SetPeerAuthenticationRequest(namespace=ns, mode="STRICT"))
    served.call("admin", "SetPeerAuthentication", pb.SetPeerAuthenticationRequest(namespace=ns, service="legacy",
                                                                                  mode="PERMISSIVE"))
    served.call("admin", "SetAuthz", pb.SetAuthzRequest(namespace=ns, service="catalog", json=json.dumps(POLICY)))
    zk_client.create(Paths(ns).authz("orders"), b'{"action": "MAYBE"}')  # invalid: not in force
    got = served.call("viewer", "ListServices", pb.ListServicesRequest(namespace=ns))
    assert {s.name: (s.mtls_mode, s.authz) for s in got.services} == {
        "catalog": ("STRICT", "ALLOW"), "legacy": ("PERMISSIVE", ""), "orders": ("STRICT", "")}
    code, out, err = run(capsys, "get", "services", "-n", ns, *cli(served, "viewer"))
    assert code == 0, err
    rows = {line.split()[1]: line.split()[-2:] for line in out.splitlines()[1:]}
    assert rows == {"catalog": ["STRICT", "ALLOW"], "legacy": ["PERMISSIVE", "-"], "orders": ["STRICT", "-"]}
