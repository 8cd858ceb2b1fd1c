"""The sidecar's own view of its configuration: immutable, validated objects built from xDS.

``sidecar.xds`` turns Envoy protos into these (refusing, with a NACK, what the sidecar cannot
honour); the data path only ever reads them. An update never mutates one of these objects: it
builds new ones and swaps them in whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

DEFAULT_CONNECT_TIMEOUT = 5.0  # Envoy's Cluster.connect_timeout default
DEFAULT_ROUTE_TIMEOUT = 15.0  # Envoy's RouteAction.timeout default
LB_ROUND_ROBIN = "round_robin"


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """One upstream host of a cluster.

    ``serving`` is false for endpoints the control plane marks DRAINING (weight 0 or disabled by an
    operator): they take no new requests, but their in-flight requests finish.
    """

    address: str
    port: int
    weight: int = 1
    serving: bool = True
    zone: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def key(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str
    discovery: str = "EDS"  # "EDS" or "STATIC"
    lb_policy: str = LB_ROUND_ROBIN
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    # STATIC clusters carry their endpoints inline; EDS clusters get them from a ClusterLoadAssignment.
    static_endpoints: tuple[EndpointConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    name: str
    weight: int


@dataclass(frozen=True, slots=True)
class Route:
    """A route: a path-prefix match and where it goes."""

    prefix: str = "/"
    cluster: str = ""
    weighted_clusters: tuple[WeightedCluster, ...] = ()
    timeout: float = DEFAULT_ROUTE_TIMEOUT  # 0 disables, as in Envoy


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    virtual_hosts: tuple[VirtualHost, ...] = ()


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """A listener as far as the sidecar uses it: which route configuration its HCM reads.

    Either ``rds_name`` names a RouteConfiguration delivered by RDS, or ``route_config`` is inline.
    The socket itself is bound from the sidecar's flags (like Envoy's bootstrap), matched by name.
    """

    name: str
    rds_name: str = ""
    route_config: RouteConfig | None = None
