"""Fuzzing the mesh DNS of transparent mode (issue 16): any packet over UDP, any byte stream over
TCP, through the real ``MeshDns`` (table, cache, forwarding, timers) on fake transports
(tests/support/dns_fuzz.py), with scripted upstreams that answer, are unreachable or stay silent.

- no exception escapes a protocol callback (``internal_errors`` stays 0), none reaches the loop's
  handler, none is logged; the work per input is bounded (the rig settles in a fixed number of
  loop turns, and what stays in flight is expired by hand);
- a message shorter than a header, or a response (QR set), is dropped; any other gets exactly one
  reply: well-formed (dnslib parses it), its id and opcode the query's, QR set; a question that
  does not parse (bad pointer, cut short, label over 63 bytes, name over 255) gets a bare FORMERR;
  else the reply echoes the question, a mesh name (class IN, one question, QUERY) gets its VIPs
  (A) or NODATA, anything else what the upstream said or SERVFAIL;
- the server's own replies over UDP fit in 512 bytes (TC set when the VIPs do not);
- TCP: 2-byte framing with lengths that are zero, short, or claim more than arrives, messages
  pipelined and cut into reads anywhere: each whole message is answered as over UDP, a message cut
  short stays buffered unanswered, and another connection is answered meanwhile;
- the counters add up: every message is a query or invalid, FORMERRs and responses sent counted.
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.dns_fuzz import (
    CLIENT,
    FORMERR,
    MODES,
    DnsRig,
    check_reply,
    dns_message,
    model,
)
from tests.support.fuzz import cuts, fuzz_settings, run_checked, split_at, tally

HEADER = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"  # id 0x1234, RD, one question
modes = st.sampled_from(((), ("answer",), ("silent",), ("unreachable", "answer"), ("unreachable",)))
modes = modes | st.lists(st.sampled_from(MODES), min_size=1, max_size=3).map(tuple)
rcodes = st.sampled_from((0, 0, 2, 3, 5))


def check_counters(rig: DnsRig, messages: int, replies: int, formerrs: int) -> None:
    st_ = rig.dns.stats
    assert st_.internal_errors == 0
    assert st_.downstream_rx_queries + st_.downstream_rx_invalid == messages, rig.dns.snapshot()
    assert st_.downstream_tx_responses == replies, rig.dns.snapshot()
    assert st_.downstream_tx_formerr == formerrs, rig.dns.snapshot()
    assert rig.dns.pending == 0 and st_.external_queries_active == 0


async def udp_exchange(datagrams: list[bytes], up: tuple[str, ...], rcode: int) -> None:
    with DnsRig(up, rcode) as rig:
        sent = rig.listener.transport.sent
        replies = formerrs = 0
        for data in datagrams:
            exp = model(data)
            before = len(sent)
            rig.listener.datagram_received(data, CLIENT)
            await rig.settle()
            if exp.reply and len(sent) == before:
                await rig.expire()  # a silent upstream: the timer's SERVFAIL
            got = sent[before:]
            assert len(got) == (1 if exp.reply else 0), f"{len(got)} replies to {data!r} ({exp})"
            for reply, addr in got:
                assert addr == CLIENT
                kind = check_reply(exp, reply, udp=True, upstream=reply in rig.upstream_answers)
                tally(f"udp reply: {kind}")
                replies += 1
                formerrs += kind == "formerr"
            if not exp.reply:
                tally("udp: dropped")
        check_counters(rig, len(datagrams), replies, formerrs)


@fuzz_settings(300)
@given(datagrams=st.lists(dns_message, min_size=1, max_size=6), up=modes, rcode=rcodes)
@example(datagrams=[b""], up=(), rcode=0)
@example(datagrams=[HEADER + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01"], up=(), rcode=0)  # label of 64
@example(datagrams=[HEADER + b"\x3f" + b"a" * 63 + b"\x00\x00\x01\x00\x01"], up=(), rcode=0)  # label of 63: fine
@example(datagrams=[HEADER + (b"\x3f" + b"q" * 63) * 4 + b"\x00\x00\x01\x00\x01"], up=(), rcode=0)
@example(datagrams=[HEADER + b"\xc0\x0d\xc0\x0c\x00\x01\x00\x01"], up=("answer",), rcode=0)  # a pointer loop
@example(datagrams=[HEADER + b"\xc0\x20\x00\x01\x00\x01"], up=("answer",), rcode=0)  # a forward pointer
@example(datagrams=[HEADER + b"\x0ccatalog.shop\x00\x00\x01\x00\x01"], up=(), rcode=0)  # a dot in a label
@example(datagrams=[HEADER + b"\x07catalog\x04shop\x00\x00\x01\x00\x03"], up=(), rcode=0)  # class CH
@example(datagrams=[HEADER + b"\x04wide\x00\x00\x01\x00\x01"] * 2, up=(), rcode=0)  # 40 VIPs: TC, twice
def test_udp_any_datagrams(datagrams: list[bytes], up: tuple[str, ...], rcode: int) -> None:
    run_checked(lambda: udp_exchange(datagrams, up, rcode))


# --- TCP ---------------------------------------------------------------------------------------


message_lists, framings = st.lists(dns_message, max_size=6), st.sampled_from(("true", "true", "true", "zero", "short", "long"))
u16, fifth, tail = st.integers(0, 0xFFFF), st.integers(0, 4), st.binary(max_size=20)


@st.composite
def tcp_stream(draw: st.DrawFn) -> tuple[bytes, list[bytes], bytes]:
    """(the bytes a client sends, the whole messages they frame, the bytes of a message cut short)."""
    out = bytearray()
    for msg in draw(message_lists):
        framing = draw(framings)
        if framing == "zero":
            out += b"\x00\x00"  # an empty message, then this one as the next frame
            framing = "true"
        if framing == "short":  # a length that cuts this message: the rest is read as the next frame(s)
            size = draw(u16) % (len(msg) + 1)
        elif framing == "long":  # a length that claims more: the next frames are read into this one
            size = len(msg) + 1 + draw(u16) % 64
        else:
            size = len(msg)
        out += size.to_bytes(2, "big") + msg
    data = bytes(out)
    if draw(fifth) == 0:  # a length that claims more than ever arrives
        data += max(1, draw(u16)).to_bytes(2, "big") + draw(tail)
    # what the framing gives, read the way a server must read it
    messages, rest = [], data
    while len(rest) >= 2 and len(rest) >= 2 + (rest[0] << 8 | rest[1]):
        end = 2 + (rest[0] << 8 | rest[1])
        messages.append(rest[2:end])
        rest = rest[end:]
    return data, messages, rest


GOOD = HEADER + b"\x07catalog\x04shop\x00\x00\x01\x00\x01"


async def tcp_exchange(stream: tuple[bytes, list[bytes], bytes], reads: list[int], up: tuple[str, ...],
                       rcode: int) -> None:
    data, messages, partial = stream
    with DnsRig(up, rcode) as rig:
        conn, transport = rig.connect()
        other, other_transport = rig.connect()
        for chunk in split_at(data, reads):
            conn.data_received(chunk)
            await rig.settle()
            if transport.paused:  # at the in-flight limit: what the timers would do, then read on
                await rig.expire()
                assert not transport.paused
        # another connection is served meanwhile
        other.data_received(len(GOOD).to_bytes(2, "big") + GOOD)
        await rig.settle()
        await rig.expire()
        answers, rest = transport.frames()
        assert not rest, "a reply frame cut short"
        assert not transport.closing, "the connection was closed"
        assert len(conn.buf) == len(partial), "the bytes of a message cut short are not kept whole"
        expected = [model(m) for m in messages]
        # answers may come out of order (forwarded ones later): match each to a query by id and question
        unmatched = [e for e in expected if e.reply]
        formerrs = 0
        for reply in answers:
            qid = reply[0] << 8 | reply[1] if len(reply) >= 2 else -1
            candidates = [e for e in unmatched if e.qid == qid]
            assert candidates, f"a reply {reply!r} to no query"
            errors = []
            for e in candidates:
                try:
                    kind = check_reply(e, reply, udp=False, upstream=reply in rig.upstream_answers)
                except AssertionError as exc:
                    errors.append(str(exc))
                    continue
                unmatched.remove(e)
                tally(f"tcp reply: {kind}")
                formerrs += kind == "formerr"
                break
            else:
                raise AssertionError(f"a reply that answers none of its id's queries: {errors}")
        assert not unmatched, f"queries not answered: {unmatched}"
        other_answers, _ = other_transport.frames()
        assert len(other_answers) == 1 and other_answers[0][:2] == GOOD[:2], "the other connection was not served"
        check_counters(rig, len(messages) + 1, len(answers) + 1, formerrs)
        # the client leaves: nothing stays behind
        conn.connection_lost(None)
        other.connection_lost(None)
        assert not rig.dns.tcp_connections and rig.dns.stats.downstream_cx_tcp_active == 0


@fuzz_settings(200)
@given(stream=tcp_stream(), reads=cuts(), up=modes, rcode=rcodes)
@example(stream=(b"\x00\x00", [b""], b""), reads=[], up=(), rcode=0)  # a zero length
@example(stream=(b"\xff\xff" + GOOD, [], b"\xff\xff" + GOOD), reads=[1, 3], up=(), rcode=0)  # claims more
@example(stream=(b"\x00\x05" + GOOD[:5], [GOOD[:5]], b""), reads=[1], up=(), rcode=0)  # shorter than a header
def test_tcp_any_stream(stream: tuple[bytes, list[bytes], bytes], reads: list[int], up: tuple[str, ...],
                        rcode: int) -> None:
    run_checked(lambda: tcp_exchange(stream, reads, up, rcode))


def test_the_rig_answers_a_mesh_name_and_forwards_the_rest() -> None:
    """The properties' ground: the rig is a working server (not one that drops everything)."""
    async def body() -> None:
        with DnsRig(("answer",)) as rig:
            rig.listener.datagram_received(GOOD, CLIENT)
            other = HEADER + b"\x07example\x03com\x00\x00\x01\x00\x01"
            rig.listener.datagram_received(other, CLIENT)
            await rig.settle()
            bad = HEADER + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01"
            rig.listener.datagram_received(bad, CLIENT)
            sent = [d for d, _ in rig.listener.transport.sent]
            assert len(sent) == 3
            assert check_reply(model(GOOD), sent[0], True, False) == "mesh"
            assert check_reply(model(other), sent[1], True, sent[1] in rig.upstream_answers) == "forwarded"
            assert sent[2][3] & 0xF == FORMERR
            assert rig.dns.stats.downstream_tx_formerr == 1
    run_checked(body)
