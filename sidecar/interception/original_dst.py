"""Where a redirected connection was going: ``SO_ORIGINAL_DST`` (Envoy's ``original_dst`` listener filter).

A connection REDIRECTed by the nat table (:mod:`.rules`) arrives at the sidecar's listener with
its destination rewritten to the listener's own address; conntrack keeps the original, and this
reads it back. IPv4 sockets ask ``SOL_IP``/``SO_ORIGINAL_DST`` (80), IPv6 sockets ``SOL_IPV6``/
``IP6T_SO_ORIGINAL_DST`` (also 80); both answer a ``struct sockaddr_in``/``sockaddr_in6``.

Returns ``None`` when the kernel has no NAT record for the connection (``ENOENT``: it was not
redirected, or conntrack is not loaded), on non-Linux systems, and for sockets that are not
TCP/UDP over IP. Beware: a connection that was not redirected but still passed through conntrack
(e.g. an explicit-mode client that dialed 15001 itself) may answer the listener's *own* address
instead of ``None``. Callers tell the two apart by comparing: ``original_dst(sock) ==
sock.getsockname()[:2]`` means "not redirected" -- dispatching it would loop back to ourselves.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import sys

SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>
IP6T_SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv6/ip6_tables.h>
_SOL_IP = getattr(socket, "SOL_IP", 0)
_SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
_SOCKADDR_IN6_LEN = 28  # family(2) port(2) flowinfo(4) addr(16) scope_id(4)

# Answers that mean "nothing recorded" rather than a bug of ours.
_NOT_REDIRECTED = {errno.ENOENT, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EINVAL}


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """``(host, port)`` the peer dialed before REDIRECT, or ``None`` (see the module docstring)."""
    if not sys.platform.startswith("linux") or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        if sock.family == socket.AF_INET6 and not _v4_mapped(sock):
            raw = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
            return str(ipaddress.IPv6Address(raw[8:24])), struct.unpack_from("!H", raw, 2)[0]
        # IPv4, or an IPv4 peer on a dual-stack socket: NATed by the IPv4 table, so ask that one.
        raw = sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, 16)
        return socket.inet_ntoa(raw[4:8]), struct.unpack_from("!H", raw, 2)[0]
    except OSError as exc:
        if exc.errno in _NOT_REDIRECTED:
            return None
        raise


def _v4_mapped(sock: socket.socket) -> bool:
    host = sock.getsockname()[0].split("%")[0]
    return ipaddress.IPv6Address(host).ipv4_mapped is not None
