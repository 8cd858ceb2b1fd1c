"""What every xDS converter of the sidecar uses: :class:`XdsError` (a NACK's reason) and the checks
and readers of proto fields. :mod:`sidecar.xds.convert`, :mod:`sidecar.xds.security` and
:mod:`sidecar.xds.listeners` import it; it imports none of them."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import DecodeError, Message


class XdsError(ValueError):
    """A resource the sidecar cannot honour; the message becomes the NACK's error_detail."""


def only(msg: Message, allowed: Iterable[str], where: str) -> None:
    allowed = set(allowed)
    for fd, _ in msg.ListFields():
        if fd.name not in allowed:
            raise XdsError(f"{where}: field '{fd.name}' is not supported by this sidecar")


def enum_name(enum, value: int) -> str:
    """The name of ``value`` in a proto enum, or its number when the enum has none (a value from a
    newer API, or garbage): proto3 keeps unknown enum values, and ``Name()`` would raise."""
    try:
        return enum.Name(value)
    except ValueError:
        return str(value)


def seconds(duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def duration(msg: Message, name: str, default: float, where: str) -> float:
    """A Duration field in seconds; ``default`` when unset; negative durations are refused."""
    if not msg.HasField(name):
        return default
    value = seconds(getattr(msg, name))
    if value < 0:
        raise XdsError(f"{where}: {name} must not be negative")
    return value


def unpack(any_msg, message: Message, where: str, what: str = "") -> Message:
    try:
        ok = any_msg.Unpack(message)
    except DecodeError:  # bytes that are not the message (DecodeError is not a ValueError)
        ok = False
    if not ok:
        raise XdsError(f"{where}: cannot decode {what or any_msg.type_url}")
    return message
