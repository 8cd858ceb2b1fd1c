"""Integration-test harness: real ZooKeeper, real meshkeeper processes, polling with deadlines.

The fixtures live in tests/conftest.py; this package holds what they (and tests) use::

    from tests.harness import ZooKeeper, MeshProcess, ProcessGroup, free_port, wait_until, http_get

The mechanics are shared with the demo and the benchmark in :mod:`meshkeeper.demo`.
"""

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
    "ManagedProcess",
    "MeshProcess",
    "ProcessGroup",
    "ZooKeeper",
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
