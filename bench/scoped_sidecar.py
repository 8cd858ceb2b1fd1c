"""Scoped sidecar (issue 15 acceptance): "With scoping on, a sidecar that calls 3 services holds the
same memory with S = 100 and S = 5,000 (within 5 MiB), and a first call to a service it had never
called succeeds".

What it does
------------
For each S of ``--services`` (default 100 and 5000):

1. Starts a throwaway ZooKeeper and writes S services of two instances each, and one control plane,
   waiting until it has loaded them: bench/scale.py's ``start_zookeeper``, ``populate``,
   ``start_controlplane`` and ``wait_cp_loaded``, imported. The services are scale.py's
   ``scale-NNNNN``; their instances are scale.py's (10.x.y.z:8080, where nothing answers) except
   those of service ``--target`` (default 4000: ``scale-04000``), which point at two real local
   HTTP apps (tests.harness.apps.SplitWritesApp, in this process).
2. Starts ONE real sidecar, as tests/harness/processes.py ``ProcessGroup.sidecar`` does
   (``meshkeeper sidecar --service probe --app-port <app> --cp ... --zk ... --outbound-port 0
   --inbound-port 0 --admin-port 0 --status-port 0``, Delta xDS by default), scoped with
   ``--egress`` naming services 1, 2 and 3 (``--egress-indices``), and waits for its admin
   ``/ready``. Then it polls the RSS of the sidecar's processes (VmRSS summed over its process
   group) every 0.5 s until it has not fallen by more than 1% over 3 s (deadline 30 s; bench/scale.py
   ``settle_rss``), and reads what it holds: the number of clusters in admin ``/clusters`` and the
   size of admin ``/config_dump`` in bytes.
3. With the scoped sidecar at the largest S holding the target service (default S=5000): a first
   HTTP/1.1 GET through its outbound listener (127.0.0.1:<outbound port>, ``Host: scale-04000``),
   a service it had never been sent, which the sidecar holds while it subscribes to it on demand
   (Delta), then a second one; status, latency and the sidecar's on-demand counters of each.
4. The same sidecar unscoped (no ``--egress``: the whole mesh), for contrast.

Prints a Markdown table (S, scoped or not, sidecar RSS, clusters held, config_dump size) with the
commands, writes the raw figures as JSON to ``--out`` (default
bench/out/scoped_sidecar/<timestamp>.json, logs in <timestamp>.logs/), and stops every process it
started, on failure and Ctrl-C too.

How to run
----------
::

    .venv/bin/python bench/scoped_sidecar.py
    .venv/bin/python bench/scoped_sidecar.py --services 100,1000,5000 --target 50
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import http.client
import json
import os
import platform
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import scale  # noqa: E402 (bench/scale.py: ZooKeeper, registry, control plane, settle_rss)

from meshkeeper.demo.process import http_get, rss_kib  # noqa: E402
from meshkeeper.registry import InstanceRecord  # noqa: E402
from tests.harness.apps import SplitWritesApp  # noqa: E402
from tests.harness.processes import ProcessGroup  # noqa: E402

SERVICE = "probe"  # the sidecar's own service
ON_DEMAND_STATS = ("held", "routed", "missing")


def log(msg: str) -> None:
    print(f"[scoped {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sidecar_rss(proc: Any) -> int:
    """VmRSS in KiB summed over the sidecar's processes (its process group: the primary and any workers)."""
    return sum(rss_kib(pid) for pid in proc.group_pids())


def admin_json(proc: Any, page: str) -> tuple[Any, int]:
    status, _, body = http_get(f"{proc.admin_url}{page}", timeout=30)
    if status != 200:
        raise scale.HarnessError(f"{proc.name}: GET {page} answered {status}")
    return json.loads(body), len(body)


def on_demand_stats(proc: Any) -> dict[str, float]:
    """The outbound listener's on-demand counters from the sidecar's /stats/prometheus."""
    _, _, body = http_get(f"{proc.admin_url}/stats/prometheus", timeout=10)
    out = {}
    for line in body.decode().splitlines():
        for what in ON_DEMAND_STATS:
            if line.startswith(f'meshkeeper_listener_rq_on_demand_{what}_total{{listener="outbound"}}'):
                out[what] = float(line.rsplit(" ", 1)[1])
    return out


def request(port: int, host: str, timeout: float = 15.0) -> dict:
    """One GET / on a new connection to 127.0.0.1:port with ``Host: host``: status, latency, flags, body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t = time.perf_counter()
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        body = resp.read()
        ms = (time.perf_counter() - t) * 1000
        return {"status": resp.status, "latency_ms": round(ms, 1), "flags": resp.getheader("x-meshkeeper-flags"),
                "body": body[:200].decode(errors="replace")}
    except OSError as exc:
        return {"status": None, "latency_ms": round((time.perf_counter() - t) * 1000, 1), "error": repr(exc)}
    finally:
        conn.close()


def measure_sidecar(group: ProcessGroup, args: argparse.Namespace, s: int, scoped: bool, app_port: int,
                    cp_target: str, zk_hosts: str) -> tuple[dict, Any]:
    flags = {"egress": ",".join(scale.service_name(i) for i in args.egress)} if scoped else {}
    t = time.monotonic()
    proc = group.sidecar(SERVICE, app_port, cp=cp_target, zk=zk_hosts, wait_ready=False,
                         name=f"sidecar-s{s}-{'scoped' if scoped else 'unscoped'}", **flags)
    proc.wait_ready(args.ready_timeout)
    ready_s = time.monotonic() - t
    rss_ready = sidecar_rss(proc)
    settle = scale.settle_rss(lambda: sidecar_rss(proc))
    clusters, _ = admin_json(proc, "/clusters")
    _, dump_bytes = admin_json(proc, "/config_dump")
    names = [c["name"] for c in clusters["clusters"]]
    rec = {
        "services": s, "scoped": scoped, "egress": flags.get("egress", "*"), "pid": proc.pid,
        "command": shlex.join(proc.argv), "ready_s": round(ready_s, 2), "pids": proc.group_pids(),
        "rss_kib_ready": rss_ready, "rss_kib": settle["rss_kib"], "rss_settled": settle["settled"],
        "rss_settled_after_s": settle["after_s"], "rss_samples": settle["samples"], "peak_rss_kib": sum(scale._rss(p, "VmHWM") for p in proc.group_pids()),
        "clusters": len(names), "outbound_clusters": sum(1 for n in names if n.startswith("outbound|")),
        "config_dump_bytes": dump_bytes,
    }
    log(f"S={s} {'scoped' if scoped else 'unscoped'}: ready in {ready_s:.1f}s; RSS {settle['rss_kib'] / 1024:.1f} MiB "
        f"(settled{'' if settle['settled'] else ' NOT'} after {settle['after_s']:.1f}s; {rss_ready / 1024:.1f} at ready), "
        f"{len(names)} clusters, config_dump {dump_bytes / 1024:.1f} KiB")
    return rec, proc


def on_demand(proc: Any, target: str) -> dict:
    """A first request for a service the sidecar was never sent, then a second one."""
    port = proc.port("outbound_port")
    before_clusters = {c["name"] for c in admin_json(proc, "/clusters")[0]["clusters"]}
    if any(target in n for n in before_clusters):
        raise scale.HarnessError(f"the scoped sidecar already holds {target}: {sorted(before_clusters)}")
    stats0 = on_demand_stats(proc)
    first = request(port, target)
    stats1 = on_demand_stats(proc)
    second = request(port, target)
    stats2 = on_demand_stats(proc)
    after_clusters = {c["name"] for c in admin_json(proc, "/clusters")[0]["clusters"]}
    out = {
        "host": target, "first": first, "second": second,
        "first_on_demand": {k: stats1.get(k, 0) - stats0.get(k, 0) for k in ON_DEMAND_STATS},
        "second_on_demand": {k: stats2.get(k, 0) - stats1.get(k, 0) for k in ON_DEMAND_STATS},
        "clusters_before": len(before_clusters), "clusters_after": len(after_clusters),
        "added": sorted(after_clusters - before_clusters),
        "rss_kib_after": sidecar_rss(proc), "config_dump_bytes_after": admin_json(proc, "/config_dump")[1],
    }
    log(f"first request Host: {target}: {first['status']} in {first['latency_ms']:.1f} ms (on demand "
        f"{out['first_on_demand']}); second: {second['status']} in {second['latency_ms']:.1f} ms; "
        f"clusters {len(before_clusters)} -> {len(after_clusters)} (+{', '.join(out['added'])})")
    return out


def run_s(args: argparse.Namespace, s: int, log_dir: Path, app: SplitWritesApp, targets: list[SplitWritesApp],
          report: dict, cleanup: list) -> None:
    """One S: ZooKeeper, registry, control plane, then the scoped and the unscoped sidecar in turn."""
    from kazoo.client import KazooClient

    mine = len(cleanup)  # what this S starts is stopped at its end (and by main's stop_all on failure)
    s_dir = log_dir / f"s{s}"
    s_dir.mkdir(parents=True, exist_ok=True)

    def record(i: int, j: int) -> InstanceRecord:
        if i != args.target:
            return scale.instance(i, j)
        port = targets[j].port  # the target service's instances are real HTTP apps
        return InstanceRecord(address="127.0.0.1", port=port, labels={"version": "v1", "zone": "a"},
                              protocol="http", app_port=port)

    zk_server = scale.start_zookeeper(s_dir)
    cleanup.append(zk_server.close)
    zk = KazooClient(hosts=zk_server.hosts, timeout=30.0)
    zk.start(30)
    cleanup.append(lambda: (zk.stop(), zk.close()))
    t = time.monotonic()
    scale.populate(zk, s, record=record)
    log(f"ZooKeeper {zk_server.hosts}: {s} services, {2 * s} instances written in {time.monotonic() - t:.1f}s")
    cp_args = argparse.Namespace(cp_args=args.cp_args, cp_source="", pin=False, services=s,
                                 sync_timeout=args.sync_timeout, quiet=1.0)
    cp = scale.start_controlplane(cp_args, zk_server.hosts, s_dir)
    cleanup.append(lambda: cp.terminate(10))
    scale.wait_cp_loaded(cp_args, zk, cp.port("http_port"), cp)
    cp_target = f"127.0.0.1:{cp.port('xds_port')}"
    log(f"control plane pid {cp.pid} (xDS {cp_target}) loaded {s} services; RSS {scale._rss(cp.pid) / 1024:.0f} MiB")
    report["controlplanes"].append({"services": s, "command": shlex.join(cp.argv), "rss_kib": scale._rss(cp.pid)})

    for scoped in (True, False):
        group = ProcessGroup(s_dir)
        cleanup.append(group.close)
        try:
            rec, proc = measure_sidecar(group, args, s, scoped, app.port, cp_target, zk_server.hosts)
            if scoped and s > args.target and s == max(x for x in args.services if x > args.target):
                rec["on_demand"] = on_demand(proc, scale.service_name(args.target))
            report["runs"].append(rec)
        finally:
            group.close()
            cleanup.remove(group.close)
    while len(cleanup) > mine:  # control plane, kazoo, ZooKeeper of this S
        with contextlib.suppress(Exception):
            cleanup.pop()()


def markdown(report: dict) -> str:
    lines = [f"$ {report['command']}", ""]
    lines += [f"control plane (S={c['services']}): `{c['command']}`" for c in report["controlplanes"]]
    cmds = {}
    for r in report["runs"]:
        cmds.setdefault(r["scoped"], r["command"])
    lines += [f"sidecar ({'scoped' if k else 'unscoped'}, ports as it ran): `{v}`" for k, v in cmds.items()]
    lines += [
        "",
        f"One real sidecar (`meshkeeper sidecar`, 1 worker, Delta xDS) on a mesh of S services of 2 instances; "
        f"scoped: `--egress {report['egress']}`; RSS = VmRSS summed over its processes once ready and settled "
        "(not falling by more than 1% over 3 s); git "
        f"{report['git']['commit']}{' (uncommitted changes to controlplane/ or meshkeeper/)' if report['git']['dirty'] else ''}",
        "",
        "| S | scoped | sidecar RSS MiB | clusters held (outbound) | config_dump KiB | ready s | RSS at ready MiB |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['services']} | {'yes (3 services)' if r['scoped'] else 'no'} | {r['rss_kib'] / 1024:.1f}"
            f"{'' if r['rss_settled'] else ' (not settled)'} | {r['clusters']} ({r['outbound_clusters']}) | "
            f"{r['config_dump_bytes'] / 1024:.1f} | {r['ready_s']:.1f} | {r['rss_kib_ready'] / 1024:.1f} |")
    scoped = [r for r in report["runs"] if r["scoped"]]
    if len(scoped) >= 2:
        lo, hi = min(scoped, key=lambda r: r["services"]), max(scoped, key=lambda r: r["services"])
        diff = (hi["rss_kib"] - lo["rss_kib"]) / 1024
        lines += ["", f"- Scoped sidecar RSS, S={hi['services']} minus S={lo['services']}: {diff:+.1f} MiB "
                      f"({'within' if abs(diff) <= 5 else 'NOT within'} 5 MiB)."]
    for r in report["runs"]:
        od = r.get("on_demand")
        if od:
            f, s2 = od["first"], od["second"]
            lines.append(
                f"- On demand (scoped sidecar, S={r['services']}): first GET with `Host: {od['host']}` (never sent to "
                f"it) -> {f['status']}{' ' + f['flags'] if f.get('flags') else ''} in {f['latency_ms']:.1f} ms "
                f"(held {od['first_on_demand']['held']:.0f}, routed {od['first_on_demand']['routed']:.0f}; body "
                f"{f.get('body', '')!r} from the app behind it); second -> "
                f"{s2['status']} in {s2['latency_ms']:.1f} ms (held {od['second_on_demand']['held']:.0f}); "
                f"clusters {od['clusters_before']} -> {od['clusters_after']} (+{', '.join(od['added'])}), RSS after "
                f"{od['rss_kib_after'] / 1024:.1f} MiB, config_dump {od['config_dump_bytes_after'] / 1024:.1f} KiB.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", default="100,5000", help="values of S, comma-separated (default %(default)s)")
    p.add_argument("--egress-indices", default="1,2,3",
                   help="indices of the services the scoped sidecar declares (default %(default)s)")
    p.add_argument("--target", type=int, default=4000,
                   help="index of the service called on demand, backed by real apps (default %(default)s)")
    p.add_argument("--cp-args", default="", help="extra control plane flags, one shell-quoted string")
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds for a sidecar's /ready")
    p.add_argument("--sync-timeout", type=float, default=600.0, help="seconds for the control plane to load S")
    p.add_argument("--out", default="", help="JSON of raw figures (default bench/out/scoped_sidecar/<timestamp>.json)")
    args = p.parse_args(argv)
    try:
        args.services = [int(x) for x in args.services.split(",") if x.strip()]
        args.egress = [int(x) for x in args.egress_indices.split(",") if x.strip()]
    except ValueError:
        p.error("--services and --egress-indices take comma-separated integers")
    if not args.services or min(args.services) < 1 or max(args.services) > 60000:
        p.error("--services: values 1..60000")
    if any(i < 0 or i >= min(args.services) for i in args.egress) or args.target in args.egress:
        p.error("--egress-indices: services that exist at every S, not the --target")
    if args.target < 0:
        p.error("--target must be >= 0")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "bench/out/scoped_sidecar" / f"{stamp}.json"
    log_dir = out.with_suffix(".logs")
    log_dir.mkdir(parents=True, exist_ok=True)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    report: dict[str, Any] = {
        "command": shlex.join([os.path.relpath(sys.executable, ROOT), os.path.relpath(__file__, ROOT),
                               *(argv if argv is not None else sys.argv[1:])]),
        "config": {"services": args.services, "egress_indices": args.egress, "target": args.target,
                   "cp_args": args.cp_args},
        "egress": ",".join(scale.service_name(i) for i in args.egress),
        "started": datetime.datetime.now().isoformat(timespec="seconds"), "git": scale.git_state(),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "controlplanes": [], "runs": [],
    }
    cleanup: list = []  # stop functions, in start order

    def stop_all() -> None:
        while cleanup:
            fn = cleanup.pop()
            with contextlib.suppress(Exception):
                fn()

    atexit.register(stop_all)
    try:
        app = SplitWritesApp().start()  # the sidecar's own app (--app-port; /health answers 200)
        cleanup.append(app.stop)
        targets = [SplitWritesApp().start() for _ in range(2)]  # the target service's two instances
        cleanup.extend(t.stop for t in targets)
        for s in args.services:
            run_s(args, s, log_dir, app, targets, report, cleanup)
    except (scale.HarnessError, TimeoutError, AssertionError) as exc:
        log(f"FAILED: {exc}")
        report["error"] = str(exc)
        scale._write(out, report)
        return 2
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        report["error"] = "interrupted"
        scale._write(out, report)
        return 130
    except Exception as exc:
        report["error"] = repr(exc)
        scale._write(out, report)
        raise
    finally:
        stop_all()
    scale._write(out, report)
    print(markdown(report))
    print(f"\nraw figures: {os.path.relpath(out, Path.cwd())}; logs: {os.path.relpath(log_dir, Path.cwd())}")
    ods = [r["on_demand"] for r in report["runs"] if "on_demand" in r]
    return 0 if all(od["first"]["status"] == 200 and od["second"]["status"] == 200 for od in ods) else 1


if __name__ == "__main__":
    sys.exit(main())
