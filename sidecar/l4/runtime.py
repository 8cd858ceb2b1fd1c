"""State shared by every connection of one ``tcp_proxy`` filter: config, clusters, stats, idle sweep.

A :class:`TcpProxyRuntime` is what a listener (or a filter chain of one) holds; each accepted
connection gets a :class:`sidecar.l4.proxy.TcpProxy` built on it. The xDS layer swaps the config
whole with :meth:`TcpProxyRuntime.set_config`; open connections read the new one at their next
decision (a connect retry, the idle sweep).

Idle timeout (``idle_timeout``, default 1 h, 0: none) costs one integer increment per read: every
``sweep_period`` (a tenth of the timeout, at least :data:`MIN_SWEEP_PERIOD`) one sweep looks at
each connection's activity counter, and a connection whose counter has not moved for the whole
timeout is closed on both sides (Envoy's NoFlush close) and counted as ``idle_timeout``. Activity
is a read on either side or a write buffer draining (``resume_writing``), so a slow but live reader
is not idle. A timeout fires between ``idle_timeout`` and ``idle_timeout`` plus two periods after
the last activity, never early; the sweep runs only while there are connections.

Stats of the filter, Envoy's ``tcp.<stat_prefix>.*`` names, in :data:`TCP_PROXY_STATS`; the
upstream side counts on the cluster (:data:`sidecar.upstream.stats.CLUSTER_STATS`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from sidecar.l4.config import TcpProxyConfig
from sidecar.sweep import Sweep
from sidecar.upstream.cluster import ClusterManager
from sidecar.upstream.pool import Connector
from sidecar.upstream.stats import Counters

log = logging.getLogger("meshkeeper.sidecar.l4")

MIN_SWEEP_PERIOD = 0.05

TCP_PROXY_STATS: tuple[str, ...] = (
    "downstream_cx_total",
    "downstream_cx_active",  # not an Envoy tcp_proxy stat (the listener has it); here for the admin page
    "downstream_cx_no_route",  # the filter's cluster does not exist (yet): connection closed
    "downstream_cx_rx_bytes_total",
    "downstream_cx_tx_bytes_total",
    "downstream_flow_control_paused_reading_total",  # the upstream's write buffer went over the limit
    "downstream_flow_control_resumed_reading_total",
    "idle_timeout",  # connections closed after idle_timeout without a byte either way
)


class TcpProxyStats(Counters):
    __slots__ = TCP_PROXY_STATS
    FIELDS = TCP_PROXY_STATS


class Swept(Protocol):
    """What the sweep asks of a connection (``TcpProxy``)."""

    def check_idle(self, now: float, idle_timeout: float) -> None: ...


def sweep_period_for(idle_timeout: float) -> float:
    return max(idle_timeout / 10.0, MIN_SWEEP_PERIOD) if idle_timeout > 0 else 0.0


_logged: set[str] = set()


def log_once(cause: str, message: str, *args: object, exc_info: BaseException | None = None) -> None:
    """Log the first time ``cause`` is seen in this process; later ones are only counted.

    (``sidecar.proxy.errors.log_once`` does the same for HTTP; importing it would import the HTTP
    proxy package, which is to import this one.)"""
    if cause in _logged:
        return
    _logged.add(cause)
    log.warning(message + " (logged once per cause; see stats for counts)", *args, exc_info=exc_info)


class TcpProxyRuntime:
    """Shared state of one tcp_proxy filter's connections. Create it inside the loop's thread.

    ``connector`` (``loop.create_connection`` when None) opens connections to original
    destinations; cluster endpoints use their pools' connector (the ClusterManager's).
    """

    def __init__(self, config: TcpProxyConfig, clusters: ClusterManager, *,
                 clock: Callable[[], float] = time.monotonic, connector: Connector | None = None) -> None:
        self.config = config
        self.clusters = clusters
        self.stats = TcpProxyStats()
        self.connector = connector
        self.connections: set[Swept] = set()
        self._clock = clock
        self._sweep = Sweep(self.sweep, lambda: bool(self.connections), sweep_period_for(config.idle_timeout),
                            lambda exc: log_once("l4-sweep-bug", "unexpected error in the tcp_proxy idle sweep",
                                                 exc_info=exc))

    def set_config(self, config: TcpProxyConfig) -> None:
        """Swap in a new config (an LDS update); the idle timeout applies to open connections."""
        self.config = config
        self._sweep.set_period(sweep_period_for(config.idle_timeout))

    def sweep(self) -> None:
        """Close the connections idle for ``idle_timeout`` (see the module doc). Tests call it."""
        timeout = self.config.idle_timeout
        if timeout <= 0:
            return
        now = self._clock()
        for conn in list(self.connections):
            conn.check_idle(now, timeout)

    @property
    def sweeping(self) -> bool:
        return self._sweep.scheduled

    @property
    def sweep_period(self) -> float:
        return self._sweep.period

    def close(self) -> None:
        """The filter is gone from the config: no new connections come; the open ones keep their
        idle timeout (the sweep goes on while there are any) and end on their own."""
        if not self.connections:
            self._sweep.stop()

    # --- called by connections -----------------------------------------------------------

    def connection_opened(self, conn: Swept) -> None:
        self.connections.add(conn)
        self.stats.downstream_cx_total += 1
        self.stats.downstream_cx_active += 1
        self._sweep.start()

    def connection_closed(self, conn: Swept) -> None:
        self.connections.discard(conn)
        self.stats.downstream_cx_active -= 1
        if not self.connections:
            self._sweep.stop()
