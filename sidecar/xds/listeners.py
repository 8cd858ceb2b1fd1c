"""Listener protos -> :class:`~sidecar.config.ListenerConfig`, transparent mode's included.

Three shapes (docs/xds-support.md, DESIGN §10):

* a bound listener (``outbound``, ``inbound``): one filter chain with one network filter, an HTTP
  connection manager or a ``tcp_proxy`` (:func:`sidecar.xds.convert.network_filter`). In
  transparent mode the outbound one also carries the ``original_dst`` listener filter, its chain
  matched on its own port (``destination_port``: connections the app dialled to the sidecar
  itself) and a ``default_filter_chain`` (a ``tcp_proxy`` to ``PassthroughCluster`` or
  ``BlackHoleCluster``);
* ``bind_to_port: false`` (``virtual_outbound``): filter chains matched on a redirected
  connection's original destination: one exact address (a /32 or /128 prefix range) and
  optionally a ``destination_port``;
* a UDP listener with ``envoy.filters.udp.dns_filter``: the mesh DNS's inline table.

Anything else set is refused by name (a NACK), as everywhere in :mod:`sidecar.xds.convert`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from types import MappingProxyType

from envoy.config.listener.v3 import listener_pb2
from envoy.data.dns.v3 import dns_table_pb2  # noqa: F401  (registers the type)
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401  (registers the type)
from envoy.extensions.filters.udp.dns_filter.v3 import dns_filter_pb2

from meshkeeper import xds
from sidecar.config import DnsTableConfig, FilterChain, ListenerConfig, TransparentConfig
from sidecar.xds.convert import filter_chains, network_filter
from sidecar.xds.convert import listener as plain_listener
from sidecar.xds.proto import XdsError, only, unpack
from sidecar.xds.security import TLS_INSPECTOR_FILTER, tls_inspector_names, with_tls

MAX_DNS_NAMES = 100_000
TCP_LISTENER_PREFIX = "tcp|"

_LISTENER_FIELDS = ("name", "address", "filter_chains", "stat_prefix", "metadata", "traffic_direction")


def listener(msg: listener_pb2.Listener) -> ListenerConfig:
    where = f"listener {msg.name!r}"
    if msg.HasField("udp_listener_config"):
        return _dns(msg, where)
    if msg.HasField("bind_to_port") and not msg.bind_to_port.value:
        return _virtual(msg, where)
    if msg.name.startswith(TCP_LISTENER_PREFIX):
        return _tcp_service(msg, where)
    if not msg.HasField("default_filter_chain") and all(f.name == TLS_INSPECTOR_FILTER for f in msg.listener_filters):
        return plain_listener(msg)  # with a tls_inspector: the inbound listener's mTLS chains
    return _transparent(msg, where)


def _tcp_service(msg: listener_pb2.Listener, where: str) -> ListenerConfig:
    """Explicit mode's listener of a tcp service: tcp_proxy only, bound where it says (loopback)."""
    config = plain_listener(msg)
    if config.tcp is None:
        raise XdsError(f"{where}: a tcp service's listener needs a tcp_proxy")
    sa = msg.address.socket_address
    try:
        host = str(ipaddress.ip_address(sa.address))
    except ValueError:
        raise XdsError(f"{where}: address {sa.address!r} is not an IP address") from None
    if not ipaddress.ip_address(host).is_loopback or not 0 < sa.port_value < 65536:
        raise XdsError(f"{where}: only a loopback address and a port are supported, got {sa.address}:{sa.port_value}")
    return replace(config, bind=(host, sa.port_value))


def _transparent(msg: listener_pb2.Listener, where: str) -> ListenerConfig:
    only(msg, (*_LISTENER_FIELDS, "listener_filters", "default_filter_chain"), where)
    names = tls_inspector_names(msg, where)
    inspector = names[-1:] == [TLS_INSPECTOR_FILTER]
    if inspector:
        names = names[:-1]
    if names not in ([], [xds.ORIGINAL_DST_FILTER]):
        raise XdsError(f"{where}: listener_filters {names} are not supported (only {xds.ORIGINAL_DST_FILTER}, "
                       f"then {TLS_INSPECTOR_FILTER})")
    if inspector:  # the inbound listener's mTLS chains (docs/identity.md), each on the app port
        chain, tls = filter_chains(msg, where, inspector=True, match_fields=("destination_port",))
        config = with_tls(network_filter(msg.name, chain, where), tls, where)
    else:
        if len(msg.filter_chains) != 1:
            raise XdsError(f"{where}: exactly one filter chain is supported, got {len(msg.filter_chains)}")
        chain = msg.filter_chains[0]
        only(chain, ("filters", "name", "metadata", "filter_chain_match"), f"{where} filter chain")
        only(chain.filter_chain_match, ("destination_port",), f"{where} filter_chain_match")
        config = network_filter(msg.name, chain, where)
    default = None
    if msg.HasField("default_filter_chain"):
        d = msg.default_filter_chain
        only(d, ("filters", "name", "metadata"), f"{where} default_filter_chain")
        got = network_filter(msg.name, d, f"{where} default_filter_chain")
        if got.tcp is None:
            raise XdsError(f"{where} default_filter_chain: only tcp_proxy is supported")
        default = FilterChain(name=d.name or "default", tcp=got.tcp)
    transparent = TransparentConfig(explicit_port=chain.filter_chain_match.destination_port.value,
                                    default_chain=default, original_dst=bool(names))
    return replace(config, transparent=transparent)


def _virtual(msg: listener_pb2.Listener, where: str) -> ListenerConfig:
    only(msg, (*_LISTENER_FIELDS, "bind_to_port"), where)
    chains = []
    seen: set[tuple[str, int]] = set()
    for i, chain in enumerate(msg.filter_chains):
        cwhere = f"{where} filter chain {chain.name or i!r}"
        only(chain, ("filters", "name", "metadata", "filter_chain_match"), cwhere)
        match = chain.filter_chain_match
        only(match, ("prefix_ranges", "destination_port"), f"{cwhere} filter_chain_match")
        if len(match.prefix_ranges) != 1:
            raise XdsError(f"{cwhere}: exactly one prefix range (one address) is supported")
        rng = match.prefix_ranges[0]
        try:
            address = ipaddress.ip_address(rng.address_prefix)
        except ValueError:
            raise XdsError(f"{cwhere}: prefix range {rng.address_prefix!r} is not an IP address") from None
        if rng.prefix_len.value != address.max_prefixlen:
            raise XdsError(f"{cwhere}: prefix_len {rng.prefix_len.value} is not supported "
                           f"(only single addresses: /{address.max_prefixlen})")
        key = (str(address), match.destination_port.value)
        if key in seen:
            raise XdsError(f"{cwhere}: matches {key[0]}:{key[1] or '*'} like an earlier chain")
        seen.add(key)
        got = network_filter(chain.name or f"{msg.name}#{i}", chain, cwhere)
        chains.append(FilterChain(name=chain.name or f"#{i}", address=key[0], port=key[1],
                                  http=got if got.tcp is None else None, tcp=got.tcp))
    return ListenerConfig(name=msg.name, chains=tuple(chains))


def _dns(msg: listener_pb2.Listener, where: str) -> ListenerConfig:
    only(msg, ("name", "address", "udp_listener_config", "listener_filters", "stat_prefix", "metadata",
                "traffic_direction"), where)
    if len(msg.listener_filters) != 1 or msg.listener_filters[0].typed_config.type_url != xds.DNS_FILTER:
        raise XdsError(f"{where}: a UDP listener needs exactly one listener filter, envoy.filters.udp.dns_filter")
    config = unpack(msg.listener_filters[0].typed_config, dns_filter_pb2.DnsFilterConfig(), where, "the dns_filter config")
    fwhere = f"{where} dns_filter"
    only(config, ("stat_prefix", "server_config"), fwhere)
    only(config.server_config, ("inline_dns_table",), f"{fwhere} server_config")
    table = config.server_config.inline_dns_table
    only(table, ("virtual_domains",), f"{fwhere} inline_dns_table")
    if len(table.virtual_domains) > MAX_DNS_NAMES:
        raise XdsError(f"{fwhere}: {len(table.virtual_domains)} names, at most {MAX_DNS_NAMES}")
    names: dict[str, tuple[str, ...]] = {}
    for vd in table.virtual_domains:
        vwhere = f"{fwhere} virtual domain {vd.name!r}"
        only(vd, ("name", "endpoint", "answer_ttl"), vwhere)
        only(vd.endpoint, ("address_list",), f"{vwhere} endpoint")
        addresses = []
        for a in vd.endpoint.address_list.address:
            try:
                addresses.append(str(ipaddress.IPv4Address(a)))
            except ValueError:
                raise XdsError(f"{vwhere}: {a!r} is not an IPv4 address") from None
        name = vd.name.lower().rstrip(".")
        if not name or not addresses:
            raise XdsError(f"{vwhere}: needs a name and at least one address")
        names[name] = tuple(addresses)
    return ListenerConfig(name=msg.name, dns=DnsTableConfig(MappingProxyType(dict(sorted(names.items())))))
