"""Immediate ACKs on the sockets the sidecar reads a message from while the message is incomplete.

Why: a peer that writes one message in two small sends with Nagle on (Python's ``http.server``
writes the response head, then the body; some clients write a request head, then its body) sends
the second piece only once the first is acknowledged. On a keep-alive connection Linux delays that
ACK (delayed ACK in "pingpong" mode, 40 ms at least) hoping to carry it on the reader's next send,
and the reader sends nothing until the message is complete: every such exchange stalls for about
40 ms. Our pools make every upstream connection a keep-alive one, so without this an app that
answers short-lived clients in under a millisecond answers in 44 ms behind its sidecar (issue 11).

What: ``TCP_QUICKACK`` sends the pending ACK at once and leaves pingpong mode, but Linux re-enters
it on the next exchange, so it is re-armed where the reader still expects bytes: after a read that
left a response (upstream side) or a request (downstream side) incomplete. A message that arrives
whole in one read, the usual case, costs nothing; a split one costs one ``setsockopt`` per such read
(about 2.5 µs through uvloop's socket wrapper, measured in bench/RESULTS.md).

Where ``TCP_QUICKACK`` does not exist (not Linux), :func:`ack_now` does nothing and the ACK timing
is the kernel's; the peer's Nagle delay then remains as it would be with any other proxy.
The sockets we write keep ``TCP_NODELAY`` (uvloop and asyncio set it on every TCP transport), so our
own writes never wait for the peer's ACKs.
"""

from __future__ import annotations

import asyncio
import socket

TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
_TCP = (socket.AF_INET, socket.AF_INET6)


def ack_now(transport: asyncio.BaseTransport) -> None:
    """Ask the kernel to ACK what was read on ``transport`` now and not to delay the next ACKs
    (until Linux re-enters pingpong mode). A no-op on non-TCP transports, on platforms without
    ``TCP_QUICKACK`` and on a closing socket; never raises."""
    if TCP_QUICKACK is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in _TCP:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
    except OSError:
        pass  # the socket is closing: there is nothing left to acknowledge
