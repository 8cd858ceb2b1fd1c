"""Fuzzing the HTTP/1.1 proxy as a whole (issue 16): a connection manager on a fake transport,
routing to a cluster whose one endpoint is a fake upstream that answers every request it receives
(in one of several response shapes, echoing the request's method and body in ``x-echo``).

For any byte stream, cut into reads anywhere:
- no exception escapes ``data_received``, none reaches the event loop's handler, none is logged;
- no hang: while the connection is open every complete request is answered, and reading is never
  left paused;
- what the client receives is well-formed HTTP/1.1, and response *i* answers request *i*;
- every byte sent upstream parses as HTTP/1.1 requests, and the upstream receives a whole request
  only for the responses it gave: a request the sidecar refused (400 and 431 of the codec, 404 NR,
  any reply with ``x-meshkeeper-flags``) never reaches it whole. A request refused before its head
  ended sends it nothing; one refused in its body (a bad chunk) may have had its head sent before,
  and then the upstream connection is aborted, never reused;
- once the client leaves, nothing is left in flight.
The smuggling corpus (tests/support/http1_fuzz.py) is replayed as explicit cases: 400, nothing
upstream, the connection closed, whether the upstream connection is new or pooled.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.fuzz import cuts, fuzz_settings, mutated, run_checked, split_at, tally
from tests.support.http1_fuzz import SMUGGLING, read_requests, read_responses, request_stream, response
from tests.support.mesh_fuzz import SHAPES, Exchange


async def _exchange(data: bytes, read_cuts: list[int], shapes: list[int], split: int,
                    high_water: int | None) -> None:
    x = Exchange(shapes, split, high_water)
    sent_all = await x.run(split_at(data, read_cuts))
    closed = x.transport.closed
    sent = read_requests(data)
    answers_head = [r.method == b"HEAD" for r in sent]
    responses, _, cut_short = read_responses(bytes(x.received), answers_head, closed)
    assert not cut_short or x.transport.aborted, "a response cut short on a connection not reset"

    # Response i answers request i; the upstream got a whole request only for those it answered.
    echoed = 0
    for i, resp in enumerate(responses):
        tag = resp.headers.get(b"x-echo")
        if tag is None:
            assert b"x-meshkeeper-flags" in resp.headers, f"response {i} is neither the upstream's nor ours: {resp}"
            continue
        echoed += 1
        assert i < len(sent) and sent[i].complete, f"response {i} answers no complete request"
        assert tag == sent[i].echo, f"response {i} answers {tag!r}, request {i} was {sent[i].echo!r}"
    upstream_complete = sum(end.complete for end in x.ends)
    assert upstream_complete == echoed, (
        f"the upstream received {upstream_complete} whole requests, the client got {echoed} of its answers")
    for end in x.ends:
        if end.in_request and not sent_all:
            assert end.transport.closed, "a refused request's partial head or body left on a pooled connection"

    complete = [r for r in sent if r.complete]
    tally(f"answered upstream: {min(echoed, 3)}")
    for resp in responses:
        if b"x-meshkeeper-flags" in resp.headers:
            tally(f"local reply {resp.status} {resp.headers[b'x-meshkeeper-flags'].decode()}")
    if not closed:
        # (A request may be answered before its body ends: a local reply, as Envoy's.)
        assert len(complete) <= len(responses) <= len(sent), (
            f"{len(complete)} complete requests, {len(responses)} answered, the connection still open: a hang")
        assert x.transport.reading, "reading left paused on an open connection"
    else:
        assert len(responses) <= len(sent), "more responses than requests"
        for resp in responses[:-1]:
            assert resp.headers.get(b"connection") != b"close", "a response said close, more came after it"

    # The client leaves: nothing stays in flight, no upstream connection keeps half a request.
    x.transport.peer_close()
    await x.settle()
    stats = x.runtime.stats
    assert stats.downstream_rq_active == 0, "a stream never accounted for"
    cluster = x.clusters.get("svc")
    assert cluster.stats.upstream_rq_active == 0, "an upstream request never released"
    assert cluster.endpoints["10.0.0.1:8080"].active_requests == 0
    for end in x.ends:
        assert not end.in_request or end.transport.closed, "an upstream connection kept a partial request"


def check_exchange(data: bytes, read_cuts: list[int], shapes: list[int], split: int = 0,
                   high_water: int | None = None) -> None:
    run_checked(lambda: _exchange(data, read_cuts, shapes, split, high_water))


shapes = st.lists(st.integers(0, SHAPES - 1), min_size=1, max_size=4)
high_waters = st.sampled_from((None, None, 64, 1024))


@fuzz_settings(400)
@given(data=request_stream(), read_cuts=cuts(), shapes=shapes, split=st.integers(0, 200), high_water=high_waters)
@example(data=SMUGGLING["cl-te"], read_cuts=[], shapes=[0], split=0, high_water=None)
@example(data=b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n" * 20, read_cuts=[], shapes=[3, 0], split=5, high_water=64)
def test_proxy_any_request_stream(data: bytes, read_cuts: list[int], shapes: list[int], split: int,
                                  high_water: int | None) -> None:
    check_exchange(data, read_cuts, shapes, split, high_water)


# --- the smuggling corpus -------------------------------------------------------------------------

_WARM = b"GET /warm HTTP/1.1\r\nHost: svc\r\n\r\n"


async def _refused(vector: bytes, warm: bool, byte_by_byte: bool) -> tuple[list[Any], Exchange]:
    x = Exchange([0], 0, None)
    if warm:  # a pooled upstream connection is idle: a routed head would be written at once
        await x.run([_WARM])
        assert x.ends and x.ends[0].complete == 1
    reads = [vector[i : i + 1] for i in range(len(vector))] if byte_by_byte else [vector]
    await x.run(reads)
    answers_head = [False] * 2
    responses, _, _ = read_responses(bytes(x.received), answers_head, x.transport.closed)
    assert x.transport.closed
    assert all(end.complete == int(warm) for end in x.ends), "a refused request reached the upstream whole"
    return responses[int(warm):], x


# Vectors refused in the body (a bad chunk), after a head that was fine: a streaming proxy may have
# sent that head on before the bad bytes came (so does Envoy when they come in a later read).
_BODY_PHASE = frozenset(name for name in SMUGGLING if name.startswith("chunk-"))


@pytest.mark.parametrize("warm", [False, True], ids=["new-upstream", "pooled-upstream"])
@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_vector_is_refused_with_400_and_nothing_upstream(name: str, warm: bool) -> None:
    for byte_by_byte in (False, True):
        responses, x = run_checked(lambda: _refused(SMUGGLING[name], warm, byte_by_byte))  # noqa: B023
        assert [r.status for r in responses] == [400], (name, byte_by_byte, responses)
        assert responses[0].headers[b"x-meshkeeper-flags"] == b"DPE"
        assert x.runtime.stats.downstream_cx_protocol_error == 1
        heads = sum(end.heads for end in x.ends) - warm
        if name not in _BODY_PHASE or not (warm or byte_by_byte):
            assert heads == 0, f"{name}: bytes of a refused request went upstream"
        else:
            # Its head may have gone on (the upstream connection was idle, or the head came in an
            # earlier read); then the connection is reset, never given another request.
            assert heads <= 1
            assert all(end.transport.aborted for end in x.ends if end.heads > end.complete)


# --- found by fuzzing (each was a failure of the property above) -----------------------------------

_GET = b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n"


async def _through(reads: list[bytes], shapes: list[int] | None = None) -> tuple[bytes, Exchange]:
    x = Exchange(shapes or [0], 0, None)
    await x.run(reads)
    return bytes(x.received), x


def test_a_local_reply_to_head_has_no_body() -> None:
    # The JSON body of the reply followed the head: the client read it as the next response.
    data, _ = run_checked(lambda: _through([b"HEAD / HTTP/1.1\r\nHost: empty\r\n\r\n" + _GET]))
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"x-meshkeeper-flags: UH" in head
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")  # no body in between
    check_exchange(b"HEAD / HTTP/1.1\r\nHost: empty\r\n\r\n" + _GET, [], [0])


def test_a_head_refused_by_the_codec_gets_no_body() -> None:
    data, x = run_checked(lambda: _through([b"HEAD / HTTP/1.1\r\n\r\n"]))
    assert data.startswith(b"HTTP/1.1 400 ") and data.endswith(b"\r\n\r\n") and x.transport.closed


def test_a_pipelined_request_whose_head_straddles_the_answer_before_it_is_answered() -> None:
    # The first read ended one byte into the second request; the first was answered before the rest
    # came: its head then went to the queue entry the answer had already taken out, never decoded.
    reads = [_GET + b"G", _GET[1:]]
    data, x = run_checked(lambda: _through(reads))
    assert data.count(b"HTTP/1.1 200 OK") == 2 and x.ends[0].complete == 2
    check_exchange(_GET * 2, [30], [0])


def test_connect_with_a_path_or_an_absolute_uri_is_refused_not_forwarded() -> None:
    # It was routed as a request and sent upstream: "CONNECT / HTTP/1.1" on a pooled connection.
    for target in (b"/", b"http://svc/"):
        data, x = run_checked(lambda: _through([b"CONNECT " + target + b" HTTP/1.1\r\nHost: svc\r\n\r\n"]))  # noqa: B023
        assert data.startswith(b"HTTP/1.1 400 ") and b"x-meshkeeper-flags: DPE" in data and x.transport.closed
        assert x.connector.connections == []


def test_a_request_answered_before_its_body_was_refused_gets_one_response() -> None:
    # 503 UH at the head, then a Content-Length among the trailers (the parser refuses it): a second
    # response (400) went out for the same request.
    vector = b"GET / HTTP/1.1\r\nHost: empty\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 5\r\n\r\n"
    data, x = run_checked(lambda: _through([vector]))
    assert data.count(b"HTTP/1.1 ") == 1 and data.startswith(b"HTTP/1.1 503 ") and x.transport.closed
    check_exchange(vector, [], [0])


def test_a_204_does_not_end_the_next_request_on_its_upstream_connection() -> None:
    # A 204 ends at its head; the next request took the connection at once, and the parser's end of
    # the 204 then ended that request too, with no response: a hang, or the next answer misplaced.
    data, x = run_checked(lambda: _through([_GET * 2], shapes=[2]))
    assert data.count(b"HTTP/1.1 204 ") == 2 and sum(end.complete for end in x.ends) == 2
    check_exchange(_GET * 3 + b"POST / HTTP/1.1\r\nHost: svc\r\n\r\n", [], [2, 3])


def test_an_upgrade_request_with_a_body_is_refused() -> None:
    # The parser reads no body after an Upgrade head (those bytes are the new protocol's): the head
    # went upstream promising 34 bytes that never came, and the body was routed as a second request.
    vector = SMUGGLING["upgrade-with-body"]
    data, x = run_checked(lambda: _through([vector]))
    assert data.count(b"HTTP/1.1 ") == 1 and data.startswith(b"HTTP/1.1 400 ") and x.transport.closed
    assert x.connector.connections == []
    # Without a body it is a plain request (Upgrade is hop-by-hop: dropped).
    data, x = run_checked(lambda: _through([b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"]))
    assert data.startswith(b"HTTP/1.1 200 ") and x.ends[0].complete == 1


# --- any upstream response ------------------------------------------------------------------------


async def _upstream_answers(method: bytes, reads: list[bytes], close: bool) -> None:
    x = Exchange([0], 0, None, raw=(reads, close))
    body = b"Content-Length: 5\r\n\r\nhello" if method == b"POST" else b"\r\n"
    await x.run([method + b" / HTTP/1.1\r\nHost: svc\r\n" + body])
    responses, _, cut_short = read_responses(bytes(x.received), [method == b"HEAD"], x.transport.closed)
    assert len(responses) <= 1, f"{len(responses)} responses to one request"
    if cut_short:  # still streaming (a body until the upstream closes), or reset
        assert x.transport.aborted or not x.transport.closed, "a response cut short on a connection not reset"
        tally("streaming" if not x.transport.closed else "reset")
    elif not responses:
        # Nothing yet (the upstream has not finished its head: the route timeout would answer 504),
        # or reset: the response failed after its head was passed on (in the same read, unwritten).
        assert not x.transport.closed or x.transport.aborted, "the connection closed without a response"
        tally("reset" if x.transport.closed else "waiting")
    else:
        resp = responses[0]
        flag = resp.headers.get(b"x-meshkeeper-flags")
        tally(f"{resp.status} {flag.decode() if flag else 'forwarded'}")
        if flag is None:
            assert 200 <= resp.status <= 999, f"an upstream status {resp.status} forwarded"
    x.transport.peer_close()
    await x.settle()
    assert x.runtime.stats.downstream_rq_active == 0
    assert x.clusters.get("svc").stats.upstream_rq_active == 0


def check_upstream_answer(method: bytes, data: bytes, read_cuts: list[int], close: bool) -> None:
    run_checked(lambda: _upstream_answers(method, split_at(data, read_cuts), close))


upstream_answers = st.one_of(
    response().map(lambda r: r[0]),
    response().map(lambda r: r[0]),
    st.tuples(response(), response()).map(lambda rs: rs[0][0] + rs[1][0]),
    response().flatmap(lambda r: mutated(r[0])),
    st.binary(max_size=64).map(lambda b: b"HTTP/1.1 200 OK\r\n" + b),
)


@fuzz_settings(400)
@given(method=st.sampled_from((b"GET", b"HEAD", b"POST")), data=upstream_answers, read_cuts=cuts(4),
       close=st.booleans())
def test_proxy_any_upstream_response(method: bytes, data: bytes, read_cuts: list[int], close: bool) -> None:
    check_upstream_answer(method, data, read_cuts, close)


def test_a_body_on_an_interim_response_is_an_upstream_protocol_error() -> None:
    # Found by fuzzing: the parser reads a body after a 104..199 response with a length (not after
    # 100..103); its bytes reached the client ahead of any response head.
    async def run() -> bytes:
        x = Exchange([0], 0, None, raw=([b"HTTP/1.1 199 Odd\r\nContent-Length: 1\r\n\r\n\x00"], False))
        await x.run([_GET])
        return bytes(x.received)

    data = run_checked(run)
    assert data.startswith(b"HTTP/1.1 502 ") and b"x-meshkeeper-flags: UPE" in data
    check_upstream_answer(b"GET", b"HTTP/1.1 199 OK\r\nContent-Length: 1\r\n\r\n\x00", [], False)
