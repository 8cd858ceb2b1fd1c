"""Load reporting: the LoadReportingService (LRS) server and the :class:`LoadStore` behind ``/api/load``.

Sidecars open ``envoy.service.load_stats.v3.LoadReportingService/StreamLoadStats`` on the xDS
port. The first request names the node; the server answers once with ``send_all_clusters``,
``report_endpoint_granularity`` and ``load_reporting_interval`` (``--load-report-interval``), and
from then on every request is one report: a ClusterStats per cluster, with deltas since that
cluster's previous report over ``load_report_interval`` (sidecar.xds.lrs says what is counted).

The store keys load by namespace, service and endpoint address (``host:port``, as the registry
names instances). The service comes from the cluster name (``outbound|<svc>.<ns>`` or the subset
``outbound|<svc>.<ns>|<version>``); other clusters are ignored. A request goes to exactly one
cluster, so summing a service's main and subset clusters counts each request once. Service numbers
come from the locality stats (always sent, also by Envoy), endpoint numbers from the endpoint
stats; latency from the ``rq_latency_seconds`` load metric at each level
(:data:`meshkeeper.xds.LRS_LATENCY_METRIC`), and its buckets (``rq_latency_seconds_bucket:<bound>``),
which add up across reporters, so p99 over the last interval is Prometheus' ``histogram_quantile``
of the summed bucket rates (:func:`histogram_quantile`).

It keeps two things:

* Totals since this control plane started (issued, success, error, latency sum, requests finished
  with a latency), per service and per endpoint, summed over every reporter. A reporter whose
  stream ended stops adding, but what it reported stays.
* The last interval: per open stream, its latest report turned into per-second rates (each
  cluster's delta over that cluster's own interval) and its in-progress gauges. Rates and
  ``in_progress`` are sums over the streams whose latest report is fresh: a closed stream stops
  counting at once, a report older than :data:`STALE_INTERVALS` intervals (a stuck sidecar) too.

Sidecars with ``--workers N`` hold one stream per worker; they are summed like any reporters.
All state lives on the event loop; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.endpoint.v3 import load_report_pb2
from envoy.service.load_stats.v3 import lrs_pb2, lrs_pb2_grpc
from google.protobuf import duration_pb2

from controlplane.metrics import Metrics
from meshkeeper.xds import LRS_LATENCY_METRIC, parse_lrs_bucket, parse_outbound_cluster

log = logging.getLogger("meshkeeper.controlplane.lrs")

DEFAULT_LOAD_REPORT_INTERVAL = 10.0  # seconds, as Envoy's usual LRS servers
STALE_INTERVALS = 3  # a reporter's latest report older than this many intervals stops counting

_EOF = object()


@dataclass(slots=True)
class Load:
    """Request counts (totals) or per-second rates (one interval), plus the in-progress gauge."""

    issued: float = 0
    success: float = 0
    error: float = 0
    latency_sum: float = 0.0  # seconds
    latency_count: float = 0  # requests finished with a latency
    in_progress: int = 0
    # requests by latency bucket: upper bound (seconds, inf last) -> count, not cumulative
    buckets: dict[float, float] = field(default_factory=dict)

    def add(self, other: Load, per: float = 0.0) -> None:
        """Add ``other``; with ``per`` > 0, add it divided by ``per`` seconds (gauge as is)."""
        if per > 0:
            self.issued += other.issued / per
            self.success += other.success / per
            self.error += other.error / per
            self.latency_sum += other.latency_sum / per
            self.latency_count += other.latency_count / per
            for bound, n in other.buckets.items():
                self.buckets[bound] = self.buckets.get(bound, 0) + n / per
        else:
            self.issued += other.issued
            self.success += other.success
            self.error += other.error
            self.latency_sum += other.latency_sum
            self.latency_count += other.latency_count
            for bound, n in other.buckets.items():
                self.buckets[bound] = self.buckets.get(bound, 0) + n
        self.in_progress += other.in_progress

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile of latency in seconds from :attr:`buckets`, as ``histogram_quantile``."""
        return histogram_quantile(q, self.buckets)

    def totals_json(self, in_progress: int) -> dict[str, Any]:
        return {"issued": int(self.issued), "success": int(self.success), "error": int(self.error),
                "in_progress": in_progress, "latency_sum_seconds": round(self.latency_sum, 6),
                "mean_latency_seconds": _ratio(self.latency_sum, self.latency_count, 6)}

    def rates_json(self) -> dict[str, Any]:
        return {"rps": round(self.issued, 3), "success_rps": round(self.success, 3),
                "error_rps": round(self.error, 3),
                "error_ratio": _ratio(self.error, self.success + self.error, 4),
                "mean_latency_seconds": _ratio(self.latency_sum, self.latency_count, 6),
                "p99_latency_seconds": _round(self.quantile(0.99), 6)}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over non-cumulative bucket counts (upper bound -> count):
    linear interpolation within the bucket the rank falls in, from 0 for the first bucket; in the
    +Inf bucket the highest finite bound. None without observations."""
    total = sum(buckets.values())
    if total <= 0:
        return None
    rank = q * total
    seen, lower = 0.0, 0.0
    finite = [b for b in buckets if b != float("inf")]
    for bound in sorted(buckets):
        n = buckets[bound]
        if seen + n >= rank and n > 0:
            if bound == float("inf"):
                return max(finite) if finite else None
            return lower + (bound - lower) * (rank - seen) / n
        seen += n
        lower = bound
    return lower if lower != float("inf") else None


def _round(v: float | None, digits: int) -> float | None:
    return None if v is None else round(v, digits)


def _ratio(a: float, b: float, digits: int) -> float | None:
    return round(a / b, digits) if b > 0 else None


@dataclass(slots=True)
class ServiceLoad:
    load: Load = field(default_factory=Load)
    endpoints: dict[str, Load] = field(default_factory=dict)  # by "host:port"

    def endpoint(self, address: str) -> Load:
        got = self.endpoints.get(address)
        if got is None:
            got = self.endpoints[address] = Load()
        return got

    def add(self, other: ServiceLoad, per: float = 0.0) -> None:
        self.load.add(other.load, per)
        for address, load in other.endpoints.items():
            self.endpoint(address).add(load, per)


ServiceKey = tuple[str, str]  # (namespace, service)


@dataclass(slots=True)
class _Reporter:
    node_id: str
    at: float | None = None  # clock time of the latest report
    fresh_for: float = 0.0  # how long the latest report counts
    rates: dict[ServiceKey, ServiceLoad] = field(default_factory=dict)


def _address(ep: load_report_pb2.UpstreamEndpointStats) -> str:
    sa = ep.address.socket_address
    return f"{sa.address}:{sa.port_value}"


def _latency(stats: Iterable[load_report_pb2.EndpointLoadMetricStats], buckets: dict[float, float]) -> tuple[float, int]:
    """(latency sum, requests) of the latency metric; bucket metrics are added to ``buckets``."""
    total, count = 0.0, 0
    for m in stats:
        if m.metric_name == LRS_LATENCY_METRIC:
            total += m.total_metric_value
            count += m.num_requests_finished_with_metric
        elif (bound := parse_lrs_bucket(m.metric_name)) is not None:
            buckets[bound] = buckets.get(bound, 0) + m.num_requests_finished_with_metric
    return total, count


def parse_cluster_stats(cs: load_report_pb2.ClusterStats) -> tuple[ServiceKey, ServiceLoad, float] | None:
    """(service key, deltas of the interval, interval seconds), or None for a non-service cluster."""
    try:
        svc, ns, _ = parse_outbound_cluster(cs.cluster_name)
    except ValueError:
        return None
    got = ServiceLoad()
    svc_load = got.load
    for loc in cs.upstream_locality_stats:
        _add(svc_load, loc)
        for ep in loc.upstream_endpoint_stats:
            _add(got.endpoint(_address(ep)), ep)  # the same address twice in one report adds up
    return (ns, svc), got, cs.load_report_interval.ToTimedelta().total_seconds()


def _add(load: Load, stats: Any) -> None:
    """Add one UpstreamLocalityStats or UpstreamEndpointStats (they share these fields) to ``load``."""
    load.issued += stats.total_issued_requests
    load.success += stats.total_successful_requests
    load.error += stats.total_error_requests
    load.in_progress += stats.total_requests_in_progress
    total, count = _latency(stats.load_metric_stats, load.buckets)
    load.latency_sum += total
    load.latency_count += count


class LoadStore:
    """Aggregated load reports; see the module docstring. ``clock`` is monotonic seconds."""

    def __init__(self, interval: float = DEFAULT_LOAD_REPORT_INTERVAL, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._ids = itertools.count(1)
        self._reporters: dict[int, _Reporter] = {}
        self._totals: dict[ServiceKey, ServiceLoad] = {}

    def __len__(self) -> int:
        """Reporters connected now."""
        return len(self._reporters)

    def connect(self, node_id: str) -> int:
        rid = next(self._ids)
        self._reporters[rid] = _Reporter(node_id)
        return rid

    def disconnect(self, reporter: int) -> None:
        self._reporters.pop(reporter, None)

    def report(self, reporter: int, cluster_stats: Iterable[load_report_pb2.ClusterStats]) -> None:
        """Add one LoadStatsRequest's ClusterStats: to the totals, and as the reporter's latest."""
        rep = self._reporters.get(reporter)
        if rep is None:
            return
        rates: dict[ServiceKey, ServiceLoad] = {}
        longest = 0.0
        for cs in cluster_stats:
            parsed = parse_cluster_stats(cs)
            if parsed is None:
                log.debug("%s reported load of %r, which names no service", rep.node_id, cs.cluster_name)
                continue
            key, load, interval = parsed
            total = self._totals.get(key)
            if total is None:
                total = self._totals[key] = ServiceLoad()
            total.add(load)
            if interval <= 0:  # no interval given: assume ours
                interval = self.interval
            longest = max(longest, interval)
            into = rates.get(key)
            if into is None:
                into = rates[key] = ServiceLoad()
            into.add(load, per=interval)
        rep.at = self._clock()
        rep.fresh_for = STALE_INTERVALS * max(self.interval, longest)
        rep.rates = rates

    def _current(self, only: ServiceKey | None = None) -> dict[ServiceKey, ServiceLoad]:
        """Per-second rates of the fresh reporters' latest reports, summed per service."""
        now = self._clock()
        current: dict[ServiceKey, ServiceLoad] = {}
        for rep in self._reporters.values():
            if rep.at is None or now - rep.at > rep.fresh_for:
                continue
            for key, load in rep.rates.items():
                if only is not None and key != only:
                    continue
                into = current.get(key)
                if into is None:
                    into = current[key] = ServiceLoad()
                into.add(load)
        return current

    def rates(self, namespace: str, service: str) -> Load:
        """The service's per-second rates over the last interval (summed over fresh reporters),
        with latency buckets; an empty :class:`Load` without fresh reports."""
        got = self._current((namespace, service)).get((namespace, service))
        return got.load if got is not None else Load()

    def edges(self) -> dict[tuple[str, ServiceKey], Load]:
        """Per-second rates of the last interval per (caller node id, callee service), summed over
        the caller's fresh streams (its workers): the console's caller -> callee edges."""
        now = self._clock()
        out: dict[tuple[str, ServiceKey], Load] = {}
        for rep in self._reporters.values():
            if rep.at is None or now - rep.at > rep.fresh_for:
                continue
            for key, load in rep.rates.items():
                into = out.get((rep.node_id, key))
                if into is None:
                    into = out[(rep.node_id, key)] = Load()
                into.add(load.load)
        return out

    def snapshot(self, namespace: str | None = None) -> dict[str, Any]:
        """The ``/api/load`` document (controlplane.web documents its shape)."""
        current = self._current()
        services = []
        for key in sorted(set(self._totals) | set(current)):
            ns, svc = key
            if namespace is not None and ns != namespace:
                continue
            total = self._totals.get(key) or ServiceLoad()
            now_load = current.get(key) or ServiceLoad()
            endpoints = []
            for address in sorted(set(total.endpoints) | set(now_load.endpoints)):
                t = total.endpoints.get(address) or Load()
                r = now_load.endpoints.get(address) or Load()
                endpoints.append({"address": address, "totals": t.totals_json(r.in_progress),
                                  "rates": r.rates_json()})
            services.append({"namespace": ns, "service": svc,
                             "totals": total.load.totals_json(now_load.load.in_progress),
                             "rates": now_load.load.rates_json(), "endpoints": endpoints})
        return {"interval_seconds": self.interval, "services": services, "reporters": len(self._reporters)}


class LoadReportingServer(lrs_pb2_grpc.LoadReportingServiceServicer):
    """LRS on grpc.aio: one reporter in the store per stream, counted in the metrics."""

    def __init__(self, store: LoadStore, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(int(store.interval * 1e9))
        self._response = lrs_pb2.LoadStatsResponse(send_all_clusters=True, report_endpoint_granularity=True,
                                                   load_reporting_interval=interval)
        self._queues: set[asyncio.Queue] = set()

    def close_streams(self) -> None:
        """End every open stream with status OK (shutdown): sidecars reconnect, to us or a peer."""
        for queue in self._queues:
            queue.put_nowait(_EOF)

    async def StreamLoadStats(self, request_iterator, context):  # noqa: N802 (gRPC name)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues.add(queue)
        reader = asyncio.get_running_loop().create_task(_read(request_iterator, queue))
        reporter: int | None = None
        node_id = ""
        try:
            while (req := await queue.get()) is not _EOF:
                first = reporter is None
                if first:
                    node_id = req.node.id
                    if not node_id:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.id")
                    reporter = self.store.connect(node_id)
                    self.metrics.lrs_streams.set(len(self.store))
                    log.info("load reporting from %s (%s)", node_id, context.peer() or "")
                    yield self._response
                if not first or req.cluster_stats:
                    self.store.report(reporter, req.cluster_stats)
                    self.metrics.lrs_reports.inc()
        finally:
            self._queues.discard(queue)
            reader.cancel()
            if reporter is not None:
                self.store.disconnect(reporter)
                self.metrics.lrs_streams.set(len(self.store))
                log.info("load reporting from %s ended", node_id)


async def _read(requests, queue: asyncio.Queue) -> None:
    try:
        async for req in requests:
            queue.put_nowait(req)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the client went away mid-read
        log.debug("LRS stream read ended: %s", exc)
    finally:
        queue.put_nowait(_EOF)


def add_to_server(server: grpc.aio.Server, lrs: LoadReportingServer) -> None:
    lrs_pb2_grpc.add_LoadReportingServiceServicer_to_server(lrs, server)
