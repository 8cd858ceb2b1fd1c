"""HTTP/1.1 req/s of one sidecar worker at two (or more) git revisions, paired with HAProxy and nginx.

For "before and after" questions (issue 14: the request path redesigned, no regression beyond
noise), a sequence of bench/run.py runs is not enough on this VM: its speed drifts by 1.5x over an
hour. Here every target runs at once beside one upstream, and wrk visits them in turn, round after
round, the order rotating each round; each round gives ratios between targets taken seconds apart,
and the medians and ranges of those ratios are the figures. Running the same revision on both
sides (an A/A run) gives the noise that a before/after difference must exceed.

A sidecar target is ``LABEL=REV[:FLAGS]``: REV is ``.`` for this checkout's working tree as it is
(uncommitted edits included) or any git revision, checked out with ``git worktree add --detach``
under /tmp and removed at the end; its sidecar runs with PYTHONPATH and cwd set to that tree, in
this venv. FLAGS are extra ``meshkeeper sidecar`` flags, split like a shell would. Nothing else is
added: a target without ``--access-log`` runs with that revision's default. The sidecar's stdout
(the access log when it is on ``-``) goes to a file, as a container runtime would collect it, and
nothing on the load CPU reads it. ``haproxy`` and ``nginx`` are bench/haproxy.cfg and
bench/nginx-proxy.conf. ZooKeeper, the control plane and nginx as the upstream run on the load
CPU, every proxy on the proxy CPU (bench/run.py's pinning). The control plane is the ``meshkeeper``
this interpreter imports (printed at the start): in a checkout where others have uncommitted edits,
run the script with ``PYTHONPATH=<a worktree of a known revision>`` so that none of them is measured.

    # before/after the redesign (the same flags on both sides)
    .venv/bin/python bench/h1_paired.py --target haproxy \\
        --target 'before=b9bd732:--access-log off' --target 'after=.:--access-log off'
    # the default configuration against HAProxy and nginx
    .venv/bin/python bench/h1_paired.py --target haproxy --target nginx \\
        --target 'default=.' --target 'log-off=.:--access-log off'

Per target: median req/s and its range over the rounds, the median of the per-round ratio to
HAProxy and to the first sidecar target (with their ranges), and the CPU time per request of the
proxy's processes (/proc utime + stime over the wrk run), which moves less than req/s when a
neighbour takes the CPU. Raw per-round figures go to <workdir>/rounds.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402 - bench/run.py, beside this file

from meshkeeper.demo.process import ChildProcess, http_get, meshkeeper_argv, parse_ready_line, wait_until  # noqa: E402

REPO = bench.BENCH_DIR.parent


@dataclass
class Target:
    label: str
    rev: str = ""  # "" for haproxy / nginx
    flags: list[str] = field(default_factory=list)
    tree: Path | None = None  # the source tree a sidecar runs from
    commit: str = ""
    proc: ChildProcess | None = None
    url: str = ""
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def is_sidecar(self) -> bool:
        return bool(self.rev)


def parse_target(spec: str) -> Target:
    if spec in ("haproxy", "nginx"):
        return Target(spec)
    label, sep, rest = spec.partition("=")
    if not sep or not label or not rest:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected haproxy, nginx or LABEL=REV[:FLAGS]")
    rev, _, flags = rest.partition(":")
    return Target(label, rev=rev, flags=shlex.split(flags))


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def checkout(target: Target, trees: dict[str, Path], created: list[Path]) -> None:
    """The tree the target's sidecar runs from: this checkout for ".", else a worktree per commit."""
    if target.rev == ".":
        target.tree, target.commit = REPO, git("rev-parse", "--short", "HEAD") + " + working tree"
        return
    commit = git("rev-parse", "--short", f"{target.rev}^{{commit}}")
    target.commit = commit
    if commit not in trees:
        path = Path(f"/tmp/h1paired-{commit}")
        if path.exists():  # left by an interrupted run
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)
            shutil.rmtree(path, ignore_errors=True)
        git("worktree", "add", "--detach", str(path), commit)
        created.append(path)
        trees[commit] = path
    target.tree = trees[commit]


def sidecar_env(tree: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(tree)}


def check_imports(tree: Path) -> None:
    """The sidecar must import from its own tree, not from the venv's editable install of this one."""
    code = "import sidecar, meshkeeper; print(sidecar.__file__); print(meshkeeper.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tree, env={**os.environ, **sidecar_env(tree)}).stdout.split()
    for path in out:
        if not Path(path).resolve().is_relative_to(tree.resolve()):
            raise RuntimeError(f"a sidecar run from {tree} would import {path}")


def start_sidecar(env: bench.Sidecar, target: Target, workdir: Path) -> None:
    cp = env.mesh.controlplane
    argv = bench.pinned(bench.PROXY_CPU, meshkeeper_argv(
        "sidecar", "--service", "bench", "--app-port", str(env.upstream_port),
        "--cp", f"127.0.0.1:{cp.port('xds_port')}", "--zk", env.mesh.zk_hosts,
        "--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0", "--workers", "1", *target.flags,
    ))  # fmt: skip
    assert target.tree is not None
    # stdout to a file (pipe_stdout=False): the ready line is read back from it below.
    proc = ChildProcess(argv, name=f"sidecar-{target.label}", log_dir=workdir, env=sidecar_env(target.tree),
                        cwd=target.tree)
    proc.stdout_path.unlink(missing_ok=True)
    proc.spawn()
    env.procs.append(proc)
    target.proc = proc
    info: dict[str, str] = {}

    def ready() -> bool:
        if not proc.running():
            raise RuntimeError(f"sidecar {target.label} exited: {proc.stderr_tail(5)}")
        try:
            lines = proc.stdout_path.read_text(errors="replace").splitlines()
        except OSError:
            return False
        for line in lines:
            if (found := parse_ready_line(line, "sidecar")) is not None:
                info.update(found)
                return True
        return False

    wait_until(ready, 60, 0.1, f"sidecar {target.label}'s ready line")
    admin = f"http://127.0.0.1:{info['admin_port']}"
    wait_until(lambda: http_get(f"{admin}/ready", timeout=1)[0] == 200, 30, 0.1, f"{admin}/ready")
    target.url = f"http://127.0.0.1:{info['outbound_port']}/"
    wait_until(lambda: http_get(target.url, {"Host": bench.HOST}, timeout=1)[0] == 200, 30, 0.1,
               f"sidecar {target.label} routes {bench.HOST}")


def start_reference(target: Target, upstream_port: int, workdir: Path) -> None:
    port = bench.free_port()
    target.url = f"http://127.0.0.1:{port}/"
    if target.label == "haproxy":
        cfg = bench.render("haproxy.cfg", workdir, port=port, upstream_port=upstream_port)
        argv = ["haproxy", "-db", "-f", str(cfg)]
    else:
        cfg = bench.render("nginx-proxy.conf", workdir, port=port, upstream_port=upstream_port)
        (workdir / "nginx-proxy-tmp").mkdir(exist_ok=True)
        argv = ["nginx", "-c", str(cfg)]
    target.proc = bench.start_server(bench.pinned(bench.PROXY_CPU, argv), target.label, workdir, target.url)


def cpu_seconds(proc: ChildProcess) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in proc.group_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _range(values: list[float], fmt: str = ".2f") -> str:
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}"


def table(targets: list[Target]) -> str:
    haproxy = next((t for t in targets if t.label == "haproxy"), None)
    base = next((t for t in targets if t.is_sidecar), None)
    rows = ["| target | revision | flags | median req/s | range | vs HAProxy (median of rounds) | range "
            f"| vs {base.label if base else '-'} (median of rounds) | range | CPU µs/request (median) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in targets:
        vs_h = [a / b for a, b in zip(t.rps, haproxy.rps, strict=True)] if haproxy else []
        vs_b = [a / b for a, b in zip(t.rps, base.rps, strict=True)] if base else []
        rows.append(
            f"| {t.label} | {t.commit or '-'} | {shlex.join(t.flags) or '-'} | {statistics.median(t.rps):,.0f} "
            f"| {_range([x / 1000 for x in t.rps], '.1f')}k "
            f"| {f'{statistics.median(vs_h):.3f}' if vs_h else '-'} | {_range(vs_h) if vs_h else '-'} "
            f"| {f'{statistics.median(vs_b):.3f}' if vs_b else '-'} | {_range(vs_b) if vs_b else '-'} "
            f"| {statistics.median(t.cpu_us):.1f} |")
    return "\n".join(rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", dest="targets", action="append", type=parse_target, default=[],
                   help="haproxy, nginx or LABEL=REV[:FLAGS] (repeat; the first sidecar is the baseline)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--duration", type=int, default=5, help="seconds of wrk per target per round (default 5)")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--workdir", type=Path, default=bench.BENCH_DIR / "out" / "h1_paired")
    args = p.parse_args(argv)
    labels = [t.label for t in args.targets]
    if len(labels) < 2 or len(set(labels)) != len(labels) or args.rounds < 1:
        p.error("two or more --target with distinct labels; --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    targets: list[Target] = args.targets
    os.environ["PATH"] = bench._path()
    bench.preflight()
    os.sched_setaffinity(0, {int(bench.LOAD_CPU)})  # everything started here inherits the load CPU
    workdir = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    trees: dict[str, Path] = {}
    created: list[Path] = []
    upstream = env = None
    started = time.monotonic()
    load_before = os.getloadavg()
    import meshkeeper

    print(f"control plane from {Path(meshkeeper.__file__).parent.parent}", flush=True)
    try:
        for t in targets:
            if t.is_sidecar:
                checkout(t, trees, created)
                check_imports(t.tree)
        port = bench.free_port()
        conf = bench.render("nginx-upstream.conf", workdir, port=port)
        (workdir / "nginx-upstream-tmp").mkdir()
        upstream = bench.start_server(bench.pinned(bench.LOAD_CPU, ["nginx", "-c", str(conf)]), "upstream",
                                      workdir, f"http://127.0.0.1:{port}/")
        env = bench.Sidecar(workdir, port)
        env.mesh.start_registry()
        env._register_upstream()
        for t in targets:
            if t.is_sidecar:
                start_sidecar(env, t, workdir)
            else:
                start_reference(t, port, workdir)
                env.procs.append(t.proc)
            bench.run_wrk(t.url, 1, args.connections, workdir, f"{t.label}.warmup")
            print(f"{t.label}: {t.url} ({t.commit or t.label} {shlex.join(t.flags)})", flush=True)
        loads = []
        for r in range(args.rounds):
            k = r % len(targets)
            for t in targets[k:] + targets[:k]:
                before = cpu_seconds(t.proc)
                got, errors, _ = bench.run_wrk(t.url, args.duration, args.connections, workdir, f"{t.label}.{r}")
                t.cpu_us.append((cpu_seconds(t.proc) - before) / (got * args.duration) * 1e6)
                t.rps.append(got)
                if errors:
                    t.errors.append(f"round {r + 1}: {errors}")
                print(f"round {r + 1}: {t.label} {got:,.0f} req/s, {t.cpu_us[-1]:.1f} CPU µs/request {errors}",
                      flush=True)
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}: load average {loads[-1]:.2f}", flush=True)
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        cmd = shlex.join([".venv/bin/python", "bench/h1_paired.py", *argv])
        print(f"\n{now}, `{cmd}`: wrk -t1 -c{args.connections} -d{args.duration}s per target per round, "
              f"{args.rounds} rounds, {time.monotonic() - started:.0f} s; load average (1 min) before "
              f"{load_before[0]:.2f}, per round {_range(loads)}, after {os.getloadavg()[0]:.2f}\n")
        print(table(targets))
        for t in targets:
            if t.errors:
                print(f"{t.label}: {'; '.join(t.errors)}")
        (workdir / "rounds.json").write_text(json.dumps({
            "command": cmd, "time": now, "loads": loads,
            "targets": [{"label": t.label, "rev": t.rev, "commit": t.commit, "flags": t.flags, "rps": t.rps,
                         "cpu_us": t.cpu_us, "errors": t.errors} for t in targets]}, indent=1))
        return 0
    finally:
        if env is not None:
            env.stop()
        if upstream is not None:
            upstream.terminate(5)
        for path in created:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)


if __name__ == "__main__":
    sys.exit(main())
