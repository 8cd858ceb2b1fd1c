"""Smooth weighted round robin: exact shares, nginx's interleaving, and the live fallback."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sidecar.upstream import lb
from sidecar.upstream.lb import SmoothWeightedRoundRobin


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
