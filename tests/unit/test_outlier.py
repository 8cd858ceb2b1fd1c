"""Outlier detection with a fake clock, a fake timer and a fake random source: exact, no sleeps."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable

import pytest

from sidecar.config import ClusterConfig, EndpointConfig, OutlierConfig
from sidecar.upstream.cluster import Cluster
from sidecar.upstream.host import Endpoint, LocalOriginFailure
from sidecar.upstream.outlier import OutlierDetector

# Defaults for the tests: no random enforcement, every host may be ejected, short times.
BASE = {"enforcing_consecutive_gateway_failure": 100, "max_ejection_percent": 100, "interval": 10.0,
        "base_ejection_time": 30.0, "max_ejection_time": 300.0}


class FakeTimer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTime:
    """A clock and a ``call_later`` scheduler; :meth:`advance` fires due timers in order."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.timers: list[FakeTimer] = []

    def clock(self) -> float:
        return self.now

    def schedule(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def pending(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled]

    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        while True:
            due = [t for t in self.pending() if t.when <= target]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            self.now = timer.when
            timer.callback()
        self.now = target


class FakeRandom:
    """Returns the given values in turn, forever."""

    def __init__(self, *values: float) -> None:
        self.values = values or (0.0,)
        self.calls = 0

    def __call__(self) -> float:
        value = self.values[self.calls % len(self.values)]
        self.calls += 1
        return value


def make_cluster(n: int = 10, *, time: FakeTime | None = None, random: Callable[[], float] | None = None,
                 panic: float = 50.0, weights: Iterable[int] | None = None, lb_policy: str = "round_robin",
                 **outlier: object) -> tuple[Cluster, list[Endpoint], FakeTime]:
    time = time or FakeTime()
    config = ClusterConfig("c", outlier=OutlierConfig(**{**BASE, **outlier}), healthy_panic_threshold=panic,
                           lb_policy=lb_policy)
    cluster = Cluster(config, clock=time.clock, random=random or FakeRandom(0.5), scheduler=time.schedule)
    weights = list(weights) if weights is not None else [1] * n
    cluster.set_endpoints([EndpointConfig("10.0.0.1", 8000 + i, weight=w) for i, w in enumerate(weights)])
    return cluster, list(cluster.endpoints.values()), time


def statuses(cluster: Cluster, endpoint: Endpoint, *codes: int) -> None:
    for code in codes:
        cluster.outlier.report_status(endpoint, code)


def picks(cluster: Cluster, n: int) -> Counter:
    return Counter(cluster.pick().config.port for _ in range(n))


# --- consecutive detectors --------------------------------------------------------------------------


def test_consecutive_5xx_ejects_after_exactly_n() -> None:
    cluster, eps, _ = make_cluster(consecutive_5xx=3)
    statuses(cluster, eps[0], 500, 503)
    assert not eps[0].ejected
    statuses(cluster, eps[0], 500)
    assert eps[0].ejected
    stats = cluster.stats
    assert stats.outlier_detection_ejections_active == 1
    assert stats.outlier_detection_ejections_enforced_total == 1
    assert stats.outlier_detection_ejections_enforced_consecutive_5xx == 1
    assert 8000 not in picks(cluster, 90)


def test_a_success_resets_the_consecutive_counters() -> None:
    cluster, eps, _ = make_cluster(consecutive_5xx=3, consecutive_gateway_failure=3)
    statuses(cluster, eps[0], 503, 503, 200, 503, 503, 404, 502, 502, 302, 500, 500)
    assert not eps[0].ejected
    assert cluster.stats.outlier_detection_ejections_enforced_total == 0


def test_consecutive_gateway_failure_counts_502_503_504_and_a_500_resets_it() -> None:
    cluster, eps, _ = make_cluster(consecutive_5xx=100, consecutive_gateway_failure=3)
    statuses(cluster, eps[0], 502, 503, 500, 504, 502)
    assert not eps[0].ejected
    statuses(cluster, eps[0], 503)
    assert eps[0].ejected
    assert cluster.stats.outlier_detection_ejections_enforced_consecutive_gateway_failure == 1
    assert cluster.stats.outlier_detection_ejections_enforced_consecutive_5xx == 0


def test_unsplit_local_origin_failures_count_as_5xx_and_gateway_failures() -> None:
    # Connect failure, timeout and reset count as 503/504: both counters reach 3 on the third;
    # consecutive 5xx is evaluated first and ejects, so the gateway detector finds the host ejected.
    cluster, eps, _ = make_cluster(consecutive_5xx=3, consecutive_gateway_failure=3,
                                   enforcing_consecutive_gateway_failure=0)
    det = cluster.outlier
    det.report_local(eps[0], LocalOriginFailure.CONNECT_FAILURE)
    det.report_local(eps[0], LocalOriginFailure.TIMEOUT)
    det.report_local(eps[0], LocalOriginFailure.RESET)
    assert eps[0].ejected and eps[0].outlier.reason == "consecutive_5xx"
    assert det.detected["consecutive_5xx"] == 1 and det.detected["consecutive_gateway_failure"] == 0
    assert eps[0].outlier.consecutive_gateway_failure == 3
    assert det.detected["consecutive_local_origin_failure"] == 0
    assert eps[0].outlier.failure == 3 and eps[0].outlier.local_origin_failure == 3


def test_split_local_origin_failures_only_feed_their_own_detector() -> None:
    cluster, eps, _ = make_cluster(split_external_local_origin_errors=True, consecutive_5xx=2,
                                   consecutive_local_origin_failure=3)
    det = cluster.outlier
    # Local failures do not touch the 5xx counter, and any response head resets the local one.
    det.report_local(eps[0], LocalOriginFailure.CONNECT_FAILURE)
    det.report_local(eps[0], LocalOriginFailure.TIMEOUT)
    statuses(cluster, eps[0], 200)
    det.report_local(eps[0], LocalOriginFailure.RESET)
    det.report_local(eps[0], LocalOriginFailure.RESET)
    assert not eps[0].ejected
    det.report_local(eps[0], LocalOriginFailure.CONNECT_FAILURE)
    assert eps[0].ejected and eps[0].outlier.reason == "consecutive_local_origin_failure"
    assert cluster.stats.outlier_detection_ejections_enforced_consecutive_local_origin_failure == 1
    # 5xx still counts on its own, untouched by local failures in between.
    statuses(cluster, eps[1], 500)
    det.report_local(eps[1], LocalOriginFailure.TIMEOUT)
    statuses(cluster, eps[1], 500)
    assert eps[1].ejected and eps[1].outlier.reason == "consecutive_5xx"


def test_enforcing_zero_is_detected_but_not_ejected_and_percent_uses_the_random_source() -> None:
    cluster, eps, _ = make_cluster(consecutive_5xx=2, enforcing_consecutive_5xx=0)
    statuses(cluster, eps[0], 500, 500, 500, 500)
    assert not eps[0].ejected
    assert cluster.outlier.detected["consecutive_5xx"] == 2
    assert cluster.stats.outlier_detection_ejections_enforced_total == 0

    rnd = FakeRandom(0.7, 0.3)
    cluster, eps, _ = make_cluster(consecutive_5xx=2, enforcing_consecutive_5xx=50, random=rnd)
    statuses(cluster, eps[0], 500, 500)
    assert not eps[0].ejected  # 0.7 * 100 >= 50: not enforced
    statuses(cluster, eps[0], 500, 500)
    assert eps[0].ejected  # 0.3 * 100 < 50
    assert cluster.outlier.detected["consecutive_5xx"] == 2


# --- ejection time and return --------------------------------------------------------------------------


def test_host_returns_at_the_first_interval_tick_after_its_time() -> None:
    cluster, eps, time = make_cluster(consecutive_5xx=1, base_ejection_time=25.0)
    statuses(cluster, eps[0], 500)
    assert cluster.admin_view()["endpoints"][0]["ejected_until"] == 25.0
    time.advance(20.0)
    assert eps[0].ejected  # ticks at 10 and 20
    time.advance(5.0)
    assert eps[0].ejected  # its time is up, but no tick yet
    time.advance(5.0)
    assert not eps[0].ejected  # the tick at 30
    assert cluster.stats.outlier_detection_ejections_active == 0
    assert 8000 in picks(cluster, 10)
    assert eps[0].outlier.consecutive_5xx == 0


def test_ejection_time_grows_with_each_ejection_and_is_capped() -> None:
    cluster, eps, time = make_cluster(consecutive_5xx=1, base_ejection_time=30.0, max_ejection_time=70.0)
    m = eps[0].outlier
    expected = [30.0, 60.0, 70.0, 70.0]
    for i, duration in enumerate(expected):
        statuses(cluster, eps[0], 500)  # fails again at once: the multiplier has not decayed
        assert m.ejections == i + 1 and cluster.outlier.ejection_time(m) == duration
        time.advance(duration - 10.0)
        assert eps[0].ejected
        time.advance(10.0)
        assert not eps[0].ejected
    assert m.multiplier == 3  # 3 * 30 >= 70: no further growth


def test_multiplier_decays_one_per_healthy_tick() -> None:
    cluster, eps, time = make_cluster(consecutive_5xx=1, base_ejection_time=30.0)
    statuses(cluster, eps[0], 500)
    time.advance(30.0)
    statuses(cluster, eps[0], 500)
    time.advance(60.0)
    m = eps[0].outlier
    assert not eps[0].ejected and m.multiplier == 2
    time.advance(10.0)  # one healthy tick
    assert m.multiplier == 1
    statuses(cluster, eps[0], 500)
    assert cluster.outlier.ejection_time(m) == 60.0
    time.advance(60.0)
    time.advance(30.0)  # three healthy ticks: down to 0
    assert m.multiplier == 0
    statuses(cluster, eps[0], 500)
    assert cluster.outlier.ejection_time(m) == 30.0


def test_max_ejection_time_below_base_uses_base() -> None:
    cluster, eps, _ = make_cluster(consecutive_5xx=1, base_ejection_time=30.0, max_ejection_time=10.0)
    statuses(cluster, eps[0], 500)
    assert cluster.outlier.ejection_time(eps[0].outlier) == 30.0


# --- max_ejection_percent ------------------------------------------------------------------------------


def test_max_ejection_percent_limits_ejections_and_counts_overflow() -> None:
    cluster, eps, _ = make_cluster(4, consecutive_5xx=1, max_ejection_percent=50)
    for ep in eps:
        statuses(cluster, ep, 500)
    assert [ep.ejected for ep in eps] == [True, True, False, False]
    assert cluster.stats.outlier_detection_ejections_active == 2
    assert cluster.stats.outlier_detection_ejections_overflow == 2


def test_at_least_one_host_may_always_be_ejected() -> None:
    cluster, eps, _ = make_cluster(3, consecutive_5xx=1, max_ejection_percent=10)
    for ep in eps:
        statuses(cluster, ep, 500)
    assert [ep.ejected for ep in eps] == [True, False, False]
    assert cluster.stats.outlier_detection_ejections_overflow == 2


# --- success rate and failure percentage ------------------------------------------------------------------


def feed(cluster: Cluster, endpoint: Endpoint, total: int, failures: int) -> None:
    """``total`` responses of which ``failures`` are 500, spread so that no two failures are adjacent."""
    for i in range(total):
        statuses(cluster, endpoint, 500 if i % 2 == 1 and i // 2 < failures else 200)


def test_success_rate_ejects_below_mean_minus_stdev_factor() -> None:
    # Success rates 100, 100, 100, 100, 50: mean 90, stdev 20, threshold 90 - 1.9 * 20 = 52.
    cluster, eps, time = make_cluster(6, consecutive_5xx=1000, success_rate_request_volume=100,
                                      success_rate_minimum_hosts=5)
    for ep in eps[:4]:
        feed(cluster, ep, 100, 0)
    feed(cluster, eps[4], 100, 50)
    feed(cluster, eps[5], 40, 20)  # below the request volume: not considered
    time.advance(10.0)
    det = cluster.outlier
    assert det.success_rate_average == pytest.approx(90.0)
    assert det.success_rate_ejection_threshold == pytest.approx(52.0)
    assert [ep.ejected for ep in eps] == [False, False, False, False, True, False]
    assert cluster.stats.outlier_detection_ejections_enforced_success_rate == 1
    assert eps[4].outlier.success_rate == 50.0 and eps[5].outlier.success_rate is None
    # The next interval starts empty: no evaluation without volume.
    time.advance(10.0)
    assert det.success_rate_average is None and det.detected["success_rate"] == 1


def test_success_rate_needs_minimum_hosts_with_volume() -> None:
    cluster, eps, time = make_cluster(5, consecutive_5xx=1000, success_rate_request_volume=10,
                                      success_rate_minimum_hosts=5)
    for ep in eps[:3]:
        feed(cluster, ep, 10, 0)
    feed(cluster, eps[3], 10, 5)
    feed(cluster, eps[4], 9, 0)
    time.advance(10.0)
    assert not any(ep.ejected for ep in eps)
    assert cluster.outlier.success_rate_average is None


def test_failure_percentage_ejects_at_or_above_the_threshold() -> None:
    cluster, eps, time = make_cluster(6, consecutive_5xx=1000, enforcing_success_rate=0,
                                      enforcing_failure_percentage=100, failure_percentage_threshold=85,
                                      failure_percentage_minimum_hosts=5, failure_percentage_request_volume=20)
    det = cluster.outlier
    for ep in eps[:3]:
        feed(cluster, ep, 20, 0)
    for ep, failed in ((eps[3], 17), (eps[4], 16), (eps[5], 20)):  # 85%, 80%, 100%
        for i in range(20):
            det.report_status(ep, 500 if i < failed else 200)
    time.advance(10.0)
    assert [ep.ejected for ep in eps] == [False, False, False, True, False, True]
    assert cluster.stats.outlier_detection_ejections_enforced_failure_percentage == 2
    assert det.detected["failure_percentage"] == 2


# --- panic and picking --------------------------------------------------------------------------------


def test_panic_engages_below_the_threshold_and_picks_ejected_hosts() -> None:
    cluster, eps, _ = make_cluster(4, consecutive_5xx=1, panic=50.0)
    statuses(cluster, eps[0], 500)
    statuses(cluster, eps[1], 500)
    assert not cluster.panic  # 2 of 4 healthy: 50% is not below 50%
    assert picks(cluster, 40) == {8002: 20, 8003: 20}
    assert cluster.stats.lb_healthy_panic == 0
    statuses(cluster, eps[2], 500)
    assert cluster.panic
    assert picks(cluster, 40) == {8000: 10, 8001: 10, 8002: 10, 8003: 10}
    assert cluster.stats.lb_healthy_panic == 40
    assert cluster.admin_view()["panic"] is True


def test_panic_threshold_zero_disables_panic() -> None:
    cluster, eps, _ = make_cluster(2, consecutive_5xx=1, panic=0.0)
    statuses(cluster, eps[0], 500)
    statuses(cluster, eps[1], 500)
    assert not cluster.panic and cluster.pick() is None


def test_draining_endpoints_are_never_picked_nor_counted_for_panic() -> None:
    time = FakeTime()
    cluster, eps, _ = make_cluster(3, time=time, consecutive_5xx=1, panic=50.0)
    cluster.set_endpoints([ep.config for ep in eps] + [EndpointConfig("10.0.0.1", 9000, serving=False)])
    statuses(cluster, eps[0], 500)
    assert not cluster.panic  # 2 of 3 serving are healthy
    statuses(cluster, eps[1], 500)
    assert cluster.panic  # 1 of 3
    assert picks(cluster, 30) == {8000: 10, 8001: 10, 8002: 10}


def test_exclude_prefers_an_endpoint_not_tried_and_falls_back_to_any() -> None:
    cluster, eps, _ = make_cluster(3)
    for _ in range(10):
        assert cluster.pick(exclude=[eps[0]]) is not eps[0]
    assert cluster.pick(exclude=eps) in eps
    heavy, _, _ = make_cluster(weights=[1, 99])
    light = heavy.endpoints["10.0.0.1:8000"]
    assert all(heavy.pick(exclude=[heavy.endpoints["10.0.0.1:8001"]]) is light for _ in range(5))


def test_unejected_host_rejoins_exact_round_robin() -> None:
    cluster, eps, time = make_cluster(weights=[1, 2, 7], consecutive_5xx=1, max_ejection_percent=34)
    statuses(cluster, eps[0], 500)
    assert picks(cluster, 90) == {8001: 20, 8002: 70}
    time.advance(30.0)
    assert picks(cluster, 100) == {8000: 10, 8001: 20, 8002: 70}


# --- lifecycle ----------------------------------------------------------------------------------------


def test_cds_update_keeps_ejections_and_removing_outlier_detection_drops_them() -> None:
    cluster, eps, time = make_cluster(consecutive_5xx=1)
    statuses(cluster, eps[0], 500)
    detector = cluster.outlier
    cluster.set_config(ClusterConfig("c", outlier=OutlierConfig(**{**BASE, "consecutive_5xx": 1,
                                                                     "base_ejection_time": 40.0})))
    assert cluster.outlier is detector and eps[0].ejected
    time.advance(30.0)
    assert eps[0].ejected  # the new base time applies to the ejection in force
    time.advance(10.0)
    assert not eps[0].ejected
    statuses(cluster, eps[0], 500)
    cluster.set_config(ClusterConfig("c"))
    assert cluster.outlier is None and not eps[0].ejected and eps[0].outlier is None
    assert cluster.stats.outlier_detection_ejections_active == 0
    assert time.pending() == []  # the interval timer is cancelled
    assert 8000 in picks(cluster, 10)


def test_interval_change_rearms_the_timer() -> None:
    cluster, _, time = make_cluster()
    assert [t.when - time.now for t in time.pending()] == [10.0]
    cluster.set_config(ClusterConfig("c", outlier=OutlierConfig(**{**BASE, "interval": 2.0})))
    assert [t.when - time.now for t in time.pending()] == [2.0]


def test_removed_endpoint_forgets_its_ejection() -> None:
    cluster, eps, _ = make_cluster(consecutive_5xx=1)
    statuses(cluster, eps[0], 500)
    cluster.set_endpoints([ep.config for ep in eps[1:]])
    assert cluster.stats.outlier_detection_ejections_active == 0 and eps[0].outlier is None
    cluster.outlier.report_status(eps[0], 500)  # a late report for a gone endpoint is ignored
    assert cluster.outlier.ejected_count == 0


def test_cluster_without_outlier_detection_has_no_detector() -> None:
    cluster = Cluster(ClusterConfig("c"))
    cluster.set_endpoints([EndpointConfig("10.0.0.1", 1)])
    assert cluster.outlier is None
    view = cluster.admin_view()
    assert view["outlier_detection"] is None
    assert view["endpoints"][0]["ejected"] is False and view["endpoints"][0]["ejected_until"] is None


def test_default_scheduler_uses_the_running_loop_and_close_cancels() -> None:
    # Outside a loop the detector waits to be armed; inside one it uses call_later.
    idle = OutlierDetector("c", OutlierConfig(), Cluster(ClusterConfig("c")).stats)
    assert idle._timer is None

    async def main() -> None:
        det = OutlierDetector("c", OutlierConfig(), Cluster(ClusterConfig("c")).stats)
        timer = det._timer
        assert isinstance(timer, asyncio.TimerHandle)
        det.close()
        assert timer.cancelled()

    asyncio.run(main())


# --- visibility ---------------------------------------------------------------------------------------


def test_eject_and_uneject_are_one_json_log_line_each(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshkeeper.sidecar.outlier")
    cluster, eps, time = make_cluster(consecutive_5xx=2)
    statuses(cluster, eps[3], 502, 500)
    time.advance(30.0)
    records = [r for r in caplog.records if r.name == "meshkeeper.sidecar.outlier"]
    assert len(records) == 2
    eject, uneject = (json.loads(r.getMessage()) for r in records)
    assert eject == {"event": "eject", "cluster": "c", "host": "10.0.0.1:8003", "reason": "consecutive_5xx",
                     "ejections": 1, "ejection_time_s": 30.0}
    assert uneject == {"event": "uneject", "cluster": "c", "host": "10.0.0.1:8003", "reason": "consecutive_5xx",
                       "ejections": 1, "ejected_for_s": 30.0}
    assert records[0].levelno == logging.WARNING


def test_admin_view_shows_ejection_panic_and_limits() -> None:
    cluster, eps, time = make_cluster(2, consecutive_5xx=2, panic=60.0)
    statuses(cluster, eps[0], 500, 500)
    statuses(cluster, eps[1], 200, 503)
    time.advance(10.0)
    view = json.loads(json.dumps(cluster.admin_view()))
    assert view["panic"] is True and view["healthy_panic_threshold"] == 60.0
    assert view["circuit_breakers"]["max_requests"] == 1024
    od = view["outlier_detection"]
    assert od["config"]["consecutive_5xx"] == 2 and od["ejections_active"] == 1
    assert od["ejections_detected"]["consecutive_5xx"] == 1
    first, second = view["endpoints"]
    assert first["ejected"] is True and first["ejections"] == 1 and first["ejected_until"] == 20.0
    assert first["outlier"]["failure"] == 2 and first["outlier"]["reason"] == "consecutive_5xx"
    assert second["ejected"] is False and second["ejected_until"] is None
    assert second["outlier"]["success"] == 1 and second["outlier"]["consecutive_5xx"] == 1
    assert view["stats"]["outlier_detection_ejections_active"] == 1
