"""The capture rules as a pure function of a validated :class:`CaptureConfig` (DESIGN §10).

:func:`generate` returns ``iptables-restore`` input for a namespace that has none of our rules yet:
our own chains, and one jump into them from each built-in chain we hook, tagged with
``-m comment --comment meshkeeper`` so that :mod:`.ruleset` can find exactly ours again to update
or remove them. Nothing here touches the system; golden files pin the output.

Rules are written in the form ``iptables-save`` prints them back (``! -d`` before ``-o``,
``-m tcp`` after ``-p tcp``), so a saved rule and a generated one compare equal as text: that is
what lets a second run recognise its own jumps and change nothing.

nat table::

    PREROUTING -p tcp  -> MESHKEEPER_INBOUND      sidecar's own ports and excluded ports RETURN,
                                                  the rest (or only --inbound-ports) -> MESHKEEPER_IN_REDIRECT
    OUTPUT             -> MESHKEEPER_OUTPUT       see _output(): proxy, loopback and exclusions RETURN,
                                                  DNS -> MESHKEEPER_DNS, the rest -> MESHKEEPER_REDIRECT
    MESHKEEPER_IN_REDIRECT  REDIRECT --to-ports <inbound-port>    (15006)
    MESHKEEPER_REDIRECT     REDIRECT --to-ports <outbound-port>   (15001)
    MESHKEEPER_DNS          udp/tcp dport 53 REDIRECT --to-ports <dns-port> (15053)

raw table (with DNS): conntrack zones that keep the proxy's own queries to the real resolver apart
from the app's captured ones (see _conntrack_zones()).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

COMMENT = "meshkeeper"
CHAIN_PREFIX = "MESHKEEPER_"
INBOUND = "MESHKEEPER_INBOUND"
IN_REDIRECT = "MESHKEEPER_IN_REDIRECT"
OUTPUT = "MESHKEEPER_OUTPUT"
REDIRECT = "MESHKEEPER_REDIRECT"
DNS = "MESHKEEPER_DNS"
DNS_CT_OUTPUT = "MESHKEEPER_DNS_CT_OUTPUT"
DNS_CT_INBOUND = "MESHKEEPER_DNS_CT_INBOUND"

DEFAULT_PROXY_UID = 1337
DEFAULT_ADMIN_PORT = 15000
DEFAULT_STATUS_PORT = 15021  # readiness and metrics for the kubelet and Prometheus (Istio's status port)
DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_INBOUND_PORT = 15006
DEFAULT_DNS_PORT = 15053
DNS_PORT = 53

# Conntrack zones (raw table): the proxy's conversation with the real resolver lives in one, the
# app's captured queries (and the proxy's answers to them) in the other.
ZONE_PROXY_TO_RESOLVER = 1
ZONE_APP_TO_PROXY = 2

# The app's calls to loopback are never captured (DESIGN §10).
LOOPBACK = {4: "127.0.0.1/32", 6: "::1/128"}
# Source address the inbound listener may bind to dial the app at the pod IP without being
# captured again (Istio's inbound passthrough convention).
INBOUND_PASSTHROUGH_SOURCE = {4: "127.0.0.6/32", 6: "::6/128"}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class CaptureConfig:
    """What ``meshkeeper iptables`` was asked to capture, validated (see :mod:`.iptables`).

    ``inbound_ports`` and ``include_cidrs`` are ``None`` for ``'*'`` (everything) and may be an
    empty tuple (nothing). Tuples are sorted and free of duplicates.
    """

    proxy_uid: int = DEFAULT_PROXY_UID
    proxy_gid: int | None = None
    admin_port: int = DEFAULT_ADMIN_PORT
    status_port: int = DEFAULT_STATUS_PORT
    outbound_port: int = DEFAULT_OUTBOUND_PORT
    inbound_port: int = DEFAULT_INBOUND_PORT
    dns_port: int = DEFAULT_DNS_PORT
    inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    include_cidrs: tuple[Network, ...] | None = None
    exclude_cidrs: tuple[Network, ...] = ()
    dns: bool = True

    @property
    def sidecar_ports(self) -> tuple[int, ...]:
        """The sidecar's own listeners: never captured inbound, whatever the flags say."""
        return tuple(sorted({self.admin_port, self.status_port, self.outbound_port, self.inbound_port,
                             self.dns_port}))

    @property
    def captures_inbound(self) -> bool:
        return self.inbound_ports is None or bool(self.inbound_ports)

    def owners(self) -> list[tuple[str, int]]:
        """The proxy's identities as ``-m owner`` options: its uid, and its gid when given."""
        found = [("--uid-owner", self.proxy_uid)]
        if self.proxy_gid is not None:
            found.append(("--gid-owner", self.proxy_gid))
        return found


def generate(config: CaptureConfig, family: int = 4) -> list[str]:
    """``iptables-restore`` input (``ip6tables-restore`` for ``family=6``) installing our rules."""
    lines = _nat(config, family)
    if config.dns:
        lines += _conntrack_zones(config)
    return lines


def _nat(c: CaptureConfig, family: int) -> list[str]:
    chains = ([INBOUND] if c.captures_inbound else []) + [IN_REDIRECT, OUTPUT, REDIRECT] + ([DNS] if c.dns else [])
    rules = [
        f"-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {c.inbound_port}",
        f"-A {REDIRECT} -p tcp -j REDIRECT --to-ports {c.outbound_port}",
    ]
    if c.dns:
        rules += [f"-A {DNS} -p {proto} -m {proto} --dport {DNS_PORT} -j REDIRECT --to-ports {c.dns_port}"
                  for proto in ("udp", "tcp")]
    rules += _inbound(c) + _output(c, family)
    jumps = [f"-A OUTPUT -m comment --comment {COMMENT} -j {OUTPUT}"]
    if c.captures_inbound:
        jumps.insert(0, f"-A PREROUTING -p tcp -m comment --comment {COMMENT} -j {INBOUND}")
    return ["*nat", *(f":{name} - [0:0]" for name in chains), *rules, *jumps, "COMMIT"]


def _inbound(c: CaptureConfig) -> list[str]:
    """TCP arriving at the pod. Loopback never reaches here: a locally made connection is NATed
    (or not) once, in OUTPUT, and the nat table does not see it again in PREROUTING."""
    if c.inbound_ports is not None:
        return [f"-A {INBOUND} -p tcp -m tcp --dport {port} -j {IN_REDIRECT}" for port in c.inbound_ports]
    skipped = sorted(set(c.sidecar_ports) | set(c.exclude_inbound_ports))
    return [f"-A {INBOUND} -p tcp -m tcp --dport {port} -j RETURN" for port in skipped] + [
        f"-A {INBOUND} -p tcp -j {IN_REDIRECT}"
    ]


def _output(c: CaptureConfig, family: int) -> list[str]:
    """Locally made connections, first rule to match wins:

    1. --exclude-outbound-ports: never captured.
    2. The inbound listener dialing the app from the passthrough source: not captured again.
    3. The proxy dialing the pod's own IP over ``lo`` (an app that called itself through its
       service, and the outbound listener picked the local endpoint): through the inbound chain,
       so it reaches the inbound listener as a call from outside would, instead of looping.
    4. Anyone else over ``lo`` (the app calling itself by pod IP, or any local address): not
       captured. With DNS on, TCP to port 53 goes on, so a resolver on a local address is still
       captured.
    5. Anything else of the proxy's (its upstream connections, its own DNS queries): not captured.
    6. To 127.0.0.1 / ::1: not captured (before DNS, so a resolver on 127.0.0.1 is not either).
    7. DNS to port 53, TCP and UDP: to the mesh DNS.
    8. --exclude-cidrs: not captured; then all TCP, or only TCP to --include-cidrs, to 15001.
    """
    loopback, out = LOOPBACK[family], []
    out += [f"-A {OUTPUT} -p tcp -m tcp --dport {port} -j RETURN" for port in c.exclude_outbound_ports]
    out.append(f"-A {OUTPUT} -s {INBOUND_PASSTHROUGH_SOURCE[family]} -o lo -j RETURN")
    not_dns = f" -m tcp ! --dport {DNS_PORT}" if c.dns else ""
    if c.captures_inbound:
        out += [f"-A {OUTPUT} ! -d {loopback} -o lo -p tcp{not_dns} -m owner {opt} {ident} -j {INBOUND}"
                for opt, ident in c.owners()]
    not_proxy = " ".join(f"! {opt} {ident}" for opt, ident in c.owners())
    lo_proto = f" -p tcp{not_dns}" if c.dns else ""
    out.append(f"-A {OUTPUT} -o lo{lo_proto} -m owner {not_proxy} -j RETURN")
    out += [f"-A {OUTPUT} -m owner {opt} {ident} -j RETURN" for opt, ident in c.owners()]
    out.append(f"-A {OUTPUT} -d {loopback} -j RETURN")
    if c.dns:
        out.append(f"-A {OUTPUT} -j {DNS}")
    out += [f"-A {OUTPUT} -d {net} -j RETURN" for net in c.exclude_cidrs if net.version == family]
    if c.include_cidrs is None:
        out.append(f"-A {OUTPUT} -j {REDIRECT}")
    else:
        out += [f"-A {OUTPUT} -d {net} -j {REDIRECT}" for net in c.include_cidrs if net.version == family]
    return out


def _conntrack_zones(c: CaptureConfig) -> list[str]:
    """Separate conntrack zones for the two legs of a captured UDP DNS query.

    The app's query and the proxy's forwarded query to the same resolver differ only in the
    source port. When the app happens to reuse a source port the proxy used moments before, the
    app's packet matches the proxy's conntrack entry, skips the nat table and goes straight to the
    resolver: the mesh's names then fail to resolve, now and then. Zone 1 holds the proxy's
    queries to the resolver (and, via PREROUTING, the answers); zone 2 the app's queries and the
    proxy's answers from the DNS port. The first CT rule that matches a packet sets its zone.
    """
    out = []
    for opt, ident in c.owners():
        out += [
            f"-A {DNS_CT_OUTPUT} -p udp -m udp --dport {DNS_PORT} -m owner {opt} {ident} "
            f"-j CT --zone {ZONE_PROXY_TO_RESOLVER}",
            f"-A {DNS_CT_OUTPUT} -p udp -m udp --sport {c.dns_port} -m owner {opt} {ident} "
            f"-j CT --zone {ZONE_APP_TO_PROXY}",
        ]
    out += [
        f"-A {DNS_CT_OUTPUT} -p udp -m udp --dport {DNS_PORT} -j CT --zone {ZONE_APP_TO_PROXY}",
        f"-A {DNS_CT_INBOUND} -p udp -m udp --sport {DNS_PORT} -j CT --zone {ZONE_PROXY_TO_RESOLVER}",
    ]
    return [
        "*raw",
        f":{DNS_CT_OUTPUT} - [0:0]",
        f":{DNS_CT_INBOUND} - [0:0]",
        *out,
        f"-A PREROUTING -p udp -m comment --comment {COMMENT} -j {DNS_CT_INBOUND}",
        f"-A OUTPUT -p udp -m comment --comment {COMMENT} -j {DNS_CT_OUTPUT}",
        "COMMIT",
    ]
