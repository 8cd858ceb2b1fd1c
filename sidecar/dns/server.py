"""``MeshDns``: the sidecar's DNS server of transparent mode (DESIGN.md §10, Istio's DNS proxy).

An A query for a mesh name is answered here with the service's VIPs (authoritative, ``ttl``); any
other type for a mesh name gets NOERROR with no answer (NODATA), so that clients use the A record
instead of asking elsewhere. Every other query goes unchanged to the resolvers of resolv.conf, and
their answer comes back unchanged (NXDOMAIN, SERVFAIL, TC and the client's id included): UDP over
UDP, TCP over TCP. No answer within ``timeout``, or every upstream failing, gives the client SERVFAIL.

UDP forwarding: by default one connected socket per upstream, the query's id rewritten to a random
free id and restored in the answer (an answer must also echo the question). bench/dns.py measured
this against one socket per query (``udp_socket_per_query=True``, the client's id kept, a random
source port as extra spoofing defence): 38 against 56 µs of server CPU per forwarded answer, so the
shared socket is the default (the per-query mode is kept for the comparison and for hardening).
TCP forwarding opens one upstream connection per query, in a task (TCP is rare: truncated answers).

Bounds: ``max_pending`` forwarded queries in flight (beyond: SERVFAIL at once, counted),
``max_tcp_connections`` client connections with an idle timeout, per-connection limits in
``protocols.TcpConnection``; a cache of this server's own mesh answers, emptied when full or when
the table changes. Malformed input is counted, never raised: a message shorter than a header, or
a response (QR set), is dropped (an answer would only feed amplification or loops); a query whose
header parses and question does not (a bad or looping pointer, cut short, a label over 63 bytes, a
name over 255) gets FORMERR, the header alone, as unbound and CoreDNS answer (RFC 1035 4.1.1).

Who changes what: the xDS layer calls :meth:`MeshDns.set_table` on the loop (the whole table at
once); the sidecar's wiring calls ``start``/``stop``; the metrics layer reads :meth:`snapshot`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from random import getrandbits

from dnslib import CLASS, QTYPE, RCODE, RR, A, DNSBuffer, DNSHeader, DNSQuestion, DNSRecord

from sidecar.dns.protocols import Pending, TcpConnection, UdpListener, UdpUpstream
from sidecar.dns.stats import DnsStats
from sidecar.dns.table import DnsTable

log = logging.getLogger("meshkeeper.sidecar.dns")

DEFAULT_MAX_PENDING = 1024
DEFAULT_TIMEOUT = 3.0  # below glibc's 5 s per try, so a client sees our SERVFAIL before its own timeout
DEFAULT_TTL = 30
DEFAULT_MAX_TCP_CONNECTIONS = 128
DEFAULT_TCP_IDLE_TIMEOUT = 10.0
UDP_ANSWER_LIMIT = 512  # our own answers over UDP; larger ones go out truncated (TC) with no records
UPSTREAM_DOWN_SECONDS = 5.0  # after an ICMP error, new queries prefer the other upstreams this long
MESH_CACHE_SIZE = 4096
_A = QTYPE.A
_IN = CLASS.IN  # the mesh's names are of class IN only; CH, HS, ANY... go upstream


class MeshDns:
    def __init__(self, upstreams: list[tuple[str, int]], *, max_pending: int = DEFAULT_MAX_PENDING,
                 timeout: float = DEFAULT_TIMEOUT, ttl: int = DEFAULT_TTL,
                 max_tcp_connections: int = DEFAULT_MAX_TCP_CONNECTIONS,
                 tcp_idle_timeout: float = DEFAULT_TCP_IDLE_TIMEOUT, udp_socket_per_query: bool = False,
                 table: DnsTable | None = None) -> None:
        if not 1 <= max_pending <= 32768:  # ids of the shared sockets are 16 bits: keep them sparse
            raise ValueError("max_pending must be between 1 and 32768")
        if timeout <= 0 or tcp_idle_timeout <= 0 or max_tcp_connections < 1 or ttl < 0:
            raise ValueError("timeouts and max_tcp_connections must be positive, ttl not negative")
        self.upstreams = list(upstreams)
        self.max_pending = max_pending
        self.timeout = timeout
        self.ttl = ttl
        self.max_tcp_connections = max_tcp_connections
        self.tcp_idle_timeout = tcp_idle_timeout
        self.udp_socket_per_query = udp_socket_per_query
        self.stats = DnsStats()
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tcp_connections: set[TcpConnection] = set()
        self._table = table if table is not None else DnsTable()
        self._cache: dict[bytes, tuple[bool, bytes]] = {}  # query minus id -> (is A, answer minus id)
        self._pending: set[Pending] = set()
        self._by_uid: dict[int, Pending] = {}
        self._down_until = [0.0] * len(self.upstreams)
        self._up_transports: list[asyncio.DatagramTransport | None] = []
        self._udp: UdpListener | None = None
        self._tcp_server: asyncio.Server | None = None
        self._logged: set[str] = set()

    # -- lifecycle and config ---------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind UDP and TCP on ``host:port`` (0: one free port for both); returns the port."""
        loop = self.loop = asyncio.get_running_loop()
        for _ in range(20):
            udp_t, udp_p = await loop.create_datagram_endpoint(lambda: UdpListener(self), local_addr=(host, port))
            chosen = udp_t.get_extra_info("sockname")[1]
            try:
                self._tcp_server = await loop.create_server(lambda: TcpConnection(self), host, chosen,
                                                            reuse_address=True)
            except OSError:
                udp_t.close()
                if port:
                    raise
                continue  # the free UDP port is taken for TCP: pick another
            break
        else:
            raise OSError(f"no port free for both UDP and TCP on {host}")
        self._udp = udp_p
        self.port = chosen
        if not self.udp_socket_per_query:
            for i, (uhost, uport) in enumerate(self.upstreams):
                try:
                    t, _ = await loop.create_datagram_endpoint(lambda i=i: UdpUpstream(self, i),
                                                               remote_addr=(uhost, uport))
                except OSError as exc:
                    log.warning("DNS upstream %s:%s unusable over UDP: %s", uhost, uport, exc)
                    t = None
                self._up_transports.append(t)
        return chosen

    async def stop(self) -> None:
        """Close every socket; queries in flight get no answer."""
        tasks = []
        for p in list(self._pending):
            if p.task is not None:
                p.task.cancel()
                tasks.append(p.task)
            self._release(p)
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
        for t in self._up_transports:
            if t is not None:
                t.close()
        self._up_transports = []
        if self._tcp_server is not None:
            self._tcp_server.close()
        for conn in list(self.tcp_connections):
            conn.transport.abort()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._tcp_server is not None:
            await self._tcp_server.wait_closed()
            self._tcp_server = None

    def set_table(self, table: DnsTable) -> None:
        """Swap the table whole: the next query sees the new one (call on the loop)."""
        self._table = table
        self._cache = {}

    @property
    def table(self) -> DnsTable:
        return self._table

    @property
    def pending(self) -> int:
        return len(self._pending)

    def snapshot(self) -> dict[str, int]:
        return self.stats.snapshot()

    def internal_error(self, where: str) -> None:
        """Called from an ``except`` block of a protocol callback: count, log the first of each kind."""
        self.stats.internal_errors += 1
        if where not in self._logged:
            self._logged.add(where)
            log.exception("DNS %s failed (logged once, counted in internal_errors)", where)

    # -- queries ----------------------------------------------------------------------------------

    def query(self, data: bytes, addr, conn: TcpConnection | None) -> bytes | None:
        """One client message: the answer to send now, or None (forwarded, or dropped)."""
        st = self.stats
        cached = self._cache.get(data[2:])
        if cached is not None:
            st.downstream_rx_queries += 1
            if conn is not None:
                st.downstream_rx_tcp_queries += 1
            st.known_domain_queries += 1
            if cached[0]:
                st.local_a_record_answers += 1
            else:
                st.local_nodata_answers += 1
            return data[:2] + cached[1]
        if len(data) < 12 or data[2] & 0x80:  # shorter than a header, or a response: dropped
            st.downstream_rx_invalid += 1
            return None
        buf = DNSBuffer(data)
        header = DNSHeader.parse(buf)  # (12 bytes always parse)
        try:
            question = DNSQuestion.parse(buf) if header.q else None
        except Exception:  # dnslib's DNSError, BufferError, struct, decoding and recursion errors
            question = None
        if header.q and (question is None or not _valid_name(question.qname.label)):
            st.downstream_rx_invalid += 1
            st.downstream_tx_formerr += 1
            return _formerr(data)
        st.downstream_rx_queries += 1
        if conn is not None:
            st.downstream_rx_tcp_queries += 1
        if question is not None and header.q == 1 and header.opcode == 0 and question.qclass == _IN:
            labels = question.qname.label
            # (a label holding a dot is another name than the labels it looks like: not the mesh's)
            vips = self._table.get(b".".join(labels).decode().lower()) if b"." not in b"".join(labels) else None
            if vips is not None:
                return self._answer_mesh(data, header, question, vips, conn is None)
        return self._forward(data, buf.offset, header, question, addr, conn)

    def _answer_mesh(self, data: bytes, header, question, vips: tuple[str, ...], udp: bool) -> bytes:
        st = self.stats
        st.known_domain_queries += 1
        reply = DNSRecord(DNSHeader(id=header.id, bitmap=header.bitmap, qr=1, aa=1, ra=1), q=question)
        reply.header.rcode = RCODE.NOERROR
        reply.header.tc = 0
        is_a = question.qtype == _A
        if is_a:
            for vip in vips:
                reply.add_answer(RR(question.qname, _A, rdata=A(vip), ttl=self.ttl))
            st.local_a_record_answers += 1
        else:
            st.local_nodata_answers += 1
        out = reply.pack()
        if len(out) <= UDP_ANSWER_LIMIT:
            cache = self._cache
            if len(cache) >= MESH_CACHE_SIZE:
                cache.clear()
            cache[data[2:]] = (is_a, bytes(out[2:]))
        elif udp:
            reply.rr = []
            reply.header.tc = 1
            out = reply.pack()
        return out

    # -- forwarding -------------------------------------------------------------------------------

    def _forward(self, data: bytes, qend: int, header, question, addr, conn: TcpConnection | None) -> bytes | None:
        st = self.stats
        if len(self._pending) >= self.max_pending:
            st.external_queries_overflow += 1
            return _servfail(header, question)
        if not self.upstreams:
            st.external_errors += 1
            return _servfail(header, question)
        st.external_queries += 1
        st.external_queries_active += 1
        p = Pending(data, qend, header, question, addr, conn)
        self._pending.add(p)
        p.timer = self.loop.call_later(self.timeout, self._expire, p)
        if conn is not None:
            conn.inflight += 1
            p.task = self.loop.create_task(self._forward_tcp(p))
        else:
            p.upstream = self._pick()
            self._send_udp(p)
        return None

    def _pick(self) -> int:
        down = self._down_until
        if len(down) > 1:
            now = self.loop.time()
            for i, until in enumerate(down):
                if until <= now:
                    return i
        return 0

    def _send_udp(self, p: Pending) -> None:
        p.tries += 1
        if self.udp_socket_per_query:
            self._send_own_socket(p)
            return
        if p.uid < 0:
            by_uid = self._by_uid
            uid = getrandbits(16)
            while uid in by_uid:
                uid = getrandbits(16)
            p.uid = uid
            by_uid[uid] = p
        transport = self._up_transports[p.upstream]
        if transport is None or transport.is_closing():
            self._retry(p)
        else:
            transport.sendto(p.uid.to_bytes(2, "big") + p.query[2:])

    def _send_own_socket(self, p: Pending) -> None:
        host, port = self.upstreams[p.upstream]
        sock = None
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect((host, port))
            sock.send(p.query)
        except OSError:
            if sock is not None:
                sock.close()
            self._retry(p)
            return
        p.sock = sock
        self.loop.add_reader(sock.fileno(), self._own_socket_readable, p)

    def _own_socket_readable(self, p: Pending) -> None:
        try:
            try:
                data = p.sock.recv(65535)
            except BlockingIOError:
                return
            except OSError:  # ECONNREFUSED from the ICMP error of our send
                self._close_own_socket(p)
                self._retry(p)
                return
            if data[:2] != p.query[:2] or not _answers(p, data):
                self.stats.external_unsolicited += 1
                return
            self._complete(p, data)
        except Exception:
            self.internal_error("upstream answer")

    def _close_own_socket(self, p: Pending) -> None:
        sock, p.sock = p.sock, None
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()

    def upstream_answer(self, index: int, data: bytes) -> None:
        """A datagram on the shared socket of upstream ``index`` (UdpUpstream)."""
        p = self._by_uid.get(data[0] << 8 | data[1]) if len(data) >= 12 else None
        if p is None or p.upstream != index or not _answers(p, data):
            self.stats.external_unsolicited += 1
            return
        self._complete(p, p.query[:2] + data[2:])

    def upstream_failed(self, index: int) -> None:
        """An ICMP error on upstream ``index``'s socket: move its queries on to the next upstream."""
        self._down_until[index] = self.loop.time() + UPSTREAM_DOWN_SECONDS
        for p in [p for p in self._by_uid.values() if p.upstream == index]:
            self._retry(p)

    def _retry(self, p: Pending) -> None:
        if p.tries >= len(self.upstreams):
            self._fail(p)
            return
        self.stats.external_retries += 1
        p.upstream = (p.upstream + 1) % len(self.upstreams)
        self._send_udp(p)

    async def _forward_tcp(self, p: Pending) -> None:
        n = len(self.upstreams)
        start = self._pick()
        try:
            for i in range(n):
                host, port = self.upstreams[(start + i) % n]
                p.tries += 1
                if i:
                    self.stats.external_retries += 1
                try:
                    data = await _ask_over_tcp(host, port, p)
                except (OSError, asyncio.IncompleteReadError):
                    continue
                self._complete(p, data)
                return
            self._fail(p)
        except Exception:
            self.internal_error("TCP forward")
            self._fail(p)

    # -- the end of a forwarded query -------------------------------------------------------------

    def _release(self, p: Pending) -> bool:
        if p.done:
            return False
        p.done = True
        if p.timer is not None:
            p.timer.cancel()
        if p.uid >= 0:
            self._by_uid.pop(p.uid, None)
        if p.sock is not None:
            self._close_own_socket(p)
        self._pending.discard(p)
        self.stats.external_queries_active -= 1
        return True

    def _complete(self, p: Pending, answer: bytes) -> None:
        if not self._release(p):
            return
        st = self.stats
        st.external_answers += 1
        rcode = answer[3] & 0x0F
        if rcode == 3:
            st.external_nxdomain_answers += 1
        elif rcode == 2:
            st.external_servfail_answers += 1
        if answer[2] & 0x02:
            st.external_truncated_answers += 1
        self._deliver(p, answer)

    def _fail(self, p: Pending) -> None:
        if self._release(p):
            self.stats.external_errors += 1
            self._deliver(p, _servfail(p.header, p.question))

    def _expire(self, p: Pending) -> None:
        try:
            p.timer = None
            if p.task is not None:
                p.task.cancel()
            if self._release(p):
                self.stats.unanswered_queries += 1
                self._deliver(p, _servfail(p.header, p.question))
        except Exception:
            self.internal_error("timeout")

    def _deliver(self, p: Pending, answer: bytes) -> None:
        conn = p.conn
        if conn is None:
            udp = self._udp
            if udp is not None and udp.transport is not None and not udp.transport.is_closing():
                udp.transport.sendto(answer, p.addr)
                self.stats.downstream_tx_responses += 1
        else:
            conn.answer(answer)
            conn.forward_done()


async def _ask_over_tcp(host: str, port: int, p: Pending) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(len(p.query).to_bytes(2, "big") + p.query)
        while True:
            size = int.from_bytes(await reader.readexactly(2), "big")
            data = await reader.readexactly(size)
            if data[:2] == p.query[:2] and _answers(p, data):
                return data
    finally:
        writer.close()


def _answers(p: Pending, data: bytes) -> bool:
    """Whether ``data`` (id already matched) is an answer to ``p``: QR set, the question echoed
    (case aside), or no question at all in an error answer (FORMERR, NOTIMP, REFUSED)."""
    if len(data) < 12 or not data[2] & 0x80:
        return False
    if data[4:6] == b"\x00\x00" and data[3] & 0x0F:
        return True
    return data[12:p.qend].lower() == p.query[12:p.qend].lower()


def _valid_name(labels: tuple[bytes, ...]) -> bool:
    """RFC 1035's limits, which dnslib's parser does not check (its packer does, and raises):
    labels of 1..63 bytes, 255 bytes in all."""
    return all(0 < len(label) <= 63 for label in labels) and sum(len(label) + 1 for label in labels) < 255


def _formerr(data: bytes) -> bytes:
    """FORMERR for a query whose header parses and question does not: the header alone (id,
    opcode and RD kept, no section), as unbound and CoreDNS answer."""
    return data[:2] + bytes((0x80 | data[2] & 0x79, 0x01)) + bytes(8)


def _servfail(header, question) -> bytes:
    reply = DNSRecord(DNSHeader(id=header.id, bitmap=header.bitmap, qr=1, ra=1), q=question)
    h = reply.header
    h.aa = 0
    h.tc = 0
    h.rcode = RCODE.SERVFAIL
    return reply.pack()
