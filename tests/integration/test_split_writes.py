"""Apps and clients that write one message in two sends with Nagle on are not slowed by the mesh.

A plain ``http.server`` app writes the response head, then the body; with Nagle on, the body
waits for the ACK of the head, which Linux delays by 40 ms on a keep-alive connection unless the
reader asks for an immediate one. The sidecar's pools make every upstream connection keep-alive,
so this is what any such app would see behind a mesh (issue 11; sidecar.quickack). Clients that
send a request head and its body in two writes meet the same delay on the downstream side.

Real ZooKeeper, a real control plane, two real sidecars (the app's and a caller's) and a real app
on real sockets. Each scenario is 200 sequential requests after a short warm-up; the bound is on
the added median (under 1 ms over the app answering fresh connections directly, where no ACK is
ever delayed) and on the slowest request (under 20 ms, half a delayed ACK).
"""

from __future__ import annotations

import http.client
import socket
import statistics
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from tests.harness import wait_until
from tests.harness.apps import SplitWritesApp

pytestmark = pytest.mark.integration

REQUESTS = 200
WARM_UP = 20
MAX_ADDED_P50_MS = 1.0
MAX_ANY_MS = 20.0
BODY = b"order=7&item=42"

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fresh_get(port: int) -> Callable[[], None]:
    """A GET on a new connection each time, as urllib makes them."""

    def one() -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/items", headers={"Host": "catalog"})
        with _NO_PROXY.open(req, timeout=10) as resp:
            assert resp.status == 200 and resp.read()

    return one


def keep_alive_get(port: int) -> Callable[[], None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def one() -> None:
        conn.request("GET", "/items", headers={"Host": "catalog"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()

    return one


class SplitPost:
    """POSTs on one keep-alive connection (or a new one each time), head and body in two sends, Nagle on."""

    def __init__(self, port: int, keep_alive: bool) -> None:
        self.port, self.keep_alive = port, keep_alive
        self.sock: socket.socket | None = None
        self.reader = None

    def __call__(self) -> None:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            self.reader = self.sock.makefile("rb")
        head = f"POST /orders HTTP/1.1\r\nHost: catalog\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
        self.sock.sendall(head)
        self.sock.sendall(BODY)
        status = self.reader.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
        length = 0
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = self.reader.read(length)
        assert len(body) == length and (BODY in body or b'"body_bytes": %d' % len(BODY) in body), body
        if not self.keep_alive:
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.reader.close()
            self.sock.close()
            self.sock = None


def latencies_ms(one: Callable[[], None]) -> list[float]:
    for _ in range(WARM_UP):
        one()
    out = []
    for _ in range(REQUESTS):
        start = time.perf_counter()
        one()
        out.append((time.perf_counter() - start) * 1000)
    return out


@pytest.fixture
def split_app() -> Iterator[SplitWritesApp]:
    app = SplitWritesApp().start()
    try:
        yield app
    finally:
        app.stop()


def start_pair(procs, zk_server, namespace, app_port: int):
    """The app's sidecar (catalog) and a caller's sidecar (frontend) that sees the app serving."""
    cp = procs.controlplane(zk_server.hosts)
    target = f"127.0.0.1:{cp.port('xds_port')}"
    catalog = procs.sidecar("catalog", app_port, cp=target, zk=zk_server.hosts, namespace=namespace)
    frontend = procs.sidecar("frontend", app_port, cp=target, zk=zk_server.hosts, namespace=namespace)
    outbound = frontend.port("outbound_port")

    def routes() -> bool:
        try:
            keep_alive_get(outbound)()
        except (AssertionError, OSError, http.client.HTTPException):
            return False
        return True

    wait_until(routes, 15, 0.05, "the caller's sidecar routes to catalog")
    return catalog.port("inbound_port"), outbound


def check(label: str, samples: list[float], baseline_p50: float, failures: list[str]) -> None:
    p50, worst = statistics.median(samples), max(samples)
    slow = sum(1 for s in samples if s > MAX_ANY_MS)
    if p50 - baseline_p50 >= MAX_ADDED_P50_MS or worst >= MAX_ANY_MS:
        failures.append(f"{label}: p50 {p50:.2f} ms (direct {baseline_p50:.2f} ms), max {worst:.2f} ms, "
                        f"{slow} of {len(samples)} over {MAX_ANY_MS:.0f} ms")


def run_scenarios(app_port: int, inbound: int, outbound: int) -> list[str]:
    direct_get = statistics.median(latencies_ms(fresh_get(app_port)))
    direct_post = statistics.median(latencies_ms(SplitPost(app_port, keep_alive=False)))
    failures: list[str] = []
    for where, port in (("caller's sidecar -> app's sidecar", outbound), ("app's sidecar", inbound)):
        check(f"{where}, GET on new connections", latencies_ms(fresh_get(port)), direct_get, failures)
        check(f"{where}, GET on one keep-alive connection", latencies_ms(keep_alive_get(port)), direct_get, failures)
        post = SplitPost(port, keep_alive=True)
        try:
            check(f"{where}, POST with its body in a second write, keep-alive",
                  latencies_ms(post), direct_post, failures)
        finally:
            post.close()
    return failures


def test_http_server_app_with_nagle_on_is_not_delayed(procs, zk_server, namespace, split_app):
    inbound, outbound = start_pair(procs, zk_server, namespace, split_app.port)
    failures = run_scenarios(split_app.port, inbound, outbound)
    assert not failures, "\n".join(failures)


def test_demo_app_stays_as_fast(procs, zk_server, namespace):
    app = procs.app("catalog")
    inbound, outbound = start_pair(procs, zk_server, namespace, app.port("port"))
    failures = run_scenarios(app.port("port"), inbound, outbound)
    assert not failures, "\n".join(failures)
