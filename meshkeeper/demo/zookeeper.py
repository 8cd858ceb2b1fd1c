"""A throwaway standalone ZooKeeper for the demo, the benchmark and the integration tests.

It runs the distribution's ZooKeeper (Debian package ``zookeeper``: jars in /usr/share/java)
with a config of its own in a work directory: data, config and logs all live there, nothing
touches /etc/zookeeper or /var/lib/zookeeper. The server is ready when its ``srvr`` four-letter
word answers with a ``Mode:`` line. ``stop()`` and ``start()`` keep the port and the data, so
tests can take ZooKeeper away and bring it back as it was.

The classpath is explicit: ``/usr/share/java/zookeeper.jar`` names its dependencies in its
manifest, and exactly one SLF4J binding (log4j 1.2) sends the server's log to a file. The
wildcard ``/usr/share/java/*`` also starts ZooKeeper, but it holds six SLF4J bindings and
whichever wins (often the no-op one) decides whether there is a log at all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from meshkeeper.demo.process import ChildProcess, free_port

JAVA_DIR = Path(os.environ.get("MESHKEEPER_ZK_JAVA_DIR", "/usr/share/java"))
MAIN_CLASS = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
START_TIMEOUT = 30.0
TICK_MS = 200

_LOG4J = """\
log4j.rootLogger=INFO, FILE
log4j.appender.FILE=org.apache.log4j.FileAppender
log4j.appender.FILE.File={log}
log4j.appender.FILE.Append=true
log4j.appender.FILE.layout=org.apache.log4j.PatternLayout
log4j.appender.FILE.layout.ConversionPattern=%d{{ISO8601}} %-5p [%t] %c{{1}} - %m%n
"""


class ZooKeeperError(RuntimeError):
    """ZooKeeper is not installed, did not start, or did not answer in time."""


def four_letter_word(host: str, port: int, word: str, timeout: float = 1.0) -> str:
    """Send a four-letter command (``srvr``, ``ruok``, ``mntr``, ...) and return the reply."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(word.encode())
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def classpath(java_dir: Path = JAVA_DIR) -> str:
    jars = [java_dir / "zookeeper.jar", java_dir / "slf4j-log4j12.jar", java_dir / "log4j-1.2.jar"]
    missing = [str(j) for j in jars if not j.exists()]
    if missing:
        raise ZooKeeperError(
            f"ZooKeeper is not installed (missing {', '.join(missing)}); "
            "run `make zookeeper` or `apt-get install zookeeper`"
        )
    return os.pathsep.join(str(j) for j in jars)


class ZooKeeper:
    """One standalone ZooKeeper server on 127.0.0.1.

    ``workdir`` holds ``zoo.cfg``, ``data/`` and ``zookeeper.log``; when it is not given a temp
    dir is made and removed by :meth:`close`. ``port=0`` picks a free port once; restarts keep it.
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        port: int = 0,
        *,
        java: str | None = None,
        tick_ms: int = TICK_MS,
        min_session_timeout_ms: int = 1000,
        max_session_timeout_ms: int = 60000,
    ) -> None:
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="meshkeeper-zk-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "zookeeper.log"
        self.config_path = self.workdir / "zoo.cfg"
        self._java = java or shutil.which("java") or "java"
        self._settings = {
            "tickTime": tick_ms,
            "dataDir": self.data_dir,
            "clientPort": self.port,
            "clientPortAddress": self.host,
            "minSessionTimeout": min_session_timeout_ms,
            "maxSessionTimeout": max_session_timeout_ms,
            "admin.enableServer": "false",
            "4lw.commands.whitelist": "*",
            # A throwaway server: no periodic purge, no preallocation of 64 MB log files.
            "autopurge.purgeInterval": 0,
            "preAllocSize": 1024,
        }
        self._proc: ChildProcess | None = None

    @property
    def hosts(self) -> str:
        """The connection string for kazoo and ``--zk``: ``127.0.0.1:<port>``."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.running() else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.running()

    def _write_config(self) -> None:
        self.data_dir.mkdir(exist_ok=True)
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in self._settings.items()))
        (self.workdir / "log4j.properties").write_text(_LOG4J.format(log=self.log_path))

    def start(self, timeout: float = START_TIMEOUT) -> ZooKeeper:
        """Start (or restart, same port and data) and wait until ``srvr`` reports a mode."""
        if self.running():
            return self
        self.spawn()
        return self.wait_serving(timeout)

    def spawn(self) -> None:
        """Launch the server without waiting for it (a member of an ensemble serves only once a
        quorum runs, so an ensemble spawns all its members before it waits for any)."""
        if self.running():
            return
        self._write_config()
        argv = [
            self._java,
            "-Xms32m",
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            f"-Dlog4j.configuration=file:{self.workdir / 'log4j.properties'}",
            "-Dzookeeper.jmx.log4j.disable=true",
            "-cp",
            classpath(),
            MAIN_CLASS,
            str(self.config_path),
        ]
        self._proc = ChildProcess(argv, name="zookeeper", log_dir=self.workdir)
        self._proc.spawn()

    def wait_serving(self, timeout: float = START_TIMEOUT) -> ZooKeeper:
        """Wait until ``srvr`` reports a mode; on a timeout the server is killed."""
        if self._proc is None:
            raise ZooKeeperError(f"ZooKeeper on {self.hosts} was never started")
        deadline = time.monotonic() + timeout
        while True:
            if not self._proc.running():
                code = self._proc.returncode
                raise ZooKeeperError(f"ZooKeeper exited with code {code} while starting\n{self.log_tail()}")
            if self.mode() is not None:
                return self
            if time.monotonic() >= deadline:
                self._proc.kill()
                raise ZooKeeperError(
                    f"ZooKeeper on {self.hosts} not ready after {timeout:.0f}s\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; the port and the data stay for :meth:`start`."""
        if self._proc is not None:
            self._proc.terminate(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, as far as clients can tell."""
        if self._proc is not None:
            self._proc.kill()

    def close(self) -> None:
        """Stop and, if this object made the work directory, remove it."""
        self.kill()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def srvr(self) -> str:
        return four_letter_word(self.host, self.port, "srvr")

    def mode(self) -> str | None:
        """What ``srvr`` says the server is (``standalone``, ``leader``, ``follower``), or None when
        it does not answer or does not serve (a member of an ensemble without a quorum)."""
        try:
            reply = self.srvr()
        except OSError:
            return None
        for line in reply.splitlines():
            if line.startswith("Mode:"):
                return line.partition(":")[2].strip()
        return None

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for path in (self.log_path, self.workdir / "zookeeper.stderr.log"):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ZooKeeper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ZooKeeper {self.hosts} {'running' if self.running() else 'stopped'} in {self.workdir}>"
