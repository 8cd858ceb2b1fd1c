"""The console: a web UI on the control plane's HTTP port (DESIGN §11, docs/console.md).

A small single-page app in plain JavaScript modules (``static/``, installed with the package; the
graph library is vendored under ``static/vendor/``, see its VERSIONS file and ``make
console-vendor``) and the JSON it reads (docs/contracts.md, "Console JSON API"):

``GET /``, ``/ui/...``                    the app (one HTML page; the browser routes)
``GET /static/<file>``                    its scripts, styles and vendored libraries
``GET /api/console/graph``                services and caller -> callee edges (:mod:`.views`)
``GET /api/console/services/<ns>/<svc>``  one service: endpoints, weights, switches, load, policy
``POST /api/console/services/<ns>/<svc>/endpoints/<host:port>/{enable,disable,weight,clear}``
``GET /api/console/proxies``              proxy-status (SYNCED / STALE / NOT SENT per type)
``GET /api/console/events``               Server-Sent Events (:mod:`.live`)
``GET /api/alerts[?namespace=&name=]``    alert rules and their state (the webhooks' generatorURL)

Reads follow the admin API's rule (controlplane.auth): open unless the control plane has
``--admin-tokens``, then a viewer's bearer token (``?access_token=`` for the event stream, which
browsers open without headers). Writes are the admin API's own RPCs run through
:meth:`AdminService.invoke`: the same operator check, versioned write, audit line and event.
Traces come from the trace store's Jaeger API (controlplane.tracestore), which the app calls as is.
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from controlplane.admin import AdminService, RpcFailure
from controlplane.alerts.state import AlertState
from controlplane.auth import Authorizer, Denied, Role
from controlplane.console import views
from controlplane.console.live import LiveFeed
from controlplane.events import EventBus
from controlplane.lrs import LoadStore
from controlplane.proxies import ProxyRegistry
from controlplane.snapshot import RegistrySnapshot
from meshkeeper.admin.v1 import admin_pb2
from meshkeeper.httpd import Reply

STATIC = Path(__file__).parent / "static"
JSON = "application/json"
# The app loads only its own files: no inline script, nothing from elsewhere.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                           "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
HTTP_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 412, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
}
ACTIONS = ("enable", "disable", "weight", "clear")


def _json(status: int, obj: Any, extra: Mapping[str, str] | None = None) -> Reply:
    body = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    return (status, JSON, body, {**(extra or {}), "Cache-Control": "no-store"})


def _error(status: int, message: str, code: str = "") -> Reply:
    extra = {"WWW-Authenticate": 'Bearer realm="meshkeeper"'} if status == 401 else {}
    return _json(status, {"error": message, "code": code or str(status)}, extra)


class Console:
    """A mount of :class:`controlplane.web.Web`: ``(method, path, query, headers, body)`` -> reply,
    or None for a path it does not own."""

    def __init__(self, snapshot: Callable[[], RegistrySnapshot | None], load: LoadStore, proxies: ProxyRegistry,
                 events: EventBus, admin: AdminService, auth: Authorizer, *,
                 alert_states: Mapping[tuple[str, str], AlertState] | None = None,
                 tick: float = 2.0) -> None:
        self.snapshot, self.load, self.proxies, self.admin, self.auth = snapshot, load, proxies, admin, auth
        self.alert_states = alert_states if alert_states is not None else {}
        self.live = LiveFeed(events, lambda: views.graph(self.snapshot(), self.load), tick)

    async def __call__(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
                       body: bytes = b"") -> Reply | None:
        if path == "/" or path.startswith("/ui/"):
            return self._file("index.html") if method == "GET" else _error(405, "only GET and HEAD")
        if path.startswith("/static/"):
            return self._file(path[len("/static/"):]) if method == "GET" else _error(405, "only GET and HEAD")
        parts = path.rstrip("/").split("/")[1:]
        if parts[:2] == ["api", "alerts"] and len(parts) == 2:
            return self._read(method, headers, query, lambda: _json(200, {"alerts": views.alerts(
                self.snapshot(), self.alert_states, query.get("namespace", ""), query.get("name", ""))}))
        if parts[:2] != ["api", "console"] or len(parts) < 3:
            return None
        page, rest = parts[2], parts[3:]
        if page == "services" and len(rest) == 5 and rest[2] == "endpoints" and rest[4] in ACTIONS:
            if method != "POST":
                return _error(405, "only POST")
            return await self._endpoint_write(rest[0], rest[1], rest[3], rest[4], headers, body)
        if page == "graph" and not rest:
            return self._read(method, headers, query,
                              lambda: _json(200, views.graph(self.snapshot(), self.load, query.get("namespace", ""))))
        if page == "services" and len(rest) == 2:
            return self._read(method, headers, query, lambda: self._service(rest[0], rest[1]))
        if page == "proxies" and not rest:
            return self._read(method, headers, query,
                              lambda: _json(200, {"proxies": views.proxy_status(self.proxies, query.get("namespace", ""))}))
        if page == "events" and not rest:
            return self._read(method, headers, query, lambda: self.live.stream(query.get("namespace", "")))
        return _error(404, f"no page {path}")

    # ------------------------------------------------------------------ reads

    def _read(self, method: str, headers: dict[str, str], query: dict[str, str], build: Callable[[], Reply]) -> Reply:
        if method != "GET":
            return _error(405, "only GET and HEAD")
        header = headers.get("authorization") or (f"Bearer {query['access_token']}" if query.get("access_token") else "")
        try:
            self.auth.check([("authorization", header)] if header else None, Role.VIEWER)
        except Denied as d:
            return _error(HTTP_STATUS.get(d.code, 403), str(d), d.code.name)
        return build()

    def _service(self, ns: str, svc: str) -> Reply:
        doc = views.service(self.snapshot(), self.load, self.proxies, ns, svc)
        if doc is None:
            return _error(404, f"service {svc!r} is not registered in namespace {ns!r}", "NOT_FOUND")
        return _json(200, doc)

    def _file(self, name: str) -> Reply:
        root = STATIC.resolve()
        target = (root / name).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            return _error(404, f"no file {name}")
        ctype = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
                 ".html": "text/html"}.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "text/plain"
        if ctype.startswith("text/"):
            ctype += "; charset=utf-8"
        return 200, ctype, target.read_bytes(), PAGE_HEADERS

    # ------------------------------------------------------------------ writes

    async def _endpoint_write(self, ns: str, svc: str, address: str, action: str, headers: dict[str, str],
                              body: bytes) -> Reply:
        """One override write through the admin API's own RPC (auth, versioned write, audit, event)."""
        common = {"namespace": ns, "service": svc, "address": address}
        if action == "weight":
            try:
                weight = json.loads(body or b"{}").get("weight")
            except (ValueError, AttributeError):
                weight = None
            if not isinstance(weight, int) or isinstance(weight, bool):
                return _error(400, 'weight: send {"weight": <integer>}', "INVALID_ARGUMENT")
            rpc, request = "SetWeight", admin_pb2.SetWeightRequest(weight=weight, **common)
        elif action == "clear":
            rpc, request = "ClearOverride", admin_pb2.ClearOverrideRequest(**common)
        else:
            rpc, request = "SetEnabled", admin_pb2.SetEnabledRequest(enabled=action == "enable", **common)
        header = headers.get("authorization")
        peer = "console " + headers.get("x-forwarded-for", headers.get("host", ""))
        try:
            written = await self.admin.invoke(rpc, request, [("authorization", header)] if header else None, peer)
        except RpcFailure as f:
            return _error(HTTP_STATUS.get(f.code, 500), f.message, f.code.name)
        # The endpoint as written; the service document follows once the watch publishes it.
        endpoint = json_format.MessageToDict(written, preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True)
        return _json(200, {"rpc": rpc, "endpoint": endpoint})
