"""The traffic policy schema: Envoy's defaults, refusals that name the field, a stable encoding."""

import pytest

from meshkeeper.policy import DEFAULT_POLICY, PolicyError, decode_policy, encode_policy


def test_empty_policy_is_envoys_defaults():
    p = decode_policy(b"")
    assert p is DEFAULT_POLICY
    assert (p.lb.policy, p.timeout_ms, p.connect_timeout_ms, p.panic_threshold_percent) == ("round_robin", 15000, 1000, 50)
    assert (p.circuit_breaker.max_connections, p.circuit_breaker.max_retries) == (1024, 3)
    assert p.outlier is None and p.retry is None


def test_sections_take_their_defaults():
    p = decode_policy({"outlier": {"consecutive_5xx": 3}, "retry": {}})
    assert (p.outlier.consecutive_5xx, p.outlier.base_ejection_ms, p.outlier.max_ejection_percent) == (3, 30000, 10)
    assert p.retry.attempts == 2 and "connect-failure" in p.retry.on


@pytest.mark.parametrize("policy, message", [
    ({"lb": {"policy": "fastest"}}, "policy.lb.policy"),
    ({"timeout_ms": -1}, "policy.timeout_ms"),
    ({"outlier": {"max_ejection_percent": 101}}, "policy.outlier.max_ejection_percent"),
    ({"outlier": {"consecutive_5x": 1}}, "policy.outlier.consecutive_5x: unknown field"),
    ({"retry": {"on": ["6xx"]}}, r"policy.retry.on\[0\]"),
    ({"retry": {"attempts": "2"}}, "policy.retry.attempts"),
    ({"split": {"v1": 90}}, "policy.split"),
    ({"match": [{"header": "x-canary"}]}, r"policy.match\[0\]"),
    ({"fault": {"abort_percent": 10}}, "policy.fault.abort_status"),
    ({"lb": {"policy": "ring_hash", "hash_on": "body"}}, "policy.lb.hash_on"),
    ([], "expected an object"),
    (b"{", "not valid JSON"),
])
def test_invalid_policies_name_the_field(policy, message):
    with pytest.raises(PolicyError, match=message):
        decode_policy(policy)


def test_encoding_lists_only_what_differs_and_round_trips():
    p = decode_policy({"lb": {"policy": "least_request"}, "split": {"v1": 90, "v2": 10},
                       "match": [{"header": "x-canary", "equals": "1", "subset": "v2"}]})
    assert decode_policy(encode_policy(p)) == p
    assert encode_policy(DEFAULT_POLICY) == b"{}"
