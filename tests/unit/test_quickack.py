"""sidecar.quickack: asks for an immediate ACK on TCP sockets, degrades to nothing elsewhere."""

from __future__ import annotations

import socket

import pytest

from sidecar import quickack


class FakeTransport:
    def __init__(self, sock: object) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None


class RecordingSocket:
    def __init__(self, family: int = socket.AF_INET, fail: bool = False) -> None:
        self.family, self.fail, self.calls = family, fail, []

    def setsockopt(self, *args: object) -> None:
        if self.fail:
            raise OSError(9, "Bad file descriptor")
        self.calls.append(args)


@pytest.mark.skipif(quickack.TCP_QUICKACK is None, reason="no TCP_QUICKACK on this platform")
def test_tcp_socket_gets_quickack_and_a_closing_one_does_not_raise() -> None:
    sock = RecordingSocket()
    quickack.ack_now(FakeTransport(sock))
    assert sock.calls == [(socket.IPPROTO_TCP, quickack.TCP_QUICKACK, 1)]
    quickack.ack_now(FakeTransport(RecordingSocket(fail=True)))  # no exception


def test_non_tcp_and_absent_sockets_are_left_alone() -> None:
    unix = RecordingSocket(family=socket.AF_UNIX)
    quickack.ack_now(FakeTransport(unix))
    quickack.ack_now(FakeTransport(None))
    assert unix.calls == []


def test_without_tcp_quickack_the_kernel_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quickack, "TCP_QUICKACK", None)
    sock = RecordingSocket()
    quickack.ack_now(FakeTransport(sock))
    assert sock.calls == []


@pytest.mark.skipif(quickack.TCP_QUICKACK is None, reason="no TCP_QUICKACK on this platform")
def test_real_socket_accepts_it() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    try:
        quickack.ack_now(FakeTransport(client))
        assert client.getsockopt(socket.IPPROTO_TCP, quickack.TCP_QUICKACK) == 1
    finally:
        client.close()
        server.close()
