"""The listener's local rate limit: Envoy's ``envoy.filters.http.local_ratelimit`` token bucket.

The bucket starts full (``max_tokens``, the burst) and gains ``tokens_per_fill`` at every whole
``fill_interval`` since it was created, never holding more than ``max_tokens``; each request takes
one token or is answered 429 (flag RL) by the router filter. Fills are counted lazily from the
clock when a token is taken, so no timer runs; fill boundaries are multiples of ``fill_interval``
from the start (a late take does not shift them), as with Envoy's fill timer.

Owned by one :class:`~sidecar.proxy.listener.ListenerContext`; the xDS layer replaces the bucket
only when its config changes, so an unchanged LDS push keeps the tokens left.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sidecar.config import RateLimitConfig


class TokenBucket:
    """A token bucket read on the request path: :meth:`try_take` is a clock read and a compare."""

    __slots__ = ("config", "tokens", "_clock", "_max", "_per_fill", "_interval", "_start", "_fills", "_next_fill")

    def __init__(self, config: RateLimitConfig, clock: Callable[[], float] = time.monotonic) -> None:
        if config.max_tokens < 1:
            raise ValueError(f"local rate limit: max_tokens must be at least 1, not {config.max_tokens}")
        if config.tokens_per_fill < 1:
            raise ValueError(f"local rate limit: tokens_per_fill must be at least 1, not {config.tokens_per_fill}")
        if not config.fill_interval > 0:
            raise ValueError(f"local rate limit: fill_interval must be positive, not {config.fill_interval}")
        self.config = config
        self.tokens = config.max_tokens
        self._clock = clock
        self._max = config.max_tokens
        self._per_fill = config.tokens_per_fill
        self._interval = config.fill_interval
        self._start = clock()
        self._fills = 0  # whole fill intervals accounted for since _start
        self._next_fill = self._start + self._interval

    def try_take(self) -> bool:
        """Take one token if there is one (True), else False: the request is rate limited."""
        now = self._clock()
        if now >= self._next_fill:
            self._refill(now)
        if self.tokens > 0:
            self.tokens -= 1
            return True
        return False

    def _refill(self, now: float) -> None:
        fills = int((now - self._start) / self._interval)
        if fills <= self._fills:
            fills = self._fills + 1  # the division rounded below a boundary the compare said was passed
        gained = (fills - self._fills) * self._per_fill
        self.tokens = min(self._max, self.tokens + gained)
        self._fills = fills
        self._next_fill = self._start + (fills + 1) * self._interval
