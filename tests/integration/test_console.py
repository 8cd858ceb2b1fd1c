"""The console in a real browser (headless chromium) over the demo's mesh: frontend -> catalog x3
with real sidecars, traffic, the trace store and admin tokens.

One test walks what an operator does: the graph, the catalog page and its buttons (refused without
a token or with a viewer's; an operator's disable takes the endpoint out of traffic within 1 s,
checked on the data path), a trace by its id and by search, and HTML in a label and a span
attribute rendered as text. It writes the screenshots docs/console.md shows.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from tests.harness import free_port, http_get, wait_until
from tests.support.browser import chromium, severe
from tests.support.otlp_spans import SERVER, export_request, span

pytestmark = pytest.mark.integration

IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
OPERATOR, VIEWER = "operator-token-0123456789", "viewer-token-0123456789"
TRACE_ID = "5af7183fb1d4cf5f4bf92f3577b34da6"
HOSTILE_LABEL = "<script>window.pwned=1</script>"  # a zone label (<= 63 characters)
HOSTILE_ATTR = '<img src=x onerror="window.pwned=2"><script>window.pwned=3</script>'
REFUSALS = ("status of 401", "status of 403")  # the browser logs refused requests we make on purpose


class Traffic(threading.Thread):
    """Requests to the frontend app, which calls catalog through its sidecar; logs which catalog
    app answered each one and when the request started."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.stop = port, threading.Event()
        self.log: list[tuple[float, str]] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                conn.request("GET", "/shop")
                resp = conn.getresponse()
                body = json.loads(resp.read())
                self.log.append((started, (body.get("catalog") or {}).get("instance", "")))
            except (OSError, ValueError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            self.stop.wait(0.02)
        conn.close()


def click(driver, css: str, timeout: float = 5.0) -> None:
    """Find and click ``css``, again if the live page re-rendered it in between (a stale element)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def once() -> bool:
        try:
            driver.find_element(By.CSS_SELECTOR, css).click()
        except StaleElementReferenceException:
            return False
        return True
    wait_until(once, timeout, 0.02, message=f"click {css}")


def text(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def test_console_graph_switches_traces_and_escaping(procs, zk_server, namespace, tmp_path):
    from selenium.webdriver.common.by import By

    tokens = tmp_path / "tokens"
    tokens.write_text(f"{OPERATOR} ops operator\n{VIEWER} dev viewer\n")
    cp = procs.controlplane(zk_server.hosts, "--admin-tokens", str(tokens), "--load-report-interval", "1")
    xds, web = f"127.0.0.1:{cp.port('xds_port')}", f"http://127.0.0.1:{cp.port('http_port')}"
    common = {"otlp_endpoint": xds, "trace_sample_ratio": "1.0", "zk": zk_server.hosts, "namespace": namespace,
              "cp": xds, "wait_ready": False}
    catalog = []
    for n, (version, weight) in enumerate((("v1", 1), ("v1", 2), ("v2", 7))):
        app = procs.app("catalog", version=version)
        zone = HOSTILE_LABEL if n == 0 else "zone-a"
        sidecar = procs.sidecar("catalog", app.port("port"), version=version, weight=weight, zone=zone,
                                name=f"sidecar-catalog-{n}", **common)
        catalog.append((app, sidecar))
    outbound = free_port()
    frontend_app = procs.app("frontend", call="http://catalog/",
                             env={"HTTP_PROXY": f"http://127.0.0.1:{outbound}", "NO_PROXY": ""})
    frontend = procs.sidecar("frontend", frontend_app.port("port"), outbound_port=outbound, **common)
    for _, sidecar in catalog:
        sidecar.wait_ready()
    frontend.wait_ready()
    # endpoint key (sidecar inbound, as registered) -> the app's own address (what it answers with)
    instance_of = {f"127.0.0.1:{s.port('inbound_port')}": f"127.0.0.1:{a.port('port')}" for a, s in catalog}

    def all_routable() -> bool:
        _, _, body = http_get(f"{frontend.admin_url}/clusters")
        c = {c["name"]: c for c in json.loads(body)["clusters"]}.get(f"outbound|catalog.{namespace}")
        return bool(c and sum(e["serving"] for e in c["endpoints"]) == 3)

    wait_until(all_routable, 15, message="frontend sees the three catalog endpoints")
    traffic = Traffic(frontend_app.port("port"))
    traffic.start()
    try:
        # A request with a known trace id, through the frontend's sidecar.
        conn = http.client.HTTPConnection("127.0.0.1", frontend.port("inbound_port"), timeout=10)
        conn.request("GET", "/shop", headers={"Host": "frontend", "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})
        assert conn.getresponse().status == 200
        conn.close()
        # A span whose attribute is HTML, exported like any sidecar's.
        hostile = span(trace_id=int("ab" * 16, 16), span_id=7, name="GET /hostile", kind=SERVER,
                       start=time.time_ns(), attrs={"note": HOSTILE_ATTR})
        with grpc.insecure_channel(xds) as channel:
            trace_service_pb2_grpc.TraceServiceStub(channel).Export(export_request({"catalog": [hostile]}), timeout=5)

        with chromium() as driver:
            driver.implicitly_wait(0)
            driver.get(f"{web}/")
            driver.find_element(By.ID, "token").send_keys(VIEWER)
            click(driver, "#token-save")

            # The graph: frontend -> catalog with a non-zero rate, live (no reload).
            edge = f"tr[data-edge='{namespace}/frontend->{namespace}/catalog'] td.rps"
            wait_until(lambda: float(driver.find_element(By.CSS_SELECTOR, edge).get_attribute("data-rps") or 0) > 0
                       if driver.find_elements(By.CSS_SELECTOR, edge) else False, 15, message="the edge's rate")
            assert driver.execute_script("return window.meshkeeperGraph.edges().length") >= 1
            driver.save_screenshot(str(IMAGES / "console-graph.png"))

            # The catalog page: three endpoints with their weights; the hostile zone label is text.
            driver.get(f"{web}/ui/services/{namespace}/catalog")
            rows = "#endpoints tbody tr"
            wait_until(lambda: len(driver.find_elements(By.CSS_SELECTOR, rows)) == 3, 10, message="3 endpoints")
            weights = {r.get_attribute("data-address"): r.find_element(By.CSS_SELECTOR, ".w-effective").text
                       for r in driver.find_elements(By.CSS_SELECTOR, rows)}
            assert sorted(weights.values()) == ["1", "2", "7"] and set(weights) == set(instance_of)
            zones = driver.find_elements(By.CSS_SELECTOR, "#endpoints td.zone")
            assert HOSTILE_LABEL in [z.get_attribute("textContent") for z in zones]
            assert not driver.find_elements(By.CSS_SELECTOR, "#endpoints td.zone *")
            assert driver.execute_script("return window.pwned === undefined")

            target = sorted(instance_of)[2]
            button = f"tr[data-address='{target}'] button.disable"
            # A viewer's token: refused as the API words it; then no token at all.
            click(driver, button)
            wait_until(lambda: "refused (403)" in text(driver, "#write-status"), 5, message="403 shown")
            assert "viewer role; this needs operator" in text(driver, "#write-status")
            driver.execute_script("sessionStorage.removeItem('meshkeeper.token')")
            click(driver, button)
            wait_until(lambda: "refused (401)" in text(driver, "#write-status"), 5, message="401 shown")
            assert "no token" in text(driver, "#write-status")
            assert severe(driver, REFUSALS) == []
            status, _, body = http_get(f"{web}/api/console/services/{namespace}/catalog",
                                       headers={"Authorization": f"Bearer {VIEWER}"})
            doc = json.loads(body)
            assert all(e["override"] is None and e["enabled"] for e in doc["endpoints"]), doc

            # The operator's token: disabled, out of traffic within 1 s, and shown.
            driver.find_element(By.ID, "token").send_keys(OPERATOR)
            click(driver, "#token-save")
            wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, button), 10, message="page back with the token")
            clicked = time.monotonic()
            click(driver, button)
            wait_until(lambda: text(driver, f"tr[data-address='{target}'] td.enabled") == "no", 5,
                       message="the page shows the endpoint disabled")
            wait_until(lambda: time.monotonic() > clicked + 2 and len(traffic.log) > 20, 10)
            served = [t for t, inst in traffic.log if inst == instance_of[target]]
            assert served and max(served) < clicked + 1.0, (max(served) - clicked if served else None)
            after = [inst for t, inst in traffic.log if t > clicked + 1.0]
            assert len(after) >= 10 and instance_of[target] not in after
            driver.save_screenshot(str(IMAGES / "console-service.png"))

            # The trace by its id: both services' spans.
            driver.get(f"{web}/ui/traces/{TRACE_ID}")
            wait_until(lambda: {r.get_attribute("data-service") for r in driver.find_elements(
                By.CSS_SELECTOR, ".span-row[data-span]")} >= {"frontend", "catalog"}, 10, message="both services' spans")
            click(driver, ".span-row[data-service='catalog']")
            wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, ".span-details"), 5)
            driver.save_screenshot(str(IMAGES / "console-trace.png"))

            # Found by a search on service, min duration and tag in the Traces page.
            _, _, body = http_get(f"{web}/api/traces/{TRACE_ID}", headers={"Authorization": f"Bearer {OPERATOR}"})
            spans = json.loads(body)["data"][0]["spans"]
            duration = max(s["duration"] for s in spans)
            driver.get(f"{web}/ui/traces")
            wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#q-service option[value='frontend']"), 10)
            click(driver, "#q-service option[value='frontend']")
            driver.find_element(By.ID, "q-tags").send_keys("url.path=/shop span.kind=server")
            driver.find_element(By.ID, "q-minDuration").send_keys(f"{duration}us")
            click(driver, "#q-submit")
            wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, f"#trace-list tr[data-trace='{TRACE_ID}']"), 10,
                       message="the search finds the trace")
            assert driver.find_elements(By.CSS_SELECTOR, f"#scatter circle[data-trace='{TRACE_ID}']")
            driver.find_element(By.ID, "q-minDuration").clear()
            driver.find_element(By.ID, "q-minDuration").send_keys(f"{duration + 1_000_000}us")
            click(driver, "#q-submit")
            wait_until(lambda: "0 traces" in text(driver, "#trace-results"), 10, message="a longer min finds none")

            # The hostile span attribute renders as text.
            driver.get(f"{web}/ui/traces/{'ab' * 16}")
            wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, ".span-row[data-span]"), 10)
            click(driver, ".span-row[data-span]")
            wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, ".span-details td.value"), 5)
            values = [v.get_attribute("textContent") for v in driver.find_elements(By.CSS_SELECTOR, ".span-details td.value")]
            assert HOSTILE_ATTR in values
            assert not driver.find_elements(By.CSS_SELECTOR, "#trace img, #trace script")
            assert driver.execute_script("return window.pwned === undefined")
            assert severe(driver) == []
    finally:
        traffic.stop.set()
        traffic.join(5)
