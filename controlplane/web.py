"""The control plane's HTTP port (15014): ``/healthz``, ``/metrics``, ``/api/proxies``.

Read-only views over the watch, the xDS cache and the proxy registry, served by
:mod:`meshkeeper.httpd`. The dashboard and the rest of the JSON API mount here later.

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
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from controlplane.cache import SnapshotCache
from controlplane.metrics import CONTENT_TYPE, Metrics
from controlplane.proxies import ProxyRegistry

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


def _json(status: int, obj: Any) -> tuple[int, str, bytes]:
    return status, JSON, (json.dumps(obj, indent=1) + "\n").encode()


class Web:
    def __init__(self, cache: SnapshotCache, proxies: ProxyRegistry, metrics: Metrics,
                 zk_state: Callable[[], str]) -> None:
        self.cache, self.proxies, self.metrics, self.zk_state = cache, proxies, metrics, zk_state
        self.routes = {
            "/healthz": self.healthz,
            "/metrics": self.prometheus,
            "/api/proxies": self.api_proxies,
        }

    def __call__(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
                 body: bytes) -> tuple[int, str, bytes]:
        page = self.routes.get(path.rstrip("/") or "/")
        if page is None:
            return 404, TEXT, f"no page {path}\n".encode()
        if method != "GET":
            return 405, TEXT, b"only GET and HEAD\n"
        return page()

    def healthz(self) -> tuple[int, str, bytes]:
        """200 while the process serves. The body says whether sidecars can get config yet."""
        snap = self.cache.snapshot
        return _json(200, {
            "status": "serving",
            "registry_snapshot": None if snap is None else {"version": snap.version},
            "zookeeper": self.zk_state(),
            "proxies": len(self.proxies),
        })

    def prometheus(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE, self.metrics.render()

    def api_proxies(self) -> tuple[int, str, bytes]:
        return _json(200, self.proxies.to_json())
