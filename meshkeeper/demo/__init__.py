"""``meshkeeper demo``: a local mesh with traffic, to watch weighted balancing happen.

It starts a ZooKeeper in a temp directory, a control plane, and two services, each instance
with its own sidecar:

* ``frontend``: one app that calls ``http://catalog/`` through its sidecar (``HTTP_PROXY``);
* ``catalog``: three apps, versions v1, v1, v2 with weights 1, 2, 7.

With ``--zk-ensemble N`` ZooKeeper is an ensemble of N servers on this machine (``make demo
ZK_ENSEMBLE=3``): the table then says which server leads, and killing any one of them (its pid is
printed) shows the mesh serving on.

Then it sends ``--rps`` requests per second to the frontend and prints, every second, how many
requests each catalog instance answered next to the share its weight asks for, and where the
admin endpoints are. Ctrl-C or SIGTERM (or the end of ``--duration``) stops everything: sidecars,
apps, control plane, ZooKeeper, in that order; the temp directory is removed.

The pieces are reusable: :mod:`meshkeeper.demo.mesh` (a local mesh), :mod:`.app` (the demo app),
:mod:`.zookeeper` (a throwaway ZooKeeper), :mod:`.ensemble` (several, as one ensemble),
:mod:`.process` (child processes), :mod:`.traffic`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections import Counter

from meshkeeper.cliargs import ArgumentParser

CATALOG = (("v1", 1), ("v1", 2), ("v2", 7))
DEFAULT_RPS = 50.0
MAX_ENSEMBLE = 7  # servers of a demo ensemble: each is a JVM on this machine


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(  # a mistake is one line and exit 2 (meshkeeper.cliargs), not a usage dump
        prog="meshkeeper demo", description="Run a local mesh with demo services and traffic."
    )
    p.add_argument(
        "--duration", type=float, default=0, help="stop after this many seconds (default: until Ctrl-C)"
    )
    p.add_argument(
        "--rps",
        type=float,
        default=DEFAULT_RPS,
        help=f"requests per second to the frontend ({DEFAULT_RPS:g})",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, ZooKeeper data)")
    p.add_argument("--zk-ensemble", type=int, default=1, metavar="N",
                   help="run ZooKeeper as an ensemble of N servers on 127.0.0.1 (e.g. 3); kill one and the "
                        "mesh keeps serving (default 1: one standalone server)")
    p.add_argument("--otlp-endpoint", default=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
                   help="OTLP/gRPC collector for the sidecars' spans, e.g. a local Jaeger at 127.0.0.1:4317 "
                        "(default: the control plane's own trace store; the demo samples every trace)")
    args = p.parse_args(argv)
    if args.rps <= 0:
        p.error("--rps must be positive")
    if not 1 <= args.zk_ensemble <= MAX_ENSEMBLE:
        p.error(f"--zk-ensemble must be 1 to {MAX_ENSEMBLE}")
    return args


class _Stop(Exception):
    """SIGTERM, turned into an exception on the main thread like Ctrl-C."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


def run(argv: list[str] | None = None) -> int:
    from meshkeeper.demo.mesh import LocalMesh
    from meshkeeper.demo.traffic import Target, TrafficDriver, share_table

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    out = sys.stdout
    live = out.isatty()
    # The demo samples 100% of traces (the default is 1%).
    # The access log is off by default in a sidecar (it costs throughput); the demo shows it.
    mesh = LocalMesh(sidecar_args=("--trace-sample-ratio", "1", "--access-log", "-"), zk_servers=args.zk_ensemble)
    traffic: TrafficDriver | None = None
    code = 0
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        print(f"meshkeeper demo: starting in {mesh.workdir}", flush=True)
        mesh.start_registry()
        # Spans go to the control plane's built-in trace store unless a collector is named.
        mesh.sidecar_args = (*mesh.sidecar_args, "--otlp-endpoint", args.otlp_endpoint or mesh.cp_address)
        catalog = [mesh.add_instance("catalog", version, weight) for version, weight in CATALOG]
        frontend = mesh.add_instance("frontend", "v1", 10, call="http://catalog/")
        print("waiting for the sidecars to be ready ...", flush=True)
        mesh.wait_ready()

        endpoints = mesh.endpoints()
        endpoints.append(f"traces           every request, exported to {args.otlp_endpoint}" if args.otlp_endpoint
                         else f"traces           every request, in the control plane's trace store (Jaeger's API): "
                              f"{mesh.cp_http_url}/api/traces?service=frontend")
        endpoints.append("access logs      one JSON line per request in each sidecar's stdout log")
        print("\n".join(["", *endpoints, ""]), flush=True)
        traffic = TrafficDriver("127.0.0.1", frontend.app_port, args.rps, downstream="catalog")
        traffic.start()
        targets = [Target(i.app_address, i.version, i.weight) for i in catalog]
        started = time.monotonic()
        deadline = started + args.duration if args.duration > 0 else float("inf")
        before: Counter[str] = Counter()
        last_print = 0.0
        while (now := time.monotonic()) < deadline:
            time.sleep(min(1.0, max(0.0, deadline - now)))
            total, errors = traffic.snapshot()
            table = share_table(targets, total, total - before, errors, time.monotonic() - started)
            if args.zk_ensemble > 1:
                table.append(mesh.registry_status())
            before = total
            if live:
                # Redraw in place: home, clear, then the endpoints and the table.
                out.write("\x1b[H\x1b[J" + "\n".join([*endpoints, "", *table, "", "Ctrl-C to stop"]) + "\n")
                out.flush()
            elif time.monotonic() - last_print >= 5 or time.monotonic() >= deadline:
                print("\n".join(["", *table]), flush=True)
                last_print = time.monotonic()
            if gone := mesh.dead():
                print(
                    "\nmeshkeeper demo: a process stopped unexpectedly:\n  " + "\n  ".join(gone), flush=True
                )
                code = 1
                break
    except (KeyboardInterrupt, _Stop):
        print("\nstopping ...", flush=True)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"\nmeshkeeper demo: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # A second Ctrl-C must not interrupt the cleanup halfway.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if traffic is not None:
                traffic.stop()
            mesh.stop(remove_workdir=not args.keep and code == 0)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
    if code and not args.keep:
        print(f"logs kept in {mesh.workdir}", file=sys.stderr)
    else:
        print(
            "stopped: all processes are down" + (f"; logs in {mesh.workdir}" if args.keep else ""), flush=True
        )
    return code
