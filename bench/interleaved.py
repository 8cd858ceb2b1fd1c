"""Interleaved comparison of sidecar variants: what tracing and access logs cost, paired round by round.

bench/run.py measures one target after another, so a VM whose speed drifts over the minutes of a
run (this one swings by ±20% between 10-second runs) can make two identical sidecars differ by
more than what is being measured. Here every variant runs at once beside the same upstream, each
its own sidecar process on the proxy CPU (the idle ones cost nothing), and the load visits them in
turn, round after round, the order rotating each round. Each round gives a ratio to the baseline
taken minutes apart at most; the median of those ratios is the figure. The sidecar's CPU time
per request is reported too: it does not move when a neighbour steals the CPU, so it is the
steadier measure of what a feature costs.

    .venv/bin/python bench/interleaved.py [--rounds 8] [--duration 5] [--variants notrace,trace-1pct,...]

Variants (flags of ``meshkeeper sidecar``; the first is the baseline):

* ``notrace``: no tracing, no access log (bench/run.py's "sidecar");
* ``trace-0pct``: tracing on with ratio 0 (ids made and propagated, nothing sampled);
* ``trace-1pct``: tracing on, 1% of new traces sampled, exported to an OTLP sink;
* ``trace-100pct``: every request sampled and exported;
* ``access-log``: the JSON access log written to a file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402 - bench/run.py, beside this file

VARIANTS: dict[str, list[str]] = {
    "notrace": ["--access-log", "off"],
    "trace-0pct": ["--access-log", "off", "--otlp-endpoint", "{otlp}", "--trace-sample-ratio", "0"],
    "trace-1pct": ["--access-log", "off", "--otlp-endpoint", "{otlp}", "--trace-sample-ratio", "0.01"],
    "trace-100pct": ["--access-log", "off", "--otlp-endpoint", "{otlp}", "--trace-sample-ratio", "1"],
    "access-log": ["--access-log", "{workdir}/access.log"],
}


def cpu_seconds(proc) -> float:
    """User + system CPU time of the sidecar's processes so far (/proc/<pid>/stat). Unlike req/s,
    CPU time per request does not move when a noisy neighbour steals the CPU."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in proc.group_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--duration", type=int, default=5, help="seconds of wrk per variant per round")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--variants", default="notrace,trace-1pct,trace-100pct,access-log")
    p.add_argument("--workdir", type=Path, default=bench.BENCH_DIR / "out-interleaved")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or len(args.variants) < 2 or args.rounds < 1:
        p.error(f"--variants: two or more of {', '.join(VARIANTS)}; --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ["PATH"] = bench._path()
    bench.preflight()
    os.sched_setaffinity(0, {int(bench.LOAD_CPU)})
    workdir = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    sink = bench.OtlpSink()
    upstream = env = None
    try:
        port = bench.free_port()
        conf = bench.render("nginx-upstream.conf", workdir, port=port)
        (workdir / "nginx-upstream-tmp").mkdir()
        upstream = bench.start_server(bench.pinned(bench.LOAD_CPU, ["nginx", "-c", str(conf)]), "upstream",
                                      workdir, f"http://127.0.0.1:{port}/")
        env = bench.Sidecar(workdir, port)
        env.mesh.start_registry()
        env._register_upstream()
        urls: dict[str, str] = {}
        procs = {}
        for name in args.variants:
            extra = [a.format(workdir=workdir, otlp=sink.endpoint) for a in VARIANTS[name]]
            proc, url = env.add(extra, name=f"sidecar-{name}")
            env.procs.append(proc)
            procs[name], urls[name] = proc, url
            bench.run_wrk(url, 1, args.connections, workdir, f"{name}.warmup")
        rps: dict[str, list[float]] = {name: [] for name in args.variants}
        cpu_us: dict[str, list[float]] = {name: [] for name in args.variants}
        for r in range(args.rounds):
            k = r % len(args.variants)
            order = args.variants[k:] + args.variants[:k]
            for name in order:
                before = cpu_seconds(procs[name])
                got, errors, _ = bench.run_wrk(urls[name], args.duration, args.connections, workdir, f"{name}.{r}")
                used = cpu_seconds(procs[name]) - before
                rps[name].append(got)
                cpu_us[name].append(used / (got * args.duration) * 1e6)
                print(f"round {r + 1}: {name} {got:,.0f} req/s, {cpu_us[name][-1]:.1f} CPU us/request {errors}",
                      flush=True)
        base = args.variants[0]
        rows = [f"| variant | median req/s | median ratio to {base} | ratio range | CPU us/request (median) "
                f"| CPU vs {base} | notes |",
                "|---|---:|---:|---:|---:|---:|---|"]
        base_cpu = statistics.median(cpu_us[base])
        for name in args.variants:
            ratios = [a / b for a, b in zip(rps[name], rps[base], strict=True)]
            cpu = statistics.median(cpu_us[name])
            note = bench.tracing_note(procs[name]) if "{otlp}" in VARIANTS[name] else ""
            rows.append(f"| {name} | {statistics.median(rps[name]):,.0f} | {statistics.median(ratios):.3f} "
                        f"| {min(ratios):.2f}-{max(ratios):.2f} | {cpu:.1f} | {cpu / base_cpu - 1:+.1%} | {note} |")
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        cmd = shlex.join([".venv/bin/python", "bench/interleaved.py", *argv])
        print(f"\n{now}, `{cmd}`: wrk -t1 -c{args.connections} -d{args.duration}s per variant per round, "
              f"{args.rounds} rounds\n")
        print("\n".join(rows))
        return 0
    finally:
        if env is not None:
            env.stop()
        if upstream is not None:
            upstream.terminate(5)
        sink.stop()


if __name__ == "__main__":
    sys.exit(main())
