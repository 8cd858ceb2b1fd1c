"""Local replies: the responses the proxy generates itself, in Envoy's words.

Each carries the response flag in ``x-meshkeeper-flags`` and a small JSON body
``{"error": "...", "flags": "..."}`` (:func:`sidecar.codec.headers.reply_body`). Each codec
encodes a reply its own way (HTTP/1.1 from bytes built once per reply, gRPC calls as a status:
:mod:`sidecar.proxy.grpc`).

The outbound policy (``sidecar.proxy.passthrough``): a proxy request (absolute-form or ``CONNECT``)
for a host outside the mesh, under ``registry_only`` (the listener's default cluster is
``BlackHoleCluster``), gets **502** with the flag **UH**: 502 is what Istio answers for
BlackHoleCluster, UH what Envoy (and our L4 path) reports for a connection to that cluster, which
has no hosts; the body names the host, the policy and the cluster. A ``CONNECT`` to a mesh
service's name is not tunnelled: 404 NR, as Envoy answers a CONNECT no ``connect_matcher`` route
takes (send plain HTTP to a mesh service and the mesh routes it).

Also here: :func:`log_once`, so a data-path failure is logged the first time each cause is seen
and only counted afterwards.
"""

from __future__ import annotations

import logging

from sidecar.codec.headers import local_reply_bytes, reply_body

log = logging.getLogger("meshkeeper.sidecar.proxy")


class LocalReply:
    """A prebuilt error response."""

    __slots__ = ("flag", "status", "message", "body", "close_bytes", "always_close")

    def __init__(self, flag: str, status: int, message: str, always_close: bool = False) -> None:
        self.flag = flag
        self.status = status
        self.message = message
        self.always_close = always_close
        self.body = body = reply_body(message, flag)
        # Whole, for a writer without a codec (a CONNECT tunnel's answer); codecs encode the rest.
        self.close_bytes = local_reply_bytes(status, flag, body, True)

    def __repr__(self) -> str:
        return f"LocalReply({self.status} {self.flag})"


# Response flags as Envoy's access logs spell them.
NO_ROUTE = LocalReply("NR", 404, "no route matched")
NO_CLUSTER = LocalReply("NC", 503, "cluster not found")
NO_HEALTHY_UPSTREAM = LocalReply("UH", 503, "no healthy upstream")
CONNECT_FAILURE = LocalReply(
    "UF", 503, "upstream connect error or disconnect/reset before headers. reset reason: connection failure")
UPSTREAM_RESET = LocalReply(
    "UC", 502, "upstream connect error or disconnect/reset before headers. reset reason: connection termination")
UPSTREAM_PROTOCOL_ERROR = LocalReply("UPE", 502, "upstream sent an invalid HTTP/1.1 response")
UPSTREAM_TIMEOUT = LocalReply("UT", 504, "upstream request timeout")
BAD_REQUEST = LocalReply("DPE", 400, "bad request", always_close=True)
BAD_HOST = LocalReply("DPE", 400, "an HTTP/1.1 request needs exactly one Host header", always_close=True)
HEADERS_TOO_LARGE = LocalReply("DPE", 431, "request headers too large", always_close=True)

OVERFLOW = LocalReply("UO", 503, "upstream overflow: circuit breaker open")
RATE_LIMITED = LocalReply("RL", 429, "local rate limited")
RETRY_BODY_TOO_LONG = LocalReply(
    "URX", 503, "upstream failed and the request body outgrew the retry buffer before the retry")
REQUEST_HEADER_TIMEOUT = LocalReply("DT", 408, "request header timeout", always_close=True)
RBAC_DENIED = LocalReply("RBAC", 403, "RBAC: access denied")  # gRPC: PERMISSION_DENIED (sidecar.proxy.grpc)

CONNECT_TO_MESH = LocalReply(
    "NR", 404, "CONNECT to a mesh service is not tunnelled: send plain HTTP (http://<service>/...) and the mesh routes it")
BAD_CONNECT = LocalReply("DPE", 400, "CONNECT needs an authority-form target (host:port) and must not be pipelined",
                         always_close=True)
OUTSIDE_MESH_REFUSED_FLAG = "UH"
OUTSIDE_MESH_REFUSED_STATUS = 502


def outside_mesh_refused(host: str, cluster: str) -> LocalReply:
    """The refusal of a proxy request for ``host`` outside the mesh under ``registry_only`` (built
    per request: it names the host)."""
    return LocalReply(OUTSIDE_MESH_REFUSED_FLAG, OUTSIDE_MESH_REFUSED_STATUS,
                      f"{host} is outside the mesh and the outbound policy is registry_only ({cluster})")


UPSTREAM_RESETS = {"UC": UPSTREAM_RESET, "UPE": UPSTREAM_PROTOCOL_ERROR}

_FAULT_ABORTS: dict[int, LocalReply] = {}


def fault_abort(status: int) -> LocalReply:
    """The local reply of a fault-injected abort (flag FI) with ``status``; built once per status."""
    reply = _FAULT_ABORTS.get(status)
    if reply is None:
        reply = _FAULT_ABORTS[status] = LocalReply("FI", status, "fault filter abort")
    return reply


_logged: set[str] = set()


def log_once(cause: str, message: str, *args: object, exc_info: BaseException | None = None) -> None:
    """Log ``message`` the first time ``cause`` is seen in this process; later ones are only counted."""
    if cause in _logged:
        return
    _logged.add(cause)
    log.warning(message + " (logged once per cause; see stats for counts)", *args, exc_info=exc_info)
