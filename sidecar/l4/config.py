"""The L4 proxy's configuration: Envoy's ``envoy.filters.network.tcp_proxy`` as far as we honour it.

Immutable and validated once, like ``sidecar.config`` (which the xDS layer owns; this one lives
beside the package that runs it). The xDS layer builds a :class:`TcpProxyConfig` from a listener's
``TcpProxy`` filter and swaps it in whole with :meth:`sidecar.l4.runtime.TcpProxyRuntime.set_config`.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_IDLE_TIMEOUT = 3600.0  # TcpProxy.idle_timeout default: 1 h (0 disables)
DEFAULT_MAX_CONNECT_ATTEMPTS = 1  # TcpProxy.max_connect_attempts default
DEFAULT_BUFFER_LIMIT = 1024 * 1024  # Listener/Cluster per_connection_buffer_limit_bytes default: 1 MiB
MIN_BUFFER_LIMIT = 16 * 1024


@dataclass(frozen=True, slots=True)
class TcpProxyConfig:
    """One ``tcp_proxy`` filter: the cluster it sends connections to, and its limits.

    ``cluster`` names a cluster of the :class:`~sidecar.upstream.cluster.ClusterManager`. For an
    ORIGINAL_DST use (Envoy's ``PassthroughCluster``) the connection's own destination is passed to
    the protocol and this cluster only lends its connect timeout, breakers and stats.
    ``buffer_limit`` is Envoy's ``per_connection_buffer_limit_bytes``, applied to both transports'
    write buffers: above it the other side stops reading, below half of it reading resumes.
    """

    stat_prefix: str
    cluster: str
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # seconds without a byte either way; 0: none
    max_connect_attempts: int = DEFAULT_MAX_CONNECT_ATTEMPTS
    buffer_limit: int = DEFAULT_BUFFER_LIMIT

    def __post_init__(self) -> None:
        if not self.cluster:
            raise ValueError(f"tcp_proxy {self.stat_prefix!r}: no cluster")
        if self.idle_timeout < 0:
            raise ValueError(f"tcp_proxy {self.stat_prefix!r}: negative idle_timeout")
        if self.max_connect_attempts < 1:
            raise ValueError(f"tcp_proxy {self.stat_prefix!r}: max_connect_attempts must be at least 1")
        if self.buffer_limit < MIN_BUFFER_LIMIT:
            raise ValueError(f"tcp_proxy {self.stat_prefix!r}: buffer_limit below {MIN_BUFFER_LIMIT} bytes")
