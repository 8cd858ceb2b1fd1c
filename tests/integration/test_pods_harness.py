"""The pod harness of the transparent-mode tests (tests/harness/pods.py) does what they rely on.

Pods reach each other and the host over the bridge (also past a host firewall that drops them),
a process of the proxy uid runs the venv's interpreter, resolv.conf is per pod, nothing is left
behind (also after a KeyboardInterrupt, and a crashed run's leftovers are swept), a sidecar runs in
a pod as uid 1337, and the thrift app answers across pods byte-exact. Needs root.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshkeeper.demo.process import app_argv, wait_until
from meshkeeper.demo.zookeeper import ZooKeeper
from tests.harness import pods
from tests.harness.pods import PROXY_UID, STATE_DIR, Pod, PodNetwork, leftovers, unavailable_reason
from tests.harness.thrift_apps import ThriftClient, blob_pattern, call_argv, serve_argv

pytestmark = pytest.mark.integration
pod_network, pod_zookeeper = pods.pod_network, pods.pod_zookeeper  # fixtures

APP_UID = 1000
FIFTY_MB = 50 * 1024 * 1024


@pytest.fixture(autouse=True)
def _needs_pods() -> None:
    if reason := unavailable_reason():
        pytest.skip(f"no pod network: {reason}")


def uid_of(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
    return int(line.split()[1])


def traces_of(suffix: str) -> list[str]:
    """Everything on the host that still names pod network ``suffix``."""
    found = list(leftovers().get(suffix, []))
    found += [f"netns:{x}" for x in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                   text=True).stdout.split() if suffix in x]
    found += [f"link:{x}" for x in subprocess.run(["ip", "-o", "link"], capture_output=True,
                                                  text=True).stdout.split() if suffix in x]
    found += [f"rule:{x}" for x in subprocess.run(["iptables-save"], capture_output=True,
                                                  text=True).stdout.splitlines() if suffix in x]
    etc = Path("/etc/netns")
    found += [str(p) for p in (etc.iterdir() if etc.is_dir() else ()) if suffix in p.name]
    state = [STATE_DIR / suffix, STATE_DIR / f"{int(suffix[:2], 16)}.lock"]  # the lock: unless retaken
    return found + [str(p) for p in state if p.exists()]


def dial(client: Pod, host: str, port: int, listener) -> str:
    """Connect from ``client`` to ``host:port``; the address ``listener`` saw the call from."""
    with client.connect(host, port) as sock:
        sock.sendall(b"hello")
        listener.settimeout(5)  # the deadline: accept returns as soon as the connection is there
        conn, peer = listener.accept()
        with conn:
            assert conn.recv(5) == b"hello"
        return peer[0]


def test_pods_reach_each_other_and_the_host(pod_network: PodNetwork) -> None:
    a, b = pod_network.add_pod("a"), pod_network.add_pod("b")
    assert {a.ip, b.ip, pod_network.host_ip} <= set(map(str, pod_network.subnet))
    host = socket.create_server((pod_network.host_ip, 0))
    with host, b.listen() as in_b, a.listen() as in_a:
        assert dial(a, b.ip, in_b.getsockname()[1], in_b) == a.ip
        assert dial(b, a.ip, in_a.getsockname()[1], in_a) == b.ip
        assert dial(a, pod_network.host_ip, host.getsockname()[1], host) == a.ip
        # A process in the pod too, not just a socket the test made there.
        code = f"import socket; socket.create_connection(({pod_network.host_ip!r}, {host.getsockname()[1]}), 5)"
        b.check_output([sys.executable, "-c", code], uid=APP_UID)
        host.settimeout(5)
        conn, peer = host.accept()
        conn.close()
        assert peer[0] == b.ip


def test_a_host_firewall_that_drops_pods_is_opened_for_our_bridge_only(tmp_path: Path) -> None:
    drops = [["INPUT", "-s", "10.241.0.0/16", "-j", "DROP"], ["FORWARD", "-s", "10.241.0.0/16", "-j", "DROP"]]
    for rule in drops:
        subprocess.run(["iptables", "-w", "-A", *rule], check=True)
    try:
        with PodNetwork(tmp_path) as net:
            a, b = net.add_pod("a"), net.add_pod("b")
            assert any(r.startswith("INPUT") for r in net.firewall), net.firewall
            host = socket.create_server((net.host_ip, 0))
            with host, b.listen() as in_b:
                assert dial(a, net.host_ip, host.getsockname()[1], host) == a.ip
                assert dial(a, b.ip, in_b.getsockname()[1], in_b) == a.ip
            suffix = net.suffix
        assert traces_of(suffix) == []
    finally:
        for rule in drops:
            subprocess.run(["iptables", "-w", "-D", *rule], check=True)


def test_the_proxy_uid_runs_the_venv_python_and_imports_meshkeeper(pod_network: PodNetwork) -> None:
    root_mode = os.stat("/root").st_mode
    pod = pod_network.add_pod("a")
    code = "import os, sys, meshkeeper, sidecar; print(os.getuid(), os.getgid(), os.getgroups(), sys.prefix)"
    out = pod.check_output([sys.executable, "-c", code], uid=PROXY_UID)
    assert out.split(maxsplit=3) == ["1337", "1337", "[]", sys.prefix + "\n"]
    assert os.stat("/root").st_mode == root_mode  # the host's /root was never changed


def test_resolv_conf_is_per_pod(pod_network: PodNetwork) -> None:
    a, b = pod_network.add_pod("a"), pod_network.add_pod("b")
    host_resolv = Path("/etc/resolv.conf").read_text()
    a.set_resolv_conf([pod_network.host_ip], search=["mesh.local"])
    b.set_resolv_conf([str(pod_network.subnet[53])])
    assert a.check_output(["cat", "/etc/resolv.conf"], uid=PROXY_UID) == (
        f"nameserver {pod_network.host_ip}\nsearch mesh.local\n")
    assert b.check_output(["cat", "/etc/resolv.conf"]) == f"nameserver {pod_network.subnet[53]}\n"
    assert Path("/etc/resolv.conf").read_text() == host_resolv


def test_teardown_leaves_nothing_even_after_keyboard_interrupt(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), PodNetwork(tmp_path) as net:
        suffix = net.suffix
        a, b = net.add_pod("a"), net.add_pod("b")
        a.set_resolv_conf([net.host_ip])
        sleepers = [a.run(["sleep", "600"], uid=PROXY_UID), b.run(["sleep", "600"])]
        server = b.start(serve_argv("b1"), role="app", uid=APP_UID)
        assert traces_of(suffix)
        raise KeyboardInterrupt
    assert traces_of(suffix) == []
    assert all(p.poll() is not None for p in sleepers) and not server.running()


def test_a_crashed_runs_leftovers_are_swept_at_start(tmp_path: Path) -> None:
    with PodNetwork(tmp_path) as net:  # a real leftover: everything of a network but its lock
        stale = net.suffix
        pod = net.add_pod("ghost")
        pod.set_resolv_conf([net.host_ip])
        orphan = pod.run(["sleep", "600"], uid=PROXY_UID)
        net.popens.clear()
        net.suffix = ""  # as if the run had been SIGKILLed: close() releases the lock only
    subprocess.run(["iptables", "-w", "-I", "INPUT", "-i", f"mkbr{stale}", "-m", "comment", "--comment",
                    f"meshkeeper-pods-{stale}", "-j", "ACCEPT"], check=True)
    assert len(traces_of(stale)) >= 5 and orphan.poll() is None
    with PodNetwork(tmp_path):
        # Swept by this start, or by a parallel run's start that holds the stale lock meanwhile.
        wait_until(lambda: traces_of(stale) == [], 10, message=f"leftovers of {stale} swept")
    assert orphan.wait(5) == -9


def test_a_sidecar_runs_in_a_pod_as_the_proxy_uid(
    pod_network: PodNetwork, pod_zookeeper: ZooKeeper, procs
) -> None:
    pod = pod_network.add_pod("catalog")
    cp = pod_network.controlplane(pod_zookeeper.hosts)
    app = pod.start(app_argv("--name", "catalog", "--host", "0.0.0.0", "--port", "0"), role="app", uid=APP_UID)
    sidecar = pod.sidecar("catalog", app.port("port"), cp=f"{pod_network.host_ip}:{cp.port('xds_port')}",
                          zk=pod_zookeeper.hosts, namespace="pods")
    assert uid_of(sidecar.pid) == PROXY_UID and sidecar in procs.processes
    assert sidecar.port("inbound_port") == 15006  # a pod is a host of its own: the default ports
    from kazoo.client import KazooClient

    zk = KazooClient(hosts=pod_zookeeper.hosts, timeout=5.0)
    zk.start(timeout=10)
    try:
        path = "/meshkeeper/pods/services/catalog/instances"
        names = wait_until(lambda: zk.exists(path) and zk.get_children(path), 10, message="registered")
        assert names == [f"{pod.ip}:15006"]
        record = json.loads(zk.get(f"{path}/{names[0]}")[0])
        assert (record["address"], record["app_port"]) == (pod.ip, app.port("port"))
    finally:
        zk.stop()
        zk.close()


def test_thrift_across_pods_echo_whoami_and_50mb_byte_exact(pod_network: PodNetwork) -> None:
    a, b = pod_network.add_pod("a"), pod_network.add_pod("b")
    server = b.start(serve_argv("b1"), role="app", uid=APP_UID)
    assert uid_of(server.pid) == APP_UID
    port = server.port("port")
    # A client process in pod a, a new connection per call.
    assert json.loads(a.check_output(call_argv(b.ip, port, "whoami", count=3), uid=APP_UID)) == {"b1": 3}
    assert a.check_output(call_argv(b.ip, port, "echo", "héllo"), uid=APP_UID) == "héllo\n"
    # The test's own client, dialing from inside pod a.
    with ThriftClient(b.ip, port, timeout=20, connect=a.connect) as client:
        assert client.local_address[0] == a.ip
        assert client.echo("ping") == "ping" and client.whoami() == "b1"
        data = client.blob(FIFTY_MB)
    assert len(data) == FIFTY_MB and data == blob_pattern(FIFTY_MB)
