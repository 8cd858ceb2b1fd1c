"""Registry snapshot -> xDS resources, without a network (controlplane.translate)."""

from __future__ import annotations

from types import MappingProxyType

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from controlplane import translate as tr
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from meshkeeper import xds
from meshkeeper.registry import InstanceRecord, Override, ServiceRecord
from meshkeeper.xds import NodeInfo

NODE = NodeInfo(node_id=NodeInfo.make_id("10.0.0.9", "web", 15006, "default"), service="web",
                app_port=8080, inbound_port=15006, outbound_port=15001, advertise_host="10.0.0.9")
PROXYLESS = NodeInfo.from_node("grpc-client-1", "", {})


def inst(host: str, port: int = 15006, weight: int = 10, version: str = "", zone: str = "",
         app_port: int = 8080) -> InstanceRecord:
    labels = {k: v for k, v in (("version", version), ("zone", zone)) if v}
    return InstanceRecord(address=host, port=port, weight=weight, labels=labels, app_port=app_port)


def service(name: str, *instances: InstanceRecord, ns: str = "default", protocol: str = "http",
            overrides: dict[str, Override] | None = None) -> ServiceSnapshot:
    return ServiceSnapshot(name=name, namespace=ns, record=ServiceRecord(protocol=protocol),
                           instances=MappingProxyType({i.key: i for i in instances}),
                           overrides=MappingProxyType(dict(overrides or {})))


def snapshot(*services: ServiceSnapshot, version: int = 1) -> RegistrySnapshot:
    by_ns: dict[str, dict[str, ServiceSnapshot]] = {}
    for s in services:
        by_ns.setdefault(s.namespace, {})[s.name] = s
    return RegistrySnapshot(version, MappingProxyType(
        {ns: MappingProxyType(svcs) for ns, svcs in by_ns.items()}))


def endpoints(cla) -> dict[str, tuple[int, int, str]]:
    """host:port -> (weight, health_status, zone)."""
    out = {}
    for loc in cla.endpoints:
        for ep in loc.lb_endpoints:
            sa = ep.endpoint.address.socket_address
            out[f"{sa.address}:{sa.port_value}"] = (ep.load_balancing_weight.value, ep.health_status,
                                                    loc.locality.zone)
    return out


def unpack_hcm(listener) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


CATALOG = service("catalog", inst("10.0.0.1", version="v1", zone="a"), inst("10.0.0.2", version="v2", zone="b"),
                  inst("10.0.0.3", version="v1", zone="a", weight=30))


def test_outbound_clusters_and_version_subsets():
    res = tr.translate(snapshot(CATALOG), NODE)
    clusters = res[xds.CLUSTER]
    assert set(clusters) == {"outbound|catalog.default", "outbound|catalog.default|v1",
                             "outbound|catalog.default|v2", "inbound|8080"}
    c = clusters["outbound|catalog.default"]
    assert c.type == cluster_pb2.Cluster.EDS
    assert c.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert c.connect_timeout.seconds == 1
    assert c.eds_cluster_config.service_name == "outbound|catalog.default"
    assert c.eds_cluster_config.eds_config.HasField("ads")
    assert set(res[xds.ENDPOINT]) == {"outbound|catalog.default", "outbound|catalog.default|v1",
                                      "outbound|catalog.default|v2"}
    assert set(endpoints(res[xds.ENDPOINT]["outbound|catalog.default|v1"])) == {"10.0.0.1:15006", "10.0.0.3:15006"}
    assert set(endpoints(res[xds.ENDPOINT]["outbound|catalog.default|v2"])) == {"10.0.0.2:15006"}


def test_no_subset_without_version_label():
    res = tr.translate(snapshot(service("plain", inst("10.0.0.1"))), NODE)
    assert sorted(n for n in res[xds.CLUSTER] if n.startswith("outbound")) == ["outbound|plain.default"]


def test_localities_by_zone_with_weights():
    cla = tr.translate(snapshot(CATALOG), NODE)[xds.ENDPOINT]["outbound|catalog.default"]
    assert cla.cluster_name == "outbound|catalog.default"
    by_zone = {loc.locality.zone: loc for loc in cla.endpoints}
    assert set(by_zone) == {"a", "b"}
    assert by_zone["a"].load_balancing_weight.value == 40
    assert by_zone["b"].load_balancing_weight.value == 10
    assert endpoints(cla)["10.0.0.3:15006"] == (30, health_check_pb2.HEALTHY, "a")


def test_override_weight_wins_and_disabled_drains():
    svc = service("catalog", inst("10.0.0.1", zone="a"), inst("10.0.0.2", zone="a"), inst("10.0.0.3", zone="a"),
                  overrides={"10.0.0.1:15006": Override(weight=70),
                             "10.0.0.2:15006": Override(enabled=False),
                             "10.0.0.3:15006": Override(weight=0)})
    cla = tr.translate(snapshot(svc), NODE)[xds.ENDPOINT]["outbound|catalog.default"]
    eps = endpoints(cla)
    assert eps["10.0.0.1:15006"] == (70, health_check_pb2.HEALTHY, "a")
    assert eps["10.0.0.2:15006"] == (1, health_check_pb2.DRAINING, "a")  # xDS forbids weight 0
    assert eps["10.0.0.3:15006"] == (1, health_check_pb2.DRAINING, "a")
    assert cla.endpoints[0].load_balancing_weight.value == 70  # draining ones add nothing


def test_registered_weight_zero_drains_and_locality_keeps_weight_one():
    svc = service("catalog", inst("10.0.0.1", weight=0, zone="z"))
    cla = tr.translate(snapshot(svc), NODE)[xds.ENDPOINT]["outbound|catalog.default"]
    assert endpoints(cla)["10.0.0.1:15006"] == (1, health_check_pb2.DRAINING, "z")
    assert cla.endpoints[0].load_balancing_weight.value == 1  # proxyless gRPC drops weightless ones


def test_override_without_instance_is_harmless_and_enabled_override_keeps_weight():
    svc = service("catalog", inst("10.0.0.1", weight=5),
                  overrides={"10.0.0.1:15006": Override(enabled=True), "10.9.9.9:1": Override(weight=3)})
    eps = endpoints(tr.translate(snapshot(svc), NODE)[xds.ENDPOINT]["outbound|catalog.default"])
    assert eps == {"10.0.0.1:15006": (5, health_check_pb2.HEALTHY, "")}


def test_route_virtual_hosts_domains_and_timeout():
    snap = snapshot(CATALOG, service("db", inst("10.0.1.1", port=5432, app_port=5432), protocol="tcp"),
                    service("rpc", inst("10.0.2.1", app_port=50051), protocol="grpc"),
                    service("other", inst("10.0.3.1"), ns="prod"))
    route = tr.translate(snap, NODE)[xds.ROUTE]["outbound"]
    vhosts = {v.name: v for v in route.virtual_hosts}
    assert set(vhosts) == {"catalog.default", "rpc.default"}  # tcp and other namespaces: no vhost
    domains = list(vhosts["catalog.default"].domains)
    for d in xds.service_domains("catalog", "default", 8080) + ["catalog:15006", "catalog.default:15006"]:
        assert d in domains
    assert len(domains) == len(set(domains))
    r = vhosts["rpc.default"].routes[0]
    assert r.match.prefix == "/"
    assert r.route.cluster == "outbound|rpc.default"
    assert r.route.timeout.seconds == 15
    all_domains = [d for v in route.virtual_hosts for d in v.domains]
    assert len(all_domains) == len(set(all_domains))  # Envoy refuses duplicate domains


def test_namespace_isolation():
    snap = snapshot(CATALOG, service("catalog", inst("10.1.0.1"), ns="prod"))
    prod_node = NodeInfo(node_id="p", service="web", namespace="prod", app_port=8080, inbound_port=15006,
                         outbound_port=15001)
    prod = tr.translate(snap, prod_node)
    assert set(prod[xds.ENDPOINT]) == {"outbound|catalog.prod"}
    assert endpoints(prod[xds.ENDPOINT]["outbound|catalog.prod"]).keys() == {"10.1.0.1:15006"}


def test_per_node_listeners_and_inbound_cluster():
    res = tr.translate(snapshot(CATALOG), NODE)
    out = res[xds.LISTENER]["outbound"]
    assert out.address.socket_address.address == "127.0.0.1"
    assert out.address.socket_address.port_value == 15001
    hcm = unpack_hcm(out)
    assert hcm.stat_prefix == "outbound"
    assert hcm.rds.route_config_name == "outbound"
    assert hcm.rds.config_source.HasField("ads")
    assert [f.name for f in hcm.http_filters] == ["envoy.filters.http.fault", "envoy.filters.http.router"]
    inbound = res[xds.LISTENER]["inbound"]
    assert (inbound.address.socket_address.address, inbound.address.socket_address.port_value) == ("10.0.0.9", 15006)
    ihcm = unpack_hcm(inbound)
    assert ihcm.route_config.name == "inbound"
    vh = ihcm.route_config.virtual_hosts[0]
    assert list(vh.domains) == ["*"]
    assert vh.routes[0].route.cluster == "inbound|8080"
    assert [f.name for f in ihcm.http_filters] == ["envoy.filters.http.router"]  # no rate limit by default
    cluster = res[xds.CLUSTER]["inbound|8080"]
    assert cluster.type == cluster_pb2.Cluster.STATIC
    sa = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sa.address, sa.port_value) == ("127.0.0.1", 8080)


def test_node_without_app_gets_no_inbound():
    node = NodeInfo(node_id="n", service="client", outbound_port=15001)
    res = tr.translate(snapshot(CATALOG), node)
    assert set(res[xds.LISTENER]) == {"outbound"}
    assert not any(n.startswith("inbound") for n in res[xds.CLUSTER])


def test_proxyless_node_gets_only_shared_outbound():
    assert PROXYLESS.proxyless
    res = tr.translate(snapshot(CATALOG), PROXYLESS)
    assert res[xds.LISTENER] == {}
    assert set(res[xds.CLUSTER]) == {"outbound|catalog.default", "outbound|catalog.default|v1",
                                     "outbound|catalog.default|v2"}
    assert set(res[xds.ROUTE]) == {"outbound"}


def test_shared_parts_built_once_per_snapshot():
    snap = snapshot(CATALOG)
    a = tr.translate(snap, NODE)
    other = NodeInfo(node_id="o", service="api", app_port=9090, inbound_port=15007, outbound_port=15002)
    b = tr.translate(snap, other)
    assert a[xds.ENDPOINT]["outbound|catalog.default"] is b[xds.ENDPOINT]["outbound|catalog.default"]
    assert a[xds.LISTENER]["outbound"] is not b[xds.LISTENER]["outbound"]
    again = tr.translate(snapshot(CATALOG, version=2), NODE)  # a new snapshot is translated anew
    assert again[xds.ENDPOINT]["outbound|catalog.default"] == a[xds.ENDPOINT]["outbound|catalog.default"]


def test_empty_registry_still_has_route_and_listener():
    res = tr.translate(snapshot(), NODE)
    assert list(res[xds.ROUTE]) == ["outbound"]
    assert res[xds.ROUTE]["outbound"].virtual_hosts == []
    assert set(res[xds.LISTENER]) == {"outbound", "inbound"}


def test_translation_is_deterministic():
    a = tr.translate(snapshot(CATALOG), NODE)
    b = tr.translate(snapshot(CATALOG), NODE)
    for t in a:
        assert {n: m.SerializeToString(deterministic=True) for n, m in a[t].items()} == \
               {n: m.SerializeToString(deterministic=True) for n, m in b[t].items()}


def test_policy_sets_lb_policy_connect_timeout_and_route_timeout():
    from dataclasses import replace

    from meshkeeper.policy import decode_policy

    svc = replace(CATALOG, policy=decode_policy({"lb": {"policy": "maglev"}, "connect_timeout_ms": 250,
                                                 "timeout_ms": 1500}))
    res = tr.translate(snapshot(svc), NODE)
    for name in ("outbound|catalog.default", "outbound|catalog.default|v1"):
        c = res[xds.CLUSTER][name]
        assert c.lb_policy == cluster_pb2.Cluster.MAGLEV
        assert (c.connect_timeout.seconds, c.connect_timeout.nanos) == (0, 250_000_000)
    route = res[xds.ROUTE]["outbound"].virtual_hosts[0].routes[0].route
    assert (route.timeout.seconds, route.timeout.nanos) == (1, 500_000_000)
    default = tr.translate(snapshot(CATALOG), NODE)[xds.CLUSTER]["outbound|catalog.default"]
    assert default.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN and default.connect_timeout.seconds == 1


# --------------------------------------------------------------------------- traffic policy -> Envoy fields


def with_policy(svc: ServiceSnapshot, policy: dict) -> ServiceSnapshot:
    from dataclasses import replace

    from meshkeeper.policy import decode_policy
    return replace(svc, policy=decode_policy(policy))


def catalog_resources(policy: dict, node: NodeInfo = NODE) -> tr.Resources:
    return tr.translate(snapshot(with_policy(CATALOG, policy)), node)


def catalog_route(policy: dict):
    return catalog_resources(policy)[xds.ROUTE]["outbound"].virtual_hosts[0].routes[0]


def ms(d) -> int:
    return d.seconds * 1000 + d.nanos // 1_000_000


def test_default_policy_cluster_has_istios_breakers_panic_threshold_and_no_outlier_detection():
    c = catalog_resources({})[xds.CLUSTER]["outbound|catalog.default"]
    assert not c.HasField("outlier_detection")
    [t] = c.circuit_breakers.thresholds
    assert t.priority == base_pb2.DEFAULT
    assert (t.max_connections.value, t.max_pending_requests.value, t.max_requests.value, t.max_retries.value) == \
        (1024, 1024, 1024, 2**32 - 1)
    # Concurrent retries are not capped by default, as Istio writes (docs/contracts.md, "Retry
    # defaults"); the route's attempts bound them. No retry budget unless the policy sets one.
    assert not t.HasField("retry_budget")
    assert c.common_lb_config.healthy_panic_threshold.value == 50.0
    assert list(c.common_lb_config.ListFields())[0][0].name == "healthy_panic_threshold"
    route = catalog_route({})
    assert not route.route.HasField("retry_policy")
    assert dict(route.typed_per_filter_config) == {}


def test_circuit_breaker_fields_and_a_null_retry_budget():
    cb = {"max_connections": 10, "max_pending": 20, "max_requests": 30, "max_retries": 4, "retry_budget": None}
    [t] = catalog_resources({"circuit_breaker": cb})[xds.CLUSTER]["outbound|catalog.default"].circuit_breakers.thresholds
    assert (t.max_connections.value, t.max_pending_requests.value, t.max_requests.value, t.max_retries.value) == \
        (10, 20, 30, 4)
    assert not t.HasField("retry_budget")
    budget = {"retry_budget": {"percent": 35, "min_concurrency": 0}}
    [t] = catalog_resources({"circuit_breaker": budget})[xds.CLUSTER]["outbound|catalog.default"].circuit_breakers.thresholds
    assert t.retry_budget.budget_percent.value == 35.0
    # 0 is written, not left unset (which would mean Envoy's 3).
    assert t.retry_budget.HasField("min_retry_concurrency") and t.retry_budget.min_retry_concurrency.value == 0


def test_panic_threshold_zero_is_written_not_left_to_the_default():
    c = catalog_resources({"panic_threshold_percent": 0})[xds.CLUSTER]["outbound|catalog.default|v1"]
    assert c.common_lb_config.HasField("healthy_panic_threshold")
    assert c.common_lb_config.healthy_panic_threshold.value == 0.0


def test_outlier_detection_every_field():
    outlier = {"consecutive_5xx": 7, "consecutive_gateway_failure": 3, "consecutive_local_origin_failure": 2,
               "interval_ms": 2500, "base_ejection_ms": 1000, "max_ejection_ms": 60000, "max_ejection_percent": 50,
               "success_rate": {"minimum_hosts": 3, "request_volume": 20, "stdev_factor": 1500, "enforcing_percent": 40},
               "failure_percentage": {"threshold": 60, "minimum_hosts": 2, "request_volume": 10,
                                      "enforcing_percent": 100}}
    o = catalog_resources({"outlier": outlier})[xds.CLUSTER]["outbound|catalog.default"].outlier_detection
    got = {fd.name: (value.value if hasattr(value, "value") else ms(value) if hasattr(value, "nanos") else value)
           for fd, value in o.ListFields()}
    assert got == {
        "consecutive_5xx": 7, "enforcing_consecutive_5xx": 100,
        "consecutive_gateway_failure": 3, "enforcing_consecutive_gateway_failure": 100,
        "consecutive_local_origin_failure": 2, "enforcing_consecutive_local_origin_failure": 100,
        "split_external_local_origin_errors": True, "enforcing_local_origin_success_rate": 0,
        "interval": 2500, "base_ejection_time": 1000, "max_ejection_time": 60000, "max_ejection_percent": 50,
        "success_rate_minimum_hosts": 3, "success_rate_request_volume": 20, "success_rate_stdev_factor": 1500,
        "enforcing_success_rate": 40,
        "failure_percentage_threshold": 60, "failure_percentage_minimum_hosts": 2,
        "failure_percentage_request_volume": 10, "enforcing_failure_percentage": 100,
    }


def test_outlier_detection_defaults_are_envoys():
    o = catalog_resources({"outlier": {}})[xds.CLUSTER]["outbound|catalog.default"].outlier_detection
    assert (o.consecutive_5xx.value, o.consecutive_gateway_failure.value, o.consecutive_local_origin_failure.value) == (5, 5, 5)
    assert (ms(o.interval), ms(o.base_ejection_time), ms(o.max_ejection_time)) == (10_000, 30_000, 300_000)
    assert o.max_ejection_percent.value == 10
    assert (o.success_rate_minimum_hosts.value, o.success_rate_request_volume.value,
            o.success_rate_stdev_factor.value, o.enforcing_success_rate.value) == (5, 100, 1900, 100)
    assert (o.failure_percentage_threshold.value, o.failure_percentage_minimum_hosts.value,
            o.failure_percentage_request_volume.value, o.enforcing_failure_percentage.value) == (85, 5, 50, 0)


def test_outlier_count_zero_disables_that_detector():
    o = catalog_resources({"outlier": {"consecutive_5xx": 0, "consecutive_local_origin_failure": 0}})[
        xds.CLUSTER]["outbound|catalog.default"].outlier_detection
    assert (o.consecutive_5xx.value, o.enforcing_consecutive_5xx.value) == (0, 0)
    assert o.HasField("enforcing_consecutive_5xx")  # an explicit 0, not left unset (Envoy's 100)
    assert (o.consecutive_local_origin_failure.value, o.enforcing_consecutive_local_origin_failure.value) == (0, 0)
    assert o.enforcing_consecutive_gateway_failure.value == 100


def test_retry_policy():
    from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2

    rp = catalog_route({"retry": {"attempts": 3, "on": ["5xx", "retriable-status-codes", "reset"],
                                  "per_try_timeout_ms": 750, "retriable_status_codes": [409, 429]}}).route.retry_policy
    assert rp.retry_on == "5xx,retriable-status-codes,reset"
    assert rp.num_retries.value == 3
    assert ms(rp.per_try_timeout) == 750
    assert (ms(rp.retry_back_off.base_interval), ms(rp.retry_back_off.max_interval)) == (25, 250)
    assert list(rp.retriable_status_codes) == [409, 429]
    [pred] = rp.retry_host_predicate
    assert pred.name == "envoy.retry_host_predicates.previous_hosts"
    assert pred.typed_config.Is(previous_hosts_pb2.PreviousHostsPredicate.DESCRIPTOR)
    assert rp.host_selection_retry_max_attempts == 5


def test_retry_defaults_and_zero_attempts():
    rp = catalog_route({"retry": {}}).route.retry_policy
    assert (rp.retry_on, rp.num_retries.value) == ("5xx,gateway-error,connect-failure,reset", 2)
    assert not rp.HasField("per_try_timeout")  # 0: each try may use the rest of the route timeout
    rp = catalog_route({"retry": {"attempts": 0}}).route.retry_policy
    assert rp.HasField("num_retries") and rp.num_retries.value == 0  # not Envoy's default of 1


def unpack_fault(route):
    from envoy.extensions.filters.http.fault.v3 import fault_pb2

    f = fault_pb2.HTTPFault()
    assert route.typed_per_filter_config["envoy.filters.http.fault"].Unpack(f)
    return f


def test_fault_on_the_route_and_the_filter_on_the_outbound_listener():
    from envoy.type.v3 import percent_pb2

    f = unpack_fault(catalog_route({"fault": {"delay_ms": 1500, "delay_percent": 10,
                                              "abort_status": 503, "abort_percent": 5}}))
    assert ms(f.delay.fixed_delay) == 1500
    assert (f.delay.percentage.numerator, f.delay.percentage.denominator) == (10, percent_pb2.FractionalPercent.HUNDRED)
    assert (f.abort.http_status, f.abort.percentage.numerator) == (503, 5)
    assert f.abort.percentage.denominator == percent_pb2.FractionalPercent.HUNDRED
    only_abort = unpack_fault(catalog_route({"fault": {"abort_status": 500, "abort_percent": 100}}))
    assert not only_abort.HasField("delay") and only_abort.abort.http_status == 500
    # A delay of some ms at 0 percent injects nothing: no per-route config at all.
    assert dict(catalog_route({"fault": {"delay_ms": 100}}).typed_per_filter_config) == {}
    hcm = unpack_hcm(catalog_resources({})[xds.LISTENER]["outbound"])
    fault_filter = hcm.http_filters[0]
    assert fault_filter.name == "envoy.filters.http.fault"
    assert fault_filter.typed_config.type_url == xds.FAULT
    from envoy.extensions.filters.http.fault.v3 import fault_pb2
    empty = fault_pb2.HTTPFault()
    assert fault_filter.typed_config.Unpack(empty) and empty.ListFields() == []


def test_both_listeners_get_request_headers_and_idle_timeouts():
    res = catalog_resources({})
    for name in ("outbound", "inbound"):
        hcm = unpack_hcm(res[xds.LISTENER][name])
        assert hcm.request_headers_timeout.seconds == tr.REQUEST_HEADERS_TIMEOUT_S == 10
        assert hcm.common_http_protocol_options.idle_timeout.seconds == 3600


def unpack_rate_limit(listener):
    from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2

    hcm = unpack_hcm(listener)
    assert [f.name for f in hcm.http_filters] == ["envoy.filters.http.local_ratelimit", "envoy.filters.http.router"]
    rl = local_rate_limit_pb2.LocalRateLimit()
    assert hcm.http_filters[0].typed_config.Unpack(rl)
    return rl


def test_inbound_rate_limit_comes_from_the_nodes_own_service():
    web = with_policy(service("web", inst("10.0.0.9")), {"rate_limit": {"rps": 100}})
    res = tr.translate(snapshot(CATALOG, web), NODE)
    rl = unpack_rate_limit(res[xds.LISTENER]["inbound"])
    assert rl.stat_prefix
    assert (rl.token_bucket.max_tokens, rl.token_bucket.tokens_per_fill.value, ms(rl.token_bucket.fill_interval)) == \
        (100, 5, 50)
    for fp in (rl.filter_enabled, rl.filter_enforced):
        assert (fp.default_value.numerator, fp.default_value.denominator, fp.runtime_key) == (100, 0, "")
    # Only the inbound side is limited; the outbound listener and other services are untouched.
    assert [f.name for f in unpack_hcm(res[xds.LISTENER]["outbound"]).http_filters] == \
        ["envoy.filters.http.fault", "envoy.filters.http.router"]
    other = NodeInfo(node_id="o", service="catalog", app_port=9090, inbound_port=15007, outbound_port=15002)
    assert [f.name for f in unpack_hcm(tr.translate(snapshot(CATALOG, web), other)[xds.LISTENER]["inbound"]).http_filters] \
        == ["envoy.filters.http.router"]
    # The same service name in another namespace is another service.
    prod_web = with_policy(service("web", inst("10.1.0.9"), ns="prod"), {"rate_limit": {"rps": 100}})
    res = tr.translate(snapshot(prod_web), NODE)
    assert [f.name for f in unpack_hcm(res[xds.LISTENER]["inbound"]).http_filters] == ["envoy.filters.http.router"]


@pytest.mark.parametrize("rps, burst, bucket", [
    (100, 0, (100, 5, 50)),        # 5 tokens every 50 ms
    (1, 0, (1, 1, 1000)),
    (3, 0, (3, 1, 333)),           # rounded to Envoy's millisecond resolution
    (20, 0, (20, 1, 50)),
    (30, 0, (30, 2, 67)),
    (5, 10, (10, 1, 200)),         # the burst is the bucket's size
    (1000, 10, (50, 50, 50)),      # a burst below one refill is raised to it, or 1000 rps could not pass
])
def test_token_bucket_refills_smoothly(rps, burst, bucket):
    from meshkeeper.policy import RateLimit

    tb = tr.token_bucket(RateLimit(rps=rps, burst=burst))
    assert (tb.max_tokens, tb.tokens_per_fill.value, ms(tb.fill_interval)) == bucket
    assert ms(tb.fill_interval) >= 50  # Envoy's minimum


def test_node_resources_take_the_policy_and_memoise_on_it():
    from meshkeeper.policy import DEFAULT_POLICY, decode_policy

    limited = decode_policy({"rate_limit": {"rps": 10}, "split": {"v1": 100}})
    again = decode_policy({"split": {"v1": 100}, "rate_limit": {"rps": 10}})
    assert hash(limited) == hash(again) and limited == again  # usable as a cache key
    assert tr.node_policy(snapshot(CATALOG), NODE) is DEFAULT_POLICY  # "web" is not registered
    unpack_rate_limit(tr.node_resources(NODE, limited)[xds.LISTENER]["inbound"])
    assert [f.name for f in unpack_hcm(tr.node_resources(NODE)[xds.LISTENER]["inbound"]).http_filters] == \
        ["envoy.filters.http.router"]
