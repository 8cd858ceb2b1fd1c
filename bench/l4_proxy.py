"""Runner for bench/l4.py: the L4 proxy alone on a port, in front of one upstream address.

    .venv/bin/python bench/l4_proxy.py --port 15100 --upstream 127.0.0.1:8080 [--splice]

Default: ``sidecar.l4.TcpProxy`` on uvloop over a ClusterManager with one STATIC cluster (the data
path as the sidecar runs it). ``--splice``: a bare ``os.splice`` relay (socket -> pipe -> socket
per direction, readiness from the loop's ``add_reader``/``add_writer``), kept only to measure
whether zero copy would pay; it has no balancing, stats or timeouts. Prints ``ready <port>``.

Measured with bench/l4.py (100 MB download, median of 3, the proxy alone on CPU 1): transports
1365 MB/s, splice 1003 MB/s; a second, noisier run (median of 5): 809 and 418. Zero copy does not
pay here: see the docstring of sidecar/l4/proxy.py.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import socket

import uvloop

from sidecar.config import ClusterConfig, EndpointConfig
from sidecar.l4 import TcpProxy, TcpProxyConfig, TcpProxyRuntime
from sidecar.upstream.cluster import ClusterManager

PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


async def serve_l4(port: int, host: str, upstream_port: int) -> None:
    clusters = ClusterManager()
    endpoint = EndpointConfig(host, upstream_port)
    clusters.update_clusters({"bench": ClusterConfig("bench", discovery="STATIC", static_endpoints=(endpoint,))})
    runtime = TcpProxyRuntime(TcpProxyConfig("bench", "bench"), clusters)
    server = await asyncio.get_running_loop().create_server(lambda: TcpProxy(runtime), "127.0.0.1", port,
                                                            backlog=4096)
    print(f"ready {port}", flush=True)
    await server.serve_forever()


class SplicePump:
    """One direction: src socket -> pipe -> dst socket; reading stops while the pipe cannot drain."""

    def __init__(self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket, pair: SplicePair) -> None:
        self.loop, self.src, self.dst, self.pair = loop, src, dst, pair
        self.r, self.w = os.pipe2(os.O_NONBLOCK)
        fcntl.fcntl(self.w, F_SETPIPE_SZ, PIPE_SIZE)
        self.in_pipe = 0
        self.eof = False
        self.done = False
        loop.add_reader(src.fileno(), self.readable)

    def readable(self) -> None:
        try:
            n = os.splice(self.src.fileno(), self.w, PIPE_SIZE, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError:
            self.pair.close()
            return
        if n == 0:
            self.eof = True
            self.loop.remove_reader(self.src.fileno())
        self.in_pipe += n
        self.writable()

    def writable(self) -> None:
        while self.in_pipe:
            try:
                self.in_pipe -= os.splice(self.r, self.dst.fileno(), self.in_pipe, flags=SPLICE_FLAGS)
            except BlockingIOError:
                self.loop.remove_reader(self.src.fileno())  # flow control: the pipe is our buffer
                self.loop.add_writer(self.dst.fileno(), self.writable)
                return
            except OSError:
                self.pair.close()
                return
        self.loop.remove_writer(self.dst.fileno())
        if self.eof:
            if not self.done:
                self.done = True
                try:
                    self.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                self.pair.direction_done()
        else:
            self.loop.add_reader(self.src.fileno(), self.readable)

    def close(self) -> None:
        for fd in (self.src.fileno(), self.dst.fileno()):
            if fd >= 0:
                self.loop.remove_reader(fd)
                self.loop.remove_writer(fd)
        os.close(self.r)
        os.close(self.w)


class SplicePair:
    def __init__(self, loop: asyncio.AbstractEventLoop, down: socket.socket, up: socket.socket) -> None:
        self.down, self.up = down, up
        self.closed = False
        self.ended = 0
        self.pumps = (SplicePump(loop, down, up, self), SplicePump(loop, up, down, self))

    def direction_done(self) -> None:
        self.ended += 1
        if self.ended == 2:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for pump in self.pumps:
                pump.close()
            self.down.close()
            self.up.close()


async def serve_splice(port: int, host: str, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", port), backlog=4096)
    listener.setblocking(False)

    def accept() -> None:
        try:
            down, _ = listener.accept()
        except BlockingIOError:
            return
        up = socket.create_connection((host, upstream_port))  # blocking connect: loopback, a measurement only
        for s in (down, up):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        SplicePair(loop, down, up)

    loop.add_reader(listener.fileno(), accept)
    print(f"ready {port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port")
    parser.add_argument("--splice", action="store_true")
    args = parser.parse_args()
    host, _, upstream_port = args.upstream.rpartition(":")
    serve = serve_splice if args.splice else serve_l4
    uvloop.run(serve(args.port, host, int(upstream_port)))


if __name__ == "__main__":
    main()
