"""ZooKeeper reads and versioned writes for the admin API, on the event loop.

The admin API reads ZooKeeper directly rather than the watch's snapshot, so a write is visible to
the next read through any control-plane replica, with the znode version that a later write names.
Every write is a read-modify-write conditioned on the version it read (:meth:`ZkStore.update`):

* ``expected`` None: unconditional. A concurrent change between the read and the write is retried
  on the fresh znode, so merging writes (a weight next to an ``enabled`` switch) never lose a field.
* ``expected`` -1: create only; :class:`Conflict` if the znode exists.
* ``expected`` N >= 0: :class:`Conflict` unless the znode is still at version N.

Kazoo calls run on its threads and are handed back with :func:`controlplane.zksource.bridge`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kazoo.exceptions import BadVersionError, KazooException, NodeExistsError, NoNodeError, NotEmptyError

from controlplane.zksource import bridge

CALL_TIMEOUT = 5.0  # seconds for one ZooKeeper call; the admin caller gets UNAVAILABLE after it
MAX_ATTEMPTS = 10  # unconditional writes retried this often against concurrent changes


class Unavailable(Exception):
    """ZooKeeper cannot be reached (not connected, or a call timed out or lost its connection).
    ``sent``: the request may have reached ZooKeeper. ``outcome_unknown``: it was a write, which
    ZooKeeper may have applied although no answer came."""

    def __init__(self, message: str, sent: bool = True, outcome_unknown: bool = False) -> None:
        super().__init__(message)
        self.sent, self.outcome_unknown = sent, outcome_unknown


class Conflict(Exception):
    """The znode is not at the expected version (or exists / is gone, against expectation)."""


@dataclass(frozen=True, slots=True)
class Znode:
    data: bytes
    version: int


@dataclass(frozen=True, slots=True)
class Written:
    """What a write changed: the payload before (None: absent) and after (None: deleted), and the
    znode version after (-1: deleted)."""

    before: bytes | None
    after: bytes | None
    version: int


class ZkStore:
    def __init__(self, client: Any, loop: asyncio.AbstractEventLoop | None = None,
                 timeout: float = CALL_TIMEOUT) -> None:
        self.client = client  # a started kazoo KazooClient (the registry watch's)
        self._loop = loop
        self.timeout = timeout

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if not self.client.connected:
            raise Unavailable("not connected to ZooKeeper", sent=False)
        return await self._settle(getattr(self.client, method)(*args, **kwargs))

    async def _settle(self, async_result: Any) -> Any:
        loop = self._loop or asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                return await bridge(loop, async_result)
        except TimeoutError:
            raise Unavailable(f"ZooKeeper did not answer within {self.timeout:g} s") from None
        except (NoNodeError, NodeExistsError, BadVersionError, NotEmptyError):
            raise
        except KazooException as exc:  # connection loss or drop, session expiry, ...
            raise Unavailable(f"ZooKeeper: {type(exc).__name__}") from None

    async def get(self, path: str) -> Znode | None:
        try:
            data, stat = await self._call("get_async", path)
        except NoNodeError:
            return None
        return Znode(data or b"", stat.version)

    async def children(self, path: str) -> list[str] | None:
        """Sorted child names, or None when ``path`` does not exist."""
        try:
            return sorted(await self._call("get_children_async", path))
        except NoNodeError:
            return None

    async def ensure(self, path: str) -> None:
        """Create ``path`` and its parents, empty, where they are missing."""
        await self._call("ensure_path_async", path)

    async def transaction(self, ops: list[tuple[str, ...]]) -> list[Any]:
        """Apply ``ops`` (``("create", path, data)``, ``("delete", path, version)``,
        ``("check", path, version)``) all or none, ZooKeeper's multi. Returns one result per op:
        the created path or True, or the exception that refused it (``NodeExistsError``, ...; the
        others then hold ``RolledBackError``)."""
        if not self.client.connected:
            raise Unavailable("not connected to ZooKeeper", sent=False)
        t = self.client.transaction()
        for op, path, arg in ops:
            if op == "create":
                t.create(path, arg)
            elif op == "delete":
                t.delete(path, version=arg)
            else:
                t.check(path, arg)
        return list(await self._settle(t.commit_async()))

    async def get_many(self, paths: list[str]) -> list[Znode | None]:
        return list(await asyncio.gather(*(self.get(p) for p in paths)))

    async def update(self, path: str, change: Callable[[bytes | None], bytes | None],
                     expected: int | None = None) -> Written:
        """Apply ``change`` (current payload or None -> new payload, or None to delete) under the
        version rules of the module docstring. ``change`` may raise to refuse; nothing is written."""
        for _ in range(MAX_ATTEMPTS):
            cur = await self.get(path)
            if expected is not None:
                if expected == -1 and cur is not None:
                    raise Conflict(f"{path} exists (version {cur.version}); it was created since it was read")
                if expected >= 0 and cur is None:
                    raise Conflict(f"{path} was deleted since version {expected} was read")
                if expected >= 0 and cur.version != expected:
                    raise Conflict(f"{path} is at version {cur.version}, not {expected}: it changed since it was read")
            before = None if cur is None else cur.data
            after = change(before)
            try:
                if after is None:
                    if cur is not None:
                        await self._call("delete_async", path, version=cur.version)
                    return Written(before, None, -1)
                if cur is None:
                    await self._call("create_async", path, after, makepath=True)
                    return Written(None, after, 0)
                stat = await self._call("set_async", path, after, version=cur.version)
                return Written(before, after, stat.version)
            except (BadVersionError, NodeExistsError, NoNodeError):
                if expected is not None:
                    raise Conflict(f"{path} changed while it was being written") from None
            except Unavailable as exc:
                if not exc.sent:
                    raise
                raise Unavailable(f"{exc}; the write may or may not have been applied: read it again",
                                  outcome_unknown=True) from None
        raise Conflict(f"{path} kept changing: {MAX_ATTEMPTS} attempts lost to concurrent writes")
