"""meshkeeper.httpd: the protocol driven through a fake transport, plus one real socket."""

from __future__ import annotations

import asyncio

from meshkeeper import httpd


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_write_buffer_size(self) -> int:
        return self.unsent

    unsent = 0  # what a client that stopped reading leaves in the buffer


def parse_responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        n = int(headers.get("content-length", "0")) if status != 100 else 0
        out.append((status, headers, rest[:n]))
        raw = rest[n:]
    return out


class Recorder:
    def __init__(self, reply=(200, "text/plain", b"ok")) -> None:
        self.calls: list[tuple] = []
        self.reply = reply

    def __call__(self, method, path, query, headers, body):
        self.calls.append((method, path, query, headers, body))
        return self.reply


async def drive(handler, *chunks: bytes, max_body: int = httpd.DEFAULT_MAX_BODY, settle: bool = True):
    conns: set = set()
    proto = httpd.HttpProtocol(handler, max_body, 30.0, conns)
    t = FakeTransport()
    proto.connection_made(t)
    for c in chunks:
        proto.data_received(c)
    if settle:
        for _ in range(20):  # let the per-connection worker run
            await asyncio.sleep(0)
    return proto, t


def run(coro):
    return asyncio.run(coro)


def test_get_with_query_headers_and_keep_alive():
    async def main():
        h = Recorder((200, "application/json", b'{"a":1}'))
        _, t = await drive(h, b"GET /api/proxies%20x?service=web&n=1&n=2&flag HTTP/1.1\r\nHost: x\r\n"
                              b"X-A: 1\r\nX-A: 2\r\n\r\n")
        [(method, path, query, headers, body)] = h.calls
        assert (method, path, body) == ("GET", "/api/proxies x", b"")
        assert query == {"service": "web", "n": "2", "flag": ""}
        assert headers["host"] == "x" and headers["x-a"] == "1, 2"
        [(status, hdrs, payload)] = parse_responses(bytes(t.out))
        assert status == 200 and payload == b'{"a":1}'
        assert hdrs["content-type"] == "application/json" and hdrs["connection"] == "keep-alive"
        assert not t.closed
    run(main())


def test_head_has_length_but_no_body():
    async def main():
        h = Recorder((200, "text/plain", b"hello"))
        _, t = await drive(h, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert h.calls[0][0] == "GET"  # handlers see HEAD as GET
        raw = bytes(t.out)
        assert raw.endswith(b"\r\n\r\n") and b"Content-Length: 5" in raw
    run(main())


def test_post_body_in_chunks_and_async_handler_with_extra_headers():
    async def handler(method, path, query, headers, body):
        await asyncio.sleep(0)
        return 201, "text/plain", body.upper(), {"Location": "/x/1"}

    async def main():
        _, t = await drive(handler, b"POST /x HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello", b" world")
        [(status, hdrs, payload)] = parse_responses(bytes(t.out))
        assert (status, payload, hdrs["location"]) == (201, b"HELLO WORLD", "/x/1")
    run(main())


def test_pipelined_requests_answered_in_order():
    async def handler(method, path, query, headers, body):
        await asyncio.sleep(0.01 if path == "/slow" else 0)
        return 200, "text/plain", path.encode()

    async def main():
        proto, t = await drive(handler, b"GET /slow HTTP/1.1\r\n\r\nGET /fast HTTP/1.1\r\n\r\n", settle=False)
        for _ in range(200):
            if len(parse_responses(bytes(t.out))) == 2:
                break
            await asyncio.sleep(0.005)
        assert [r[2] for r in parse_responses(bytes(t.out))] == [b"/slow", b"/fast"]
    run(main())


def test_http10_and_connection_close_close_after_the_answer():
    async def main():
        _, t = await drive(Recorder(), b"GET / HTTP/1.0\r\n\r\n")
        assert t.closed and parse_responses(bytes(t.out))[0][1]["connection"] == "close"
        _, t = await drive(Recorder(), b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert t.closed
    run(main())


def test_stream_writes_chunks_as_they_come_then_closes():
    async def main():
        gate = asyncio.Event()
        closed = []

        async def events():
            try:
                yield b"data: one\n\n"
                await gate.wait()
                yield b"data: two\n\n"
            finally:
                closed.append(True)

        h = Recorder((200, "text/event-stream", httpd.Stream(events()), {"Cache-Control": "no-cache"}))
        proto, t = await drive(h, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = bytes(t.out).partition(b"\r\n\r\n")
        assert b"Content-Length" not in head and b"Connection: close" in head and b"Cache-Control: no-cache" in head
        assert body == b"data: one\n\n" and not t.closed  # the first event is out before the second exists
        gate.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert bytes(t.out).endswith(b"data: one\n\ndata: two\n\n") and t.closed and closed == [True]
    run(main())


def test_stream_closed_when_the_client_goes_or_stops_reading():
    async def main():
        closed = []

        async def forever():
            try:
                while True:
                    yield b"x" * 100
                    await asyncio.sleep(0)
            finally:
                closed.append(True)

        h = Recorder((200, "text/event-stream", httpd.Stream(forever())))
        proto, t = await drive(h, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        proto.connection_lost(None)  # the browser tab closed
        for _ in range(10):
            await asyncio.sleep(0)
        assert closed == [True]

        closed.clear()
        h = Recorder((200, "text/event-stream", httpd.Stream(forever(), max_buffer=1000)))
        proto, t = await drive(h, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n", settle=False)
        t.unsent = 5000  # nothing is read: the buffer only grows
        for _ in range(10):
            await asyncio.sleep(0)
        assert t.closed and closed == [True]
    run(main())


def test_bad_request_too_large_and_handler_error():
    def boom(*args):
        raise RuntimeError("bug")

    async def main():
        _, t = await drive(Recorder(), b"NOT HTTP AT ALL\r\n\r\n")
        assert parse_responses(bytes(t.out))[0][0] == 400 and t.closed
        _, t = await drive(Recorder(), b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n", max_body=10)
        assert parse_responses(bytes(t.out))[0][0] == 413 and t.closed
        _, t = await drive(Recorder(), b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                       b"14\r\n" + b"x" * 20 + b"\r\n0\r\n\r\n", max_body=10)
        assert parse_responses(bytes(t.out))[0][0] == 413
        _, t = await drive(boom, b"GET / HTTP/1.1\r\n\r\n")
        assert parse_responses(bytes(t.out))[0][0] == 500 and not t.closed
    run(main())


def test_expect_100_continue():
    async def main():
        h = Recorder()
        _, t = await drive(h, b"POST / HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n", b"hi")
        statuses = [r[0] for r in parse_responses(bytes(t.out))]
        assert statuses == [100, 200] and h.calls[0][4] == b"hi"
    run(main())


def test_real_socket_server_binds_port_zero_and_closes():
    async def main():
        server = await httpd.HttpServer.start(Recorder((200, "text/plain", b"pong")), "127.0.0.1", 0)
        assert server.port > 0
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for _ in range(2):  # keep-alive: two requests on one connection
            writer.write(b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert await reader.readexactly(4) == b"pong"
        await server.close()
        assert await reader.read() == b""  # the server closed the kept-alive connection
        writer.close()
    run(main())


# --------------------------------------------------------------------------- the control plane's pages


def test_controlplane_pages():
    import json

    from controlplane.cache import SnapshotCache
    from controlplane.metrics import Metrics
    from controlplane.proxies import ProxyRegistry
    from controlplane.snapshot import RegistrySnapshot
    from controlplane.web import Web
    from meshkeeper.xds import CLUSTER, NodeInfo

    metrics = Metrics()
    cache, proxies = SnapshotCache(metrics), ProxyRegistry(metrics, wall=lambda: 0.0)
    web = Web(cache, proxies, metrics, lambda: "SUSPENDED")
    status, ctype, body = web("GET", "/healthz", {}, {}, b"")
    assert status == 200 and json.loads(body) == {"status": "serving", "registry_snapshot": None,
                                                  "zookeeper": "SUSPENDED", "proxies": 0}
    cache.set_snapshot(RegistrySnapshot(3))
    p = proxies.connect(NodeInfo(node_id="n1", service="web"), "ipv4:127.0.0.1:1")
    proxies.sent(p, CLUSTER, "v1", "1")
    proxies.nacked(p, CLUSTER, "v1", "bad cluster")
    assert json.loads(web("GET", "/healthz", {}, {}, b"")[2])["registry_snapshot"] == {"version": 3}
    [entry] = json.loads(web("GET", "/api/proxies", {}, {}, b"")[2])
    assert entry["connected_since"] == "1970-01-01T00:00:00.000Z"
    assert entry["types"]["CDS"]["nack"] == {"error": "bad cluster", "version": "v1",
                                             "at": "1970-01-01T00:00:00.000Z"}
    status, ctype, body = web("GET", "/metrics", {}, {}, b"")
    assert status == 200 and ctype.startswith("text/plain")
    assert b'meshkeeper_xds_nacks_total{type="CDS"} 1.0' in body
    assert b"meshkeeper_xds_connected_proxies 1.0" in body
    assert asyncio.run(web("GET", "/nope", {}, {}, b""))[0] == 404  # unknown paths go to the mounts
    assert web("POST", "/healthz", {}, {}, b"")[0] == 405
