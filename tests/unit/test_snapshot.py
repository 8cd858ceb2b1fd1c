"""Registry snapshots from watch events, without ZooKeeper (controlplane.snapshot, controlplane.watch).

``FakeZk`` is an in-memory ZooKeeper with one-shot watches that implements the watch's
``ZkSource``; tests drive its session state and can hold reads back to catch partial publishes.
"""

from __future__ import annotations

import asyncio
import json

from kazoo.exceptions import NoAuthError

from controlplane.metrics import Metrics
from controlplane.snapshot import RegistrySnapshot, RegistryTree
from controlplane.watch import RegistryWatch
from meshkeeper.registry import Override

DEBOUNCE = 0.01
SVC = "/meshkeeper/default/services/catalog"


class ConnectionLoss(Exception):
    pass


class FakeZk:
    def __init__(self) -> None:
        self.nodes: dict[str, tuple[bytes, int]] = {}
        self.zxid = 0
        self.child_watches: set[str] = set()
        self.data_watches: set[str] = set()
        self.exists_watches: set[str] = set()
        self.gate: asyncio.Event | None = None  # when set, reads wait for it
        self.fail = False
        self.fail_paths: set[str] = set()  # reads of these fail as a znode with a foreign ACL does
        self.reads = 0

    # -- ZkSource

    def start(self, on_event, on_state) -> None:
        self.on_event, self.on_state = on_event, on_state

    async def _read(self) -> None:
        self.reads += 1
        await asyncio.sleep(0)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionLoss()

    async def children(self, path: str) -> list[str] | None:
        await self._read()
        if path not in self.nodes:
            self.exists_watches.add(path)
            return None
        self.child_watches.add(path)
        return sorted(p[len(path) + 1:] for p in self.nodes if p.rpartition("/")[0] == path)

    async def data(self, path: str, watch_absent: bool = False) -> tuple[bytes, int] | None:
        await self._read()
        if path in self.fail_paths:
            raise NoAuthError()
        if path not in self.nodes:
            if watch_absent:
                self.exists_watches.add(path)
            return None
        self.data_watches.add(path)
        return self.nodes[path]

    async def stop(self) -> None:
        pass

    # -- test side: writes fire one-shot watches, as ZooKeeper does

    def _fire(self, watches: set[str], path: str) -> None:
        if path in watches:
            watches.discard(path)
            asyncio.get_running_loop().call_soon(self.on_event, path)

    def write(self, path: str, obj: object = None) -> None:
        data = b"" if obj is None else (obj if isinstance(obj, bytes) else json.dumps(obj).encode())
        parent = path.rpartition("/")[0]
        if parent and parent not in self.nodes:
            self.write(parent)
        self.zxid += 1
        created = path not in self.nodes
        self.nodes[path] = (data, self.zxid)
        if created:
            self._fire(self.exists_watches, path)
            self._fire(self.child_watches, parent)
        else:
            self._fire(self.data_watches, path)

    def delete(self, path: str) -> None:
        for p in sorted([p for p in self.nodes if p == path or p.startswith(path + "/")], reverse=True):
            del self.nodes[p]
            for w in (self.data_watches, self.child_watches, self.exists_watches):
                self._fire(w, p)
            self._fire(self.child_watches, p.rpartition("/")[0])


def instance(host: str, port: int = 15006, **extra) -> dict:
    return {"address": host, "port": port, **extra}


class Harness:
    def __init__(self) -> None:
        self.zk = FakeZk()
        self.metrics = Metrics()
        self.published: list[RegistrySnapshot] = []
        self.watch = RegistryWatch(self.zk, self.published.append, metrics=self.metrics, debounce=DEBOUNCE)
        self.watch.start()

    async def until(self, cond, within: float = 2.0):
        deadline = asyncio.get_running_loop().time() + within
        while not (got := cond()):
            assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
            await asyncio.sleep(0.002)
        return got

    async def quiet(self) -> None:
        """Long enough for any debounced publish to have happened (for 'nothing was published')."""
        await asyncio.sleep(DEBOUNCE * 8)

    async def next_snapshot(self, after: int) -> RegistrySnapshot:
        await self.until(lambda: len(self.published) > after)
        return self.published[-1]

    def bad_count(self, kind: str) -> float:
        return self.metrics.registry.get_sample_value("meshkeeper_registry_bad_znodes_total", {"kind": kind}) or 0

    def instances(self, snap: RegistrySnapshot | None = None, ns: str = "default", svc: str = "catalog"):
        snap = snap or self.published[-1]
        return dict(snap.services(ns)[svc].instances)


def seed(zk: FakeZk) -> None:
    zk.write(SVC, {"protocol": "http"})
    zk.write(f"{SVC}/instances/10.0.0.1:15006", instance("10.0.0.1", labels={"version": "v1"}))
    zk.write(f"{SVC}/instances/10.0.0.2:15006", instance("10.0.0.2"))
    zk.write(f"{SVC}/overrides/10.0.0.2:15006", {"weight": 3})


def run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------- tests


def test_initial_snapshot_has_the_whole_tree():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.write("/meshkeeper/prod/services/api", {"protocol": "grpc"})
        h.zk.on_state("CONNECTED")
        snap = await h.next_snapshot(0)
        assert snap.version == 1
        assert set(snap.namespaces) == {"default", "prod"}
        assert set(h.instances(snap)) == {"10.0.0.1:15006", "10.0.0.2:15006"}
        assert h.instances(snap)["10.0.0.1:15006"].version == "v1"
        assert snap.services("default")["catalog"].overrides["10.0.0.2:15006"] == Override(weight=3)
        assert snap.services("prod")["api"].record.protocol == "grpc"
        await h.quiet()
        assert len(h.published) == 1
    run(main())


def test_empty_registry_publishes_an_empty_snapshot_and_picks_up_later_creation():
    async def main():
        h = Harness()
        h.zk.on_state("CONNECTED")
        snap = await h.next_snapshot(0)
        assert dict(snap.namespaces) == {}
        seed(h.zk)  # /meshkeeper did not exist: its exists-watch fires
        snap = await h.until(lambda: h.published[-1].services("default").get("catalog") and
                             len(h.instances()) == 2 and h.published[-1])
        assert snap.version > 1
    run(main())


def test_nothing_published_until_initial_reads_are_done():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.gate = asyncio.Event()
        h.zk.on_state("CONNECTED")
        await h.quiet()
        assert h.published == []
        h.zk.gate.set()
        snap = await h.next_snapshot(0)
        assert len(h.instances(snap)) == 2
    run(main())


def test_changes_are_debounced_into_one_snapshot():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.on_state("CONNECTED")
        await h.next_snapshot(0)
        for i in range(3, 8):
            h.zk.write(f"{SVC}/instances/10.0.0.{i}:15006", instance(f"10.0.0.{i}"))
        h.zk.write(f"{SVC}/overrides/10.0.0.1:15006", {"enabled": False})
        snap = await h.until(lambda: len(h.published) > 1 and h.published[-1])
        await h.quiet()
        assert len(h.published) == 2 and snap.version == 2
        assert len(h.instances(snap)) == 7
        assert snap.services("default")["catalog"].overrides["10.0.0.1:15006"].enabled is False
    run(main())


def test_override_update_and_delete_and_instance_removal():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.on_state("CONNECTED")
        await h.next_snapshot(0)
        h.zk.write(f"{SVC}/overrides/10.0.0.2:15006", {"weight": 50})
        snap = await h.next_snapshot(1)
        assert snap.services("default")["catalog"].overrides["10.0.0.2:15006"].weight == 50
        h.zk.delete(f"{SVC}/overrides/10.0.0.2:15006")
        h.zk.delete(f"{SVC}/instances/10.0.0.1:15006")
        snap = await h.until(lambda: not h.published[-1].services("default")["catalog"].overrides
                             and len(h.instances()) == 1 and h.published[-1])
        assert list(h.instances(snap)) == ["10.0.0.2:15006"]
        h.zk.delete(SVC)
        await h.until(lambda: "catalog" not in h.published[-1].services("default"))
    run(main())


def test_bad_znodes_are_skipped_counted_once_and_never_empty_a_service():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.write(f"{SVC}/instances/10.0.0.3:15006", b"{not json")
        h.zk.write(f"{SVC}/instances/10.0.0.4:15006", instance("10.0.0.4", colour="red"))  # unknown field
        h.zk.write(f"{SVC}/instances/10.0.0.5:15006", instance("10.0.0.6"))  # name and record disagree
        h.zk.write(f"{SVC}/instances/not-an-endpoint", instance("10.0.0.7"))
        h.zk.on_state("CONNECTED")
        snap = await h.next_snapshot(0)
        assert set(h.instances(snap)) == {"10.0.0.1:15006", "10.0.0.2:15006"}
        assert h.bad_count("instance") == 4
        # an unrelated change re-reads the children: the same bad payloads are not counted again
        h.zk.write(f"{SVC}/instances/10.0.0.8:15006", instance("10.0.0.8"))
        await h.until(lambda: "10.0.0.8:15006" in h.instances())
        assert h.bad_count("instance") == 4
        # a good instance turning bad keeps its last good record
        h.zk.write(f"{SVC}/instances/10.0.0.1:15006", instance("10.0.0.1", weight=-1))
        await h.until(lambda: h.bad_count("instance") == 5)
        await h.quiet()
        assert h.instances()["10.0.0.1:15006"].version == "v1"
        assert h.metrics.registry.get_sample_value("meshkeeper_registry_bad_znodes_current") == 5
        # ... and is replaced once fixed
        h.zk.write(f"{SVC}/instances/10.0.0.1:15006", instance("10.0.0.1", weight=7))
        await h.until(lambda: h.instances()["10.0.0.1:15006"].weight == 7)
        # a bad service record with no good one before: the service is left out, others stay
        h.zk.write("/meshkeeper/default/services/broken", {"protocol": "smtp"})
        h.zk.write("/meshkeeper/default/services/Bad_Name", {"protocol": "http"})
        await h.until(lambda: h.bad_count("service") == 2)
        await h.quiet()
        assert set(h.published[-1].services("default")) == {"catalog"}
    run(main())


def test_bad_override_keeps_last_good_override():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.on_state("CONNECTED")
        await h.next_snapshot(0)
        h.zk.write(f"{SVC}/overrides/10.0.0.2:15006", {"weight": "heavy"})
        await h.until(lambda: h.bad_count("override") == 1)
        await h.quiet()
        assert h.published[-1].services("default")["catalog"].overrides["10.0.0.2:15006"].weight == 3
    run(main())


def test_suspended_keeps_last_snapshot_and_reconnect_rereads_everything():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.on_state("CONNECTED")
        first = await h.next_snapshot(0)
        h.zk.on_state("SUSPENDED")
        h.zk.fail = True  # reads in flight or retried fail while the connection is down
        # while suspended no watch events arrive; the registry changes underneath
        h.zk.child_watches.clear()
        h.zk.data_watches.clear()
        h.zk.delete(f"{SVC}/instances/10.0.0.1:15006")
        h.zk.write(f"{SVC}/instances/10.0.0.9:15006", instance("10.0.0.9"))
        await h.quiet()
        assert h.published == [first]
        assert h.metrics.registry.get_sample_value("meshkeeper_zookeeper_connected") == 0
        # reconnect: full re-read, published only once whole
        h.zk.fail = False
        h.zk.gate = asyncio.Event()
        h.zk.on_state("CONNECTED")
        await h.quiet()
        assert h.published == [first]
        h.zk.gate.set()
        snap = await h.next_snapshot(1)
        assert set(h.instances(snap)) == {"10.0.0.2:15006", "10.0.0.9:15006"}
        assert h.metrics.registry.get_sample_value("meshkeeper_zookeeper_resyncs_total") == 2
    run(main())


def test_lost_session_then_unchanged_registry_publishes_nothing_new():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.on_state("CONNECTED")
        await h.next_snapshot(0)
        h.zk.on_state("LOST")
        h.zk.on_state("CONNECTED")
        await h.until(lambda: h.watch.state == "CONNECTED")
        reads = h.zk.reads
        await h.until(lambda: h.zk.reads >= reads)
        await h.quiet()
        assert [s.version for s in h.published] == [1]  # same content: no new version, no push
        # watches were re-armed by the re-read
        h.zk.write(f"{SVC}/overrides/10.0.0.1:15006", {"weight": 1})
        snap = await h.next_snapshot(1)
        assert snap.version == 2
    run(main())


def test_read_errors_while_connected_are_retried_before_publishing():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.fail = True
        h.zk.on_state("CONNECTED")
        await h.quiet()
        assert h.published == []
        h.zk.fail = False
        snap = await h.next_snapshot(0)  # retried after RETRY_DELAY
        assert len(h.instances(snap)) == 2
    run(main())


def test_tree_reset_keeps_last_good_records():
    tree = RegistryTree()
    tree.set_namespaces("/meshkeeper", ["default"])
    tree.set_services("default", "/meshkeeper/default/services", ["catalog"])
    tree.set_service_data("default", "catalog", SVC, b'{"protocol":"http"}', 1)
    tree.reset()
    tree.set_namespaces("/meshkeeper", ["default"])
    tree.set_services("default", "/meshkeeper/default/services", ["catalog"])
    tree.set_service_data("default", "catalog", SVC, b'{"protocol":"nope"}', 2)
    snap = tree.build(1)
    assert snap.services("default")["catalog"].record.protocol == "http"
    assert SVC in tree.bad


def test_policy_created_later_applies_and_invalid_policy_keeps_the_last_valid_one():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.on_state("CONNECTED")
        snap = await h.next_snapshot(0)
        assert snap.services("default")["catalog"].policy.lb.policy == "round_robin"  # Envoy's default
        # The policy znode did not exist: an exists watch must pick up its creation.
        h.zk.write(f"{SVC}/policy", {"lb": {"policy": "least_request"}, "timeout_ms": 2500})
        await h.until(lambda: h.published[-1].services("default")["catalog"].policy.lb.policy == "least_request")
        # A typo is refused, counted, and the last valid policy stays.
        h.zk.write(f"{SVC}/policy", {"lb": {"polcy": "random"}})
        await h.until(lambda: h.bad_count("policy") == 1)
        await h.quiet()
        policy = h.published[-1].services("default")["catalog"].policy
        assert (policy.lb.policy, policy.timeout_ms) == ("least_request", 2500)
        # Deleting the policy returns to the defaults.
        h.zk.delete(f"{SVC}/policy")
        await h.until(lambda: h.published[-1].services("default")["catalog"].policy.lb.policy == "round_robin")
    run(main())


def test_an_unreadable_znode_is_counted_and_does_not_hold_back_snapshots():
    async def main():
        from controlplane import watch as w

        h = Harness()
        seed(h.zk)
        h.zk.on_state("CONNECTED")
        await h.next_snapshot(0)
        old = w.RETRY_DELAY
        w.RETRY_DELAY = 0.001
        try:
            locked = f"{SVC}/instances/10.0.0.9:15006"
            h.zk.fail_paths.add(locked)
            h.zk.write(locked, instance("10.0.0.9"))
            await h.until(lambda: h.bad_count("unreadable") == 1)
            # Other changes still reach a snapshot while the locked znode is retried.
            h.zk.write(f"{SVC}/overrides/10.0.0.2:15006", {"weight": 9})
            await h.until(lambda: h.published[-1].services("default")["catalog"].overrides["10.0.0.2:15006"].weight == 9)
            assert "10.0.0.9:15006" not in h.instances()
            h.zk.fail_paths.clear()  # the ACL is fixed: the retry picks it up
            await h.until(lambda: "10.0.0.9:15006" in h.instances(), within=5)
        finally:
            w.RETRY_DELAY = old
    run(main())


# --------------------------------------------------------------------------- runtime configs

CFG = "/meshkeeper/default/config"


def configs(h: Harness, snap: RegistrySnapshot | None = None, ns: str = "default") -> dict[str, dict[str, str]]:
    snap = snap or h.published[-1]
    return {svc: dict(v.values) for svc, v in snap.configs_of(ns).items()}


def layers(snap: RegistrySnapshot, ns: str = "default") -> dict[str, dict]:
    """The Runtime resources the snapshot translates to: name -> layer as a dict."""
    from google.protobuf import json_format

    from controlplane import translate
    from meshkeeper import xds
    return {n: json_format.MessageToDict(r.layer)
            for n, r in translate.shared_resources(snap, ns).resources[xds.RUNTIME].items()}


def test_configs_appear_change_go_bad_keep_the_last_good_and_are_deleted():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.write(f"{CFG}/catalog", {"color": "blue", "feature.x": "on"})
        h.zk.write(f"{CFG}/billing", {"mode": "dry"})  # no service znode: served all the same
        h.zk.on_state("CONNECTED")
        snap = await h.next_snapshot(0)
        assert configs(h, snap) == {"billing": {"mode": "dry"}, "catalog": {"color": "blue", "feature.x": "on"}}
        assert "billing" not in snap.services("default")
        assert layers(snap) == {"billing": {"mode": "dry"}, "catalog": {"color": "blue", "feature.x": "on"}}
        # a changed value publishes a new snapshot
        h.zk.write(f"{CFG}/catalog", {"color": "green"})
        snap = await h.until(lambda: configs(h).get("catalog") == {"color": "green"} and h.published[-1])
        assert snap.version == 2
        # a bad payload is skipped, counted once and the last good values stay
        h.zk.write(f"{CFG}/catalog", {"color": 7})
        await h.until(lambda: h.bad_count("config") == 1)
        h.zk.write(f"{CFG}/catalog", b"[not an object]")
        await h.until(lambda: h.bad_count("config") == 2)
        await h.quiet()
        assert configs(h)["catalog"] == {"color": "green"}
        assert len(h.published) == 2  # nothing the sidecars see changed
        assert CFG + "/catalog" in h.watch._tree.bad
        # fixed: served again
        h.zk.write(f"{CFG}/catalog", {"color": "red"})
        await h.until(lambda: configs(h).get("catalog") == {"color": "red"})
        assert CFG + "/catalog" not in h.watch._tree.bad
        # deleted: the config leaves the snapshot; the service's Runtime stays, empty
        h.zk.delete(f"{CFG}/catalog")
        snap = await h.until(lambda: "catalog" not in configs(h) and h.published[-1])
        assert layers(snap) == {"billing": {"mode": "dry"}, "catalog": {}}
        h.zk.delete(f"{CFG}/billing")
        snap = await h.until(lambda: not configs(h) and h.published[-1])
        assert layers(snap) == {"catalog": {}}
        assert h.bad_count("config") == 2
    run(main())


def test_config_dir_created_after_start_is_picked_up_and_its_removal_empties_configs():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.on_state("CONNECTED")
        snap = await h.next_snapshot(0)
        assert configs(h, snap) == {}
        assert f"{CFG}" in h.zk.exists_watches  # absent: watched for creation
        h.zk.write(f"{CFG}/catalog", {"color": "blue"})  # creates config/ too
        await h.until(lambda: configs(h) == {"catalog": {"color": "blue"}})
        h.zk.write(f"{CFG}/search", {"limit": "10"})
        await h.until(lambda: set(configs(h)) == {"catalog", "search"})
        h.zk.delete(CFG)
        await h.until(lambda: configs(h) == {})
        h.zk.write(f"{CFG}/catalog", {"color": "black"})  # and back
        await h.until(lambda: configs(h) == {"catalog": {"color": "black"}})
    run(main())


def test_config_with_a_bad_service_name_is_refused_and_counted():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.write(f"{CFG}/Bad_Name", {"color": "blue"})
        h.zk.write(f"{CFG}/catalog", {"color": "blue"})
        h.zk.on_state("CONNECTED")
        snap = await h.next_snapshot(0)
        assert configs(h, snap) == {"catalog": {"color": "blue"}}
        assert h.bad_count("config") == 1
        assert f"{CFG}/Bad_Name" not in h.zk.data_watches  # never read
        # another config arriving re-reads the children: the refusal is not counted again
        h.zk.write(f"{CFG}/search", {"a": "b"})
        await h.until(lambda: "search" in configs(h))
        assert h.bad_count("config") == 1
    run(main())


def test_configs_are_per_namespace_and_leave_with_their_namespace():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.write(f"{CFG}/catalog", {"env": "dev"})
        h.zk.write("/meshkeeper/prod/config/catalog", {"env": "prod"})
        h.zk.on_state("CONNECTED")
        snap = await h.next_snapshot(0)
        assert configs(h, snap) == {"catalog": {"env": "dev"}}
        assert configs(h, snap, "prod") == {"catalog": {"env": "prod"}}
        assert snap.config("prod", "catalog").values == {"env": "prod"}
        assert snap.config("prod", "nope") is None and snap.config("nope", "catalog") is None
        h.zk.delete("/meshkeeper/prod")
        await h.until(lambda: "prod" not in h.published[-1].namespaces)
        assert configs(h, ns="prod") == {} and configs(h) == {"catalog": {"env": "dev"}}
    run(main())


def test_reconnect_rereads_configs_and_an_unchanged_tree_publishes_nothing():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.write(f"{CFG}/catalog", {"color": "blue"})
        h.zk.on_state("CONNECTED")
        await h.next_snapshot(0)
        h.zk.on_state("SUSPENDED")
        h.zk.data_watches.clear()  # the change below is missed while disconnected
        h.zk.write(f"{CFG}/catalog", {"color": "red"})
        h.zk.on_state("CONNECTED")
        snap = await h.next_snapshot(1)
        assert configs(h, snap) == {"catalog": {"color": "red"}}
        h.zk.on_state("LOST")
        h.zk.on_state("CONNECTED")
        await h.quiet()
        assert len(h.published) == 2  # re-read, same content: no new snapshot
        h.zk.write(f"{CFG}/catalog", {"color": "red", "size": "xl"})  # watches were re-armed
        await h.until(lambda: configs(h)["catalog"] == {"color": "red", "size": "xl"})
    run(main())


def test_tree_reset_keeps_the_last_good_config_and_same_content_sees_configs():
    path = f"{CFG}/catalog"
    tree = RegistryTree()
    tree.set_namespaces("/meshkeeper", ["default"])
    assert tree.set_table_names("config", "default", CFG, ["catalog"]) == ["catalog"]
    tree.set_table_entry("config", "default", "catalog", path, b'{"color":"blue"}', 1)
    first = tree.build(1)
    assert tree.build(2).same_content(first)
    tree.reset()
    tree.set_namespaces("/meshkeeper", ["default"])
    tree.set_table_names("config", "default", CFG, ["catalog"])
    tree.set_table_entry("config", "default", "catalog", path, b'{"color": 1}', 2)
    assert tree.build(2).same_content(first)  # the bad payload changed nothing
    assert path in tree.bad
    tree.set_table_entry("config", "default", "catalog", path, b'{"color":"red"}', 3)
    changed = tree.build(3)
    assert not changed.same_content(first)
    assert changed.namespaces == first.namespaces  # only the config differs
    tree.remove_table_entry("config", "default", "catalog", path)
    assert tree.build(4).configs == {} and path not in tree.last_good
    # a config znode that never had a good payload is not in the snapshot
    tree.set_table_names("config", "default", CFG, ["catalog", "search"])
    tree.set_table_entry("config", "default", "search", f"{CFG}/search", b"nope", 5)
    assert tree.build(5).configs == {}


# --------------------------------------------------------------------------- virtual IPs

VIPS = "/meshkeeper/default/vips"


def test_vips_are_read_beside_services_and_the_claims_dir_is_not_a_namespace():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.write("/meshkeeper/_vips/240.240.0.9", {"namespace": "default", "service": "catalog"})
        h.zk.write(f"{VIPS}/catalog", {"address": "240.240.0.9"})
        h.zk.on_state("CONNECTED")
        snap = await h.next_snapshot(0)
        assert snap.vip("default", "catalog") == "240.240.0.9"
        assert set(snap.namespaces) == {"default"}  # "_vips" is reserved, not a namespace ...
        assert h.bad_count("namespace") == 0  # ... and not a bad znode either
        # a VIP allocated later publishes a new snapshot; a bad one is refused and the last good stays
        h.zk.write(f"{SVC.rpartition('/')[0]}/billing", {"protocol": "tcp"})
        h.zk.write(f"{VIPS}/billing", {"address": "240.240.0.10"})
        snap = await h.until(lambda: h.published[-1].vip("default", "billing") and h.published[-1])
        assert snap.vip("default", "billing") == "240.240.0.10"
        h.zk.write(f"{VIPS}/billing", {"address": "not-an-ip"})
        await h.until(lambda: h.bad_count("vip") == 1)
        assert h.published[-1].vip("default", "billing") == "240.240.0.10"
        h.zk.delete(f"{VIPS}/billing")
        snap = await h.until(lambda: h.published[-1].vip("default", "billing") is None and h.published[-1])
        assert snap.vip("default", "catalog") == "240.240.0.9"
    run(main())


# --------------------------------------------------------------------------- peer authentication and authz

NS_PA = "/meshkeeper/default/peer_authentication"


def test_peer_authentication_and_authz_are_watched_refused_when_bad_and_cleared_when_deleted():
    async def main():
        h = Harness()
        seed(h.zk)
        h.zk.write(NS_PA, {"mode": "STRICT"})
        h.zk.on_state("CONNECTED")
        snap = await h.next_snapshot(0)
        assert snap.peer_authentication["default"].mode == "STRICT"
        assert snap.peer_mode("default", "catalog") == "STRICT"
        assert snap.services("default")["catalog"].authz is None
        # The namespace's znode is a data znode, not a namespace table or a service.
        assert set(snap.services("default")) == {"catalog"} and h.bad_count("service") == 0
        # Created later: exists watches pick both service znodes up; the service's mode wins.
        h.zk.write(f"{SVC}/peer_authentication", {"mode": "DISABLE"})
        h.zk.write(f"{SVC}/authz", {"action": "ALLOW", "rules": [{"from": ["ns:prod"], "methods": ["GET"]}]})
        await h.until(lambda: h.published[-1].services("default")["catalog"].authz is not None
                      and h.published[-1].peer_mode("default", "catalog") == "DISABLE")
        authz = h.published[-1].services("default")["catalog"].authz
        assert authz.rules[0].sources == ("ns:prod",)
        # Bad payloads: refused, counted once each, the last good records stay.
        h.zk.write(f"{SVC}/authz", {"action": "ALLOW", "rules": [{"methods": ["get"]}]})
        h.zk.write(f"{SVC}/peer_authentication", {"mode": "OFF"})
        h.zk.write(NS_PA, {"mode": "STRICT", "port": 1})
        await h.until(lambda: h.bad_count("authz") == 1 and h.bad_count("peer_authentication") == 2)
        await h.quiet()
        snap = h.published[-1]
        assert snap.services("default")["catalog"].authz == authz
        assert snap.peer_mode("default", "catalog") == "DISABLE" and snap.peer_authentication["default"].mode == "STRICT"
        assert h.metrics.registry.get_sample_value("meshkeeper_registry_bad_znodes_current") == 3
        # Deleted: the service falls back to the namespace's mode, then to PERMISSIVE; no authz.
        h.zk.delete(f"{SVC}/peer_authentication")
        h.zk.delete(f"{SVC}/authz")
        await h.until(lambda: h.published[-1].peer_mode("default", "catalog") == "STRICT"
                      and h.published[-1].services("default")["catalog"].authz is None)
        h.zk.delete(NS_PA)
        await h.until(lambda: h.published[-1].peer_mode("default", "catalog") == "PERMISSIVE")
        assert not h.published[-1].peer_authentication
        assert h.metrics.registry.get_sample_value("meshkeeper_registry_bad_znodes_current") == 0
    run(main())


def test_namespace_peer_authentication_leaves_with_its_namespace_and_survives_a_reconnect():
    async def main():
        h = Harness()
        h.zk.write("/meshkeeper/prod/peer_authentication", {"mode": "STRICT"})  # a namespace with nothing else
        seed(h.zk)
        h.zk.on_state("CONNECTED")
        snap = await h.next_snapshot(0)
        assert snap.peer_mode("prod", "anything") == "STRICT" and snap.peer_mode("default", "catalog") == "PERMISSIVE"
        h.zk.on_state("SUSPENDED")
        h.zk.on_state("CONNECTED")
        await h.quiet()
        assert len(h.published) == 1  # re-read, same content: nothing new
        h.zk.delete("/meshkeeper/prod")
        await h.until(lambda: "prod" not in h.published[-1].peer_authentication)
    run(main())


def test_every_connection_state_is_told_to_the_event_stream():
    from controlplane.events import EventBus

    async def main():
        bus = EventBus()
        sub = bus.subscribe()
        zk = FakeZk()
        watch = RegistryWatch(zk, lambda s: None, metrics=Metrics(), debounce=DEBOUNCE, on_state=bus.zookeeper_state)
        watch.start()
        seed(zk)
        for state in ("CONNECTED", "SUSPENDED", "CONNECTED", "LOST"):
            zk.on_state(state)
        events = [sub.queue.get_nowait() for _ in range(4)]
        assert [(e.kind, e.state, e.summary) for e in events] == [
            ("zookeeper", s, f"ZooKeeper {s}") for s in ("CONNECTED", "SUSPENDED", "CONNECTED", "LOST")]
        await watch.stop()

    asyncio.run(main())
