"""Prometheus exposition of the sidecar (``/stats/prometheus``).

The data path only bumps plain integers (``sidecar.upstream.stats``); this collector reads them
at scrape time, so the hot path never touches prometheus-client. Names carry the ``meshkeeper_``
prefix; cluster statistics keep Envoy's names. Statistics ending in ``_active`` (connections,
requests, pending requests, outlier ejections: what is open or in force now) are gauges; the rest are
counters. Each name is one family, with a ``cluster`` label.
"""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshkeeper import xds


class Server(Protocol):
    """What the collector reads of ``sidecar.server.Server`` at scrape time (declared here,
    so that the runtime, which owns a :class:`SidecarMetrics`, and this module do not import each
    other)."""

    node: Any
    clusters: Any
    listener_contexts: dict[str, Any]
    chain_contexts: dict[str, Any]
    tracer: Any
    access_log: Any
    dns: Any
    ads: Any
    registration: Any

    def listeners_view(self) -> list[dict[str, Any]]: ...


def _is_gauge(stat: str) -> bool:
    # upstream_{cx,rq,rq_pending}_active, outlier_detection_ejections_active, upstream_cx_opening
    return stat.endswith("_active") or stat == "upstream_cx_opening"


class SidecarCollector:
    def __init__(self, runtime: Server) -> None:
        self.runtime = runtime

    def collect(self):
        rt = self.runtime
        rq = CounterMetricFamily("meshkeeper_upstream_rq", "Upstream requests by cluster and response code class",
                                 labels=["cluster", "code_class"])
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for name in sorted(rt.clusters.names()):
            for stat, value in rt.clusters.get(name).stats.snapshot().items():
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
        for name in sorted(rt.clusters.names()):
            hist = rt.clusters.get(name).rq_time
            upstream_time.add_metric([name], hist.buckets(), hist.sum)
        yield upstream_time

        downstream_time = HistogramMetricFamily(
            "meshkeeper_downstream_rq_duration_seconds",
            "Downstream request time by listener: the request's first byte in to its response's last byte out",
            labels=["listener"])
        by_route = CounterMetricFamily(
            "meshkeeper_requests", "Responses by listener, route, cluster and status class (route and cluster "
            "are empty for requests answered before routing, such as 429 RL and 404 NR)",
            labels=["listener", "route", "cluster", "code_class"])
        by_grpc = CounterMetricFamily(
            "meshkeeper_grpc_requests", "gRPC calls by listener, route, cluster and grpc-status (the call's "
            "outcome: HTTP says 200 for nearly all of them)", labels=["listener", "route", "cluster", "grpc_status"])
        for lrt in (*rt.listener_contexts.values(), *rt.chain_contexts.values()):
            downstream_time.add_metric([lrt.name], lrt.rq_time.buckets(), lrt.rq_time.sum)
            for (route, cluster), counts in sorted(lrt.route_stats.items()):
                for i, n in enumerate(counts):
                    if n:
                        by_route.add_metric([lrt.name, route, cluster, f"{i + 1}xx"], n)
            for (route, cluster, code), n in sorted(lrt.grpc_stats.items()):
                by_grpc.add_metric([lrt.name, route, cluster, str(code)], n)
        yield downstream_time
        yield by_route
        yield by_grpc
        tracer = rt.tracer
        if tracer is not None:
            st = tracer.stats
            yield CounterMetricFamily("meshkeeper_tracing_spans_sampled", "Spans recorded for export",
                                      value=st.spans_sampled)
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
        access_log = rt.access_log
        if access_log is not None:
            yield CounterMetricFamily("meshkeeper_access_log_lines", "Access log lines handed to the writer",
                                      value=access_log.lines)
            yield CounterMetricFamily("meshkeeper_access_log_write_errors", "Failed access log writes",
                                      value=access_log.write_errors)
            yield CounterMetricFamily("meshkeeper_access_log_dropped_lines",
                                      "Access log lines dropped because the writer was too far behind "
                                      "(a stalled stdout reader)", value=access_log.dropped)

        down: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for listener in rt.listeners_view():
            for stat, value in listener["stats"].items():
                fam = down.get(stat)
                if fam is None:
                    mname = f"meshkeeper_listener_{stat}"
                    kind = GaugeMetricFamily if _is_gauge(stat) else CounterMetricFamily
                    fam = down[stat] = kind(mname, f"Envoy-style listener statistic {stat}", labels=["listener"])
                fam.add_metric([listener["name"]], value)
        yield from down.values()

        dns = rt.dns
        if dns is not None:  # the mesh DNS (transparent mode): its Envoy dns_filter-style counters
            for stat, value in dns.snapshot().items():
                kind = GaugeMetricFamily if _is_gauge(stat) else CounterMetricFamily
                yield kind(f"meshkeeper_dns_{stat}", f"Mesh DNS statistic {stat}", value=value)

        ads = rt.ads
        if ads is not None:
            updates = CounterMetricFamily("meshkeeper_xds_updates", "xDS responses by type and result",
                                          labels=["type", "result"])
            for type_url, st in ads.state.items():
                updates.add_metric([xds.SHORT_TYPE[type_url], "accepted"], st.accepted)
                updates.add_metric([xds.SHORT_TYPE[type_url], "rejected"], st.rejected)
            yield updates
            yield GaugeMetricFamily("meshkeeper_xds_connected", "1 while the ADS stream is up", value=int(ads.connected))
            yield GaugeMetricFamily("meshkeeper_xds_synced", "1 while every subscribed resource has arrived",
                                    value=int(ads.synced))
        node = rt.node
        info = GaugeMetricFamily("meshkeeper_sidecar_info", "This sidecar: its service, namespace, version and node id "
                                 "(join on it to label its other series by service)",
                                 labels=["service", "namespace", "version", "node_id"])
        info.add_metric([node.service, node.namespace, node.version, node.node_id], 1)
        yield info
        reg = rt.registration
        if reg is not None:
            yield GaugeMetricFamily("meshkeeper_registration_registered", "1 while the instance znode exists",
                                    value=int(reg.registered))
            yield GaugeMetricFamily("meshkeeper_app_healthy", "1 while the local app passes health checks",
                                    value=int(reg.healthy))
            yield GaugeMetricFamily("meshkeeper_zookeeper_connected", "1 while the ZooKeeper session is connected",
                                    value=int(reg.zk.connected))


class SidecarMetrics:
    def __init__(self, runtime: Server) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SidecarCollector(runtime))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
