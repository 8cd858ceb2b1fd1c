"""HTTP/2 with prior knowledge (h2c) and HTTP/1.1 on the same listener port, on real sockets.

The connection manager picks the codec by the client's first bytes (the HTTP/2 preface); the
request path behind it is the same (routing, the weighted split, the HTTP/1.1 upstream). Real
clients: curl (``--http2-prior-knowledge``), h2load and ``http.client``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections import Counter

import pytest

from tests.integration.test_proxy_sockets import BackendServer, Sidecar, backends, get, sidecar  # noqa: F401

pytestmark = pytest.mark.integration

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
needs_h2load = pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) is not installed")


def curl_h2(port: int, path: str = "/", data: bytes | None = None) -> tuple[str, int, bytes]:
    """(HTTP version, status, body) of one h2c request by curl with prior knowledge."""
    cmd = ["curl", "-s", "--http2-prior-knowledge", "-H", "Host: svc", "-o", "-", "-w", "\n%{http_version} %{http_code}",
           f"http://127.0.0.1:{port}{path}"]
    if data is not None:
        cmd[1:1] = ["--data-binary", "@-", "-H", "Content-Type: application/octet-stream"]
    out = subprocess.run(cmd, input=data, capture_output=True, timeout=20, check=True).stdout
    body, _, tail = out.rpartition(b"\n")
    version, status = tail.decode().split()
    return version, int(status), body


@needs_curl
def test_h2c_get_and_post_are_routed_like_http1(sidecar: Sidecar, backends: list[BackendServer]) -> None:  # noqa: F811
    sidecar.route("svc", [(backends[0].port, 1)])
    assert curl_h2(sidecar.port) == ("2", 200, backends[0].name.encode())
    payload = bytes(range(256)) * 4096  # 1 MiB: flow control windows are crossed
    version, status, body = curl_h2(sidecar.port, "/upload", payload)
    assert (version, status) == ("2", 200)
    assert json.loads(body)["size"] == len(payload)


@needs_curl
def test_h2c_large_response_arrives_whole(sidecar: Sidecar, backends: list[BackendServer]) -> None:  # noqa: F811
    sidecar.route("svc", [(backends[0].port, 1)])
    version, status, body = curl_h2(sidecar.port, f"/big?bytes={8 * 1024 * 1024}")
    assert (version, status, len(body)) == ("2", 200, 8 * 1024 * 1024)


@needs_h2load
def test_http2_and_http1_clients_on_one_port_at_once(sidecar: Sidecar, backends: list[BackendServer]) -> None:  # noqa: F811
    sidecar.route("svc", [(backends[0].port, 1), (backends[1].port, 1)])
    statuses: Counter[int] = Counter()

    def http1() -> None:
        conn = sidecar.connection()
        for _ in range(200):
            status, _ = get(conn)
            statuses[status] += 1
        conn.close()

    thread = threading.Thread(target=http1)
    thread.start()
    out = subprocess.run(["h2load", "-c", "2", "-m", "4", "-n", "400", "-H", ":authority: svc",
                          f"http://127.0.0.1:{sidecar.port}/"], capture_output=True, text=True, timeout=60)
    thread.join(timeout=60)
    assert "400 succeeded, 0 failed, 0 errored" in out.stdout, out.stdout
    assert "status codes: 400 2xx" in out.stdout, out.stdout
    assert "h2c" in out.stdout  # h2load spoke HTTP/2 with prior knowledge
    assert statuses == {200: 200}


def test_a_route_timeout_after_a_grpc_response_began_ends_the_call_with_deadline_exceeded(
        sidecar: Sidecar) -> None:  # noqa: F811
    import grpc

    from sidecar.config import ClusterConfig, EndpointConfig, Route, RouteConfig, VirtualHost
    from tests.harness.grpc_rich import SERVICE, RichServer

    server = RichServer("a").start()
    try:
        def apply() -> None:
            sidecar.clusters.update_clusters({"rich": ClusterConfig("rich", connect_timeout=1.0, http2=True)})
            sidecar.clusters.update_endpoints("rich", (EndpointConfig("127.0.0.1", server.port),))
            sidecar.runtime.set_route_config(RouteConfig("outbound", (
                VirtualHost("rich", ("rich",), (Route("/", "rich", timeout=0.3),)),)))

        sidecar.call(apply)
        with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}", options=[("grpc.default_authority", "rich")]) as ch:
            stream = ch.unary_stream(f"/{SERVICE}/ServerStream")(b'{"count": 20, "size": 10, "interval_ms": 100}',
                                                                  timeout=10)
            got = []
            with pytest.raises(grpc.RpcError) as info:
                for message in stream:
                    got.append(message)
            assert got  # the response had begun: the head and first messages went out
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value
            assert info.value.details() == "upstream request timeout"
            assert dict(info.value.trailing_metadata())["x-meshkeeper-flags"] == "UT"
    finally:
        server.stop(0)
