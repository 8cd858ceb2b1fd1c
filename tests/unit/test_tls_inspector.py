"""The inbound tls_inspector (sidecar.tls.inspector) with fake transports: what plaintext does in
PERMISSIVE and STRICT, and that no byte is lost. TLS itself is in tests/integration/test_mtls_sockets.py."""

from __future__ import annotations

import asyncio

from sidecar.config import TLS_PERMISSIVE, TLS_STRICT, DownstreamTlsConfig
from sidecar.proxy.context import ListenerStats
from sidecar.tls import TlsIdentity
from sidecar.tls.inspector import InboundTls, TlsInspector
from tests.support.fakes import FakeTransport


class Transport(FakeTransport):
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol


class App(asyncio.Protocol):
    def __init__(self) -> None:
        self.got = b""
        self.made = False
        self.peer: tuple[str, str] | None = None

    def connection_made(self, transport) -> None:
        self.made = True

    def data_received(self, data: bytes) -> None:
        self.got += data


def inspector(mode: str):
    stats = ListenerStats()
    apps: list[App] = []

    def make(peer_id: str, peer_cert_hash: str) -> App:
        apps.append(App())
        apps[-1].peer = (peer_id, peer_cert_hash)
        return apps[-1]

    insp = TlsInspector(InboundTls(DownstreamTlsConfig(mode, "spiffe://td/"), TlsIdentity(), stats), make)
    transport = Transport(insp)
    insp.connection_made(transport)
    return insp, transport, stats, apps


async def test_permissive_plaintext_goes_to_the_connection_manager_with_its_bytes():
    insp, transport, stats, apps = inspector(TLS_PERMISSIVE)
    insp.data_received(b"GET / HTTP/1.1\r\n")
    (app,) = apps
    assert transport.protocol is app and app.made and app.got == b"GET / HTTP/1.1\r\n"
    assert app.peer == ("", "")  # plaintext: no caller identity, no certificate hash
    assert not transport.closed and stats.no_filter_chain_match == 0


async def test_strict_plaintext_is_closed_and_counted():
    insp, transport, stats, apps = inspector(TLS_STRICT)
    insp.data_received(b"GET / HTTP/1.1\r\n")
    assert transport.closed and not apps and stats.no_filter_chain_match == 1


async def test_tls_without_an_identity_is_closed_and_counted():
    insp, transport, stats, apps = inspector(TLS_PERMISSIVE)
    insp.data_received(b"\x16\x03\x01\x00\x05hello")
    assert transport.aborted and not apps and stats.ssl_connection_error == 1


async def test_a_connection_closed_before_its_first_byte_costs_nothing():
    insp, transport, stats, apps = inspector(TLS_STRICT)
    insp.connection_lost(None)
    assert insp._timer is None and not apps and stats.snapshot() == ListenerStats().snapshot()


async def test_no_first_byte_in_time_is_closed_and_counted():
    insp, transport, stats, _ = inspector(TLS_STRICT)
    insp._timer.cancel()
    insp._timeout()  # what the timer does at LISTENER_FILTERS_TIMEOUT
    assert transport.closed and stats.downstream_pre_cx_timeout == 1
