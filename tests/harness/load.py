"""Bounded load for integration tests: timed requests, a burst of concurrent ones, a paced stream.

Every generator here is bounded by a request count or a duration, uses plain ``http.client`` on
keep-alive connections (one per thread), and records per request the status, the response headers
and the latency measured around the exchange. A connection error is recorded as status 0 (the
``error`` field says which), never raised, so a test asserts on everything that happened.

    results = paced("127.0.0.1", port, "/", rate=300, duration=3.0, host="catalog")
    admitted = sum(r.status == 200 for r in results)
"""

from __future__ import annotations

import http.client
import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Result:
    status: int  # 0: no response (see ``error``)
    latency: float  # seconds, from just before the request to the end of the response body
    sent_at: float = 0.0  # time.monotonic() just before the request
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""

    @property
    def flags(self) -> str:
        return self.headers.get("x-meshkeeper-flags", "")

    @property
    def instance(self) -> str:
        return self.headers.get("x-app-instance", "")


class Connection:
    """One keep-alive HTTP/1.1 connection that reconnects after an error."""

    def __init__(self, port: int, host: str = "catalog", address: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.address, self.port, self.host, self.timeout = address, port, host, timeout
        self.conn: http.client.HTTPConnection | None = None

    def get(self, path: str = "/") -> Result:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.address, self.port, timeout=self.timeout)
        started = time.monotonic()
        try:
            self.conn.request("GET", path, headers={"Host": self.host})
            resp = self.conn.getresponse()
            resp.read()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            if resp.will_close:
                self.close()
            return Result(resp.status, time.monotonic() - started, started, headers)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return Result(0, time.monotonic() - started, started, error=repr(exc))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def sequential(port: int, n: int, path: str = "/", host: str = "catalog") -> list[Result]:
    """``n`` requests one after another on one connection."""
    conn = Connection(port, host)
    try:
        return [conn.get(path) for _ in range(n)]
    finally:
        conn.close()


def concurrent(port: int, n: int, path: str = "/", host: str = "catalog", timeout: float = 10.0) -> list[Result]:
    """``n`` requests at once, each on a connection of its own, released together by a barrier."""
    conns = [Connection(port, host, timeout=timeout) for _ in range(n)]
    for c in conns:  # connect first, so the barrier releases requests, not handshakes
        c.conn = http.client.HTTPConnection(c.address, c.port, timeout=timeout)
        c.conn.connect()
    results: list[Result | None] = [None] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        results[i] = conns[i].get(path)

    _run_threads([lambda i=i: one(i) for i in range(n)])
    for c in conns:
        c.close()
    return [r for r in results if r is not None]


def paced(port: int, path: str = "/", *, rate: float, duration: float, host: str = "catalog",
          workers: int = 4) -> list[Result]:
    """An open-loop stream: request ``i`` is sent at ``start + i / rate`` for ``duration`` seconds.

    ``workers`` threads share the schedule, each on its own connection; a worker that falls behind
    sends at once (it never skips a slot), so the offered load is ``rate`` as long as responses
    are faster than ``workers / rate``. Callers should check ``sent_at`` to see it was.
    """
    total = math.floor(rate * duration)
    slots = itertools.count()  # next() on a count is atomic under the GIL
    start = time.monotonic() + 0.05
    results: list[Result] = []
    lock = threading.Lock()

    def worker() -> None:
        conn = Connection(port, host)
        try:
            while (i := next(slots)) < total:
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # pacing, not waiting for state
                r = conn.get(path)
                with lock:
                    results.append(r)
        finally:
            conn.close()

    _run_threads([worker] * workers)
    return sorted(results, key=lambda r: r.sent_at)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _run_threads(targets: Sequence[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
