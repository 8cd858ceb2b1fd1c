"""Plain-integer counters of the mesh DNS, declared in one list (as ``sidecar.upstream.stats``).

The data path only does ``stats.name += 1``; the metrics layer reads :meth:`DnsStats.snapshot` at
scrape time. Names follow Envoy's DNS filter (``downstream_rx_queries``, ``known_domain_queries``,
``external_*``, ``unanswered_queries``); suggested Prometheus families are ``meshkeeper_dns_<stat>``,
gauges for the names ending in ``_active`` and counters for the rest (the rule ``sidecar.metrics``
already applies to cluster statistics).
"""

from __future__ import annotations

from sidecar.upstream.stats import Counters

DNS_STATS: tuple[str, ...] = (
    "downstream_rx_queries",  # well-formed queries received, UDP and TCP
    "downstream_rx_tcp_queries",  # of which over TCP
    "downstream_rx_invalid",  # malformed: dropped (shorter than a header, a response) or answered FORMERR
    "downstream_tx_formerr",  # of which answered FORMERR: the header parsed, the question did not
    "downstream_tx_responses",  # responses sent to clients, whatever their code
    "downstream_tx_errors",  # UDP sends to a client that failed (error_received on the listener)
    "downstream_cx_tcp_total",
    "downstream_cx_tcp_active",
    "downstream_cx_tcp_overflow",  # connections refused: max_tcp_connections were open
    "downstream_cx_tcp_idle_timeout",  # connections closed after tcp_idle_timeout without a query
    "known_domain_queries",  # queries for a mesh name (answered here, never forwarded)
    "local_a_record_answers",  # A for a mesh name: its VIPs
    "local_nodata_answers",  # any other type for a mesh name: NOERROR, no answer
    "external_queries",  # queries forwarded to an upstream resolver (once per client query)
    "external_queries_active",  # forwarded queries waiting for their answer now
    "external_queries_overflow",  # answered SERVFAIL at once: max_pending were in flight
    "external_retries",  # resent to the next upstream after an error from the previous one
    "external_answers",  # upstream answers passed on unchanged (every code)
    "external_nxdomain_answers",  # of which NXDOMAIN
    "external_servfail_answers",  # of which SERVFAIL from the upstream itself
    "external_truncated_answers",  # of which truncated (TC): the client retries over TCP
    "external_unsolicited",  # upstream datagrams that matched no query in flight (late or spoofed)
    "external_errors",  # SERVFAIL: every upstream failed (refused, reset, unreachable) or none is known
    "unanswered_queries",  # SERVFAIL: no upstream answer within the timeout
    "internal_errors",  # a bug caught at a protocol callback (logged once); the query got no answer
)


class DnsStats(Counters):
    __slots__ = DNS_STATS
    FIELDS = DNS_STATS
