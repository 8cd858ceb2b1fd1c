"""A grpcio server with all four call kinds, metadata, chosen statuses and slow methods, for the
tests of gRPC through the sidecars (tests/integration/test_grpc_mesh.py). Generic handlers, bytes
in and out, no .proto: requests that carry parameters are JSON.

``/meshkeeper.test.Rich/<method>``:

    Unary         {"status": "NOT_FOUND", "details": "..", "sleep_ms": N} -> JSON {"name", "metadata"}
                  (the request's x-* metadata); sends initial metadata ``x-initial: <name>``, trailing
                  metadata ``x-trailer: t-<name>`` and ``x-blob-bin``; ends with ``status`` if given.
                  Records ``context.time_remaining()`` in :attr:`RichServer.deadlines`.
    ServerStream  {"count": N, "size": S, "interval_ms": I} -> N messages of S bytes, each starting
                  ``<name>:<i>:``
    ClientStream  a stream of messages -> JSON {"name", "count", "bytes"}
    Bidi          each message m -> ``<name>:`` + m
    Who           anything -> the name (UNAVAILABLE every ``fail_every``-th call)

The server also answers the gRPC health service (SERVING), which a ``--protocol grpc`` sidecar
checks before it registers the instance. It runs in the test's process (``RichServer(...).start()``)
so that tests can read what it saw, or as a process::

    python -m tests.harness.grpc_rich --name a     # prints "meshkeeper grpcapp listening port=N"
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from itertools import count

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "meshkeeper.test.Rich"
UNARY = f"/{SERVICE}/Unary"
SERVER_STREAM = f"/{SERVICE}/ServerStream"
CLIENT_STREAM = f"/{SERVICE}/ClientStream"
BIDI = f"/{SERVICE}/Bidi"
WHO = f"/{SERVICE}/Who"
BLOB = b"\x00\x01\xfe\xff"  # the binary trailer's value


class RichServer:
    """One grpcio server on 127.0.0.1:<port> (0: any)."""

    def __init__(self, name: str, port: int = 0, fail_every: int = 0, workers: int = 32) -> None:
        self.name = name
        self.fail_every = fail_every
        self.deadlines: list[float | None] = []  # time_remaining() seen by Unary, in arrival order
        self.calls = 0
        self.streamed = 0  # bytes ServerStream has handed to grpcio so far (all calls)
        self._calls = count(1)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                                   maximum_concurrent_rpcs=None)
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
            "Who": grpc.unary_unary_rpc_method_handler(self._who),
        })])
        checker = health.HealthServicer()
        checker.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")

    def start(self) -> RichServer:
        self._server.start()
        return self

    def stop(self, grace: float | None = None) -> None:
        self._server.stop(grace).wait()

    # ------------------------------------------------------------------ methods

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.deadlines.append(context.time_remaining())
        args = json.loads(request or b"{}")
        if args.get("sleep_ms"):  # before any metadata: a deadline passes with nothing answered
            time.sleep(args["sleep_ms"] / 1000)
        context.send_initial_metadata((("x-initial", self.name),))
        context.set_trailing_metadata((("x-trailer", f"t-{self.name}"), ("x-blob-bin", BLOB)))
        if args.get("status"):
            context.abort(grpc.StatusCode[args["status"]], args.get("details", ""))
        metadata = {k: v for k, v in context.invocation_metadata() if k.startswith("x-")}
        return json.dumps({"name": self.name, "metadata": metadata}).encode()

    def _server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        args = json.loads(request)
        size, interval = args.get("size", 16), args.get("interval_ms", 0) / 1000
        context.send_initial_metadata((("x-initial", self.name),))
        for i in range(args["count"]):
            head = f"{self.name}:{i}:".encode()
            message = head + b"x" * max(0, size - len(head))
            yield message
            self.streamed += len(message)  # after the yield: grpcio took it (it blocks on flow control)
            if interval:
                time.sleep(interval)
        context.set_trailing_metadata((("x-trailer", f"t-{self.name}"),))

    def _client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        n = size = 0
        for message in requests:
            n, size = n + 1, size + len(message)
        context.set_trailing_metadata((("x-trailer", f"t-{self.name}"),))
        return json.dumps({"name": self.name, "count": n, "bytes": size}).encode()

    def _bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        prefix = f"{self.name}:".encode()
        for message in requests:
            yield prefix + message

    def _who(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        n = next(self._calls)
        self.calls = n
        if self.fail_every and n % self.fail_every == 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: failing every {self.fail_every} calls")
        return self.name.encode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--fail-every", type=int, default=0, help="Who answers UNAVAILABLE every Nth call (0: never)")
    args = p.parse_args(argv)
    server = RichServer(args.name, args.port, args.fail_every).start()
    print(f"meshkeeper grpcapp listening port={server.port} name={args.name}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
