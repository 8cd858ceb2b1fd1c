"""Least request, the cluster's ``least_request`` load balancer (Envoy's LEAST_REQUEST defaults).

With equal weights it is the power of two choices (``choice_count`` 2): draw two endpoints at random
(independently, so both may be the same one) and take the one with fewer requests in flight, the
first on ties. With unequal weights it is Envoy's weighted least request: an earliest-deadline-first
schedule where an item's effective weight is ``weight / (active + 1) ** active_request_bias``
(bias 1.0), evaluated when the schedule is built and each time the item is put back after being
picked, so a loaded endpoint comes round later. With no requests in flight that schedule is plain weighted round robin.

Requests in flight are read through the ``active`` callable at pick time; the balancer itself only
keeps its schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from heapq import heapify, heappop, heappush
from typing import TypeVar

from sidecar.upstream.lb_base import WeightedItems, positive

T = TypeVar("T")

DEFAULT_CHOICE_COUNT = 2  # Envoy's LeastRequest.choice_count default
DEFAULT_ACTIVE_REQUEST_BIAS = 1.0  # Envoy's LeastRequest.active_request_bias default


class LeastRequest(WeightedItems[T]):
    """P2C over equal weights, weighted least request (EDF) over unequal ones; weights <= 0 left out."""

    __slots__ = ("_weights", "_weighted", "_random", "_active", "_choices", "_bias", "_heap", "_seq")

    def __init__(self, choices: Sequence[tuple[T, int]], *, random: Callable[[], float],
                 active: Callable[[T], int], choice_count: int = DEFAULT_CHOICE_COUNT,
                 active_request_bias: float = DEFAULT_ACTIVE_REQUEST_BIAS) -> None:
        pairs = positive(choices)
        super().__init__(pairs)
        self._weights: list[int] = [w for _, w in pairs]
        self._weighted = len(set(self._weights)) > 1
        self._random = random
        self._active = active
        self._choices = max(1, choice_count)
        self._bias = active_request_bias
        # EDF entries: (deadline, insertion order, index); the order breaks ties first-in first-out.
        self._heap: list[tuple[float, int, int]] = []
        self._seq = len(pairs)
        if self._weighted:
            self._heap = [(1.0 / self._effective(i), i, i) for i in range(len(pairs))]
            heapify(self._heap)

    def pick(self) -> T | None:
        items = self._items
        n = len(items)
        if n == 0:
            return None
        if n == 1:
            return items[0]
        if self._weighted:
            return self._pick_weighted()
        rnd = self._random
        active = self._active
        best = items[int(rnd() * n) % n]
        best_active = active(best)
        for _ in range(self._choices - 1):
            candidate = items[int(rnd() * n) % n]
            candidate_active = active(candidate)
            if candidate_active < best_active:
                best, best_active = candidate, candidate_active
        return best

    def _effective(self, i: int) -> float:
        load = self._active(self._items[i]) + 1
        bias = self._bias
        return self._weights[i] / (load if bias == 1.0 else load**bias)

    def _pick_weighted(self) -> T:
        deadline, _, i = heappop(self._heap)
        self._seq += 1
        heappush(self._heap, (deadline + 1.0 / self._effective(i), self._seq, i))
        return self._items[i]
