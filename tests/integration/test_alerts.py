"""Alerts end to end (issue 13): real ZooKeeper, two control-plane replicas, real sidecars and
demo apps, a webhook receiver of the test's own, and the ``meshkeeper`` CLI.

The frontend's sidecar reports load to replica A, the catalog sidecars are connected to replica B;
both evaluate every rule (docs/alerts.md). A catalog instance switched to answering 503 fires the
rule on catalog's error ratio: an ``alert`` event on B's WatchEvents, ``firing`` through the admin
API and on A's console Alerts page in a headless chromium (live, over Server-Sent Events), one
Alertmanager-format POST; recovery resolves it with one more POST, never two, and the page shows it
inactive without a reload.

"Fires within two evaluation intervals" is measured from the moment the control plane has the
failing load (replica A's ``/api/load`` counts catalog errors) to the firing POST: at most one
interval until a report covering a whole failing interval (the first may cover only a sliver of
it, its ratio under the threshold), one until the next evaluation, and the round itself. From the
switch add one LRS interval for the first report to arrive."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from meshkeeper.admin.v1 import admin_pb2, admin_pb2_grpc
from meshkeeper.demo.process import meshkeeper_argv
from tests.harness import http_get, wait_until
from tests.harness.scrape import metric_value
from tests.integration.test_mesh import Client

pytestmark = pytest.mark.integration

INTERVAL = 0.5  # --alert-interval and --load-report-interval
EVALUATION_MARGIN = 0.3  # one evaluation round (ZooKeeper read and versioned write) and the POST


class Receiver:
    """An Alertmanager webhook receiver: keeps every POSTed JSON body."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.times: list[float] = []  # time.monotonic() when each body arrived
        got, times = self.bodies, self.times

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                times.append(time.monotonic())
                got.append(body)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def statuses(self) -> list[str]:
        return [b["status"] for b in self.bodies]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def mk(cp: str, ns: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MESHKEEPER_TOKEN"}
    env["MESHKEEPER_CP"] = cp
    return subprocess.run(meshkeeper_argv(*args, "-n", ns), env=env, input=stdin, capture_output=True, text=True,
                          timeout=30)


def evaluations(cp) -> float:
    status, _, body = http_get(f"http://127.0.0.1:{cp.port('http_port')}/metrics")
    assert status == 200
    return metric_value(body.decode(), "meshkeeper_alert_evaluations", result="ok")


def catalog_errors(cp, ns: str) -> int:
    """Catalog requests that errored, as replica ``cp`` has them from load reports (totals)."""
    status, _, body = http_get(f"http://127.0.0.1:{cp.port('http_port')}/api/load?namespace={ns}")
    assert status == 200, body
    return sum(s["totals"]["error"] for s in json.loads(body)["services"] if s["service"] == "catalog")


def test_error_ratio_alert_fires_and_resolves_once_across_two_replicas(procs, zk_server, namespace, receiver):
    from selenium.webdriver.common.by import By

    from tests.support.browser import chromium, severe

    zk, ns = zk_server.hosts, namespace
    flags = ("--alert-interval", str(INTERVAL), "--load-report-interval", str(INTERVAL),
             "--alert-webhook", receiver.url, "--insecure-admin")
    cp_a = procs.controlplane(zk, *flags, name="controlplane-a")
    cp_b = procs.controlplane(zk, *flags, name="controlplane-b")
    target_a, target_b = (f"127.0.0.1:{cp.port('xds_port')}" for cp in (cp_a, cp_b))
    apps = []
    for _ in range(2):
        app = procs.app("catalog")
        procs.sidecar("catalog", app.port("port"), cp=target_b, zk=zk, namespace=ns, drain_delay=0)
        apps.append(app)
    fe_app = procs.app("frontend")
    frontend = procs.sidecar("frontend", fe_app.port("port"), cp=target_a, zk=zk, namespace=ns, drain_delay=0)

    # The rule, through the CLI against replica B; the watch of both replicas reads it.
    run = mk(target_b, ns, "alert", "set", "catalog-errors", "--service", "catalog", "--error-ratio", "0.2",
             "--severity", "critical", "--summary", "catalog answers errors")
    assert run.returncode == 0, run.stderr
    assert "catalog-errors" in run.stdout and "error_ratio > 0.2" in run.stdout
    bad = mk(target_b, ns, "alert", "set", "typo", "-f", "-", stdin="service: catalog\ncondition: error_ratio\n"
             "threshold: 0.1\nfor: 1 minute\n")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad
    assert "alert.for: '1 minute' is not a duration" in bad.stderr
    events: list = []
    channel = grpc.insecure_channel(target_b)
    stream = admin_pb2_grpc.AdminServiceStub(channel).WatchEvents(
        admin_pb2.WatchEventsRequest(namespace=ns, kinds=["alert"]))

    def watch() -> None:
        try:
            for e in stream:
                events.append(e)
        except grpc.RpcError:  # cancelled at the end
            pass

    threading.Thread(target=watch, daemon=True).start()

    stop = threading.Event()
    client = Client(frontend.port("outbound_port"))

    def traffic() -> None:
        while not stop.is_set():
            client.get()
            stop.wait(0.01)

    threading.Thread(target=traffic, daemon=True).start()
    # The control planes run without tokens (--insecure-admin): the console reads need none.
    with chromium() as driver:
        driver.implicitly_wait(0)

        def shown() -> str:
            """The rule's state on replica A's Alerts page, as the page shows it now."""
            cells = driver.find_elements(By.CSS_SELECTOR, f"tr[data-alert='{ns}/catalog-errors'] td.state")
            return cells[0].text if cells else ""

        try:
            wait_until(lambda: frontend_sees_two(frontend, ns), 10, message="frontend routes to both catalogs")
            wait_until(lambda: evaluations(cp_a) >= 2 and evaluations(cp_b) >= 2, 10,
                       message="both replicas evaluate")
            driver.get(f"http://127.0.0.1:{cp_a.port('http_port')}/ui/alerts")
            wait_until(lambda: shown() == "inactive", 10, message="the Alerts page shows the rule inactive")
            wait_until(lambda: driver.find_element(By.ID, "live").text == "live", 10, message="the live feed")
            driver.execute_script("window.meshkeeperNotReloaded = true")
            assert receiver.bodies == []
            assert catalog_errors(cp_a, ns) == 0

            status, _, body = http_get(f"http://127.0.0.1:{apps[0].port('port')}/fail?mode=status&status=503")
            assert status == 200, body
            switched = time.monotonic()
            # The failing load reaches replica A (the frontend's sidecar reports to it)...
            wait_until(lambda: catalog_errors(cp_a, ns) > 0, 10, 0.01, message="A has catalog's errors")
            loaded = time.monotonic()
            # ...and the rule fires within two evaluation intervals of that (for: 0s).
            wait_until(lambda: receiver.statuses() == ["firing"], 10, 0.01, message="one firing notification")
            fired = receiver.times[0]
            print(f"switch->load {loaded - switched:.3f}s, load->firing {fired - loaded:.3f}s, "
                  f"switch->firing {fired - switched:.3f}s (interval {INTERVAL}s)")
            assert fired - loaded <= 2 * INTERVAL + EVALUATION_MARGIN, (fired - loaded, fired - switched)
            # From the switch: one LRS interval more, until the first report.
            assert fired - switched <= 3 * INTERVAL + EVALUATION_MARGIN, (fired - switched, loaded - switched)
            wait_until(lambda: shown() == "firing", 5, message="the Alerts page shows the rule firing")
            assert driver.find_element(By.CSS_SELECTOR, "#alert-events li.firing")
            hook = receiver.bodies[0]
            assert hook["version"] == "4" and hook["receiver"] == "meshkeeper"
            alert = hook["alerts"][0]
            assert alert["status"] == "firing"
            assert alert["labels"] == {"alertname": "catalog-errors", "namespace": ns, "service": "catalog",
                                       "severity": "critical"}
            assert alert["annotations"]["summary"] == "catalog answers errors"
            assert alert["endsAt"] == "0001-01-01T00:00:00Z" and alert["startsAt"].endswith("Z")
            wait_until(lambda: [(e.alert, e.state) for e in events] == [("catalog-errors", "firing")], 5,
                       message="an alert event on replica B's WatchEvents")
            listed = json.loads(mk(target_a, ns, "get", "alerts", "-o", "json").stdout)["alerts"]
            assert [(a["name"], a["state"]) for a in listed] == [("catalog-errors", "firing")]
            assert 0.2 < listed[0]["value"] <= 1.0

            status, _, body = http_get(f"http://127.0.0.1:{apps[0].port('port')}/fail?mode=ok")
            assert status == 200, body
            wait_until(lambda: receiver.statuses() == ["firing", "resolved"], 10, message="one resolved notification")
            assert receiver.bodies[1]["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"
            wait_until(lambda: [e.state for e in events] == ["firing", "resolved"], 5, message="resolved event")
            # The page followed both transitions live: the table, and the alert events of its feed.
            wait_until(lambda: shown() == "inactive", 5, message="the Alerts page shows the rule resolved")
            transitions = [li.get_attribute("class") for li in
                           reversed(driver.find_elements(By.CSS_SELECTOR, "#alert-events li"))]
            assert transitions == ["firing", "resolved"]
            assert driver.execute_script("return window.meshkeeperNotReloaded === true")
            assert severe(driver) == []
            # several more rounds on both replicas: still one notification per transition
            after = evaluations(cp_a), evaluations(cp_b)
            wait_until(lambda: evaluations(cp_a) >= after[0] + 4 and evaluations(cp_b) >= after[1] + 4, 10,
                       message="more evaluation rounds")
            assert receiver.statuses() == ["firing", "resolved"]
            table = mk(target_a, ns, "get", "alerts")
            assert table.returncode == 0 and "inactive" in table.stdout, table
        finally:
            stop.set()
            stream.cancel()
            channel.close()

    run = mk(target_a, ns, "alert", "delete", "catalog-errors")
    assert run.returncode == 0, run.stderr
    assert json.loads(mk(target_b, ns, "get", "alerts", "-o", "json").stdout).get("alerts", []) == []
    missing = mk(target_b, ns, "alert", "delete", "catalog-errors")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "no alert rule" in missing.stderr


def frontend_sees_two(frontend, ns: str) -> bool:
    status, _, body = http_get(f"{frontend.admin_url}/clusters")
    if status != 200:
        return False
    for c in json.loads(body)["clusters"]:
        if c["name"] == f"outbound|catalog.{ns}":
            return sum(1 for e in c["endpoints"] if e["serving"]) == 2
    return False
