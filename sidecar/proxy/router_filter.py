"""The router filter: sends a routed request to an upstream endpoint and its response back.

In Envoy's terms this is ``envoy.filters.http.router`` as the connection manager runs it: resolve
the route, pick the cluster (weighted split) and an endpoint (the cluster's load balancer), take a
pooled connection or open one, write the request head in one piece, then relay what the upstream
reports (:class:`~sidecar.upstream.pool.UpstreamHandler`) as the downstream response. It also owns
the route timeout. It is a mixin of :class:`~sidecar.proxy.http.HttpConnectionManager`, whose
state it uses; the split only keeps each file readable.
"""

from __future__ import annotations

import asyncio
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING

from sidecar.codec import headers as codec
from sidecar.proxy import errors, passthrough, telemetry
from sidecar.proxy.exchange import Exchange
from sidecar.upstream import breaker
from sidecar.upstream.host import LocalOriginFailure
from sidecar.upstream.pool import BODY_CHUNKED, BODY_EOF, ConnectFailure, UpstreamConnection

if TYPE_CHECKING:
    from sidecar.config import FaultConfig, RetryPolicyConfig
    from sidecar.proxy.listener import ListenerRuntime
    from sidecar.upstream.host import Endpoint

BUFFER_LIMIT = 64 * 1024  # request bytes held per connection while no upstream can take them
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
_GATEWAY_ERRORS = frozenset({502, 503, 504})
_RETRY_ON_5XX = frozenset({"5xx"})
_RETRY_ON_GATEWAY = frozenset({"5xx", "gateway-error"})
_RETRY_ON_409 = frozenset({"retriable-4xx"})
_RETRY_ON_CODES = frozenset({"retriable-status-codes"})

# Reasons to stop reading from the downstream socket (a bit mask: reading resumes when all clear).
R_BUFFER = 1  # request bytes held without an upstream to take them passed BUFFER_LIMIT
R_UPSTREAM = 2  # the upstream connection's write buffer passed its high-water mark
R_PIPELINE = 4  # too many pipelined requests wait to be answered


class RouterFilter:
    """Mixin: the upstream half of a downstream connection's request handling."""

    __slots__ = ()

    # State owned by HttpConnectionManager.
    _rt: ListenerRuntime
    _loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport | None
    _active: Exchange | None
    _queue: deque[Exchange]
    _batch: list[bytes]
    _batching: int
    _closing: bool
    _read_paused: int
    _write_paused: bool
    _buffered: int
    _timer: asyncio.TimerHandle | None
    _timer_at: float

    if TYPE_CHECKING:  # provided by HttpConnectionManager
        def _local_reply(self, ex: Exchange, reply: errors.LocalReply) -> None: ...
        def _finish(self, ex: Exchange) -> None: ...
        def _abort(self) -> None: ...
        def _write(self, data: bytes) -> None: ...
        def _pause(self, reason: int) -> None: ...
        def _resume(self, reason: int) -> None: ...

    def _dispatch(self, ex: Exchange) -> None:
        """Route the active exchange and send it upstream, or answer it locally."""
        rt = self._rt
        telemetry.begin(rt, ex)
        limiter = rt.rate_limit
        if limiter is not None:
            if not limiter.try_take():
                rt.stats.ratelimit_rate_limited += 1
                self._local_reply(ex, errors.RATE_LIMITED)
                return
            rt.stats.ratelimit_ok += 1
        url = ex.url
        if url[:1] == b"/":
            path = url
            authority = ex.host
        else:
            authority, path = _absolute_form(url)
            if authority is None:
                ex.keep_alive = False
                if ex.method != b"CONNECT":
                    self._local_reply(ex, errors.BAD_REQUEST)
                elif rt.default_cluster is None:
                    self._local_reply(ex, errors.NO_ROUTE)
                else:  # the outbound policy: a tunnel, or refused
                    reply = passthrough.connect(self, rt, ex)
                    if reply is not None:
                        self._local_reply(ex, reply)
                return
            ex.host = authority
        router = rt.router
        # The head is as parsed (no hop-by-hop stripping yet); only routes with header matches read it.
        entry = router.resolve(authority, path, ex.headers, ex.method) if router is not None else None
        if entry is None:
            if rt.default_cluster is None or url[:1] == b"/":
                rt.stats.no_route += 1
                self._local_reply(ex, errors.NO_ROUTE)
                return
            # A proxy request (absolute-form) for a host outside the mesh: the outbound policy.
            entry = passthrough.outside_mesh(rt, ex, authority)
            if entry.__class__ is errors.LocalReply:
                self._local_reply(ex, entry)
                return
        cluster = rt.clusters.get(entry.cluster())
        if cluster is None:
            rt.stats.no_cluster += 1
            self._local_reply(ex, errors.NO_CLUSTER)
            return
        ex.entry = entry
        ex.cluster = cluster

        head = ex.headers
        if ex.conn_tokens:
            head = ex.headers = codec.strip_connection_named(head, ex.conn_tokens)
        head[0] = ex.method
        head[2] = path
        head[4] = ex.host
        if ex.chunked:
            head.append(codec.CHUNKED_HEADER)
        telemetry.inject(ex, head)
        head.append(codec.CRLF)
        if entry.retry is not None:
            ex.sent = []

        if ex.expect and not ex.complete:
            ex.expect = False
            self._write(errors.CONTINUE_100)
        fault = entry.fault
        if fault is not None:
            if fault.delay_percent and rt.random() * 100.0 < fault.delay_percent:
                rt.stats.fault_delays_injected += 1
                ex.wait = self._loop.call_later(fault.delay, self._after_fault_delay, ex)
                return
            if self._fault_abort(ex, fault):
                return
        self._start(ex)

    def _after_fault_delay(self, ex: Exchange) -> None:
        ex.wait = None
        if ex.done or ex is not self._active:
            return
        self.batch_begin()
        if not self._fault_abort(ex, ex.entry.fault):
            self._start(ex)
        self.batch_end()

    def _fault_abort(self, ex: Exchange, fault: FaultConfig) -> bool:
        if fault.abort_percent and self._rt.random() * 100.0 < fault.abort_percent:
            self._rt.stats.fault_aborts_injected += 1
            self._local_reply(ex, errors.fault_abort(fault.abort_status))
            return True
        return False

    def _start(self, ex: Exchange) -> None:
        """The router proper: the route timeout starts, then the first try."""
        if ex.complete and ex.entry.timeout:
            self._arm_timeout(ex, ex.entry.timeout)
        self._try(ex)

    def _try(self, ex: Exchange) -> None:
        """One upstream try: an endpoint, then a pooled connection, or a new one as a pending request.

        Circuit breakers as Envoy's connection pool applies them: ``max_pending_requests`` when
        the try must wait for a connection, ``max_requests`` when it gets one (``_attach``); a
        cluster already at ``max_requests`` refuses here, before any connection is opened.
        """
        cluster = ex.cluster
        if cluster.stats.upstream_rq_active >= cluster.breakers.max_requests:
            self._overflow(ex)  # full already: refused at once, without opening a connection first
            return
        if cluster.original_dst:  # to where the app dialled (transparent mode's passthrough clusters)
            endpoint = cluster.original_dst_host(*ex.original_dst) if ex.original_dst is not None else None
        else:
            endpoint = cluster.pick(ex.tried) if ex.tried else cluster.pick()
        if endpoint is None:
            cluster.stats.upstream_cx_none_healthy += 1
            self._release_try(ex, failed=False)
            self._local_reply(ex, errors.NO_HEALTHY_UPSTREAM)
            return
        conn = endpoint.pool.acquire()
        if conn is None and not breaker.pending_allowed(cluster):
            self._overflow(ex)
            return
        ex.endpoint = endpoint
        ex.upstream_host = endpoint.key
        ex.try_t0 = monotonic()
        endpoint.active_requests += 1
        endpoint.total_requests += 1
        if not ex.host:
            ex.headers[4] = endpoint.authority  # HTTP/1.0 without Host: name the endpoint
        if conn is not None:
            self._attach(ex, conn)
            return
        ex.pending_cx = True
        stats = cluster.stats
        stats.upstream_rq_pending_total += 1
        stats.upstream_rq_pending_active += 1
        self._connect_or_wait(ex, endpoint)

    def _connect_or_wait(self, ex: Exchange, endpoint: Endpoint, first: bool = False) -> None:
        """Open a connection if ``max_connections`` allows, else queue for one of ``endpoint``'s."""
        if breaker.connection_allowed(ex.cluster, endpoint):
            self._open(ex, endpoint)
            return
        if not first:
            ex.cluster.stats.upstream_cx_overflow += 1
        ex.waiter = waiter = lambda conn: self._on_pool_ready(ex, endpoint, conn)
        endpoint.pool.wait(waiter, first)

    def _open(self, ex: Exchange, endpoint: Endpoint) -> None:
        """Open a new connection to ``endpoint`` for ``ex``; counted as opening until the task ends
        (however it ends: a task cancelled before it ran never reaches its own ``finally``)."""
        pool = endpoint.pool
        pool.opening_started()
        ex.connecting = task = self._loop.create_task(self._connect(ex, endpoint))
        task.add_done_callback(pool.opening_done)

    def _overflow(self, ex: Exchange) -> None:
        ex.cluster.stats.upstream_rq_pending_overflow += 1
        self._rt.stats.downstream_rq_overflow += 1
        self._release_try(ex, failed=False)
        self._local_reply(ex, errors.OVERFLOW)

    def _on_pool_ready(self, ex: Exchange, endpoint: Endpoint, conn: UpstreamConnection | None) -> None:
        """A connection of ``endpoint`` came free (or closed, ``None``) while ``ex`` waited for one."""
        ex.waiter = None
        if ex.done or ex.endpoint is not endpoint or self.transport is None:
            if conn is not None:
                endpoint.pool.release(conn)
            return
        if conn is not None and not conn.closed:
            self.batch_begin()
            self._attach(ex, conn)
            self.batch_end()
        else:
            self._connect_or_wait(ex, endpoint, first=True)

    def _attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        if not ex.attached:
            cluster = ex.cluster
            stats = cluster.stats
            if ex.pending_cx:
                ex.pending_cx = False
                stats.upstream_rq_pending_active -= 1
            if stats.upstream_rq_active >= cluster.breakers.max_requests:
                ex.endpoint.pool.release(conn)  # unused: it stays pooled
                self._overflow(ex)
                return
            ex.attached = True
            stats.upstream_rq_total += 1
            stats.upstream_rq_active += 1
        ex.conn = conn
        sent = ex.sent
        pending = ex.pending
        if pending is None and not sent:
            data = b"".join(ex.headers)
        else:
            parts = ex.headers + sent if sent else ex.headers  # a retry replays what was sent
            if pending is not None:
                parts = parts + pending
                ex.pending = None
                self._buffered -= ex.pending_size
                if sent is not None:
                    sent += pending
                    self._retain(ex, ex.pending_size)
                ex.pending_size = 0
            data = b"".join(parts)
        conn.send_request(self, data, ex.method == b"HEAD", ex.complete)
        if conn.write_paused:  # a pooled connection still full from before (the previous try's is gone)
            self._pause(R_UPSTREAM)
        if ex.complete and ex.entry.per_try_timeout and not ex.try_deadline and not ex.started:
            # Envoy starts a try's timeout when its connection is ready (onPoolReady).
            self._arm_try_timeout(ex)
        if self._write_paused:
            conn.pause_reading()
        if self._read_paused & R_BUFFER and self._buffered <= BUFFER_LIMIT:
            self._resume(R_BUFFER)

    def _retain(self, ex: Exchange, size: int) -> None:
        """Account ``size`` more body bytes kept for a retry; past the limit the request cannot be retried."""
        ex.sent_size += size
        if ex.sent_size > RETRY_BUFFER_LIMIT:
            ex.sent = None
            ex.cluster.stats.upstream_rq_retry_buffer_overflow += 1

    async def _connect(self, ex: Exchange, endpoint: Endpoint) -> None:
        try:
            conn = await endpoint.pool.connect()
        except ConnectFailure as exc:
            ex.connecting = None
            if not ex.done and self.transport is not None and ex.endpoint is endpoint:
                # Per endpoint, but per cluster for ORIGINAL_DST ones: their hosts are whatever apps dial.
                cause = ex.cluster.name if ex.cluster.original_dst else endpoint.key
                errors.log_once(f"uf:{cause}", "upstream connect failure: %s", exc)
                self.batch_begin()
                self._upstream_failed(ex, LocalOriginFailure.CONNECT_FAILURE, errors.CONNECT_FAILURE)
                self.batch_end()
            return
        except Exception as exc:  # a bug: answer rather than leave the request hanging
            ex.connecting = None
            errors.log_once("connect-bug", "unexpected error connecting upstream", exc_info=exc)
            if not ex.done and self.transport is not None:
                ex.failed = True
                self._local_reply(ex, errors.CONNECT_FAILURE)
            return
        ex.connecting = None
        if ex.done or self.transport is None or ex is not self._active or ex.endpoint is not endpoint:
            endpoint.pool.release(conn)  # fresh and unused: keep it for the next request
            return
        self.batch_begin()
        self._attach(ex, conn)
        self.batch_end()

    # --- retries -----------------------------------------------------------------------------

    def _upstream_failed(self, ex: Exchange, kind: LocalOriginFailure, reply: errors.LocalReply) -> None:
        """The current try failed locally (connect failure, reset, per-try timeout): report it to
        outlier detection, then retry if the policy, the budget and the buffered body allow."""
        detector = ex.cluster.outlier
        if detector is not None and ex.endpoint is not None:
            detector.report_local(ex.endpoint, kind)
        if not ex.started and self._may_retry(ex, _RETRY_ON_LOCAL[kind]):
            self._retry(ex, reply.flag)
            return
        ex.failed = True
        self._local_reply(ex, reply)

    def _may_retry(self, ex: Exchange, conditions: frozenset[str]) -> bool:
        """Whether a failure covered by ``conditions`` is retried: the policy names one of them, the
        body was kept, a retry is left and the budget (or max_retries) has room."""
        policy = ex.entry.retry
        if policy is None or ex.sent is None or policy.retry_on.isdisjoint(conditions):
            return False
        cluster = ex.cluster
        if ex.retries >= policy.num_retries:
            cluster.stats.upstream_rq_retry_limit_exceeded += 1
            return False
        if not breaker.retry_allowed(cluster):
            cluster.stats.upstream_rq_retry_overflow += 1
            return False
        return True

    def _may_retry_status(self, ex: Exchange, status: int) -> bool:
        conditions = _status_conditions(ex.entry.retry, status)
        return bool(conditions) and self._may_retry(ex, conditions)

    def _retry(self, ex: Exchange, flag: str = "") -> None:
        """Release the failed try and send the next one after a jittered exponential back-off.
        ``flag``: how the try failed locally (UF, UC, UT); a dropped retriable response left its
        status in ``try_status``."""
        policy = ex.entry.retry
        cluster = ex.cluster
        failed = ex.endpoint
        try:
            telemetry.attempt_failed(self._rt, ex, flag)
        except Exception as exc:  # a bug: never let accounting break the retry
            errors.log_once("telemetry-bug", "unexpected error recording a failed attempt", exc_info=exc)
        ex.try_status = 0
        self._release_try(ex, failed=True)
        if ex.sent is None:
            # The body outgrew the retry buffer while the failed response was being read and dropped.
            ex.failed = True
            self._local_reply(ex, errors.RETRY_BODY_TOO_LONG)
            return
        # The failed try's connection is gone with any write pressure it had: read the body on
        # (into ``pending`` until the next try, bounded by R_BUFFER).
        self._resume(R_UPSTREAM)
        if policy.avoid_previous_hosts and failed is not None:
            if ex.tried is None:
                ex.tried = []
            ex.tried.append(failed)
        ex.retries += 1
        ex.retry_active = True
        cluster.retries_active += 1
        cluster.stats.upstream_rq_retry += 1
        # Envoy's back-off: uniform in [0, (2^n - 1) * base), capped at max_interval.
        ceiling = min(policy.base_interval * ((1 << ex.retries) - 1), policy.max_interval)
        delay = self._rt.random() * ceiling
        if delay > 0:
            cluster.stats.upstream_rq_retry_backoff_exponential += 1
            ex.wait = self._loop.call_later(delay, self._retry_now, ex)
        else:
            self._try(ex)

    def _retry_now(self, ex: Exchange) -> None:
        ex.wait = None
        if ex.done or ex is not self._active or self.transport is None:
            return
        self.batch_begin()
        self._try(ex)
        self.batch_end()

    def _release_try(self, ex: Exchange, failed: bool) -> None:
        """Undo what the current try holds: counters, connection, timers, pool wait. Idempotent."""
        if ex.retry_active:  # counted from the retry's decision, before it has an endpoint
            ex.retry_active = False
            ex.cluster.retries_active -= 1
        endpoint = ex.endpoint
        if endpoint is None:
            return
        ex.endpoint = None
        cluster = ex.cluster
        stats = cluster.stats
        if ex.attached:
            ex.attached = False
            stats.upstream_rq_active -= 1
        endpoint.active_requests -= 1
        if failed or ex.started:  # a try with an outcome: its time counts (LRS, upstream_rq_time)
            elapsed = monotonic() - ex.try_t0
            endpoint.rq_latency_total += elapsed
            endpoint.rq_latency_counts[cluster.rq_time.observe(elapsed)] += 1
        if failed:
            endpoint.rq_error += 1
        if ex.pending_cx:
            ex.pending_cx = False
            stats.upstream_rq_pending_active -= 1
        ex.try_deadline = 0.0
        if ex.waiter is not None:
            endpoint.pool.cancel_wait(ex.waiter)
            ex.waiter = None
        if ex.connecting is not None:
            ex.connecting.cancel()
            ex.connecting = None
        if ex.conn is not None:
            ex.conn.abort()
            ex.conn = None
        ex.discarding = False

    def _on_per_try_timeout(self, ex: Exchange) -> None:
        if ex.done or ex.endpoint is None:
            return
        ex.cluster.stats.upstream_rq_per_try_timeout += 1
        if ex.discarding:  # the retry was decided already; stop reading the failed response
            self.batch_begin()
            self._retry(ex)
            self.batch_end()
            return
        if ex.started:
            return  # Envoy ignores a per-try timeout once the response has started
        if ex.conn is not None:
            ex.conn.abort()
            ex.conn = None
        self.batch_begin()
        self._upstream_failed(ex, LocalOriginFailure.TIMEOUT, errors.UPSTREAM_TIMEOUT)
        self.batch_end()

    def _request_complete(self, ex: Exchange) -> None:
        """The downstream request has been read whole: the route and per-try timeouts start."""
        entry = ex.entry
        if entry is None or ex.wait is not None and ex.endpoint is None and ex.retries == 0:
            return  # not routed yet, or in a fault delay: _start arms them
        if entry.timeout:
            self._arm_timeout(ex, entry.timeout)
        if entry.per_try_timeout and ex.conn is not None and not ex.try_deadline and not ex.started:
            self._arm_try_timeout(ex)

    # --- UpstreamHandler: what the upstream connection reports ---------------------------------

    def on_upstream_headers(self, conn: UpstreamConnection, status: int, head: list[bytes], body_kind: int) -> None:
        ex = self._active
        if ex is None or ex.conn is not conn:
            conn.abort()
            return
        cluster = ex.cluster
        cluster.stats.count_status(status)
        detector = cluster.outlier
        if detector is not None:
            detector.report_status(ex.endpoint, status)
        if ex.sent is not None and status >= 400 and self._may_retry_status(ex, status):
            ex.try_status = status  # for the failed attempt's span
            ex.discarding = True  # read the rest of this response, drop it, then retry
            return
        if ex.retries and (ex.sent is None or not _status_conditions(ex.entry.retry, status)):
            # Envoy's retry success: a retried request whose response would not be retried again.
            cluster.stats.upstream_rq_retry_success += 1
        ex.status = status
        ex.started = True
        ex.try_deadline = 0.0  # from here only the route timeout bounds the response
        head[0] = codec.STATUS_LINES[status] if status < 1000 else codec.STATUS_LINES[500]
        if body_kind in (BODY_CHUNKED, BODY_EOF):
            if ex.http10:
                ex.keep_alive = False  # HTTP/1.0 has no chunked: the body ends when we close
            else:
                ex.resp_chunked = True
                head.append(codec.CHUNKED_HEADER)
        if self._rt.draining:
            ex.keep_alive = False
        if not ex.keep_alive:
            self._closing = True
            head.append(codec.CONNECTION_CLOSE)
        elif ex.http10:
            head.append(codec.CONNECTION_KEEP_ALIVE)
        head.append(codec.CRLF)
        if self._batching:
            self._batch += head
        elif self.transport is not None:
            self.transport.writelines(head)

    def on_upstream_body(self, data: bytes) -> None:
        ex = self._active
        if ex is None or ex.discarding:
            return
        ex.bytes_out += len(data)
        if ex.resp_chunked:
            if self._batching:
                self._batch += codec.chunk(data)
            elif self.transport is not None:
                self.transport.writelines(codec.chunk(data))
        else:
            self._write(data)

    def on_upstream_complete(self, conn: UpstreamConnection) -> None:
        ex = self._active
        if ex is None or ex.conn is not conn:
            return
        ex.conn = None  # the pool has it back already
        if ex.discarding:
            self._retry(ex)
            return
        if ex.resp_chunked:
            self._write(codec.LAST_CHUNK)
        self._finish(ex)

    def on_upstream_reset(self, conn: UpstreamConnection, flag: str) -> None:
        ex = self._active
        if ex is None or ex.conn is not conn:
            return
        ex.conn = None
        stats = ex.cluster.stats
        stats.upstream_rq_rx_reset += 1
        if ex.discarding:
            self._retry(ex)
            return
        if ex.started:
            ex.failed = True
            ex.flags = flag
            self._abort()
            return
        if (flag == "UC" and conn.requests > 0 and not ex.retried and not ex.has_body and ex.complete
                and ex.method in codec.IDEMPOTENT_METHODS):
            # The pooled connection was closed by the upstream as we reused it: replay once on a
            # fresh connection to the same endpoint (not a retry: nothing reached the app).
            ex.retried = True
            stats.upstream_rq_retry_stale += 1
            self._connect_or_wait(ex, ex.endpoint)
            return
        errors.log_once(f"{flag}:{ex.endpoint.key}", "upstream %s reset the request (%s)", ex.endpoint.key, flag)
        self._upstream_failed(ex, LocalOriginFailure.RESET, errors.UPSTREAM_RESETS[flag])

    def on_upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self._pause(R_UPSTREAM)
        else:
            self._resume(R_UPSTREAM)

    # --- route and per-try timeouts --------------------------------------------------------------

    def _arm_timeout(self, ex: Exchange, timeout: float) -> None:
        """Start the route timeout of the active exchange.

        A timer per request would cost a heap insert and a cancel each time; instead the
        connection keeps one timer for both timeouts of its active exchange (``deadline`` and
        ``try_deadline``, 0 when not running, so cancelling is a store) and, when it fires early,
        re-arms it for what is still due.
        """
        ex.deadline = deadline = self._loop.time() + timeout
        self._arm_at(deadline)

    def _arm_try_timeout(self, ex: Exchange) -> None:
        ex.try_deadline = deadline = self._loop.time() + ex.entry.per_try_timeout
        self._arm_at(deadline)

    def _arm_at(self, when: float) -> None:
        timer = self._timer
        if timer is None or self._timer_at > when:
            if timer is not None:
                timer.cancel()
            self._timer_at = when
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        ex = self._active
        if ex is None or ex.done:
            return
        now = self._loop.time()
        if ex.try_deadline and now >= ex.try_deadline:
            ex.try_deadline = 0.0
            self._on_per_try_timeout(ex)
        elif ex.deadline and now >= ex.deadline:
            self._on_route_timeout(ex)
            return
        ex = self._active  # the per-try timeout may have ended it (and started the next one)
        if ex is None or ex.done:
            return
        due, try_due = ex.deadline, ex.try_deadline
        when = min(due, try_due) if due and try_due else due or try_due
        if when:
            self._arm_at(when)

    def _on_route_timeout(self, ex: Exchange) -> None:
        ex.cluster.stats.upstream_rq_timeout += 1
        ex.failed = True
        detector = ex.cluster.outlier
        if detector is not None and ex.conn is not None and not ex.discarding:
            # Only a try that reached its host charges it (Envoy: the host is set at pool-ready);
            # one still waiting for a connection says nothing about the host.
            detector.report_local(ex.endpoint, LocalOriginFailure.TIMEOUT)
        if ex.conn is not None:
            ex.conn.abort()
            ex.conn = None
        if ex.started:
            ex.flags = errors.UPSTREAM_TIMEOUT.flag
            self._abort()
        else:
            self._local_reply(ex, errors.UPSTREAM_TIMEOUT)


def _status_conditions(policy: RetryPolicyConfig, status: int) -> frozenset[str]:
    """The retry_on conditions of ``policy`` that a response with ``status`` meets (empty: none)."""
    if status >= 500:
        conditions = _RETRY_ON_GATEWAY if status in _GATEWAY_ERRORS else _RETRY_ON_5XX
    elif status == 409:
        conditions = _RETRY_ON_409
    else:
        conditions = frozenset()
    if status in policy.retriable_status_codes:
        conditions = conditions | _RETRY_ON_CODES
    return conditions & policy.retry_on


def _absolute_form(url: bytes) -> tuple[bytes | None, bytes]:
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
