"""The sidecar's HTTP/1.1 proxy: listeners, the connection manager and route matching.

Entry points: :class:`ListenerRuntime` (router + clusters + stats of a listener),
:func:`start_listener` (serve a bound socket) and :class:`Router` (a compiled RouteConfig).
"""

from sidecar.proxy.http import HttpConnectionManager
from sidecar.proxy.listener import Listener, ListenerRuntime, ListenerStats, bind_socket, start_listener
from sidecar.proxy.router import RouteEntry, Router

__all__ = [
    "HttpConnectionManager",
    "Listener",
    "ListenerRuntime",
    "ListenerStats",
    "RouteEntry",
    "Router",
    "bind_socket",
    "start_listener",
]
