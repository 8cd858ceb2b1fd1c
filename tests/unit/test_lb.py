"""Load balancers: smooth WRR (exact shares, nginx's interleaving, live fallback), least request, random."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sidecar.upstream import lb
from sidecar.upstream.lb import SmoothWeightedRoundRobin, make_balancer
from sidecar.upstream.lb_least_request import LeastRequest
from sidecar.upstream.lb_random import WeightedRandom


def reference(weights: dict[str, int], n: int) -> list[str]:
    """nginx's algorithm, written out plainly: add weights, take the max (first on ties), subtract total."""
    current = dict.fromkeys(weights, 0)
    total = sum(weights.values())
    out = []
    for _ in range(n):
        for name, w in weights.items():
            current[name] += w
        best = max(current, key=lambda k: current[k])
        current[best] -= total
        out.append(best)
    return out


def test_weights_1_2_7_are_exact_over_any_10_consecutive_picks() -> None:
    rr = SmoothWeightedRoundRobin([("a", 1), ("b", 2), ("c", 7)])
    picks = [rr.pick() for _ in range(1000)]
    for start in range(len(picks) - 10):
        assert Counter(picks[start : start + 10]) == {"a": 1, "b": 2, "c": 7}
    assert Counter(picks) == {"a": 100, "b": 200, "c": 700}


def test_nginx_sequence_is_smooth() -> None:
    rr = SmoothWeightedRoundRobin([("a", 5), ("b", 1), ("c", 1)])
    assert [rr.pick() for _ in range(7)] == ["a", "a", "b", "a", "c", "a", "a"]


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference_algorithm(seed: int) -> None:
    rng = random.Random(seed)
    weights = {f"e{i}": rng.randint(1, 20) for i in range(rng.randint(1, 8))}
    rr = SmoothWeightedRoundRobin(list(weights.items()))
    total = sum(weights.values())
    assert [rr.pick() for _ in range(3 * total)] == reference(weights, 3 * total)


def test_common_divisor_keeps_the_sequence() -> None:
    a = SmoothWeightedRoundRobin([("x", 10), ("y", 20), ("z", 70)])
    b = SmoothWeightedRoundRobin([("x", 1), ("y", 2), ("z", 7)])
    assert [a.pick() for _ in range(50)] == [b.pick() for _ in range(50)]


def test_live_fallback_for_long_cycles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lb, "MAX_PRECOMPUTED_CYCLE", 4)
    weights = {"a": 3, "b": 5, "c": 2}
    rr = SmoothWeightedRoundRobin(list(weights.items()))
    assert rr._cycle is None
    assert [rr.pick() for _ in range(40)] == reference(weights, 40)


def test_zero_weights_are_left_out_and_empty_picks_none() -> None:
    rr = SmoothWeightedRoundRobin([("a", 0), ("b", 3)])
    assert {rr.pick() for _ in range(10)} == {"b"}
    assert len(rr) == 1 and rr.items == ["b"]
    assert SmoothWeightedRoundRobin([]).pick() is None
    assert SmoothWeightedRoundRobin([("a", 0)]).pick() is None


# --- least_request and random ----------------------------------------------------------------------


class Cycle:
    """A fake random source: the given values in turn, forever."""

    def __init__(self, *values: float) -> None:
        self.values = values
        self.i = 0

    def __call__(self) -> float:
        value = self.values[self.i % len(self.values)]
        self.i += 1
        return value


def uniform(n: int) -> Cycle:
    """n evenly spread draws over [0, 1): any weighted choice over them is exact."""
    return Cycle(*((k + 0.5) / n for k in range(n)))


def test_least_request_with_equal_weights_takes_the_less_loaded_of_two_random_choices() -> None:
    active = {"a": 3, "b": 0, "c": 1, "d": 0}
    # Draws 0.1 -> a, 0.6 -> c: c has fewer; 0.3 -> b, 0.8 -> d: a tie keeps the first.
    lr = LeastRequest(list(zip(active, [1] * 4, strict=True)), random=Cycle(0.1, 0.6, 0.3, 0.8),
                      active=active.__getitem__)
    assert [lr.pick(), lr.pick()] == ["c", "b"]


def test_least_request_p2c_distribution() -> None:
    # One idle endpoint among three busy ones wins whenever it is drawn: 1 - (3/4)^2 = 7/16 of picks.
    active = {"idle": 0, "x": 5, "y": 5, "z": 5}
    rng = random.Random(7)
    lr = LeastRequest([(k, 1) for k in active], random=rng.random, active=active.__getitem__)
    picks = Counter(lr.pick() for _ in range(20000))
    assert picks["idle"] / 20000 == pytest.approx(7 / 16, abs=0.015)
    # Exactly, over all 16 ordered pairs of draws:
    draws = [(i + 0.5) / 4 for i in range(4)]
    pairs = [v for i in draws for j in draws for v in (i, j)]
    lr = LeastRequest([(k, 1) for k in active], random=Cycle(*pairs), active=active.__getitem__)
    assert Counter(lr.pick() for _ in range(16))["idle"] == 7


def test_weighted_least_request_is_weighted_round_robin_when_idle() -> None:
    lr = LeastRequest([("a", 1), ("b", 3)], random=Cycle(0.5), active=lambda _: 0)
    assert Counter(lr.pick() for _ in range(400)) == {"a": 100, "b": 300}


def test_weighted_least_request_divides_weight_by_active_requests() -> None:
    # b has 3x the weight but 5 requests in flight: effective weights 1/1 and 3/6, so a gets 2/3.
    active = {"a": 0, "b": 5}
    lr = LeastRequest([("a", 1), ("b", 3)], random=Cycle(0.5), active=active.__getitem__)
    picks = Counter(lr.pick() for _ in range(300))
    assert picks == {"a": 200, "b": 100}


def test_weighted_random_follows_weights_exactly_over_uniform_draws() -> None:
    wr = WeightedRandom([("a", 1), ("b", 2), ("c", 7)], random=uniform(100))
    assert Counter(wr.pick() for _ in range(100)) == {"a": 10, "b": 20, "c": 70}
    equal = WeightedRandom([("a", 5), ("b", 5)], random=Cycle(0.0, 0.49, 0.5, 0.999999, 1.0))
    assert [equal.pick() for _ in range(5)] == ["a", "a", "b", "b", "b"]
    assert WeightedRandom([], random=uniform(2)).pick() is None
    assert WeightedRandom([("a", 0), ("b", 2)], random=uniform(2)).items == ["b"]


def test_make_balancer_maps_envoy_policy_names() -> None:
    choices = [("a", 1), ("b", 1)]
    assert isinstance(make_balancer("round_robin", choices, random=uniform(2)), SmoothWeightedRoundRobin)
    assert isinstance(make_balancer("least_request", choices, random=uniform(2), active=lambda _: 0), LeastRequest)
    assert isinstance(make_balancer("random", choices, random=uniform(2)), WeightedRandom)
    with pytest.raises(ValueError, match="maglev"):
        make_balancer("maglev", choices, random=uniform(2))
