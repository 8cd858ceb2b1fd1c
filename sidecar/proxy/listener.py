"""Listeners: what the sidecar's main and xDS layer hold to run, reconfigure and drain one.

:func:`start_listener` serves a socket the sidecar bound itself (port 0 allowed) with a
connection manager per connection, all sharing one :class:`~sidecar.proxy.context.ListenerContext`,
and returns a :class:`Listener` that can drain::

    listener = await start_listener(context, sock)
    ...
    await listener.drain(drain_time=5.0)                # on SIGTERM: stop accepting, let requests finish
"""

from __future__ import annotations

import asyncio
import socket

from sidecar.proxy.connection_manager import ConnectionManager
from sidecar.proxy.context import ListenerContext

DEFAULT_DRAIN_TIME = 5.0
DEFAULT_BACKLOG = 1024


class Listener:
    """A serving listener: its asyncio server, bound address and runtime."""

    def __init__(self, runtime: ListenerContext, server: asyncio.AbstractServer, sock: socket.socket) -> None:
        self.runtime = runtime
        self.server = server
        self.address: tuple[str, int] = sock.getsockname()[:2]

    @property
    def port(self) -> int:
        return self.address[1]

    async def drain(self, drain_time: float = DEFAULT_DRAIN_TIME) -> bool:
        """Stop accepting, let in-flight requests finish (at most ``drain_time`` s, as Envoy's
        ``--drain-time-s``), then reset what is left.

        Returns True if every connection finished on its own.
        """
        self.server.close()
        self.runtime.start_draining()
        finished = await self.runtime.wait_idle(drain_time)
        if not finished:
            self.runtime.abort_all()
        return finished

    async def close(self) -> None:
        """Stop at once: stop accepting and reset every connection."""
        self.server.close()
        self.runtime.abort_all()
        await asyncio.sleep(0)  # let the transports deliver connection_lost


async def start_listener(runtime: ListenerContext, sock: socket.socket, *, backlog: int = DEFAULT_BACKLOG) -> Listener:
    """Serve HTTP/1.1 on a socket the caller bound (and may have made SO_REUSEPORT)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    server = await loop.create_server(lambda: ConnectionManager(runtime), sock=sock, backlog=backlog)
    return Listener(runtime, server, sock)


def bind_socket(host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False,
                exclusive: bool = False) -> socket.socket:
    """A bound, not yet listening TCP socket for :func:`start_listener` (which listens).

    ``exclusive`` first claims the port without SO_REUSEPORT, so that a port another process
    already shares (another sidecar started with --workers) is refused instead of being joined,
    which would mix two services' traffic.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if exclusive and port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock
