"""The state of one request/response exchange on a downstream connection.

A plain slotted record owned by the connection manager (``http.HttpConnectionManager``); it has no
behaviour of its own. One is created per request, so its fields are kept flat and cheap to set.
"""

from __future__ import annotations

import asyncio
from time import monotonic, time_ns
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.proxy.router import RouteEntry
    from sidecar.upstream.cluster import Cluster
    from sidecar.upstream.host import Endpoint
    from sidecar.upstream.pool import UpstreamConnection


class Exchange:
    __slots__ = (
        # request, as parsed
        "method", "url", "host", "headers", "keep_alive", "http10", "ka_token", "chunked", "has_body",
        "expect", "conn_tokens", "headers_done", "complete", "discard", "pending", "pending_size",
        # routing and upstream
        "entry", "cluster", "endpoint", "conn", "connecting", "deadline", "retried", "failed", "original_dst",
        # retries, circuit breakers, fault injection (see router_filter)
        "sent", "sent_size", "retries", "tried", "try_deadline", "wait", "waiter", "pending_cx", "attached", "retry_active", "discarding",
        # response
        "started", "resp_chunked", "status", "done",
        # telemetry (see telemetry): times, ids, trace context, what the access log and spans report
        "t0", "wall0", "request_id", "trace_in", "trace_id", "span_id", "parent_id", "sampled", "tracestate", "b3",
        "trace_at", "span_start", "upstream_host", "try_t0", "bytes_in", "bytes_out", "flags", "try_status",
    )

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.host = b""
        # The upstream request head, built in place: [method, " ", path, " HTTP/1.1\r\nhost: ",
        # host, CRLF] then the forwarded headers as (name, ": ", value, CRLF) pieces.
        self.headers: list[bytes] = [b"", b" ", b"", b" HTTP/1.1\r\nhost: ", b"", b"\r\n"]
        self.keep_alive = True
        self.http10 = False
        self.ka_token = False  # "Connection: keep-alive" was sent
        self.chunked = False
        self.has_body = False
        self.expect = False  # "Expect: 100-continue" still to be answered
        self.conn_tokens: set[bytes] | None = None  # header names listed in Connection
        self.headers_done = False
        self.complete = False  # the whole request has been parsed
        self.discard = False  # refused or after "Connection: close": read and dropped
        self.pending: list[bytes] | None = None  # framed body bytes waiting for an upstream
        self.pending_size = 0
        self.entry: RouteEntry | None = None
        self.cluster: Cluster | None = None
        self.endpoint: Endpoint | None = None
        self.conn: UpstreamConnection | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.deadline = 0.0  # loop time the route timeout fires at; 0: none
        self.retried = False  # replayed once after a stale pooled connection
        # (host, port) an ORIGINAL_DST cluster sends this request to: the connection's original
        # destination (transparent mode); None: such a cluster has nowhere to send it.
        self.original_dst: tuple[str, int] | None = None
        # Body bytes already sent upstream, kept for a retry while the route has a retry policy
        # (None: no policy, or the body outgrew RETRY_BUFFER_LIMIT and cannot be retried).
        self.sent: list[bytes] | None = None
        self.sent_size = 0
        self.retries = 0  # retries sent so far
        self.tried: list[Endpoint] | None = None  # endpoints of failed tries (previous_hosts)
        self.try_deadline = 0.0  # loop time the current try's per_try_timeout fires at; 0: none
        self.wait: asyncio.TimerHandle | None = None  # retry back-off or fault delay in progress
        self.waiter = None  # callback queued in the endpoint pool (max_connections reached)
        self.pending_cx = False  # counted in upstream_rq_pending_active
        self.attached = False  # the try has had a connection: counted in upstream_rq_active
        self.retry_active = False  # the current try is a retry (counted in Cluster.retries_active)
        self.discarding = False  # a retriable response is being read and dropped before the retry
        self.failed = False  # an upstream failure was answered locally (counts as an endpoint error)
        self.started = False  # the response head has been written downstream
        self.resp_chunked = False
        self.status = 0
        self.done = False
        self.t0 = monotonic()  # request start, for durations
        self.wall0 = time_ns()  # the same instant on the wall clock (access log, span start)
        self.request_id: bytes | None = None  # x-request-id, the caller's or generated
        self.trace_in: list[tuple[int, bytes]] | None = None  # the caller's trace headers (kind, value)
        self.trace_id = 0  # 0: tracing is off for this request
        self.span_id = 0  # this hop's span (of the current attempt)
        self.parent_id = 0  # the caller's span; 0 for a new trace
        self.sampled = False
        self.tracestate = b""
        self.b3 = 0  # the B3 style the caller used (answered in kind)
        self.trace_at = -1  # index of the trace headers in the upstream head (rewritten per attempt)
        self.span_start = 0  # wall-clock ns the current attempt's span starts at; 0: the request's start
        self.upstream_host = ""  # the endpoint of the last try (host:port)
        self.try_t0 = 0.0  # when the current try started (upstream request time, LRS latency)
        self.bytes_in = 0  # request body bytes received
        self.bytes_out = 0  # response body bytes sent
        self.flags = ""  # Envoy's response flags (UH, UO, UT, RL, DC, ...)
        self.try_status = 0  # status of a retriable response being dropped (the failed attempt's span)
