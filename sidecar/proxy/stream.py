"""One request stream on a downstream connection: the record every layer of the request path reads.

A :class:`Stream` is the :class:`~sidecar.codec.api.RequestDecoder` a server codec fills and feeds;
it passes each event to its connection manager (:mod:`sidecar.proxy.connection_manager`), which
routes it and hands it to the stream's router filter (:mod:`sidecar.proxy.router_filter`).
Telemetry (:mod:`sidecar.proxy.telemetry`) reads what it recorded. One is made per request, so its
fields are kept flat and cheap to set.
"""

from __future__ import annotations

from time import monotonic, time_ns
from typing import TYPE_CHECKING, Protocol

from sidecar.proxy.grpc import http_status as _grpc_http

if TYPE_CHECKING:
    from sidecar.codec.api import ResponseEncoder
    from sidecar.proxy.router import RouteEntry
    from sidecar.upstream.cluster import Cluster


class StreamOwner(Protocol):
    """What a stream reports to (the connection manager)."""

    def on_headers(self, stream: Stream, end_stream: bool) -> None: ...

    def on_reset(self, stream: Stream) -> None: ...

    def on_codec_reply(self, stream: Stream, status: int, flag: str) -> None: ...


class StreamFilter(Protocol):
    """The filter a routed stream's events go to (the router)."""

    def on_request_data(self, data: bytes, end_stream: bool) -> None: ...

    def on_request_trailers(self, trailers: list[bytes]) -> None: ...

    def on_downstream_write_paused(self, paused: bool) -> None: ...

    def on_timer(self, now: float) -> float:
        """A deadline of this stream may be due; returns the next one (0: none)."""

    def release(self) -> None:
        """The stream is over: give back the try's connection, timers and counters."""


class Stream:
    __slots__ = (
        # the request head, as the codec set it (sidecar.codec.api.RequestHead)
        "method", "authority", "path", "headers", "version", "chunked", "has_body", "grpc", "expect",
        "trace_in", "request_id",
        # the connection's side
        "owner", "encoder", "filter", "original_dst", "complete", "done", "ended", "started", "answered",
        # what the route decided and the response
        "entry", "cluster", "upstream_path", "upstream_headers", "status", "grpc_status", "flags", "failed",
        # telemetry (sidecar.proxy.telemetry): times, ids, trace context, what the access log and spans report
        "t0", "wall0", "trace_id", "span_id", "parent_id", "sampled", "tracestate", "b3", "trace_at",
        "span_start", "upstream_host", "try_status", "retries", "bytes_in", "bytes_out",
    )

    def __init__(self, owner: StreamOwner, encoder: ResponseEncoder) -> None:
        self.method = b""
        self.authority: bytes | None = b""  # None: Host was repeated (refused by the codec)
        self.path = b""
        self.headers: list[bytes] = []  # forwardable headers as pieces
        self.version = 11
        self.chunked = False
        self.has_body = False
        self.grpc = False
        self.expect = False
        self.trace_in: list[tuple[int, bytes]] | None = None  # the caller's trace headers (kind, value)
        self.request_id: bytes | None = None  # x-request-id, the caller's or generated
        self.owner = owner
        self.encoder = encoder
        self.filter: StreamFilter | None = None  # the router, once routed
        # (host, port) an ORIGINAL_DST cluster sends this request to: the connection's original
        # destination (transparent mode) or a proxy request's authority; None: nowhere.
        self.original_dst: tuple[str, int] | None = None
        self.complete = False  # the whole request has been received
        self.done = False  # accounted for (ConnectionManager.end); nothing more happens to it
        self.ended = False  # the response has ended (or was reset): the encoder is not used again
        self.started = False  # the response head has been sent downstream
        self.answered = False  # a whole response went out (counted by status class)
        self.entry: RouteEntry | None = None
        self.cluster: Cluster | None = None
        self.upstream_path = b""  # the path sent upstream (origin-form)
        self.upstream_headers: list[bytes] | None = None  # the headers sent upstream, as pieces
        self.status = 0
        self.grpc_status = -1  # a gRPC call's grpc-status (trailers, or a trailers-only head); -1: none
        self.flags = ""  # Envoy's response flags (UH, UO, UT, RL, DC, ...)
        self.failed = False  # an upstream failure was answered locally (counts as an endpoint error)
        self.t0 = monotonic()  # request start, for durations
        self.wall0 = time_ns()  # the same instant on the wall clock (access log, span start)
        self.trace_id = 0  # 0: tracing is off for this request
        self.span_id = 0  # this hop's span (of the current attempt)
        self.parent_id = 0  # the caller's span; 0 for a new trace
        self.sampled = False
        self.tracestate = b""
        self.b3 = 0  # the B3 style the caller used (answered in kind)
        self.trace_at = -1  # index of the trace headers in upstream_headers (rewritten per attempt)
        self.span_start = 0  # wall-clock ns the current attempt's span starts at; 0: the request's start
        self.upstream_host = ""  # the endpoint of the last try (host:port)
        self.try_status = 0  # status of a retriable response being dropped (the failed attempt's span)
        self.retries = 0  # retries sent so far
        self.bytes_in = 0  # request body bytes received
        self.bytes_out = 0  # response body bytes sent

    @property
    def outcome(self) -> int:
        """The HTTP status the outcome counts as: a gRPC call's status mapped as Envoy maps it
        (sidecar.proxy.grpc.http_status), else the response status."""
        code = self.grpc_status
        if code < 0:
            return self.status
        return _grpc_http(code)

    # --- RequestDecoder -------------------------------------------------------------------------

    def decode_headers(self, end_stream: bool) -> None:
        if end_stream:
            self.complete = True
        self.owner.on_headers(self, end_stream)

    def decode_data(self, data: bytes, end_stream: bool) -> None:
        if end_stream:
            self.complete = True
        if self.done:
            return  # answered already: the rest of the body is read and dropped
        self.bytes_in += len(data)
        f = self.filter
        if f is not None:
            f.on_request_data(data, end_stream)

    def decode_trailers(self, trailers: list[bytes]) -> None:
        self.complete = True
        if self.done:
            return
        f = self.filter
        if f is not None:
            f.on_request_trailers(trailers)

    def on_reset(self) -> None:
        self.ended = True
        if not self.done:
            self.owner.on_reset(self)

    def on_local_reply(self, status: int, flag: str) -> None:
        self.ended = True
        if not self.done:
            self.owner.on_codec_reply(self, status, flag)

    def on_write_paused(self, paused: bool) -> None:
        f = self.filter
        if f is not None and not self.done:
            f.on_downstream_write_paused(paused)
