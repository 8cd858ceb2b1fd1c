"""The control plane's push latency while its trace store ingests OTLP spans (issue 13).

Starts ZooKeeper (meshkeeper.demo.zookeeper) and one ``meshkeeper controlplane`` pinned to CPU 0
with ``taskset``; this script, ZooKeeper and the span exporter run on CPU 1. ``--sidecars``
simulated sidecars (service ``frontend``, one grpc.aio ADS stream each, SotW as the real sidecar
speaks it) subscribe to CDS and to EDS of every outbound cluster and ACK every response at once.
ZooKeeper holds the demo's services: catalog with three instances (weights 1, 2, 7) and frontend.

Then, in ``--rounds`` rounds, each condition once per round (the order rotating round by round, so
drift touches every condition alike):

* the exporter process is set to the condition's span rate and left ``--settle`` seconds;
* ``--writes`` times: write an operator override ``{"weight": w}`` for one catalog instance straight
  into ZooKeeper (``/meshkeeper/default/services/catalog/overrides/<host>:<port>``), then take, per
  stream, the time from just before the write to its ACK of the EDS push that carries it
  (client-side, the ACK is written as soon as the response is read); a random 0.3-0.6 s pause
  between writes so that writes fall at every phase of the exporters' flushes;
* the control plane's CPU time over the condition's window (utime + stime of its process, /proc),
  and the deltas of ``meshkeeper_xds_push_ack_latency_seconds{type="EDS"}`` (the control plane's
  own send -> ACK) and ``meshkeeper_tracestore_spans_received_total`` (scraped outside the window).

The exporter (a child process) models the demo's sidecars: ``meshkeeper demo`` sends 50 req/s to the
frontend app, whose call to catalog makes one CLIENT span in the frontend sidecar and one SERVER
span in the catalog sidecar that served it (2 spans per request per hop; weights 1:2:7), so
100 spans/s at 100% sampling (measured: meshkeeper_tracestore_spans_received_total grew 100.2/s).
Four exporters, each its own gRPC channel with opentelemetry-proto's TraceServiceStub, flush like
the sidecar's BatchSpanProcessor (sidecar/tracing/export.py: every 1 s, at most 512 spans per
Export): frontend 50%, catalog 5%, 10%, 35% of the rate.

    .venv/bin/python bench/push_under_ingest.py [--sidecars 100] [--rounds 15] [--writes 5]
        [--rates 0,100,1000] [--out bench/out/push_under_ingest]

Prints markdown tables; per-write records go to ``--out``/writes.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from envoy.config.cluster.v3 import cluster_pb2  # noqa: E402, F401 (registers the type for unpacking)
from envoy.config.endpoint.v3 import endpoint_pb2  # noqa: E402
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

from meshkeeper import xds  # noqa: E402
from meshkeeper.xds import NodeInfo  # noqa: E402

NS = "default"
CATALOG = [("127.0.0.1:21001", "v1", 1), ("127.0.0.1:21002", "v1", 2), ("127.0.0.1:21003", "v2", 7)]
TARGET = CATALOG[2][0]
EXPORTERS = [("frontend", 0.50), ("catalog", 0.05), ("catalog", 0.10), ("catalog", 0.35)]
SCHEDULE_DELAY = 1.0  # the sidecar's BatchSpanProcessor flush period
MAX_BATCH = 512


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# -- the exporter process


def exporter_main(port: int) -> None:
    """Reads span rates (spans/s, all exporters together) from stdin, one per line; prints counts at EOF."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

    from tests.support.otlp_spans import CLIENT, SERVER, resource, sidecar_attributes, span

    rate = [0.0]
    stats = {"exports": 0, "spans": 0, "errors": 0, "max_batch": 0}

    def build(k: int, service: str, count: int, seq: list[int]) -> trace_service_pb2.ExportTraceServiceRequest:
        now = time.time_ns()
        kind = CLIENT if service == "frontend" else SERVER
        spans = []
        for _ in range(count):
            seq[0] += 1
            n = (k << 40) | seq[0]
            start = now - 5_000_000 - (seq[0] % 1000) * 1000
            spans.append(span(trace_id=n, span_id=n & 0xFFFFFFFFFFFF or 1, parent_id=(n + 7) & 0xFFFFFFFFFFFF or 2,
                              name="GET", kind=kind, start=start, duration=2_000_000,
                              attrs=sidecar_attributes(service, kind, 200, seq[0])))
        req = trace_service_pb2.ExportTraceServiceRequest()
        instance = f"sidecar~127.0.0.1~{service}-{15006 + k}.{NS}"
        rs = req.resource_spans.add(resource=resource(service, instance=instance))
        rs.scope_spans.add(scope=InstrumentationScope(name="meshkeeper.sidecar", version="0.1.0"), spans=spans)
        return req

    async def one(k: int, service: str, share: float) -> None:
        seq = [0]
        owed = 0.0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = trace_service_pb2_grpc.TraceServiceStub(ch)
            next_at = time.monotonic() + random.random() * SCHEDULE_DELAY
            while True:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += SCHEDULE_DELAY
                owed += rate[0] * share * SCHEDULE_DELAY
                while owed >= 1:
                    count = min(MAX_BATCH, int(owed))
                    owed -= count
                    try:
                        await stub.Export(build(k, service, count, seq), timeout=5)
                        stats["exports"] += 1
                        stats["spans"] += count
                        stats["max_batch"] = max(stats["max_batch"], count)
                    except grpc.RpcError:
                        stats["errors"] += 1
                if rate[0] == 0:
                    owed = 0.0

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(one(k, svc, share)) for k, (svc, share) in enumerate(EXPORTERS)]
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if line.startswith("fill "):  # as fast as it goes, batches of 512, before the rounds
                left, seq = int(line.split()[1]), [1 << 30]
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                    stub = trace_service_pb2_grpc.TraceServiceStub(ch)
                    while left > 0:
                        count = min(MAX_BATCH, left)
                        service = ("frontend", "catalog")[left // MAX_BATCH % 2]
                        await stub.Export(build(len(EXPORTERS) + left % 4, service, count, seq), timeout=10)
                        left -= count
            else:
                rate[0] = float(line)
            print("ok", flush=True)
        for t in tasks:
            t.cancel()
        print(json.dumps(stats), flush=True)

    asyncio.run(main())


# -- simulated sidecars


class Sidecar:
    def __init__(self, channel: grpc.aio.Channel, i: int) -> None:
        info = NodeInfo(node_id=NodeInfo.make_id("127.0.0.1", "frontend", 30000 + i, NS), service="frontend",
                        namespace=NS, app_port=8080, inbound_port=30000 + i, outbound_port=15001, version="v1")
        md = struct_pb2.Struct()
        md.update(info.metadata())
        self.node = info
        self.md = md
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        self.first = True
        self.eds_names: list[str] = []
        self.waiting: asyncio.Event | None = None
        self.got: float | None = None
        self.got_resp: discovery_pb2.DiscoveryResponse | None = None
        self.extra = 0  # EDS responses beyond the one a write was expected to cause

    async def send(self, type_url: str, names=(), version: str = "", nonce: str = "") -> None:
        req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=list(names), version_info=version,
                                             response_nonce=nonce)
        if self.first:
            req.node.id, req.node.cluster = self.node.node_id, self.node.service
            req.node.metadata.CopyFrom(self.md)
            self.first = False
        await self.call.write(req)

    async def subscribe(self) -> None:
        await self.send(xds.CLUSTER)
        cds = await self.call.read()
        await self.send(xds.CLUSTER, (), cds.version_info, cds.nonce)
        names = []
        for a in cds.resources:
            c = cluster_pb2.Cluster()
            a.Unpack(c)
            if c.name.startswith("outbound|"):
                names.append(c.name)
        self.eds_names = sorted(names)
        await self.send(xds.ENDPOINT, self.eds_names)
        eds = await self.call.read()
        await self.send(xds.ENDPOINT, self.eds_names, eds.version_info, eds.nonce)

    async def run(self) -> None:
        """ACK everything; note the arrival of the first EDS response after a write."""
        while True:
            resp = await self.call.read()
            if resp is grpc.aio.EOF:
                return
            now = time.perf_counter()
            names = self.eds_names if resp.type_url == xds.ENDPOINT else ()
            await self.send(resp.type_url, names, resp.version_info, resp.nonce)
            if resp.type_url != xds.ENDPOINT:
                continue
            if self.waiting is not None and self.got is None:
                self.got, self.got_resp = now, resp
                self.waiting.set()
            else:
                self.extra += 1


def weight_in(resp: discovery_pb2.DiscoveryResponse) -> int | None:
    for a in resp.resources:
        cla = endpoint_pb2.ClusterLoadAssignment()
        a.Unpack(cla)
        if cla.cluster_name != xds.outbound_cluster("catalog", NS):
            continue
        for loc in cla.endpoints:
            for e in loc.lb_endpoints:
                sa = e.endpoint.address.socket_address
                if f"{sa.address}:{sa.port_value}" == TARGET:
                    return e.load_balancing_weight.value
    return None


def scrape(http_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        body = r.read().decode()
    out = {}
    for line in body.splitlines():
        if line.startswith(("meshkeeper_xds_push_ack_latency_seconds_sum{type=\"EDS\"",
                            "meshkeeper_xds_push_ack_latency_seconds_count{type=\"EDS\"",
                            "meshkeeper_tracestore_spans_received_total ", "meshkeeper_tracestore_spans ",
                            "meshkeeper_tracestore_spans_evicted_total ")):
            name, _, value = line.rpartition(" ")
            out[name.split("{")[0]] = float(value)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exporter", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sidecars", type=int, default=100)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--writes", type=int, default=5, help="writes per condition per round")
    p.add_argument("--rates", default="0,100,1000", help="span rates (spans/s) of the conditions")
    p.add_argument("--settle", type=float, default=1.5, help="seconds at a condition's rate before its writes")
    p.add_argument("--prefill", type=int, default=100_000,
                   help="spans sent before the rounds (default: the store's default bound, so it evicts "
                        "throughout, as in a demo that has run for 17 minutes); 0: start empty")
    p.add_argument("--out", default=str(ROOT / "bench/out/push_under_ingest"))
    args = p.parse_args()
    if args.exporter:
        exporter_main(args.exporter)
        return 0

    from kazoo.client import KazooClient

    from meshkeeper.demo.process import ManagedProcess, meshkeeper_argv
    from meshkeeper.demo.zookeeper import ZooKeeper
    from meshkeeper.registry import Paths

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rates = [float(r) for r in args.rates.split(",")]
    os.sched_setaffinity(0, {1 % os.cpu_count()})  # children (ZooKeeper, the exporter) inherit it
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    started_at = time.time()

    shutil.rmtree(out / "zookeeper", ignore_errors=True)
    zk = ZooKeeper(out / "zookeeper").start()
    cp = exporter = None
    k = KazooClient(hosts=zk.hosts, timeout=10.0)
    try:
        k.start(10)
        paths = Paths(NS)
        for svc in ("catalog", "frontend"):
            k.ensure_path(paths.service(svc))
            k.set(paths.service(svc), b'{"protocol": "http"}')
        for addr, version, weight in CATALOG:
            host, port = addr.split(":")
            rec = {"address": host, "port": int(port), "weight": weight, "labels": {"version": version},
                   "protocol": "http", "app_port": 8080}
            k.ensure_path(paths.instances("catalog"))
            k.create(paths.instance("catalog", addr), json.dumps(rec).encode(), ephemeral=True)
        override = paths.override("catalog", TARGET)
        k.create(override, b'{"weight": 7}', makepath=True)

        cp_argv = ["taskset", "-c", "0", *meshkeeper_argv("controlplane", "--zk", zk.hosts, "--xds-port", "0",
                                                           "--http-port", "0", "--bind", "127.0.0.1")]
        cp = ManagedProcess(cp_argv, role="controlplane", log_dir=out)
        cp.start()
        xds_port, http_port = cp.port("xds_port"), cp.port("http_port")
        exporter = subprocess.Popen([sys.executable, __file__, "--exporter", str(xds_port)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        records = asyncio.run(measure(args, rates, k, override, cp.pid, xds_port, http_port, exporter, out))
        exporter.stdin.close()
        exporter_stats = json.loads(exporter.stdout.readlines()[-1])
    finally:
        if exporter is not None and exporter.poll() is None:
            exporter.kill()
        if cp is not None:
            cp.terminate(10)
        k.stop()
        zk.close()
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    report(args, rates, records, exporter_stats, load_before, load_after, time.time() - started_at)
    return 0


async def measure(args, rates, k, override, cp_pid, xds_port, http_port, proc: subprocess.Popen,
                  out: Path) -> list[dict]:
    loop = asyncio.get_running_loop()
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{xds_port}") for _ in range(max(1, args.sidecars // 25))]
    sidecars = [Sidecar(channels[i % len(channels)], i) for i in range(args.sidecars)]
    await asyncio.gather(*(s.subscribe() for s in sidecars))
    readers = [asyncio.create_task(s.run()) for s in sidecars]
    if args.prefill:
        proc.stdin.write(f"fill {args.prefill}\n")
        proc.stdin.flush()
        await loop.run_in_executor(None, proc.stdout.readline)
    await asyncio.sleep(1.0)
    prefilled = await loop.run_in_executor(None, scrape, http_port)
    rss0 = _rss_mib(cp_pid)
    records: list[dict] = []
    log = (out / "writes.jsonl").open("w")
    weight = 7
    try:
        for rnd in range(args.rounds):
            order = rates[rnd % len(rates):] + rates[:rnd % len(rates)]
            for rate in order:
                proc.stdin.write(f"{rate}\n")
                proc.stdin.flush()
                await loop.run_in_executor(None, proc.stdout.readline)
                m0 = await loop.run_in_executor(None, scrape, http_port)
                await asyncio.sleep(args.settle)
                cpu0, t0 = _cpu_seconds(cp_pid), time.perf_counter()
                per_write = []
                for _ in range(args.writes):
                    weight = 7 + (weight - 6) % 40  # 8, 9, ... 46, 7, 8, ...: always a change
                    events = []
                    for s in sidecars:
                        s.got, s.got_resp, s.waiting = None, None, asyncio.Event()
                        events.append(s.waiting)
                    data = json.dumps({"weight": weight}).encode()
                    written = time.perf_counter()
                    k.set(override, data)  # blocking, < 1 ms on loopback; the push is 100 ms of debounce away
                    try:
                        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 5.0)
                    except TimeoutError:
                        pass
                    lat = [(s.got - written) * 1000 for s in sidecars if s.got is not None]
                    wrong = sum(1 for s in sidecars if s.got_resp is not None and weight_in(s.got_resp) != weight)
                    for s in sidecars:
                        s.waiting = None
                    rec = {"round": rnd, "rate": rate, "weight": weight, "acked": len(lat), "missing":
                           len(sidecars) - len(lat), "wrong_weight": wrong, "first_ms": min(lat, default=None),
                           "last_ms": max(lat, default=None), "latencies_ms": [round(x, 3) for x in lat]}
                    per_write.append(rec)
                    await asyncio.sleep(random.uniform(0.3, 0.6))
                wall, cpu = time.perf_counter() - t0, _cpu_seconds(cp_pid) - cpu0
                m1 = await loop.run_in_executor(None, scrape, http_port)
                window = {"round": rnd, "rate": rate, "cp_cpu_s": cpu, "wall_s": wall,
                          "cp_cpu_pct": 100 * cpu / wall,
                          "spans_received": m1.get("meshkeeper_tracestore_spans_received_total", 0)
                          - m0.get("meshkeeper_tracestore_spans_received_total", 0),
                          "window_s_with_settle": wall + args.settle,
                          "cp_eds_ack_sum": m1["meshkeeper_xds_push_ack_latency_seconds_sum"]
                          - m0["meshkeeper_xds_push_ack_latency_seconds_sum"],
                          "cp_eds_ack_count": m1["meshkeeper_xds_push_ack_latency_seconds_count"]
                          - m0["meshkeeper_xds_push_ack_latency_seconds_count"],
                          "writes": per_write}
                records.append(window)
                log.write(json.dumps(window) + "\n")
                log.flush()
                print(f"round {rnd:2d} rate {rate:6.0f}: CP CPU {window['cp_cpu_pct']:5.1f}%  "
                      f"median {statistics.median(x for w in per_write for x in w['latencies_ms']):6.1f} ms  "
                      f"last {max(w['last_ms'] or 0 for w in per_write):6.1f} ms  "
                      f"spans {window['spans_received']:.0f}", file=sys.stderr, flush=True)
        proc.stdin.write("0\n")
        proc.stdin.flush()
    finally:
        log.close()
        for t in readers:
            t.cancel()
        for s in sidecars:
            s.call.cancel()
        for ch in channels:
            await ch.close()
    extra = sum(s.extra for s in sidecars)
    end = await loop.run_in_executor(None, scrape, http_port)
    records.append({"extra_eds_responses": extra, "rss_mib": (rss0, _rss_mib(cp_pid)),
                    "store": (prefilled.get("meshkeeper_tracestore_spans"), end.get("meshkeeper_tracestore_spans"),
                              end.get("meshkeeper_tracestore_spans_evicted_total"))})
    return records


def report(args, rates, records, exporter_stats, load_before, load_after, elapsed) -> None:
    tail = records.pop()
    extra = tail["extra_eds_responses"]
    print(f"\n$ {shlex.join([sys.executable.replace(str(ROOT) + '/', ''), *sys.argv])}\n")
    print(f"{args.sidecars} simulated sidecars (ADS, SotW), {args.rounds} rounds x {len(rates)} conditions x "
          f"{args.writes} writes; control plane on CPU 0 alone (debounce 100 ms, the default); "
          f"{elapsed:.0f} s in all; load average before {' / '.join(load_before)}, after {' / '.join(load_after)}")
    kept0, kept1, evicted = tail["store"]
    print(f"exporter: {exporter_stats}; EDS responses outside a write's window: {extra}")
    print(f"trace store: {args.prefill:,} spans sent before the rounds; spans kept {kept0:,.0f} before the rounds, "
          f"{kept1:,.0f} after, evicted {evicted:,.0f}; control plane RSS {tail['rss_mib'][0]:.0f} -> "
          f"{tail['rss_mib'][1]:.0f} MiB\n")
    print("| spans/s offered | spans/s received | writes | stream ACKs | write -> ACK p50 ms | p99 ms | max ms | "
          "last stream's ACK per write p50 / p90 / max ms | writes with an ACK > 150 ms | CP send -> ACK mean ms | "
          "CP CPU % per round, median (min-max) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rate in rates:
        wins = [r for r in records if r["rate"] == rate]
        writes = [w for r in wins for w in r["writes"]]
        lat = [x for w in writes for x in w["latencies_ms"]]
        last = [w["last_ms"] for w in writes if w["last_ms"] is not None]
        missing = sum(w["missing"] for w in writes)
        wrong = sum(w["wrong_weight"] for w in writes)
        recv = sum(r["spans_received"] for r in wins) / sum(r["window_s_with_settle"] for r in wins)
        cp_ack = sum(r["cp_eds_ack_sum"] for r in wins) / max(1, sum(r["cp_eds_ack_count"] for r in wins)) * 1000
        cpu = [r["cp_cpu_pct"] for r in wins]
        note = f" ({missing} missing, {wrong} wrong weight)" if missing or wrong else ""
        print(f"| {rate:,.0f} | {recv:,.0f} | {len(writes)} | {len(lat):,}{note} | {statistics.median(lat):.1f} | "
              f"{pct(lat, 0.99):.1f} | {max(lat):.1f} | {statistics.median(last):.1f} / {pct(last, 0.9):.1f} / "
              f"{max(last):.1f} | {sum(x > 150 for x in last)} | "
              f"{cp_ack:.2f} | {statistics.median(cpu):.1f} ({min(cpu):.1f}-{max(cpu):.1f}) |")
    print("\nPer round (CP CPU % / median write -> ACK ms of the round's writes):\n")
    print("| round | " + " | ".join(f"{r:,.0f} spans/s" for r in rates) + " |")
    print("|---:|" + "---:|" * len(rates))
    for rnd in range(args.rounds):
        cells = []
        for rate in rates:
            [w] = [r for r in records if r["rate"] == rate and r["round"] == rnd]
            med = statistics.median(x for wr in w["writes"] for x in wr["latencies_ms"])
            cells.append(f"{w['cp_cpu_pct']:.1f}% / {med:.1f}")
        print(f"| {rnd} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
