"""The sidecar's /stats/prometheus: read at scrape time from the data path's plain counters."""

from prometheus_client.parser import text_string_to_metric_families

from meshkeeper.xds import NodeInfo
from sidecar.config import ClusterConfig
from sidecar.runtime import SidecarRuntime


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
