"""Peer authentication and authorization records (DESIGN §14, docs/identity.md).

Znodes (paths: :class:`meshkeeper.registry.Paths`)::

    /meshkeeper/<ns>/peer_authentication                 persistent  PeerAuthentication (namespace)
    /meshkeeper/<ns>/services/<svc>/peer_authentication  persistent  PeerAuthentication (service; wins)
    /meshkeeper/<ns>/services/<svc>/authz                persistent  AuthzPolicy

Records are frozen and hashable (the xDS cache keys per-node resources on them), validated once at
decode time; a payload that does not validate raises :class:`meshkeeper.registry.RecordError`
naming the field, and the control plane skips the znode, logs it once and counts it.

:class:`MeshIdentity` is the control plane's side of it: "there is a CA, and this is its trust
domain". Translation emits TLS only when it has one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from meshkeeper.identity import IdentityError, parse_spiffe_id, validate_trust_domain
from meshkeeper.registry import RecordError, _dump, _load, _refuse_unknown, validate_name

STRICT = "STRICT"
PERMISSIVE = "PERMISSIVE"
DISABLE = "DISABLE"
MODES = (STRICT, PERMISSIVE, DISABLE)
DEFAULT_MODE = PERMISSIVE

ALLOW = "ALLOW"
DENY = "DENY"
ACTIONS = (ALLOW, DENY)

NS_PREFIX = "ns:"  # ``from: ["ns:<ns>"]``: every identity of a namespace
MAX_RULES = 64
MAX_RULE_ITEMS = 64  # entries of each of a rule's from / methods / paths
MAX_PATH = 1024
_METHOD_RE = re.compile(r"^[A-Z][A-Z0-9_-]{0,31}$")
_PATH_RE = re.compile(r"^/[\x21-\x7e]*$")  # visible ASCII, no spaces, as in a request target


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    """``peer_authentication``: how a service's inbound side takes callers (Istio's
    PeerAuthentication ``mtls.mode``)."""

    mode: str = DEFAULT_MODE

    FIELDS = ("mode",)

    @classmethod
    def decode(cls, data: bytes | str | None) -> PeerAuthentication:
        kind = "peer_authentication"
        obj = _load(kind, data)
        _refuse_unknown(kind, obj, cls.FIELDS)
        if "mode" not in obj:
            raise RecordError(f"{kind}.mode: required, one of {', '.join(MODES)}")
        mode = obj["mode"]
        if mode not in MODES:
            raise RecordError(f"{kind}.mode: {mode!r} is not one of {', '.join(MODES)}")
        return cls(mode=mode)

    def encode(self) -> bytes:
        return _dump({"mode": self.mode})


def effective_mode(service: PeerAuthentication | None, namespace: PeerAuthentication | None) -> str:
    """The service's own record, else its namespace's, else PERMISSIVE."""
    if service is not None:
        return service.mode
    if namespace is not None:
        return namespace.mode
    return DEFAULT_MODE


@dataclass(frozen=True, slots=True)
class AuthzRule:
    """One rule: a request matches when each part present matches (``from``: any of the
    identities; ``methods``: any of them; ``paths``: any prefix). Empty tuple: the part is absent."""

    sources: tuple[str, ...] = ()  # "from" in JSON
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()

    FIELDS = ("from", "methods", "paths")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in (("from", self.sources), ("methods", self.methods), ("paths", self.paths)):
            if value:
                out[key] = list(value)
        return out


def _list(kind: str, value: Any) -> list:
    if not isinstance(value, list):
        raise RecordError(f"{kind}: expected a list, got {value!r}")
    if not value:
        raise RecordError(f"{kind}: empty (leave the field out to match everything)")
    if len(value) > MAX_RULE_ITEMS:
        raise RecordError(f"{kind}: {len(value)} entries, at most {MAX_RULE_ITEMS}")
    return value


def _source(kind: str, value: Any) -> str:
    if isinstance(value, str) and value.startswith(NS_PREFIX):
        try:
            validate_name("namespace", value[len(NS_PREFIX):])
        except RecordError as e:
            raise RecordError(f"{kind}: {e}") from None
        return value
    try:
        parse_spiffe_id(value)
    except IdentityError as e:
        raise RecordError(f"{kind}: {e} (or ns:<namespace>)") from None
    return value


def _method(kind: str, value: Any) -> str:
    if not isinstance(value, str) or not _METHOD_RE.match(value):
        raise RecordError(f"{kind}: {value!r} is not an upper-case method token (GET, POST, ...)")
    return value


def _path(kind: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_PATH or not _PATH_RE.match(value):
        raise RecordError(f"{kind}: {value!r} is not a path prefix (starts with '/', no spaces, "
                          f"at most {MAX_PATH} characters)")
    return value


def _rule(kind: str, obj: Any) -> AuthzRule:
    if not isinstance(obj, dict):
        raise RecordError(f"{kind}: expected an object, got {obj!r}")
    _refuse_unknown(kind, obj, AuthzRule.FIELDS)
    parts = {}
    for key, check in (("from", _source), ("methods", _method), ("paths", _path)):
        if key in obj:
            items = _list(f"{kind}.{key}", obj[key])
            parts[key] = tuple(dict.fromkeys(check(f"{kind}.{key}[{i}]", v) for i, v in enumerate(items)))
    return AuthzRule(sources=parts.get("from", ()), methods=parts.get("methods", ()), paths=parts.get("paths", ()))


@dataclass(frozen=True, slots=True)
class AuthzPolicy:
    """``services/<svc>/authz``: ALLOW (a request must match a rule) or DENY (a request that
    matches a rule is refused), Envoy's RBAC ``action``. ALLOW without rules refuses everything."""

    action: str
    rules: tuple[AuthzRule, ...] = ()

    FIELDS = ("action", "rules")

    @classmethod
    def decode(cls, data: bytes | str | None) -> AuthzPolicy:
        kind = "authz"
        obj = _load(kind, data)
        _refuse_unknown(kind, obj, cls.FIELDS)
        action = obj.get("action")
        if action not in ACTIONS:
            raise RecordError(f"{kind}.action: {action!r} is not one of {', '.join(ACTIONS)}")
        rules = obj.get("rules", [])
        if not isinstance(rules, list):
            raise RecordError(f"{kind}.rules: expected a list, got {rules!r}")
        if len(rules) > MAX_RULES:
            raise RecordError(f"{kind}.rules: {len(rules)} rules, at most {MAX_RULES}")
        return cls(action=action, rules=tuple(_rule(f"{kind}.rules[{i}]", r) for i, r in enumerate(rules)))

    def encode(self) -> bytes:
        return _dump({"action": self.action, "rules": [r.to_json() for r in self.rules]})


@dataclass(frozen=True, slots=True)
class MeshIdentity:
    """The control plane has a CA for ``trust_domain``: translation emits mTLS (docs/identity.md).
    None in its place means no CA: plaintext, today's resources."""

    trust_domain: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
