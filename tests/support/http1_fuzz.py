"""The HTTP/1.1 path under fuzzing (issue 16): what the properties of tests/unit/test_fuzz_http1*.py
generate and how they judge what comes out. bench/fuzz.py runs the same properties by the million.

- Generators: request streams built from parts (methods, targets, versions, Host and framing
  headers, Content-Length and Transfer-Encoding combinations, chunked bodies with good and bad chunk
  sizes, pipelining), the same after raw byte mutations, and responses for the client codec.
- :func:`read_requests`: the oracle of what a client sent, read by the same parser (llhttp) the
  codec uses and the same way (a read after an upgrade is parsed on): which requests are complete,
  their methods, bodies and keep-alive, up to the first that ends the connection or fails to parse.
- :func:`read_responses`: a strict reader of what the client received, message by message with
  ``httptools.HttpResponseParser`` (told which answer a HEAD, which the parser cannot know).
- Each request's *echo* (method, body length, CRC of the body): the upstream (or the codec test's
  stream) sends it back in ``x-echo``, so each response is matched to the request it answers.
- ``SMUGGLING``: the regression corpus of request smuggling vectors; each must get 400.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser, HttpResponseParser
from hypothesis import strategies as st

from tests.support.fuzz import mutated

# --- the regression corpus --------------------------------------------------------------------

_POST = b"POST / HTTP/1.1\r\nHost: svc\r\n"
SMUGGLING: dict[str, bytes] = {
    "cl-te": _POST + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
    "te-cl": _POST + b"Transfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nX",
    "cl-te-obfuscated": _POST + b"Content-Length: 4\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te-space-before-colon": _POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te-not-last-chunked": _POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te-twice": _POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    "duplicate-cl": _POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "duplicate-cl-same": _POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "cl-list": _POST + b"Content-Length: 5, 5\r\n\r\nhello",
    "cl-plus": _POST + b"Content-Length: +5\r\n\r\nhello",
    "cl-negative": _POST + b"Content-Length: -1\r\n\r\n",
    "cl-hex": _POST + b"Content-Length: 0x5\r\n\r\nhello",
    "chunk-size-junk": _POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-negative": _POST + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow": _POST + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "chunk-size-0x": _POST + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "chunk-data-overrun": _POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    "chunk-bare-lf": _POST + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
    "chunk-ext-nul": _POST + b"Transfer-Encoding: chunked\r\n\r\n5;a\x00=1\r\nhello\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: svc\r\nX-A: a\r\n b\r\n\r\n",
    "obs-fold-te": _POST + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "leading-space-header": b"GET / HTTP/1.1\r\n Host: svc\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: svc\n\n",
    "bare-lf-in-head": b"GET / HTTP/1.1\r\nHost: svc\nX: 1\r\n\r\n",
    "bare-cr": b"GET / HTTP/1.1\r\nHost: svc\r\n\rX: 1\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: svc\r\nX: a\x00b\r\n\r\n",
    "nul-in-host": b"GET / HTTP/1.1\r\nHost: s\x00vc\r\n\r\n",
    "nul-in-name": b"GET / HTTP/1.1\r\nHost: svc\r\nX\x00Y: 1\r\n\r\n",
    "nul-in-target": b"GET /\x00 HTTP/1.1\r\nHost: svc\r\n\r\n",
    # The parser reads no body after an Upgrade head: it was parsed as a second request.
    "upgrade-with-body": _POST + b"Connection: upgrade\r\nUpgrade: x\r\nContent-Length: 34\r\n\r\n"
                                 b"GET /admin HTTP/1.1\r\nHost: svc\r\n\r\n",
    # HTTP/0.9 (no version): the parser takes it; it was routed by its absolute URI and sent on as
    # HTTP/1.1, even with the method PRI (the HTTP/2 preface's), which the upstream cannot parse.
    "http09-absolute": b"GET http://svc/x\r\n\r\n",
    "http09-pri": b"PRI http://svc:0\r\n\r\n",
    "http09": b"GET /\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: svc\r\nHost: evil\r\n\r\n",
    "no-host": b"GET / HTTP/1.1\r\n\r\n",
}

# --- echoes -----------------------------------------------------------------------------------


def echo(method: bytes, body: bytes) -> bytes:
    """What identifies a request in the answer to it (``x-echo``)."""
    return b"%s %d %08x" % (method, len(body), zlib.crc32(body))


# --- the requests a client sent ---------------------------------------------------------------


@dataclass
class SentRequest:
    method: bytes = b""
    keep_alive: bool = True
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False

    @property
    def echo(self) -> bytes:
        return echo(self.method, bytes(self.body))


class _RequestReader:
    def __init__(self) -> None:
        self.requests: list[SentRequest] = []
        self.parser = HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self.requests.append(SentRequest())

    def on_headers_complete(self) -> None:
        r = self.requests[-1]
        r.method = self.parser.get_method()
        r.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.requests[-1].body += body

    def on_message_complete(self) -> None:
        self.requests[-1].complete = True


def read_requests(data: bytes) -> list[SentRequest]:
    """The requests in ``data`` as the codec's parser reads them, up to the first that fails to
    parse (kept, incomplete) or that ends the connection (kept, the rest dropped)."""
    reader = _RequestReader()
    while data:
        try:
            reader.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            data = data[offset:]
            continue
        except HttpParserError:
            if not reader.requests or reader.requests[-1].complete:
                reader.requests.append(SentRequest())  # refused before its head began
        break
    out = []
    for r in reader.requests:
        out.append(r)
        if r.complete and not r.keep_alive:
            break
    return out


# --- the responses a client received ----------------------------------------------------------


@dataclass
class Received:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    version: str


class _ResponseReader:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.head_done = False
        self.done = False
        self.status = 0
        self.parser = HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


def read_responses(data: bytes, answers_head: list[bool], closed: bool,
                   strict: bool = True) -> tuple[list[Received], int, bool]:
    """The final responses in ``data``, the number of interim (1xx) ones, and whether the last was
    cut short. ``answers_head[i]``: the i-th final response answers a HEAD request (no body
    follows, whatever its head says); ``closed``: the connection was closed after ``data`` (a body
    without length then ends there). Fails on anything that is not well-formed HTTP/1.1 as the
    sidecar writes it (``strict``), or that the parser refuses (always)."""
    out: list[Received] = []
    interim = 0
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        assert end >= 0, f"a response head is incomplete: {data[pos:pos + 300]!r}"
        m = _ResponseReader()
        try:
            m.parser.feed_data(data[pos : end + 4])
        except (HttpParserError, HttpParserUpgrade) as exc:
            raise AssertionError(f"malformed response head ({exc!r}): {data[pos:end + 4]!r}") from None
        assert m.head_done, f"not one response head: {data[pos:end + 4]!r}"
        version = m.parser.get_http_version()
        names = [n for n, _ in m.headers]
        if strict:
            assert version == "1.1", f"response version {version}"
            # 600..999 are not HTTP statuses (RFC 9110 §15) but parse: an upstream's is passed on.
            assert 100 <= m.status <= 999, f"status {m.status}"
            assert names.count(b"content-length") <= 1 and names.count(b"transfer-encoding") <= 1, m.headers
            assert not (b"content-length" in names and b"transfer-encoding" in names), m.headers
        pos = end + 4
        if m.status < 200:
            assert m.done and not (strict and names), f"an interim response with headers or a body: {m.headers}"
            interim += 1
            continue
        heads = dict(m.headers)
        if len(out) < len(answers_head) and answers_head[len(out)]:
            out.append(Received(m.status, heads, b"", version))
            continue
        if not m.done:
            if b"content-length" in heads:
                n = int(heads[b"content-length"])
                body = data[pos : pos + n]
                try:
                    m.parser.feed_data(body)
                except (HttpParserError, HttpParserUpgrade) as exc:
                    raise AssertionError(f"malformed response body ({exc!r})") from None
                pos += len(body)
                if len(body) < n:
                    return out + [Received(m.status, heads, bytes(m.body), version)], interim, True
            elif b"transfer-encoding" in heads:
                assert not strict or heads[b"transfer-encoding"] == b"chunked", heads
                while not m.done and pos < len(data):
                    try:
                        m.parser.feed_data(data[pos : pos + 1])
                    except (HttpParserError, HttpParserUpgrade) as exc:
                        raise AssertionError(f"malformed chunked body ({exc!r}): {data[pos - 20:pos + 20]!r}") from None
                    pos += 1
                if not m.done:
                    return out + [Received(m.status, heads, bytes(m.body), version)], interim, True
            else:
                assert closed, f"a body without length on a connection left open: {heads}"
                assert not strict or heads.get(b"connection") == b"close", f"a close-delimited body without connection: close {heads}"
                m.body += data[pos:]
                pos = len(data)
        out.append(Received(m.status, heads, bytes(m.body), version))
    return out, interim, False


# --- generators -------------------------------------------------------------------------------

_TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_VCHAR = "".join(chr(c) for c in range(0x20, 0x7F)) + "\t"



def mostly(common: tuple, rare: st.SearchStrategy) -> st.SearchStrategy:
    """One of ``common`` (repeats weigh more), or now and then a draw of ``rare``."""
    return st.sampled_from(common + (None,)).flatmap(lambda v: rare if v is None else st.just(v))


methods = mostly((b"GET", b"GET", b"GET", b"POST", b"POST", b"PUT", b"HEAD", b"HEAD", b"DELETE", b"OPTIONS",
                  b"PATCH", b"TRACE", b"CONNECT"),
                 st.sampled_from((b"PRI", b"get", b"QUERY")) | st.text(_TOKEN, min_size=1, max_size=6).map(str.encode))
targets = mostly((b"/", b"/", b"/", b"/items?x=1", b"/a/../b", b"//x", b"/%41", b"*", b"http://svc/x",
                  b"http://svc:8080", b"http://SVC?x=2", b"http://other/", b"http://user@svc/p", b"https://svc/",
                  b"svc:443", b"/#frag"),
                 st.text(_VCHAR, max_size=12).map(lambda s: b"/" + s.encode()))
versions = mostly((b"HTTP/1.1",) * 12 + (b"HTTP/1.0", b"HTTP/1.0"),
                  st.sampled_from((b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 ", b"")))
hosts = st.sampled_from(([b"svc"],) * 12 + ([], [b"svc:8080"], [b"SVC"], [b"nowhere"], [b""], [b"svc", b"svc"],
                                               [b"svc", b"other"], [b"empty"], [b"ghost"], [b"svc "]))
_NAMES = (b"Accept", b"User-Agent", b"X-A", b"x-request-id", b"traceparent", b"Upgrade", b"TE", b"Keep-Alive",
          b"Proxy-Connection", b"Trailer", b"Content-Type", b"Cookie", b"X-Private", b"Expect", b"Connection")
_VALUES = (b"1", b"close", b"keep-alive", b"keep-alive, X-Private", b"Upgrade", b"upgrade", b"100-continue",
           b"h2c", b"trailers", b"application/grpc", b"text/plain", b"", b"  spaced  ")
header_names = mostly(_NAMES, st.text(_TOKEN, min_size=1, max_size=10).map(str.encode))
header_values = mostly(_VALUES, st.text(_VCHAR, max_size=16).map(str.encode))
connection = st.sampled_from((None,) * 6 + (b"close", b"keep-alive", b"Keep-Alive, X-A", b"upgrade", b"close, te"))
expect = st.sampled_from((None,) * 5 + (b"100-continue", b"100-Continue", b"nothing"))
bodies = st.binary(max_size=48) | st.sampled_from((b"", b"hello", b"0\r\n\r\nGET /x HTTP/1.1\r\nHost: svc\r\n\r\n"))
transfer_encodings = st.sampled_from((b"chunked",) * 8 + (b"Chunked", b"gzip, chunked", b"chunked, gzip",
                                                          b"identity", b"chunked ", b" chunked", b"xchunked"))
chunk_size_junk = st.sampled_from((b"zz", b"-1", b"0x5", b"ffffffffffffffffff", b" 5", b"5 ", b"", b"5;", b"5\x00"))


@st.composite
def chunked_body(draw: st.DrawFn, body: bytes, clean: bool = False) -> bytes:
    """``body`` as chunks, mostly well-formed: sizes in either case, leading zeros, extensions,
    trailers; sometimes (never if ``clean``) a bad size or a bad chunk end."""
    out = []
    cuts = sorted(set(draw(st.lists(st.integers(0, len(body)), max_size=3))) | {0, len(body)})
    for a, b in zip(cuts, cuts[1:], strict=False):
        size = b"%x" % (b - a)
        forms = ("plain",) * 12 + ("upper", "zeros", "ext") + (() if clean else ("junk", "bad-end"))
        form = draw(st.sampled_from(forms))
        if form == "upper":
            size = size.upper()
        elif form == "zeros":
            size = b"00" + size
        elif form == "ext":
            size += b";name=value"
        elif form == "junk":
            size = draw(chunk_size_junk)
        out.append(size + b"\r\n" + body[a:b] + (b"\r\n" if form != "bad-end" else draw(st.sampled_from((b"\n", b"XX", b"")))))
    trailers = draw(st.sampled_from((b"", b"", b"X-Trailer: t\r\n", b"Content-Length: 5\r\n")))
    out.append(b"0\r\n" + trailers + b"\r\n")
    return b"".join(out)


_CLEAN_METHODS = (b"GET", b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH")
_CLEAN_TARGETS = (b"/", b"/items?x=1", b"/a/../b", b"//x", b"http://svc/x", b"http://svc:8080/y")
_CLEAN_NAMES = tuple(n for n in _NAMES if n not in (b"Expect", b"Connection"))


@st.composite
def request(draw: st.DrawFn, clean: bool = False) -> bytes:
    """One request, mostly well-formed, with every framing combination the codec must judge;
    ``clean``: a well-formed one for the mesh (its Host may still name no route)."""
    if clean:
        method = draw(st.sampled_from(_CLEAN_METHODS))
        head = [method + b" " + draw(st.sampled_from(_CLEAN_TARGETS)) + b" " + draw(
            st.sampled_from((b"HTTP/1.1",) * 6 + (b"HTTP/1.0",))) + b"\r\n"]
        headers = [(b"Host", draw(st.sampled_from((b"svc",) * 8 + (b"svc:8080", b"nowhere", b"empty"))))]
        headers += draw(st.lists(st.tuples(st.sampled_from(_CLEAN_NAMES), st.sampled_from(_VALUES)), max_size=2))
    else:
        method = draw(methods)
        head = [method + b" " + draw(targets) + b" " + draw(versions) + b"\r\n"]
        headers = [(b"Host", h) for h in draw(hosts)]
        headers += draw(st.lists(st.tuples(header_names, header_values), max_size=3))
    c = draw(connection)
    if c is not None:
        headers.append((b"Connection", c))
    e = draw(expect)
    if e is not None:
        headers.append((b"Expect", e))
    body = draw(bodies)
    framing = draw(st.sampled_from(("none",) * 4 + ("length",) * 3 + ("chunked",) * 3 + (
        () if clean else ("length-off", "length-junk", "both", "length-twice"))))
    payload = b""
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
        payload = body
    elif framing == "length-off":  # a length the body does not have: the rest is the next request's
        headers.append((b"Content-Length", b"%d" % max(0, len(body) + draw(st.integers(-3, 3)))))
        payload = body
    elif framing == "length-junk":
        headers.append((b"Content-Length", draw(st.sampled_from((b"+5", b"-1", b"5, 5", b" 5", b"0x5", b"",
                                                                 b"99999999999999999999", b"5 5")))))
        payload = body
    elif framing == "length-twice":
        headers += [(b"Content-Length", b"%d" % len(body))] * 2
        payload = body
    elif framing in ("chunked", "both"):
        headers.append((b"Transfer-Encoding", b"chunked" if clean else draw(transfer_encodings)))
        if framing == "both":
            headers.append((b"Content-Length", b"%d" % len(body)))
        payload = draw(chunked_body(body, clean))
    order = draw(st.permutations(range(len(headers))))
    for i in order:
        name, value = headers[i]
        head.append(name + b": " + value + b"\r\n")
    return b"".join(head) + b"\r\n" + payload


def request_stream(max_requests: int = 4) -> st.SearchStrategy[bytes]:
    """What a client writes on one connection: pipelined requests, sometimes mutated, sometimes a
    smuggling vector after well-formed requests, sometimes bytes of no shape at all."""
    clean = st.lists(request(clean=True), min_size=1, max_size=max_requests).map(b"".join)
    pipelined = st.lists(request(), min_size=1, max_size=max_requests).map(b"".join)
    return st.one_of(
        clean,
        clean,
        clean,
        st.tuples(clean, pipelined).map(b"".join),
        pipelined,
        pipelined.flatmap(mutated),
        st.tuples(pipelined, st.sampled_from(sorted(SMUGGLING.values()))).map(b"".join),
        st.sampled_from(sorted(SMUGGLING.values())).flatmap(mutated),
        st.binary(max_size=64).map(lambda b: b"GET / HTTP/1.1\r\nHost: svc\r\n" + b),
        st.binary(max_size=64),
    )


# --- responses, for the client codec ----------------------------------------------------------

statuses = st.sampled_from((200, 200, 201, 204, 304, 404, 500, 503, 101, 100, 199, 599, 600, 0, 1000))


@st.composite
def response(draw: st.DrawFn) -> tuple[bytes, bytes, int]:
    """One response as an upstream may send it: (bytes, the body a reader takes from it, status)."""
    interim = draw(st.sampled_from((b"",) * 4 + (b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")))
    status = draw(statuses)
    version = draw(st.sampled_from((b"HTTP/1.1",) * 4 + (b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 ")))
    head = [b"%s %d %s\r\n" % (version, status, draw(st.sampled_from((b"OK", b"", b"Whatever it is"))))]
    head += [name + b": " + value + b"\r\n" for name, value in draw(st.lists(st.tuples(header_names, header_values), max_size=3))]
    c = draw(connection)
    if c is not None:
        head.append(b"Connection: " + c + b"\r\n")
    body = draw(bodies)
    framing = draw(st.sampled_from(("length", "length", "chunked", "chunked", "eof", "length-off", "both", "length-twice")))
    if framing == "length":
        head.append(b"Content-Length: %d\r\n" % len(body))
        payload = body
    elif framing == "length-off":
        head.append(b"Content-Length: %d\r\n" % max(0, len(body) + draw(st.integers(-3, 3))))
        payload = body
    elif framing == "length-twice":
        head.append(b"Content-Length: %d\r\n" % len(body) * 2)
        payload = body
    elif framing in ("chunked", "both"):
        head.append(b"Transfer-Encoding: " + draw(transfer_encodings) + b"\r\n")
        if framing == "both":
            head.append(b"Content-Length: %d\r\n" % len(body))
        payload = draw(chunked_body(body))
    else:
        payload = body
    return interim + b"".join(head) + b"\r\n" + payload, body, status
