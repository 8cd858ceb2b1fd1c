"""The traffic policy of a service (``services/<svc>/policy``, DESIGN §3).

Every field is optional and defaults to Envoy's default (or Istio's where DESIGN says so: retry
``attempts`` counts retries after the first try). Unknown fields are refused, not ignored, so a
typo never silently disables a protection. :func:`decode_policy` raises :class:`PolicyError`
whose message names the offending field (``policy.outlier.max_ejection_percent: ...``).

The control plane validates a policy once, here, and translates the resulting frozen object to
Envoy's Cluster and Route fields; an invalid policy is refused and the last valid one stays.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, get_type_hints

from meshkeeper.registry import RecordError, validate_name

LB_POLICIES = ("round_robin", "least_request", "random", "ring_hash", "maglev")
RETRY_ON = ("5xx", "gateway-error", "connect-failure", "reset", "retriable-status-codes",
            "refused-stream", "retriable-4xx",
            "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable")  # gRPC statuses
_HASH_ON_RE = re.compile(r"^(header:[A-Za-z0-9-]+|cookie:[A-Za-z0-9_-]+|source_ip)$")
_MAX_MS = 24 * 3600 * 1000
# Istio's default for DestinationRule connectionPool.http.maxRetries (uint32's largest): no cap.
UNCAPPED_RETRIES = 2**32 - 1
_HEADER_RE = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")  # a lower-case header name (an HTTP token)
# Request headers a route cannot match on: the sidecar consumes them instead of forwarding them
# (Host routes by domain; hop-by-hop headers; trace and request-id headers). A match on one would be
# NACKed with the whole route configuration, so the policy refuses it first.
UNMATCHABLE_HEADERS = frozenset((
    "host", "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "expect", "x-request-id", "traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid",
    "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags"))
_SUBSET_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")  # a version label value


class PolicyError(ValueError):
    """A policy that does not validate; the message names the field."""


def _bounds(lo: int, hi: int) -> dict[str, Any]:
    return {"bounds": (lo, hi)}


def _int_field(default: int, lo: int, hi: int) -> Any:
    return field(default=default, metadata=_bounds(lo, hi))


@dataclass(frozen=True, slots=True)
class LoadBalancing:
    policy: str = "round_robin"
    hash_on: str = ""  # "header:<name>", "cookie:<name>" or "source_ip"; for ring_hash/maglev


@dataclass(frozen=True, slots=True)
class SuccessRate:
    minimum_hosts: int = _int_field(5, 1, 10_000)
    request_volume: int = _int_field(100, 1, 1_000_000)
    stdev_factor: int = _int_field(1900, 1, 100_000)  # thousandths, as Envoy
    enforcing_percent: int = _int_field(100, 0, 100)


@dataclass(frozen=True, slots=True)
class FailurePercentage:
    threshold: int = _int_field(85, 0, 100)
    minimum_hosts: int = _int_field(5, 1, 10_000)
    request_volume: int = _int_field(50, 1, 1_000_000)
    enforcing_percent: int = _int_field(0, 0, 100)  # Envoy enforces failure percentage 0% by default


@dataclass(frozen=True, slots=True)
class Outlier:
    consecutive_5xx: int = _int_field(5, 0, 1_000_000)
    consecutive_gateway_failure: int = _int_field(5, 0, 1_000_000)
    consecutive_local_origin_failure: int = _int_field(5, 0, 1_000_000)
    interval_ms: int = _int_field(10_000, 1, _MAX_MS)
    base_ejection_ms: int = _int_field(30_000, 1, _MAX_MS)
    max_ejection_ms: int = _int_field(300_000, 1, _MAX_MS)
    max_ejection_percent: int = _int_field(10, 0, 100)
    success_rate: SuccessRate | None = None
    failure_percentage: FailurePercentage | None = None


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """Envoy's ``circuit_breakers.thresholds.retry_budget``: active retries may be at most
    ``percent`` of the cluster's active plus pending requests, but ``min_concurrency`` at least."""

    percent: int = _int_field(20, 1, 100)  # Envoy's budget_percent default
    min_concurrency: int = _int_field(3, 0, 10_000_000)  # Envoy's min_retry_concurrency default


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """Envoy's DEFAULT-priority thresholds, with Istio's default for retries: concurrent retries are
    not capped (``max_retries`` 2^32-1, as DestinationRule's ``connectionPool.http.maxRetries``), the
    route's ``retry.attempts`` bounds the amplification. Envoy's own default (3 retries at once per
    cluster, or a budget of 20%/min 3) refuses retries exactly when an instance dies: the retries
    waiting out their back-off count against a budget that the requests in flight size
    (bench/RESULTS.md, "The retry budget"). A ``retry_budget`` is opt-in; Envoy lets it override
    ``max_retries``, so a policy may set only one of them."""

    max_connections: int = _int_field(1024, 1, 10_000_000)
    max_pending: int = _int_field(1024, 1, 10_000_000)
    max_requests: int = _int_field(1024, 1, 10_000_000)
    max_retries: int = _int_field(UNCAPPED_RETRIES, 0, UNCAPPED_RETRIES)
    retry_budget: RetryBudget | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    attempts: int = _int_field(2, 0, 100)
    on: tuple[str, ...] = ("5xx", "gateway-error", "connect-failure", "reset")
    per_try_timeout_ms: int = _int_field(0, 0, _MAX_MS)
    retriable_status_codes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class RateLimit:
    rps: int = _int_field(0, 0, 10_000_000)  # 0: no limit
    burst: int = _int_field(0, 0, 10_000_000)


@dataclass(frozen=True, slots=True)
class Match:
    header: str = ""
    equals: str = ""
    subset: str = ""


@dataclass(frozen=True, slots=True)
class Fault:
    delay_ms: int = _int_field(0, 0, _MAX_MS)
    delay_percent: int = _int_field(0, 0, 100)
    abort_status: int = _int_field(0, 0, 599)
    abort_percent: int = _int_field(0, 0, 100)


@dataclass(frozen=True, slots=True)
class Tracing:
    # Share of NEW traces (requests arriving without a sampling decision) that are sampled, in
    # percent; requests with a sampled or unsampled parent follow it (parent-based sampling).
    # Translated into the HCM's tracing.random_sampling of the service's sidecars.
    sample_percent: float = field(default=1.0, metadata=_bounds(0, 100))


@dataclass(frozen=True, slots=True)
class Policy:
    lb: LoadBalancing = LoadBalancing()
    outlier: Outlier | None = None  # None: no outlier detection (Envoy's default)
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    retry: Retry | None = None  # None: no retries (Envoy's default for a route)
    timeout_ms: int = _int_field(15_000, 0, _MAX_MS)  # 0 disables the route timeout
    connect_timeout_ms: int = _int_field(1_000, 1, _MAX_MS)
    panic_threshold_percent: int = _int_field(50, 0, 100)
    rate_limit: RateLimit = RateLimit()
    split: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    match: tuple[Match, ...] = ()
    fault: Fault = Fault()
    tracing: Tracing | None = None  # None: the sidecar's --trace-sample-ratio applies
    # The services of the namespace this service's sidecars may call (Istio's Sidecar egress
    # hosts): ["*"] is all of them; otherwise they are scoped (a sidecar's --egress wins).
    egress: tuple[str, ...] = ("*",)

    def __hash__(self) -> int:
        # ``split`` is a read-only mapping, which does not hash: hash its items, so that a policy
        # can key a cache (the control plane memoises per-node resources by node and policy).
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, Mapping) else v for v in values))


DEFAULT_POLICY = Policy()


# --------------------------------------------------------------------------- decoding


def _decode_obj(cls: type, obj: Any, path: str) -> Any:
    if not isinstance(obj, dict):
        raise PolicyError(f"{path}: expected an object, got {type(obj).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise PolicyError(f"{path}.{unknown[0]}: unknown field (known: {', '.join(fields)})")
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in obj.items():
        kwargs[name] = _decode_value(hints[name], fields[name], value, f"{path}.{name}")
    return cls(**kwargs)


def _int(value: Any, path: str, bounds: tuple[int, int] | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{path}: expected an integer, got {value!r}")
    if bounds and not bounds[0] <= value <= bounds[1]:
        raise PolicyError(f"{path}: {value} is outside {bounds[0]}..{bounds[1]}")
    return value


def _decode_value(hint: Any, f: dataclasses.Field, value: Any, path: str) -> Any:
    bounds = f.metadata.get("bounds")
    origin = getattr(hint, "__origin__", None)
    args = getattr(hint, "__args__", ())
    if hint is int:
        return _int(value, path, bounds)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise PolicyError(f"{path}: expected a number, got {value!r}")
        if bounds and not bounds[0] <= value <= bounds[1]:
            raise PolicyError(f"{path}: {value} is outside {bounds[0]}..{bounds[1]}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise PolicyError(f"{path}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _decode_obj(hint, value, path)
    if args and type(None) in args:  # X | None
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _decode_obj(inner, value, path)
    if origin is tuple:
        if not isinstance(value, list):
            raise PolicyError(f"{path}: expected a list, got {value!r}")
        inner = args[0]
        out = []
        for i, item in enumerate(value):
            p = f"{path}[{i}]"
            out.append(_decode_obj(inner, item, p) if dataclasses.is_dataclass(inner)
                       else _int(item, p, (100, 599)) if inner is int
                       else _decode_value(inner, f, item, p))
        return tuple(out)
    if origin is collections.abc.Mapping:
        if not isinstance(value, dict):
            raise PolicyError(f"{path}: expected an object, got {value!r}")
        return MappingProxyType({str(k): _int(v, f"{path}.{k}", (0, 100)) for k, v in value.items()})
    raise PolicyError(f"{path}: unsupported value {value!r}")  # pragma: no cover - schema bug


def _check(p: Policy) -> None:
    if p.lb.policy not in LB_POLICIES:
        raise PolicyError(f"policy.lb.policy: {p.lb.policy!r} is not one of {', '.join(LB_POLICIES)}")
    if p.lb.hash_on and not _HASH_ON_RE.match(p.lb.hash_on):
        raise PolicyError(f"policy.lb.hash_on: {p.lb.hash_on!r}: expected header:<name>, cookie:<name> or source_ip")
    if p.retry is not None:
        for i, cond in enumerate(p.retry.on):
            if cond not in RETRY_ON:
                raise PolicyError(f"policy.retry.on[{i}]: {cond!r} is not one of {', '.join(RETRY_ON)}")
    if p.outlier is not None and p.outlier.max_ejection_ms < p.outlier.base_ejection_ms:
        raise PolicyError("policy.outlier.max_ejection_ms: must be at least base_ejection_ms")
    for subset, weight in p.split.items():
        if not _SUBSET_RE.match(subset):
            raise PolicyError(f"policy.split: {subset!r} is not a version label (letters, digits, '.', '_', '-')")
        if not 0 <= weight <= 100:
            raise PolicyError(f"policy.split.{subset}: {weight} is outside 0..100")
    if p.split and sum(p.split.values()) != 100:
        raise PolicyError(f"policy.split: weights must add up to 100, they add up to {sum(p.split.values())}")
    for i, m in enumerate(p.match):
        if not m.header or not m.subset:
            raise PolicyError(f"policy.match[{i}]: header and subset are required")
        if not _HEADER_RE.match(m.header):
            raise PolicyError(f"policy.match[{i}].header: {m.header!r} is not a lower-case header name")
        if m.header in UNMATCHABLE_HEADERS:
            raise PolicyError(f"policy.match[{i}].header: {m.header!r} cannot be matched (the sidecar consumes it)")
        if not _SUBSET_RE.match(m.subset):
            raise PolicyError(f"policy.match[{i}].subset: {m.subset!r} is not a version label")
    if p.fault.abort_percent and not 200 <= p.fault.abort_status <= 599:
        raise PolicyError("policy.fault.abort_status: must be an HTTP status 200..599 when abort_percent is set")
    if p.fault.delay_percent and not p.fault.delay_ms:
        raise PolicyError("policy.fault.delay_ms: must be positive when delay_percent is set")
    for i, name in enumerate(p.egress):
        if name != "*":
            try:
                validate_name("service", name)
            except RecordError as exc:
                raise PolicyError(f"policy.egress[{i}]: {exc}, or '*'") from None
    cb = p.circuit_breaker
    if cb.retry_budget is not None and cb.max_retries != DEFAULT_POLICY.circuit_breaker.max_retries:
        raise PolicyError("policy.circuit_breaker.max_retries: has no effect while retry_budget is set "
                          "(a retry budget overrides max_retries); set retry_budget to null to use it")


def decode_policy(data: bytes | str | Mapping[str, Any] | None) -> Policy:
    """Parse and validate a policy; empty data means the default policy."""
    if data is None or data in (b"", ""):
        return DEFAULT_POLICY
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # (nested past the parser's depth)
            raise PolicyError(f"policy: not valid JSON ({exc})") from None
    policy = _decode_obj(Policy, data, "policy")
    _check(policy)
    return policy


def encode_policy(policy: Policy) -> bytes:
    """The policy as JSON, listing only the fields that differ from the defaults."""

    def diff(obj: Any, default: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            base = default if default is not None else type(obj)()
            out = {}
            for f in dataclasses.fields(obj):
                v, dv = getattr(obj, f.name), getattr(base, f.name)
                if v != dv:
                    out[f.name] = diff(v, dv) if dataclasses.is_dataclass(v) else _plain(v)
            return out
        return _plain(obj)

    return json.dumps(diff(policy, DEFAULT_POLICY), sort_keys=True).encode()


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return dict(v)
    if isinstance(v, tuple):
        return [dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x for x in v]
    return v
