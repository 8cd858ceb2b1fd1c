"""The sidecar's stats store (Envoy's ``Stats::Store``): components are registered with what they
count, and readers read the store, never the components or the server that holds them.

Each entry is an owner (a ClusterManager, a listener's context, the tracer, the access log, the
ADS client, the registration, the mesh DNS, the node) and a function that turns the owner's plain
counters into Prometheus metric families (:mod:`sidecar.metrics` has one per kind of component).
The data path keeps bumping plain integers; families are built at scrape time only. Families of the
same name from several owners (every listener's ``meshkeeper_listener_downstream_rq_total``) are
merged into one, as the exposition format requires.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.metrics_core import Metric

Families = Callable[[], Iterable[Metric]]


class StatsStore:
    def __init__(self) -> None:
        self._entries: dict[int, tuple[object, Families]] = {}

    def register(self, owner: object, families: Families) -> None:
        """Read ``families()`` for ``owner`` from now on (registering an owner again replaces it)."""
        self._entries[id(owner)] = (owner, families)

    def unregister(self, owner: object) -> None:
        self._entries.pop(id(owner), None)

    def __contains__(self, owner: object) -> bool:
        entry = self._entries.get(id(owner))
        return entry is not None and entry[0] is owner

    def collect(self) -> list[Metric]:
        merged: dict[str, Metric] = {}
        for _, families in list(self._entries.values()):
            for family in families():
                have = merged.get(family.name)
                if have is None:
                    merged[family.name] = family
                else:
                    have.samples.extend(family.samples)
        return list(merged.values())
