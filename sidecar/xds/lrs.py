"""The sidecar's load reporter: an Envoy LoadReportingService (LRS) client.

One gRPC stream (``envoy.service.load_stats.v3.LoadReportingService/StreamLoadStats``) to the
control plane, beside the ADS stream. The first LoadStatsRequest carries the node; each
LoadStatsResponse says which clusters to report (``clusters``, or ``send_all_clusters``), how often
(``load_reporting_interval``) and whether per-endpoint stats are wanted
(``report_endpoint_granularity``). As in Envoy a new response replaces the previous one and
restarts the reporting period. Every period one LoadStatsRequest goes out with a ClusterStats per
reported cluster that exists here: ``load_report_interval`` (the time its numbers cover),
``upstream_locality_stats`` grouped by endpoint zone, with issued, successful and errored
requests as deltas since that cluster's previous report and requests in progress as the current
gauge, and (with endpoint granularity) one UpstreamEndpointStats per endpoint that had traffic.

Latency is reported the way the API allows named metrics: ``load_metric_stats`` entry
``rq_latency_seconds`` (:data:`meshkeeper.xds.LRS_LATENCY_METRIC`) with
``num_requests_finished_with_metric`` = tries that ended (succeeded or errored) in the period and
``total_metric_value`` = the sum of their latencies in seconds, per endpoint and summed per locality;
and the same tries by latency bucket (``rq_latency_seconds_bucket:<bound>``, the buckets of
``upstream_rq_time``; :data:`meshkeeper.xds.LRS_LATENCY_BUCKET_PREFIX`), from which the control
plane derives p99 over any set of reports.

What is counted (the counters are cumulative ints on :class:`sidecar.upstream.host.Endpoint`,
maintained by the data path): ``total_requests`` (tries issued), ``rq_success``, ``rq_error``,
``active_requests`` and ``rq_latency_total``. Deltas are taken against what was last reported of
that endpoint *object*, so a request is reported exactly once:

* An endpoint object's first report counts from zero (its counters started with it), and what a
  stream could not send (the control plane was away) goes out on the next stream: totals at the
  control plane equal the requests sent. (Envoy instead latches its counters when a cluster starts
  being tracked.)
* An endpoint that left its cluster (EDS removed it, or its cluster is gone) is reported once more
  with what it did since the last report, and then again only while it still has requests in
  flight; after that it is forgotten. An endpoint re-added under the same address is a new object
  and counts from zero. Endpoints are followed from the first response on and at every report, so
  one that is added and removed again within a single period is not seen (see :meth:`sync`).
* A cluster the control plane did not ask for is not reported; its counts are consumed at each
  period, so asking for it later reports only what happened since.
* Only outbound clusters (``outbound|...``) are reported: the inbound cluster is this instance's
  own app, whose load the callers' sidecars already report as load on this endpoint.
* Endpoints with no traffic and nothing in flight in a period are left out (as Envoy does);
  every reported cluster still gets its ClusterStats, so the control plane sees a quiet period.

The channel is the ADS client's kind (:func:`sidecar.xds.client.open_channel`): TLS with the
same credentials when the sidecar runs with ``--xds-ca``.

With ``--workers N`` each worker process has its own clusters and its own reporter (node ids end
in ``~wN``); the control plane sums them. When the stream breaks, the reporter reconnects with
jittered exponential back-off (like :mod:`sidecar.xds.client`) and never stops the sidecar; each
cause of failure is logged once until a stream works again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import grpc
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import load_report_pb2
from envoy.service.load_stats.v3 import lrs_pb2, lrs_pb2_grpc

from meshkeeper.xds import LRS_LATENCY_METRIC, NodeInfo, lrs_bucket_name
from sidecar.upstream.cluster import Cluster, ClusterManager
from sidecar.upstream.host import Endpoint
from sidecar.upstream.stats import DURATION_BUCKETS
from sidecar.xds.client import (
    BACKOFF_BASE,
    BACKOFF_MAX,
    STABLE_STREAM,
    Targets,
    backoff,
    build_node,
    open_channel,
    stop_task,
)

log = logging.getLogger("meshkeeper.sidecar.lrs")

REPORTED_PREFIX = "outbound|"
DEFAULT_INTERVAL = 10.0  # used when a response carries no (or a non-positive) interval
MIN_INTERVAL = 0.05  # a shorter interval from the control plane is raised to this

_REPORT = object()  # queue marker: build a report now, right before gRPC writes it


class _Seen:
    """One endpoint object and its counters as last reported."""

    __slots__ = ("endpoint", "issued", "success", "error", "latency", "buckets")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.issued = self.success = self.error = 0
        self.latency = 0.0
        self.buckets = [0] * len(endpoint.rq_latency_counts)

    def unreported(self) -> bool:
        """Whether the endpoint has load the next report must carry (new tries, or tries in flight)."""
        ep = self.endpoint
        return (ep.total_requests != self.issued or ep.rq_success != self.success or ep.rq_error != self.error
                or ep.active_requests > 0)

    def take(self) -> tuple[int, int, int, float]:
        """(issued, success, error, latency) since the last take, and move the baseline."""
        ep = self.endpoint
        issued, success, error, latency = ep.total_requests, ep.rq_success, ep.rq_error, ep.rq_latency_total
        delta = (issued - self.issued, success - self.success, error - self.error, latency - self.latency)
        self.issued, self.success, self.error, self.latency = issued, success, error, latency
        return delta

    def take_buckets(self) -> list[int]:
        """Tries per latency bucket since the last take (DURATION_BUCKETS slots, +Inf last)."""
        now = list(self.endpoint.rq_latency_counts)
        delta = [a - b for a, b in zip(now, self.buckets, strict=True)]
        self.buckets = now
        return delta


class _Track:
    """What the reporter follows of one cluster between reports."""

    __slots__ = ("live", "gone", "since")

    def __init__(self, since: float) -> None:
        self.live: dict[str, _Seen] = {}  # by endpoint key: the objects in the cluster at the last sync
        self.gone: list[_Seen] = []  # objects that left the cluster, with requests maybe unreported
        self.since = since  # start of the period the next report covers

    def sync(self, cluster: Cluster | None) -> None:
        endpoints = cluster.endpoints if cluster is not None else {}
        for key, seen in list(self.live.items()):
            if endpoints.get(key) is not seen.endpoint:
                if seen.unreported():  # an idle one is forgotten now, so that nothing piles up
                    self.gone.append(seen)  # while no report is asked for (no LRS server)
                del self.live[key]
        for key, endpoint in endpoints.items():
            if key not in self.live:
                self.live[key] = _Seen(endpoint)


def _latency_stat(count: int, total: float) -> load_report_pb2.EndpointLoadMetricStats:
    return load_report_pb2.EndpointLoadMetricStats(
        metric_name=LRS_LATENCY_METRIC, num_requests_finished_with_metric=count, total_metric_value=total)


_BOUNDS = (*DURATION_BUCKETS, float("inf"))
_BUCKET_NAMES = tuple(lrs_bucket_name(b) for b in _BOUNDS)


def _bucket_stats(counts: list[int]) -> list[load_report_pb2.EndpointLoadMetricStats]:
    """The non-empty latency buckets (meshkeeper.xds.LRS_LATENCY_BUCKET_PREFIX), each preceded by
    the bucket below it (with 0 when empty) so that the receiver knows every bucket's lower bound."""
    keep = [i for i, n in enumerate(counts) if n > 0]
    keep = sorted({*keep, *(i - 1 for i in keep if i > 0)})
    return [load_report_pb2.EndpointLoadMetricStats(metric_name=_BUCKET_NAMES[i], num_requests_finished_with_metric=counts[i],
                                                    total_metric_value=counts[i]) for i in keep]


class LoadReporter:
    def __init__(self, target: str, node: NodeInfo, clusters: ClusterManager, *,
                 backoff_base: float = BACKOFF_BASE, backoff_max: float = BACKOFF_MAX,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.targets = Targets(target)  # the control plane replicas, as the ADS client's
        self.credentials = credentials  # None: insecure channel (as the ADS client's)
        self.node = build_node(node)
        self.clusters = clusters
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self._clock = clock
        self._rng = rng or random.Random()
        self._tracks: dict[str, _Track] = {}
        self._period_start = clock()
        # What the control plane asked for (None: nothing yet, so nothing is reported).
        self.requested: frozenset[str] | None = None
        self.send_all = False
        self.endpoint_granularity = False
        self.interval: float | None = None
        self.connected = False
        self.connects = 0
        self.reports = 0
        self.last_error = ""
        self._task: asyncio.Task | None = None

    @property
    def target(self) -> str:
        return self.targets.current

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lrs-client")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task, "load reporting")
            self._task = None

    def admin_view(self) -> dict[str, Any]:
        return {
            "target": self.target, "connected": self.connected, "connects": self.connects,
            "interval_seconds": self.interval, "reports": self.reports,
            "clusters": "*" if self.send_all else sorted(self.requested or ()),
            "endpoint_granularity": self.endpoint_granularity, "last_error": self.last_error or None,
        }

    async def _run(self) -> None:
        attempt = 0
        while True:
            started = self._clock()
            bug: Exception | None = None
            try:
                await self._stream_once()
                cause = "the control plane closed the stream"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                cause = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:  # a bug must not stop the sidecar, nor reconnection
                cause, bug = f"{type(exc).__name__}: {exc}", exc
            if cause != self.last_error:  # once per cause, not once per retry
                log.warning("load reporting to %s: stream ended (%s); reconnecting with back-off",
                            self.target, cause, exc_info=bug)
                self.last_error = cause
            self.targets.advance()
            self.connected = False
            attempt = 0 if self._clock() - started > STABLE_STREAM else attempt + 1
            await asyncio.sleep(backoff(attempt, self.backoff_base, self.backoff_max, self._rng))

    async def _stream_once(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        ticker: asyncio.Task | None = None

        async def requests():
            yield lrs_pb2.LoadStatsRequest(node=self.node)
            while await queue.get() is not None:
                # Built only when gRPC takes it to write: load is consumed as late as possible, so
                # a stream that broke meanwhile leaves it for the next one.
                yield self.build_report()

        try:
            async with open_channel(self.target, self.credentials) as channel:
                call = lrs_pb2_grpc.LoadReportingServiceStub(channel).StreamLoadStats(requests())
                try:
                    async for resp in call:
                        interval = self.on_response(resp)
                        if ticker is not None:
                            ticker.cancel()
                        ticker = loop.create_task(self._tick(queue, interval), name="lrs-ticker")
                finally:
                    queue.put_nowait(None)  # end the request iterator (as the ADS client's)
                    call.cancel()
        finally:
            if ticker is not None:
                ticker.cancel()

    @staticmethod
    async def _tick(queue: asyncio.Queue, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            queue.put_nowait(_REPORT)

    # ------------------------------------------------------------------ protocol

    def on_response(self, resp: lrs_pb2.LoadStatsResponse) -> float:
        """Take a LoadStatsResponse as the new instructions; returns the reporting interval."""
        interval = resp.load_reporting_interval.ToTimedelta().total_seconds()
        if interval <= 0:
            interval = DEFAULT_INTERVAL
        interval = max(MIN_INTERVAL, interval)
        self.send_all = resp.send_all_clusters
        self.requested = frozenset(resp.clusters)
        self.endpoint_granularity = resp.report_endpoint_granularity
        if not self.connected:
            self.connected = True
            self.connects += 1
            if self.last_error:
                log.info("load reporting to %s resumed (every %gs)", self.target, interval)
            else:
                log.info("load reporting to %s every %gs", self.target, interval)
            self.last_error = ""
        self.interval = interval
        self._period_start = self._clock()  # a new response restarts the period
        self.sync()
        return interval

    def sync(self) -> None:
        """Start following the endpoint objects in the clusters now, and remember the ones that
        left. Called at each report and right before a CDS/EDS update is applied (Server),
        so that endpoints that come and go within one period are reported too."""
        manager = self.clusters
        for name in manager.names():
            if name.startswith(REPORTED_PREFIX) and name not in self._tracks:
                self._tracks[name] = _Track(self._period_start)
        for name, track in self._tracks.items():
            track.sync(manager.get(name))

    def build_report(self) -> lrs_pb2.LoadStatsRequest:
        """One LoadStatsRequest with the load since the previous report of each asked-for cluster."""
        now = self._clock()
        manager = self.clusters
        self.sync()
        req = lrs_pb2.LoadStatsRequest()
        for name in sorted(self._tracks):
            track = self._tracks[name]
            cluster = manager.get(name)
            if self.send_all or (self.requested is not None and name in self.requested):
                req.cluster_stats.append(self._cluster_stats(name, track, now))
            else:
                for seen in (*track.live.values(), *track.gone):
                    seen.take()
            track.since = now
            track.gone = [s for s in track.gone if s.endpoint.active_requests > 0]
            if cluster is None and not track.gone:
                del self._tracks[name]
        self._period_start = now
        self.reports += 1
        return req

    def _cluster_stats(self, name: str, track: _Track, now: float) -> load_report_pb2.ClusterStats:
        stats = load_report_pb2.ClusterStats(cluster_name=name)
        stats.load_report_interval.FromNanoseconds(max(0, int((now - track.since) * 1e9)))
        localities: dict[str, tuple[load_report_pb2.UpstreamLocalityStats, list]] = {}
        for seen in (*track.live.values(), *track.gone):
            issued, success, error, latency = seen.take()
            buckets = seen.take_buckets()
            endpoint = seen.endpoint
            active = endpoint.active_requests
            if not (issued or success or error or active):
                continue
            zone = endpoint.config.zone
            entry = localities.get(zone)
            if entry is None:
                loc = stats.upstream_locality_stats.add()
                loc.locality.zone = zone
                entry = localities[zone] = (loc, [0, 0.0], [0] * len(_BOUNDS))
            loc, lat, loc_buckets = entry
            for i, n in enumerate(buckets):
                loc_buckets[i] += n
            loc.total_issued_requests += issued
            loc.total_successful_requests += success
            loc.total_error_requests += error
            loc.total_requests_in_progress += active
            lat[0] += success + error
            lat[1] += latency
            if self.endpoint_granularity:
                cfg = endpoint.config
                ep = loc.upstream_endpoint_stats.add(
                    address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
                        address=cfg.address, port_value=cfg.port, protocol=address_pb2.SocketAddress.TCP)),
                    total_issued_requests=issued, total_successful_requests=success,
                    total_error_requests=error, total_requests_in_progress=active)
                if success + error:
                    ep.load_metric_stats.append(_latency_stat(success + error, latency))
                ep.load_metric_stats.extend(_bucket_stats(buckets))
        for loc, (count, total), loc_buckets in localities.values():
            if count:
                loc.load_metric_stats.append(_latency_stat(count, total))
            loc.load_metric_stats.extend(_bucket_stats(loc_buckets))
        return stats

