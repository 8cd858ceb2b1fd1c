"""HTTP/1.1 bytes the proxy writes or looks for, precomputed so the data path only indexes tables.

- ``STATUS_LINES[code]``: the response status line, for every code 100..999 (Envoy also rewrites the
  reason phrase rather than forwarding the upstream's).
- ``REQUEST_HEADER_KIND``: request headers the connection manager handles itself instead of
  forwarding. Hop-by-hop headers (RFC 9110 §7.6.1: Connection and the headers it names,
  Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade) never cross the proxy;
  framing is re-applied on each side. ``UNMATCHABLE_HEADERS``: those a route cannot match on.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from sidecar.tracing.context import TRACE_HEADERS

MAX_REQUEST_HEADERS_BYTES = 60 * 1024  # Envoy's max_request_headers_kb default (60 KiB)

# Kinds of request headers with special handling.
H_HOST = 1
H_CONNECTION = 2
H_DROP = 3
H_TRANSFER_ENCODING = 4
H_EXPECT = 5
H_CONTENT_LENGTH = 6
H_TRACE = 7  # trace context (W3C, B3): read, then sent on as this hop's (sidecar.proxy.telemetry)
H_REQUEST_ID = 8
H_CONTENT_TYPE = 9  # forwarded; read to tell gRPC requests (application/grpc*)

REQUEST_HEADER_KIND: dict[bytes, int] = {
    b"host": H_HOST,
    b"connection": H_CONNECTION,
    b"keep-alive": H_DROP,
    b"proxy-connection": H_DROP,
    b"te": H_DROP,
    b"trailer": H_DROP,
    b"upgrade": H_DROP,
    b"transfer-encoding": H_TRANSFER_ENCODING,
    b"expect": H_EXPECT,
    b"content-length": H_CONTENT_LENGTH,
    **{name: H_TRACE for name in TRACE_HEADERS if name != b"x-request-id"},
    b"x-request-id": H_REQUEST_ID,
    b"content-type": H_CONTENT_TYPE,
}

# Request headers a route cannot match on: the codec consumes them instead of forwarding them (Host
# routes by domain; hop-by-hop headers; trace and request-id headers, taken while tracing is on).
# Content-Length and Content-Type are forwarded, so they stay matchable.
UNMATCHABLE_HEADERS = frozenset(name.decode() for name, kind in REQUEST_HEADER_KIND.items()
                                if kind not in (H_CONTENT_LENGTH, H_CONTENT_TYPE))

# Connection tokens that name no header to strip.
CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b"upgrade", b""))

IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))

CHUNKED_HEADER = b"transfer-encoding: chunked\r\n"
CONNECTION_CLOSE = b"connection: close\r\n"
CONNECTION_KEEP_ALIVE = b"connection: keep-alive\r\n"
CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def _status_lines() -> list[bytes]:
    phrases = {s.value: s.phrase for s in HTTPStatus}
    return [f"HTTP/1.1 {code} {phrases.get(code, 'Unknown')}\r\n".encode() for code in range(1000)]


STATUS_LINES: list[bytes] = _status_lines()


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """The pieces of one chunk of a chunked body (write them with ``writelines``)."""
    return b"%x\r\n" % len(data), data, CRLF


def strip_named(pieces: list[bytes], names: set[bytes]) -> list[bytes]:
    """Drop the headers named by a Connection header (``names``, lower case) from pieces."""
    out: list[bytes] = []
    for i in range(0, len(pieces), 4):
        if pieces[i].lower() not in names:
            out += pieces[i : i + 4]
    return out


# --------------------------------------------------------------------------- local replies

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


class CodecReply:
    """A response a codec gives by itself (a request it cannot pass on), with Envoy's flag."""

    __slots__ = ("status", "flag", "body")

    def __init__(self, status: int, flag: str, message: str) -> None:
        self.status = status
        self.flag = flag
        self.body = reply_body(message, flag)


def reply_body(message: str, flag: str) -> bytes:
    """The JSON body of a local reply: ``{"error": ..., "flags": ...}``."""
    return json.dumps({"error": message, "flags": flag}).encode()


_reply_cache: dict[tuple[int, str, bytes, bool], bytes] = {}


def local_reply_bytes(status: int, flag: str, body: bytes, close: bool) -> bytes:
    """A whole HTTP/1.1 local reply (JSON ``body``, flag in ``x-meshkeeper-flags``); the bytes of
    each distinct reply are built once (their number is bounded by the proxy's own messages)."""
    key = (status, flag, body, close)
    data = _reply_cache.get(key)
    if data is None:
        data = (f"{STATUS_LINES[status].decode()}content-type: application/json\r\n"
                f"content-length: {len(body)}\r\nx-meshkeeper-flags: {flag}\r\n"
                f"{'connection: close' + chr(13) + chr(10) if close else ''}\r\n").encode() + body
        if len(_reply_cache) < 1024:
            _reply_cache[key] = data
    return data


BAD_REQUEST = CodecReply(400, "DPE", "bad request")
BAD_HOST = CodecReply(400, "DPE", "an HTTP/1.1 request needs exactly one Host header")
HEADERS_TOO_LARGE = CodecReply(431, "DPE", "request headers too large")
REQUEST_HEADER_TIMEOUT = CodecReply(408, "DT", "request header timeout")
