"""ZkStore's failure reporting, on a fake kazoo client (the version rules run against a real
ZooKeeper in tests/integration/test_admin.py)."""

from __future__ import annotations

import pytest
from kazoo.exceptions import ConnectionLoss

from controlplane.zkstore import Unavailable, ZkStore


class Result:
    """A kazoo IAsyncResult that is settled at once, or never (``hang``)."""

    def __init__(self, value=None, exc: Exception | None = None, hang: bool = False) -> None:
        self.value, self.exc, self.hang = value, exc, hang

    def rawlink(self, callback) -> None:
        if not self.hang:
            callback(self)

    def get(self, block: bool = True):
        if self.exc is not None:
            raise self.exc
        return self.value


class Stat:
    version = 3


class FakeClient:
    def __init__(self, set_result: Result, connected: bool = True) -> None:
        self.connected = connected
        self.set_result = set_result
        self.sets = 0

    def get_async(self, path):
        return Result((b'{"weight": 1}', Stat()))

    def set_async(self, path, data, version=-1):
        self.sets += 1
        return self.set_result


@pytest.mark.parametrize("result", [Result(hang=True), Result(exc=ConnectionLoss())])
async def test_a_write_without_an_answer_is_reported_as_maybe_applied(result):
    client = FakeClient(result)
    with pytest.raises(Unavailable) as info:
        await ZkStore(client, timeout=0.05).update("/p", lambda data: b'{"weight": 2}')
    assert info.value.outcome_unknown and "may or may not have been applied" in str(info.value)
    assert client.sets == 1  # not retried: it may have landed


async def test_nothing_is_sent_while_disconnected():
    client = FakeClient(Result(Stat()), connected=False)
    with pytest.raises(Unavailable) as info:
        await ZkStore(client).update("/p", lambda data: b"{}")
    assert not info.value.sent and not info.value.outcome_unknown and client.sets == 0


async def test_a_read_without_an_answer_changed_nothing():
    class SlowReads(FakeClient):
        def get_async(self, path):
            return Result(hang=True)

    client = SlowReads(Result(Stat()))
    with pytest.raises(Unavailable) as info:
        await ZkStore(client, timeout=0.05).update("/p", lambda data: b"{}")
    assert not info.value.outcome_unknown and client.sets == 0
