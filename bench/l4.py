"""L4 (TCP) proxy benchmark: the sidecar's tcp_proxy data path against HAProxy ``mode tcp``.

One nginx worker is the upstream (a 100 MB file and a 13-byte answer); the load (curl, wrk) and
the upstream run on CPU 0, the proxy under test alone on CPU 1 (as bench/run.py pins). Per target:

* throughput: ``curl`` downloads the 100 MB file through the proxy, ``--runs`` times after one
  warm-up -> median MB/s;
* connections per second: ``wrk -t1 -c50 -H 'Connection: close'``: every request is a new
  connection (connect, a few bytes up, the answer back, close) -> connections/s.

Targets: ``direct`` (no proxy: the ceiling of load and upstream on one core), ``haproxy``,
``l4`` (``sidecar.l4.TcpProxy`` via bench/l4_proxy.py) and ``splice`` (a bare ``os.splice`` relay,
throughput only: the zero-copy measurement). Prints a markdown table with the commands.

    .venv/bin/python bench/l4.py [--runs 3] [--duration 5] [--only haproxy,l4,splice]
"""

from __future__ import annotations

import argparse
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable
LOAD_CPU, PROXY_CPU = "0", "1"
BIG = 100 * 1000 * 1000  # bytes; MB/s below are 10^6 bytes per second
TARGETS = ("direct", "haproxy", "l4", "splice")

NGINX = """worker_processes 1;
daemon off;
pid {w}/nginx.pid;
error_log {w}/nginx.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {w}/tmp;
    proxy_temp_path {w}/tmp;
    fastcgi_temp_path {w}/tmp;
    uwsgi_temp_path {w}/tmp;
    scgi_temp_path {w}/tmp;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {w};
        location = / {{ default_type text/plain; return 200 "Hello, world\\n"; }}
    }}
}}
"""

HAPROXY = """global
    nbthread 1
    maxconn 8192
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend bench
    bind 127.0.0.1:{port}
    default_backend upstream
backend upstream
    server upstream 127.0.0.1:{upstream}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not open after {timeout:.0f}s")


def start(argv: list[str], log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def throughput(port: int, runs: int) -> tuple[float, list[float], str]:
    argv = ["taskset", "-c", LOAD_CPU, "curl", "-s", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}",
            f"http://127.0.0.1:{port}/big"]
    speeds = []
    subprocess.run(argv, capture_output=True, timeout=120, check=True)  # warm-up (page cache, connections)
    for _ in range(runs):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout.split()
        if int(out[1]) != BIG:
            raise RuntimeError(f"downloaded {out[1]} bytes, not {BIG}")
        speeds.append(float(out[0]) / 1e6)
    return statistics.median(speeds), speeds, shlex.join(argv)


def connection_rate(port: int, duration: int) -> tuple[float, str, str]:
    argv = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c50", f"-d{duration}s", "-H", "Connection: close",
            f"http://127.0.0.1:{port}/"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Socket errors:.*|Non-2xx.*", out)
    return rate, errors.group(0) if errors else "", shlex.join(argv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--only", default=",".join(TARGETS))
    args = parser.parse_args()
    only = [t for t in args.only.split(",") if t]
    work = Path(tempfile.mkdtemp(prefix="l4bench-"))
    work.chmod(0o755)  # nginx workers may run as another user
    (work / "tmp").mkdir()
    with (work / "big").open("wb") as f:
        f.truncate(BIG)
    (work / "big").chmod(0o644)
    upstream = free_port()
    (work / "nginx.conf").write_text(NGINX.format(w=work, port=upstream))
    nginx = start(["taskset", "-c", LOAD_CPU, "nginx", "-c", str(work / "nginx.conf"), "-p", str(work)],
                  work / "nginx.log")
    rows = []
    commands: list[str] = []
    try:
        wait_port(upstream, nginx)
        for target in ["direct", *[t for t in only if t != "direct"]]:
            port = free_port()
            proc = None
            if target == "haproxy":
                (work / "haproxy.cfg").write_text(HAPROXY.format(port=port, upstream=upstream))
                argv = ["taskset", "-c", PROXY_CPU, "haproxy", "-f", str(work / "haproxy.cfg")]
            elif target in ("l4", "splice"):
                argv = ["taskset", "-c", PROXY_CPU, PYTHON, str(BENCH_DIR / "l4_proxy.py"), "--port", str(port),
                        "--upstream", f"127.0.0.1:{upstream}", *(["--splice"] if target == "splice" else [])]
            else:
                argv, port = [], upstream
            if argv:
                commands.append(shlex.join(argv))
                proc = start(argv, work / f"{target}.log")
            try:
                if proc is not None:
                    wait_port(port, proc)
                mbs, runs, cmd = throughput(port, args.runs)
                commands.append(cmd.replace(str(port), "<port>"))
                cps, cps_note, cmd = (None, "", "")
                if target != "splice":
                    time.sleep(1)  # let TIME_WAIT of the previous target settle a little
                    cps, cps_note, cmd = connection_rate(port, args.duration)
                    commands.append(cmd.replace(str(port), "<port>"))
                rows.append((target, mbs, runs, cps, cps_note))
            except Exception as exc:
                rows.append((target, None, [], None, f"failed: {exc}"))
            finally:
                if proc is not None:
                    stop(proc)
    finally:
        stop(nginx)
    base = {r[0]: r for r in rows}.get("haproxy")
    print("| target | MB/s (100 MB, median) | runs | vs HAProxy | conn/s | vs HAProxy | note |")
    print("|---|---:|---|---:|---:|---:|---|")
    for target, mbs, runs, cps, note in rows:
        ratio = f"{mbs / base[1]:.2f}x" if base and base[1] and mbs else ""
        cratio = f"{cps / base[3]:.2f}x" if base and base[3] and cps else ""
        print(f"| {target} | {mbs or 0:.0f} | {', '.join(f'{s:.0f}' for s in runs)} | {ratio} | "
              f"{cps or 0:.0f} | {cratio} | {note} |")
    print("\nCommands (load and upstream on CPU 0, the proxy on CPU 1):\n")
    for cmd in dict.fromkeys(commands):
        print(f"    {cmd}")
    print(f"\nlogs: {work}")


if __name__ == "__main__":
    main()
