"""The alert evaluator: every ``--alert-interval`` seconds, each rule of the latest registry
snapshot is evaluated over this replica's sample merged with the other replicas' (see
controlplane.alerts.state for why and how), and the shared state znode is rewritten.

A transition made by this replica's write is notified (webhooks) and published as an ``alert``
event; a transition another replica made is only published, when this replica first reads it, so
every replica's WatchEvents shows it and the receivers get one notification. Rules are read
from the snapshot (the watch validated them); nothing here blocks the loop, and a ZooKeeper error
skips the rule for this round (logged once until it works again).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from controlplane.alerts.notify import Notifier, annotations
from controlplane.alerts.rule import AlertRule
from controlplane.alerts.state import AlertState, Sample, state_path, step
from controlplane.events import EventBus
from controlplane.lrs import LoadStore
from controlplane.metrics import Metrics
from controlplane.proxies import ProxyRegistry
from controlplane.snapshot import RegistrySnapshot
from controlplane.zkstore import Written
from meshkeeper.registry import is_serving

log = logging.getLogger("meshkeeper.controlplane.alerts")

DEFAULT_INTERVAL = 10.0
STALE_INTERVALS = 3  # another replica's sample older than this many intervals no longer counts


class StateStore(Protocol):
    """What the evaluator needs of controlplane.zkstore.ZkStore."""

    async def update(self, path: str, change: Callable[[bytes | None], bytes | None],
                     expected: int | None = None) -> Written: ...


def replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Evaluator:
    def __init__(self, store: StateStore, snapshot: Callable[[], RegistrySnapshot | None], load: LoadStore,
                 proxies: ProxyRegistry, events: EventBus, notifier: Notifier, *,
                 interval: float = DEFAULT_INTERVAL, replica: str | None = None, metrics: Metrics | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.store, self.snapshot, self.load, self.proxies = store, snapshot, load, proxies
        self.events, self.notifier = events, notifier
        self.interval = interval
        self.replica = replica or replica_id()
        self.metrics = metrics or Metrics()
        self.wall = wall
        self._seen: dict[tuple[str, str], tuple[str, float | None]] = {}  # (ns, name) -> (state, fired_at)
        # The shared state as this replica last wrote it, per rule: what the console shows.
        self.states: dict[tuple[str, str], AlertState] = {}
        self._failing: set[tuple[str, str]] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.notifier.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.interval
            try:
                await self.evaluate_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end alerting for good
                log.exception("alert evaluation failed")
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    # -- one round

    async def evaluate_once(self) -> None:
        snap = self.snapshot()
        if snap is None:
            return
        rules = [(ns, name, rule) for ns, table in sorted(snap.alerts.items()) for name, rule in sorted(table.items())]
        await asyncio.gather(*(self._evaluate(snap, ns, name, rule) for ns, name, rule in rules))
        live = {(ns, name) for ns, name, _ in rules}
        for key in set(self._seen) - live:
            del self._seen[key]
        for key in set(self.states) - live:
            del self.states[key]
        self.metrics.alert_rules.set(len(rules))

    def sample(self, snap: RegistrySnapshot, ns: str, rule: AlertRule) -> Sample:
        """This replica's numbers for the rule's service."""
        rates = self.load.rates(ns, rule.service)
        nacks = sum(1 for p in self.proxies.list()
                    if p.node.namespace == ns and p.node.service == rule.service
                    and any(t.nack is not None for t in p.types.values()))
        svc = snap.services(ns).get(rule.service)
        instances = 0 if svc is None else sum(1 for k, inst in svc.instances.items()
                                              if is_serving(inst, svc.overrides.get(k)))
        return Sample(at=self.wall(), rps=rates.issued, finished=rates.success + rates.error, errors=rates.error,
                      buckets=dict(rates.buckets), nacks=nacks, instances=instances)

    async def _evaluate(self, snap: RegistrySnapshot, ns: str, name: str, rule: AlertRule) -> None:
        own = self.sample(snap, ns, rule)
        now = own.at
        made: list[tuple[AlertState, str | None]] = []

        def change(data: bytes | None) -> bytes:
            made.clear()  # re-run on a concurrent write: only the write that lands counts
            new, transition = step(rule, AlertState.decode(data), self.replica, own, now,
                                   STALE_INTERVALS * self.interval)
            made.append((new, transition))
            return new.encode()

        key = (ns, name)
        try:
            await self.store.update(state_path(ns, name), change)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.metrics.alert_evaluations.labels(result="failed").inc()
            if key not in self._failing:
                self._failing.add(key)
                log.warning("alert %s/%s: cannot update its state (%s: %s); retrying next round",
                            ns, name, type(exc).__name__, exc)
            return
        self._failing.discard(key)
        self.metrics.alert_evaluations.labels(result="ok").inc()
        state, transition = made[-1]
        self.states[key] = state
        if transition is not None:  # this replica's write made it: the one notification
            self.metrics.alert_transitions.labels(state=transition).inc()
            log.info("alert %s/%s %s: %s (value %s)", ns, name, transition, rule.expression, state.value)
            self.notifier.notify(ns, name, rule, state, transition)
        self._publish(ns, name, rule, state)

    def _publish(self, ns: str, name: str, rule: AlertRule, state: AlertState) -> None:
        """One ``alert`` event per transition on this replica's bus, whichever replica made it."""
        key = (ns, name)
        now = (state.state, state.fired_at)
        before = self._seen.get(key)
        self._seen[key] = now
        if before is None:  # first look after start or a new rule: a baseline, unless it fires now
            if state.state != "firing" or state.fired_at is None or self.wall() - state.fired_at > self.interval:
                return
            before = ("inactive", None)
        if before[0] != "firing" and now[0] == "firing":
            status = "firing"
        elif before[0] == "firing" and (now[0] != "firing" or now[1] != before[1]):
            status = "resolved"
        else:
            return
        summary = annotations(ns, name, rule, state.value)["summary"]
        shown = "no data" if state.value is None else f"{state.value:.4g}"
        self.events.publish("alert", namespace=ns, service=rule.service, alert=name, state=status,
                            summary=f"{status} {name} ({rule.severity}): {summary} (value {shown})")
