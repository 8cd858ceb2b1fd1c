"""The ZooKeeper side of the registry watch: a :class:`~controlplane.watch.ZkSource` on kazoo.

kazoo runs its callbacks (watches, state listeners, async results) on its own threads. Nothing
here touches control-plane state from those threads: each callback only hands its result to the
event loop with ``call_soon_threadsafe``.

The client retries its connection forever, so the control plane starts (and keeps serving its last
snapshot) while ZooKeeper is down, and connects once it is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError
from kazoo.retry import KazooRetry

log = logging.getLogger("meshkeeper.controlplane.zk")

CONNECT_MAX_DELAY = 2.0  # seconds between connection attempts at most: reconnect fast after an outage


def bridge(loop: asyncio.AbstractEventLoop, async_result: Any) -> asyncio.Future:
    """A future on ``loop`` settled with a kazoo async result (its value or its exception); the
    result's callback runs on a kazoo thread and only hands it over."""
    fut = loop.create_future()

    def settle(ar: Any) -> None:
        if fut.done():
            return
        try:
            fut.set_result(ar.get(block=False))
        except Exception as exc:
            fut.set_exception(exc)

    def hand_over(ar: Any) -> None:
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                loop.call_soon_threadsafe(settle, ar)

    async_result.rawlink(hand_over)
    return fut


class KazooSource:
    def __init__(self, hosts: str, session_timeout: float = 10.0) -> None:
        self.hosts = hosts
        self.client = KazooClient(
            hosts=hosts, timeout=session_timeout,
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_delay=CONNECT_MAX_DELAY),
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_event: Callable[[str, str], None] | None = None
        self._on_state: Callable[[str], None] | None = None

    # -- kazoo threads: hand over and return

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # The loop may close between the check and the call (shutdown).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    def _listener(self, state: str) -> None:
        self._post(self._on_state, str(state))

    def _watch(self, event: Any) -> None:
        # On session expiry kazoo fires every watcher with EventType.NONE and no path: the state
        # listener handles that (full re-read), so such events are dropped here.
        if event.path:
            self._post(self._on_event, event.path, str(event.type))

    def _bridge(self, async_result: Any) -> asyncio.Future:
        return bridge(self._loop, async_result)

    # -- ZkSource, on the loop

    def start(self, on_event: Callable[[str, str], None], on_state: Callable[[str], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_event, self._on_state = on_event, on_state
        self.client.add_listener(self._listener)
        log.info("connecting to zookeeper %s", self.hosts)
        self.client.start_async()

    async def children(self, path: str) -> list[str] | None:
        for _ in range(5):  # the node may come and go between the two calls
            try:
                return list(await self._bridge(self.client.get_children_async(path, watch=self._watch)))
            except NoNodeError:
                if await self._bridge(self.client.exists_async(path, watch=self._watch)) is None:
                    return None
        raise RuntimeError(f"{path} keeps appearing and disappearing")

    async def data(self, path: str, watch_absent: bool = False) -> tuple[bytes, int] | None:
        for _ in range(5):  # with watch_absent, the node may come and go between the two calls
            try:
                value, stat = await self._bridge(self.client.get_async(path, watch=self._watch))
            except NoNodeError:
                if not watch_absent or await self._bridge(self.client.exists_async(path, watch=self._watch)) is None:
                    return None
                continue
            return value, stat.mzxid
        raise RuntimeError(f"{path} keeps appearing and disappearing")

    async def stop(self) -> None:
        self.client.remove_listener(self._listener)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.client.stop)
        await loop.run_in_executor(None, self.client.close)
        self._loop = None
