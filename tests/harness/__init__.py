"""Integration-test harness: real ZooKeeper, real meshkeeper processes, polling with deadlines.

The fixtures live in tests/conftest.py; this package holds what they (and tests) use::

    from tests.harness import ZooKeeper, MeshProcess, ProcessGroup, free_port, wait_until, http_get

A test of a small mesh, in a namespace of its own on the session's ZooKeeper::

    def test_catalog_answers(procs, zk_server, namespace):
        cp = procs.controlplane(zk_server.hosts)                      # info: xds_port, http_port
        xds = f"127.0.0.1:{cp.port('xds_port')}"
        app = procs.app("catalog", version="v1")                      # info: port
        procs.sidecar("catalog", app.port("port"), cp=xds, zk=zk_server.hosts, namespace=namespace)
        fe = procs.sidecar("frontend", procs.app("frontend").port("port"), cp=xds, zk=zk_server.hosts,
                           namespace=namespace)                        # waits for GET /ready
        url = f"http://127.0.0.1:{fe.port('outbound_port')}/"
        wait_until(lambda: http_get(url, {"Host": "catalog"})[0] == 200, 10, message="catalog routed")

Use the ``zk`` fixture instead of ``zk_server`` to stop, kill or restart ZooKeeper, and
``zk_ensemble`` (:class:`ZooKeeperEnsemble`, three servers) to take members of an ensemble away.
No sleeps: poll with :func:`wait_until`. The mechanics are shared with the demo and the benchmark in
:mod:`meshkeeper.demo`.
"""

from meshkeeper.demo.ensemble import EnsembleServer, ZooKeeperEnsemble
from meshkeeper.demo.process import (
    ManagedProcess,
    free_port,
    http_get,
    http_ok,
    parse_ready_line,
    process_group_pids,
    wait_until,
)
from meshkeeper.demo.zookeeper import ZooKeeper, ZooKeeperError, four_letter_word
from tests.harness.namespaces import unique_namespace
from tests.harness.processes import MeshProcess, ProcessGroup

__all__ = [
    "EnsembleServer",
    "ManagedProcess",
    "MeshProcess",
    "ProcessGroup",
    "ZooKeeper",
    "ZooKeeperEnsemble",
    "ZooKeeperError",
    "four_letter_word",
    "free_port",
    "http_get",
    "http_ok",
    "parse_ready_line",
    "process_group_pids",
    "unique_namespace",
    "wait_until",
]
