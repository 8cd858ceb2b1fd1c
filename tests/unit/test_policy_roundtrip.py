"""A policy as an operator writes it -> the control plane's xDS -> the sidecar's config objects.

decode_policy (meshkeeper.policy) -> translate (controlplane) -> the wire -> convert (sidecar): what
the sidecar ends up honouring is exactly what the policy says, with Envoy's defaults elsewhere.
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest
from google.protobuf import any_pb2

from controlplane import translate as tr
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from meshkeeper import xds
from meshkeeper.policy import decode_policy
from meshkeeper.registry import InstanceRecord, ServiceRecord
from meshkeeper.xds import NodeInfo
from sidecar.config import (
    CircuitBreakerConfig,
    ClusterConfig,
    FaultConfig,
    ListenerConfig,
    OutlierConfig,
    RateLimitConfig,
    RetryPolicyConfig,
    Route,
    WeightedCluster,
)
from sidecar.xds import convert

NODE = NodeInfo(node_id=NodeInfo.make_id("10.0.0.9", "web", 15006, "default"), service="web",
                app_port=8080, inbound_port=15006, outbound_port=15001, advertise_host="10.0.0.9")


def mesh(policy: dict) -> dict:
    """Both services carry ``policy``: ``catalog`` is called, ``web`` is the node's own service."""
    def svc(name: str, host: str) -> ServiceSnapshot:
        i = InstanceRecord(address=host, port=15006, labels={"version": "v1"}, app_port=8080)
        return ServiceSnapshot(name=name, namespace="default", record=ServiceRecord(protocol="http"),
                               instances=MappingProxyType({i.key: i}), policy=decode_policy(policy))
    snap = RegistrySnapshot(1, MappingProxyType({"default": MappingProxyType(
        {"catalog": svc("catalog", "10.0.0.1"), "web": svc("web", "10.0.0.9")})}))
    return tr.translate(snap, NODE)


def over_the_wire(msg):
    """As the sidecar receives it: packed in an Any, serialized, parsed, unpacked."""
    a = any_pb2.Any()
    a.Pack(msg)
    wire = any_pb2.Any.FromString(a.SerializeToString(deterministic=True))
    out = type(msg)()
    assert wire.Unpack(out)
    return out


def sidecar_view(policy: dict) -> tuple[ClusterConfig, Route, ListenerConfig, ListenerConfig]:
    res = mesh(policy)
    clusters = {n: convert.cluster(over_the_wire(c)) for n, c in res[xds.CLUSTER].items()}
    listeners = {n: convert.listener(over_the_wire(m)) for n, m in res[xds.LISTENER].items()}
    routes = convert.route_configuration(over_the_wire(res[xds.ROUTE]["outbound"]))
    catalog = next(vh for vh in routes.virtual_hosts if vh.name == "catalog.default")
    assert clusters["outbound|catalog.default|v1"] == replace(clusters["outbound|catalog.default"],
                                                              name="outbound|catalog.default|v1")
    return clusters["outbound|catalog.default"], catalog.routes[0], listeners["outbound"], listeners["inbound"]


def test_default_policy():
    cluster, route, outbound, inbound = sidecar_view({})
    assert cluster == ClusterConfig(
        name="outbound|catalog.default", lb_policy="round_robin", connect_timeout=1.0, outlier=None,
        circuit_breakers=CircuitBreakerConfig(max_retries=2**32 - 1),  # no cap on retries, as Istio
        healthy_panic_threshold=50.0, idle_timeout=3600.0)
    assert route == Route(prefix="/", cluster="outbound|catalog.default", timeout=15.0)
    assert outbound == ListenerConfig(name="outbound", rds_name="outbound", fault_filter=True,
                                      request_headers_timeout=10.0, idle_timeout=3600.0)
    assert inbound.rate_limit is None and inbound.request_headers_timeout == 10.0


def test_every_resilience_field():
    cluster, route, outbound, inbound = sidecar_view({
        "lb": {"policy": "least_request"},
        "outlier": {"consecutive_5xx": 3, "consecutive_gateway_failure": 0, "consecutive_local_origin_failure": 2,
                    "interval_ms": 1500, "base_ejection_ms": 2000, "max_ejection_ms": 20000,
                    "max_ejection_percent": 34,
                    "success_rate": {"minimum_hosts": 3, "request_volume": 10, "stdev_factor": 1000,
                                     "enforcing_percent": 50},
                    "failure_percentage": {"threshold": 40, "enforcing_percent": 100}},
        "circuit_breaker": {"max_connections": 11, "max_pending": 12, "max_requests": 13,
                            "retry_budget": {"percent": 30, "min_concurrency": 1}},
        "retry": {"attempts": 4, "on": ["5xx", "connect-failure", "retriable-status-codes"],
                  "per_try_timeout_ms": 250, "retriable_status_codes": [409]},
        "timeout_ms": 3000, "connect_timeout_ms": 200, "panic_threshold_percent": 0,
        "rate_limit": {"rps": 40, "burst": 80},
        "fault": {"delay_ms": 100, "delay_percent": 50, "abort_status": 503, "abort_percent": 10},
    })
    assert cluster == ClusterConfig(
        name="outbound|catalog.default", lb_policy="least_request", connect_timeout=0.2,
        outlier=OutlierConfig(
            consecutive_5xx=3, enforcing_consecutive_5xx=100,
            consecutive_gateway_failure=0, enforcing_consecutive_gateway_failure=0,
            consecutive_local_origin_failure=2, enforcing_consecutive_local_origin_failure=100,
            split_external_local_origin_errors=True,
            interval=1.5, base_ejection_time=2.0, max_ejection_time=20.0, max_ejection_percent=34,
            success_rate_minimum_hosts=3, success_rate_request_volume=10, success_rate_stdev_factor=1000,
            enforcing_success_rate=50,
            failure_percentage_threshold=40, failure_percentage_minimum_hosts=5, failure_percentage_request_volume=50,
            enforcing_failure_percentage=100),
        circuit_breakers=CircuitBreakerConfig(max_connections=11, max_pending_requests=12, max_requests=13,
                                              max_retries=2**32 - 1, retry_budget_percent=30.0, min_retry_concurrency=1),
        healthy_panic_threshold=0.0)
    assert route == Route(
        prefix="/", cluster="outbound|catalog.default", timeout=3.0,
        retry_policy=RetryPolicyConfig(
            retry_on=frozenset({"5xx", "connect-failure", "retriable-status-codes"}), num_retries=4,
            per_try_timeout=0.25, base_interval=0.025, max_interval=0.25, retriable_status_codes=frozenset({409}),
            avoid_previous_hosts=True, host_selection_retry_max_attempts=5),
        fault=FaultConfig(delay=0.1, delay_percent=50.0, abort_status=503, abort_percent=10.0))
    assert outbound.fault_filter and outbound.rate_limit is None  # callers are not limited
    assert inbound.rate_limit == RateLimitConfig(max_tokens=80, tokens_per_fill=2, fill_interval=0.05)


def test_outlier_defaults_and_no_retry_budget():
    cluster, route, _, _ = sidecar_view({"outlier": {}, "circuit_breaker": {"retry_budget": None, "max_retries": 7},
                                         "retry": {}})
    assert cluster.outlier == replace(OutlierConfig(), enforcing_consecutive_gateway_failure=100,
                                      split_external_local_origin_errors=True)
    assert cluster.circuit_breakers == CircuitBreakerConfig(max_retries=7)  # no budget: max_retries applies
    assert route.retry_policy.retry_on == frozenset({"5xx", "gateway-error", "connect-failure", "reset"})
    assert route.retry_policy.num_retries == 2 and route.fault is None


@pytest.mark.parametrize("lb", ["round_robin", "least_request", "random"])
def test_balancers_the_sidecar_runs(lb):
    assert sidecar_view({"lb": {"policy": lb}})[0].lb_policy == lb


@pytest.mark.parametrize("lb", ["ring_hash", "maglev"])
def test_balancers_the_sidecar_refuses(lb):
    with pytest.raises(convert.XdsError, match=f"lb_policy {lb.upper()} is not supported"):
        sidecar_view({"lb": {"policy": lb}})


def test_split_reaches_the_sidecar_as_weighted_clusters_without_the_missing_subset():
    # Only a v1 instance is registered: v2 has no subset cluster and is left out; v1 keeps 90.
    _, route, _, _ = sidecar_view({"split": {"v1": 90, "v2": 10}, "timeout_ms": 2000})
    assert route == Route(prefix="/", weighted_clusters=(WeightedCluster("outbound|catalog.default|v1", 90),),
                          timeout=2.0)
    _, route, _, _ = sidecar_view({"split": {"v2": 100}})
    assert route == Route(prefix="/", cluster="outbound|catalog.default", timeout=15.0)
