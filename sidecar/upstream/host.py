"""Hosts: what a cluster (:mod:`sidecar.upstream.cluster`) and its outlier detector
(:mod:`sidecar.upstream.outlier`) both know of an upstream endpoint, so that neither imports the other.

- :class:`Endpoint`: one upstream host of a cluster, with its counters and its connection pool.
- :class:`OutlierMonitor`: the outlier state an endpoint carries (``Endpoint.outlier``), as the rest
  of the data path reads it; the cluster's detector alone makes and writes it (Envoy's host carries a
  ``DetectorHostMonitor`` the same way).
- :class:`LocalOriginFailure`: the local-origin failures of a try (connect failure, timeout, reset)
  that the HTTP router and the L4 proxy report to outlier detection and that the router's
  ``retry_on`` conditions cover. A ``StrEnum``: its members hash and compare as the strings they
  were, so a dict lookup by one costs what a string's does.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Protocol

from sidecar.config import EndpointConfig
from sidecar.upstream.pool import ConnectionPool
from sidecar.upstream.stats import DURATION_BUCKETS


class LocalOriginFailure(StrEnum):
    """A try that failed on our side of the connection, by Envoy's names."""

    CONNECT_FAILURE = "connect_failure"
    TIMEOUT = "timeout"
    RESET = "reset"


class OutlierMonitor(Protocol):
    """One endpoint's outlier state, as the data path reads it (written by its detector only)."""

    @property
    def ejected(self) -> bool: ...


# The outlier fields of an endpoint's admin view when no detector monitors it.
_NOT_MONITORED: Mapping[str, Any] = {"ejected": False, "ejections": 0, "ejected_until": None, "outlier": None}


class Endpoint:
    """One upstream host of a cluster, as the data path sees it."""

    __slots__ = ("config", "key", "authority", "pool", "active_requests", "total_requests", "rq_error",
                 "rq_success", "rq_latency_total", "rq_latency_counts", "outlier")

    def __init__(self, config: EndpointConfig, pool: ConnectionPool) -> None:
        self.config = config
        self.key = config.key
        # Host header for requests that came without one (HTTP/1.0).
        host = f"[{config.address}]" if ":" in config.address else config.address
        self.authority = f"{host}:{config.port}".encode()
        self.pool = pool
        self.active_requests = 0
        self.total_requests = 0
        self.rq_error = 0  # 5xx answers and resets, timeouts, protocol errors
        self.rq_success = 0
        # Seconds from each try's start (its endpoint picked: connect and pool wait included) to its
        # end, summed over the tries counted in rq_success or rq_error; LRS reports it (sidecar.xds.lrs).
        self.rq_latency_total = 0.0
        # The same tries by latency bucket (DURATION_BUCKETS slots, +Inf last), for the p99 the
        # control plane derives from LRS; the cluster's rq_time histogram says which slot.
        self.rq_latency_counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.outlier: OutlierMonitor | None = None  # set and written by the cluster's OutlierDetector only

    @property
    def serving(self) -> bool:
        return self.config.serving and self.config.weight > 0

    @property
    def ejected(self) -> bool:
        m = self.outlier
        return m is not None and m.ejected

    def admin_view(self, outlier: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``/clusters`` fields of this endpoint; ``outlier``: its detector's fields
        (``OutlierDetector.host_view``), None when the cluster has no outlier detection."""
        cfg = self.config
        view = {
            "address": cfg.address,
            "port": cfg.port,
            "weight": cfg.weight,
            "serving": self.serving,
            "health_status": "HEALTHY" if self.serving else "DRAINING",
            "zone": cfg.zone,
            "labels": dict(cfg.labels),
            "active_requests": self.active_requests,
            "total_requests": self.total_requests,
            "rq_error": self.rq_error,
            "rq_success": self.rq_success,
            "cx_active": self.pool.cx_active,
            "cx_idle": self.pool.idle_count,
            # The cluster's tlsMode-mutual transport socket applies (mTLS once the sidecar has a certificate).
            "tls_mode": "mutual" if self.pool.tls is not None else "disabled",
        }
        view.update(outlier if outlier is not None else _NOT_MONITORED)
        return view
