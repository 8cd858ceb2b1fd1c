"""deploy/prometheus/meshkeeper-alerts.yml: Prometheus alerting rules for the same conditions as
the control plane's alert rules. Checked for Prometheus' rule-file structure, balanced PromQL,
metric names the sidecar and control plane really export (their collectors' source), and with
``promtool check rules`` where installed."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.harness.deploy import ROOT, metric_names, unbalanced

RULES = ROOT / "deploy" / "prometheus" / "meshkeeper-alerts.yml"
EXPORTERS = (ROOT / "sidecar" / "metrics.py", ROOT / "controlplane" / "metrics.py")
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_rule_is_a_complete_alert(rules):
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) >= 4
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert {"summary", "description"} <= set(r["annotations"]), r["alert"]
        assert unbalanced(r["expr"]) is None, r["alert"]


def test_the_four_conditions_are_covered(rules):
    text = " ".join(r["expr"] for r in rules)
    assert 'code_class="5xx"' in text  # error ratio
    assert "histogram_quantile(0.99" in text  # p99 latency
    assert "meshkeeper_registration_registered" in text  # instances
    assert 'result="rejected"' in text  # NACKs


def test_metric_names_are_exported(rules):
    source = "\n".join(p.read_text() for p in EXPORTERS)
    for r in rules:
        for name in metric_names(r["expr"]):
            base = next((name[:-len(s)] for s in SUFFIXES if name.endswith(s)), name)
            assert f'"{base}"' in source, f"{r['alert']}: {name} is not exported"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: apt-get install prometheus)")
def test_promtool_accepts_the_rules():
    proc = subprocess.run([shutil.which("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
