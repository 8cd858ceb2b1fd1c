"""Circuit-breaker and retry-budget checks (sidecar.upstream.breaker) against hand-set counters.

Envoy's ResourceManagerImpl is the reference: a limit refuses the request that would go past it,
and the retry budget is ``max<uint64_t>(percent / 100 * (active + pending), min_retry_concurrency)``.
"""

from __future__ import annotations

import pytest

from sidecar.config import CircuitBreakerConfig, ClusterConfig, EndpointConfig
from sidecar.upstream import breaker
from sidecar.upstream.cluster import Cluster


def cluster(**thresholds: float) -> Cluster:
    c = Cluster(ClusterConfig("c", discovery="STATIC", circuit_breakers=CircuitBreakerConfig(**thresholds),
                              static_endpoints=(EndpointConfig("10.0.0.1", 80), EndpointConfig("10.0.0.2", 80))))
    return c


def test_max_requests_refuses_the_request_past_the_limit() -> None:
    c = cluster(max_requests=2)
    c.stats.upstream_rq_active = 1
    assert breaker.request_allowed(c)
    c.stats.upstream_rq_active = 2
    assert not breaker.request_allowed(c)


def test_max_pending_requests_refuses_the_request_past_the_limit() -> None:
    c = cluster(max_pending_requests=1)
    assert breaker.pending_allowed(c)
    c.stats.upstream_rq_pending_active = 1
    assert not breaker.pending_allowed(c)


def test_max_connections_lets_an_endpoint_without_connections_open_one() -> None:
    c = cluster(max_connections=1)
    a, b = c.endpoints["10.0.0.1:80"], c.endpoints["10.0.0.2:80"]
    assert breaker.connection_allowed(c, a.pool)
    c.stats.upstream_cx_active = 1  # a's connection
    a.pool.cx_active = 1
    assert not breaker.connection_allowed(c, a.pool)
    assert breaker.connection_allowed(c, b.pool)  # nothing could ever serve b's requests otherwise


def test_max_retries_without_a_budget() -> None:
    c = cluster(max_retries=2)
    c.stats.upstream_rq_active = 100
    c.retries_active = 1
    assert breaker.retry_allowed(c)
    c.retries_active = 2
    assert not breaker.retry_allowed(c)
    c = cluster(max_retries=0)
    assert not breaker.retry_allowed(c)


def test_retry_budget_has_a_floor_of_min_retry_concurrency() -> None:
    c = cluster(retry_budget_percent=20.0, min_retry_concurrency=2, max_retries=0)  # max_retries is ignored
    c.stats.upstream_rq_active = 1
    c.retries_active = 1
    assert breaker.retry_allowed(c)
    c.retries_active = 2
    assert not breaker.retry_allowed(c)


def test_retry_budget_counts_active_and_pending_requests() -> None:
    c = cluster(retry_budget_percent=50.0, min_retry_concurrency=0)
    c.stats.upstream_rq_active = 2
    c.stats.upstream_rq_pending_active = 2  # pending requests are active requests too
    c.retries_active = 1
    assert breaker.retry_allowed(c)  # 50% of 4 = 2
    c.retries_active = 2
    assert not breaker.retry_allowed(c)


@pytest.mark.parametrize(("active", "retries", "allowed"), [
    (3, 0, True),  # 50% of 3 = 1.5 -> 1 retry
    (3, 1, False),
    (5, 2, False),  # 2.5 -> 2
    (6, 2, True),  # 3
])
def test_retry_budget_is_a_whole_number_of_retries(active: int, retries: int, allowed: bool) -> None:
    c = cluster(retry_budget_percent=50.0, min_retry_concurrency=0)
    c.stats.upstream_rq_active = active
    c.retries_active = retries
    assert breaker.retry_allowed(c) is allowed
