"""Answers per second of the sidecar's mesh DNS (sidecar/dns), on real UDP sockets.

Three processes: MeshDns alone on CPU 1 (uvloop, a table of 1,000 services), and on CPU 0 a local
upstream resolver (uvloop, answers one precomputed record, copying the id) and this load generator:
``--sockets`` connected UDP sockets, ``--window`` queries outstanding on each, ``--count`` queries per
scenario after a warm-up, bounded by ``--time-limit``. A query lost (no answer in 1 s) is sent anew and
counted. Besides answers/s (which a Python load generator on a shared CPU also bounds), the server's
CPU time per answer is read from /proc: that is the figure to compare between variants.

Scenarios: a mesh name (the same query: answered from the server's cache of its own answers); a mesh
name in random case (nearly every query a cache miss: dnslib parses and builds); a forwarded name with
the shared upstream socket and id rewriting (the default); the same with one socket per query.

    .venv/bin/python bench/dns.py [--count 50000] [--sockets 8] [--window 16] [--only mesh,forward]

Prints a markdown table; nothing is written (bench/RESULTS.md is edited by hand).
"""

from __future__ import annotations

import argparse
import os
import random
import selectors
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dnslib import QTYPE, RR, A, DNSRecord  # noqa: E402

MESH_NAME = "catalog.shop.mesh.local"
OUTSIDE_NAME = "www.example.com"
SCENARIOS = {  # name -> (server flags, query maker)
    "mesh": ([], "fixed-mesh"),
    "mesh-cache-miss": ([], "random-case-mesh"),
    "forward": ([], "outside"),
    "forward-socket-per-query": (["--per-query"], "outside"),
}


# -- child processes --------------------------------------------------------------------------------

def serve_dns(upstream_port: int, per_query: bool) -> None:
    import asyncio

    import uvloop

    from sidecar.dns import MeshDns, build_table

    async def run() -> None:
        dns = MeshDns([("127.0.0.1", upstream_port)], max_pending=4096, udp_socket_per_query=per_query)
        port = await dns.start("127.0.0.1", 0)
        services = [("shop", "catalog", "240.240.0.7")]
        services += [(f"ns{i % 10}", f"svc{i}", f"240.240.{i // 250 + 1}.{i % 250 + 1}") for i in range(999)]
        dns.set_table(build_table(services, own_namespace="shop"))
        print(port, flush=True)
        await asyncio.Event().wait()  # until the parent terminates us

    uvloop.run(run())


def serve_upstream() -> None:
    import asyncio

    import uvloop

    query = DNSRecord.question(OUTSIDE_NAME)
    reply = query.reply(aa=0)
    reply.add_answer(RR(OUTSIDE_NAME, QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
    tail = reply.pack()[2:]

    class Upstream(asyncio.DatagramProtocol):
        def connection_made(self, transport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr) -> None:
            self.transport.sendto(data[:2] + tail, addr)

    async def run() -> None:
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            Upstream, local_addr=("127.0.0.1", 0))
        print(transport.get_extra_info("sockname")[1], flush=True)
        await asyncio.Event().wait()

    uvloop.run(run())


# -- the parent: processes, load, table ------------------------------------------------------------

def pinned(cpu: str, argv: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", cpu, *argv]
    return argv


def spawn(cpu: str, *args: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(pinned(cpu, [sys.executable, __file__, *args]), stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return proc, int(line)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def queries(kind: str, n: int = 20000) -> list[bytes]:
    rng = random.Random(7)
    out = []
    for i in range(n):
        if kind == "fixed-mesh":
            name = MESH_NAME
        elif kind == "random-case-mesh":
            name = "".join(c.upper() if rng.random() < 0.5 else c for c in MESH_NAME)
        else:
            name = OUTSIDE_NAME
        record = DNSRecord.question(name)
        record.header.id = i & 0xFFFF
        out.append(record.pack())
    return out


def load(port: int, packets: list[bytes], count: int, sockets: int, window: int, limit: float) -> tuple[int, int, float]:
    """Send ``count`` queries keeping ``window`` outstanding per socket; (answered, resent, seconds)."""
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(sockets):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    sent = answered = resent = 0
    npk = len(packets)
    started = time.perf_counter()
    for s in socks:
        for _ in range(min(window, count - sent)):
            s.send(packets[sent % npk])
            sent += 1
    while answered < count and time.perf_counter() - started < limit:
        events = sel.select(1.0)
        if not events:  # lost datagrams: top every socket up again
            for s in socks:
                for _ in range(window):
                    s.send(packets[sent % npk])
                    resent += 1
            continue
        for key, _ in events:
            s = key.fileobj
            while True:
                try:
                    s.recv(4096)
                except BlockingIOError:
                    break
                answered += 1
                if sent < count:
                    s.send(packets[sent % npk])
                    sent += 1
    elapsed = time.perf_counter() - started
    for s in socks:
        s.close()
    return answered, resent, elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=50000)
    p.add_argument("--sockets", type=int, default=8)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--time-limit", type=float, default=30.0)
    p.add_argument("--only", default="", help="comma-separated scenarios (prefix match): " + ", ".join(SCENARIOS))
    p.add_argument("--role", choices=("load", "dns", "upstream"), default="load", help=argparse.SUPPRESS)
    p.add_argument("--upstream-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--per-query", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "dns":
        return serve_dns(args.upstream_port, args.per_query)
    if args.role == "upstream":
        return serve_upstream()
    wanted = [w for w in args.only.split(",") if w]
    names = [n for n in SCENARIOS if not wanted or any(n.startswith(w) for w in wanted)]
    upstream, upstream_port = spawn("0", "--role", "upstream")
    rows = []
    try:
        for name in names:
            flags, kind = SCENARIOS[name]
            server, port = spawn("1", "--role", "dns", "--upstream-port", str(upstream_port), *flags)
            try:
                packets = queries(kind)
                load(port, packets, 2000, args.sockets, args.window, args.time_limit)  # warm-up
                cpu0 = cpu_seconds(server.pid)
                answered, resent, elapsed = load(port, packets, args.count, args.sockets, args.window,
                                                 args.time_limit)
                cpu = cpu_seconds(server.pid) - cpu0
            finally:
                server.terminate()
                server.wait()
            rows.append((name, answered, resent, elapsed, cpu))
    finally:
        upstream.terminate()
        upstream.wait()
    cmd = shlex.join([".venv/bin/python", "bench/dns.py", *sys.argv[1:]])
    print(f"`{cmd}` ({args.sockets} UDP sockets x {args.window} outstanding; server on CPU 1, "
          f"load generator and upstream on CPU 0)\n")
    print("| scenario | answered | resent | answers/s | server CPU µs/answer |")
    print("|---|---:|---:|---:|---:|")
    for name, answered, resent, elapsed, cpu in rows:
        per = f"{cpu / answered * 1e6:.1f}" if answered else "-"
        print(f"| {name} | {answered} | {resent} | {answered / elapsed:,.0f} | {per} |")


if __name__ == "__main__":
    main()
