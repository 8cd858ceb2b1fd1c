"""The sidecar's HTTP request path: listeners, the connection manager, routing and the router filter.

Entry points: :class:`ListenerContext` (router + clusters + stats of a listener),
:func:`start_listener` (serve a bound socket), :class:`ConnectionManager` (one downstream
connection, over a codec of :mod:`sidecar.codec`) and :class:`Router` (a compiled RouteConfig).
"""

from sidecar.proxy.connection_manager import ConnectionManager
from sidecar.proxy.context import ListenerContext, ListenerStats
from sidecar.proxy.listener import Listener, bind_socket, start_listener
from sidecar.proxy.router import RouteEntry, Router

__all__ = [
    "ConnectionManager",
    "Listener",
    "ListenerContext",
    "ListenerStats",
    "RouteEntry",
    "Router",
    "bind_socket",
    "start_listener",
]
