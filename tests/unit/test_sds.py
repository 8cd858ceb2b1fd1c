"""SDS on the ADS stream (docs/identity.md), end to end on real gRPC: the control plane's AdsServer
with a real CA, and the sidecar's ADS client (both variants) with its real TlsIdentity and
IdentityAgent. The sidecar's key never leaves it; its token decides the identity it gets."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.ads import SERVER_OPTIONS, AdsServer, add_to_server
from controlplane.ca import Issuer
from controlplane.cache import SnapshotCache
from controlplane.proxies import ProxyRegistry
from meshkeeper import xds
from meshkeeper.identity import CSR_METADATA, SECRET_DEFAULT, SECRET_ROOTCA
from meshkeeper.xds import NodeInfo
from sidecar.identity import IdentityAgent, read_token
from sidecar.identity.keys import new_key
from sidecar.tls import TlsIdentity
from sidecar.xds.client import AdsClient, build_node
from sidecar.xds.delta import DeltaAdsClient
from tests.support.fakes import async_test, until
from tests.unit.test_ads_delta import mesh
from tests.unit.test_cp_replicas import Sink as ConfigSink

NODE = NodeInfo(node_id=NodeInfo.make_id("127.0.0.1", "svc0", 15006, "default"), service="svc0",
                app_port=8080, inbound_port=15006, outbound_port=15001)
CLIENTS = [AdsClient, DeltaAdsClient]


class Sink(ConfigSink):
    """The sidecar's config sink, secrets going to a real TlsIdentity."""

    def __init__(self) -> None:
        super().__init__()
        self.tls = TlsIdentity()

    def apply_secrets(self, secrets):
        self.tls.apply_secrets(secrets)


class ControlPlane:
    def __init__(self, issuer: Issuer | None) -> None:
        self.cache = SnapshotCache()
        self.cache.set_snapshot(mesh(1, 2))
        self.proxies = ProxyRegistry()
        self.ads = AdsServer(self.cache, self.proxies, issuer=issuer)

    async def __aenter__(self) -> str:
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        add_to_server(self.server, self.ads)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    async def __aexit__(self, *exc) -> None:
        await self.server.stop(None)


def leaf(tls: TlsIdentity) -> x509.Certificate:
    return x509.load_pem_x509_certificates(tls.certificate_chain)[0]


def public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@contextlib.asynccontextmanager
async def sidecar(target: str, client_class=DeltaAdsClient, token: str = "", **agent_args):
    """A sidecar's ADS client and, with a token, its IdentityAgent, started; (sink, client, agent)."""
    sink = Sink()
    client = client_class(target, NODE, sink, backoff_base=0.01, backoff_max=0.05, token=token)
    agent = IdentityAgent(sink.tls, client, **agent_args) if token else None
    if agent is not None:
        agent.start()
    client.start()
    try:
        yield sink, client, agent
    finally:
        if agent is not None:
            agent.stop()
        await client.stop()


@pytest.mark.parametrize("client_class", CLIENTS)
@async_test
async def test_a_sidecar_with_a_token_gets_a_certificate_for_its_own_key_and_service(client_class):
    issuer = Issuer.generate(ttl=3600)
    keys = []
    async with ControlPlane(issuer) as target, sidecar(
            target, client_class, issuer.mint_token("default", "svc0"),
            new_key=lambda: keys.append(new_key()) or keys[-1]) as (sink, client, _):
        await until(lambda: sink.tls.ready and client.initialized, 5)
        cert = leaf(sink.tls)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(u) for u in sans.get_values_for_type(x509.UniformResourceIdentifier)] == [
            "spiffe://meshkeeper.local/ns/default/sa/svc0"]
        assert sink.tls.spiffe_id == "spiffe://meshkeeper.local/ns/default/sa/svc0"
        key = serialization.load_pem_private_key(keys[0][0], None)
        assert public_der(cert.public_key()) == public_der(key.public_key())
        assert sink.tls.trust_bundle == issuer.bundle_pem
        assert client.state[xds.SECRET].rejected == 0
        # What the control plane sent holds the chain, never a key.
        raw = client.state[xds.SECRET].raw[SECRET_DEFAULT]
        assert not raw.tls_certificate.HasField("private_key")


@pytest.mark.parametrize("client_class", CLIENTS)
@async_test
async def test_rotation_certifies_a_new_key_and_keeps_the_old_until_its_chain_arrives(client_class):
    issuer = Issuer.generate(ttl=3600)
    async with ControlPlane(issuer) as target, sidecar(
            target, client_class, issuer.mint_token("default", "svc0")) as (sink, client, agent):
        await until(lambda: sink.tls.ready, 5)
        first = leaf(sink.tls)
        server_ctx = sink.tls.server_context()
        agent.rotate()  # as the half-life timer does
        await until(lambda: leaf(sink.tls).serial_number != first.serial_number, 5)
        second = leaf(sink.tls)
        assert public_der(second.public_key()) != public_der(first.public_key())  # a new key
        assert sink.tls.server_context() is not server_ctx  # new connections use the new one
        assert not sink.tls.has_pending_key
        assert client.state[xds.SECRET].rejected == 0
        assert agent.rotations == 1


@async_test
async def test_the_agent_schedules_the_next_rotation_at_half_the_remaining_life():
    issuer = Issuer.generate(ttl=10)
    async with ControlPlane(issuer) as target, sidecar(
            target, token=issuer.mint_token("default", "svc0")) as (sink, _, agent):
        await until(lambda: sink.tls.ready, 5)
        assert agent._timer is not None
        delay = agent._timer.when() - asyncio.get_running_loop().time()
        assert 3.5 < delay <= 5.0  # half of the ~10 s left


@pytest.mark.parametrize("client_class", CLIENTS)
@async_test
async def test_a_token_for_another_service_or_a_forged_one_ends_the_stream(client_class):
    issuer = Issuer.generate(ttl=3600)
    other_ca = Issuer.generate(ttl=3600)
    for token, code in ((issuer.mint_token("default", "svc1"), grpc.StatusCode.PERMISSION_DENIED),
                        (other_ca.mint_token("default", "svc0"), grpc.StatusCode.UNAUTHENTICATED)):
        async with ControlPlane(issuer) as target:
            channel = grpc.aio.insecure_channel(target)
            node = build_node(NODE)
            node.metadata.update({CSR_METADATA: new_key()[1].decode()})
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            req = discovery_pb2.DiscoveryRequest(type_url=xds.SECRET, node=node,
                                                 resource_names=[SECRET_DEFAULT, SECRET_ROOTCA])
            call = (stub.StreamAggregatedResources if client_class is AdsClient else None)
            if call is None:
                req = discovery_pb2.DeltaDiscoveryRequest(type_url=xds.SECRET, node=node,
                                                          resource_names_subscribe=[SECRET_DEFAULT, SECRET_ROOTCA])
                call = stub.DeltaAggregatedResources

            async def once(r=req):
                yield r

            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call(once(), metadata=(("authorization", f"Bearer {token}"),)):
                    pass
            assert err.value.code() == code
            await channel.close()


@pytest.mark.parametrize("client_class", CLIENTS)
@async_test
async def test_without_a_token_or_a_ca_a_sidecar_gets_no_certificate_and_stays_plaintext(client_class):
    issuer = Issuer.generate(ttl=3600)
    for cp_issuer, token in ((issuer, ""), (None, issuer.mint_token("default", "svc0"))):
        async with ControlPlane(cp_issuer) as target, sidecar(target, client_class, token) as (sink, client, _):
            # Ready all the same: a control plane without a CA answers the subscription empty.
            await until(lambda c=client: c.initialized, 5)
            assert not sink.tls.ready and sink.tls.client_context(("http/1.1",)) is None
            assert client.state[xds.SECRET].rejected == 0


def test_a_bootstrap_token_is_checked_for_its_shape_in_one_line():
    assert read_token(" mk1.default.svc0.abc_-9\n", "--identity-token-file") == "mk1.default.svc0.abc_-9"
    for bad in ("", "mk2.default.svc0.x", "mk1.default.svc0", "mk1.Default.svc0.x", "mk1.default.svc0.x y"):
        with pytest.raises(ValueError, match="^--identity-token-file: not a Meshkeeper bootstrap token"):
            read_token(bad, "--identity-token-file")
