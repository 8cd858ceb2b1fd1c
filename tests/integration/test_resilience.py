"""Resilience end to end (issue 3): the traffic policy drives outlier ejection, retries, timeouts,
circuit breakers, local rate limit, panic mode and fault injection in real sidecars.

Topology per test: ``catalog`` with four app instances (equal weights unless a test says), each
beside its own sidecar, and a ``frontend`` sidecar whose outbound listener the test calls with
``Host: catalog``. The policy is written to ``services/catalog/policy`` before the processes start
when it is fixed for the test, so the first config the sidecars apply already carries it. Apps
are switched between failure modes through their ``/fail`` knob (meshkeeper.demo.app).

Numbers asserted below are Envoy's semantics: consecutive-5xx ejection happens on the failure that
reaches the threshold; an ejection lasts ``base_ejection_time`` times the number of times the host
was ejected in a row; panic mode when the healthy share is *below* the threshold; the local rate
limit is a token bucket that starts full.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from meshkeeper.registry import Paths, ServiceRecord
from tests.harness import http_get, wait_until
from tests.harness.load import Connection, Result, concurrent, paced, percentile, sequential
from tests.harness.scrape import find_key, log_events, metric_value
from tests.integration.test_mesh import Mesh

pytestmark = pytest.mark.integration

FAILING = "mode=status&status=503"


# --------------------------------------------------------------------------- the mesh


def start_catalog_mesh(procs, zk_hosts: str, ns: str, kz, policy: dict | None = None,
                       weights: tuple[int, ...] = (10, 10, 10, 10)) -> Mesh:
    """Control plane, one catalog instance per weight, a frontend; returns once the frontend
    routes to every catalog endpoint. Sidecars skip the drain delay, so teardown is quick."""
    if policy is not None:
        paths = Paths(ns)
        kz.create(paths.service("catalog"), ServiceRecord().encode(), makepath=True)
        kz.create(paths.policy("catalog"), json.dumps(policy).encode())
    cp = procs.controlplane(zk_hosts)
    target = f"127.0.0.1:{cp.port('xds_port')}"
    catalog = []
    for weight in weights:
        app = procs.app("catalog")
        sc = procs.sidecar("catalog", app.port("port"), cp=target, zk=zk_hosts, namespace=ns, weight=weight,
                           drain_delay=0)
        catalog.append((app, sc))
    fe_app = procs.app("frontend")
    frontend = procs.sidecar("frontend", fe_app.port("port"), cp=target, zk=zk_hosts, namespace=ns, drain_delay=0)
    mesh = Mesh(ns=ns, zk=zk_hosts, cp=cp, catalog=catalog, frontend=frontend, kz=kz)
    wait_until(lambda: len(mesh.serving()) == len(weights), 10, message="frontend sees every catalog endpoint")
    return mesh


def set_policy(mesh: Mesh, policy: dict) -> None:
    path = Paths(mesh.ns).policy("catalog")
    data = json.dumps(policy).encode()
    if mesh.kz.exists(path):
        mesh.kz.set(path, data)
    else:
        mesh.kz.create(path, data, makepath=True)


def set_mode(mesh: Mesh, i: int, query: str) -> None:
    """Switch catalog app ``i`` to a failure mode (the /fail query of meshkeeper.demo.app)."""
    status, _, body = http_get(f"http://127.0.0.1:{mesh.catalog[i][0].port('port')}/fail?{query}")
    assert status == 200, body


def catalog_cluster(mesh: Mesh) -> dict:
    return mesh.clusters()[f"outbound|catalog.{mesh.ns}"]


def endpoint(mesh: Mesh, i: int) -> dict:
    """Catalog instance ``i`` as the frontend's /clusters shows it."""
    key = mesh.instance_key(i)
    for ep in catalog_cluster(mesh)["endpoints"]:
        if f"{ep['address']}:{ep['port']}" == key:
            return ep
    raise AssertionError(f"{key} is not in the frontend's catalog cluster")


def ejected(mesh: Mesh) -> set[str]:
    return {f"{e['address']}:{e['port']}" for e in catalog_cluster(mesh)["endpoints"] if e["ejected"]}


def frontend_metric(mesh: Mesh, name: str, **labels: str) -> float:
    text = http_get(f"{mesh.frontend.admin_url}/stats/prometheus")[2].decode()
    return metric_value(text, name, **labels)


def config_dump(sidecar) -> dict:
    return json.loads(http_get(f"{sidecar.admin_url}/config_dump")[2])["configs"]


def client(mesh: Mesh) -> Connection:
    return Connection(mesh.frontend.port("outbound_port"))


def answered_by(results: list[Result]) -> Counter:
    """Requests per app instance (the app sets x-app-instance on every answer, errors too)."""
    return Counter(r.instance for r in results if r.instance)


# --------------------------------------------------------------------------- outlier detection


def test_a_failing_instance_is_ejected_retries_hide_it_and_it_returns(procs, zk_server, zk_client, namespace):
    policy = {"outlier": {"consecutive_5xx": 5, "interval_ms": 1000, "base_ejection_ms": 2000,
                          "max_ejection_percent": 50},
              "retry": {"attempts": 2, "on": ["5xx"]}}
    mesh = start_catalog_mesh(procs, zk_server.hosts, namespace, zk_client, policy)
    cluster = f"outbound|catalog.{namespace}"
    bad, bad_app = mesh.instance_key(0), mesh.app_instance(0)
    set_mode(mesh, 0, FAILING)
    c = client(mesh)

    # One request at a time, looking after each: ejected on the 5th consecutive 5xx, not later.
    seen = Counter()

    def ejected_now():
        seen[c.get().status] += 1
        ep = endpoint(mesh, 0)
        return ep if ep["ejected"] else None

    ep = wait_until(ejected_now, 5, 0, message="failing instance ejected")
    assert ep["rq_error"] == 5, ep
    assert set(seen) == {200}, seen  # each failed try was retried on another instance
    assert frontend_metric(mesh, "meshkeeper_outlier_detection_ejections_enforced_total", cluster=cluster) >= 1
    # A 503 is a 5xx and a gateway failure: both consecutive detectors reach 5 on the same answer,
    # and (as in Envoy) the gateway-failure one is looked at first.
    by_reason = sum(frontend_metric(mesh, f"meshkeeper_outlier_detection_ejections_enforced_{reason}",
                                    cluster=cluster) for reason in ("consecutive_5xx", "consecutive_gateway_failure"))
    assert by_reason >= 1

    results = sequential(mesh.frontend.port("outbound_port"), 2000)
    codes = Counter(r.status for r in results)
    assert codes[200] >= 1998, codes  # >= 99.9 %

    # Recovered, it stays out until its ejection time is over (taking no traffic), then returns.
    set_mode(mesh, 0, "mode=ok")

    leaks = []

    def back():
        before = endpoint(mesh, 0)["ejected"]
        batch = [c.get() for _ in range(8)]
        after = endpoint(mesh, 0)["ejected"]
        if before and after and answered_by(batch)[bad_app]:
            leaks.append(answered_by(batch))
        return not after and answered_by(batch)[bad_app] > 0

    wait_until(back, 15, message=f"{bad} back after its ejection time")
    assert leaks == [], "an ejected endpoint took traffic"
    assert bad not in ejected(mesh)
    results = sequential(mesh.frontend.port("outbound_port"), 400)
    assert Counter(r.status for r in results) == {200: 400}
    assert abs(answered_by(results)[bad_app] / 400 - 0.25) <= 0.05, answered_by(results)


def test_b_the_second_ejection_lasts_twice_as_long(procs, zk_server, zk_client, namespace):
    policy = {"outlier": {"consecutive_5xx": 3, "interval_ms": 500, "base_ejection_ms": 500,
                          "max_ejection_percent": 50}}
    mesh = start_catalog_mesh(procs, zk_server.hosts, namespace, zk_client, policy)
    set_mode(mesh, 0, FAILING)
    c = client(mesh)

    def two_ejections():
        for _ in range(20):
            c.get()
        events = log_events(mesh.frontend.stderr_text(), "eject")
        return events if len(events) >= 2 else None

    events = wait_until(two_ejections, 8, 0, message="two eject events on the frontend's stderr")
    cluster = f"outbound|catalog.{namespace}"
    events = [e for e in events if e.get("cluster", cluster) == cluster]
    times = [e["ejection_time_s"] for e in events[:2]]
    assert times == [pytest.approx(0.5, abs=0.01), pytest.approx(1.0, abs=0.01)], events


def test_b_max_ejection_percent_caps_ejections_and_panic_uses_every_host(procs, zk_server, zk_client,
                                                                          namespace):
    outlier = {"consecutive_5xx": 3, "interval_ms": 1000, "base_ejection_ms": 30000, "max_ejection_percent": 50}
    mesh = start_catalog_mesh(procs, zk_server.hosts, namespace, zk_client, {"outlier": outlier})
    for i in (0, 1, 2):
        set_mode(mesh, i, FAILING)
    c = client(mesh)
    failing = {mesh.instance_key(i) for i in (0, 1, 2)}

    def capped():
        for _ in range(20):
            c.get()
        stats = catalog_cluster(mesh)["stats"]
        return len(ejected(mesh)) == 2 and stats["outlier_detection_ejections_overflow"] >= 1

    wait_until(capped, 5, 0, message="two of three failing hosts ejected, the third refused by the cap")
    out = ejected(mesh)
    assert out <= failing, out
    # Half the hosts healthy is not below the default threshold of 50 %: no panic, and traffic
    # goes to the two hosts that are not ejected only.
    results = sequential(mesh.frontend.port("outbound_port"), 200)
    assert ejected(mesh) == out
    assert catalog_cluster(mesh)["panic"] is False
    in_rotation = {mesh.app_instance(i) for i in range(4) if mesh.instance_key(i) not in out}
    assert set(answered_by(results)) == in_rotation, answered_by(results)

    set_policy(mesh, {"outlier": outlier, "panic_threshold_percent": 75})

    def panicking():
        for _ in range(8):
            c.get()
        cluster = catalog_cluster(mesh)
        return cluster["panic"] and len(ejected(mesh)) == 2

    wait_until(panicking, 5, 0, message="panic mode once 50 % healthy is below the 75 % threshold")
    results = sequential(mesh.frontend.port("outbound_port"), 400)
    who = answered_by(results)
    assert len(who) == 4 and min(who.values()) >= 60, who  # every host, ejected or not (~100 each)
    assert catalog_cluster(mesh)["stats"]["lb_healthy_panic"] >= 400


# --------------------------------------------------------------------------- timeouts and retries


def test_c_per_try_timeout_and_retries_hide_a_hanging_or_resetting_instance(procs, zk_server, zk_client,
                                                                            namespace):
    """No outlier detection: every request that lands on the hanging instance is cut at 200 ms and
    retried elsewhere. The hanging instance has weight 1 of 31 and the client is sequential, so
    with round robin a retry never lands on it again and ~10 of 300 requests pay the timeout.
    Then the same instance resets its connections: its sidecar answers 5xx UC, which is retried."""
    policy = {"retry": {"attempts": 2, "on": ["5xx", "reset"], "per_try_timeout_ms": 200}, "timeout_ms": 3000}
    mesh = start_catalog_mesh(procs, zk_server.hosts, namespace, zk_client, policy, weights=(1, 10, 10, 10))
    cluster = f"outbound|catalog.{namespace}"
    port = mesh.frontend.port("outbound_port")
    set_mode(mesh, 0, "mode=hang")
    try:
        results = sequential(port, 300)
    finally:
        set_mode(mesh, 0, "mode=ok")  # let the held app threads go
    latencies = [r.latency for r in results]
    assert Counter(r.status for r in results) == {200: 300}
    cut = frontend_metric(mesh, "meshkeeper_upstream_rq_per_try_timeout", cluster=cluster)
    assert cut >= 5, cut  # the hanging instance was tried (~10 of 300 land on it) and cut
    assert sum(t >= 0.2 for t in latencies) >= cut
    assert percentile(latencies, 99) < 0.25, sorted(latencies)[-12:]
    assert max(latencies) < 0.5, sorted(latencies)[-12:]  # nobody waited for the route timeout

    retried = frontend_metric(mesh, "meshkeeper_upstream_rq_retry", cluster=cluster)
    set_mode(mesh, 0, "mode=reset")
    results = sequential(port, 300)
    assert Counter(r.status for r in results) == {200: 300}
    assert max(r.latency for r in results) < 0.2
    sidecar = mesh.catalog[0][1]
    inbound = mesh.clusters(sidecar)[f"inbound|{mesh.catalog[0][0].port('port')}"]["stats"]
    assert inbound["upstream_rq_rx_reset"] >= 5, inbound
    assert frontend_metric(mesh, "meshkeeper_upstream_rq_retry", cluster=cluster) - retried >= 5


# --------------------------------------------------------------------------- circuit breakers


def test_d_max_requests_overflows_at_once_with_uo(procs, zk_server, zk_client, namespace):
    mesh = start_catalog_mesh(procs, zk_server.hosts, namespace, zk_client, {"circuit_breaker": {"max_requests": 10}})
    results = concurrent(mesh.frontend.port("outbound_port"), 50, "/slow?ms=1000")
    ok = [r for r in results if r.status == 200]
    overflow = [r for r in results if r.status == 503 and r.flags == "UO"]
    assert len(ok) == 10 and len(overflow) == 40, Counter((r.status, r.flags, r.error) for r in results)
    assert max(r.latency for r in overflow) < 0.2, sorted(r.latency for r in overflow)[-5:]
    assert min(r.latency for r in ok) >= 1.0
    stats = catalog_cluster(mesh)["stats"]
    assert stats["upstream_rq_pending_overflow"] == 40, stats
    assert stats["upstream_rq_active"] == 0 and stats["upstream_rq_pending_active"] == 0, stats


# --------------------------------------------------------------------------- local rate limit


def test_e_inbound_rate_limit_admits_burst_plus_rate(procs, zk_server, zk_client, namespace):
    """300 rps offered for 3 s at one catalog instance's inbound listener with rps 100, burst 100.
    The bucket starts full, so admitted = burst + rps * D, D being the span of the offered load
    (first to last request): ~400. Asserted within 10 %; the rest are 429 RL."""
    rps, burst = 100, 100
    mesh = start_catalog_mesh(procs, zk_server.hosts, namespace, zk_client,
                              {"rate_limit": {"rps": rps, "burst": burst}})
    sidecar = mesh.catalog[0][1]
    buckets = list(find_key(config_dump(sidecar)["listeners"], "token_bucket"))
    assert buckets, "the inbound listener's config has no local rate limit"
    results = paced(sidecar.port("inbound_port"), rate=300, duration=3.0)
    span = results[-1].sent_at - results[0].sent_at
    assert len(results) == 900 and span < 3.1, f"the generator fell behind: {len(results)} in {span:.2f}s"
    codes = Counter((r.status, r.flags) for r in results)
    assert set(codes) <= {(200, ""), (429, "RL")}, codes
    admitted = codes[(200, "")]
    expected = burst + rps * span
    assert abs(admitted - expected) <= 0.1 * expected, (admitted, expected, codes)
    text = http_get(f"{sidecar.admin_url}/stats/prometheus")[2].decode()
    assert metric_value(text, "meshkeeper_listener_ratelimit_rate_limited", listener="inbound") == codes[(429, "RL")]


# --------------------------------------------------------------------------- invalid policies


def test_f_invalid_policy_is_refused_naming_the_field_and_the_last_valid_one_stays(procs, zk_server, zk_client,
                                                                                 namespace):
    retry = {"attempts": 2, "on": ["5xx"]}
    mesh = start_catalog_mesh(procs, zk_server.hosts, namespace, zk_client, {"retry": retry})
    path = Paths(namespace).policy("catalog")
    set_mode(mesh, 0, FAILING)
    port = mesh.frontend.port("outbound_port")
    assert Counter(r.status for r in sequential(port, 100)) == {200: 100}  # retries hide the failing one
    before = {k: config_dump(mesh.frontend)[k]["version_info"] for k in ("clusters", "routes")}

    bad_policies = [
        ({"retry": {**retry, "attempts": -1}}, "policy.retry.attempts: -1 is outside"),
        ({"retry": retry, "lb": {"policy": "fastest"}}, "policy.lb.policy: 'fastest' is not one of"),
        ({"retry": retry, "outlier": {"max_ejection_percent": 150}}, "policy.outlier.max_ejection_percent: 150"),
    ]
    for n, (policy, reason) in enumerate(bad_policies, 1):
        set_policy(mesh, policy)
        wait_until(lambda n=n: metric_value(mesh.metrics(), "meshkeeper_registry_bad_znodes_total", kind="policy") == n,
                   5, message=f"bad policy #{n} counted")
        log = [line for line in mesh.cp.stderr_text().splitlines() if f"bad policy znode {path}" in line]
        assert len(log) == n and reason in log[-1], log
        assert Counter(r.status for r in sequential(port, 100)) == {200: 100}, policy
    after = {k: config_dump(mesh.frontend)[k]["version_info"] for k in ("clusters", "routes")}
    assert after == before
    retries = list(find_key(config_dump(mesh.frontend)["routes"], "retry_policy"))
    assert any(r.get("num_retries") == 2 for r in retries), retries


# --------------------------------------------------------------------------- fault injection


def test_g_fault_injection_aborts_half_and_delays_all(procs, zk_server, zk_client, namespace):
    mesh = start_catalog_mesh(procs, zk_server.hosts, namespace, zk_client,
                              {"fault": {"abort_status": 503, "abort_percent": 50}})
    port = mesh.frontend.port("outbound_port")
    results = sequential(port, 400)
    codes = Counter((r.status, r.flags) for r in results)
    assert set(codes) == {(200, ""), (503, "FI")}, codes
    assert 150 <= codes[(503, "FI")] <= 250, codes  # binomial(400, 0.5): mean 200, sd 10
    text = http_get(f"{mesh.frontend.admin_url}/stats/prometheus")[2].decode()
    assert metric_value(text, "meshkeeper_listener_fault_aborts_injected", listener="outbound") == codes[(503, "FI")]

    set_policy(mesh, {"fault": {"delay_ms": 200, "delay_percent": 100}})
    c = client(mesh)
    wait_until(lambda: (r := c.get()).status == 200 and r.latency >= 0.2, 5, message="delay in force")
    results = [c.get() for _ in range(8)]
    assert [r.status for r in results] == [200] * 8
    assert all(0.2 <= r.latency < 0.35 for r in results), [round(r.latency, 3) for r in results]
    text = http_get(f"{mesh.frontend.admin_url}/stats/prometheus")[2].decode()
    assert metric_value(text, "meshkeeper_listener_fault_delays_injected", listener="outbound") >= 9
