"""Plain-integer counters of clusters and endpoints, declared in one list each.

The data path only does ``stats.name += 1``; nothing here logs or talks to Prometheus. The admin
and metrics layers read :meth:`Counters.snapshot` later. Names follow Envoy's cluster statistics
(``upstream_cx_*`` for connections, ``upstream_rq_*`` for requests).
"""

from __future__ import annotations

from bisect import bisect_left

# Request durations in seconds (Envoy's histogram buckets, in seconds rather than milliseconds).
DURATION_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                       1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

CLUSTER_STATS: tuple[str, ...] = (
    "upstream_cx_total",  # connections opened
    "upstream_cx_active",  # connections open now (idle or busy)
    "upstream_cx_opening",  # connections being opened now (count against max_connections)
    "upstream_cx_connect_fail",  # connect errors, timeouts included
    "upstream_cx_connect_timeout",
    "upstream_cx_destroy_remote_with_active_rq",  # upstream closed while a request was in flight
    "upstream_cx_protocol_error",  # unparseable response or response headers over the limit
    "upstream_cx_none_healthy",  # a request found no serving endpoint (503 UH)
    "upstream_rq_total",
    "upstream_rq_active",
    "upstream_rq_1xx",
    "upstream_rq_2xx",
    "upstream_rq_3xx",
    "upstream_rq_4xx",
    "upstream_rq_5xx",
    "upstream_rq_timeout",  # route timeout fired (504 UT)
    "upstream_rq_rx_reset",  # upstream reset before or during the response (502 UC)
    "upstream_rq_retry_stale",  # request replayed once because a reused connection was dead
    # retries (route retry_policy)
    "upstream_rq_retry",  # retries sent
    "upstream_rq_retry_success",  # requests that succeeded on a retry
    "upstream_rq_retry_overflow",  # retries not sent: max_retries or the retry budget was full
    "upstream_rq_retry_limit_exceeded",  # retriable failures with no retry left (num_retries)
    "upstream_rq_retry_backoff_exponential",  # retries that waited a back-off
    "upstream_rq_per_try_timeout",  # tries cut by per_try_timeout
    "upstream_rq_retry_buffer_overflow",  # request bodies too long to keep for a retry
    # circuit breakers (answered 503 UO, never queued beyond the limit)
    "upstream_rq_pending_total",  # requests that had to wait for a connection
    "upstream_rq_pending_active",
    "upstream_rq_pending_overflow",  # max_pending_requests (or max_requests) was full: 503 UO
    "upstream_cx_overflow",  # max_connections was reached (the request waited as pending)
    "upstream_cx_idle_timeout",  # pooled connections closed after idle_timeout (TCP: the tcp_proxy idle_timeout)
    # bytes and connect attempts (counted by the L4 proxy, sidecar.l4)
    "upstream_cx_rx_bytes_total",  # bytes received from upstream connections
    "upstream_cx_tx_bytes_total",  # bytes sent to upstream connections
    "upstream_cx_connect_attempts_exceeded",  # connections given up after max_connect_attempts failures
    # mTLS to the endpoints (sidecar.tls.upstream; Envoy's ssl.* names, dots as underscores)
    "ssl_handshake",  # handshakes done, the server's URI SAN the expected one
    "ssl_connection_error",  # other handshake failures
    "ssl_fail_verify_error",  # the server's chain does not verify against the trust bundle
    "ssl_fail_verify_san",  # the server's URI SAN is not the expected one
    # load balancing and outlier detection (sidecar.upstream.outlier)
    "lb_healthy_panic",  # picks made in panic mode (too few healthy hosts: all hosts used)
    "outlier_detection_ejections_active",
    "outlier_detection_ejections_enforced_total",
    "outlier_detection_ejections_overflow",  # ejections skipped because of max_ejection_percent
    "outlier_detection_ejections_enforced_consecutive_5xx",
    "outlier_detection_ejections_enforced_consecutive_gateway_failure",
    "outlier_detection_ejections_enforced_consecutive_local_origin_failure",
    "outlier_detection_ejections_enforced_success_rate",
    "outlier_detection_ejections_enforced_failure_percentage",
)


class Counters:
    """Base class: subclasses set ``FIELDS``; every field starts at 0."""

    __slots__ = ()
    FIELDS: tuple[str, ...] = ()

    def __init__(self) -> None:
        for name in self.FIELDS:
            setattr(self, name, 0)

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.FIELDS}


class ClusterStats(Counters):
    __slots__ = CLUSTER_STATS
    FIELDS = CLUSTER_STATS

    def count_status(self, status: int) -> None:
        if status < 300:
            if status < 200:
                self.upstream_rq_1xx += 1
            else:
                self.upstream_rq_2xx += 1
        elif status < 400:
            self.upstream_rq_3xx += 1
        elif status < 500:
            self.upstream_rq_4xx += 1
        else:
            self.upstream_rq_5xx += 1


class Histogram:
    """A Prometheus-style histogram the data path can afford: one bisect and two adds per value.

    ``counts[i]`` counts values in (bounds[i-1], bounds[i]]; the last slot is +Inf. The metrics
    layer turns them into cumulative buckets at scrape time.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> int:
        """Count ``value``; returns its slot in ``counts`` (callers keep per-endpoint counts with it)."""
        i = bisect_left(self.bounds, value)
        self.counts[i] += 1
        self.sum += value
        return i

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (upper bound, count) pairs ending with +Inf, as prometheus-client takes them."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)
