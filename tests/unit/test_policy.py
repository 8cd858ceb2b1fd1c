"""The traffic policy schema: Envoy's defaults, refusals that name the field, a stable encoding."""

import pytest

from meshkeeper.policy import DEFAULT_POLICY, PolicyError, decode_policy, encode_policy


def test_empty_policy_is_envoys_defaults():
    p = decode_policy(b"")
    assert p is DEFAULT_POLICY
    assert (p.lb.policy, p.timeout_ms, p.connect_timeout_ms, p.panic_threshold_percent) == ("round_robin", 15000, 1000, 50)
    assert p.circuit_breaker.max_connections == 1024
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
    ({"lb": {"policy": "ROUND_ROBIN"}}, "policy.lb.policy"),
    ({"circuit_breaker": {"max_connections": -1}}, "policy.circuit_breaker.max_connections"),
    ({"circuit_breaker": {"max_retries": -1, "retry_budget": None}}, "policy.circuit_breaker.max_retries"),
    ({"circuit_breaker": {"retry_budget": {"percent": 101}}}, "policy.circuit_breaker.retry_budget.percent"),
    ({"circuit_breaker": {"retry_budget": {"percent": 0}}}, "policy.circuit_breaker.retry_budget.percent"),
    ({"circuit_breaker": {"retry_budget": {"min_concurrency": -3}}},
     "policy.circuit_breaker.retry_budget.min_concurrency"),
    ({"circuit_breaker": {"retry_budget": {"percentage": 20}}}, "policy.circuit_breaker.retry_budget.percentage: unknown"),
    ({"circuit_breaker": {"retry_budget": 20}}, "policy.circuit_breaker.retry_budget: expected an object"),
    ({"circuit_breaker": {"max_retries": 5, "retry_budget": {}}},
     "policy.circuit_breaker.max_retries: has no effect while retry_budget"),
    ({"outlier": {"consecutive_5xx": -1}}, "policy.outlier.consecutive_5xx"),
    ({"outlier": {"interval_ms": 0}}, "policy.outlier.interval_ms"),
    ({"outlier": {"base_ejection_ms": 60000, "max_ejection_ms": 30000}}, "policy.outlier.max_ejection_ms"),
    ({"outlier": {"success_rate": {"enforcing_percent": 101}}}, "policy.outlier.success_rate.enforcing_percent"),
    ({"outlier": {"failure_percentage": {"threshold": -1}}}, "policy.outlier.failure_percentage.threshold"),
    ({"retry": {"per_try_timeout_ms": -1}}, "policy.retry.per_try_timeout_ms"),
    ({"retry": {"retriable_status_codes": [99]}}, r"policy.retry.retriable_status_codes\[0\]"),
    ({"panic_threshold_percent": 101}, "policy.panic_threshold_percent"),
    ({"rate_limit": {"rps": -1}}, "policy.rate_limit.rps"),
    ({"rate_limit": {"burst": -1}}, "policy.rate_limit.burst"),
    ({"fault": {"delay_percent": 101, "delay_ms": 5}}, "policy.fault.delay_percent"),
    ({"fault": {"delay_percent": 10}}, "policy.fault.delay_ms: must be positive"),
    ({"fault": {"abort_status": 600, "abort_percent": 1}}, "policy.fault.abort_status"),
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


def test_concurrent_retries_are_not_capped_by_default_as_in_istio():
    # Istio's DestinationRule maxRetries default (2^32-1), not Envoy's 3 nor a 20%/3 budget: those
    # refuse retries when an instance dies (docs/contracts.md, "Retry defaults").
    cb = DEFAULT_POLICY.circuit_breaker
    assert (cb.max_retries, cb.retry_budget) == (2**32 - 1, None)
    capped = decode_policy({"circuit_breaker": {"max_retries": 3}})  # DESIGN's example: Envoy's cap
    assert capped.circuit_breaker.max_retries == 3 and capped.circuit_breaker.retry_budget is None
    assert encode_policy(capped) == b'{"circuit_breaker": {"max_retries": 3}}'
    assert decode_policy(encode_policy(capped)) == capped
    # Policies written before the default changed still decode: a null budget is the default now.
    assert decode_policy({"circuit_breaker": {"retry_budget": None, "max_retries": 5}}) == \
        decode_policy({"circuit_breaker": {"max_retries": 5}})


def test_a_retry_budget_is_opt_in_and_overrides_max_retries():
    tuned = decode_policy({"circuit_breaker": {"retry_budget": {"percent": 50}}})
    assert (tuned.circuit_breaker.retry_budget.percent, tuned.circuit_breaker.retry_budget.min_concurrency) == (50, 3)
    assert encode_policy(tuned) == b'{"circuit_breaker": {"retry_budget": {"percent": 50}}}'
    assert decode_policy(encode_policy(tuned)) == tuned
    assert decode_policy({"circuit_breaker": {"retry_budget": {}}}).circuit_breaker.retry_budget.percent == 20
    with pytest.raises(PolicyError, match="policy.circuit_breaker.max_retries: has no effect"):
        decode_policy({"circuit_breaker": {"retry_budget": {}, "max_retries": 3}})
    with pytest.raises(PolicyError, match="policy.circuit_breaker.max_retries"):
        decode_policy({"circuit_breaker": {"max_retries": 2**32}})


def test_every_section_round_trips():
    p = decode_policy({
        "lb": {"policy": "random"},
        "outlier": {"consecutive_5xx": 0, "interval_ms": 500, "success_rate": {"minimum_hosts": 2},
                    "failure_percentage": {}},
        "circuit_breaker": {"max_pending": 7, "retry_budget": {"percent": 25, "min_concurrency": 0}},
        "retry": {"attempts": 0, "on": ["reset"], "per_try_timeout_ms": 100, "retriable_status_codes": [503]},
        "timeout_ms": 0, "connect_timeout_ms": 5, "panic_threshold_percent": 0,
        "rate_limit": {"rps": 10, "burst": 20},
        "fault": {"delay_ms": 5, "delay_percent": 1, "abort_status": 418, "abort_percent": 2},
    })
    assert decode_policy(encode_policy(p)) == p
    assert p.outlier.failure_percentage is not None and p.outlier.success_rate.request_volume == 100
    # A section equal to its defaults still says "on": {"outlier": {}} is not the default policy.
    assert decode_policy(encode_policy(decode_policy({"outlier": {}}))).outlier is not None


def test_policies_hash_by_content():
    a = decode_policy({"split": {"v1": 90, "v2": 10}, "rate_limit": {"rps": 5}})
    b = decode_policy({"rate_limit": {"rps": 5}, "split": {"v2": 10, "v1": 90}})
    assert a == b and hash(a) == hash(b)
    assert {a: 1}[b] == 1
    assert a != decode_policy({"split": {"v1": 80, "v2": 20}, "rate_limit": {"rps": 5}})
