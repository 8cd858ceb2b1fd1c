"""``meshkeeper injector``: the mutating admission webhook that injects the sidecar (HTTPS).

    meshkeeper injector --port 9443 --cert tls.crt --key tls.key [--cp ... --zk ... --image ...]

``POST /inject`` takes an AdmissionReview and answers one (controlplane.injector.admission);
``GET /healthz`` and ``/readyz`` answer 200 while the process serves. Once the port is bound it
prints ``meshkeeper injector listening port=<port>`` on stdout (docs/contracts.md's ready line).
SIGTERM/SIGINT stop it (in-flight requests finish).

The stdlib's threading HTTP server, because meshkeeper.httpd has no TLS: each connection gets a
thread and does its TLS handshake there (not in the accepting thread, so a slow client delays only
itself). The certificate is re-read when its file changes (cert-manager rotates it in place).
Bad flags, or certificate files that cannot be loaded: one line on stderr, exit 2. Given the control
plane's CA (controlplane.injector.inject), each proxy gets its service's bootstrap token.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from controlplane.injector.admission import internal_error, review
from controlplane.injector.inject import add_injection_flags, check_token_arguments, config_from
from controlplane.injector.patch import InjectConfig
from meshkeeper.cliargs import ArgumentParser, port

log = logging.getLogger("meshkeeper.injector")

PROG = "meshkeeper injector"
DEFAULT_PORT = 9443
MAX_BODY = 8 << 20  # the API server's own request limit is 3 MiB
CONNECTION_TIMEOUT = 10.0  # seconds a connection may sit idle or mid-request


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description="Mutating admission webhook: add the Meshkeeper sidecar to pods.")
    p.add_argument("--port", type=port, default=DEFAULT_PORT, help="HTTPS port (0: pick a free one; default %(default)s)")
    p.add_argument("--bind", default="0.0.0.0", help="address to listen on (default %(default)s)")
    p.add_argument("--cert", required=True, metavar="FILE", help="PEM server certificate (chain) for the webhook")
    p.add_argument("--key", required=True, metavar="FILE", help="PEM private key of --cert")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_injection_flags(p)
    args = p.parse_args(argv)
    check_token_arguments(p, args)
    return args


class _Certificate:
    """An SSLContext whose certificate follows its files (checked at most once a second)."""

    def __init__(self, cert: str, key: str) -> None:
        self.cert, self.key = cert, key
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp = self._mtimes()
        self.context.load_cert_chain(cert, key)
        self._lock = threading.Lock()
        self._checked = 0.0

    def _mtimes(self) -> tuple[float, float]:
        return os.stat(self.cert).st_mtime, os.stat(self.key).st_mtime

    def refresh(self, now: float) -> None:
        with self._lock:
            if now - self._checked < 1.0:
                return
            self._checked = now
            try:
                stamp = self._mtimes()
                if stamp != self._stamp:
                    self.context.load_cert_chain(self.cert, self.key)  # new connections only
                    self._stamp = stamp
                    log.info("reloaded the certificate %s", self.cert)
            except (OSError, ssl.SSLError) as exc:  # mid-rotation: keep the old one, try again later
                log.warning("cannot reload the certificate %s: %s", self.cert, exc)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], certificate: _Certificate, config: InjectConfig) -> None:
        self.certificate = certificate
        self.config = config
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = super().get_request()
        self.certificate.refresh(time.monotonic())
        sock.settimeout(CONNECTION_TIMEOUT)
        # The handshake runs on the first read, in the connection's own thread.
        return self.certificate.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("connection from %s ended: %s", client_address, sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "meshkeeper-injector"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path in ("/healthz", "/readyz"):
            self._send(200, "text/plain; charset=utf-8", b"ok\n")
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found (POST /inject, GET /healthz, /readyz)\n")

    def do_POST(self) -> None:  # noqa: N802
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self._send(411, "text/plain; charset=utf-8", b"Content-Length required\n")
            return
        if int(length) > MAX_BODY:
            self._send(413, "text/plain; charset=utf-8", b"request body too large\n")
            return
        body = self.rfile.read(int(length))
        if self.path.split("?", 1)[0] != "/inject":
            self._send(404, "text/plain; charset=utf-8", b"not found (POST /inject)\n")
            return
        try:
            answer = review(body, self.server.config)
        except Exception as exc:  # a bug of ours must not block pod creation: see admission's docstring
            log.exception("admission review failed")
            answer = internal_error(body, exc)
        if answer.log:
            log.info("%s", answer.log)
        self._send(200, "application/json", answer.body())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s %s", self.address_string(), format % args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        certificate = _Certificate(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        sys.stderr.write(f"{PROG}: cannot load --cert {args.cert} / --key {args.key}: "
                         f"{getattr(exc, 'strerror', None) or exc}\n")
        return 2
    try:
        server = _Server((args.bind, args.port), certificate, config_from(args))
    except OSError as exc:
        sys.stderr.write(f"{PROG}: cannot listen on {args.bind}:{args.port}: {exc.strerror or exc}\n")
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serving = threading.Thread(target=server.serve_forever, name="injector", daemon=True)
    serving.start()
    print(f"meshkeeper injector listening port={server.server_address[1]}", flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0
