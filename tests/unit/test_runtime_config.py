"""Runtime config (RTDS) in the sidecar: conversion, the ADS subscription against a real in-process
grpc.aio ADS server, and ``GET /runtime`` (with its long poll) on a real admin socket."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.runtime.v3 import rtds_pb2
from google.protobuf import struct_pb2

from meshkeeper import xds
from meshkeeper.httpd import HttpServer
from meshkeeper.xds import NodeInfo
from sidecar.admin import MAX_RUNTIME_WAIT, AdminServer
from sidecar.runtime import RuntimeLayer
from sidecar.server import Server
from sidecar.xds import convert
from sidecar.xds.client import AdsClient
from tests.unit.test_xds_client import Sink, ads, eds_cluster, next_request, response  # noqa: F401  (ads: fixture)
from tests.unit.test_xds_convert import hcm_listener

SERVICE, NAMESPACE = "catalog", "shop"


def layer(**values) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def rt_resource(name: str = SERVICE, **values) -> rtds_pb2.Runtime:
    return rtds_pb2.Runtime(name=name, layer=layer(**values))


def sidecar_node() -> NodeInfo:
    return NodeInfo(node_id=f"sidecar~127.0.0.1~{SERVICE}-15006.{NAMESPACE}", service=SERVICE,
                    namespace=NAMESPACE, app_port=8080)


async def wait_for(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate`` on the loop until it holds, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- conversion


def test_runtime_layer_is_flattened_into_strings():
    cfg = convert.runtime(rt_resource(
        greeting="hello", retries=5, ratio=0.5, big=1e300, negative=-3, on=True, off=False,
        feature={"checkout": {"enabled": True, "limit": 10}, "name": "new"}))
    assert cfg.name == SERVICE
    assert dict(cfg.values) == {
        "greeting": "hello", "retries": "5", "ratio": "0.5", "big": "1e+300", "negative": "-3",
        "on": "true", "off": "false",
        "feature.checkout.enabled": "true", "feature.checkout.limit": "10", "feature.name": "new"}
    assert convert.runtime(rtds_pb2.Runtime(name=SERVICE)).values == {}


@pytest.mark.parametrize(("values", "key", "what"), [
    ({"a": None}, "a", "null"),
    ({"a": {"b": None}}, "a.b", "null"),
    ({"tags": ["x", "y"]}, "tags", "list"),
    ({"a": {"b": [1]}}, "a.b", "list"),
    ({"a.b": "1", "a": {"b": "2"}}, "a.b", "twice"),
    ({"n": float("nan")}, "n", "finite"),
])
def test_a_layer_value_that_is_not_a_string_number_or_bool_is_refused_naming_the_key(values, key, what):
    with pytest.raises(convert.XdsError) as info:
        convert.runtime(rt_resource(**values))
    msg = str(info.value)
    assert f"runtime {SERVICE!r}" in msg and repr(key) in msg and what in msg


class RecordingSink(Sink):
    def __init__(self):
        super().__init__()
        self.runtime: list[tuple[dict, str]] = []

    def apply_runtime(self, values, version):
        self.runtime.append((dict(values), version))


def test_client_nacks_a_bad_layer_keeps_the_values_and_a_missing_resource_means_empty():
    """The response handling itself, with no stream (requests go nowhere)."""
    sink = RecordingSink()
    client = AdsClient("127.0.0.1:1", sidecar_node(), sink)
    st = client.state[xds.RUNTIME]
    assert st.names == (SERVICE,)

    client._on_response(response(xds.RUNTIME, "r1", "n1", rt_resource(color="blue", other=1)))
    assert sink.runtime == [({"color": "blue", "other": "1"}, "r1")]
    assert st.version == "r1" and st.accepted == 1

    client._on_response(response(xds.RUNTIME, "r2", "n2", rt_resource(color=None)))
    assert sink.runtime == [({"color": "blue", "other": "1"}, "r1")]  # not applied
    assert st.version == "r1" and st.rejected == 1
    assert "'color'" in st.last_error and f"runtime {SERVICE!r}" in st.last_error
    assert dict(st.resources[SERVICE].values) == {"color": "blue", "other": "1"}

    # Another service's resource is not ours: ignored, and the own one missing means empty.
    client._on_response(response(xds.RUNTIME, "r3", "n3", rt_resource("frontend", color=None)))
    assert sink.runtime[-1] == ({}, "r3")
    assert st.version == "r3" and st.resources == {} and st.last_error == ""


# --------------------------------------------------------------------------- the live values


def test_runtime_layer_moves_only_with_the_version():
    rl = RuntimeLayer()
    assert (rl.version, dict(rl.values)) == ("", {})
    assert rl.apply({"b": "2", "a": "1"}, "v1")
    assert list(rl.values) == ["a", "b"] and rl.version == "v1"
    assert not rl.apply({"b": "2", "a": "1"}, "v1")  # a reconnect re-sends the same version
    assert rl.apply({}, "v2") and dict(rl.values) == {} and rl.updates == 2


# --------------------------------------------------------------------------- /runtime over a real socket


async def get(port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 GET on its own connection (Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0]:
        raise ConnectionError("the connection closed without an answer")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
async def admin():
    rt = Server(sidecar_node())
    server = AdminServer(rt)
    port = await server.start("127.0.0.1", 0)
    yield rt, port
    await server.stop()


async def test_runtime_answers_the_contract_shape(admin):
    rt, port = admin
    status, headers, body = await get(port, "/runtime")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"service": SERVICE, "namespace": NAMESPACE, "version": "", "values": {}}
    assert headers["x-meshkeeper-runtime-version"] == ""

    rt.apply_runtime({"color": "blue", "limit": "10"}, "r1")
    status, headers, body = await get(port, "/runtime")
    assert status == 200 and headers["x-meshkeeper-runtime-version"] == "r1"
    assert json.loads(body) == {"service": SERVICE, "namespace": NAMESPACE, "version": "r1",
                                "values": {"color": "blue", "limit": "10"}}


async def test_long_poll_with_the_current_version_is_held_until_new_values_apply(admin):
    rt, port = admin
    rt.apply_runtime({"color": "blue"}, "r1")
    poll = asyncio.create_task(get(port, "/runtime?version=r1&wait=30"))
    await wait_for(lambda: rt.runtime_layer.waiting == 1, what="the poll to be parked")
    assert not poll.done()
    rt.apply_runtime({"color": "green"}, "r2")
    async with asyncio.timeout(5):  # far below the 30 s wait: woken by the change
        status, headers, body = await poll
    assert status == 200 and headers["x-meshkeeper-runtime-version"] == "r2"
    assert json.loads(body)["values"] == {"color": "green"}
    assert rt.runtime_layer.waiting == 0


async def test_long_poll_with_a_stale_version_returns_at_once(admin):
    rt, port = admin
    rt.apply_runtime({"color": "blue"}, "r2")
    async with asyncio.timeout(5):
        status, headers, body = await get(port, "/runtime?version=r1&wait=300")
    assert status == 200 and json.loads(body)["version"] == "r2"
    async with asyncio.timeout(5):  # no wait given: the version alone decides
        status, _, body = await get(port, "/runtime?version=")
    assert json.loads(body)["version"] == "r2"


async def test_long_poll_returns_after_wait_when_nothing_changes(admin):
    rt, port = admin
    rt.apply_runtime({"color": "blue"}, "r1")
    started = time.monotonic()
    async with asyncio.timeout(5):
        status, headers, body = await get(port, "/runtime?version=r1&wait=0.3")
    elapsed = time.monotonic() - started
    assert status == 200 and json.loads(body)["version"] == "r1"
    assert 0.29 <= elapsed < 3


@pytest.mark.parametrize("wait", ["abc", "-1", "nan", "inf", ""])
async def test_bad_wait_is_400_with_a_json_error(admin, wait):
    _, port = admin
    status, headers, body = await get(port, f"/runtime?version=r1&wait={wait}")
    assert status == 400 and headers["content-type"] == "application/json"
    assert "wait" in json.loads(body)["error"]


async def test_wait_defaults_to_60_and_is_capped_at_300(admin, monkeypatch):
    rt, port = admin
    seen: list[tuple[str, float]] = []

    async def record(version, timeout):
        seen.append((version, timeout))

    monkeypatch.setattr(rt.runtime_layer, "wait_change", record)
    await get(port, "/runtime?version=x")
    await get(port, "/runtime?version=y&wait=1000")
    await get(port, "/runtime?version=z&wait=2.5")
    assert seen == [("x", 60.0), ("y", MAX_RUNTIME_WAIT), ("z", 2.5)]


async def test_many_held_polls_all_return_on_one_change_and_a_gone_caller_leaves_nothing(admin):
    rt, port = admin
    rt.apply_runtime({}, "r1")
    polls = [asyncio.create_task(get(port, "/runtime?version=r1&wait=60")) for _ in range(50)]
    # One more caller that hangs up while parked.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /runtime?version=r1&wait=60 HTTP/1.1\r\nHost: admin\r\n\r\n")
    await writer.drain()
    await wait_for(lambda: rt.runtime_layer.waiting == 51, what="51 parked polls")
    writer.close()
    await wait_for(lambda: rt.runtime_layer.waiting == 50, what="the gone caller's poll to end")
    assert not any(p.done() for p in polls)
    rt.apply_runtime({"k": "v"}, "r2")
    async with asyncio.timeout(10):
        answers = await asyncio.gather(*polls)
    assert {json.loads(body)["version"] for _, _, body in answers} == {"r2"}
    assert rt.runtime_layer.waiting == 0


async def test_the_idle_timeout_does_not_cut_a_held_poll():
    """meshkeeper.httpd closes idle connections; a connection whose request is being answered is
    not idle, however long the answer takes."""
    rt = Server(sidecar_node())
    rt.apply_runtime({}, "r1")
    server = await HttpServer.start(AdminServer(rt).handle, "127.0.0.1", 0, idle_timeout=0.1)
    try:
        started = time.monotonic()
        async with asyncio.timeout(5):
            status, _, body = await get(server.port, "/runtime?version=r1&wait=0.5")
        assert status == 200 and json.loads(body)["version"] == "r1"
        assert time.monotonic() - started >= 0.45
    finally:
        await server.close()


# --------------------------------------------------------------------------- over ADS


async def test_client_subscribes_rtds_by_name_and_the_values_reach_the_runtime(ads):  # noqa: F811
    server, target = ads
    rt = Server(sidecar_node())
    client = AdsClient(target, sidecar_node(), rt, backoff_base=0.01, backoff_max=0.05)
    rt.ads = client
    admin_server = AdminServer(rt)
    port = await admin_server.start("127.0.0.1", 0)
    client.start()
    try:
        first = await next_request(server, xds.CLUSTER)
        assert first.node.id  # the node goes on the stream's first request
        sub = await next_request(server, xds.RUNTIME)
        assert list(sub.resource_names) == [SERVICE] and sub.version_info == "" and sub.response_nonce == ""
        stream = await server.streams.get()

        await stream.put(response(xds.RUNTIME, "r1", "n1", rt_resource(color="blue", limit=10)))
        ack = await next_request(server, xds.RUNTIME)
        assert (ack.version_info, ack.response_nonce, ack.HasField("error_detail")) == ("r1", "n1", False)
        assert list(ack.resource_names) == [SERVICE]
        assert (rt.runtime_layer.version, dict(rt.runtime_layer.values)) == ("r1", {"color": "blue", "limit": "10"})

        # A long poll is answered as soon as an RTDS response with new values is accepted.
        poll = asyncio.create_task(get(port, "/runtime?version=r1&wait=30"))
        await wait_for(lambda: rt.runtime_layer.waiting == 1, what="the poll to be parked")
        await stream.put(response(xds.RUNTIME, "r2", "n2", rt_resource(color="green")))
        async with asyncio.timeout(5):
            status, headers, body = await poll
        assert status == 200 and headers["x-meshkeeper-runtime-version"] == "r2"
        assert json.loads(body)["values"] == {"color": "green"}
        await next_request(server, xds.RUNTIME)

        # A bad layer is NACKed naming it; the values and the version stay.
        await stream.put(response(xds.RUNTIME, "r3", "n3", rt_resource(color=["a"])))
        nack = await next_request(server, xds.RUNTIME)
        assert nack.response_nonce == "n3" and nack.version_info == "r2"
        assert f"runtime {SERVICE!r}" in nack.error_detail.message and "'color'" in nack.error_detail.message
        assert (rt.runtime_layer.version, dict(rt.runtime_layer.values)) == ("r2", {"color": "green"})

        # /config_dump shows it.
        _, _, body = await get(port, "/config_dump")
        dump = json.loads(body)["configs"]["runtime"]
        assert dump["version_info"] == "r2" and dump["subscribed"] == [SERVICE] and dump["rejected"] == 1
        assert "'color'" in dump["last_nack"]
        assert dump["resources"] == [{"name": SERVICE, "layer": {"color": "green"}}]

        # The response without the service's resource: empty values.
        await stream.put(response(xds.RUNTIME, "r4", "n4"))
        ack = await next_request(server, xds.RUNTIME)
        assert ack.version_info == "r4" and not ack.HasField("error_detail")
        assert (rt.runtime_layer.version, dict(rt.runtime_layer.values)) == ("r4", {})

        # After a reconnect the subscription is made again, presenting the version held.
        await stream.put(None)
        again = await next_request(server, xds.RUNTIME)
        assert list(again.resource_names) == [SERVICE] and again.version_info == "r4"
        assert again.response_nonce == ""
    finally:
        await client.stop()
        await admin_server.stop()


async def test_rtds_does_not_hold_back_readiness(ads):  # noqa: F811
    server, target = ads
    sink = RecordingSink()
    client = AdsClient(target, sidecar_node(), sink)
    client.start()
    try:
        await next_request(server, xds.RUNTIME)  # subscribed, never answered
        stream = await server.streams.get()
        await stream.put(response(xds.CLUSTER, "c1", "a", eds_cluster("outbound|x.shop")))
        await stream.put(response(xds.LISTENER, "l1", "b", hcm_listener()))
        await next_request(server, xds.ROUTE)
        from tests.unit.test_xds_convert import cla
        await stream.put(response(xds.ENDPOINT, "e1", "c", cla("outbound|x.shop", ("127.0.0.1", 1, 1, 1))))
        await stream.put(response(xds.ROUTE, "r1", "d", route_pb2.RouteConfiguration(name="outbound")))
        await wait_for(lambda: client.state[xds.ROUTE].version == "r1", what="RDS accepted")
        assert client.state[xds.ENDPOINT].version == "e1"
        assert client.synced and client.initialized
        assert not client.state[xds.RUNTIME].received and sink.runtime == []
    finally:
        await client.stop()


def test_a_runtime_response_of_another_type_is_refused_whole():
    sink = RecordingSink()
    client = AdsClient("127.0.0.1:1", sidecar_node(), sink)
    client._on_response(response(xds.RUNTIME, "r1", "n1", rt_resource(color="blue")))
    bad = discovery_pb2.DiscoveryResponse(type_url=xds.RUNTIME, version_info="r2", nonce="n2")
    bad.resources.add(type_url=xds.RUNTIME, value=b"\xff\xff\xff")
    client._on_response(bad)
    st = client.state[xds.RUNTIME]
    assert st.version == "r1" and "does not decode" in st.last_error
    assert sink.runtime == [({"color": "blue"}, "r1")]
