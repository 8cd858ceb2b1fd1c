"""gRPC on the request path: what Envoy does differently for a request whose content-type is
``application/grpc*`` (``Stream.grpc``).

- **Statuses.** A gRPC call's outcome is its ``grpc-status`` (in the trailers, or in the head of a
  trailers-only response), not the HTTP status, which is 200. Outlier detection, LRS errors and
  ``retry_on`` read it, mapped to HTTP as Envoy's ``Grpc::Utility::grpcToHttpStatus`` maps it
  (:func:`http_status`: UNAVAILABLE is 503, INTERNAL 500, DEADLINE_EXCEEDED 504, ...).
- **Local replies** are trailers-only responses (HTTP 200, ``grpc-status``, ``grpc-message``, the
  flag in ``x-meshkeeper-flags``) with the status Envoy's ``httpToGrpcStatus`` gives the reply's
  HTTP status (503 UH is UNAVAILABLE, 429 RL UNAVAILABLE, 404 NR UNIMPLEMENTED); a route timeout
  (504 UT) is DEADLINE_EXCEEDED, what the caller's own deadline would have said.
- **Deadlines.** ``grpc-timeout`` (the caller's deadline) bounds the route timeout
  (:func:`timeout`): the smaller one applies, and a route without a timeout takes the caller's.
  A route timeout after the response began ends an HTTP/2 call with DEADLINE_EXCEEDED in trailers
  (:func:`trailers`) rather than a reset, which a gRPC client would read as INTERNAL.
- **Retries.** ``retry_on`` names the gRPC conditions of Envoy's ``x-envoy-retry-grpc-on``:
  ``cancelled``, ``deadline-exceeded``, ``internal``, ``resource-exhausted``, ``unavailable``;
  they apply to a trailers-only response (the status arrives before anything was sent on), as in
  Envoy.
"""

from __future__ import annotations

from urllib.parse import quote

OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14

NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
         "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
         "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")

# Envoy's Grpc::Utility::grpcToHttpStatus.
_TO_HTTP = (200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401)

# retry_on conditions by gRPC status (Envoy's retry-grpc-on names).
RETRY_ON = {1: "cancelled", 4: "deadline-exceeded", 8: "resource-exhausted", 13: "internal", 14: "unavailable"}
RETRY_CONDITIONS = frozenset(RETRY_ON.values())
_CONDITIONS = {code: frozenset((name,)) for code, name in RETRY_ON.items()}
_NONE: frozenset[str] = frozenset()

_GRPC_STATUS = b"grpc-status"
_GRPC_TIMEOUT = b"grpc-timeout"
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def http_status(code: int) -> int:
    """The HTTP status a gRPC status counts as (outlier detection, LRS errors, stats)."""
    return _TO_HTTP[code] if 0 <= code < len(_TO_HTTP) else 500


def status_for_reply(http: int, flag: str) -> int:
    """The gRPC status of a local reply (Envoy's httpToGrpcStatus; a route timeout is DEADLINE_EXCEEDED)."""
    if flag == "UT":
        return DEADLINE_EXCEEDED
    if http in (429, 502, 503, 504):
        return UNAVAILABLE
    return {400: INTERNAL, 401: 16, 403: 7, 404: UNIMPLEMENTED}.get(http, UNKNOWN)


def status_of(pieces: list[bytes]) -> int | None:
    """``grpc-status`` of a head or trailers (pieces with lower-case names); None when absent."""
    for i in range(0, len(pieces), 4):
        if pieces[i] == _GRPC_STATUS:
            value = pieces[i + 2].strip()
            return int(value) if value.isdigit() else UNKNOWN
    return None


def retry_conditions(code: int) -> frozenset[str]:
    return _CONDITIONS.get(code, _NONE)


def timeout(headers: list[bytes]) -> float | None:
    """The caller's deadline in seconds from ``grpc-timeout`` (``<digits><unit>``, at most 8 digits);
    None when absent or malformed (then it is ignored, as gRPC servers do)."""
    for i in range(0, len(headers), 4):
        if headers[i].lower() == _GRPC_TIMEOUT:
            value = headers[i + 2].strip()
            digits, unit = value[:-1], value[-1:]
            if digits.isdigit() and len(digits) <= 8 and unit in _UNITS:
                return int(digits) * _UNITS[unit]
            return None
    return None


def trailers(code: int, message: str, flag: str) -> list[bytes]:
    """Trailers that end a call the proxy cuts short after its response began (a route timeout)."""
    return [b"grpc-status", b": ", b"%d" % code, b"\r\n",
            b"grpc-message", b": ", quote(message, safe=" !#$&'()*+,/:;=?@[]~").encode(), b"\r\n",
            b"x-meshkeeper-flags", b": ", flag.encode(), b"\r\n"]


def local_reply(http: int, flag: str, message: str) -> tuple[int, list[bytes]]:
    """(gRPC status, the head of a trailers-only response) for a local reply."""
    code = status_for_reply(http, flag)
    return code, [b"content-type", b": ", b"application/grpc", b"\r\n", *trailers(code, message, flag)]


def method_of(path: bytes) -> tuple[str, str]:
    """(rpc.service, rpc.method) of a gRPC path ``/package.Service/Method``."""
    service, _, method = path.decode("latin-1").lstrip("/").partition("/")
    return service, method
