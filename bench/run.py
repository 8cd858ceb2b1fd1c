"""Side-by-side proxy benchmark: HAProxy, nginx and the Meshkeeper sidecar in front of one nginx.

Every target forwards to the same upstream (one nginx worker answering 13 bytes). The load
generators and the upstream run on CPU 0, the proxy under test alone on CPU 1, one at a time.
Per target:

* throughput: ``wrk -t1 -c<connections> -d<duration>s`` -> req/s, and the ratio to HAProxy;
* latency at a fixed rate: ``h2load --h1 -c 10 --rps 100`` (1,000 req/s) for ``--latency-duration``
  seconds, per-request latencies from ``--log-file`` -> p50/p99, and p99 *added* over calling the
  upstream directly;
* memory: VmRSS of the proxy's processes before and after the load.

The sidecar gets a ZooKeeper, a control plane, and the upstream registered as service ``upstream``
(written straight to ZooKeeper, as a sidecar would); wrk sends ``Host: upstream`` to its outbound
port. If any of that fails, the sidecar row says why and the others still run.

    make bench BENCH_ARGS="--only haproxy,nginx --duration 5"
    .venv/bin/python bench/run.py [--duration 10] [--connections 50] [--repeat 1] [--only haproxy,nginx,sidecar]

The table is printed and written to bench/RESULTS.md (``--output``); logs go to bench/out/.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import shutil
import statistics
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from meshkeeper.demo.mesh import LocalMesh
from meshkeeper.demo.process import (
    ChildProcess,
    ManagedProcess,
    free_port,
    http_get,
    meshkeeper_argv,
    process_group_pids,
    rss_kib,
    wait_until,
)

BENCH_DIR = Path(__file__).resolve().parent
# The sidecar targets differ in their flags: every one runs without an access log (HAProxy and nginx
# log nothing here either) except "sidecar-access-log", which writes its JSON lines to a file as a
# container runtime would collect stdout; the tracing targets export to an OTLP sink (OtlpSink).
SIDECAR_TARGETS: dict[str, list[str]] = {
    "sidecar": ["--access-log", "off"],
    "sidecar-resilience": ["--access-log", "off"],
    "sidecar-access-log": ["--access-log", "{workdir}/access.log"],
    "sidecar-trace-0pct": ["--access-log", "off", "--otlp-endpoint", "{otlp}", "--trace-sample-ratio", "0"],
    "sidecar-trace-1pct": ["--access-log", "off", "--otlp-endpoint", "{otlp}", "--trace-sample-ratio", "0.01"],
    "sidecar-trace-100pct": ["--access-log", "off", "--otlp-endpoint", "{otlp}", "--trace-sample-ratio", "1"],
}
PROXIES = ("haproxy", "nginx", *SIDECAR_TARGETS)
# The traffic policy of the "sidecar-resilience" target: every mechanism on the request path is
# engaged with Envoy's defaults (circuit breakers and the retry budget are on for every target).
RESILIENCE_POLICY = {
    "outlier": {},
    "retry": {"attempts": 2, "on": ["5xx", "gateway-error", "connect-failure", "reset"], "per_try_timeout_ms": 1000},
}
LOAD_CPU, PROXY_CPU = "0", "1"
HOST = "upstream"  # the Host header every request carries; the sidecar routes on it
LATENCY_CLIENTS, LATENCY_RPS_PER_CLIENT = 10, 100


@dataclass
class Result:
    name: str
    rps: float | None = None
    rps_runs: list[float] = field(default_factory=list)
    wrk_errors: str = ""
    p50_ms: float | None = None
    p99_ms: float | None = None
    latency_errors: int = 0
    rss_idle_kib: int | None = None
    rss_after_kib: int | None = None
    note: str = ""
    commands: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- processes


def render(template: str, workdir: Path, **values: object) -> Path:
    text = string.Template((BENCH_DIR / template).read_text()).substitute(workdir=workdir, **values)
    out = workdir / template
    out.write_text(text)
    return out


def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv]


def start_server(argv: list[str], name: str, workdir: Path, url: str, timeout: float = 15.0) -> ChildProcess:
    proc = ChildProcess(argv, name=name, log_dir=workdir)
    proc.spawn()
    deadline = time.monotonic() + timeout
    while True:
        if not proc.running():
            last = (proc.stderr_tail(3).splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{name} exited with {proc.returncode}: {last}")
        try:
            if http_get(url, {"Host": HOST}, timeout=1)[0] == 200:
                return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{name} does not answer {url} after {timeout:.0f}s")
        time.sleep(0.05)


def group_rss_kib(proc: ChildProcess) -> int:
    return sum(rss_kib(pid) for pid in process_group_pids(proc.pid))


class Sidecar:
    """ZooKeeper + control plane + the upstream registered + one sidecar pinned to the proxy CPU."""

    def __init__(self, workdir: Path, upstream_port: int, policy: dict | None = None,
                 extra: list[str] | None = None) -> None:
        self.workdir = workdir
        self.upstream_port = upstream_port
        self.policy = policy
        self.extra = extra or []
        self.mesh = LocalMesh(workdir=workdir)  # ZooKeeper and the control plane, as in the demo
        self.kazoo = None
        self.procs: list[ChildProcess] = []

    def start(self) -> tuple[ManagedProcess, str]:
        self.mesh.start_registry()
        self._register_upstream()
        return self.add(self.extra)

    def add(self, extra: list[str], name: str = "sidecar", status_port: bool = True) -> tuple[ManagedProcess, str]:
        """One more sidecar on this mesh (pinned to the proxy CPU like the first), ready to route.

        ``status_port=False`` for a sidecar of an older tree, which has no ``--status-port`` (nor binds 15021).
        """
        cp = self.mesh.controlplane
        zk_hosts = self.mesh.zk_hosts
        sidecar = ManagedProcess(
            pinned(
                PROXY_CPU,
                meshkeeper_argv(
                    "sidecar", "--service", "bench", "--app-port", str(self.upstream_port),
                    "--cp", f"127.0.0.1:{cp.port('xds_port')}", "--zk", zk_hosts,
                    "--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0", "--workers", "1",
                    *(["--status-port", "0"] if status_port else []), *extra,
                ),
            ),
            role="sidecar",
            name=name,
            log_dir=self.workdir,
        )  # fmt: skip
        self.procs.append(sidecar)
        sidecar.start()
        admin = f"http://127.0.0.1:{sidecar.port('admin_port')}"
        wait_until(lambda: http_get(f"{admin}/ready", timeout=1)[0] == 200, 30, 0.1, f"sidecar {admin}/ready")
        if self.policy is not None:  # the policy must be in force before anything is measured
            wait_until(lambda: b'"outlier_detection": {' in http_get(f"{admin}/clusters", timeout=1)[2],
                       30, 0.1, "outlier detection in the sidecar's /clusters")
        url = f"http://127.0.0.1:{sidecar.port('outbound_port')}/"
        wait_until(
            lambda: http_get(url, {"Host": HOST}, timeout=1)[0] == 200, 30, 0.1, f"sidecar routes {HOST}"
        )
        return sidecar, url

    def _register_upstream(self) -> None:
        from kazoo.client import KazooClient

        from meshkeeper.registry import InstanceRecord, Paths, ServiceRecord

        self.kazoo = KazooClient(hosts=self.mesh.zk_hosts, timeout=10.0)
        self.kazoo.start(timeout=15)
        paths = Paths()
        record = InstanceRecord(
            address="127.0.0.1",
            port=self.upstream_port,
            labels={"version": "v1"},
            app_port=self.upstream_port,
        )
        self.kazoo.create(paths.service(HOST), ServiceRecord("http").encode(), makepath=True)
        self.kazoo.create(paths.instance(HOST, record.key), record.encode(), ephemeral=True, makepath=True)
        if self.policy is not None:
            from meshkeeper.policy import decode_policy, encode_policy

            self.kazoo.create(paths.policy(HOST), encode_policy(decode_policy(self.policy)))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate(5)
        if self.kazoo is not None:
            self.kazoo.stop()
            self.kazoo.close()
        self.mesh.stop(remove_workdir=False)


class OtlpSink:
    """An OTLP/gRPC TraceService that accepts every export and only counts it (spans are not
    decoded: the sink must cost the load CPU as little as possible). Runs in this process, on CPU 0."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc

        self.requests = 0
        self.bytes = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))

        def export(request: bytes, context) -> bytes:
            self.requests += 1
            self.bytes += len(request)
            return b""  # an empty ExportTraceServiceResponse

        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(export)})
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0)


def tracing_note(proc: ChildProcess) -> str:
    """What the sidecar's tracer did over the whole run, from its own metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = http_get(f"http://127.0.0.1:{proc.port('admin_port')}/stats/prometheus", timeout=5)
    if status != 200:
        return f"tracing stats unavailable ({status})"
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.startswith("meshkeeper_tracing_spans_"):
                key = sample.name.removeprefix("meshkeeper_tracing_spans_").removesuffix("_total")
                key += f"({sample.labels['reason']})" if "reason" in sample.labels else ""
                values[key] = values.get(key, 0) + sample.value
    return "spans " + ", ".join(f"{k} {int(v):,}" for k, v in sorted(values.items()))


# --------------------------------------------------------------------------- load generators


def run_wrk(url: str, duration: int, connections: int, workdir: Path, name: str) -> tuple[float, str, str]:
    argv = pinned(LOAD_CPU, ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-H", f"Host: {HOST}", url])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    (workdir / f"{name}.wrk.txt").write_text(out)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise RuntimeError(f"wrk printed no Requests/sec:\n{out}")
    errors = []
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors.append(f"{m.group(1)} non-2xx")
    if m := re.search(r"Socket errors: (.*)", out):
        errors.append(f"socket errors: {m.group(1).strip()}")
    return float(match.group(1)), "; ".join(errors), shlex.join(argv)


def run_h2load(url: str, duration: int, workdir: Path, name: str) -> tuple[float, float, int, str]:
    log = workdir / f"{name}.h2load.tsv"
    log.unlink(missing_ok=True)
    # h2load sends ":authority" as Host over HTTP/1.1; a "host" header would be a second Host (400).
    argv = pinned(
        LOAD_CPU,
        [
            "h2load", "--h1", "-c", str(LATENCY_CLIENTS), "--rps", str(LATENCY_RPS_PER_CLIENT),
            "-D", str(duration), "--warm-up-time", "1", "-H", f":authority: {HOST}", f"--log-file={log}", url,
        ],
    )  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    (workdir / f"{name}.h2load.txt").write_text(out)
    latencies_us, errors = [], 0
    for line in log.read_text().splitlines():
        cols = line.split("\t")
        if len(cols) >= 3:
            if cols[1] == "200":
                latencies_us.append(int(cols[2]))
            else:
                errors += 1
    if len(latencies_us) < 100:
        raise RuntimeError(f"h2load logged {len(latencies_us)} successful requests:\n{out}")
    q = statistics.quantiles(latencies_us, n=100, method="inclusive")
    return q[49] / 1000, q[98] / 1000, errors, shlex.join(argv)


def measure(
    result: Result, url: str, proc: ChildProcess | None, args: argparse.Namespace, workdir: Path
) -> None:
    if proc is not None:
        result.rss_idle_kib = group_rss_kib(proc)
    # A short warm-up fills keep-alive pools (and, for the sidecar, warms the Python code paths).
    run_wrk(url, 1, args.connections, workdir, f"{result.name}.warmup")
    runs = [
        run_wrk(url, args.duration, args.connections, workdir, f"{result.name}.{n}")
        for n in range(args.repeat)
    ]
    result.rps = statistics.median(r[0] for r in runs)
    result.rps_runs = [r[0] for r in runs]
    result.wrk_errors = "; ".join(r[1] for r in runs if r[1])
    result.commands.append(runs[0][2])
    result.p50_ms, result.p99_ms, result.latency_errors, cmd = run_h2load(
        url, args.latency_duration, workdir, result.name
    )
    result.commands.append(cmd)
    if proc is not None:
        result.rss_after_kib = group_rss_kib(proc)


# --------------------------------------------------------------------------- report


def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "not installed"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def machine() -> list[tuple[str, str]]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    commit = tool_version(["git", "-C", str(BENCH_DIR.parent), "rev-parse", "--short", "HEAD"])
    return [
        ("CPUs", f"{os.cpu_count()} x {model}"),
        ("load average at the end (1/5/15 min)", " / ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("kernel", platform.release()),
        ("Python", platform.python_version()),
        ("HAProxy", tool_version(["haproxy", "-v"])),
        ("nginx", tool_version(["nginx", "-v"])),
        ("wrk", tool_version(["wrk", "--version"])),
        ("h2load", tool_version(["h2load", "--version"])),
        ("meshkeeper commit", commit),
    ]


def _one_line(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    return text.replace("|", "/")[:200]


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def table(results: list[Result], direct: Result) -> str:
    haproxy = next((r for r in results if r.name == "haproxy" and r.rps), None)
    rows = [
        "| target | req/s | vs HAProxy | p50 ms | p99 ms | p99 added ms | RSS idle MiB | RSS after MiB | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ratio = f"{r.rps / haproxy.rps:.2f}x" if (r.rps and haproxy) else "-"
        added = r.p99_ms - direct.p99_ms if (r.p99_ms is not None and direct.p99_ms is not None) else None
        if r is direct:
            added = None
        spread = "runs: " + ", ".join(f"{x / 1000:.1f}k" for x in r.rps_runs) if len(r.rps_runs) > 1 else ""
        failed = f"{r.latency_errors} failed at fixed rate" if r.latency_errors else ""
        notes = "; ".join(x for x in (r.note, spread, r.wrk_errors, failed) if x)
        rows.append(
            f"| {r.name} | {_f(r.rps, ',.0f')} | {ratio} | {_f(r.p50_ms, '.2f')} | {_f(r.p99_ms, '.2f')} "
            f"| {_f(added, '+.2f')} | {_mib(r.rss_idle_kib)} | {_mib(r.rss_after_kib)} | {notes} |"
        )
    return "\n".join(rows)


def report(results: list[Result], direct: Result, args: argparse.Namespace, argv: list[str]) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmark results",
        "",
        f"Recorded {now} by `{shlex.join(['.venv/bin/python', 'bench/run.py', *argv])}`"
        f" (`make bench BENCH_ARGS=...`; see bench/run.py).",
        "",
        f"Upstream: one nginx worker returning 13 bytes. Load generators and upstream pinned to CPU {LOAD_CPU},",
        f"the proxy under test alone on CPU {PROXY_CPU}. Throughput: wrk, 1 thread, {args.connections} keep-alive",
        f"connections, {args.duration} s (median of {args.repeat} run(s)). Latency: h2load --h1, {LATENCY_CLIENTS} connections x "
        f"{LATENCY_RPS_PER_CLIENT} req/s = {LATENCY_CLIENTS * LATENCY_RPS_PER_CLIENT} req/s for "
        f'{args.latency_duration} s; "p99 added" is the proxy\'s p99 minus the direct p99.',
        "RSS: VmRSS summed over the proxy's processes, before and after the load.",
        "",
        table(results, direct),
        "",
        "Machine:",
        "",
        *[f"- {k}: {v}" for k, v in machine()],
        "",
        "Commands (per target):",
        "",
        "```",
        *[c for r in results for c in r.commands],
        "```",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=int, default=10, help="seconds of wrk per target (default 10)")
    p.add_argument(
        "--latency-duration", type=int, default=15, help="seconds of fixed-rate h2load (default 15)"
    )
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument(
        "--repeat", type=int, default=1, help="wrk runs per target; req/s is their median (default 1)"
    )
    p.add_argument(
        "--only", default=",".join(PROXIES), help="comma-separated subset of: " + ", ".join(PROXIES)
    )
    p.add_argument("--output", type=Path, default=BENCH_DIR / "RESULTS.md")
    p.add_argument(
        "--workdir", type=Path, default=BENCH_DIR / "out", help="configs and logs (default bench/out)"
    )
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(args.only) - set(PROXIES))
    if unknown:
        p.error(f"--only: unknown {', '.join(unknown)} (choose from {', '.join(PROXIES)})")
    return args


def preflight() -> None:
    missing = [
        t for t in ("taskset", "wrk", "h2load", "nginx", "haproxy") if shutil.which(t, path=_path()) is None
    ]
    if missing:
        sys.exit(
            f"bench: missing {', '.join(missing)}; `make bench` installs them (nginx haproxy wrk nghttp2-client)"
        )
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench: needs 2 CPUs (load + upstream on CPU 0, the proxy on CPU 1)")


def _path() -> str:
    return os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ["PATH"] = _path()
    preflight()
    # Everything this script starts inherits CPU 0 unless pinned to the proxy CPU explicitly.
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    workdir = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)

    started: list[ChildProcess] = []
    sidecar_env: Sidecar | None = None
    sink: OtlpSink | None = None
    try:
        port = free_port()
        conf = render("nginx-upstream.conf", workdir, port=port)
        (workdir / "nginx-upstream-tmp").mkdir()
        upstream_url = f"http://127.0.0.1:{port}/"
        started.append(
            start_server(pinned(LOAD_CPU, ["nginx", "-c", str(conf)]), "upstream", workdir, upstream_url)
        )
        print(f"upstream nginx on {upstream_url} (CPU {LOAD_CPU}); logs in {workdir}", flush=True)

        direct = Result("direct", note="no proxy: wrk/h2load straight to the upstream")
        print("measuring direct ...", flush=True)
        measure(direct, upstream_url, None, args, workdir)
        results = [direct]

        for name in args.only:
            result = Result(name)
            results.append(result)
            print(f"measuring {name} ...", flush=True)
            proxy_port = free_port()
            proc: ChildProcess | None = None
            try:
                if name == "haproxy":
                    cfg = render("haproxy.cfg", workdir, port=proxy_port, upstream_port=port)
                    url = f"http://127.0.0.1:{proxy_port}/"
                    proc = start_server(
                        pinned(PROXY_CPU, ["haproxy", "-db", "-f", str(cfg)]), name, workdir, url
                    )
                elif name == "nginx":
                    cfg = render("nginx-proxy.conf", workdir, port=proxy_port, upstream_port=port)
                    (workdir / "nginx-proxy-tmp").mkdir(exist_ok=True)
                    url = f"http://127.0.0.1:{proxy_port}/"
                    proc = start_server(pinned(PROXY_CPU, ["nginx", "-c", str(cfg)]), name, workdir, url)
                else:
                    policy = RESILIENCE_POLICY if name == "sidecar-resilience" else None
                    own = workdir / name  # a ZooKeeper of its own: nothing left from another target
                    own.mkdir(exist_ok=True)
                    if "{otlp}" in SIDECAR_TARGETS[name] and sink is None:
                        sink = OtlpSink()
                    extra = [a.format(workdir=own, otlp=sink.endpoint if sink else "")
                             for a in SIDECAR_TARGETS[name]]
                    sidecar_env = Sidecar(own, port, policy, extra)
                    try:
                        proc, url = sidecar_env.start()
                    except (RuntimeError, TimeoutError, OSError) as exc:
                        result.note = f"skipped: the sidecar did not start ({_one_line(exc)})"
                        print(f"  {result.note}\n  logs: {workdir}", flush=True)
                        sidecar_env.stop()
                        sidecar_env = None
                        continue
                measure(result, url, proc, args, workdir)
                if "{otlp}" in SIDECAR_TARGETS.get(name, ()):
                    result.note = tracing_note(proc)
            except (RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
                result.note = f"failed: {_one_line(exc)}"
                print(f"  {result.note}\n  logs: {workdir}", flush=True)
            finally:
                if proc is not None:
                    proc.terminate(5)
                if sidecar_env is not None:
                    sidecar_env.stop()
                    sidecar_env = None

        text = report(results, direct, args, argv)
        print()
        print(table(results, direct))
        args.output.write_text(text)
        print(f"\nwritten to {args.output}")
        return 0
    finally:
        if sidecar_env is not None:
            sidecar_env.stop()
        if sink is not None:
            sink.stop()
        for proc in reversed(started):
            proc.terminate(5)


if __name__ == "__main__":
    sys.exit(main())
