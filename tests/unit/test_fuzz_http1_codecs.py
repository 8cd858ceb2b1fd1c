"""Fuzzing the HTTP/1.1 codecs on their own (issue 16), faster than the whole proxy and with answers
the router would not give: early ones (before the request's body ended), deferred ones (a loop turn
later, so that pipelined requests wait), trailers, local replies.

The request codec (sidecar/codec/http1.py), for any byte stream cut into reads anywhere: no
exception escapes; what the client receives is well-formed HTTP/1.1, one response per request and
in order (each stream answers with the echo of the method and body it was given, so a request
decoded wrong shows as a wrong echo); while the connection is open every complete request is
answered; once it is lost every stream has ended.

The response codec (sidecar/codec/http1_client.py), for any response bytes cut into reads: no
exception escapes; the stream hears a head at most once and exactly one ending (complete or reset),
nothing after it; its pool hears that the stream is done exactly once; a response that the parser
reads whole reaches the stream with its status and body intact, and the connection is pooled again
only when that response allowed it and it ended cleanly.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.codec.http1 import Http1ServerCodec
from sidecar.codec.http1_client import Http1ClientConnection
from sidecar.upstream.stats import ClusterStats
from tests.support.fakes import FakeTransport, RecordingDecoder
from tests.support.fuzz import cuts, fuzz_settings, mutated, run_checked, split_at
from tests.support.http1_fuzz import echo, read_requests, read_responses, request_stream, response

# --- the request codec ------------------------------------------------------------------------

ANSWERS = 7  # how a stream answers, by number (see EchoStream.answer)


class EchoStream:
    """A RequestDecoder that answers with the echo of what it was given, in one of several ways."""

    def __init__(self, owner: Streams, encoder: Any) -> None:
        self.method = b""
        self.authority = b""
        self.path = b""
        self.headers: list[bytes] = []
        self.version = 11
        self.chunked = False
        self.has_body = False
        self.grpc = False
        self.expect = False
        self.trace_in = None
        self.request_id = None
        self.owner = owner
        self.encoder = encoder
        self.body = bytearray()
        self.ended = False  # answered, reset or refused by the codec
        self.answered = False
        self.how = owner.next_answer()

    def decode_headers(self, end_stream: bool) -> None:
        assert not self.ended, "a head decoded on a stream that ended"
        if self.expect and self.how != 6:
            self.encoder.encode_100_continue()
        if self.how == 6 and not end_stream:  # an early answer: the rest of the body is dropped
            self.answer()
        elif end_stream:
            self.complete()

    def decode_data(self, data: bytes, end_stream: bool) -> None:
        if self.how == 6 and self.ended:
            return
        assert not self.ended, "data decoded on a stream that ended"
        self.body += data
        if end_stream:
            self.complete()

    def decode_trailers(self, trailers: list[bytes]) -> None:
        self.complete()

    def complete(self) -> None:
        if self.how == 5:  # a loop turn later: the requests behind it wait, queued
            asyncio.get_running_loop().call_soon(self.answer)
        else:
            self.answer()

    def answer(self) -> None:
        if self.ended:
            return
        self.ended = self.answered = True
        enc = self.encoder
        x = [b"x-echo", b": ", echo(self.method, bytes(self.body)), b"\r\n"]
        how = self.how
        if how == 1:  # no length: chunked by the codec (or close-delimited for HTTP/1.0)
            enc.encode_headers(200, x, False)
            enc.encode_data(b"abc", False)
            enc.encode_data(b"", True)
        elif how == 2:
            enc.encode_headers(204, x, True)
        elif how == 3:
            enc.encode_local_reply(404, "NR", b'{"error": "no route"}', False)
        elif how == 4:
            enc.encode_headers(200, x, False)
            enc.encode_data(b"de", False)
            enc.encode_trailers([b"grpc-status", b": ", b"0", b"\r\n"])
        elif how == 6:
            enc.encode_local_reply(413, "EA", b'{"error": "early"}', False)
        else:
            enc.encode_headers(200, x + [b"content-length", b": ", b"2", b"\r\n"], False)
            enc.encode_data(b"ok", True)

    def on_reset(self) -> None:
        self.ended = True

    def on_local_reply(self, status: int, flag: str) -> None:
        assert not self.answered, "the codec answered a stream that had answered"
        self.ended = True

    def on_write_paused(self, paused: bool) -> None:
        pass


class Streams:
    """The codec's ServerCallbacks: makes EchoStreams, answering in the ways ``answers`` cycles through."""

    def __init__(self, answers: list[int]) -> None:
        self.answers = answers
        self.streams: list[EchoStream] = []
        self.errors = 0

    def next_answer(self) -> int:
        return self.answers[len(self.streams) % len(self.answers)]

    def new_stream(self, encoder: Any) -> EchoStream:
        stream = EchoStream(self, encoder)
        self.streams.append(stream)
        return stream

    def protocol_error(self, detail: str) -> None:
        self.errors += 1

    def closing(self) -> None:
        pass


async def _serve(data: bytes, read_cuts: list[int], answers: list[int]) -> None:
    callbacks = Streams(answers)
    transport = FakeTransport(_Sink())
    codec = Http1ServerCodec(callbacks, transport, tracing=False)
    received = bytearray()
    for piece in split_at(data, read_cuts):
        if transport.closed:
            break
        codec.dispatch(piece)
        idle = 0
        while idle < 3:  # deferred answers come a turn apart: until nothing more is written
            await asyncio.sleep(0)
            out = transport.take()
            received += out
            idle = 0 if out else idle + 1
    closed = transport.closed
    sent = read_requests(data)
    responses, _, cut_short = read_responses(bytes(received), [r.method == b"HEAD" for r in sent], closed)
    assert not cut_short
    assert len(responses) <= len(sent) and len(responses) <= len(callbacks.streams) + 1
    for i, resp in enumerate(responses):
        tag = resp.headers.get(b"x-echo")
        if tag is None:
            assert b"x-meshkeeper-flags" in resp.headers, f"response {i}: {resp}"
        elif callbacks.streams[i].how != 6:
            assert tag == sent[i].echo, f"response {i} answers {tag!r}, request {i} was {sent[i].echo!r}"
    if not closed:
        complete = [r for r in sent if r.complete]
        assert len(complete) <= len(responses), f"{len(complete)} complete requests, {len(responses)} answered"
    if transport.closed:
        codec.connection_lost()
    else:
        transport.close()
        await asyncio.sleep(0)
        codec.connection_lost()
    assert all(s.ended for s in callbacks.streams), "a stream never ended after the connection was lost"


class _Sink:
    """FakeTransport's protocol: the codec is fed directly, so transport callbacks go nowhere."""

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


def check_request_codec(data: bytes, read_cuts: list[int], answers: list[int]) -> None:
    run_checked(lambda: _serve(data, read_cuts, answers))


@fuzz_settings(600)
@given(data=request_stream(), read_cuts=cuts(), answers=st.lists(st.integers(0, ANSWERS - 1), min_size=1, max_size=4))
@example(data=b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: svc\r\n\r\n",
         read_cuts=[45], answers=[5, 0])
def test_request_codec_any_stream(data: bytes, read_cuts: list[int], answers: list[int]) -> None:
    check_request_codec(data, read_cuts, answers)


# --- the response codec -----------------------------------------------------------------------


class Pool:
    """What a client connection tells its pool, counted."""

    def __init__(self) -> None:
        self.stats = ClusterStats()
        self.done: list[bool] = []
        self.losses = 0

    def opened(self, conn: Any) -> None:
        pass

    def lost(self, conn: Any) -> None:
        self.losses += 1

    def stream_done(self, conn: Any, reusable: bool) -> None:
        self.done.append(reusable)


def _read_whole(data: bytes, is_head: bool) -> tuple[int, bytes] | None:
    """(status, body) of the first final response in ``data`` if the parser reads it whole."""
    try:
        responses, _, cut_short = read_responses(data, [is_head], closed=True, strict=False)
    except AssertionError:
        return None
    if not responses or cut_short:
        return None
    return responses[0].status, responses[0].body


async def _fetch(data: bytes, read_cuts: list[int], method: bytes, close: bool) -> None:
    pool = Pool()
    conn = Http1ClientConnection(pool)
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    decoder = RecordingDecoder()
    body = b"hello" if method == b"POST" else b""
    headers = [b"content-length", b": ", b"%d" % len(body), b"\r\n"] if body else []
    conn.attach(decoder).encode_headers(method, b"svc", b"/", headers, end_stream=not body, chunked=False,
                                        is_head=method == b"HEAD", body=[body] if body else None)
    if body:
        conn.encode_data(b"", True)
    for piece in split_at(data, read_cuts):
        if transport.closed:
            break
        conn.data_received(piece)
    await asyncio.sleep(0)
    pooled = bool(pool.done) and pool.done[0] and not conn.closed
    if close and not conn.closed:
        transport.peer_close()
        await asyncio.sleep(0)
    elif not close and conn.decoder is not None:
        conn.reset()  # the router gave up on it (a timeout): the connection is never pooled
    events = [e for e in decoder.events if e[0] != "paused"]
    heads = [e for e in events if e[0] == "headers"]
    ends = [i for i, e in enumerate(events) if e[0] in ("complete", "reset")]
    assert len(heads) <= 1, f"two response heads for one stream: {events}"
    assert len(ends) <= 1 and (not ends or ends[0] == len(events) - 1), f"events after the end: {events}"
    assert len(pool.done) == 1, f"the pool heard of the stream's end {len(pool.done)} times"
    if close or ends:
        assert ends, f"the connection closed and the stream never ended: {events}"
    whole = _read_whole(data, method == b"HEAD")
    if events and events[-1] == ("complete",):
        assert heads, "complete without a head"
        status = heads[0][1]
        assert 200 <= status <= 999
        if whole is not None and whole[0] == status:
            assert bytes(decoder.body) == whole[1], "the body reached the stream changed"
    if pooled:
        assert events and events[-1] == ("complete",), "a connection pooled after a failure"


def check_response_codec(data: bytes, read_cuts: list[int], method: bytes, close: bool) -> None:
    run_checked(lambda: _fetch(data, read_cuts, method, close))


responses = st.one_of(
    response().map(lambda r: r[0]),
    response().map(lambda r: r[0]),
    st.tuples(response(), response()).map(lambda rs: rs[0][0] + rs[1][0]),  # a second one: unsolicited
    response().flatmap(lambda r: mutated(r[0])),
    st.binary(max_size=64).map(lambda b: b"HTTP/1.1 200 OK\r\n" + b),
    st.binary(max_size=64),
)


@fuzz_settings(600)
@given(data=responses, read_cuts=cuts(), method=st.sampled_from((b"GET", b"HEAD", b"POST")), close=st.booleans())
@example(data=b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
         read_cuts=[3, 30], method=b"GET", close=False)
def test_response_codec_any_response(data: bytes, read_cuts: list[int], method: bytes, close: bool) -> None:
    check_response_codec(data, read_cuts, method, close)


# --- found by fuzzing ---------------------------------------------------------------------------


class ReusingPool(Pool):
    """Hands the connection to the next stream as soon as it is released, as the real pool does."""

    def __init__(self, nxt: RecordingDecoder) -> None:
        super().__init__()
        self.nxt: RecordingDecoder | None = nxt

    def stream_done(self, conn: Any, reusable: bool) -> None:
        super().stream_done(conn, reusable)
        nxt, self.nxt = self.nxt, None
        if reusable and nxt is not None:
            conn.attach(nxt).encode_headers(b"GET", b"svc", b"/next", [], end_stream=True, chunked=False, is_head=False)


async def _two_streams(*reads: bytes) -> tuple[RecordingDecoder, RecordingDecoder, FakeTransport, ReusingPool]:
    first, second = RecordingDecoder(), RecordingDecoder()
    pool = ReusingPool(second)
    conn = Http1ClientConnection(pool)
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    conn.attach(first).encode_headers(b"GET", b"svc", b"/", [], end_stream=True, chunked=False, is_head=False)
    for data in reads:
        if not transport.closed:
            conn.data_received(data)
    await asyncio.sleep(0)
    return first, second, transport, pool


def test_a_204_does_not_end_the_stream_that_took_its_connection() -> None:
    first, second, transport, _ = run_checked(lambda: _two_streams(
        b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    assert first.events == [("headers", 204, b"", True), ("complete",)]
    assert second.events == [("headers", 200, b"content-length: 2\r\n", False), ("complete",)]
    assert second.body == b"ok" and not transport.closed


def test_a_response_after_the_one_that_ended_in_the_same_read_is_a_protocol_error() -> None:
    # It answered a request not yet sent: it went to the stream that took the connection meanwhile.
    first, second, transport, pool = run_checked(lambda: _two_streams(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"))
    assert first.events[-1] == ("complete",) and first.body == b"ok"
    assert second.events == [("reset", "UPE")] and second.body == b""
    assert transport.aborted and pool.stats.upstream_cx_protocol_error == 1
