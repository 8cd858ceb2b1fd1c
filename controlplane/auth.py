"""Who may call the admin API: bearer tokens, client certificates and roles (docs/contracts.md,
"Admin API"; docs/admin.md).

``--admin-tokens FILE`` holds one caller per line, ``<credential> <name> <viewer|operator|admin>``;
``#`` starts a comment. The credential is a bearer token, or, for operators who call over mutual
TLS (``--tls-client-ca``), the identity in their client certificate:

- ``spiffe://...``: a URI SAN of the certificate (a SPIFFE ID), matched exactly;
- ``subject:<RFC 4514 subject>``: the certificate's whole subject (``subject:CN=alice,O=ops``),
  the same attributes in any order; it may contain spaces (name and role are the last two fields).

A bearer token, when the call carries one, decides alone; a call without one is the caller its
verified client certificate maps to. The file is re-read when its modification time or size
changes, so credentials rotate without a restart; a file that no longer parses keeps the last good
ones and logs why, and removing the file revokes every one until it is back.
Tokens are kept as SHA-256 digests and looked up by digest.

Without a token file, reads are open and writes are refused unless the control plane was started
with ``--insecure-admin``: then every caller is ``anonymous`` with the admin role.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import re
from dataclasses import dataclass

import grpc
from cryptography import x509

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


SPIFFE_PREFIX = "spiffe://"
SUBJECT_PREFIX = "subject:"
SubjectKey = tuple[tuple[str, str], ...]  # a subject's (OID, value) pairs, sorted: order does not matter


def subject_key(name: x509.Name) -> SubjectKey:
    return tuple(sorted((a.oid.dotted_string, str(a.value)) for a in name))


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The verified client certificate of a call: its URI SANs and its subject."""

    uris: tuple[str, ...]
    subject: SubjectKey
    subject_text: str

    @classmethod
    def from_pem(cls, pem: bytes) -> PeerCertificate:
        cert = x509.load_pem_x509_certificate(pem)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        except x509.ExtensionNotFound:
            uris = ()
        return cls(uris, subject_key(cert.subject), cert.subject.rfc4514_string())

    def describe(self) -> str:
        return ", ".join([*self.uris, *([f"subject {self.subject_text}"] if self.subject_text else [])]) or "no names"


def peer_certificate(context: object) -> PeerCertificate | None:
    """The client certificate gRPC verified on this call (mutual TLS), or None."""
    auth_context = getattr(context, "auth_context", None)
    if auth_context is None:
        return None
    pems = auth_context().get("x509_pem_cert") or ()
    for pem in pems:
        try:
            return PeerCertificate.from_pem(pem if isinstance(pem, bytes) else pem.encode())
        except ValueError:
            log.warning("admin API: a client certificate gRPC accepted does not parse; ignored")
    return None


@dataclass(frozen=True, slots=True)
class Credentials:
    tokens: dict[bytes, tuple[str, Role]]
    spiffe_ids: dict[str, tuple[str, Role]]
    subjects: dict[SubjectKey, tuple[str, Role]]

    def __len__(self) -> int:
        return len(self.tokens) + len(self.spiffe_ids) + len(self.subjects)

    def certificate(self, cert: PeerCertificate) -> tuple[str, Role] | None:
        for uri in cert.uris:
            if uri in self.spiffe_ids:
                return self.spiffe_ids[uri]
        return self.subjects.get(cert.subject) if cert.subject else None


EMPTY = Credentials({}, {}, {})


def _parse_subject(text: str) -> SubjectKey | None:
    # As written (RFC 4514), or as openssl prints it by default ("CN = alice, O = ops").
    for candidate in (text, re.sub(r"\s*([,=+])\s*", r"\1", text)):
        try:
            return subject_key(x509.Name.from_rfc4514_string(candidate))
        except ValueError:
            continue
    return None


def parse_credentials(text: str, source: str = "tokens") -> Credentials:
    tokens: dict[bytes, tuple[str, Role]] = {}
    spiffe_ids: dict[str, tuple[str, Role]] = {}
    subjects: dict[SubjectKey, tuple[str, Role]] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        # A subject may hold spaces: the name and the role are always the last two fields.
        parts = line.rsplit(None, 2) if line.startswith(SUBJECT_PREFIX) else line.split()
        if len(parts) != 3:
            raise TokenFileError(f"{source}:{n}: expected '<token> <name> <viewer|operator|admin>'")
        credential, name, role = parts
        try:
            r = Role[role.upper()]
        except KeyError:
            raise TokenFileError(f"{source}:{n}: role {role!r} is not viewer, operator or admin") from None
        if credential.startswith(SPIFFE_PREFIX):
            if len(credential) == len(SPIFFE_PREFIX) or credential[len(SPIFFE_PREFIX)] == "/":
                raise TokenFileError(f"{source}:{n}: {credential!r} has no trust domain (spiffe://<td>/...)")
            if credential in spiffe_ids:
                raise TokenFileError(f"{source}:{n}: {credential} is given twice")
            spiffe_ids[credential] = (name, r)
            continue
        if credential.startswith(SUBJECT_PREFIX):
            text_subject = credential[len(SUBJECT_PREFIX):].strip()
            key = _parse_subject(text_subject)
            if key is None:
                raise TokenFileError(f"{source}:{n}: subject {text_subject!r} is not an RFC 4514 name "
                                     "like CN=alice,O=ops")
            if not key:
                raise TokenFileError(f"{source}:{n}: the subject of {name!r} is empty")
            if key in subjects:
                raise TokenFileError(f"{source}:{n}: the subject of {name!r} is given twice")
            subjects[key] = (name, r)
            continue
        if len(credential) < 16:
            raise TokenFileError(f"{source}:{n}: token of {name!r} is shorter than 16 characters")
        d = _digest(credential)
        if d in tokens:
            raise TokenFileError(f"{source}:{n}: the token of {name!r} is used twice")
        tokens[d] = (name, r)
    return Credentials(tokens, spiffe_ids, subjects)


def parse_tokens(text: str, source: str = "tokens") -> dict[bytes, tuple[str, Role]]:
    """The bearer tokens of a tokens file (its certificate identities: :func:`parse_credentials`)."""
    return parse_credentials(text, source).tokens


class TokenFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._tokens: Credentials = EMPTY
        self._load(initial=True)

    def _load(self, initial: bool = False) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as f:
                tokens = parse_credentials(f.read(), self.path)
        except FileNotFoundError:
            if initial:
                raise TokenFileError(f"{self.path}: No such file or directory") from None
            if self._tokens or self._stamp is not None:  # removing the file revokes every token
                log.error("admin tokens: %s is gone; every token is refused until it is back", self.path)
            self._stamp, self._tokens = None, EMPTY
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
        return self._tokens.tokens.get(_digest(token))

    def lookup_certificate(self, cert: PeerCertificate) -> tuple[str, Role] | None:
        self._load()
        return self._tokens.certificate(cert)


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

    def check(self, metadata: tuple | list | None, needed: Role, peer: str = "",
              certificate: PeerCertificate | None = None) -> Caller:
        """The caller, or :class:`Denied` with UNAUTHENTICATED or PERMISSION_DENIED. ``certificate``:
        the client certificate gRPC verified (mutual TLS), used when the call carries no token."""
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
        if not header and certificate is not None:
            found = self.tokens.lookup_certificate(certificate)
            if found is None:
                raise Denied(grpc.StatusCode.UNAUTHENTICATED,
                             f"no token, and the client certificate ({certificate.describe()}) is not in the "
                             "admin tokens file")
        elif not header:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED,
                         "no token: send 'authorization: Bearer <token>' (meshkeeper --token or MESHKEEPER_TOKEN)")
        elif scheme.lower() != "bearer" or not token.strip():
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "the authorization metadata must be 'Bearer <token>'")
        else:
            found = self.tokens.lookup(token.strip())
            if found is None:
                raise Denied(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        name, role = found
        if role < needed:
            raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                         f"{name} has the {role.label} role; this needs {needed.label}")
        return Caller(name, role, peer)
