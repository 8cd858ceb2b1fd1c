"""The sidecar's L4 (TCP) proxy: Envoy's ``envoy.filters.network.tcp_proxy``.

A listener holds one :class:`TcpProxyRuntime` per tcp_proxy filter (config, cluster manager, stats,
idle sweep) and installs a :class:`TcpProxy` on each accepted transport; see :mod:`sidecar.l4.proxy`
for the data path and its semantics.
"""

from sidecar.l4.config import DEFAULT_BUFFER_LIMIT, DEFAULT_IDLE_TIMEOUT, TcpProxyConfig
from sidecar.l4.proxy import TcpProxy, TcpUpstream
from sidecar.l4.runtime import TCP_PROXY_STATS, TcpProxyRuntime, TcpProxyStats

__all__ = [
    "DEFAULT_BUFFER_LIMIT",
    "DEFAULT_IDLE_TIMEOUT",
    "TCP_PROXY_STATS",
    "TcpProxy",
    "TcpProxyConfig",
    "TcpProxyRuntime",
    "TcpProxyStats",
    "TcpUpstream",
]
