"""HTTP/2 (h2c, prior knowledge) req/s through HAProxy, nginx and the sidecar, interleaved rounds.

Issue 14's HTTP/2 figure: ``h2load -c 10 -m 10`` (10 connections, 10 concurrent streams each)
through each proxy in HTTP/2 mode, to the same upstream as bench/run.py (one nginx worker
answering 13 bytes, spoken to over HTTP/1.1 keep-alive: nginx proxies to HTTP/1.x only, and
HAProxy is given the same upstream so that the two compare like for like). HAProxy:
bench/haproxy-h2.cfg (``bind ... proto h2``); nginx: bench/nginx-h2.conf (``listen ... http2`` on a
plaintext port, which speaks HTTP/2 only). Pinning as bench/run.py: h2load, the upstream, ZooKeeper
and the control plane on the load CPU, each proxy alone on the proxy CPU.

The sidecar slot (``--sidecar LABEL=REV[:FLAGS]``, default ``sidecar=.:--access-log off``, the
syntax of bench/h1_paired.py) starts a sidecar worker and sends it the HTTP/2 connection preface
and a SETTINGS frame on its outbound port; a sidecar that answers with anything but a SETTINGS
frame (today's answers HTTP/1.1 400) is left out of the rounds, with what it answered printed. Once
the sidecar speaks h2c it joins the rounds with no change here. ``--sidecar none`` skips it (no
ZooKeeper or control plane is started then).

    .venv/bin/python bench/h2c.py [--rounds 8] [--duration 5] [--sidecar 'sidecar=.:--access-log off']

Per target: median req/s over the rounds and their range, the median of the per-round ratio to
HAProxy and its range, failed requests, and the proxy's CPU µs per request (/proc).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import h1_paired  # noqa: E402 - bench/h1_paired.py, beside this file
import run as bench  # noqa: E402

from meshkeeper.demo.process import ChildProcess, wait_until  # noqa: E402

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type SETTINGS, no flags, stream 0
CONNECTIONS, STREAMS = 10, 10


def probe_h2(port: int, timeout: float = 2.0) -> tuple[bool, str]:
    """(True, ...) when the server answers the h2c preface with a SETTINGS frame; else what it said."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(PREFACE + EMPTY_SETTINGS)
        data = b""
        try:
            while len(data) < 9:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
    if len(data) >= 9 and data[3] == 0x04 and data[5:9] == b"\x00\x00\x00\x00":
        return True, "SETTINGS"
    if not data:
        return False, "closed the connection without a byte"
    return False, repr(data.split(b"\r\n", 1)[0][:80].decode("latin-1"))


def start_h2_reference(name: str, upstream_port: int, workdir: Path) -> tuple[ChildProcess, int]:
    port = bench.free_port()
    if name == "haproxy":
        cfg = bench.render("haproxy-h2.cfg", workdir, port=port, upstream_port=upstream_port)
        argv = ["haproxy", "-db", "-f", str(cfg)]
    else:
        cfg = bench.render("nginx-h2.conf", workdir, port=port, upstream_port=upstream_port)
        (workdir / "nginx-h2-tmp").mkdir(exist_ok=True)
        argv = ["nginx", "-c", str(cfg)]
    proc = ChildProcess(bench.pinned(bench.PROXY_CPU, argv), name=f"{name}-h2", log_dir=workdir)
    proc.spawn()

    def up() -> bool:
        if not proc.running():
            raise RuntimeError(f"{name} exited with {proc.returncode}: {proc.stderr_tail(3)}")
        try:
            return probe_h2(port, 1)[0]
        except OSError:
            return False

    wait_until(up, 15, 0.05, f"{name} answers h2c on {port}")
    return proc, port


def run_h2load(port: int, duration: int, workdir: Path, name: str) -> tuple[float, int, str]:
    """(req/s, requests failed, errored or answered other than 2xx, command)."""
    argv = bench.pinned(bench.LOAD_CPU, [
        "h2load", "-t", "1", "-c", str(CONNECTIONS), "-m", str(STREAMS), "-D", str(duration),
        "--warm-up-time", "1", "-H", f":authority: {bench.HOST}", f"http://127.0.0.1:{port}/",
    ])  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    (workdir / f"{name}.h2load.txt").write_text(out)
    rate = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    counts = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not rate or not counts or not codes:
        raise RuntimeError(f"h2load printed no rate:\n{out}")
    if int(codes.group(1)) == 0:
        raise RuntimeError(f"h2load: no 2xx response:\n{out}")
    bad = int(counts.group(2)) + int(counts.group(3)) + sum(int(codes.group(i)) for i in (2, 3, 4))
    return float(rate.group(1)), bad, shlex.join(argv)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--duration", type=int, default=5, help="seconds of h2load per target per round (default 5)")
    p.add_argument("--sidecar", default="sidecar=.:--access-log off",
                   help="LABEL=REV[:FLAGS] as in bench/h1_paired.py, or 'none'")
    p.add_argument("--workdir", type=Path, default=bench.BENCH_DIR / "out" / "h2")
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
    load_before = os.getloadavg()
    started = time.monotonic()
    procs: list[ChildProcess] = []
    created: list[Path] = []
    env = None
    try:
        port = bench.free_port()
        conf = bench.render("nginx-upstream.conf", workdir, port=port)
        (workdir / "nginx-upstream-tmp").mkdir()
        procs.append(bench.start_server(bench.pinned(bench.LOAD_CPU, ["nginx", "-c", str(conf)]), "upstream",
                                        workdir, f"http://127.0.0.1:{port}/"))
        targets: dict[str, tuple[ChildProcess, int]] = {}
        for name in ("haproxy", "nginx"):
            proc, proxy_port = start_h2_reference(name, port, workdir)
            procs.append(proc)
            targets[name] = (proc, proxy_port)
        skipped = ""
        if args.sidecar != "none":
            sc = h1_paired.parse_target(args.sidecar)
            h1_paired.checkout(sc, {}, created)
            h1_paired.check_imports(sc.tree)
            env = bench.Sidecar(workdir, port)
            env.mesh.start_registry()
            env._register_upstream()
            h1_paired.start_sidecar(env, sc, workdir)
            sc_port = int(sc.url.rsplit(":", 1)[1].strip("/"))
            speaks, answer = probe_h2(sc_port)
            if speaks:
                targets[sc.label] = (sc.proc, sc_port)
                print(f"{sc.label}: {sc.commit} {shlex.join(sc.flags)} answers h2c on {sc_port}", flush=True)
            else:
                skipped = (f"{sc.label} ({sc.commit} {shlex.join(sc.flags)}) skipped: it refuses HTTP/2 with "
                           f"prior knowledge (the h2c preface on its outbound port got {answer})")
                print(skipped, flush=True)
        names = list(targets)
        for name in names:
            run_h2load(targets[name][1], 2, workdir, f"{name}.warmup")
        rps: dict[str, list[float]] = {n: [] for n in names}
        cpu_us: dict[str, list[float]] = {n: [] for n in names}
        failed: dict[str, int] = dict.fromkeys(names, 0)
        commands: dict[str, str] = {}
        loads = []
        for r in range(args.rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                proc, proxy_port = targets[name]
                before = h1_paired.cpu_seconds(proc)
                got, bad, commands[name] = run_h2load(proxy_port, args.duration, workdir, f"{name}.{r}")
                cpu_us[name].append((h1_paired.cpu_seconds(proc) - before) / (got * args.duration) * 1e6)
                rps[name].append(got)
                failed[name] += bad
                print(f"round {r + 1}: {name} {got:,.0f} req/s, {cpu_us[name][-1]:.1f} CPU µs/request, "
                      f"{bad} failed", flush=True)
            loads.append(os.getloadavg()[0])
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        cmd = shlex.join([".venv/bin/python", "bench/h2c.py", *argv])
        print(f"\n{now}, `{cmd}`: h2load -c {CONNECTIONS} -m {STREAMS} -D {args.duration} per target per round, "
              f"{args.rounds} rounds, {time.monotonic() - started:.0f} s; load average (1 min) before "
              f"{load_before[0]:.2f}, per round {min(loads):.2f}-{max(loads):.2f}, after {os.getloadavg()[0]:.2f}\n")
        print("| target | median req/s | range | vs HAProxy (median of rounds) | range | failed or non-2xx "
              "| CPU µs/request (median) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name in names:
            ratios = [a / b for a, b in zip(rps[name], rps["haproxy"], strict=True)]
            print(f"| {name} | {statistics.median(rps[name]):,.0f} | {min(rps[name]) / 1000:.1f}-"
                  f"{max(rps[name]) / 1000:.1f}k | {statistics.median(ratios):.3f} | {min(ratios):.2f}-"
                  f"{max(ratios):.2f} | {failed[name]} | {statistics.median(cpu_us[name]):.1f} |")
        if skipped:
            print(f"\n{skipped}")
        print("\nCommands:\n")
        for name in names:
            print(f"    {name}: {commands[name]}")
        return 0
    finally:
        if env is not None:
            env.stop()
        for proc in reversed(procs):
            proc.terminate(5)
        for path in created:
            subprocess.run(["git", "-C", str(bench.BENCH_DIR.parent), "worktree", "remove", "--force", str(path)],
                           check=False)


if __name__ == "__main__":
    sys.exit(main())
