"""deploy/grafana and deploy/prometheus without processes: they parse, hang together, and the PromQL is sound.

Whether every metric they name is really served is tests/integration/test_deploy_artefacts.py's
job; here is what a user relies on when importing the dashboard or loading the config. Where
``promtool`` is installed (Debian's ``prometheus`` package), Prometheus' own parser checks every
query and both configs too.
"""

from __future__ import annotations

import re

import pytest

from tests.harness.deploy import (
    CONTROLPLANE_JOB,
    SIDECAR_JOB,
    data_panels,
    job_names,
    jobs,
    label_names,
    legend_labels,
    load_dashboard,
    load_prometheus,
    local_example,
    metric_names,
    panels,
    promtool,
    promtool_check_config,
    promtool_check_rules,
    queries,
    target_labels,
    unbalanced,
)

MIN_PANELS = 30
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def board() -> dict:
    return load_dashboard()


@pytest.fixture(scope="module")
def config() -> dict:
    return load_prometheus()


def variables(board: dict) -> dict[str, dict]:
    return {v["name"]: v for v in board["templating"]["list"]}


# ----------------------------------------------------------------------------- the checkers themselves


def test_checkers_catch_what_they_are_for():
    assert unbalanced('sum(rate(meshkeeper_x{a="("}[5m]))') is None
    assert unbalanced("sum(rate(meshkeeper_x[5m])") == "unclosed '(' at 3"
    assert unbalanced("sum(meshkeeper_x{a=\"b\")}") is not None
    assert metric_names("__meta_kubernetes_pod_annotation_meshkeeper_io_sidecar meshkeeper_a_total{") == {
        "meshkeeper_a_total"}
    assert label_names('sum by (le, cluster) (rate(m{code_class!="5xx", x=~"a=b"}[1m]))') == {
        "le", "cluster", "code_class", "x"}
    assert label_names('label_values(m{a=~"$a", b="c"}, service)') == {"a", "b", "service"}


# ----------------------------------------------------------------------------- the dashboard


def test_dashboard_identity_and_datasource_variable(board):
    assert board["uid"] == "meshkeeper-mesh" and len(board["uid"]) <= 40
    assert board["title"]
    assert board["schemaVersion"] >= 36
    assert board["id"] is None  # so an import creates it rather than overwriting another
    ds = variables(board)["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"


def test_template_variables_query_labels_the_scrape_config_sets(board, config):
    vars_ = variables(board)
    added = target_labels(config)
    for name in ("namespace", "service", "cluster"):
        var = vars_[name]
        assert var["type"] == "query" and var["datasource"] == DATASOURCE, name
        # "All" must also match series without the label (a local run with bare static targets).
        assert var["includeAll"] and var["allValue"] == ".*", name
    assert {"namespace", "service"} <= added, "prometheus.yml must set the labels the variables filter on"


def test_every_panel_has_a_datasource_and_a_query(board):
    shown = data_panels(board)
    assert len(shown) >= MIN_PANELS
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in shown:
        where = f"panel {p['title']!r}"
        assert p["datasource"] == DATASOURCE, where
        assert p.get("targets"), where
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), where
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE and t["expr"].strip(), where
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, where
    # Collapsed rows keep their panels inside; the walk must reach them.
    assert any(p.get("collapsed") and p["panels"] for p in panels(board) if p["type"] == "row")


def test_every_query_is_balanced(board):
    problems = [f"{where}: {why}: {expr}" for where, expr in queries(board) if (why := unbalanced(expr))]
    assert not problems, "\n".join(problems)


def test_queries_name_only_meshkeeper_metrics_and_known_jobs(board, config):
    for where, expr in queries(board):
        # Every query reads at least one meshkeeper metric: no stray copy from another dashboard.
        assert metric_names(expr), where
        assert job_names(expr) <= set(jobs(config)), where


def test_legends_name_labels_that_queries_keep(board):
    grouped = set().union(*(label_names(expr) for _, expr in queries(board)))
    assert legend_labels(board) <= grouped


@pytest.mark.skipif(promtool() is None, reason="promtool not installed (Debian: apt-get install prometheus)")
def test_promtool_parses_every_query(board):
    assert promtool_check_rules(queries(board)) is None


# ----------------------------------------------------------------------------- the Prometheus config


def _ports(job: dict) -> set[int]:
    """Ports the job scrapes: from relabel rules that set __address__, and from static targets."""
    out = set()
    for rule in job.get("relabel_configs") or ():
        if rule.get("target_label") == "__address__":
            out.update(int(p) for p in re.findall(r":(\d+)$", str(rule.get("replacement", ""))))
    for group in job.get("static_configs") or ():
        out.update(int(t.rsplit(":", 1)[1]) for t in group["targets"])
    return out


def test_prometheus_config_has_both_jobs(config):
    assert config["global"]["scrape_interval"]
    found = jobs(config)
    cp, sc = found[CONTROLPLANE_JOB], found[SIDECAR_JOB]
    assert cp["metrics_path"] == "/metrics" and _ports(cp) == {15014}
    assert sc["metrics_path"] == "/stats/prometheus" and _ports(sc) == {15000}
    for job in (cp, sc):
        assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
        keeps = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
        assert keeps and all("annotation_meshkeeper_io" in r["source_labels"][0] for r in keeps)
    assert {"namespace", "pod", "service"} <= target_labels({"scrape_configs": [sc]})


def test_local_example_is_a_config_of_the_same_jobs(config):
    local = jobs(local_example())
    assert set(local) == set(jobs(config))
    assert local[CONTROLPLANE_JOB]["metrics_path"] == "/metrics"
    assert local[SIDECAR_JOB]["metrics_path"] == "/stats/prometheus"
    assert 15014 in _ports(local[CONTROLPLANE_JOB]) and 15000 in _ports(local[SIDECAR_JOB])


@pytest.mark.skipif(promtool() is None, reason="promtool not installed (Debian: apt-get install prometheus)")
def test_promtool_accepts_both_configs(config):
    assert promtool_check_config(config) is None
    assert promtool_check_config(local_example()) is None
