"""A tiny asyncio HTTP/1.1 server for admin and metrics pages (control plane and sidecar).

Not for the data path: requests are read whole (bodies up to ``max_body``), one at a time per
connection, and answered by one handler::

    async def handler(method, path, query, headers, body) -> (status, content_type, body)
    server = await HttpServer.start(handler, "127.0.0.1", 0)   # server.port is the bound port

``path`` is percent-decoded, ``query`` maps each name to its last value, ``headers`` maps
lower-case names to values (repeats joined with ", "), ``body`` is bytes. The handler may be a
plain function or a coroutine function, and may return a fourth item, extra response headers.
HEAD is answered like GET without the body. Keep-alive and pipelining work; idle connections are
closed after ``idle_timeout``. A handler that raises gets a 500 and one log line with the trace.

A body may also be a :class:`Stream` (Server-Sent Events, for the console): the head goes out
without a length, each chunk as the iterator yields it, and the connection closes when the
iterator ends. The iterator is closed when the client goes away, and a client that reads slower
than the stream writes (more than ``max_buffer`` unsent bytes) is disconnected, so a stuck browser
tab costs a bounded buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

import httptools

log = logging.getLogger("meshkeeper.httpd")



class Stream:
    """A response body written as it is produced: an async iterator of byte chunks."""

    __slots__ = ("chunks", "max_buffer")

    def __init__(self, chunks: AsyncIterator[bytes], max_buffer: int = 1 << 20) -> None:
        self.chunks = chunks
        self.max_buffer = max_buffer


Reply = tuple[int, str, bytes | Stream] | tuple[int, str, bytes | Stream, Mapping[str, str]]
Handler = Callable[[str, str, dict[str, str], dict[str, str], bytes], Reply | Awaitable[Reply]]

DEFAULT_MAX_BODY = 1 << 20
DEFAULT_IDLE_TIMEOUT = 30.0
MAX_QUEUED = 16  # pipelined requests buffered per connection before reading pauses
SERVER_NAME = "meshkeeper"


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def render_response(status: int, content_type: str, body: bytes | None, *, keep_alive: bool,
                    head: bool = False, extra: Mapping[str, str] | None = None) -> bytes:
    """The response; with ``body`` None only the head of a stream (no length, closed at its end)."""
    lines = [f"HTTP/1.1 {status} {_reason(status)}", f"Server: {SERVER_NAME}",
             f"Date: {formatdate(usegmt=True)}", f"Content-Type: {content_type}"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines.append(f"Connection: {'keep-alive' if keep_alive and body is not None else 'close'}")
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head_bytes if head or body is None else head_bytes + body


class _Request:
    __slots__ = ("method", "url", "headers", "body", "keep_alive")

    def __init__(self) -> None:
        self.method = ""
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.keep_alive = True


class HttpProtocol(asyncio.Protocol):
    """One connection. State: per connection, then per request; parser callbacks last."""

    def __init__(self, handler: Handler, max_body: int, idle_timeout: float,
                 connections: set[HttpProtocol]) -> None:
        # per connection
        self._handler = handler
        self._max_body = max_body
        self._idle_timeout = idle_timeout
        self._transport: Any = None  # asyncio.Transport once connected
        self._connections = connections
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[_Request] = deque()
        self._worker: asyncio.Task | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._paused = False
        self._closing = False
        # per request
        self._req: _Request | None = None

    # -- protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._connections.discard(self)
        self._cancel_idle()
        if self._worker is not None:
            self._worker.cancel()

    def data_received(self, data: bytes) -> None:
        self._cancel_idle()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(501, "protocol upgrade is not supported")
        except httptools.HttpParserError as exc:
            # Exceptions raised in parser callbacks come back wrapped, the original as context.
            if isinstance(exc.__context__, _TooLarge):
                self._fail(413, "request body too large")
            else:
                self._fail(400, f"bad request: {exc}")
        if self._queue and self._worker is None and not self._closing:
            self._worker = asyncio.get_running_loop().create_task(self._serve())
        elif not self._queue and self._worker is None:
            self._arm_idle()

    # -- parser callbacks

    def on_message_begin(self) -> None:
        self._req = _Request()

    def on_url(self, url: bytes) -> None:
        self._req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        h = self._req.headers
        h[key] = f"{h[key]}, {val}" if key in h else val

    def on_headers_complete(self) -> None:
        req = self._req
        req.method = self._parser.get_method().decode("ascii", "replace")
        length = req.headers.get("content-length", "")
        if length.isdigit() and int(length) > self._max_body:
            raise _TooLarge()
        if req.headers.get("expect", "").lower() == "100-continue":
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._req.body += body
        if len(self._req.body) > self._max_body:
            raise _TooLarge()

    def on_message_complete(self) -> None:
        # httptools resets its per-message state once feed_data() returns: read it now.
        self._req.keep_alive = self._parser.should_keep_alive()
        self._queue.append(self._req)
        self._req = None
        if len(self._queue) >= MAX_QUEUED and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    # -- serving

    async def _serve(self) -> None:
        try:
            while self._queue and not self._closing:
                req = self._queue.popleft()
                if self._paused and len(self._queue) < MAX_QUEUED // 2:
                    self._paused = False
                    self._transport.resume_reading()
                status, ctype, body, extra = await self._call(req)
                if isinstance(body, Stream):
                    await self._stream(status, ctype, body, extra, head=req.method == "HEAD")
                    return
                out = render_response(status, ctype, body, keep_alive=req.keep_alive,
                                      head=req.method == "HEAD", extra=extra)
                self._transport.write(out)
                if not req.keep_alive:
                    self._close()
                    return
        finally:
            self._worker = None
            if not self._closing:
                self._arm_idle()

    async def _stream(self, status: int, ctype: str, body: Stream, extra: Mapping[str, str] | None,
                      head: bool) -> None:
        """Write a :class:`Stream` until it ends or the client goes; then close the connection."""
        chunks = body.chunks
        try:
            self._transport.write(render_response(status, ctype, None, keep_alive=False, extra=extra))
            if head:
                return
            async for chunk in chunks:
                if self._closing:
                    return
                self._transport.write(chunk)
                if self._transport.get_write_buffer_size() > body.max_buffer:
                    log.info("closing a stream to a client that does not read (%d bytes unsent)",
                             self._transport.get_write_buffer_size())
                    return
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            self._close()

    async def _call(self, req: _Request) -> tuple[int, str, bytes | Stream, Mapping[str, str] | None]:
        try:
            url = httptools.parse_url(bytes(req.url))
            path = unquote(url.path.decode("latin-1")) if url.path else "/"
            query = dict(parse_qsl(url.query.decode("latin-1"), keep_blank_values=True)) if url.query else {}
            method = "GET" if req.method == "HEAD" else req.method
            result: Any = self._handler(method, path, query, req.headers, bytes(req.body))
            if inspect.isawaitable(result):
                result = await result
            status, ctype, body, *rest = result
            return int(status), ctype, body if isinstance(body, Stream) else bytes(body), (rest[0] if rest else None)
        except asyncio.CancelledError:
            raise
        except httptools.HttpParserInvalidURLError:
            return 400, "text/plain; charset=utf-8", b"bad request: invalid URL\n", None
        except Exception:
            log.exception("admin HTTP handler failed for %s %r", req.method, bytes(req.url))
            return 500, "text/plain; charset=utf-8", b"internal error\n", None

    def _fail(self, status: int, message: str) -> None:
        if self._transport is not None and not self._closing:
            self._transport.write(render_response(status, "text/plain; charset=utf-8",
                                                  (message + "\n").encode(), keep_alive=False))
        self._close()

    def close(self) -> None:
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._cancel_idle()
        if self._transport is not None:
            self._transport.close()

    def _arm_idle(self) -> None:
        self._cancel_idle()
        if not self._closing:
            self._idle = asyncio.get_running_loop().call_later(self._idle_timeout, self._close)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None


class _TooLarge(Exception):
    pass


class HttpServer:
    """A bound server; ``port`` is the port actually bound (useful with port 0)."""

    def __init__(self, server: asyncio.AbstractServer, connections: set[HttpProtocol]) -> None:
        self._server = server
        self._connections = connections
        self.port: int = server.sockets[0].getsockname()[1]

    @classmethod
    async def start(cls, handler: Handler, host: str = "127.0.0.1", port: int = 0, *,
                    max_body: int = DEFAULT_MAX_BODY, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> HttpServer:
        loop = asyncio.get_running_loop()
        connections: set[HttpProtocol] = set()
        server = await loop.create_server(
            lambda: HttpProtocol(handler, max_body, idle_timeout, connections), host, port, reuse_address=True)
        return cls(server, connections)

    async def close(self) -> None:
        """Stop listening and close every connection (in-flight answers are dropped)."""
        self._server.close()
        for conn in list(self._connections):
            conn.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
