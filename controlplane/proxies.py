"""Who is connected and what they hold: one :class:`ProxyStatus` per open ADS stream.

The ADS server reports sends, ACKs and NACKs here; this module keeps the per-type record
(version sent, version ACKed, last NACK with its error_detail) and the xDS metrics that go with
it. ``/api/proxies`` and the admin API read :meth:`ProxyRegistry.to_json`; the per-proxy
Prometheus series (pushes, NACKs, last push-to-ACK latency by node and type) are read from here at
each scrape, for the streams open at that moment (controlplane.metrics).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from controlplane.events import EventBus
from controlplane.metrics import Metrics, ProxyTypeRow
from meshkeeper.xds import SHORT_TYPE, NodeInfo

log = logging.getLogger("meshkeeper.controlplane.xds")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Nack:
    error: str
    version: str  # the version the proxy refused
    at: float  # wall clock


@dataclass(slots=True)
class TypeStatus:
    version_sent: str = ""
    nonce_sent: str = ""
    sent_at: float | None = None  # wall clock
    sent_mono: float = 0.0
    version_acked: str = ""
    acked_at: float | None = None
    nack: Nack | None = None
    pushes: int = 0  # responses sent on this stream
    nacks: int = 0
    last_ack_latency: float | None = None  # seconds from the last ACKed push to its ACK
    # What the node holds after the last response sent, and after the last one ACKed (admin
    # GetProxyConfig): a call that lists them from the cache's shared views, so keeping it costs
    # a reference, not a list per stream.
    sent_held: Callable[[], tuple] = tuple
    acked_held: Callable[[], tuple] = tuple

    def to_json(self) -> dict[str, Any]:
        return {
            "version_sent": self.version_sent, "sent_at": _iso(self.sent_at),
            "version_acked": self.version_acked, "acked_at": _iso(self.acked_at),
            "pushes": self.pushes, "nacks": self.nacks,
            "last_push_ack_latency_seconds": None if self.last_ack_latency is None else round(self.last_ack_latency, 6),
            "nack": None if self.nack is None else {
                "error": self.nack.error, "version": self.nack.version, "at": _iso(self.nack.at)},
        }


@dataclass(slots=True)
class ProxyStatus:
    stream_id: int
    node: NodeInfo
    peer: str
    connected_since: float  # wall clock
    types: dict[str, TypeStatus] = field(default_factory=dict)  # by short type name (CDS, ...)
    # The workload certificate last issued on this stream (docs/identity.md): SPIFFE ID, serial, expiry.
    spiffe_id: str = ""
    cert_serial: str = ""
    cert_expires: float | None = None

    def type(self, type_url: str) -> TypeStatus:
        short = SHORT_TYPE.get(type_url, type_url)
        st = self.types.get(short)
        if st is None:
            st = self.types[short] = TypeStatus()
        return st

    def to_json(self) -> dict[str, Any]:
        n = self.node
        return {
            "node_id": n.node_id, "service": n.service, "namespace": n.namespace,
            "proxyless": n.proxyless, "peer": self.peer, "stream_id": self.stream_id,
            "connected_since": _iso(self.connected_since),
            "identity": {"spiffe_id": self.spiffe_id, "serial": self.cert_serial,
                         "expires": _iso(self.cert_expires)} if self.spiffe_id else None,
            "types": {t: s.to_json() for t, s in sorted(self.types.items())},
        }


class ProxyRegistry:
    def __init__(self, metrics: Metrics | None = None, *, wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic, events: EventBus | None = None) -> None:
        self._metrics = metrics or Metrics()
        self._events = events
        self._wall, self._mono = wall, mono
        self._ids = itertools.count(1)
        self._proxies: dict[int, ProxyStatus] = {}
        self._metrics.track_proxies(self.metric_rows)

    def __len__(self) -> int:
        return len(self._proxies)

    def list(self) -> list[ProxyStatus]:
        return sorted(self._proxies.values(), key=lambda p: (p.node.node_id, p.stream_id))

    def connect(self, node: NodeInfo, peer: str) -> ProxyStatus:
        p = ProxyStatus(next(self._ids), node, peer, self._wall())
        self._proxies[p.stream_id] = p
        self._metrics.connected_proxies.set(len(self._proxies))
        log.info("proxy connected: %s (%s, stream %d)", node.node_id, peer, p.stream_id)
        return p

    def disconnect(self, p: ProxyStatus) -> None:
        if self._proxies.pop(p.stream_id, None) is not None:
            self._metrics.connected_proxies.set(len(self._proxies))
            log.info("proxy disconnected: %s (stream %d)", p.node.node_id, p.stream_id)

    def get(self, node_id: str) -> ProxyStatus | None:
        """The newest stream of ``node_id``, or None."""
        found = [p for p in self._proxies.values() if p.node.node_id == node_id]
        return max(found, key=lambda p: p.stream_id) if found else None

    def sent(self, p: ProxyStatus, type_url: str, version: str, nonce: str, count: int = 0,
             held: Callable[[], tuple] = tuple) -> None:
        """A response of ``count`` resources went out; ``held()`` lists what the node then holds."""
        st = p.type(type_url)
        st.version_sent, st.nonce_sent = version, nonce
        st.sent_at, st.sent_mono = self._wall(), self._mono()
        st.sent_held = held
        st.pushes += 1
        short = SHORT_TYPE.get(type_url, "other")
        self._metrics.pushes.labels(type=short).inc()
        if self._events is not None and self._events.active:
            self._events.publish("push", namespace=p.node.namespace, service=p.node.service,
                                 node_id=p.node.node_id,
                                 summary=f"{short} version {version} ({count} resources)")

    def acked(self, p: ProxyStatus, type_url: str, version: str) -> None:
        st = p.type(type_url)
        short = SHORT_TYPE.get(type_url, "other")
        self._metrics.acks.labels(type=short).inc()
        if version == st.version_sent and st.version_acked != version:
            st.last_ack_latency = self._mono() - st.sent_mono
            self._metrics.push_ack_latency.labels(type=short).observe(st.last_ack_latency)
        if version == st.version_sent:
            st.acked_held = st.sent_held
        st.version_acked, st.acked_at = version, self._wall()
        st.nack = None  # a later version was accepted: the refusal is resolved (the counter keeps it)

    def nacked(self, p: ProxyStatus, type_url: str, version: str, error: str) -> None:
        st = p.type(type_url)
        short = SHORT_TYPE.get(type_url, "other")
        st.nack = Nack(error, version, self._wall())
        st.nacks += 1
        self._metrics.nacks.labels(type=short).inc()
        log.warning("NACK from %s for %s version %s: %s", p.node.node_id, short, version, error)
        if self._events is not None:
            self._events.publish("nack", namespace=p.node.namespace, service=p.node.service,
                                 node_id=p.node.node_id, summary=f"{short} version {version}: {error}")

    def to_json(self) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.list()]

    def metric_rows(self) -> Iterator[ProxyTypeRow]:
        """Per (node, type) rows for the per-proxy series. Two open streams with one node id (a
        reconnect the old stream has not noticed yet) would be duplicate series: the newest wins."""
        newest = {p.node.node_id: p for p in self.list()}  # list() is sorted by (node_id, stream_id)
        for node_id, p in newest.items():
            for short, st in sorted(p.types.items()):
                yield ProxyTypeRow(node_id, short, st.pushes, st.nacks, st.last_ack_latency)
