"""The dispatcher (explicit and transparent mode) gives the inbound listener's connections to the
tls_inspector only when the listener has mTLS chains; transparent mode's redirected connections to
the app port get it too, its other chains never."""

from __future__ import annotations

from meshkeeper.xds import NodeInfo
from sidecar.config import (
    TLS_PERMISSIVE,
    DownstreamTlsConfig,
    FilterChain,
    ListenerConfig,
    Route,
    RouteConfig,
    TcpRoute,
    TransparentConfig,
    VirtualHost,
    WeightedCluster,
)
from sidecar.proxy.connection_manager import ConnectionManager
from sidecar.server import Server
from sidecar.tls.inspector import TlsInspector

ROUTES = RouteConfig("inbound", (VirtualHost("inbound", ("*",), (Route(prefix="/", cluster="inbound|8080"),)),))


def protocol_for(server: Server, dst, local=("10.0.0.5", 15006)):
    target, redirected = server.dispatch["inbound"].table.target(dst, local)
    return target.protocol(dst if redirected else None, lambda: 0.5)


async def test_explicit_mode():
    server = Server(NodeInfo(node_id="n", service="b"))
    server.apply_listeners({"inbound": ListenerConfig("inbound", route_config=ROUTES)})
    assert type(protocol_for(server, None)) is ConnectionManager
    server.apply_listeners({"inbound": ListenerConfig("inbound", route_config=ROUTES,
                                                      tls=DownstreamTlsConfig(TLS_PERMISSIVE, "spiffe://td/"))})
    assert type(protocol_for(server, None)) is TlsInspector


async def test_transparent_mode_sniffs_the_app_port_only():
    server = Server(NodeInfo(node_id="n", service="b", interception="redirect"))
    passthrough = FilterChain("default", tcp=TcpRoute("InboundPassthroughCluster",
                                                      (WeightedCluster("InboundPassthroughCluster", 1),)))
    server.apply_listeners({"inbound": ListenerConfig(
        "inbound", route_config=ROUTES, tls=DownstreamTlsConfig(TLS_PERMISSIVE, "spiffe://td/"),
        transparent=TransparentConfig(explicit_port=8080, default_chain=passthrough))})
    assert type(protocol_for(server, ("10.0.0.5", 8080))) is TlsInspector
    assert type(protocol_for(server, ("10.0.0.5", 9090))) is not TlsInspector
