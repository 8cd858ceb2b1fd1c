"""The shared state of one alert rule: ``/meshkeeper/_alerts/<ns>/<name>`` (JSON), and the pure
state machine every replica runs over it.

Why a state znode and not a leader: load reports are split between the replicas (each sidecar
reports to the control plane it is connected to), so no single replica sees a service's whole
load. Each replica therefore writes its own *sample* (its reporters' numbers for the rule's
service) into the rule's state znode at every evaluation, with ZooKeeper's version check
(ZkStore.update re-reads and re-applies on a concurrent write), and evaluates the rule over the
sum of the fresh samples of all replicas. The write that moves the state from pending to firing,
or from firing to inactive, is made by exactly one replica: that one sends the notification. A
leader would need the other replicas' load shipped to it anyway, and would be one more thing to
fail over.

Samples older than ``stale`` seconds (three evaluation intervals) are dropped: a replica that went
away stops counting. Times are wall-clock seconds, since replicas compare them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from controlplane.alerts.rule import AlertRule
from controlplane.lrs import histogram_quantile

STATE_ROOT = "/meshkeeper/_alerts"  # a reserved child of the root (not a namespace)
STATES = ("inactive", "pending", "firing")


def state_path(namespace: str, name: str) -> str:
    return f"{STATE_ROOT}/{namespace}/{name}"


@dataclass(frozen=True, slots=True)
class Sample:
    """One replica's numbers for a rule's service, from its own reporters and proxies."""

    at: float
    rps: float = 0.0  # requests issued per second
    finished: float = 0.0  # requests finished (success + error) per second
    errors: float = 0.0  # errored requests per second
    buckets: dict[float, float] = field(default_factory=dict)  # latency bucket rates
    nacks: int = 0
    instances: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "rps": self.rps, "finished": self.finished, "errors": self.errors,
                "buckets": {("+Inf" if b == float("inf") else repr(b)): n for b, n in sorted(self.buckets.items())},
                "nacks": self.nacks, "instances": self.instances}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Sample:
        return cls(at=float(obj["at"]), rps=float(obj.get("rps", 0)), finished=float(obj.get("finished", 0)),
                   errors=float(obj.get("errors", 0)),
                   buckets={float("inf") if k == "+Inf" else float(k): float(v)
                            for k, v in (obj.get("buckets") or {}).items()},
                   nacks=int(obj.get("nacks", 0)), instances=int(obj.get("instances", 0)))


@dataclass(frozen=True, slots=True)
class AlertState:
    state: str = "inactive"
    value: float | None = None  # the condition's value at the last evaluation
    active_since: float | None = None  # the condition has held since (pending and firing)
    fired_at: float | None = None  # the last transition to firing (Alertmanager's startsAt)
    resolved_at: float | None = None  # the last transition from firing (endsAt)
    samples: dict[str, Sample] = field(default_factory=dict)  # by replica id

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "value": self.value, "active_since": self.active_since,
                "fired_at": self.fired_at, "resolved_at": self.resolved_at,
                "samples": {r: s.to_json() for r, s in sorted(self.samples.items())}}

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes | None) -> AlertState:
        """The stored state; a missing or unreadable znode reads as inactive (it is rewritten)."""
        if not data:
            return cls()
        try:
            obj = json.loads(data)
            state = obj.get("state")
            return cls(state=state if state in STATES else "inactive", value=obj.get("value"),
                       active_since=obj.get("active_since"), fired_at=obj.get("fired_at"),
                       resolved_at=obj.get("resolved_at"),
                       samples={r: Sample.from_json(s) for r, s in (obj.get("samples") or {}).items()})
        except (ValueError, TypeError, KeyError, AttributeError):
            return cls()


def value_of(rule: AlertRule, samples: list[Sample], own: Sample) -> float | None:
    """The rule's condition over the replicas' summed samples; None without data (never fires)."""
    if rule.condition == "serving_instances":
        return float(own.instances)  # from the registry: every replica sees the same
    if rule.condition == "nacks":
        return float(sum(s.nacks for s in samples))
    rps = sum(s.rps for s in samples)
    if rps <= 0 or rps < rule.min_rps:
        return None
    if rule.condition == "error_ratio":
        finished = sum(s.finished for s in samples)
        return sum(s.errors for s in samples) / finished if finished > 0 else None
    buckets: dict[float, float] = {}
    for s in samples:
        for b, n in s.buckets.items():
            buckets[b] = buckets.get(b, 0) + n
    p99 = histogram_quantile(0.99, buckets)
    return None if p99 is None else p99 * 1000


def step(rule: AlertRule, cur: AlertState, replica: str, own: Sample, now: float,
         stale: float) -> tuple[AlertState, str | None]:
    """Add ``replica``'s sample to ``cur``, evaluate, and return the new state and the transition
    this write makes (``firing``, ``resolved``) or None."""
    samples = {r: s for r, s in cur.samples.items() if now - s.at <= stale and r != replica}
    samples[replica] = own
    value = value_of(rule, list(samples.values()), own)
    new = replace(cur, samples=samples, value=value)
    breached = rule.breached(value)
    if cur.state == "firing":
        if breached:
            return new, None
        return replace(new, state="inactive", active_since=None, resolved_at=now), "resolved"
    if not breached:
        return replace(new, state="inactive", active_since=None), None
    since = cur.active_since if cur.state == "pending" and cur.active_since is not None else now
    if now - since >= rule.for_seconds:
        return replace(new, state="firing", active_since=since, fired_at=now, resolved_at=None), "firing"
    return replace(new, state="pending", active_since=since), None
