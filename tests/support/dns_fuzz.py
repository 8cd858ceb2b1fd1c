"""The mesh DNS on fake transports, for the fuzz properties (tests/unit/test_fuzz_dns.py, bench/fuzz.py).

:class:`DnsRig` is a real ``MeshDns`` (real table, cache, forwarding, timers) whose sockets are
fakes: the UDP listener and the shared upstream sockets record what is sent, TCP client connections
are ``TcpConnection`` protocols on a recording transport, and upstream resolvers are scripted per
upstream (``answer``: the query sent back with QR set and an rcode; ``unreachable``: an ICMP error,
or a refused TCP connection; ``silent``: never answers, the query's timer is then fired by hand).

:func:`query_bytes` builds DNS messages field by field (header bits, any counts, names with
compression pointers backwards, forwards, onto themselves, labels over 63 bytes, names over 255,
truncated questions, unknown types and classes, EDNS OPT records, extra records), and
:func:`dns_message` mixes them with mutated ones and noise. :func:`model` says what the server must
do with one message, independently of the server's code.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from typing import Any

from dnslib import DNSBuffer, DNSHeader, DNSQuestion
from hypothesis import strategies as st

import sidecar.dns.server as dns_server
from sidecar.dns import MeshDns, build_table
from sidecar.dns.protocols import TcpConnection, UdpListener, UdpUpstream
from tests.support.fuzz import mutated

SERVICES = ([("shop", "catalog", "240.240.0.7"), ("shop", "cart", "240.240.0.8"), ("shop", "cart", "240.240.0.9"),
             ("billing", "invoice", "240.240.1.2")]
            + [("shop", "wide", f"240.240.2.{i}") for i in range(1, 41)])  # 40 VIPs: over 512 bytes in A records
TABLE = build_table(SERVICES, own_namespace="shop")
CLIENT = ("10.0.0.9", 40000)
UDP_LIMIT = 512
FORMERR, NOTIMP = 1, 4
MODES = ("answer", "unreachable", "silent")

# --- messages ------------------------------------------------------------------------------------

LABELS = (b"catalog", b"shop", b"mesh", b"local", b"CaTaLoG", b"cart", b"wide", b"invoice", b"billing", b"www",
          b"example", b"com", b"a", b"*", b"catalog.shop", b"x" * 63, b"y" * 64, b"z" * 191, b"\xff\xfe", b"\x00")
MESH_NAMES = ((b"catalog",), (b"catalog", b"shop"), (b"CATALOG", b"Shop", b"mesh", b"local"), (b"wide",),
              (b"wide", b"shop", b"mesh", b"local"), (b"cart", b"shop"), (b"invoice", b"billing"),
              (b"invoice",), (b"example", b"com"))
QTYPES = (1, 1, 1, 28, 255, 16, 5, 41, 0, 65535, 252, 251)
QCLASSES = (1, 1, 1, 3, 255, 254, 0, 4)

# Strategies are built once, here: building them inside each draw is most of the cost of an input.
label = st.sampled_from(LABELS) | st.binary(max_size=70)
mesh_name = st.sampled_from(MESH_NAMES).map(list)
plain_name = st.lists(st.sampled_from(LABELS[:14]), max_size=5)
name_kinds = st.sampled_from(  # mostly names the table answers, or nearly
    (mesh_name,) * 9 + (plain_name,) * 3 + (st.lists(label, max_size=6),) * 3
    + (st.integers(4, 6).map(lambda k: [b"q" * 63] * k),))  # over 255 bytes
# how a name ends: the root label, a compression pointer (where to: see _pointer), or nothing (cut)
endings = st.sampled_from(("root",) * 12 + ("back", "self", "forward", "header", "any", "cut"))
small, header_offset, any_offset = st.integers(0, 40), st.integers(0, 11), st.integers(0, 0x3FFF)
qtypes, qclasses = st.sampled_from(QTYPES) | st.integers(0, 0xFFFF), st.sampled_from(QCLASSES) | st.integers(0, 0xFFFF)
tenth, cut_at = st.integers(0, 9), st.integers(0, 3)
edns_sizes = st.sampled_from((512, 1232, 4096, 65535, 0, 100)) | st.integers(0, 0xFFFF)
byte, ext_rcode_version, do_bit = st.integers(0, 255), st.sampled_from((0, 0, 1, 255)), st.sampled_from((0, 0x8000))
edns_options = st.lists(st.tuples(st.sampled_from((10, 8, 12, 15)) | st.integers(0, 0xFFFF), st.binary(max_size=12)),
                        max_size=3)
eighth, opt_names = st.integers(0, 7), st.sampled_from((b"\x00", b"\x00", b"\x01a\x00", b"\xc0\x0c"))
u16, quarter = st.integers(0, 0xFFFF), st.integers(0, 3)
plain_qtypes, rd_bit = st.sampled_from((1, 1, 1, 28, 28, 255, 16, 65)), st.sampled_from((0, 1))
opcodes = st.sampled_from((0, 0, 0, 0, 0, 1, 2, 4, 5, 6, 15))
flag_bits, flags2s = st.integers(0, 7), st.sampled_from((0, 0, 0x20, 0x10)) | st.integers(0, 255)
question_counts, answer_counts = st.sampled_from((1, 1, 1, 1, 0, 2, 3)), st.sampled_from((0, 0, 0, 1))
opt_counts, any_counts = st.sampled_from((0, 0, 1, 1, 2)), st.sampled_from((0, 1, 2, 0xFFFF)) | st.integers(0, 0xFFFF)


def _pointer(kind: str, at: int, start: int, draw: st.DrawFn) -> bytes:
    """A compression pointer written at offset ``at`` by a name that started at ``start``: to that
    start (a loop for the first name), onto itself, forwards, into the header, anywhere."""
    if kind == "back":
        target = start
    elif kind == "self":
        target = at
    elif kind == "forward":
        target = at + 2 + draw(small)
    elif kind == "header":
        target = draw(header_offset)
    else:
        target = draw(any_offset)
    return struct.pack(">H", 0xC000 | (target & 0x3FFF))


def encode_name(draw: st.DrawFn, parts: list[bytes], at: int) -> bytes:
    out = bytearray()
    for part in parts:
        out += bytes([len(part) & 0xFF]) + part  # a label over 255 bytes lies about its length
    ending = draw(endings)
    if ending == "root":
        out += b"\x00"
    elif ending != "cut":
        out += _pointer(ending, at + len(out), at, draw)
    return bytes(out)


def question_bytes(draw: st.DrawFn, at: int) -> bytes:
    name = encode_name(draw, draw(draw(name_kinds)), at)
    tail = struct.pack(">HH", draw(qtypes), draw(qclasses))
    if draw(tenth) == 0:
        tail = tail[: draw(cut_at)]  # the question cut short
    return name + tail


def opt_record(draw: st.DrawFn) -> bytes:
    """An EDNS OPT pseudo-record: any UDP size (under 512 too), version, DO bit, options."""
    size = draw(edns_sizes)
    ttl = draw(byte) << 24 | draw(ext_rcode_version) << 16 | draw(do_bit)
    rdata = b"".join(struct.pack(">HH", code, len(value)) + value for code, value in draw(edns_options))
    if draw(eighth) == 0:
        rdata = rdata[: len(rdata) // 2] + b"\x00\x0a\x00\x40"  # an option that overruns
    return draw(opt_names) + struct.pack(">HHIH", 41, size, ttl, len(rdata)) + rdata


@st.composite
def query_bytes(draw: st.DrawFn) -> bytes:
    """A DNS message built field by field: half the time a plain query as a stub resolver sends it
    (maybe with EDNS), else any header bits and counts, several questions, records, OPTs."""
    qid = draw(u16)
    if draw(st.booleans()):
        parts = draw(mesh_name if draw(quarter) else plain_name)
        name = b"".join(bytes([len(p)]) + p for p in parts) + b"\x00"
        opt = opt_record(draw) if draw(st.booleans()) else b""
        return (struct.pack(">HBB4H", qid, draw(rd_bit), 0, 1, 0, 0, 1 if opt else 0)
                + name + struct.pack(">HH", draw(plain_qtypes), 1) + opt)
    qr = draw(eighth) == 0
    opcode = draw(opcodes)
    flags1 = qr << 7 | opcode << 3 | draw(flag_bits)  # AA, TC, RD
    flags2 = draw(flags2s)  # RA, Z, AD, CD, rcode
    body = bytearray()
    nq = draw(question_counts)
    for _ in range(nq):
        body += question_bytes(draw, 12 + len(body))
    nan = draw(answer_counts)
    for _ in range(nan):  # a record in the answer section of a query
        body += b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes(4)
    nopt = draw(opt_counts)
    for _ in range(nopt):
        body += opt_record(draw)
    counts = [nq, nan, 0, nopt]
    if draw(quarter) == 0:
        counts = [draw(any_counts) for _ in range(4)]
    return struct.pack(">HBB4H", qid, flags1, flags2, *counts) + bytes(body)


@st.composite
def dns_mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with one to four bytes set to values that matter to a DNS parser (pointer and
    length bytes, zero), or the generic byte-stream edits of tests/support/fuzz.py."""
    if draw(st.booleans()):
        return draw(mutated(data))
    out = bytearray(data)
    for _ in range(draw(edits)):
        if not out:
            break
        out[draw(u16) % len(out)] = draw(parser_bytes)
    return bytes(out)


edits, parser_bytes = st.integers(1, 4), st.sampled_from((0x00, 0xC0, 0xC0, 0x3F, 0x40, 0x80, 0xFF, 0x01, 0x0C)) | byte


dns_message = st.one_of(
    query_bytes(), query_bytes(), query_bytes().flatmap(dns_mutated),
    st.binary(max_size=14),  # shorter than a header, or a header alone
    st.binary(min_size=12, max_size=600),
)

# --- the model: what the server must do with one message -----------------------------------------


@dataclass
class Expect:
    reply: bool  # False: dropped (shorter than a header, or a response)
    qid: int = 0
    opcode: int = 0
    question: Any = None  # the first question, when it parses and is a valid name
    formerr: bool = False  # the header parses, the question does not: FORMERR, no question
    mesh: tuple[str, ...] | None = None  # an A/any query of class IN for a mesh name: its VIPs
    qtype: int = 0


def valid_name(labels_: list[bytes]) -> bool:
    return all(0 < len(x) <= 63 for x in labels_) and sum(len(x) + 1 for x in labels_) + 1 <= 255


def model(msg: bytes) -> Expect:
    """RFC 1035 as unbound and CoreDNS apply it: shorter than a header or QR set: dropped (an answer
    would only feed amplification or loops); a header that parses with a question that does not
    (bad pointer, cut short, label over 63 bytes, name over 255): FORMERR; else an answer."""
    if len(msg) < 12 or msg[2] & 0x80:
        return Expect(False)
    qid, opcode, qd = msg[0] << 8 | msg[1], msg[2] >> 3 & 0xF, msg[4] << 8 | msg[5]
    exp = Expect(True, qid, opcode)
    if not qd:
        return exp
    try:
        buf = DNSBuffer(msg)
        DNSHeader.parse(buf)
        question = DNSQuestion.parse(buf)
    except Exception:
        exp.formerr = True
        return exp
    if not valid_name(list(question.qname.label)):
        exp.formerr = True
        return exp
    exp.question = question
    exp.qtype = question.qtype
    parts = question.qname.label
    if qd == 1 and opcode == 0 and question.qclass == 1 and all(b"." not in p for p in parts):
        exp.mesh = TABLE.get(b".".join(parts).decode().lower())
    return exp


# --- the rig -------------------------------------------------------------------------------------


class FakeDatagram:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []
        self.closing = False

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append((bytes(data), addr))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


class FakeStream:
    """A client's TCP connection as the server's protocol sees it."""

    def __init__(self, protocol: TcpConnection) -> None:
        self.protocol = protocol
        self.out = bytearray()
        self.closing = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    abort = close

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def frames(self) -> tuple[list[bytes], bytes]:
        """The answers written, and any bytes that do not make a whole frame."""
        out, data = [], bytes(self.out)
        while len(data) >= 2 and len(data) >= 2 + (data[0] << 8 | data[1]):
            end = 2 + (data[0] << 8 | data[1])
            out.append(data[2:end])
            data = data[end:]
        return out, data


@dataclass
class DnsRig:
    modes: tuple[str, ...]  # one per upstream; () for none (every forwarded query: SERVFAIL at once)
    rcode: int = 0  # what an answering upstream says
    dns: MeshDns = field(init=False)
    listener: UdpListener = field(init=False)
    upstream_answers: set[bytes] = field(default_factory=set)  # as delivered: ids restored

    def __post_init__(self) -> None:
        upstreams = [(f"192.0.2.{i + 1}", 53) for i in range(len(self.modes))]
        self.dns = dns = MeshDns(upstreams, table=TABLE, max_pending=64)
        dns.loop = asyncio.get_running_loop()
        self.listener = UdpListener(dns)
        self.listener.connection_made(FakeDatagram())
        dns._udp = self.listener  # what start() binds, here on fakes
        dns._up_transports = [FakeDatagram() for _ in self.modes]
        self.up_protocols = [UdpUpstream(dns, i) for i in range(len(self.modes))]
        self._saved = dns_server._ask_over_tcp

    def __enter__(self) -> DnsRig:
        dns_server._ask_over_tcp = self._ask_over_tcp
        return self

    def __exit__(self, *exc: object) -> None:
        dns_server._ask_over_tcp = self._saved

    def answer_of(self, query: bytes) -> bytes:
        return bytes([query[0], query[1], query[2] | 0x80, query[3] & 0xF0 | self.rcode]) + query[4:]

    async def _ask_over_tcp(self, host: str, port: int, p: Any) -> bytes:
        mode = self.modes[int(host.rsplit(".", 1)[1]) - 1]
        if mode == "unreachable":
            raise ConnectionRefusedError(111, "refused")
        if mode == "silent":
            await asyncio.get_running_loop().create_future()
        answer = self.answer_of(p.query)
        self.upstream_answers.add(answer)
        return answer

    async def settle(self) -> None:
        """Let the upstreams answer what was sent to them, until nothing moves (bounded)."""
        for _ in range(8):
            moved = False
            for i, transport in enumerate(self.dns._up_transports):
                sent, transport.sent = transport.sent, []
                for data, _ in sent:
                    moved = True
                    mode = self.modes[i]
                    if mode == "answer":
                        answer = self.answer_of(data)
                        pending = self.dns._by_uid.get(data[0] << 8 | data[1])
                        if pending is not None:
                            self.upstream_answers.add(pending.query[:2] + answer[2:])
                        self.up_protocols[i].datagram_received(answer, ("192.0.2.1", 53))
                    elif mode == "unreachable":
                        self.up_protocols[i].error_received(ConnectionRefusedError(111, "refused"))
            for _ in range(3):
                await asyncio.sleep(0)
            if not moved and not any(t.sent for t in self.dns._up_transports):
                return

    async def expire(self) -> None:
        """What the timers of the queries still in flight would do (the upstream was silent)."""
        for p in list(self.dns._pending):
            if p.timer is not None:
                p.timer.cancel()
            self.dns._expire(p)
        await self.settle()

    def connect(self) -> tuple[TcpConnection, FakeStream]:
        conn = TcpConnection(self.dns)
        stream = FakeStream(conn)
        conn.connection_made(stream)
        return conn, stream


# --- judging one reply ---------------------------------------------------------------------------


def check_reply(exp: Expect, reply: bytes, udp: bool, upstream: bool) -> str:
    """Assert ``reply`` answers the query ``exp`` models; returns its kind (for the statistics)."""
    from dnslib import DNSRecord

    assert exp.reply, "a reply to a message that must be dropped"
    if upstream:  # passed on as the upstream sent it (here: the query echoed), the client's id restored
        assert reply[:2] == bytes((exp.qid >> 8, exp.qid & 0xFF)) and reply[2] & 0x80
        return "forwarded"
    record = DNSRecord.parse(reply)  # well-formed
    h = record.header
    assert h.id == exp.qid, f"reply id {h.id} for query id {exp.qid}"
    assert h.qr == 1, "a reply without QR"
    assert h.opcode == exp.opcode, f"opcode {h.opcode} answers opcode {exp.opcode}"
    if udp:
        assert len(reply) <= UDP_LIMIT, f"a UDP reply of {len(reply)} bytes"
    if exp.formerr:
        assert h.rcode == FORMERR and not record.questions and not record.rr, f"not a bare FORMERR: {record}"
        return "formerr"
    assert h.rcode != FORMERR, f"FORMERR for a query that parses: {record}"
    if exp.question is not None:
        assert record.questions, "the question is not echoed"
        q = record.questions[0]
        assert [x.lower() for x in q.qname.label] == [x.lower() for x in exp.question.qname.label], "other name"
        assert (q.qtype, q.qclass) == (exp.question.qtype, exp.question.qclass), "other type or class"
    if exp.mesh is not None:
        assert h.rcode == 0 and h.aa == 1, f"a mesh name not answered here: {record}"
        if exp.qtype == 1:
            got = [str(rr.rdata) for rr in record.rr]
            assert got == list(exp.mesh) or (udp and h.tc and not got), f"VIPs {got}, expected {exp.mesh}"
        else:
            assert not record.rr, "records for another type than A"
        return "mesh"
    assert h.rcode == 2 or not h.aa, f"a name outside the mesh answered here: {record}"
    return "servfail"
