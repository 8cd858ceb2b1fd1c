"""The admin API end to end (issue 5): real ZooKeeper, real control planes, real sidecars and apps.

Callers speak gRPC to the control plane's xDS port with the generated stub, as the CLI does;
tests/integration/test_cli_e2e.py drives the same through the ``meshkeeper`` command.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass

import grpc
import pytest

from meshkeeper.admin.v1 import admin_pb2 as pb
from meshkeeper.admin.v1 import admin_pb2_grpc
from meshkeeper.registry import InstanceRecord, Override, Paths, ServiceRecord
from tests.harness import http_get, wait_until
from tests.integration.test_mesh import Client, Mesh, start_mesh

pytestmark = pytest.mark.integration

TOKENS = {"viewer": "viewer-token-0123456789", "operator": "operator-token-0123456789",
          "admin": "admin-token-0123456789"}
NAMES = {"viewer": "vera", "operator": "otto", "admin": "ada"}


def write_tokens(path) -> str:
    path.write_text("".join(f"{TOKENS[r]} {NAMES[r]} {r}\n" for r in TOKENS))
    return str(path)


@dataclass
class Admin:
    """A stub on one control plane's xDS port, calling as a role (None: no token)."""

    target: str
    role: str | None = None

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.target)
        self.stub = admin_pb2_grpc.AdminServiceStub(self.channel)

    def as_(self, role: str | None) -> Admin:
        return Admin(self.target, role)

    @property
    def metadata(self) -> tuple:
        return () if self.role is None else (("authorization", f"Bearer {TOKENS[self.role]}"),)

    def __getattr__(self, rpc: str):
        method = getattr(self.stub, rpc)
        return lambda request, **kw: method(request, metadata=self.metadata, timeout=10, **kw)

    def code(self, rpc: str, request) -> grpc.StatusCode:
        try:
            getattr(self, rpc)(request)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    def endpoint(self, ns: str, svc: str, address: str) -> pb.Endpoint:
        eps = {e.address: e for e in self.GetService(pb.GetServiceRequest(namespace=ns, service=svc)).endpoints}
        return eps[address]


def admin_of(cp, role: str | None = None) -> Admin:
    return Admin(f"127.0.0.1:{cp.port('xds_port')}", role)


def register(kz, ns: str, svc: str, *instances: tuple[int, str], ephemeral: bool = True) -> list[str]:
    """Service and instance znodes written directly (no sidecars): the admin API reads ZooKeeper.
    The instances are ephemeral like a sidecar's, unless the test closes ``kz`` early."""
    paths = Paths(ns)
    kz.ensure_path(paths.services)
    if not kz.exists(paths.service(svc)):
        kz.create(paths.service(svc), ServiceRecord().encode())
    keys = []
    for port, version in instances:
        rec = InstanceRecord("127.0.0.1", port, labels={"version": version})
        kz.create(paths.instance(svc, rec.key), rec.encode(), makepath=True, ephemeral=ephemeral)
        keys.append(rec.key)
    return keys


@pytest.fixture
def admin_cp(procs, zk_server, tmp_path):
    return procs.controlplane(zk_server.hosts, "--admin-tokens", write_tokens(tmp_path / "tokens"))


@pytest.fixture
def admin_mesh(procs, zk_server, zk_client, namespace, tmp_path) -> Mesh:
    return start_mesh(procs, zk_server.hosts, namespace, zk_client,
                      cp_args=("--admin-tokens", write_tokens(tmp_path / "tokens")))


# --------------------------------------------------------------------------- auth


def role_matrix_requests(ns: str, key: str) -> dict[str, tuple[str, object]]:
    """RPC -> (least role, a request that succeeds for it)."""
    svc = dict(namespace=ns, service="catalog")
    return {
        "ListServices": ("viewer", pb.ListServicesRequest(namespace=ns)),
        "GetService": ("viewer", pb.GetServiceRequest(**svc)),
        "GetPolicy": ("viewer", pb.GetPolicyRequest(**svc)),
        "GetConfig": ("viewer", pb.GetConfigRequest(**svc)),
        "ListProxies": ("viewer", pb.ListProxiesRequest(namespace=ns)),
        "SetWeight": ("operator", pb.SetWeightRequest(**svc, address=key, weight=5)),
        "SetEnabled": ("operator", pb.SetEnabledRequest(**svc, address=key, enabled=True)),
        "ClearOverride": ("operator", pb.ClearOverrideRequest(**svc, address=key)),
        "SetTrafficSplit": ("operator", pb.SetTrafficSplitRequest(**svc, split={"v1": 100})),
        "SetConfig": ("operator", pb.SetConfigRequest(**svc, values={"color": "blue"})),
        "SetPolicy": ("admin", pb.SetPolicyRequest(**svc, json='{"timeout_ms": 2000}')),
    }


ORDER = [None, "viewer", "operator", "admin"]


def test_role_matrix(admin_cp, zk_client, namespace):
    (key,) = register(zk_client, namespace, "catalog", (7001, "v1"))
    admin = admin_of(admin_cp)
    got, want = {}, {}
    for rpc, (least, request) in role_matrix_requests(namespace, key).items():
        for role in ORDER:
            got[rpc, role] = admin.as_(role).code(rpc, request)
            want[rpc, role] = (grpc.StatusCode.UNAUTHENTICATED if role is None else
                               grpc.StatusCode.OK if ORDER.index(role) >= ORDER.index(least)
                               else grpc.StatusCode.PERMISSION_DENIED)
    # DeleteConfigKey (operator) after SetConfig wrote the key; GetProxyConfig (viewer) passes auth
    # and then finds no such proxy.
    for role in ORDER:
        admin.as_("operator").SetConfig(pb.SetConfigRequest(namespace=namespace, service="catalog", values={"k": "v"}))
        got["DeleteConfigKey", role] = admin.as_(role).code(
            "DeleteConfigKey", pb.DeleteConfigKeyRequest(namespace=namespace, service="catalog", key="k"))
        want["DeleteConfigKey", role] = (grpc.StatusCode.UNAUTHENTICATED if role is None else
                                         grpc.StatusCode.PERMISSION_DENIED if role == "viewer" else grpc.StatusCode.OK)
        got["GetProxyConfig", role] = admin.as_(role).code("GetProxyConfig", pb.GetProxyConfigRequest(node_id="nope"))
        want["GetProxyConfig", role] = grpc.StatusCode.UNAUTHENTICATED if role is None else grpc.StatusCode.NOT_FOUND
    # WatchEvents: the stream opens for a viewer (it gets the next write) and is refused without a token.
    for role in ORDER:
        stream = admin.as_(role).WatchEvents(pb.WatchEventsRequest(namespace=namespace, kinds=["admin_write"]))
        admin.as_("operator").SetWeight(pb.SetWeightRequest(namespace=namespace, service="catalog", address=key, weight=6))
        try:
            event = next(stream)
            got["WatchEvents", role] = grpc.StatusCode.OK if event.who == "otto" else event
        except grpc.RpcError as exc:
            got["WatchEvents", role] = exc.code()
        finally:
            stream.cancel()
        want["WatchEvents", role] = grpc.StatusCode.UNAUTHENTICATED if role is None else grpc.StatusCode.OK
    assert got == want
    assert len(got) == 14 * 4


def test_without_tokens_reads_are_open_and_writes_need_insecure_admin(procs, zk_server, zk_client, namespace):
    (key,) = register(zk_client, namespace, "catalog", (7002, "v1"))
    locked = admin_of(procs.controlplane(zk_server.hosts, name="cp-locked"))
    open_ = admin_of(procs.controlplane(zk_server.hosts, "--insecure-admin", name="cp-insecure"))
    request = pb.SetWeightRequest(namespace=namespace, service="catalog", address=key, weight=3)
    assert locked.code("GetService", pb.GetServiceRequest(namespace=namespace, service="catalog")) == grpc.StatusCode.OK
    try:
        locked.SetWeight(request)
        raise AssertionError("a write went through without tokens or --insecure-admin")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.PERMISSION_DENIED and "--insecure-admin" in exc.details()
    assert open_.SetWeight(request).effective_weight == 3


# --------------------------------------------------------------------------- versions


def test_two_writes_from_one_stale_read_one_wins_one_is_aborted(admin_cp, zk_client, namespace):
    (key,) = register(zk_client, namespace, "catalog", (7003, "v1"))
    op = admin_of(admin_cp, "operator")
    read = op.endpoint(namespace, "catalog", key)
    assert read.version == -1 and not read.HasField("override")  # no override znode yet
    barrier = threading.Barrier(2)
    codes: dict[int, grpc.StatusCode] = {}

    def set_weight(weight: int) -> None:
        client = admin_of(admin_cp, "operator")  # a channel of its own: two real concurrent calls
        barrier.wait()
        codes[weight] = client.code("SetWeight", pb.SetWeightRequest(
            namespace=namespace, service="catalog", address=key, weight=weight, expected_version=read.version))

    threads = [threading.Thread(target=set_weight, args=(w,)) for w in (3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes.values(), key=str) == sorted([grpc.StatusCode.OK, grpc.StatusCode.ABORTED], key=str), codes
    winner = next(w for w, c in codes.items() if c == grpc.StatusCode.OK)
    now = op.endpoint(namespace, "catalog", key)
    assert (now.override.weight, now.effective_weight, now.version) == (winner, winner, 0)
    # A write naming the current version goes through; the stale one is refused and changes nothing.
    assert op.code("SetEnabled", pb.SetEnabledRequest(namespace=namespace, service="catalog", address=key,
                                                      enabled=False, expected_version=now.version)) == grpc.StatusCode.OK
    assert op.code("SetWeight", pb.SetWeightRequest(namespace=namespace, service="catalog", address=key,
                                                    weight=9, expected_version=now.version)) == grpc.StatusCode.ABORTED
    final = op.endpoint(namespace, "catalog", key)
    assert (final.override.weight, final.override.enabled, final.enabled, final.version) == (winner, False, False, 1)
    assert Override.decode(zk_client.get(Paths(namespace).override("catalog", key))[0]) == Override(winner, False)


def test_unconditional_writes_merge_instead_of_losing_a_field(admin_cp, zk_client, namespace):
    (key,) = register(zk_client, namespace, "catalog", (7004, "v1"))
    barrier = threading.Barrier(8)

    def write(i: int) -> None:
        client = admin_of(admin_cp, "operator")
        barrier.wait()
        if i % 2:
            client.SetWeight(pb.SetWeightRequest(namespace=namespace, service="catalog", address=key, weight=7))
        else:
            client.SetEnabled(pb.SetEnabledRequest(namespace=namespace, service="catalog", address=key, enabled=False))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Override.decode(zk_client.get(Paths(namespace).override("catalog", key))[0]) == Override(7, False)
    assert zk_client.get(Paths(namespace).override("catalog", key))[1].version == 7  # eight writes, none lost


def test_create_only_and_errors_name_what_is_wrong(admin_cp, zk_client, namespace):
    (key,) = register(zk_client, namespace, "catalog", (7005, "v1"))
    op = admin_of(admin_cp, "operator")
    req = dict(namespace=namespace, service="catalog")
    op.SetConfig(pb.SetConfigRequest(**req, values={"a": "1"}, expected_version=-1))
    cases = [
        ("SetConfig", pb.SetConfigRequest(**req, values={"a": "2"}, expected_version=-1), grpc.StatusCode.ABORTED, "exists"),
        ("SetWeight", pb.SetWeightRequest(**req, address="127.0.0.1:1", weight=1), grpc.StatusCode.NOT_FOUND,
         f"catalog has no instance 127.0.0.1:1 (registered: {key})"),
        ("SetWeight", pb.SetWeightRequest(**req, address=key, weight=20000), grpc.StatusCode.INVALID_ARGUMENT,
         "weight: 20000 is outside 0..10000"),
        ("SetWeight", pb.SetWeightRequest(**req, address="nohost", weight=1), grpc.StatusCode.INVALID_ARGUMENT,
         "expected <host>:<port>"),
        ("GetService", pb.GetServiceRequest(namespace=namespace, service="nope"), grpc.StatusCode.NOT_FOUND,
         f"service 'nope' is not registered in namespace '{namespace}'"),
        ("GetService", pb.GetServiceRequest(namespace=namespace, service="Bad_Name"), grpc.StatusCode.INVALID_ARGUMENT,
         "lowercase DNS label"),
        ("SetConfig", pb.SetConfigRequest(**req, values={"bad key": "x"}), grpc.StatusCode.INVALID_ARGUMENT, "bad key"),
        ("DeleteConfigKey", pb.DeleteConfigKeyRequest(**req, key="zz"), grpc.StatusCode.NOT_FOUND, "no key 'zz'"),
        ("SetTrafficSplit", pb.SetTrafficSplitRequest(**req, split={"v1": 50, "v9": 50}), grpc.StatusCode.FAILED_PRECONDITION,
         "no registered instance of catalog has version 'v9' (versions: v1)"),
        ("SetTrafficSplit", pb.SetTrafficSplitRequest(**req, split={"v1": 60}), grpc.StatusCode.INVALID_ARGUMENT,
         "policy.split: weights must add up to 100, they add up to 60"),
    ]
    for rpc, request, code, text in cases:
        try:
            getattr(op, rpc)(request)
            raise AssertionError(f"{rpc} {request} was accepted")
        except grpc.RpcError as exc:
            assert exc.code() == code and text in exc.details(), (rpc, exc.code(), exc.details())
    assert op.GetConfig(pb.GetConfigRequest(**req)).values == {"a": "1"}


# --------------------------------------------------------------------------- policy


def test_invalid_policy_is_refused_naming_the_field_and_the_old_one_stays(admin_mesh):
    admin = admin_of(admin_mesh.cp, "admin")
    req = dict(namespace=admin_mesh.ns, service="catalog")
    first = admin.SetPolicy(pb.SetPolicyRequest(**req, json='{"timeout_ms": 2500, "retry": {"attempts": 1}}'))
    assert json.loads(first.json) == {"timeout_ms": 2500, "retry": {"attempts": 1}} and first.version == 0

    def route_timeout() -> str | None:
        dump = json.loads(http_get(f"{admin_mesh.frontend.admin_url}/config_dump")[2])
        for rc in dump["configs"]["routes"]["resources"]:
            for vh in rc.get("virtual_hosts", []):
                if vh["name"] == f"catalog.{admin_mesh.ns}":
                    return vh["routes"][0]["route"].get("timeout")
        return None

    wait_until(lambda: route_timeout() == "2.500s", 5, message="the policy reached the frontend")
    for bad, field in (('{"outlier": {"max_ejection_percent": 150}}', "policy.outlier.max_ejection_percent: 150 is outside 0..100"),
                       ('{"retry": {"attempts": 1, "on": ["5xx", "sometimes"]}}', "policy.retry.on[1]: 'sometimes'"),
                       ('{"timeout_msec": 5}', "policy.timeout_msec: unknown field"),
                       ("{not json", "policy: not valid JSON")):
        try:
            admin.SetPolicy(pb.SetPolicyRequest(**req, json=bad))
            raise AssertionError(f"accepted {bad}")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and field in exc.details(), exc.details()
    kept = admin.GetPolicy(pb.GetPolicyRequest(**req))
    assert (json.loads(kept.json), kept.version) == ({"timeout_ms": 2500, "retry": {"attempts": 1}}, 0)
    assert route_timeout() == "2.500s"
    assert json.loads(admin_mesh.kz.get(Paths(admin_mesh.ns).policy("catalog"))[0]) == json.loads(first.json)


# --------------------------------------------------------------------------- traffic


def test_disable_takes_an_endpoint_out_within_a_second_and_weight_changes_the_split(admin_mesh):
    op = admin_of(admin_mesh.cp, "operator")
    req = dict(namespace=admin_mesh.ns, service="catalog")
    client = Client(admin_mesh.frontend.port("outbound_port"))
    victim = admin_mesh.instance_key(2)  # weight 7 of 10

    op.SetEnabled(pb.SetEnabledRequest(**req, address=victim, enabled=False))
    wait_until(lambda: victim not in admin_mesh.serving(), 1.0, 0.02, message="disabled endpoint leaves within 1 s")
    who, codes = client.split(300)
    assert codes == {200: 300} and who[admin_mesh.app_instance(2)] == 0

    ep = op.SetEnabled(pb.SetEnabledRequest(**req, address=victim, enabled=True))
    assert ep.enabled and ep.effective_weight == 7
    wait_until(lambda: admin_mesh.serving().get(victim) == 7, 1.0, 0.02, message="enabled endpoint back within 1 s")

    # Weights 1, 2, 7 -> 1, 2, 1: the third instance's share falls from 70% to 25%.
    op.SetWeight(pb.SetWeightRequest(**req, address=victim, weight=1))
    wait_until(lambda: admin_mesh.serving().get(victim) == 1, 1.0, 0.02, message="weight applied within 1 s")
    who, codes = client.split(1000)
    assert codes == {200: 1000}
    shares = [who[admin_mesh.app_instance(i)] / 1000 for i in range(3)]
    for got, want in zip(shares, (0.25, 0.5, 0.25), strict=True):
        assert abs(got - want) <= 0.04, shares

    cleared = op.ClearOverride(pb.ClearOverrideRequest(**req, address=victim))
    assert (cleared.effective_weight, cleared.version, cleared.HasField("override")) == (7, -1, False)
    wait_until(lambda: admin_mesh.serving().get(victim) == 7, 1.0, 0.02, message="registered weight back")


def test_get_service_shows_weights_overrides_and_live_load(procs, zk_server, zk_client, namespace, tmp_path):
    mesh = start_mesh(procs, zk_server.hosts, namespace, zk_client,
                      cp_args=("--admin-tokens", write_tokens(tmp_path / "tokens"), "--load-report-interval", "0.5"))
    viewer = admin_of(mesh.cp, "viewer")
    admin_of(mesh.cp, "operator").SetWeight(pb.SetWeightRequest(namespace=namespace, service="catalog",
                                                                address=mesh.instance_key(0), weight=4))
    Client(mesh.frontend.port("outbound_port")).split(200)

    def loaded() -> pb.Service | None:
        svc = viewer.GetService(pb.GetServiceRequest(namespace=namespace, service="catalog"))
        return svc if all(e.HasField("load") for e in svc.endpoints) else None

    svc = wait_until(loaded, 10, message="LRS load in GetService")
    rows = {e.address: e for e in svc.endpoints}
    assert [rows[mesh.instance_key(i)].registered_weight for i in range(3)] == [1, 2, 7]
    assert [rows[mesh.instance_key(i)].effective_weight for i in range(3)] == [4, 2, 7]
    assert rows[mesh.instance_key(0)].override.weight == 4 and rows[mesh.instance_key(0)].version == 0
    assert {e.labels["version"] for e in svc.endpoints} == {"v1", "v2"}
    assert all(e.registered and e.enabled for e in svc.endpoints)
    listed = viewer.ListServices(pb.ListServicesRequest(namespace=namespace)).services
    assert [(s.name, s.instances, s.serving, s.protocol) for s in listed] == [("catalog", 3, 3, "http"),
                                                                             ("frontend", 1, 1, "http")]


# --------------------------------------------------------------------------- replicas


def test_a_write_through_one_replica_is_served_by_the_other(admin_mesh, procs, tmp_path):
    ns = admin_mesh.ns
    other = procs.controlplane(admin_mesh.zk, "--admin-tokens", write_tokens(tmp_path / "tokens2"), name="cp-2")
    target2 = f"127.0.0.1:{other.port('xds_port')}"
    fe2 = procs.sidecar("frontend", procs.app("frontend").port("port"), cp=target2, zk=admin_mesh.zk,
                        namespace=ns, name="frontend-on-cp2")
    wait_until(lambda: len(admin_mesh.serving(fe2)) == 3, 10, message="the second frontend routes to catalog")
    victim = admin_mesh.instance_key(1)
    written = admin_of(admin_mesh.cp, "operator").SetEnabled(
        pb.SetEnabledRequest(namespace=ns, service="catalog", address=victim, enabled=False))
    # Read through the other replica at once: it reads ZooKeeper, so it sees the write and its version.
    read = admin_of(other, "viewer").endpoint(ns, "catalog", victim)
    assert (read.enabled, read.version) == (False, written.version)
    # And the other replica's sidecar stops sending to it.
    wait_until(lambda: victim not in admin_mesh.serving(fe2), 2, 0.02, message="served by the other replica")
    # A stale write through the other replica is refused too.
    assert admin_of(other, "operator").code("SetWeight", pb.SetWeightRequest(
        namespace=ns, service="catalog", address=victim, weight=1, expected_version=-1)) == grpc.StatusCode.ABORTED


# --------------------------------------------------------------------------- proxies and events


def test_proxy_status_and_proxy_config(admin_mesh):
    viewer = admin_of(admin_mesh.cp, "viewer")

    def synced() -> list[pb.Proxy] | None:
        proxies = viewer.ListProxies(pb.ListProxiesRequest(namespace=admin_mesh.ns)).proxies
        ok = len(proxies) == 4 and all(t.version_acked == t.version_sent and t.version_sent for p in proxies
                                       for t in p.types)
        return proxies if ok else None

    proxies = wait_until(synced, 10, message="four proxies, every type SYNCED")
    by_service = Counter(p.service for p in proxies)
    assert by_service == {"catalog": 3, "frontend": 1}
    fe = next(p for p in proxies if p.service == "frontend")
    assert fe.instance == f"127.0.0.1:{admin_mesh.frontend.port('inbound_port')}"
    assert {"CDS", "EDS", "LDS", "RDS"} <= {t.type for t in fe.types}
    assert all(t.acked_at.seconds > 0 and not t.last_nack_error for t in fe.types)

    config = viewer.GetProxyConfig(pb.GetProxyConfigRequest(node_id=fe.node_id))
    types = {t.type: t for t in config.types}
    cluster = json.loads(types["CDS"].resources_json[f"outbound|catalog.{admin_mesh.ns}"])
    assert cluster["@type"].endswith("envoy.config.cluster.v3.Cluster") and cluster["type"] == "EDS"
    cla = json.loads(types["EDS"].resources_json[f"outbound|catalog.{admin_mesh.ns}"])
    assert len([ep for loc in cla["endpoints"] for ep in loc["lb_endpoints"]]) == 3
    assert set(types["LDS"].resources_json) == {"outbound", "inbound"}
    assert {t.type: t.version for t in config.types} == {t.type: t.version_acked for t in fe.types}


def test_watch_events_and_the_audit_log(admin_mesh):
    ns = admin_mesh.ns
    viewer = admin_of(admin_mesh.cp, "viewer")
    stream = viewer.WatchEvents(pb.WatchEventsRequest(namespace=ns))
    events: list[pb.Event] = []

    def read() -> None:
        try:
            events.extend(stream)
        except grpc.RpcError as exc:  # the cancel() below ends it
            assert exc.code() == grpc.StatusCode.CANCELLED, exc

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    victim = admin_mesh.instance_key(0)
    admin_of(admin_mesh.cp, "operator").SetWeight(pb.SetWeightRequest(namespace=ns, service="catalog",
                                                                      address=victim, weight=3))
    # (Other services' registry events may come first: a sidecar of the shared mesh re-registering
    # under load; the override's event is catalog's.)
    wait_until(lambda: {"admin_write", "push"} <= {e.kind for e in events} and
               any(e.kind == "registry" and e.service == "catalog" for e in events), 5,
               message="admin_write, catalog's registry and push events")
    # A policy the sidecars cannot honour: every catalog caller NACKs it, and the stream says so.
    admin_of(admin_mesh.cp, "admin").SetPolicy(pb.SetPolicyRequest(namespace=ns, service="catalog",
                                                                    json='{"lb": {"policy": "maglev"}}'))
    wait_until(lambda: any(e.kind == "nack" for e in events), 5, message="a nack event")
    stream.cancel()
    reader.join(5)

    write = next(e for e in events if e.kind == "admin_write")
    assert (write.who, write.service, write.namespace) == ("otto", "catalog", ns)
    assert write.before == "" and json.loads(write.after) == {"weight": 3}
    assert f"SetWeight catalog {victim} weight=3 by otto" == write.summary
    registry = next(e for e in events if e.kind == "registry" and e.service == "catalog")
    assert f"overrides changed: {victim}" in registry.summary
    push = next(e for e in events if e.kind == "push")
    assert push.node_id.startswith("sidecar~") and push.namespace == ns
    nack = next(e for e in events if e.kind == "nack")
    assert "CDS" in nack.summary and "maglev" in nack.summary.lower()

    audit = [json.loads(line.split("audit ", 1)[1]) for line in admin_mesh.cp.stderr_text().splitlines()
             if "meshkeeper.controlplane.audit" in line]
    assert [(a["rpc"], a["who"], a["role"], a["result"]) for a in audit] == [
        ("SetWeight", "otto", "operator", "ok"), ("SetPolicy", "ada", "admin", "ok")]
    assert (audit[0]["before"], audit[0]["after"]) == (None, {"weight": 3})
    assert audit[1]["after"] == {"lb": {"policy": "maglev"}}
    assert audit[0]["path"] == Paths(ns).override("catalog", victim)


# --------------------------------------------------------------------------- config centre


def runtime(sidecar, version: str = "", wait: float | None = None) -> dict:
    query = "" if wait is None else f"?version={version}&wait={wait}"
    status, _, body = http_get(f"{sidecar.admin_url}/runtime{query}", timeout=(wait or 0) + 5)
    assert status == 200, body
    return json.loads(body)


def test_config_set_reaches_the_app_through_its_sidecar_within_a_second(admin_mesh):
    ns = admin_mesh.ns
    op = admin_of(admin_mesh.cp, "operator")
    catalog_sidecar = admin_mesh.catalog[0][1]
    before = runtime(catalog_sidecar)
    assert (before["service"], before["namespace"], before["values"]) == ("catalog", ns, {})

    op.SetConfig(pb.SetConfigRequest(namespace=ns, service="catalog", values={"color": "blue"}))
    got = wait_until(lambda: (doc := runtime(catalog_sidecar))["values"].get("color") == "blue" and doc, 1.0, 0.02,
                     message="the app reads color=blue from its sidecar within 1 s")
    assert got["version"] != before["version"]
    # Every catalog sidecar has it; the frontend (another service) does not.
    for _, sc in admin_mesh.catalog:
        wait_until(lambda sc=sc: runtime(sc)["values"] == {"color": "blue"}, 1.0, 0.02, message="every catalog sidecar")
    assert runtime(admin_mesh.frontend)["values"] == {}

    # A long poll with the current version is held until the next change, and returns with it.
    answers: list[dict] = []
    poll = threading.Thread(target=lambda: answers.append(runtime(catalog_sidecar, got["version"], wait=30)))
    poll.start()
    assert not answers  # held: nothing changed yet
    op.SetConfig(pb.SetConfigRequest(namespace=ns, service="catalog", values={"color": "green", "size": "xl"}))
    poll.join(5)
    assert not poll.is_alive(), "the long poll did not return on the change"
    assert answers[0]["values"] == {"color": "green", "size": "xl"} and answers[0]["version"] != got["version"]

    config = op.DeleteConfigKey(pb.DeleteConfigKeyRequest(namespace=ns, service="catalog", key="color"))
    assert dict(config.values) == {"size": "xl"} and config.version == 2
    wait_until(lambda: runtime(catalog_sidecar)["values"] == {"size": "xl"}, 1.0, 0.02, message="key deleted")
    assert json.loads(admin_mesh.kz.get(Paths(ns).config("catalog"))[0]) == {"size": "xl"}


# --------------------------------------------------------------------------- TLS


def test_mutual_tls_on_the_grpc_port(procs, zk_server, zk_client, namespace, tmp_path):
    from tests.harness.tls import make_tls

    tls = make_tls(tmp_path / "tls")
    cp = procs.controlplane(zk_server.hosts, "--admin-tokens", write_tokens(tmp_path / "tokens"),
                            "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key),
                            "--tls-client-ca", str(tls.ca))
    target = f"127.0.0.1:{cp.port('xds_port')}"
    app = procs.app("catalog")
    sidecar = procs.sidecar("catalog", app.port("port"), cp=target, zk=zk_server.hosts, namespace=namespace,
                            xds_ca=tls.ca, xds_cert=tls.client_cert, xds_key=tls.client_key)
    key = f"127.0.0.1:{sidecar.port('inbound_port')}"

    def channel(cert: bool) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=tls.ca.read_bytes(),
            private_key=tls.client_key.read_bytes() if cert else None,
            certificate_chain=tls.client_cert.read_bytes() if cert else None)
        return grpc.secure_channel(target, creds)

    metadata = (("authorization", f"Bearer {TOKENS['operator']}"),)
    stub = admin_pb2_grpc.AdminServiceStub(channel(cert=True))
    ep = stub.SetWeight(pb.SetWeightRequest(namespace=namespace, service="catalog", address=key, weight=4),
                        metadata=metadata, timeout=10)
    assert ep.effective_weight == 4
    proxies = stub.ListProxies(pb.ListProxiesRequest(namespace=namespace), metadata=metadata, timeout=10).proxies
    assert [p.service for p in proxies] == ["catalog"]  # the sidecar's ADS stream runs over mutual TLS
    for refused in (admin_pb2_grpc.AdminServiceStub(channel(cert=False)),  # no client certificate
                    admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(target))):  # plaintext
        try:
            refused.ListServices(pb.ListServicesRequest(namespace=namespace), metadata=metadata, timeout=5)
            raise AssertionError("a call without a client certificate went through")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------------- traffic split


def test_traffic_split_by_version(admin_mesh):
    ns = admin_mesh.ns
    op = admin_of(admin_mesh.cp, "operator")
    client = Client(admin_mesh.frontend.port("outbound_port"))
    # v1 = instances 0 and 1 (weights 1 and 2), v2 = instance 2 (weight 7): 30/70 by weight alone.
    policy = op.SetTrafficSplit(pb.SetTrafficSplitRequest(namespace=ns, service="catalog", split={"v1": 80, "v2": 20}))
    assert json.loads(policy.json) == {"split": {"v1": 80, "v2": 20}}

    def v2_share(n: int = 400) -> float:
        who, codes = client.split(n)
        assert codes == {200: n}
        return who[admin_mesh.app_instance(2)] / n

    wait_until(lambda: abs(v2_share() - 0.2) <= 0.06, 5, message="v2 gets 20%")
    who, codes = client.split(1500)
    assert codes == {200: 1500}
    shares = [who[admin_mesh.app_instance(i)] / 1500 for i in range(3)]
    # Within v1, endpoint weights 1:2 still apply: 80% * 1/3 and 80% * 2/3.
    for got, want in zip(shares, (0.8 / 3, 1.6 / 3, 0.2), strict=True):
        assert abs(got - want) <= 0.04, shares
    # The split keeps the rest of the policy, and clearing it restores the weights alone.
    admin_of(admin_mesh.cp, "admin").SetPolicy(pb.SetPolicyRequest(namespace=ns, service="catalog",
                                                                    json='{"timeout_ms": 4000, "split": {"v1": 80, "v2": 20}}'))
    cleared = op.SetTrafficSplit(pb.SetTrafficSplitRequest(namespace=ns, service="catalog", split={}))
    assert json.loads(cleared.json) == {"timeout_ms": 4000}
    wait_until(lambda: abs(v2_share() - 0.7) <= 0.06, 5, message="back to 70% by weight")


def test_zookeeper_down_is_unavailable_and_nothing_is_lost(procs, zk, tmp_path):
    from kazoo.client import KazooClient

    kz = KazooClient(hosts=zk.hosts, timeout=5.0)
    kz.start(timeout=10)
    try:
        (key,) = register(kz, "default", "catalog", (7010, "v1"), ephemeral=False)
    finally:
        kz.stop()
        kz.close()
    cp = procs.controlplane(zk.hosts, "--admin-tokens", write_tokens(tmp_path / "tokens"))
    op = admin_of(cp, "operator")
    req = pb.SetWeightRequest(service="catalog", address=key, weight=2)
    wait_until(lambda: op.code("SetWeight", req) == grpc.StatusCode.OK, 10, message="a write once connected")
    zk.stop()
    # Reads and writes fail fast with UNAVAILABLE and say why; the control plane stays up.
    refused = wait_until(lambda: (c := op.code("SetWeight", pb.SetWeightRequest(
        service="catalog", address=key, weight=9))) != grpc.StatusCode.OK and c, 10, message="refused while down")
    assert refused == grpc.StatusCode.UNAVAILABLE
    try:
        op.GetService(pb.GetServiceRequest(service="catalog"))
        raise AssertionError("a read succeeded without ZooKeeper")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE and "ZooKeeper" in exc.details(), exc.details()
    zk.start()
    # Back: the write made before the outage is there, the refused one is not.
    ep = wait_until(lambda: op.endpoint("default", "catalog", key), 15, message="reads work again")
    assert ep.effective_weight == 2


def test_header_match_sends_canary_requests_to_their_subset(admin_mesh):
    ns = admin_mesh.ns
    admin = admin_of(admin_mesh.cp, "admin")
    admin.SetPolicy(pb.SetPolicyRequest(namespace=ns, service="catalog", json=json.dumps(
        {"split": {"v1": 100}, "match": [{"header": "x-canary", "equals": "1", "subset": "v2"}]})))
    port = admin_mesh.frontend.port("outbound_port")
    canary = Client(port)

    def instances(n: int, headers: dict[str, str]) -> Counter:
        who = Counter()
        for _ in range(n):
            status, got, _ = http_get(f"http://127.0.0.1:{port}/", {"Host": "catalog", **headers})
            assert status == 200
            who[got["x-app-instance"]] += 1
        return who

    v2 = admin_mesh.app_instance(2)
    wait_until(lambda: set(instances(20, {"x-canary": "1"})) == {v2}, 5, message="canary requests reach v2 only")
    assert set(instances(50, {"x-canary": "1"})) == {v2}
    assert v2 not in instances(100, {"x-canary": "0"})  # the header must equal 1
    who, codes = canary.split(100)
    assert codes == {200: 100} and who[v2] == 0  # everything else: v1 only


def test_failed_write_attempts_are_audited_too(admin_cp, zk_client, namespace):
    (key,) = register(zk_client, namespace, "catalog", (7020, "v1"))
    req = dict(namespace=namespace, service="catalog")
    attempts = [
        ("operator", "SetWeight", pb.SetWeightRequest(**req, address=key, weight=99999), "invalid"),
        ("operator", "SetEnabled", pb.SetEnabledRequest(**req, address="127.0.0.1:9", enabled=False), "not_found"),
        ("admin", "SetPolicy", pb.SetPolicyRequest(**req, json='{"retry": {"attempts": -1}}'), "invalid"),
        ("operator", "SetTrafficSplit", pb.SetTrafficSplitRequest(**req, split={"v7": 100}), "refused"),
        ("operator", "SetConfig", pb.SetConfigRequest(**req, values={"a": "b"}, expected_version=4), "aborted"),
        ("viewer", "SetConfig", pb.SetConfigRequest(**req, values={"a": "b"}), "permission_denied"),
        (None, "ClearOverride", pb.ClearOverrideRequest(**req, address=key), "unauthenticated"),
    ]
    for role, rpc, request, _ in attempts:
        assert admin_of(admin_cp, role).code(rpc, request) != grpc.StatusCode.OK
    audit = [json.loads(line.split("audit ", 1)[1]) for line in admin_cp.stderr_text().splitlines()
             if "meshkeeper.controlplane.audit" in line]
    assert [(a["rpc"], a["result"]) for a in audit] == [(rpc, result) for _, rpc, _, result in attempts]
    assert all(a["error"] and a["service"] == "catalog" and a["peer"].startswith("ipv4:127.0.0.1") for a in audit)
    assert [a.get("who") for a in audit] == ["otto", "otto", "ada", "otto", "otto", None, None]
    assert audit[4]["expected_version"] == 4 and audit[4]["path"] == Paths(namespace).config("catalog")
    assert TOKENS["operator"] not in admin_cp.stderr_text()  # tokens never reach the log


def test_config_limits_and_a_bad_config_znode(admin_cp, zk_client, namespace):
    register(zk_client, namespace, "catalog", (7021, "v1"))
    op = admin_of(admin_cp, "operator")
    req = dict(namespace=namespace, service="catalog")
    path = Paths(namespace).config("catalog")

    def refused(rpc: str, request, code: grpc.StatusCode, text: str) -> None:
        try:
            getattr(op, rpc)(request)
            raise AssertionError(f"{rpc} went through")
        except grpc.RpcError as exc:
            assert exc.code() == code and text in exc.details(), exc.details()

    refused("SetConfig", pb.SetConfigRequest(**req, values={f"k{i}": "v" for i in range(1100)}),
            grpc.StatusCode.INVALID_ARGUMENT, "1100 keys, at most 1024")
    refused("SetConfig", pb.SetConfigRequest(**req, values={f"k{i}": "x" * 16000 for i in range(40)}),
            grpc.StatusCode.INVALID_ARGUMENT, "at most 524288")
    assert not zk_client.exists(path)
    refused("GetConfig", pb.GetConfigRequest(namespace=namespace, service="nope"), grpc.StatusCode.NOT_FOUND,
            "'nope' is not registered")
    # A hand-written bad znode is never dropped silently: replacing it names its version.
    zk_client.create(path, b'{"color": 5}', makepath=True)
    refused("GetConfig", pb.GetConfigRequest(**req), grpc.StatusCode.FAILED_PRECONDITION,
            "config.color: expected a string, got 5")
    refused("SetConfig", pb.SetConfigRequest(**req, values={"size": "xl"}), grpc.StatusCode.FAILED_PRECONDITION,
            "name its version")
    assert zk_client.get(path)[0] == b'{"color": 5}'
    fixed = op.SetConfig(pb.SetConfigRequest(**req, values={"color": "blue"}, expected_version=0))
    assert (dict(fixed.values), fixed.version) == ({"color": "blue"}, 1)

