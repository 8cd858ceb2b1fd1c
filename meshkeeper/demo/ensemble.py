"""A throwaway ZooKeeper ensemble on 127.0.0.1, for failover tests and ``meshkeeper demo --zk-ensemble``.

Each member is a :class:`~meshkeeper.demo.zookeeper.ZooKeeper` (same classpath, logs, stop/kill/start
keeping ports and data) with quorum settings: a client, a quorum and an election port of its own, a
``myid`` file in its data directory, and the same ``server.<id>=127.0.0.1:<quorum>:<election>`` lines
as the others. Ticks are short (200 ms) and the limits a few ticks, so a member that loses its leader
notices within about a second and an election takes about as long, where ZooKeeper's defaults take
tens of seconds.

A member serves (``srvr`` answers ``Mode: leader|follower``) only while a quorum runs, so
:meth:`ZooKeeperEnsemble.start` launches every member before it waits for any::

    ensemble = ZooKeeperEnsemble(workdir, size=3).start()   # hosts: "127.0.0.1:a,127.0.0.1:b,127.0.0.1:c"
    old = ensemble.leader()
    old.kill()                                               # SIGKILL, as a crash
    new = ensemble.wait_quorum()                             # the two others elect a leader
    old.start()                                              # rejoins as a follower, same ports and data
    ensemble.rolling_restart()                               # followers first, the leader last
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from meshkeeper.demo.process import free_port
from meshkeeper.demo.zookeeper import START_TIMEOUT, TICK_MS, ZooKeeper, ZooKeeperError

INIT_LIMIT = 10  # ticks a follower may take to connect to the leader and sync (2 s at 200 ms)
SYNC_LIMIT = 5  # ticks a follower may fall behind before the leader drops it (1 s)
QUORUM_MODES = ("leader", "follower")


class EnsembleServer(ZooKeeper):
    """One member of an ensemble: ``myid`` and the ``server.N`` lines of every member."""

    def __init__(
        self,
        workdir: Path | str,
        myid: int,
        port: int,
        members: Mapping[int, tuple[int, int]],
        *,
        init_limit: int = INIT_LIMIT,
        sync_limit: int = SYNC_LIMIT,
        **kwargs: Any,
    ) -> None:
        super().__init__(workdir, port, **kwargs)
        self.myid = myid
        self.quorum_port, self.election_port = members[myid]
        self._settings.update({"initLimit": init_limit, "syncLimit": sync_limit})
        self._settings.update({f"server.{n}": f"{self.host}:{q}:{e}" for n, (q, e) in sorted(members.items())})

    def _write_config(self) -> None:
        super()._write_config()
        (self.data_dir / "myid").write_text(f"{self.myid}\n")

    def __repr__(self) -> str:
        state = (self.mode() or "not serving") if self.running() else "stopped"
        return f"<EnsembleServer {self.myid} {self.hosts} {state}>"


def distinct_free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` different free ports (:func:`free_port` picks at random, so two picks may collide)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


class ZooKeeperEnsemble:
    """``size`` ZooKeeper servers on 127.0.0.1 forming one ensemble.

    ``workdir`` holds ``server<N>/`` per member (its ``zoo.cfg``, ``data/myid`` and log); when it is
    not given a temp dir is made and removed by :meth:`close`. Ports are chosen once; every restart
    keeps them. ``servers[i]`` has ``myid`` i + 1.
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        size: int = 3,
        *,
        tick_ms: int = TICK_MS,
        init_limit: int = INIT_LIMIT,
        sync_limit: int = SYNC_LIMIT,
        **kwargs: Any,
    ) -> None:
        if size < 2:
            raise ValueError(f"an ensemble has at least 2 servers (got {size}); use ZooKeeper for one")
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="meshkeeper-zk-ensemble-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = distinct_free_ports(3 * size)
        members = {n: (ports[size + n - 1], ports[2 * size + n - 1]) for n in range(1, size + 1)}
        self.servers = [
            EnsembleServer(self.workdir / f"server{n}", n, ports[n - 1], members, tick_ms=tick_ms,
                           init_limit=init_limit, sync_limit=sync_limit, **kwargs)
            for n in range(1, size + 1)
        ]  # fmt: skip

    @property
    def hosts(self) -> str:
        """The connection string for kazoo and ``--zk``: every member's ``127.0.0.1:<port>``."""
        return ",".join(s.hosts for s in self.servers)

    def server(self, myid: int) -> EnsembleServer:
        return self.servers[myid - 1]

    def running(self) -> bool:
        """Every member runs (a lost member is a fault to report, even while a quorum serves)."""
        return all(s.running() for s in self.servers)

    def modes(self) -> dict[int, str | None]:
        """``{myid: mode}`` as each member's ``srvr`` says it (None: down or not serving)."""
        return {s.myid: s.mode() if s.running() else None for s in self.servers}

    def leader(self) -> EnsembleServer | None:
        """The member that says it leads, if exactly one does."""
        leaders = [s for s in self.servers if s.running() and s.mode() == "leader"]
        return leaders[0] if len(leaders) == 1 else None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = START_TIMEOUT) -> ZooKeeperEnsemble:
        """Launch every member that is not running, then wait for the quorum (:meth:`wait_quorum`)."""
        for s in self.servers:
            s.spawn()
        self.wait_quorum(timeout)
        return self

    def wait_quorum(self, timeout: float = START_TIMEOUT) -> EnsembleServer:
        """Wait until every running member serves as leader or follower, with exactly one leader;
        return the leader. Members that are stopped are left out: after a kill this is how to wait
        for the election among the others."""
        deadline = time.monotonic() + timeout
        while True:
            running = [s for s in self.servers if s.running()]
            modes = [s.mode() for s in running]
            if (2 * len(running) > len(self.servers) and all(m in QUORUM_MODES for m in modes)
                    and modes.count("leader") == 1):
                return running[modes.index("leader")]
            if time.monotonic() >= deadline:
                tails = "\n".join(f"--- server {s.myid} ({s.log_path}):\n{s.log_tail(10)}" for s in self.servers)
                raise ZooKeeperError(
                    f"ZooKeeper ensemble {self.hosts}: no quorum after {timeout:.0f}s "
                    f"(modes {self.modes()})\n{tails}"
                )
            time.sleep(0.05)

    def rolling_restart(
        self,
        timeout: float = START_TIMEOUT,
        *,
        on_restarted: Callable[[EnsembleServer], None] | None = None,
    ) -> None:
        """Restart every member in turn, as an operator upgrades an ensemble: the followers first,
        the leader last (one election instead of several). Each is stopped with SIGTERM, started,
        and the next waits until it serves again and the ensemble has a leader.
        ``on_restarted(server)`` runs after each member is back (tests check the mesh there)."""
        leader = self.wait_quorum(timeout)
        for s in [s for s in self.servers if s is not leader] + [leader]:
            s.stop()
            s.start(timeout)
            self.wait_quorum(timeout)
            if on_restarted is not None:
                on_restarted(s)

    def stop(self) -> None:
        """SIGTERM every member; ports and data stay for :meth:`start`."""
        for s in self.servers:
            s.stop()

    def kill(self) -> None:
        for s in self.servers:
            s.kill()

    def close(self) -> None:
        """Kill every member and, if this object made the work directory, remove it."""
        for s in self.servers:
            s.close()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(f"--- server {s.myid} {s.hosts}:\n{s.log_tail(lines)}" for s in self.servers)

    def __enter__(self) -> ZooKeeperEnsemble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ZooKeeperEnsemble {self.hosts} modes={self.modes()} in {self.workdir}>"
