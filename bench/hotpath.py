"""CPU time of the sidecar's request path in Python, without sockets: what a feature adds per request.

The end-to-end benchmarks (bench/run.py, bench/interleaved.py) include the kernel's socket work
and a VM's noise, which on this machine swings ±20% between runs and hides an effect of a few
percent. Here one listener's connection manager serves keep-alive requests over in-memory
transports (the unit tests' fakes: every byte is parsed, routed, forwarded and relayed exactly as
on a socket), and ``time.process_time`` is read around batches of requests, variants interleaved
batch by batch. What is left is the per-request cost of the Python hot path.

    .venv/bin/python bench/hotpath.py [--requests 20000] [--rounds 7]

Variants: tracing off; tracing on at ratio 0, 0.01 and 1 (spans recorded into the real
BatchSpanProcessor and OTLP exporter, pointed at a sink that drops them); the access log on
(to /dev/null, through its writer thread).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.accesslog import AccessLog  # noqa: E402
from sidecar.tracing.export import Tracer  # noqa: E402
from tests.unit.test_http_proxy import Mesh  # noqa: E402
from tests.unit.test_pool import until  # noqa: E402

REQUEST = b"GET /items?id=7 HTTP/1.1\r\nHost: svc\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\nhello, world\n"


class DropSink:
    """A SpanExporter that accepts every batch (the OTLP encoding is left out: see the module doc)."""

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True


async def setup(variant: str):
    mesh = Mesh()
    rt = mesh.runtime
    rt.service, rt.namespace = "bench", "default"
    tracer = None
    if variant.startswith("trace-"):
        ratio = {"trace-0": 0.0, "trace-1pct": 0.01, "trace-100pct": 1.0}[variant]
        tracer = Tracer(DropSink(), {"service.name": "bench"}, ratio=ratio)
        rt.set_tracing(tracer, None)
    if variant == "access-log":
        rt.access_log = AccessLog.open("/dev/null")
    client = mesh.client()
    client.send(REQUEST)
    await until(lambda: mesh.connector.connections)
    up = mesh.connector.connections[0][1]
    proto = mesh.connector.connections[0][0]
    up.take()
    proto.data_received(RESPONSE)
    client.transport.take()
    return mesh, client, up, proto, tracer


def serve(n: int, client, up, proto) -> None:
    for _ in range(n):
        client.protocol.data_received(REQUEST)
        up.out.clear()
        proto.data_received(RESPONSE)
        client.transport.out.clear()


async def main_async(args: argparse.Namespace) -> dict[str, list[float]]:
    variants = ["off", "trace-0", "trace-1pct", "trace-100pct", "access-log"]
    envs = {v: await setup(v) for v in variants}
    us: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            _, client, up, proto, _ = envs[v]
            serve(1000, client, up, proto)  # warm
            t = time.process_time()
            serve(args.requests, client, up, proto)
            us[v].append((time.process_time() - t) / args.requests * 1e6)
            await asyncio.sleep(0)
    for _, _, _, _, tracer in envs.values():
        if tracer is not None:
            tracer.shutdown()
    return us


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20000, help="requests per variant per round")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    import uvloop

    us = uvloop.run(main_async(args))
    base = statistics.median(us["off"])
    print("| variant | CPU us/request (median) | vs off | rounds |")
    print("|---|---:|---:|---|")
    for v, values in us.items():
        med = statistics.median(values)
        print(f"| {v} | {med:.2f} | {med / base - 1:+.1%} | {', '.join(f'{x:.1f}' for x in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
