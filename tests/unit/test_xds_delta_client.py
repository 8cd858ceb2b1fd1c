"""The sidecar's Delta ADS client against a scripted in-process DeltaAggregatedResources server
(real gRPC on 127.0.0.1), and the ``--xds-api`` flag that picks it."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.runtime.v3 import rtds_pb2
from google.protobuf import any_pb2, struct_pb2

from meshkeeper import xds
from meshkeeper.xds import NodeInfo
from sidecar import main as sidecar_main
from sidecar.xds.client import AdsClient
from sidecar.xds.delta import DeltaAdsClient
from tests.support.polling import until
from tests.unit.test_xds_client import ScriptedAds, eds_cluster
from tests.unit.test_xds_convert import cla, hcm_listener

SERVICE = "frontend"
GOOD, ODD = "outbound|good.default", "outbound|odd.default"


class RecordingSink:
    """Keeps what a sidecar would (LDS/CDS replaced, EDS/RDS merged) and every call it got."""

    def __init__(self):
        self.clusters, self.endpoints, self.listeners, self.routes = {}, {}, {}, {}
        self.cluster_calls: list[set[str]] = []
        self.runtime: list[tuple[dict, str]] = []

    def apply_clusters(self, clusters):
        self.clusters = dict(clusters)
        self.cluster_calls.append(set(clusters))

    def apply_endpoints(self, assignments):
        self.endpoints.update(assignments)

    def apply_listeners(self, listeners):
        self.listeners = dict(listeners)

    def apply_routes(self, routes):
        self.routes.update(routes)

    def apply_runtime(self, values, version):
        self.runtime.append((dict(values), version))


@pytest.fixture
async def delta_ads():
    server = grpc.aio.server()
    servicer = ScriptedAds()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.fixture
async def started(delta_ads):
    """(server, first stream's queue, client, sink), the client's first requests consumed."""
    server, target = delta_ads
    sink = RecordingSink()
    client = DeltaAdsClient(target, node(), sink, backoff_base=0.01, backoff_max=0.05)
    client.start()
    try:
        for _ in range(3):  # CDS, LDS, RTDS
            await next_request(server)
        yield server, await server.streams.get(), client, sink
    finally:
        await client.stop()


def node():
    return NodeInfo(node_id=f"sidecar~127.0.0.1~{SERVICE}-1.default", service=SERVICE, app_port=8080)


def delta(type_url, system_version, nonce, *resources, removed=()):
    """A DeltaDiscoveryResponse; ``resources`` are (version, message) pairs, named as the message is."""
    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=type_url, system_version_info=system_version, nonce=nonce,
                                                removed_resources=list(removed))
    for version, msg in resources:
        name = msg.cluster_name if type_url == xds.ENDPOINT else msg.name
        resp.resources.add(name=name, version=version).resource.Pack(msg)
    return resp


def runtime(name=SERVICE, **values):
    layer = struct_pb2.Struct()
    layer.update(values)
    return rtds_pb2.Runtime(name=name, layer=layer)


async def next_request(server, type_url=None, timeout=5):
    """The next request (of ``type_url``, skipping others when given)."""
    async with asyncio.timeout(timeout):
        while True:
            req = await server.requests.get()
            if type_url is None or req.type_url == type_url:
                return req


def is_ack(req, nonce):
    return (req.response_nonce == nonce and not req.HasField("error_detail")
            and not req.resource_names_subscribe and not req.resource_names_unsubscribe)


# --------------------------------------------------------------------------- subscription


async def test_first_requests_subscribe_wildcard_lds_cds_and_the_own_runtime_with_the_node(delta_ads):
    server, target = delta_ads
    client = DeltaAdsClient(target, node(), RecordingSink())
    client.start()
    try:
        cds, lds, rtds = [await next_request(server) for _ in range(3)]
        assert [r.type_url for r in (cds, lds, rtds)] == [xds.CLUSTER, xds.LISTENER, xds.RUNTIME]
        assert cds.node.id == f"sidecar~127.0.0.1~{SERVICE}-1.default"
        assert cds.node.metadata.fields["service"].string_value == SERVICE
        assert not lds.HasField("node") and not rtds.HasField("node")
        assert list(cds.resource_names_subscribe) == list(lds.resource_names_subscribe) == ["*"]
        assert list(rtds.resource_names_subscribe) == [SERVICE]
        for req in (cds, lds, rtds):
            assert not req.initial_resource_versions and req.response_nonce == ""
            assert not req.resource_names_unsubscribe
        assert not client.connected and client.connects == 0
        assert server.requests.empty()  # no EDS or RDS before CDS and LDS name some
    finally:
        await client.stop()


async def test_changes_and_removals_give_the_sink_the_whole_cluster_set_and_eds_follows_cds(started):
    server, stream, client, sink = started
    a, b = "outbound|a.default", "outbound|b.default"

    await stream.put(delta(xds.CLUSTER, "s1", "n1", ("1", eds_cluster(a))))
    assert is_ack(await next_request(server, xds.CLUSTER), "n1")
    sub = await next_request(server, xds.ENDPOINT)
    assert (list(sub.resource_names_subscribe), list(sub.resource_names_unsubscribe)) == ([a], [])
    assert sub.response_nonce == "" and not sub.initial_resource_versions
    st = client.state[xds.CLUSTER]
    assert sink.cluster_calls == [{a}] and (st.version, st.versions) == ("s1", {a: "1"})
    assert client.connected and client.connects == 1

    await stream.put(delta(xds.ENDPOINT, "e1", "n2", ("ea1", cla(a, ("127.0.0.1", 9001, 3, 1)))))
    assert is_ack(await next_request(server, xds.ENDPOINT), "n2")
    assert [e.weight for e in sink.endpoints[a]] == [3]

    # Only b is new: the sink is still given both.
    await stream.put(delta(xds.CLUSTER, "s2", "n3", ("1", eds_cluster(b))))
    assert is_ack(await next_request(server, xds.CLUSTER), "n3")
    sub = await next_request(server, xds.ENDPOINT)
    assert (list(sub.resource_names_subscribe), list(sub.resource_names_unsubscribe)) == ([b], [])
    assert sink.cluster_calls[-1] == {a, b} and client.state[xds.ENDPOINT].names == (a, b)

    # a removed: the sink gets the set without it, its EDS name is unsubscribed and forgotten.
    await stream.put(delta(xds.CLUSTER, "s3", "n4", removed=[a]))
    assert is_ack(await next_request(server, xds.CLUSTER), "n4")
    sub = await next_request(server, xds.ENDPOINT)
    assert (list(sub.resource_names_subscribe), list(sub.resource_names_unsubscribe)) == ([], [a])
    assert sink.cluster_calls[-1] == {b} and set(sink.clusters) == {b}
    assert (st.version, st.versions, set(st.raw)) == ("s3", {b: "1"}, {b})
    eds = client.state[xds.ENDPOINT]
    assert eds.names == (b,) and a not in eds.resources and a not in eds.versions

    # An assignment crossing the unsubscribe is not taken; b's is.
    await stream.put(delta(xds.ENDPOINT, "e2", "n5", ("ea2", cla(a, ("127.0.0.1", 9002, 1, 1))),
                           ("eb1", cla(b, ("127.0.0.1", 9003, 1, 1)))))
    assert is_ack(await next_request(server, xds.ENDPOINT), "n5")
    assert set(eds.resources) == {b} and eds.versions == {b: "eb1"}


async def test_one_bad_cluster_is_nacked_alone_the_rest_applies_and_it_keeps_its_last_value(started):
    server, stream, client, sink = started
    st = client.state[xds.CLUSTER]

    await stream.put(delta(xds.CLUSTER, "s1", "n1", ("1", eds_cluster(GOOD)),
                           ("1", eds_cluster(ODD, cluster_pb2.Cluster.MAGLEV))))
    nack = await next_request(server, xds.CLUSTER)
    assert nack.response_nonce == "n1" and nack.error_detail.code == 3  # INVALID_ARGUMENT
    assert ODD in nack.error_detail.message and "MAGLEV" in nack.error_detail.message
    assert GOOD not in nack.error_detail.message
    assert set(sink.clusters) == {GOOD}
    assert (st.version, st.versions, st.rejected, st.accepted) == ("", {GOOD: "1"}, 1, 0)
    assert list((await next_request(server, xds.ENDPOINT)).resource_names_subscribe) == [GOOD]

    # The odd one becomes valid, the good one turns bad: the good one keeps its value and version.
    await stream.put(delta(xds.CLUSTER, "s2", "n2", ("2", eds_cluster(GOOD, cluster_pb2.Cluster.RING_HASH)),
                           ("2", eds_cluster(ODD))))
    nack = await next_request(server, xds.CLUSTER)
    assert nack.response_nonce == "n2" and GOOD in nack.error_detail.message and ODD not in nack.error_detail.message
    assert set(sink.clusters) == {GOOD, ODD} and sink.clusters[GOOD].lb_policy == "round_robin"
    assert st.versions == {GOOD: "1", ODD: "2"} and st.version == ""
    assert st.raw[GOOD].lb_policy == cluster_pb2.Cluster.ROUND_ROBIN

    # A resource that does not decode is refused by its name; nothing is deleted.
    bad = discovery_pb2.DeltaDiscoveryResponse(type_url=xds.CLUSTER, system_version_info="s3", nonce="n3")
    bad.resources.add(name=GOOD, version="3", resource=any_pb2.Any(type_url=xds.CLUSTER, value=b"\xff\xff\xff"))
    await stream.put(bad)
    nack = await next_request(server, xds.CLUSTER)
    assert "does not decode" in nack.error_detail.message and GOOD in nack.error_detail.message
    assert set(sink.clusters) == {GOOD, ODD} and st.versions[GOOD] == "1"

    # A good value at last: ACKed, the version moves, the error is cleared.
    await stream.put(delta(xds.CLUSTER, "s4", "n4", ("4", eds_cluster(GOOD, cluster_pb2.Cluster.LEAST_REQUEST))))
    assert is_ack(await next_request(server, xds.CLUSTER), "n4")
    assert sink.clusters[GOOD].lb_policy == "least_request" and set(sink.clusters) == {GOOD, ODD}
    assert (st.version, st.versions, st.last_error) == ("s4", {GOOD: "4", ODD: "2"}, "")
    assert client.connects == 1


async def test_runtime_removed_means_empty_values(started):
    server, stream, client, sink = started
    await stream.put(delta(xds.RUNTIME, "r1", "n1", ("v1", runtime(color="blue")), ("v1", runtime("other", x=1))))
    assert is_ack(await next_request(server, xds.RUNTIME), "n1")
    assert sink.runtime == [({"color": "blue"}, "r1")]
    assert set(client.state[xds.RUNTIME].resources) == {SERVICE}  # another service's layer is not ours

    await stream.put(delta(xds.RUNTIME, "r2", "n2", ("v2", runtime(color=None))))
    nack = await next_request(server, xds.RUNTIME)
    assert "'color'" in nack.error_detail.message and sink.runtime[-1] == ({"color": "blue"}, "r1")

    await stream.put(delta(xds.RUNTIME, "r3", "n3", removed=[SERVICE]))
    assert is_ack(await next_request(server, xds.RUNTIME), "n3")
    assert sink.runtime[-1] == ({}, "r3")
    st = client.state[xds.RUNTIME]
    assert (st.version, st.resources, st.versions) == ("r3", {}, {})


async def test_synced_waits_for_referenced_names_and_initialized_stays(started):
    server, stream, client, _ = started
    x = "outbound|x.default"
    await stream.put(delta(xds.CLUSTER, "c1", "a", ("1", eds_cluster(x))))
    await stream.put(delta(xds.LISTENER, "l1", "b", ("1", hcm_listener())))
    rds = await next_request(server, xds.ROUTE)
    assert list(rds.resource_names_subscribe) == ["outbound"]
    assert not client.synced and not client.initialized
    await stream.put(delta(xds.ENDPOINT, "e1", "c", ("1", cla(x, ("127.0.0.1", 1, 1, 1)))))
    assert is_ack(await next_request(server, xds.ENDPOINT), "c")
    assert not client.synced  # RDS "outbound" still missing
    await stream.put(delta(xds.ROUTE, "r1", "d", ("1", route_pb2.RouteConfiguration(name="outbound"))))
    assert is_ack(await next_request(server, xds.ROUTE), "d")
    assert client.synced and client.initialized  # RTDS, never answered, holds nothing back

    # The assignment removed while its cluster stays: no longer synced, but still initialized.
    await stream.put(delta(xds.ENDPOINT, "e2", "e", removed=[x]))
    assert is_ack(await next_request(server, xds.ENDPOINT), "e")
    assert not client.synced and client.initialized
    assert client.state[xds.ENDPOINT].names == (x,)


async def test_a_reconnect_presents_the_versions_held(started):
    server, stream, client, sink = started
    a, b = "outbound|a.default", "outbound|b.default"
    await stream.put(delta(xds.CLUSTER, "s1", "n1", ("a1", eds_cluster(a)), ("b1", eds_cluster(b))))
    await stream.put(delta(xds.ENDPOINT, "e1", "n2", ("ea1", cla(a, ("127.0.0.1", 1, 1, 1)))))
    await stream.put(delta(xds.CLUSTER, "s2", "n3", ("b2", eds_cluster(b, cluster_pb2.Cluster.MAGLEV))))  # refused
    await stream.put(delta(xds.LISTENER, "l1", "n4", ("o1", hcm_listener())))
    await stream.put(delta(xds.RUNTIME, "r1", "n5", ("rt1", runtime(color="blue"))))
    assert is_ack(await next_request(server, xds.RUNTIME), "n5")

    await stream.put(None)  # the control plane goes away
    await until(lambda: not client.connected, limit=5)
    cds, eds, lds, rds, rtds = [await next_request(server) for _ in range(5)]
    assert [r.type_url for r in (cds, eds, lds, rds, rtds)] == [xds.CLUSTER, xds.ENDPOINT, xds.LISTENER,
                                                                xds.ROUTE, xds.RUNTIME]
    assert cds.node.id and not any(r.HasField("node") for r in (eds, lds, rds, rtds))
    assert list(cds.resource_names_subscribe) == list(lds.resource_names_subscribe) == ["*"]
    assert dict(cds.initial_resource_versions) == {a: "a1", b: "b1"}  # b's refused b2 is not held
    assert (list(eds.resource_names_subscribe), dict(eds.initial_resource_versions)) == ([a, b], {a: "ea1"})
    assert dict(lds.initial_resource_versions) == {"outbound": "o1"}
    assert (list(rds.resource_names_subscribe), dict(rds.initial_resource_versions)) == (["outbound"], {})
    assert (list(rtds.resource_names_subscribe), dict(rtds.initial_resource_versions)) == ([SERVICE], {SERVICE: "rt1"})
    assert all(r.response_nonce == "" for r in (cds, eds, lds, rds, rtds))

    # Nothing changed meanwhile: an empty answer keeps everything held, on the new stream's nonces.
    stream = await server.streams.get()
    await stream.put(delta(xds.CLUSTER, "s2", "m1"))
    assert is_ack(await next_request(server, xds.CLUSTER), "m1")
    assert client.connects == 2 and sink.cluster_calls[-1] == {a, b}
    assert client.state[xds.CLUSTER].version == "s2"


# --------------------------------------------------------------------------- the flag


def test_xds_api_picks_the_client_delta_by_default_and_workers_get_it(monkeypatch):
    base = ["--service", SERVICE, "--app-port", "8080"]
    assert sidecar_main.parse_args(base).xds_api == "delta"
    args = sidecar_main.parse_args([*base, "--xds-api", "delta", "--workers", "2"])
    assert sidecar_main.ads_client_class(args.xds_api) is DeltaAdsClient
    assert sidecar_main.ads_client_class("sotw") is AdsClient

    spawned = []

    class FakePopen:
        def __init__(self, argv, pass_fds=(), env=None):
            spawned.append(list(argv))

    monkeypatch.setattr(sidecar_main.subprocess, "Popen", FakePopen)
    for w in sidecar_main._spawn_workers(args, 15001, 15006):
        w.ready.close()
    [argv] = spawned
    assert sidecar_main.parse_args(argv[argv.index("sidecar") + 1:]).xds_api == "delta"


def test_workers_get_the_identity_token_by_the_environment_not_argv(monkeypatch, tmp_path):
    token = f"mk1.default.{SERVICE}.abc"
    (tmp_path / "token").write_text(token + "\n")
    args = sidecar_main.parse_args(["--service", SERVICE, "--app-port", "8080", "--workers", "2",
                                    "--identity-token-file", str(tmp_path / "token")])
    assert args.identity_token == token
    spawned = []

    class FakePopen:
        def __init__(self, argv, pass_fds=(), env=None):
            spawned.append((list(argv), env))

    monkeypatch.setattr(sidecar_main.subprocess, "Popen", FakePopen)
    for w in sidecar_main._spawn_workers(args, 15001, 15006):
        w.ready.close()
    [(argv, env)] = spawned
    assert token not in " ".join(argv)
    assert env["MESHKEEPER_IDENTITY_TOKEN"] == token
