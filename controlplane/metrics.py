"""Every Prometheus metric of the control plane, declared in one place.

Each :class:`Metrics` owns its own ``CollectorRegistry`` (no process-global state, so tests can
build many). Components receive the object and touch only the metrics named for them; ``/metrics``
renders :meth:`Metrics.render`.

Names follow Prometheus conventions: ``meshkeeper_`` prefix, the unit in the name (``_seconds``),
counters exposed as ``<name>_total``. Label values come from small fixed sets (xDS type, ZooKeeper
event type or state, snapshot stage, bad-znode kind), with one exception: the per-proxy series
(``meshkeeper_xds_proxy_*{node_id,type}``) are produced at scrape time from the proxies connected
*now* (:meth:`Metrics.track_proxies`), so a proxy that disconnects leaves the scrape with it and
the label set is bounded by the open ADS streams, not by every proxy ever seen. Their counters
restart at 0 on a new stream, which Prometheus' ``rate()`` reads as a counter reset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ZK_STATES = ("CONNECTED", "SUSPENDED", "LOST")
# meshkeeper_zookeeper_events_total{type}: kazoo's watch event types, then session state changes.
ZK_WATCH_EVENTS = ("CREATED", "DELETED", "CHANGED", "CHILD")
ZK_EVENT_TYPES = (*ZK_WATCH_EVENTS, *ZK_STATES, "OTHER")

# Push-to-ACK is dominated by the client's apply time: milliseconds on a LAN, seconds when stuck.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BUILD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # xDS server
        self.connected_proxies = Gauge(
            "meshkeeper_xds_connected_proxies", "ADS streams currently open", registry=r)
        self.pushes = Counter(
            "meshkeeper_xds_pushes_total", "DiscoveryResponses sent, by xDS type", ["type"], registry=r)
        self.acks = Counter(
            "meshkeeper_xds_acks_total", "DiscoveryRequests that ACKed a response, by xDS type",
            ["type"], registry=r)
        self.nacks = Counter(
            "meshkeeper_xds_nacks_total", "DiscoveryRequests that NACKed a response (error_detail set)",
            ["type"], registry=r)
        self.push_ack_latency = Histogram(
            "meshkeeper_xds_push_ack_latency_seconds", "Time from sending a response to its ACK",
            ["type"], buckets=_LATENCY_BUCKETS, registry=r)
        # virtual IPs (controlplane.vips)
        self.vip_changes = Counter(
            "meshkeeper_vips_changes_total", "Virtual IPs allocated or released by this replica; failed "
            "reconciles (ZooKeeper unavailable, the range exhausted) and conflicts (two services on one address)",
            ["action"], registry=r)
        # registry watch
        self.zk_state = Gauge(
            "meshkeeper_zookeeper_connection_state",
            "ZooKeeper client state (1 for the current one of CONNECTED, SUSPENDED, LOST)",
            ["state"], registry=r)
        self.zk_connected = Gauge(
            "meshkeeper_zookeeper_connected", "1 while the ZooKeeper session is connected", registry=r)
        self.zk_resyncs = Counter(
            "meshkeeper_zookeeper_resyncs_total", "Full registry re-reads after a (re)connect", registry=r)
        self.snapshot_version = Gauge(
            "meshkeeper_registry_snapshot_version", "Version of the last published registry snapshot",
            registry=r)
        self.snapshot_services = Gauge(
            "meshkeeper_registry_services", "Services in the last published snapshot", registry=r)
        self.snapshot_instances = Gauge(
            "meshkeeper_registry_instances", "Instances in the last published snapshot", registry=r)
        self.bad_znodes = Counter(
            "meshkeeper_registry_bad_znodes_total",
            "Znodes refused (bad name or payload), once per path and mzxid", ["kind"], registry=r)
        self.bad_znodes_current = Gauge(
            "meshkeeper_registry_bad_znodes_current", "Znodes whose current payload is refused", registry=r)
        self.zk_events = Counter(
            "meshkeeper_zookeeper_events",
            "ZooKeeper events received by the registry watch: type is the watch event type "
            "(CREATED, DELETED, CHANGED, CHILD) or the new session state (CONNECTED, SUSPENDED, LOST)",
            ["type"], registry=r)
        self.snapshot_build = Histogram(
            "meshkeeper_snapshot_build_seconds",
            "Time to build a snapshot: stage=registry (tree to RegistrySnapshot) or xds (shared resources)",
            ["stage"], buckets=_BUILD_BUCKETS, registry=r)
        # load reporting (LRS)
        self.lrs_streams = Gauge(
            "meshkeeper_lrs_streams", "Load reporting (LRS) streams currently open", registry=r)
        self.lrs_reports = Counter(
            "meshkeeper_lrs_reports", "Load reports (LoadStatsRequests after the first) received",
            registry=r)
        # built-in trace store (controlplane.tracestore); the gauges read the store at scrape time
        self.tracestore_spans_received = Counter(
            "meshkeeper_tracestore_spans_received", "Spans accepted into the trace store over OTLP", registry=r)
        self.tracestore_spans_refused = Counter(
            "meshkeeper_tracestore_spans_refused",
            "Spans refused: reason=batch_too_large (an Export over the per-request limit) or malformed",
            ["reason"], registry=r)
        self.tracestore_traces_evicted = Counter(
            "meshkeeper_tracestore_traces_evicted", "Whole traces evicted to stay within the store's bounds",
            registry=r)
        self.tracestore_spans_evicted = Counter(
            "meshkeeper_tracestore_spans_evicted", "Spans evicted with their traces", registry=r)
        self.tracestore_spans = Gauge("meshkeeper_tracestore_spans", "Spans in the trace store", registry=r)
        self.tracestore_traces = Gauge("meshkeeper_tracestore_traces", "Traces in the trace store", registry=r)
        self.tracestore_bytes = Gauge(
            "meshkeeper_tracestore_bytes", "Bytes the trace store holds, by its own accounting", registry=r)
        for reason in ("batch_too_large", "malformed"):
            self.tracestore_spans_refused.labels(reason=reason)
        # alerts (controlplane.alerts)
        self.alert_rules = Gauge(
            "meshkeeper_alert_rules", "Alert rules in the last evaluation round", registry=r)
        self.alert_evaluations = Counter(
            "meshkeeper_alert_evaluations", "Rule evaluations, by result (ok, failed: state not written)",
            ["result"], registry=r)
        self.alert_transitions = Counter(
            "meshkeeper_alert_transitions", "Transitions this replica made (and notified): firing, resolved",
            ["state"], registry=r)
        self.alert_notifications = Counter(
            "meshkeeper_alert_notifications", "Webhook notifications by result (sent, failed after retries)",
            ["result"], registry=r)
        self.alert_notification_retries = Counter(
            "meshkeeper_alert_notification_retries", "Webhook POSTs retried after a failure", registry=r)
        for label in ("ok", "failed"):
            self.alert_evaluations.labels(result=label)
        for label in ("firing", "resolved"):
            self.alert_transitions.labels(state=label)
        for label in ("sent", "failed"):
            self.alert_notifications.labels(result=label)
        for t in ("CDS", "EDS", "LDS", "RDS", "RTDS"):
            for m in (self.pushes, self.acks, self.nacks):
                m.labels(type=t)
        for t in ZK_EVENT_TYPES:
            self.zk_events.labels(type=t)
        self.set_zk_state("LOST")

    def zk_event(self, kind: str) -> None:
        self.zk_events.labels(type=kind if kind in ZK_EVENT_TYPES else "OTHER").inc()

    def track_proxies(self, rows: Callable[[], Iterable[ProxyTypeRow]]) -> None:
        """Serve the per-proxy series from ``rows()``, called at each scrape (see the docstring)."""
        self.registry.register(_ProxyCollector(rows))

    def set_zk_state(self, state: str) -> None:
        for s in ZK_STATES:
            self.zk_state.labels(state=s).set(1 if s == state else 0)
        self.zk_connected.set(1 if state == "CONNECTED" else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ProxyTypeRow(NamedTuple):
    """One connected proxy's record of one xDS type, as the per-proxy series show it."""

    node_id: str
    type: str  # CDS, EDS, LDS, RDS, RTDS
    pushes: int
    nacks: int
    last_push_ack_latency: float | None  # seconds; None until a push of this stream was ACKed


class _ProxyCollector:
    def __init__(self, rows: Callable[[], Iterable[ProxyTypeRow]]) -> None:
        self._rows = rows

    def collect(self) -> Iterator[Metric]:
        pushes = CounterMetricFamily(
            "meshkeeper_xds_proxy_pushes", "DiscoveryResponses sent on this proxy's open ADS stream",
            labels=["node_id", "type"])
        nacks = CounterMetricFamily(
            "meshkeeper_xds_proxy_nacks", "NACKs received on this proxy's open ADS stream",
            labels=["node_id", "type"])
        latency = GaugeMetricFamily(
            "meshkeeper_xds_proxy_last_push_ack_latency_seconds",
            "Time from the last ACKed push of this type to its ACK, on this proxy's open ADS stream",
            labels=["node_id", "type"])
        for row in self._rows():
            labels = [row.node_id, row.type]
            pushes.add_metric(labels, row.pushes)
            nacks.add_metric(labels, row.nacks)
            if row.last_push_ack_latency is not None:
                latency.add_metric(labels, row.last_push_ack_latency)
        yield from (pushes, nacks, latency)
