"""Fuzzing the HTTP/2 server codec through the connection manager (issue 16): after a valid client
preface, any sequence of frames (every type, any stream id, any flags, payloads well-formed or not,
declared lengths that lie, header blocks that are requests or noise), cut into reads anywhere, then
a well-formed request on the highest stream id.

- no exception escapes ``data_received``, none reaches the event loop's handler, none is logged;
- what the sidecar writes is HTTP/2 frames, its SETTINGS first;
- the connection serves or ends with GOAWAY: if the sidecar closed it, it said GOAWAY first; if it
  did not, the last request is answered (its HEADERS, or RST_STREAM) or a GOAWAY refused it;
- once the client leaves, nothing is left in flight.
"""

from __future__ import annotations

import struct

from hpack import Encoder
from hpack.struct import NeverIndexedHeaderTuple
from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.fuzz import cuts, fuzz_settings, mutated, run_checked, split_at, tally
from tests.support.mesh_fuzz import Exchange

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
LAST_STREAM = 2**31 - 1


def frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes((kind, flags)) + struct.pack(">I", stream & 0xFFFFFFFF) + payload


def header_block(fields: list[tuple[bytes, bytes]]) -> bytes:
    """Literal fields never indexed: a block that does not depend on the dynamic table, whatever
    the blocks before it did to the sidecar's."""
    return Encoder().encode([NeverIndexedHeaderTuple(n, v) for n, v in fields], huffman=False)


def request_fields(method: bytes = b"GET", authority: bytes = b"svc", path: bytes = b"/") -> list[tuple[bytes, bytes]]:
    return [(b":method", method), (b":scheme", b"http"), (b":authority", authority), (b":path", path)]


streams = st.sampled_from((1, 1, 3, 3, 5, 7, 0, 2, 4, LAST_STREAM, 2**31 + 1)) | st.integers(0, 2**32 - 1)
noise = st.binary(max_size=24)


@st.composite
def request_block(draw: st.DrawFn) -> bytes:
    fields = request_fields(draw(st.sampled_from((b"GET", b"POST", b"HEAD", b"CONNECT", b"PUT"))),
                            draw(st.sampled_from((b"svc", b"svc", b"other", b"", b"empty", b"SVC"))),
                            draw(st.sampled_from((b"/", b"/x?y=1", b"", b"*", b"x"))))
    if draw(st.booleans()):
        del fields[draw(st.integers(0, len(fields) - 1))]  # a pseudo-header missing
    extra = draw(st.lists(st.tuples(
        st.sampled_from((b"content-length", b"te", b"connection", b"x-a", b"X-Upper", b":path", b"host",
                         b"content-type", b"grpc-timeout", b"transfer-encoding", b"")),
        st.sampled_from((b"0", b"5", b"trailers", b"gzip", b"keep-alive", b"application/grpc", b"1S", b"a\r\nb",
                         b" x", b""))), max_size=3))
    order = draw(st.permutations(fields + extra))
    return header_block(list(order))


@st.composite
def any_frame(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(range(10)) | st.integers(10, 255))
    stream = draw(streams)
    flags = draw(st.sampled_from((0, END_STREAM, END_HEADERS, END_HEADERS | END_STREAM)) | st.integers(0, 255))
    if kind == DATA:
        payload = draw(noise)
        if flags & PADDED:
            payload = bytes([draw(st.integers(0, 30))]) + payload + b"\0" * draw(st.integers(0, 30))
    elif kind in (HEADERS, CONTINUATION, PUSH_PROMISE):
        payload = draw(request_block() | noise)
        if kind == HEADERS and flags & PRIORITY_FLAG:
            payload = struct.pack(">IB", draw(streams), draw(st.integers(0, 255))) + payload
        if kind == PUSH_PROMISE:
            payload = struct.pack(">I", draw(streams)) + payload
        if kind != CONTINUATION and flags & PADDED:
            payload = bytes([draw(st.integers(0, 30))]) + payload + b"\0" * draw(st.integers(0, 30))
    elif kind == PRIORITY:
        payload = struct.pack(">IB", draw(streams), draw(st.integers(0, 255)))
    elif kind == RST_STREAM:
        payload = struct.pack(">I", draw(st.integers(0, 14) | st.integers(0, 2**32 - 1)))
    elif kind == SETTINGS:
        settings = draw(st.lists(st.tuples(st.integers(0, 8) | st.integers(0, 0xFFFF),
                                           st.sampled_from((0, 1, 100, 16384, 2**24 - 1, 2**31 - 1, 2**31, 2**32 - 1))
                                           | st.integers(0, 2**32 - 1)), max_size=4))
        payload = b"".join(struct.pack(">HI", k, v) for k, v in settings)
    elif kind == PING:
        payload = draw(st.binary(min_size=8, max_size=8))
    elif kind == GOAWAY:
        payload = struct.pack(">II", draw(streams), draw(st.integers(0, 14))) + draw(noise)
    elif kind == WINDOW_UPDATE:
        payload = struct.pack(">I", draw(st.sampled_from((0, 1, 65535, 2**31 - 1, 2**31)) | st.integers(0, 2**32 - 1)))
    else:
        payload = draw(noise)
    if draw(st.integers(0, 15)) == 0:
        payload = payload[: draw(st.integers(0, len(payload)))]  # shorter than its type needs
    length = None if draw(st.integers(0, 15)) else draw(st.integers(0, 2**24 - 1))
    return frame(kind, flags, stream, payload, length)


def valid_request(stream: int, end: bool = True) -> bytes:
    return frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), stream, header_block(request_fields()))


frames_after_preface = st.one_of(
    st.lists(any_frame(), max_size=8).map(b"".join),
    st.lists(st.sampled_from((valid_request(1), valid_request(3, end=False), frame(DATA, END_STREAM, 3, b"body"),
                              frame(SETTINGS, 0, 0, b""), frame(SETTINGS, ACK, 0, b""), frame(PING, 0, 0, b"12345678"),
                              frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1000)), frame(RST_STREAM, 0, 3, b"\0\0\0\x08")))
             | any_frame(), max_size=8).map(b"".join),
    st.lists(any_frame(), max_size=6).map(b"".join).flatmap(mutated),
)


def read_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of each whole frame the sidecar wrote."""
    out = []
    pos = 0
    while pos + 9 <= len(data):
        size = int.from_bytes(data[pos : pos + 3], "big")
        kind, flags = data[pos + 3], data[pos + 4]
        stream = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        out.append((kind, flags, stream, data[pos + 9 : pos + 9 + size]))
        pos += 9 + size
    assert pos == len(data), f"the sidecar wrote a partial frame: {data[pos:pos + 40]!r}"
    return out


MAX_FRAME_SIZE = 16384  # the sidecar's SETTINGS_MAX_FRAME_SIZE (h2's default; it advertises no other)


def framing(body: bytes, last: bytes) -> tuple[bool, int, set[int]]:
    """Read ``body + last`` by the lengths the frame headers declare: whether ``last`` starts a
    frame of its own, the declared length of a frame whose header came but not all of it (-1:
    none), and the types of the whole frames."""
    data = body + last
    pos = size = 0
    aligned = False
    kinds = set()
    while pos + 9 <= len(data):
        aligned |= pos == len(body)
        size = int.from_bytes(data[pos : pos + 3], "big")
        if pos + 9 + size <= len(data):
            kinds.add(data[pos + 3])
        pos += 9 + size
    return aligned, size if pos > len(data) else -1, kinds


async def _exchange(body: bytes, read_cuts: list[int]) -> None:
    x = Exchange([0], 0, None)
    last = valid_request(LAST_STREAM)
    sent = PREFACE + frame(SETTINGS, 0, 0, b"") + body + last
    aligned, waiting, kinds = framing(body, last)
    await x.run(split_at(sent, read_cuts))
    frames = read_frames(bytes(x.received))
    assert frames and frames[0][0] == SETTINGS and not frames[0][1] & ACK, "no server preface (SETTINGS) first"
    goaway = [f for f in frames if f[0] == GOAWAY]
    if x.transport.closed:
        if goaway:
            tally(f"closed after GOAWAY (error {int.from_bytes(goaway[-1][3][4:8], 'big')})")
        else:
            assert GOAWAY in kinds, "the connection closed without GOAWAY (and the client sent none)"
            tally("closed after the client's GOAWAY")
    elif waiting > MAX_FRAME_SIZE:
        raise AssertionError(f"a frame header declaring {waiting} bytes was not refused (FRAME_SIZE_ERROR)")
    elif aligned:
        answered = any(f[2] == LAST_STREAM and f[0] in (HEADERS, RST_STREAM) for f in frames)
        assert answered or goaway, "the connection is open and the last request got no answer: a hang"
        tally("served" if answered else "open after GOAWAY")
    else:
        tally("waiting for the rest of a frame")
    x.transport.peer_close()
    await x.settle()
    assert x.runtime.stats.downstream_rq_active == 0, "a stream never accounted for"
    cluster = x.clusters.get("svc")
    assert cluster.stats.upstream_rq_active == 0 and cluster.endpoints["10.0.0.1:8080"].active_requests == 0


def check_frames(body: bytes, read_cuts: list[int]) -> None:
    run_checked(lambda: _exchange(body, read_cuts))


@fuzz_settings(500)
@given(body=frames_after_preface, read_cuts=cuts())
@example(body=b"", read_cuts=[])
@example(body=valid_request(1) + frame(DATA, END_STREAM, 1, b"late"), read_cuts=[30])
def test_any_frames_after_the_preface(body: bytes, read_cuts: list[int]) -> None:
    check_frames(body, read_cuts)


def test_a_frame_header_longer_than_the_max_frame_size_is_refused_at_once() -> None:
    # Found by fuzzing: h2 checks a frame's length only once the whole frame has arrived, so the
    # sidecar buffered up to 16 MiB per connection for a frame it would then refuse.
    async def run() -> Exchange:
        x = Exchange([0], 0, None)
        await x.run([PREFACE + frame(SETTINGS, 0, 0, b"") + frame(DATA, 0, 1, b"x" * 100, length=1 << 20)])
        return x

    x = run_checked(run)
    goaway = [f for f in read_frames(bytes(x.received)) if f[0] == GOAWAY]
    assert goaway and int.from_bytes(goaway[0][3][4:8], "big") == 6  # FRAME_SIZE_ERROR
    assert x.transport.closed
