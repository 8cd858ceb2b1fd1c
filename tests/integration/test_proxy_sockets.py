"""The HTTP proxy on real sockets: a real listener on 127.0.0.1:0, real upstream servers
(``http.server``) and real clients (``http.client``, ``urllib`` through ``HTTP_PROXY``).

The proxy runs on its own uvloop thread; tests talk to it with blocking clients. No ZooKeeper.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import socket
import threading
import tracemalloc
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import uvloop

from sidecar.config import ClusterConfig, EndpointConfig, Route, RouteConfig, VirtualHost
from sidecar.proxy import ListenerContext, bind_socket, start_listener
from sidecar.upstream import ClusterManager

MB = 1024 * 1024


class Backend(BaseHTTPRequestHandler):
    """An upstream app: GET answers its name (or streams /big?bytes=N), POST returns size and sha256."""

    protocol_version = "HTTP/1.1"
    server: BackendServer

    def setup(self) -> None:
        super().setup()
        # Like real servers: no Nagle delay between the head and body writes.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.lock:
            self.server.accepts += 1

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/big"):
            size = int(self.path.split("=", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = b"b" * (64 * 1024)
            sent = 0
            while sent < size:
                piece = block[: size - sent]
                self.wfile.write(piece)
                sent += len(piece)
            return
        body = self.server.name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        digest = hashlib.sha256()
        size = 0
        for piece in self._body():
            digest.update(piece)
            size += len(piece)
        body = json.dumps({"size": size, "sha256": digest.hexdigest(),
                           "chunked": "chunked" in self.headers.get("Transfer-Encoding", "")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> Iterator[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length", "0"))
        while remaining:
            piece = self.rfile.read(min(remaining, 256 * 1024))
            remaining -= len(piece)
            yield piece


class BackendServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), Backend)
        self.name = name
        self.accepts = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class Sidecar:
    """A listener and its ClusterManager on a uvloop thread."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.clusters = ClusterManager()
        self.runtime = ListenerContext("outbound", self.clusters)
        self.listener = self.run(start_listener(self.runtime, bind_socket("127.0.0.1", 0)))
        self.port = self.listener.port

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def wrapper() -> Any:
            return fn()

        return self.run(wrapper())

    def route(self, cluster: str, endpoints: list[tuple[int, int]], timeout: float = 15.0) -> None:
        def apply() -> None:
            self.clusters.update_clusters({cluster: ClusterConfig(cluster, connect_timeout=1.0)})
            self.clusters.update_endpoints(
                cluster, tuple(EndpointConfig("127.0.0.1", port, weight=w) for port, w in endpoints))
            self.runtime.set_route_config(RouteConfig("outbound", (
                VirtualHost("svc", ("svc", "svc:*"), (Route("/", cluster, timeout=timeout),)),)))

        self.call(apply)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def close(self) -> None:
        self.run(self.listener.close())
        self.call(self.clusters.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@pytest.fixture
def sidecar() -> Iterator[Sidecar]:
    car = Sidecar()
    try:
        yield car
    finally:
        car.close()


@pytest.fixture
def backends() -> Iterator[list[BackendServer]]:
    servers = [BackendServer(name) for name in ("a", "b", "c")]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def get(conn: http.client.HTTPConnection, path: str = "/", host: str = "svc") -> tuple[int, bytes]:
    conn.request("GET", path, headers={"Host": host})
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_weights_1_2_7_split_exactly_over_1000_requests(sidecar: Sidecar, backends: list[BackendServer]) -> None:
    sidecar.route("outbound|svc.default", [(b.port, w) for b, w in zip(backends, (1, 2, 7), strict=True)])
    conn = sidecar.connection()
    counts = Counter(get(conn)[1].decode() for _ in range(1000))
    conn.close()
    assert counts == {"a": 100, "b": 200, "c": 700}


def test_keep_alive_reuses_upstream_connections(sidecar: Sidecar, backends: list[BackendServer]) -> None:
    backend = backends[0]
    sidecar.route("c", [(backend.port, 1)])
    conn = sidecar.connection()
    for _ in range(200):
        assert get(conn) == (200, b"a")
    conn.close()
    for _ in range(20):  # new downstream connections, one after the other, share the pooled one
        other = sidecar.connection()
        assert get(other) == (200, b"a")
        other.close()
    assert backend.accepts == 1
    stats = sidecar.call(lambda: sidecar.clusters.get("c").stats.snapshot())
    assert stats["upstream_cx_total"] == 1 and stats["upstream_rq_2xx"] == 220


def test_absolute_form_through_http_proxy(sidecar: Sidecar, backends: list[BackendServer]) -> None:
    sidecar.route("c", [(backends[1].port, 1)])
    proxy = f"http://127.0.0.1:{sidecar.port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    with opener.open("http://svc/items?x=1", timeout=10) as resp:
        assert resp.status == 200 and resp.read() == b"b"
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open("http://unknown/", timeout=10)
    assert info.value.code == 404 and info.value.headers["x-meshkeeper-flags"] == "NR"


def test_large_bodies_stream_both_ways_without_whole_buffering(sidecar: Sidecar, backends: list[BackendServer]) -> None:
    sidecar.route("c", [(backends[0].port, 1)])
    size = 20 * MB
    tracemalloc.start()
    try:
        # Download, read slowly at first so that a proxy without flow control would pile it up.
        conn = sidecar.connection()
        conn.request("GET", f"/big?bytes={size}", headers={"Host": "svc"})
        resp = conn.getresponse()
        assert resp.status == 200
        received = 0
        for i in range(size // (64 * 1024) + 1):
            piece = resp.read(64 * 1024)
            if not piece:
                break
            received += len(piece)
            if i < 40:
                threading.Event().wait(0.002)  # a slow reader, not a wait for state
        assert received == size

        # Upload with Content-Length, then chunked.
        block = bytes(range(256)) * 256  # 64 KiB
        digest = hashlib.sha256()
        for _ in range(size // len(block)):
            digest.update(block)
        expected = digest.hexdigest()
        conn.request("POST", "/up", body=iter([block] * (size // len(block))),
                     headers={"Host": "svc", "Content-Length": str(size)})
        assert json.loads(conn.getresponse().read()) == {"size": size, "sha256": expected, "chunked": False}
        conn.request("POST", "/up", body=iter([block] * (size // len(block))), headers={"Host": "svc"},
                     encode_chunked=True)
        assert json.loads(conn.getresponse().read()) == {"size": size, "sha256": expected, "chunked": True}
        conn.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Three 20 MB transfers went through; what was alive at once stayed a fraction of one.
    # (about 1.3 MB here with flow control, 16 MB without it)
    assert peak < 6 * MB, f"peak traced memory {peak / MB:.1f} MB"


def test_no_endpoint_and_dead_endpoint(sidecar: Sidecar) -> None:
    closed = bind_socket("127.0.0.1", 0)
    dead_port = closed.getsockname()[1]
    closed.close()
    sidecar.route("c", [(dead_port, 1)])
    conn = sidecar.connection()
    conn.request("GET", "/", headers={"Host": "svc"})
    resp = conn.getresponse()
    assert resp.status == 503 and resp.headers["x-meshkeeper-flags"] == "UF"
    assert json.loads(resp.read())["flags"] == "UF"
    sidecar.call(lambda: sidecar.clusters.update_endpoints("c", ()))
    conn.request("GET", "/", headers={"Host": "svc"})
    resp = conn.getresponse()
    assert resp.status == 503 and resp.headers["x-meshkeeper-flags"] == "UH"
    resp.read()
    conn.close()


def test_drain_lets_in_flight_requests_finish(sidecar: Sidecar, backends: list[BackendServer]) -> None:
    sidecar.route("c", [(backends[0].port, 1)])
    busy = sidecar.connection()
    busy.request("GET", f"/big?bytes={4 * MB}", headers={"Host": "svc"})
    resp = busy.getresponse()
    first = resp.read(1024)  # the response has started; now drain
    drained = asyncio.run_coroutine_threadsafe(sidecar.listener.drain(10.0), sidecar.loop)
    rest = resp.read()
    assert len(first) + len(rest) == 4 * MB
    assert resp.headers.get("Connection") is None  # head was sent before the drain began
    assert drained.result(timeout=10) is True
    with pytest.raises(OSError):
        fresh = sidecar.connection()
        fresh.request("GET", "/", headers={"Host": "svc"})
        fresh.getresponse()
    busy.close()


def test_both_sides_write_with_nagle_off(sidecar: Sidecar, backends: list[BackendServer]) -> None:
    # Our own writes never wait for a peer's delayed ACK (sidecar.quickack covers the peers' Nagle).
    sidecar.route("c", [(backends[0].port, 1)])
    conn = sidecar.connection()
    assert get(conn) == (200, b"a")

    def nodelay() -> tuple[list[int], list[int]]:
        down = [c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                for c in sidecar.runtime.connections if c.transport is not None]
        up = [pc.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
              for ep in sidecar.clusters.get("c").endpoints.values() for pc in ep.pool._idle]
        return down, up

    down, up = sidecar.call(nodelay)
    conn.close()
    assert down and up and all(down) and all(up), (down, up)
