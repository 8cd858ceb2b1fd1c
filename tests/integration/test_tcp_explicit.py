"""A thrift service in explicit mode (DESIGN §4: a TCP listener per tcp service): each caller's
sidecar listens on 127.0.0.1:<the service's port> and balances connections over the instances'
inbound listeners, which pass them to the app at L4. Pods keep the hosts apart (a caller's
listener takes the port the instances' apps use on theirs); no capture rules: explicit mode."""

from __future__ import annotations

import json

import pytest

from meshkeeper.demo.process import app_argv, http_get, wait_until
from tests.harness import pods
from tests.harness.pods import PodNetwork, unavailable_reason
from tests.harness.thrift_apps import call_argv, serve_argv

pytestmark = pytest.mark.integration
pod_network, pod_zookeeper = pods.pod_network, pods.pod_zookeeper  # fixtures

NS = "tcpx"
APP_UID = 1000
THRIFT_PORT = 9090


@pytest.fixture(autouse=True)
def _needs_pods() -> None:
    if reason := unavailable_reason():
        pytest.skip(f"no pod network: {reason}")


def test_thrift_in_explicit_mode_is_balanced_by_weight_and_byte_exact(pod_network: PodNetwork, pod_zookeeper):
    cp = pod_network.controlplane(pod_zookeeper.hosts, "--load-report-interval", "0.5")
    cp_addr = f"{pod_network.host_ip}:{cp.port('xds_port')}"
    for name, weight in (("d1", 1), ("d2", 3)):
        pod = pod_network.add_pod(name)
        pod.start(serve_argv(name, THRIFT_PORT), role="app", uid=APP_UID, name=f"{name}-app")
        pod.sidecar("orders", THRIFT_PORT, cp=cp_addr, zk=pod_zookeeper.hosts, namespace=NS, protocol="tcp",
                    weight=weight)
    a = pod_network.add_pod("a")
    a.start(app_argv("--name", "frontend", "--host", "0.0.0.0", "--port", "8080"), role="app", uid=APP_UID)
    a.sidecar("frontend", 8080, cp=cp_addr, zk=pod_zookeeper.hosts, namespace=NS)

    def calls(n: int) -> dict[str, int]:
        out = a.check_output(call_argv("127.0.0.1", THRIFT_PORT, "whoami", count=n), uid=APP_UID, timeout=120)
        return json.loads(out)

    wait_until(lambda: sum(calls(2).values()) == 2, 30, 0.2, message="orders on 127.0.0.1:9090 in pod a")
    counts = calls(200)
    assert sum(counts.values()) == 200 and abs(counts.get("d2", 0) / 200 - 0.75) <= 0.08, counts
    out = a.check_output(call_argv("127.0.0.1", THRIFT_PORT, "blob", 50 * 1024 * 1024, timeout=60), uid=APP_UID)
    assert "exact=true" in out and f"size={50 * 1024 * 1024}" in out, out
    # load reports (LRS) of a tcp cluster: a connection counts as a request, as Envoy's TCP pool does
    def reported() -> int:
        _, _, body = http_get(f"http://{pod_network.host_ip}:{cp.port('http_port')}/api/load?namespace={NS}")
        return sum(s["totals"]["issued"] for s in json.loads(body)["services"] if s["service"] == "orders")
    wait_until(lambda: reported() >= 203, 15, 0.2, message="orders' connections in the control plane's load")
    status, _, body = a.http_get("http://127.0.0.1:15000/listeners")
    assert json.loads(body)[f"tcp|orders.{NS}"] == {"address": "127.0.0.1", "port": THRIFT_PORT}
