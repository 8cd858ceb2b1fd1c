"""The listener's local rate limit: the token bucket on a fake clock, its plumbing from LDS, and the
429 RL local reply through a connection manager on fake transports."""

from __future__ import annotations

import pytest

from meshkeeper import xds
from meshkeeper.xds import NodeInfo
from sidecar.config import ListenerConfig, RateLimitConfig, Route, RouteConfig, VirtualHost
from sidecar.proxy.ratelimit import TokenBucket
from sidecar.server import Server
from tests.support.fakes import async_test
from tests.unit.test_http_proxy import Mesh, assert_local_reply, parse_responses


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def takes(bucket: TokenBucket, n: int) -> int:
    """How many of ``n`` takes got a token."""
    return sum(bucket.try_take() for _ in range(n))


def test_starts_full_then_refuses() -> None:
    bucket = TokenBucket(RateLimitConfig(max_tokens=5, tokens_per_fill=2, fill_interval=1.0), FakeClock())
    assert takes(bucket, 5) == 5
    assert not bucket.try_take()


def test_gains_tokens_per_fill_at_each_whole_interval_only() -> None:
    clock = FakeClock(100.0)
    bucket = TokenBucket(RateLimitConfig(max_tokens=5, tokens_per_fill=2, fill_interval=1.0), clock)
    assert takes(bucket, 5) == 5
    clock.now = 100.999
    assert not bucket.try_take()  # no partial fills
    clock.now = 101.0
    assert takes(bucket, 3) == 2
    clock.now = 103.5  # two more whole intervals: 4 tokens
    assert takes(bucket, 5) == 4
    clock.now = 103.9  # boundaries stay at 100 + k, however late the takes were
    assert not bucket.try_take()
    clock.now = 104.0
    assert takes(bucket, 3) == 2


def test_never_holds_more_than_max_tokens() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(RateLimitConfig(max_tokens=3, tokens_per_fill=2, fill_interval=0.5), clock)
    clock.now = 3600.0
    assert takes(bucket, 10) == 3
    assert takes(bucket, 1) == 0
    clock.now = 3600.5
    assert takes(bucket, 10) == 2


def test_intervals_that_are_not_exact_binary_fractions() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(RateLimitConfig(max_tokens=1, tokens_per_fill=1, fill_interval=0.1), clock)
    granted = 0
    for step in range(1, 1001):  # 100 s in 0.1 s steps: one token per step, none lost to rounding
        clock.now = step * 0.1
        granted += takes(bucket, 2)
    assert granted == 1000


@pytest.mark.parametrize("config", [RateLimitConfig(0, 1, 1.0), RateLimitConfig(1, 0, 1.0), RateLimitConfig(1, 1, 0.0)])
def test_refuses_a_config_it_cannot_run(config: RateLimitConfig) -> None:
    with pytest.raises(ValueError):
        TokenBucket(config, FakeClock())


# --- plumbing from LDS -------------------------------------------------------------------------------


def _runtime() -> Server:
    return Server(NodeInfo(node_id="n", service="svc"))


def _listeners(rate_limit: RateLimitConfig | None, headers_timeout: float = 0.0,
               idle_timeout: float = 3600.0) -> dict[str, ListenerConfig]:
    rc = RouteConfig("inbound", (VirtualHost("all", ("*",), (Route("/", "inbound|svc"),)),))
    return {
        xds.INBOUND_LISTENER: ListenerConfig(xds.INBOUND_LISTENER, route_config=rc, rate_limit=rate_limit,
                                             request_headers_timeout=headers_timeout, idle_timeout=idle_timeout),
        xds.OUTBOUND_LISTENER: ListenerConfig(xds.OUTBOUND_LISTENER, rds_name="outbound"),
    }


def test_lds_sets_the_limits_and_keeps_the_bucket_while_its_config_is_unchanged() -> None:
    runtime = _runtime()
    inbound = runtime.listener_contexts[xds.INBOUND_LISTENER]
    outbound = runtime.listener_contexts[xds.OUTBOUND_LISTENER]
    limit = RateLimitConfig(max_tokens=2, tokens_per_fill=1, fill_interval=60.0)
    runtime.apply_listeners(_listeners(limit, headers_timeout=10.0, idle_timeout=300.0))
    bucket = inbound.rate_limit
    assert bucket is not None and bucket.config == limit
    assert (inbound.request_headers_timeout, inbound.idle_timeout, inbound.sweep_period) == (10.0, 300.0, 1.0)
    assert outbound.rate_limit is None and outbound.request_headers_timeout == 0.0
    assert bucket.try_take()

    runtime.apply_listeners(_listeners(RateLimitConfig(max_tokens=2, tokens_per_fill=1, fill_interval=60.0)))
    assert inbound.rate_limit is bucket and bucket.tokens == 1  # an equal config keeps the tokens left
    assert (inbound.request_headers_timeout, inbound.sweep_period) == (0.0, 360.0)

    runtime.apply_listeners(_listeners(RateLimitConfig(max_tokens=3, tokens_per_fill=1, fill_interval=60.0)))
    assert inbound.rate_limit is not bucket and inbound.rate_limit.tokens == 3

    runtime.apply_listeners(_listeners(None, idle_timeout=0.0))
    assert inbound.rate_limit is None and inbound.sweep_period == 0.0


def test_an_invalid_rate_limit_is_refused_before_anything_changes() -> None:
    runtime = _runtime()
    inbound = runtime.listener_contexts[xds.INBOUND_LISTENER]
    runtime.apply_listeners(_listeners(None, headers_timeout=5.0))
    with pytest.raises(ValueError):
        runtime.apply_listeners(_listeners(RateLimitConfig(1, 1, 0.0), headers_timeout=1.0))
    assert inbound.rate_limit is None and inbound.request_headers_timeout == 5.0


# --- 429 RL through the connection manager ----------------------------------------------------------------


@async_test
async def test_rate_limited_requests_get_429_rl_and_keep_the_connection() -> None:
    mesh = Mesh()
    clock = FakeClock()
    rt = mesh.runtime
    rt.set_limits(TokenBucket(RateLimitConfig(max_tokens=2, tokens_per_fill=1, fill_interval=1.0), clock), 0.0, 0.0)
    client = mesh.client()
    # Three pipelined requests for a host with no route: the first two pass the limit (then 404 NR).
    client.send(b"GET /a HTTP/1.1\r\nHost: ghost-host\r\n\r\n" * 3)
    resp = parse_responses(client.received())
    assert [r["status"] for r in resp] == [404, 404, 429]
    assert_local_reply(resp[2], 429, "RL")
    assert "connection" not in resp[2]["headers"]
    assert not client.transport.closed
    assert rt.stats.ratelimit_rate_limited == 1
    clock.now += 1.0
    client.send(b"GET /a HTTP/1.1\r\nHost: ghost-host\r\n\r\n" * 2)
    assert [r["status"] for r in parse_responses(client.received())] == [404, 429]
    assert rt.stats.ratelimit_rate_limited == 2
    assert rt.stats.downstream_rq_4xx == 5
    assert rt.stats.downstream_rq_active == 0
