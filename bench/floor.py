"""The floor of this stack: the fastest proxies built from the sidecar's own pieces, against HAProxy.

Why: issue 14 asks for at least 0.5x HAProxy's req/s on HTTP/1.1 (one sidecar worker) and 0.4x
HAProxy's HTTP/2 throughput (``h2load -c 10 -m 10``). Before more of the sidecar is optimised, this
tells whether those targets are reachable at all with uvloop, httptools and the ``h2`` package: it
measures proxies that use the same pieces and do nothing else (no routing, no stats, no pools with
breakers, no headers added). What the sidecar spends above these floors is what mesh logic costs;
if a floor is itself below a target, no work on the mesh logic reaches that target.

Targets (every proxy alone on the proxy CPU, as bench/run.py pins them; the upstream, wrk and h2load
on the load CPU):

HTTP/1.1, ``wrk -t1 -c50`` as bench/h1_paired.py runs it (bench.run_wrk):

* ``haproxy``: bench/haproxy.cfg (h1_paired.start_reference).
* ``floor-h1``: one uvloop process; per downstream connection an asyncio.Protocol that parses
  requests with httptools.HttpRequestParser, writes each (request line and headers rebuilt from the
  parse, body re-framed) to an upstream connection of its own kept alive to nginx, parses the
  response with httptools.HttpResponseParser, rebuilds it and writes it back. What one read
  produced goes out in one write.
* ``floor-h1-bytes``: the same connections, no parsing: a TCP relay of bytes both ways, uvloop's
  own floor (its reads, writes and callbacks, and the kernel's two loopback hops).

HTTP/2, ``h2load -c 10 -m 10`` with h2c prior knowledge as bench/h2c.py runs it (h2c.run_h2load):

* ``haproxy-h2``: bench/haproxy-h2.cfg, h2c downstream, HTTP/1.1 keep-alive to nginx
  (h2c.start_h2_reference).
* ``floor-h2-terminate``: a uvloop server on ``h2.connection.H2Connection`` (server side,
  ``header_encoding=None``, inbound headers validated, outbound validation off as the sidecar
  configures it) answering every request itself: 200, nginx's four response headers and a 13-byte
  body. No upstream: the cost of ``h2`` alone for one request/response on a busy connection.
* ``floor-h2-proxy``: the same server forwarding each request to nginx over HTTP/1.1 (request
  rebuilt from the h2 headers; a pool of keep-alive upstream connections, one request on each at a
  time, opened on demand, shared by all downstream connections), the response parsed with httptools,
  its connection-specific headers dropped and its status, headers and body sent on the stream.
  Responses that complete in one loop iteration go out in one write per downstream connection.

The floor servers are this file run as ``floor.py --serve MODE --port P --upstream-port U`` under
``taskset -c 1`` (the harness's modules are not imported there). They are benchmark-grade, not
proxies: no timeouts, no back-pressure, no limits beyond h2's defaults.

Rounds: every round runs all six targets, one after another, the order rotating by one each round,
so that each round gives ratios to HAProxy taken seconds apart; the figures are medians over rounds.
Before each round the harness waits (polling every 10 s, at most 3 minutes) until the 1-minute load
average is below 1.0, and records the load average at the start and end of each round, and the
steal time on the proxy CPU (this is a VM). The benchmark itself keeps two CPUs busy, so the wait
after a round is about 40-60 s even on an otherwise idle machine.

CPU µs per request: the proxy's process group's utime + stime (/proc) over the measured requests.
h2load runs a 1-s ``--warm-up-time`` (h2c.run_h2load) whose requests it does not count, so for
HTTP/2 the CPU is read from 1 s after h2load starts (bench/h2c.py reads it from the start, which
overstates its figure by up to 6/5). "busy" is CPU seconds per second on the proxy CPU (1.00 =
saturated): a proxy well below 1.00 was limited by the load CPU (wrk or h2load, and nginx), which
anything else running on the machine also slows, not by itself. req/s ratios move with that;
"HAProxy µs / target µs" is the throughput ratio the two would have if both were limited by their
own CPU, and it moves much less. The budget line under each table turns the issue's target into
CPU µs per request both ways, to compare with the floors'.

    .venv/bin/python bench/floor.py [--rounds 6] [--duration 5]

Logs, wrk/h2load outputs and rounds.json (every per-round figure) go to bench/out/floor/.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import email.utils
import json
import os
import shlex
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httptools
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # bench/run.py, h1_paired.py, h2c.py (imported by the harness only)

BODY = b"Hello, world\n"  # what the nginx upstream answers (bench/nginx-upstream.conf)
UPSTREAM_HOST = "127.0.0.1"
H2_WARMUP_S = 1.0  # h2c.run_h2load's --warm-up-time
QUIET_LOAD, QUIET_POLL_S, QUIET_MAX_S = 1.0, 10, 180
# Connection-specific fields an HTTP/1.1 response may carry and an HTTP/2 one must not (RFC 9113 §8.2.2).
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
                        b"te", b"trailer"})
MODES = ("h1", "h1-bytes", "h2-terminate", "h2-proxy")


# --------------------------------------------------------------------------- floor servers (--serve)


class _Upstream:
    """Mixin: open one upstream connection for a downstream protocol; buffer until it is up."""

    def _connect(self, upstream_port: int, factory) -> None:
        self.up = None
        self.pending: list[bytes] = []
        fut = asyncio.ensure_future(asyncio.get_running_loop().create_connection(factory, UPSTREAM_HOST,
                                                                                 upstream_port))
        fut.add_done_callback(self._connected)

    def _connected(self, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.t.close()
            return
        transport, self.up = fut.result()
        if self.t.is_closing():
            transport.close()
        elif self.pending:
            transport.write(b"".join(self.pending))
            self.pending.clear()

    def _to_upstream(self, data: bytes) -> None:
        if self.up is not None:
            self.up.t.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.t.close()


class RelayDown(_Upstream, asyncio.Protocol):
    """floor-h1-bytes, downstream side: bytes in, bytes to the upstream."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.t = transport
        self._connect(self.upstream_port, lambda: RelayUp(self))

    def data_received(self, data: bytes) -> None:
        self._to_upstream(data)


class RelayUp(asyncio.Protocol):
    def __init__(self, down: RelayDown) -> None:
        self.down = down

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.down.t.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.t.close()


class H1Message:
    """httptools callbacks shared by both directions: the head rebuilt, the body re-framed, into ``out``."""

    def _reset_parse(self) -> None:
        self.out: list[bytes] = []
        self.head: list[bytes] = []
        self.chunked = False

    def on_message_begin(self) -> None:
        self.head = []
        self.chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 17 and name.lower() == b"transfer-encoding":
            self.chunked = b"chunked" in value.lower()
        self.head.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.out.append(b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body)

    def on_message_complete(self) -> None:
        if self.chunked:
            self.out.append(b"0\r\n\r\n")

    def _take(self) -> bytes:
        data = b"".join(self.out)
        self.out.clear()
        return data


class H1Down(H1Message, _Upstream, asyncio.Protocol):
    """floor-h1, downstream side: parse requests, forward each to this connection's upstream."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.t = transport
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self._reset_parse()
        self._connect(self.upstream_port, lambda: H1Up(self))

    def on_message_begin(self) -> None:
        H1Message.on_message_begin(self)
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.out.append(b"%s %s HTTP/1.1\r\n%s\r\n" % (self.parser.get_method(), self.url, b"".join(self.head)))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.t.close()
            return
        if self.out:
            self._to_upstream(self._take())


class H1Up(H1Message, asyncio.Protocol):
    """floor-h1, upstream side: parse responses, write each back rebuilt."""

    def __init__(self, down: H1Down) -> None:
        self.down = down
        self.reason = b""
        self._reset_parse()
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.t = transport

    def on_message_begin(self) -> None:
        H1Message.on_message_begin(self)
        self.reason = b""

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_headers_complete(self) -> None:
        self.out.append(b"HTTP/1.1 %d %s\r\n%s\r\n" % (self.parser.get_status_code(), self.reason,
                                                         b"".join(self.head)))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.t.close()
            return
        if self.out:
            self.down.t.write(self._take())

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.t.close()


H2_CONFIG = dict(client_side=False, header_encoding=None, validate_inbound_headers=True,
                 validate_outbound_headers=False, normalize_outbound_headers=False)


class H2Server(asyncio.Protocol):
    """One h2c connection (prior knowledge). Subclasses answer streams with ``send``."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.t = transport
        self.conn = H2Connection(config=H2Configuration(**H2_CONFIG))
        self.conn.initiate_connection()
        self.blocked: dict[int, bytes] = {}  # stream -> body left to send when the peer's window opens
        self.flush_scheduled = False
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        try:
            events = conn.receive_data(data)
        except ProtocolError:
            self.flush()
            self.t.close()
            return
        for ev in events:
            kind = type(ev)
            if kind is RequestReceived:
                self.on_request(ev.stream_id, ev.headers)
            elif kind is DataReceived:
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                self.on_data(ev.stream_id, ev.data)
            elif kind is StreamEnded:
                self.on_end(ev.stream_id)
            elif kind is StreamReset:
                self.blocked.pop(ev.stream_id, None)
                self.on_reset(ev.stream_id)
            elif kind is WindowUpdated:
                self._unblock(ev.stream_id)
            elif kind is ConnectionTerminated:
                self.flush()
                self.t.close()
                return
        self.flush()

    def on_request(self, stream_id: int, headers: list) -> None:
        pass

    def on_data(self, stream_id: int, data: bytes) -> None:
        pass

    def on_end(self, stream_id: int) -> None:
        pass

    def on_reset(self, stream_id: int) -> None:
        pass

    def send(self, stream_id: int, headers: list, body: bytes) -> None:
        try:
            self.conn.send_headers(stream_id, headers, end_stream=not body)
        except StreamClosedError:
            return
        if body:
            self._send_body(stream_id, body)

    def _send_body(self, stream_id: int, body: bytes) -> None:
        conn = self.conn
        while body:
            n = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size, len(body))
            if n <= 0:
                self.blocked[stream_id] = body
                return
            conn.send_data(stream_id, body[:n], end_stream=n == len(body))
            body = body[n:]

    def _unblock(self, stream_id: int) -> None:
        if not self.blocked:
            return
        for sid in [stream_id] if stream_id else list(self.blocked):
            body = self.blocked.pop(sid, None)
            if body is not None:
                try:
                    self._send_body(sid, body)
                except StreamClosedError:
                    pass

    def flush(self) -> None:
        self.flush_scheduled = False
        data = self.conn.data_to_send()
        if data and not self.t.is_closing():
            self.t.write(data)

    def flush_soon(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)


class _Date:
    """The Date header, formatted once a second."""

    second = -1
    value = b""

    @classmethod
    def get(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second, cls.value = now, email.utils.formatdate(now, usegmt=True).encode()
        return cls.value


class H2Terminate(H2Server):
    """floor-h2-terminate: every request answered here, as nginx answers it."""

    def on_end(self, stream_id: int) -> None:
        self.send(stream_id, [(b":status", b"200"), (b"server", b"nginx/1.22.1"), (b"date", _Date.get()),
                              (b"content-type", b"text/plain"), (b"content-length", b"13")], BODY)


class H1Pool:
    """Keep-alive HTTP/1.1 connections to the upstream, one request on each at a time, opened on demand."""

    def __init__(self, upstream_port: int, limit: int = 256) -> None:
        self.port = upstream_port
        self.limit = limit
        self.idle: list[H1PoolConn] = []
        self.waiting: collections.deque = collections.deque()
        self.opening = 0
        self.count = 0

    def request(self, data: bytes, owner: H2Proxy, stream_id: int) -> None:
        if self.idle:
            self.idle.pop().send(data, owner, stream_id)
            return
        self.waiting.append((data, owner, stream_id))
        if self.opening < len(self.waiting) and self.count < self.limit:
            self.opening += 1
            self.count += 1
            fut = asyncio.ensure_future(asyncio.get_running_loop().create_connection(
                lambda: H1PoolConn(self), UPSTREAM_HOST, self.port))
            fut.add_done_callback(self._opened)

    def _opened(self, fut: asyncio.Future) -> None:
        self.opening -= 1
        if fut.cancelled() or fut.exception() is not None:
            self.count -= 1
            while self.waiting:  # a floor has no retries: the waiting requests fail
                _, owner, sid = self.waiting.popleft()
                owner.upstream_failed(sid)
            return
        self.release(fut.result()[1])

    def release(self, conn: H1PoolConn) -> None:
        if self.waiting:
            conn.send(*self.waiting.popleft())
        else:
            self.idle.append(conn)

    def lost(self, conn: H1PoolConn) -> None:
        self.count -= 1
        if conn in self.idle:
            self.idle.remove(conn)


class H1PoolConn(asyncio.Protocol):
    """One upstream connection of the pool: the response parsed into status, h2 fields and body."""

    def __init__(self, pool: H1Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.owner: H2Proxy | None = None
        self.stream_id = 0
        self.fields: list = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.t = transport

    def send(self, data: bytes, owner: H2Proxy, stream_id: int) -> None:
        self.owner, self.stream_id = owner, stream_id
        self.t.write(data)

    def on_message_begin(self) -> None:
        self.fields = [(b":status", b"")]
        self.body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name not in HOP_BY_HOP:
            self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.fields[0] = (b":status", b"%d" % self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.respond(self.stream_id, self.fields, b"".join(self.body))
        if self.parser.should_keep_alive():
            self.pool.release(self)
        else:
            self.t.close()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.lost(self)
        if self.owner is not None:
            self.owner.upstream_failed(self.stream_id)


class H2Proxy(H2Server):
    """floor-h2-proxy: each request rebuilt as HTTP/1.1 and sent through the pool; the answer relayed."""

    pool: H1Pool  # set by serve()

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self.requests: dict[int, list] = {}  # stream -> [headers, body pieces]

    def on_request(self, stream_id: int, headers: list) -> None:
        self.requests[stream_id] = [headers, []]

    def on_data(self, stream_id: int, data: bytes) -> None:
        if (req := self.requests.get(stream_id)) is not None:
            req[1].append(data)

    def on_end(self, stream_id: int) -> None:
        headers, pieces = self.requests.pop(stream_id)
        method = path = authority = b""
        lines = []
        for name, value in headers:
            if name[0] == 58:  # b":"
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
            elif name != b"host" and name != b"content-length":  # host from :authority; the length below
                lines.append(b"%s: %s\r\n" % (name, value))
        body = b"".join(pieces)
        if body or method in (b"POST", b"PUT", b"PATCH"):
            lines.append(b"content-length: %d\r\n" % len(body))
        self.pool.request(b"%s %s HTTP/1.1\r\nhost: %s\r\n%s\r\n%s" % (method, path, authority, b"".join(lines),
                                                                       body), self, stream_id)

    def on_reset(self, stream_id: int) -> None:
        self.requests.pop(stream_id, None)

    def respond(self, stream_id: int, fields: list, body: bytes) -> None:
        if not self.t.is_closing():
            self.send(stream_id, fields, body)
            self.flush_soon()

    def upstream_failed(self, stream_id: int) -> None:
        self.respond(stream_id, [(b":status", b"502"), (b"content-length", b"0")], b"")


def serve(mode: str, port: int, upstream_port: int) -> None:
    import uvloop

    factories = {
        "h1": lambda: H1Down(upstream_port),
        "h1-bytes": lambda: RelayDown(upstream_port),
        "h2-terminate": H2Terminate,
        "h2-proxy": H2Proxy,
    }

    async def run() -> None:
        H2Proxy.pool = H1Pool(upstream_port)
        server = await asyncio.get_running_loop().create_server(factories[mode], "127.0.0.1", port, backlog=4096)
        print(f"floor {mode} on {port} (pid {os.getpid()})", flush=True)
        async with server:
            await server.serve_forever()

    uvloop.run(run())


# --------------------------------------------------------------------------- harness


@dataclass
class Target:
    label: str
    proto: str  # "h1" or "h2"
    mode: str = ""  # a floor server's --serve mode; "" for HAProxy
    proc: object = None  # ChildProcess
    url: str = ""
    port: int = 0
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    command: str = ""


TARGETS = [
    ("haproxy", "h1", ""), ("floor-h1", "h1", "h1"), ("floor-h1-bytes", "h1", "h1-bytes"),
    ("haproxy-h2", "h2", ""), ("floor-h2-terminate", "h2", "h2-terminate"), ("floor-h2-proxy", "h2", "h2-proxy"),
]
BASELINE = {"h1": "haproxy", "h2": "haproxy-h2"}
GOAL = {"h1": 0.5, "h2": 0.4}  # issue 14's targets, as a fraction of HAProxy's req/s


def floor_argv(mode: str, port: int, upstream_port: int) -> list[str]:
    import run as bench

    return bench.pinned(bench.PROXY_CPU, [sys.executable, str(Path(__file__).resolve()), "--serve", mode,
                                          "--port", str(port), "--upstream-port", str(upstream_port)])


def start_target(t: Target, upstream_port: int, workdir: Path) -> None:
    import h1_paired
    import h2c
    import run as bench

    from meshkeeper.demo.process import ChildProcess, wait_until

    if t.proto == "h1":
        if not t.mode:
            ref = h1_paired.Target("haproxy")
            h1_paired.start_reference(ref, upstream_port, workdir)
            t.proc, t.url = ref.proc, ref.url
        else:
            t.port = bench.free_port()
            t.url = f"http://127.0.0.1:{t.port}/"
            t.proc = bench.start_server(floor_argv(t.mode, t.port, upstream_port), t.label, workdir, t.url)
        return
    if not t.mode:
        t.proc, t.port = h2c.start_h2_reference("haproxy", upstream_port, workdir)
        return
    t.port = bench.free_port()
    proc = ChildProcess(floor_argv(t.mode, t.port, upstream_port), name=t.label, log_dir=workdir)
    proc.spawn()
    t.proc = proc

    def up() -> bool:
        if not proc.running():
            raise RuntimeError(f"{t.label} exited with {proc.returncode}: {proc.stderr_tail(5)}")
        try:
            return h2c.probe_h2(t.port, 1)[0]
        except OSError:
            return False

    wait_until(up, 15, 0.05, f"{t.label} answers h2c on {t.port}")


def steal_ticks(cpu: str) -> tuple[int, int]:
    """(steal, total) jiffies of one CPU, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            values = [int(v) for v in line.split()[1:]]
            return values[7], sum(values[:8])
    return 0, 0


def measure(t: Target, r: int, duration: int, connections: int, workdir: Path) -> str:
    """One run of the load generator against ``t``; appends its figures and returns its line."""
    import h1_paired
    import h2c
    import run as bench

    if t.proto == "h1":
        before = h1_paired.cpu_seconds(t.proc)
        rps, errors, t.command = bench.run_wrk(t.url, duration, connections, workdir, f"{t.label}.{r}")
    else:
        mark: dict[str, float] = {}
        timer = threading.Timer(H2_WARMUP_S, lambda: mark.setdefault("cpu", h1_paired.cpu_seconds(t.proc)))
        timer.start()
        try:
            rps, bad, t.command = h2c.run_h2load(t.port, duration, workdir, f"{t.label}.{r}")
        finally:
            timer.cancel()
            timer.join()
        before = mark["cpu"]
        errors = f"{bad} failed or non-2xx" if bad else ""
    cpu = h1_paired.cpu_seconds(t.proc) - before
    t.rps.append(rps)
    t.cpu_us.append(cpu / (rps * duration) * 1e6)
    t.busy.append(cpu / duration)
    if errors:
        t.errors.append(f"round {r + 1}: {errors}")
    return (f"round {r + 1}: {t.label} {rps:,.0f} req/s, {t.cpu_us[-1]:.1f} CPU µs/request, busy "
            f"{t.busy[-1]:.2f} {errors}")


def wait_quiet(r: int) -> tuple[float, float]:
    """Wait until the 1-minute load average is below QUIET_LOAD (at most QUIET_MAX_S). (load, seconds waited)."""
    start = time.monotonic()
    while (load := os.getloadavg()[0]) >= QUIET_LOAD:
        waited = time.monotonic() - start
        if waited >= QUIET_MAX_S:
            print(f"round {r + 1}: load average still {load:.2f} after {waited:.0f} s; running anyway", flush=True)
            break
        print(f"round {r + 1}: load average {load:.2f}, waiting", flush=True)
        time.sleep(QUIET_POLL_S)
    return load, time.monotonic() - start


def _range(values: list[float], fmt: str) -> str:
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}"


def table(targets: list[Target], proto: str) -> str:
    rows = [t for t in targets if t.proto == proto]
    base = next(t for t in rows if t.label == BASELINE[proto])
    out = ["| target | median req/s | range | vs HAProxy (median of rounds) | range | CPU µs/request (median) "
           "| range | HAProxy µs / target µs (median of rounds) | proxy CPU busy (median) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in rows:
        ratios = [a / b for a, b in zip(t.rps, base.rps, strict=True)]
        by_cpu = [b / a for a, b in zip(t.cpu_us, base.cpu_us, strict=True)]
        out.append(f"| {t.label} | {statistics.median(t.rps):,.0f} | {_range([x / 1000 for x in t.rps], '.1f')}k "
                   f"| {statistics.median(ratios):.3f} | {_range(ratios, '.2f') if t is not base else '-'} "
                   f"| {statistics.median(t.cpu_us):.1f} | {_range(t.cpu_us, '.1f')} "
                   f"| {statistics.median(by_cpu):.3f} | {statistics.median(t.busy):.2f} |")
    return "\n".join(out)


def budget(targets: list[Target], proto: str) -> str:
    """The CPU per request a proxy may spend to reach the goal, two ways, against the floors' CPU."""
    rows = [t for t in targets if t.proto == proto]
    base = next(t for t in rows if t.label == BASELINE[proto])
    goal = GOAL[proto]
    need = goal * statistics.median(base.rps)
    by_rps = 1e6 / need  # a proxy saturating its CPU at this cost does `need` req/s
    by_cpu = statistics.median(base.cpu_us) / goal  # both proxies CPU-bound: throughput ratio = CPU ratio
    floors = ", ".join(f"{t.label} {statistics.median(t.cpu_us):.1f} µs" for t in rows if t.mode)
    return (f"Budget at {goal}x HAProxy: {by_rps:.1f} µs per request for a proxy saturating its CPU to do "
            f"{need:,.0f} req/s ({goal}x HAProxy's median req/s here), or {by_cpu:.1f} µs ({goal}x HAProxy's "
            f"CPU per request: the ratio when both proxies, not the load CPU, are the limit). Floors: {floors}.")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=int, default=5, help="seconds of wrk / h2load per target per round (default 5)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--workdir", type=Path, default=BENCH_DIR / "out" / "floor")
    p.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration < 1:
        p.error("--rounds and --duration must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.upstream_port)
        return 0
    import run as bench

    os.environ["PATH"] = bench._path()
    bench.preflight()
    os.sched_setaffinity(0, {int(bench.LOAD_CPU)})  # everything started here inherits the load CPU
    workdir = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    load_before = os.getloadavg()
    started = time.monotonic()
    targets = [Target(label, proto, mode) for label, proto, mode in TARGETS]
    procs = []  # the upstream; the targets' processes are stopped from ``targets``
    try:
        upstream_port = bench.free_port()
        conf = bench.render("nginx-upstream.conf", workdir, port=upstream_port)
        (workdir / "nginx-upstream-tmp").mkdir()
        procs.append(bench.start_server(bench.pinned(bench.LOAD_CPU, ["nginx", "-c", str(conf)]), "upstream",
                                        workdir, f"http://127.0.0.1:{upstream_port}/"))
        for t in targets:
            start_target(t, upstream_port, workdir)
            measure(t, -1, 2, args.connections, workdir)  # warm-up, discarded below
            for figures in (t.rps, t.cpu_us, t.busy, t.errors):
                figures.clear()
            print(f"{t.label}: {t.url or f'h2c port {t.port}'} (pid {t.proc.pid})", flush=True)
        rounds = []
        for r in range(args.rounds):
            load_start, waited = wait_quiet(r)
            steal0 = steal_ticks(bench.PROXY_CPU)
            k = r % len(targets)
            order = targets[k:] + targets[:k]
            for t in order:
                print(measure(t, r, args.duration, args.connections, workdir), flush=True)
            steal1 = steal_ticks(bench.PROXY_CPU)
            steal = (steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1])
            rounds.append({"round": r + 1, "load_start": load_start, "waited_s": round(waited),
                           "load_end": os.getloadavg()[0], "steal_proxy_cpu": steal,
                           "order": [t.label for t in order]})
            print(f"round {r + 1}: load average {load_start:.2f} at the start (waited {waited:.0f} s), "
                  f"{rounds[-1]['load_end']:.2f} at the end; steal on CPU {bench.PROXY_CPU} {steal:.1%}", flush=True)
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        cmd = shlex.join([".venv/bin/python", "bench/floor.py", *argv])
        h1_cmd = next(t.command for t in targets if t.proto == "h1")
        h2_cmd = next(t.command for t in targets if t.proto == "h2")
        print(f"\n{now}, `{cmd}`: {args.rounds} rounds of six targets, {args.duration} s each, order rotating; "
              f"{time.monotonic() - started:.0f} s in all; load average (1 min) before {load_before[0]:.2f}, "
              f"after {os.getloadavg()[0]:.2f}.\n")
        print(f"HTTP/1.1 (`{h1_cmd}`, port varies):\n")
        print(table(targets, "h1"))
        print(f"\n{budget(targets, 'h1')}\n")
        print(f"HTTP/2 (`{h2_cmd}`, port varies; CPU counted from the end of the warm-up):\n")
        print(table(targets, "h2"))
        print(f"\n{budget(targets, 'h2')}\n")
        print("| round | load average at start | waited | load average at end | steal on the proxy CPU |")
        print("|---:|---:|---:|---:|---:|")
        for x in rounds:
            print(f"| {x['round']} | {x['load_start']:.2f} | {x['waited_s']} s | {x['load_end']:.2f} "
                  f"| {x['steal_proxy_cpu']:.1%} |")
        for t in targets:
            if t.errors:
                print(f"\n{t.label}: {'; '.join(t.errors)}")
        (workdir / "rounds.json").write_text(json.dumps({
            "command": cmd, "time": now, "rounds": rounds,
            "targets": [{"label": t.label, "proto": t.proto, "rps": t.rps, "cpu_us": t.cpu_us, "busy": t.busy,
                         "errors": t.errors, "command": t.command} for t in targets]}, indent=1))
        return 0
    finally:
        for proc in [t.proc for t in reversed(targets) if t.proc is not None] + procs:
            proc.terminate(5)


if __name__ == "__main__":
    sys.exit(main())
