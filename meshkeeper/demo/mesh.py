"""A whole mesh on one machine: ZooKeeper, a control plane, and service instances with sidecars.

Every process listens on a port chosen at start (port 0 or :func:`free_port`) and is found through
its ready line (docs/contracts.md). :meth:`LocalMesh.stop` takes everything down in the order that
keeps the registry honest: sidecars and apps first (a sidecar deregisters its instance while its
app still answers), then the control plane, then ZooKeeper.

``zk_servers`` > 1 runs ZooKeeper as an ensemble of that many servers on 127.0.0.1
(:class:`~meshkeeper.demo.ensemble.ZooKeeperEnsemble`), and every process gets all of them in
``--zk``: a server may then be killed while the mesh serves (:meth:`LocalMesh.registry_status`).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from meshkeeper.demo.ensemble import ZooKeeperEnsemble
from meshkeeper.demo.process import (
    ChildProcess,
    ManagedProcess,
    app_argv,
    free_port,
    http_ok,
    meshkeeper_argv,
    terminate_all,
    wait_until,
)
from meshkeeper.demo.zookeeper import ZooKeeper

SIDECAR_READY_TIMEOUT = 30.0


@dataclass
class Instance:
    """One service instance: the demo app and the sidecar beside it."""

    service: str
    version: str
    weight: int
    app: ManagedProcess
    sidecar: ManagedProcess

    @property
    def app_port(self) -> int:
        return self.app.port("port")

    @property
    def app_address(self) -> str:
        """What the app reports as ``instance`` in its replies."""
        return f"127.0.0.1:{self.app_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.port('admin_port')}"

    @property
    def outbound_port(self) -> int:
        return self.sidecar.port("outbound_port")

    @property
    def inbound_port(self) -> int:
        return self.sidecar.port("inbound_port")


@dataclass
class LocalMesh:
    """Owns a work directory (logs, ZooKeeper data) and every process started in it."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="meshkeeper-demo-")))
    namespace: str = "default"
    sidecar_args: tuple[str, ...] = ()  # extra flags of every sidecar (the demo's tracing flags)
    zk_servers: int = 1  # more than one: a ZooKeeper ensemble of that many servers
    zk: ZooKeeper | ZooKeeperEnsemble | None = None
    controlplane: ManagedProcess | None = None
    instances: list[Instance] = field(default_factory=list)
    _started: list[ChildProcess] = field(default_factory=list)

    # ------------------------------------------------------------------ start

    def start_registry(self) -> None:
        """ZooKeeper, then a control plane watching it."""
        if self.zk_servers > 1:
            self.zk = ZooKeeperEnsemble(self.workdir / "zookeeper", size=self.zk_servers).start()
        else:
            self.zk = ZooKeeper(self.workdir / "zookeeper").start()
        # The CA (docs/identity.md): self-signed, kept in ZooKeeper under a passphrase of this demo's.
        passphrase = self.workdir / "ca-passphrase"
        passphrase.touch(mode=0o600)
        passphrase.write_text(secrets.token_urlsafe(32) + "\n")
        cp = ManagedProcess(
            # A local demo: no tokens, every caller may use the admin API (said on start).
            meshkeeper_argv("controlplane", "--zk", self.zk.hosts, "--xds-port", "0", "--http-port", "0",
                            "--insecure-admin", "--ca-passphrase-file", str(passphrase)),
            role="controlplane",
            log_dir=self.workdir,
        )
        self._started.append(cp)
        cp.start()
        self.controlplane = cp

    @property
    def zk_hosts(self) -> str:
        if self.zk is None:
            raise RuntimeError("start_registry() first")
        return self.zk.hosts

    @property
    def cp_address(self) -> str:
        if self.controlplane is None:
            raise RuntimeError("start_registry() first")
        return f"127.0.0.1:{self.controlplane.port('xds_port')}"

    @property
    def cp_http_url(self) -> str:
        if self.controlplane is None:
            raise RuntimeError("start_registry() first")
        return f"http://127.0.0.1:{self.controlplane.port('http_port')}"

    def add_instance(
        self, service: str, version: str = "v1", weight: int = 10, call: str | None = None
    ) -> Instance:
        """Start the demo app and its sidecar (not waiting for /ready: see :meth:`wait_ready`).

        An app that calls out (``call``) needs its sidecar's outbound port in ``HTTP_PROXY`` before
        it starts, and the sidecar needs the app's port: such an app gets a port chosen in advance.
        """
        n = sum(1 for i in self.instances if i.service == service) + 1
        name = f"{service}-{n}"
        app_args = ["--name", service, "--version", version]
        if call is None:
            app = self._start(app_argv(*app_args, "--port", "0"), "app", f"app-{name}")
            sidecar = self._start_sidecar(service, app.port("port"), version, weight, name)
        else:
            app_port = free_port()
            sidecar = self._start_sidecar(service, app_port, version, weight, name)
            proxy = f"http://127.0.0.1:{sidecar.port('outbound_port')}"
            # NO_PROXY is cleared so that a developer's own settings cannot route around the mesh.
            env = {"HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
            app = self._start(
                app_argv(*app_args, "--port", str(app_port), "--call", call), "app", f"app-{name}", env
            )
        instance = Instance(service, version, weight, app, sidecar)
        self.instances.append(instance)
        return instance

    def _start_sidecar(
        self, service: str, app_port: int, version: str, weight: int, name: str
    ) -> ManagedProcess:
        argv = meshkeeper_argv(
            "sidecar", "--service", service, "--namespace", self.namespace, "--app-port", str(app_port),
            "--version", version, "--weight", str(weight), "--cp", self.cp_address, "--zk", self.zk_hosts,
            "--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0", "--status-port", "0",
            "--identity-token-file", str(self.identity_token(service)), *self.sidecar_args,
        )  # fmt: skip
        return self._start(argv, "sidecar", f"sidecar-{name}")

    def identity_token(self, service: str) -> Path:
        """A file holding ``service``'s bootstrap token, minted by the control plane's admin API
        (``meshkeeper identity token``), so that its sidecars get certificates and speak mTLS."""
        path = self.workdir / f"{service}.token"
        if not path.exists():
            from meshkeeper.admin.v1 import admin_pb2
            from meshkeeper.ctl.client import Client, Target

            client = Client(Target(cp=self.cp_address))
            try:
                resp = client.call("IssueIdentityToken",
                                   admin_pb2.IssueIdentityTokenRequest(namespace=self.namespace, service=service))
            finally:
                client.close()
            path.touch(mode=0o600)
            path.write_text(resp.token + "\n")
        return path

    def _start(
        self, argv: list[str], role: str, name: str, env: dict[str, str] | None = None
    ) -> ManagedProcess:
        proc = ManagedProcess(argv, role=role, name=name, log_dir=self.workdir, env=env)
        self._started.append(proc)
        proc.start()
        return proc

    def wait_ready(self, timeout: float = SIDECAR_READY_TIMEOUT) -> None:
        """Poll every sidecar's ``GET /ready`` (first config applied, instance registered)."""
        for instance in self.instances:
            sidecar = instance.sidecar

            def ready(sidecar: ManagedProcess = sidecar, url: str = f"{instance.admin_url}/ready") -> bool:
                if not sidecar.running():
                    raise RuntimeError(f"{sidecar.name} exited with {sidecar.returncode}")
                return http_ok(url)

            try:
                wait_until(ready, timeout, 0.1, f"{sidecar.name} {instance.admin_url}/ready")
            except TimeoutError as exc:
                raise RuntimeError(
                    f"{exc}\n  stderr ({sidecar.stderr_path}):\n{sidecar.stderr_tail(20)}"
                ) from None

    # ------------------------------------------------------------------ observe

    def dead(self) -> list[str]:
        """Descriptions of processes that were started and are no longer running. A member of an
        ensemble is not one of them: losing it is what the ensemble is for (see :meth:`registry_status`)."""
        gone = [p.describe() for p in self._started if p.popen is not None and not p.running()]
        if isinstance(self.zk, ZooKeeper) and not self.zk.running():
            gone.append(f"zookeeper {self.zk.hosts} (log: {self.zk.log_path})")
        return gone

    def registry_status(self) -> str:
        """One line: what each ZooKeeper server says it is (``leader``, ``follower``, ``down``...)."""
        if isinstance(self.zk, ZooKeeperEnsemble):
            modes = ", ".join(f"{s.myid} {s.mode() or ('not serving' if s.running() else 'down')}"
                              for s in self.zk.servers)
            return f"ZooKeeper        ensemble: {modes}"
        if self.zk is not None:
            return f"ZooKeeper        {self.zk.mode() or 'not serving'}"
        return "ZooKeeper        not started"

    def endpoints(self) -> list[str]:
        """Where to look, one line each."""
        lines = []
        if isinstance(self.zk, ZooKeeperEnsemble):
            lines.append(f"ZooKeeper        ensemble of {len(self.zk.servers)}: {self.zk.hosts}  "
                         f"(zkCli.sh -server {self.zk.hosts})")
            lines += [f"                 server {s.myid} {s.hosts} pid {s.pid}  (kill -9 {s.pid}: the mesh "
                      f"keeps serving; logs {s.workdir})" for s in self.zk.servers]
        elif self.zk is not None:
            lines.append(f"ZooKeeper        {self.zk.hosts}  (zkCli.sh -server {self.zk.hosts})")
        if self.controlplane is not None:
            url = self.cp_http_url
            lines += [
                f"console          {url}/   (open it in a browser: graph, services, proxies, traces, alerts)",
                f"control plane    xDS {self.cp_address}   HTTP {url}/healthz",
                f"                 {url}/api/proxies   {url}/api/load   {url}/metrics",
                f"admin API        no tokens (--insecure-admin): try  meshkeeper get endpoints catalog "
                f"--cp {self.cp_address}",
                f"                 or  export MESHKEEPER_CP={self.cp_address};  meshkeeper disable catalog HOST:PORT",
            ]
        for i in self.instances:
            lines.append(
                f"{i.service + ' ' + i.version:<16} app 127.0.0.1:{i.app_port:<5}  sidecar admin {i.admin_url}"
                f"  (/ready /config_dump /clusters /stats/prometheus)  outbound :{i.outbound_port}"
                f"  inbound :{i.inbound_port}"
            )
        lines.append(f"logs             {self.workdir}")
        return lines

    # ------------------------------------------------------------------ stop

    def stop(self, remove_workdir: bool = True) -> None:
        """Sidecars first (each deregisters while its app still answers), then the apps, the control
        plane and ZooKeeper; then the work directory."""
        sidecars = [i.sidecar for i in self.instances]
        others = [p for p in self._started if p not in sidecars and p is not self.controlplane]
        terminate_all(sidecars, timeout=10.0)
        terminate_all(others, timeout=5.0)
        if self.controlplane is not None:
            self.controlplane.terminate(timeout=10.0)
        if self.zk is not None:
            self.zk.stop()
        if remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
