"""Prometheus exposition of the sidecar (``/stats/prometheus``).

The data path only bumps plain integers (``sidecar.upstream.stats``); the functions here turn one
component's integers into metric families at scrape time, and :class:`SidecarMetrics` exposes
whatever is registered in the sidecar's :class:`~sidecar.stats.StatsStore`, so the hot path never
touches prometheus-client. Names carry the ``meshkeeper_``
prefix; cluster statistics keep Envoy's names. Statistics ending in ``_active`` (connections,
requests, pending requests, outlier ejections: what is open or in force now) are gauges; the rest are
counters. Each name is one family, with a ``cluster`` label.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from meshkeeper import xds
from sidecar.stats import StatsStore


def _is_gauge(stat: str) -> bool:
    # upstream_{cx,rq,rq_pending}_active, outlier_detection_ejections_active, upstream_cx_opening
    return stat.endswith("_active") or stat == "upstream_cx_opening"


# --------------------------------------------------------------------------- one function per component


def cluster_families(clusters: Any) -> Iterator[Metric]:
    """A ClusterManager's clusters: Envoy's cluster statistics and the upstream request time."""
    rq = CounterMetricFamily("meshkeeper_upstream_rq", "Upstream requests by cluster and response code class",
                             labels=["cluster", "code_class"])
    families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    for name in sorted(clusters.names()):
        for stat, value in clusters.get(name).stats.snapshot().items():
            if stat.startswith("upstream_rq_") and stat[-3:] in ("1xx", "2xx", "3xx", "4xx", "5xx"):
                rq.add_metric([name, stat[-3:]], value)
                continue
            if stat == "upstream_rq_total":  # the sum of the family above; one name, one family
                continue
            fam = families.get(stat)
            if fam is None:
                mname = f"meshkeeper_{stat}"
                fam = (GaugeMetricFamily(mname, f"Envoy-style cluster statistic {stat}", labels=["cluster"])
                       if _is_gauge(stat) else
                       CounterMetricFamily(mname, f"Envoy-style cluster statistic {stat}", labels=["cluster"]))
                families[stat] = fam
            fam.add_metric([name], value)
    yield rq
    yield from families.values()
    upstream_time = HistogramMetricFamily(
        "meshkeeper_upstream_rq_duration_seconds",
        "Upstream request time by cluster: a try's start to the end of its response (or its failure)",
        labels=["cluster"])
    for name in sorted(clusters.names()):
        hist = clusters.get(name).rq_time
        upstream_time.add_metric([name], hist.buckets(), hist.sum)
    yield upstream_time


def listener_families(ctx: Any) -> Iterator[Metric]:
    """A ListenerContext: its statistics, request time, responses by route and gRPC calls by status."""
    downstream_time = HistogramMetricFamily(
        "meshkeeper_downstream_rq_duration_seconds",
        "Downstream request time by listener: the request's first byte in to its response's last byte out",
        labels=["listener"])
    downstream_time.add_metric([ctx.name], ctx.rq_time.buckets(), ctx.rq_time.sum)
    yield downstream_time
    by_route = CounterMetricFamily(
        "meshkeeper_requests", "Responses by listener, route, cluster and status class (route and cluster "
        "are empty for requests answered before routing, such as 429 RL and 404 NR)",
        labels=["listener", "route", "cluster", "code_class"])
    for (route, cluster), counts in sorted(ctx.route_stats.items()):
        for i, n in enumerate(counts):
            if n:
                by_route.add_metric([ctx.name, route, cluster, f"{i + 1}xx"], n)
    yield by_route
    by_grpc = CounterMetricFamily(
        "meshkeeper_grpc_requests", "gRPC calls by listener, route, cluster and grpc-status (the call's "
        "outcome: HTTP says 200 for nearly all of them)", labels=["listener", "route", "cluster", "grpc_status"])
    for (route, cluster, code), n in sorted(ctx.grpc_stats.items()):
        by_grpc.add_metric([ctx.name, route, cluster, str(code)], n)
    yield by_grpc
    for stat, value in ctx.stats.snapshot().items():
        kind = GaugeMetricFamily if _is_gauge(stat) else CounterMetricFamily
        fam = kind(f"meshkeeper_listener_{stat}", f"Envoy-style listener statistic {stat}", labels=["listener"])
        fam.add_metric([ctx.name], value)
        yield fam


def tracer_families(tracer: Any) -> Iterator[Metric]:
    st = tracer.stats
    yield CounterMetricFamily("meshkeeper_tracing_spans_sampled", "Spans recorded for export", value=st.spans_sampled)
    yield CounterMetricFamily("meshkeeper_tracing_spans_exported", "Spans the OTLP collector accepted",
                              value=st.spans_exported)
    dropped = CounterMetricFamily("meshkeeper_tracing_spans_dropped",
                                  "Spans not exported: the export queue was full, the collector "
                                  "failed or was unreachable, or the span could not be built", labels=["reason"])
    dropped.add_metric(["queue_full"], st.spans_dropped_queue_full)
    dropped.add_metric(["export_failed"], st.spans_dropped_export_failed)
    dropped.add_metric(["invalid"], st.spans_dropped_invalid)
    yield dropped
    yield GaugeMetricFamily("meshkeeper_tracing_spans_queued", "Spans waiting for export", value=st.queued)


def access_log_families(access_log: Any) -> Iterator[Metric]:
    yield CounterMetricFamily("meshkeeper_access_log_lines", "Access log lines handed to the writer",
                              value=access_log.lines)
    yield CounterMetricFamily("meshkeeper_access_log_write_errors", "Failed access log writes",
                              value=access_log.write_errors)
    yield CounterMetricFamily("meshkeeper_access_log_dropped_lines",
                              "Access log lines dropped because the writer was too far behind "
                              "(a stalled stdout reader)", value=access_log.dropped)


def dns_families(dns: Any) -> Iterator[Metric]:
    """The mesh DNS (transparent mode): its Envoy dns_filter-style counters."""
    for stat, value in dns.snapshot().items():
        kind = GaugeMetricFamily if _is_gauge(stat) else CounterMetricFamily
        yield kind(f"meshkeeper_dns_{stat}", f"Mesh DNS statistic {stat}", value=value)


def ads_families(ads: Any) -> Iterator[Metric]:
    updates = CounterMetricFamily("meshkeeper_xds_updates", "xDS responses by type and result",
                                  labels=["type", "result"])
    for type_url, st in ads.state.items():
        updates.add_metric([xds.SHORT_TYPE[type_url], "accepted"], st.accepted)
        updates.add_metric([xds.SHORT_TYPE[type_url], "rejected"], st.rejected)
    yield updates
    yield GaugeMetricFamily("meshkeeper_xds_connected", "1 while the ADS stream is up", value=int(ads.connected))
    yield GaugeMetricFamily("meshkeeper_xds_synced", "1 while every subscribed resource has arrived",
                            value=int(ads.synced))


def node_families(node: Any) -> Iterator[Metric]:
    info = GaugeMetricFamily("meshkeeper_sidecar_info", "This sidecar: its service, namespace, version and node id "
                             "(join on it to label its other series by service)",
                             labels=["service", "namespace", "version", "node_id"])
    info.add_metric([node.service, node.namespace, node.version, node.node_id], 1)
    yield info


def registration_families(reg: Any) -> Iterator[Metric]:
    yield GaugeMetricFamily("meshkeeper_registration_registered", "1 while the instance znode exists",
                            value=int(reg.registered))
    yield GaugeMetricFamily("meshkeeper_app_healthy", "1 while the local app passes health checks",
                            value=int(reg.healthy))
    yield GaugeMetricFamily("meshkeeper_zookeeper_connected", "1 while the ZooKeeper session is connected",
                            value=int(reg.zk.connected))


def identity_families(tls: Any) -> Iterator[Metric]:
    """The workload identity (sidecar.tls.TlsIdentity): whether mTLS works, and until when."""
    yield GaugeMetricFamily("meshkeeper_identity_ready", "1 while the sidecar has its key, certificate and trust "
                            "bundle (mTLS both ways); 0: plaintext only", value=int(tls.ready))
    not_after = tls.not_after
    yield GaugeMetricFamily("meshkeeper_identity_cert_expiry_timestamp_seconds",
                            "When the workload certificate expires (Unix time; 0: none)",
                            value=not_after.timestamp() if not_after is not None else 0)


class _StoreCollector:
    def __init__(self, store: StatsStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        return iter(self.store.collect())


class SidecarMetrics:
    """The exposition of a :class:`~sidecar.stats.StatsStore`."""

    def __init__(self, store: StatsStore) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StoreCollector(store))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
