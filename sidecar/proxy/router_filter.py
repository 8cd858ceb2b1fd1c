"""The router filter: sends a routed stream upstream, try by try, and relays the response.

In Envoy's terms this is ``envoy.filters.http.router``. A :class:`RouterFilter` is made per routed
stream by the connection manager. It builds the upstream headers (request id and trace context
injected), answers ``Expect: 100-continue``, applies the route's fault injection, starts the route
timeout when the request is complete, and sends tries:

- an :class:`UpstreamRequest` per try: the endpoint the cluster's balancer picked, the stream its
  connection pool gives (or the pool's refusal: 503 UO; a connect failure: 503 UF), the try's
  deadline (``per_try_timeout``, from when the connection is ready, as Envoy), and the response
  relayed back to the downstream encoder;
- a :class:`RetryState` when the route has a retry policy: the retries left, the jittered
  exponential back-off, the hosts tried (``previous_hosts``) and the cluster's retry budget.

Request bytes that arrive while no upstream stream can take them are held here, up to
``BUFFER_LIMIT`` per stream (then the downstream stops reading); while a retry policy applies the
body is also kept for a replay, up to ``RETRY_BUFFER_LIMIT`` (then the request is not retried).
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING, Any

from sidecar.codec.api import R_BUFFER, R_UPSTREAM, RESET_TERMINATION
from sidecar.proxy import errors, grpc, telemetry
from sidecar.proxy.body import BUFFER_LIMIT, hold_body
from sidecar.upstream import breaker
from sidecar.upstream.host import LocalOriginFailure
from sidecar.upstream.pool import PoolFailure

if TYPE_CHECKING:
    import asyncio

    from sidecar.codec.api import RequestEncoder
    from sidecar.config import FaultConfig, RetryPolicyConfig
    from sidecar.proxy.context import ListenerContext
    from sidecar.proxy.router import RouteEntry
    from sidecar.proxy.stream import Stream
    from sidecar.upstream.cluster import Cluster
    from sidecar.upstream.host import Endpoint
    from sidecar.upstream.pool import Pending

# Request body bytes kept per request so it can be retried (Envoy's per-request buffer limit
# defaults to the 1 MiB connection buffer limit); a longer body is streamed and not retried.
RETRY_BUFFER_LIMIT = 1024 * 1024

# Which retry_on conditions cover each local-origin failure (Envoy: 5xx covers them all; gateway-error
# the 502/503/504 they would answer; reset any reset reason but overflow, a connect failure included,
# and a per-try timeout).
_RETRY_ON_LOCAL = {
    LocalOriginFailure.CONNECT_FAILURE: frozenset({"5xx", "gateway-error", "connect-failure", "reset"}),
    LocalOriginFailure.RESET: frozenset({"5xx", "gateway-error", "reset"}),
    LocalOriginFailure.TIMEOUT: frozenset({"5xx", "gateway-error", "reset"}),
}
_RETRY_ON_REFUSED = _RETRY_ON_LOCAL[LocalOriginFailure.RESET] | {"refused-stream"}
_GATEWAY_ERRORS = frozenset({502, 503, 504})
_RETRY_ON_5XX = frozenset({"5xx"})
_RETRY_ON_GATEWAY = frozenset({"5xx", "gateway-error"})
_RETRY_ON_409 = frozenset({"retriable-4xx"})
_RETRY_ON_CODES = frozenset({"retriable-status-codes"})
_IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
_REQUEST_ID = b"x-request-id"


class ConnectionOwner:
    """What a router filter uses of its connection manager (typing only)."""

    if TYPE_CHECKING:
        _loop: asyncio.AbstractEventLoop

        def local_reply(self, stream: Stream, reply: errors.LocalReply, close: bool = False) -> None: ...
        def reset_stream(self, stream: Stream) -> None: ...
        def end(self, stream: Stream) -> None: ...
        def arm_at(self, when: float) -> None: ...
        def batch_begin(self) -> None: ...
        def batch_end(self) -> None: ...
        codec: Any  # its codec's batch_begin/batch_end gather an upstream read's writes


class RetryState:
    """A route's retry policy as one stream spends it."""

    __slots__ = ("policy", "tried", "active")

    def __init__(self, policy: RetryPolicyConfig) -> None:
        self.policy = policy
        self.tried: list[Endpoint] | None = None  # endpoints of failed tries (previous_hosts)
        self.active = False  # the current try is a retry (counted in Cluster.retries_active)

    def conditions_for_status(self, status: int) -> frozenset[str]:
        """The retry_on conditions of the policy that a response with ``status`` meets (empty: none)."""
        if status >= 500:
            conditions = _RETRY_ON_GATEWAY if status in _GATEWAY_ERRORS else _RETRY_ON_5XX
        elif status == 409:
            conditions = _RETRY_ON_409
        else:
            conditions = frozenset()
        if status in self.policy.retriable_status_codes:
            conditions = conditions | _RETRY_ON_CODES
        return conditions & self.policy.retry_on

    def backoff(self, retries: int, random: float) -> float:
        """Envoy's back-off before retry number ``retries``: uniform in [0, (2^n - 1) * base),
        capped at max_interval."""
        policy = self.policy
        return random * min(policy.base_interval * ((1 << retries) - 1), policy.max_interval)


class UpstreamRequest:
    """One try: its endpoint, its stream on a pooled connection, its deadline."""

    __slots__ = ("router", "codec", "endpoint", "encoder", "conn", "pending", "t0", "deadline", "discarding",
                 "stale_replay", "reported")

    def __init__(self, router: RouterFilter, endpoint: Endpoint) -> None:
        self.router = router
        self.codec = router.cm.codec  # the downstream codec (batch_begin/batch_end)
        self.endpoint = endpoint
        self.encoder: RequestEncoder | None = None
        self.conn = None  # the connection carrying the stream (its reuse count decides a stale replay)
        self.pending: Pending | None = None  # waiting for a connection
        self.t0 = monotonic()  # the try's start (upstream request time, LRS latency)
        self.deadline = 0.0  # loop time its per_try_timeout fires at; 0: none
        self.discarding = False  # a retriable response is being read and dropped before the retry
        self.stale_replay = False  # replayed once after a stale pooled connection
        self.reported = False  # its outcome went to outlier detection

    # --- PoolCallbacks --------------------------------------------------------------------------

    def on_pool_ready(self, encoder: RequestEncoder, conn: object) -> None:
        self.pending = None
        router = self.router
        if router.upstream is not self:
            encoder.reset()
            return
        self.encoder = encoder
        self.conn = conn
        router.attached(self)

    def on_pool_failure(self, reason: PoolFailure, detail: str) -> None:
        self.pending = None
        router = self.router
        if router.upstream is not self:
            return
        if reason is PoolFailure.OVERFLOW:
            router.overflow()
            return
        cluster = router.cluster
        # Per endpoint, but per cluster for ORIGINAL_DST ones: their hosts are whatever apps dial.
        cause = cluster.name if cluster.original_dst else self.endpoint.key
        errors.log_once(f"uf:{cause}", "upstream connect failure: %s", detail)
        router.upstream_failed(LocalOriginFailure.CONNECT_FAILURE, errors.CONNECT_FAILURE)

    # --- ResponseDecoder ------------------------------------------------------------------------

    def on_response_headers(self, status: int, headers: list[bytes], end_stream: bool) -> None:
        router = self.router
        if end_stream:
            self.encoder = None  # the stream is over: its connection is the pool's again
        if router.upstream is self:
            router.response_headers(self, status, headers, end_stream)

    def on_response_data(self, data: bytes, end_stream: bool) -> None:
        router = self.router
        if end_stream:
            self.encoder = None
        if router.upstream is not self:
            return
        if self.discarding:
            if end_stream:
                router.retry()
            return
        router.response_data(data, end_stream)

    def on_response_trailers(self, trailers: list[bytes]) -> None:
        router = self.router
        self.encoder = None
        if router.upstream is not self:
            return
        if self.discarding:
            router.retry()
            return
        router.response_trailers(trailers)

    def on_upstream_reset(self, flag: str, refused: bool = False) -> None:
        router = self.router
        self.encoder = None
        if router.upstream is self:
            router.upstream_reset(self, flag, refused)

    def on_write_paused(self, paused: bool) -> None:
        router = self.router
        if router.upstream is self and not router.stream.ended:
            router.stream.encoder.read_disable(R_UPSTREAM, paused)

    def batch_begin(self) -> None:
        """An upstream read begins: the downstream writes it causes go out in one write."""
        self.codec.batch_begin()

    def batch_end(self) -> None:
        self.codec.batch_end()

    def abandon(self) -> None:
        """Stop this try: its stream is reset, its connection wait cancelled."""
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        if self.encoder is not None:
            encoder, self.encoder = self.encoder, None
            encoder.reset()


class RouterFilter:
    """The upstream half of one routed stream."""

    __slots__ = ("cm", "rt", "stream", "entry", "cluster", "upstream", "retry_state", "pending", "pending_size",
                 "sent", "sent_size", "wait", "timeout", "deadline", "upstream_paused")

    def __init__(self, cm: ConnectionOwner, rt: ListenerContext, stream: Stream, entry: RouteEntry,
                 cluster: Cluster) -> None:
        self.cm = cm
        self.rt = rt
        self.stream = stream
        self.entry = entry
        self.cluster = cluster
        self.upstream: UpstreamRequest | None = None  # the current try
        self.retry_state = RetryState(entry.retry) if entry.retry is not None else None
        self.pending: list[bytes] | None = None  # body bytes waiting for an upstream stream
        self.pending_size = 0
        # Body bytes already sent upstream, kept for a retry while the route has a retry policy
        # (None: no policy, or the body outgrew RETRY_BUFFER_LIMIT and cannot be retried).
        self.sent: list[bytes] | None = [] if entry.retry is not None else None
        self.sent_size = 0
        self.wait: asyncio.TimerHandle | None = None  # retry back-off or fault delay in progress
        self.timeout = entry.timeout  # the route timeout, bounded by a gRPC caller's deadline
        if stream.grpc:
            deadline = grpc.timeout(stream.headers)
            if deadline is not None and (not self.timeout or deadline < self.timeout):
                self.timeout = deadline
        self.deadline = 0.0  # loop time the route timeout fires at; 0: none
        self.upstream_paused = False  # the downstream response is paused: the upstream read too

    # --- from the connection manager --------------------------------------------------------------

    def start(self) -> None:
        stream = self.stream
        headers = stream.headers
        headers += (_REQUEST_ID, b": ", stream.request_id, b"\r\n")  # telemetry.begin made one if none came
        if stream.trace_id:
            telemetry.inject(stream, headers)
        stream.upstream_headers = headers
        if stream.expect and not stream.complete:
            stream.encoder.encode_100_continue()
        fault = self.entry.fault
        if fault is not None:
            rt = self.rt
            if fault.delay_percent and rt.random() * 100.0 < fault.delay_percent:
                rt.stats.fault_delays_injected += 1
                self.wait = self.cm._loop.call_later(fault.delay, self._after_fault_delay)
                return
            if self._fault_abort(fault):
                return
        self._begin()

    def _after_fault_delay(self) -> None:
        self.wait = None
        if self.stream.done:
            return
        self.cm.batch_begin()
        if not self._fault_abort(self.entry.fault):
            self._begin()
        self.cm.batch_end()

    def _fault_abort(self, fault: FaultConfig) -> bool:
        if fault.abort_percent and self.rt.random() * 100.0 < fault.abort_percent:
            self.rt.stats.fault_aborts_injected += 1
            self.cm.local_reply(self.stream, errors.fault_abort(fault.abort_status))
            return True
        return False

    def _begin(self) -> None:
        """The route timeout starts (if the request is complete), then the first try."""
        if self.stream.complete and self.timeout:
            self._arm_route_timeout()
        self._try()

    def on_request_data(self, data: bytes, end_stream: bool) -> None:
        upstream = self.upstream
        encoder = upstream.encoder if upstream is not None else None
        if encoder is not None:
            encoder.encode_data(data, end_stream)
            sent = self.sent
            if sent is not None and data:  # kept for a retry
                sent.append(data)
                self._retain(len(data))
        elif data:
            hold_body(self, data)
        if end_stream and (self.timeout or self.entry.per_try_timeout):
            self._request_complete()

    def on_request_trailers(self, trailers: list[bytes]) -> None:
        self.on_request_data(b"", True)  # request trailers are not forwarded yet

    def on_downstream_write_paused(self, paused: bool) -> None:
        self.upstream_paused = paused
        upstream = self.upstream
        if upstream is not None and upstream.encoder is not None:
            upstream.encoder.read_disable(paused)

    def release(self) -> None:
        """The stream is over: undo what the current try holds, stop timers."""
        if self.wait is not None:  # a retry back-off or a fault delay
            self.wait.cancel()
            self.wait = None
        stream = self.stream
        upstream = self.upstream
        if upstream is not None or (self.retry_state is not None and self.retry_state.active):
            failed = stream.failed or (stream.started and stream.outcome >= 500)
            if stream.started and not failed and upstream is not None:
                upstream.endpoint.rq_success += 1
            self._release_try(failed)
        if self.pending is not None and self.pending_size > BUFFER_LIMIT and not stream.ended:
            self.stream.encoder.read_disable(R_BUFFER, False)
        self.pending = None
        self.deadline = 0.0

    # --- tries ----------------------------------------------------------------------------------

    def _try(self) -> None:
        """One upstream try: an endpoint, then a stream from its pool."""
        cluster = self.cluster
        stream = self.stream
        if cluster.original_dst:  # to where the app dialled (transparent mode's passthrough clusters)
            dst = stream.original_dst
            endpoint = cluster.original_dst_host(*dst) if dst is not None else None
        else:
            tried = self.retry_state.tried if self.retry_state is not None else None
            endpoint = cluster.pick(tried) if tried else cluster.pick()
        if endpoint is None:
            cluster.stats.upstream_cx_none_healthy += 1
            self._release_try(failed=False)
            self.cm.local_reply(stream, errors.NO_HEALTHY_UPSTREAM)
            return
        upstream = self.upstream = UpstreamRequest(self, endpoint)
        stream.upstream_host = endpoint.key
        endpoint.active_requests += 1
        endpoint.total_requests += 1
        upstream.pending = endpoint.pool.new_stream(upstream)

    def attached(self, upstream: UpstreamRequest) -> None:
        """The pool gave the try its stream: send what there is of the request."""
        stream = self.stream
        parts = None
        sent = self.sent
        if sent:
            parts = list(sent)  # a retry replays what was sent
        pending = self.pending
        if pending is not None:
            parts = parts + pending if parts is not None else pending
            self.pending = None
            if sent is not None:
                sent += pending
                self._retain(self.pending_size)
            if self.pending_size > BUFFER_LIMIT:
                stream.encoder.read_disable(R_BUFFER, False)
            self.pending_size = 0
        authority = stream.authority or upstream.endpoint.authority  # HTTP/1.0 without Host: name the endpoint
        upstream.encoder.encode_headers(stream.method, authority, stream.upstream_path, stream.upstream_headers,
                                        end_stream=stream.complete, chunked=stream.chunked,
                                        is_head=stream.method == b"HEAD", body=parts)
        if getattr(upstream.conn, "write_paused", False):  # a pooled connection still full from before
            stream.encoder.read_disable(R_UPSTREAM, True)
        if stream.complete and self.entry.per_try_timeout and not upstream.deadline and not stream.started:
            # Envoy starts a try's timeout when its connection is ready (onPoolReady).
            self._arm_try_timeout(upstream)
        if self.upstream_paused and upstream.encoder is not None:
            upstream.encoder.read_disable(True)

    def overflow(self) -> None:
        self.rt.stats.downstream_rq_overflow += 1
        self._release_try(failed=False)
        self.cm.local_reply(self.stream, errors.OVERFLOW)

    def _retain(self, size: int) -> None:
        """Account ``size`` more body bytes kept for a retry; past the limit the request cannot be retried."""
        self.sent_size += size
        if self.sent_size > RETRY_BUFFER_LIMIT:
            self.sent = None
            self.cluster.stats.upstream_rq_retry_buffer_overflow += 1

    def _release_try(self, failed: bool) -> None:
        """Undo what the current try holds: counters, stream, pool wait. Idempotent."""
        state = self.retry_state
        if state is not None and state.active:  # counted from the retry's decision, before it has an endpoint
            state.active = False
            self.cluster.retries_active -= 1
        upstream = self.upstream
        if upstream is None:
            return
        self.upstream = None
        endpoint = upstream.endpoint
        endpoint.active_requests -= 1
        stream = self.stream
        if failed or stream.started:  # a try with an outcome: its time counts (LRS, upstream_rq_time)
            elapsed = monotonic() - upstream.t0
            endpoint.rq_latency_total += elapsed
            endpoint.rq_latency_counts[self.cluster.rq_time.observe(elapsed)] += 1
        if failed:
            endpoint.rq_error += 1
        upstream.abandon()

    # --- failures and retries ------------------------------------------------------------------

    def upstream_failed(self, kind: LocalOriginFailure, reply: errors.LocalReply, refused: bool = False) -> None:
        """The current try failed locally (connect failure, reset, per-try timeout): report it to
        outlier detection, then retry if the policy, the budget and the buffered body allow
        (``refused``: an HTTP/2 stream the upstream refused, which ``refused-stream`` retries)."""
        detector = self.cluster.outlier
        upstream = self.upstream
        if detector is not None and upstream is not None:
            detector.report_local(upstream.endpoint, kind)
        conditions = _RETRY_ON_REFUSED if refused else _RETRY_ON_LOCAL[kind]
        if not self.stream.started and self._may_retry(conditions):
            self.retry(reply.flag)
            return
        self.stream.failed = True
        self.cm.local_reply(self.stream, reply)

    def _may_retry(self, conditions: frozenset[str]) -> bool:
        """Whether a failure covered by ``conditions`` is retried: the policy names one of them, the
        body was kept, a retry is left and the budget (or max_retries) has room."""
        state = self.retry_state
        if state is None or self.sent is None or state.policy.retry_on.isdisjoint(conditions):
            return False
        cluster = self.cluster
        if self.stream.retries >= state.policy.num_retries:
            cluster.stats.upstream_rq_retry_limit_exceeded += 1
            return False
        if not breaker.retry_allowed(cluster):
            cluster.stats.upstream_rq_retry_overflow += 1
            return False
        return True

    def retry(self, flag: str = "") -> None:
        """Release the failed try and send the next one after a jittered exponential back-off.
        ``flag``: how the try failed locally (UF, UC, UT); a dropped retriable response left its
        status in ``try_status``."""
        stream = self.stream
        state = self.retry_state
        cluster = self.cluster
        failed = self.upstream.endpoint if self.upstream is not None else None
        try:
            telemetry.attempt_failed(self.rt, stream, flag)
        except Exception as exc:  # a bug: never let accounting break the retry
            errors.log_once("telemetry-bug", "unexpected error recording a failed attempt", exc_info=exc)
        stream.try_status = 0
        self._release_try(failed=True)
        if self.sent is None:
            # The body outgrew the retry buffer while the failed response was being read and dropped.
            stream.failed = True
            self.cm.local_reply(stream, errors.RETRY_BODY_TOO_LONG)
            return
        # The failed try's connection is gone with any write pressure it had: read the body on
        # (held until the next try, bounded by R_BUFFER).
        stream.encoder.read_disable(R_UPSTREAM, False)
        if state.policy.avoid_previous_hosts and failed is not None:
            if state.tried is None:
                state.tried = []
            state.tried.append(failed)
        stream.retries += 1
        state.active = True
        cluster.retries_active += 1
        cluster.stats.upstream_rq_retry += 1
        delay = state.backoff(stream.retries, self.rt.random())
        if delay > 0:
            cluster.stats.upstream_rq_retry_backoff_exponential += 1
            self.wait = self.cm._loop.call_later(delay, self._retry_now)
        else:
            self._try()

    def _retry_now(self) -> None:
        self.wait = None
        if self.stream.done:
            return
        self.cm.batch_begin()
        self._try()
        self.cm.batch_end()

    # --- the response ---------------------------------------------------------------------------

    def response_headers(self, upstream: UpstreamRequest, status: int, headers: list[bytes], end_stream: bool) -> None:
        stream = self.stream
        cluster = self.cluster
        cluster.stats.count_status(status)
        code = grpc.status_of(headers) if stream.grpc else None  # a trailers-only response has it in its head
        outcome = grpc.http_status(code) if code is not None else status
        detector = cluster.outlier
        if detector is not None and (code is not None or not stream.grpc or end_stream):
            # Otherwise a gRPC call's outcome is in its trailers: reported there (_report_grpc).
            upstream.reported = True
            detector.report_status(upstream.endpoint, outcome)
        state = self.retry_state
        if state is not None:
            conditions = state.conditions_for_status(status) if status >= 400 else None
            if code is not None:
                grpc_conditions = grpc.retry_conditions(code) & state.policy.retry_on
                conditions = (conditions | grpc_conditions) if conditions else grpc_conditions
            if conditions and self.sent is not None and self._may_retry(conditions):
                stream.try_status = status  # for the failed attempt's span
                if end_stream:
                    self.retry()
                else:
                    upstream.discarding = True  # read the rest of this response, drop it, then retry
                return
            if stream.retries and (self.sent is None or not conditions):
                # Envoy's retry success: a retried request whose response would not be retried again.
                cluster.stats.upstream_rq_retry_success += 1
        stream.status = status
        if code is not None:
            stream.grpc_status = code
        stream.started = True
        upstream.deadline = 0  # from here only the route timeout bounds the response
        if end_stream:
            self._response_done(upstream)
            stream.encoder.encode_headers(status, headers, True)
            self.cm.end(stream)
            return
        stream.encoder.encode_headers(status, headers, False)

    def response_data(self, data: bytes, end_stream: bool) -> None:
        stream = self.stream
        stream.bytes_out += len(data)
        if end_stream:
            if stream.grpc:  # a gRPC response that ended without trailers
                self._report_grpc(self.upstream)
            self._response_done(self.upstream)
            stream.encoder.encode_data(data, True)
            self.cm.end(stream)
            return
        stream.encoder.encode_data(data, False)

    def response_trailers(self, trailers: list[bytes]) -> None:
        stream = self.stream
        upstream = self.upstream
        if stream.grpc:
            code = grpc.status_of(trailers)
            if code is not None:
                stream.grpc_status = code
            self._report_grpc(upstream)
        self._response_done(upstream)
        stream.encoder.encode_trailers(trailers)
        self.cm.end(stream)

    def _report_grpc(self, upstream: UpstreamRequest) -> None:
        """A gRPC call's outcome to outlier detection, once: its grpc-status mapped to HTTP."""
        detector = self.cluster.outlier
        if detector is not None and not upstream.reported:
            upstream.reported = True
            detector.report_status(upstream.endpoint, self.stream.outcome)

    def _response_done(self, upstream: UpstreamRequest) -> None:
        """The response is about to end downstream: the try is a success or a 5xx failure."""
        stream = self.stream
        stream.ended = True
        stream.answered = True
        upstream.encoder = None  # the connection is the pool's again
        failed = stream.outcome >= 500
        if not failed:
            upstream.endpoint.rq_success += 1
        self._release_try(failed)

    def upstream_reset(self, upstream: UpstreamRequest, flag: str, refused: bool = False) -> None:
        stream = self.stream
        self.cluster.stats.upstream_rq_rx_reset += 1
        if upstream.discarding:
            self.retry()
            return
        if stream.started:
            stream.failed = True
            stream.flags = flag
            self.cm.reset_stream(stream)
            return
        conn = upstream.conn
        if (flag == RESET_TERMINATION and conn is not None and getattr(conn, "requests", 0) > 0
                and not upstream.stale_replay and not stream.has_body and stream.complete
                and stream.method in _IDEMPOTENT_METHODS):
            # The pooled connection was closed by the upstream as we reused it: replay once on a
            # fresh connection to the same endpoint (not a retry: nothing reached the app).
            self.cluster.stats.upstream_rq_retry_stale += 1
            replay = UpstreamRequest(self, upstream.endpoint)
            replay.stale_replay = True
            replay.t0 = upstream.t0
            self.upstream = replay
            replay.pending = upstream.endpoint.pool.new_stream(replay)
            return
        endpoint = upstream.endpoint
        errors.log_once(f"{flag}:{endpoint.key}", "upstream %s reset the request (%s)", endpoint.key, flag)
        self.upstream_failed(LocalOriginFailure.RESET, errors.UPSTREAM_RESETS[flag], refused)

    # --- route and per-try timeouts --------------------------------------------------------------

    def _request_complete(self) -> None:
        """The downstream request has been read whole: the route and per-try timeouts start."""
        if self.wait is not None and self.upstream is None and self.stream.retries == 0:
            return  # in a fault delay: _begin arms them
        entry = self.entry
        if self.timeout and not self.deadline:
            self._arm_route_timeout()
        upstream = self.upstream
        if (entry.per_try_timeout and upstream is not None and upstream.encoder is not None
                and not upstream.deadline and not self.stream.started):
            self._arm_try_timeout(upstream)

    def _arm_route_timeout(self) -> None:
        self.deadline = deadline = self.cm._loop.time() + self.timeout
        self.cm.arm_at(deadline)

    def _arm_try_timeout(self, upstream: UpstreamRequest) -> None:
        upstream.deadline = deadline = self.cm._loop.time() + self.entry.per_try_timeout
        self.cm.arm_at(deadline)

    def on_timer(self, now: float) -> float:
        upstream = self.upstream
        if upstream is not None and upstream.deadline and now >= upstream.deadline:
            upstream.deadline = 0
            self._on_per_try_timeout(upstream)
        elif self.deadline and now >= self.deadline:
            self._on_route_timeout()
            return 0.0
        if self.stream.done:
            return 0.0
        due = self.deadline
        upstream = self.upstream
        try_due = upstream.deadline if upstream is not None else 0.0
        return min(due, try_due) if due and try_due else due or try_due

    def _on_per_try_timeout(self, upstream: UpstreamRequest) -> None:
        self.cluster.stats.upstream_rq_per_try_timeout += 1
        if upstream.discarding:  # the retry was decided already; stop reading the failed response
            self.retry()
            return
        if self.stream.started:
            return  # Envoy ignores a per-try timeout once the response has started
        self.upstream_failed(LocalOriginFailure.TIMEOUT, errors.UPSTREAM_TIMEOUT)

    def _on_route_timeout(self) -> None:
        stream = self.stream
        self.cluster.stats.upstream_rq_timeout += 1
        stream.failed = True
        upstream = self.upstream
        detector = self.cluster.outlier
        if detector is not None and upstream is not None and upstream.encoder is not None and not upstream.discarding:
            # Only a try that reached its host charges it (Envoy: the host is set at pool-ready);
            # one still waiting for a connection says nothing about the host.
            detector.report_local(upstream.endpoint, LocalOriginFailure.TIMEOUT)
        if not stream.started:
            self.cm.local_reply(stream, errors.UPSTREAM_TIMEOUT)
            return
        reply = errors.UPSTREAM_TIMEOUT
        stream.flags = reply.flag
        if stream.grpc and stream.version == 20:
            # The call ends with the status its deadline gives (trailers can still follow the head).
            stream.grpc_status = grpc.DEADLINE_EXCEEDED
            stream.ended = stream.answered = True
            stream.encoder.encode_trailers(grpc.trailers(grpc.DEADLINE_EXCEEDED, reply.message, reply.flag))
            self.cm.end(stream)
        else:
            self.cm.reset_stream(stream)


def absolute_form(url: bytes) -> tuple[bytes | None, bytes]:
    """``http://authority/path?q`` -> (authority, origin-form path); (None, b"") if unsupported."""
    if url[:7].lower() != b"http://":
        return None, b""
    rest = url[7:]
    end = len(rest)
    for sep in (b"/", b"?", b"#"):
        i = rest.find(sep)
        if 0 <= i < end:
            end = i
    authority = rest[:end]
    at = authority.rfind(b"@")
    if at >= 0:
        authority = authority[at + 1 :]
    path = rest[end:].split(b"#", 1)[0]
    if not path.startswith(b"/"):
        path = b"/" + path
    if not authority:
        return None, b""
    return authority, path
