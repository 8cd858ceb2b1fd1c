"""Fuzzing the decoders of ZooKeeper payloads (issue 16): registry records (meshkeeper/registry.py),
peer authentication and authz (meshkeeper/security.py),
traffic policies (meshkeeper/policy.py) and alert rules (controlplane/alerts/rule.py).

Whatever a znode holds (arbitrary bytes, any JSON value, a valid record with one field set to any
JSON value or one field added), a decoder returns a record or raises its module's error
(RecordError, PolicyError, AlertRuleError) with a message that starts with the record's name and
names the field when one field was at fault; never another exception, which would stop
the watch that reads the znode.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from controlplane.alerts.rule import AlertRule, AlertRuleError
from meshkeeper.policy import PolicyError, decode_policy
from meshkeeper.registry import (
    InstanceRecord,
    Override,
    RecordError,
    RuntimeValues,
    ServiceRecord,
    VipClaim,
    VipRecord,
)
from meshkeeper.security import AuthzPolicy, PeerAuthentication
from tests.support.fuzz import fuzz_settings

# name: (decode, the errors it may raise, the prefix of their messages, a valid payload)
DECODERS: dict[str, tuple[Callable[[Any], Any], type[Exception], str, dict[str, Any]]] = {
    "instance": (InstanceRecord.decode, RecordError, "instance", {
        "address": "10.0.0.7", "port": 8080, "weight": 3, "labels": {"version": "v2", "zone": "a"},
        "protocol": "grpc", "app_port": 9090}),
    "service": (ServiceRecord.decode, RecordError, "service", {"protocol": "tcp"}),
    "override": (Override.decode, RecordError, "override", {"weight": 0, "enabled": False}),
    "config": (RuntimeValues.decode, RecordError, "config", {"feature.enabled": "true", "color": "blue"}),
    "vip": (VipRecord.decode, RecordError, "vip", {"address": "10.96.0.5"}),
    "vip claim": (VipClaim.decode, RecordError, "", {"namespace": "shop", "service": "catalog"}),
    "policy": (decode_policy, PolicyError, "policy", {
        "lb": {"policy": "ring_hash", "hash_on": "header:x-user"},
        "outlier": {"consecutive_5xx": 3, "base_ejection_ms": 1000, "max_ejection_ms": 5000},
        "retry": {"attempts": 2, "on": ["5xx", "reset"]}, "timeout_ms": 2000,
        "split": {"v1": 90, "v2": 10}, "match": [{"header": "x-canary", "equals": "1", "subset": "v2"}],
        "fault": {"abort_percent": 5, "abort_status": 503}, "tracing": {"sample_percent": 10},
        "egress": ["catalog", "*"], "rate_limit": {"rps": 10, "burst": 20},
        "circuit_breaker": {"max_requests": 100, "retry_budget": {"percent": 25}}}),
    "alert": (AlertRule.decode, AlertRuleError, "alert", {
        "service": "catalog", "condition": "error_ratio", "threshold": 0.05, "for": "1m",
        "severity": "critical", "min_rps": 1, "summary": "errors", "webhooks": ["http://hook.example/x"]}),
    "peer_authentication": (PeerAuthentication.decode, RecordError, "peer_authentication", {"mode": "STRICT"}),
    "authz": (AuthzPolicy.decode, RecordError, "authz", {"action": "ALLOW", "rules": [
        {"from": ["spiffe://meshkeeper.local/ns/default/sa/web", "ns:prod"], "methods": ["GET"], "paths": ["/api"]}]}),
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**400)
    | st.floats() | st.text(max_size=20) | st.sampled_from(("http", "grpc", "10.0.0.1", "5xx", "v1", "1m", "*")),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


def _payloads(valid: dict[str, Any]) -> st.SearchStrategy[tuple[bytes, str | None]]:
    """(payload, the field at fault or None): bytes, JSON values, and the valid record with one
    field (top level or nested one level) set to any JSON value, or one unknown field added."""
    def one_field(draw: st.DrawFn) -> tuple[bytes, str | None]:
        record = json.loads(json.dumps(valid))
        name = draw(st.sampled_from(sorted(record) + ["unknown_field"]))
        target, where = record, name
        if isinstance(record.get(name), dict) and record[name] and draw(st.booleans()):
            inner = draw(st.sampled_from(sorted(record[name])))
            target, where = record[name], inner
        target[where] = draw(json_values)
        return json.dumps(record).encode(), where

    return st.one_of(
        st.binary(max_size=64).map(lambda b: (b, None)),
        json_values.map(lambda v: (json.dumps(v).encode(), None)),
        st.composite(one_field)(),
        st.composite(one_field)(),
    )


def check_decoder(name: str, payload: bytes, at_fault: str | None) -> None:
    decode, error, prefix, _ = DECODERS[name]
    try:
        decode(payload)
    except error as exc:
        message = str(exc)  # (a field name from the payload may bring a line break in)
        assert message, f"{name}: an empty message"
        assert message.startswith(prefix), f"{name}: {message!r} does not name the record"
        if at_fault is not None and at_fault.isidentifier() and "JSON" not in message:
            assert at_fault in message, f"{name}: {message!r} does not name the field {at_fault!r}"


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_the_valid_payloads_decode(name: str) -> None:
    decode, _, _, valid = DECODERS[name]
    decode(json.dumps(valid).encode())


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_any_payload_decodes_or_is_refused_naming_its_field(name: str) -> None:
    @fuzz_settings(200)
    @given(case=_payloads(DECODERS[name][3]))
    @example(case=(b"[" * 100_000, None))  # nesting deeper than the JSON parser recurses
    # Found by fuzzing (each raised another exception): an infinite or huge threshold, a condition
    # that is a list (unhashable), a huge integer duration.
    @example(case=(b'{"threshold": 1e999, "condition": "nacks", "service": "a"}', None))
    @example(case=(b'{"threshold": 1' + b"0" * 400 + b', "condition": "nacks", "service": "a"}', None))
    @example(case=(b'{"threshold": 1, "condition": [], "service": "a"}', None))
    @example(case=(b'{"threshold": 1, "condition": "nacks", "service": "a", "for": 1' + b"0" * 400 + b"}", None))
    def run(case: tuple[bytes, str | None]) -> None:
        check_decoder(name, *case)

    run()
