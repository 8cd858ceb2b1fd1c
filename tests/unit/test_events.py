"""The control plane's event bus (WatchEvents): filters, bounded queues, registry diffs."""

from __future__ import annotations

import pytest

from controlplane.events import QUEUE_LIMIT, EventBus, Overflow, registry_diff
from controlplane.snapshot import RegistryTree
from meshkeeper.registry import InstanceRecord, Override


def snapshot(version: int, instances: dict[str, int], overrides: dict[str, Override] | None = None,
             policy: bytes | None = None):
    tree = RegistryTree()
    tree.set_namespaces("/meshkeeper", ["default"])
    tree.set_services("default", "/meshkeeper/default/services", ["catalog"])
    tree.set_service_data("default", "catalog", "/s", b'{"protocol": "http"}', 1)
    tree.set_keys("instance", "default", "catalog", "/i", list(instances))
    for key, weight in instances.items():
        host, port = key.split(":")
        tree.set_entry("instance", "default", "catalog", key, f"/i/{key}",
                       InstanceRecord(host, int(port), weight=weight).encode(), 1)
    for key, ov in (overrides or {}).items():
        tree.set_keys("override", "default", "catalog", "/o", list(overrides))
        tree.set_entry("override", "default", "catalog", key, f"/o/{key}", ov.encode(), 1)
    if policy is not None:
        tree.set_policy("default", "catalog", "/p", policy, 1)
    return tree.build(version)


async def test_subscribers_get_what_they_asked_for():
    bus = EventBus(wall=lambda: 1700000000.5)
    everything = bus.subscribe()
    pushes_in_prod = bus.subscribe("prod", ["push"])
    bus.publish("push", namespace="prod", node_id="n1", summary="CDS version a")
    bus.publish("push", namespace="dev", node_id="n2", summary="CDS version b")
    bus.publish("admin_write", namespace="prod", who="ada", summary="SetWeight")
    got = [(await everything.next()).node_id for _ in range(3)]
    assert got == ["n1", "n2", ""]
    first = await pushes_in_prod.next()
    assert (first.kind, first.node_id, first.at.seconds, first.at.nanos) == ("push", "n1", 1700000000, 500000000)
    assert pushes_in_prod.queue.empty()


async def test_nothing_is_built_while_nobody_watches():
    bus = EventBus()
    bus.publish("push", summary="x")
    assert bus.published == 0 and not bus.active
    sub = bus.subscribe()
    bus.publish("push", summary="x")
    sub.close()
    bus.publish("push", summary="y")
    assert bus.published == 1 and not bus.active


async def test_a_watcher_that_falls_behind_is_dropped_not_buffered_without_bound():
    bus = EventBus()
    slow, fast = bus.subscribe(), bus.subscribe()
    for i in range(QUEUE_LIMIT):
        bus.publish("push", summary=str(i))
        assert (await fast.next()).summary == str(i)
    assert slow.queue.qsize() == QUEUE_LIMIT and bus.active
    bus.publish("push", summary="one too many")
    # The slow one is dropped at once, its queue freed; its stream ends on its next read.
    assert slow.queue.qsize() == 1 and bus._subs == {fast}
    with pytest.raises(Overflow):
        await slow.next()
    bus.publish("push", summary="later")
    assert slow.queue.qsize() == 0 and (await fast.next()).summary == "one too many"


async def test_close_ends_every_subscription():
    bus = EventBus()
    sub = bus.subscribe()
    bus.close()
    assert await sub.next() is None


def test_registry_diff_names_what_changed_per_service():
    a = snapshot(1, {"10.0.0.1:80": 10, "10.0.0.2:80": 10})
    b = snapshot(2, {"10.0.0.1:80": 10, "10.0.0.3:80": 10})
    assert registry_diff(a, b) == [("default", "catalog", "instances 2->2 (+10.0.0.3:80, -10.0.0.2:80)")]
    c = snapshot(3, {"10.0.0.1:80": 10, "10.0.0.3:80": 10}, {"10.0.0.1:80": Override(enabled=False)},
                 policy=b'{"timeout_ms": 500}')
    assert registry_diff(b, c) == [("default", "catalog", "overrides changed: 10.0.0.1:80; policy changed")]
    assert registry_diff(c, snapshot(4, {"10.0.0.1:80": 10, "10.0.0.3:80": 10}, {"10.0.0.1:80": Override(enabled=False)},
                                     policy=b'{"timeout_ms": 500}')) == []


def test_registry_events_are_published_for_changes_only():
    bus = EventBus()
    sub = bus.subscribe(kinds=["registry"])
    a = snapshot(1, {"10.0.0.1:80": 10})
    bus.registry_changed(None, a)  # the first snapshot: nothing to compare with
    bus.registry_changed(a, snapshot(2, {"10.0.0.1:80": 20}))
    assert sub.queue.qsize() == 1
    event = sub.queue.get_nowait()
    assert (event.namespace, event.service, event.summary) == ("default", "catalog", "instances changed: 10.0.0.1:80")


def test_registry_diff_names_config_keys_even_without_a_service():
    from types import MappingProxyType

    from controlplane.snapshot import RegistrySnapshot
    from meshkeeper.registry import RuntimeValues

    def with_configs(base, configs):
        return RegistrySnapshot(base.version, base.namespaces,
                                MappingProxyType({"default": MappingProxyType(configs)}))

    a = snapshot(1, {"10.0.0.1:80": 10})
    b = with_configs(a, {"catalog": RuntimeValues({"color": "blue", "size": "s"}), "ghost": RuntimeValues({"k": "v"})})
    c = with_configs(a, {"catalog": RuntimeValues({"color": "green", "tier": "1"})})
    assert registry_diff(a, b) == [("default", "catalog", "config changed (+color, +size)"),
                                   ("default", "ghost", "config changed (+k)")]
    assert registry_diff(b, c) == [("default", "catalog", "config changed (+tier, -size, ~color)"),
                                   ("default", "ghost", "config changed (-k)")]
