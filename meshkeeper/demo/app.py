"""A small HTTP service instance for the demo and the integration tests.

It is the *application* beside a sidecar, not part of the mesh: stdlib ``http.server``, one thread
per connection, HTTP/1.1 keep-alive. It prints ``meshkeeper app listening port=N name=X`` on stdout
once bound.

    GET /health            200, unless ``/fail?...&health=1`` put it under the failure mode
    GET|POST /<anything>   200 JSON {"service", "instance", "version", "method", "path", "body_bytes"}
    GET /headers           200 JSON of the request headers (to check trace propagation)
    GET /slow?ms=N         answers after N ms
    GET /hang              never answers (until the client goes away or the app stops)
    GET /fail?...          sets the failure mode of every later plain request (sticky; see below)

Failure modes, for tests that switch an instance at runtime (``GET /fail?mode=M&...``, or from the
start with ``--fail 'mode=M&...'``). The knobs (``/fail``, ``/slow``, ``/hang``, ``/headers``)
always work; ``/health`` answers 200 unless ``health=1`` puts it under the mode as well:

    mode=ok                answer normally (``/fail?status=0`` means the same)
    mode=slow&ms=N         answer normally, N ms late
    mode=status&status=N   answer N (default 503) with the usual JSON; ``/fail?status=N`` and a bare
                           ``/fail`` (503) mean the same
    mode=reset             reset the connection with no response (SO_LINGER 0, then close: an RST)
    mode=hang              never answer; a held request is closed without a response when the mode
                           changes or the app stops (or after HANG_LIMIT_S)
    ms=N                   with any mode: wait N ms first
    health=1               ``/health`` gets the same treatment as plain requests

``/fail`` answers 200 ``{"mode", "status", "ms", "health"}``, or 400 for an unknown mode.

With ``--call URL`` (the demo's frontend), every plain request calls URL through the proxy from
``HTTP_PROXY``, exactly like an unmodified app, and answers ``{"<name>": <self>, "<host>": <their
JSON>}``; trace headers of the incoming request are passed on, as a well-behaved app does.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
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
MODES = ("ok", "slow", "status", "reset", "hang")


@dataclass(frozen=True)
class FailureMode:
    """What plain requests get: one of MODES, a status for ``status``, a delay, whether /health too."""

    mode: str = "ok"
    status: int = 0
    delay_ms: int = 0
    fail_health: bool = False

    @classmethod
    def parse(cls, query: dict[str, str]) -> FailureMode:
        """The ``/fail`` query (or ``--fail``) as a mode; ValueError names a bad value."""
        status = _int(query.get("status", "503" if "mode" not in query else "0"))
        mode = query.get("mode") or ("status" if status else "ok")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
        if mode == "status" and not status:
            status = 503
        if mode != "status":
            status = 0
        return cls(mode, status, max(0, _int(query.get("ms", "0"))), query.get("health") == "1")

    def view(self) -> dict[str, Any]:
        return {"mode": self.mode, "status": self.status, "ms": self.delay_ms, "health": self.fail_health}


class Behaviour:
    """The sticky failure mode set through ``/fail``; shared by all handler threads.

    Requests held by ``hang`` wait on the event of the mode they saw; a new mode (or the app
    stopping) sets that event, so they let go.
    """

    def __init__(self, initial: FailureMode | None = None) -> None:
        self.lock = threading.Lock()
        self.current = initial or FailureMode()
        self.released = threading.Event()
        self.stopped = False

    def set(self, mode: FailureMode) -> None:
        fresh = threading.Event()
        with self.lock:
            if self.stopped:
                fresh.set()
            self.current, old, self.released = mode, self.released, fresh
        old.set()

    def snapshot(self) -> tuple[FailureMode, threading.Event]:
        with self.lock:
            return self.current, self.released

    def release(self) -> None:
        """The app stops: let every held request go, and hold no new one."""
        with self.lock:
            self.stopped = True
            self.released.set()


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
        self.behaviour = Behaviour(args.fail)
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
        path = url.path

        if path == "/fail":
            try:
                mode = FailureMode.parse(query)
            except ValueError as exc:
                return self._send(400, {"error": str(exc)})
            self.server.behaviour.set(mode)
            return self._send(200, mode.view())
        if path == "/slow":
            time.sleep(_int(query.get("ms", "0")) / 1000)
            return self._send(200, {**self.server.identity(), "slept_ms": _int(query.get("ms", "0"))})
        if path == "/hang":
            self.server.stopping.wait(HANG_LIMIT_S)
            self.close_connection = True
            return None
        if path == "/headers":
            return self._send(200, {k.lower(): v for k, v in self.headers.items()})

        health = path == self.server.health_path
        mode, released = self.server.behaviour.snapshot()
        if health and not mode.fail_health:
            return self._send(200, {"status": "ok"})
        if mode.delay_ms:
            time.sleep(mode.delay_ms / 1000)
        if mode.mode == "reset":
            return self._reset()
        if mode.mode == "hang":
            released.wait(HANG_LIMIT_S)
            self.close_connection = True
            return None
        if mode.status:
            error = f"failing on purpose ({mode.status})"
            return self._send(mode.status, {"status": "failing"} if health else {**self.server.identity(), "error": error})
        if health:
            return self._send(200, {"status": "ok"})
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

    def _reset(self) -> None:
        """Abort the connection: with SO_LINGER 0, close() sends an RST instead of a FIN."""
        self.close_connection = True
        conn = self.connection
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The buffered reader holds a reference to the socket; close it too, or close() is deferred.
        self.rfile.close()
        conn.close()

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
    p.add_argument("--fail", metavar="QUERY", type=_failure_mode, default=FailureMode(),
                   help="start in a failure mode, written as the /fail query (e.g. 'mode=hang')")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p.parse_args(argv)


def _failure_mode(text: str) -> FailureMode:
    try:
        return FailureMode.parse(dict(urllib.parse.parse_qsl(text)))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = AppServer(args)

    def stop(signum: int, frame: object) -> None:
        server.stopping.set()
        server.behaviour.release()
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
