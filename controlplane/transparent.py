"""Transparent mode's xDS (DESIGN §10): what a sidecar with ``interception: redirect`` gets on top
of :mod:`controlplane.translate`. Pure functions; :func:`namespace_resources` is memoised per
(snapshot, namespace). :func:`node_resources` and :func:`translate` are translate's functions of the
same names with this mode added: the xDS cache and the tests call these.

In Envoy's vocabulary, as Istio lays it out:

* Listener ``virtual_outbound`` (``bind_to_port: false``): the filter chains a redirected outbound
  connection is matched against by its original destination (Envoy's ``original_dst`` listener
  filter, then filter-chain matching on the destination):

  - a service's VIP, any port (``prefix_ranges: <vip>/32``): an ``http``/``grpc`` service gets an
    HttpConnectionManager whose inline RouteConfiguration holds the service's own virtual host with
    ``domains: ["*"]`` (so whatever Host the app wrote, the VIP already said which service it
    meant; splits, header matches, retries and faults as on RDS ``outbound``); a ``tcp`` service
    gets ``tcp_proxy`` to ``outbound|<svc>.<ns>`` (weighted clusters under a split);
  - a registered instance's address and port (``prefix_ranges: <ip>/32``, ``destination_port``):
    the same filters, to the ORIGINAL_DST cluster ``passthrough|<svc>.<ns>`` that carries the
    service's policy: an app that read ZooKeeper itself and dialled that instance reaches it,
    through the mesh, counted under the service. Loopback addresses (explicit-mode registrations)
    are never an original destination and get no chain. With a mesh identity (a CA) and the
    service's peer authentication not DISABLE, the chains of its ``mtls`` instances go to
    ``passthrough-mtls|<svc>.<ns>`` instead: the same ORIGINAL_DST cluster with a
    ``transport_socket`` (the UpstreamTlsContext of ``outbound|<svc>.<ns>``'s ``tlsMode-mutual``
    match), so a call by instance address uses mTLS exactly when a call by name would
    (docs/identity.md). ORIGINAL_DST hosts carry no metadata for a transport socket match to read:
    the split is made here, per instance, by its chain.

* The node's ``outbound`` listener (:func:`controlplane.translate.outbound_listener`) gets the
  ``original_dst`` listener filter, its HCM chain matched on its own port (apps that dial 15001
  themselves), and a ``default_filter_chain``: ``tcp_proxy`` to ``PassthroughCluster`` under
  ``allow_any``, to ``BlackHoleCluster`` under ``registry_only``. Its ``inbound`` listener gets
  the same filter, its own chain matched on the app's port, and a default chain to
  ``InboundPassthroughCluster``: the pod's other ports reach the app unchanged (the sidecar dials
  them on the pod IP from 127.0.0.6, which the capture rules never capture, so its own connection
  is not redirected again and loopback-only services stay private). Under STRICT peer
  authentication (a mesh identity) the inbound listener has no default chain: only mTLS to the
  app's port gets through (docs/identity.md).

* Clusters ``PassthroughCluster``, ``InboundPassthroughCluster`` (ORIGINAL_DST,
  ``CLUSTER_PROVIDED``) and ``BlackHoleCluster`` (STATIC, no endpoints), Istio's names.

* Listener ``dns`` (UDP): ``envoy.filters.udp.dns_filter`` with an inline DnsTable: ``<svc>`` and
  ``<svc>.<ns>`` of every service of the namespace with a VIP. The sidecar adds its own
  ``--dns-domain`` suffix to the qualified names and forwards every other name to the resolvers
  of its resolv.conf (Envoy would take them from ``client_config``; a pod's resolver is the
  pod's business, not the control plane's). Its socket, like the others, comes from the
  sidecar's flags (``--dns-port``).
"""

from __future__ import annotations

import ipaddress
import logging
from functools import lru_cache
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, udp_socket_config_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2, udp_listener_config_pb2
from envoy.config.route.v3 import route_pb2
from envoy.data.dns.v3 import dns_table_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.filters.udp.dns_filter.v3 import dns_filter_pb2
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message

from controlplane import translate as tr
from controlplane.identity_resources import (
    NO_SECURITY,
    NodeSecurity,
    node_security,
    tls_transport_socket,
    upstream_mtls,
    upstream_tls_context,
)
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from controlplane.xdsbuild import pack
from meshkeeper import xds
from meshkeeper.policy import Policy
from meshkeeper.security import STRICT, MeshIdentity
from meshkeeper.xds import NodeInfo

log = logging.getLogger("meshkeeper.controlplane.transparent")

TCP_PROXY_FILTER = tr.TCP_PROXY_FILTER
DNS_FILTER_NAME = "envoy.filters.udp.dns_filter"
DNS_TTL_S = 30
DNS_PORT = 15053  # informational: the sidecar binds --dns-port
PASSTHROUGH_MTLS_PREFIX = "passthrough-mtls|"


def _cidr(address: str) -> address_pb2.CidrRange:
    return address_pb2.CidrRange(address_prefix=address, prefix_len=tr._u32(128 if ":" in address else 32))


def _tcp_proxy(stat_prefix: str, svc: ServiceSnapshot | None, cluster: str) -> listener_components_pb2.Filter:
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)
    split = tr.split_clusters(svc) if svc is not None and cluster == xds.outbound_cluster(svc.name, svc.namespace) else []
    if split:
        proxy.weighted_clusters.CopyFrom(tcp_proxy_pb2.TcpProxy.WeightedCluster(clusters=[
            tcp_proxy_pb2.TcpProxy.WeightedCluster.ClusterWeight(name=n, weight=w) for n, w in split]))
    return listener_components_pb2.Filter(name=TCP_PROXY_FILTER, typed_config=pack(proxy))


def _http(stat_prefix: str, svc: ServiceSnapshot, cluster: str) -> listener_components_pb2.Filter:
    vhost = tr.virtual_host(svc)
    del vhost.domains[:]
    vhost.domains.append("*")
    route_name = vhost.name
    if cluster != xds.outbound_cluster(svc.name, svc.namespace):  # an instance chain: to that instance only
        del vhost.routes[:]
        vhost.routes.append(tr._apply_policy(tr._route_to(cluster, tr._millis(svc.policy.timeout_ms)), svc.policy))
        # The same for every instance of the service (one runtime, one stats row); the mTLS
        # instances' route to their own cluster, under their own name.
        route_name = f"{vhost.name}|direct-mtls" if cluster.startswith(PASSTHROUGH_MTLS_PREFIX) else f"{vhost.name}|direct"
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix, route_config=route_pb2.RouteConfiguration(name=route_name, virtual_hosts=[vhost]),
        http_filters=[tr._fault_filter(), tr._router_filter()])
    hcm.request_headers_timeout.CopyFrom(tr._seconds(tr.REQUEST_HEADERS_TIMEOUT_S))
    hcm.common_http_protocol_options.CopyFrom(tr._http_options())
    return listener_components_pb2.Filter(name=tr.HCM_FILTER, typed_config=pack(hcm))


def _filters(stat_prefix: str, svc: ServiceSnapshot, cluster: str) -> list[listener_components_pb2.Filter]:
    if svc.record.protocol in tr.HTTP_PROTOCOLS:
        return [_http(stat_prefix, svc, cluster)]
    return [_tcp_proxy(stat_prefix, svc, cluster)]


def passthrough_mtls_cluster(svc: str, ns: str) -> str:
    """``passthrough-mtls|<svc>.<ns>``: ``passthrough|<svc>.<ns>`` with mTLS to the instance dialled."""
    return f"{PASSTHROUGH_MTLS_PREFIX}{svc}.{ns}"


def service_chains(svc: ServiceSnapshot, vip: str | None, mtls: bool = False) -> list[listener_components_pb2.FilterChain]:
    """The service's filter chains of ``virtual_outbound``: its VIP (any port), then each registered
    instance address that is not loopback (that address and port). With ``mtls`` (callers use mTLS
    to the service: :func:`controlplane.identity_resources.upstream_mtls`) the chains of instances
    registered with ``mtls`` go to :func:`passthrough_mtls_cluster`, the others' to
    ``passthrough|<svc>.<ns>``."""
    name = f"{svc.name}.{svc.namespace}"
    chains = []
    if vip:
        chains.append(listener_components_pb2.FilterChain(
            name=f"{name}|vip",
            filter_chain_match=listener_components_pb2.FilterChainMatch(prefix_ranges=[_cidr(vip)]),
            filters=_filters(f"outbound_{name}", svc, xds.outbound_cluster(svc.name, svc.namespace))))
    direct = xds.passthrough_cluster(svc.name, svc.namespace)
    secure = passthrough_mtls_cluster(svc.name, svc.namespace)
    for key, inst in sorted(svc.instances.items()):
        address = instance_ip(inst.address)
        if address is None:
            continue
        chains.append(listener_components_pb2.FilterChain(
            name=f"{name}|{key}",
            filter_chain_match=listener_components_pb2.FilterChainMatch(
                prefix_ranges=[_cidr(address)], destination_port=tr._u32(inst.port)),
            filters=_filters(f"outbound_{name}", svc, secure if mtls and inst.mtls else direct)))
    return chains


def instance_ip(address: str) -> str | None:
    """An instance address as an original destination can be: its IP written canonically; None
    for a host name (a connection's destination is never a name) or a loopback address (never
    redirected: explicit mode's registrations)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return None if ip.is_loopback else str(ip)


def original_dst_cluster(name: str, svc: ServiceSnapshot | None = None) -> cluster_pb2.Cluster:
    """An ORIGINAL_DST cluster: each connection or request goes where it was dialled; with ``svc``
    it carries that service's connect timeout and circuit breakers. No outlier detection: the
    hosts are whatever the app dialled, and the app asked for that one."""
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.ORIGINAL_DST,
                            lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
                            connect_timeout=tr._seconds(tr.CONNECT_TIMEOUT_S))
    if svc is not None:
        policy = svc.policy
        c.connect_timeout.CopyFrom(tr._millis(policy.connect_timeout_ms))
        c.circuit_breakers.CopyFrom(tr.circuit_breakers(policy.circuit_breaker))
    return c


def original_dst_mtls_cluster(name: str, svc: ServiceSnapshot, identity: MeshIdentity) -> cluster_pb2.Cluster:
    """:func:`original_dst_cluster` of ``svc`` with a ``transport_socket``: the UpstreamTlsContext
    of the service (its SPIFFE ID, SNI ``outbound_.<svc>.<ns>``), for every host it makes. ALPN is
    the protocol the cluster speaks: HTTP/1.1 (an ORIGINAL_DST cluster has no HTTP/2 options), and
    ``http/1.1`` for a tcp service, as on ``outbound|<svc>.<ns>``."""
    c = original_dst_cluster(name, svc)
    protocol = "grpc" if xds.HTTP_PROTOCOL_OPTIONS_KEY in c.typed_extension_protocol_options else "http"
    c.transport_socket.CopyFrom(tls_transport_socket(upstream_tls_context(identity, svc.name, svc.namespace, protocol)))
    return c


def blackhole_cluster() -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(name=xds.BLACKHOLE_CLUSTER, type=cluster_pb2.Cluster.STATIC,
                               connect_timeout=tr._seconds(tr.CONNECT_TIMEOUT_S))


def dns_table(snapshot: RegistrySnapshot, namespace: str) -> dns_table_pb2.DnsTable:
    """``<svc>`` and ``<svc>.<ns>`` -> the service's VIP, for every service with one."""
    table = dns_table_pb2.DnsTable()
    taken: set[str] = set()
    for name in sorted(snapshot.services(namespace)):
        vip = snapshot.vip(namespace, name)
        if vip is None or vip in taken:  # none yet, or another service's too (see namespace_resources)
            continue
        taken.add(vip)
        for domain in (name, f"{name}.{namespace}"):
            vd = table.virtual_domains.add(name=domain)
            vd.endpoint.address_list.address.append(vip)
            vd.answer_ttl.CopyFrom(tr._seconds(DNS_TTL_S))
    return table


def dns_listener(table: dns_table_pb2.DnsTable) -> listener_pb2.Listener:
    config = dns_filter_pb2.DnsFilterConfig(stat_prefix="dns")
    config.server_config.inline_dns_table.CopyFrom(table)
    address = address_pb2.Address(socket_address=address_pb2.SocketAddress(
        protocol=address_pb2.SocketAddress.UDP, address="0.0.0.0", port_value=DNS_PORT))
    return listener_pb2.Listener(
        name=xds.DNS_LISTENER, address=address,
        udp_listener_config=udp_listener_config_pb2.UdpListenerConfig(
            downstream_socket_config=udp_socket_config_pb2.UdpSocketConfig()),
        listener_filters=[listener_components_pb2.ListenerFilter(name=DNS_FILTER_NAME, typed_config=pack(config))])


# Every sidecar's: where traffic for no known service goes, by its outbound policy.
POLICY_CLUSTERS: MappingProxyType = MappingProxyType({
    xds.PASSTHROUGH_CLUSTER: original_dst_cluster(xds.PASSTHROUGH_CLUSTER),
    xds.BLACKHOLE_CLUSTER: blackhole_cluster(),
})


@lru_cache(maxsize=16)
def namespace_resources(snapshot: RegistrySnapshot, namespace: str, identity: MeshIdentity | None = None) -> MappingProxyType:
    """Type URL -> name -> message: what every redirect-mode sidecar of ``namespace`` adds
    (``identity``: the mesh's, None without a CA; with it, ``passthrough-mtls|<svc>.<ns>`` for each
    service whose callers use mTLS and that has an ``mtls`` instance an app can dial)."""
    listener = listener_pb2.Listener(
        name=xds.VIRTUAL_OUTBOUND_LISTENER, traffic_direction=base_pb2.OUTBOUND,
        address=tr._socket("0.0.0.0", 0), bind_to_port=wrappers_pb2.BoolValue(value=False))
    clusters: dict[str, Message] = {
        xds.INBOUND_PASSTHROUGH_CLUSTER: original_dst_cluster(xds.INBOUND_PASSTHROUGH_CLUSTER),
    }
    taken: set[str | None] = set()
    matches: set[tuple[str, int]] = set()
    for name, svc in sorted(snapshot.services(namespace).items()):
        vip = snapshot.vip(namespace, name)
        if vip in taken:  # two services on one address (a claim deleted by hand): the first keeps it
            vip = None
        taken.add(vip)
        mtls = upstream_mtls(identity, snapshot.peer_mode(namespace, name))
        secure = passthrough_mtls_cluster(name, namespace)
        for chain in service_chains(svc, vip, mtls):
            # An address registered by two services would make two chains match alike, which a
            # sidecar (as Envoy) refuses with the whole listener: the first service keeps it.
            m = chain.filter_chain_match
            key = (m.prefix_ranges[0].address_prefix, m.destination_port.value)
            if key not in matches:
                matches.add(key)
                listener.filter_chains.append(chain)
        direct = xds.passthrough_cluster(name, namespace)
        clusters[direct] = original_dst_cluster(direct, svc)
        if mtls and any(i.mtls and instance_ip(i.address) is not None for i in svc.instances.values()):
            clusters[secure] = original_dst_mtls_cluster(secure, svc, identity)
    return MappingProxyType({
        xds.LISTENER: MappingProxyType({listener.name: listener,
                                        xds.DNS_LISTENER: dns_listener(dns_table(snapshot, namespace))}),
        xds.CLUSTER: MappingProxyType(clusters),
    })


def redirect(listener: listener_pb2.Listener, port: int, default_cluster: str) -> listener_pb2.Listener:
    """Make a node's bound listener a transparent one (see the module docstring): the
    ``original_dst`` filter (first: the tls_inspector of an mTLS inbound listener comes after it),
    its own chain for ``port`` (the mTLS ones, ``inbound-mtls`` and ``inbound-plaintext``, keep
    their names and match ``port`` too), the rest to ``default_cluster``."""
    listener.listener_filters.insert(0, listener_components_pb2.ListenerFilter(
        name=xds.ORIGINAL_DST_FILTER, typed_config=pack(original_dst_pb2.OriginalDst())))
    for chain in listener.filter_chains:
        chain.filter_chain_match.destination_port.value = port
        if not chain.name:
            chain.name = "explicit" if listener.name == xds.OUTBOUND_LISTENER else "app"
    listener.default_filter_chain.CopyFrom(default_chain(default_cluster))
    return listener


def default_chain(cluster: str) -> listener_components_pb2.FilterChain:
    return listener_components_pb2.FilterChain(name=cluster, filters=[_tcp_proxy(cluster, None, cluster)])


def node_resources(node: NodeInfo, policy: Policy, sec: NodeSecurity = NO_SECURITY) -> tr.Resources:
    """:func:`controlplane.translate.node_resources`, with the outbound policy: every sidecar's
    ``outbound`` listener gets a default chain to ``PassthroughCluster`` or ``BlackHoleCluster``
    (in explicit mode it serves proxy requests, absolute-form or CONNECT, for hosts outside the
    mesh), and both clusters; a redirect-mode node's listeners are made transparent ones."""
    out = tr.node_resources(node, policy, sec)
    outbound = out[xds.LISTENER].get(xds.OUTBOUND_LISTENER)
    if outbound is None or not node.outbound_policy:  # a proxyless client, or a sidecar that predates this
        return out
    target = xds.PASSTHROUGH_CLUSTER if node.outbound_policy == "allow_any" else xds.BLACKHOLE_CLUSTER
    out[xds.CLUSTER].update(POLICY_CLUSTERS)
    if node.interception != "redirect":
        outbound.default_filter_chain.CopyFrom(default_chain(target))
        return out
    redirect(outbound, node.outbound_port, target)
    inbound = out[xds.LISTENER].get(xds.INBOUND_LISTENER)
    if inbound is not None:  # the app's port through the inbound filter; other ports of the pod passed through
        redirect(inbound, node.app_port, xds.INBOUND_PASSTHROUGH_CLUSTER)
        if sec.identity is not None and sec.mode == STRICT:
            # As Istio's STRICT, on every port of the pod: a plaintext connection matches no chain
            # and is closed (no_filter_chain_match); without this it would take the default chain
            # to InboundPassthroughCluster and reach the app.
            inbound.ClearField("default_filter_chain")
    return out


def shared_for(snapshot: RegistrySnapshot, node: NodeInfo, identity: MeshIdentity | None = None) -> MappingProxyType | None:
    """The namespace-wide resources a node gets beyond translate's shared ones, or None
    (``identity``: the mesh's, None without a CA)."""
    if node.proxyless or not node.outbound_policy:
        return None
    if node.interception != "redirect":
        return explicit_tcp_listeners(snapshot, node.namespace)
    return namespace_resources(snapshot, node.namespace, identity)


def tcp_service_port(svc: ServiceSnapshot) -> int:
    """The port explicit-mode callers dial for a tcp service: the lowest app port its instances
    registered (0: none yet)."""
    return min((i.app_port for i in svc.instances.values() if i.app_port), default=0)


@lru_cache(maxsize=16)
def explicit_tcp_listeners(snapshot: RegistrySnapshot, namespace: str) -> MappingProxyType:
    """Explicit mode: one listener per ``tcp`` service, ``tcp|<svc>.<ns>`` on 127.0.0.1:<its
    port> (:func:`tcp_service_port`), tcp_proxy to the service's cluster: an app dials
    127.0.0.1:9090 for a thrift service on 9090. A sidecar does not bind its own service's (its
    app holds that port)."""
    listeners = {}
    ports: dict[int, str] = {}
    for name, svc in sorted(snapshot.services(namespace).items()):
        port = tcp_service_port(svc)
        if svc.record.protocol != "tcp" or not port:
            continue
        if port in ports:  # two tcp services on one port: callers could not tell them apart on loopback
            log.warning("tcp services %s and %s of namespace %s share port %d: explicit-mode callers get a "
                        "listener for %s only (use transparent mode, or different ports)",
                        ports[port], name, namespace, port, ports[port])
            continue
        ports[port] = name
        lname = xds.tcp_listener(name, namespace)
        listeners[lname] = listener_pb2.Listener(
            name=lname, address=tr._socket(tr.OUTBOUND_BIND, port), traffic_direction=base_pb2.OUTBOUND,
            filter_chains=[listener_components_pb2.FilterChain(filters=[
                _tcp_proxy(f"outbound_{name}.{namespace}", svc, xds.outbound_cluster(name, namespace))])])
    return MappingProxyType({xds.LISTENER: MappingProxyType(listeners)})


def translate(snapshot: RegistrySnapshot, node: NodeInfo, identity: MeshIdentity | None = None) -> tr.Resources:
    """All resources of ``node`` by type URL and name, transparent mode included (``identity``:
    the mesh's, None without a CA)."""
    out = node_resources(node, tr.node_policy(snapshot, node), node_security(snapshot, node, identity))
    for type_url, items in tr.shared_resources(snapshot, node.namespace, identity).resources.items():
        out[type_url].update(items)
    for type_url, items in (shared_for(snapshot, node, identity) or {}).items():
        out[type_url].update(items)
    return out
