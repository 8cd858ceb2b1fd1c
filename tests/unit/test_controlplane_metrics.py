"""The control plane's metric names and the per-proxy series (bounded by the open ADS streams)."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from controlplane.cache import SnapshotCache
from controlplane.lrs import LoadStore
from controlplane.metrics import Metrics
from controlplane.proxies import ProxyRegistry
from controlplane.watch import RegistryWatch
from controlplane.web import Web
from meshkeeper.xds import CLUSTER, ENDPOINT, NodeInfo


class Mono:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def families(metrics: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def samples(metrics: Metrics, name: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_names_follow_prometheus_conventions() -> None:
    metrics = Metrics()
    proxies = ProxyRegistry(metrics)
    p = proxies.connect(NodeInfo(node_id="n1", service="web"), "peer")
    proxies.sent(p, CLUSTER, "v1", "1")
    proxies.acked(p, CLUSTER, "v1")
    metrics.lrs_reports.inc()
    for name, family in families(metrics).items():
        if name.endswith("_created"):
            continue  # the process disables these (controlplane.main); tests leave them on
        assert name.startswith("meshkeeper_"), name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples if not s.name.endswith("_created")), name
        if "latency" in name or "build" in name or "duration" in name:
            assert name.endswith("_seconds"), name
    assert {"meshkeeper_lrs_streams", "meshkeeper_lrs_reports", "meshkeeper_zookeeper_events",
            "meshkeeper_xds_proxy_pushes", "meshkeeper_xds_proxy_nacks",
            "meshkeeper_xds_proxy_last_push_ack_latency_seconds", "meshkeeper_snapshot_build_seconds",
            "meshkeeper_xds_nacks"} <= set(families(metrics))


def test_per_proxy_series_exist_only_for_connected_proxies() -> None:
    metrics, mono = Metrics(), Mono()
    proxies = ProxyRegistry(metrics, mono=mono)
    a = proxies.connect(NodeInfo(node_id="a", service="web"), "peer")
    b = proxies.connect(NodeInfo(node_id="b", service="web"), "peer")
    proxies.sent(a, CLUSTER, "v1", "1")
    mono.now = 0.25
    proxies.acked(a, CLUSTER, "v1")
    proxies.sent(a, CLUSTER, "v2", "2")
    proxies.nacked(a, CLUSTER, "v2", "bad")
    proxies.sent(b, ENDPOINT, "e1", "1")
    pushes = samples(metrics, "meshkeeper_xds_proxy_pushes_total")
    assert pushes == {(("node_id", "a"), ("type", "CDS")): 2, (("node_id", "b"), ("type", "EDS")): 1}
    assert samples(metrics, "meshkeeper_xds_proxy_nacks_total")[(("node_id", "a"), ("type", "CDS"))] == 1
    # only pushes that were ACKed have a latency
    assert samples(metrics, "meshkeeper_xds_proxy_last_push_ack_latency_seconds") == {
        (("node_id", "a"), ("type", "CDS")): 0.25}
    assert samples(metrics, "meshkeeper_xds_nacks_total")[(("type", "CDS"),)] == 1
    assert samples(metrics, "meshkeeper_xds_pushes_total")[(("type", "CDS"),)] == 2

    # A reconnect the old stream has not noticed: one series per node, the newest stream's.
    a2 = proxies.connect(NodeInfo(node_id="a", service="web"), "peer")
    proxies.sent(a2, CLUSTER, "v2", "1")
    assert samples(metrics, "meshkeeper_xds_proxy_pushes_total")[(("node_id", "a"), ("type", "CDS"))] == 1
    proxies.disconnect(a)
    proxies.disconnect(a2)
    assert {k for k in samples(metrics, "meshkeeper_xds_proxy_pushes_total")} == {(("node_id", "b"), ("type", "EDS"))}
    proxies.disconnect(b)
    assert samples(metrics, "meshkeeper_xds_proxy_pushes_total") == {}
    assert samples(metrics, "meshkeeper_xds_pushes_total")[(("type", "CDS"),)] == 3  # the per-type counter stays


def test_api_proxies_shows_per_type_push_counts_and_latency() -> None:
    metrics, mono = Metrics(), Mono()
    proxies = ProxyRegistry(metrics, mono=mono, wall=lambda: 0.0)
    web = Web(SnapshotCache(metrics), proxies, metrics, lambda: "CONNECTED")
    p = proxies.connect(NodeInfo(node_id="n1", service="web"), "peer")
    proxies.sent(p, CLUSTER, "v1", "1")
    mono.now = 0.5
    proxies.acked(p, CLUSTER, "v1")
    [entry] = json.loads(web("GET", "/api/proxies", {}, {}, b"")[2])
    cds = entry["types"]["CDS"]
    assert (cds["pushes"], cds["nacks"], cds["last_push_ack_latency_seconds"]) == (1, 0, 0.5)


def test_api_load_serves_the_store_with_a_namespace_filter() -> None:
    metrics = Metrics()
    store = LoadStore(5.0)
    web = Web(SnapshotCache(metrics), ProxyRegistry(metrics), metrics, lambda: "CONNECTED", store)
    status, ctype, body = web("GET", "/api/load", {}, {}, b"")
    assert status == 200 and ctype == "application/json"
    assert json.loads(body) == {"interval_seconds": 5.0, "services": [], "reporters": 0}
    assert json.loads(web("GET", "/api/load", {"namespace": "prod"}, {}, b"")[2])["services"] == []


def test_zookeeper_events_are_counted_by_type() -> None:
    metrics = Metrics()
    watch = RegistryWatch(source=None, on_snapshot=lambda snap: None, metrics=metrics)  # type: ignore[arg-type]
    watch._on_state("SUSPENDED")  # the source's callbacks, as kazoo's threads hand them over
    watch._on_event("/meshkeeper", "CHILD")
    watch._on_event("/meshkeeper/ns/services/a", "CHANGED")
    watch._on_event("/meshkeeper/ns/services/a", "NONE")
    got = samples(metrics, "meshkeeper_zookeeper_events_total")
    assert got[(("type", "SUSPENDED"),)] == 1 and got[(("type", "CHILD"),)] == 1
    assert got[(("type", "CHANGED"),)] == 1 and got[(("type", "OTHER"),)] == 1
    assert len(got) == 8  # a fixed set, all exposed from the start
