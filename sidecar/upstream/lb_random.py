"""Weighted random, the cluster's ``random`` load balancer.

Each pick draws one number from the injected random source: with equal weights it indexes the items
directly (Envoy's RANDOM exactly); with unequal weights it is located in the cumulative weights, so
an item is chosen with probability ``weight / total``. Envoy's RANDOM ignores endpoint weights; here
they count, so a weight set by the operator means the same under every policy.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import TypeVar

from sidecar.upstream.lb_base import WeightedItems, positive

T = TypeVar("T")


class WeightedRandom(WeightedItems[T]):
    """Random choice over ``(item, weight)`` pairs; weights <= 0 are left out."""

    __slots__ = ("_cumulative", "_total", "_equal", "_random")

    def __init__(self, choices: Sequence[tuple[T, int]], *, random: Callable[[], float]) -> None:
        pairs = positive(choices)
        super().__init__(pairs)
        weights = [w for _, w in pairs]
        self._cumulative = list(accumulate(weights))
        self._total = self._cumulative[-1] if weights else 0
        self._equal = len(set(weights)) <= 1
        self._random = random

    def pick(self) -> T | None:
        items = self._items
        n = len(items)
        if n == 0:
            return None
        if n == 1:
            return items[0]
        if self._equal:
            i = int(self._random() * n)
        else:
            i = bisect_right(self._cumulative, self._random() * self._total)
        return items[i if i < n else n - 1]  # a source returning 1.0 must not index past the end
