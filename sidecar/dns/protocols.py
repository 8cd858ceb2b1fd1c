"""asyncio protocols of the mesh DNS: the UDP listener, one TCP connection, one upstream socket.

They only move bytes and enforce the per-connection bounds; every decision is ``MeshDns``'s. Every
callback that runs client or upstream input is wrapped so that it never raises into the loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from sidecar.dns.stats import DnsStats


class MeshDns(Protocol):
    """What these protocols need of ``sidecar.dns.server.MeshDns`` (declared here, so that the two
    modules do not import each other)."""

    loop: asyncio.AbstractEventLoop
    stats: DnsStats
    tcp_connections: set[Any]
    max_tcp_connections: int
    tcp_idle_timeout: float
    timeout: float

    def query(self, data: bytes, addr: Any, conn: Any) -> bytes | None: ...

    def internal_error(self, where: str) -> None: ...

    def upstream_answer(self, index: int, data: bytes) -> None: ...

    def upstream_failed(self, index: int) -> None: ...

MAX_TCP_INFLIGHT = 32  # forwarded queries of one TCP connection in flight before it stops reading


class Pending:
    """One forwarded query: who asked, what was sent where, and its timer."""

    __slots__ = ("query", "qend", "header", "question", "addr", "conn", "timer", "upstream", "tries", "uid",
                 "sock", "task", "done")

    def __init__(self, query: bytes, qend: int, header, question, addr, conn: TcpConnection | None) -> None:
        self.query = query  # as the client sent it, original id included
        self.qend = qend  # end of the question section: an answer must echo query[12:qend]
        self.header = header
        self.question = question
        self.addr = addr  # UDP client address, or None for TCP
        self.conn = conn
        self.timer: asyncio.TimerHandle | None = None
        self.upstream = 0
        self.tries = 0
        self.uid = -1  # id on the shared upstream socket
        self.sock = None  # own socket (udp_socket_per_query)
        self.task: asyncio.Task | None = None  # TCP forward
        self.done = False


class UdpListener(asyncio.DatagramProtocol):
    def __init__(self, dns: MeshDns) -> None:
        self.dns = dns
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        dns = self.dns
        try:
            answer = dns.query(data, addr, None)
            if answer is not None:
                self.transport.sendto(answer, addr)
                dns.stats.downstream_tx_responses += 1
        except Exception:
            dns.internal_error("UDP query")

    def error_received(self, exc: Exception) -> None:
        self.dns.stats.downstream_tx_errors += 1


class TcpConnection(asyncio.Protocol):
    """One client connection: 2-byte length-prefixed messages, pipelined, answered in any order.

    Bounds: the buffer holds at most one read plus one partial message (a length prefix caps a message
    at 64 KiB); at ``MAX_TCP_INFLIGHT`` forwarded queries, or while the client does not read its
    answers, the connection stops reading; it closes after ``tcp_idle_timeout`` without a query.
    """

    def __init__(self, dns: MeshDns) -> None:
        self.dns = dns
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.inflight = 0
        self.write_paused = False
        self.reading = True
        self.closed = False
        self.last_activity = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        dns, st = self.dns, self.dns.stats
        st.downstream_cx_tcp_total += 1
        if len(dns.tcp_connections) >= dns.max_tcp_connections:
            st.downstream_cx_tcp_overflow += 1
            self.closed = True
            transport.abort()
            return
        self.transport = transport
        dns.tcp_connections.add(self)
        st.downstream_cx_tcp_active += 1
        self.last_activity = dns.loop.time()
        self.idle_timer = dns.loop.call_later(dns.tcp_idle_timeout, self._idle_check)

    def connection_lost(self, exc) -> None:
        if self.transport is None:  # refused in connection_made
            return
        self.closed = True
        if self in self.dns.tcp_connections:
            self.dns.tcp_connections.discard(self)
            self.dns.stats.downstream_cx_tcp_active -= 1
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.buf.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self.last_activity = self.dns.loop.time()
            self.buf += data
            self._drain()
        except Exception:
            self.dns.internal_error("TCP query")
            self.close()

    def _drain(self) -> None:
        buf, dns = self.buf, self.dns
        while len(buf) >= 2 and not self.closed:
            if self.inflight >= MAX_TCP_INFLIGHT:
                self._pause()
                return
            end = 2 + (buf[0] << 8 | buf[1])
            if len(buf) < end:
                break
            msg = bytes(buf[2:end])
            del buf[:end]
            answer = dns.query(msg, None, self)
            if answer is not None:
                self.answer(answer)
        self._resume()

    def answer(self, data: bytes) -> None:
        """Send one answer (called by MeshDns for forwarded queries too)."""
        if self.closed:
            return
        self.transport.write(len(data).to_bytes(2, "big") + data)
        self.last_activity = self.dns.loop.time()
        self.dns.stats.downstream_tx_responses += 1

    def forward_done(self) -> None:
        """A forwarded query of this connection is answered (or failed): maybe read again."""
        self.inflight -= 1
        if not self.reading and not self.closed and self.inflight < MAX_TCP_INFLIGHT:
            self.last_activity = self.dns.loop.time()
            self._drain()  # the messages read before the pause first, then the socket

    def pause_writing(self) -> None:
        self.write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.closed:
            self._drain()

    def _pause(self) -> None:
        if self.reading and not self.closed:
            self.reading = False
            self.transport.pause_reading()

    def _resume(self) -> None:
        if not self.reading and not self.closed and not self.write_paused and self.inflight < MAX_TCP_INFLIGHT:
            self.reading = True
            self.transport.resume_reading()

    def _idle_check(self) -> None:
        if self.closed:
            return
        dns = self.dns
        due = self.last_activity + dns.tcp_idle_timeout
        if self.inflight == 0 and dns.loop.time() >= due:
            dns.stats.downstream_cx_tcp_idle_timeout += 1
            self.close()
            return
        # busy with forwarded queries: look again once they are answered or timed out
        now = dns.loop.time()
        self.idle_timer = dns.loop.call_at(max(due, now + dns.timeout) if self.inflight else due, self._idle_check)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class UdpUpstream(asyncio.DatagramProtocol):
    """The shared, connected socket to one upstream resolver; answers are matched by id."""

    def __init__(self, dns: MeshDns, index: int) -> None:
        self.dns = dns
        self.index = index
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            self.dns.upstream_answer(self.index, data)
        except Exception:
            self.dns.internal_error("upstream answer")

    def error_received(self, exc: Exception) -> None:
        # ICMP port/host unreachable on the connected socket: this upstream does not answer.
        try:
            self.dns.upstream_failed(self.index)
        except Exception:
            self.dns.internal_error("upstream error")
