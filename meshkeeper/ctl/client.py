"""The admin API client: one channel to the control plane, the bearer token, deadlines, and gRPC
errors turned into one line people understand (docs/contracts.md, "Admin API")."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from meshkeeper.admin.v1 import admin_pb2_grpc

DEFAULT_CP = "127.0.0.1:15010"


class CtlError(Exception):
    """A failure reported as ``meshkeeper: <message>`` on stderr; ``exit_code`` is the process's."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to call the admin API."""

    cp: str = DEFAULT_CP
    token: str = ""
    timeout: float = 10.0
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)


def _read(flag: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CtlError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise CtlError(f"{flag} {path}: not a PEM file (expected -----BEGIN ...)")
    return data


def open_channel(target: Target) -> grpc.Channel:
    options: list[tuple[str, Any]] = []
    if not target.tls:
        return grpc.insecure_channel(target.cp, options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read("--ca", target.ca) if target.ca else None,
        private_key=_read("--key", target.key) if target.key else None,
        certificate_chain=_read("--cert", target.cert) if target.cert else None)
    if target.server_name:
        options.append(("grpc.ssl_target_name_override", target.server_name))
    return grpc.secure_channel(target.cp, creds, options)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def explain(err: grpc.RpcError, target: Target, what: str = "", if_version: int | None = None) -> str:
    """One line for a failed call: what went wrong in words, the status, and the server's message."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = _one_line(err.details() or "") if callable(getattr(err, "details", None)) else str(err)
    said = f": {details}" if details else ""
    S = grpc.StatusCode
    if code is None:
        return f"admin API call failed{said}"
    if code == S.UNAVAILABLE:
        if "zookeeper" in details.lower():  # the control plane answered: its ZooKeeper is down
            return f"the control plane at {target.cp} is unavailable (UNAVAILABLE{said})"
        return f"cannot reach the control plane at {target.cp} ({details or 'UNAVAILABLE'})"
    if code == S.DEADLINE_EXCEEDED:
        return (f"the control plane at {target.cp} did not answer within {target.timeout:g}s "
                f"(DEADLINE_EXCEEDED; --timeout sets the limit)")
    if code == S.UNAUTHENTICATED:
        if not target.token:
            return f"the control plane wants a token (UNAUTHENTICATED{said}); pass --token or set MESHKEEPER_TOKEN"
        return (f"the control plane did not accept the token (UNAUTHENTICATED{said}); "
                f"check --token or MESHKEEPER_TOKEN")
    if code == S.PERMISSION_DENIED:
        return f"permission denied (PERMISSION_DENIED{said})"
    if code == S.NOT_FOUND:
        return f"not found (NOT_FOUND{said})"
    if code == S.ABORTED:
        thing = what or "the object"
        since = f"since version {if_version} was read" if if_version is not None else "since it was read"
        return f"{thing} changed {since}; read it again (ABORTED{said})"
    if code == S.INVALID_ARGUMENT:
        return f"invalid request (INVALID_ARGUMENT{said})"
    if code == S.FAILED_PRECONDITION:
        return f"refused (FAILED_PRECONDITION{said})"
    if code == S.RESOURCE_EXHAUSTED:
        return f"the control plane gave up on this call (RESOURCE_EXHAUSTED{said})"
    if code == S.UNIMPLEMENTED:
        return (f"the control plane at {target.cp} does not serve this admin call "
                f"(UNIMPLEMENTED{said}); is it an older version?")
    return f"admin API call failed ({code.name}{said})"


class Client:
    """Calls the AdminService with the token and the deadline; raises :class:`CtlError`."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._channel = open_channel(target)
        self.stub = admin_pb2_grpc.AdminServiceStub(self._channel)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.target.token}"),) if self.target.token else ()

    def call(self, method: str, request: Any, what: str = "", if_version: int | None = None) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=self.target.timeout, metadata=self.metadata)
        except grpc.RpcError as err:
            raise CtlError(explain(err, self.target, what, if_version)) from None

    def stream(self, method: str, request: Any) -> Iterator[Any]:
        """A server stream without a deadline; ends when the server ends it.

        A thread of its own reads the call, so that Ctrl-C lands in this thread's wait on a plain
        queue, never inside gRPC's own locks (where it can leave the call unable to cancel)."""
        call = getattr(self.stub, method)(request, metadata=self.metadata)
        items: queue.Queue = queue.Queue()

        def pump() -> None:
            try:
                for item in call:
                    items.put((True, item))
                items.put((False, None))
            except BaseException as exc:  # noqa: BLE001 (handed to the reading thread)
                items.put((False, exc))

        threading.Thread(target=pump, name=f"{method}-stream", daemon=True).start()
        try:
            while True:
                try:
                    more, value = items.get(timeout=0.25)
                except queue.Empty:
                    continue
                if more:
                    yield value
                    continue
                if isinstance(value, grpc.RpcError):
                    raise CtlError(explain(value, self.target)) from None
                if value is not None:
                    raise value
                return
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()
