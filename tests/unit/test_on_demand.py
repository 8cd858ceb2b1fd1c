"""On-demand discovery on the outbound listener (sidecar.proxy.on_demand), through fake transports:
a request for a service the sidecar does not know is held, its body buffered, until the service
arrives (then routed), the control plane says it does not exist, or the hold times out (404 NR)."""

from __future__ import annotations

import asyncio

from sidecar.config import Route, RouteConfig, VirtualHost
from sidecar.proxy.on_demand import OnDemand
from tests.support.fakes import async_test, until
from tests.unit.test_http_proxy import OK, Mesh, assert_local_reply, parse_responses

CLUSTER = "outbound|later.default"


class Env:
    def __init__(self) -> None:
        self.mesh = Mesh()
        self.rt = self.mesh.runtime
        self.asked: list[str] = []
        self.known: set[str] = set()
        self.on_demand = self.rt.on_demand = OnDemand("default", self.asked.append, self.known.__contains__,
                                                      self.rt.stats)

    def arrive(self, service: str) -> None:
        """The control plane sent the service: its virtual host (to the mesh's cluster ``svc``)."""
        self.rt.set_route_config(RouteConfig("outbound", (
            VirtualHost("svc", ("svc",), (Route("/", "svc"),)),
            VirtualHost(service, (service, f"{service}.default", f"{service}:*", f"{service}.default:*"),
                        (Route("/", "svc"),)),
        )))
        self.known.add(service)
        self.on_demand.config_changed()


@async_test
async def test_a_request_for_an_unknown_service_is_held_with_its_body_then_routed() -> None:
    env = Env()
    client = env.mesh.client()
    client.send(b"POST /x HTTP/1.1\r\nHost: later.default:8080\r\nContent-Length: 10\r\n\r\nhello")
    assert env.asked == [CLUSTER]
    client.send(b"world")
    assert client.received() == b"" and env.mesh.connector.connections == []
    second = env.mesh.client()
    second.send(b"GET / HTTP/1.1\r\nHost: later\r\n\r\n")
    assert env.asked == [CLUSTER]  # one subscription for any number of held requests
    env.arrive("later")
    ups = [await env.mesh.upstream(0), await env.mesh.upstream(1)]
    await until(lambda: all(up.transport.out for up in ups))
    got = {up.received(request_ids=1): up for up in ups}
    post = next(data for data in got if data.startswith(b"POST /x HTTP/1.1\r\n"))
    assert post.endswith(b"\r\n\r\nhelloworld")
    assert any(data.startswith(b"GET / HTTP/1.1\r\n") for data in got)
    got[post].respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200
    assert (env.rt.stats.rq_on_demand_held, env.rt.stats.rq_on_demand_routed) == (2, 2)


@async_test
async def test_a_service_that_does_not_exist_gets_404_at_once_and_is_not_asked_for_again() -> None:
    env = Env()
    client = env.mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: nosuch\r\n\r\n")
    assert env.asked == ["outbound|nosuch.default"] and client.received() == b""
    env.on_demand.missing("outbound|nosuch.default")
    assert_local_reply(parse_responses(client.received())[0], 404, "NR")
    client.send(b"GET / HTTP/1.1\r\nHost: nosuch\r\n\r\n")  # the same connection, kept alive
    assert_local_reply(parse_responses(client.received())[0], 404, "NR")
    assert env.asked == ["outbound|nosuch.default"]
    env.on_demand.clusters_changed()  # it may exist now: asked for again
    client.send(b"GET / HTTP/1.1\r\nHost: nosuch\r\n\r\n")
    assert env.asked == ["outbound|nosuch.default"] * 2
    assert env.rt.stats.rq_on_demand_missing == 1


@async_test
async def test_a_held_request_gets_404_when_the_hold_times_out_and_the_connection_stays_usable() -> None:
    env = Env()
    env.on_demand.hold_timeout = 0.05
    client = env.mesh.client()
    client.send(b"POST / HTTP/1.1\r\nHost: later\r\nContent-Length: 70000\r\n\r\n" + b"y" * 70000)
    await until(lambda: client.transport.out)
    assert_local_reply(parse_responses(client.received())[0], 404, "NR")
    assert env.rt.stats.rq_on_demand_timeout == 1 and env.on_demand._waiting == {}
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")  # reading resumed: the next request is served
    up = await env.mesh.upstream()
    await until(lambda: up.transport.out)
    up.respond(OK)
    assert parse_responses(client.received())[0]["status"] == 200


@async_test
async def test_a_client_that_leaves_while_held_leaves_nothing_behind() -> None:
    env = Env()
    client = env.mesh.client()
    client.send(b"GET / HTTP/1.1\r\nHost: later\r\n\r\n")
    assert env.on_demand._waiting
    client.transport.peer_close()
    await asyncio.sleep(0)
    assert env.on_demand._waiting == {}
    env.arrive("later")
    assert env.mesh.connector.connections == []


@async_test
async def test_hosts_that_name_no_service_of_the_namespace_are_not_held() -> None:
    env = Env()
    client = env.mesh.client()
    for host in (b"catalog.other", b"10.0.0.7:8080", b"[::1]:80", b"Bad_Name"):
        client.send(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert_local_reply(parse_responses(client.received())[0], 404, "NR")
    assert env.asked == []
