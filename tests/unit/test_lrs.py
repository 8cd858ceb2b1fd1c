"""Load reporting: the sidecar's LoadReporter, the control plane's LoadStore, and both over a real
grpc.aio server on 127.0.0.1 (no proxy: endpoint counters are bumped by hand)."""

from __future__ import annotations

import asyncio
import itertools
import time

import grpc
import pytest
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import load_report_pb2
from envoy.service.load_stats.v3 import lrs_pb2, lrs_pb2_grpc
from google.protobuf import duration_pb2

from controlplane.lrs import LoadReportingServer, LoadStore, add_to_server, histogram_quantile
from controlplane.metrics import Metrics
from meshkeeper.xds import LRS_LATENCY_METRIC, NodeInfo, lrs_bucket_name
from sidecar.config import ClusterConfig, EndpointConfig
from sidecar.upstream.cluster import ClusterManager
from sidecar.upstream.host import Endpoint
from sidecar.xds.lrs import LoadReporter

CATALOG = "outbound|catalog.default"
CATALOG_V2 = "outbound|catalog.default|v2"
SEARCH = "outbound|search.default"
NODE = NodeInfo(node_id=NodeInfo.make_id("127.0.0.1", "web", 15006, "default"), service="web",
                app_port=8080, inbound_port=15006, outbound_port=15001)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def manager(*clusters: tuple[str, tuple[EndpointConfig, ...]]) -> ClusterManager:
    cm = ClusterManager()
    cm.update_clusters({name: ClusterConfig(name) for name, _ in clusters})
    for name, endpoints in clusters:
        cm.update_endpoints(name, endpoints)
    return cm


def ep(port: int, zone: str = "") -> EndpointConfig:
    return EndpointConfig("127.0.0.1", port, zone=zone)


def hit(endpoint: Endpoint, n: int = 1, *, ok: bool = True, latency: float = 0.01) -> None:
    """What the data path does for n finished tries."""
    endpoint.total_requests += n
    if ok:
        endpoint.rq_success += n
    else:
        endpoint.rq_error += n
    endpoint.rq_latency_total += n * latency


def start(endpoint: Endpoint) -> None:
    endpoint.total_requests += 1
    endpoint.active_requests += 1


def finish(endpoint: Endpoint, *, ok: bool = True, latency: float = 0.01) -> None:
    endpoint.active_requests -= 1
    endpoint.total_requests -= 1  # hit() counts it again
    hit(endpoint, ok=ok, latency=latency)


def response(*clusters: str, send_all: bool = False, interval: float = 1.0,
             granular: bool = True) -> lrs_pb2.LoadStatsResponse:
    return lrs_pb2.LoadStatsResponse(clusters=list(clusters), send_all_clusters=send_all,
                                     load_reporting_interval=duration(interval),
                                     report_endpoint_granularity=granular)


def by_name(req: lrs_pb2.LoadStatsRequest) -> dict[str, load_report_pb2.ClusterStats]:
    return {cs.cluster_name: cs for cs in req.cluster_stats}


def endpoint_stats(cs: load_report_pb2.ClusterStats) -> dict[int, load_report_pb2.UpstreamEndpointStats]:
    return {e.address.socket_address.port_value: e for loc in cs.upstream_locality_stats
            for e in loc.upstream_endpoint_stats}


def issued(cs: load_report_pb2.ClusterStats) -> int:
    return sum(loc.total_issued_requests for loc in cs.upstream_locality_stats)


# --------------------------------------------------------------------------- the reporter, no network


def reporter(cm: ClusterManager, clock: Clock) -> LoadReporter:
    return LoadReporter("127.0.0.1:1", NODE, cm, clock=clock)


def test_report_carries_deltas_the_in_progress_gauge_and_latency() -> None:
    clock = Clock()
    cm = manager((CATALOG, (ep(1), ep(2))))
    e1, e2 = cm.get(CATALOG).endpoints.values()
    lrs = reporter(cm, clock)
    lrs.on_response(response(send_all=True, interval=2.0))
    hit(e1, 2, latency=0.1)
    hit(e1, ok=False, latency=0.3)
    start(e1)
    clock.advance(2.0)
    cs = by_name(lrs.build_report())[CATALOG]
    assert cs.load_report_interval.ToTimedelta().total_seconds() == pytest.approx(2.0)
    [loc] = cs.upstream_locality_stats
    assert (loc.total_issued_requests, loc.total_successful_requests, loc.total_error_requests,
            loc.total_requests_in_progress) == (4, 2, 1, 1)
    [lat] = loc.load_metric_stats
    assert lat.metric_name == LRS_LATENCY_METRIC == "rq_latency_seconds"
    assert lat.num_requests_finished_with_metric == 3 and lat.total_metric_value == pytest.approx(0.5)
    eps = endpoint_stats(cs)
    assert set(eps) == {1}  # the idle endpoint is left out
    assert eps[1].address.socket_address.address == "127.0.0.1"
    assert (eps[1].total_issued_requests, eps[1].total_requests_in_progress) == (4, 1)
    assert eps[1].load_metric_stats[0].num_requests_finished_with_metric == 3

    finish(e1, latency=0.2)
    hit(e2)
    clock.advance(1.5)
    cs = by_name(lrs.build_report())[CATALOG]
    assert cs.load_report_interval.ToTimedelta().total_seconds() == pytest.approx(1.5)
    eps = endpoint_stats(cs)
    assert (eps[1].total_issued_requests, eps[1].total_successful_requests, eps[1].total_requests_in_progress) == (0, 1, 0)
    assert eps[1].load_metric_stats[0].total_metric_value == pytest.approx(0.2)
    assert eps[2].total_issued_requests == 1

    clock.advance(1.0)
    cs = by_name(lrs.build_report())[CATALOG]  # a quiet period: the cluster, no localities
    assert not cs.upstream_locality_stats


def test_only_outbound_clusters_are_reported_grouped_by_zone() -> None:
    clock = Clock()
    cm = manager((CATALOG, (ep(1, "a"), ep(2, "b"), ep(3, "a"))))
    cm.update_clusters({CATALOG: ClusterConfig(CATALOG),
                        "inbound|8080": ClusterConfig("inbound|8080", discovery="STATIC",
                                                      static_endpoints=(ep(8080),))})
    for endpoint in cm.get(CATALOG).endpoints.values():
        hit(endpoint)
    hit(cm.get("inbound|8080").endpoints["127.0.0.1:8080"], 5)
    lrs = reporter(cm, clock)
    lrs.on_response(response(send_all=True))
    clock.advance(1)
    stats = by_name(lrs.build_report())
    assert set(stats) == {CATALOG}
    zones = {loc.locality.zone: loc for loc in stats[CATALOG].upstream_locality_stats}
    assert {z: loc.total_issued_requests for z, loc in zones.items()} == {"a": 2, "b": 1}
    assert sorted(e.address.socket_address.port_value for e in zones["a"].upstream_endpoint_stats) == [1, 3]


def test_without_endpoint_granularity_only_localities_are_sent() -> None:
    clock = Clock()
    cm = manager((CATALOG, (ep(1),)))
    hit(cm.get(CATALOG).endpoints["127.0.0.1:1"], 3)
    lrs = reporter(cm, clock)
    lrs.on_response(response(send_all=True, granular=False))
    clock.advance(1)
    [loc] = by_name(lrs.build_report())[CATALOG].upstream_locality_stats
    assert loc.total_issued_requests == 3 and not loc.upstream_endpoint_stats
    assert loc.load_metric_stats[0].num_requests_finished_with_metric == 3


def test_explicit_cluster_list_reports_only_those_that_exist() -> None:
    clock = Clock()
    cm = manager((CATALOG, (ep(1),)), (SEARCH, (ep(2),)))
    e1, e2 = cm.get(CATALOG).endpoints["127.0.0.1:1"], cm.get(SEARCH).endpoints["127.0.0.1:2"]
    lrs = reporter(cm, clock)
    lrs.on_response(response(CATALOG, "outbound|missing.default", "inbound|8080"))
    hit(e1, 2)
    hit(e2, 3)
    clock.advance(1)
    assert {n: issued(cs) for n, cs in by_name(lrs.build_report()).items()} == {CATALOG: 2}
    # Asked for later, search reports only what happened since: its earlier load was not asked for.
    lrs.on_response(response(send_all=True))
    hit(e2)
    clock.advance(1)
    assert {n: issued(cs) for n, cs in by_name(lrs.build_report()).items()} == {CATALOG: 0, SEARCH: 1}


def test_a_removed_endpoint_is_reported_once_more_and_a_readded_one_counts_from_zero() -> None:
    clock = Clock()
    cm = manager((CATALOG, (ep(1), ep(2))))
    old = cm.get(CATALOG).endpoints["127.0.0.1:2"]
    lrs = reporter(cm, clock)
    lrs.on_response(response(send_all=True))
    hit(old, 4)
    clock.advance(1)
    assert endpoint_stats(by_name(lrs.build_report())[CATALOG])[2].total_issued_requests == 4
    hit(old, 2)
    start(old)  # still in flight when EDS removes it
    cm.update_endpoints(CATALOG, (ep(1),))
    clock.advance(1)
    assert endpoint_stats(by_name(lrs.build_report())[CATALOG])[2].total_issued_requests == 3
    finish(old)
    cm.update_endpoints(CATALOG, (ep(1), ep(2)))  # back, as a new object
    new = cm.get(CATALOG).endpoints["127.0.0.1:2"]
    assert new is not old
    hit(new)
    clock.advance(1)
    [loc] = by_name(lrs.build_report())[CATALOG].upstream_locality_stats
    same_address = [e for e in loc.upstream_endpoint_stats if e.address.socket_address.port_value == 2]
    # the old object's last success (in progress before) and the new object's first request
    assert sorted((e.total_issued_requests, e.total_successful_requests) for e in same_address) == [(0, 1), (1, 1)]
    clock.advance(1)
    assert not by_name(lrs.build_report())[CATALOG].upstream_locality_stats  # the old one is forgotten


def test_an_endpoint_that_comes_and_goes_within_one_interval_is_still_reported() -> None:
    from sidecar.server import Server

    clock = Clock()
    runtime = Server(NODE)
    runtime.apply_clusters({CATALOG: ClusterConfig(CATALOG)})
    runtime.apply_endpoints({CATALOG: (ep(1),)})
    lrs = runtime.lrs = reporter(runtime.clusters, clock)
    lrs.on_response(response(send_all=True))
    runtime.apply_endpoints({CATALOG: (ep(1), ep(2))})  # EDS adds :2 ...
    hit(runtime.clusters.get(CATALOG).endpoints["127.0.0.1:2"], 3)
    runtime.apply_endpoints({CATALOG: (ep(1),)})  # ... and takes it away before the next report
    clock.advance(1)
    assert endpoint_stats(by_name(lrs.build_report())[CATALOG])[2].total_issued_requests == 3


def test_endpoints_without_load_are_not_kept_while_no_report_is_asked_for() -> None:
    clock = Clock()
    cm = manager((CATALOG, (ep(1),)))
    lrs = reporter(cm, clock)  # no response from an LRS server: no report is ever built
    for i in range(2, 500):
        cm.update_endpoints(CATALOG, (ep(1), ep(i)))
        lrs.sync()
    busy = cm.get(CATALOG).endpoints["127.0.0.1:499"]
    start(busy)  # in flight when it leaves: kept
    cm.update_endpoints(CATALOG, (ep(1),))
    lrs.sync()
    kept = [s.endpoint for track in lrs._tracks.values() for s in track.gone]
    assert kept == [busy]


def test_a_removed_cluster_is_reported_once_more_then_dropped() -> None:
    clock = Clock()
    cm = manager((CATALOG, (ep(1),)), (SEARCH, (ep(2),)))
    lrs = reporter(cm, clock)
    lrs.on_response(response(send_all=True))  # from here on, the clusters' endpoints are followed
    hit(cm.get(SEARCH).endpoints["127.0.0.1:2"], 2)
    cm.update_clusters({CATALOG: ClusterConfig(CATALOG)})
    clock.advance(1)
    assert issued(by_name(lrs.build_report())[SEARCH]) == 2
    clock.advance(1)
    assert set(by_name(lrs.build_report())) == {CATALOG}


def test_load_before_the_first_report_is_not_lost() -> None:
    """Counts from the endpoint's birth go out in its first report (totals equal requests sent)."""
    clock = Clock()
    cm = manager((CATALOG, (ep(1),)))
    hit(cm.get(CATALOG).endpoints["127.0.0.1:1"], 7)
    lrs = reporter(cm, clock)
    clock.advance(5)  # the control plane answers late
    lrs.on_response(response(send_all=True, interval=1.0))
    clock.advance(1)
    cs = by_name(lrs.build_report())[CATALOG]
    assert issued(cs) == 7 and cs.load_report_interval.ToTimedelta().total_seconds() == pytest.approx(1.0)


def test_response_interval_is_bounded() -> None:
    lrs = reporter(ClusterManager(), Clock())
    assert lrs.on_response(lrs_pb2.LoadStatsResponse(send_all_clusters=True)) == 10.0
    assert lrs.on_response(response(send_all=True, interval=0.001)) == 0.05


# --------------------------------------------------------------------------- the store


def cluster_stats(name: str, interval: float, *endpoints: tuple, zone: str = "") -> load_report_pb2.ClusterStats:
    """endpoints: (port, issued, success, error, in_progress, latency_sum)."""
    cs = load_report_pb2.ClusterStats(cluster_name=name, load_report_interval=duration(interval))
    loc = cs.upstream_locality_stats.add()
    loc.locality.zone = zone
    lat_n, lat_sum = 0, 0.0
    for port, iss, ok, err, active, latency in endpoints:
        e = loc.upstream_endpoint_stats.add(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="10.0.0.1", port_value=port)),
            total_issued_requests=iss, total_successful_requests=ok, total_error_requests=err,
            total_requests_in_progress=active)
        e.load_metric_stats.add(metric_name=LRS_LATENCY_METRIC, num_requests_finished_with_metric=ok + err,
                                total_metric_value=latency)
        loc.total_issued_requests += iss
        loc.total_successful_requests += ok
        loc.total_error_requests += err
        loc.total_requests_in_progress += active
        lat_n, lat_sum = lat_n + ok + err, lat_sum + latency
    loc.load_metric_stats.add(metric_name=LRS_LATENCY_METRIC, num_requests_finished_with_metric=lat_n,
                              total_metric_value=lat_sum)
    return cs


def service(doc: dict, name: str = "catalog") -> dict:
    [svc] = [s for s in doc["services"] if s["service"] == name]
    return svc


def test_store_sums_deltas_into_totals_and_rates_over_the_interval() -> None:
    clock = Clock()
    store = LoadStore(2.0, clock=clock)
    r = store.connect("sidecar-a")
    store.report(r, [cluster_stats(CATALOG, 2.0, (1, 10, 9, 1, 2, 0.5), (2, 6, 6, 0, 0, 0.1))])
    clock.advance(2.0)
    store.report(r, [cluster_stats(CATALOG, 2.0, (1, 4, 4, 0, 1, 0.4))])
    doc = store.snapshot()
    assert doc["interval_seconds"] == 2.0 and doc["reporters"] == 1
    svc = service(doc)
    assert svc["namespace"] == "default"
    assert svc["totals"] == {"issued": 20, "success": 19, "error": 1, "in_progress": 1,
                             "latency_sum_seconds": 1.0, "mean_latency_seconds": 0.05}
    # rates are of the latest report only
    assert svc["rates"] == {"rps": 2.0, "success_rps": 2.0, "error_rps": 0.0, "error_ratio": 0.0,
                            "mean_latency_seconds": 0.1, "p99_latency_seconds": None}
    e1, e2 = svc["endpoints"]
    assert (e1["address"], e2["address"]) == ("10.0.0.1:1", "10.0.0.1:2")
    assert e1["totals"]["issued"] == 14 and e1["totals"]["in_progress"] == 1
    assert e2["totals"] == {"issued": 6, "success": 6, "error": 0, "in_progress": 0,
                            "latency_sum_seconds": 0.1, "mean_latency_seconds": pytest.approx(0.1 / 6, abs=1e-6)}
    assert e2["rates"] == {"rps": 0.0, "success_rps": 0.0, "error_rps": 0.0, "error_ratio": None,
                           "mean_latency_seconds": None, "p99_latency_seconds": None}


def test_store_sums_reporters_subsets_and_workers_each_over_its_own_interval() -> None:
    clock = Clock()
    store = LoadStore(1.0, clock=clock)
    a, a_w1, b = store.connect("a"), store.connect("a~w1"), store.connect("b")
    store.report(a, [cluster_stats(CATALOG, 1.0, (1, 10, 8, 2, 0, 0.0)),
                     cluster_stats(CATALOG_V2, 1.0, (2, 5, 5, 0, 0, 0.0))])
    store.report(a_w1, [cluster_stats(CATALOG, 2.0, (1, 4, 4, 0, 3, 0.0))])
    store.report(b, [cluster_stats(SEARCH, 1.0, (3, 1, 1, 0, 0, 0.0)),
                     cluster_stats("inbound|8080", 1.0, (4, 99, 99, 0, 0, 0.0))])
    doc = store.snapshot()
    assert [(s["namespace"], s["service"]) for s in doc["services"]] == [("default", "catalog"), ("default", "search")]
    svc = service(doc)
    assert svc["totals"]["issued"] == 19 and svc["totals"]["error"] == 2 and svc["totals"]["in_progress"] == 3
    assert svc["rates"]["rps"] == 10 + 5 + 4 / 2
    assert svc["rates"]["error_ratio"] == round(2 / 17, 4)
    assert {e["address"]: e["totals"]["issued"] for e in svc["endpoints"]} == {"10.0.0.1:1": 14, "10.0.0.1:2": 5}
    assert store.snapshot(namespace="other")["services"] == []
    assert len(store.snapshot(namespace="default")["services"]) == 2


def test_stale_and_closed_reporters_stop_counting_in_rates_but_totals_stay() -> None:
    clock = Clock()
    store = LoadStore(1.0, clock=clock)
    a, b = store.connect("a"), store.connect("b")
    store.report(a, [cluster_stats(CATALOG, 1.0, (1, 10, 10, 0, 1, 0.0))])
    store.report(b, [cluster_stats(CATALOG, 1.0, (2, 20, 20, 0, 2, 0.0))])
    assert service(store.snapshot())["rates"]["rps"] == 30
    store.disconnect(a)
    svc = service(store.snapshot())
    assert svc["rates"]["rps"] == 20 and svc["totals"]["in_progress"] == 2 and svc["totals"]["issued"] == 30
    assert store.snapshot()["reporters"] == 1
    clock.advance(3.5)  # b's latest report is now older than three intervals
    svc = service(store.snapshot())
    assert svc["rates"]["rps"] == 0 and svc["totals"]["in_progress"] == 0 and svc["totals"]["issued"] == 30
    store.report(b, [])  # a quiet report: fresh again, with nothing
    assert service(store.snapshot())["rates"]["rps"] == 0


# --------------------------------------------------------------------------- over gRPC


async def until(cond, what: str, within: float = 5.0):
    deadline = time.monotonic() + within
    while not (got := cond()):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)
    return got


async def serve(servicer, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    lrs_pb2_grpc.add_LoadReportingServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


def totals(store: LoadStore, name: str = "catalog") -> dict:
    for svc in store.snapshot()["services"]:
        if svc["service"] == name:
            return svc["totals"]
    return {}


async def test_totals_at_the_control_plane_equal_the_requests_sent() -> None:
    metrics = Metrics()
    store = LoadStore(0.05)
    lrs_server = LoadReportingServer(store, metrics)
    server = grpc.aio.server()
    add_to_server(server, lrs_server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    cm = manager((CATALOG, (ep(1), ep(2))), (CATALOG_V2, (ep(2),)))
    e1, e2 = cm.get(CATALOG).endpoints.values()
    v2 = cm.get(CATALOG_V2).endpoints["127.0.0.1:2"]
    lrs = LoadReporter(f"127.0.0.1:{port}", NODE, cm, backoff_base=0.05, backoff_max=0.2)
    lrs.start()
    try:
        sent = 0
        for i in range(300):
            target = (e1, e2, v2)[i % 3]
            hit(target, ok=i % 10 != 0)
            sent += 1
            if i % 50 == 0:
                await asyncio.sleep(0.03)  # let some reports go out mid-way
        await until(lambda: totals(store).get("issued") == sent, "all requests reported")
        assert totals(store)["success"] + totals(store)["error"] == sent
        assert totals(store)["error"] == 30
        svc = store.snapshot()["services"][0]
        # 127.0.0.1:2 is in both the main and the v2 subset cluster: each request counted once
        assert {e["address"]: e["totals"]["issued"] for e in svc["endpoints"]} == {"127.0.0.1:1": 100, "127.0.0.1:2": 200}
        assert store.snapshot()["reporters"] == 1
        assert metrics.registry.get_sample_value("meshkeeper_lrs_streams") == 1
        assert metrics.registry.get_sample_value("meshkeeper_lrs_reports_total") >= 1
        assert lrs.connected and lrs.send_all and lrs.endpoint_granularity
    finally:
        await lrs.stop()
        lrs_server.close_streams()
        await server.stop(None)
    assert store.snapshot()["reporters"] == 0
    assert metrics.registry.get_sample_value("meshkeeper_lrs_streams") == 0
    assert totals(store)["issued"] == 300  # the totals outlive the stream


class ScriptedLrs(lrs_pb2_grpc.LoadReportingServiceServicer):
    """Answers with whatever the test puts in ``responses`` and records the reports."""

    def __init__(self) -> None:
        self.responses: asyncio.Queue = asyncio.Queue()
        self.requests: list[tuple[float, lrs_pb2.LoadStatsRequest]] = []

    async def StreamLoadStats(self, request_iterator, context):  # noqa: N802
        async def read():
            async for req in request_iterator:
                self.requests.append((time.monotonic(), req))

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while True:
                yield await self.responses.get()
        finally:
            reader.cancel()

    def reports(self) -> list[lrs_pb2.LoadStatsRequest]:
        return [r for _, r in self.requests[1:]]


async def test_reporter_obeys_the_cluster_list_the_interval_and_a_new_response() -> None:
    scripted = ScriptedLrs()
    server, port = await serve(scripted)
    cm = manager((CATALOG, (ep(1),)), (SEARCH, (ep(2),)))
    lrs = LoadReporter(f"127.0.0.1:{port}", NODE, cm, backoff_base=0.05, backoff_max=0.2)
    lrs.start()
    try:
        await until(lambda: scripted.requests, "the first request")
        first = scripted.requests[0][1]
        assert first.node.id == NODE.node_id and first.node.metadata["service"] == "web"
        assert not first.cluster_stats
        scripted.responses.put_nowait(response(SEARCH, interval=0.1))
        await until(lambda: len(scripted.reports()) >= 3, "three reports")
        assert all(set(by_name(r)) == {SEARCH} for r in scripted.reports())
        times = [t for t, _ in scripted.requests[1:4]]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(0.05 < g < 0.5 for g in gaps), gaps
        for r in scripted.reports():
            assert 0.05 < r.cluster_stats[0].load_report_interval.ToTimedelta().total_seconds() < 0.5

        scripted.responses.put_nowait(response(send_all=True, interval=0.1))
        await until(lambda: set(by_name(scripted.reports()[-1])) == {CATALOG, SEARCH}, "send_all_clusters obeyed")

        # A new response restarts the period: with a long interval, no report comes for a while.
        scripted.responses.put_nowait(response(send_all=True, interval=30))
        await until(lambda: lrs.interval == 30, "the long interval taken")
        n = len(scripted.requests)
        await asyncio.sleep(0.4)  # watching for the absence of reports
        assert len(scripted.requests) == n
    finally:
        await lrs.stop()
        await server.stop(None)


async def test_reporter_reconnects_after_the_server_restarts_and_loses_nothing() -> None:
    store = LoadStore(0.05)
    server, port = await serve(LoadReportingServer(store))
    cm = manager((CATALOG, (ep(1),)))
    endpoint = cm.get(CATALOG).endpoints["127.0.0.1:1"]
    lrs = LoadReporter(f"127.0.0.1:{port}", NODE, cm, backoff_base=0.05, backoff_max=0.2)
    lrs.start()
    try:
        hit(endpoint, 5)
        await until(lambda: totals(store).get("issued") == 5, "first load reported")
        await server.stop(None)
        await until(lambda: not lrs.connected, "the reporter saw the stream end")
        hit(endpoint, 7)  # while the control plane is away
        await until(lambda: lrs.last_error, "the failure is recorded")
        store2 = LoadStore(0.05)
        server, _ = await serve(LoadReportingServer(store2), port)
        await until(lambda: totals(store2).get("issued") == 7, "reconnected; the outage's load reported", 10)
        assert lrs.connects == 2 and not lrs.last_error
    finally:
        await lrs.stop()
        await server.stop(None)


async def test_server_refuses_a_stream_without_a_node() -> None:
    server, port = await serve(LoadReportingServer(LoadStore(1.0)))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = lrs_pb2_grpc.LoadReportingServiceStub(channel).StreamLoadStats(iter([lrs_pb2.LoadStatsRequest()]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(None)


# --------------------------------------------------------------------------- latency buckets and p99


def test_histogram_quantile_interpolates_as_prometheus() -> None:
    assert histogram_quantile(0.99, {}) is None
    assert histogram_quantile(0.5, {0.1: 10}) == pytest.approx(0.05)
    # 100 requests: 90 in (0, 0.01], 10 in (0.01, 0.1]: rank 99 is 9/10 of the way into the second
    assert histogram_quantile(0.99, {0.01: 90, 0.1: 10}) == pytest.approx(0.01 + 0.09 * 0.9)
    assert histogram_quantile(0.99, {0.01: 1, float("inf"): 99}) == 0.01  # +Inf: the highest finite bound


def test_latency_buckets_travel_from_the_reporter_to_a_p99_at_the_store() -> None:
    clock = Clock()
    cm = manager((CATALOG, (ep(1),)))
    cluster = cm.get(CATALOG)
    endpoint = cluster.endpoints["127.0.0.1:1"]
    rep = reporter(cm, clock)
    rep.on_response(response(send_all=True, interval=1.0))
    for latency in [0.003] * 98 + [0.2, 0.2]:  # what the router does for each finished try
        hit(endpoint, latency=latency)
        endpoint.rq_latency_counts[cluster.rq_time.observe(latency)] += 1
    clock.advance(1.0)
    req = rep.build_report()
    loc = by_name(req)[CATALOG].upstream_locality_stats[0]
    assert {m.metric_name: m.num_requests_finished_with_metric for m in loc.load_metric_stats} == {
        LRS_LATENCY_METRIC: 100, lrs_bucket_name(0.0025): 0, lrs_bucket_name(0.005): 98,
        lrs_bucket_name(0.1): 0, lrs_bucket_name(0.25): 2}  # an empty bucket below each: its lower bound
    assert len(loc.upstream_endpoint_stats[0].load_metric_stats) == 5
    store = LoadStore(1.0, clock=clock)
    store.report(store.connect("n"), req.cluster_stats)
    rates = store.rates("default", "catalog")
    assert rates.buckets == {0.0025: 0, 0.005: 98.0, 0.1: 0, 0.25: 2.0}
    assert rates.quantile(0.99) == pytest.approx(0.175)  # rank 99 of 100: half-way into (0.1, 0.25]
    assert service(store.snapshot())["rates"]["p99_latency_seconds"] == pytest.approx(0.175)
    assert store.rates("default", "nothing").quantile(0.99) is None
