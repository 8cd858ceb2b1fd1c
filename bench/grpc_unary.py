"""gRPC unary calls per second through two sidecars, through one, and direct, in interleaved rounds.

Issue 14's gRPC figure. One grpcio server (tests/harness/grpc_apps.py: ``/meshkeeper.test.Echo/Who``
answers the server's name, plus the gRPC health service) is registered as service ``echo``
(``ServiceRecord(protocol="grpc")``, written first) by its own sidecar, started with
``--protocol grpc`` (HTTP/2 to the app, gRPC health checks). A second sidecar (service ``client``, in
front of one nginx worker that only answers its health checks) is the caller's side. Targets, all in
the same rounds, order rotating per round:

* ``direct``: h2load straight to the grpcio server;
* ``inbound``: to the server's sidecar inbound port (one sidecar);
* ``outbound->inbound``: to the client sidecar's outbound port with ``:authority: echo`` (two
  sidecars, HTTP/2 upstream between them).

Load: ``h2load -t 1 -c 10 -m 10 -n N --data=<file>`` with ``content-type: application/grpc`` and
``te: trailers``; the file holds one gRPC message (5-byte frame header + payload), and ``--data``
makes every request a POST. h2load counts HTTP statuses only, and a gRPC error is an HTTP 200 with a
``grpc-status`` trailer, so before the rounds one request built like h2load's (same headers and
body, sent with the ``h2`` package) and a batch of grpcio calls go to every target and must end with
grpc-status 0 and the server's answer; after the rounds both sidecars' ``meshkeeper_grpc_requests``
counters (by grpc-status) are read from their admin ports, so every call that crossed a sidecar is
accounted for. ``--grpcio-calls M`` adds, per target per round, a grpcio client (one channel, a
thread pool of 10 threads making blocking calls, M calls in all) as a second load generator.

Pinning as bench/run.py: h2load (and the grpcio client), the grpcio server, nginx, ZooKeeper and the
control plane on the load CPU, both sidecars on the proxy CPU. Sidecars run from a worktree of
``--sidecar REV[:FLAGS]`` (``.`` for this working tree; bench/h1_paired.py's syntax without the
label), the grpcio server from the same tree. The control plane is the ``meshkeeper`` this
interpreter imports: run with ``PYTHONPATH=<worktree>`` for a known revision. ``--wait-load 1.0``
waits (polling every 20 s, up to 10 minutes) for the 1-minute load average to fall below 1.0 first;
``uptime`` is recorded before every round.

    .venv/bin/python bench/grpc_unary.py [--rounds 8] [--calls 10000] [--sidecar 'HEAD:--access-log off']

Per target: median calls/s and range, the median per-round ratio to direct and its range, failed or
non-2xx requests, and each sidecar's CPU µs per call (/proc utime + stime over the h2load run divided
by the calls, as bench/h1_paired.py). Raw figures: <workdir>/rounds.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import h1_paired  # noqa: E402 - bench/h1_paired.py, beside this file
import run as bench  # noqa: E402

from meshkeeper.demo.mesh import LocalMesh  # noqa: E402
from meshkeeper.demo.process import ChildProcess, http_get, meshkeeper_argv, parse_ready_line, wait_until  # noqa: E402

SERVICE = "echo"
METHOD = "/meshkeeper.test.Echo/Who"
SERVER_NAME = "a"  # the grpcio server's --name, which is its answer
PAYLOAD = b"meshkeeper"  # the request message (the method ignores it)
CONNECTIONS, STREAMS = 10, 10
GRPCIO_THREADS = 10


@dataclass
class Target:
    label: str
    port: int
    authority: str
    rate: list[float] = field(default_factory=list)
    failed: int = 0
    cpu_us: dict[str, list[float]] = field(default_factory=dict)  # sidecar name -> µs per call, per round
    grpcio_rate: list[float] = field(default_factory=list)
    grpcio_errors: dict[str, int] = field(default_factory=dict)


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def wait_quiet(limit: float, max_wait: float, poll: float = 20.0) -> list[str]:
    """Poll until the 1-minute load average is below ``limit`` (or ``max_wait`` passes); the lines seen."""
    seen = [uptime()]
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] >= limit and time.monotonic() < deadline:
        print(f"waiting for load < {limit}: {seen[-1]}", flush=True)
        time.sleep(poll)
        seen.append(uptime())
    print(f"{'quiet' if os.getloadavg()[0] < limit else 'still busy after the wait'}: {seen[-1]}", flush=True)
    return seen


def start_ready(argv: list[str], name: str, role: str, workdir: Path, tree: Path) -> tuple[ChildProcess, dict]:
    """A child whose stdout goes to a file; waits for its ``meshkeeper <role> listening ...`` line."""
    proc = ChildProcess(argv, name=name, log_dir=workdir, env={"PYTHONPATH": str(tree)}, cwd=tree)
    proc.stdout_path.unlink(missing_ok=True)
    proc.spawn()
    info: dict[str, str] = {}

    def ready() -> bool:
        if not proc.running():
            raise RuntimeError(f"{name} exited: {proc.stderr_tail(5)}")
        try:
            lines = proc.stdout_path.read_text(errors="replace").splitlines()
        except OSError:
            return False
        for line in lines:
            if (found := parse_ready_line(line, role)) is not None:
                info.update(found)
                return True
        return False

    wait_until(ready, 60, 0.1, f"{name}'s ready line")
    return proc, info


def start_sidecar(mesh: LocalMesh, name: str, service: str, app_port: int, flags: list[str], workdir: Path,
                  tree: Path) -> tuple[ChildProcess, dict]:
    argv = bench.pinned(bench.PROXY_CPU, meshkeeper_argv(
        "sidecar", "--service", service, "--app-port", str(app_port),
        "--cp", f"127.0.0.1:{mesh.controlplane.port('xds_port')}", "--zk", mesh.zk_hosts,
        "--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0", "--workers", "1", *flags,
    ))  # fmt: skip
    proc, info = start_ready(argv, name, "sidecar", workdir, tree)
    admin = f"http://127.0.0.1:{info['admin_port']}"
    wait_until(lambda: http_get(f"{admin}/ready", timeout=1)[0] == 200, 30, 0.1, f"{name} {admin}/ready")
    return proc, info


def h2_check(port: int, authority: str, body: bytes) -> tuple[int, str, bytes]:
    """One request built like h2load's (h2 package, prior knowledge): (:status, grpc-status, body)."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    status, grpc_status, data, done = 0, "", b"", False
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", authority),
                                (":path", METHOD), ("content-type", "application/grpc"), ("te", "trailers"),
                                ("user-agent", "h2load nghttp2/1.52.0")])
        conn.send_data(sid, body, end_stream=True)
        s.sendall(conn.data_to_send())
        while not done:
            chunk = s.recv(65536)
            if not chunk:
                break
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived):
                    hdrs = {k.decode(): v.decode() for k, v in ev.headers}
                    status = int(hdrs[":status"])
                    grpc_status = hdrs.get("grpc-status", grpc_status)  # trailers-only
                elif isinstance(ev, h2.events.DataReceived):
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.TrailersReceived):
                    grpc_status = {k.decode(): v.decode() for k, v in ev.headers}.get("grpc-status", "")
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    done = True
            s.sendall(conn.data_to_send())
    return status, grpc_status, data


def grpcio_calls(port: int, authority: str, calls: int) -> tuple[float, dict[str, int], dict[bytes, int]]:
    """``calls`` blocking unary calls from a pool of GRPCIO_THREADS threads on one channel:
    (calls/s, errors by status code, answers by body)."""
    import grpc

    errors: dict[str, int] = {}
    answers: dict[bytes, int] = {}
    lock = threading.Lock()
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", authority)]) as ch:
        who = ch.unary_unary(METHOD)
        who(PAYLOAD, timeout=10, wait_for_ready=True)  # connected before the clock starts

        def worker(n: int) -> None:
            for _ in range(n):
                try:
                    got = who(PAYLOAD, timeout=10)
                    with lock:
                        answers[got] = answers.get(got, 0) + 1
                except grpc.RpcError as exc:
                    with lock:
                        errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

        share = [calls // GRPCIO_THREADS + (i < calls % GRPCIO_THREADS) for i in range(GRPCIO_THREADS)]
        started = time.monotonic()
        with ThreadPoolExecutor(GRPCIO_THREADS) as pool:
            list(pool.map(worker, share))
        elapsed = time.monotonic() - started
    return calls / elapsed, errors, answers


def run_h2load(port: int, authority: str, calls: int, data_file: Path, workdir: Path, name: str) -> tuple[float, int, int, str]:
    """(calls/s, calls done, failed or errored or non-2xx, command)."""
    argv = bench.pinned(bench.LOAD_CPU, [
        "h2load", "-t", "1", "-c", str(CONNECTIONS), "-m", str(STREAMS), "-n", str(calls), f"--data={data_file}",
        "-H", "content-type: application/grpc", "-H", "te: trailers", "-H", f":authority: {authority}",
        f"http://127.0.0.1:{port}{METHOD}",
    ])  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True).stdout
    (workdir / f"{name}.h2load.txt").write_text(out)
    rate = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    counts = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not rate or not counts or not codes:
        raise RuntimeError(f"h2load printed no rate:\n{out}")
    done = int(counts.group(1))
    bad = int(counts.group(3)) + int(counts.group(4)) + sum(int(codes.group(i)) for i in (2, 3, 4))
    return float(rate.group(1)), done, bad, shlex.join(argv)


def grpc_status_counts(admin_port: int) -> dict[str, int]:
    """meshkeeper_grpc_requests summed by listener and grpc_status, from the sidecar's admin port."""
    text = http_get(f"http://127.0.0.1:{admin_port}/stats/prometheus", timeout=5)[2].decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("meshkeeper_grpc_requests_total{") or line.startswith("meshkeeper_grpc_requests{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            key = f"{labels.get('listener')} grpc-status {labels.get('grpc_status')}"
            out[key] = out.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out


def _range(values: list[float], fmt: str = ".2f") -> str:
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--calls", type=int, default=10000, help="h2load -n per target per round (default 10000)")
    p.add_argument("--grpcio-calls", type=int, default=0, help="also a grpcio client, this many calls per target "
                   "per round (default 0: none)")
    p.add_argument("--sidecar", default=".:--access-log off", help="REV[:FLAGS] of both sidecars (default "
                   "'.:--access-log off')")
    p.add_argument("--wait-load", type=float, default=0.0, help="first wait until the 1-min load average is "
                   "below this (polls every 20 s, up to 10 min; default 0: no wait)")
    p.add_argument("--workdir", type=Path, default=bench.BENCH_DIR / "out" / "grpc_unary")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ["PATH"] = bench._path()
    bench.preflight()
    os.sched_setaffinity(0, {int(bench.LOAD_CPU)})
    workdir = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    waited = wait_quiet(args.wait_load, 600) if args.wait_load > 0 else [uptime()]
    started = time.monotonic()
    import meshkeeper

    print(f"control plane from {Path(meshkeeper.__file__).parent.parent}", flush=True)
    sc = h1_paired.parse_target(f"sidecars={args.sidecar}")
    created: list[Path] = []
    procs: list[ChildProcess] = []
    mesh = kz = None
    try:
        h1_paired.checkout(sc, {}, created)
        h1_paired.check_imports(sc.tree)
        tree = sc.tree
        data_file = workdir / "request.grpc"
        data_file.write_bytes(grpc_frame(PAYLOAD))
        # the client sidecar's app: it only answers health checks
        nginx_port = bench.free_port()
        conf = bench.render("nginx-upstream.conf", workdir, port=nginx_port)
        (workdir / "nginx-upstream-tmp").mkdir()
        procs.append(bench.start_server(bench.pinned(bench.LOAD_CPU, ["nginx", "-c", str(conf)]), "client-app",
                                        workdir, f"http://127.0.0.1:{nginx_port}/"))
        mesh = LocalMesh(workdir=workdir)
        mesh.start_registry()
        from kazoo.client import KazooClient

        from meshkeeper.registry import Paths, ServiceRecord

        kz = KazooClient(hosts=mesh.zk_hosts, timeout=10.0)
        kz.start(timeout=15)
        kz.create(Paths().service(SERVICE), ServiceRecord(protocol="grpc").encode(), makepath=True)
        server, server_info = start_ready(
            bench.pinned(bench.LOAD_CPU, [sys.executable, "-m", "tests.harness.grpc_apps", "server", "--name",
                                          SERVER_NAME]), "grpc-server", "grpcapp", workdir, tree)
        procs.append(server)
        server_port = int(server_info["port"])
        server_sc, server_sc_info = start_sidecar(mesh, "sidecar-server", SERVICE, server_port,
                                                  ["--protocol", "grpc", *sc.flags], workdir, tree)
        procs.append(server_sc)
        client_sc, client_sc_info = start_sidecar(mesh, "sidecar-client", "client", nginx_port, sc.flags, workdir,
                                                  tree)
        procs.append(client_sc)
        sidecars = {"server sidecar": (server_sc, int(server_sc_info["admin_port"])),
                    "client sidecar": (client_sc, int(client_sc_info["admin_port"]))}
        targets = [Target("direct", server_port, SERVICE),
                   Target("inbound", int(server_sc_info["inbound_port"]), SERVICE),
                   Target("outbound->inbound", int(client_sc_info["outbound_port"]), SERVICE)]
        for t in targets:
            t.cpu_us = {name: [] for name in sidecars}
        body = grpc_frame(PAYLOAD)

        def routed() -> bool:
            try:
                return h2_check(targets[-1].port, SERVICE, body)[1] == "0"
            except OSError:
                return False

        wait_until(routed, 30, 0.2, "the client sidecar routes echo")
        checks = []
        for t in targets:  # what h2load cannot see: grpc-status and the answer
            status, grpc_status, data = h2_check(t.port, t.authority, body)
            rate, errors, answers = grpcio_calls(t.port, t.authority, 200)
            line = (f"{t.label}: h2-built request -> :status {status}, grpc-status {grpc_status!r}, body {data!r}; "
                    f"200 grpcio calls -> answers {answers}, errors {errors or 'none'}")
            print(line, flush=True)
            checks.append(line)
            if status != 200 or grpc_status != "0" or data != grpc_frame(SERVER_NAME.encode()) or errors:
                raise RuntimeError(f"check failed: {line}")
        for t in targets:
            run_h2load(t.port, t.authority, 2000, data_file, workdir, f"{t.label}.warmup")
        grpc_before = {name: grpc_status_counts(admin) for name, (_, admin) in sidecars.items()}
        commands: dict[str, str] = {}
        loads: list[str] = []
        h2load_done = dict.fromkeys((t.label for t in targets), 0)
        for r in range(args.rounds):
            loads.append(uptime())
            print(f"round {r + 1}: {loads[-1]}", flush=True)
            k = r % len(targets)
            for t in targets[k:] + targets[:k]:
                cpu0 = {name: h1_paired.cpu_seconds(p) for name, (p, _) in sidecars.items()}
                rate, done, bad, commands[t.label] = run_h2load(t.port, t.authority, args.calls, data_file, workdir,
                                                                f"{t.label}.{r}")
                for name, (p, _) in sidecars.items():
                    t.cpu_us[name].append((h1_paired.cpu_seconds(p) - cpu0[name]) / max(done, 1) * 1e6)
                t.rate.append(rate)
                t.failed += bad
                h2load_done[t.label] += done
                print(f"round {r + 1}: {t.label} {rate:,.0f} calls/s, {bad} failed, CPU µs/call "
                      + ", ".join(f"{n} {v[-1]:.1f}" for n, v in t.cpu_us.items()), flush=True)
                if args.grpcio_calls:
                    grate, errors, _ = grpcio_calls(t.port, t.authority, args.grpcio_calls)
                    t.grpcio_rate.append(grate)
                    for code, n in errors.items():
                        t.grpcio_errors[code] = t.grpcio_errors.get(code, 0) + n
                    print(f"round {r + 1}: {t.label} grpcio client {grate:,.0f} calls/s, errors {errors or 'none'}",
                          flush=True)
        grpc_after = {name: grpc_status_counts(admin) for name, (_, admin) in sidecars.items()}
        loads.append(uptime())
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        cmd = shlex.join([".venv/bin/python", "bench/grpc_unary.py", *argv])
        print(f"\n{now}, `{cmd}`: sidecars at {sc.commit} {shlex.join(sc.flags)}; h2load -c {CONNECTIONS} -m "
              f"{STREAMS} -n {args.calls} per target per round, {args.rounds} rounds, "
              f"{time.monotonic() - started:.0f} s\n")
        print("uptime before the wait and when it ended:\n    " + "\n    ".join([waited[0], waited[-1]]))
        print("uptime before each round, and after the last:\n    " + "\n    ".join(loads) + "\n")
        direct = targets[0]
        print("| target | median calls/s | range | vs direct (median of rounds) | range | failed or non-2xx "
              "| server sidecar CPU µs/call | client sidecar CPU µs/call |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for t in targets:
            ratios = [a / b for a, b in zip(t.rate, direct.rate, strict=True)]
            cpu = [f"{statistics.median(v):.1f}" for v in t.cpu_us.values()]
            print(f"| {t.label} | {statistics.median(t.rate):,.0f} | {_range([x / 1000 for x in t.rate], '.1f')}k "
                  f"| {statistics.median(ratios):.3f} | {_range(ratios)} | {t.failed} | {cpu[0]} | {cpu[1]} |")
        if args.grpcio_calls:
            print(f"\ngrpcio client ({GRPCIO_THREADS} threads, one channel, {args.grpcio_calls} calls per target "
                  "per round):\n")
            print("| target | median calls/s | range | vs direct (median of rounds) | range | errors |")
            print("|---|---:|---:|---:|---:|---:|")
            for t in targets:
                ratios = [a / b for a, b in zip(t.grpcio_rate, direct.grpcio_rate, strict=True)]
                print(f"| {t.label} | {statistics.median(t.grpcio_rate):,.0f} "
                      f"| {_range([x / 1000 for x in t.grpcio_rate], '.1f')}k | {statistics.median(ratios):.3f} "
                      f"| {_range(ratios)} | {t.grpcio_errors or 0} |")
        print("\nChecks before the rounds:\n    " + "\n    ".join(checks))
        print(f"\nh2load calls done in the rounds: {h2load_done}")
        print("meshkeeper_grpc_requests in the rounds (after minus before the rounds; grpcio calls included):")
        for name in sidecars:
            delta = {k: v - grpc_before[name].get(k, 0) for k, v in grpc_after[name].items()}
            print(f"    {name}: {({k: v for k, v in delta.items() if v}) or 'none'}")
        print("\nCommands:\n")
        for t in targets:
            print(f"    {t.label}: {commands[t.label]}")
        (workdir / "rounds.json").write_text(json.dumps({
            "command": cmd, "time": now, "commit": sc.commit, "flags": sc.flags, "uptime": loads, "waited": waited,
            "checks": checks, "grpc_before": grpc_before, "grpc_after": grpc_after,
            "targets": [{"label": t.label, "rate": t.rate, "failed": t.failed, "cpu_us": t.cpu_us,
                         "grpcio_rate": t.grpcio_rate, "grpcio_errors": t.grpcio_errors} for t in targets]}, indent=1))
        return 0
    finally:
        for proc in reversed(procs):
            proc.terminate(5)
        if kz is not None:
            kz.stop()
            kz.close()
        if mesh is not None:
            mesh.stop(remove_workdir=False)
        for path in created:
            subprocess.run(["git", "-C", str(bench.BENCH_DIR.parent), "worktree", "remove", "--force", str(path)],
                           check=False)


if __name__ == "__main__":
    sys.exit(main())
