"""The connection manager: one ``asyncio.Protocol`` per downstream connection, codec-agnostic.

Used by both listeners (outbound 15001 and inbound 15006), in Envoy's terms the
``HttpConnectionManager``: it owns the downstream connection, its codec
(:mod:`sidecar.codec.http1` or :mod:`sidecar.codec.http2`) and its streams, and nothing of upstream. For each stream it
takes the request id and trace context (:mod:`.telemetry`), applies the listener's local rate
limit, resolves the route (by Host or ``:authority``, or the authority of an absolute-form URI from
apps using ``HTTP_PROXY``), and hands the stream to a router filter (:mod:`.router_filter`), which
does the rest upstream. It answers locally what cannot be routed (404 NR, 503 NC, 429 RL, the
outbound policy's refusals; see :mod:`.errors`; a gRPC call gets them as gRPC statuses, see
:mod:`.grpc`) and accounts for every stream once, however it ended (:meth:`ConnectionManager.end`).

Codec: HTTP/1.1 unless the client's first bytes are the HTTP/2 connection preface (h2c with prior
knowledge, as Envoy's ``codec_type: AUTO`` detects it), so both share one port.

The route and per-try timeouts of the connection's streams share one timer, re-armed lazily: a
timer per request would cost a heap insert and a cancel each time.

Callbacks never raise: they answer or reset, count, and log once per cause. Everything a listener
shares (router, clusters, stats, drain state) lives in its ``ListenerContext``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from sidecar.codec.http1 import Http1ServerCodec
from sidecar.codec.http2 import Http2ServerCodec
from sidecar.proxy import errors, grpc, passthrough, telemetry
from sidecar.proxy.on_demand import HeldStream
from sidecar.proxy.router_filter import RouterFilter, absolute_form
from sidecar.proxy.stream import Stream

if TYPE_CHECKING:
    from sidecar.codec.api import ResponseEncoder
    from sidecar.proxy.context import ListenerContext


_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # the HTTP/2 client connection preface (RFC 9113 §3.4)


class ConnectionManager(asyncio.Protocol):
    """One downstream connection."""

    __slots__ = ("_rt", "_loop", "transport", "codec", "streams", "original_dst", "peer_id", "peer_cert_hash",
                 "_timer", "_timer_at", "_sniffed", "_begun", "_swept", "_swept_at")

    def __init__(self, context: ListenerContext) -> None:
        self._rt = context
        self._loop: asyncio.AbstractEventLoop | None = None
        self.transport: asyncio.Transport | None = None
        self.codec: Http1ServerCodec | Http2ServerCodec | None = None
        self._sniffed: bytes | None = b""  # the first bytes while they may be the HTTP/2 preface; None: decided
        self._begun = 0  # streams begun (the idle sweep's sign of progress on HTTP/2)
        self._swept = -1
        self._swept_at = 0.0
        self.streams: set[Stream] = set()  # streams not yet accounted for
        self.original_dst: tuple[str, int] | None = None  # transparent mode: where the app dialled
        self.peer_id = ""  # the caller's SPIFFE ID on an mTLS connection (sidecar.tls.inspector); "": plaintext
        self.peer_cert_hash = ""  # the SHA-256 (hex) of the caller's certificate, for XFCC's Hash; "": plaintext
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # a TCP transport
        self._loop = asyncio.get_running_loop()
        rt = self._rt
        self.codec = Http1ServerCodec(self, transport, tracing=rt.tracer is not None, draining=rt.draining)
        rt.connection_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        codec = self.codec
        if codec is not None:
            codec.connection_lost()
        for stream in list(self.streams):  # what the codec no longer knew of
            self._reset(stream)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._rt.connection_closed(self)

    def eof_received(self) -> bool:
        return False  # a half-closed client is a closed client (HTTP/1 default of Envoy)

    def data_received(self, data: bytes) -> None:
        sniffed = self._sniffed
        if sniffed is not None:
            data = sniffed + data
            n = min(len(data), len(_PREFACE))
            if data[:n] == _PREFACE[:n]:
                if n < len(_PREFACE):
                    self._sniffed = data  # too short to tell yet
                    return
                rt = self._rt
                self.codec = Http2ServerCodec(self, self.transport, tracing=rt.tracer is not None)
                if rt.draining:
                    self.codec.dispatch(data)
                    self.codec.go_away()
                    self._sniffed = None
                    return
            self._sniffed = None
        self.codec.dispatch(data)

    def pause_writing(self) -> None:
        self.codec.write_paused(True)

    def resume_writing(self) -> None:
        self.codec.write_paused(False)

    # --- ServerCallbacks ------------------------------------------------------------------------

    def new_stream(self, encoder: ResponseEncoder) -> Stream:
        stream = Stream(self, encoder)
        stream.original_dst = self.original_dst
        self.streams.add(stream)
        self._begun += 1
        stats = self._rt.stats
        stats.downstream_rq_total += 1
        stats.downstream_rq_active += 1
        return stream

    def protocol_error(self, detail: str) -> None:
        self._rt.stats.downstream_cx_protocol_error += 1
        errors.log_once(f"dpe:{detail[:40]}", "downstream protocol error: %s", detail)

    def closing(self) -> None:
        if self._rt.draining:
            self._rt.stats.downstream_cx_drain_close += 1

    # --- StreamOwner ----------------------------------------------------------------------------

    def on_headers(self, stream: Stream, end_stream: bool) -> None:
        """Route a stream and hand it to a router filter, or answer it locally."""
        rt = self._rt
        telemetry.begin(rt, stream)
        policy = rt.http_policy
        if policy is not None and not policy.admit(stream, self.peer_id, rt.stats, self.peer_cert_hash):
            self.local_reply(stream, errors.RBAC_DENIED)
            return
        limiter = rt.rate_limit
        if limiter is not None:
            if not limiter.try_take():
                rt.stats.ratelimit_rate_limited += 1
                self.local_reply(stream, errors.RATE_LIMITED)
                return
            rt.stats.ratelimit_ok += 1
        self._route(stream)

    def route_held(self, stream: Stream, held: HeldStream, found: bool) -> None:
        """A stream held for on-demand discovery (sidecar.proxy.on_demand): route it now that its
        service arrived, or answer 404 NR; the body it buffered goes to the router."""
        if stream.done or stream.filter is not held:
            return
        stream.filter = None
        self.codec.batch_begin()
        if found:
            self._route(stream, held)
        else:
            held.release()
            self._rt.stats.no_route += 1
            self.local_reply(stream, errors.NO_ROUTE)
        self.codec.batch_end()

    def _route(self, stream: Stream, held: HeldStream | None = None) -> None:
        rt = self._rt
        url = stream.path
        if url[:1] == b"/":
            path = url
            authority = stream.authority
        else:
            authority, path = absolute_form(url)
            if authority is None:
                if stream.method != b"CONNECT":
                    self.local_reply(stream, errors.BAD_REQUEST)
                elif rt.default_cluster is None:
                    self.local_reply(stream, errors.NO_ROUTE, close=True)
                else:  # the outbound policy: a tunnel, or refused
                    reply = passthrough.connect(self, rt, stream)
                    if reply is not None:
                        self.local_reply(stream, reply, close=True)
                return
            stream.authority = authority
        if stream.method == b"CONNECT":  # its target is host:port (RFC 9110 §9.3.6): never sent on as a request
            self.local_reply(stream, errors.BAD_CONNECT)
            return
        router = rt.router
        # The headers are as parsed; only routes with header matches read them.
        entry = router.resolve(authority, path, stream.headers, stream.method) if router is not None else None
        if entry is None:
            if held is None and url[:1] == b"/" and rt.on_demand is not None and self._hold(stream, authority):
                return
            if held is not None:
                held.release()
            if rt.default_cluster is None or url[:1] == b"/":
                rt.stats.no_route += 1
                self.local_reply(stream, errors.NO_ROUTE)
                return
            # A proxy request (absolute-form) for a host outside the mesh: the outbound policy.
            entry = passthrough.outside_mesh(rt, stream, authority)
            if entry.__class__ is errors.LocalReply:
                self.local_reply(stream, entry)
                return
        cluster = rt.clusters.get(entry.cluster())
        if cluster is None:
            if held is not None:
                held.release()
            rt.stats.no_cluster += 1
            self.local_reply(stream, errors.NO_CLUSTER)
            return
        stream.entry = entry
        stream.cluster = cluster
        stream.upstream_path = path
        stream.filter = f = RouterFilter(self, rt, stream, entry, cluster)
        if held is not None and held.pending is not None:  # the body that came while it was held
            f.pending, f.pending_size, held.pending = held.pending, held.pending_size, None
        f.start()

    def _hold(self, stream: Stream, authority: bytes) -> bool:
        """Hold ``stream`` while the service its authority names is discovered; False: it names none."""
        on_demand = self._rt.on_demand
        service = on_demand.service_for(authority)
        if service is None:
            return False
        deadline = self._loop.time() + on_demand.hold_timeout
        stream.filter = held = HeldStream(self, stream, service, on_demand, deadline)
        on_demand.hold(held)
        self.arm_at(deadline)
        return True

    def on_reset(self, stream: Stream) -> None:
        self._reset(stream)

    def on_codec_reply(self, stream: Stream, status: int, flag: str) -> None:
        stream.status = status
        stream.flags = flag
        stream.answered = True
        self.end(stream)

    # --- endings --------------------------------------------------------------------------------

    def local_reply(self, stream: Stream, reply: errors.LocalReply, close: bool = False) -> None:
        """Answer ``stream`` with a reply of the proxy's own (a gRPC request gets its status)."""
        if stream.done:
            return
        if stream.started:
            self.reset_stream(stream)
            return
        stream.flags = reply.flag
        stream.answered = True
        stream.ended = True
        if stream.grpc:  # a trailers-only response with the reply's gRPC status
            stream.grpc_status, head = grpc.local_reply(reply.status, reply.flag, reply.message)
            stream.status = 200
            stream.encoder.encode_headers(200, head, True)
        else:
            stream.status = reply.status
            stream.encoder.encode_local_reply(reply.status, reply.flag, reply.body, close or reply.always_close)
        self.end(stream)

    def reset_stream(self, stream: Stream) -> None:
        """Cut a response short (HTTP/1.1 resets the connection)."""
        if not stream.ended:
            stream.ended = True
            stream.encoder.reset()
        self.end(stream)

    def _reset(self, stream: Stream) -> None:
        """The client left (or reset the stream) before its response ended."""
        stream.ended = True
        if not stream.done and not stream.flags:
            stream.flags = "DC"  # the downstream connection went away before a response (Envoy's DC)
        self.end(stream)

    def end(self, stream: Stream) -> None:
        """Account for a stream once, whichever way it ended, and release what its filter holds."""
        if stream.done:
            return
        stream.done = True
        self.streams.discard(stream)
        rt = self._rt
        stats = rt.stats
        stats.downstream_rq_active -= 1
        if stream.answered:
            status = stream.status
            if status < 300:
                stats.downstream_rq_2xx += 1
            elif status < 400:
                stats.downstream_rq_3xx += 1
            elif status < 500:
                stats.downstream_rq_4xx += 1
            else:
                stats.downstream_rq_5xx += 1
        f = stream.filter
        if f is not None:
            f.release()
            stream.filter = None  # the router refers to the stream: no cycle left for the collector
        if stream.trace_id or stream.request_id is not None or stream.method:
            try:
                telemetry.end(rt, stream, self._peer() if stream.sampled else None)
            except Exception as exc:  # a bug: never let accounting break the connection
                errors.log_once("telemetry-bug", "unexpected error recording a request", exc_info=exc)
        # An HTTP/2 stream's encoder refers back to it: drop the link so that neither waits for the
        # cyclic collector (nothing writes through a stream once it is accounted for).
        stream.encoder = None

    # --- CONNECT tunnels (sidecar.proxy.passthrough) ----------------------------------------------

    def hand_over(self, protocol: asyncio.Protocol) -> asyncio.Transport | None:
        """Give the connection to ``protocol`` (a CONNECT tunnel), which the caller installs on the
        returned transport; None, nothing changed, if the codec cannot (see Http1ServerCodec; an
        HTTP/2 connection carries other streams: no CONNECT tunnels on it)."""
        codec = self.codec
        if codec.__class__ is not Http1ServerCodec:
            return None
        transport = codec.hand_over(protocol)
        if transport is None:
            return None
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._rt.connection_closed(self)
        return transport

    def handed_over_done(self, stream: Stream) -> None:
        """The outcome of the stream given away with :meth:`hand_over` is known (``stream.status``,
        or none if the client left first): account for it."""
        stream.ended = True
        stream.answered = bool(stream.status)
        self.end(stream)

    # --- timers ---------------------------------------------------------------------------------

    def arm_at(self, when: float) -> None:
        """Make sure the connection's timer fires by ``when`` (a loop time)."""
        timer = self._timer
        if timer is None or self._timer_at > when:
            if timer is not None:
                timer.cancel()
            self._timer_at = when
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._loop.time()
        self.codec.batch_begin()
        nxt = 0.0
        for stream in list(self.streams):
            f = stream.filter
            if f is not None and not stream.done:
                when = f.on_timer(now)
                if when and (not nxt or when < nxt):
                    nxt = when
        if nxt:
            self.arm_at(nxt)
        self.codec.batch_end()

    def batch_begin(self) -> None:
        self.codec.batch_begin()

    def batch_end(self) -> None:
        self.codec.batch_end()

    # --- listener -------------------------------------------------------------------------------

    def _peer(self) -> tuple | None:
        transport = self.transport
        return transport.get_extra_info("peername") if transport is not None else None

    def start_draining(self) -> None:
        """Listener drain: close now if idle, else after the streams in flight."""
        if self.codec is not None:
            self.codec.go_away()

    @property
    def idle(self) -> bool:
        return not self.streams

    def check_timeouts(self, now: float, headers_timeout: float, idle_timeout: float) -> None:
        """The listener's sweep (see ``ListenerContext.sweep``): request head and idle timeouts.
        HTTP/1.1 times both itself; an HTTP/2 connection is idle when no stream is open and none
        has begun since the last sweep (its heads arrive in one HEADERS block: no head timeout)."""
        codec = self.codec
        if codec is None or self.transport is None:
            return
        if codec.__class__ is not Http1ServerCodec:
            if not idle_timeout or self.streams:
                self._swept = -1
                return
            if self._swept != self._begun:
                self._swept = self._begun
                self._swept_at = now
            elif now - self._swept_at >= idle_timeout:
                self._swept = -1
                self._rt.stats.downstream_cx_idle_timeout += 1
                codec.go_away()
            return
        what = codec.check_timeouts(now, headers_timeout, idle_timeout)
        if what == "head":
            self._rt.stats.downstream_rq_header_timeout += 1
        elif what == "idle":
            self._rt.stats.downstream_cx_idle_timeout += 1
