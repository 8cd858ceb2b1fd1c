"""A listener on fake transports whose cluster ``svc`` has one endpoint, a fake HTTP/1.1 upstream
that answers every request it receives (in one of several response shapes, echoing the request's
method and body in ``x-echo``): the proxy as a whole under fuzzing, from either downstream codec
(tests/unit/test_fuzz_http1_proxy.py, test_fuzz_http2_frames.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from sidecar.config import ClusterConfig, EndpointConfig, Route, RouteConfig, VirtualHost
from sidecar.proxy.connection_manager import ConnectionManager
from sidecar.proxy.context import ListenerContext
from sidecar.upstream.cluster import ClusterManager
from tests.support.fakes import FakeConnector, FakeTransport
from tests.support.http1_fuzz import echo

# The upstream's answers, by shape: (head and body for an x-echo value, whether it closes after).
SHAPES = 8
_IDLE_TURNS = 4  # loop turns without any byte moving before the exchange is taken as settled


def upstream_response(shape: int, method: bytes, tag: bytes) -> tuple[bytes, bool]:
    x = b"x-echo: " + tag + b"\r\n"
    head_only = method == b"HEAD"
    if shape == 1:
        return b"HTTP/1.1 201 Created\r\n" + x + b"Transfer-Encoding: chunked\r\n\r\n" + (
            b"" if head_only else b"2\r\nok\r\n3\r\n!!!\r\n0\r\nX-T: 1\r\n\r\n"), False
    if shape == 2:
        return b"HTTP/1.1 204 No Content\r\n" + x + b"\r\n", False
    if shape == 3:  # the body ends when the upstream closes
        return b"HTTP/1.1 200 OK\r\n" + x + b"\r\n" + (b"" if head_only else b"until-close"), True
    if shape == 4:
        return b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n" + x + b"Content-Length: 0\r\n\r\n", False
    if shape == 5:
        return b"HTTP/1.1 503 Service Unavailable\r\n" + x + b"Connection: close\r\nContent-Length: 4\r\n\r\n" + (
            b"" if head_only else b"busy"), True
    if shape == 6:
        return b"HTTP/1.1 304 Not Modified\r\n" + x + b"\r\n", False
    if shape == 7:  # HTTP/1.0 without keep-alive: the sidecar must not pool the connection
        return b"HTTP/1.0 200 OK\r\n" + x + b"Content-Length: 2\r\n\r\n" + (b"" if head_only else b"ok"), False
    return b"HTTP/1.1 200 OK\r\n" + x + b"Content-Length: 2\r\n\r\n" + (b"" if head_only else b"ok"), False


class UpstreamEnd:
    """The far end of one upstream connection: reads what the sidecar sends, answers each request."""

    def __init__(self, protocol: Any, transport: FakeTransport, shapes: list[int], split: int) -> None:
        self.protocol = protocol
        self.transport = transport
        self.shapes = shapes
        self.split = split
        self.parser = HttpRequestParser(self)
        self.heads = 0  # request heads received
        self.complete = 0  # whole requests received
        self.in_request = False
        self.method = b""
        self.body = bytearray()
        self.answer: list[tuple[bytes, bytes]] = []
        self.closed_by_us = False
        # Set: every request is answered with these reads instead (and the connection closed after
        # them if the flag says so), whatever they are.
        self.raw: tuple[list[bytes], bool] | None = None

    def on_message_begin(self) -> None:
        self.in_request = True
        self.body.clear()

    def on_headers_complete(self) -> None:
        self.heads += 1
        self.method = self.parser.get_method()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.in_request = False
        self.complete += 1
        self.answer.append((self.method, echo(self.method, bytes(self.body))))

    def pump(self, counter: list[int]) -> bool:
        """Read what arrived and answer; True if a byte moved."""
        data = self.transport.take()
        moved = bool(data)
        if data:
            try:
                self.parser.feed_data(data)
            except (HttpParserError, HttpParserUpgrade) as exc:
                raise AssertionError(f"the sidecar sent upstream bytes that do not parse ({exc!r}): {data!r}") from None
        while self.answer and not self.transport.closed:
            method, tag = self.answer.pop(0)
            shape = self.shapes[counter[0] % len(self.shapes)]
            counter[0] += 1
            reply, close = upstream_response(shape, method, tag)
            cut = self.split % (len(reply) + 1)
            pieces = [reply[:cut], reply[cut:]]
            if self.raw is not None:
                pieces, close = self.raw
            for piece in pieces:
                if piece and not self.transport.closed:
                    self.protocol.data_received(piece)
            if close and not self.transport.closed:
                self.closed_by_us = True
                self.transport.peer_close()
            moved = True
        return moved


class Exchange:
    """One client connection through a listener whose cluster ``svc`` has one fake endpoint."""

    def __init__(self, shapes: list[int], split: int, high_water: int | None,
                 raw: tuple[list[bytes], bool] | None = None) -> None:
        self.raw = raw  # what every upstream request is answered with instead of a shape (UpstreamEnd.raw)
        self.connector = FakeConnector()
        self.clusters = ClusterManager(connector=self.connector)
        self.clusters.update_clusters({"svc": ClusterConfig("svc"), "empty": ClusterConfig("empty")})
        self.clusters.update_endpoints("svc", (EndpointConfig("10.0.0.1", 8080),))
        self.runtime = ListenerContext("outbound", self.clusters)
        self.runtime.set_route_config(RouteConfig("outbound", (
            VirtualHost("svc", ("svc", "svc:*"), (Route("/", "svc"),)),
            VirtualHost("empty", ("empty",), (Route("/", "empty"),)),
            VirtualHost("ghost", ("ghost",), (Route("/", "no-such-cluster"),)),
        )))
        self.shapes = shapes
        self.split = split
        self.ends: list[UpstreamEnd] = []
        self.answered = [0]
        self.protocol = ConnectionManager(self.runtime)
        self.transport = FakeTransport(self.protocol, high_water)
        self.protocol.connection_made(self.transport)
        self.received = bytearray()

    def _turn(self) -> bool:
        moved = False
        for protocol, transport in self.connector.connections[len(self.ends):]:
            end = UpstreamEnd(protocol, transport, self.shapes, self.split)
            end.raw = self.raw
            self.ends.append(end)
        for end in self.ends:
            moved |= end.pump(self.answered)
        out = self.transport.take()  # the client reads all it is sent
        if out:
            self.received += out
            moved = True
        return moved

    async def settle(self) -> None:
        idle = 0
        for _ in range(2000):
            await asyncio.sleep(0)
            idle = 0 if self._turn() else idle + 1
            if idle >= _IDLE_TURNS:
                return
        raise AssertionError("the exchange never settled (bytes kept moving)")

    async def run(self, reads: list[bytes]) -> bool:
        """Send ``reads``; returns whether everything was sent (False: the sidecar closed first)."""
        for data in reads:
            await self.settle()
            if self.transport.closed:
                return False
            assert self.transport.reading, "reading left paused while nothing moves: a hang"
            self.protocol.data_received(data)
        await self.settle()
        return True
