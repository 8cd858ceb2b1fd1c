"""deploy/ against the real processes: every metric the dashboard and the scrape config name is served.

Topology: a control plane; ``catalog`` (one app beside its sidecar, access log to a file) and
``frontend`` (a sidecar whose outbound listener the test talks to with ``Host: catalog``), both
exporting spans to a real OTLP receiver so that the tracing series exist. A few requests make
the traffic series exist (2xx, a 404 NR and a 5xx), then both sidecars' ``/stats/prometheus``
and the control plane's ``/metrics`` are scraped and compared with the dashboard's queries and
prometheus.yml, comments included. A renamed or removed metric fails here, by name.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

import pytest

from tests.harness import http_get, wait_until
from tests.harness.deploy import (
    CONTROLPLANE_JOB,
    PROMETHEUS,
    SIDECAR_JOB,
    label_names,
    labels_by_sample,
    legend_labels,
    load_dashboard,
    load_prometheus,
    metric_names,
    queries,
    selectors,
    strings,
    target_labels,
)
from tests.harness.otlp import OtlpReceiver
from tests.harness.scrape import metric_value

pytestmark = pytest.mark.integration


@dataclass
class Scrapes:
    """Sample name -> label names, per Prometheus job, as the real processes expose them."""

    by_job: dict[str, dict[str, set[str]]]

    @property
    def names(self) -> set[str]:
        return set().union(*self.by_job.values())

    def labels(self, name: str) -> set[str]:
        return set().union(*(job.get(name, set()) for job in self.by_job.values()))


def _text(url: str) -> str:
    status, _, body = http_get(url)
    assert status == 200, f"{url}: {status}"
    return body.decode()


def _merge(texts: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for text in texts:
        for name, labels in labels_by_sample(text).items():
            out.setdefault(name, set()).update(labels)
    return out


@pytest.fixture
def receiver():
    with OtlpReceiver() as r:  # requested before procs, so it outlives the sidecars' last export
        yield r


@pytest.fixture
def scrapes(receiver, procs, zk_server, namespace, tmp_path) -> Scrapes:
    cp = procs.controlplane(zk_server.hosts)
    xds = f"127.0.0.1:{cp.port('xds_port')}"
    common = {"zk_session_timeout": "2", "otlp_endpoint": receiver.endpoint, "trace_sample_ratio": "1"}
    catalog_app = procs.app("catalog")
    catalog = procs.sidecar("catalog", catalog_app.port("port"), cp=xds, zk=zk_server.hosts,
                            namespace=namespace, access_log=str(tmp_path / "catalog-access.log"), **common)
    frontend = procs.sidecar("frontend", procs.app("frontend").port("port"), cp=xds, zk=zk_server.hosts,
                             namespace=namespace, access_log="off", **common)
    out = f"http://127.0.0.1:{frontend.port('outbound_port')}"
    route = {"Host": "catalog"}
    wait_until(lambda: http_get(f"{out}/", route)[0] == 200, 10, message="frontend routes to catalog")
    for _ in range(3):
        assert http_get(f"{out}/items", route)[0] == 200
    assert http_get(f"{out}/", {"Host": "no-such-service"})[0] == 404  # NR: answered before routing
    # One 5xx from the app (sticky failure mode, switched back at once); retries may repeat it.
    assert http_get(f"{out}/fail?status=503", route)[0] == 200
    try:
        assert http_get(f"{out}/", route)[0] == 503
    finally:
        assert http_get(f"{out}/fail?status=0", route)[0] == 200
    receiver.wait_for(1)  # the exporter ran: the tracing series have moved, not only exist

    sidecars = [_text(f"{s.admin_url}/stats/prometheus") for s in (catalog, frontend)]
    controlplane = _text(f"http://127.0.0.1:{cp.port('http_port')}/metrics")
    assert metric_value(sidecars[1], "meshkeeper_requests_total", code_class="5xx") >= 1
    assert metric_value(sidecars[1], "meshkeeper_requests_total", code_class="4xx") >= 1
    return Scrapes({SIDECAR_JOB: _merge(sidecars), CONTROLPLANE_JOB: _merge([controlplane])})


def _missing(wanted: set[str], scrapes: Scrapes, where: str) -> list[str]:
    out = []
    for name in sorted(wanted - scrapes.names):
        near = difflib.get_close_matches(name, scrapes.names, n=3, cutoff=0.6)
        out.append(f"{where}: {name} is not served" + (f" (served: {', '.join(near)})" if near else ""))
    return out


def test_deploy_artefacts_name_only_what_the_processes_serve(scrapes):
    """One mesh, every check; the failure lists every problem at once, each metric by name."""
    board = load_dashboard()
    problems: list[str] = []

    # 1. Metric names: in queries, and anywhere else in the dashboard (a description must not lie).
    in_queries = set().union(*(metric_names(expr) for _, expr in queries(board)))
    in_board = set().union(*(metric_names(s) for s in strings(board)))
    assert in_queries and in_queries <= in_board
    problems += _missing(in_board, scrapes, "dashboard")

    # 2. prometheus.yml, comments (the metric_relabel_configs example) included.
    config = load_prometheus()
    in_config = metric_names(PROMETHEUS.read_text())
    for job in config["scrape_configs"]:
        for rule in job.get("metric_relabel_configs") or ():
            in_config |= metric_names(json.dumps(rule))
    problems += _missing(in_config, scrapes, "prometheus.yml")

    # 3. Labels: a matcher on a label its series lack selects nothing (or, under "All", anything);
    #    the scrape config's target labels (namespace, service, ...) count as present. A job
    #    matcher must name the job that serves the metric.
    added = target_labels(config)
    for where, expr in queries(board):
        for metric, matchers in selectors(expr):
            if metric not in scrapes.names:
                continue  # reported above
            unknown = set(matchers) - scrapes.labels(metric) - added
            if unknown:
                problems.append(f"dashboard {where}: {metric} has no label {sorted(unknown)}")
            job = matchers.get("job", "").strip('="')
            if job and metric not in scrapes.by_job.get(job, {}):
                problems.append(f"dashboard {where}: {metric} is not served by job {job}")
    every = set().union(*(labels for job in scrapes.by_job.values() for labels in job.values()))
    used = set().union(*(label_names(expr) for _, expr in queries(board))) | legend_labels(board)
    problems += [f"dashboard: no series has label {x!r}, nor does prometheus.yml add it"
                 for x in sorted(used - every - added)]

    assert not problems, "\n".join(problems)
