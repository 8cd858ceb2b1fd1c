"""On-demand discovery of services (Envoy's on-demand CDS) for a scoped sidecar (DESIGN §13).

A sidecar that declared the services it calls (``--egress``, or its service's ``policy.egress``)
is sent only those. A request on the outbound listener whose Host names another service of its
namespace (``svc``, ``svc.<ns>``, with or without a port) is not failed: the stream is held (its
request body buffered, bounded as the router bounds it), the ADS client subscribes to the
service's cluster by name (Delta), and once its cluster, its load assignment and its virtual host
have arrived the request is routed as any other. The control plane answering that the service
does not exist, or :data:`HOLD_TIMEOUT` passing (``OnDemand.hold_timeout``), fails it with 404 NR as before. A service found
missing is not asked for again until the clusters change.

:class:`OnDemand` belongs to the listener (``ListenerContext.on_demand``); :class:`HeldStream` is
the filter of one held stream until the connection manager routes it (``route_held``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from meshkeeper import xds
from sidecar.codec.api import R_BUFFER
from sidecar.proxy.body import BUFFER_LIMIT, hold_body

if TYPE_CHECKING:
    from sidecar.proxy.stream import Stream

log = logging.getLogger("meshkeeper.sidecar.proxy")

HOLD_TIMEOUT = 5.0  # seconds a request waits for its service to be discovered


class HeldOwner(Protocol):
    """What a held stream reports to (the connection manager)."""

    def route_held(self, stream: Stream, held: HeldStream, found: bool) -> None: ...

    def arm_at(self, when: float) -> None: ...


class HeldStream:
    """The filter of a stream waiting for its service (sidecar.proxy.stream.StreamFilter)."""

    __slots__ = ("owner", "stream", "service", "on_demand", "deadline", "pending", "pending_size")

    def __init__(self, owner: HeldOwner, stream: Stream, service: str, on_demand: OnDemand, deadline: float) -> None:
        self.owner, self.stream, self.service, self.on_demand = owner, stream, service, on_demand
        self.deadline = deadline
        self.pending: list[bytes] | None = None  # body bytes, handed to the router once routed
        self.pending_size = 0

    def on_request_data(self, data: bytes, end_stream: bool) -> None:
        if data:
            hold_body(self, data)  # the router lifts R_BUFFER once it sends them

    def on_request_trailers(self, trailers: list[bytes]) -> None:
        pass  # request trailers are not forwarded (as the router)

    def on_downstream_write_paused(self, paused: bool) -> None:
        pass

    def on_timer(self, now: float) -> float:
        if now < self.deadline:
            return self.deadline
        self.on_demand.timed_out(self)
        self.owner.route_held(self.stream, self, found=False)
        return 0.0

    def resume(self, found: bool) -> None:
        self.owner.route_held(self.stream, self, found)

    def release(self) -> None:
        self.on_demand.forget(self)
        if self.pending_size > BUFFER_LIMIT and not self.stream.ended:
            self.stream.encoder.read_disable(R_BUFFER, False)
        self.pending = None


class OnDemand:
    """Held streams by service, the subscriptions asked for, and the services found missing.

    ``subscribe(cluster)`` asks the ADS client for a cluster by name; ``routable(service)`` says
    whether the listener can route to the service now (its route, cluster and endpoints arrived).
    The stats counters are the listener's (held, routed, missing, timed out).
    """

    def __init__(self, namespace: str, subscribe: Callable[[str], None], routable: Callable[[str], bool],
                 stats) -> None:
        self.namespace = namespace
        self.hold_timeout = HOLD_TIMEOUT
        self._subscribe = subscribe
        self._routable = routable
        self.stats = stats
        self._waiting: dict[str, list[HeldStream]] = {}
        self._missing: set[str] = set()

    def service_for(self, authority: bytes) -> str | None:
        """The service a request's authority names that may be discovered on demand, else None."""
        try:
            svc = xds.service_of_authority(authority.decode("ascii"), self.namespace)
        except UnicodeDecodeError:
            return None
        return None if svc is None or svc in self._missing else svc

    def hold(self, held: HeldStream) -> None:
        waiting = self._waiting.setdefault(held.service, [])
        waiting.append(held)
        self.stats.rq_on_demand_held += 1
        if len(waiting) == 1:
            log.info("discovering service %s on demand", held.service)
            self._subscribe(xds.outbound_cluster(held.service, self.namespace))

    def forget(self, held: HeldStream) -> None:
        waiting = self._waiting.get(held.service)
        if waiting is not None and held in waiting:
            waiting.remove(held)
            if not waiting:
                del self._waiting[held.service]

    def timed_out(self, held: HeldStream) -> None:
        self.stats.rq_on_demand_timeout += 1
        self.forget(held)

    def config_changed(self) -> None:
        """The sidecar's config changed: route the streams whose service can be routed now."""
        for service in [s for s in self._waiting if self._routable(s)]:
            waiting = self._waiting.pop(service)
            self.stats.rq_on_demand_routed += len(waiting)
            for held in waiting:
                held.resume(True)

    def clusters_changed(self) -> None:
        self._missing.clear()  # a service may have come since it was found missing

    def missing(self, cluster: str) -> None:
        """The control plane says ``cluster`` does not exist: its held streams fail (404 NR)."""
        service = xds.outbound_service(cluster, self.namespace)
        if service is None:
            return
        self._missing.add(service)
        waiting = self._waiting.pop(service, [])
        if waiting:
            log.info("service %s does not exist: %d held request(s) get 404", service, len(waiting))
        self.stats.rq_on_demand_missing += len(waiting)
        for held in waiting:
            held.resume(False)
