"""Every Prometheus metric of the control plane, declared in one place.

Each :class:`Metrics` owns its own ``CollectorRegistry`` (no process-global state, so tests can
build many). Components receive the object and touch only the metrics named for them; ``/metrics``
renders :meth:`Metrics.render`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ZK_STATES = ("CONNECTED", "SUSPENDED", "LOST")

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
        self.snapshot_build = Histogram(
            "meshkeeper_snapshot_build_seconds",
            "Time to build a snapshot: stage=registry (tree to RegistrySnapshot) or xds (shared resources)",
            ["stage"], buckets=_BUILD_BUCKETS, registry=r)
        for t in ("CDS", "EDS", "LDS", "RDS"):
            for m in (self.pushes, self.acks, self.nacks):
                m.labels(type=t)
        self.set_zk_state("LOST")

    def set_zk_state(self, state: str) -> None:
        for s in ZK_STATES:
            self.zk_state.labels(state=s).set(1 if s == state else 0)
        self.zk_connected.set(1 if state == "CONNECTED" else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
