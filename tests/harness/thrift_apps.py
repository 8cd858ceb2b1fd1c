"""A real thrift service and client for the transparent-mode tests (DESIGN §10, issue 12).

An app in transparent mode knows nothing of the mesh, so this one is plain thriftpy2 as thrift
shops write it: the ``Echo`` service of ``echo.thrift`` beside this file, TBinaryProtocol over TCP
with a buffered transport, one thread per connection on the server.

- ``whoami`` answers the server's ``--name``, so a test counts which instance answered.
- ``blob(size)`` answers ``size`` bytes of :func:`blob_pattern`, so a 50 MB transfer through the
  sidecar can be checked byte-exact (and a dropped or repeated buffer shows).
- :class:`ThriftClient` opens a NEW TCP connection per client object: balancing at L4 is per
  connection, so one client per call is what spreads calls over instances.

Command line (usable from inside a pod, see tests/harness/pods.py)::

    .venv/bin/python -m tests.harness.thrift_apps serve --port 9090 --name b1
        # prints "meshkeeper app listening port=N name=b1"
    .venv/bin/python -m tests.harness.thrift_apps call --host H --port P whoami [--count 20]
        # one name, or with --count a JSON object {"b1": 11, "b2": 9} (a new connection per call)
    .venv/bin/python -m tests.harness.thrift_apps call --host H --port P echo hello
    .venv/bin/python -m tests.harness.thrift_apps call --host H --port P blob 52428800
        # "size=N sha256=HEX exact=true"; exit code 1 unless byte-exact
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import thriftpy2
from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.server import TThreadedServer
from thriftpy2.thrift import TClient, TProcessor
from thriftpy2.transport import TBufferedTransportFactory, TServerSocket, TSocket

IDL = Path(__file__).with_name("echo.thrift")
echo_thrift = thriftpy2.load(str(IDL), module_name="echo_thrift")

DEFAULT_TIMEOUT = 10.0
READY_ROLE = "app"

# blob_pattern repeats a block of prime length: a lost or repeated buffer of any power-of-two size
# (what proxies move) shifts the pattern and the comparison fails.
_BLOCK_LEN = 65521
_BLOCK = random.Random(12).randbytes(_BLOCK_LEN)

Connect = Callable[[str, int, float], socket.socket]


def blob_pattern(size: int) -> bytes:
    """The ``size`` bytes ``blob(size)`` answers: a seeded random block of 65521 bytes, repeated."""
    if size < 0:
        raise ValueError(f"negative blob size {size}")
    return (_BLOCK * (size // _BLOCK_LEN + 1))[:size]


def blob_sha256(size: int) -> str:
    return hashlib.sha256(blob_pattern(size)).hexdigest()


# --------------------------------------------------------------------------- server


class EchoHandler:
    """The ``Echo`` service; ``name`` is what ``whoami`` answers."""

    def __init__(self, name: str) -> None:
        self.name = name

    def echo(self, msg: str) -> str:
        return msg

    def whoami(self) -> str:
        return self.name

    def blob(self, size: int) -> bytes:
        return blob_pattern(size)


class EchoServer:
    """``Echo`` on ``host:port`` (0: a free port, read ``port`` after construction)."""

    def __init__(self, name: str, host: str = "0.0.0.0", port: int = 0, client_timeout: float = 30.0) -> None:
        self.name = name
        # Listen now, so the port is known before serve(); thriftpy2's serve() would bind again.
        self.server_socket = TServerSocket(host=host, port=port, client_timeout=int(client_timeout * 1000))
        self.server_socket.listen()
        self.server_socket.listen = lambda: None  # type: ignore[method-assign]
        self.server = TThreadedServer(
            TProcessor(echo_thrift.Echo, EchoHandler(name)),
            self.server_socket,
            iprot_factory=TBinaryProtocolFactory(),
            itrans_factory=TBufferedTransportFactory(),
            daemon=True,
        )

    @property
    def port(self) -> int:
        assert self.server_socket.sock is not None
        return self.server_socket.sock.getsockname()[1]

    def serve_forever(self) -> None:
        self.server.serve()

    def close(self) -> None:
        self.server.close()
        self.server_socket.close()


# --------------------------------------------------------------------------- client


class ThriftClient:
    """One ``Echo`` client on one new TCP connection; use as a context manager or call :meth:`close`.

    ``timeout`` (seconds) bounds the connect and every call. ``connect(host, port, timeout)`` may
    supply the connected socket, e.g. ``pod.connect`` to dial from inside a pod's network namespace.
    """

    def __init__(
        self, host: str, port: int, timeout: float = DEFAULT_TIMEOUT, connect: Connect | None = None
    ) -> None:
        self.host, self.port = host, port
        ms = int(timeout * 1000)
        if connect is not None:
            sock = connect(host, port, timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeout)
            self._socket = TSocket(sock=sock, socket_timeout=ms)
        else:
            self._socket = TSocket(host, port, socket_timeout=ms, connect_timeout=ms)
        self._transport = TBufferedTransportFactory().get_transport(self._socket)
        if connect is None:
            self._transport.open()
        self._client: Any = TClient(echo_thrift.Echo, TBinaryProtocolFactory().get_protocol(self._transport))

    def echo(self, msg: str) -> str:
        return self._client.echo(msg)

    def whoami(self) -> str:
        return self._client.whoami()

    def blob(self, size: int) -> bytes:
        return self._client.blob(size)

    @property
    def local_address(self) -> tuple[str, int]:
        """The client end of the connection (to tell connections apart in tests)."""
        assert self._socket.sock is not None
        return self._socket.sock.getsockname()[:2]

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> ThriftClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def whoami_counts(
    host: str, port: int, calls: int, timeout: float = DEFAULT_TIMEOUT, connect: Connect | None = None
) -> Counter[str]:
    """``calls`` whoami calls, each on a new connection: how many each instance answered."""
    counts: Counter[str] = Counter()
    for _ in range(calls):
        with ThriftClient(host, port, timeout, connect) as client:
            counts[client.whoami()] += 1
    return counts


# --------------------------------------------------------------------------- command line


def serve_argv(name: str, port: int = 0, host: str = "0.0.0.0") -> list[str]:
    """The server's command line (ready line role ``app``, key ``port``); run it with cwd = the repo."""
    return [sys.executable, "-m", "tests.harness.thrift_apps", "serve", "--host", host, "--port", str(port),
            "--name", name]


def call_argv(host: str, port: int, method: str, arg: object = None, count: int = 1,
              timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """The client's command line, e.g. for ``pod.check_output(call_argv(b.ip, port, "whoami"))``."""
    argv = [sys.executable, "-m", "tests.harness.thrift_apps", "call", "--host", host, "--port", str(port),
            "--timeout", str(timeout), "--count", str(count), method]
    return argv + ([str(arg)] if arg is not None else [])



def _serve(args: argparse.Namespace) -> int:
    server = EchoServer(args.name, args.host, args.port)
    print(f"meshkeeper {READY_ROLE} listening port={server.port} name={args.name}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def _call(args: argparse.Namespace) -> int:
    if args.method == "whoami":
        if args.count == 1:
            with ThriftClient(args.host, args.port, args.timeout) as client:
                print(client.whoami())
        else:
            counts = whoami_counts(args.host, args.port, args.count, args.timeout)
            print(json.dumps(dict(sorted(counts.items()))))
        return 0
    if args.method == "echo":
        with ThriftClient(args.host, args.port, args.timeout) as client:
            print(client.echo(args.arg or ""))
        return 0
    size = int(args.arg or 0)
    with ThriftClient(args.host, args.port, args.timeout) as client:
        data = client.blob(size)
    exact = data == blob_pattern(size)
    print(f"size={len(data)} sha256={hashlib.sha256(data).hexdigest()} exact={str(exact).lower()}")
    return 0 if exact else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.harness.thrift_apps", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the Echo server; prints a ready line")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--name", required=True, help="what whoami answers")
    call = sub.add_parser("call", help="call the Echo server once (or --count times for whoami)")
    call.add_argument("--host", required=True)
    call.add_argument("--port", type=int, required=True)
    call.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds")
    call.add_argument("--count", type=int, default=1, help="whoami: calls, each on a new connection")
    call.add_argument("method", choices=["whoami", "echo", "blob"])
    call.add_argument("arg", nargs="?", help="echo: the message; blob: the size in bytes")
    args = p.parse_args(argv)
    return _serve(args) if args.command == "serve" else _call(args)


if __name__ == "__main__":
    sys.exit(main())
