"""Added latency of transparent mode against explicit mode, side by side in pods (issue 12).

Built with tests/harness/pods.py's PodNetwork (run as root): ZooKeeper and the control plane on the
host bridge address, and five pods on the bridge:

* ``ut``: upstream for transparent mode: the capture rules (``meshkeeper iptables``), nginx on :8080
  and a sidecar ``--interception redirect`` as uid 1337 (service ``upstream-t``, registered as
  ``<pod-ip>:8080``);
* ``ue``: upstream for explicit mode: no capture, the same nginx, a sidecar in explicit mode
  (service ``upstream-e``, registered as ``<pod-ip>:15006``);
* ``ct``: transparent caller: capture rules, sidecar ``--interception redirect``; the load dials the
  service's VIP (``<vip>:8080``, read from ZooKeeper) and is captured to the sidecar's 15001;
* ``ce``: explicit caller: no capture, explicit sidecar; the load sends ``Host: <svc>`` to
  127.0.0.1:15001;
* ``direct``: no capture, no sidecar; the load dials ``ue``'s nginx (``<ue-ip>:8080``) straight.

The upstream app is one nginx worker answering 13 bytes (bench/run.py's upstream, listening on
0.0.0.0:8080). Caller pods run the same nginx as their own app (the sidecar health-checks its app
before it registers); it serves nothing during the load.

Targets (the caller pod's sidecar -> the upstream pod's sidecar): ``direct``; ``explicit`` (ce -> ue);
``transparent`` (ct -> ut); and the two crossings, ``explicit->transparent`` (ce -> ut: same outbound
as explicit, same inbound as transparent) and ``transparent->explicit`` (ct -> ue), which split the
difference between the outbound and the inbound side.

Load: ``h2load --h1 -c 10 --rps 100`` (1,000 req/s) for ``--duration`` seconds, run as root inside the
caller pod (``ip netns exec``; root's connections are captured, only uid 1337's are not), per-request
latencies from ``--log-file``. ``--rounds`` rounds, every target once per round, the order rotating
each round; p50/p99 are over all rounds' requests pooled, and per round too. The sidecars' CPU time
per request (caller + upstream sidecar, from /proc) is read around each run. Pinned as bench/run.py
pins: h2load, nginx, ZooKeeper and the control plane on CPU 0, every sidecar on CPU 1.

    sudo .venv/bin/python bench/transparent.py [--rounds 3] [--duration 15] [--only direct,explicit,...]

Prints markdown tables (bench/RESULTS.md is edited by hand); raw logs and h2load per-request logs
go to ``--workdir`` (default bench/out/transparent).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshkeeper.demo.process import meshkeeper_argv, process_group_pids, wait_until  # noqa: E402
from meshkeeper.registry import Paths  # noqa: E402
from tests.harness.pods import PROXY_UID, Pod, PodNetwork, PodProcess  # noqa: E402

LOAD_CPU, PROXY_CPU = "0", "1"
APP_PORT = 8080
CLIENTS, RPS_PER_CLIENT = 10, 100
TARGETS = ("direct", "explicit", "transparent", "explicit->transparent", "transparent->explicit")
TICK = os.sysconf("SC_CLK_TCK")

NGINX = """worker_processes 1;
daemon off;
pid {w}/nginx.pid;
error_log {w}/nginx.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {w}/tmp/body;
    proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi;
    uwsgi_temp_path {w}/tmp/uwsgi;
    scgi_temp_path {w}/tmp/scgi;
    server {{
        listen 0.0.0.0:{port} backlog=4096;
        location / {{ default_type text/plain; return 200 "Hello, world\\n"; }}
    }}
}}
"""


@dataclass
class Target:
    name: str
    pod: Pod
    url: str
    authority: str
    sidecars: list[PodProcess]
    latencies_us: list[int] = field(default_factory=list)
    rounds: list[tuple[float, float]] = field(default_factory=list)  # per round (p50 ms, p99 ms)
    errors: int = 0
    cpu_us_per_rq: list[float] = field(default_factory=list)
    command: str = ""

    @property
    def slug(self) -> str:  # for file names
        return self.name.replace("->", "-to-")


def quantiles_ms(latencies_us: list[int]) -> tuple[float, float]:
    q = statistics.quantiles(latencies_us, n=100, method="inclusive")
    return q[49] / 1000, q[98] / 1000


def cpu_seconds(procs: list[PodProcess]) -> float:
    """utime + stime of every live process in the sidecars' process groups."""
    total = 0
    for proc in procs:
        for pid in process_group_pids(os.getpgid(proc.pid)):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def start_nginx(pod: Pod, workdir: Path) -> None:
    w = workdir / f"nginx-{pod.name}"
    (w / "tmp").mkdir(parents=True, exist_ok=True)
    conf = w / "nginx.conf"
    conf.write_text(NGINX.format(w=w, port=APP_PORT))
    log = (w / "stderr.log").open("w")
    pod.run(["taskset", "-c", LOAD_CPU, "nginx", "-c", str(conf)], stdout=log, stderr=log)
    wait_until(lambda: _get(pod, f"http://127.0.0.1:{APP_PORT}/") == 200, 15, 0.05, f"nginx in pod {pod.name}")


def _get(pod: Pod, url: str, host: str | None = None) -> int:
    try:
        return pod.http_get(url, {"Host": host} if host else None, timeout=2)[0]
    except OSError:
        return 0


def start_sidecar(pod: Pod, service: str, cp: str, zk: str, transparent: bool) -> PodProcess:
    """``meshkeeper sidecar`` as uid 1337 pinned to the proxy CPU, as Pod.sidecar starts it."""
    args = ["sidecar", "--service", service, "--app-port", str(APP_PORT), "--cp", cp, "--zk", zk,
            "--advertise-host", pod.ip, "--access-log", "off", "--workers", "1",
            "--interception", "redirect" if transparent else "none"]
    proc = pod.start(["taskset", "-c", PROXY_CPU, *meshkeeper_argv(*args)], role="sidecar", uid=PROXY_UID,
                     name=f"{pod.name}-sidecar-{service}")
    proc.wait_ready()
    return proc


def run_h2load(target: Target, duration: int, log: Path, workdir: Path) -> tuple[list[int], int, str, str]:
    log.unlink(missing_ok=True)
    argv = ["taskset", "-c", LOAD_CPU, "h2load", "--h1", "-c", str(CLIENTS), "--rps", str(RPS_PER_CLIENT),
            "-D", str(duration), "--warm-up-time", "1", "-H", f":authority: {target.authority}",
            f"--log-file={log}", target.url]
    out = target.pod.check_output(argv, timeout=duration + 60)
    latencies, errors = [], 0
    for line in log.read_text().splitlines():
        cols = line.split("\t")
        if len(cols) >= 3:
            if cols[1] == "200":
                latencies.append(int(cols[2]))
            else:
                errors += 1
    if len(latencies) < 100:
        raise RuntimeError(f"{target.name}: h2load logged {len(latencies)} successful requests:\n{out}")
    m = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if m:
        errors = max(errors, int(m.group(3)) + int(m.group(4)))
    return latencies, errors, out, shlex.join(argv)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="runs per target, order rotating (default 3)")
    p.add_argument("--duration", type=int, default=15, help="seconds per h2load run (default 15)")
    p.add_argument("--only", default=",".join(TARGETS), help="comma-separated subset of: " + ", ".join(TARGETS))
    p.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "transparent")
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    if unknown := sorted(set(args.only) - set(TARGETS)):
        p.error(f"--only: unknown {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for tool in ("taskset", "h2load", "nginx"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin") is None:
            sys.exit(f"bench/transparent.py: {tool} missing")
    os.environ["PATH"] += ":/usr/sbin:/sbin"
    os.sched_setaffinity(0, {int(LOAD_CPU)})  # everything started here inherits CPU 0 unless pinned
    workdir = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    began = time.monotonic()
    load_before = os.getloadavg()

    from kazoo.client import KazooClient

    with PodNetwork(workdir / "logs") as net:
        zk = net.zookeeper(workdir / "zk")
        cp = net.controlplane(zk.hosts)
        cp_addr = f"{net.host_ip}:{cp.port('xds_port')}"
        pods = {name: net.add_pod(name) for name in ("ut", "ue", "ct", "ce", "direct")}
        for name in ("ut", "ct"):
            pods[name].capture()
        for name in ("ut", "ue", "ct", "ce"):
            start_nginx(pods[name], workdir)
        sidecars = {
            "ut": start_sidecar(pods["ut"], "upstream-t", cp_addr, zk.hosts, transparent=True),
            "ue": start_sidecar(pods["ue"], "upstream-e", cp_addr, zk.hosts, transparent=False),
            "ct": start_sidecar(pods["ct"], "caller-t", cp_addr, zk.hosts, transparent=True),
            "ce": start_sidecar(pods["ce"], "caller-e", cp_addr, zk.hosts, transparent=False),
        }
        kz = KazooClient(hosts=zk.hosts, timeout=10.0)
        kz.start(timeout=15)
        try:
            vips = {}
            for svc in ("upstream-t", "upstream-e"):
                path = Paths().vip(svc)
                wait_until(lambda p=path: kz.exists(p), 30, 0.1, f"VIP of {svc} in ZooKeeper")
                vips[svc] = json.loads(kz.get(path)[0])["address"]
        finally:
            kz.stop()
            kz.close()
        print(f"pods: {', '.join(f'{n} {p.ip}' for n, p in pods.items())}; VIPs {vips}", flush=True)

        loop = "http://127.0.0.1:15001/"
        all_targets = {
            "direct": Target("direct", pods["direct"], f"http://{pods['ue'].ip}:{APP_PORT}/", "upstream-e", []),
            "explicit": Target("explicit", pods["ce"], loop, "upstream-e", [sidecars["ce"], sidecars["ue"]]),
            "transparent": Target("transparent", pods["ct"], f"http://{vips['upstream-t']}:{APP_PORT}/",
                                  f"upstream-t:{APP_PORT}", [sidecars["ct"], sidecars["ut"]]),
            "explicit->transparent": Target("explicit->transparent", pods["ce"], loop, "upstream-t",
                                            [sidecars["ce"], sidecars["ut"]]),
            "transparent->explicit": Target("transparent->explicit", pods["ct"],
                                            f"http://{vips['upstream-e']}:{APP_PORT}/", f"upstream-e:{APP_PORT}",
                                            [sidecars["ct"], sidecars["ue"]]),
        }
        targets = [all_targets[n] for n in args.only]
        for t in targets:  # routes in place (a request from the test process in the pod is root's: captured)
            wait_until(lambda t=t: _get(t.pod, t.url, t.authority) == 200, 30, 0.1, f"{t.name} answers 200")
        for t in targets:  # warm-up: keep-alive pools, code paths
            run_h2load(t, 2, workdir / f"{t.slug}.warmup.tsv", workdir)
        for r in range(args.rounds):
            order = targets[r % len(targets):] + targets[: r % len(targets)]
            for t in order:
                print(f"round {r + 1}/{args.rounds}: {t.name} ...", flush=True)
                before = cpu_seconds(t.sidecars)
                lat, errors, out, cmd = run_h2load(t, args.duration, workdir / f"{t.slug}.r{r + 1}.tsv", workdir)
                used = cpu_seconds(t.sidecars) - before
                (workdir / f"{t.slug}.r{r + 1}.h2load.txt").write_text(f"{cmd}\n\n{out}")
                t.latencies_us += lat
                t.errors += errors
                t.rounds.append(quantiles_ms(lat))
                if t.sidecars:
                    t.cpu_us_per_rq.append(used * 1e6 / len(lat))
                t.command = cmd
        for name, proc in sidecars.items():  # counters for the record (connections vs requests per cluster)
            _, _, body = pods[name].http_get(f"{proc.admin_url}/stats/prometheus", timeout=5)
            (workdir / f"{name}.stats.prom").write_bytes(body)

    print(report(targets, args, load_before, time.monotonic() - began))
    return 0


def report(targets: list[Target], args: argparse.Namespace, load_before: tuple[float, ...], took: float) -> str:
    by = {t.name: t for t in targets}
    direct = by.get("direct")
    d50, d99 = quantiles_ms(direct.latencies_us) if direct else (None, None)
    lines = [
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"`.venv/bin/python bench/transparent.py {' '.join(sys.argv[1:])}`".rstrip() + f" ({took:.0f} s); "
        f"load average before {' / '.join(f'{x:.2f}' for x in load_before)}, "
        f"after {' / '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
        "| target | requests | errors | p50 ms | p99 ms | added p50 / p99 ms over direct | per-round p50 ms | "
        "per-round p99 ms | sidecars' CPU µs/request |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for t in targets:
        p50, p99 = quantiles_ms(t.latencies_us)
        added = f"+{p50 - d50:.2f} / +{p99 - d99:.2f}" if direct and t is not direct else "-"
        cpu = f"{statistics.median(t.cpu_us_per_rq):.0f}" if t.cpu_us_per_rq else "-"
        lines.append(
            f"| {t.name} | {len(t.latencies_us):,} | {t.errors} | {p50:.3f} | {p99:.3f} | {added} | "
            f"{', '.join(f'{a:.3f}' for a, _ in t.rounds)} | {', '.join(f'{b:.2f}' for _, b in t.rounds)} | {cpu} |"
        )
    pairs = [("transparent", "explicit"), ("transparent->explicit", "explicit"),
             ("explicit->transparent", "explicit"), ("transparent", "explicit->transparent")]
    paired = []
    for a, b in pairs:
        if a in by and b in by:
            diffs = [x[0] - y[0] for x, y in zip(by[a].rounds, by[b].rounds, strict=True)]
            pa, pb = quantiles_ms(by[a].latencies_us)[0], quantiles_ms(by[b].latencies_us)[0]
            paired.append(f"| {a} - {b} | {pa - pb:+.3f} | {', '.join(f'{d:+.3f}' for d in diffs)} | "
                          f"{statistics.median(diffs):+.3f} |")
    if paired:
        lines += ["", "| p50 difference | pooled ms | per round ms | median of rounds ms |", "|---|---:|---|---:|",
                  *paired]
    lines += ["", "Commands (in the caller pod, `ip netns exec mkpod-<net>-<pod> ...`, as root):", ""]
    lines += [f"    {t.name}: {t.command}" for t in targets]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
