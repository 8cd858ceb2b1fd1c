"""MeshDns on real sockets (127.0.0.1, port 0), in-process on uvloop, against upstream resolvers of the
test's own: ``Upstream`` (asyncio UDP+TCP, scripted per name, recording the bytes it sends) and, once,
dnslib's own threaded DNSServer. No ZooKeeper, no child processes, no sleeps to wait for state."""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import time
from collections.abc import Awaitable, Callable

import pytest
import uvloop
from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSServer

from sidecar.dns import MeshDns, build_table
from tests.support import polling

SERVICES = [("shop", "catalog", "240.240.0.7"), ("shop", "cart", "240.240.0.8"),
            ("shop", "cart", "240.240.0.9"), ("billing", "invoice", "240.240.1.2")]
TABLE = build_table(SERVICES, own_namespace="shop")

until = functools.partial(polling.until, limit=5.0)  # real sockets: a more generous deadline


def run(body: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(body(), 30))


def upstream_answer(query: DNSRecord, tcp: bool) -> DNSRecord | None:
    """The scripted upstream: what it answers for each name (None: never answers)."""
    name = str(query.q.qname).lower()
    reply = query.reply(aa=0)
    if name.startswith("silent."):
        return None
    if name.startswith("nx."):
        reply.header.rcode = RCODE.NXDOMAIN
    elif name.startswith("fail."):
        reply.header.rcode = RCODE.SERVFAIL
    elif name.startswith("big."):
        if not tcp:
            reply.header.tc = 1
            return reply
        for i in range(60):
            reply.add_answer(RR(query.q.qname, QTYPE.AAAA, rdata=AAAA(f"2001:db8::{i + 1:x}"), ttl=60))
    else:
        reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A("192.0.2.1"), ttl=123))
    return reply


class Upstream(asyncio.DatagramProtocol):
    """A real resolver on UDP and TCP of one port; ``sent`` keeps every answer's bytes."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.received = 0
        self.transport = None
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Upstream:
        loop = asyncio.get_running_loop()
        while True:  # a free UDP port whose TCP twin is free too (a client may hold it)
            self.transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
            self.port = self.transport.get_extra_info("sockname")[1]
            try:
                self.server = await asyncio.start_server(self._tcp, "127.0.0.1", self.port)
                return self
            except OSError:
                self.transport.close()

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _answer(self, data: bytes, tcp: bool) -> bytes | None:
        self.received += 1
        try:
            query = DNSRecord.parse(data)
        except Exception:  # junk MeshDns forwarded because dnslib read a question in it: ignored
            return None
        reply = upstream_answer(query, tcp)
        if reply is None:
            return None
        out = reply.pack()
        self.sent.append(out)
        return out

    def datagram_received(self, data: bytes, addr) -> None:
        out = self._answer(data, False)
        if out is not None:
            self.transport.sendto(out, addr)

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                out = self._answer(await reader.readexactly(size), True)
                if out is not None:
                    writer.write(len(out).to_bytes(2, "big") + out)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        self.transport.close()
        self.server.close()


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport = None

    @classmethod
    async def connect(cls, port: int) -> UdpClient:
        _, client = await asyncio.get_running_loop().create_datagram_endpoint(
            cls, remote_addr=("127.0.0.1", port))
        return client

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.answers.put_nowait(data)

    async def ask(self, query: DNSRecord | bytes, limit: float = 5.0) -> bytes:
        self.transport.sendto(query if isinstance(query, bytes) else query.pack())
        return await asyncio.wait_for(self.answers.get(), limit)


async def ask_tcp(port: int, *queries: DNSRecord) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(len(q.pack()).to_bytes(2, "big") + q.pack() for q in queries))
        return [await reader.readexactly(int.from_bytes(await reader.readexactly(2), "big")) for _ in queries]
    finally:
        writer.close()


def q(name: str, qtype: str = "A", qid: int | None = None) -> DNSRecord:
    record = DNSRecord.question(name, qtype)
    if qid is not None:
        record.header.id = qid
    return record


async def started(upstreams: list[tuple[str, int]], **kwargs) -> MeshDns:
    dns = MeshDns(upstreams, **kwargs)
    await dns.start("127.0.0.1", 0)
    dns.set_table(TABLE)
    return dns


def test_mesh_names_get_their_vips_and_other_types_nodata() -> None:
    async def body() -> None:
        up = await Upstream().start()
        dns = await started([up.addr], ttl=30)
        client = await UdpClient.connect(dns.port)
        for name in ("catalog.shop", "catalog.shop.mesh.local", "catalog", "CATALOG.Shop.Mesh.LOCAL."):
            ans = DNSRecord.parse(await client.ask(q(name, qid=4242)))
            assert ans.header.id == 4242 and ans.header.rcode == RCODE.NOERROR and ans.header.aa
            assert [(str(rr.rname), str(rr.rdata), rr.ttl) for rr in ans.rr] == [(name.rstrip(".") + ".", "240.240.0.7", 30)]
        ans = DNSRecord.parse(await client.ask(q("cart")))
        assert sorted(str(rr.rdata) for rr in ans.rr) == ["240.240.0.8", "240.240.0.9"]
        for qtype in ("AAAA", "MX", "TXT"):
            ans = DNSRecord.parse(await client.ask(q("Catalog.shop", qtype)))
            assert ans.header.rcode == RCODE.NOERROR and ans.rr == [] and ans.header.aa
            assert str(ans.q.qname) == "Catalog.shop." and ans.q.qtype == getattr(QTYPE, qtype)
        assert up.received == 0
        # the short name is only for the sidecar's own namespace: "invoice" goes upstream
        ans = DNSRecord.parse(await client.ask(q("invoice")))
        assert [str(rr.rdata) for rr in ans.rr] == ["192.0.2.1"] and up.received == 1
        assert [str(rr.rdata) for rr in DNSRecord.parse(await client.ask(q("invoice.billing"))).rr] == ["240.240.1.2"]
        st = dns.snapshot()
        assert st["known_domain_queries"] == 9 and st["local_a_record_answers"] == 6
        assert st["local_nodata_answers"] == 3 and st["external_queries"] == 1
        assert st["downstream_rx_queries"] == st["downstream_tx_responses"] == 10
        await dns.stop()
        await up.stop()
    run(body)


@pytest.mark.parametrize("per_query", [False, True], ids=["shared-socket", "socket-per-query"])
def test_other_names_are_forwarded_and_answered_as_the_upstream_answered(per_query: bool) -> None:
    async def body() -> None:
        up = await Upstream().start()
        dns = await started([up.addr], udp_socket_per_query=per_query)
        client = await UdpClient.connect(dns.port)
        for i, (name, rcode) in enumerate([("www.example.com", RCODE.NOERROR), ("nx.example.com", RCODE.NXDOMAIN),
                                           ("fail.example.com", RCODE.SERVFAIL), ("Catalog.Other", RCODE.NOERROR)]):
            qid = 0x1234 + i
            got = await client.ask(q(name, qid=qid))
            assert got == qid.to_bytes(2, "big") + up.sent[-1][2:]  # byte for byte, the client's id restored
            assert DNSRecord.parse(got).header.rcode == rcode
        st = dns.snapshot()
        assert st["external_queries"] == st["external_answers"] == 4
        assert st["external_nxdomain_answers"] == 1 and st["external_servfail_answers"] == 1
        assert st["external_queries_active"] == 0 and dns.pending == 0
        await dns.stop()
        await up.stop()
    run(body)


def test_truncated_upstream_answer_is_passed_on_and_tcp_gets_the_whole_answer() -> None:
    async def body() -> None:
        up = await Upstream().start()
        dns = await started([up.addr])
        client = await UdpClient.connect(dns.port)
        ans = DNSRecord.parse(await client.ask(q("big.example.com", "AAAA", qid=7)))
        assert ans.header.tc and ans.header.id == 7
        [raw] = await ask_tcp(dns.port, q("big.example.com", "AAAA", qid=8))
        assert raw == up.sent[-1] and len(DNSRecord.parse(raw).rr) == 60 and len(raw) > 512
        st = dns.snapshot()
        assert st["external_truncated_answers"] == 1 and st["downstream_rx_tcp_queries"] == 1
        await dns.stop()
        await up.stop()
    run(body)


def test_tcp_pipelined_queries_and_a_message_split_across_writes() -> None:
    async def body() -> None:
        up = await Upstream().start()
        dns = await started([up.addr])
        answers = await ask_tcp(dns.port, q("www.example.com", qid=1), q("catalog", qid=2), q("nx.example", qid=3))
        by_id = {DNSRecord.parse(a).header.id: DNSRecord.parse(a) for a in answers}
        assert [str(rr.rdata) for rr in by_id[1].rr] == ["192.0.2.1"]
        assert [str(rr.rdata) for rr in by_id[2].rr] == ["240.240.0.7"]
        assert by_id[3].header.rcode == RCODE.NXDOMAIN
        reader, writer = await asyncio.open_connection("127.0.0.1", dns.port)
        msg = q("cart.shop", qid=99).pack()
        framed = len(msg).to_bytes(2, "big") + msg
        for piece in (framed[:1], framed[1:2], framed[2:9], framed[9:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0)  # let the server read each piece on its own
        ans = DNSRecord.parse(await reader.readexactly(int.from_bytes(await reader.readexactly(2), "big")))
        assert ans.header.id == 99 and len(ans.rr) == 2
        writer.close()
        assert dns.snapshot()["downstream_rx_tcp_queries"] == 4
        await dns.stop()
        await up.stop()
    run(body)


def test_an_upstream_that_never_answers_gives_servfail_within_the_timeout() -> None:
    async def body() -> None:
        up = await Upstream().start()
        dns = await started([up.addr], timeout=0.3)
        client = await UdpClient.connect(dns.port)
        for ask in (lambda m: client.ask(m), lambda m: ask_tcp(dns.port, m)):
            started_at = time.monotonic()
            got = await ask(q("silent.example.com", qid=555))
            elapsed = time.monotonic() - started_at
            ans = DNSRecord.parse(got if isinstance(got, bytes) else got[0])
            assert ans.header.rcode == RCODE.SERVFAIL and ans.header.id == 555
            assert str(ans.q.qname) == "silent.example.com."
            assert 0.3 <= elapsed < 0.3 + 1.0
        assert dns.snapshot()["unanswered_queries"] == 2 and dns.pending == 0
        # the answer arriving after the timeout is dropped and counted
        await dns.stop()
        await up.stop()
    run(body)


def test_a_refusing_upstream_moves_on_to_the_next_and_fails_fast_when_none_is_left() -> None:
    async def body() -> None:
        dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dead.bind(("127.0.0.1", 0))
        dead_addr = dead.getsockname()
        dead.close()  # nothing listens there now: ICMP port unreachable
        up = await Upstream().start()
        for per_query in (False, True):
            dns = await started([dead_addr, up.addr], timeout=5.0, udp_socket_per_query=per_query)
            client = await UdpClient.connect(dns.port)
            ans = DNSRecord.parse(await client.ask(q("www.example.com"), limit=2.0))
            assert [str(rr.rdata) for rr in ans.rr] == ["192.0.2.1"]
            assert dns.snapshot()["external_retries"] >= 1
            await dns.stop()
            alone = await started([dead_addr], timeout=5.0, udp_socket_per_query=per_query)
            client = await UdpClient.connect(alone.port)
            ans = DNSRecord.parse(await client.ask(q("www.example.com"), limit=2.0))  # well before the timeout
            assert ans.header.rcode == RCODE.SERVFAIL and alone.snapshot()["external_errors"] == 1
            await alone.stop()
        await up.stop()
    run(body)


def test_malformed_packets_are_dropped_and_counted_and_the_server_keeps_answering() -> None:
    async def body() -> None:
        up = await Upstream().start()
        dns = await started([up.addr], timeout=0.5)
        client = await UdpClient.connect(dns.port)
        rng = random.Random(12)
        response = q("catalog").reply().pack()
        junk = [b"\x00\x00", b"\x00", b"\x12\x34\x01", response, bytes(rng.getrandbits(8) for _ in range(40)),
                b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fabc"]  # a label past the end
        sent = 0
        while sent < 10_000:
            for i in range(200):
                packet = junk[i % len(junk)] if i % 3 else bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64)))
                client.transport.sendto(packet)  # (uvloop delivers no empty datagram: none is sent)
            sent += 200
            await until(lambda n=sent: dns.stats.downstream_rx_invalid + dns.stats.downstream_rx_queries >= n)
        st = dns.snapshot()
        # random bytes may now and then parse as a query (forwarded, answered or failed): all accounted for
        assert st["downstream_rx_invalid"] + st["downstream_rx_queries"] == 10_000
        assert st["downstream_rx_invalid"] > 9_000 and st["internal_errors"] == 0
        await until(lambda: dns.pending == 0)
        client.transport.sendto(q("catalog", qid=3).pack())
        ans = DNSRecord.parse(await asyncio.wait_for(client.answers.get(), 5))
        while ans.header.id != 3:  # answers to junk that parsed as a query may still be on their way
            ans = DNSRecord.parse(await asyncio.wait_for(client.answers.get(), 5))
        assert ans.header.id == 3 and [str(rr.rdata) for rr in ans.rr] == ["240.240.0.7"]
        # the same over TCP: a response and junk, then a query on the same connection
        reader, writer = await asyncio.open_connection("127.0.0.1", dns.port)
        good = q("cart", qid=4).pack()
        writer.write(b"".join(len(m).to_bytes(2, "big") + m for m in (response, b"\xff" * 5, b"", good)))
        raw = await reader.readexactly(int.from_bytes(await reader.readexactly(2), "big"))
        assert DNSRecord.parse(raw).header.id == 4
        writer.close()
        assert dns.snapshot()["downstream_rx_invalid"] == st["downstream_rx_invalid"] + 3
        assert len(dns._cache) <= 4096 and dns.pending == 0
        await dns.stop()
        await up.stop()
    run(body)


def test_max_pending_refuses_the_extra_queries_with_servfail() -> None:
    async def body() -> None:
        up = await Upstream().start()
        dns = await started([up.addr], max_pending=8, timeout=10.0)
        client = await UdpClient.connect(dns.port)
        for i in range(8 + 5):
            client.transport.sendto(q(f"silent{i}.example.com".replace("silent", "silent."), qid=i).pack())
        refused = [DNSRecord.parse(await asyncio.wait_for(client.answers.get(), 5)) for _ in range(5)]
        assert all(a.header.rcode == RCODE.SERVFAIL for a in refused)
        assert sorted(a.header.id for a in refused) == [8, 9, 10, 11, 12]
        st = dns.snapshot()
        assert st["external_queries_overflow"] == 5 and st["external_queries_active"] == 8 == dns.pending
        assert st["external_queries"] == 8
        # a mesh name is still answered while the forwarding budget is full
        assert DNSRecord.parse(await client.ask(q("catalog"))).rr
        await dns.stop()
        assert dns.pending == 0
        await up.stop()
    run(body)


def test_set_table_swaps_the_whole_table_for_the_next_query() -> None:
    async def body() -> None:
        up = await Upstream().start()
        dns = await started([up.addr])
        client = await UdpClient.connect(dns.port)
        assert [str(rr.rdata) for rr in DNSRecord.parse(await client.ask(q("catalog"))).rr] == ["240.240.0.7"]
        dns.set_table(build_table([("shop", "catalog", "240.240.9.9"), ("shop", "search", "240.240.9.10")], "shop"))
        assert [str(rr.rdata) for rr in DNSRecord.parse(await client.ask(q("catalog"))).rr] == ["240.240.9.9"]
        assert [str(rr.rdata) for rr in DNSRecord.parse(await client.ask(q("search"))).rr] == ["240.240.9.10"]
        # cart left the table: forwarded now
        assert [str(rr.rdata) for rr in DNSRecord.parse(await client.ask(q("cart"))).rr] == ["192.0.2.1"]
        assert up.received == 1
        await dns.stop()
        await up.stop()
    run(body)


def test_tcp_connections_are_bounded_and_idle_ones_closed() -> None:
    async def body() -> None:
        dns = await started([], max_tcp_connections=2, tcp_idle_timeout=0.3)
        conns = [await asyncio.open_connection("127.0.0.1", dns.port) for _ in range(3)]
        assert await asyncio.wait_for(conns[2][0].read(), 5) == b""  # the third is closed at once
        await until(lambda: dns.stats.downstream_cx_tcp_overflow == 1)
        started_at = time.monotonic()
        for reader, _ in conns[:2]:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.1 < time.monotonic() - started_at < 2.0
        st = dns.snapshot()
        assert st["downstream_cx_tcp_idle_timeout"] == 2 and st["downstream_cx_tcp_total"] == 3
        await until(lambda: dns.stats.downstream_cx_tcp_active == 0)
        for _, writer in conns:
            writer.close()
        # without upstreams an outside name is SERVFAIL at once
        client = await UdpClient.connect(dns.port)
        assert DNSRecord.parse(await client.ask(q("www.example.com"))).header.rcode == RCODE.SERVFAIL
        await dns.stop()
    run(body)


class ExampleResolver(BaseResolver):
    def resolve(self, request, handler):
        return upstream_answer(request, handler.protocol == "tcp") or request.reply()


def test_against_dnslib_server_over_udp_and_tcp() -> None:
    server = DNSServer(ExampleResolver(), address="127.0.0.1", port=0)
    server.start_thread()
    tcp_server = DNSServer(ExampleResolver(), address="127.0.0.1", port=server.server.server_address[1], tcp=True)
    tcp_server.start_thread()
    try:
        async def body() -> None:
            dns = await started([("127.0.0.1", server.server.server_address[1])])
            client = await UdpClient.connect(dns.port)
            ans = DNSRecord.parse(await client.ask(q("www.example.org", qid=31)))
            assert ans.header.id == 31 and [str(rr.rdata) for rr in ans.rr] == ["192.0.2.1"]
            assert DNSRecord.parse(await client.ask(q("nx.example.org"))).header.rcode == RCODE.NXDOMAIN
            [raw] = await ask_tcp(dns.port, q("big.example.org", "AAAA", qid=32))
            assert DNSRecord.parse(raw).header.id == 32 and len(DNSRecord.parse(raw).rr) == 60
            await dns.stop()
        run(body)
    finally:
        server.stop()
        tcp_server.stop()


def test_a_tcp_connection_stops_reading_at_its_inflight_limit() -> None:
    from sidecar.dns.protocols import MAX_TCP_INFLIGHT

    async def body() -> None:
        up = await Upstream().start()
        dns = await started([up.addr], timeout=0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", dns.port)
        n = 3 * MAX_TCP_INFLIGHT + 4
        writer.write(b"".join(len(m).to_bytes(2, "big") + m
                              for m in (q(f"silent.q{i}.example", qid=i).pack() for i in range(n))))
        ids, most = [], 0
        while len(ids) < n:
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 5), "big")
            ans = DNSRecord.parse(await reader.readexactly(size))
            assert ans.header.rcode == RCODE.SERVFAIL
            ids.append(ans.header.id)
            most = max(most, dns.pending)
        assert sorted(ids) == list(range(n)) and most <= MAX_TCP_INFLIGHT
        assert dns.snapshot()["unanswered_queries"] == n
        writer.close()
        await dns.stop()
        await up.stop()
    run(body)
