"""Scale harness (issue 15): one control plane, K simulated sidecars, S services; how long a change
takes to reach every affected sidecar's ACK, and what it costs the control plane.

What it does
------------
1. Starts a throwaway ZooKeeper (meshkeeper.demo.zookeeper; or uses ``--zk HOST:PORT``) and writes S
   services into namespace ``default`` with kazoo, in transactions: ``services/scale-NNNNN``
   (``{"protocol": "http"}``) with two EPHEMERAL instances each (labels ``version=v1``,
   ``zone=a``), as DESIGN §3 lays them out.
2. Starts one ``meshkeeper controlplane`` on free ports (meshkeeper.demo.process, as the tests do)
   and waits until it holds the S services and has allocated their virtual IPs, and its snapshot
   version stays put for ``--quiet`` seconds. Its RSS then is the idle RSS.
3. Simulates K sidecars in ``--workers`` processes (multiprocessing), each running grpc.aio ADS
   streams, one gRPC connection per sidecar with the sidecar's own channel options. Sidecar k
   belongs to service k mod S, has a node identity of its own (advertise host 10.128.x.y, ports
   15006/15001/15000, node metadata built by the sidecar's own ``build_node``) and subscribes as
   sidecar/xds/client.py does: CDS and LDS wildcard and the RTDS Runtime of its service from the
   first request; then EDS for the EDS clusters CDS named and RDS for the route configurations its
   listeners name. Every response is ACKed at once (same version_info and response_nonce,
   resource_names kept); a NACK is never sent. ``--mode delta`` speaks DeltaAggregatedResources
   instead (type_url, resource_names_subscribe/unsubscribe, ACK by response_nonce); a control
   plane that answers UNIMPLEMENTED stops the run with a message saying so.
4. Waits (polling, with a deadline) until every stream has ACKed the initial state: LDS, CDS and
   RTDS received, and every subscribed EDS and RDS name held. Then measures the control plane's
   RSS again ("synced"), and its CPU use while idle with K streams; then polls its RSS every 0.5 s
   until it has not fallen by more than 1% over 3 s (deadline 30 s): the "settled" RSS, once gRPC
   has given back the transient buffers of the initial sync (``settle_rss``). Both are reported,
   each also per connected sidecar (minus the idle RSS).
5. Writes changes straight into ZooKeeper, one at a time, each kind ``--repeat`` times (the kinds
   interleaved round by round), always on a quiet mesh:

   * ``weight``: an operator override ``overrides/<host>:<port>`` = ``{"weight": W}`` (what
     ``meshkeeper weight`` makes the admin API write);
   * ``instance_down`` / ``instance_up``: one instance znode deleted, then created again;
   * ``policy``: ``services/<svc>/policy`` = ``{"timeout_ms": T, "connect_timeout_ms": C}``;
   * ``new_service``: a service znode and its two instances, in one transaction.

   The clock starts right before the ZooKeeper call is issued. A stream counts as reached when it
   has sent the ACK of the first response that carries the change, recognised by decoding the
   resource it must be in: the ClusterLoadAssignment of the service's cluster with the new weight
   / without the instance / with it again; for a policy both the Cluster's connect_timeout (CDS)
   and the route timeout in the service's virtual host (RDS ``outbound``); for a new service its
   Cluster, its ClusterLoadAssignment with both endpoints and its virtual host. A stream's time is
   that of the last of those ACKs. A change affects the streams that held the service's cluster
   before the write (a new service: every stream). Workers take time.monotonic() (one clock for
   every process on Linux) and report to this process over pipes.

   Per change it records: write -> ACK per affected stream; the control plane's CPU seconds
   (utime + stime from /proc/<pid>/stat) from the write until no stream has received anything for
   ``--quiet`` seconds (that idle tail is included; the idle rate is reported so it can be taken
   off); the bytes (serialized DiscoveryResponse / DeltaDiscoveryResponse sizes), resources and
   responses every stream received in that window; the simulator workers' CPU seconds; the control
   plane's RSS and peak RSS (VmHWM) afterwards; and its own counters (snapshot builds and their
   time, pushes by type) from /metrics.
6. Prints a Markdown table and a summary, writes the raw figures as JSON to ``--out`` (default
   bench/out/scale/<timestamp>.json; processes' logs next to it in <timestamp>.logs/), and stops
   every process it started, on failure and Ctrl-C too.

The simulator shares the machine with the control plane and ZooKeeper: its ACK times include its
own scheduling delays, and its CPU is reported. ``--pin`` puts the control plane alone on CPU 0 and
everything else on CPU 1. ``--cp-source DIR`` runs the control plane from another source tree
(e.g. ``git archive HEAD | tar -x -C DIR``), put ahead of the installed package on PYTHONPATH.

How to run
----------
::

    .venv/bin/python bench/scale.py --sidecars 100 --services 100
    .venv/bin/python bench/scale.py --sidecars 1000 --services 1000 --repeat 3
    .venv/bin/python bench/scale.py --sidecars 200 --services 200 --mode delta --kinds weight
    .venv/bin/python bench/scale.py --zk 127.0.0.1:2181 --cp-args "--debounce-ms 50"

Flags: ``--sidecars K``, ``--services S``, ``--mode sotw|delta``, ``--workers``, ``--repeat``,
``--kinds`` (comma-separated subset), ``--zk``, ``--cp-args``, ``--cp-source``, ``--timeout``
(seconds a change may take to reach every stream), ``--sync-timeout``, ``--quiet``, ``--pin``,
``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from envoy.config.cluster.v3 import cluster_pb2  # noqa: E402
from envoy.config.endpoint.v3 import endpoint_pb2  # noqa: E402
from envoy.config.listener.v3 import listener_pb2  # noqa: E402
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: E402
from envoy.service.discovery.v3 import discovery_pb2  # noqa: E402

from meshkeeper import xds  # noqa: E402
from meshkeeper.registry import InstanceRecord, Paths, ServiceRecord  # noqa: E402
from meshkeeper.xds import NodeInfo  # noqa: E402
from sidecar.xds.client import CHANNEL_OPTIONS, build_node  # noqa: E402 (the sidecar's own node and channel)
from sidecar.xds.state import MESSAGES  # noqa: E402

NS = "default"
PREFIX = "scale"  # service names scale-00000 ...; new services scale-new-<rep>
INSTANCE_PORT = 8080
APP_PORT = 8080
KINDS = ("weight", "instance_down", "instance_up", "policy", "new_service")
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
SOTW_METHOD = ADS + "StreamAggregatedResources"
DELTA_METHOD = ADS + "DeltaAggregatedResources"
# Order of the first requests, as the sidecar sends them (sidecar/xds/client.py).
INITIAL_TYPES = (xds.CLUSTER, xds.LISTENER, xds.RUNTIME)
EMPTY: frozenset[str] = frozenset()


class HarnessError(RuntimeError):
    """The run cannot go on (a process died, the control plane refused the mode, a deadline passed)."""


# --------------------------------------------------------------------------- the registry


def service_name(i: int) -> str:
    return f"{PREFIX}-{i:05d}"


def instance(i: int, j: int) -> InstanceRecord:
    """Instance j (0 or 1) of service index i: address 10.<i/256>.<i%256>.<j+1>, port 8080."""
    return InstanceRecord(address=f"10.{(i >> 8) & 255}.{i & 255}.{j + 1}", port=INSTANCE_PORT,
                          labels={"version": "v1", "zone": "a"}, protocol="http", app_port=APP_PORT)


def service_ops(tx: Any, paths: Paths, name: str, index: int,
                record: Callable[[int, int], InstanceRecord] = instance) -> None:
    """Add the creates of one service and its two instances (``record(index, j)``) to a kazoo transaction."""
    tx.create(paths.service(name), ServiceRecord(protocol="http").encode())
    tx.create(paths.instances(name), b"")
    for j in range(2):
        inst = record(index, j)
        tx.create(paths.instance(name, inst.key), inst.encode(), ephemeral=True)


def populate(zk: Any, services: int, batch: int = 100, in_flight: int = 8,
             record: Callable[[int, int], InstanceRecord] = instance) -> None:
    """S services with two instances each, ``batch`` services per transaction, several in flight.
    ``record(i, j)`` is instance j of service i (default :func:`instance`: addresses nothing answers)."""
    paths = Paths(NS)
    zk.ensure_path(paths.services)
    pending: list[tuple[int, Any]] = []

    def settle(item: tuple[int, Any]) -> None:
        start, result = item
        outcome = result.get(timeout=60)
        failed = [r for r in outcome if isinstance(r, Exception)]
        if failed:
            raise HarnessError(f"populating services from {service_name(start)}: {failed[0]!r}")

    for start in range(0, services, batch):
        tx = zk.transaction()
        for i in range(start, min(services, start + batch)):
            service_ops(tx, paths, service_name(i), i, record)
        pending.append((start, tx.commit_async()))
        if len(pending) >= in_flight:
            settle(pending.pop(0))
    for item in pending:
        settle(item)


def remove_ours(zk: Any) -> None:
    """Delete the services this harness writes, with the VIP records the control plane made for them
    (a run on an existing ZooKeeper leaves nothing behind)."""
    from meshkeeper.registry import VipRecord, vip_claim

    paths = Paths(NS)
    for name in zk.get_children(paths.services) if zk.exists(paths.services) else []:
        if name.startswith(PREFIX + "-"):
            zk.delete(paths.service(name), recursive=True)
    for name in zk.get_children(paths.vips) if zk.exists(paths.vips) else []:
        if name.startswith(PREFIX + "-"):
            with contextlib.suppress(Exception):
                address = VipRecord.decode(zk.get(paths.vip(name))[0]).address
                zk.delete(vip_claim(address))
            zk.delete(paths.vip(name))


# --------------------------------------------------------------------------- recognising a change


@dataclass(frozen=True, slots=True)
class Marker:
    """One thing a response must carry for a change to have reached a stream: ``check`` on the
    resource ``name`` of ``type_url`` (see :func:`evaluate`)."""

    label: str
    type_url: str
    name: str
    check: str
    arg: tuple = ()


def _field1(value: bytes) -> str | None:
    """The string in field 1 of a serialized message (the name of every resource type served),
    read without decoding the rest; None when field 1 is not first."""
    if len(value) < 2 or value[0] != 0x0A:
        return None
    n, i, shift = 0, 1, 0
    while True:
        b = value[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
    return value[i:i + n].decode()


def resource_name(type_url: str, value: bytes) -> str:
    name = _field1(value)
    if name is None:
        msg = MESSAGES[type_url].FromString(value)
        name = msg.cluster_name if type_url == xds.ENDPOINT else msg.name
    return name


def find(type_url: str, name: str, items: Iterable[tuple[str | None, bytes]]) -> Any:
    """The decoded resource ``name`` among (name or None, serialized resource) pairs, or None."""
    for rname, value in items:
        if (rname if rname is not None else resource_name(type_url, value)) == name:
            return MESSAGES[type_url].FromString(value)
    return None


def _endpoints(cla: endpoint_pb2.ClusterLoadAssignment) -> dict[str, Any]:
    out = {}
    for loc in cla.endpoints:
        for ep in loc.lb_endpoints:
            sa = ep.endpoint.address.socket_address
            out[f"{sa.address}:{sa.port_value}"] = ep
    return out


def evaluate(marker: Marker, items: Iterable[tuple[str | None, bytes]]) -> bool:
    msg = find(marker.type_url, marker.name, items)
    if msg is None:
        return False
    check, arg = marker.check, marker.arg
    if check == "endpoint_weight":
        ep = _endpoints(msg).get(arg[0])
        return ep is not None and ep.load_balancing_weight.value == arg[1]
    if check == "endpoint_absent":
        return arg[0] not in _endpoints(msg)
    if check == "endpoint_present":
        return arg[0] in _endpoints(msg)
    if check == "endpoint_count":
        return len(_endpoints(msg)) == arg[0]
    if check == "exists":
        return True
    if check == "connect_timeout_ms":
        return msg.connect_timeout.ToMilliseconds() == arg[0]
    if check == "route_timeout_ms":
        for vh in msg.virtual_hosts:
            if vh.name == arg[0]:
                return any(r.route.timeout.ToMilliseconds() == arg[1] for r in vh.routes)
        return False
    if check == "vhost":
        return any(vh.name == arg[0] for vh in msg.virtual_hosts)
    raise ValueError(f"unknown check {check!r}")


# --------------------------------------------------------------------------- simulated sidecars


def sidecar_node(k: int, services: int) -> NodeInfo:
    """Sidecar k: service k mod S, a host address of its own, the sidecar's default ports."""
    svc = service_name(k % services)
    host = f"10.{128 + (k >> 16)}.{(k >> 8) & 255}.{k & 255}"
    return NodeInfo(node_id=NodeInfo.make_id(host, svc, 15006, NS), service=svc, namespace=NS,
                    app_port=APP_PORT, inbound_port=15006, outbound_port=15001, admin_port=15000,
                    advertise_host=host, version="v1", protocol="http", interception="none",
                    outbound_policy="allow_any")


class Items:
    """A response's resources as (name or None, serialized resource) pairs, listed only when
    iterated: most responses are only ACKed, counted and looked up by their content key."""

    __slots__ = ("resources", "delta", "_pairs")

    def __init__(self, resources: Any, delta: bool) -> None:
        self.resources, self.delta = resources, delta
        self._pairs: list[tuple[str | None, bytes]] | None = None

    def __iter__(self):
        if self._pairs is None:
            if self.delta:  # a Resource without its resource is a TTL heartbeat: nothing changes
                self._pairs = [(r.name or None, r.resource.value) for r in self.resources if r.HasField("resource")]
            else:
                self._pairs = [(None, a.value) for a in self.resources]
        return iter(self._pairs)


@dataclass(slots=True)
class Info:
    """What one distinct response content says, worked out once per worker and shared by every
    stream that receives the same content (the names sets are the very same objects)."""

    names: frozenset[str]  # resources carried
    removed: frozenset[str] = EMPTY  # Delta: removed_resources
    eds: frozenset[str] = EMPTY  # CDS: the carried clusters of type EDS
    not_eds: frozenset[str] = EMPTY  # CDS: the carried clusters of other types
    rds: tuple[tuple[str, str], ...] = ()  # LDS: (listener, RDS route_config_name or "")
    rds_names: frozenset[str] = EMPTY


def _info(type_url: str, items: Iterable[tuple[str | None, bytes]], removed: Iterable[str] = ()) -> Info:
    names = frozenset(n if n is not None else resource_name(type_url, v) for n, v in items)
    info = Info(names=names, removed=frozenset(removed))
    if type_url == xds.CLUSTER:
        eds = set()
        for _, value in items:
            c = cluster_pb2.Cluster.FromString(value)
            if c.type == cluster_pb2.Cluster.EDS:
                eds.add(c.name)
        info.eds = frozenset(eds)
        info.not_eds = names - info.eds
    elif type_url == xds.LISTENER:
        rds = []
        for _, value in items:
            lst = listener_pb2.Listener.FromString(value)
            route = ""
            for chain in lst.filter_chains:
                for flt in chain.filters:
                    if flt.typed_config.type_url == xds.HCM:
                        hcm = http_connection_manager_pb2.HttpConnectionManager()
                        flt.typed_config.Unpack(hcm)
                        if hcm.WhichOneof("route_specifier") == "rds":
                            route = hcm.rds.route_config_name
            rds.append((lst.name, route))
        info.rds = tuple(sorted(rds))
        info.rds_names = frozenset(r for _, r in rds if r)
    return info


class Stream:
    """One simulated sidecar's ADS stream. Subclasses speak SotW or Delta."""

    method = ""
    request_cls: Any = None

    def __init__(self, worker: Worker, k: int, node: NodeInfo) -> None:
        self.worker, self.k, self.service = worker, k, node.service
        self.node = build_node(node)
        self.eds_sub: frozenset[str] = EMPTY  # EDS names subscribed
        self.rds_sub: frozenset[str] = EMPTY
        self.have = {xds.ENDPOINT: EMPTY, xds.ROUTE: EMPTY}  # names held of the named types
        self.received: set[str] = set()  # types with an ACKed response
        self.synced_at: float | None = None
        self.ended: str | None = None
        self.call: Any = None
        self.channel: grpc.aio.Channel | None = None
        self.total = [0, 0, 0]  # bytes, resources, responses since the stream opened
        self.window = [0, 0, 0]  # the same since the current change's write
        self.affected = False
        self.marks: dict[int, float] = {}  # marker index -> ACK time
        self.done: float | None = None

    # -- plumbing shared by both protocols

    async def run(self, target: str) -> None:
        # A connection per sidecar, as in a real fleet: no subchannel sharing between channels.
        options = (*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1))
        self.channel = grpc.aio.insecure_channel(target, options=options)
        try:
            self.call = self.channel.stream_stream(self.method, request_serializer=self.request_cls.SerializeToString,
                                                   response_deserializer=None)()
            await self.initial()
            while True:
                raw = await self.call.read()
                if raw is grpc.aio.EOF:
                    self.ended = "stream ended by the server (status OK)"
                    return
                await self.on_raw(raw)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self.ended = f"{exc.code().name}: {exc.details()}"
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.worker.unimplemented = self.ended
        except Exception as exc:  # a bug here must show, not hang the run
            self.ended = f"simulator error: {exc!r}"
        finally:
            if self.ended:
                self.worker.errors[self.ended] += 1

    async def send(self, req: Any) -> None:
        await self.call.write(req)

    def account(self, type_url: str, size: int, resources: int) -> None:
        for acc in (self.total, self.window, self.worker.by_type[xds.SHORT_TYPE[type_url]]):
            acc[0] += size
            acc[1] += resources
            acc[2] += 1
        self.worker.last_rx = time.monotonic()

    def recognise(self, type_url: str, key: bytes, items: Items, acked_at: float) -> None:
        """Check the current change's markers of this type against a response just ACKed."""
        markers = self.worker.markers_by_type.get(type_url)
        if not markers or self.done is not None:
            return
        for idx, marker in markers:
            if idx in self.marks:
                continue
            if self.worker.marker_result(idx, marker, key, items):
                self.marks[idx] = acked_at
        if len(self.marks) == len(self.worker.markers):
            self.done = max(self.marks.values())

    def check_synced(self) -> None:
        if self.synced_at is None and self.received.issuperset(INITIAL_TYPES) \
                and self.eds_sub <= self.have[xds.ENDPOINT] and self.rds_sub <= self.have[xds.ROUTE] \
                and (not self.eds_sub or xds.ENDPOINT in self.received) \
                and (not self.rds_sub or xds.ROUTE in self.received):
            self.synced_at = time.monotonic()

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self.channel is not None:
            await self.channel.close()

    async def initial(self) -> None:
        raise NotImplementedError

    async def on_raw(self, raw: bytes) -> None:
        raise NotImplementedError


class SotwStream(Stream):
    """State of the World, as sidecar/xds/client.py speaks it."""

    method = SOTW_METHOD
    request_cls = discovery_pb2.DiscoveryRequest

    def __init__(self, worker: Worker, k: int, node: NodeInfo) -> None:
        super().__init__(worker, k, node)
        self.version = dict.fromkeys(MESSAGES, "")
        self.nonce = dict.fromkeys(MESSAGES, "")
        self.first = True

    def names(self, type_url: str) -> list[str]:
        if type_url == xds.ENDPOINT:
            return self.worker.sorted_names(self.eds_sub)
        if type_url == xds.ROUTE:
            return self.worker.sorted_names(self.rds_sub)
        if type_url == xds.RUNTIME:
            return [self.service]
        return []  # LDS, CDS: wildcard

    def request(self, type_url: str) -> discovery_pb2.DiscoveryRequest:
        req = discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=self.version[type_url],
                                             response_nonce=self.nonce[type_url], resource_names=self.names(type_url))
        if self.first:
            req.node.CopyFrom(self.node)
            self.first = False
        return req

    async def initial(self) -> None:
        for type_url in INITIAL_TYPES:
            await self.send(self.request(type_url))

    async def on_raw(self, raw: bytes) -> None:
        resp = discovery_pb2.DiscoveryResponse.FromString(raw)
        t = resp.type_url
        if t not in MESSAGES:
            return
        # ACK first, as a sidecar that accepts the response does.
        self.version[t], self.nonce[t] = resp.version_info, resp.nonce
        await self.send(self.request(t))
        acked_at = time.monotonic()
        self.received.add(t)
        self.account(t, len(raw), len(resp.resources))
        items = Items(resp.resources, delta=False)
        key = content_key(raw, resp.nonce)
        info = self.worker.info(t, key, items)
        followups = []
        if t == xds.CLUSTER and info.eds != self.eds_sub:
            self.eds_sub = info.eds
            followups.append(xds.ENDPOINT)
        elif t == xds.LISTENER and info.rds_names != self.rds_sub:
            self.rds_sub = info.rds_names
            followups.append(xds.ROUTE)
        elif t in self.have:
            # SotW EDS/RDS responses may carry only some names: what is held is merged.
            sub = self.eds_sub if t == xds.ENDPOINT else self.rds_sub
            self.have[t] = info.names if info.names >= sub else self.worker.union(self.have[t], info.names, sub)
        self.recognise(t, key, items, acked_at)
        for dep in followups:
            self.have[dep] = self.worker.union(self.have[dep], EMPTY, self.eds_sub if dep == xds.ENDPOINT
                                               else self.rds_sub)
            await self.send(self.request(dep))
        self.check_synced()


class DeltaStream(Stream):
    """Incremental xDS with Envoy's semantics, as sidecar/xds/delta.py speaks it: per-type
    subscriptions changed by resource_names_subscribe/unsubscribe (LDS and CDS: the explicit
    wildcard ``*``), every response ACKed by its nonce, a Resource without its ``resource`` (a TTL
    heartbeat) changing nothing. Resources held are tracked by name."""

    method = DELTA_METHOD
    request_cls = discovery_pb2.DeltaDiscoveryRequest

    def __init__(self, worker: Worker, k: int, node: NodeInfo) -> None:
        super().__init__(worker, k, node)
        self.first = True
        self.eds_all: frozenset[str] = EMPTY  # EDS clusters held
        self.listeners: dict[str, str] = {}  # listener -> its RDS name ("" for none)

    def request(self, type_url: str, subscribe: Iterable[str] = (), unsubscribe: Iterable[str] = (),
                nonce: str = "") -> discovery_pb2.DeltaDiscoveryRequest:
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce,
                                                  resource_names_subscribe=sorted(subscribe),
                                                  resource_names_unsubscribe=sorted(unsubscribe))
        if self.first:
            req.node.CopyFrom(self.node)
            self.first = False
        return req

    async def initial(self) -> None:
        await self.send(self.request(xds.CLUSTER, subscribe=["*"]))
        await self.send(self.request(xds.LISTENER, subscribe=["*"]))
        await self.send(self.request(xds.RUNTIME, subscribe=[self.service]))

    async def on_raw(self, raw: bytes) -> None:
        resp = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
        t = resp.type_url
        if t not in MESSAGES:
            return
        await self.send(self.request(t, nonce=resp.nonce))
        acked_at = time.monotonic()
        self.received.add(t)
        self.account(t, len(raw), len(resp.resources))
        items = Items(resp.resources, delta=True)
        key = content_key(raw, resp.nonce)
        info = self.worker.info(t, key, items, resp.removed_resources)
        w = self.worker
        changes = []
        if t == xds.CLUSTER:
            self.eds_all = w.apply(self.eds_all, info.removed | info.not_eds, info.eds)
            if self.eds_all != self.eds_sub:
                changes.append((xds.ENDPOINT, self.eds_all - self.eds_sub, self.eds_sub - self.eds_all))
                self.eds_sub = self.eds_all
        elif t == xds.LISTENER:
            for name in info.removed:
                self.listeners.pop(name, None)
            self.listeners.update(info.rds)
            rds = w.intern(frozenset(r for r in self.listeners.values() if r))
            if rds != self.rds_sub:
                changes.append((xds.ROUTE, rds - self.rds_sub, self.rds_sub - rds))
                self.rds_sub = rds
        elif t in self.have:
            self.have[t] = w.apply(self.have[t], info.removed, info.names)
        self.recognise(t, key, items, acked_at)
        for dep, sub, unsub in changes:
            self.have[dep] = w.apply(self.have[dep], unsub, EMPTY)
            await self.send(self.request(dep, subscribe=sub, unsubscribe=unsub))
        self.check_synced()


def content_key(raw: bytes, nonce: str) -> bytes:
    """A digest of a response without its nonce: equal for responses that carry the same things.

    The nonce is the field every response differs in; it is found from the end, where serializers
    put it (fields in number order). Were it found elsewhere, the key would just miss the cache."""
    enc = nonce.encode()
    length, size = [], len(enc)
    while True:
        b = size & 0x7F
        size >>= 7
        length.append(b | (0x80 if size else 0))
        if not size:
            break
    at = raw.rfind(b"\x2a" + bytes(length) + enc) if enc else -1
    h = hashlib.sha1(usedforsecurity=False)
    view = memoryview(raw)
    if at < 0:
        h.update(view)
    else:
        h.update(view[:at])
        h.update(view[at + 1 + len(length) + len(enc):])
    return h.digest()


class Worker:
    """One simulator process: its streams on one asyncio loop, driven over a pipe by the driver."""

    INFO_CACHE = 4096

    def __init__(self, conn: Any, target: str, mode: str, sidecars: list[int], services: int) -> None:
        self.conn, self.target = conn, target
        cls = SotwStream if mode == "sotw" else DeltaStream
        self.streams = [cls(self, k, sidecar_node(k, services)) for k in sidecars]
        self.tasks: list[asyncio.Task] = []
        self.infos: OrderedDict[tuple[str, bytes], Info] = OrderedDict()
        self.interned: dict[frozenset[str], frozenset[str]] = {}
        self.sorted_cache: dict[frozenset[str], list[str]] = {}
        self.apply_cache: OrderedDict[tuple, frozenset[str]] = OrderedDict()
        self.markers: tuple[Marker, ...] = ()
        self.markers_by_type: dict[str, list[tuple[int, Marker]]] = {}
        self.marker_results: dict[tuple[int, bytes], bool] = {}
        self.last_rx = 0.0
        self.by_type: dict[str, list[int]] = {short: [0, 0, 0] for short in xds.SHORT_TYPE.values()}
        self.unimplemented: str | None = None
        self.errors: Counter[str] = Counter()
        self.stopped: asyncio.Future | None = None

    # -- shared state between streams

    def info(self, type_url: str, key: bytes, items: Items, removed: Iterable[str] = ()) -> Info:
        got = self.infos.get((type_url, key))
        if got is None:
            got = _info(type_url, items, removed)
            got.names, got.eds, got.rds_names = (self.intern(got.names), self.intern(got.eds),
                                                 self.intern(got.rds_names))
            self.infos[(type_url, key)] = got
            if len(self.infos) > self.INFO_CACHE:
                self.infos.popitem(last=False)
        else:
            self.infos.move_to_end((type_url, key))
        return got

    def intern(self, names: frozenset[str]) -> frozenset[str]:
        if len(self.interned) > self.INFO_CACHE:
            self.interned.clear()
        return self.interned.setdefault(names, names)

    def sorted_names(self, names: frozenset[str]) -> list[str]:
        got = self.sorted_cache.get(names)
        if got is None:
            if len(self.sorted_cache) > 64:
                self.sorted_cache.clear()
            got = self.sorted_cache[names] = sorted(names)
        return got

    def apply(self, base: frozenset[str], remove: frozenset[str], add: frozenset[str]) -> frozenset[str]:
        """(base - remove) | add, the same object for every stream that makes the same step."""
        key = (base, remove, add)
        got = self.apply_cache.get(key)
        if got is None:
            got = self.apply_cache[key] = self.intern((base - remove) | add)
            if len(self.apply_cache) > self.INFO_CACHE:
                self.apply_cache.popitem(last=False)
        return got

    def union(self, held: frozenset[str], got: frozenset[str], sub: frozenset[str]) -> frozenset[str]:
        """SotW merge of a named type: what was held and still subscribed, plus what came."""
        return self.apply(held, held - sub, got) if held - sub else self.apply(held, EMPTY, got)

    def marker_result(self, idx: int, marker: Marker, key: bytes, items: Items) -> bool:
        got = self.marker_results.get((idx, key))
        if got is None:
            got = self.marker_results[(idx, key)] = evaluate(marker, items)
        return got

    # -- commands from the driver

    def on_command(self) -> None:
        try:
            cmd, *args = self.conn.recv()
        except EOFError:  # the driver is gone
            if self.stopped is not None and not self.stopped.done():
                self.stopped.set_result(None)
            return
        reply = getattr(self, "cmd_" + cmd)(*args)
        self.conn.send(reply)

    def cmd_connect(self) -> dict:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(s.run(self.target)) for s in self.streams]
        return {"t": time.monotonic()}

    def cmd_status(self) -> dict:
        streams = self.streams
        return {
            "streams": len(streams),
            "synced": sum(1 for s in streams if s.synced_at is not None),
            "ended": sum(1 for s in streams if s.ended is not None),
            "errors": dict(self.errors.most_common(5)),
            "unimplemented": self.unimplemented,
            "affected": sum(1 for s in streams if s.affected),
            "done": sum(1 for s in streams if s.affected and s.done is not None),
            "last_rx": self.last_rx,
            "now": time.monotonic(),
        }

    def cmd_sync_report(self) -> dict:
        return {"synced_at": [s.synced_at for s in self.streams], "bytes": [s.total[0] for s in self.streams],
                "resources": [s.total[1] for s in self.streams], "responses": [s.total[2] for s in self.streams]}

    def cmd_expect(self, markers: tuple[Marker, ...], cluster: str | None) -> dict:
        self.markers = markers
        self.markers_by_type = {}
        for idx, m in enumerate(markers):
            self.markers_by_type.setdefault(m.type_url, []).append((idx, m))
        self.marker_results = {}
        self.by_type = {short: [0, 0, 0] for short in xds.SHORT_TYPE.values()}
        for s in self.streams:
            s.window = [0, 0, 0]
            s.marks, s.done = {}, None
            s.affected = s.ended is None and (cluster is None or cluster in s.eds_sub)
        return {"affected": sum(1 for s in self.streams if s.affected)}

    def cmd_collect(self) -> dict:
        out = {"k": [], "affected": [], "done": [], "marks": [], "bytes": [], "resources": [], "responses": [],
               "by_type": self.by_type}
        for s in self.streams:
            out["k"].append(s.k)
            out["affected"].append(s.affected)
            out["done"].append(s.done)
            out["marks"].append([s.marks.get(i) for i in range(len(self.markers))])
            out["bytes"].append(s.window[0])
            out["resources"].append(s.window[1])
            out["responses"].append(s.window[2])
        self.markers, self.markers_by_type, self.marker_results = (), {}, {}
        return out

    def cmd_stop(self) -> str:
        asyncio.get_running_loop().create_task(self._stop())
        return "stopping"

    async def _stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in self.streams), return_exceptions=True)
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_result(None)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopped = loop.create_future()
        loop.add_reader(self.conn.fileno(), self.on_command)
        try:
            await self.stopped
        finally:
            loop.remove_reader(self.conn.fileno())
            for t in self.tasks:
                t.cancel()


def worker_main(conn: Any, target: str, mode: str, sidecars: list[int], services: int) -> None:
    """Entry point of a simulator process (multiprocessing, spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    with contextlib.suppress(OSError, AttributeError):  # die with the driver (PR_SET_PDEATHSIG = 1)
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    asyncio.run(Worker(conn, target, mode, sidecars, services).serve())


# --------------------------------------------------------------------------- the driver


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(http_port: int) -> dict[str, float]:
    """The control plane's own counters that say where its time goes (unlabelled sums over labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=30) as r:
        body = r.read().decode()
    out: dict[str, float] = {}
    wanted = ("meshkeeper_snapshot_build_seconds_sum", "meshkeeper_snapshot_build_seconds_count",
              "meshkeeper_xds_pushes_total", "meshkeeper_xds_acks_total", "meshkeeper_xds_nacks_total",
              "meshkeeper_registry_services ", "meshkeeper_registry_snapshot_version",
              "meshkeeper_xds_connected_proxies")
    for line in body.splitlines():
        if not line.startswith(wanted):
            continue
        name, _, value = line.rpartition(" ")
        base, _, labels = name.partition("{")
        key = base
        if base in ("meshkeeper_xds_pushes_total", "meshkeeper_snapshot_build_seconds_sum",
                    "meshkeeper_snapshot_build_seconds_count"):
            key = f"{base}{{{labels}" if labels else base
        out[key] = out.get(key, 0.0) + float(value)
    return out


def metric_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 6) for k in after
            if not k.startswith(("meshkeeper_registry", "meshkeeper_xds_connected")) and after[k] != before.get(k, 0.0)}


def healthz(http_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=10) as r:
        return json.load(r)


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


class Workers:
    """The simulator processes and their pipes."""

    def __init__(self, n: int, target: str, mode: str, sidecars: int, services: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.procs, self.conns = [], []
        for w in range(n):
            mine = list(range(w, sidecars, n))
            if not mine:
                continue
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child, target, mode, mine, services), name=f"scale-sim-{w}",
                            daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def call(self, *cmd: Any, timeout: float = 120.0) -> list[Any]:
        for conn in self.conns:
            conn.send(cmd)
        replies = []
        for i, conn in enumerate(self.conns):
            if not conn.poll(timeout):
                raise HarnessError(f"simulator worker {i} did not answer {cmd[0]!r} within {timeout:.0f}s")
            try:
                replies.append(conn.recv())
            except EOFError:
                raise HarnessError(f"simulator worker {i} exited (code {self.procs[i].exitcode})") from None
        return replies

    def status(self) -> dict:
        parts = self.call("status")
        errors: Counter[str] = Counter()
        for p in parts:
            errors.update(p["errors"])
        return {
            "streams": sum(p["streams"] for p in parts),
            "synced": sum(p["synced"] for p in parts),
            "ended": sum(p["ended"] for p in parts),
            "errors": dict(errors),
            "unimplemented": next((p["unimplemented"] for p in parts if p["unimplemented"]), None),
            "affected": sum(p["affected"] for p in parts),
            "done": sum(p["done"] for p in parts),
            "last_rx": max(p["last_rx"] for p in parts),
        }

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.send(("stop",))
        deadline = time.monotonic() + 15
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        for conn in self.conns:
            conn.close()


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Change:
    kind: str
    rep: int
    service: str
    markers: tuple[Marker, ...]
    cluster: str | None  # streams holding this cluster are affected (None: all)
    write: Callable[[], None]
    detail: str = ""


@dataclass
class Run:
    args: argparse.Namespace
    zk: Any  # KazooClient
    cp_pid: int
    http_port: int
    workers: Workers
    services: int  # how many exist now (new_service adds)
    results: list[dict] = field(default_factory=list)

    # -- waiting, with deadlines

    def check_streams(self, st: dict) -> None:
        if st["unimplemented"] and self.args.mode == "delta":
            raise HarnessError(
                "the control plane answered UNIMPLEMENTED to DeltaAggregatedResources: it does not serve "
                f"Delta xDS (yet). Run with --mode sotw, or against a control plane that serves Delta. "
                f"({st['unimplemented']})")
        if st["ended"]:
            raise HarnessError(f"{st['ended']} of {st['streams']} simulated streams ended: {st['errors']}")

    def wait_quiet(self, deadline: float) -> float:
        """Until no stream has received anything for --quiet seconds; returns the last receive time."""
        while True:
            st = self.workers.status()
            self.check_streams(st)
            now = time.monotonic()
            if now - st["last_rx"] >= self.args.quiet:
                return st["last_rx"]
            if now > deadline:
                raise HarnessError(f"the streams did not go quiet for {self.args.quiet}s before the deadline")
            time.sleep(min(0.1, max(0.01, self.args.quiet - (now - st["last_rx"]))))

    # -- the changes

    def make_change(self, kind: str, rep: int) -> Change:
        zk, paths = self.zk, Paths(NS)
        base = self.args.services
        # A different service for each kind and round (instance_up brings back instance_down's).
        index = {"weight": 3, "instance_down": 5, "instance_up": 5, "policy": 7}.get(kind, 0)
        index = (index + rep * 11) % base
        svc = service_name(index)
        cluster = xds.outbound_cluster(svc, NS)
        if kind == "weight":
            inst = instance(index, 0)
            weight = 20 + rep
            path = paths.override(svc, inst.key)
            zk.ensure_path(paths.overrides(svc))  # the parent first: the write is one znode
            exists = zk.exists(path) is not None
            data = json.dumps({"weight": weight}).encode()
            return Change(kind, rep, svc, (Marker("EDS", xds.ENDPOINT, cluster, "endpoint_weight", (inst.key, weight)),),
                          cluster, (lambda: zk.set(path, data)) if exists else (lambda: zk.create(path, data)),
                          f"{inst.key} weight {weight}")
        if kind == "instance_down":
            inst = instance(index, 1)
            path = paths.instance(svc, inst.key)
            return Change(kind, rep, svc, (Marker("EDS", xds.ENDPOINT, cluster, "endpoint_absent", (inst.key,)),),
                          cluster, lambda: zk.delete(path), f"{inst.key} deleted")
        if kind == "instance_up":
            inst = instance(index, 1)
            path = paths.instance(svc, inst.key)
            return Change(kind, rep, svc, (Marker("EDS", xds.ENDPOINT, cluster, "endpoint_present", (inst.key,)),),
                          cluster, lambda: zk.create(path, inst.encode(), ephemeral=True), f"{inst.key} created")
        if kind == "policy":
            timeout_ms, connect_ms = 3000 + 7 * rep + 1, 500 + 3 * rep + 1
            path = paths.policy(svc)
            data = json.dumps({"timeout_ms": timeout_ms, "connect_timeout_ms": connect_ms}).encode()
            exists = zk.exists(path) is not None
            markers = (Marker("CDS", xds.CLUSTER, cluster, "connect_timeout_ms", (connect_ms,)),
                       Marker("RDS", xds.ROUTE, xds.OUTBOUND_ROUTE, "route_timeout_ms", (f"{svc}.{NS}", timeout_ms)))
            return Change(kind, rep, svc, markers, cluster,
                          (lambda: zk.set(path, data)) if exists else (lambda: zk.create(path, data)),
                          f"timeout_ms {timeout_ms}, connect_timeout_ms {connect_ms}")
        if kind == "new_service":
            svc = f"{PREFIX}-new-{rep}"
            cluster = xds.outbound_cluster(svc, NS)
            index = 60000 + rep  # instance addresses no other service uses
            tx = zk.transaction()
            service_ops(tx, paths, svc, index)

            def write() -> None:
                failed = [r for r in tx.commit() if isinstance(r, Exception)]
                if failed:
                    raise HarnessError(f"creating {svc}: {failed[0]!r}")

            markers = (Marker("CDS", xds.CLUSTER, cluster, "exists"),
                       Marker("EDS", xds.ENDPOINT, cluster, "endpoint_count", (2,)),
                       Marker("RDS", xds.ROUTE, xds.OUTBOUND_ROUTE, "vhost", (f"{svc}.{NS}",)))
            return Change(kind, rep, svc, markers, None, write, "service and 2 instances")
        raise ValueError(kind)

    def measure(self, change: Change) -> dict:
        args = self.args
        self.wait_quiet(time.monotonic() + args.timeout)
        affected = sum(r["affected"] for r in self.workers.call("expect", change.markers, change.cluster))
        m0 = scrape(self.http_port)
        cpu0, sim0 = cpu_seconds(self.cp_pid), self.workers.cpu()
        t0 = time.monotonic()
        change.write()
        written = time.monotonic()
        deadline = t0 + args.timeout
        timed_out = False
        while True:
            st = self.workers.status()
            self.check_streams(st)
            if st["done"] >= affected:
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.05)
        last_rx = self.wait_quiet(time.monotonic() + args.timeout)
        end = time.monotonic()
        cpu1, sim1 = cpu_seconds(self.cp_pid), self.workers.cpu()
        rss, peak = _rss(self.cp_pid), _rss(self.cp_pid, "VmHWM")
        m1 = scrape(self.http_port)
        parts = self.workers.call("collect")
        lat, marks, unexpected = [], [[] for _ in change.markers], 0
        bytes_, resources, responses = [], [], []
        for p in parts:
            for aff, done, mk, b, r, n in zip(p["affected"], p["done"], p["marks"], p["bytes"], p["resources"],
                                              p["responses"], strict=True):
                bytes_.append(b)
                resources.append(r)
                responses.append(n)
                if not aff:
                    unexpected += done is not None
                    continue
                if done is not None:
                    lat.append(round((done - t0) * 1000, 3))
                for i, t in enumerate(mk):
                    if t is not None:
                        marks[i].append(round((t - t0) * 1000, 3))
        k = len(bytes_)
        by_type = {}
        for p in parts:
            for short, (b, r, n) in p["by_type"].items():
                got = by_type.setdefault(short, {"bytes": 0, "resources": 0, "responses": 0})
                got["bytes"] += b
                got["resources"] += r
                got["responses"] += n
        rec = {
            "kind": change.kind, "rep": change.rep, "service": change.service, "detail": change.detail,
            "services_in_registry": self.services, "affected": affected, "reached": len(lat),
            "missing": affected - len(lat), "unexpected": unexpected, "timed_out": timed_out,
            "write_call_ms": round((written - t0) * 1000, 3),
            "latency_ms": sorted(lat),
            "marker_latency_ms": {m.label: sorted(v) for m, v in zip(change.markers, marks, strict=True)},
            "window_s": round(end - t0, 3), "last_response_after_s": round(last_rx - t0, 3),
            "cp_cpu_s": round(cpu1 - cpu0, 3), "sim_cpu_s": round(sim1 - sim0, 3),
            "cp_rss_kib_after": rss, "cp_peak_rss_kib_after": peak,
            "bytes_total": sum(bytes_), "resources_total": sum(resources), "responses_total": sum(responses),
            "bytes_per_stream": sum(bytes_) / k, "resources_per_stream": sum(resources) / k,
            "responses_per_stream": sum(responses) / k,
            "by_type": {t: v for t, v in by_type.items() if v["responses"]},
            "bytes_by_stream": bytes_, "cp_metrics": metric_delta(m0, m1),
        }
        if change.kind == "new_service":
            self.services += 1
        return rec


def start_zookeeper(log_dir: Path) -> Any:
    """A throwaway standalone ZooKeeper (meshkeeper.demo.zookeeper) with its files in log_dir/zookeeper;
    ``.hosts`` is its connection string, ``.close()`` stops it."""
    from meshkeeper.demo.zookeeper import ZooKeeper

    return ZooKeeper(log_dir / "zookeeper").start()


def start_controlplane(args: argparse.Namespace, zk_hosts: str, log_dir: Path) -> Any:
    from meshkeeper.demo.process import ManagedProcess, meshkeeper_argv

    argv = meshkeeper_argv("controlplane", "--zk", zk_hosts, "--xds-port", "0", "--http-port", "0",
                           "--bind", "127.0.0.1", *shlex.split(args.cp_args))
    if args.pin:
        argv = ["taskset", "-c", "0", *argv]
    env = None
    if args.cp_source:
        src = str(Path(args.cp_source).resolve())
        env = {"PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
    cp = ManagedProcess(argv, role="controlplane", name="controlplane", log_dir=log_dir, env=env)
    cp.start(60)
    return cp


def wait_cp_loaded(args: argparse.Namespace, zk: Any, http_port: int, cp: Any) -> dict:
    """Until the control plane holds the S services, has given each a VIP and its snapshot version
    stays put for --quiet seconds."""
    paths = Paths(NS)
    deadline = time.monotonic() + args.sync_timeout
    stable_since, version = time.monotonic(), None
    while True:
        if not cp.running():
            raise HarnessError(f"the control plane exited ({cp.returncode}):\n{cp.stderr_tail()}")
        with contextlib.suppress(OSError, ValueError):
            h = healthz(http_port)
            m = scrape(http_port)
            vips = sum(1 for n in zk.get_children(paths.vips) if n.startswith(PREFIX + "-")) \
                if zk.exists(paths.vips) else 0
            v = (h.get("registry_snapshot") or {}).get("version")
            now = time.monotonic()
            if v != version:
                version, stable_since = v, now
            if v is not None and m.get("meshkeeper_registry_services", 0) >= args.services and vips >= args.services and now - stable_since >= args.quiet:
                return {"snapshot_version": v, "vips": vips}
        if time.monotonic() > deadline:
            raise HarnessError(f"the control plane did not load {args.services} services within {args.sync_timeout}s")
        time.sleep(0.1)


SETTLE_INTERVAL = 0.5  # seconds between RSS samples
SETTLE_WINDOW = 3.0  # RSS settled: it has not fallen by more than SETTLE_FALL over this long
SETTLE_FALL = 0.01
SETTLE_DEADLINE = 30.0


def settle_rss(read: Callable[[], int], interval: float = SETTLE_INTERVAL, window: float = SETTLE_WINDOW,
               fall: float = SETTLE_FALL, deadline: float = SETTLE_DEADLINE) -> dict:
    """Poll ``read()`` (an RSS in KiB) every ``interval`` s until, over the last ``window`` s, it has
    not fallen by more than ``fall`` of the highest sample in that window (deadline ``deadline`` s).

    Right after a burst of work (the initial sync of K streams) RSS still holds transient buffers
    that are given back within seconds with nothing happening; the settled figure is what stays.
    Returns ``rss_kib`` (the last sample), ``first_kib``, ``settled`` (False: the deadline passed
    while it still fell), ``after_s`` (seconds of polling) and ``samples`` ([seconds, KiB] each)."""
    t0 = time.monotonic()
    samples: list[tuple[float, int]] = [(t0, read())]
    while True:
        time.sleep(interval)
        now = time.monotonic()
        samples.append((now, read()))
        in_window = [rss for t, rss in samples if t >= now - window - interval / 2]
        full = now - samples[0][0] >= window - interval / 2
        settled = full and max(in_window) - in_window[-1] <= fall * max(in_window)
        if settled or now - t0 >= deadline:
            return {"rss_kib": samples[-1][1], "first_kib": samples[0][1], "settled": settled,
                    "after_s": round(now - t0, 1), "samples": [[round(t - t0, 1), rss] for t, rss in samples]}


def git_state() -> dict:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": run("git", "rev-parse", "--short", "HEAD"),
            "dirty": run("git", "status", "--porcelain", "--", "controlplane", "meshkeeper").splitlines()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sidecars", "-k", type=int, default=100, help="simulated sidecars K (default %(default)s)")
    p.add_argument("--services", "-s", type=int, default=100, help="services S, 2 instances each (default %(default)s)")
    p.add_argument("--mode", choices=("sotw", "delta"), default="sotw")
    p.add_argument("--workers", type=int, default=2, help="simulator processes (default %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="changes of each kind (default %(default)s)")
    p.add_argument("--kinds", default=",".join(KINDS), help="change kinds, comma-separated (default: all)")
    p.add_argument("--zk", default="", metavar="HOST:PORT", help="use this ZooKeeper instead of starting one")
    p.add_argument("--cp-args", default="", help="extra control plane flags, one shell-quoted string")
    p.add_argument("--cp-source", default="", metavar="DIR",
                   help="run the control plane from this source tree (put first on its PYTHONPATH)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a change may take to reach every affected stream (default %(default)s)")
    p.add_argument("--sync-timeout", type=float, default=600.0,
                   help="seconds for loading the registry and for the initial sync of all streams (default %(default)s)")
    p.add_argument("--quiet", type=float, default=1.0,
                   help="a change's window ends once no stream received anything for this long (default %(default)s s)")
    p.add_argument("--pin", action="store_true", help="control plane alone on CPU 0, everything else on CPU 1")
    p.add_argument("--out", default="", help="JSON of raw figures (default bench/out/scale/<timestamp>.json)")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        p.error(f"--kinds: unknown {bad} (known: {', '.join(KINDS)})")
    if "instance_up" in kinds and "instance_down" not in kinds:
        p.error("--kinds: instance_up needs instance_down")
    if args.sidecars < 1 or args.services < 1 or args.workers < 1 or args.repeat < 1:
        p.error("--sidecars, --services, --workers and --repeat must be at least 1")
    if args.services > 60000:
        p.error("--services: at most 60000")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "bench/out/scale" / f"{stamp}.json"
    log_dir = out.with_suffix(".logs")
    log_dir.mkdir(parents=True, exist_ok=True)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    if args.pin:
        os.sched_setaffinity(0, {1 % (os.cpu_count() or 1)})  # children inherit it; the CP goes to CPU 0

    from kazoo.client import KazooClient

    report: dict[str, Any] = {
        "command": shlex.join([os.path.relpath(sys.executable, ROOT), os.path.relpath(__file__, ROOT),
                               *(argv if argv is not None else sys.argv[1:])]),
        "config": {k: getattr(args, k) for k in ("sidecars", "services", "mode", "workers", "repeat", "zk",
                                                 "cp_args", "cp_source", "timeout", "quiet", "pin")},
        "kinds": kinds, "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "git": git_state(), "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                     "grpcio": grpc.__version__,
                                     "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]},
    }
    zk_server = zk = cp = workers = None
    cleanup_registry = False

    def stop_all() -> None:
        nonlocal zk_server, zk, cp, workers
        if workers is not None:
            workers.close()
            workers = None
        if cp is not None:
            cp.terminate(10)
            cp = None
        if zk is not None:
            if cleanup_registry:
                with contextlib.suppress(Exception):
                    remove_ours(zk)
            with contextlib.suppress(Exception):
                zk.stop()
                zk.close()
            zk = None
        if zk_server is not None:
            zk_server.close()
            zk_server = None

    atexit.register(stop_all)
    started = time.monotonic()
    try:
        if args.zk:
            hosts = args.zk
        else:
            zk_server = start_zookeeper(log_dir)
            hosts = zk_server.hosts
        zk = KazooClient(hosts=hosts, timeout=30.0)
        zk.start(30)
        if args.zk:
            cleanup_registry = True
            remove_ours(zk)  # leftovers of an interrupted run
        t = time.monotonic()
        populate(zk, args.services)
        report["populate_s"] = round(time.monotonic() - t, 3)
        log(f"ZooKeeper {hosts}: {args.services} services, {2 * args.services} instances written in "
            f"{report['populate_s']:.1f}s")

        cp = start_controlplane(args, hosts, log_dir)
        xds_port, http_port = cp.port("xds_port"), cp.port("http_port")
        t = time.monotonic()
        loaded = wait_cp_loaded(args, zk, http_port, cp)
        cp_rss_idle = _rss(cp.pid)
        report["controlplane"] = {"pid": cp.pid, "xds_port": xds_port, "http_port": http_port,
                                  "load_s": round(time.monotonic() - t, 3), **loaded,
                                  "cpu_s_at_load": cpu_seconds(cp.pid), "rss_kib_idle": cp_rss_idle}
        log(f"control plane pid {cp.pid} (xDS {xds_port}) loaded the registry; RSS {cp_rss_idle / 1024:.0f} MiB")

        workers = Workers(args.workers, f"127.0.0.1:{xds_port}", args.mode, args.sidecars, args.services)
        run = Run(args, zk, cp.pid, http_port, workers, args.services)
        sim0, cpu0 = workers.cpu(), cpu_seconds(cp.pid)
        t0 = time.monotonic()
        workers.call("connect")
        deadline = t0 + args.sync_timeout
        last_log = t0
        while True:
            st = workers.status()
            run.check_streams(st)
            if st["synced"] == args.sidecars:
                break
            now = time.monotonic()
            if now > deadline:
                raise HarnessError(f"only {st['synced']} of {args.sidecars} streams synced within {args.sync_timeout}s")
            if now - last_log > 10:
                log(f"  {st['synced']}/{args.sidecars} streams synced after {now - t0:.0f}s")
                last_log = now
            time.sleep(0.1)
        sync = workers.call("sync_report")
        synced_at = [x for part in sync for x in part["synced_at"]]
        sync_bytes = [x for part in sync for x in part["bytes"]]
        sync_res = [x for part in sync for x in part["resources"]]
        run.wait_quiet(time.monotonic() + args.sync_timeout)
        cpu_synced, sim_synced = cpu_seconds(cp.pid), workers.cpu()
        rss_synced, peak_synced = _rss(cp.pid), _rss(cp.pid, "VmHWM")
        t_rss_synced = time.monotonic()
        # The control plane's CPU while idle with K streams, over two --quiet windows (the rate is
        # what each change's window carries besides the change itself).
        t_idle = time.monotonic()
        time.sleep(2 * args.quiet)
        idle_rate = (cpu_seconds(cp.pid) - cpu_synced) / (time.monotonic() - t_idle)
        report["sync"] = {
            "all_synced_s": round(max(synced_at) - t0, 3), "p50_synced_s": round(pct(synced_at, 0.5) - t0, 3),
            "cp_cpu_s": round(cpu_synced - cpu0, 3), "sim_cpu_s": round(sim_synced - sim0, 3),
            "bytes_per_stream": sum(sync_bytes) / len(sync_bytes),
            "resources_per_stream": sum(sync_res) / len(sync_res),
        }
        report["controlplane"].update(rss_kib_synced=rss_synced, peak_rss_kib_synced=peak_synced,
                                      idle_cpu_rate=round(idle_rate, 4),
                                      rss_kib_per_sidecar=round((rss_synced - cp_rss_idle) / args.sidecars, 1))
        log(f"{args.sidecars} streams synced in {report['sync']['all_synced_s']:.1f}s; CP RSS "
            f"{rss_synced / 1024:.0f} MiB ({report['controlplane']['rss_kib_per_sidecar']:.0f} KiB per sidecar)")
        # What stays: gRPC gives back the transient buffers of the initial sync within seconds.
        settle = settle_rss(lambda: _rss(cp.pid))
        report["controlplane"].update(
            rss_kib_settled=settle["rss_kib"], rss_settled=settle["settled"], rss_settle_samples=settle["samples"],
            rss_settled_after_s=round(time.monotonic() - t_rss_synced, 1),  # after the synced figure
            rss_kib_per_sidecar_settled=round((settle["rss_kib"] - cp_rss_idle) / args.sidecars, 1))
        log(f"CP RSS settled{'' if settle['settled'] else ' (NOT: still falling at the deadline)'} "
            f"{report['controlplane']['rss_settled_after_s']:.1f}s later: {settle['rss_kib'] / 1024:.0f} MiB "
            f"({report['controlplane']['rss_kib_per_sidecar_settled']:.0f} KiB per sidecar)")

        sim_changes0 = workers.cpu()
        for rep in range(args.repeat):
            for kind in kinds:
                change = run.make_change(kind, rep)
                rec = run.measure(change)
                run.results.append(rec)
                log(f"{kind:13s} #{rep + 1} {change.service}: {rec['reached']}/{rec['affected']} streams, "
                    f"p50 {_ms(pct(rec['latency_ms'], 0.5))} p99 {_ms(pct(rec['latency_ms'], 0.99))} "
                    f"max {_ms(max(rec['latency_ms'], default=None))} ms; CP CPU {rec['cp_cpu_s']:.2f}s; "
                    f"{rec['bytes_per_stream'] / 1024:.1f} KiB/stream; CP RSS {rec['cp_rss_kib_after'] / 1024:.0f} MiB "
                    f"(peak {rec['cp_peak_rss_kib_after'] / 1024:.0f})")
        report["changes"] = run.results
        report["sim"] = {"workers": len(workers.procs), "cpu_s_sync": report["sync"]["sim_cpu_s"],
                         "cpu_s_changes": round(workers.cpu() - sim_changes0, 3), "cpu_s_total": round(workers.cpu(), 3)}
        report["controlplane"].update(rss_kib_end=_rss(cp.pid), peak_rss_kib_end=_rss(cp.pid, "VmHWM"),
                                      cpu_s_end=cpu_seconds(cp.pid))
    except HarnessError as exc:
        log(f"FAILED: {exc}")
        report["error"] = str(exc)
        _write(out, report)
        return 2
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        report["error"] = "interrupted"
        _write(out, report)
        return 130
    except Exception as exc:  # a bug: keep what was measured, then show the traceback
        report["error"] = repr(exc)
        _write(out, report)
        raise
    finally:
        stop_all()
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["host"]["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    _write(out, report)
    print(markdown(report))
    print(f"\nraw figures: {os.path.relpath(out, Path.cwd())}; logs: {os.path.relpath(log_dir, Path.cwd())}")
    return 0


def _rss(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (or VmHWM, the peak RSS so far) of a process in KiB, from /proc/<pid>/status."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def _write(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


def _size(n: float) -> str:
    return f"{n / 1024 / 1024:.2f} MiB" if n >= 1024 * 1024 else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n:.0f} B"


def markdown(report: dict) -> str:
    cfg, cp, sync, sim = report["config"], report["controlplane"], report["sync"], report["sim"]
    k, s, mode = cfg["sidecars"], cfg["services"], cfg["mode"]
    lines = [
        f"$ {report['command']}",
        "",
        f"K={k} sidecars, S={s} services (2 instances each), {mode.upper()}, {cfg['repeat']} changes of each kind; "
        f"working tree at {report['git']['commit']}"
        f"{' with uncommitted changes to controlplane/ or meshkeeper/' if report['git']['dirty'] else ''}"
        f"{'; control plane run from ' + cfg['cp_source'] if cfg['cp_source'] else ''}; load average "
        f"{' / '.join(report['host']['loadavg_before'])} before, {' / '.join(report['host']['loadavg_after'])} after",
        "",
        "| change | K | S | mode | affected streams | reached | write → ACK p50 ms | p99 ms | max ms | "
        "CP CPU s per change | bytes per stream per change | resources per stream per change | bytes by type |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for kind in report["kinds"]:
        recs = [r for r in report["changes"] if r["kind"] == kind]
        lat = [x for r in recs for x in r["latency_ms"]]
        affected = sorted({r["affected"] for r in recs})
        expected = sum(r["affected"] for r in recs)
        cpu = [r["cp_cpu_s"] for r in recs]
        lines.append(
            f"| {kind} | {k} | {s} | {mode} | {', '.join(str(a) for a in affected)} | {len(lat)}/{expected} | "
            f"{_ms(pct(lat, 0.5))} | {_ms(pct(lat, 0.99))} | {_ms(max(lat, default=None))} | "
            f"{sum(cpu) / len(cpu):.2f} ({min(cpu):.2f}-{max(cpu):.2f}) | "
            f"{_size(sum(r['bytes_per_stream'] for r in recs) / len(recs))} | "
            f"{sum(r['resources_per_stream'] for r in recs) / len(recs):,.0f} | "
            + ", ".join(f"{t} {_size(sum(r['by_type'].get(t, {}).get('bytes', 0) for r in recs) / len(recs) / k)}"
                        for t in ("CDS", "EDS", "LDS", "RDS", "RTDS") if any(t in r["by_type"] for r in recs))
            + " |")
    idle, synced = cp["rss_kib_idle"], cp["rss_kib_synced"]
    windows = [r["window_s"] for r in report["changes"]]
    lines += [
        "",
        f"- Control plane RSS: {idle / 1024:.0f} MiB idle (S services, no sidecar), {synced / 1024:.0f} MiB with "
        f"{k} streams synced: **{cp['rss_kib_per_sidecar']:.0f} KiB per connected sidecar** (peak RSS by then "
        f"{cp['peak_rss_kib_synced'] / 1024:.0f} MiB); settled {cp['rss_settled_after_s']:.1f} s later"
        f"{'' if cp['rss_settled'] else ' (NOT settled: still falling at the deadline)'}: "
        f"{cp['rss_kib_settled'] / 1024:.0f} MiB, **{cp['rss_kib_per_sidecar_settled']:.0f} KiB per connected "
        f"sidecar**; {cp['rss_kib_end'] / 1024:.0f} MiB after the changes "
        f"(peak {cp['peak_rss_kib_end'] / 1024:.0f} MiB).",
        f"- Initial sync: all {k} streams in {sync['all_synced_s']:.1f} s (half in {sync['p50_synced_s']:.1f} s), "
        f"control plane CPU {sync['cp_cpu_s']:.1f} s, {_size(sync['bytes_per_stream'])} and "
        f"{sync['resources_per_stream']:,.0f} resources per stream.",
        f"- Control plane CPU while idle with {k} streams: {100 * cp['idle_cpu_rate']:.1f}% of a core; each "
        f"change's CPU figure includes its window (write to {cfg['quiet']} s after the last response: "
        f"{min(windows):.1f}-{max(windows):.1f} s).",
        f"- Simulator ({sim['workers']} processes, {k} gRPC connections): CPU {sim['cpu_s_sync']:.1f} s for the "
        f"initial sync, {sim['cpu_s_changes']:.1f} s for the {len(report['changes'])} changes "
        f"({sim['cpu_s_changes'] / max(1, len(report['changes'])):.2f} s per change), {sim['cpu_s_total']:.1f} s "
        f"in all, on the same {report['host']['cpus']} cores as the control plane and ZooKeeper.",
    ]
    missing = [r for r in report["changes"] if r["missing"] or r["unexpected"]]
    for r in missing:
        lines.append(f"- {r['kind']} #{r['rep'] + 1}: {r['missing']} affected streams not reached within "
                     f"{cfg['timeout']:.0f} s, {r['unexpected']} unaffected streams saw it")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
