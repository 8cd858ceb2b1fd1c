"""One periodic sweep per owner instead of a timer per connection (listener timeouts, tcp_proxy idle).

A :class:`Sweep` calls ``fn`` every ``period`` seconds while its owner has connections: the owner
calls :meth:`Sweep.start` when a connection opens and :meth:`Sweep.stop` when the last one closes,
and :meth:`Sweep.set_period` when its timeouts change (0: no sweep). A bug in ``fn`` is reported
through ``on_error`` and the sweep goes on, so one bad connection never stops the others' timeouts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Sweep:
    __slots__ = ("period", "_fn", "_busy", "_on_error", "_handle")

    def __init__(self, fn: Callable[[], None], busy: Callable[[], bool], period: float,
                 on_error: Callable[[BaseException], None]) -> None:
        self.period = period
        self._fn = fn
        self._busy = busy  # whether the owner has connections (the sweep re-arms only then)
        self._on_error = on_error
        self._handle: asyncio.TimerHandle | None = None

    @property
    def scheduled(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        if self.period and self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.period, self._fire)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def set_period(self, period: float) -> None:
        if period != self.period:
            self.period = period
            self.stop()
            if self._busy():
                self.start()

    def _fire(self) -> None:
        self._handle = None
        try:
            self._fn()
        except Exception as exc:  # a bug: keep sweeping the other connections next time
            self._on_error(exc)
        if self._busy():
            self.start()
