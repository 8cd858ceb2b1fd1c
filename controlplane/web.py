"""The control plane's HTTP port (15014): ``/healthz``, ``/metrics``, ``/api/proxies``, ``/api/load``.

Read-only views over the watch, the xDS cache, the proxy registry and the load store, served by
:mod:`meshkeeper.httpd`. Handlers of whole path trees are mounted on ``mounts``: the console and
its JSON API (controlplane.console, docs/console.md) and the trace store's Jaeger query API
(controlplane.tracestore, docs/tracing.md).

``GET /healthz`` answers 200 while the process serves; ``registry_snapshot`` is null until the
first complete registry snapshot (until then sidecars get nothing)::

    {"status": "serving", "registry_snapshot": {"version": 7} | null,
     "zookeeper": "CONNECTED" | "SUSPENDED" | "LOST", "proxies": 3}

``GET /api/proxies``: one object per open ADS stream, sorted by node id; times are ISO 8601 UTC,
versions are the opaque ``version_info`` strings; types never sent are absent::

    [{"node_id": "sidecar~10.0.0.1~web-15006.default", "service": "web", "namespace": "default",
      "proxyless": false, "peer": "ipv4:10.0.0.1:50712", "stream_id": 4,
      "connected_since": "2025-01-01T12:00:00.000Z",
      "types": {"CDS": {"version_sent": "9f2c61d0a1b3", "sent_at": "...",
                        "version_acked": "9f2c61d0a1b3", "acked_at": "...",
                        "nack": null | {"error": "...", "version": "...", "at": "..."}},
                "EDS": {...}, "LDS": {...}, "RDS": {...}}}]

Each type also carries ``pushes`` and ``nacks`` (responses sent and NACKs received on this stream)
and ``last_push_ack_latency_seconds`` (null until a push of this stream was ACKed).

``GET /api/load[?namespace=NS]``: load reported by the sidecars over LRS (controlplane.lrs), per
service and per endpoint (the address callers dial, as instances are named in the registry),
sorted by namespace, service and address. ``totals`` count since this control plane started,
summed over every sidecar (and worker) that reported; ``rates`` are per second over the last
reporting interval, summed over the reporters whose latest report is fresh; ``in_progress`` is the
sum of their current gauges. Ratios and means are null when nothing finished. ``reporters`` is the
number of LRS streams open now::

    {"interval_seconds": 10.0, "reporters": 4,
     "services": [{"namespace": "default", "service": "catalog",
                   "totals": {"issued": 1200, "success": 1190, "error": 10, "in_progress": 2,
                              "latency_sum_seconds": 6.1, "mean_latency_seconds": 0.005118},
                   "rates": {"rps": 20.0, "success_rps": 19.8, "error_rps": 0.2, "error_ratio": 0.01,
                             "mean_latency_seconds": 0.0051},
                   "endpoints": [{"address": "127.0.0.1:15006", "totals": {...}, "rates": {...}}]}]}
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Any

from controlplane.cache import SnapshotCache
from controlplane.lrs import LoadStore
from controlplane.metrics import CONTENT_TYPE, Metrics
from controlplane.proxies import ProxyRegistry
from meshkeeper.httpd import Reply

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


def _json(status: int, obj: Any) -> tuple[int, str, bytes]:
    return status, JSON, (json.dumps(obj, indent=1) + "\n").encode()


class Web:
    def __init__(self, cache: SnapshotCache, proxies: ProxyRegistry, metrics: Metrics,
                 zk_state: Callable[[], str], load: LoadStore | None = None) -> None:
        self.cache, self.proxies, self.metrics, self.zk_state = cache, proxies, metrics, zk_state
        self.load = load if load is not None else LoadStore()
        self.routes: dict[str, Callable[[dict[str, str]], tuple[int, str, bytes]]] = {
            "/healthz": self.healthz,
            "/metrics": self.prometheus,
            "/api/proxies": self.api_proxies,
            "/api/load": self.api_load,
        }
        # Handlers of whole path trees (the console, the trace store's Jaeger API): (method, path,
        # query, headers, body) -> reply, or None for a path they do not own; plain or async.
        self.mounts: list[Callable[[str, str, dict[str, str], dict[str, str], bytes],
                                   Reply | None | Awaitable[Reply | None]]] = []

    def __call__(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
                 body: bytes) -> Reply | Awaitable[Reply]:
        page = self.routes.get(path.rstrip("/") or "/")
        if page is None:
            return self._mounted(method, path, query, headers, body)
        if method != "GET":
            return 405, TEXT, b"only GET and HEAD\n"
        return page(query)

    async def _mounted(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
                       body: bytes) -> Reply:
        for mount in self.mounts:
            reply = mount(method, path, query, headers, body)
            if inspect.isawaitable(reply):
                reply = await reply
            if reply is not None:
                return reply
        return 404, TEXT, f"no page {path}\n".encode()

    def healthz(self, query: dict[str, str]) -> tuple[int, str, bytes]:
        """200 while the process serves. The body says whether sidecars can get config yet."""
        snap = self.cache.snapshot
        return _json(200, {
            "status": "serving",
            "registry_snapshot": None if snap is None else {"version": snap.version},
            "zookeeper": self.zk_state(),
            "proxies": len(self.proxies),
        })

    def prometheus(self, query: dict[str, str]) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE, self.metrics.render()

    def api_proxies(self, query: dict[str, str]) -> tuple[int, str, bytes]:
        return _json(200, self.proxies.to_json())

    def api_load(self, query: dict[str, str]) -> tuple[int, str, bytes]:
        return _json(200, self.load.snapshot(query.get("namespace") or None))
