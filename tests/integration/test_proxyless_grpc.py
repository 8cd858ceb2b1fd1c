"""Proxyless gRPC (DESIGN §12, issue 14): stock grpcio clients and servers, no sidecar.

Three grpcio servers are kept registered by ``meshkeeper register`` (gRPC health checks) with
weights 1, 2 and 7; a grpcio client process with ``GRPC_XDS_BOOTSTRAP`` from ``meshkeeper bootstrap
--proxyless`` calls ``xds:///catalog.<ns>`` and is balanced by grpcio itself, from what the control
plane serves it (controlplane/proxyless.py).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest

from meshkeeper.admin.v1 import admin_pb2 as pb
from meshkeeper.admin.v1 import admin_pb2_grpc
from meshkeeper.demo.process import meshkeeper_argv
from meshkeeper.registry import Paths
from tests.harness import free_port, http_get, wait_until
from tests.harness.grpc_apps import client_argv, server_argv

pytestmark = pytest.mark.integration

WEIGHTS = {"a": 1, "b": 2, "c": 7}
CALLS = 2000
TOLERANCE = 0.03  # points of share, the acceptance


@dataclass
class Mesh:
    procs: object
    zk: str
    ns: str
    xds_port: int
    cp: object
    servers: dict[str, int]  # name -> port
    client: object
    processes: dict[str, object] = field(default_factory=dict)  # "grpc-<name>", "register-<name>"

    def calls(self, n: int, user: str = "", target: str = "") -> tuple[dict[str, int], dict[str, int]]:
        url = f"http://127.0.0.1:{self.client.port('port')}/calls?n={n}&user={user}"
        if target:
            url += f"&target={target}"
        status, _, body = http_get(url, timeout=120)
        assert status == 200
        got = json.loads(body)
        return got["ok"], got["errors"]

    def key(self, name: str) -> str:
        return f"127.0.0.1:{self.servers[name]}"

    def proxyless(self) -> list[dict]:
        _, _, body = http_get(f"http://127.0.0.1:{self.cp.port('http_port')}/api/proxies")
        return [p for p in json.loads(body) if p["proxyless"]]

    def synced(self) -> bool:
        """The client holds LDS, RDS, CDS and EDS from this control plane, all ACKed."""
        got = self.proxyless()
        return bool(got) and all(got[0]["types"].get(t, {}).get("version_acked") for t in ("LDS", "RDS", "CDS", "EDS"))

    def set_enabled(self, name: str, enabled: bool) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.xds_port}") as ch:
            admin_pb2_grpc.AdminServiceStub(ch).SetEnabled(pb.SetEnabledRequest(
                namespace=self.ns, service="catalog", address=self.key(name), enabled=enabled), timeout=10)

    def start_cp(self, name: str = "controlplane") -> None:
        self.cp = self.procs.meshkeeper("controlplane", "--zk", self.zk, "--xds-port", str(self.xds_port),
                                        "--http-port", "0", "--insecure-admin", name=name)


def start_mesh(procs, zk_server, zk_client, namespace, tmp_path, fail_every: dict[str, int] | None = None) -> Mesh:
    mesh = Mesh(procs, zk_server.hosts, namespace, free_port(), None, {}, None)
    mesh.start_cp()
    for name, weight in WEIGHTS.items():
        argv = server_argv(name, fail_every=(fail_every or {}).get(name, 0))
        server = mesh.processes[f"grpc-{name}"] = procs.start(argv, role="grpcapp", name=f"grpc-{name}")
        port = mesh.servers[name] = server.port("port")
        mesh.processes[f"register-{name}"] = procs.meshkeeper(
            "register", "--service", "catalog", "--port", str(port), "-n", namespace, "--zk", zk_server.hosts,
            "--weight", str(weight), "--health-interval", "0.2", name=f"register-{name}")
    instances = Paths(namespace).instances("catalog")
    wait_until(lambda: zk_client.exists(instances) and len(zk_client.get_children(instances)) == 3, 10,
               message="three grpcio servers registered")
    bootstrap = tmp_path / "bootstrap.json"
    subprocess.run(meshkeeper_argv("bootstrap", "--proxyless", "--cp", f"127.0.0.1:{mesh.xds_port}",
                                   "-n", namespace, "--service", "frontend", "-o", str(bootstrap)),
                   check=True, timeout=30)
    mesh.client = procs.start(client_argv(f"xds:///catalog.{namespace}"), role="grpcclient",
                              env={"GRPC_XDS_BOOTSTRAP": str(bootstrap)})
    return mesh


@pytest.fixture
def mesh(procs, zk_server, zk_client, namespace, tmp_path) -> Mesh:
    return start_mesh(procs, zk_server, zk_client, namespace, tmp_path)


def shares_within(mesh: Mesh, n: int = CALLS) -> dict[str, float]:
    ok, errors = mesh.calls(n)
    assert errors == {}
    return {name: ok.get(name, 0) / n for name in WEIGHTS}


def within_tolerance(shares: dict[str, float]) -> bool:
    return all(abs(shares[name] - weight / 10) <= TOLERANCE for name, weight in WEIGHTS.items())


def balanced(mesh: Mesh, label: str) -> dict[str, float]:
    """Shares of CALLS calls within TOLERANCE of the weights. grpcio picks a locality at random per
    call (weighted_target's picker), so a sample of 2,000 is binomial: the 70% share has a standard
    deviation of 1.02 points and lands outside 3 points about once in 300 samples. One more
    independent sample is drawn before failing (both are printed), which makes a false failure
    about one in 100,000 runs."""
    samples = []
    for _ in range(2):
        samples.append(shares_within(mesh))
        print(f"{label} over {CALLS} calls: {samples[-1]}")
        if within_tolerance(samples[-1]):
            return samples[-1]
    raise AssertionError(f"{label}: two samples outside {TOLERANCE:.0%} of the weights: {samples}")


def test_stock_grpcio_client_is_balanced_by_the_registry_weights(mesh):
    balanced(mesh, "proxyless split")
    # A target with a port is a listener of that exact name (the port is only part of the name).
    ok, errors = mesh.calls(100, target=f"xds:///catalog.{mesh.ns}:50051")
    assert errors == {} and set(ok) == set(WEIGHTS), (ok, errors)
    # grpcio 1.85 runs one xDS client, so one ADS stream, per channel target.
    streams = mesh.proxyless()
    assert len(streams) == 2
    for proxy in streams:
        assert proxy["namespace"] == mesh.ns and proxy["service"] == "frontend"
        assert {t: s["nack"] for t, s in proxy["types"].items()} == dict.fromkeys(("CDS", "EDS", "LDS", "RDS"))
        assert all(s["nacks"] == 0 and s["version_acked"] == s["version_sent"] for s in proxy["types"].values())


def test_disabled_endpoint_leaves_within_a_second(mesh):
    assert set(mesh.calls(200)[0]) == set(WEIGHTS)
    mesh.set_enabled("c", False)
    written = time.monotonic()

    def gone() -> bool:
        ok, errors = mesh.calls(20)
        assert errors == {}
        return "c" not in ok

    wait_until(gone, 1.0, 0.0, message="the disabled server gets no calls within 1 s")
    print(f"disabled endpoint left after {time.monotonic() - written:.3f} s")
    ok, errors = mesh.calls(300)
    assert errors == {} and "c" not in ok and set(ok) == {"a", "b"}
    mesh.set_enabled("c", True)
    wait_until(lambda: "c" in mesh.calls(50)[0], 2.0, 0.0, message="the enabled server is back")
    assert mesh.proxyless()[0]["types"]["EDS"]["nacks"] == 0


def test_control_plane_restart_leaves_calls_working(mesh):
    assert mesh.calls(50)[1] == {}  # grpcio's channel (and its xDS client) starts at the first call
    wait_until(mesh.synced, 10, message="client synced")
    failures, served, stop = Counter(), Counter(), threading.Event()

    def traffic() -> None:  # calls all along: before the kill, without a control plane, and after
        while not stop.is_set():
            ok, errors = mesh.calls(20)
            served.update(ok)
            failures.update(errors)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        mesh.cp.kill()
        ok, errors = mesh.calls(200)  # no control plane: grpcio keeps its last config
        assert errors == {} and set(ok) == set(WEIGHTS)
        mesh.start_cp(name="controlplane-2")
        started = time.monotonic()
        wait_until(mesh.synced, 30, message="the client resynced with the new control plane")
        print(f"client resynced {time.monotonic() - started:.3f} s after the new control plane was ready")
        ok, errors = mesh.calls(200)
        assert errors == {} and set(ok) == set(WEIGHTS)
    finally:
        stop.set()
        thread.join()
    print(f"calls across the restart: {sum(served.values())} served, failures {dict(failures)}")
    assert failures == Counter() and sum(served.values()) > 0
    # The new control plane drives the client.
    mesh.set_enabled("a", False)
    wait_until(lambda: "a" not in mesh.calls(20)[0], 2.0, 0.0, message="the new control plane's override applies")
    assert all(s["nacks"] == 0 for s in mesh.proxyless()[0]["types"].values())


def test_policies_grpcio_honours_are_acked_and_ring_hash_keeps_the_weights(mesh, zk_client):
    assert mesh.calls(50)[1] == {}
    wait_until(mesh.synced, 10, message="client synced")
    policy = {"lb": {"policy": "ring_hash", "hash_on": "header:x-user"},
              "outlier": {"consecutive_5xx": 3, "interval_ms": 1000,
                          "success_rate": {"minimum_hosts": 3, "request_volume": 10},
                          "failure_percentage": {"threshold": 50, "enforcing_percent": 100}},
              "retry": {"attempts": 2, "on": ["5xx", "reset", "connect-failure"]},
              "timeout_ms": 3000, "circuit_breaker": {"max_requests": 100},
              "fault": {"delay_ms": 1, "delay_percent": 1}}
    policy_applied(mesh, zk_client, policy, ("CDS", "RDS"))
    balanced(mesh, "ring hash split")
    # The hash policy is honoured: one user, one server; many users spread over all three.
    for user in ("alice", "bob", "carol"):
        ok, errors = mesh.calls(30, user)
        assert errors == {} and len(ok) == 1, (user, ok)
    spread = set()
    for i in range(150):  # the 10% server misses 150 random users once in 7 million runs
        spread |= set(mesh.calls(1, f"user-{i}")[0])
    assert spread == set(WEIGHTS)


def policy_applied(mesh: Mesh, zk_client, policy: dict, types: tuple[str, ...]) -> None:
    """Write the service's policy and wait until the client ACKed new versions of ``types``, NACK-free."""
    before = {t: s["version_acked"] for t, s in mesh.proxyless()[0]["types"].items()}
    path = Paths(mesh.ns).policy("catalog")
    data = json.dumps(policy).encode()
    if zk_client.exists(path):
        zk_client.set(path, data)
    else:
        zk_client.create(path, data)

    def applied() -> bool:
        got = mesh.proxyless()[0]["types"]
        assert all(s["nacks"] == 0 for s in got.values()), got
        return all(got[t]["version_acked"] not in ("", before[t]) for t in types)

    wait_until(applied, 5, message=f"{', '.join(types)} of the policy ACKed")


def test_retries_and_outlier_ejection_are_honoured(procs, zk_server, zk_client, namespace, tmp_path):
    """Server c answers UNAVAILABLE to every second call: grpcio retries it away (gRFC A44) with
    the policy's retry, and ejects c by failure percentage (gRFC A50) with its outlier section."""
    mesh = start_mesh(procs, zk_server, zk_client, namespace, tmp_path, fail_every={"c": 2})
    ok, errors = mesh.calls(400)
    assert set(errors) == {"UNAVAILABLE"} and errors["UNAVAILABLE"] > 50, (ok, errors)
    wait_until(mesh.synced, 10, message="client synced")

    policy_applied(mesh, zk_client, {"retry": {"attempts": 2, "on": ["5xx"]}}, ("RDS",))
    ok, errors = mesh.calls(400)
    assert errors == {} and "c" in ok, (ok, errors)

    outlier = {"interval_ms": 200, "failure_percentage": {"threshold": 30, "minimum_hosts": 3,
                                                         "request_volume": 10, "enforcing_percent": 100}}
    policy_applied(mesh, zk_client, {"outlier": outlier}, ("CDS", "RDS"))

    def ejected() -> bool:
        ok, errors = mesh.calls(50)
        return not errors and "c" not in ok

    wait_until(ejected, 10, 0.0, message="c ejected by failure percentage")
    ok, errors = mesh.calls(300)
    assert errors == {} and set(ok) == {"a", "b"}, (ok, errors)


def test_register_follows_the_servers_health_and_leaves_on_sigterm(mesh, zk_client):
    instances = Paths(mesh.ns).instances("catalog")

    def registered() -> set[str]:
        return set(zk_client.get_children(instances))

    assert registered() == {mesh.key(n) for n in WEIGHTS}
    assert mesh.calls(100)[1] == {}
    # A server that stops answering health checks leaves the registry (three failed checks)...
    mesh.processes["grpc-c"].kill()
    wait_until(lambda: mesh.key("c") not in registered(), 3, 0.02, message="the dead server deregistered")
    ok, errors = mesh.calls(200)
    assert errors == {} and set(ok) == {"a", "b"}, (ok, errors)
    # ... and `meshkeeper register` stopping takes its instance out at once.
    assert mesh.processes["register-b"].terminate() == 0
    assert registered() == {mesh.key("a")}
    wait_until(lambda: set(mesh.calls(20)[0]) == {"a"}, 1.0, 0.0, message="only a is called")
    assert mesh.calls(100) == ({"a": 100}, {})


def test_timeout_and_fault_injection_are_honoured(mesh, zk_client):
    """The route timeout reaches grpcio as max_stream_duration (gRFC A31), faults through its fault
    filter (A33): a 300 ms injected delay under a 100 ms timeout is DEADLINE_EXCEEDED, an injected
    503 is UNAVAILABLE."""
    assert mesh.calls(20)[1] == {}
    wait_until(mesh.synced, 10, message="client synced")
    policy_applied(mesh, zk_client, {"timeout_ms": 100, "fault": {"delay_ms": 300, "delay_percent": 100}}, ("RDS",))
    assert mesh.calls(5) == ({}, {"DEADLINE_EXCEEDED": 5})
    policy_applied(mesh, zk_client, {"fault": {"abort_status": 503, "abort_percent": 100}}, ("RDS",))
    assert mesh.calls(5) == ({}, {"UNAVAILABLE": 5})
    policy_applied(mesh, zk_client, {}, ("RDS",))
    assert mesh.calls(20)[1] == {}
