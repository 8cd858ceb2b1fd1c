"""Mutual TLS between two sidecars on real sockets (127.0.0.1, port 0), in one process, under both
asyncio's loop and uvloop: real listeners (the inbound one's tls_inspector), real pools, a real app.

Sidecar ``a`` calls ``b`` through its outbound listener; ``b``'s inbound listener terminates mTLS
(or takes plaintext, PERMISSIVE) and forwards to an app that echoes what it got as JSON.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from meshkeeper.xds import NodeInfo
from sidecar.config import (
    TLS_PERMISSIVE,
    TLS_STRICT,
    AuthzConfig,
    AuthzPolicy,
    ClusterConfig,
    DownstreamTlsConfig,
    EndpointConfig,
    ListenerConfig,
    PermissionMatch,
    PrincipalMatch,
    Route,
    RouteConfig,
    SecretConfig,
    TcpRoute,
    UpstreamTlsConfig,
    VirtualHost,
    WeightedCluster,
)
from sidecar.proxy.listener import bind_socket
from sidecar.server import Server
from sidecar.tls import TlsIdentity
from tests.support.pki import Ca, Workload, cert_sha256, new_key, spiffe
from tests.support.polling import until

TD_PREFIX = "spiffe://meshkeeper.local/"
OUT_B = "outbound|b.default"
IN_B = "inbound|8080"
LOOPS = ["asyncio", "uvloop"]


def run(loop: str, body: Callable[[], Awaitable[None]]) -> None:
    coro = asyncio.wait_for(body(), 20)
    uvloop.run(coro) if loop == "uvloop" else asyncio.run(coro)


@pytest.fixture(scope="module")
def ca() -> Ca:
    return Ca()


def give_identity(tls: TlsIdentity, ca: Ca, w: Workload) -> None:
    tls.set_pending_key(w.key_pem)
    tls.apply_secrets({"default": SecretConfig("default", certificate_chain=w.chain_pem),
                       "ROOTCA": SecretConfig("ROOTCA", trusted_ca=ca.bundle_pem)})


# --- an app that echoes the request -------------------------------------------------------------------


async def start_app() -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                headers: dict[str, list[str]] = {}
                for line in head[1:]:
                    if line:
                        k, v = line.split(":", 1)
                        headers.setdefault(k.strip().lower(), []).append(v.strip())
                n = int(headers.get("content-length", ["0"])[0])
                if n:
                    await reader.readexactly(n)
                body = json.dumps({"path": head[0].split()[1], "headers": headers}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


class Client:
    """One HTTP/1.1 client connection (plaintext or TLS)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext | None = None) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port, ssl=ctx))

    async def get(self, path: str = "/", host: str = "b", extra: str = "") -> tuple[int, dict[str, str], bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if line)}
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(head[0].split()[1]), headers, body

    def close(self) -> None:
        self.writer.close()


# --- two sidecars ---------------------------------------------------------------------------------------


class Mesh:
    def __init__(self, ca: Ca) -> None:
        self.ca = ca
        self.a = Server(NodeInfo(node_id="sidecar~127.0.0.1~a-1.default", service="a"))
        self.b = Server(NodeInfo(node_id="sidecar~127.0.0.1~b-1.default", service="b"))
        self.app: asyncio.AbstractServer | None = None

    async def start(self, *, mode: str = TLS_PERMISSIVE, san: str = spiffe("b"), http2: bool = False,
                    rbac: AuthzConfig | None = None, identities: bool = True, tcp: bool = False) -> None:
        self.app = await start_app()
        app_port = self.app.sockets[0].getsockname()[1]
        if identities:
            give_identity(self.a.tls, self.ca, self.ca.workload("a"))
            self.b_workload = self.ca.workload("b")
            give_identity(self.b.tls, self.ca, self.b_workload)
        b_in = bind_socket("127.0.0.1", 0)
        self.b_port = b_in.getsockname()[1]
        # b: its inbound listener in front of the app
        self.b.apply_clusters({IN_B: ClusterConfig(IN_B, discovery="STATIC",
                                                   static_endpoints=(EndpointConfig("127.0.0.1", app_port),))})
        if tcp:  # a tcp service: tcp_proxy behind the same chains
            inbound = ListenerConfig(name="inbound", tcp=TcpRoute("inbound", (WeightedCluster(IN_B, 1),)),
                                     tls=DownstreamTlsConfig(mode, TD_PREFIX))
        else:
            inbound = ListenerConfig(name="inbound", route_config=routes("inbound", IN_B),
                                     tls=DownstreamTlsConfig(mode, TD_PREFIX), xfcc_sanitize_set=True, xfcc_uri=True,
                                     rbac=rbac)
        self.b.apply_listeners({"inbound": inbound})
        await self.b.start_listeners(bind_socket("127.0.0.1", 0), b_in)
        # a: its outbound listener routes Host b to b's inbound listener, mTLS (auto: the endpoint is marked)
        alpn = ("h2",) if http2 else ("http/1.1",)
        self.a.apply_clusters({OUT_B: ClusterConfig(
            OUT_B, discovery="STATIC", http2=http2, tls=UpstreamTlsConfig(san=san, alpn=alpn, sni="outbound_.b.default"),
            static_endpoints=(EndpointConfig("127.0.0.1", self.b_port, mtls=True),))})
        if tcp:
            outbound = ListenerConfig(name="outbound", tcp=TcpRoute("outbound", (WeightedCluster(OUT_B, 1),)))
        else:
            outbound = ListenerConfig(name="outbound", route_config=routes("outbound", OUT_B))
        self.a.apply_listeners({"outbound": outbound})
        a_out = bind_socket("127.0.0.1", 0)
        self.a_port = a_out.getsockname()[1]
        await self.a.start_listeners(a_out, bind_socket("127.0.0.1", 0))

    @property
    def xfcc(self) -> str:
        """What b's app is told of a call from a: Hash is the SHA-256 of the certificate a holds."""
        return f"By={spiffe('b')};Hash={cert_sha256(self.a.tls.certificate_chain)};URI={spiffe('a')}"

    @property
    def b_stats(self):
        return self.b.listener_contexts["inbound"].stats

    @property
    def a_cluster(self):
        return self.a.clusters.get(OUT_B)

    async def close(self) -> None:
        for server in (self.a, self.b):
            for lst in server.listeners:
                await lst.close()
            server.clusters.close()
        if self.app is not None:
            self.app.close()


def routes(name: str, cluster: str) -> RouteConfig:
    return RouteConfig(name, (VirtualHost(name, ("*",), (Route(prefix="/", cluster=cluster),)),))


def with_mesh(loop: str, ca: Ca, test: Callable[[Mesh], Awaitable[None]], **start) -> None:
    async def body() -> None:
        mesh = Mesh(ca)
        try:
            await mesh.start(**start)
            await test(mesh)
        finally:
            await mesh.close()

    run(loop, body)


async def refused(port: int, ctx: ssl.SSLContext) -> bool:
    """A TLS client is turned away: the handshake fails, or (TLS 1.3: the server verifies the client
    after the client finished) the first request finds the connection closed."""
    client = None
    try:
        client = await Client.open(port, ctx)
        await client.get()
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return True
    finally:
        if client is not None:
            client.close()
    return False


async def closed(client: Client) -> bool:
    try:
        return await client.reader.read(1) == b""
    except ConnectionError:
        return True


# --- tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_permissive_takes_mtls_and_plaintext_and_sets_xfcc(loop, ca):
    async def test(mesh: Mesh) -> None:
        via_a = await Client.open(mesh.a_port)
        status, _, body = await via_a.get("/x", extra="x-forwarded-client-cert: By=forged\r\n")
        assert status == 200
        seen = json.loads(body)["headers"]
        assert seen["x-forwarded-client-cert"] == [mesh.xfcc]
        assert mesh.a_cluster.stats.ssl_handshake == 1 and mesh.b_stats.ssl_handshake == 1
        # plaintext straight to b's inbound listener: served, and a forged XFCC removed
        plain = await Client.open(mesh.b_port)
        status, _, body = await plain.get("/y", extra="X-Forwarded-Client-Cert: URI=spiffe://evil\r\n")
        assert status == 200 and "x-forwarded-client-cert" not in json.loads(body)["headers"]
        # keep-alive on both
        assert (await via_a.get("/x2"))[0] == 200 and (await plain.get("/y2"))[0] == 200
        assert mesh.a_cluster.stats.ssl_handshake == 1  # the pooled mTLS connection was reused
        via_a.close()
        plain.close()

    with_mesh(loop, ca, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_strict_refuses_plaintext_and_other_cas_and_no_client_cert(loop, ca):
    async def test(mesh: Mesh) -> None:
        plain = await Client.open(mesh.b_port)
        plain.writer.write(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
        assert await closed(plain)
        plain.close()
        assert mesh.b_stats.no_filter_chain_match == 1
        # a client certificate from another CA
        other_ca = Ca("elsewhere")
        stranger = TlsIdentity()
        give_identity(stranger, other_ca, other_ca.workload("a"))
        ctx = stranger.client_context(("http/1.1",))
        ctx.load_verify_locations(cadata=ca.bundle_pem.decode())  # it trusts b; b does not trust it
        assert await refused(mesh.b_port, ctx)
        await until(lambda: mesh.b_stats.ssl_fail_verify_error == 1)
        # no client certificate at all
        anon = ssl.create_default_context(cadata=ca.bundle_pem.decode())
        anon.check_hostname = False
        assert await refused(mesh.b_port, anon)
        await until(lambda: mesh.b_stats.ssl_fail_verify_no_cert == 1)
        # the mesh still works, mTLS
        via_a = await Client.open(mesh.a_port)
        assert (await via_a.get())[0] == 200
        assert mesh.b_stats.downstream_cx_total == 1  # only the mTLS one reached the HCM
        via_a.close()

    with_mesh(loop, ca, test, mode=TLS_STRICT)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_server_with_another_san_is_a_connect_failure(loop, ca):
    async def test(mesh: Mesh) -> None:
        via_a = await Client.open(mesh.a_port)
        status, headers, _ = await via_a.get()
        assert status == 503 and headers["x-meshkeeper-flags"] == "UF"
        assert mesh.a_cluster.stats.ssl_fail_verify_san == 1
        assert mesh.a_cluster.stats.upstream_cx_connect_fail == 1
        via_a.close()

    with_mesh(loop, ca, test, san=spiffe("c"))


@pytest.mark.parametrize("loop", LOOPS)
def test_h2_is_negotiated_by_alpn(loop, ca):
    async def test(mesh: Mesh) -> None:
        via_a = await Client.open(mesh.a_port)
        status, _, body = await via_a.get("/h2")
        assert status == 200
        assert json.loads(body)["headers"]["x-forwarded-client-cert"] == [mesh.xfcc]
        pool = next(iter(mesh.a_cluster.endpoints.values())).pool
        (conn,) = pool._h2
        assert conn._transport.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        via_a.close()

    with_mesh(loop, ca, test, http2=True)


@pytest.mark.parametrize("loop", LOOPS)
def test_rotation_keeps_open_connections_and_new_ones_use_the_new_certificate(loop, ca):
    async def test(mesh: Mesh) -> None:
        caller = TlsIdentity()
        give_identity(caller, ca, ca.workload("a"))
        ctx = caller.client_context(("http/1.1",))
        old = await Client.open(mesh.b_port, ctx)
        status, _, body = await old.get()
        assert status == 200
        # XFCC's Hash is this connection's client certificate (not a's sidecar's, the same SPIFFE ID)
        digest = cert_sha256(caller.certificate_chain)
        assert digest != cert_sha256(mesh.a.tls.certificate_chain)
        assert json.loads(body)["headers"]["x-forwarded-client-cert"] == \
            [f"By={spiffe('b')};Hash={digest};URI={spiffe('a')}"]
        old_serial = old.writer.get_extra_info("ssl_object").getpeercert()["serialNumber"]
        assert int(old_serial, 16) == mesh.b_workload.cert.serial_number
        key = new_key()
        rotated = ca.workload("b", key=key)
        mesh.b.tls.set_pending_key(rotated.key_pem)
        mesh.b.apply_secrets({"default": SecretConfig("default", certificate_chain=rotated.chain_pem)})
        assert (await old.get())[0] == 200  # the open connection keeps its certificate and works
        new = await Client.open(mesh.b_port, ctx)
        assert (await new.get())[0] == 200
        assert int(new.writer.get_extra_info("ssl_object").getpeercert()["serialNumber"], 16) == rotated.cert.serial_number
        old.close()
        new.close()

    with_mesh(loop, ca, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_without_an_identity_the_caller_sends_plaintext(loop, ca):
    async def test(mesh: Mesh) -> None:
        via_a = await Client.open(mesh.a_port)
        status, _, body = await via_a.get()
        assert status == 200 and "x-forwarded-client-cert" not in json.loads(body)["headers"]
        assert mesh.a_cluster.stats.ssl_handshake == 0 and mesh.b_stats.ssl_handshake == 0
        # b cannot terminate TLS without a certificate: a TLS caller is closed and counted
        caller = TlsIdentity()
        give_identity(caller, ca, ca.workload("a"))
        assert await refused(mesh.b_port, caller.client_context(("http/1.1",)))
        assert mesh.b_stats.ssl_connection_error == 1
        # once a gets its certificate, new connections are mTLS (idle plaintext ones were closed)
        give_identity(mesh.a.tls, ca, ca.workload("a"))
        give_identity(mesh.b.tls, ca, ca.workload("b"))
        status, _, body = await via_a.get()
        assert status == 200 and json.loads(body)["headers"]["x-forwarded-client-cert"] == [mesh.xfcc]
        via_a.close()

    with_mesh(loop, ca, test, identities=False)


@pytest.mark.parametrize("loop", LOOPS)
def test_rbac_on_the_inbound_listener(loop, ca):
    rbac = AuthzConfig("ALLOW", (AuthzPolicy("rule-0", (PermissionMatch(frozenset({b"GET"}), (b"/allowed",)),),
                                             (PrincipalMatch(exact=spiffe("a")),)),))

    async def test(mesh: Mesh) -> None:
        via_a = await Client.open(mesh.a_port)
        assert (await via_a.get("/allowed/x"))[0] == 200
        status, headers, body = await via_a.get("/other")
        assert status == 403 and headers["x-meshkeeper-flags"] == "RBAC"
        assert json.loads(body)["error"] == "RBAC: access denied"
        plain = await Client.open(mesh.b_port)  # no principal: denied
        assert (await plain.get("/allowed"))[0] == 403
        status, headers, _ = await plain.get("/allowed", extra="content-type: application/grpc\r\n")
        assert status == 200 and headers["grpc-status"] == "7" and headers["x-meshkeeper-flags"] == "RBAC"
        assert (mesh.b_stats.rbac_allowed, mesh.b_stats.rbac_denied) == (1, 3)
        via_a.close()
        plain.close()

    with_mesh(loop, ca, test, rbac=rbac)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_tcp_service_behind_strict_mtls_reached_by_a_tcp_proxy(loop, ca):
    async def test(mesh: Mesh) -> None:
        caller = TlsIdentity()
        give_identity(caller, ca, ca.workload("a"))
        client = await Client.open(mesh.b_port, caller.client_context(()))
        status, _, body = await client.get("/bytes")  # the app speaks HTTP; the tcp_proxy only carries bytes
        assert status == 200 and json.loads(body)["path"] == "/bytes"
        assert "x-forwarded-client-cert" not in json.loads(body)["headers"]
        client.close()
        plain = await Client.open(mesh.b_port)
        plain.writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await closed(plain)
        plain.close()
        assert (mesh.b_stats.ssl_handshake, mesh.b_stats.no_filter_chain_match) == (1, 1)
        # a's tcp_proxy originates mTLS to b as its HTTP pools do
        via_a = await Client.open(mesh.a_port)
        status, _, body = await via_a.get("/via-a")
        assert status == 200 and json.loads(body)["path"] == "/via-a"
        assert mesh.a_cluster.stats.ssl_handshake == 1 and mesh.b_stats.ssl_handshake == 2
        via_a.close()

    with_mesh(loop, ca, test, mode=TLS_STRICT, tcp=True)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tcp", [False, True], ids=["http", "tcp"])
def test_an_original_dst_cluster_with_tls_reaches_a_strict_instance_by_its_address(loop, ca, tcp):
    """Transparent mode's ``passthrough-mtls|<svc>.<ns>``: an app that dialled b's address itself
    (Dubbo/thrift style) reaches STRICT b through a's ORIGINAL_DST cluster with a TLS
    transport_socket, by a's HTTP connection manager or tcp_proxy; the plaintext one is closed."""
    import random

    from sidecar.interception.dispatch import Target
    from sidecar.l4 import TcpProxyConfig, TcpProxyRuntime

    secure, plain = "passthrough-mtls|b.default", "passthrough|b.default"

    async def test(mesh: Mesh) -> None:
        mesh.a.apply_clusters({
            secure: ClusterConfig(secure, discovery="ORIGINAL_DST",
                                  tls=UpstreamTlsConfig(san=spiffe("b"), alpn=("http/1.1",), sni="outbound_.b.default")),
            plain: ClusterConfig(plain, discovery="ORIGINAL_DST"),
        })
        dst = ("127.0.0.1", mesh.b_port)  # what SO_ORIGINAL_DST would have said
        loop_ = asyncio.get_running_loop()

        async def through(cluster: str) -> Client:
            if tcp:
                target = Target(cluster, tcp=((TcpProxyRuntime(TcpProxyConfig("t", cluster), mesh.a.clusters), 1),))
            else:
                mesh.a.apply_listeners({"outbound": ListenerConfig(name="outbound", route_config=routes("outbound", cluster))})
                target = Target(cluster, http=mesh.a.listener_contexts["outbound"])
            server = await loop_.create_server(lambda: target.protocol(dst, random.random), "127.0.0.1", 0)
            servers.append(server)
            return await Client.open(server.sockets[0].getsockname()[1])

        servers: list[asyncio.AbstractServer] = []
        try:
            client = await through(secure)
            status, _, body = await client.get("/direct")
            assert status == 200 and json.loads(body)["path"] == "/direct"
            if not tcp:
                assert json.loads(body)["headers"]["x-forwarded-client-cert"] == [mesh.xfcc]
            client.close()
            c = mesh.a.clusters.get(secure)
            assert c.stats.ssl_handshake == 1 and mesh.b_stats.ssl_handshake == 1
            if not tcp:  # HTTP lists the destination as a host of the cluster, with its TLS mode
                assert [ep["tls_mode"] for ep in c.admin_view()["endpoints"]] == ["mutual"]
            # the plaintext passthrough: STRICT b closes it
            client = await through(plain)
            try:
                status, _, _ = await client.get("/plain")
                assert status == 502  # UC: the bug this cluster fixes
            except (asyncio.IncompleteReadError, ConnectionError):
                assert tcp
            client.close()
            assert mesh.b_stats.no_filter_chain_match >= 1
        finally:
            for server in servers:
                server.close()

    with_mesh(loop, ca, test, mode=TLS_STRICT, tcp=tcp)
