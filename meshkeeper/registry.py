"""The ZooKeeper registry layout (DESIGN §3): paths and records.

Records are frozen dataclasses validated once, at decode time. A record that does not validate
raises :class:`RecordError` with a message that names the field; callers skip the znode, log it
once and count it. Nothing here touches the network.

Layout under ``/meshkeeper/<ns>``::

    services/<svc>                         persistent  ServiceRecord
    services/<svc>/instances/<host>:<port> EPHEMERAL   InstanceRecord
    services/<svc>/overrides/<host>:<port> persistent  Override
    services/<svc>/policy                  persistent  traffic policy
    services/<svc>/peer_authentication     persistent  PeerAuthentication (meshkeeper.security)
    services/<svc>/authz                   persistent  AuthzPolicy (meshkeeper.security)
    peer_authentication                    persistent  PeerAuthentication of the namespace
    config/<svc>                           persistent  runtime config
    vips/<svc>                             persistent  VipRecord: the service's virtual IP (DESIGN §10)

and, for the whole mesh, ``/meshkeeper/_vips/<ip>`` (persistent, :class:`VipClaim`): which service
holds a virtual IP, created in one transaction with ``<ns>/vips/<svc>`` so that two control planes
can never give one address to two services. Names under the root that start with ``_`` are not
namespaces (a namespace is a DNS label, which cannot start with ``_``).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

ROOT = "/meshkeeper"
VIP_CLAIMS = f"{ROOT}/_vips"  # mesh-wide: one child per virtual IP in use
DEFAULT_NAMESPACE = "default"
DEFAULT_WEIGHT = 10
MAX_WEIGHT = 10_000
PROTOCOLS = ("http", "tcp", "grpc")

# DNS-label-like names: they end up in xDS resource names and virtual-host domains.
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
# Runtime config keys: Envoy runtime style (``feature.enabled``, ``color``).
_CONFIG_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
MAX_CONFIG_VALUE = 16 * 1024  # characters per value
MAX_CONFIG_KEYS = 1024
MAX_CONFIG_BYTES = 512 * 1024  # the encoded znode; ZooKeeper refuses payloads over 1 MiB by default


class RecordError(ValueError):
    """A znode payload or name that does not follow the registry layout."""


def validate_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RecordError(f"{kind} {name!r}: must be a lowercase DNS label (a-z, 0-9, '-', at most 63)")
    return name


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True, slots=True)
class Paths:
    """Znode paths of one namespace."""

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        validate_name("namespace", self.namespace)

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.namespace}"

    @property
    def services(self) -> str:
        return f"{self.base}/services"

    def service(self, svc: str) -> str:
        return f"{self.services}/{svc}"

    def instances(self, svc: str) -> str:
        return f"{self.service(svc)}/instances"

    def instance(self, svc: str, key: str) -> str:
        return f"{self.instances(svc)}/{key}"

    def overrides(self, svc: str) -> str:
        return f"{self.service(svc)}/overrides"

    def override(self, svc: str, key: str) -> str:
        return f"{self.overrides(svc)}/{key}"

    def policy(self, svc: str) -> str:
        return f"{self.service(svc)}/policy"

    def peer_authentication(self, svc: str | None = None) -> str:
        """The service's peer authentication; with no service, the namespace's (DESIGN §14)."""
        return f"{self.base if svc is None else self.service(svc)}/peer_authentication"

    def authz(self, svc: str) -> str:
        return f"{self.service(svc)}/authz"

    @property
    def configs(self) -> str:
        return f"{self.base}/config"

    def config(self, svc: str) -> str:
        return f"{self.configs}/{svc}"

    @property
    def vips(self) -> str:
        return f"{self.base}/vips"

    @property
    def alerts(self) -> str:
        return f"{self.base}/alerts"

    def alert(self, name: str) -> str:
        """An alert rule (controlplane.alerts.rule); its state is elsewhere (controlplane.alerts.state)."""
        return f"{self.alerts}/{name}"

    def vip(self, svc: str) -> str:
        return f"{self.vips}/{svc}"


def vip_claim(address: str) -> str:
    """The mesh-wide claim of one virtual IP: ``/meshkeeper/_vips/<ip>``."""
    return f"{VIP_CLAIMS}/{address}"


def is_reserved_root_child(name: str) -> bool:
    """Children of the root that are not namespaces (``_vips``)."""
    return name.startswith("_")


def endpoint_key(address: str, port: int) -> str:
    """The znode name of an instance or override: ``<host>:<port>``."""
    return f"{address}:{port}"


def parse_endpoint_key(key: str) -> tuple[str, int]:
    host, sep, port = key.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RecordError(f"endpoint {key!r}: expected <host>:<port>")
    return host, int(port)


# --------------------------------------------------------------------------- codec helpers


def _load(kind: str, data: bytes | str | None) -> dict[str, Any]:
    if data is None or data == b"" or data == "":
        return {}
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # (nested past the parser's depth)
        raise RecordError(f"{kind}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise RecordError(f"{kind}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _refuse_unknown(kind: str, obj: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise RecordError(f"{kind}: unknown field {unknown[0]!r} (known: {', '.join(known)})")


def _int(kind: str, fieldname: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(f"{kind}.{fieldname}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise RecordError(f"{kind}.{fieldname}: {value} is outside {lo}..{hi}")
    return value


def _bool(kind: str, fieldname: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RecordError(f"{kind}.{fieldname}: expected true or false, got {value!r}")
    return value


def _protocol(kind: str, value: Any) -> str:
    if value not in PROTOCOLS:
        raise RecordError(f"{kind}.protocol: {value!r} is not one of {', '.join(PROTOCOLS)}")
    return value


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    """``services/<svc>``: what kind of traffic the service speaks."""

    protocol: str = "http"

    FIELDS = ("protocol",)

    @classmethod
    def decode(cls, data: bytes | str | None) -> ServiceRecord:
        obj = _load("service", data)
        _refuse_unknown("service", obj, cls.FIELDS)
        return cls(protocol=_protocol("service", obj.get("protocol", "http")))

    def encode(self) -> bytes:
        return _dump({"protocol": self.protocol})


def _frozen_labels(labels: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted(labels.items())))


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """``instances/<host>:<port>``: one registered instance, written by its sidecar."""

    address: str
    port: int
    weight: int = DEFAULT_WEIGHT
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    protocol: str = "http"
    app_port: int = 0
    mtls: bool = False  # its sidecar has an identity and takes mTLS (docs/identity.md)

    FIELDS = ("address", "port", "weight", "labels", "protocol", "app_port", "mtls")

    def __post_init__(self) -> None:
        if not isinstance(self.labels, MappingProxyType):
            object.__setattr__(self, "labels", _frozen_labels(self.labels))

    @property
    def key(self) -> str:
        return endpoint_key(self.address, self.port)

    @property
    def version(self) -> str:
        return self.labels.get("version", "")

    @property
    def zone(self) -> str:
        return self.labels.get("zone", "")

    @classmethod
    def decode(cls, data: bytes | str | None) -> InstanceRecord:
        kind = "instance"
        obj = _load(kind, data)
        _refuse_unknown(kind, obj, cls.FIELDS)
        address = obj.get("address")
        if not isinstance(address, str) or not address or len(address) > 253 or any(c.isspace() for c in address):
            raise RecordError(f"{kind}.address: expected a host name or IP, got {address!r}")
        labels = obj.get("labels", {})
        if not isinstance(labels, dict):
            raise RecordError(f"{kind}.labels: expected an object of strings")
        for k, v in labels.items():
            if not _LABEL_KEY_RE.match(k) or not isinstance(v, str) or len(v) > 63:
                raise RecordError(f"{kind}.labels: bad label {k!r}={v!r}")
        return cls(
            address=address,
            port=_int(kind, "port", obj.get("port"), 1, 65535),
            weight=_int(kind, "weight", obj.get("weight", DEFAULT_WEIGHT), 0, MAX_WEIGHT),
            labels=labels,
            protocol=_protocol(kind, obj.get("protocol", "http")),
            app_port=_int(kind, "app_port", obj.get("app_port", 0), 0, 65535),
            mtls=_bool(kind, "mtls", obj.get("mtls", False)),
        )

    def encode(self) -> bytes:
        d = {f: getattr(self, f) for f in self.FIELDS}
        d["labels"] = dict(self.labels)
        if not self.mtls:  # left out, so that a record without identity reads as before
            del d["mtls"]
        return _dump(d)


@dataclass(frozen=True, slots=True)
class Override:
    """``overrides/<host>:<port>``: an operator's switch for one endpoint; it outlives the instance.

    ``None`` means "not overridden": the registered weight applies and the endpoint is enabled.
    """

    weight: int | None = None
    enabled: bool | None = None

    FIELDS = ("weight", "enabled")

    @classmethod
    def decode(cls, data: bytes | str | None) -> Override:
        kind = "override"
        obj = _load(kind, data)
        _refuse_unknown(kind, obj, cls.FIELDS)
        weight = obj.get("weight")
        if weight is not None:
            weight = _int(kind, "weight", weight, 0, MAX_WEIGHT)
        enabled = obj.get("enabled")
        if enabled is not None and not isinstance(enabled, bool):
            raise RecordError(f"{kind}.enabled: expected true or false, got {enabled!r}")
        return cls(weight=weight, enabled=enabled)

    def encode(self) -> bytes:
        return _dump({k: v for k, v in (("weight", self.weight), ("enabled", self.enabled)) if v is not None})


def effective_weight(instance: InstanceRecord, override: Override | None) -> int:
    """The weight that balancing uses: the override's when set, else the registered one."""
    if override is not None and override.weight is not None:
        return override.weight
    return instance.weight


def is_serving(instance: InstanceRecord, override: Override | None) -> bool:
    """Whether the endpoint takes new requests: enabled and with a weight above zero."""
    if override is not None and override.enabled is False:
        return False
    return effective_weight(instance, override) > 0


@dataclass(frozen=True, slots=True)
class RuntimeValues:
    """``config/<svc>``: the service's runtime config, string keys to string values. It is pushed
    to the service's sidecars as an RTDS ``Runtime`` layer and served to the app at ``/runtime``."""

    values: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not isinstance(self.values, MappingProxyType):
            object.__setattr__(self, "values", MappingProxyType(dict(sorted(self.values.items()))))

    @staticmethod
    def check(key: Any, value: Any) -> None:
        kind = "config"
        if not isinstance(key, str) or not _CONFIG_KEY_RE.match(key):
            raise RecordError(f"{kind}: bad key {key!r} (letters, digits, '_', '.', '-'; at most 128)")
        if not isinstance(value, str):
            raise RecordError(f"{kind}.{key}: expected a string, got {value!r}")
        if len(value) > MAX_CONFIG_VALUE:
            raise RecordError(f"{kind}.{key}: value longer than {MAX_CONFIG_VALUE} characters")

    @classmethod
    def decode(cls, data: bytes | str | None) -> RuntimeValues:
        if data is not None and len(data) > MAX_CONFIG_BYTES:
            raise RecordError(f"config: {len(data)} bytes, at most {MAX_CONFIG_BYTES}")
        obj = _load("config", data)
        if len(obj) > MAX_CONFIG_KEYS:
            raise RecordError(f"config: {len(obj)} keys, at most {MAX_CONFIG_KEYS}")
        for k, v in obj.items():
            cls.check(k, v)
        return cls(values=obj)

    def encode(self) -> bytes:
        return _dump(dict(self.values))


def _ipv4(kind: str, value: Any) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise RecordError(f"{kind}.address: expected an IPv4 address, got {value!r}") from None


@dataclass(frozen=True, slots=True)
class VipRecord:
    """``vips/<svc>``: the virtual IP that the mesh DNS answers for the service and that the
    sidecars' outbound listeners match the original destination against (DESIGN §10). Allocated by
    the control plane, never by hand; released when the service znode is deleted."""

    address: str

    FIELDS = ("address",)

    @classmethod
    def decode(cls, data: bytes | str | None) -> VipRecord:
        obj = _load("vip", data)
        _refuse_unknown("vip", obj, cls.FIELDS)
        return cls(address=_ipv4("vip", obj.get("address")))

    def encode(self) -> bytes:
        return _dump({"address": self.address})


@dataclass(frozen=True, slots=True)
class VipClaim:
    """``/meshkeeper/_vips/<ip>``: the service holding that virtual IP, mesh-wide."""

    namespace: str
    service: str

    FIELDS = ("namespace", "service")

    @classmethod
    def decode(cls, data: bytes | str | None) -> VipClaim:
        obj = _load("vip claim", data)
        _refuse_unknown("vip claim", obj, cls.FIELDS)
        return cls(namespace=validate_name("namespace", obj.get("namespace")),
                   service=validate_name("service", obj.get("service")))

    def encode(self) -> bytes:
        return _dump({"namespace": self.namespace, "service": self.service})
