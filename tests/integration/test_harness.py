"""The harness itself: a real ZooKeeper that kazoo can use and that survives stop/start, child
processes that announce themselves, and nothing left running afterwards."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from kazoo.client import KazooClient, KazooState

from meshkeeper.registry import InstanceRecord, Paths, ServiceRecord
from tests.harness import (
    ManagedProcess,
    ProcessGroup,
    ZooKeeper,
    ZooKeeperEnsemble,
    free_port,
    http_get,
    parse_ready_line,
    process_group_pids,
    unique_namespace,
    wait_until,
)

pytestmark = pytest.mark.integration


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[1]) == pid:
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


# --------------------------------------------------------------------------- ZooKeeper


def test_zk_server_serves_kazoo(zk_client: KazooClient, zk_server: ZooKeeper, namespace: str) -> None:
    paths = Paths(namespace)
    record = InstanceRecord(
        address="127.0.0.1", port=15006, weight=3, labels={"version": "v1"}, app_port=8080
    )
    zk_client.create(paths.service("catalog"), ServiceRecord().encode(), makepath=True)
    zk_client.create(paths.instance("catalog", record.key), record.encode(), ephemeral=True, makepath=True)

    data, stat = zk_client.get(paths.instance("catalog", record.key))
    assert InstanceRecord.decode(data) == record
    assert stat.ephemeralOwner == zk_client.client_id[0]
    assert zk_server.hosts == f"127.0.0.1:{zk_server.port}"
    assert "Mode: standalone" in zk_server.srvr()


def test_zk_stop_and_start_keep_port_and_data(zk: ZooKeeper) -> None:
    states: list[str] = []
    client = KazooClient(hosts=zk.hosts, timeout=2.0, connection_retry={"max_tries": -1, "max_delay": 0.2})
    client.add_listener(states.append)
    client.start(timeout=10)
    try:
        client.create("/meshkeeper/survives", b"yes", makepath=True)
        hosts, pid = zk.hosts, zk.pid

        zk.stop()
        assert not zk.running() and not alive(pid)
        wait_until(lambda: KazooState.SUSPENDED in states, 10, message="kazoo notices ZooKeeper is gone")

        zk.start()
        assert zk.hosts == hosts and zk.pid != pid
        wait_until(lambda: client.state == KazooState.CONNECTED, 15, message="kazoo reconnects")
        assert client.get("/meshkeeper/survives")[0] == b"yes"
    finally:
        client.stop()
        client.close()


def test_zk_kill_is_a_crash_and_close_cleans_up(tmp_path: Path) -> None:
    server = ZooKeeper(tmp_path / "zk-crash").start()
    pid = server.pid
    assert pid is not None
    server.kill()
    assert not alive(pid)
    server.start()
    assert "Mode:" in server.srvr()
    server.close()
    assert not server.running()
    assert (tmp_path / "zk-crash").exists()  # a given workdir belongs to the caller

    owned = ZooKeeper().start()
    workdir = owned.workdir
    owned.close()
    assert not workdir.exists()


def test_zk_ensemble_survives_its_leader_and_a_rolling_restart(zk_ensemble: ZooKeeperEnsemble) -> None:
    servers = zk_ensemble.servers
    ports = {p for s in servers for p in (s.port, s.quorum_port, s.election_port)}
    assert len(ports) == 9
    assert zk_ensemble.hosts == ",".join(f"127.0.0.1:{s.port}" for s in servers)
    assert [(s.data_dir / "myid").read_text().strip() for s in servers] == ["1", "2", "3"]
    assert sorted(zk_ensemble.modes().values()) == ["follower", "follower", "leader"]

    client = KazooClient(hosts=zk_ensemble.hosts, timeout=10.0)
    client.start(timeout=10)
    try:
        client.create("/meshkeeper/mine", b"yes", ephemeral=True, makepath=True)
        session = client.client_id

        old = zk_ensemble.leader()
        assert old is not None
        old.kill()
        new = zk_ensemble.wait_quorum(10)
        assert new is not old and new.running()
        old.start()
        assert old.mode() == "follower" and zk_ensemble.wait_quorum(10) is new

        restarted: list[int] = []
        zk_ensemble.rolling_restart(10, on_restarted=lambda s: restarted.append(s.myid))
        assert restarted[-1] == new.myid and sorted(restarted) == [1, 2, 3]  # the leader last
        assert zk_ensemble.running() and zk_ensemble.leader() is not None

        wait_until(lambda: client.state == KazooState.CONNECTED, 15, message="kazoo reconnects")
        assert client.client_id == session  # one session throughout: the ephemeral znode stayed
        assert client.get("/meshkeeper/mine")[0] == b"yes"
    finally:
        client.stop()
        client.close()


# --------------------------------------------------------------------------- helpers


def test_parse_ready_line() -> None:
    line = (
        "meshkeeper sidecar listening outbound_port=1 inbound_port=2 admin_port=3 node=sidecar~h~s-2.default"
    )
    assert parse_ready_line(line) == {
        "role": "sidecar",
        "outbound_port": "1",
        "inbound_port": "2",
        "admin_port": "3",
        "node": "sidecar~h~s-2.default",
    }
    assert parse_ready_line(line, "controlplane") is None
    assert parse_ready_line("meshkeeper sidecar starting") is None
    assert parse_ready_line("") is None


def test_wait_until_returns_value_or_explains() -> None:
    calls = iter([0, 0, 7])
    assert wait_until(lambda: next(calls), timeout=2, interval=0.01) == 7

    def broken() -> bool:
        raise ConnectionRefusedError("nobody home")

    with pytest.raises(TimeoutError, match=r"the thing: not true after 0\.1s .*nobody home"):
        wait_until(broken, timeout=0.1, interval=0.01, message="the thing")


def test_free_port_is_bindable_and_outside_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(p < low for p in ports)
    assert len(ports) > 1


def test_unique_namespace_is_a_valid_distinct_name() -> None:
    names = {unique_namespace("test_Something[param-1]") for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith("test-something-param-1-") for n in names)
    Paths(unique_namespace("x" * 100))  # validates


# --------------------------------------------------------------------------- processes


def test_app_process_answers_and_stops_cleanly(procs: ProcessGroup) -> None:
    app = procs.app("catalog", version="v2")
    port = app.port("port")
    assert app.info["name"] == "catalog"

    status, _, body = http_get(f"http://127.0.0.1:{port}/health")
    assert status == 200
    status, headers, body = http_get(f"http://127.0.0.1:{port}/items")
    assert status == 200
    assert json.loads(body) == {
        "service": "catalog",
        "instance": f"127.0.0.1:{port}",
        "version": "v2",
        "method": "GET",
        "path": "/items",
        "body_bytes": 0,
    }
    assert headers["x-app-instance"] == f"127.0.0.1:{port}"

    assert http_get(f"http://127.0.0.1:{port}/fail?status=503")[0] == 200
    assert http_get(f"http://127.0.0.1:{port}/")[0] == 503
    assert http_get(f"http://127.0.0.1:{port}/health")[0] == 200
    http_get(f"http://127.0.0.1:{port}/fail?status=503&health=1")
    assert http_get(f"http://127.0.0.1:{port}/health")[0] == 503
    http_get(f"http://127.0.0.1:{port}/fail?status=0")
    assert http_get(f"http://127.0.0.1:{port}/")[0] == 200

    started = time.monotonic()
    assert http_get(f"http://127.0.0.1:{port}/slow?ms=200")[0] == 200
    assert time.monotonic() - started >= 0.2

    assert app.terminate() == 0


def test_app_calls_downstream_through_http_proxy(procs: ProcessGroup) -> None:
    # The catalog app also understands absolute-form requests, so it can stand in for the proxy.
    catalog = procs.app("catalog")
    proxy = f"http://127.0.0.1:{catalog.port('port')}"
    frontend = procs.app(
        "frontend",
        call="http://catalog/headers",
        env={"HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": ""},
    )
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    status, _, body = http_get(f"http://127.0.0.1:{frontend.port('port')}/", {"traceparent": trace})
    assert status == 200, body
    reply = json.loads(body)
    assert reply["frontend"]["service"] == "frontend"
    assert reply["catalog"]["host"] == "catalog"
    assert reply["catalog"]["traceparent"] == trace


def test_failed_start_reports_stderr_and_leaves_nothing(procs: ProcessGroup) -> None:
    with pytest.raises(RuntimeError, match=r"exited with code 3 before its ready line(.|\n)*boom"):
        procs.start(
            [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], role="app"
        )
    silent = [sys.executable, "-c", "import time; print('not ready', flush=True); time.sleep(60)"]
    with pytest.raises(RuntimeError, match="no ready line within 1s"):
        procs.start(silent, role="app", name="silent", timeout=1)
    assert not any(p.running() for p in procs.processes)


FORKING = """
import os, sys, time
child = os.fork()
if child == 0:
    time.sleep(600)
    os._exit(0)
print(f"meshkeeper fake listening port=1 child={child}", flush=True)
time.sleep(600)
"""

STUBBORN = FORKING.replace(
    "import os, sys, time", "import os, signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)"
)


def test_terminate_and_kill_take_the_whole_process_group(tmp_path: Path) -> None:
    before = children_of(os.getpid())
    group = ProcessGroup(tmp_path)
    polite = group.start([sys.executable, "-c", FORKING], role="fake", name="polite")
    stubborn = group.start([sys.executable, "-c", STUBBORN], role="fake", name="stubborn")
    crashed = group.start([sys.executable, "-c", FORKING], role="fake", name="crashed")
    workers = [int(p.info["child"]) for p in (polite, stubborn, crashed)]
    assert all(alive(w) for w in workers)
    assert len(polite.group_pids()) == 2

    # SIGTERM reaches only the leader; its forked worker is SIGKILLed with the group afterwards.
    assert polite.terminate(timeout=5) == -signal.SIGTERM
    assert crashed.kill() == -signal.SIGKILL
    started = time.monotonic()
    group.close()  # the stubborn one ignores SIGTERM: SIGKILL after the grace period
    assert time.monotonic() - started < 8
    assert stubborn.returncode == -signal.SIGKILL

    assert not any(alive(w) for w in workers)
    assert all(process_group_pids(p.pid) == [] for p in group.processes)
    assert children_of(os.getpid()) <= before


def test_processes_die_with_their_parent(tmp_path: Path) -> None:
    # A test run killed outright must not leave its children behind (PR_SET_PDEATHSIG).
    sleeper = "import time; print('meshkeeper fake listening', flush=True); time.sleep(600)"
    script = f"""
import sys
from meshkeeper.demo.process import ManagedProcess
p = ManagedProcess([sys.executable, "-c", {sleeper!r}], role="fake", log_dir={str(tmp_path)!r})
info = p.start()
print(f"meshkeeper parent listening child_pid={{p.pid}}", flush=True)
import time; time.sleep(600)
"""
    parent = ManagedProcess([sys.executable, "-c", script], role="parent", log_dir=tmp_path)
    info = parent.start()
    child = int(info["child_pid"])
    assert alive(child)
    parent.kill()
    wait_until(lambda: not alive(child), 5, message="child dies with its parent")


def test_controlplane_starts_with_port_zero(procs: ProcessGroup, zk_server: ZooKeeper) -> None:
    cp = procs.controlplane(zk_server.hosts)
    assert cp.info["role"] == "controlplane"
    ports = {cp.port("xds_port"), cp.port("http_port")}
    assert 0 not in ports and len(ports) == 2
    for port in ports:  # both bound before the ready line, as docs/contracts.md requires
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert cp.terminate() == 0
    assert not cp.group_pids()
