"""Reading the observability artefacts under deploy/: the Grafana dashboard and the Prometheus config.

What tests/unit/test_deploy_files.py and tests/integration/test_deploy_artefacts.py check them
with: the panels (rows' nested ones included), every PromQL query with where it sits, the metric
and label names a query uses, bracket balance, and the scraped names to compare them with::

    board = load_dashboard()
    for where, expr in queries(board):
        assert not unbalanced(expr), where
        missing = metric_names(expr) - sample_names(scrape_text)

Only PyYAML and prometheus-client are needed; ``promtool`` (Debian's ``prometheus`` package) is
used when installed, for a real PromQL and config check.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "meshkeeper-dashboard.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"

CONTROLPLANE_JOB = "meshkeeper-controlplane"
SIDECAR_JOB = "meshkeeper-sidecar"
# Labels Prometheus gives every target whatever the relabelling does.
TARGET_LABELS = frozenset({"job", "instance"})

_METRIC = re.compile(r"(?<![A-Za-z0-9_:])meshkeeper_[A-Za-z0-9_:]+")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"(meshkeeper_[A-Za-z0-9_:]+)\s*\{([^}]*)\}")
_LABEL_VALUES = re.compile(r"label_values\((?:([^()]*?),)?\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)")
_LEGEND = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_JOB = re.compile(r"\bjob\s*=\s*\"([^\"]*)\"")
_GRAFANA_RANGE = re.compile(r"\$(?:__rate_interval|__interval|__range)\b|\$\{(?:__rate_interval|__interval|__range)\}")
_GRAFANA_VAR = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")
_LOCAL_EXAMPLE = re.compile(r"^# --- local example: begin ---\n(.*?)^# --- local example: end ---$", re.S | re.M)


# ----------------------------------------------------------------------------- files


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def load_prometheus(path: Path = PROMETHEUS) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def local_example(path: Path = PROMETHEUS) -> dict[str, Any]:
    """The commented static_configs example at the end of prometheus.yml, uncommented and parsed."""
    match = _LOCAL_EXAMPLE.search(path.read_text())
    if match is None:
        raise AssertionError(f"{path}: no '# --- local example: begin/end ---' block")
    lines = match.group(1).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# scrape_configs:"))
    return yaml.safe_load("\n".join(re.sub(r"^# ?", "", line) for line in lines[start:]))


def jobs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in config.get("scrape_configs") or ()}


def target_labels(config: dict[str, Any]) -> set[str]:
    """Labels the config's relabelling and static targets add to every scraped series."""
    out = set(TARGET_LABELS)
    for job in jobs(config).values():
        for rule in job.get("relabel_configs") or ():
            label = rule.get("target_label")
            if label and not label.startswith("__"):
                out.add(label)
        for group in job.get("static_configs") or ():
            out.update((group.get("labels") or {}).keys())
    return out


# ----------------------------------------------------------------------------- the dashboard


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels nested in collapsed rows."""

    def walk(items: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from walk(panel.get("panels") or ())

    return walk(board.get("panels") or ())


def data_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels that show data (everything but rows)."""
    return [p for p in panels(board) if p.get("type") != "row"]


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query template variable."""
    out = []
    for panel in panels(board):
        for target in panel.get("targets") or ():
            if target.get("expr"):
                out.append((f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
    for var in board.get("templating", {}).get("list", ()):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        for i, q in enumerate(dict.fromkeys(x for x in (text, var.get("definition")) if x)):
            out.append((f"variable ${var['name']}{' definition' if i else ''}", q))
    return out


def strings(obj: Any) -> Iterator[str]:
    """Every string in a JSON document, at any depth (titles and descriptions too)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def legend_labels(board: dict[str, Any]) -> set[str]:
    """Labels named by ``{{label}}`` in legend formats."""
    out: set[str] = set()
    for panel in panels(board):
        for target in panel.get("targets") or ():
            out.update(_LEGEND.findall(target.get("legendFormat") or ""))
    return out


# ----------------------------------------------------------------------------- PromQL text


def metric_names(text: str) -> set[str]:
    """Identifiers starting with ``meshkeeper_`` (a pod annotation's ``..._meshkeeper_io_...`` is not one)."""
    return set(_METRIC.findall(text))


def _blank_strings(expr: str) -> str:
    return _STRING.sub('""', expr)


def label_names(expr: str) -> set[str]:
    """Labels an expression matches on or groups by (``__name__`` and friends left out)."""
    text = _blank_strings(expr)
    out = set(_MATCHER.findall(text)) | {label for _, label in _LABEL_VALUES.findall(text)}
    for group in _GROUPING.findall(text):
        out.update(x.strip() for x in group.split(",") if x.strip())
    return {x for x in out if not x.startswith("__")}


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric, {label: operator+value}) for each ``meshkeeper_x{...}`` selector with matchers."""
    out = []
    for metric, body in _SELECTOR.findall(expr):
        matchers = {}
        for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(\"(?:[^\"\\]|\\.)*\")", body):
            matchers[m.group(1)] = m.group(2) + m.group(3)
        out.append((metric, matchers))
    return out


def job_names(expr: str) -> set[str]:
    return set(_JOB.findall(expr))


def unbalanced(expr: str) -> str | None:
    """Why the brackets of ``expr`` do not balance, or None; quoted strings are skipped."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[tuple[str, int]] = []
    text = _blank_strings(expr)
    if text.count('"') % 2:
        return "unterminated string"
    for i, ch in enumerate(text):
        if ch in "([{":
            stack.append((ch, i))
        elif ch in pairs:
            if not stack or stack[-1][0] != pairs[ch]:
                return f"unexpected {ch!r} at {i}"
            stack.pop()
    if stack:
        ch, i = stack[-1]
        return f"unclosed {ch!r} at {i}"
    return None


def as_plain_promql(expr: str) -> str | None:
    """``expr`` with Grafana's variables filled in, as Prometheus itself would receive it.

    A ``label_values(selector, label)`` variable query becomes its selector (None without one).
    """
    match = _LABEL_VALUES.fullmatch(expr.strip())
    if match:
        if not match.group(1):
            return None
        expr = match.group(1)
    return _GRAFANA_VAR.sub(".*", _GRAFANA_RANGE.sub("5m", expr))


# ----------------------------------------------------------------------------- scrapes


def samples(text: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(sample name, labels) of every sample in a Prometheus text exposition."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, sample.labels


def sample_names(text: str) -> set[str]:
    return {name for name, _ in samples(text)}


def labels_by_sample(text: str) -> dict[str, set[str]]:
    """Sample name -> every label name seen on it."""
    out: dict[str, set[str]] = {}
    for name, labels in samples(text):
        out.setdefault(name, set()).update(labels)
    return out


# ----------------------------------------------------------------------------- promtool


def promtool() -> str | None:
    return shutil.which("promtool")


def promtool_check_rules(exprs: Iterable[tuple[str, str]]) -> str | None:
    """Parse every expression with ``promtool check rules`` (one recording rule each).

    Returns None when all parse, else promtool's output naming the rule (``q<N>``) and the error.
    """
    plain = [as_plain_promql(expr) for _, expr in exprs]
    rules = [{"record": f"meshkeeper:check:q{i}", "expr": e} for i, e in enumerate(plain) if e is not None]
    return _promtool("rules", {"groups": [{"name": "dashboard", "rules": rules}]})


def promtool_check_config(config: dict[str, Any]) -> str | None:
    """``promtool check config``; None when valid, else promtool's output.

    Debian's promtool is built without Kubernetes discovery ("field kubernetes_sd_configs not
    found"); then the check runs again with that section emptied, so relabelling and everything
    else is still checked by Prometheus' own parser.
    """
    error = _promtool("config", config)
    if error and "kubernetes_sd_configs not found" in error:
        stripped = {**config, "scrape_configs": [
            {**{k: v for k, v in job.items() if k != "kubernetes_sd_configs"},
             **({"static_configs": []} if "kubernetes_sd_configs" in job else {})}
            for job in config.get("scrape_configs") or ()]}
        error = _promtool("config", stripped)
    return error


def _promtool(what: str, document: dict[str, Any]) -> str | None:
    tool = promtool()
    if tool is None:
        raise RuntimeError("promtool is not installed")
    with tempfile.TemporaryDirectory(prefix="meshkeeper-promtool-") as tmp:
        path = Path(tmp) / f"{what}.yml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        proc = subprocess.run([tool, "check", what, str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        return None
    return (proc.stdout + proc.stderr).strip()
