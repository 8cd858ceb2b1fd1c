"""Upstream apps that behave on the wire as common servers do, for tests and bench/.

:class:`SplitWritesApp` is a plain ``http.server`` app as users write them: HTTP/1.1 keep-alive,
Nagle left on (``disable_nagle_algorithm`` is False by default), the response head and the body
written in two sends. On a keep-alive connection its second send waits for the reader's ACK of
the first, which Linux delays by 40 ms unless the reader asks otherwise (sidecar.quickack).

    .venv/bin/python -m tests.harness.apps --port 8080     # prints "meshkeeper app listening port=N"
"""

from __future__ import annotations

import argparse
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class SplitWritesHandler(BaseHTTPRequestHandler):
    """GET answers ``ok``; POST echoes its body; ``/health`` is 200."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(b"ok\n")

    def do_POST(self) -> None:
        self._answer(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()  # the head is one send ...
        self.wfile.write(body)  # ... and the body another


class SplitWritesApp(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), SplitWritesHandler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> SplitWritesApp:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    app = SplitWritesApp(args.port)
    print(f"meshkeeper app listening port={app.port}", flush=True)
    try:
        app.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
