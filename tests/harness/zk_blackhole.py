"""Cut one process off from ZooKeeper, and only from ZooKeeper, so that its session expires.

A frozen process (SIGSTOP) also loses its session, but it stops serving too; a soak wants the
session expiry alone, with the data path untouched. Here the process is moved into a cgroup v2
group of its own and iptables drops what it sends to the ZooKeeper ports: new sockets by the
cgroup match (``-m cgroup --path``), and the sockets it already holds by their source port (a
socket keeps the cgroup it was created in, so the cgroup match misses them). Its client stops
hearing pings, gives up the connection, and every reconnection is dropped until :meth:`release`;
the servers expire the session after its timeout. Needs root, cgroup v2 and the xt_cgroup match.

    with ZooKeeperBlackhole(sidecar.pid, [2181, 2182, 2183]):
        wait_until(lambda: not kz.exists(instance_path), 15)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path


def cgroup2_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup/unified`` on a hybrid host)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (iptables, cgroups)"
    if cgroup2_root() is None:
        return "no cgroup v2 hierarchy mounted"
    probe = subprocess.run(["iptables", "-m", "cgroup", "--help"], capture_output=True, text=True)
    if probe.returncode != 0 or "--path" not in probe.stdout:
        return "iptables has no cgroup match"
    return None


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def held_connections(pid: int, ports: Iterable[int]) -> list[tuple[int, int]]:
    """``(local_port, remote_port)`` of the TCP connections of ``pid`` to any of ``ports``."""
    wanted, inodes, found = set(ports), _socket_inodes(pid), []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        rport = int(remote.split(":")[1], 16)
        if inode in inodes and rport in wanted:
            found.append((int(local.split(":")[1], 16), rport))
    return found


class ZooKeeperBlackhole:
    def __init__(self, pid: int, zk_ports: Iterable[int], name: str | None = None) -> None:
        self.pid = pid
        self.ports = sorted(set(zk_ports))
        root = cgroup2_root()
        if root is None:
            raise RuntimeError("no cgroup v2 hierarchy mounted")
        self.root = root
        self.group = root / (name or f"meshkeeper-zk-blackhole-{pid}")
        self.rules: list[list[str]] = []

    def _iptables(self, op: str, rule: list[str]) -> None:
        subprocess.run(["iptables", "-w", op, "OUTPUT", *rule], check=True, capture_output=True)

    def cut(self) -> ZooKeeperBlackhole:
        dports = ",".join(map(str, self.ports))
        self.group.mkdir(exist_ok=True)
        (self.group / "cgroup.procs").write_text(f"{self.pid}\n")
        rel = str(self.group.relative_to(self.root))
        self._add(["-p", "tcp", "-m", "cgroup", "--path", rel, "-m", "multiport", "--dports", dports,
                   "-j", "DROP"])
        for lport, rport in held_connections(self.pid, self.ports):
            self._add(["-p", "tcp", "--sport", str(lport), "--dport", str(rport), "-j", "DROP"])
        return self

    def _add(self, rule: list[str]) -> None:
        self._iptables("-I", rule)
        self.rules.append(rule)

    def release(self) -> None:
        """Remove the rules and the group (the process goes back to the root group); idempotent."""
        while self.rules:
            with contextlib.suppress(subprocess.CalledProcessError):
                self._iptables("-D", self.rules.pop())
        if self.group.exists():
            with contextlib.suppress(OSError):
                (self.root / "cgroup.procs").write_text(f"{self.pid}\n")  # fails if it exited: fine
            with contextlib.suppress(OSError):
                self.group.rmdir()

    def __enter__(self) -> ZooKeeperBlackhole:
        return self.cut()

    def __exit__(self, *exc: object) -> None:
        self.release()
