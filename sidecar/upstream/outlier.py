"""Outlier detection: Envoy's passive health checking of a cluster's endpoints.

One :class:`OutlierDetector` per cluster (``Cluster.outlier``, None when the cluster has no
``outlier_detection``) owns all ejection state; every endpoint carries a :class:`HostMonitor`
(``Endpoint.outlier``) that only the detector reads and writes. The router only reports:

- :meth:`OutlierDetector.report_status` for every upstream response head;
- :meth:`OutlierDetector.report_local` for a local-origin failure
  (:class:`~sidecar.upstream.host.LocalOriginFailure`): connect failure, timeout or reset.

A report is a few integer operations. The consecutive detectors decide inline, at report time;
success rate and failure percentage are evaluated every ``interval`` over that interval's requests,
and the same tick returns hosts whose ejection time is up. Envoy's semantics, as chosen here:

- ``consecutive_5xx`` counts 5xx answers; ``consecutive_gateway_failure`` counts 502/503/504 (any
  other answer, a 500 included, resets it). Without ``split_external_local_origin_errors`` a
  local-origin failure counts as the answer the router gives for it (connect failure and reset as
  503, timeout as 504), so it feeds both. With the split it counts only towards
  ``consecutive_local_origin_failure``, and any response head resets that counter (the connection
  worked). A detection resets its counter whether or not it ejects; hosts already ejected are
  not detected again.
- Success rate and failure percentage see external-origin results only when split (local-origin
  success rate, ``enforcing_local_origin_success_rate``, is not supported). A host takes part with at
  least ``*_request_volume`` requests in the interval, and only if at least ``*_minimum_hosts`` hosts
  do. Success rate ejects below ``mean - stdev * success_rate_stdev_factor / 1000`` (population
  stdev); failure percentage ejects at or above ``failure_percentage_threshold``.
- ``max_ejection_percent`` of all the cluster's endpoints may be ejected at once, but one ejection
  is always allowed (the percent is checked only when some host is ejected already); a detection
  refused by it counts ``outlier_detection_ejections_overflow``. The check comes before
  ``enforcing_*`` (a percent chance from the injected random source), as in Envoy.
- An ejection lasts ``base_ejection_time * multiplier`` capped at ``max(max_ejection_time,
  base_ejection_time)``; the multiplier grows by one per ejection (until the cap is reached) and
  drops by one at every interval tick the host spends un-ejected. The host returns at the first
  tick after its time is up, with its consecutive counters reset.
- Each detection, enforced or not, is counted in :attr:`OutlierDetector.detected` (Envoy's
  ``ejections_detected_*``), shown on the admin page.

Every ejection and return is one log line on ``meshkeeper.sidecar.outlier`` whose message is a JSON
object (Envoy's ejection event log). The detector's clock, random source and timer scheduler are
injected so tests are exact; :meth:`close` cancels it. Detaching a host (endpoint removed, detector
closed) forgets its state; a closed detector's ejected hosts return without a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from random import random as default_random
from typing import Any, Protocol

from sidecar.config import OutlierConfig
from sidecar.upstream.host import Endpoint, LocalOriginFailure
from sidecar.upstream.stats import ClusterStats

log = logging.getLogger("meshkeeper.sidecar.outlier")

# Ejection reasons (Envoy's OutlierEjectionType, lower case as in its stat names).
CONSECUTIVE_5XX = "consecutive_5xx"
CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
CONSECUTIVE_LOCAL_ORIGIN_FAILURE = "consecutive_local_origin_failure"
SUCCESS_RATE = "success_rate"
FAILURE_PERCENTAGE = "failure_percentage"
REASONS = (CONSECUTIVE_5XX, CONSECUTIVE_GATEWAY_FAILURE, CONSECUTIVE_LOCAL_ORIGIN_FAILURE, SUCCESS_RATE,
           FAILURE_PERCENTAGE)

# The answer each local-origin failure stands for without the split.
LOCAL_AS_STATUS = {LocalOriginFailure.CONNECT_FAILURE: 503, LocalOriginFailure.RESET: 503,
                   LocalOriginFailure.TIMEOUT: 504}

MIN_INTERVAL = 0.001  # an interval of 0 would spin the loop


class Timer(Protocol):
    def cancel(self) -> None: ...


# ``scheduler(delay, callback)``: run ``callback`` once after ``delay`` seconds (``loop.call_later``).
Scheduler = Callable[[float, Callable[[], None]], Timer]


def loop_scheduler(delay: float, callback: Callable[[], None]) -> Timer:
    """The default scheduler: the running loop's ``call_later`` (RuntimeError without a loop)."""
    return asyncio.get_running_loop().call_later(delay, callback)


def _nothing() -> None:
    pass


class HostMonitor:
    """One endpoint's outlier state (its ``Endpoint.outlier``, an
    :class:`~sidecar.upstream.host.OutlierMonitor`). Written only by its detector."""

    __slots__ = (
        "endpoint",
        # consecutive detectors
        "consecutive_5xx", "consecutive_gateway_failure", "consecutive_local_origin_failure",
        # this interval (success rate, failure percentage)
        "interval_total", "interval_failed",
        # since the host joined the detector, for the admin page
        "success", "failure", "local_origin_failure", "success_rate",
        # ejection
        "ejected", "ejected_at", "ejections", "multiplier", "reason",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.consecutive_5xx = 0
        self.consecutive_gateway_failure = 0
        self.consecutive_local_origin_failure = 0
        self.interval_total = 0
        self.interval_failed = 0
        self.success = 0
        self.failure = 0
        self.local_origin_failure = 0
        self.success_rate: float | None = None  # of the last interval with enough requests
        self.ejected = False
        self.ejected_at = 0.0
        self.ejections = 0  # times ejected
        self.multiplier = 0  # of base_ejection_time
        self.reason = ""


class OutlierDetector:
    """The outlier detection of one cluster; see the module docstring for the semantics."""

    __slots__ = (
        "cluster", "config", "stats", "detected", "ejected_count", "success_rate_average",
        "success_rate_ejection_threshold", "_monitors", "_on_change", "_clock", "_random", "_scheduler",
        "_timer", "_closed", "_split", "_max_5xx", "_max_gateway", "_max_local",
    )

    def __init__(self, cluster: str, config: OutlierConfig, stats: ClusterStats, *,
                 on_change: Callable[[], None] = _nothing, clock: Callable[[], float] = time.monotonic,
                 random: Callable[[], float] = default_random, scheduler: Scheduler | None = None) -> None:
        self.cluster = cluster
        self.stats = stats
        self.detected = dict.fromkeys(REASONS, 0)  # detections, enforced or not
        self.ejected_count = 0
        self.success_rate_average: float | None = None  # of the last evaluation, for the admin page
        self.success_rate_ejection_threshold: float | None = None
        self._monitors: list[HostMonitor] = []
        self._on_change = on_change  # the eligible set changed: the cluster rebuilds its balancer
        self._clock = clock
        self._random = random
        self._scheduler = scheduler or loop_scheduler
        self._timer: Timer | None = None
        self._closed = False
        self._apply(config)
        self._arm()

    # --- reports from the data path -------------------------------------------------------------

    def report_status(self, endpoint: Endpoint, status: int) -> None:
        """An upstream response head with ``status`` arrived from ``endpoint``."""
        m: HostMonitor | None = endpoint.outlier  # type: ignore[assignment]  # set by this detector only
        if m is None:
            return  # not (or no longer) monitored by this detector
        m.interval_total += 1
        if self._split:
            m.consecutive_local_origin_failure = 0
        if status < 500:
            m.success += 1
            m.consecutive_5xx = 0
            m.consecutive_gateway_failure = 0
            return
        m.failure += 1
        m.interval_failed += 1
        # Both counters move first; when both reach their threshold on the same response (a host
        # answering only 503 with equal thresholds) the ejection is reported as consecutive_5xx.
        m.consecutive_5xx += 1
        gateway = 502 <= status <= 504
        m.consecutive_gateway_failure = m.consecutive_gateway_failure + 1 if gateway else 0
        if m.consecutive_5xx >= self._max_5xx:
            self._consecutive(m, CONSECUTIVE_5XX)
        if gateway and m.consecutive_gateway_failure >= self._max_gateway:
            self._consecutive(m, CONSECUTIVE_GATEWAY_FAILURE)

    def report_local(self, endpoint: Endpoint, kind: LocalOriginFailure) -> None:
        """A local-origin failure with ``endpoint``: connect failure, timeout or reset."""
        m: HostMonitor | None = endpoint.outlier  # type: ignore[assignment]
        if m is None:
            return
        m.local_origin_failure += 1
        if not self._split:
            self.report_status(endpoint, LOCAL_AS_STATUS.get(kind, 503))
            return
        m.consecutive_local_origin_failure += 1
        if m.consecutive_local_origin_failure >= self._max_local:
            self._consecutive(m, CONSECUTIVE_LOCAL_ORIGIN_FAILURE)

    # --- owner (Cluster) interface ----------------------------------------------------------------

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Monitor exactly ``endpoints``: new ones start clean, kept ones keep their state."""
        if self._closed:
            return
        endpoints = list(endpoints)
        present = {id(ep) for ep in endpoints}
        for m in self._monitors:
            if id(m.endpoint) not in present:
                self._detach(m)
        monitors = []
        for ep in endpoints:
            m = ep.outlier  # type: ignore[assignment]
            if m is None:
                m = ep.outlier = HostMonitor(ep)
            monitors.append(m)
        self._monitors = monitors
        if self._timer is None:
            self._arm()

    def set_config(self, config: OutlierConfig) -> None:
        """A CDS update that keeps outlier detection on: new settings, same ejection state."""
        old_interval = self.config.interval
        self._apply(config)
        if config.interval != old_interval and self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._arm()

    def close(self) -> None:
        """Stop: cancel the timer and forget every host (ejected ones return to service)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for m in self._monitors:
            self._detach(m)
        self._monitors = []

    def ejection_time(self, m: HostMonitor) -> float:
        """How long ``m``'s current ejection lasts, under the current config."""
        base = self.config.base_ejection_time
        return min(base * m.multiplier, max(self.config.max_ejection_time, base))

    # --- views ------------------------------------------------------------------------------------

    def host_view(self, endpoint: Endpoint) -> dict[str, Any]:
        """The ``/clusters`` fields of one endpoint."""
        m: HostMonitor | None = endpoint.outlier  # type: ignore[assignment]
        if m is None:
            return {"ejected": False, "ejections": 0, "ejected_until": None, "outlier": None}
        until = None
        if m.ejected:
            until = round(max(0.0, m.ejected_at + self.ejection_time(m) - self._clock()), 3)
        return {
            "ejected": m.ejected,
            "ejections": m.ejections,
            "ejected_until": until,  # seconds from now
            "outlier": {
                "reason": m.reason or None,
                "ejection_time_multiplier": m.multiplier,
                "success": m.success,
                "failure": m.failure,
                "local_origin_failure": m.local_origin_failure,
                "consecutive_5xx": m.consecutive_5xx,
                "consecutive_gateway_failure": m.consecutive_gateway_failure,
                "consecutive_local_origin_failure": m.consecutive_local_origin_failure,
                "success_rate": m.success_rate,
            },
        }

    def admin_view(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "ejections_active": self.ejected_count,
            "ejections_detected": dict(self.detected),
            "success_rate_average": self.success_rate_average,
            "success_rate_ejection_threshold": self.success_rate_ejection_threshold,
        }

    # --- ejection -----------------------------------------------------------------------------------

    def _apply(self, config: OutlierConfig) -> None:
        self.config = config
        self._split = config.split_external_local_origin_errors
        # A threshold of 0 would eject on every report; Envoy's proto allows it, read it as 1.
        self._max_5xx = max(1, config.consecutive_5xx)
        self._max_gateway = max(1, config.consecutive_gateway_failure)
        self._max_local = max(1, config.consecutive_local_origin_failure)

    def _consecutive(self, m: HostMonitor, reason: str) -> None:
        if m.ejected:
            return
        self.detected[reason] += 1
        cfg = self.config
        if reason == CONSECUTIVE_5XX:
            m.consecutive_5xx = 0
            enforcing = cfg.enforcing_consecutive_5xx
        elif reason == CONSECUTIVE_GATEWAY_FAILURE:
            m.consecutive_gateway_failure = 0
            enforcing = cfg.enforcing_consecutive_gateway_failure
        else:
            m.consecutive_local_origin_failure = 0
            enforcing = cfg.enforcing_consecutive_local_origin_failure
        if self._eject(m, reason, enforcing):
            self._on_change()

    def _eject(self, m: HostMonitor, reason: str, enforcing: int, **detail: float) -> bool:
        active = self.ejected_count
        if active and (active + 1) * 100 > self.config.max_ejection_percent * len(self._monitors):
            self.stats.outlier_detection_ejections_overflow += 1
            return False
        if enforcing < 100 and (enforcing <= 0 or self._random() * 100 >= enforcing):
            return False
        now = self._clock()
        cfg = self.config
        base = cfg.base_ejection_time
        if m.multiplier == 0 or base * m.multiplier < max(cfg.max_ejection_time, base):
            m.multiplier += 1
        m.ejected = True
        m.ejected_at = now
        m.ejections += 1
        m.reason = reason
        self.ejected_count += 1
        stats = self.stats
        stats.outlier_detection_ejections_active += 1
        stats.outlier_detection_ejections_enforced_total += 1
        attr = f"outlier_detection_ejections_enforced_{reason}"
        setattr(stats, attr, getattr(stats, attr) + 1)
        self._log(logging.WARNING, "eject", m, ejection_time_s=round(self.ejection_time(m), 3), **detail)
        return True

    def _uneject(self, m: HostMonitor, now: float) -> None:
        m.ejected = False
        m.consecutive_5xx = 0
        m.consecutive_gateway_failure = 0
        m.consecutive_local_origin_failure = 0
        self.ejected_count -= 1
        self.stats.outlier_detection_ejections_active -= 1
        self._log(logging.INFO, "uneject", m, ejected_for_s=round(now - m.ejected_at, 3))

    def _detach(self, m: HostMonitor) -> None:
        if m.ejected:
            m.ejected = False
            self.ejected_count -= 1
            self.stats.outlier_detection_ejections_active -= 1
        if m.endpoint.outlier is m:
            m.endpoint.outlier = None

    def _log(self, level: int, event: str, m: HostMonitor, **fields: float) -> None:
        record = {"event": event, "cluster": self.cluster, "host": m.endpoint.key, "reason": m.reason,
                  "ejections": m.ejections, **fields}
        log.log(level, json.dumps(record, separators=(",", ":")))

    # --- the interval tick ----------------------------------------------------------------------------

    def _arm(self) -> None:
        if self._closed:
            return
        try:
            self._timer = self._scheduler(max(self.config.interval, MIN_INTERVAL), self._on_interval)
        except RuntimeError:
            self._timer = None  # no running loop yet: armed by the next endpoint update

    def _on_interval(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self._clock()
        changed = False
        for m in self._monitors:
            if m.ejected:
                if now - m.ejected_at >= self.ejection_time(m):
                    self._uneject(m, now)
                    changed = True
            elif m.multiplier:
                m.multiplier -= 1
        if self._evaluate():
            changed = True
        self._arm()
        if changed:
            self._on_change()

    def _evaluate(self) -> bool:
        """Success rate and failure percentage over the interval that just ended; True if any ejection."""
        cfg = self.config
        sr_volume = cfg.success_rate_request_volume
        fp_volume = cfg.failure_percentage_request_volume
        shown_volume = min(sr_volume, fp_volume)
        sr_hosts: list[tuple[HostMonitor, float]] = []
        fp_hosts: list[tuple[HostMonitor, float]] = []
        for m in self._monitors:
            total, failed = m.interval_total, m.interval_failed
            m.interval_total = m.interval_failed = 0
            if m.ejected or total == 0:
                continue
            rate = 100.0 * (total - failed) / total
            m.success_rate = rate if total >= shown_volume else None
            if total >= sr_volume:
                sr_hosts.append((m, rate))
            if total >= fp_volume:
                fp_hosts.append((m, rate))
        self.success_rate_average = self.success_rate_ejection_threshold = None
        ejected = False
        if sr_hosts and len(sr_hosts) >= cfg.success_rate_minimum_hosts:
            mean = sum(rate for _, rate in sr_hosts) / len(sr_hosts)
            stdev = math.sqrt(sum((rate - mean) ** 2 for _, rate in sr_hosts) / len(sr_hosts))
            threshold = mean - stdev * cfg.success_rate_stdev_factor / 1000.0
            self.success_rate_average, self.success_rate_ejection_threshold = mean, threshold
            for m, rate in sr_hosts:
                if rate < threshold and not m.ejected:
                    self.detected[SUCCESS_RATE] += 1
                    ejected |= self._eject(m, SUCCESS_RATE, cfg.enforcing_success_rate, success_rate=round(rate, 3),
                                           success_rate_average=round(mean, 3),
                                           success_rate_ejection_threshold=round(threshold, 3))
        if fp_hosts and len(fp_hosts) >= cfg.failure_percentage_minimum_hosts:
            for m, rate in fp_hosts:
                if 100.0 - rate >= cfg.failure_percentage_threshold and not m.ejected:
                    self.detected[FAILURE_PERCENTAGE] += 1
                    ejected |= self._eject(m, FAILURE_PERCENTAGE, cfg.enforcing_failure_percentage,
                                           success_rate=round(rate, 3))
        return ejected
