"""The mesh's DNS names (:class:`DnsTable`) and the resolvers other names go to (resolv.conf).

Config code: :func:`build_table` and :func:`read_resolv_conf` may raise on bad input (the xDS
layer turns that into a NACK); the data path only reads a finished table. A table never changes
once built: an update builds a new one and hands it to ``MeshDns.set_table`` whole.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping

DEFAULT_DOMAIN = "mesh.local"  # DESIGN.md §10, --dns-domain
DNS_PORT = 53


class DnsTable(Mapping[str, tuple[str, ...]]):
    """Lower-case fully-qualified name (no trailing dot) -> the IPv4 VIPs it answers with."""

    __slots__ = ("_names",)

    def __init__(self, names: Mapping[str, Iterable[str]] | None = None) -> None:
        table: dict[str, tuple[str, ...]] = {}
        for name, vips in (names or {}).items():
            key = name.rstrip(".").lower()
            addrs = tuple(str(ipaddress.IPv4Address(v)) for v in vips)  # ValueError on anything else
            if not key or not addrs:
                raise ValueError(f"DNS table entry {name!r}: needs a name and at least one IPv4 address")
            table[key] = addrs
        self._names = table

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self._names[name]

    def get(self, name: str, default=None):  # the data path's lookup: one dict probe
        return self._names.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"DnsTable({self._names!r})"


def build_table(services: Iterable[tuple[str, str, str]], own_namespace: str,
                domain: str = DEFAULT_DOMAIN) -> DnsTable:
    """The names of DESIGN.md §10 for ``(namespace, service, vip)`` triples.

    Every service answers ``<svc>.<ns>`` and ``<svc>.<ns>.<domain>``; services of ``own_namespace``
    also answer the short ``<svc>``, as Kubernetes' search path does. A name listed twice answers
    every distinct VIP it was given, in order.
    """
    own = own_namespace.lower()
    suffix = domain.strip(".").lower()
    names: dict[str, list[str]] = {}

    def add(name: str, vip: str) -> None:
        vips = names.setdefault(name, [])
        if vip not in vips:
            vips.append(vip)

    for namespace, service, vip in services:
        ns, svc = namespace.lower(), service.lower()
        if not ns or not svc or "." in ns or "." in svc:
            raise ValueError(f"service {namespace!r}/{service!r}: names must be one non-empty DNS label")
        addr = str(ipaddress.IPv4Address(vip))
        add(f"{svc}.{ns}", addr)
        if suffix:
            add(f"{svc}.{ns}.{suffix}", addr)
        if ns == own:
            add(svc, addr)
    return DnsTable(names)


def read_resolv_conf(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The ``nameserver`` lines of ``path`` as ``(host, 53)``, IPv4 and IPv6, in file order.

    Lines that are not an IP address are skipped (as glibc does); an unreadable file gives ``[]``,
    and MeshDns then answers SERVFAIL for every name outside the mesh.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    servers: list[tuple[str, int]] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        host = fields[1]
        try:
            ipaddress.ip_address(host.partition("%")[0])  # a scoped link-local fe80::1%eth0 is fine
        except ValueError:
            continue
        if (host, DNS_PORT) not in servers:
            servers.append((host, DNS_PORT))
    return servers
