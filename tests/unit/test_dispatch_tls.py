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


async def test_transparent_strict_without_a_default_chain_closes_other_ports_as_no_filter_chain_match(monkeypatch):
    from sidecar.config import TLS_STRICT
    from sidecar.interception.dispatch import Dispatcher
    from tests.support.fakes import FakeTransport

    server = Server(NodeInfo(node_id="n", service="b", interception="redirect"))
    server.apply_listeners({"inbound": ListenerConfig(
        "inbound", route_config=ROUTES, tls=DownstreamTlsConfig(TLS_STRICT, "spiffe://td/"),
        transparent=TransparentConfig(explicit_port=8080, default_chain=None))})
    holder = server.dispatch["inbound"]
    table = holder.table
    assert table.target(("10.0.0.5", 9090), ("10.0.0.5", 15006)) == (None, True)

    class Sock:
        def getsockname(self):
            return ("10.0.0.5", 15006)

    class Transport(FakeTransport):
        def get_extra_info(self, name, default=None):
            return Sock() if name == "socket" else default

    monkeypatch.setattr("sidecar.interception.dispatch.original_dst", lambda sock: ("10.0.0.5", 9090))
    d = Dispatcher(holder)
    transport = Transport(d)
    d.connection_made(transport)
    assert transport.aborted and holder.stats.no_chain == 1
    assert server.listener_contexts["inbound"].stats.no_filter_chain_match == 1
