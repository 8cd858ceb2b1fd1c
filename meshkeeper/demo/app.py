"""A small HTTP service instance for the demo and the integration tests.

It is the *application* beside a sidecar, not part of the mesh: stdlib ``http.server``, one thread
per connection, HTTP/1.1 keep-alive. It prints ``meshkeeper app listening port=N name=X`` on stdout
once bound.

    GET /health            200 (or the sticky failure status when set with ``health=1``)
    GET|POST /<anything>   200 JSON {"service", "instance", "version", "method", "path", "body_bytes"}
    GET /headers           200 JSON of the request headers (to check trace propagation)
    GET /slow?ms=N         answers after N ms
    GET /hang              never answers (until the client goes away or the app stops)
    GET /fail?status=503   later responses (not the knobs) answer 503; ``&health=1`` fails /health
                           too, ``&ms=N`` delays them; ``/fail?status=0`` restores

With ``--call URL`` (the demo's frontend), every plain request calls URL through the proxy from
``HTTP_PROXY``, exactly like an unmodified app, and answers ``{"<name>": <self>, "<host>": <their
JSON>}``; trace headers of the incoming request are passed on, as a well-behaved app does.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Headers an app must copy from its inbound request to its outbound calls for traces to join up.
PROPAGATED_HEADERS = (
    "traceparent",
    "tracestate",
    "x-request-id",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
)
KNOBS = ("/fail", "/slow", "/hang", "/headers")
HANG_LIMIT_S = 3600.0


class Behaviour:
    """The sticky failure switch set through ``/fail``; shared by all handler threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status = 0
        self.fail_health = False
        self.delay_ms = 0

    def set(self, status: int, fail_health: bool, delay_ms: int) -> None:
        with self.lock:
            self.status, self.fail_health, self.delay_ms = status, fail_health, delay_ms

    def snapshot(self) -> tuple[int, bool, int]:
        with self.lock:
            return self.status, self.fail_health, self.delay_ms


class AppServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__((args.host, args.port), AppHandler)
        self.name: str = args.name
        self.version: str = args.version
        self.health_path: str = args.health_path
        self.call: str | None = args.call
        self.quiet: bool = not args.verbose
        self.behaviour = Behaviour()
        self.stopping = threading.Event()
        # The process environment decides the proxy (HTTP_PROXY, NO_PROXY), as in any app.
        self.opener = urllib.request.build_opener()

    @property
    def instance(self) -> str:
        host, port = self.server_address[:2]
        return f"{host}:{port}"

    def identity(self) -> dict[str, str]:
        return {"service": self.name, "instance": self.instance, "version": self.version}


class AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the second waits for a delayed ACK (40 ms).
    disable_nagle_algorithm = True
    server: AppServer

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    # ------------------------------------------------------------------ routing

    def _handle(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        body_bytes = self._drain_body()
        status, fail_health, delay_ms = self.server.behaviour.snapshot()
        path = url.path

        if path == self.server.health_path:
            code = status if (fail_health and status) else 200
            return self._send(code, {"status": "ok" if code == 200 else "failing"})
        if path == "/fail":
            new = _int(query.get("status", "503"))
            self.server.behaviour.set(new, query.get("health") == "1", _int(query.get("ms", "0")))
            return self._send(200, {"fail": new, "health": query.get("health") == "1"})
        if path == "/slow":
            time.sleep(_int(query.get("ms", "0")) / 1000)
            return self._send(200, {**self.server.identity(), "slept_ms": _int(query.get("ms", "0"))})
        if path == "/hang":
            self.server.stopping.wait(HANG_LIMIT_S)
            self.close_connection = True
            return None
        if path == "/headers":
            return self._send(200, {k.lower(): v for k, v in self.headers.items()})

        if delay_ms:
            time.sleep(delay_ms / 1000)
        if status:
            return self._send(status, {**self.server.identity(), "error": f"failing on purpose ({status})"})
        me = {**self.server.identity(), "method": self.command, "path": path, "body_bytes": body_bytes}
        if self.server.call:
            return self._call_downstream(me)
        return self._send(200, me)

    def _call_downstream(self, me: dict[str, Any]) -> None:
        target = self.server.call or ""
        key = urllib.parse.urlsplit(target).hostname or "downstream"
        headers = {h: v for h in PROPAGATED_HEADERS if (v := self.headers.get(h)) is not None}
        request = urllib.request.Request(target, headers=headers)
        try:
            with self.server.opener.open(request, timeout=10) as resp:
                return self._send(200, {self.server.name: me, key: _json_or_text(resp.read())})
        except urllib.error.HTTPError as exc:
            with exc:
                detail = _json_or_text(exc.read())
            flags = exc.headers.get("x-meshkeeper-flags", "")
            return self._send(502, {self.server.name: me, key: detail, "status": exc.code, "flags": flags})
        except (OSError, ValueError) as exc:
            return self._send(502, {self.server.name: me, key: None, "error": str(exc)})

    # ------------------------------------------------------------------ plumbing

    def _drain_body(self) -> int:
        length = _int(self.headers.get("Content-Length", "0"))
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                break
            remaining -= len(chunk)
        return length - remaining

    def _send(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-app-instance", self.server.instance)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m meshkeeper.demo.app", description=__doc__.splitlines()[0])
    p.add_argument("--name", default="app", help="service name reported in responses")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on the ready line)")
    p.add_argument("--version", default="v1", help="version label reported in responses")
    p.add_argument("--health-path", default="/health")
    p.add_argument("--call", metavar="URL", help="call URL through HTTP_PROXY for every plain request")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = AppServer(args)

    def stop(signum: int, frame: object) -> None:
        server.stopping.set()
        # shutdown() waits for serve_forever() to return, so it cannot run on the main thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"meshkeeper app listening port={server.server_address[1]} name={args.name}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
