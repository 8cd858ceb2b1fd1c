"""Every ``meshkeeper`` operator verb end to end: the real command, a real control plane with
tokens, real sidecars and apps on the session's ZooKeeper. The verbs' formatting and error paths
are unit-tested against a fake server in tests/unit/test_ctl.py; here each verb changes (or reads)
the real mesh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from dataclasses import dataclass

import pytest

from meshkeeper.demo.process import meshkeeper_argv
from meshkeeper.registry import Paths
from tests.harness import http_get, wait_until
from tests.integration.test_admin import TOKENS, runtime, write_tokens
from tests.integration.test_mesh import Client, Mesh, start_mesh

pytestmark = pytest.mark.integration


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self):
        assert self.code == 0, self
        return json.loads(self.out)


@pytest.fixture
def cli_mesh(procs, zk_server, zk_client, namespace, tmp_path) -> Mesh:
    return start_mesh(procs, zk_server.hosts, namespace, zk_client,
                      cp_args=("--admin-tokens", write_tokens(tmp_path / "tokens")))


def env_for(mesh: Mesh, role: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MESHKEEPER_TOKEN", "MESHKEEPER_CP")}
    env["MESHKEEPER_CP"] = mesh.cp_target
    if role is not None:
        env["MESHKEEPER_TOKEN"] = TOKENS[role]
    return env


def mk(mesh: Mesh, *args: str, role: str | None = "operator", stdin: str | None = None) -> Run:
    """``meshkeeper <args> -n <ns>`` with MESHKEEPER_CP and MESHKEEPER_TOKEN set, as an operator would."""
    proc = subprocess.run(meshkeeper_argv(*args, "-n", mesh.ns), env=env_for(mesh, role), input=stdin,
                          capture_output=True, text=True, timeout=30)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def one_line(run: Run, code: int, *fragments: str) -> None:
    assert run.code == code, run
    assert run.err.count("\n") == 1 and "Traceback" not in run.err, run.err
    for f in fragments:
        assert f in run.err, run.err


def test_every_verb_end_to_end(cli_mesh, tmp_path):
    mesh, ns = cli_mesh, cli_mesh.ns
    heavy, light = mesh.instance_key(2), mesh.instance_key(0)

    # get services / endpoints / proxies: tables for people, JSON for scripts.
    table = mk(mesh, "get", "services", role="viewer")
    assert table.code == 0 and "catalog" in table.out and "frontend" in table.out, table
    services = {s["name"]: s for s in mk(mesh, "get", "services", "-o", "json", role="viewer").json()["services"]}
    assert (services["catalog"]["instances"], services["catalog"]["serving"]) == (3, 3)
    endpoints = mk(mesh, "get", "endpoints", "catalog", role="viewer")
    assert endpoints.code == 0 and all(mesh.instance_key(i) in endpoints.out for i in range(3)), endpoints
    wait_until(lambda: mk(mesh, "get", "proxies", role="viewer").out.count("SYNCED") >= 4 * 4, 10,
               message="proxy-status shows four proxies SYNCED")

    # disable / enable / weight / reset change what the frontend's sidecar balances over.
    assert mk(mesh, "disable", "catalog", heavy).code == 0
    wait_until(lambda: heavy not in mesh.serving(), 1.0, 0.02, message="disable within 1 s")
    who, codes = Client(mesh.frontend.port("outbound_port")).split(200)
    assert codes == {200: 200} and who[mesh.app_instance(2)] == 0
    assert mk(mesh, "enable", "catalog", heavy).code == 0
    wait_until(lambda: heavy in mesh.serving(), 1.0, 0.02, message="enable within 1 s")
    row = mk(mesh, "weight", "catalog", light, "5", "-o", "json").json()
    assert (row["effective_weight"], row["registered_weight"]) == (5, 1)
    wait_until(lambda: mesh.serving().get(light) == 5, 1.0, 0.02, message="weight within 1 s")
    stale = mk(mesh, "weight", "catalog", light, "6", "--if-version", str(row["version"] - 1))
    one_line(stale, 1, "changed since")
    assert mk(mesh, "reset", "catalog", light).code == 0
    wait_until(lambda: mesh.serving().get(light) == 1, 1.0, 0.02, message="registered weight back")

    # policy set (admin) from YAML, policy get round-trips, an invalid one names the field.
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("timeout_ms: 3000\nretry:\n  attempts: 1\n  on: [5xx, reset]\n")
    one_line(mk(mesh, "policy", "set", "catalog", "-f", str(policy_file)), 1, "needs admin")
    assert mk(mesh, "policy", "set", "catalog", "-f", str(policy_file), role="admin").code == 0
    got = mk(mesh, "policy", "get", "catalog", "-o", "json", role="viewer").json()
    assert json.loads(got["json"]) == {"timeout_ms": 3000, "retry": {"attempts": 1, "on": ["5xx", "reset"]}}
    bad = mk(mesh, "policy", "set", "catalog", "-f", "-", role="admin", stdin="outlier:\n  max_ejection_percent: 150\n")
    one_line(bad, 1, "policy.outlier.max_ejection_percent: 150 is outside 0..100")
    assert json.loads(mk(mesh, "policy", "get", "catalog", "-o", "json", role="viewer").json()["json"])["timeout_ms"] == 3000

    # split (operator): the route becomes weighted subset clusters.
    split = mk(mesh, "split", "catalog", "v1=100", "v2=0", "-o", "json").json()
    assert json.loads(split["json"])["split"] == {"v1": 100, "v2": 0}
    wait_until(lambda: Client(mesh.frontend.port("outbound_port")).split(100)[0][mesh.app_instance(2)] == 0, 5,
               message="v2 (the third instance) gets no traffic under v1=100")
    assert mk(mesh, "split", "catalog", "--clear").code == 0

    # config set / get / delete, and the app's view through its sidecar.
    assert mk(mesh, "config", "set", "catalog", "color=blue", "size=xl").code == 0
    wait_until(lambda: runtime(mesh.catalog[0][1])["values"] == {"color": "blue", "size": "xl"}, 1.0, 0.02,
               message="the app reads the config within 1 s")
    assert mk(mesh, "config", "get", "catalog", "color", role="viewer").out.strip() == "blue"
    assert mk(mesh, "config", "delete", "catalog", "size").code == 0
    assert mk(mesh, "config", "get", "catalog", "-o", "json", role="viewer").json()["values"] == {"color": "blue"}

    # proxy-config: what the frontend's sidecar ACKed.
    node = json.loads(http_get(f"{mesh.frontend.admin_url}/server_info")[2])["node"]
    pc = mk(mesh, "proxy-config", node, "--type", "cds", role="viewer")
    assert pc.code == 0 and f"outbound|catalog.{ns}" in pc.out, pc

    # The audit trail has every write, by name.
    audit = [json.loads(line.split("audit ", 1)[1]) for line in mesh.cp.stderr_text().splitlines()
             if "meshkeeper.controlplane.audit" in line]
    assert [(a["rpc"], a.get("who"), a["result"]) for a in audit] == [
        ("SetEnabled", "otto", "ok"), ("SetEnabled", "otto", "ok"), ("SetWeight", "otto", "ok"),
        ("SetWeight", "otto", "aborted"), ("ClearOverride", "otto", "ok"),
        ("SetPolicy", None, "permission_denied"), ("SetPolicy", "ada", "ok"), ("SetPolicy", "ada", "invalid"),
        ("SetTrafficSplit", "otto", "ok"), ("SetTrafficSplit", "otto", "ok"), ("SetConfig", "otto", "ok"),
        ("DeleteConfigKey", "otto", "ok")]
    assert json.loads(mesh.kz.get(Paths(ns).config("catalog"))[0]) == {"color": "blue"}


def test_events_streams_until_ctrl_c(cli_mesh):
    mesh = cli_mesh
    proc = subprocess.Popen(meshkeeper_argv("events", "-n", mesh.ns, "--kind", "admin_write", "-o", "json"),
                            env=env_for(mesh, "viewer"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[dict] = []
    reader = threading.Thread(target=lambda: lines.extend(json.loads(line) for line in proc.stdout), daemon=True)
    reader.start()
    try:
        # The stream may open after a write: write until an event line arrives.
        def seen() -> bool:
            assert mk(mesh, "config", "set", "catalog", f"ping={len(lines)}").code == 0
            return bool(lines)

        wait_until(seen, 10, 0.1, message="an admin_write event line")
        first = lines[0]
        assert first["kind"] == "admin_write" and first["who"] == "otto" and first["namespace"] == mesh.ns
        assert first["service"] == "catalog" and "ping" in json.loads(first["after"])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        reader.join(5)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_user_mistakes_are_one_line(cli_mesh):
    mesh = cli_mesh
    one_line(mk(mesh, "get", "services", role=None), 1, "--token")
    one_line(mk(mesh, "weight", "catalog", mesh.instance_key(0), "3", role="viewer"), 1, "operator")
    one_line(mk(mesh, "get", "endpoints", "nope", role="viewer"), 1, "'nope' is not registered")
    one_line(mk(mesh, "weight", "catalog", "not-an-address", "3"), 2)
    one_line(mk(mesh, "split", "catalog", "v1=90", "v9=10"), 1, "no registered instance of catalog has version 'v9'")
    one_line(mk(mesh, "proxy-config", "no-such-node", role="viewer"), 1, "no-such-node")
