"""Meshkeeper processes under test: start, wait for the ready line, always clean up.

:class:`MeshProcess` is ``meshkeeper <args>`` as a child process (see meshkeeper.demo.process for
the mechanics: own session, logs in files, SIGTERM-then-SIGKILL of the whole process group).
:class:`ProcessGroup` is what the ``procs`` fixture hands to a test: it starts control planes,
sidecars and demo apps with port 0, remembers them, and stops them all in teardown whatever the
test did: SIGTERM to all at once, then SIGKILL of each process group after a grace period.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from meshkeeper.demo.process import (
    READY_TIMEOUT,
    ManagedProcess,
    app_argv,
    http_ok,
    meshkeeper_argv,
    terminate_all,
    wait_until,
)

SIDECAR_READY_TIMEOUT = 20.0


class MeshProcess(ManagedProcess):
    """``meshkeeper <args>``; the role on the ready line defaults to the subcommand (``args[0]``)."""

    def __init__(
        self,
        *args: str,
        log_dir: Path | str,
        role: str | None = None,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not args and role is None:
            raise ValueError("MeshProcess needs a subcommand or a role")
        role = role or args[0]
        super().__init__(meshkeeper_argv(*args), role=role, name=name or role, log_dir=log_dir, env=env)

    @property
    def admin_url(self) -> str:
        """A sidecar's admin base URL, ``http://127.0.0.1:<admin_port>``."""
        return f"http://127.0.0.1:{self.port('admin_port')}"

    def wait_ready(self, timeout: float = SIDECAR_READY_TIMEOUT) -> None:
        """Poll a sidecar's ``GET /ready`` until 200 (docs/contracts.md), failing fast if it exits."""

        def ready() -> bool:
            if not self.running():
                raise AssertionError(f"exited with {self.returncode}")
            return http_ok(f"{self.admin_url}/ready")

        try:
            wait_until(ready, timeout, 0.05, f"{self.name}: {self.admin_url}/ready")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n  stderr ({self.stderr_path}):\n{self.stderr_tail()}") from None


class ProcessGroup:
    """The processes of one test. Every start is recorded before waiting, so teardown finds it."""

    def __init__(self, log_dir: Path | str) -> None:
        self.log_dir = Path(log_dir)
        self.processes: list[ManagedProcess] = []

    def _name(self, base: str) -> str:
        taken = {p.name for p in self.processes}
        if base not in taken:
            return base
        n = 2
        while f"{base}-{n}" in taken:
            n += 1
        return f"{base}-{n}"

    def start(
        self,
        argv: Sequence[str],
        *,
        role: str,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> ManagedProcess:
        """Any command that prints ``meshkeeper <role> listening ...``."""
        proc = ManagedProcess(argv, role=role, name=self._name(name or role), log_dir=self.log_dir, env=env)
        self.processes.append(proc)
        proc.start(timeout)
        return proc

    def meshkeeper(
        self,
        *args: str,
        role: str | None = None,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> MeshProcess:
        """``meshkeeper <args>``, started and past its ready line."""
        proc = MeshProcess(
            *args, role=role, name=self._name(name or role or args[0]), log_dir=self.log_dir, env=env
        )
        self.processes.append(proc)
        proc.start(timeout)
        return proc

    def controlplane(self, zk: str, *extra: str, name: str = "controlplane") -> MeshProcess:
        """``meshkeeper controlplane --zk ZK --xds-port 0 --http-port 0``; ``info`` has both ports."""
        return self.meshkeeper(
            "controlplane", "--zk", zk, "--xds-port", "0", "--http-port", "0", *extra, name=name
        )

    def sidecar(
        self,
        service: str,
        app_port: int,
        *,
        cp: str,
        zk: str,
        wait_ready: bool = True,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        **flags: object,
    ) -> MeshProcess:
        """``meshkeeper sidecar`` with port 0 listeners; ``flags`` become ``--flag-name value``.

        ``cp`` is ``host:port`` of the control plane's xDS server. Unless ``wait_ready=False``, waits
        for ``GET /ready`` on the admin port.
        """
        args = ["sidecar", "--service", service, "--app-port", str(app_port), "--cp", cp, "--zk", zk]
        ports = {"outbound_port": 0, "inbound_port": 0, "admin_port": 0, "status_port": 0}
        for key, value in {**ports, **flags}.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        proc = self.meshkeeper(*args, name=name or f"sidecar-{service}", env=env)
        if wait_ready:
            proc.wait_ready()
        return proc

    def app(
        self,
        name: str = "app",
        *,
        version: str = "v1",
        port: int = 0,
        call: str | None = None,
        env: Mapping[str, str] | None = None,
        extra: Sequence[str] = (),
    ) -> ManagedProcess:
        """The demo app (meshkeeper.demo.app) as service ``name``; ``port("port")`` is where it listens."""
        args = ["--name", name, "--version", version, "--port", str(port), *extra]
        if call:
            args += ["--call", call]
        return self.start(app_argv(*args), role="app", name=f"app-{name}", env=env)

    def close(self, timeout: float = 5.0) -> None:
        """Stop everything: SIGTERM to all at once, SIGKILL of each process group after ``timeout``."""
        terminate_all(list(reversed(self.processes)), timeout)

    def logs(self, lines: int = 40) -> str:
        """The stderr tails of every process, for failure reports."""
        parts = []
        for proc in self.processes:
            parts.append(f"--- {proc.describe()}\n    stderr: {proc.stderr_path}\n{proc.stderr_tail(lines)}")
        return "\n".join(parts)
