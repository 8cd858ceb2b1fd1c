"""The inbound listener's ``tls_inspector`` and mTLS termination (docs/identity.md).

When the inbound listener has mTLS chains, each accepted connection gets a :class:`TlsInspector`
instead of its connection manager (or tcp_proxy). It looks at the connection's first bytes, as Envoy's
tls_inspector does (a TLS handshake record starts with 0x16; no HTTP request does), and:

* TLS: the bytes already read are fed to a TLS server protocol (``SSLProtocol``, uvloop's when
  the loop is uvloop's) made with :meth:`TlsIdentity.server_context`, which requires a client
  certificate from the trust bundle. After the handshake the caller's URI SAN must start with the
  chain's prefix; then the connection manager (``peer_id``: the caller's SPIFFE ID;
  ``peer_cert_hash``: the SHA-256 of its certificate's DER, lower-case hex, computed once per
  connection for XFCC's ``Hash``) or the tcp_proxy takes the decrypted stream and the inspector is gone: nothing of it stays on the data path.
* plaintext: PERMISSIVE hands the connection, bytes included, to the connection manager as
  without TLS; STRICT closes it (no chain matches).

No byte is lost: the first chunk is read by the inspector and given on. Nothing here runs for a
listener without mTLS chains (the dispatcher hands such connections to the connection manager).

Counted on the listener's stats, with Envoy's names (dots written as underscores):
``no_filter_chain_match`` (STRICT, plaintext), ``downstream_pre_cx_timeout`` (no first byte
within ``LISTENER_FILTERS_TIMEOUT``), ``ssl_handshake`` (done, the peer verified),
``ssl_fail_verify_no_cert``, ``ssl_fail_verify_error`` (a chain that does not verify),
``ssl_fail_verify_san`` (its URI SAN is not the chain's prefix), ``ssl_connection_error``
(any other handshake failure, or no identity yet to terminate with).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import hashlib
import logging
import ssl
from collections.abc import Callable
from typing import Any

from sidecar.config import TLS_STRICT, DownstreamTlsConfig
from sidecar.tls.identity import TlsIdentity
from sidecar.tls.peer import uri_sans

try:
    import uvloop
    from uvloop.loop import SSLProtocol as _UvSSLProtocol
except ImportError:  # pragma: no cover - uvloop is a dependency; the asyncio protocol is the fallback
    uvloop = None
    _UvSSLProtocol = None

log = logging.getLogger("meshkeeper.sidecar.tls")

TLS_HANDSHAKE_RECORD = 0x16
LISTENER_FILTERS_TIMEOUT = 15.0  # Envoy's listener_filters_timeout default
HANDSHAKE_TIMEOUT = 10.0  # the TLS handshake once it began
# OpenSSL's reasons for a client that sent no certificate (TLS 1.3, TLS 1.2).
_NO_CERT_REASONS = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATE_RETURNED"})
_logged: set[str] = set()


def _log_once(cause: str, message: str, *args: object) -> None:
    if cause not in _logged:
        _logged.add(cause)
        log.warning(message + " (logged once per cause; see stats for counts)", *args)


class InboundTls:
    """What the inspector of one listener needs: its chains' config, the identity, the stats."""

    __slots__ = ("config", "identity", "stats")

    def __init__(self, config: DownstreamTlsConfig, identity: TlsIdentity, stats: Any) -> None:
        self.config = config
        self.identity = identity
        self.stats = stats

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, InboundTls) and self.config == other.config and self.identity is other.identity
                and self.stats is other.stats)

    def __hash__(self) -> int:
        return hash(self.config)


def ssl_protocol(loop: asyncio.AbstractEventLoop, app: asyncio.BaseProtocol, ctx: ssl.SSLContext,
                 waiter: asyncio.Future, *, server_side: bool, server_hostname: str | None = None):
    """A TLS protocol over an existing transport: uvloop's on a uvloop loop, else asyncio's."""
    cls = _UvSSLProtocol if uvloop is not None and isinstance(loop, uvloop.Loop) else asyncio.sslproto.SSLProtocol
    return cls(loop, app, ctx, waiter, server_side, server_hostname, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)


def feed(proto, data: bytes) -> None:
    """Give ``data`` (already read from the transport) to a buffered TLS protocol."""
    view = memoryview(data)
    while view:
        buf = proto.get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        proto.buffer_updated(n)
        view = view[n:]


class TlsInspector(asyncio.Protocol):
    """An accepted connection of a listener with mTLS chains, until its first bytes decide."""

    __slots__ = ("_tls", "_make", "_transport", "_timer")

    def __init__(self, tls: InboundTls, make: Callable[[str, str], asyncio.Protocol]) -> None:
        self._tls = tls
        # The listener's protocol (HCM or tcp_proxy) for a caller's SPIFFE ID and the SHA-256 of
        # its certificate (both "": plaintext).
        self._make = make
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(LISTENER_FILTERS_TIMEOUT, self._timeout)

    def _timeout(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._tls.stats.downstream_pre_cx_timeout += 1
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tls = self._tls
        if data[0] != TLS_HANDSHAKE_RECORD:
            if tls.config.mode == TLS_STRICT:
                tls.stats.no_filter_chain_match += 1
                transport.close()
                return
            proto = self._make("", "")
            transport.set_protocol(proto)
            proto.connection_made(transport)
            proto.data_received(data)
            return
        ctx = tls.identity.server_context()
        if ctx is None:
            tls.stats.ssl_connection_error += 1
            _log_once("no-identity", "inbound mTLS connection closed: this sidecar has no certificate yet")
            transport.abort()
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        waiter.add_done_callback(self._handshake_failed)
        try:
            proto = ssl_protocol(loop, _Verified(tls, self._make), ctx, waiter, server_side=True)
            transport.set_protocol(proto)
            proto.connection_made(transport)
            feed(proto, data)
        except Exception as exc:  # a bug: close this connection, never the listener
            log.warning("inbound TLS: unexpected error; connection closed", exc_info=exc)
            if not waiter.done():
                waiter.set_exception(ConnectionAbortedError("TLS setup failed"))
            transport.abort()

    def _handshake_failed(self, waiter: asyncio.Future) -> None:
        exc = None if waiter.cancelled() else waiter.exception()
        if exc is None:
            return
        stats = self._tls.stats
        if isinstance(exc, ssl.SSLCertVerificationError):
            stats.ssl_fail_verify_error += 1
        elif isinstance(exc, ssl.SSLError) and exc.reason in _NO_CERT_REASONS:
            stats.ssl_fail_verify_no_cert += 1
        else:
            stats.ssl_connection_error += 1

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Verified(asyncio.Protocol):
    """The TLS protocol's first app protocol: checks the caller's SAN once, then hands over."""

    __slots__ = ("_tls", "_make")

    def __init__(self, tls: InboundTls, make: Callable[[str, str], asyncio.Protocol]) -> None:
        self._tls = tls
        self._make = make

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = self._tls
        ssl_object = transport.get_extra_info("ssl_object")
        sans = uri_sans(ssl_object.getpeercert() if ssl_object is not None else None)
        if not sans or not sans[0].startswith(tls.config.san_prefix):
            tls.stats.ssl_fail_verify_san += 1
            transport.abort()
            return
        tls.stats.ssl_handshake += 1
        der = ssl_object.getpeercert(binary_form=True)  # verified above: the SAN came from it
        proto = self._make(sans[0], hashlib.sha256(der).hexdigest() if der else "")
        transport.set_protocol(proto)
        proto.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # never: the connection manager took over
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass
