"""Load balancers of a cluster, and smooth weighted round robin (nginx's algorithm), the default.

Every balancer has the same small interface (:class:`Balancer`): ``pick()`` returns the next item
or None when it has none, ``len()`` and ``items`` tell what it balances over. A balancer is built
over the endpoints that are eligible right now (serving, and not ejected unless in panic) and is
rebuilt by its cluster whenever that set or a weight changes; it never looks at ejection itself.
:func:`make_balancer` maps Envoy's ``lb_policy`` names to the balancers:

``round_robin``    :class:`SmoothWeightedRoundRobin` (this module), Envoy's ROUND_ROBIN default.
``least_request``  :class:`~sidecar.upstream.lb_least_request.LeastRequest`.
``random``         :class:`~sidecar.upstream.lb_random.WeightedRandom`.

Smooth weighted round robin: each pick adds every item's weight to its current value, chooses the
item with the largest current value (the first one on ties) and subtracts the total weight from it.
The sequence is deterministic, interleaves heavy and light items instead of bursting, and repeats
with a period of exactly the total weight: over any window of ``total`` consecutive picks every item
is chosen exactly ``weight`` times (weights 1, 2, 7 give 1, 2 and 7 picks out of every 10).

Because of that period, the balancer precomputes one whole cycle (after dividing the weights by
their greatest common divisor) and a pick is an index step. Cycles longer than
``MAX_PRECOMPUTED_CYCLE`` fall back to running the algorithm live, O(items) per pick.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import reduce
from math import gcd
from typing import Protocol, TypeVar

from sidecar.upstream.lb_base import WeightedItems, positive
from sidecar.upstream.lb_least_request import LeastRequest
from sidecar.upstream.lb_random import WeightedRandom

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

MAX_PRECOMPUTED_CYCLE = 1 << 16

LB_ROUND_ROBIN = "round_robin"
LB_LEAST_REQUEST = "least_request"
LB_RANDOM = "random"
LB_POLICIES = (LB_ROUND_ROBIN, LB_LEAST_REQUEST, LB_RANDOM)


class Balancer(Protocol[T_co]):
    """What a cluster asks of its load balancer."""

    def __len__(self) -> int: ...

    @property
    def items(self) -> list[T_co]: ...

    def pick(self) -> T_co | None: ...


def make_balancer(policy: str, choices: Sequence[tuple[T, int]], *, random: Callable[[], float],
                  active: Callable[[T], int] | None = None) -> Balancer[T]:
    """The balancer of ``policy`` over ``(item, weight)`` pairs; raises ValueError for an unknown policy.

    ``random`` returns floats in [0, 1) (``random.random`` unless a test injects one); ``active``
    gives an item's requests in flight, which ``least_request`` needs.
    """
    if policy == LB_ROUND_ROBIN:
        return SmoothWeightedRoundRobin(choices)
    if policy == LB_LEAST_REQUEST:
        if active is None:
            raise ValueError("least_request needs the items' active request counts")
        return LeastRequest(choices, random=random, active=active)
    if policy == LB_RANDOM:
        return WeightedRandom(choices, random=random)
    raise ValueError(f"lb_policy {policy!r} is not supported (supported: {', '.join(LB_POLICIES)})")


class SmoothWeightedRoundRobin(WeightedItems[T]):
    """Deterministic smooth WRR over ``(item, weight)`` pairs; weights <= 0 are left out."""

    __slots__ = ("_cycle", "_index", "_weights", "_current", "_total")

    def __init__(self, choices: Sequence[tuple[T, int]]) -> None:
        pairs = positive(choices)
        super().__init__(pairs)
        divisor = reduce(gcd, (w for _, w in pairs), 0) or 1
        self._weights: list[int] = [w // divisor for _, w in pairs]
        self._total = sum(self._weights)
        self._current: list[int] = [0] * len(pairs)
        self._index = 0
        self._cycle: list[T] | None = None
        if 0 < self._total <= MAX_PRECOMPUTED_CYCLE:
            self._cycle = [self._step() for _ in range(self._total)]

    def pick(self) -> T | None:
        cycle = self._cycle
        if cycle is not None:
            i = self._index
            self._index = i + 1 if i + 1 < self._total else 0
            return cycle[i]
        if not self._items:
            return None
        return self._step()

    def _step(self) -> T:
        current = self._current
        weights = self._weights
        best = 0
        best_value = None
        for i in range(len(current)):
            value = current[i] + weights[i]
            current[i] = value
            if best_value is None or value > best_value:
                best, best_value = i, value
        current[best] -= self._total
        return self._items[best]
