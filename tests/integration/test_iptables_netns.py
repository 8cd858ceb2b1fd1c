"""``meshkeeper iptables`` in real network namespaces: what is captured, what is not, and cleanup.

Two namespaces joined by a veth pair: "pod" (10.241.83.1) gets the rules, "remote"
(10.241.83.2) plays a host elsewhere. The test process opens its listeners inside them from a
short-lived thread that ``setns``-es first (a socket stays in the namespace it was made in), so
it can ``accept`` and call :func:`original_dst` itself. Clients of another uid (the proxy's 1337,
an app's 1000) run as ``ip netns exec NS setpriv ... python3 -c``. Needs root and netfilter.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.interception.original_dst import original_dst
from tests.harness.pods import in_netns

pytestmark = pytest.mark.integration

POD_IP, REMOTE_IP = "10.241.83.1", "10.241.83.2"
PROXY_UID, APP_UID = 1337, 1000
ROOT = Path(__file__).resolve().parents[2]
OTHER_UID_PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)), None)
CLIENT = r"""
import socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "tcp":
    socket.create_connection((host, port), timeout=5).sendall(b"hello")
elif mode == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if len(sys.argv) > 4:
        s.bind(("0.0.0.0", int(sys.argv[4])))
    s.sendto(b"query", (host, port))
elif mode == "udp-server":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port))
    s.settimeout(10)
    print("ready", flush=True)
    data, peer = s.recvfrom(512)
    s.sendto(b"answer:" + data, peer)
"""

if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables-restore"):
    pytest.skip("needs root, iproute2 and iptables", allow_module_level=True)


class Net:
    def __init__(self) -> None:
        suffix = f"{os.getpid()}"
        self.pod, self.remote = f"mk-pod-{suffix}", f"mk-remote-{suffix}"
        self.created: list[str] = []

    def up(self) -> None:
        for ns in (self.pod, self.remote):
            run("ip", "netns", "add", ns)
            self.created.append(ns)
        run("ip", "link", "add", "mkveth0", "netns", self.pod, "type", "veth", "peer", "name", "mkveth1",
            "netns", self.remote)
        for ns, dev, ip in ((self.pod, "mkveth0", POD_IP), (self.remote, "mkveth1", REMOTE_IP)):
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def meshkeeper(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.pod, sys.executable, "-m", "meshkeeper.cli", "iptables", *args)

    def save(self, tool: str = "iptables-save") -> str:
        text = run("ip", "netns", "exec", self.pod, tool).stdout
        return "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))

    def new_socket(self, ns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
        return in_netns(ns, lambda: socket.socket(socket.AF_INET, kind))

    def listen(self, ns: str, host: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
        sock = self.new_socket(ns, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(8)
        return sock

    def as_uid(self, uid: int, *args: object, ns: str | None = None, wait: bool = True):
        if OTHER_UID_PYTHON is None:
            pytest.skip("no system python3 that another uid may run")
        argv = ["ip", "netns", "exec", ns or self.pod, "setpriv", f"--reuid={uid}", f"--regid={uid}",
                "--clear-groups", OTHER_UID_PYTHON, "-I", "-c", CLIENT, *map(str, args)]
        if wait:
            return run(*argv)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0, f"{' '.join(argv[:8])}: {done.stderr.strip()}"
    return done


def accept(listener: socket.socket, timeout: float = 5.0) -> socket.socket:
    listener.settimeout(timeout)  # the deadline: accept returns as soon as a connection is there
    conn, _ = listener.accept()
    assert conn.recv(16) == b"hello"
    return conn


def nothing_pending(sock: socket.socket) -> bool:
    return not select.select([sock], [], [], 0)[0]


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    n = Net()
    try:
        n.up()
        probe = subprocess.run(["ip", "netns", "exec", n.pod, "iptables", "-t", "nat", "-S"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"no netfilter nat table in this kernel: {probe.stderr.strip()}")
        yield n
    finally:
        n.down()


@pytest.fixture
def captured(net: Net) -> Iterator[Net]:
    net.meshkeeper("--exclude-inbound-ports", "8443")
    try:
        yield net
    finally:
        net.meshkeeper("--cleanup")


def test_outbound_tcp_lands_on_15001_with_the_original_destination(captured: Net) -> None:
    outbound = captured.listen(captured.pod, "0.0.0.0", 15001)
    remote = captured.listen(captured.remote, REMOTE_IP, 8080)
    with outbound, remote:
        client = captured.new_socket(captured.pod)  # made by this process: uid 0, an app
        client.connect((REMOTE_IP, 8080))
        client.sendall(b"hello")
        with client, accept(outbound) as conn:
            assert original_dst(conn) == (REMOTE_IP, 8080)
        captured.as_uid(APP_UID, "tcp", REMOTE_IP, 9090)
        with accept(outbound) as conn:
            assert original_dst(conn) == (REMOTE_IP, 9090)
        assert nothing_pending(remote)


def test_proxy_uid_reaches_the_remote_host_directly(captured: Net) -> None:
    outbound = captured.listen(captured.pod, "0.0.0.0", 15001)
    remote = captured.listen(captured.remote, REMOTE_IP, 8080)
    with outbound, remote:
        captured.as_uid(PROXY_UID, "tcp", REMOTE_IP, 8080)
        with accept(remote):
            pass
        assert nothing_pending(outbound)


def test_loopback_is_not_captured(captured: Net) -> None:
    outbound = captured.listen(captured.pod, "0.0.0.0", 15001)
    local = captured.listen(captured.pod, "127.0.0.1", 9999)
    with outbound, local:
        client = captured.new_socket(captured.pod)
        client.connect(("127.0.0.1", 9999))
        client.sendall(b"hello")
        with client, accept(local) as conn:
            # Not redirected: no NAT record, or conntrack's record of the address itself.
            assert original_dst(conn) in (None, conn.getsockname()[:2])
        assert nothing_pending(outbound)


def test_inbound_goes_to_15006_except_excluded_and_sidecar_ports(captured: Net) -> None:
    inbound = captured.listen(captured.pod, "0.0.0.0", 15006)
    app = captured.listen(captured.pod, "0.0.0.0", 8080)
    excluded = captured.listen(captured.pod, "0.0.0.0", 8443)
    admin = captured.listen(captured.pod, "0.0.0.0", 15000)
    status = captured.listen(captured.pod, "0.0.0.0", 15021)  # the kubelet's probes and Prometheus
    with inbound, app, excluded, admin, status:
        for port, lands_on in ((8080, inbound), (8443, excluded), (15000, admin), (15021, status)):
            client = captured.new_socket(captured.remote)
            client.connect((POD_IP, port))
            client.sendall(b"hello")
            with client, accept(lands_on) as conn:
                if lands_on is inbound:
                    assert original_dst(conn) == (POD_IP, port)
        assert nothing_pending(app)


def test_app_calling_its_own_pod_ip(captured: Net) -> None:
    """The app dialing its pod IP reaches itself; the proxy dialing it (the local endpoint of the
    app's own service) goes through the inbound listener instead of looping back to 15001."""
    inbound = captured.listen(captured.pod, "0.0.0.0", 15006)
    outbound = captured.listen(captured.pod, "0.0.0.0", 15001)
    app = captured.listen(captured.pod, "0.0.0.0", 8080)
    with inbound, outbound, app:
        captured.as_uid(APP_UID, "tcp", POD_IP, 8080)
        accept(app).close()
        captured.as_uid(PROXY_UID, "tcp", POD_IP, 8080)
        with accept(inbound) as conn:
            assert original_dst(conn) == (POD_IP, 8080)
        assert nothing_pending(outbound) and nothing_pending(app)


def test_dns_from_the_app_goes_to_15053_and_the_proxys_own_queries_do_not(captured: Net) -> None:
    resolver = captured.listen(captured.remote, REMOTE_IP, 53, socket.SOCK_DGRAM)
    with resolver:
        resolver.settimeout(5)
        # The proxy forwards a query from port 40053 to the real resolver: not captured.
        captured.as_uid(PROXY_UID, "udp", REMOTE_IP, 53, 40053)
        assert resolver.recvfrom(64) == (b"query", (POD_IP, 40053))
        # The mesh DNS, run by the proxy uid as the sidecar would. On 127.0.0.1: REDIRECT sends a
        # locally made packet there, and conntrack only turns an answer from that address back
        # into one from the resolver (from 0.0.0.0 the kernel would pick the pod IP as source).
        server = captured.as_uid(PROXY_UID, "udp-server", "127.0.0.1", 15053, wait=False)
        try:
            assert server.stdout.readline() == "ready\n", server.stderr.read()
            # The app asks from the very port the proxy just used: its own conntrack zone keeps
            # the query from riding the proxy's entry straight to the resolver.
            app = captured.new_socket(captured.pod, socket.SOCK_DGRAM)
            with app:
                app.bind(("0.0.0.0", 40053))
                app.settimeout(5)
                app.sendto(b"query", (REMOTE_IP, 53))
                assert app.recvfrom(64) == (b"answer:query", (REMOTE_IP, 53))
            assert server.wait(timeout=5) == 0
        finally:
            server.kill()
            server.wait()
        assert nothing_pending(resolver)


def test_apply_is_idempotent_and_cleanup_restores_the_namespace(net: Net) -> None:
    others = [("nat", "-A", "OUTPUT", "-d", "10.241.84.0/24", "-j", "RETURN"),
              ("nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "80", "-j", "REDIRECT", "--to-ports", "8080"),
              ("raw", "-A", "OUTPUT", "-p", "udp", "--dport", "123", "-j", "NOTRACK"),
              ("filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")]
    for table, *rule in others:
        run("ip", "netns", "exec", net.pod, "iptables", "-t", table, *rule)
    try:
        before = net.save()
        assert "ipv4: installed" in net.meshkeeper().stdout
        once = net.save()
        assert "ipv4: unchanged" in net.meshkeeper().stdout
        assert net.save() == once
        generated = net.meshkeeper("--dry-run").stdout.split("# ip6tables-restore")[0]
        saved_lines = set(once.splitlines())
        assert [line for line in generated.splitlines() if line.startswith("-A ")
                and line not in saved_lines] == []  # generated in the form iptables-save prints
        assert "ipv4: removed" in net.meshkeeper("--cleanup").stdout
        assert net.save() == before
        assert "ipv4: nothing to remove" in net.meshkeeper("--cleanup").stdout
    finally:
        for table, _, *rule in others:
            subprocess.run(["ip", "netns", "exec", net.pod, "iptables", "-t", table, "-D", *rule],
                           capture_output=True)


def test_ipv6_rules_are_installed_and_removed_too(net: Net) -> None:
    if not shutil.which("ip6tables-restore"):
        pytest.skip("ip6tables-restore is not installed")
    run("ip", "netns", "exec", net.pod, "ip6tables", "-t", "nat", "-A", "OUTPUT", "-d", "fd00:241::/64",
        "-j", "RETURN")
    run("ip", "netns", "exec", net.pod, "ip6tables", "-t", "raw", "-A", "OUTPUT", "-j", "ACCEPT")
    before = net.save("ip6tables-save")
    assert "ipv6: installed" in net.meshkeeper().stdout
    saved = net.save("ip6tables-save")
    assert "-A MESHKEEPER_OUTPUT -d ::1/128 -j RETURN" in saved
    assert "ipv6: unchanged" in net.meshkeeper().stdout
    assert "ipv6: removed" in net.meshkeeper("--cleanup").stdout
    assert net.save("ip6tables-save") == before
