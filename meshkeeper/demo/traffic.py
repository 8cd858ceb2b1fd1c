"""Demo traffic: a steady request rate to the frontend, and who answered.

The frontend app replies ``{"frontend": {...}, "catalog": {"instance": "127.0.0.1:P", ...}}``, so each
reply names the catalog instance the frontend's sidecar picked. :class:`TrafficDriver` counts them;
:func:`share_table` renders the counts next to the weights the instances registered with.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """An instance we expect answers from: its address as it reports itself, and its labels."""

    address: str
    version: str
    weight: int


class TrafficDriver:
    """``rate`` GET requests per second to ``host:port`` + ``path``, spread over a few keep-alive
    connections (one thread each), until :meth:`stop`."""

    def __init__(
        self, host: str, port: int, rate: float, downstream: str, path: str = "/", connections: int = 4
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.downstream = downstream
        self.interval = connections / rate
        self.connections = connections
        self.lock = threading.Lock()
        self.by_instance: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for n in range(self.connections):
            t = threading.Thread(target=self._loop, args=(n,), name=f"traffic-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        with self.lock:
            return Counter(self.by_instance), Counter(self.errors)

    def _loop(self, n: int) -> None:
        conn: http.client.HTTPConnection | None = None
        # Stagger the connections so that requests are evenly spread within each interval.
        next_at = time.monotonic() + self.interval * n / self.connections
        while not self._stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            next_at = max(next_at + self.interval, time.monotonic() - self.interval)
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = resp.read()
                self._record(resp.status, body)
            except (OSError, http.client.HTTPException) as exc:
                self._count_error(type(exc).__name__)
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _record(self, status: int, body: bytes) -> None:
        try:
            reply = json.loads(body)
        except ValueError:
            reply = {}
        downstream = reply.get(self.downstream) if isinstance(reply, dict) else None
        if status == 200 and isinstance(downstream, dict) and "instance" in downstream:
            with self.lock:
                self.by_instance[downstream["instance"]] += 1
            return
        detail = [f"HTTP {status}"]
        if isinstance(reply, dict):
            if reply.get("flags"):
                detail.append(str(reply["flags"]))
            if reply.get("status"):
                detail.append(f"({self.downstream} answered {reply['status']})")
            elif reply.get("error"):
                detail.append(f"({str(reply['error'])[:60]})")
        self._count_error(" ".join(detail))

    def _count_error(self, what: str) -> None:
        with self.lock:
            self.errors[what] += 1


def share_table(
    targets: list[Target], total: Counter[str], last: Counter[str], errors: Counter[str], elapsed: float
) -> list[str]:
    """Rows of requests per instance: last second, total, share of total, and the weight's share."""
    weight_sum = sum(t.weight for t in targets) or 1
    answered = sum(total.values())
    rows = [
        f"{'instance':<22} {'version':<8} {'weight':>6} {'expected':>9} {'last 1s':>8} {'total':>8} {'share':>7}",
        "-" * 74,
    ]
    known = {t.address for t in targets}
    for t in targets:
        share = total[t.address] / answered if answered else 0.0
        rows.append(
            f"{t.address:<22} {t.version:<8} {t.weight:>6} {t.weight / weight_sum:>9.1%} {last[t.address]:>8}"
            f" {total[t.address]:>8} {share:>7.1%}"
        )
    for address in sorted(set(total) - known):
        rows.append(f"{address:<22} {'?':<8} {'':>6} {'':>9} {last[address]:>8} {total[address]:>8}")
    failed = sum(errors.values())
    rate = (answered + failed) / elapsed if elapsed > 0 else 0.0
    rows.append("-" * 74)
    rows.append(f"{answered} answered, {failed} failed, {rate:.1f} req/s over {elapsed:.0f}s")
    for what, count in errors.most_common(5):
        rows.append(f"  {count:>6} x {what}")
    return rows
