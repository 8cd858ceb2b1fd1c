"""The service's runtime config (RTDS), as Envoy's runtime layer: :class:`RuntimeLayer` holds the
accepted values that the admin port serves the app at ``/runtime``, and wakes the long polls waiting
for its version to change. (The sidecar's live state is :mod:`sidecar.server`.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import MappingProxyType


class RuntimeLayer:
    """The accepted RTDS values of the sidecar's own service and their version.

    ``version`` is the RTDS version accepted last ("" before the first). Waiters park on an
    :class:`asyncio.Event` that is set (and replaced) whenever the version moves, so any number of
    long polls wait without polling and all wake at once.
    """

    def __init__(self) -> None:
        self.version = ""
        self.values: Mapping[str, str] = MappingProxyType({})
        self.updates = 0  # times the version moved
        self.waiting = 0  # long polls parked now
        self._changed = asyncio.Event()

    def apply(self, values: Mapping[str, str], version: str) -> bool:
        """Take ``values`` as of ``version``; True (and waiters woken) when the version moved."""
        values = MappingProxyType(dict(sorted(values.items())))
        if version == self.version:
            # The same version again (a reconnect re-sends it): values follow, no one is woken.
            self.values = values
            return False
        self.version, self.values = version, values
        self.updates += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    async def wait_change(self, version: str, timeout: float) -> None:
        """Return once ``self.version`` differs from ``version``, or after ``timeout`` seconds."""
        if self.version != version or timeout <= 0:
            return
        event = self._changed
        self.waiting += 1
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self.waiting -= 1
