"""Malformed and odd queries to the mesh DNS, each found by tests/unit/test_fuzz_dns.py and kept here:
``MeshDns.query`` called directly (no upstreams: a forwarded query gets SERVFAIL at once)."""

from __future__ import annotations

import pytest
from dnslib import DNSRecord

from sidecar.dns import MeshDns, build_table

TABLE = build_table([("shop", "catalog", "240.240.0.7")], own_namespace="shop")
HEADER = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"  # id 0x1234, RD, one question
A_IN = b"\x00\x01\x00\x01"


def ask(data: bytes) -> tuple[MeshDns, DNSRecord | None]:
    dns = MeshDns([], table=TABLE)
    out = dns.query(data, ("10.0.0.9", 40000), None)
    return dns, None if out is None else DNSRecord.parse(out)


@pytest.mark.parametrize("question", [
    b"\x40" + b"a" * 64 + b"\x00" + A_IN,  # a label of 64 bytes (dnslib reads up to 191)
    b"\xbf" + b"a" * 191 + b"\x00" + A_IN,
    (b"\x3f" + b"q" * 63) * 4 + b"\x00" + A_IN,  # a name of 257 bytes
    b"\x07catalog\x04sh",  # cut short
    b"\xc0\x20" + A_IN,  # a pointer forwards
    b"\xc0\x0d\xc0\x0c" + A_IN,  # pointers in a loop
    b"\x07catalog\x00\x00",  # no class
])
def test_a_question_that_does_not_parse_gets_formerr(question: bytes) -> None:
    dns, reply = ask(HEADER + question)
    assert reply is not None, "dropped: the client waits for its timeout"
    assert reply.header.id == 0x1234 and reply.header.qr == 1 and reply.header.rcode == 1  # FORMERR
    assert reply.header.rd == 1 and not reply.questions and not reply.rr
    st = dns.snapshot()
    assert st["downstream_rx_invalid"] == 1 and st["downstream_tx_formerr"] == 1
    assert st["downstream_rx_queries"] == 0 and st["internal_errors"] == 0


def test_formerr_keeps_the_opcode() -> None:
    _, reply = ask(b"\x12\x34\x28\x00\x00\x01\x00\x00\x00\x00\x00\x00\x40" + b"a" * 64 + b"\x00" + A_IN)  # UPDATE
    assert reply is not None and reply.header.opcode == 5 and reply.header.rcode == 1


@pytest.mark.parametrize("data", [b"", b"\x12", HEADER[:11], HEADER.replace(b"\x01\x00", b"\x81\x00", 1) + b"\xff"])
def test_shorter_than_a_header_or_a_response_is_dropped(data: bytes) -> None:
    dns, reply = ask(data)
    assert reply is None
    assert dns.snapshot()["downstream_rx_invalid"] == 1 and dns.snapshot()["downstream_tx_formerr"] == 0


def test_a_label_with_a_dot_is_not_the_mesh_name_of_two_labels() -> None:
    dns, reply = ask(HEADER + b"\x0ccatalog.shop\x00" + A_IN)
    assert reply is not None and not reply.rr and reply.header.rcode == 2  # forwarded (here: SERVFAIL)
    assert dns.snapshot()["known_domain_queries"] == 0


@pytest.mark.parametrize("qclass", [3, 4, 254, 255])
def test_a_mesh_name_of_another_class_than_in_is_not_answered_here(qclass: int) -> None:
    dns, reply = ask(HEADER + b"\x07catalog\x04shop\x00\x00\x01" + qclass.to_bytes(2, "big"))
    assert reply is not None and not reply.rr and reply.header.rcode == 2  # forwarded (here: SERVFAIL)
    assert reply.questions[0].qclass == qclass
    assert dns.snapshot()["known_domain_queries"] == 0


def test_the_mesh_name_itself_is_still_answered() -> None:
    _, reply = ask(HEADER + b"\x07CataLog\x04shop\x00" + A_IN)
    assert reply is not None and [str(rr.rdata) for rr in reply.rr] == ["240.240.0.7"]
