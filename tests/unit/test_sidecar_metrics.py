"""The sidecar's /stats/prometheus: read at scrape time from the data path's plain counters."""

from prometheus_client.parser import text_string_to_metric_families

from meshkeeper.xds import NodeInfo
from sidecar.config import ClusterConfig, OutlierConfig
from sidecar.server import Server
from sidecar.upstream.stats import CLUSTER_STATS


async def test_exposition_has_one_family_per_name_and_counts_by_code_class():
    rt = Server(NodeInfo(node_id="n", service="s"))
    rt.apply_clusters({"outbound|a.default": ClusterConfig(name="outbound|a.default")})
    stats = rt.clusters.get("outbound|a.default").stats
    for status in (200, 200, 503):
        stats.upstream_rq_total += 1
        stats.count_status(status)
    body, _ = rt.metrics.exposition()
    families = list(text_string_to_metric_families(body.decode()))
    names = [f.name for f in families]
    assert len(names) == len(set(names))  # a strict parser refuses a repeated family
    rq = next(f for f in families if f.name == "meshkeeper_upstream_rq")
    by_class = {s.labels["code_class"]: s.value for s in rq.samples if s.name.endswith("_total")}
    assert by_class["2xx"] == 2 and by_class["5xx"] == 1


async def test_active_stats_are_gauges_and_the_rest_counters():
    rt = Server(NodeInfo(node_id="n", service="s"))
    rt.apply_clusters({"c": ClusterConfig(name="c", outlier=OutlierConfig())})
    stats = rt.clusters.get("c").stats
    for i, name in enumerate(CLUSTER_STATS):
        setattr(stats, name, i + 1)
    body, _ = rt.metrics.exposition()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert len(families) == len(list(text_string_to_metric_families(body.decode())))
    for name in ("upstream_rq_pending_active", "outlier_detection_ejections_active", "upstream_cx_active"):
        fam = families[f"meshkeeper_{name}"]
        assert fam.type == "gauge"
        assert fam.samples[0].labels == {"cluster": "c"}
        assert fam.samples[0].value == CLUSTER_STATS.index(name) + 1
    for name in ("outlier_detection_ejections_enforced_consecutive_5xx", "outlier_detection_ejections_overflow",
                 "lb_healthy_panic"):
        assert families[f"meshkeeper_{name}"].type == "counter"
    enforced = families["meshkeeper_outlier_detection_ejections_enforced"]  # from ..._enforced_total
    assert enforced.type == "counter"
    assert enforced.samples[0].value == CLUSTER_STATS.index("outlier_detection_ejections_enforced_total") + 1


async def test_histograms_request_counts_and_the_info_series():
    rt = Server(NodeInfo(node_id="sidecar~h~s-1.ns", service="s", namespace="ns", version="v2"))
    rt.apply_clusters({"outbound|a.ns": ClusterConfig(name="outbound|a.ns")})
    for seconds in (0.0004, 0.003, 0.003, 2.0):
        rt.clusters.get("outbound|a.ns").rq_time.observe(seconds)
    rt.listener_contexts["outbound"].route_stats[("a.ns", "outbound|a.ns")] = [0, 5, 0, 1, 2]
    body, _ = rt.metrics.exposition()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    up = (("cluster", "outbound|a.ns"),)
    assert samples[("meshkeeper_upstream_rq_duration_seconds_count", up)] == 4
    assert samples[("meshkeeper_upstream_rq_duration_seconds_bucket", (*up, ("le", "0.0005")))] == 1
    assert samples[("meshkeeper_upstream_rq_duration_seconds_bucket", (*up, ("le", "0.005")))] == 3
    assert samples[("meshkeeper_upstream_rq_duration_seconds_bucket", (*up, ("le", "+Inf")))] == 4
    assert abs(samples[("meshkeeper_upstream_rq_duration_seconds_sum", up)] - 2.0064) < 1e-9
    labels = (("cluster", "outbound|a.ns"), ("listener", "outbound"), ("route", "a.ns"))
    got = {cls: samples.get(("meshkeeper_requests_total", tuple(sorted((*labels, ("code_class", cls))))))
           for cls in ("1xx", "2xx", "4xx", "5xx")}
    assert got == {"1xx": None, "2xx": 5, "4xx": 1, "5xx": 2}
    info = (("namespace", "ns"), ("node_id", "sidecar~h~s-1.ns"), ("service", "s"), ("version", "v2"))
    assert samples[("meshkeeper_sidecar_info", info)] == 1


async def test_components_are_read_from_the_store_and_leave_with_their_registration():
    rt = Server(NodeInfo(node_id="n", service="s"))
    body, _ = rt.metrics.exposition()
    assert b"meshkeeper_xds_connected" not in body  # no ADS client yet: nothing registered for it

    class Ads:  # what the ADS client counts, as sidecar.metrics.ads_families reads it
        state: dict = {}
        connected = True
        synced = False

    rt.ads = Ads()
    body, _ = rt.metrics.exposition()
    assert b"meshkeeper_xds_connected 1.0" in body
    rt.ads = None
    assert b"meshkeeper_xds_connected" not in rt.metrics.exposition()[0]
    # Both bound listeners report under one family each (a repeated family would be refused).
    families = list(text_string_to_metric_families(rt.metrics.exposition()[0].decode()))
    total = next(f for f in families if f.name == "meshkeeper_listener_downstream_rq")
    assert sorted(s.labels["listener"] for s in total.samples) == ["inbound", "outbound"]
