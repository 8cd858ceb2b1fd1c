"""Fixtures shared by every test directory (helpers in tests/harness).

ZooKeeper:
    zk_server   session-wide ZooKeeper; tests isolate themselves with ``namespace``. Never stop it.
    zk          a ZooKeeper of the test's own, for tests that stop, kill or restart it.
    zk_ensemble a 3-server ZooKeeper ensemble of the test's own (``hosts`` names all three), for
                failover tests: ``leader()``, ``servers[i].kill()/stop()/start()``, ``wait_quorum()``,
                ``rolling_restart()``.
    namespace   a registry namespace no other test uses.
    zk_client   a connected kazoo client on ``zk_server``, closed in teardown.
Fuzzing (tests/unit/test_fuzz_*.py): hypothesis profile "ci" (bounded, derandomized), or "long"
    with MESHKEEPER_FUZZ=long (see tests/support/fuzz.py).
Processes:
    procs       a ProcessGroup: ``procs.controlplane(...)``, ``procs.sidecar(...)``, ``procs.app(...)``,
                ``procs.meshkeeper(...)``; stopped in teardown, their stderr attached to failures.
"""

from __future__ import annotations

import os

# gRPC's fork handlers in this process abort children spawned with preexec_fn (seen: 1 in 20 restarts).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshkeeper.demo.process import kill_all, live_processes
from tests.harness import ProcessGroup, ZooKeeper, ZooKeeperEnsemble, unique_namespace
from tests.support import fuzz

# The fuzz properties' hypothesis profile (tests/support/fuzz.py): "ci" unless MESHKEEPER_FUZZ=long.
fuzz.load_profile()

_BENIGN_ZK_WARNINGS = ("running in standalone mode", "maxCnxns is not configured")
_GROUP_KEY = pytest.StashKey[ProcessGroup]()
_ZK_KEY = pytest.StashKey[ZooKeeper]()
_ENSEMBLE_KEY = pytest.StashKey[ZooKeeperEnsemble]()


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeper]:
    server = ZooKeeper(tmp_path_factory.mktemp("zk-session"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def zk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ZooKeeper]:
    server = ZooKeeper(tmp_path / "zk")
    request.node.stash[_ZK_KEY] = server
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def zk_ensemble(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ZooKeeperEnsemble]:
    ensemble = ZooKeeperEnsemble(tmp_path / "zk-ensemble", size=3)
    request.node.stash[_ENSEMBLE_KEY] = ensemble
    try:
        ensemble.start()
        yield ensemble
    finally:
        ensemble.close()


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    return unique_namespace(request.node.name)


@pytest.fixture
def zk_client(zk_server: ZooKeeper) -> Iterator[object]:
    from kazoo.client import KazooClient

    client = KazooClient(hosts=zk_server.hosts, timeout=5.0)
    client.start(timeout=10)
    try:
        yield client
    finally:
        client.stop()
        client.close()


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    request.node.stash[_GROUP_KEY] = group
    try:
        yield group
    finally:
        group.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        group = item.stash.get(_GROUP_KEY, None)
        if group is not None and group.processes:
            report.sections.append(("meshkeeper processes (stderr tails)", group.logs()))
        servers = [item.stash.get(_ZK_KEY, None)]
        ensemble = item.stash.get(_ENSEMBLE_KEY, None)
        if ensemble is not None:
            servers += ensemble.servers
        for server in servers:
            if server is not None:
                report.sections.append(_zookeeper_warnings(server))
    return report


def _zookeeper_warnings(server: ZooKeeper) -> tuple[str, str]:
    problems = [
        line
        for line in server.log_tail(400).splitlines()
        if (" WARN " in line or " ERROR " in line) and not any(b in line for b in _BENIGN_ZK_WARNINGS)
    ]
    state = "running" if server.running() else "stopped"
    text = "\n".join(problems[-15:]) or "(no warnings)"
    return f"zookeeper {server.hosts}, {state}: warnings in {server.log_path}", text


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Fixtures stop what they start; anything still alive here leaked from a test.
    leaked = [p.describe() for p in live_processes()]
    kill_all()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if leaked and reporter is not None:
        reporter.write_line("processes left running after the tests (now killed):", red=True)
        for line in leaked:
            reporter.write_line(f"  {line}", red=True)
