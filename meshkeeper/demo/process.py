"""Child processes of the demo, the benchmark and the integration tests.

A :class:`ChildProcess` runs in a session of its own with its logs in files, and is always
reaped: ``terminate()`` sends SIGTERM to the leader (so a sidecar can stop its workers itself)
and SIGKILLs whatever is left of its process group after a grace period; ``kill()`` SIGKILLs the
whole group at once. Children also die with SIGKILL if the process that started them dies
(``PR_SET_PDEATHSIG``), and an ``atexit`` hook kills whatever is still running, so nothing
outlives a crashed test run.

A :class:`ManagedProcess` additionally waits for the ready line of docs/contracts.md::

    meshkeeper <role> listening key=value ...

and exposes its pairs as ``info``. Everything here is plain stdlib: the demo and the benchmark
ship with the package, the tests wrap it with pytest fixtures (tests/harness).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

READY_TIMEOUT = 30.0
TERMINATE_GRACE = 10.0

# Strong references: a child must be killable at exit even if its owner forgot it.
_live: set[ChildProcess] = set()
# util-linux's setpriv sets PR_SET_PDEATHSIG and execs the command (same pid), so no Python code
# runs between fork and exec (preexec_fn is unsafe with threads: kazoo and our pipe readers).
_SETPRIV = shutil.which("setpriv")


# --------------------------------------------------------------------------- small helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now, chosen below the kernel's ephemeral range.

    Ports from ``bind(0)`` come from the ephemeral range, where any later ``bind(0)`` or outgoing
    connection may take them. A port below that range stays free for a process that must be
    restarted on the same port (ZooKeeper in the tests) or that is told its port in advance.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    lo, hi = (10000, low - 1) if low > 11000 else (low, 65535)
    for _ in range(200):
        port = random.randint(lo, hi)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port on {host} in {lo}..{hi}")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Exceptions raised by the predicate (a refused connection, a failed assert) count as "not
    yet"; the last one is reported if the deadline passes. Raises :class:`TimeoutError` with
    ``message``, the last value and the last exception.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    error: BaseException | None = None
    while True:
        try:
            last = predicate()
            error = None
            if last:
                return last
        except Exception as exc:  # the predicate's failures mean "not yet"
            error = exc
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", "condition")
            detail = f"last error: {error!r}" if error is not None else f"last value: {last!r}"
            raise TimeoutError(f"{what}: not true after {timeout:.1f}s ({detail})") from error
        time.sleep(interval)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(
    url: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """GET without any proxy from the environment: (status, headers, body); HTTP errors are returned."""
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with _NO_PROXY.open(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers.items()), exc.read()


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers 200; False on any other status or a connection error."""
    try:
        return http_get(url, timeout=timeout)[0] == 200
    except OSError:
        return False


def parse_ready_line(line: str, role: str | None = None) -> dict[str, str] | None:
    """``meshkeeper <role> listening k=v ...`` -> {"role": role, k: v, ...}; None for other lines."""
    words = line.split()
    if len(words) < 3 or words[0] != "meshkeeper" or words[2] != "listening":
        return None
    if role is not None and words[1] != role:
        return None
    info = {"role": words[1]}
    for word in words[3:]:
        key, sep, value = word.partition("=")
        if sep and key:
            info[key] = value
    return info


def meshkeeper_argv(*args: str) -> list[str]:
    """The command line of ``meshkeeper <args>`` for the interpreter that runs us."""
    script = Path(sys.executable).with_name("meshkeeper")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "import sys; from meshkeeper.cli import main; sys.exit(main())", *args]


def app_argv(*args: str) -> list[str]:
    """The command line of the demo app (meshkeeper.demo.app)."""
    return [sys.executable, "-m", "meshkeeper.demo.app", *args]


def process_group_pids(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) members of a process group, read from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after the last ')'.
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 when it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _with_parent_death_signal(argv: list[str]) -> list[str]:
    # The signal fires when the *thread* that spawned the child exits, so spawn from the main
    # thread (tests, demo and bench all do).
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv] if _SETPRIV else argv


# --------------------------------------------------------------------------- processes


class ChildProcess:
    """One child process in its own session; stdout and stderr go to files unless piped."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        log_dir: Path | str,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        pipe_stdout: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.name = name
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = self.log_dir / f"{name}.stderr.log"
        self.stdout_path = self.log_dir / f"{name}.stdout.log"
        self._env = {**os.environ, **env} if env is not None else None
        self._cwd = cwd
        self._pipe_stdout = pipe_stdout
        self.popen: subprocess.Popen[bytes] | None = None

    # -- lifecycle

    def spawn(self) -> subprocess.Popen[bytes]:
        if self.popen is not None and self.popen.poll() is None:
            raise RuntimeError(f"{self.name} is already running (pid {self.popen.pid})")
        with open(self.stderr_path, "ab") as err, open(self.stdout_path, "ab") as out:
            self.popen = subprocess.Popen(
                _with_parent_death_signal(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self._pipe_stdout else out,
                stderr=err,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,
            )
        _live.add(self)
        return self.popen

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def group_pids(self) -> list[int]:
        """Live pids of the process group (the leader and, e.g., a sidecar's workers)."""
        return [] if self.popen is None else process_group_pids(self.popen.pid)

    def signal(self, signum: int) -> None:
        """Send a signal to the leader only (e.g. SIGSTOP to freeze a process in a test)."""
        popen = self.popen
        if popen is not None and popen.poll() is None:
            popen.send_signal(signum)

    def terminate(self, timeout: float = TERMINATE_GRACE) -> int | None:
        """SIGTERM the leader, wait up to ``timeout``, then SIGKILL the whole group. Returns the exit code."""
        if self.popen is None:
            return None
        terminate_all([self], timeout)
        return self.popen.returncode

    def kill(self) -> int | None:
        """SIGKILL the whole process group and reap the leader. Returns the exit code."""
        if self.popen is None:
            return None
        # The group id is ours while the leader is unreaped or a member lives; after that the
        # number may belong to someone else, so do not signal it.
        if self.popen.returncode is None or self.group_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        code = self.popen.wait()
        # Members of the group that the leader forked are reaped by init; wait until they are gone.
        deadline = time.monotonic() + 5.0
        while self.group_pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        _live.discard(self)
        return code

    def wait(self, timeout: float | None = None) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen.wait(timeout)

    # -- logs

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stderr_tail(self, lines: int = 40) -> str:
        return "\n".join(self.stderr_text().splitlines()[-lines:])

    def describe(self) -> str:
        state = "running" if self.running() else f"exited with {self.returncode}"
        pid = self.popen.pid if self.popen is not None else "-"
        return f"{self.name} (pid {pid}, {state}): {' '.join(self.argv)}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class ManagedProcess(ChildProcess):
    """A long-running meshkeeper process (or the demo app) that announces itself on stdout."""

    def __init__(self, argv: Sequence[str], *, role: str, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(argv, name=name or role, pipe_stdout=True, **kwargs)
        self.role = role
        self.info: dict[str, str] = {}
        self._lines: queue.Queue[str | None] = queue.Queue()

    def start(self, timeout: float = READY_TIMEOUT) -> dict[str, str]:
        """Spawn and wait for the ready line; returns its key=value pairs (also in ``info``)."""
        self.info = {}
        self._lines = queue.Queue()
        stdout = self.spawn().stdout
        threading.Thread(target=self._pump, args=(stdout,), name=f"{self.name}-stdout", daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise RuntimeError(self._failure(f"no ready line within {timeout:.0f}s"))
            try:
                line = self._lines.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the process is exiting (or detached from it)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.wait(timeout=5)
                code = self.kill()
                raise RuntimeError(self._failure(f"exited with code {code} before its ready line"))
            info = parse_ready_line(line, self.role)
            if info is not None:
                self.info = info
                return info

    def port(self, key: str) -> int:
        """A port from the ready line, e.g. ``port("admin_port")``."""
        try:
            return int(self.info[key])
        except KeyError:
            raise KeyError(f"{self.name}: ready line has no {key!r} (got {self.info})") from None

    def _pump(self, stream: Any) -> None:
        # Reads stdout to the end so the child never blocks on a full pipe; keeps a copy in a file.
        with open(self.stdout_path, "ab") as copy, stream:
            try:
                for raw in iter(stream.readline, b""):
                    copy.write(raw)
                    copy.flush()
                    self._lines.put(raw.decode(errors="replace").rstrip("\r\n"))
            finally:
                self._lines.put(None)

    def _failure(self, what: str) -> str:
        return (
            f"{self.name}: {what}\n  command: {' '.join(self.argv)}\n  stderr ({self.stderr_path}):\n"
            + "\n".join("    " + line for line in self.stderr_tail().splitlines())
        )


def terminate_all(procs: Sequence[ChildProcess], timeout: float = TERMINATE_GRACE) -> None:
    """SIGTERM every leader at once, wait up to ``timeout`` for all, then SIGKILL what is left.

    One SIGTERM each (a second one may mean "stop now, skip draining" to some programs), and the
    graceful shutdowns overlap instead of adding up.
    """
    for proc in procs:
        proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        if proc.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
    # Workers of leaders that exited get a short grace; a leader still running gets none.
    exited = [p for p in procs if not p.running()]
    deadline = time.monotonic() + min(timeout, 2.0)
    while any(p.group_pids() for p in exited) and time.monotonic() < deadline:
        time.sleep(0.02)
    for proc in procs:
        proc.kill()


def live_processes() -> list[ChildProcess]:
    """Child processes started here that are still running."""
    return [p for p in list(_live) if p.running()]


def kill_all() -> None:
    """SIGKILL every child process still running (the last resort of tests and the demo)."""
    for proc in list(_live):
        proc.kill()


atexit.register(kill_all)
