"""The operator verbs (meshkeeper get|weight|enable|...|events) against a real gRPC server.

A fake AdminService holds its state in memory, checks bearer tokens and roles, and aborts with the
status codes of docs/contracts.md ("Admin API"), so every error path goes through real gRPC. The
CLI runs in-process through ``meshkeeper.cli.main`` (stdout/stderr captured), except for Ctrl-C,
which needs a real process and a real SIGINT.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.service.runtime.v3 import rtds_pb2
from google.protobuf import json_format, struct_pb2, wrappers_pb2

from controlplane import translate
from meshkeeper import xds
from meshkeeper.admin.v1 import admin_pb2 as pb
from meshkeeper.admin.v1 import admin_pb2_grpc
from meshkeeper.cli import USAGE
from meshkeeper.cli import main as cli_main
from meshkeeper.ctl import render
from meshkeeper.policy import PolicyError, decode_policy, encode_policy

REPO = Path(__file__).resolve().parents[2]
VIEWER, OPERATOR, ADMIN = "view-secret", "op-secret", "admin-secret"
TOKENS = {VIEWER: ("vera", 1), OPERATOR: ("otto", 2), ADMIN: ("ada", 3)}
ROLE_NAMES = {1: "viewer", 2: "operator", 3: "admin"}
NODE_A = "sidecar~10.0.0.1~catalog-15006.default"
NODE_B = "sidecar~10.0.0.2~catalog-15006.default"
NODE_P = "sidecar~10.9.0.1~billing-15006.prod"
T0 = 1_700_000_000  # 2023-11-14T22:13:20Z


def _endpoint(address: str, version: str, zone: str, weight: int, load: pb.EndpointLoad | None = None) -> pb.Endpoint:
    ep = pb.Endpoint(address=address, labels={"version": version, "zone": zone}, registered_weight=weight,
                     effective_weight=weight, enabled=True, registered=True, version=-1)
    if load is not None:
        ep.load.CopyFrom(load)
    return ep


def _types(**states: tuple[str, str, str]) -> list[pb.TypeStatus]:
    return [pb.TypeStatus(type=t, version_sent=sent, version_acked=acked, last_nack_error=nack,
                          last_nack_version=sent if nack else "")
            for t, (sent, acked, nack) in states.items()]


def _json(msg, snake: bool = False) -> str:
    return json_format.MessageToJson(msg, preserving_proto_field_name=snake)


def _proxy_resources() -> list[pb.AckedResources]:
    v1, v2 = xds.outbound_cluster("catalog", "default", "v1"), xds.outbound_cluster("catalog", "default", "v2")
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=v1, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(
        locality=base_pb2.Locality(zone="zone-a"),
        lb_endpoints=[endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address="10.0.0.1", port_value=8080))),
            health_status=health_check_pb2.HEALTHY, load_balancing_weight=wrappers_pb2.UInt32Value(value=10))])])
    routes = route_pb2.RouteConfiguration(name="outbound", virtual_hosts=[route_components_pb2.VirtualHost(
        name="catalog.default", domains=["catalog", "catalog.default"],
        routes=[route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix="/"),
                                           route=route_components_pb2.RouteAction(
                                               weighted_clusters=route_components_pb2.WeightedCluster(clusters=[
                                                   route_components_pb2.WeightedCluster.ClusterWeight(
                                                       name=name, weight=wrappers_pb2.UInt32Value(value=w))
                                                   for name, w in ((v1, 90), (v2, 10))])))])])
    layer = struct_pb2.Struct()
    layer.update({"feature.x": "on"})
    return [
        # The server's choice of JSON names is not pinned down: CDS uses field names, the rest JSON names.
        pb.AckedResources(type="CDS", version="7", resources_json={
            v1: _json(translate.eds_cluster(v1), snake=True),
            "inbound|8080": _json(translate.inbound_cluster(8080), snake=True)}),
        pb.AckedResources(type="LDS", version="7", resources_json={
            "outbound": _json(translate.outbound_listener(15001)),
            "inbound": _json(translate.inbound_listener("10.0.0.1", 15006, 8080))}),
        pb.AckedResources(type="EDS", version="8", resources_json={v1: _json(cla)}),
        pb.AckedResources(type="RDS", version="7", resources_json={"outbound": _json(routes)}),
        pb.AckedResources(type="RTDS", version="3", resources_json={"catalog": _json(rtds_pb2.Runtime(
            name="catalog", layer=layer))}),
    ]


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    """The admin API over in-memory state; records every request and its metadata."""

    def __init__(self) -> None:
        self.cp = ""
        self.calls: list[tuple[str, object, dict[str, str]]] = []
        self.slow = False
        self.events_end = "ok"  # "ok", "hold" (until the client goes away) or "overflow"
        self.services = {
            ("default", "catalog"): pb.Service(namespace="default", name="catalog", protocol="http", endpoints=[
                _endpoint("10.0.0.1:8080", "v1", "zone-a", 10,
                          pb.EndpointLoad(rps=12.5, error_ratio=0.02, mean_latency_seconds=0.015)),
                _endpoint("10.0.0.2:8080", "v2", "zone-b", 10)]),
            ("default", "frontend"): pb.Service(namespace="default", name="frontend", protocol="http"),
            ("prod", "billing"): pb.Service(namespace="prod", name="billing", protocol="grpc",
                                            endpoints=[_endpoint("10.9.0.1:9090", "v3", "zone-a", 5)]),
        }
        self.policies: dict[tuple[str, str], tuple[str, int]] = {("default", "catalog"): (
            json.dumps({"retry": {"attempts": 2, "on": ["5xx"]}}), 4)}
        self.configs: dict[tuple[str, str], tuple[dict[str, str], int]] = {
            ("default", "catalog"): ({"feature.x": "on", "timeout": "250ms"}, 2)}
        now = time.time()
        self.proxies = [
            pb.Proxy(node_id=NODE_A, service="catalog", namespace="default", instance="10.0.0.1:15006",
                     connected_since=_ts(now - 3 * 86400 - 300), types=_types(
                         CDS=("7", "7", ""), LDS=("7", "7", ""), EDS=("8", "7", ""), RDS=("7", "7", ""))),
            pb.Proxy(node_id=NODE_B, service="catalog", namespace="default", instance="10.0.0.2:15006",
                     types=_types(CDS=("7", "6", "cluster outbound|catalog.default: unknown lb_policy MAGLEV"),
                                  LDS=("7", "7", ""), EDS=("8", "8", ""), RDS=("7", "7", ""),
                                  RTDS=("3", "3", ""))),
            pb.Proxy(node_id=NODE_P, service="billing", namespace="prod", instance="10.9.0.1:15006",
                     types=_types(CDS=("2", "2", ""))),
        ]
        self.events = [
            pb.Event(at=_ts(T0), kind="registry", namespace="default", service="catalog",
                     summary="instances 2 -> 3"),
            pb.Event(at=_ts(T0 + 1), kind="push", namespace="default", service="catalog", node_id=NODE_A,
                     summary="EDS version 9"),
            pb.Event(at=_ts(T0 + 2), kind="nack", namespace="default", service="catalog", node_id=NODE_B,
                     summary="CDS version 7 refused"),
            pb.Event(at=_ts(T0 + 3), kind="admin_write", namespace="prod", service="billing", who="otto",
                     summary="weight 10.9.0.1:9090 = 0", before="", after='{"weight": 0}'),
        ]

    # ------------------------------------------------------------------ helpers

    def _enter(self, name: str, request, context, role: int) -> None:
        md = dict(context.invocation_metadata())
        self.calls.append((name, request, md))
        auth = md.get("authorization", "")
        if not auth.startswith("Bearer "):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no bearer token in the call metadata")
        token = auth.removeprefix("Bearer ")
        if token not in TOKENS:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        who, have = TOKENS[token]
        if have < role:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{who} has the {ROLE_NAMES[have]} role; {name} needs {ROLE_NAMES[role]}")
        if self.slow:  # answer only after the caller has given up
            gone = threading.Event()
            context.add_callback(gone.set)
            gone.wait(30)

    def requests(self, name: str) -> list:
        return [req for method, req, _ in self.calls if method == name]

    @staticmethod
    def _check_version(context, current: int, request, what: str) -> None:
        if request.HasField("expected_version") and request.expected_version != current:
            context.abort(grpc.StatusCode.ABORTED,
                          f"{what} is at version {current}, not {request.expected_version}")

    def _service(self, context, ns: str, svc: str) -> pb.Service:
        found = self.services.get((ns or "default", svc))
        if found is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"service {svc!r} in namespace {ns!r} is not registered")
        return found

    def _endpoint(self, context, request) -> pb.Endpoint:
        for ep in self._service(context, request.namespace, request.service).endpoints:
            if ep.address == request.address:
                self._check_version(context, ep.version, request, f"override {request.address}")
                return ep
        context.abort(grpc.StatusCode.NOT_FOUND, f"{request.service} has no instance {request.address}")
        raise AssertionError

    @staticmethod
    def _bump(ep: pb.Endpoint) -> pb.Endpoint:
        ep.version += 1
        ep.effective_weight = ep.override.weight if ep.override.HasField("weight") else ep.registered_weight
        ep.enabled = not ep.override.HasField("enabled") or ep.override.enabled
        return ep

    # ------------------------------------------------------------------ the API

    def ListServices(self, request, context):
        self._enter("ListServices", request, context, 1)
        ns = request.namespace or "default"
        return pb.ListServicesResponse(services=[
            pb.ServiceSummary(namespace=s.namespace, name=s.name, protocol=s.protocol, instances=len(s.endpoints),
                              serving=sum(1 for e in s.endpoints if e.enabled and e.effective_weight > 0),
                              has_policy=(s.namespace, s.name) in self.policies)
            for (n, _), s in sorted(self.services.items()) if n == ns])

    def GetService(self, request, context):
        self._enter("GetService", request, context, 1)
        return self._service(context, request.namespace, request.service)

    def SetWeight(self, request, context):
        self._enter("SetWeight", request, context, 2)
        if not 0 <= request.weight <= 10_000:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"weight: {request.weight} is outside 0..10000")
        ep = self._endpoint(context, request)
        ep.override.weight = request.weight
        return self._bump(ep)

    def SetEnabled(self, request, context):
        self._enter("SetEnabled", request, context, 2)
        ep = self._endpoint(context, request)
        ep.override.enabled = request.enabled
        return self._bump(ep)

    def ClearOverride(self, request, context):
        self._enter("ClearOverride", request, context, 2)
        ep = self._endpoint(context, request)
        ep.ClearField("override")
        self._bump(ep)
        ep.version = -1
        return ep

    def _policy(self, ns: str, svc: str) -> pb.Policy:
        text, version = self.policies.get((ns, svc), ("{}", -1))
        return pb.Policy(namespace=ns, service=svc, json=text, version=version)

    def _store_policy(self, context, request, body: dict) -> pb.Policy:
        try:
            policy = decode_policy(body)
        except PolicyError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        key = (request.namespace, request.service)
        self._check_version(context, self.policies.get(key, ("", -1))[1], request, f"policy of {request.service}")
        self.policies[key] = (encode_policy(policy).decode(), self.policies.get(key, ("", -1))[1] + 1)
        return self._policy(*key)

    def GetPolicy(self, request, context):
        self._enter("GetPolicy", request, context, 1)
        self._service(context, request.namespace, request.service)
        return self._policy(request.namespace, request.service)

    def SetPolicy(self, request, context):
        self._enter("SetPolicy", request, context, 3)
        self._service(context, request.namespace, request.service)
        try:
            body = json.loads(request.json)
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "json: not valid JSON")
        return self._store_policy(context, request, body)

    def SetTrafficSplit(self, request, context):
        self._enter("SetTrafficSplit", request, context, 2)
        svc = self._service(context, request.namespace, request.service)
        versions = {e.labels.get("version") for e in svc.endpoints}
        for subset in request.split:
            if subset not in versions:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"split: no instance of {svc.name} has version {subset!r}")
        body = json.loads(self._policy(request.namespace, request.service).json)
        body["split"] = dict(request.split)
        return self._store_policy(context, request, body)

    def _config(self, ns: str, svc: str) -> pb.RuntimeConfig:
        values, version = self.configs.get((ns, svc), ({}, -1))
        return pb.RuntimeConfig(namespace=ns, service=svc, values=values, version=version)

    def GetConfig(self, request, context):
        self._enter("GetConfig", request, context, 1)
        return self._config(request.namespace, request.service)

    def SetConfig(self, request, context):
        self._enter("SetConfig", request, context, 2)
        key = (request.namespace, request.service)
        values, version = self.configs.get(key, ({}, -1))
        self._check_version(context, version, request, f"config of {request.service}")
        self.configs[key] = ({**values, **request.values}, version + 1)
        return self._config(*key)

    def DeleteConfigKey(self, request, context):
        self._enter("DeleteConfigKey", request, context, 2)
        key = (request.namespace, request.service)
        values, version = self.configs.get(key, ({}, -1))
        if request.key not in values:
            context.abort(grpc.StatusCode.NOT_FOUND, f"config of {request.service} has no key {request.key!r}")
        self._check_version(context, version, request, f"config of {request.service}")
        self.configs[key] = ({k: v for k, v in values.items() if k != request.key}, version + 1)
        return self._config(*key)

    def ListProxies(self, request, context):
        self._enter("ListProxies", request, context, 1)
        return pb.ListProxiesResponse(proxies=[p for p in self.proxies
                                               if not request.namespace or p.namespace == request.namespace])

    def GetProxyConfig(self, request, context):
        self._enter("GetProxyConfig", request, context, 1)
        if request.node_id not in {p.node_id for p in self.proxies}:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no proxy {request.node_id!r} is connected")
        if request.node_id == NODE_P:
            return pb.ProxyConfig(node_id=NODE_P)
        return pb.ProxyConfig(node_id=request.node_id, types=_proxy_resources())

    def WatchEvents(self, request, context):
        self._enter("WatchEvents", request, context, 1)
        for ev in self.events:
            if (not request.namespace or ev.namespace == request.namespace) and (
                    not request.kinds or ev.kind in request.kinds):
                yield ev
        if self.events_end == "overflow":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "subscriber fell 1000 events behind")
        if self.events_end == "hold":
            gone = threading.Event()
            context.add_callback(gone.set)
            gone.wait(60)


def _ts(seconds: float):
    from google.protobuf import timestamp_pb2

    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _serve(fake: FakeAdmin, credentials: grpc.ServerCredentials | None = None) -> grpc.Server:
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    admin_pb2_grpc.add_AdminServiceServicer_to_server(fake, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    fake.cp = f"127.0.0.1:{port}"
    return server


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("MESHKEEPER_CP", raising=False)
    monkeypatch.delenv("MESHKEEPER_TOKEN", raising=False)
    monkeypatch.setenv("COLUMNS", "80")  # what a narrow terminal would say; tables must not care off a tty


@pytest.fixture
def fake():
    admin = FakeAdmin()
    server = _serve(admin)
    try:
        yield admin
    finally:
        server.stop(None)


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)

    def lines(self) -> list[str]:
        return self.out.splitlines()


@pytest.fixture
def mk(fake, capsys):
    """``mk("get", "services", token=VIEWER)``: run the CLI against the fake with --cp and --token."""

    def run(*argv: str, token: str | None = ADMIN, cp: str | None = None) -> Result:
        extra = ["--cp", cp or fake.cp] + (["--token", token] if token is not None else [])
        return invoke(capsys, *argv, *extra)

    return run


def invoke(capsys, *argv: str) -> Result:
    try:
        code = cli_main(list(argv))
    except SystemExit as exc:  # must not happen: main returns its exit code
        pytest.fail(f"main raised SystemExit({exc.code})")
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def one_line_error(res: Result, code: int, *fragments: str) -> None:
    assert res.code == code, res
    assert res.err.startswith("meshkeeper") and res.err.count("\n") == 1, res.err
    assert "Traceback" not in res.err
    for f in fragments:
        assert f in res.err
    assert res.out == ""


def row(res: Result, *first: str) -> list[str]:
    """The cells of the one table row whose first cells are ``first`` (cells are 3+ spaces apart)."""
    rows = [cells for cells in (re.split(r"\s{3,}", line.strip()) for line in res.lines())
            if cells[:len(first)] == list(first)]
    assert len(rows) == 1, f"{len(rows)} rows {first!r} in:\n{res.out}"
    return rows[0]


# --------------------------------------------------------------------------- get


def test_get_services_table_sends_namespace_and_token(mk, fake):
    res = mk("get", "services", token=VIEWER)
    assert res.code == 0 and res.err == ""
    assert res.lines()[0].split() == ["NAMESPACE", "NAME", "PROTOCOL", "INSTANCES", "SERVING", "POLICY", "MTLS",
                                      "AUTHZ"]
    assert row(res, "default", "catalog") == ["default", "catalog", "http", "2", "2", "custom", "-", "-"]
    assert row(res, "default", "frontend") == ["default", "frontend", "http", "0", "0", "default", "-", "-"]
    assert "billing" not in res.out
    (req,) = fake.requests("ListServices")
    assert req.namespace == "default"
    assert fake.calls[0][2]["authorization"] == f"Bearer {VIEWER}"
    assert "\x1b[" not in res.out  # no colours off a terminal


def test_get_services_json_and_yaml(mk):
    doc = mk("get", "svc", "-n", "prod", "-o", "json").json()
    assert doc == {"services": [{"namespace": "prod", "name": "billing", "protocol": "grpc", "instances": 1,
                                 "serving": 1, "has_policy": False, "mtls_mode": "", "authz": ""}]}
    assert yaml.safe_load(mk("get", "services", "-o", "yaml").out)["services"][0]["name"] == "catalog"


def test_flags_before_the_verb(fake, capsys):
    res = invoke(capsys, "--cp", fake.cp, "--token", VIEWER, "-n", "prod", "-o", "json", "get", "services")
    assert res.code == 0 and res.json()["services"][0]["name"] == "billing"
    # The verb's own flag wins over the one before it.
    res = invoke(capsys, "--cp", fake.cp, "--token", VIEWER, "-n", "prod", "get", "services", "-n", "default")
    assert "catalog" in res.out and fake.requests("ListServices")[-1].namespace == "default"


def test_get_endpoints_table(mk):
    res = mk("get", "endpoints", "catalog")
    assert res.code == 0
    assert res.lines()[0].split() == ["ADDRESS", "VERSION", "ZONE", "WEIGHT(REG/OVR/EFF)", "ENABLED", "REGISTERED",
                                      "RPS", "ERR%", "LATENCY"]
    assert row(res, "10.0.0.1:8080") == ["10.0.0.1:8080", "v1", "zone-a", "10/-/10", "yes", "yes", "12.5", "2.0%",
                                         "15.0ms"]
    assert row(res, "10.0.0.2:8080") == ["10.0.0.2:8080", "v2", "zone-b", "10/-/10", "yes", "yes", "-", "-", "-"]


def test_get_endpoints_json(mk, fake):
    doc = mk("get", "ep", "billing", "-n", "prod", "-o", "json").json()
    assert doc["name"] == "billing" and doc["endpoints"][0]["address"] == "10.9.0.1:9090"
    assert doc["endpoints"][0]["registered_weight"] == 5 and doc["endpoints"][0]["version"] == -1
    assert fake.requests("GetService")[0].namespace == "prod"


def test_get_endpoints_of_a_service_without_endpoints_says_so(mk):
    res = mk("get", "endpoints", "frontend")
    assert res.code == 0 and res.out == "" and "no endpoints" in res.err


def test_get_proxies_like_proxy_status(mk, fake):
    res = mk("get", "proxies")
    assert res.code == 0
    assert res.lines()[0].split() == ["NAME", "SERVICE", "INSTANCE", "CDS", "LDS", "EDS", "RDS", "RTDS", "CONNECTED"]
    assert row(res, NODE_A) == [NODE_A, "catalog", "10.0.0.1:15006", "SYNCED", "SYNCED", "STALE", "SYNCED",
                                "NOT SENT", "3d0h"]
    assert row(res, NODE_B) == [NODE_B, "catalog", "10.0.0.2:15006", "NACKED", "SYNCED", "SYNCED", "SYNCED",
                                "SYNCED", "-"]
    assert NODE_P not in res.out
    assert res.lines()[-1] == f"{NODE_B} CDS NACKED version 7: cluster outbound|catalog.default: unknown lb_policy MAGLEV"
    assert fake.requests("ListProxies")[0].namespace == "default"
    # COLUMNS=80 and a pipe: the rows stay whole (the widest row is far wider than 80).
    assert max(len(line) for line in res.lines()) > 80


def test_tables_on_a_terminal_have_styles_and_do_not_wrap(mk, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    res = mk("get", "proxies")
    assert "\x1b[1mNAME" in res.out and "\x1b[1;31mNACKED" in res.out  # bold headers, NACKED in red
    assert len(res.lines()) == 5 and NODE_A in res.out and NODE_B in res.out


def test_get_proxies_every_namespace_and_json(mk, fake):
    res = mk("proxy-status", "-A")
    assert res.lines()[0].split()[:3] == ["NAME", "NAMESPACE", "SERVICE"]
    assert row(res, NODE_P)[:3] == [NODE_P, "prod", "billing"]
    assert fake.requests("ListProxies")[-1].namespace == ""
    doc = mk("ps", "-n", "prod", "-o", "json").json()
    assert [p["node_id"] for p in doc["proxies"]] == [NODE_P]
    assert doc["proxies"][0]["types"][0] == {"type": "CDS", "version_sent": "2", "version_acked": "2",
                                             "last_nack_error": "", "last_nack_version": ""}


def test_proxy_sync_states_and_ages():
    assert render.sync_state(None) == "NOT SENT"
    assert render.sync_state(pb.TypeStatus(type="CDS")) == "NOT SENT"
    assert render.sync_state(pb.TypeStatus(version_sent="2", version_acked="2")) == "SYNCED"
    assert render.sync_state(pb.TypeStatus(version_sent="3", version_acked="2")) == "STALE"
    assert render.sync_state(pb.TypeStatus(version_sent="3", version_acked="3", last_nack_error="x")) == "NACKED"
    assert [render.age(s) for s in (5, 119, 200, 3600, 9 * 3600, 3 * 86400 + 7200, 400 * 86400)] == [
        "5s", "119s", "3m20s", "60m", "9h", "3d2h", "400d"]


# --------------------------------------------------------------------------- endpoint overrides


def test_weight_prints_the_endpoint_and_sends_no_version_unless_asked(mk, fake):
    res = mk("weight", "catalog", "10.0.0.2:8080", "3", token=OPERATOR)
    assert res.code == 0, res
    assert row(res, "10.0.0.2:8080")[3] == "10/3/3"
    (req,) = fake.requests("SetWeight")
    assert (req.namespace, req.service, req.address, req.weight) == ("default", "catalog", "10.0.0.2:8080", 3)
    assert not req.HasField("expected_version")

    doc = mk("weight", "catalog", "10.0.0.2:8080", "0", "--if-version", "0", "-o", "json").json()
    assert doc["effective_weight"] == 0 and doc["override"] == {"weight": 0} and doc["version"] == 1
    req = fake.requests("SetWeight")[-1]
    assert req.HasField("expected_version") and req.expected_version == 0


def test_if_version_minus_one_is_sent(mk, fake):
    mk("weight", "catalog", "10.0.0.1:8080", "4", "--if-version", "-1")
    req = fake.requests("SetWeight")[-1]
    assert req.HasField("expected_version") and req.expected_version == -1


def test_stale_if_version_is_aborted_in_words(mk, fake):
    res = mk("weight", "catalog", "10.0.0.1:8080", "4", "--if-version", "5")
    one_line_error(res, 1, "changed since version 5 was read; read it again", "ABORTED",
                   "override 10.0.0.1:8080 is at version -1, not 5")


def test_enable_disable_reset(mk, fake):
    res = mk("disable", "catalog", "10.0.0.1:8080", token=OPERATOR)
    assert res.code == 0 and row(res, "10.0.0.1:8080")[4] == "no"
    assert fake.requests("SetEnabled")[-1].enabled is False
    doc = mk("enable", "catalog", "10.0.0.1:8080", "-o", "json").json()
    assert doc["enabled"] is True and doc["override"] == {"enabled": True}
    assert fake.requests("SetEnabled")[-1].enabled is True
    mk("weight", "catalog", "10.0.0.1:8080", "1")
    res = mk("reset", "catalog", "10.0.0.1:8080", "--if-version", "2")
    assert res.code == 0 and row(res, "10.0.0.1:8080")[3:5] == ["10/-/10", "yes"]
    req = fake.requests("ClearOverride")[-1]
    assert (req.address, req.expected_version) == ("10.0.0.1:8080", 2)


# --------------------------------------------------------------------------- policy and split


def test_policy_get_yaml_for_people_json_for_scripts(mk, fake):
    res = mk("policy", "get", "catalog", token=VIEWER)
    assert res.code == 0
    assert res.lines()[0] == "# catalog.default: policy version 4"
    assert yaml.safe_load(res.out) == {"retry": {"attempts": 2, "on": ["5xx"]}}
    doc = mk("policy", "get", "catalog", "-o", "json").json()
    assert doc["version"] == 4 and json.loads(doc["json"]) == {"retry": {"attempts": 2, "on": ["5xx"]}}
    res = mk("policy", "get", "frontend")
    assert "no policy set" in res.lines()[0] and yaml.safe_load(res.out) == {}


def test_policy_set_from_a_yaml_file(mk, fake, tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text("# catalog\nretry:\n  attempts: 3\n  on: [5xx, reset]\noutlier:\n  consecutive_5xx: 5\n")
    res = mk("policy", "set", "catalog", "-f", str(f), "--if-version", "4")
    assert res.code == 0, res
    (req,) = fake.requests("SetPolicy")
    # `on` stays a key: YAML 1.1 would have made it the boolean True.
    assert json.loads(req.json) == {"retry": {"attempts": 3, "on": ["5xx", "reset"]}, "outlier": {"consecutive_5xx": 5}}
    assert req.expected_version == 4
    assert res.lines()[0] == "# catalog.default: policy version 5"
    assert yaml.safe_load(res.out)["retry"]["on"] == ["5xx", "reset"]


def test_policy_set_from_stdin_and_round_trip(mk, fake, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO('{"timeout_ms": 2000}'))
    res = mk("policy", "set", "frontend", "-f", "-", "-o", "json")
    assert res.code == 0 and json.loads(res.json()["json"]) == {"timeout_ms": 2000}
    assert not fake.requests("SetPolicy")[0].HasField("expected_version")
    # What `policy get` prints for people is a file `policy set` takes back.
    printed = mk("policy", "get", "catalog").out
    monkeypatch.setattr(sys, "stdin", io.StringIO(printed))
    assert mk("policy", "set", "catalog", "-f", "-").code == 0
    assert json.loads(fake.requests("SetPolicy")[-1].json) == {"retry": {"attempts": 2, "on": ["5xx"]}}


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("retry: [unclosed\n", "not valid YAML or JSON"),
    ("- a\n- b\n", "a policy is a mapping of fields, not a list"),
    ("  \n", "is empty"),
    ("when: 2024-01-01\n", "not JSON serializable"),
])
def test_policy_set_bad_files_are_one_line(mk, fake, tmp_path, content, message):
    f = tmp_path / "p.yaml"
    if content is not None:
        f.write_text(content)
    one_line_error(mk("policy", "set", "catalog", "-f", str(f)), 1, message)
    assert fake.requests("SetPolicy") == []


def test_policy_set_invalid_field_names_the_field(mk, tmp_path):
    f = tmp_path / "p.json"
    f.write_text('{"outlier": {"max_ejection_percent": 150}}')
    one_line_error(mk("policy", "set", "catalog", "-f", str(f)), 1, "INVALID_ARGUMENT",
                   "policy.outlier.max_ejection_percent")


def test_policy_set_needs_the_admin_role(mk, tmp_path):
    f = tmp_path / "p.json"
    f.write_text("{}")
    one_line_error(mk("policy", "set", "catalog", "-f", str(f), token=OPERATOR), 1,
                   "permission denied (PERMISSION_DENIED", "otto has the operator role; SetPolicy needs admin")


def test_split_sends_the_map_and_prints_the_policy(mk, fake):
    res = mk("split", "catalog", "v1=90", "v2=10", token=OPERATOR)
    assert res.code == 0, res
    (req,) = fake.requests("SetTrafficSplit")
    assert dict(req.split) == {"v1": 90, "v2": 10} and not req.HasField("expected_version")
    assert yaml.safe_load(res.out)["split"] == {"v1": 90, "v2": 10}
    doc = mk("split", "catalog", "v1=100", "--if-version", "5", "-o", "json").json()
    assert json.loads(doc["json"])["split"] == {"v1": 100} and doc["version"] == 6
    assert fake.requests("SetTrafficSplit")[-1].expected_version == 5
    assert mk("split", "catalog", "--clear", token=OPERATOR).code == 0
    assert dict(fake.requests("SetTrafficSplit")[-1].split) == {}


@pytest.mark.parametrize("pairs, message", [
    ([], "give VERSION=PERCENT pairs (like v1=90 v2=10), or --clear"),
    (["v1=90", "v2=20"], "add up to 110, not 100"),
    (["v1=90"], "add up to 90, not 100"),
    (["v1=ninety", "v2=10"], "v1=ninety: the percent must be a whole number"),
    (["v1", "v2=100"], "'v1': expected VERSION=PERCENT"),
    (["v1=50", "v1=50"], "'v1' is given twice"),
    (["v1=-10", "v2=110"], "v1=-10: the percent must be a whole number"),
])
def test_split_is_checked_locally(mk, fake, pairs, message):
    one_line_error(mk("split", "catalog", *pairs), 2, message)
    assert fake.requests("SetTrafficSplit") == []


def test_split_to_an_unknown_version_is_refused(mk):
    one_line_error(mk("split", "catalog", "v1=50", "v9=50"), 1, "FAILED_PRECONDITION",
                   "no instance of catalog has version 'v9'")


# --------------------------------------------------------------------------- config centre


def test_config_get(mk, fake):
    res = mk("config", "get", "catalog", token=VIEWER)
    assert res.code == 0 and res.lines()[0].split() == ["KEY", "VALUE"]
    assert row(res, "feature.x") == ["feature.x", "on"] and row(res, "timeout") == ["timeout", "250ms"]
    assert mk("config", "get", "catalog", "timeout").out == "250ms\n"
    assert mk("config", "get", "catalog", "timeout", "-o", "json").json() == {
        "namespace": "default", "service": "catalog", "values": {"timeout": "250ms"}, "version": 2}
    assert mk("config", "get", "catalog", "-o", "json").json()["values"] == {"feature.x": "on", "timeout": "250ms"}
    one_line_error(mk("config", "get", "catalog", "nope"), 1, "has no key 'nope'")


def test_config_set_and_delete(mk, fake):
    res = mk("config", "set", "catalog", "timeout=1s", "query=a=b", "empty=", "--if-version", "2", token=OPERATOR)
    assert res.code == 0, res
    (req,) = fake.requests("SetConfig")
    assert dict(req.values) == {"timeout": "1s", "query": "a=b", "empty": ""} and req.expected_version == 2
    assert row(res, "query") == ["query", "a=b"] and row(res, "timeout") == ["timeout", "1s"]
    doc = mk("config", "delete", "catalog", "query", "-o", "json").json()
    assert "query" not in doc["values"] and doc["version"] == 4
    req = fake.requests("DeleteConfigKey")[-1]
    assert (req.service, req.key, req.HasField("expected_version")) == ("catalog", "query", False)
    one_line_error(mk("config", "delete", "catalog", "query"), 1, "not found (NOT_FOUND", "no key 'query'")
    one_line_error(mk("config", "set", "catalog", "novalue"), 2, "'novalue': expected KEY=VALUE")


def test_config_of_a_service_without_config(mk):
    res = mk("config", "get", "frontend")
    assert res.code == 0 and res.out == "" and "No runtime config" in res.err


# --------------------------------------------------------------------------- proxy-config


def test_proxy_config_summaries(mk, fake):
    res = mk("proxy-config", NODE_A, token=VIEWER)
    assert res.code == 0, res
    heads = [line for line in res.lines() if "(version" in line]
    assert heads == ["CDS (version 7, 2 resources)", "EDS (version 8, 1 resource)", "LDS (version 7, 2 resources)",
                     "RDS (version 7, 1 resource)", "RTDS (version 3, 1 resource)"]
    assert row(res, "outbound|catalog.default|v1", "EDS") == ["outbound|catalog.default|v1", "EDS", "ROUND_ROBIN", "no"]
    assert row(res, "inbound|8080") == ["inbound|8080", "STATIC", "ROUND_ROBIN", "no"]
    assert row(res, "outbound|catalog.default|v1", "10.0.0.1:8080") == [
        "outbound|catalog.default|v1", "10.0.0.1:8080", "zone-a", "10", "HEALTHY"]
    assert row(res, "outbound", "127.0.0.1")[2:] == ["15001", "outbound"]
    assert row(res, "inbound", "10.0.0.1") == ["inbound", "10.0.0.1", "15006", "inbound (inline)"]
    assert row(res, "outbound", "catalog.default") == [
        "outbound", "catalog.default", "catalog, catalog.default", "prefix:/",
        "outbound|catalog.default|v1 90, outbound|catalog.default|v2 10"]
    assert row(res, "catalog", "feature.x") == ["catalog", "feature.x", "on"]
    assert fake.requests("GetProxyConfig")[0].node_id == NODE_A


def test_proxy_config_one_type_short_name_and_json(mk, fake):
    res = mk("pc", "10.0.0.1~catalog-15006.default", "--type", "EDS")
    assert res.code == 0, res
    assert res.lines()[0] == "EDS (version 8, 1 resource)" and "CDS" not in res.out
    assert fake.requests("GetProxyConfig")[-1].node_id == NODE_A
    doc = mk("proxy-config", "10.0.0.2:15006", "--type", "rds", "-o", "json").json()
    assert fake.requests("GetProxyConfig")[-1].node_id == NODE_B
    assert doc["node_id"] == NODE_B and [t["type"] for t in doc["types"]] == ["RDS"]
    vh = doc["types"][0]["resources"]["outbound"]["virtualHosts"][0]
    assert vh["name"] == "catalog.default"
    full = mk("proxy-config", NODE_A, "-o", "json").json()
    assert full["types"][0]["resources"]["inbound|8080"]["type"] == "STATIC"


def test_proxy_config_of_unknown_or_ambiguous_nodes(mk, fake):
    one_line_error(mk("proxy-config", "sidecar~1.2.3.4~x-1.default"), 1, "not found (NOT_FOUND",
                   "no proxy 'sidecar~1.2.3.4~x-1.default' is connected")
    one_line_error(mk("proxy-config", "nothing-here"), 1, "no proxy 'nothing-here' is connected")
    one_line_error(mk("proxy-config", "catalog-15006.default"), 1, f"matches 2 proxies: {NODE_A}, {NODE_B}")
    res = mk("proxy-config", NODE_P)
    assert res.code == 0 and "has ACKed no resources" in res.err


# --------------------------------------------------------------------------- events


def test_events_print_one_line_each_until_the_stream_ends(mk, fake):
    res = mk("events", "-A", token=VIEWER)
    assert res.code == 0 and res.err == ""
    assert res.lines() == [
        "2023-11-14T22:13:20Z  registry     default/catalog  instances 2 -> 3",
        f"2023-11-14T22:13:21Z  push         default/catalog  {NODE_A}  EDS version 9",
        f"2023-11-14T22:13:22Z  nack         default/catalog  {NODE_B}  CDS version 7 refused",
        "2023-11-14T22:13:23Z  admin_write  prod/billing  by otto  weight 10.9.0.1:9090 = 0",
    ]
    req = fake.requests("WatchEvents")[0]
    assert req.namespace == "" and list(req.kinds) == []


def test_events_filters_and_json_lines(mk, fake):
    res = mk("events", "--kind", "push,nack", "--kind", "registry", "-o", "json")
    req = fake.requests("WatchEvents")[0]
    assert req.namespace == "default" and list(req.kinds) == ["push", "nack", "registry"]
    docs = [json.loads(line) for line in res.lines()]
    assert [d["kind"] for d in docs] == ["registry", "push", "nack"]
    assert docs[1]["node_id"] == NODE_A and docs[0]["at"] == "2023-11-14T22:13:20Z"


def test_events_stream_ended_by_the_server_is_one_line(mk, fake):
    fake.events_end = "overflow"
    res = mk("events", "-n", "prod")
    assert res.code == 1 and res.out.count("\n") == 1  # the one prod event came first
    assert res.err.count("\n") == 1 and "RESOURCE_EXHAUSTED" in res.err and "1000 events behind" in res.err


def test_events_ctrl_c_exits_0_without_a_traceback(fake):
    fake.events_end = "hold"
    proc = subprocess.Popen([sys.executable, "-m", "meshkeeper.cli", "events", "-A", "--cp", fake.cp,
                             "--token", VIEWER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        first = [proc.stdout.readline() for _ in fake.events]  # blocks until the CLI has printed them
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    assert [line.split()[1] for line in first] == ["registry", "push", "nack", "admin_write"]
    assert proc.returncode == 0 and rest == "" and err == ""


# --------------------------------------------------------------------------- errors


def test_no_token_mentions_how_to_pass_one(mk):
    one_line_error(mk("get", "services", token=None), 1, "UNAUTHENTICATED", "--token", "MESHKEEPER_TOKEN")


def test_unknown_token(mk, fake):
    one_line_error(mk("get", "services", token="wrong"), 1, "did not accept the token", "unknown token")
    assert fake.calls[0][2]["authorization"] == "Bearer wrong"


def test_viewer_cannot_write(mk, fake):
    one_line_error(mk("weight", "catalog", "10.0.0.1:8080", "3", token=VIEWER), 1, "PERMISSION_DENIED",
                   "vera has the viewer role; SetWeight needs operator")


def test_not_found(mk):
    one_line_error(mk("get", "endpoints", "nope"), 1, "not found (NOT_FOUND", "service 'nope'")
    one_line_error(mk("weight", "catalog", "10.0.0.9:8080", "3"), 1, "catalog has no instance 10.0.0.9:8080")


def test_unreachable_control_plane(mk):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        cp = f"127.0.0.1:{s.getsockname()[1]}"
        one_line_error(mk("get", "services", cp=cp), 1, f"cannot reach the control plane at {cp} (")


def test_deadline(mk, fake):
    fake.slow = True
    one_line_error(mk("get", "services", "--timeout", "0.2"), 1, "did not answer within 0.2s", "DEADLINE_EXCEEDED")


def test_environment_variables(fake, capsys, monkeypatch):
    monkeypatch.setenv("MESHKEEPER_CP", fake.cp)
    monkeypatch.setenv("MESHKEEPER_TOKEN", OPERATOR)
    res = invoke(capsys, "config", "set", "catalog", "a=1")
    assert res.code == 0 and fake.calls[-1][2]["authorization"] == f"Bearer {OPERATOR}"
    res = invoke(capsys, "get", "services", "--token", VIEWER)  # the flag wins over the environment
    assert res.code == 0 and fake.calls[-1][2]["authorization"] == f"Bearer {VIEWER}"
    monkeypatch.setenv("MESHKEEPER_CP", "nohostport")
    one_line_error(invoke(capsys, "get", "services"), 2, "MESHKEEPER_CP 'nohostport': expected HOST:PORT")


@pytest.mark.parametrize("argv, message", [
    (["get"], "the following arguments are required: RESOURCE"),
    (["get", "servics"], "invalid choice: 'servics'"),
    (["get", "endpoints"], "the following arguments are required: SVC"),
    (["weight", "catalog", "nohostport", "3"], "'nohostport': expected HOST:PORT"),
    (["weight", "catalog", "10.0.0.1:8080", "-3"], "-3 is not a weight"),
    (["weight", "catalog", "10.0.0.1:8080", "3", "--if-version", "-2"], "'-2' is not a version"),
    (["weight", "catalog", "10.0.0.1:8080", "99999999999"], "99999999999 is not a weight (0..10000"),
    (["weight", "catalog", "10.0.0.1:8080", "3", "--if-version", "3000000000"], "'3000000000' is not a version"),
    (["split", "catalog", "v1=\u00b2", "v2=98"], "the percent must be a whole number"),
    (["get", "services", "--cp", "localhost"], "'localhost': expected HOST:PORT"),
    (["get", "services", "--timeout", "0"], "positive number of seconds"),
    (["get", "services", "-o", "xml"], "invalid choice: 'xml'"),
    (["get", "services", "--cert", "c.pem"], "--cert and --key go together"),
    (["events", "--kind", "bogus"], "'bogus' is not an event kind"),
    (["policy", "set", "catalog"], "the following arguments are required: -f/--filename"),
    (["proxy-config", "x", "--type", "sds"], "invalid choice: 'sds'"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    one_line_error(invoke(capsys, *argv), 2, message)


def test_unreadable_ca_file_is_one_line(mk, tmp_path):
    one_line_error(mk("get", "services", "--ca", str(tmp_path / "missing.pem")), 1, "cannot read --ca")
    (tmp_path / "not.pem").write_text("hello\n")
    one_line_error(mk("get", "services", "--ca", str(tmp_path / "not.pem")), 1, "--ca", "not a PEM file")


def test_cli_usage_and_unknown_commands(capsys):
    assert invoke(capsys, "--help").code == 0
    for verb in ("get", "weight", "enable", "disable", "reset", "policy", "split", "config", "proxy-config", "events"):
        assert f"\n  {verb} " in USAGE
    res = invoke(capsys, "gte", "services")
    one_line_error(res, 2, "unknown command 'gte'", "did you mean 'get'?")
    assert invoke(capsys, "weight", "--help").out.startswith("usage: meshkeeper weight")


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    from tests.harness.tls import make_tls

    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_fake(tls):
    admin = FakeAdmin()
    creds = grpc.ssl_server_credentials([(tls.server_key.read_bytes(), tls.server_cert.read_bytes())],
                                        root_certificates=tls.ca.read_bytes(), require_client_auth=True)
    server = _serve(admin, creds)
    try:
        yield admin
    finally:
        server.stop(None)


def test_mutual_tls(tls, tls_fake, capsys):
    base = ["get", "services", "--cp", tls_fake.cp, "--token", VIEWER]
    res = invoke(capsys, *base, "--ca", str(tls.ca), "--cert", str(tls.client_cert), "--key", str(tls.client_key))
    assert res.code == 0 and "catalog" in res.out
    # By name: the certificate carries DNS:localhost too.
    res = invoke(capsys, *base, "--ca", str(tls.ca), "--cert", str(tls.client_cert), "--key", str(tls.client_key),
                 "--tls-server-name", "localhost")
    assert res.code == 0 and "catalog" in res.out


@pytest.mark.parametrize("flags", ["no client certificate", "untrusted server", "plaintext", "wrong name"])
def test_tls_failures_are_one_line(tls, tls_fake, capsys, flags):
    client = ["--cert", str(tls.client_cert), "--key", str(tls.client_key)]
    extra = {"no client certificate": ["--ca", str(tls.ca)],
             "untrusted server": ["--ca", str(tls.other_ca), *client],
             "plaintext": [],
             "wrong name": ["--ca", str(tls.ca), *client, "--tls-server-name", "elsewhere.example"]}[flags]
    res = invoke(capsys, "get", "services", "--cp", tls_fake.cp, "--token", VIEWER, *extra)
    one_line_error(res, 1, f"cannot reach the control plane at {tls_fake.cp} (")
    assert tls_fake.requests("ListServices") == []


def test_route_domains_are_shortened_like_istioctl():
    from meshkeeper.ctl.render import _domains

    assert _domains([]) == "-"
    assert _domains(["catalog"]) == "catalog"
    assert _domains(["catalog", "catalog.default", "catalog:80", "catalog.default:80"]) == (
        "catalog, catalog.default + 2 more")
