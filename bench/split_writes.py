"""Split writes and delayed ACK (issue 11): the sidecar with TCP_QUICKACK (this tree) and without it.

An app that writes the response head and the body in two sends with Nagle on (Python's
``http.server``: tests/harness/apps.py SplitWritesApp) sends the body only once the head is
acknowledged; a reader on a keep-alive connection delays that ACK by 40 ms. The fix (commits
1ee56e1, 22af3b9; sidecar/quickack.py) re-arms TCP_QUICKACK after a read that leaves a message
incomplete. This script measures, on 127.0.0.1, the sidecar of this working tree ("current")
against the tree before the fix ("f9701fe", checked out with ``git worktree add`` into a temporary
directory, imported through PYTHONPATH, removed at the end):

* ``latency``: 1,000 sequential GETs on one keep-alive connection (http.client) to the split-writes
  app: direct, HAProxy in front (bench/haproxy.cfg), nginx in front (bench/nginx-proxy.conf), the
  app's inbound sidecar alone, and the caller's sidecar -> the app's sidecar; p50, p99, max;
* ``post``: the same targets, POSTs whose body the client sends in a second ``sendall`` (raw
  socket, Nagle on), one keep-alive connection;
* ``servers``: Flask's dev server (threaded), gunicorn (sync, 1 worker), waitress and uvicorn (a
  tiny ASGI app), direct and through two sidecars, before and after (a server not installed is
  skipped: ``.venv/bin/pip install flask gunicorn waitress uvicorn``);
* ``throughput``: bench/run.py's sidecar target (wrk, nginx upstream), both trees' sidecars running
  at once beside the same upstream, wrk rounds alternating between them (as bench/interleaved.py);
* ``syscall``: what ``setsockopt(IPPROTO_TCP, TCP_QUICKACK, 1)`` costs on the socket of a uvloop
  transport, and how many the sidecars make per request (strace, when installed).

Load generators, apps and upstreams run on CPU 0, every proxy on CPU 1, as in bench/run.py.

    .venv/bin/python bench/split_writes.py [--requests 1000] [--only latency,post,servers,throughput,syscall]
        [--before f9701fe] [--fix 22af3b9] [--controlplane current|before] [--rounds 6] [--duration 5]
        [--output bench/out/split-writes/RESULTS-section.md]

The markdown section is printed and written to ``--output``; raw logs (per-request latencies,
wrk output, strace logs, every process's stderr) go to bench/out/split-writes/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import http.client
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import interleaved  # noqa: E402 - bench/interleaved.py, beside this file (cpu_seconds)
import run as bench  # noqa: E402 - bench/run.py, beside this file

from meshkeeper.demo.process import ManagedProcess, free_port, http_get, wait_until  # noqa: E402

REPO = bench.BENCH_DIR.parent
PARTS = ("latency", "post", "servers", "throughput", "syscall")
POST_BODY = b"order=7&item=42"
# Issue 11's p50 before the fix, direct -> caller's sidecar -> app's sidecar (ms).
ISSUE_P50 = {"flask": (1.08, 1.51), "gunicorn": (0.72, 1.32), "waitress": (0.87, 1.11), "uvicorn": (0.78, 0.99)}

# The other app servers: each answers any path (so the sidecar's /health check too) with "ok\n".
APP_SOURCES = {
    "wsgi_app.py": 'def app(environ, start_response):\n'
                   '    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])\n'
                   '    return [b"ok\\n"]\n',
    "asgi_app.py": 'async def app(scope, receive, send):\n'
                   '    if scope["type"] != "http":\n'
                   '        return\n'
                   '    await send({"type": "http.response.start", "status": 200,\n'
                   '                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"3")]})\n'
                   '    await send({"type": "http.response.body", "body": b"ok\\n"})\n',
    "flask_app.py": 'import sys\n'
                    'from flask import Flask\n'
                    'app = Flask("bench")\n'
                    '@app.route("/", defaults={"path": ""})\n'
                    '@app.route("/<path:path>")\n'
                    'def ok(path):\n'
                    '    return "ok\\n", 200, {"Content-Type": "text/plain"}\n'
                    'app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)\n',
    "waitress_app.py": 'import sys\n'
                       'from waitress import serve\n'
                       'from wsgi_app import app\n'
                       'serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=4, _quiet=True)\n',
}


def server_argv(name: str, apps: Path, port: int) -> list[str]:
    py = sys.executable
    return {
        "flask": [py, str(apps / "flask_app.py"), str(port)],
        "gunicorn": [py, "-m", "gunicorn", "--chdir", str(apps), "-w", "1", "-k", "sync",
                     "-b", f"127.0.0.1:{port}", "--log-level", "warning", "wsgi_app:app"],
        "waitress": [py, str(apps / "waitress_app.py"), str(port)],
        "uvicorn": [py, "-m", "uvicorn", "--app-dir", str(apps), "--host", "127.0.0.1", "--port", str(port),
                    "--log-level", "warning", "--no-access-log", "asgi_app:app"],
    }[name]


SERVER_MODULES = {"flask": "flask", "gunicorn": "gunicorn", "waitress": "waitress", "uvicorn": "uvicorn"}


# --------------------------------------------------------------------------- clients


class KeepAliveGet:
    """GETs on one http.client connection (re-opened only if the server closes it)."""

    def __init__(self, port: int, host: str, keep_alive: bool = True) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.host, self.keep_alive = host, keep_alive
        self.reconnects = 0

    def __call__(self) -> None:
        if self.conn.sock is None:
            self.reconnects += 1
        self.conn.request("GET", "/", headers={"Host": self.host})
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200 or not body:
            raise RuntimeError(f"GET answered {resp.status} {body[:80]!r}")
        if not self.keep_alive:
            self.conn.close()

    def close(self) -> None:
        self.conn.close()


class SplitPost:
    """POSTs on one keep-alive connection, the head and the body in two ``sendall``, Nagle on."""

    def __init__(self, port: int, host: str, keep_alive: bool = True) -> None:
        self.port, self.host, self.keep_alive = port, host, keep_alive
        self.sock: socket.socket | None = None
        self.reader = None
        self.reconnects = 0

    def __call__(self) -> None:
        if self.sock is None:
            self.reconnects += 1
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            self.reader = self.sock.makefile("rb")
        head = f"POST /orders HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(POST_BODY)}\r\n\r\n"
        self.sock.sendall(head.encode())
        self.sock.sendall(POST_BODY)
        status = self.reader.readline()
        if not status.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"POST answered {status!r}")
        length, close = 0, False
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            if name.strip().lower() == b"connection" and value.strip().lower() == b"close":
                close = True
        if self.reader.read(length) != POST_BODY:
            raise RuntimeError("POST: the body did not come back")
        if close or not self.keep_alive:
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.reader.close()
            self.sock.close()
            self.sock = None


@dataclass
class Latency:
    label: str
    samples_ms: list[float] = field(default_factory=list)
    reconnects: int = 0
    note: str = ""

    def q(self, pct: int) -> float:
        return statistics.quantiles(self.samples_ms, n=100, method="inclusive")[pct - 1]

    @property
    def p50(self) -> float:
        return self.q(50)

    @property
    def p99(self) -> float:
        return self.q(99)


def measure(label: str, client, args: argparse.Namespace, workdir: Path) -> Latency:
    """``args.warmup`` requests, then ``args.requests`` timed ones (stopping at ``--max-seconds``)."""
    result = Latency(label)
    try:
        for _ in range(args.warmup):
            client()
        deadline = time.monotonic() + args.max_seconds
        for _ in range(args.requests):
            start = time.perf_counter()
            client()
            result.samples_ms.append((time.perf_counter() - start) * 1000)
            if time.monotonic() > deadline:
                result.note = f"stopped after {args.max_seconds:.0f} s"
                break
    finally:
        result.reconnects = client.reconnects - 1
        client.close()
    slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
    (workdir / f"{slug}.ms.txt").write_text("".join(f"{x:.3f}\n" for x in result.samples_ms))
    print(f"  {label}: p50 {result.p50:.2f} ms, p99 {result.p99:.2f} ms, max {max(result.samples_ms):.2f} ms"
          f" ({len(result.samples_ms)} requests) {result.note}", flush=True)
    return result


# --------------------------------------------------------------------------- the trees


@contextlib.contextmanager
def before_tree(ref: str, workdir: Path) -> Iterator[Path]:
    """``git worktree add`` of ``ref`` into a temporary directory; removed on exit."""
    path = Path(tempfile.mkdtemp(prefix="mk-before-"))
    path.rmdir()
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), ref],
                   check=True, capture_output=True, text=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
                       capture_output=True, text=True)


@contextlib.contextmanager
def imported_from(tree: Path | None) -> Iterator[None]:
    """Children spawned inside import meshkeeper/sidecar/controlplane from ``tree`` (PYTHONPATH
    comes before the editable install's finder); None: this working tree."""
    if tree is None:
        yield
        return
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tree)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def which_code(tree: Path | None) -> str:
    """Where the sidecar's pool module is imported from, whether it calls quickack, and whether its tree
    has sidecar/quickack.py (importlib would find the editable install's copy: not a test)."""
    code = ("import os, sidecar.upstream.pool as p; q = os.path.join(os.path.dirname(p.__file__), '..', 'quickack.py'); "
            "print(p.__file__, 'calls quickack' if 'quickack' in open(p.__file__).read() else 'no quickack', "
            "'has sidecar/quickack.py' if os.path.exists(q) else 'no sidecar/quickack.py')")
    with imported_from(tree):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    return out.stdout.strip()


def knows_status_port(tree: Path | None) -> bool:
    """Whether the sidecar of ``tree`` (None: this one) has ``--status-port``; older ones neither take
    it nor bind 15021."""
    return tree is None or "--status-port" in (tree / "sidecar" / "main.py").read_text()


def proc_pythonpath(proc: ManagedProcess) -> str:
    try:
        env = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return "?"
    for item in env:
        if item.startswith(b"PYTHONPATH="):
            return item.decode().partition("=")[2]
    return "(unset)"


# --------------------------------------------------------------------------- the mesh


class Mesh:
    """bench/run.py's Sidecar environment (ZooKeeper, control plane, nginx registered as ``upstream``)
    with sidecars of both trees added to it."""

    def __init__(self, workdir: Path, nginx_port: int, trees: dict[str, Path]) -> None:
        self.env = bench.Sidecar(workdir, nginx_port)
        self.trees = trees  # code -> worktree; "current" is not in it (this tree)
        self.sidecars: dict[str, tuple[ManagedProcess, str]] = {}
        self.pythonpath: dict[str, str] = {}  # label -> PYTHONPATH of the running process

    def start(self) -> None:
        self.env.mesh.start_registry()
        self.env._register_upstream()

    def add(self, label: str, code: str, service: str, app_port: int) -> tuple[ManagedProcess, str]:
        """A sidecar of ``code`` ("current", "before" or "fix") for ``service`` with its app on ``app_port``."""
        extra = ["--access-log", "off", "--service", service, "--app-port", str(app_port)]
        tree = self.trees.get(code)
        with imported_from(tree):
            proc, url = self.env.add(extra, name=f"sidecar-{label}", status_port=knows_status_port(tree))
        self.sidecars[label] = (proc, url)
        self.pythonpath[label] = proc_pythonpath(proc)
        return proc, url

    def inbound(self, label: str) -> int:
        return self.sidecars[label][0].port("inbound_port")

    def outbound(self, label: str) -> int:
        return self.sidecars[label][0].port("outbound_port")

    def wait_routes(self, label: str, host: str) -> None:
        url = self.sidecars[label][1]
        wait_until(lambda: http_get(url, {"Host": host}, timeout=2)[0] == 200, 30, 0.1,
                   f"{label} routes Host {host}")

    def remove(self, label: str) -> None:
        proc, _ = self.sidecars.pop(label)
        proc.terminate(5)

    def stop(self) -> None:
        self.env.stop()


def start_split_app(workdir: Path) -> ManagedProcess:
    app = ManagedProcess(bench.pinned(bench.LOAD_CPU, [sys.executable, "-m", "tests.harness.apps", "--port", "0"]),
                         role="app", name="split-writes-app", log_dir=workdir, cwd=REPO)
    app.start()
    return app


# --------------------------------------------------------------------------- syscall cost and counts


async def _quickack_micro(calls: int, rounds: int) -> dict[str, float]:
    from sidecar import quickack

    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    pseudo = transport.get_extra_info("socket")
    plain = socket.create_connection(("127.0.0.1", port))
    level, opt = socket.IPPROTO_TCP, quickack.TCP_QUICKACK

    def empty() -> None:
        for _ in range(calls):
            pass

    def on_pseudo() -> None:
        for _ in range(calls):
            pseudo.setsockopt(level, opt, 1)

    def on_plain() -> None:
        for _ in range(calls):
            plain.setsockopt(level, opt, 1)

    def ack_now() -> None:
        for _ in range(calls):
            quickack.ack_now(transport)

    variants = {"empty loop": empty, "setsockopt, uvloop transport's socket": on_pseudo,
                "setsockopt, plain socket.socket": on_plain, "quickack.ack_now(transport)": ack_now}
    best: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            best[name].append((time.perf_counter() - start) / calls * 1e6)
    transport.close()
    plain.close()
    server.close()
    return {name: statistics.median(v) for name, v in best.items()}


def quickack_micro(calls: int, rounds: int) -> dict[str, float]:
    import uvloop

    return uvloop.run(_quickack_micro(calls, rounds))


@dataclass
class Count:
    what: str
    requests: int
    quickack: int
    other: int
    note: str = ""


def count_setsockopt(proc: ManagedProcess, client, requests: int, workdir: Path, name: str) -> tuple[int, int]:
    """strace the sidecar's setsockopt calls while ``client`` makes ``requests`` requests (after one
    unstraced warm-up request): (TCP_QUICKACK calls, other setsockopt calls)."""
    log = workdir / f"{name}.strace.txt"
    client()
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=setsockopt", "-e", "signal=none",
                               "-o", str(log), "-p", str(proc.pid)], stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # attached (to every thread) well before the first request
        for _ in range(requests):
            client()
        time.sleep(0.2)
    finally:
        client.close()
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
    lines = [x for x in log.read_text().splitlines() if "setsockopt(" in x]
    quick = sum("TCP_QUICKACK" in x for x in lines)
    return quick, len(lines) - quick


# --------------------------------------------------------------------------- report helpers


def _ms(x: float) -> str:
    return f"{x:.2f}"


def _added(r: Latency, base: Latency) -> str:
    return f"{r.p50 - base.p50:+.2f} / {r.p99 - base.p99:+.2f}"


def latency_table(results: list[Latency], direct_ka: Latency, direct_fresh: Latency) -> str:
    rows = ["| target | p50 ms | p99 ms | max ms | added p50 / p99 ms vs direct keep-alive "
            "| added p50 / p99 ms vs direct, new connection each | notes |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        base = r is direct_ka or r is direct_fresh
        note = "; ".join(x for x in (r.note, f"{r.reconnects} reconnects" if r.reconnects > 0 else "") if x)
        rows.append(f"| {r.label} | {_ms(r.p50)} | {_ms(r.p99)} | {_ms(max(r.samples_ms))} "
                    f"| {'-' if base else _added(r, direct_ka)} | {'-' if base else _added(r, direct_fresh)} "
                    f"| {note} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000, help="timed requests per latency target (default 1000)")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests before them (default 20)")
    p.add_argument("--max-seconds", type=float, default=150.0,
                   help="bound on one latency target's timed requests (default 150)")
    p.add_argument("--only", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    p.add_argument("--before", default="f9701fe", help="the tree without the fix (default f9701fe)")
    p.add_argument("--fix", default="22af3b9",
                   help="throughput only: also the tree of the fix alone (default 22af3b9; '' for none)")
    p.add_argument("--controlplane", choices=("current", "before"), default="current",
                   help="which tree's control plane serves every sidecar (default current; 'before' when "
                        "the current one no longer speaks to the old sidecar)")
    p.add_argument("--rounds", type=int, default=6, help="throughput rounds (default 6)")
    p.add_argument("--duration", type=int, default=5, help="seconds of wrk per tree per round (default 5)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--count-requests", type=int, default=200, help="requests per strace count (default 200)")
    p.add_argument("--workdir", type=Path, default=bench.BENCH_DIR / "out" / "split-writes")
    p.add_argument("--output", type=Path, default=None,
                   help="where to write the markdown section (default <workdir>/RESULTS-section.md)")
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(args.only) - set(PARTS))
    if unknown or args.requests < 100 or args.rounds < 1:
        p.error(f"--only: some of {', '.join(PARTS)}; --requests >= 100; --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - one straight script
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ["PATH"] = bench._path()
    bench.preflight()
    os.sched_setaffinity(0, {int(bench.LOAD_CPU)})
    workdir = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    output = args.output or workdir / "RESULTS-section.md"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--short", "--", "sidecar", "meshkeeper", "controlplane"],
                           capture_output=True, text=True).stdout.strip()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = shlex.join([".venv/bin/python", "bench/split_writes.py", *argv])
    md: list[str] = [f"{now}, `{cmd}`; current tree = HEAD {head}"
                     + (f" with uncommitted changes ({dirty.replace(chr(10), '; ')})" if dirty else "")
                     + f", before = {args.before}.", ""]
    started: list = []
    mesh: Mesh | None = None
    try:
        with contextlib.ExitStack() as stack:
            before = stack.enter_context(before_tree(args.before, workdir))
            trees = {"before": before}
            if args.fix and "throughput" in args.only:
                trees["fix"] = stack.enter_context(before_tree(args.fix, workdir))
            codes = {"current": which_code(None), "before": which_code(before)}
            print(f"current: {codes['current']}\nbefore:  {codes['before']}", flush=True)
            if "calls quickack" not in codes["current"] or "no sidecar/quickack.py" not in codes["before"]:
                sys.exit(f"split_writes: the trees are not what they should be: {codes}")
            md += [f"Code: current imports `{codes['current']}`; {args.before} imports `{codes['before']}`.", ""]

            if "syscall" in args.only:
                print("micro-benchmark of setsockopt(TCP_QUICKACK) ...", flush=True)
                micro = quickack_micro(200_000, 7)
                md += ["### The syscall", "",
                       "Per call, median of 7 rounds of 200,000 calls, on a connected loopback socket "
                       "(uvloop, this process on CPU 0):", "",
                       "| what | µs per call |", "|---|---:|",
                       *[f"| {k} | {v:.3f} |" for k, v in micro.items()], ""]
                print("  " + ", ".join(f"{k}: {v:.3f} us" for k, v in micro.items()), flush=True)

            port = free_port()
            conf = bench.render("nginx-upstream.conf", workdir, port=port)
            (workdir / "nginx-upstream-tmp").mkdir()
            started.append(bench.start_server(bench.pinned(bench.LOAD_CPU, ["nginx", "-c", str(conf)]),
                                              "upstream", workdir, f"http://127.0.0.1:{port}/"))
            app = start_split_app(workdir)
            started.append(app)
            app_port = app.port("port")
            mesh = Mesh(workdir, port, trees)
            with imported_from(trees["before"] if args.controlplane == "before" else None):
                mesh.start()
            print("starting sidecars ...", flush=True)
            for code in ("before", "current"):
                mesh.add(f"app-{code}", code, f"split-{code}", app_port)
                mesh.add(f"caller-{code}", code, f"caller-{code}", app_port)
                mesh.wait_routes(f"caller-{code}", f"split-{code}")

            # The split-writes app's targets: (label, port, Host).
            targets: list[tuple[str, int, str]] = []
            if {"latency", "post"} & set(args.only):
                hp = free_port()
                cfg = bench.render("haproxy.cfg", workdir, port=hp, upstream_port=app_port)
                started.append(bench.start_server(bench.pinned(bench.PROXY_CPU, ["haproxy", "-db", "-f", str(cfg)]),
                                                  "haproxy", workdir, f"http://127.0.0.1:{hp}/"))
                npt = free_port()
                cfg = bench.render("nginx-proxy.conf", workdir, port=npt, upstream_port=app_port)
                (workdir / "nginx-proxy-tmp").mkdir(exist_ok=True)
                started.append(bench.start_server(bench.pinned(bench.PROXY_CPU, ["nginx", "-c", str(cfg)]),
                                                  "nginx", workdir, f"http://127.0.0.1:{npt}/"))
                targets = [("HAProxy", hp, "split"), ("nginx", npt, "split")]
                for code, name in (("before", args.before), ("current", "current")):
                    targets.append((f"app's sidecar, {name}", mesh.inbound(f"app-{code}"), "split"))
                for code, name in (("before", args.before), ("current", "current")):
                    targets.append((f"caller's sidecar -> app's sidecar, {name}",
                                    mesh.outbound(f"caller-{code}"), f"split-{code}"))

            for part, make in (("latency", KeepAliveGet), ("post", SplitPost)):
                if part not in args.only:
                    continue
                what = "GET" if part == "latency" else "POST, body in a second write"
                print(f"{what}: split-writes app ...", flush=True)
                direct_ka = measure(f"direct, keep-alive ({part})", make(app_port, "split"), args, workdir)
                direct_ka.label = "direct, one keep-alive connection"
                direct_fresh = measure(f"direct, new connection each ({part})",
                                       make(app_port, "split", keep_alive=False), args, workdir)
                direct_fresh.label = "direct, a new connection per request"
                direct_fresh.reconnects = 0
                results = [direct_ka, direct_fresh]
                for label, tport, host in targets:
                    r = measure(f"{label} ({part})", make(tport, host), args, workdir)
                    r.label = label
                    results.append(r)
                md += [f"### {what}: the split-writes app (http.server, Nagle on), {args.requests:,} sequential "
                       "requests", "", latency_table(results, direct_ka, direct_fresh), ""]

            if "syscall" in args.only and shutil.which("strace"):
                print("counting setsockopt calls with strace ...", flush=True)
                n = args.count_requests
                counts = []
                for code, name in (("before", args.before), ("current", "current")):
                    for label, what in ((f"app-{code}", "app's sidecar"), (f"caller-{code}", "caller's sidecar")):
                        for part, make in (("GET", KeepAliveGet), ("split POST", SplitPost)):
                            q, o = count_setsockopt(
                                mesh.sidecars[label][0], make(mesh.outbound(f"caller-{code}"), f"split-{code}"),
                                n, workdir, f"{label}-{part.replace(' ', '-')}")
                            counts.append(Count(f"{name}: {what}, split-writes app, {part}, "
                                                "caller's sidecar -> app's sidecar", n, q, o))
                    sidecar = f"caller-{code}"  # its outbound -> nginx ("upstream"), as bench/run.py's sidecar
                    q, o = count_setsockopt(mesh.sidecars[sidecar][0], KeepAliveGet(mesh.outbound(sidecar), "upstream"),
                                            n, workdir, f"{sidecar}-nginx")
                    counts.append(Count(f"{name}: sidecar -> nginx upstream (bench/run.py's target), GET", n, q, o))
                md += ["### setsockopt calls per request (strace -f -e trace=setsockopt on one sidecar)", "",
                       f"{n} requests on one keep-alive connection after one untraced request.", "",
                       "| sidecar and traffic | requests | TCP_QUICKACK | per request | other setsockopt |",
                       "|---|---:|---:|---:|---:|",
                       *[f"| {c.what} | {c.requests} | {c.quickack} | {c.quickack / c.requests:.2f} | {c.other} |"
                         for c in counts], ""]
                for c in counts:
                    print(f"  {c.what}: {c.quickack} TCP_QUICKACK, {c.other} other", flush=True)
            elif "syscall" in args.only:
                md += ["(strace is not installed: no setsockopt counts.)", ""]

            if "servers" in args.only:
                apps = workdir / "apps"
                apps.mkdir()
                for fname, src in APP_SOURCES.items():
                    (apps / fname).write_text(src)
                rows = ["| server | direct p50 / p99 ms | two sidecars, "
                        f"{args.before}: p50 / p99 ms | two sidecars, current: p50 / p99 ms "
                        f"| issue 11 (before): p50 direct -> two sidecars | notes |",
                        "|---|---:|---:|---:|---:|---|"]
                for name, module in SERVER_MODULES.items():
                    if importlib.util.find_spec(module) is None:
                        print(f"{name}: not installed, skipped (.venv/bin/pip install {module})", flush=True)
                        rows.append(f"| {name} | - | - | - | - | skipped: not installed |")
                        continue
                    print(f"{name} ...", flush=True)
                    sport = free_port()
                    server = bench.start_server(bench.pinned(bench.LOAD_CPU, server_argv(name, apps, sport)),
                                                name, workdir, f"http://127.0.0.1:{sport}/")
                    try:
                        for code in ("before", "current"):
                            mesh.add(f"{name}-{code}", code, f"{name}-{code}", sport)
                            mesh.wait_routes(f"caller-{code}", f"{name}-{code}")
                        direct = measure(f"{name} direct", KeepAliveGet(sport, name), args, workdir)
                        via = {code: measure(f"{name} two sidecars {code}",
                                             KeepAliveGet(mesh.outbound(f"caller-{code}"), f"{name}-{code}"),
                                             args, workdir)
                               for code in ("before", "current")}
                    finally:
                        for code in ("before", "current"):
                            if f"{name}-{code}" in mesh.sidecars:
                                mesh.remove(f"{name}-{code}")
                        server.terminate(5)
                    issue = ISSUE_P50[name]
                    note = (f"the server closes every connection ({direct.reconnects} reconnects direct)"
                            if direct.reconnects > 0 else "keep-alive")
                    rows.append(f"| {name} | {_ms(direct.p50)} / {_ms(direct.p99)} "
                                f"| {_ms(via['before'].p50)} / {_ms(via['before'].p99)} "
                                f"| {_ms(via['current'].p50)} / {_ms(via['current'].p99)} "
                                f"| {issue[0]:.2f} -> {issue[1]:.2f} | {note} |")
                md += [f"### Other app servers, {args.requests:,} sequential GETs on one keep-alive client "
                       "connection", "", *rows, ""]

            if "throughput" in args.only:
                print("throughput, interleaved ...", flush=True)
                names = {"before": args.before, "fix": f"{args.fix} (the fix alone)", "current": "current"}
                variants = [c for c in ("before", "fix", "current") if c != "fix" or "fix" in trees]
                procs, urls = {}, {}
                for code in variants:
                    procs[code], urls[code] = mesh.add(f"bench-{code}", code, f"bench-{code}", port)
                    bench.run_wrk(urls[code], 1, args.connections, workdir, f"bench-{code}.warmup")
                rps: dict[str, list[float]] = {c: [] for c in variants}
                cpu: dict[str, list[float]] = {c: [] for c in variants}
                orders: list[str] = []
                wrk_cmd = ""
                for r in range(args.rounds):
                    k = r % len(variants)
                    order = variants[k:] + variants[:k]
                    orders.append(", ".join(names[c].split()[0] for c in order))
                    for code in order:
                        start = interleaved.cpu_seconds(procs[code])
                        got, errors, wrk_cmd = bench.run_wrk(urls[code], args.duration, args.connections, workdir,
                                                             f"bench-{code}.{r}")
                        used = interleaved.cpu_seconds(procs[code]) - start
                        rps[code].append(got)
                        cpu[code].append(used / (got * args.duration) * 1e6)
                        print(f"  round {r + 1}: {code} {got:,.0f} req/s, {cpu[code][-1]:.1f} CPU us/request {errors}",
                              flush=True)
                others = [c for c in variants if c != "before"]
                ratios = {c: [a / b for a, b in zip(rps[c], rps["before"], strict=True)] for c in others}
                rows = ["| round | order | " + " | ".join(f"{names[c]} req/s" for c in variants) + " | "
                        + " | ".join(f"{names[c].split()[0]} / {args.before}" for c in others) + " | "
                        + " | ".join(f"CPU µs/req {names[c].split()[0]}" for c in variants) + " |",
                        "|---:|---|" + "---:|" * (2 * len(variants) + len(others))]
                for r in range(args.rounds):
                    rows.append(f"| {r + 1} | {orders[r]} | " + " | ".join(f"{rps[c][r]:,.0f}" for c in variants)
                                + " | " + " | ".join(f"{ratios[c][r]:.3f}" for c in others) + " | "
                                + " | ".join(f"{cpu[c][r]:.1f}" for c in variants) + " |")
                rows.append("| median | | " + " | ".join(f"{statistics.median(rps[c]):,.0f}" for c in variants)
                            + " | " + " | ".join(f"**{statistics.median(ratios[c]):.3f}**" for c in others) + " | "
                            + " | ".join(f"{statistics.median(cpu[c]):.1f}" for c in variants) + " |")
                md += [f"### Throughput: bench/run.py's sidecar target, {', '.join(names[c] for c in variants)} "
                       "side by side", "", "The sidecars run at once beside one nginx upstream; each round runs "
                       f"`{wrk_cmd}` (URL per sidecar) against each in turn, the order rotating.", "", *rows, ""]
            md += ["PYTHONPATH of each sidecar process (/proc/PID/environ): "
                   + ", ".join(f"{k} `{v}`" for k, v in mesh.pythonpath.items()) + ".", ""]
    finally:
        if mesh is not None:
            mesh.stop()
        for proc in reversed(started):
            proc.terminate(5)

    text = "\n".join(md)
    output.write_text(text)
    print("\n" + text)
    print(f"written to {output}; logs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
