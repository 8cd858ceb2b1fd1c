"""docs/identity.md's mTLS and authz resources -> sidecar config, and NACKs of other shapes."""

from __future__ import annotations

import copy

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401  (registers the type)
from google.protobuf import json_format

from sidecar.config import (
    TLS_PERMISSIVE,
    TLS_STRICT,
    AuthzConfig,
    DownstreamTlsConfig,
    PermissionMatch,
    PrincipalMatch,
    UpstreamTlsConfig,
)
from sidecar.xds import convert, listeners, security
from sidecar.xds.convert import XdsError

TD = "spiffe://meshkeeper.local/"
SDS = {"ads": {}, "resource_api_version": "V3"}


def common(san: dict, alpn: list[str]) -> dict:
    return {
        "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": SDS}],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}]},
            "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": SDS},
        },
        "alpn_protocols": alpn,
    }


def upstream_ctx(alpn=("http/1.1",), san=TD + "ns/default/sa/b") -> dict:
    return {"@type": security.UPSTREAM_TLS_CONTEXT, "common_tls_context": common({"exact": san}, list(alpn)),
            "sni": "outbound_.b.default"}


def cluster_dict(ctx: dict | None = None, http2: bool = False) -> dict:
    d = {"name": "outbound|b.default", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
         "transport_socket_matches": [{"name": "tlsMode-mutual", "match": {"tlsMode": "mutual"},
                                       "transport_socket": {"name": "envoy.transport_sockets.tls",
                                                            "typed_config": ctx or upstream_ctx()}}]}
    if http2:
        d["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return d


def cluster(d: dict) -> cluster_pb2.Cluster:
    return json_format.ParseDict(d, cluster_pb2.Cluster())


def assert_nacked(d: dict, reason: str) -> None:
    """The cluster ``d`` is refused (a NACK) with ``reason`` in the message."""
    with pytest.raises(XdsError, match=reason):
        convert.cluster(cluster(d))


def downstream_ctx(**over) -> dict:
    d = {"@type": security.DOWNSTREAM_TLS_CONTEXT, "require_client_certificate": True,
         "common_tls_context": common({"prefix": TD}, ["h2", "http/1.1"])}
    d.update(over)
    return d


def hcm(http_filters=None, **over) -> dict:
    d = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
         "stat_prefix": "inbound", "rds": {"route_config_name": "inbound", "config_source": {"ads": {}}},
         "http_filters": [*(http_filters or []), {"name": "envoy.filters.http.router", "typed_config": {
             "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    d.update(over)
    return d


XFCC = {"forward_client_cert_details": "SANITIZE_SET", "set_current_client_cert_details": {"uri": True}}


def inbound_dict(mode: str = TLS_PERMISSIVE, manager: dict | None = None) -> dict:
    manager = manager or hcm(**XFCC)
    filters = [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]
    chains = [{"name": "inbound-mtls", "filter_chain_match": {"transport_protocol": "tls"}, "filters": filters,
               "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": downstream_ctx()}}]
    if mode == TLS_PERMISSIVE:
        chains.append({"name": "inbound-plaintext", "filters": copy.deepcopy(filters)})
    return {"name": "inbound", "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
        "filter_chains": chains}


def listener(d: dict):
    return listeners.listener(json_format.ParseDict(d, listener_pb2.Listener()))


# --- clusters and endpoints -------------------------------------------------------------------------


def test_cluster_with_tls_mode_mutual_match():
    cfg = convert.cluster(cluster(cluster_dict()))
    assert cfg.tls == UpstreamTlsConfig(san=TD + "ns/default/sa/b", alpn=("http/1.1",), sni="outbound_.b.default")


def test_grpc_cluster_offers_h2():
    cfg = convert.cluster(cluster(cluster_dict(upstream_ctx(alpn=("h2",)), http2=True)))
    assert cfg.http2 and cfg.tls.alpn == ("h2",)


def test_a_cluster_without_matches_converts_as_today():
    d = cluster_dict()
    del d["transport_socket_matches"]
    assert convert.cluster(cluster(d)).tls is None


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: d["transport_socket_matches"].append(copy.deepcopy(d["transport_socket_matches"][0])), "exactly one entry"),
    (lambda d: d["transport_socket_matches"][0].update(match={"tlsMode": "istio"}), "match must be"),
    (lambda d: d["transport_socket_matches"][0]["transport_socket"]["typed_config"].update(
        common_tls_context=common({"prefix": TD}, ["http/1.1"])), "only exact"),
    (lambda d: d["transport_socket_matches"][0]["transport_socket"]["typed_config"].update(
        common_tls_context=common({"exact": TD + "x"}, ["h2"])), "do not offer the cluster's protocol"),
    (lambda d: d["transport_socket_matches"][0]["transport_socket"]["typed_config"]["common_tls_context"][
        "tls_certificate_sds_secret_configs"][0].update(name="other"), "secret 'other' is not supported"),
    (lambda d: d["transport_socket_matches"][0]["transport_socket"]["typed_config"]["common_tls_context"][
        "tls_certificate_sds_secret_configs"][0].update(sds_config={"path_config_source": {"path": "/x"}}),
     "sds_config"),
    (lambda d: d["transport_socket_matches"][0]["transport_socket"]["typed_config"]["common_tls_context"][
        "combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"][0].update(
        san_type="DNS"), "URI"),
    (lambda d: d["transport_socket_matches"][0]["transport_socket"]["typed_config"].update(
        allow_renegotiation=True), "allow_renegotiation"),
    (lambda d: d.update(transport_socket={"name": "envoy.transport_sockets.tls"}), "transport_socket"),
    (lambda d: d["transport_socket_matches"][0]["transport_socket"]["typed_config"].update(sni="a b"), "not a host"),
])
def test_other_upstream_tls_shapes_are_nacked(mutate, reason):
    d = cluster_dict()
    mutate(d)
    assert_nacked(d, reason)


def test_endpoint_metadata_marks_mtls():
    cla = json_format.ParseDict({"cluster_name": "outbound|b.default", "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}}},
         "metadata": {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "mutual"}}}},
        {"endpoint": {"address": {"socket_address": {"address": "10.0.0.2", "port_value": 80}}}},
        {"endpoint": {"address": {"socket_address": {"address": "10.0.0.3", "port_value": 80}}},
         "metadata": {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "disabled"}}}},
    ]}]}, endpoint_pb2.ClusterLoadAssignment())
    assert [e.mtls for e in convert.endpoints(cla)] == [True, False, False]


# --- the inbound listener -----------------------------------------------------------------------------


def test_permissive_inbound_listener():
    cfg = listener(inbound_dict(TLS_PERMISSIVE))
    assert cfg.tls == DownstreamTlsConfig(mode=TLS_PERMISSIVE, san_prefix=TD)
    assert cfg.rds_name == "inbound" and cfg.xfcc_sanitize_set and cfg.xfcc_uri and cfg.rbac is None


def test_strict_inbound_listener():
    cfg = listener(inbound_dict(TLS_STRICT))
    assert cfg.tls == DownstreamTlsConfig(mode=TLS_STRICT, san_prefix=TD)


def test_plaintext_chain_first_is_the_same_listener():
    d = inbound_dict()
    d["filter_chains"].reverse()
    assert listener(d) == listener(inbound_dict())


def test_a_listener_without_tls_converts_as_today():
    d = inbound_dict()
    plain = {"name": "inbound", "filter_chains": [d["filter_chains"][1]]}
    plain["filter_chains"][0]["filters"][0]["typed_config"] = hcm()
    cfg = listener(plain)
    assert cfg.tls is None and not cfg.xfcc_sanitize_set and cfg.rbac is None


def test_transparent_inbound_with_tls_chains_on_the_app_port():
    d = inbound_dict()
    d["listener_filters"].insert(0, {"name": "envoy.filters.listener.original_dst"})
    for chain in d["filter_chains"]:
        chain.setdefault("filter_chain_match", {})["destination_port"] = 8080
    d["default_filter_chain"] = {"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "InboundPassthroughCluster", "cluster": "InboundPassthroughCluster"}}]}
    cfg = listener(d)
    assert cfg.tls.mode == TLS_PERMISSIVE and cfg.transparent.explicit_port == 8080


def _chain(d, name):
    return next(c for c in d["filter_chains"] if c["name"] == name)


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: d["filter_chains"].pop(0), "transport_protocol tls"),
    (lambda d: _chain(d, "inbound-mtls")["transport_socket"]["typed_config"].update(
        require_client_certificate=False), "require_client_certificate"),
    (lambda d: _chain(d, "inbound-mtls")["transport_socket"]["typed_config"]["common_tls_context"].update(
        alpn_protocols=["http/1.1"]), "alpn_protocols"),
    (lambda d: _chain(d, "inbound-mtls")["transport_socket"]["typed_config"]["common_tls_context"][
        "combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"][0].update(
        matcher={"exact": TD}), "only prefix"),
    (lambda d: _chain(d, "inbound-mtls").pop("transport_socket"), "needs a transport_socket"),
    (lambda d: _chain(d, "inbound-plaintext")["filters"][0].update(typed_config=hcm()), "same network filter"),
    (lambda d: _chain(d, "inbound-plaintext").update(filter_chain_match={"transport_protocol": "raw"}),
     "transport_protocol 'raw'"),
    (lambda d: _chain(d, "inbound-plaintext").update(filter_chain_match={"server_names": ["x"]}), "server_names"),
    (lambda d: d["filter_chains"].append(copy.deepcopy(d["filter_chains"][1])), "one .STRICT. or two"),
    (lambda d: d["listener_filters"].append({"name": "envoy.filters.listener.http_inspector"}), "listener_filters"),
    (lambda d: _chain(d, "inbound-mtls")["transport_socket"]["typed_config"].update(require_sni=True), "require_sni"),
])
def test_other_inbound_shapes_are_nacked(mutate, reason):
    d = inbound_dict()
    mutate(d)
    with pytest.raises(XdsError, match=reason):
        listener(d)


@pytest.mark.parametrize("over, reason", [
    ({"forward_client_cert_details": "APPEND_FORWARD"}, "APPEND_FORWARD"),
    ({"set_current_client_cert_details": {"uri": True}}, "needs forward_client_cert_details SANITIZE_SET"),
    ({"forward_client_cert_details": "SANITIZE_SET", "set_current_client_cert_details": {"subject": True}}, "only uri"),
])
def test_other_xfcc_settings_are_nacked(over, reason):
    with pytest.raises(XdsError, match=reason):
        listener(inbound_dict(manager=hcm(**over)))


# --- RBAC ---------------------------------------------------------------------------------------------


def rbac_filter(rules: dict | None) -> dict:
    typed = {"@type": security.RBAC}
    if rules is not None:
        typed["rules"] = rules
    return {"name": "envoy.filters.http.rbac", "typed_config": typed}


def methods(*ms):
    return {"or_rules": {"rules": [{"header": {"name": ":method", "string_match": {"exact": m}}} for m in ms]}}


def paths(*ps):
    return {"or_rules": {"rules": [{"url_path": {"path": {"prefix": p}}} for p in ps]}}


def principals(*ids):
    return [{"or_ids": {"ids": [{"authenticated": {"principal_name": m}} for m in ids]}}]


def rbac_of(rules):
    return listener(inbound_dict(manager=hcm([rbac_filter(rules)], **XFCC))).rbac


def test_rbac_as_the_control_plane_writes_it():
    rules = {"action": "ALLOW", "policies": {
        "rule-0": {"permissions": [{"and_rules": {"rules": [methods("GET", "HEAD"), paths("/api")]}}],
                   "principals": principals({"exact": TD + "ns/default/sa/a"}, {"prefix": TD + "ns/ops/sa/"})},
        "rule-1": {"permissions": [{"any": True}], "principals": [{"any": True}]},
        "rule-2": {"permissions": [{"and_rules": {"rules": [paths("/health")]}}], "principals": [{"any": True}]},
    }}
    cfg = rbac_of(rules)
    assert cfg.action == "ALLOW" and [p.name for p in cfg.policies] == ["rule-0", "rule-1", "rule-2"]
    p0 = cfg.policies[0]
    assert p0.permissions == (PermissionMatch(methods=frozenset({b"GET", b"HEAD"}), path_prefixes=(b"/api",)),)
    assert p0.principals == (PrincipalMatch(exact=TD + "ns/default/sa/a"), PrincipalMatch(prefix=TD + "ns/ops/sa/"))
    assert cfg.policies[1] == type(p0)("rule-1", (PermissionMatch(),), (PrincipalMatch(any=True),))
    assert cfg.policies[2].permissions == (PermissionMatch(path_prefixes=(b"/health",)),)


def test_rbac_without_rules_is_no_filter_and_deny_without_policies_allows_everything():
    assert rbac_of(None) is None
    assert rbac_of({"action": "DENY"}) == AuthzConfig(action="DENY")


@pytest.mark.parametrize("rules, reason", [
    ({"action": "LOG"}, "LOG"),
    ({"action": "ALLOW", "policies": {"p": {"permissions": [{"any": True}], "principals": [
        {"source_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}]}}}, "source_ip"),
    ({"action": "ALLOW", "policies": {"p": {"permissions": [{"destination_port": 80}],
                                            "principals": [{"any": True}]}}}, "destination_port"),
    ({"action": "ALLOW", "policies": {"p": {"permissions": [{"header": {"name": "x-a", "string_match": {
        "exact": "1"}}}], "principals": [{"any": True}]}}}, ":method"),
    ({"action": "ALLOW", "policies": {"p": {"permissions": [{"url_path": {"path": {"exact": "/a"}}}],
                                            "principals": [{"any": True}]}}}, "prefix only"),
    ({"action": "ALLOW", "policies": {"p": {"permissions": [{"any": True}], "principals": principals(
        {"suffix": "x"})}}}, "exact or prefix"),
    ({"action": "ALLOW", "policies": {"p": {"permissions": [{"and_rules": {"rules": [paths("/a"), paths("/b")]}}],
                                            "principals": [{"any": True}]}}}, "two path parts"),
    ({"action": "ALLOW", "policies": {"p": {"permissions": [{"any": True}], "principals": []}}}, "needs permissions"),
])
def test_other_rbac_shapes_are_nacked(rules, reason):
    with pytest.raises(XdsError, match=reason):
        rbac_of(rules)


def test_rbac_goes_before_the_rate_limit():
    rl = {"name": "envoy.filters.http.local_ratelimit", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "rl"}}
    listener(inbound_dict(manager=hcm([rbac_filter({"action": "DENY"}), rl])))
    with pytest.raises(XdsError, match="out of order"):
        listener(inbound_dict(manager=hcm([rl, rbac_filter({"action": "DENY"})])))


# --- what the control plane sends (controlplane.translate), converted ------------------------------


def _cp():
    from controlplane import translate
    from meshkeeper.security import AuthzPolicy as CpAuthz
    from meshkeeper.security import AuthzRule, MeshIdentity

    return translate, CpAuthz, AuthzRule, MeshIdentity


@pytest.mark.parametrize("mode", ["PERMISSIVE", "STRICT"])
def test_the_control_planes_inbound_listeners_convert(mode):
    from controlplane import identity_resources

    translate, CpAuthz, AuthzRule, MeshIdentity = _cp()
    authz = CpAuthz("ALLOW", (AuthzRule(sources=(TD + "ns/default/sa/a", "ns:ops"), methods=("GET",), paths=("/api",)),
                              AuthzRule(paths=("/health",))))
    sec = identity_resources.NodeSecurity(identity=MeshIdentity("meshkeeper.local"), mode=mode, authz=authz)
    http = listeners.listener(translate.inbound_listener("127.0.0.1", 15006, 8080, sec=sec))
    assert http.tls == DownstreamTlsConfig(mode=mode, san_prefix=TD)
    assert http.xfcc_sanitize_set and http.xfcc_uri
    assert http.rbac.allows(b"GET", b"/api/x", TD + "ns/default/sa/a")
    assert http.rbac.allows(b"GET", b"/api/x", TD + "ns/ops/sa/robot")
    assert not http.rbac.allows(b"POST", b"/api/x", TD + "ns/default/sa/a")
    assert http.rbac.allows(b"POST", b"/health", "") and not http.rbac.allows(b"GET", b"/api", "")
    tcp = listeners.listener(translate.inbound_tcp_listener("127.0.0.1", 15006, 8080, sec=sec))
    assert tcp.tls == DownstreamTlsConfig(mode=mode, san_prefix=TD) and tcp.tcp is not None


def test_the_control_planes_listener_without_identity_is_todays():
    translate, *_ = _cp()
    cfg = listeners.listener(translate.inbound_listener("127.0.0.1", 15006, 8080))
    assert cfg.tls is None and not cfg.xfcc_sanitize_set and cfg.rbac is None


@pytest.mark.parametrize("protocol, http2, alpn", [("http", False, ("http/1.1",)), ("grpc", True, ("h2",))])
def test_the_control_planes_cluster_tls_converts(protocol, http2, alpn):
    from controlplane import identity_resources

    translate, _, _, MeshIdentity = _cp()
    msg = translate.eds_cluster("outbound|b.default", protocol=protocol)
    ctx = identity_resources.upstream_tls_context(MeshIdentity("meshkeeper.local"), "b", "default", protocol)
    msg.transport_socket_matches.append(identity_resources.tls_socket_match(ctx))
    cfg = convert.cluster(msg)
    assert cfg.http2 is http2
    assert cfg.tls == UpstreamTlsConfig(san=TD + "ns/default/sa/b", alpn=alpn, sni="outbound_.b.default")


@pytest.mark.parametrize("mode, default", [("PERMISSIVE", True), ("STRICT", False)])
def test_the_control_planes_transparent_inbound_listener_converts(mode, default):
    from controlplane import identity_resources, transparent

    translate, _, _, MeshIdentity = _cp()
    from meshkeeper.xds import NodeInfo

    node = NodeInfo(node_id="sidecar~10.0.0.5~b-15006.default", service="b", app_port=8080, inbound_port=15006,
                    outbound_port=15001, advertise_host="10.0.0.5", interception="redirect")
    sec = identity_resources.NodeSecurity(identity=MeshIdentity("meshkeeper.local"), mode=mode)
    out = transparent.node_resources(node, translate.DEFAULT_POLICY, sec)
    cfg = listeners.listener(out["type.googleapis.com/envoy.config.listener.v3.Listener"]["inbound"])
    assert cfg.tls == DownstreamTlsConfig(mode=mode, san_prefix=TD)
    assert cfg.transparent.explicit_port == 8080 and cfg.transparent.original_dst
    assert (cfg.transparent.default_chain is not None) is default


# --- ORIGINAL_DST clusters with a transport socket (transparent mode's passthrough-mtls|<svc>.<ns>) ---------


def original_dst_dict(ctx: dict | None = None) -> dict:
    return {"name": "passthrough-mtls|b.default", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": ctx or upstream_ctx()}}


def test_an_original_dst_cluster_with_a_transport_socket_has_tls_for_every_destination():
    cfg = convert.cluster(cluster(original_dst_dict()))
    assert cfg.discovery == "ORIGINAL_DST"
    assert cfg.tls == UpstreamTlsConfig(san=TD + "ns/default/sa/b", alpn=("http/1.1",), sni="outbound_.b.default")
    d = original_dst_dict()
    del d["transport_socket"]
    assert convert.cluster(cluster(d)).tls is None


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: d.update(transport_socket_matches=[{"name": "tlsMode-mutual", "match": {"tlsMode": "mutual"},
                                                   "transport_socket": d["transport_socket"]}]),
     "transport_socket_matches"),  # ORIGINAL_DST hosts carry no metadata to match
    (lambda d: d["transport_socket"].update(typed_config=downstream_ctx()), "UpstreamTlsContext"),
    (lambda d: d["transport_socket"]["typed_config"].update(common_tls_context=common({"prefix": TD}, ["http/1.1"])),
     "only exact"),
    (lambda d: d["transport_socket"]["typed_config"].update(common_tls_context=common({"exact": TD + "x"}, ["h2"])),
     "do not offer the cluster's protocol"),
    (lambda d: d["transport_socket"]["typed_config"].update(sni="a b"), "not a host"),
])
def test_other_original_dst_tls_shapes_are_nacked(mutate, reason):
    d = original_dst_dict()
    mutate(d)
    assert_nacked(d, reason)


def test_an_eds_cluster_still_refuses_a_cluster_wide_transport_socket():
    d = cluster_dict()
    d["transport_socket"] = original_dst_dict()["transport_socket"]
    assert_nacked(d, "transport_socket")


@pytest.mark.parametrize("protocol", ["http", "grpc", "tcp"])
def test_the_control_planes_passthrough_clusters_convert(protocol):
    from types import MappingProxyType

    from controlplane import transparent
    from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
    from meshkeeper.registry import InstanceRecord, ServiceRecord

    _, _, _, MeshIdentity = _cp()
    insts = (InstanceRecord(address="10.0.0.1", port=8080, mtls=True), InstanceRecord(address="10.0.0.2", port=8080))
    svc = ServiceSnapshot(name="b", namespace="default", record=ServiceRecord(protocol=protocol),
                          instances=MappingProxyType({i.key: i for i in insts}))
    snap = RegistrySnapshot(1, MappingProxyType({"default": MappingProxyType({"b": svc})}))
    out = transparent.namespace_resources(snap, "default", MeshIdentity("meshkeeper.local"))
    clusters = out["type.googleapis.com/envoy.config.cluster.v3.Cluster"]
    secure = convert.cluster(clusters["passthrough-mtls|b.default"])
    assert secure.discovery == "ORIGINAL_DST" and not secure.http2
    assert secure.tls == UpstreamTlsConfig(san=TD + "ns/default/sa/b", alpn=("http/1.1",), sni="outbound_.b.default")
    assert convert.cluster(clusters["passthrough|b.default"]).tls is None
    listeners.listener(out["type.googleapis.com/envoy.config.listener.v3.Listener"]["virtual_outbound"])
