"""Who may call the admin API: bearer tokens and roles (docs/contracts.md, "Admin API").

``--admin-tokens FILE`` holds one token per line, ``<token> <name> <viewer|operator|admin>``;
``#`` starts a comment. The file is re-read when its modification time or size changes, so tokens
rotate without a restart; a file that no longer parses keeps the last good tokens and logs why,
and removing the file revokes every token until it is back.
Tokens are kept as SHA-256 digests and looked up by digest.

Without a token file, reads are open and writes are refused unless the control plane was started
with ``--insecure-admin``: then every caller is ``anonymous`` with the admin role.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
from dataclasses import dataclass

import grpc

log = logging.getLogger("meshkeeper.controlplane.admin")


class Role(enum.IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class TokenFileError(ValueError):
    """A token file that does not parse; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    role: Role
    peer: str = ""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, source: str = "tokens") -> dict[bytes, tuple[str, Role]]:
    out: dict[bytes, tuple[str, Role]] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise TokenFileError(f"{source}:{n}: expected '<token> <name> <viewer|operator|admin>'")
        token, name, role = parts
        try:
            r = Role[role.upper()]
        except KeyError:
            raise TokenFileError(f"{source}:{n}: role {role!r} is not viewer, operator or admin") from None
        if len(token) < 16:
            raise TokenFileError(f"{source}:{n}: token of {name!r} is shorter than 16 characters")
        d = _digest(token)
        if d in out:
            raise TokenFileError(f"{source}:{n}: the token of {name!r} is used twice")
        out[d] = (name, r)
    return out


class TokenFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._tokens: dict[bytes, tuple[str, Role]] = {}
        self._load(initial=True)

    def _load(self, initial: bool = False) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as f:
                tokens = parse_tokens(f.read(), self.path)
        except FileNotFoundError:
            if initial:
                raise TokenFileError(f"{self.path}: No such file or directory") from None
            if self._tokens or self._stamp is not None:  # removing the file revokes every token
                log.error("admin tokens: %s is gone; every token is refused until it is back", self.path)
            self._stamp, self._tokens = None, {}
            return
        except (OSError, UnicodeDecodeError, TokenFileError) as exc:
            if initial:
                raise TokenFileError(str(exc) if isinstance(exc, TokenFileError)
                                     else f"{self.path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
            if self._stamp is not None:  # say it once per bad state, keep the last good tokens
                log.error("admin tokens: %s; keeping the %d tokens read before", exc, len(self._tokens))
                self._stamp = None
            return
        if not initial:
            log.info("admin tokens re-read from %s: %d tokens", self.path, len(tokens))
        self._stamp, self._tokens = stamp, tokens

    def lookup(self, token: str) -> tuple[str, Role] | None:
        self._load()
        return self._tokens.get(_digest(token))


class Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Authorizer:
    def __init__(self, tokens: TokenFile | None = None, insecure: bool = False) -> None:
        self.tokens = tokens
        self.insecure = insecure

    @property
    def mode(self) -> str:
        return "tokens" if self.tokens is not None else "insecure" if self.insecure else "read-only"

    def check(self, metadata: tuple | list | None, needed: Role, peer: str = "") -> Caller:
        """The caller, or :class:`Denied` with UNAUTHENTICATED or PERMISSION_DENIED."""
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
        if self.tokens is None:
            if self.insecure:
                return Caller("anonymous", Role.ADMIN, peer)
            if needed > Role.VIEWER:
                raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                             "admin writes are off: the control plane runs without --admin-tokens; "
                             "start it with --admin-tokens FILE (or --insecure-admin on a trusted network)")
            return Caller("anonymous", Role.VIEWER, peer)
        scheme, _, token = header.partition(" ")
        if not header:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED,
                         "no token: send 'authorization: Bearer <token>' (meshkeeper --token or MESHKEEPER_TOKEN)")
        if scheme.lower() != "bearer" or not token.strip():
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "the authorization metadata must be 'Bearer <token>'")
        found = self.tokens.lookup(token.strip())
        if found is None:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        name, role = found
        if role < needed:
            raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                         f"{name} has the {role.label} role; this needs {needed.label}")
        return Caller(name, role, peer)
