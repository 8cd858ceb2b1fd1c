"""Listener limits on real sockets: a listener on 127.0.0.1:0 on its own uvloop thread (as in
``test_proxy_sockets``), the sweep on its real timer, and raw-socket clients. No ZooKeeper."""

from __future__ import annotations

import socket
import time

from sidecar.config import RateLimitConfig
from sidecar.proxy.ratelimit import TokenBucket
from tests.integration.test_proxy_sockets import Sidecar, sidecar  # noqa: F401  (fixture)
from tests.unit.test_http_proxy import assert_local_reply, parse_responses


def read_until_closed(sock: socket.socket, limit: float) -> bytes:
    """Everything the proxy sends until it closes the connection; fails after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"connection still open after {limit} s; got {data!r}"
        sock.settimeout(remaining)
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece


def test_slowloris_gets_408_and_close_on_the_sweep_timer(sidecar: Sidecar) -> None:  # noqa: F811
    sidecar.call(lambda: sidecar.runtime.set_limits(None, 0.5, 0.0))
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: svc\r\nX-Slow: ")
        data = read_until_closed(sock, 10.0)
        elapsed = time.monotonic() - started
    resp = parse_responses(data)
    assert len(resp) == 1
    assert_local_reply(resp[0], 408, "DT")
    assert elapsed >= 0.5
    assert elapsed < 0.5 + 2 * 0.25 + 1.0  # two sweep periods, plus slack for a loaded machine
    assert sidecar.call(lambda: sidecar.runtime.stats.downstream_rq_header_timeout) == 1


def test_idle_connection_is_closed_and_counted(sidecar: Sidecar) -> None:  # noqa: F811
    sidecar.call(lambda: sidecar.runtime.set_limits(None, 0.0, 0.5))
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n")
        started = time.monotonic()
        data = read_until_closed(sock, 10.0)
        elapsed = time.monotonic() - started
    assert [r["status"] for r in parse_responses(data)] == [404]
    assert 0.5 <= elapsed < 0.5 + 2 * 0.25 + 1.0
    assert sidecar.call(lambda: sidecar.runtime.stats.downstream_cx_idle_timeout) == 1
    deadline = time.monotonic() + 5
    while sidecar.call(lambda: sidecar.runtime.sweeping):  # no connection left: no sweep
        assert time.monotonic() < deadline


def test_rate_limit_answers_429_rl(sidecar: Sidecar) -> None:  # noqa: F811
    limit = RateLimitConfig(max_tokens=2, tokens_per_fill=1, fill_interval=3600.0)
    sidecar.call(lambda: sidecar.runtime.set_limits(TokenBucket(limit), 0.0, 0.0))
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n" * 2
                     + b"GET / HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n")
        resp = parse_responses(read_until_closed(sock, 10.0))
    assert [r["status"] for r in resp] == [404, 404, 429]
    assert_local_reply(resp[2], 429, "RL")
    assert sidecar.call(lambda: sidecar.runtime.stats.ratelimit_rate_limited) == 1
