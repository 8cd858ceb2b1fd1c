"""Request body held while no upstream can take it (the router waiting for a connection, a stream
held for on-demand discovery): bounded per stream, past :data:`BUFFER_LIMIT` the downstream stops
being read (``R_BUFFER``) until the router sends what is held."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from sidecar.codec.api import R_BUFFER

if TYPE_CHECKING:
    from sidecar.proxy.stream import Stream

BUFFER_LIMIT = 64 * 1024  # request bytes held per stream while no upstream can take them


class BodyHolder(Protocol):
    stream: Stream
    pending: list[bytes] | None
    pending_size: int


def hold_body(holder: BodyHolder, data: bytes) -> None:
    """Keep ``data`` in ``holder.pending``; past :data:`BUFFER_LIMIT` stop reading the downstream."""
    if holder.pending is None:
        holder.pending = [data]
    else:
        holder.pending.append(data)
    holder.pending_size += len(data)
    if holder.pending_size > BUFFER_LIMIT:
        holder.stream.encoder.read_disable(R_BUFFER, True)
