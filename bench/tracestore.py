"""The control plane's trace store (controlplane/tracestore): OTLP ingest, search latency, memory.

1. Ingest over real gRPC: a server process on CPU 0 (uvloop, one grpc.aio server with the OTLP
   TraceService in front of a TraceStore of the default bounds, as ``meshkeeper controlplane``
   runs it) and a client process on CPU 1 sending Export requests of ``--batch`` sidecar-shaped
   spans (the OTel SDK's batch is 512), ``--inflight`` at a time, serialized beforehand, for
   ``--seconds`` after a warm-up. Reports spans/s acknowledged and the server's CPU seconds per
   100k spans (from /proc: the figure to compare between variants on a shared machine). The store
   is full during the run, so eviction is part of the cost.
2. Search latency over ``--spans`` spans (default 100,000) in-process: each Jaeger query through
   the HTTP handler (parse, search, JSON), median and p99 over ``--repeat`` runs.
3. Memory per 10,000 spans, measured with tracemalloc, against the store's own accounting.

    .venv/bin/python bench/tracestore.py [--seconds 10] [--batch 512] [--inflight 4] [--spans 100000]

Prints a markdown table; nothing is written (bench/RESULTS.md is edited by hand).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.auth import Authorizer  # noqa: E402
from controlplane.tracestore.query import JaegerQuery  # noqa: E402
from controlplane.tracestore.store import TraceStore  # noqa: E402
from tests.support.otlp_spans import T0, add_to_store, export_request, two_hop_trace  # noqa: E402

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
PAIRS = [("frontend", "catalog"), ("frontend", "search"), ("web", "cart"), ("web", "catalog"), ("api", "users")]
MS = 1_000_000


def _pin(cpu: int) -> None:
    try:
        os.sched_setaffinity(0, {cpu % os.cpu_count()})
    except (AttributeError, OSError):
        pass


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- 1. ingest over gRPC


def serve() -> None:
    """The server process: prints its port, serves until stdin closes, then the store's numbers."""
    import grpc
    import uvloop

    from controlplane.metrics import Metrics
    from controlplane.tracestore.otlp import TraceService, add_to_server

    _pin(0)

    async def main() -> None:
        store = TraceStore()
        server = grpc.aio.server()
        add_to_server(server, TraceService(store, Metrics()))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        print(json.dumps({"spans": store.span_count, "evicted": store.evicted_spans}), flush=True)
        await server.stop(None)

    uvloop.run(main())


def requests(batch: int, count: int) -> list[bytes]:
    out, n = [], 0
    for _ in range(count):
        spans: dict[str, list] = {}
        while sum(len(v) for v in spans.values()) < batch:
            n += 1
            caller, callee = PAIRS[n % len(PAIRS)]
            for svc, ss in two_hop_trace(n, T0 + n * MS, n=n, service=caller, callee=callee,
                                         error=n % 10 == 0).items():
                spans.setdefault(svc, []).extend(ss)
        out.append(export_request(spans).SerializeToString())
    return out


def client(port: int, bodies: list[bytes], spans_per: int, seconds: float, inflight: int,
           server_pid: int) -> tuple[float, float]:
    import grpc
    import uvloop

    _pin(1)

    async def main() -> tuple[float, float]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            export = ch.unary_unary(EXPORT)
            sent = 0
            stop_at = 0.0

            async def worker(k: int) -> None:
                nonlocal sent
                i = k
                while time.monotonic() < stop_at:
                    await export(bodies[i % len(bodies)])
                    sent += 1
                    i += inflight
            stop_at = time.monotonic() + 2.0  # warm-up
            await asyncio.gather(*(worker(k) for k in range(inflight)))
            sent, cpu0, t0 = 0, _cpu_seconds(server_pid), time.monotonic()
            stop_at = t0 + seconds
            await asyncio.gather(*(worker(k) for k in range(inflight)))
            elapsed, cpu = time.monotonic() - t0, _cpu_seconds(server_pid) - cpu0
            return sent * spans_per / elapsed, cpu / (sent * spans_per) * 100_000

    return uvloop.run(main())


def bench_ingest(args: argparse.Namespace) -> list[tuple[str, str]]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        port = int(proc.stdout.readline())
        bodies = requests(args.batch, args.distinct)
        rate, cpu = client(port, bodies, args.batch, args.seconds, args.inflight, proc.pid)
        proc.stdin.close()
        final = json.loads(proc.stdout.readline())
    finally:
        proc.wait(10)
    return [(f"OTLP ingest over gRPC, batches of {args.batch}, {args.inflight} in flight (server on 1 core)",
             f"{rate:,.0f} spans/s"),
            ("  server CPU per 100k spans", f"{cpu:.2f} s"),
            ("  store at the end (spans kept / evicted)", f"{final['spans']:,} / {final['evicted']:,}")]


# -- 2. search latency


def fill(n_spans: int, start: int) -> TraceStore:
    store = TraceStore(max_spans=n_spans, max_bytes=1 << 40)
    n = 0
    while store.span_count + 3 <= n_spans:
        n += 1
        caller, callee = PAIRS[n % len(PAIRS)]
        # one request every 10 ms over the window; 1 in 10 an error; durations 1..100 ms
        add_to_store(store, two_hop_trace(n, start + n * 10 * MS, n=n, service=caller, callee=callee,
                                          error=n % 10 == 0, duration=(1 + n % 100) * MS))
    return store


def timed(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def bench_search(args: argparse.Namespace) -> list[tuple[str, str]]:
    start = T0
    store = fill(args.spans, start)
    end = start + (args.spans // 3) * 10 * MS
    api = JaegerQuery(store, Authorizer(), clock=lambda: end)
    last = int.from_bytes(list(store.traces())[-1].key, "big")
    queries = {
        "service=catalog, limit=20 (the UI's default)": {"service": "catalog", "limit": "20"},
        "service=catalog, limit=100": {"service": "catalog"},
        "service + operation": {"service": "frontend", "operation": "GET", "limit": "20"},
        "service + minDuration=99ms (1% match)": {"service": "catalog", "minDuration": "99ms", "limit": "20"},
        "service + tags error=true": {"service": "catalog", "tags": '{"error":"true"}', "limit": "20"},
        "service + tags http.response.status_code=500": {
            "service": "catalog", "tags": '{"http.response.status_code":"500"}', "limit": "20"},
        "service + tag matching one old span (scans the service)": {
            "service": "users", "tags": json.dumps({"meshkeeper.request_id": f"5f0c8e1a-7b2d-4c3e-9f10-{4:012x}"})},
        "service + tag matching nothing (scans the service)": {"service": "catalog", "tags": '{"url.path":"/none"}'},
        "service + 5-minute window in the middle": {
            "service": "catalog", "start": str((start + (end - start) // 2) // 1000),
            "end": str((start + (end - start) // 2 + 300 * 10**9) // 1000), "limit": "20"},
    }
    rows = []
    for name, q in queries.items():
        def run(q=q) -> None:
            status, _, body, *_ = api("GET", "/api/traces", q, {})
            assert status == 200, body
        med, p99 = timed(run, args.repeat)
        rows.append((f"search over {store.span_count:,} spans: {name}", f"{med:.2f} ms (p99 {p99:.2f})"))
    for name, path, q in [("GET /api/traces/<id>", f"/api/traces/{last:032x}", {}),
                          ("GET /api/services", "/api/services", {}),
                          ("GET /api/dependencies (every span)", "/api/dependencies", {})]:
        med, p99 = timed(lambda path=path, q=q: api("GET", path, q, {}), args.repeat)
        rows.append((f"{name} over {store.span_count:,} spans", f"{med:.2f} ms (p99 {p99:.2f})"))
    return rows


# -- 3. memory


def bench_memory() -> list[tuple[str, str]]:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    store = fill(30_000, T0)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    blob = sum(len(s.blob) for t in store.traces() for s in t.spans) / store.span_count
    per10k = used / store.span_count * 10_000
    return [("memory per 10,000 spans (tracemalloc; sidecar-shaped spans, 3 per trace)",
             f"{per10k / 1e6:.2f} MB"),
            ("  of which the spans' protobuf bytes", f"{blob * 10_000 / 1e6:.2f} MB ({blob:.0f} B/span)"),
            ("  store's own accounting per 10,000 spans", f"{store.bytes / store.span_count * 10_000 / 1e6:.2f} MB")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--inflight", type=int, default=4)
    p.add_argument("--distinct", type=int, default=240, help="distinct requests cycled (more spans than the store)")
    p.add_argument("--spans", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--only", default="ingest,search,memory")
    args = p.parse_args()
    if args.serve:
        serve()
        return
    rows: list[tuple[str, str]] = []
    only = set(args.only.split(","))
    if "ingest" in only:
        rows += bench_ingest(args)
    if "search" in only:
        rows += bench_search(args)
    if "memory" in only:
        rows += bench_memory()
    print(f"\n$ {shlex.join([sys.executable.replace(str(ROOT) + '/', ''), *sys.argv])}\n")
    print("| measure | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
