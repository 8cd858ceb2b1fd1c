"""A grpcio server and a proxyless grpcio client, as processes, for the proxyless tests (DESIGN §12).

Server: the gRPC health service (SERVING) and ``/meshkeeper.test.Echo/Who``, a unary method whose
answer is the server's ``--name`` (generic handlers: no .proto), or UNAVAILABLE for every
``--fail-every``-th call::

    python -m tests.harness.grpc_apps server --name a     # prints "meshkeeper grpcapp listening port=N"

Client: a stock grpcio channel to ``--target`` (``xds:///catalog.default``; grpcio reads
``GRPC_XDS_BOOTSTRAP`` from its environment, once per process, hence a process of its own), driven
over HTTP on the port of its ready line::

    GET /calls?n=N[&user=U][&target=T]   N sequential unary calls (with metadata ``x-user: U``; to
                                         target T instead of --target, on a channel of its own)
                              -> {"ok": {"<server name>": count, ...}, "errors": {"<code>": count}}
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections import Counter

import grpc

ECHO_SERVICE = "meshkeeper.test.Echo"
WHO_METHOD = f"/{ECHO_SERVICE}/Who"
CALL_TIMEOUT = 2.0


def server_argv(name: str, port: int = 0, fail_every: int = 0) -> list[str]:
    """The server's command line (ready line role ``grpcapp``, key ``port``); run it with cwd = the repo."""
    return [sys.executable, "-m", "tests.harness.grpc_apps", "server", "--name", name, "--port", str(port),
            "--fail-every", str(fail_every)]


def client_argv(target: str) -> list[str]:
    """The client's command line (ready line role ``grpcclient``, key ``port``); give it
    ``GRPC_XDS_BOOTSTRAP`` in its environment."""
    return [sys.executable, "-m", "tests.harness.grpc_apps", "client", "--target", target]


def serve(name: str, port: int, fail_every: int = 0) -> int:
    from concurrent import futures
    from itertools import count

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    answer, calls = name.encode(), count(1)

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        if fail_every and next(calls) % fail_every == 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{name}: failing every {fail_every} calls")
        return answer

    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(ECHO_SERVICE, {
        "Who": grpc.unary_unary_rpc_method_handler(who)})])
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"meshkeeper grpcapp listening port={bound} name={name}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()
    return 0


def client(target: str) -> int:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlsplit

    channels: dict[str, grpc.Channel] = {}
    lock = threading.Lock()  # one batch at a time: the counts are the batch's own

    def calls(n: int, user: str, to: str) -> dict[str, Counter]:
        ok, errors = Counter(), Counter()
        metadata = (("x-user", user),) if user else None
        with lock:
            if to not in channels:
                channels[to] = grpc.insecure_channel(to)
            who = channels[to].unary_unary(WHO_METHOD)  # bytes in, bytes out
            for _ in range(n):
                try:
                    ok[who(b"", timeout=CALL_TIMEOUT, wait_for_ready=True, metadata=metadata).decode()] += 1
                except grpc.RpcError as exc:
                    errors[exc.code().name] += 1
        return {"ok": ok, "errors": errors}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            n, user = int(query.get("n", ["1"])[0]), query.get("user", [""])[0]
            body = json.dumps(calls(n, user, query.get("target", [target])[0])).encode() if url.path == "/calls" else b"{}"
            self.send_response(200 if url.path == "/calls" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=http.shutdown).start())
    print(f"meshkeeper grpcclient listening port={http.server_address[1]} target={target}", flush=True)
    http.serve_forever(poll_interval=0.05)
    for channel in channels.values():
        channel.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--fail-every", type=int, default=0, help="answer UNAVAILABLE to every Nth call (0: never)")
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    args = p.parse_args(argv)
    return serve(args.name, args.port, args.fail_every) if args.role == "server" else client(args.target)


if __name__ == "__main__":
    sys.exit(main())
