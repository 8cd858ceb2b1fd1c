"""Alert rules (controlplane.alerts): validation naming the field, evaluation with a fake clock
over a fake load store and an in-memory state store (two replicas sharing it), the NACK and
instance-count conditions, Alertmanager's payload and bounded webhook retries."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import pytest

from controlplane.alerts.api import alert_message
from controlplane.alerts.evaluate import Evaluator
from controlplane.alerts.notify import MAX_ATTEMPTS, Notifier, payload
from controlplane.alerts.rule import AlertRule, AlertRuleError
from controlplane.alerts.state import AlertState, state_path
from controlplane.events import EventBus
from controlplane.lrs import Load
from controlplane.metrics import Metrics
from controlplane.proxies import ProxyRegistry
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from controlplane.zkstore import Written
from meshkeeper.registry import InstanceRecord, Override, ServiceRecord
from meshkeeper.xds import CLUSTER, NodeInfo

NS = "default"
RULE = {"service": "catalog", "condition": "error_ratio", "threshold": 0.05, "for": "20s", "severity": "critical"}


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("rule", "error"), [
    ({**RULE, "treshold": 1}, "alert.treshold: unknown field"),
    ({k: v for k, v in RULE.items() if k != "threshold"}, "alert.threshold: required"),
    ({**RULE, "condition": "latency"}, "alert.condition: 'latency' is not one of error_ratio"),
    ({**RULE, "threshold": 1.5}, "alert.threshold: 1.5 is outside 0..1"),
    ({**RULE, "threshold": "0.1"}, "alert.threshold: expected a number"),
    ({**RULE, "condition": "serving_instances", "threshold": 1.5}, "alert.threshold: expected a whole number"),
    ({**RULE, "for": "5 minutes"}, "alert.for: '5 minutes' is not a duration"),
    ({**RULE, "for": "48h"}, "alert.for: '48h' is outside 0s..24h"),
    ({**RULE, "severity": "page"}, "alert.severity: 'page' is not one of critical"),
    ({**RULE, "service": "Catalog"}, "alert.service: service 'Catalog': must be a lowercase DNS label"),
    ({**RULE, "webhooks": ["ftp://x"]}, "alert.webhooks[0]: 'ftp://x' is not an http:// or https:// URL"),
    ({**RULE, "min_rps": -1}, "alert.min_rps: -1 is outside 0..1e+09"),
])
def test_a_bad_rule_is_refused_naming_the_field(rule, error):
    with pytest.raises(AlertRuleError) as exc:
        AlertRule.decode(json.dumps(rule))
    assert str(exc.value).startswith(error)
    assert "\n" not in str(exc.value)


def test_a_rule_round_trips_with_defaults_left_out():
    rule = AlertRule.decode(json.dumps(RULE))
    assert rule.for_seconds == 20 and rule.expression == "error_ratio > 0.05"
    assert AlertRule.decode(rule.encode()) == rule
    assert json.loads(rule.encode()) == RULE
    assert AlertRule.decode(b'{"service": "a", "condition": "nacks", "threshold": 0}').severity == "warning"
    for bad in (b"", b"[]", b"{"):
        with pytest.raises(AlertRuleError, match="^alert: "):
            AlertRule.decode(bad)


# --------------------------------------------------------------------------- fakes


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class MemStore:
    """ZkStore.update's contract over a dict: versioned read-modify-write."""

    def __init__(self) -> None:
        self.nodes: dict[str, tuple[bytes, int]] = {}

    async def update(self, path, change, expected=None) -> Written:
        cur = self.nodes.get(path)
        after = change(None if cur is None else cur[0])
        if after is None:
            self.nodes.pop(path, None)
            return Written(None if cur is None else cur[0], None, -1)
        version = 0 if cur is None else cur[1] + 1
        self.nodes[path] = (after, version)
        return Written(None if cur is None else cur[0], after, version)


@dataclass
class FakeLoad:
    by_service: dict[str, Load] = field(default_factory=dict)

    def rates(self, namespace: str, service: str) -> Load:
        return self.by_service.get(service) or Load()


@dataclass
class Posts:
    got: list[tuple[str, dict]] = field(default_factory=list)
    status: int = 200

    async def __call__(self, url: str, body: bytes) -> int:
        self.got.append((url, json.loads(body)))
        return self.status


def snapshot(rules: dict, instances: int = 3, disabled: int = 0) -> RegistrySnapshot:
    inst = {f"10.0.0.{i}:80": InstanceRecord(f"10.0.0.{i}", 80) for i in range(instances)}
    overrides = {f"10.0.0.{i}:80": Override(enabled=False) for i in range(disabled)}
    svc = ServiceSnapshot("catalog", NS, ServiceRecord(), instances=inst, overrides=overrides)
    return RegistrySnapshot(1, namespaces={NS: {"catalog": svc}},
                            alerts={NS: {n: AlertRule.decode(json.dumps(r)) for n, r in rules.items()}})


class Replica:
    def __init__(self, name: str, store: MemStore, clock: Clock, snap: list, load: FakeLoad, posts: Posts) -> None:
        self.events = EventBus(wall=clock)
        self.sub = self.events.subscribe(kinds=["alert"])
        self.proxies = ProxyRegistry(Metrics(), wall=clock)
        self.metrics = Metrics()
        self.ev = Evaluator(store, lambda: snap[0], load, self.proxies, self.events,
                            Notifier(["http://receiver/hook"], post=posts, metrics=self.metrics,
                                     external_url="http://cp:15014"),
                            interval=10.0, replica=name, wall=clock, metrics=self.metrics)

    def drain(self) -> list:
        out = []
        while not self.sub.queue.empty():
            out.append(self.sub.queue.get_nowait())
        return out


def errors(rps: float, ratio: float) -> Load:
    return Load(issued=rps, success=rps * (1 - ratio), error=rps * ratio)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- evaluation


async def test_fires_after_for_and_resolves_once_with_one_notification_across_two_replicas():
    clock, store, posts = Clock(), MemStore(), Posts()
    snap = [snapshot({"catalog-errors": RULE})]
    load_a, load_b = FakeLoad(), FakeLoad()  # each replica sees its own reporters
    a = Replica("a", store, clock, snap, load_a, posts)
    b = Replica("b", store, clock, snap, load_b, posts)

    async def round_() -> None:
        await a.ev.evaluate_once()
        await b.ev.evaluate_once()
        await settle()
        clock.now += 10

    load_a.by_service["catalog"] = errors(10, 0.0)
    load_b.by_service["catalog"] = errors(10, 0.0)
    await round_()
    assert not posts.got
    # b's callers see 20% errors, a's none: summed over both, 10% > 5%
    load_b.by_service["catalog"] = errors(10, 0.2)
    await round_()
    state = AlertState.decode(store.nodes[state_path(NS, "catalog-errors")][0])
    assert state.state == "pending" and state.value == pytest.approx(0.1)
    await round_()  # 10 s pending: still under for=20s
    assert not posts.got
    await round_()  # 20 s: fires, once
    await round_()
    assert [p["status"] for _, p in posts.got] == ["firing"]
    assert [e.state for e in a.drain()] == ["firing"] and [e.state for e in b.drain()] == ["firing"]
    load_b.by_service["catalog"] = errors(10, 0.0)
    await round_()
    await round_()
    assert [p["status"] for _, p in posts.got] == ["firing", "resolved"]
    ev = a.drain() + b.drain()
    assert [(e.kind, e.alert, e.state, e.service) for e in ev] == [("alert", "catalog-errors", "resolved", "catalog")] * 2
    transitions = sum(r.metrics.alert_transitions.labels(state="firing")._value.get() for r in (a, b))
    assert transitions == 1


async def test_a_replica_that_stops_sampling_stops_counting():
    clock, store, posts = Clock(), MemStore(), Posts()
    rule = {**RULE, "for": "0s"}
    snap = [snapshot({"r": rule})]
    load_a, load_b = FakeLoad({"catalog": errors(10, 0.5)}), FakeLoad()
    a = Replica("a", store, clock, snap, load_a, posts)
    b = Replica("b", store, clock, snap, load_b, posts)
    await a.ev.evaluate_once()
    await settle()
    assert [p["status"] for _, p in posts.got] == ["firing"]  # for 0s: at the first breach
    clock.now += 31  # a's sample is older than three intervals: b alone sees no traffic
    await b.ev.evaluate_once()
    await settle()
    assert [p["status"] for _, p in posts.got] == ["firing", "resolved"]


async def test_min_rps_and_no_data_never_fire():
    clock, store, posts = Clock(), MemStore(), Posts()
    snap = [snapshot({"r": {**RULE, "for": "0s", "min_rps": 5}})]
    load = FakeLoad({"catalog": errors(1, 1.0)})
    a = Replica("a", store, clock, snap, load, posts)
    await a.ev.evaluate_once()
    load.by_service.clear()
    await a.ev.evaluate_once()
    await settle()
    assert not posts.got


async def test_p99_latency_from_summed_buckets():
    clock, store, posts = Clock(), MemStore(), Posts()
    snap = [snapshot({"slow": {"service": "catalog", "condition": "p99_latency_ms", "threshold": 100}})]
    load = FakeLoad({"catalog": Load(issued=100, success=100, buckets={0.005: 98, 0.1: 0, 0.25: 2})})
    a = Replica("a", store, clock, snap, load, posts)
    await a.ev.evaluate_once()
    await settle()
    state = AlertState.decode(store.nodes[state_path(NS, "slow")][0])
    assert state.state == "firing" and state.value == pytest.approx(175)


async def test_serving_instances_below_n_from_the_snapshot():
    clock, store, posts = Clock(), MemStore(), Posts()
    rule = {"service": "catalog", "condition": "serving_instances", "threshold": 3}
    snap = [snapshot({"few": rule}, instances=3)]
    a = Replica("a", store, clock, snap, FakeLoad(), posts)
    await a.ev.evaluate_once()
    snap[0] = snapshot({"few": rule}, instances=3, disabled=1)  # an operator disabled one
    clock.now += 10
    await a.ev.evaluate_once()
    await settle()
    assert [(p["status"], p["alerts"][0]["annotations"]["summary"]) for _, p in posts.got] == [
        ("firing", "catalog.default: serving_instances < 3")]


async def test_nacks_of_the_services_proxies():
    clock, store, posts = Clock(), MemStore(), Posts()
    snap = [snapshot({"nacked": {"service": "catalog", "condition": "nacks", "threshold": 0}})]
    a = Replica("a", store, clock, snap, FakeLoad(), posts)
    proxy = a.proxies.connect(NodeInfo("sidecar~10.0.0.1~catalog-80.default", "catalog", NS), "peer")
    await a.ev.evaluate_once()
    a.proxies.nacked(proxy, CLUSTER, "3", "bad cluster")
    clock.now += 10
    await a.ev.evaluate_once()
    a.proxies.acked(proxy, CLUSTER, "4")
    clock.now += 10
    await a.ev.evaluate_once()
    await settle()
    assert [p["status"] for _, p in posts.got] == ["firing", "resolved"]


# --------------------------------------------------------------------------- payload, webhooks, API view


def test_payload_is_alertmanagers_webhook_format():
    rule = AlertRule.decode(json.dumps(RULE))
    state = AlertState(state="firing", value=0.2, fired_at=1_700_000_000.0)
    body = payload(NS, "catalog-errors", rule, state, "firing", "http://cp:15014")
    assert {"version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels", "commonLabels",
            "commonAnnotations", "externalURL", "alerts"} <= set(body)
    assert body["version"] == "4" and body["status"] == "firing"
    assert body["groupKey"] == '{}:{alertname="catalog-errors"}'
    alert = body["alerts"][0]
    assert alert["labels"] == {"alertname": "catalog-errors", "namespace": NS, "service": "catalog",
                               "severity": "critical"}
    assert set(alert["annotations"]) == {"summary", "description"}
    assert alert["startsAt"] == "2023-11-14T22:13:20.000Z" and alert["endsAt"] == "0001-01-01T00:00:00Z"
    assert alert["generatorURL"].startswith("http://cp:15014/") and len(alert["fingerprint"]) == 16
    resolved = payload(NS, "catalog-errors", rule, AlertState(fired_at=1.0, resolved_at=61.0), "resolved", "")
    assert resolved["alerts"][0]["endsAt"] == "1970-01-01T00:01:01.000Z"


async def test_webhook_retries_are_bounded_and_failures_counted():
    calls, slept = [], []

    async def post(url, body):
        calls.append(url)
        if url.endswith("refused"):
            raise ConnectionRefusedError("refused")
        return 503 if len(calls) < 3 else 200

    async def sleep(s):
        slept.append(s)

    metrics = Metrics()
    n = Notifier(metrics=metrics, post=post, sleep=sleep)
    assert await n.send("http://x/flaky", b"{}", "t") is True
    assert len(calls) == 3 and slept == [0.5, 1.0]
    calls.clear()
    assert await n.send("http://x/refused", b"{}", "t") is False
    assert len(calls) == MAX_ATTEMPTS
    assert metrics.alert_notifications.labels(result="failed")._value.get() == 1
    assert metrics.alert_notifications.labels(result="sent")._value.get() == 1


def test_the_api_shows_an_invalid_rule_as_stored():
    msg = alert_message(NS, "x", b'{"service": "a", "conditon": 1}', 3, None)
    assert msg.state == "invalid" and msg.error.startswith("alert.conditon: unknown field")
    ok = alert_message(NS, "x", json.dumps(RULE).encode(), 0,
                       AlertState(state="firing", value=0.1, active_since=5.0, fired_at=10.0).encode())
    assert (ok.state, ok.condition, ok.for_duration, ok.value) == ("firing", "error_ratio > 0.05", "20s", 0.1)
    assert ok.fired_at.seconds == 10
