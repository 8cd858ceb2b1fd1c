"""Fakes of the event loop's transports and connector, and a recorder of what a client codec reports,
for unit tests that drive the request path without sockets."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from typing import Any


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


async def until(cond: Callable[[], object], limit: float = 2.0) -> None:
    """Poll ``cond`` on every loop turn until it is true, failing after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


class FakeTransport(asyncio.Transport):
    """Records writes; simulates a write buffer with a high-water mark and pause/resume_writing."""

    def __init__(self, protocol: asyncio.Protocol, high_water: int | None = None) -> None:
        super().__init__()
        self.protocol = protocol
        self.out = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True
        self.high_water = high_water  # None: writes never fill the buffer
        self.write_paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.out += data
        if self.high_water is not None and len(self.out) > self.high_water and not self.write_paused:
            self.write_paused = True
            self.protocol.pause_writing()

    def writelines(self, lines: Any) -> None:
        for line in list(lines):
            self.write(line)

    def take(self) -> bytes:
        """What was written since the last take; emptying it drains the simulated buffer."""
        data = bytes(self.out)
        self.out.clear()
        if self.write_paused:
            self.write_paused = False
            self.protocol.resume_writing()
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def peer_close(self) -> None:
        """The other side closed the connection."""
        self.close()


class FakeConnector:
    """Stands in for ``loop.create_connection``; every connection is a FakeTransport pair."""

    def __init__(self) -> None:
        self.connections: list[tuple[Any, FakeTransport]] = []
        self.fail: Exception | None = None
        self.hang = False

    async def __call__(self, factory: Callable[[], asyncio.Protocol], host: str, port: int) -> tuple[FakeTransport, Any]:
        if self.hang:
            await asyncio.Event().wait()
        if self.fail is not None:
            raise self.fail
        protocol = factory()
        transport = FakeTransport(protocol)
        protocol.connection_made(transport)
        self.connections.append((protocol, transport))
        return transport, protocol


class RecordingDecoder:
    """A ResponseDecoder (sidecar.codec.api) that records what a client codec reports:
    ("headers", status, joined header pieces, end_stream), ("complete",), ("reset", flag),
    ("paused", bool); body bytes in ``body``."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.body = bytearray()

    def on_response_headers(self, status: int, headers: list[bytes], end_stream: bool) -> None:
        self.events.append(("headers", status, b"".join(headers), end_stream))
        if end_stream:
            self.events.append(("complete",))

    def on_response_data(self, data: bytes, end_stream: bool) -> None:
        self.body += data
        if end_stream:
            self.events.append(("complete",))

    def on_response_trailers(self, trailers: list[bytes]) -> None:
        self.events.append(("complete",))

    def on_upstream_reset(self, flag: str) -> None:
        self.events.append(("reset", flag))

    def on_write_paused(self, paused: bool) -> None:
        self.events.append(("paused", paused))

    def batch_begin(self) -> None:
        pass

    def batch_end(self) -> None:
        pass




class ByteSink:
    """A transport that keeps what an HTTP/2 codec under test writes (``take`` empties it), so that
    a peer (the h2 package, sans-IO) can be fed it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data
        self.writes += 1

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = bytes(self.data)
        self.data.clear()
        return data


class RecordingPool:
    """What an HTTP/2 client connection tells its pool (sidecar.codec.http2_client), by name."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def opened(self, conn: Any) -> None:
        self.calls.append("opened")

    def capacity_changed(self, conn: Any) -> None:
        self.calls.append("capacity_changed")

    def stream_done(self, conn: Any) -> None:
        self.calls.append("stream_done")

    def lost(self, conn: Any) -> None:
        self.calls.append("lost")
