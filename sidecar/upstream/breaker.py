"""Circuit breaking and the retry budget of a cluster (Envoy's ``circuit_breakers.thresholds``).

Envoy's breakers are counters compared with limits, checked where a request would add to them:

- ``max_requests``: upstream requests in flight on a connection (``upstream_rq_active``); a try
  that would be one more when it gets its connection is refused.
- ``max_pending_requests``: requests waiting for a connection (being connected, or queued behind a
  full ``max_connections``); one more is refused.
- ``max_connections``: open connections of the cluster; at the limit a request waits for a
  connection of its endpoint to come free (counted as ``upstream_cx_overflow``). An endpoint with no
  connection at all may still open one, as in Envoy, so a request is never queued where nothing can
  ever serve it.
- ``max_connections`` for TCP (:func:`cluster_connection_allowed`): the same counters, no queue.
- retries: with a retry budget, active retries may be ``retry_budget_percent`` of the active plus
  pending requests but at least ``min_retry_concurrency``; without one, ``max_retries``.

Refusals answer 503 with the ``UO`` flag at once: nothing queues beyond these limits. The functions
only read counters the data path keeps anyway (``ClusterStats`` and ``Cluster.retries_active``).
The connection pools (:mod:`sidecar.upstream.pool`) apply the request and connection limits, as
Envoy's conn_pool_base does, and answer the router "ready" or "overflow"; the router applies the
retry limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sidecar.config import CircuitBreakerConfig
    from sidecar.upstream.stats import ClusterStats


class Limited(Protocol):
    """A cluster as its breakers see it: the limits (replaced whole by CDS) and the counters."""

    breakers: CircuitBreakerConfig
    stats: ClusterStats
    retries_active: int


class PoolCounts(Protocol):
    """An endpoint's pool as ``max_connections`` sees it."""

    cx_active: int
    opening: int


def request_allowed(cluster: Limited) -> bool:
    """Checked when a try gets its connection (Envoy: at attach): pending tries are not requests."""
    return cluster.stats.upstream_rq_active < cluster.breakers.max_requests


def pending_allowed(cluster: Limited) -> bool:
    return cluster.stats.upstream_rq_pending_active < cluster.breakers.max_pending_requests


def connection_allowed(cluster: Limited, pool: PoolCounts) -> bool:
    """Connections being opened count against the limit; an endpoint's pool with none open or
    opening may always open one."""
    stats = cluster.stats
    if stats.upstream_cx_active + stats.upstream_cx_opening < cluster.breakers.max_connections:
        return True
    return pool.cx_active == 0 and pool.opening == 0


def cluster_connection_allowed(cluster: Limited) -> bool:
    """``max_connections`` for a caller that never queues (the L4 proxy, ``sidecar.l4``): one more
    connection of the cluster, opening ones included, must stay within the limit. The per-endpoint
    exception of :func:`connection_allowed` exists so a queued request can always be served; a TCP
    connection over the limit is refused at once instead (``upstream_cx_overflow``)."""
    stats = cluster.stats
    return stats.upstream_cx_active + stats.upstream_cx_opening < cluster.breakers.max_connections


def retry_allowed(cluster: Limited) -> bool:
    cb = cluster.breakers
    if cb.retry_budget_percent > 0:
        stats = cluster.stats
        # Requests with a connection plus those waiting for one (kept apart, so none counts twice);
        # the failed try is still among them when this is asked.
        budget = cb.retry_budget_percent / 100.0 * (stats.upstream_rq_active + stats.upstream_rq_pending_active)
        return cluster.retries_active < max(int(budget), cb.min_retry_concurrency)  # whole retries, as Envoy
    return cluster.retries_active < cb.max_retries
