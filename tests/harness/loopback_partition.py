"""A pod's network link dropped, for processes that live on 127.0.0.1.

The soak's mesh (and its ZooKeeper ensemble) listens and registers on loopback, where a pod in a
network namespace of its own (tests/harness/pods.py) cannot reach it; so the partition is made
with packet drops on ``lo`` instead of a link set down, with the same effect for everyone else:
nothing the pod's processes send leaves (new sockets by the cgroup match of
:class:`~tests.harness.zk_blackhole.ZooKeeperBlackhole`, held ones by their source port), and
nothing reaches their listening ports (callers' SYNs and the packets of open connections vanish:
connect timeouts and stalled requests, not refusals). Needs root, cgroup v2 and xt_cgroup.

    with LoopbackPartition([sidecar.pid, app.pid], [inbound_port, app_port], name="soak-part"):
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

from tests.harness.zk_blackhole import ZooKeeperBlackhole, _socket_inodes


def held_local_ports(pid: int, exclude: Iterable[int]) -> set[int]:
    """Local ports of the established TCP connections of ``pid`` (not its listeners)."""
    skip, inodes, ports = set(exclude), _socket_inodes(pid), set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        lport, state, inode = int(fields[1].split(":")[1], 16), fields[3], fields[9]
        if inode in inodes and state == "01" and lport not in skip:  # 01: ESTABLISHED
            ports.add(lport)
    return ports


class LoopbackPartition(ZooKeeperBlackhole):
    def __init__(self, pids: Iterable[int], listen_ports: Iterable[int], name: str) -> None:
        self.pids = list(pids)
        super().__init__(self.pids[0], (), name=name)
        self.listen_ports = sorted(set(listen_ports))

    def cut(self) -> LoopbackPartition:
        self.group.mkdir(exist_ok=True)
        for pid in self.pids:
            (self.group / "cgroup.procs").write_text(f"{pid}\n")
        rel = str(self.group.relative_to(self.root))
        self._add(["-p", "tcp", "-m", "cgroup", "--path", rel, "-j", "DROP"])
        for port in self.listen_ports:
            self._add(["-p", "tcp", "--dport", str(port), "-j", "DROP"])
            self._add(["-p", "tcp", "--sport", str(port), "-j", "DROP"])
        for pid in self.pids:
            for port in held_local_ports(pid, self.listen_ports):
                self._add(["-p", "tcp", "--sport", str(port), "-j", "DROP"])
        return self

    def release(self) -> None:
        for pid in self.pids[1:]:
            with contextlib.suppress(OSError):
                (self.root / "cgroup.procs").write_text(f"{pid}\n")
        super().release()
