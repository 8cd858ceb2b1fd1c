"""The sidecar's /stats/prometheus: read at scrape time from the data path's plain counters."""

from prometheus_client.parser import text_string_to_metric_families

from meshkeeper.xds import NodeInfo
from sidecar.config import ClusterConfig, OutlierConfig
from sidecar.runtime import SidecarRuntime
from sidecar.upstream.stats import CLUSTER_STATS


async def test_exposition_has_one_family_per_name_and_counts_by_code_class():
    rt = SidecarRuntime(NodeInfo(node_id="n", service="s"))
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
    rt = SidecarRuntime(NodeInfo(node_id="n", service="s"))
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
