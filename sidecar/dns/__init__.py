"""The sidecar's mesh DNS (transparent mode, DESIGN.md §10): answers the mesh's names with their VIPs
and forwards the rest to the pod's resolvers.

    table = build_table([("shop", "catalog", "240.240.0.7")], own_namespace="shop")
    dns = MeshDns(read_resolv_conf())
    port = await dns.start("127.0.0.1", 15053)
    dns.set_table(table)          # from the xDS layer, on the loop, whenever the services change
    dns.snapshot()                # plain counters: Prometheus families meshkeeper_dns_<stat>
    await dns.stop()

Modules: ``table`` (names, resolv.conf: config code, may raise), ``server`` (MeshDns: the data path,
never raises), ``protocols`` (the asyncio protocols and their bounds), ``stats`` (the counter list).
"""

from sidecar.dns.server import DEFAULT_MAX_PENDING, DEFAULT_TIMEOUT, DEFAULT_TTL, MeshDns
from sidecar.dns.stats import DNS_STATS, DnsStats
from sidecar.dns.table import DEFAULT_DOMAIN, DnsTable, build_table, read_resolv_conf

__all__ = ["DEFAULT_DOMAIN", "DEFAULT_MAX_PENDING", "DEFAULT_TIMEOUT", "DEFAULT_TTL", "DNS_STATS", "DnsStats",
           "DnsTable", "MeshDns", "build_table", "read_resolv_conf"]
