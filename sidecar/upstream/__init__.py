"""The sidecar's upstream side: clusters, endpoints, load balancing and connection pools.

``ClusterManager`` is the entry point: the xDS layer feeds it cluster configs and endpoint
assignments; listeners look clusters up by name and pick endpoints from them.
"""

from sidecar.upstream.cluster import Cluster, ClusterManager
from sidecar.upstream.host import Endpoint
from sidecar.upstream.lb import SmoothWeightedRoundRobin
from sidecar.upstream.pool import ConnectFailure, ConnectionPool, PoolFailure
from sidecar.upstream.stats import CLUSTER_STATS, ClusterStats

__all__ = [
    "CLUSTER_STATS",
    "Cluster",
    "ClusterManager",
    "ClusterStats",
    "ConnectFailure",
    "ConnectionPool",
    "Endpoint",
    "SmoothWeightedRoundRobin",
    "PoolFailure",
]
