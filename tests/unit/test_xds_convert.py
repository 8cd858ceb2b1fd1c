"""Envoy protos -> sidecar config: what is honoured, and what is refused with a reason."""

import pytest
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as local_ratelimit_common_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import http_status_pb2, percent_pb2, token_bucket_pb2
from envoy.type.v3.percent_pb2 import Percent
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from sidecar.config import (
    CircuitBreakerConfig,
    FaultConfig,
    OutlierConfig,
    RateLimitConfig,
    RetryPolicyConfig,
)
from sidecar.xds import convert
from sidecar.xds.convert import XdsError


def hcm_listener(name="outbound", **hcm_fields):
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=name, **hcm_fields)
    if not hcm_fields:
        hcm.rds.route_config_name = "outbound"
        hcm.rds.config_source.ads.SetInParent()
    router = any_pb2.Any()
    router.Pack(router_pb2.Router())
    hcm.http_filters.add(name="envoy.filters.http.router", typed_config=router)
    typed = any_pb2.Any()
    typed.Pack(hcm)
    return listener_pb2.Listener(name=name, filter_chains=[listener_components_pb2.FilterChain(
        filters=[listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager",
                                                typed_config=typed)])])


def cla(name, *eps, priority=0):
    loc = endpoint_components_pb2.LocalityLbEndpoints(locality=base_pb2.Locality(zone="a"), priority=priority,
                                                      load_balancing_weight=wrappers_pb2.UInt32Value(value=10))
    for host, port, weight, health in eps:
        loc.lb_endpoints.add(
            endpoint=endpoint_components_pb2.Endpoint(address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=host, port_value=port))),
            load_balancing_weight=wrappers_pb2.UInt32Value(value=weight), health_status=health)
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[loc])


def test_listener_with_rds():
    cfg = convert.listener(hcm_listener())
    assert cfg.name == "outbound" and cfg.rds_name == "outbound" and cfg.route_config is None


def test_listener_with_inline_routes():
    rc = route_pb2.RouteConfiguration(name="inbound", virtual_hosts=[route_components_pb2.VirtualHost(
        name="inbound", domains=["*"], routes=[route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(cluster="inbound|8080"))])])
    cfg = convert.listener(hcm_listener("inbound", route_config=rc))
    assert cfg.route_config.virtual_hosts[0].routes[0].cluster == "inbound|8080"


def test_listener_with_unknown_network_filter_is_refused():
    msg = hcm_listener()
    msg.filter_chains[0].filters[0].typed_config.type_url = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
    with pytest.raises(XdsError, match="tcp_proxy"):
        convert.listener(msg)


def test_listener_with_tls_is_refused_naming_the_field():
    msg = hcm_listener()
    msg.filter_chains[0].transport_socket.name = "envoy.transport_sockets.tls"
    with pytest.raises(XdsError, match="transport_socket"):
        convert.listener(msg)


def test_route_fields_the_sidecar_cannot_honour_are_refused():
    route = route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix="/"),
                                       route=route_components_pb2.RouteAction(cluster="c"))
    route.route.retry_policy.num_retries.value = 2
    route.route.retry_policy.retry_priority.name = "envoy.retry_priorities.previous_priorities"
    rc = route_pb2.RouteConfiguration(name="outbound", virtual_hosts=[route_components_pb2.VirtualHost(
        name="c", domains=["c"], routes=[route])])
    with pytest.raises(XdsError, match="retry_policy: field 'retry_priority'"):
        convert.route_configuration(rc)
    rc.virtual_hosts[0].routes[0].route.ClearField("retry_policy")
    rc.virtual_hosts[0].routes[0].route.hedge_policy.initial_requests.value = 2
    with pytest.raises(XdsError, match="field 'hedge_policy'"):
        convert.route_configuration(rc)


def test_route_timeout_and_weighted_clusters():
    action = route_components_pb2.RouteAction(timeout=duration_pb2.Duration(seconds=2, nanos=500_000_000))
    action.weighted_clusters.clusters.add(name="a", weight=wrappers_pb2.UInt32Value(value=90))
    action.weighted_clusters.clusters.add(name="b", weight=wrappers_pb2.UInt32Value(value=10))
    rc = route_pb2.RouteConfiguration(name="outbound", virtual_hosts=[route_components_pb2.VirtualHost(
        name="c", domains=["C", "c:*"], routes=[route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/api"), route=action)])])
    cfg = convert.route_configuration(rc)
    vh = cfg.virtual_hosts[0]
    assert vh.domains == ("c", "c:*")
    assert vh.routes[0].timeout == 2.5 and vh.routes[0].prefix == "/api"
    assert [(w.name, w.weight) for w in vh.routes[0].weighted_clusters] == [("a", 90), ("b", 10)]


def test_duplicate_domain_is_refused():
    vhs = [route_components_pb2.VirtualHost(name=n, domains=["x"]) for n in ("a", "b")]
    with pytest.raises(XdsError, match="domain 'x'"):
        convert.route_configuration(route_pb2.RouteConfiguration(name="r", virtual_hosts=vhs))


def test_eds_cluster_and_unsupported_lb_policy():
    c = cluster_pb2.Cluster(name="outbound|catalog.default", type=cluster_pb2.Cluster.EDS,
                            connect_timeout=duration_pb2.Duration(seconds=1))
    c.eds_cluster_config.eds_config.CopyFrom(config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource()))
    cfg = convert.cluster(c)
    assert cfg.discovery == "EDS" and cfg.connect_timeout == 1.0 and cfg.lb_policy == "round_robin"
    c.lb_policy = cluster_pb2.Cluster.MAGLEV
    with pytest.raises(XdsError, match="MAGLEV is not supported .supported: ROUND_ROBIN, LEAST_REQUEST, RANDOM"):
        convert.cluster(c)


def test_static_cluster_carries_its_endpoints():
    c = cluster_pb2.Cluster(name="inbound|8080", type=cluster_pb2.Cluster.STATIC,
                            load_assignment=cla("inbound|8080", ("127.0.0.1", 8080, 1, health_check_pb2.HEALTHY)))
    cfg = convert.cluster(c)
    assert cfg.discovery == "STATIC"
    assert [(e.address, e.port) for e in cfg.static_endpoints] == [("127.0.0.1", 8080)]


def test_endpoints_weights_health_and_zone():
    eps = convert.endpoints(cla("c", ("10.0.0.1", 80, 7, health_check_pb2.HEALTHY),
                                ("10.0.0.2", 80, 1, health_check_pb2.DRAINING),
                                ("10.0.0.3", 80, 2, health_check_pb2.UNKNOWN)))
    assert [(e.key, e.weight, e.serving, e.zone) for e in eps] == [
        ("10.0.0.1:80", 7, True, "a"), ("10.0.0.2:80", 1, False, "a"), ("10.0.0.3:80", 2, True, "a")]


def test_endpoints_refuse_priorities_and_duplicates():
    with pytest.raises(XdsError, match="priority 1"):
        convert.endpoints(cla("c", ("10.0.0.1", 80, 1, 0), priority=1))
    with pytest.raises(XdsError, match="listed twice"):
        convert.endpoints(cla("c", ("10.0.0.1", 80, 1, 0), ("10.0.0.1", 80, 1, 0)))


# --------------------------------------------------------------------------- resilience: clusters


def eds(**fields) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name="outbound|catalog.default", type=cluster_pb2.Cluster.EDS, **fields)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    return c


def ms(n: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=n // 1000, nanos=(n % 1000) * 1_000_000)


def u32(n: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=n)


def test_cluster_without_resilience_fields_gets_envoys_defaults():
    cfg = convert.cluster(eds())
    assert cfg.outlier is None
    assert cfg.circuit_breakers == CircuitBreakerConfig()
    assert cfg.circuit_breakers.retry_budget_percent == 0  # Envoy: no budget unless configured
    assert (cfg.healthy_panic_threshold, cfg.idle_timeout) == (50.0, 3600.0)


@pytest.mark.parametrize("policy, name", [(cluster_pb2.Cluster.LEAST_REQUEST, "least_request"),
                                          (cluster_pb2.Cluster.RANDOM, "random"),
                                          (cluster_pb2.Cluster.ROUND_ROBIN, "round_robin")])
def test_lb_policies(policy, name):
    assert convert.cluster(eds(lb_policy=policy)).lb_policy == name


def test_least_request_tuning_is_refused():
    c = eds(lb_policy=cluster_pb2.Cluster.LEAST_REQUEST)
    c.least_request_lb_config.choice_count.value = 5
    with pytest.raises(XdsError, match="field 'least_request_lb_config'"):
        convert.cluster(c)


def test_outlier_detection_every_field():
    od = outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=u32(7), enforcing_consecutive_5xx=u32(90), consecutive_gateway_failure=u32(3),
        enforcing_consecutive_gateway_failure=u32(100), consecutive_local_origin_failure=u32(2),
        enforcing_consecutive_local_origin_failure=u32(80), split_external_local_origin_errors=True,
        enforcing_local_origin_success_rate=u32(0), interval=ms(2500), base_ejection_time=ms(1000),
        max_ejection_time=ms(60000), max_ejection_percent=u32(50), success_rate_minimum_hosts=u32(3),
        success_rate_request_volume=u32(20), success_rate_stdev_factor=u32(1500), enforcing_success_rate=u32(40),
        failure_percentage_threshold=u32(60), failure_percentage_minimum_hosts=u32(2),
        failure_percentage_request_volume=u32(10), enforcing_failure_percentage=u32(100),
        successful_active_health_check_uneject_host=wrappers_pb2.BoolValue(value=False))
    assert convert.cluster(eds(outlier_detection=od)).outlier == OutlierConfig(
        consecutive_5xx=7, enforcing_consecutive_5xx=90, consecutive_gateway_failure=3,
        enforcing_consecutive_gateway_failure=100, consecutive_local_origin_failure=2,
        enforcing_consecutive_local_origin_failure=80, split_external_local_origin_errors=True,
        interval=2.5, base_ejection_time=1.0, max_ejection_time=60.0, max_ejection_percent=50,
        success_rate_minimum_hosts=3, success_rate_request_volume=20, success_rate_stdev_factor=1500,
        enforcing_success_rate=40, failure_percentage_threshold=60, failure_percentage_minimum_hosts=2,
        failure_percentage_request_volume=10, enforcing_failure_percentage=100)


def test_empty_outlier_detection_is_envoys_defaults():
    cfg = convert.cluster(eds(outlier_detection=outlier_detection_pb2.OutlierDetection())).outlier
    assert cfg == OutlierConfig()
    assert (cfg.enforcing_consecutive_gateway_failure, cfg.split_external_local_origin_errors) == (0, False)


@pytest.mark.parametrize("fields, message", [
    ({"enforcing_consecutive_5xx": u32(101)}, "enforcing_consecutive_5xx must be a percent"),
    ({"max_ejection_percent": u32(200)}, "max_ejection_percent must be a percent"),
    ({"interval": ms(0)}, "interval must be positive"),
    ({"base_ejection_time": ms(60000), "max_ejection_time": ms(30000)}, "max_ejection_time must be at least"),
    ({"max_ejection_time_jitter": ms(10)}, "max_ejection_time_jitter is not supported"),
    ({"always_eject_one_host": wrappers_pb2.BoolValue(value=True)}, "always_eject_one_host is not supported"),
    ({"split_external_local_origin_errors": True}, "enforcing_local_origin_success_rate must be 0"),
    ({"split_external_local_origin_errors": True, "enforcing_local_origin_success_rate": u32(0),
      "enforcing_failure_percentage_local_origin": u32(10)}, "enforcing_failure_percentage_local_origin"),
])
def test_outlier_detection_refusals_name_the_field(fields, message):
    with pytest.raises(XdsError, match=f"cluster 'outbound|catalog.default' outlier_detection: {message}"):
        convert.cluster(eds(outlier_detection=outlier_detection_pb2.OutlierDetection(**fields)))


def test_outlier_detection_monitors_are_refused():
    od = outlier_detection_pb2.OutlierDetection()
    od.monitors.add(name="m")
    with pytest.raises(XdsError, match="outlier_detection: field 'monitors'"):
        convert.cluster(eds(outlier_detection=od))


def test_local_origin_detectors_without_the_split_are_envoys_defaults():
    # Without the split Envoy computes no local-origin statistics, so these settings change nothing.
    od = outlier_detection_pb2.OutlierDetection(enforcing_failure_percentage_local_origin=u32(10))
    assert convert.cluster(eds(outlier_detection=od)).outlier == OutlierConfig()


def thresholds(**fields) -> circuit_breaker_pb2.CircuitBreakers.Thresholds:
    return circuit_breaker_pb2.CircuitBreakers.Thresholds(**fields)


def test_circuit_breakers_default_priority_and_retry_budget():
    cb = circuit_breaker_pb2.CircuitBreakers(thresholds=[
        thresholds(priority=base_pb2.HIGH, max_connections=u32(1)),  # ignored: no route is high priority
        thresholds(max_connections=u32(10), max_pending_requests=u32(20), max_requests=u32(30),
                   max_retries=u32(4), track_remaining=True),
    ])
    assert convert.cluster(eds(circuit_breakers=cb)).circuit_breakers == CircuitBreakerConfig(
        max_connections=10, max_pending_requests=20, max_requests=30, max_retries=4)
    cb.thresholds[1].retry_budget.SetInParent()  # sub-fields unset: Envoy's 20% and 3
    got = convert.cluster(eds(circuit_breakers=cb)).circuit_breakers
    assert (got.retry_budget_percent, got.min_retry_concurrency) == (20.0, 3)
    cb.thresholds[1].retry_budget.budget_percent.value = 12.5
    cb.thresholds[1].retry_budget.min_retry_concurrency.value = 0
    got = convert.cluster(eds(circuit_breakers=cb)).circuit_breakers
    assert (got.retry_budget_percent, got.min_retry_concurrency) == (12.5, 0)


def test_only_high_priority_thresholds_leave_envoys_defaults():
    cb = circuit_breaker_pb2.CircuitBreakers(thresholds=[thresholds(priority=base_pb2.HIGH, max_requests=u32(1))])
    assert convert.cluster(eds(circuit_breakers=cb)).circuit_breakers == CircuitBreakerConfig()


@pytest.mark.parametrize("cb, message", [
    (circuit_breaker_pb2.CircuitBreakers(thresholds=[thresholds(), thresholds()]), "two thresholds for priority DEFAULT"),
    (circuit_breaker_pb2.CircuitBreakers(per_host_thresholds=[thresholds()]), "field 'per_host_thresholds'"),
    (circuit_breaker_pb2.CircuitBreakers(thresholds=[thresholds(max_connection_pools=u32(2))]),
     "thresholds: field 'max_connection_pools'"),
    (circuit_breaker_pb2.CircuitBreakers(thresholds=[thresholds(retry_budget=circuit_breaker_pb2.CircuitBreakers.
                                                                Thresholds.RetryBudget(budget_percent=Percent(value=0)))]),
     "budget_percent must be above 0"),
])
def test_circuit_breaker_refusals(cb, message):
    with pytest.raises(XdsError, match=f"circuit_breakers.*{message}"):
        convert.cluster(eds(circuit_breakers=cb))


def test_panic_threshold_only_field_of_common_lb_config():
    assert convert.cluster(eds(common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
        healthy_panic_threshold=Percent(value=0)))).healthy_panic_threshold == 0.0
    assert convert.cluster(eds(common_lb_config=cluster_pb2.Cluster.CommonLbConfig())).healthy_panic_threshold == 50.0
    c = eds()
    c.common_lb_config.zone_aware_lb_config.min_cluster_size.value = 3
    with pytest.raises(XdsError, match="common_lb_config: field 'zone_aware_lb_config'"):
        convert.cluster(c)


def protocol_options(c: cluster_pb2.Cluster, opts: http_protocol_options_pb2.HttpProtocolOptions,
                     key: str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions") -> cluster_pb2.Cluster:
    c.typed_extension_protocol_options[key].Pack(opts)
    return c


def test_upstream_idle_timeout_from_http_protocol_options():
    opts = http_protocol_options_pb2.HttpProtocolOptions()
    opts.common_http_protocol_options.idle_timeout.CopyFrom(ms(90_000))
    opts.explicit_http_config.http_protocol_options.SetInParent()  # Envoy requires a protocol choice
    assert convert.cluster(protocol_options(eds(), opts)).idle_timeout == 90.0
    opts.common_http_protocol_options.idle_timeout.CopyFrom(ms(0))
    assert convert.cluster(protocol_options(eds(), opts)).idle_timeout == 0.0  # Envoy: 0 disables


def test_http2_protocol_options_make_an_http2_cluster():
    opts = http_protocol_options_pb2.HttpProtocolOptions()
    opts.explicit_http_config.http2_protocol_options.SetInParent()
    assert convert.cluster(protocol_options(eds(), opts)).http2
    assert not convert.cluster(eds()).http2  # HTTP/1.1 unless said


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o.explicit_http_config.http2_protocol_options.max_concurrent_streams.__setattr__("value", 5),
     "http2_protocol_options: field 'max_concurrent_streams'"),
    (lambda o: o.common_http_protocol_options.max_requests_per_connection.__setattr__("value", 5),
     "common_http_protocol_options: field 'max_requests_per_connection'"),
    (lambda o: o.upstream_http_protocol_options.__setattr__("auto_sni", True), "field 'upstream_http_protocol_options'"),
])
def test_other_http_protocol_options_are_refused(mutate, message):
    opts = http_protocol_options_pb2.HttpProtocolOptions()
    mutate(opts)
    with pytest.raises(XdsError, match=message):
        convert.cluster(protocol_options(eds(), opts))


def test_other_extension_protocol_options_are_refused():
    with pytest.raises(XdsError, match="typed_extension_protocol_options 'envoy.extensions.upstreams.tcp'"):
        convert.cluster(protocol_options(eds(), http_protocol_options_pb2.HttpProtocolOptions(),
                                         key="envoy.extensions.upstreams.tcp"))


# --------------------------------------------------------------------------- resilience: routes


def route_config(route: route_components_pb2.Route) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name="outbound", virtual_hosts=[route_components_pb2.VirtualHost(
        name="c", domains=["c"], routes=[route])])


def plain_route(**action) -> route_components_pb2.Route:
    return route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix="/"),
                                      route=route_components_pb2.RouteAction(cluster="c", **action))


def convert_route(route: route_components_pb2.Route, fault_filter: bool = True):
    return convert.route_configuration(route_config(route), fault_filter).virtual_hosts[0].routes[0]


def previous_hosts() -> route_components_pb2.RetryPolicy.RetryHostPredicate:
    p = route_components_pb2.RetryPolicy.RetryHostPredicate(name="envoy.retry_host_predicates.previous_hosts")
    p.typed_config.Pack(previous_hosts_pb2.PreviousHostsPredicate())
    return p


def test_retry_policy_every_field():
    rp = route_components_pb2.RetryPolicy(
        retry_on="5xx, gateway-error,connect-failure,reset,retriable-status-codes", num_retries=u32(3),
        per_try_timeout=ms(750), retriable_status_codes=[409],
        retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(base_interval=ms(10), max_interval=ms(40)),
        retry_host_predicate=[previous_hosts()], host_selection_retry_max_attempts=5)
    assert convert_route(plain_route(retry_policy=rp)).retry_policy == RetryPolicyConfig(
        retry_on=frozenset({"5xx", "gateway-error", "connect-failure", "reset", "retriable-status-codes"}),
        num_retries=3, per_try_timeout=0.75, base_interval=0.01, max_interval=0.04,
        retriable_status_codes=frozenset({409}), avoid_previous_hosts=True, host_selection_retry_max_attempts=5)


def test_retry_policy_defaults_are_envoys():
    got = convert_route(plain_route(retry_policy=route_components_pb2.RetryPolicy(retry_on="5xx"))).retry_policy
    assert got == RetryPolicyConfig(retry_on=frozenset({"5xx"}))
    assert (got.num_retries, got.base_interval, got.max_interval, got.host_selection_retry_max_attempts) == \
        (1, 0.025, 0.25, 1)
    assert convert_route(plain_route()).retry_policy is None
    back_off = route_components_pb2.RetryPolicy.RetryBackOff(base_interval=ms(100))  # max: 10x base
    got = convert_route(plain_route(retry_policy=route_components_pb2.RetryPolicy(retry_back_off=back_off))).retry_policy
    assert (got.base_interval, got.max_interval) == (0.1, 1.0)
    zero = route_components_pb2.RetryPolicy(retry_on="reset", num_retries=u32(0))
    assert convert_route(plain_route(retry_policy=zero)).retry_policy.num_retries == 0


@pytest.mark.parametrize("rp, message", [
    (route_components_pb2.RetryPolicy(retry_on="5xx,envoy-ratelimited,unavailable"),
     "retry_on envoy-ratelimited is not supported"),
    (route_components_pb2.RetryPolicy(retry_host_predicate=[route_components_pb2.RetryPolicy.RetryHostPredicate(
        name="envoy.retry_host_predicates.omit_canary_hosts")]), "retry_host_predicate 'envoy.retry_host_predicates"),
    (route_components_pb2.RetryPolicy(retry_priority=route_components_pb2.RetryPolicy.RetryPriority(name="p")),
     "field 'retry_priority'"),
    (route_components_pb2.RetryPolicy(rate_limited_retry_back_off=route_components_pb2.RetryPolicy.RateLimitedRetryBackOff()),
     "field 'rate_limited_retry_back_off'"),
    (route_components_pb2.RetryPolicy(per_try_idle_timeout=ms(5)), "field 'per_try_idle_timeout'"),
    (route_components_pb2.RetryPolicy(retriable_headers=[route_components_pb2.HeaderMatcher(name="x")]),
     "field 'retriable_headers'"),
    (route_components_pb2.RetryPolicy(retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
        base_interval=ms(100), max_interval=ms(50))), "max_interval must be at least base_interval"),
    (route_components_pb2.RetryPolicy(retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
        max_interval=ms(50))), "base_interval must be positive"),
])
def test_retry_policy_refusals_name_the_field(rp, message):
    with pytest.raises(XdsError, match=message):
        convert_route(plain_route(retry_policy=rp))


def fault_route(fault: fault_pb2.HTTPFault, key: str = "envoy.filters.http.fault") -> route_components_pb2.Route:
    r = plain_route()
    r.typed_per_filter_config[key].Pack(fault)
    return r


def hundred(n: int, denominator=percent_pb2.FractionalPercent.HUNDRED) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(numerator=n, denominator=denominator)


def test_route_fault_delay_and_abort():
    fault = fault_pb2.HTTPFault(
        delay=common_fault_pb2.FaultDelay(fixed_delay=ms(1500), percentage=hundred(10)),
        abort=fault_pb2.FaultAbort(http_status=503, percentage=hundred(5)))
    assert convert_route(fault_route(fault)).fault == FaultConfig(delay=1.5, delay_percent=10.0,
                                                                  abort_status=503, abort_percent=5.0)


@pytest.mark.parametrize("fraction, percent", [
    (hundred(2500, percent_pb2.FractionalPercent.TEN_THOUSAND), 25.0),
    (hundred(1, percent_pb2.FractionalPercent.MILLION), 0.0001),
    (hundred(150), 100.0),  # Envoy caps a numerator above its denominator
])
def test_fault_percentages_of_any_denominator(fraction, percent):
    fault = fault_pb2.HTTPFault(abort=fault_pb2.FaultAbort(http_status=500, percentage=fraction))
    assert convert_route(fault_route(fault)).fault.abort_percent == pytest.approx(percent)


def test_fault_that_injects_nothing_and_a_listener_without_the_fault_filter():
    nothing = fault_pb2.HTTPFault(delay=common_fault_pb2.FaultDelay(fixed_delay=ms(5)))  # no percentage: 0%
    assert convert_route(fault_route(nothing)).fault is None
    abort = fault_pb2.HTTPFault(abort=fault_pb2.FaultAbort(http_status=500, percentage=hundred(100)))
    assert convert_route(fault_route(abort)).fault is not None
    assert convert_route(fault_route(abort), fault_filter=False).fault is None  # Envoy would not run it


@pytest.mark.parametrize("fault, message", [
    (fault_pb2.HTTPFault(delay=common_fault_pb2.FaultDelay(
        header_delay=common_fault_pb2.FaultDelay.HeaderDelay())), "delay: field 'header_delay'"),
    (fault_pb2.HTTPFault(abort=fault_pb2.FaultAbort(grpc_status=14)), "abort: field 'grpc_status'"),
    (fault_pb2.HTTPFault(abort=fault_pb2.FaultAbort(header_abort=fault_pb2.FaultAbort.HeaderAbort())),
     "abort: field 'header_abort'"),
    (fault_pb2.HTTPFault(abort=fault_pb2.FaultAbort(http_status=600)), "http_status must be 200..599"),
    (fault_pb2.HTTPFault(max_active_faults=u32(3)), "field 'max_active_faults'"),
    (fault_pb2.HTTPFault(upstream_cluster="x"), "field 'upstream_cluster'"),
    (fault_pb2.HTTPFault(abort_percent_runtime="k"), "field 'abort_percent_runtime'"),
    (fault_pb2.HTTPFault(delay=common_fault_pb2.FaultDelay(percentage=hundred(5))), "fixed_delay must be positive"),
])
def test_fault_refusals_name_the_field(fault, message):
    with pytest.raises(XdsError, match=f"typed_per_filter_config 'envoy.filters.http.fault'.*{message}"):
        convert_route(fault_route(fault))


def test_other_per_filter_configs_are_refused():
    r = plain_route()
    r.typed_per_filter_config["envoy.filters.http.local_ratelimit"].Pack(local_rate_limit_pb2.LocalRateLimit())
    with pytest.raises(XdsError, match="typed_per_filter_config 'envoy.filters.http.local_ratelimit'"):
        convert_route(r)


# --------------------------------------------------------------------------- resilience: listeners


def packed(msg) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def full_bucket() -> base_pb2.RuntimeFractionalPercent:
    return base_pb2.RuntimeFractionalPercent(default_value=hundred(100))


def rate_limit(**fields) -> local_rate_limit_pb2.LocalRateLimit:
    base = {"stat_prefix": "rl", "filter_enabled": full_bucket(), "filter_enforced": full_bucket(),
            "token_bucket": token_bucket_pb2.TokenBucket(max_tokens=100, tokens_per_fill=u32(5), fill_interval=ms(50))}
    base.update(fields)
    return local_rate_limit_pb2.LocalRateLimit(**base)


def listener_with(*filters, **hcm_fields) -> listener_pb2.Listener:
    """An outbound RDS listener whose HCM runs ``filters`` (name, message) before the router."""
    msg = hcm_listener(**hcm_fields) if hcm_fields else hcm_listener()
    hcm = hcm_pb2.HttpConnectionManager()
    msg.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    if not hcm.HasField("rds") and not hcm.HasField("route_config"):
        hcm.rds.route_config_name = "outbound"
        hcm.rds.config_source.ads.SetInParent()
    router = hcm.http_filters.pop()
    for name, config in filters:
        hcm.http_filters.add(name=name, typed_config=packed(config))
    hcm.http_filters.append(router)
    msg.filter_chains[0].filters[0].typed_config.Pack(hcm)
    return msg


RL = "envoy.filters.http.local_ratelimit"
FAULT = "envoy.filters.http.fault"


def test_listener_rate_limit_fault_filter_and_timeouts():
    cfg = convert.listener(listener_with((RL, rate_limit()), (FAULT, fault_pb2.HTTPFault()),
                                         request_headers_timeout=ms(10_000),
                                         common_http_protocol_options=protocol_pb2.HttpProtocolOptions(
                                             idle_timeout=ms(600_000))))
    assert cfg.rate_limit == RateLimitConfig(max_tokens=100, tokens_per_fill=5, fill_interval=0.05)
    assert cfg.fault_filter is True
    assert (cfg.request_headers_timeout, cfg.idle_timeout) == (10.0, 600.0)


def test_listener_defaults_are_envoys():
    cfg = convert.listener(hcm_listener())
    assert (cfg.rate_limit, cfg.fault_filter, cfg.request_headers_timeout, cfg.idle_timeout) == (None, False, 0.0, 3600.0)


def test_inline_routes_lose_their_faults_without_the_fault_filter():
    abort = fault_pb2.HTTPFault(abort=fault_pb2.FaultAbort(http_status=500, percentage=hundred(100)))
    rc = route_config(fault_route(abort))
    assert convert.listener(hcm_listener("inbound", route_config=rc)).route_config.virtual_hosts[0].routes[0].fault is None
    with_filter = listener_with((FAULT, fault_pb2.HTTPFault()), route_config=rc)
    assert convert.listener(with_filter).route_config.virtual_hosts[0].routes[0].fault.abort_status == 500


def test_rate_limit_details():
    assert convert.listener(listener_with((RL, rate_limit(filter_enabled=None)))).rate_limit is None  # Envoy: 0%, off
    assert convert.listener(listener_with((RL, rate_limit(token_bucket=None)))).rate_limit is None
    one = convert.listener(listener_with((RL, rate_limit(token_bucket=token_bucket_pb2.TokenBucket(
        max_tokens=3, fill_interval=ms(1000)))))).rate_limit
    assert one == RateLimitConfig(max_tokens=3, tokens_per_fill=1, fill_interval=1.0)  # Envoy's tokens_per_fill: 1
    status = rate_limit(status=http_status_pb2.HttpStatus(code=http_status_pb2.TooManyRequests))
    assert convert.listener(listener_with((RL, status))).rate_limit is not None


@pytest.mark.parametrize("fields, message", [
    ({"descriptors": [local_ratelimit_common_pb2.LocalRateLimitDescriptor()]}, "field 'descriptors'"),
    ({"filter_enforced": base_pb2.RuntimeFractionalPercent(default_value=hundred(0))},
     "filter_enabled 100% / filter_enforced 0% is not supported"),
    ({"filter_enabled": base_pb2.RuntimeFractionalPercent(default_value=hundred(50))}, "filter_enabled 50%"),
    ({"filter_enabled": base_pb2.RuntimeFractionalPercent(default_value=hundred(100), runtime_key="k")},
     "filter_enabled .runtime overrides are not supported.: field 'runtime_key'"),
    ({"status": http_status_pb2.HttpStatus(code=http_status_pb2.ServiceUnavailable)}, "status 503 is not supported"),
    ({"token_bucket": token_bucket_pb2.TokenBucket(max_tokens=1, fill_interval=ms(10))}, "at least 50 ms"),
    ({"local_rate_limit_per_downstream_connection": True}, "field 'local_rate_limit_per_downstream_connection'"),
    ({"response_headers_to_add": [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x", value="y"))]},
     "field 'response_headers_to_add'"),
])
def test_rate_limit_refusals_name_the_field(fields, message):
    with pytest.raises(XdsError, match=message):
        convert.listener(listener_with((RL, rate_limit(**fields))))


@pytest.mark.parametrize("filters, message", [
    (((FAULT, fault_pb2.HTTPFault()), (RL, rate_limit())), "out of order or repeated"),
    (((FAULT, fault_pb2.HTTPFault()), (FAULT, fault_pb2.HTTPFault())), "out of order or repeated"),
    ((("my.fault", fault_pb2.HTTPFault()),), "must be named 'envoy.filters.http.fault'"),
    (((FAULT, fault_pb2.HTTPFault(abort=fault_pb2.FaultAbort(http_status=500, percentage=hundred(1)))),),
     "faults of the whole listener are not supported.*field 'abort'"),
    ((("envoy.filters.http.cors", wrappers_pb2.BoolValue()),), "http filter 'envoy.filters.http.cors'"),
])
def test_http_filter_refusals(filters, message):
    with pytest.raises(XdsError, match=message):
        convert.listener(listener_with(*filters))


def test_http_filter_chain_rules():
    msg = listener_with((FAULT, fault_pb2.HTTPFault()))
    hcm = hcm_pb2.HttpConnectionManager()
    msg.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    hcm.http_filters.add(name="late", typed_config=packed(wrappers_pb2.BoolValue()), is_optional=True)
    msg.filter_chains[0].filters[0].typed_config.Pack(hcm)
    with pytest.raises(XdsError, match="the last http filter must be the router"):
        convert.listener(msg)
    del hcm.http_filters[-1]
    hcm.http_filters.insert(0, hcm_pb2.HttpFilter(name="opt", typed_config=packed(wrappers_pb2.BoolValue()),
                                                  is_optional=True))
    msg.filter_chains[0].filters[0].typed_config.Pack(hcm)
    assert convert.listener(msg).fault_filter is True  # an optional unknown filter is skipped, as in Envoy
    hcm.http_filters[1].disabled = True
    msg.filter_chains[0].filters[0].typed_config.Pack(hcm)
    with pytest.raises(XdsError, match="http filter 'envoy.filters.http.fault': field 'disabled'"):
        convert.listener(msg)


@pytest.mark.parametrize("fields, message", [
    ({"stream_idle_timeout": ms(1000)}, "http_connection_manager: field 'stream_idle_timeout'"),
    ({"common_http_protocol_options": protocol_pb2.HttpProtocolOptions(max_connection_duration=ms(5))},
     "common_http_protocol_options: field 'max_connection_duration'"),
    ({"request_headers_timeout": duration_pb2.Duration(seconds=-1)}, "request_headers_timeout must not be negative"),
])
def test_hcm_refusals(fields, message):
    with pytest.raises(XdsError, match=message):
        convert.listener(listener_with(**fields))
