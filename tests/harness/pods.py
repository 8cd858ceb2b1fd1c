"""Kubernetes-like pods for the transparent-mode tests: network namespaces on a Linux bridge (issue 12).

A :class:`PodNetwork` is a bridge ``mkbr<suffix>`` on the host with the host address
``10.241.<x>.1/24``; :meth:`PodNetwork.add_pod` makes a pod: network namespace
``mkpod-<suffix>-<name>``, a veth pair (``eth0`` inside, ``mkv<suffix>p<n>`` on the bridge), the pod
IP ``10.241.<x>.<n>/24``, loopback up and a default route via the host address. Pods reach each
other and the host over the bridge, nothing else: the host does not route for them, and IPv6 is
off on every interface made here, so no traffic leaves 10.241.<x>.0/24.

``x`` is the first byte of the 4-hex ``suffix`` and is claimed by an ``flock`` on
``/run/meshkeeper-pods/<x>.lock`` held for the network's lifetime (and unlinked before it is
released), so parallel runs never share a subnet. A leftover with our prefixes whose lock nobody holds belongs to a crashed run: it is
removed (processes, namespaces, veths, bridge, /etc/netns files, firewall rules) before a network
starts (:func:`sweep_stale`). :meth:`PodNetwork.close` removes everything of its own the same way,
whatever happened in the test (an exception, KeyboardInterrupt).

Host servers: ZooKeeper and the control plane must listen on ``network.host_ip`` (or 0.0.0.0) for
pods to reach them: :meth:`PodNetwork.zookeeper` and :meth:`PodNetwork.controlplane` do. When the
host's filter table could drop bridge traffic (an INPUT policy or rules; with br_netfilter and
``bridge-nf-call-iptables=1``, FORWARD too), ACCEPT rules for our bridge only are inserted, tagged
``meshkeeper-pods-<suffix>``, and removed at close.

Processes: :meth:`Pod.run` (a Popen), :meth:`Pod.check_output`, and :meth:`Pod.start` /
:meth:`Pod.meshkeeper` / :meth:`Pod.sidecar` (a :class:`PodProcess`: the ready-line parsing of
tests/harness/processes.py, logs attached to failures when the network shares the test's
``procs`` group). All run as ``ip netns exec <ns> ...``; with ``uid=`` through
``setpriv --reuid U --regid U --clear-groups``. Teardown SIGTERMs them, then SIGKILLs whatever is
left in the pods' namespaces.

uid 1337 and the venv: the venv's interpreter lives under /root (0700 here), which another uid may
not search. Rather than chmod the host's /root, a process started with ``uid=`` gets, in the
private mount namespace ``ip netns exec`` makes for it, a tmpfs of mode 0711 over each such
directory holding bind mounts of only the entries on the way to the interpreter, its stdlib, the
venv and the repository (:func:`uid_prelude`). Nothing changes outside that process's view.

    with PodNetwork(log_dir) as net:                        # or the ``pod_network`` fixture
        a, b = net.add_pod("a"), net.add_pod("b")
        zk = net.zookeeper()                                  # on net.host_ip
        app = b.start(thrift_apps.serve_argv("b1"), role="app", uid=1000)
        a.check_output([sys.executable, "-m", "tests.harness.thrift_apps", "call", "--host", b.ip,
                        "--port", str(app.port("port")), "whoami"], uid=1000)
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import ipaddress
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from meshkeeper.demo.process import (
    READY_TIMEOUT,
    ManagedProcess,
    free_port,
    meshkeeper_argv,
    terminate_all,
    wait_until,
)
from meshkeeper.demo.zookeeper import ZooKeeper
from tests.harness.processes import SIDECAR_READY_TIMEOUT, ProcessGroup

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
PROXY_UID = 1337
BRIDGE_PREFIX, VETH_PREFIX, NETNS_PREFIX = "mkbr", "mkv", "mkpod-"
RULE_TAG = "meshkeeper-pods-"
STATE_DIR = Path("/run/meshkeeper-pods")
ETC_NETNS = Path("/etc/netns")
SUPERNET = ipaddress.ip_network("10.241.0.0/16")
# 10.241.83/84.0/24 are tests/integration/test_iptables_netns.py's (isolated, but keep apart).
RESERVED_X = frozenset({0, 83, 84, 255})
MAX_PODS = 200

_NAMES = re.compile(
    rf"^(?:{BRIDGE_PREFIX}(?P<b>[0-9a-f]{{4}})|{VETH_PREFIX}(?P<v>[0-9a-f]{{4}})p\d+"
    rf"|{NETNS_PREFIX}(?P<n>[0-9a-f]{{4}})-.+)$"
)
_POD_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_CLONE_NEWNET = 0x40000000


class PodNetworkUnavailable(RuntimeError):
    """This host cannot make pods (not root, no ``ip netns``, no bridge or no nat table)."""


# --------------------------------------------------------------------------- host commands


def _run(*argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


_unavailable: list[str | None] = []


def unavailable_reason() -> str | None:
    """Why pods cannot be made here, or None. Checked once per process."""
    if not _unavailable:
        _unavailable.append(_probe())
    return _unavailable[0]


def _probe() -> str | None:
    if os.geteuid() != 0:
        return "pods need root (network namespaces, a bridge, iptables)"
    missing = [t for t in ("ip", "setpriv", "unshare", "iptables", "iptables-save") if not shutil.which(t)]
    if missing:
        return f"pods need {', '.join(missing)} (iproute2, util-linux, iptables)"
    if _run("ip", "netns", "list", check=False).returncode != 0:
        return "`ip netns` does not work here"
    nat = _run("unshare", "--net", "iptables", "-t", "nat", "-S", check=False)
    if nat.returncode != 0:
        return f"no netfilter nat table in a new network namespace: {nat.stderr.strip()}"
    return None


def _try_lock(x: int) -> int | None:
    """An fd holding the exclusive lock on subnet ``x``, or None when another network holds it.

    The holder unlinks the lock file before releasing it (:func:`_unlock`), so a lock taken on a
    file that is no longer the one at the path is worthless: compare inodes after locking.
    """
    path = STATE_DIR / f"{x}.lock"
    for _ in range(5):
        STATE_DIR.mkdir(mode=0o755, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the directory was just removed by a closing network
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # locked a file its holder had just unlinked: try the path again
    return None


def _unlock(x: int, fd: int) -> None:
    """Remove the lock file of ``x`` (and the state directory when empty), then release the lock."""
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"{x}.lock").unlink()
    with contextlib.suppress(OSError):
        STATE_DIR.rmdir()
    os.close(fd)


def _our_rules(suffix: str | None = None) -> list[tuple[str, list[str]]]:
    """(suffix, ``iptables -D ...`` argv) of every host filter rule we tagged."""
    found = []
    for chain in ("INPUT", "FORWARD"):
        listing = _run("iptables", "-w", "-S", chain, check=False).stdout
        for line in listing.splitlines():
            m = re.search(rf"--comment \"?{RULE_TAG}([0-9a-f]{{4}})\b", line)
            if m and line.startswith("-A ") and suffix in (None, m.group(1)):
                found.append((m.group(1), ["iptables", "-w", "-D", *shlex.split(line)[1:]]))
    return found


def leftovers() -> dict[str, list[str]]:
    """What exists on this host under our prefixes, by suffix: ``kind:name`` strings."""
    found: dict[str, list[str]] = {}
    for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if m := _NAMES.match(name):
            found.setdefault(m.group("b") or m.group("v"), []).append(f"link:{name}")
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if (m := _NAMES.match(name)) and m.group("n"):
            found.setdefault(m.group("n"), []).append(f"netns:{name}")
    for path in ETC_NETNS.glob(f"{NETNS_PREFIX}*") if ETC_NETNS.is_dir() else ():
        if (m := _NAMES.match(path.name)) and m.group("n"):
            found.setdefault(m.group("n"), []).append(f"etc:{path}")
    for path in STATE_DIR.glob("????") if STATE_DIR.is_dir() else ():
        if re.fullmatch(r"[0-9a-f]{4}", path.name):
            found.setdefault(path.name, []).append(f"state:{path}")
    for suffix, argv in _our_rules():
        found.setdefault(suffix, []).append(f"rule:{' '.join(argv[3:])}")
    return found


def _remove(suffix: str) -> list[str]:
    """Remove everything of network ``suffix``; returns what failed (each step is tried)."""
    errors: list[str] = []
    items = leftovers().get(suffix, [])
    netns = [i.split(":", 1)[1] for i in items if i.startswith("netns:")]
    for ns in netns:  # a namespace outlives its name while a process holds it: kill them first
        _kill_netns_pids(ns)
    steps: list[tuple[str, Callable[[], object]]] = []
    steps += [(f"netns {ns}", lambda ns=ns: _run("ip", "netns", "del", ns)) for ns in netns]
    links = [i.split(":", 1)[1] for i in items if i.startswith("link:")]
    links.sort(key=lambda name: name.startswith(BRIDGE_PREFIX))  # veths first, then the bridge
    steps += [(f"link {n}", lambda n=n: _run("ip", "link", "del", n, check=False)) for n in links]
    steps += [(" ".join(argv), lambda argv=argv: _run(*argv)) for _, argv in _our_rules(suffix)]
    paths = [Path(i.split(":", 1)[1]) for i in items if i.startswith(("etc:", "state:"))]
    steps += [(str(p), lambda p=p: shutil.rmtree(p)) for p in paths]
    for what, step in steps:
        try:
            step()
        except Exception as exc:  # keep going: the rest must still be removed
            errors.append(f"{what}: {exc}")
    return errors + [f"still there: {i}" for i in leftovers().get(suffix, [])]


def _kill_netns_pids(ns: str) -> None:
    pids = [int(p) for p in _run("ip", "netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _run("ip", "netns", "pids", ns, check=False).stdout.split(), 5, 0.02,
               f"processes of netns {ns} gone")


def sweep_stale(held_x: int | None = None) -> list[str]:
    """Remove the leftovers of crashed runs: those whose subnet lock is free (or is ``held_x``, ours).

    Returns the suffixes removed. Networks alive in this or another process hold their lock.
    """
    removed = []
    for suffix in sorted(leftovers()):
        x = int(suffix[:2], 16)
        fd = None if x == held_x else _try_lock(x)
        if x != held_x and fd is None:
            continue
        try:
            _remove(suffix)
            removed.append(suffix)
        finally:
            if fd is not None:
                _unlock(x, fd)
    if removed:  # a crashed run's set_resolv_conf may have made /etc/netns: remove it when empty
        with contextlib.suppress(OSError):
            ETC_NETNS.rmdir()
    return removed


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in _run("ip", "-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        with contextlib.suppress(ValueError, IndexError):
            net = ipaddress.ip_network(line.split()[0] if line.split()[0] != "local" else line.split()[1],
                                       strict=False)
            if net.prefixlen >= SUPERNET.prefixlen:
                nets.append(net)
    return nets


# --------------------------------------------------------------------------- the uid-1337 view of /root


def uid_prelude(stash: Path, paths: Sequence[str | Path] = ()) -> str:
    """Shell commands that make ``paths`` reachable for any uid in a private mount namespace.

    For each directory on the way that others may not search (``/root``, mode 0700), mount a tmpfs
    of mode 0711 over it holding bind mounts of only the entries on the way; ``stash`` is an empty
    directory to park the original on meanwhile. Empty when every directory is searchable.
    """
    wanted = list(paths) or [sys.executable, os.path.realpath(sys.executable), sys.prefix,
                             sys.base_prefix, os.path.realpath(sys.base_prefix), ROOT]
    blocked: dict[Path, set[str]] = {}
    for path in wanted:
        here = Path("/")
        for part in Path(os.path.abspath(path)).parts[1:]:
            if not here.stat().st_mode & 0o001:
                blocked.setdefault(here, set()).add(part)
            here = here / part
    lines = []
    s = shlex.quote(str(stash))
    for directory in sorted(blocked, key=lambda p: len(p.parts)):
        d = shlex.quote(str(directory))
        lines += [f"mount --bind {d} {s}", f"mount -t tmpfs -o mode=0711,size=64k meshkeeper-pods {d}"]
        for child in sorted(blocked[directory]):
            src, dst = shlex.quote(f"{stash}/{child}"), shlex.quote(f"{directory}/{child}")
            lines += [f"if [ -d {src} ]; then mkdir {dst}; else touch {dst}; fi", f"mount --bind {src} {dst}"]
        lines.append(f"umount -l {s}")
    return "\n".join(lines)


def in_netns(netns: str, make: Callable[[], T]) -> T:
    """``make()`` run by a thread that first entered ``netns`` (a socket stays where it was made)."""
    import ctypes

    out: dict[str, Any] = {}

    def enter_and_make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            finally:
                os.close(fd)
            out["value"] = make()
        except BaseException as exc:  # handed to the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=enter_and_make, name=f"setns-{netns}")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


# --------------------------------------------------------------------------- pods and their processes


class PodProcess(ManagedProcess):
    """A long-running process in a pod, past its ready line; ``admin_url`` is inside the pod."""

    def __init__(self, pod: Pod, argv: Sequence[str], **kwargs: Any) -> None:
        super().__init__(argv, cwd=ROOT, **kwargs)
        self.pod = pod

    @property
    def admin_url(self) -> str:
        """A sidecar's admin base URL as seen inside its pod: ``http://127.0.0.1:<admin_port>``."""
        return f"http://127.0.0.1:{self.port('admin_port')}"

    def wait_ready(self, timeout: float = SIDECAR_READY_TIMEOUT) -> None:
        """Poll ``GET /ready`` from inside the pod until 200, failing fast if the process exits."""

        def ready() -> bool:
            if not self.running():
                raise AssertionError(f"exited with {self.returncode}")
            return self.pod.http_get(f"{self.admin_url}/ready", timeout=2.0)[0] == 200

        try:
            wait_until(ready, timeout, 0.05, f"{self.name}: {self.admin_url}/ready in pod {self.pod.name}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n  stderr ({self.stderr_path}):\n{self.stderr_tail()}") from None


class Pod:
    """One pod: network namespace ``netns`` with ``eth0`` at ``ip`` on its network's bridge."""

    def __init__(self, network: PodNetwork, name: str, netns: str, ip: str) -> None:
        self.network, self.name, self.netns, self.ip = network, name, netns, ip

    def __repr__(self) -> str:
        return f"<Pod {self.name} {self.ip} netns={self.netns}>"

    # -- processes

    def argv(self, argv: Sequence[str], uid: int | None = None) -> list[str]:
        """The command line that runs ``argv`` in this pod (as ``uid``; None: root)."""
        inner = [str(a) for a in argv]
        if uid is not None:
            inner = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--pdeathsig=KILL",
                     "--", *inner]
            if prelude := self.network.uid_prelude:
                inner = ["sh", "-ec", f'{prelude}\nexec "$@"', "sh", *inner]
        return ["setpriv", "--pdeathsig=KILL", "--", "ip", "netns", "exec", self.netns, *inner]

    def run(
        self, argv: Sequence[str], uid: int | None = None, env: Mapping[str, str] | None = None, **popen_kw: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` in the pod (own session, cwd the repository); killed at network close."""
        popen_kw.setdefault("cwd", ROOT)
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        popen_kw["start_new_session"] = True
        full_env = {**os.environ, **env} if env is not None else None
        proc = subprocess.Popen(self.argv(argv, uid), env=full_env, **popen_kw)
        self.network.popens.append(proc)
        return proc

    def check_output(
        self, argv: Sequence[str], uid: int | None = None, env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> str:
        """Run ``argv`` in the pod to completion; its stdout, or AssertionError with its stderr."""
        proc = self.run(argv, uid, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"{self.name}: {argv} timed out after {timeout}s\n{err}") from None
        if proc.returncode != 0:
            raise AssertionError(f"{self.name}: {' '.join(map(str, argv))} exited {proc.returncode}:\n{err}{out}")
        return out

    def start(
        self, argv: Sequence[str], *, role: str, uid: int | None = None, name: str | None = None,
        env: Mapping[str, str] | None = None, timeout: float = READY_TIMEOUT,
    ) -> PodProcess:
        """A process that prints ``meshkeeper <role> listening k=v ...``, started and past that line."""
        return self.network.start(self, argv, role=role, uid=uid, name=name, env=env, timeout=timeout)

    def meshkeeper(self, *args: str, uid: int | None = None, role: str | None = None, name: str | None = None,
                   env: Mapping[str, str] | None = None, timeout: float = READY_TIMEOUT) -> PodProcess:
        """``meshkeeper <args>`` in the pod; the role defaults to the subcommand."""
        return self.start(meshkeeper_argv(*args), role=role or args[0], uid=uid, name=name, env=env,
                          timeout=timeout)

    def sidecar(self, service: str, app_port: int, *, cp: str, zk: str, uid: int | None = PROXY_UID,
                wait_ready: bool = True, env: Mapping[str, str] | None = None, **flags: object) -> PodProcess:
        """``meshkeeper sidecar`` in the pod as the proxy uid, advertising the pod IP.

        Ports keep their defaults (15001, 15006, 15000, 15021, 15053: the pod is a host of its own and
        the capture rules point there); ``flags`` become ``--flag-name value`` (e.g. ``interception=
        "redirect"``). Unless ``wait_ready=False``, waits for ``GET /ready`` inside the pod.
        """
        args = ["sidecar", "--service", service, "--app-port", str(app_port), "--cp", cp, "--zk", zk]
        for key, value in {"advertise_host": self.ip, **flags}.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        proc = self.meshkeeper(*args, uid=uid, name=f"{self.name}-sidecar-{service}", env=env)
        if wait_ready:
            proc.wait_ready()
        return proc

    def capture(self, *flags: str) -> str:
        """``meshkeeper iptables <flags>`` in the pod as root (the init container's job); its stdout."""
        return self.check_output(meshkeeper_argv("iptables", *flags))

    def pids(self) -> list[int]:
        out = _run("ip", "netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    # -- files and rules

    def set_resolv_conf(self, nameservers: Sequence[str], search: Sequence[str] = ()) -> Path:
        """Write /etc/netns/<ns>/resolv.conf: processes started afterwards see it as /etc/resolv.conf."""
        directory = ETC_NETNS / self.netns
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "resolv.conf"
        lines = [f"nameserver {ns}" for ns in nameservers] + ([f"search {' '.join(search)}"] if search else [])
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o644)
        return path

    def iptables_save(self, table: str | None = None, tool: str = "iptables-save") -> str:
        """The pod's rules (``iptables-save`` without comments and counters lines)."""
        out = self.check_output([tool, *(["-t", table] if table else [])])
        return "".join(line + "\n" for line in out.splitlines() if not line.startswith("#"))

    # -- sockets made in the pod by the test process (as root: an app, as far as capture goes)

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        return in_netns(self.netns, lambda: socket.socket(family, kind))

    def connect(self, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP connection dialed from inside the pod (fits ThriftClient's ``connect``)."""
        sock = self.socket()
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def listen(self, port: int = 0, host: str = "0.0.0.0", backlog: int = 16) -> socket.socket:
        sock = self.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        return sock

    def http_get(self, url: str, headers: Mapping[str, str] | None = None,
                 timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """GET from inside the pod: (status, headers, body)."""
        parts = urllib.parse.urlsplit(url)
        pod = self

        class Connection(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = pod.connect(self.host, self.port, timeout)

        conn = Connection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
        try:
            conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                         headers=dict(headers or {}))
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()


class HostZooKeeper(ZooKeeper):
    """A throwaway ZooKeeper listening on ``host`` (the bridge address) so pods can reach it."""

    def __init__(self, workdir: Path | str | None, host: str, **kwargs: Any) -> None:
        super().__init__(workdir, port=free_port(host), **kwargs)
        self.host = host
        # ZooKeeper takes no host argument; its config is written from _settings at start().
        self._settings["clientPortAddress"] = host


# --------------------------------------------------------------------------- the network


class PodNetwork:
    """A bridge with pods on it; a context manager. ``group`` may be the test's ``procs``."""

    def __init__(self, log_dir: Path | str | None = None, group: ProcessGroup | None = None) -> None:
        self.group = group or ProcessGroup(log_dir or tempfile.mkdtemp(prefix="meshkeeper-pods-"))
        self.pods: dict[str, Pod] = {}
        self.popens: list[subprocess.Popen[Any]] = []
        self.processes: list[ManagedProcess] = []
        self.zookeepers: list[ZooKeeper] = []
        self.firewall: list[str] = []  # the host rules we inserted (removed at close)
        self.suffix = ""
        self.bridge = ""
        self.host_ip = ""
        self.subnet: ipaddress.IPv4Network | None = None
        self.uid_prelude = ""
        self._lock: tuple[int, int] | None = None  # (x, fd) of the subnet lock
        self._etc_netns_existed = True

    def __enter__(self) -> PodNetwork:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> PodNetwork:
        """Sweep stale leftovers, claim a subnet, make the bridge. Raises PodNetworkUnavailable."""
        reason = unavailable_reason()
        if reason:
            raise PodNetworkUnavailable(reason)
        self._etc_netns_existed = ETC_NETNS.is_dir()
        try:
            self._claim_subnet()
            self._make_bridge()
        except BaseException:
            self.close()
            raise
        return self

    def _claim_subnet(self) -> None:
        in_use = _subnets_in_use()
        candidates = [x for x in range(1, 255) if x not in RESERVED_X]
        random.shuffle(candidates)
        for x in candidates:
            subnet = ipaddress.ip_network(f"10.241.{x}.0/24")
            if any(subnet.overlaps(net) for net in in_use):
                continue
            if (fd := _try_lock(x)) is not None:
                self._lock = (x, fd)
                sweep_stale(held_x=x)
                self.suffix, self.subnet = f"{x:02x}{secrets.randbelow(256):02x}", subnet
                self.bridge, self.host_ip = f"{BRIDGE_PREFIX}{self.suffix}", str(subnet[1])
                (STATE_DIR / self.suffix / "stash").mkdir(parents=True, exist_ok=True)
                self.uid_prelude = uid_prelude(STATE_DIR / self.suffix / "stash")
                return
        raise PodNetworkUnavailable("every 10.241.x.0/24 is taken by other networks")

    def _make_bridge(self) -> None:
        made = _run("ip", "link", "add", "name", self.bridge, "type", "bridge", "stp_state", "0",
                    "forward_delay", "0", check=False)
        if made.returncode != 0:
            raise PodNetworkUnavailable(f"cannot make a Linux bridge: {made.stderr.strip()}")
        _disable_ipv6(self.bridge)
        _run("ip", "-batch", "-", stdin=f"addr add {self.host_ip}/24 dev {self.bridge}\n"
                                          f"link set {self.bridge} up\n")
        self._open_firewall()
        sweep_stale()  # other crashed runs' leftovers, now that ours cannot be mistaken for one

    def _open_firewall(self) -> None:
        tag = ["-m", "comment", "--comment", f"{RULE_TAG}{self.suffix}", "-j", "ACCEPT"]
        wanted = [("INPUT", ["-i", self.bridge])]
        if Path("/proc/sys/net/bridge/bridge-nf-call-iptables").is_file() and \
                Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip() == "1":
            wanted.append(("FORWARD", ["-i", self.bridge, "-o", self.bridge]))  # br_netfilter: pod to pod
        for chain, match in wanted:
            listing = _run("iptables", "-w", "-S", chain, check=False)
            lines = listing.stdout.splitlines()
            if listing.returncode != 0 or (lines == [f"-P {chain} ACCEPT"]):
                continue  # no filter table, or nothing there that could drop us
            _run("iptables", "-w", "-I", chain, "1", *match, *tag)
            self.firewall.append(f"{chain} {' '.join(match)} ACCEPT")

    def add_pod(self, name: str) -> Pod:
        """A new pod ``name`` (a DNS label): netns, veth into the bridge, IP, lo up, default route."""
        if not _POD_NAME.match(name) or name in self.pods:
            raise ValueError(f"bad or duplicate pod name {name!r}")
        n = len(self.pods) + 2
        if n > MAX_PODS or self.subnet is None:
            raise RuntimeError("network closed or full")
        netns, veth, ip = f"{NETNS_PREFIX}{self.suffix}-{name}", f"{VETH_PREFIX}{self.suffix}p{n}", str(self.subnet[n])
        _run("ip", "netns", "add", netns)
        pod = self.pods[name] = Pod(self, name, netns, ip)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _disable_ipv6(veth)
        _run("ip", "link", "set", veth, "master", self.bridge, "up")
        _run("ip", "netns", "exec", netns, "sh", "-c",
             "f=/proc/sys/net/ipv6/conf/eth0/disable_ipv6; [ ! -e $f ] || echo 1 > $f")
        _run("ip", "-n", netns, "-batch", "-", stdin=f"addr add {ip}/24 dev eth0\nlink set eth0 up\n"
                                                      f"link set lo up\nroute add default via {self.host_ip}\n")
        return pod

    # -- processes

    def start(self, pod: Pod | None, argv: Sequence[str], *, role: str, uid: int | None = None,
              name: str | None = None, env: Mapping[str, str] | None = None,
              timeout: float = READY_TIMEOUT) -> PodProcess:
        """A ready-line process in ``pod`` (None: on the host), recorded in ``group`` before waiting."""
        taken = {p.name for p in self.group.processes}
        base = name or (f"{pod.name}-{role}" if pod else role)
        unique = next(f"{base}-{i}" if i > 1 else base for i in range(1, 1000)
                      if (f"{base}-{i}" if i > 1 else base) not in taken)
        full = pod.argv(argv, uid) if pod else list(argv)
        proc = PodProcess(pod, full, role=role, name=unique, log_dir=self.group.log_dir, env=env)  # type: ignore[arg-type]
        self.group.processes.append(proc)
        self.processes.append(proc)
        proc.start(timeout)
        return proc

    def controlplane(self, zk: str, *extra: str, name: str = "controlplane") -> PodProcess:
        """``meshkeeper controlplane`` on the host, bound to ``host_ip`` so pods reach it."""
        argv = meshkeeper_argv("controlplane", "--zk", zk, "--bind", self.host_ip, "--xds-port", "0",
                               "--http-port", "0", *extra)
        return self.start(None, argv, role="controlplane", name=name)

    def zookeeper(self, workdir: Path | str | None = None) -> ZooKeeper:
        """A ZooKeeper on ``host_ip`` (``.hosts`` for pods and host alike), closed with the network."""
        zk = HostZooKeeper(workdir, self.host_ip)
        self.zookeepers.append(zk)
        return zk.start()

    # -- teardown

    def close(self) -> None:
        """Stop every process, remove every namespace, veth, file and rule of ours, release the subnet.

        Each step runs whatever the previous ones did; a KeyboardInterrupt during close still
        lets the rest run and is re-raised at the end.
        """
        pending: BaseException | None = None
        steps: list[Callable[[], object]] = [
            lambda: terminate_all(list(reversed(self.processes)), 5.0),
            self._kill_popens,
            *[zk.close for zk in self.zookeepers],
        ]
        if self.suffix:
            steps.append(self._remove_all)
        for step in steps:
            try:
                step()
            except BaseException as exc:  # finish the teardown, report afterwards
                pending = pending or exc
        if not self._etc_netns_existed:  # set_resolv_conf made it; leave it as we found it
            with contextlib.suppress(OSError):
                ETC_NETNS.rmdir()
        if self._lock is not None:
            _unlock(*self._lock)
            self._lock = None
        self.pods.clear()
        if pending is not None:
            raise pending

    def _kill_popens(self) -> None:
        for proc in self.popens:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def _remove_all(self) -> None:
        errors = _remove(self.suffix)
        if errors:
            raise RuntimeError(f"pod network {self.suffix} not fully removed: {'; '.join(errors)}")


def _disable_ipv6(dev: str) -> None:
    path = Path(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6")
    if path.exists():
        path.write_text("1\n")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def pod_network(procs: ProcessGroup) -> Iterator[PodNetwork]:
    """A :class:`PodNetwork` sharing the test's ``procs`` group (logs attached on failure); skips
    when the host cannot make pods."""
    network = PodNetwork(group=procs)
    try:
        network.open()
    except PodNetworkUnavailable as exc:
        pytest.skip(f"no pod network: {exc}")
    try:
        yield network
    finally:
        network.close()


@pytest.fixture
def pod_zookeeper(pod_network: PodNetwork, tmp_path: Path) -> ZooKeeper:
    """A ZooKeeper of the test's own on the bridge address; ``.hosts`` works in pods and on the host."""
    return pod_network.zookeeper(tmp_path / "zk")
