"""What every load balancer of a cluster shares: the items it balances over, weights <= 0 left out.

The balancers (``lb``, ``lb_least_request``, ``lb_random``) derive from :class:`WeightedItems`, which
keeps the items and answers ``len()`` and ``items`` for :class:`~sidecar.upstream.lb.Balancer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class WeightedItems(Generic[T]):
    __slots__ = ("_items",)

    def __init__(self, pairs: Sequence[tuple[T, int]]) -> None:
        """``pairs``: what :func:`positive` made of the balancer's choices."""
        self._items: list[T] = [item for item, _ in pairs]

    def __len__(self) -> int:
        return len(self._items)

    @property
    def items(self) -> list[T]:
        return list(self._items)


def positive(choices: Sequence[tuple[T, int]]) -> list[tuple[T, int]]:
    """``(item, weight)`` pairs with an integer weight above 0."""
    return [(item, int(weight)) for item, weight in choices if weight > 0]
