"""Peer authentication and authorization in xDS, without a network (docs/identity.md):
controlplane.translate, controlplane.transparent and the cache's layers."""

from __future__ import annotations

from types import MappingProxyType

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import any_pb2, json_format, symbol_database
from google.protobuf.message import Message

from controlplane import translate as tr
from controlplane import transparent
from controlplane.cache import SnapshotCache
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from meshkeeper import xds
from meshkeeper.policy import decode_policy
from meshkeeper.registry import InstanceRecord, ServiceRecord
from meshkeeper.security import AuthzPolicy, MeshIdentity, PeerAuthentication

TD = "example.org"
IDENTITY = MeshIdentity(TD)
NODE = xds.NodeInfo(node_id=xds.NodeInfo.make_id("10.0.0.9", "web", 15006, "default"), service="web",
                    app_port=8080, inbound_port=15006, outbound_port=15001, advertise_host="10.0.0.9")
REDIRECT = xds.NodeInfo(node_id="web-redirect", service="web", app_port=8080, inbound_port=15006,
                        outbound_port=15001, advertise_host="10.0.0.9", interception="redirect")
WEB = f"spiffe://{TD}/ns/default/sa/web"


def inst(host: str, mtls: bool = False, version: str = "") -> InstanceRecord:
    return InstanceRecord(address=host, port=15006, labels={"version": version} if version else {},
                          app_port=8080, mtls=mtls)


def service(name: str, *instances: InstanceRecord, protocol: str = "http", mode: str | None = None,
            authz: dict | None = None, policy: dict | None = None) -> ServiceSnapshot:
    extra = {}
    if policy is not None:
        extra["policy"] = decode_policy(str(policy).replace("'", '"').encode())
    return ServiceSnapshot(
        name=name, namespace="default", record=ServiceRecord(protocol=protocol),
        instances=MappingProxyType({i.key: i for i in instances}),
        peer_authentication=PeerAuthentication(mode) if mode else None,
        authz=AuthzPolicy.decode(str(authz).replace("'", '"').encode()) if authz is not None else None, **extra)


def snapshot(*services: ServiceSnapshot, ns_mode: str | None = None, version: int = 1) -> RegistrySnapshot:
    pa = MappingProxyType({"default": PeerAuthentication(ns_mode)} if ns_mode else {})
    return RegistrySnapshot(version, MappingProxyType({"default": MappingProxyType({s.name: s for s in services})}),
                            peer_authentication=pa)


def inbound(snap: RegistrySnapshot, node: xds.NodeInfo = NODE, identity: MeshIdentity | None = IDENTITY):
    return transparent.translate(snap, node, identity)[xds.LISTENER][xds.INBOUND_LISTENER]


def hcm_of(chain) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    assert chain.filters[0].typed_config.Unpack(hcm)
    return hcm


def upstream_tls(c: cluster_pb2.Cluster) -> tls_pb2.UpstreamTlsContext:
    (m,) = c.transport_socket_matches
    assert m.name == "tlsMode-mutual" and dict(m.match) == {"tlsMode": "mutual"}
    assert m.transport_socket.name == "envoy.transport_sockets.tls"
    ctx = tls_pb2.UpstreamTlsContext()
    assert m.transport_socket.typed_config.Unpack(ctx)
    return ctx


def sds_names(common: tls_pb2.CommonTlsContext) -> tuple[list[str], str]:
    for c in (*common.tls_certificate_sds_secret_configs, common.combined_validation_context.validation_context_sds_secret_config):
        assert c.sds_config.HasField("ads") and c.sds_config.resource_api_version == 2  # V3
    return ([c.name for c in common.tls_certificate_sds_secret_configs],
            common.combined_validation_context.validation_context_sds_secret_config.name)


# --------------------------------------------------------------------------- no CA: today's resources


def test_without_identity_every_resource_is_byte_identical_to_before():
    today = snapshot(service("catalog", inst("10.0.0.1"), inst("10.0.0.2", version="v1")), service("web", inst("10.0.0.9")))
    with_fields = snapshot(service("catalog", inst("10.0.0.1", mtls=True), inst("10.0.0.2", mtls=True, version="v1"),
                                   mode="STRICT"),
                           service("web", inst("10.0.0.9", mtls=True), mode="PERMISSIVE"), ns_mode="STRICT")
    for node in (NODE, REDIRECT):
        a, b = transparent.translate(today, node), transparent.translate(with_fields, node, None)
        assert {t: {n: m.SerializeToString(deterministic=True) for n, m in r.items()} for t, r in a.items()} == \
               {t: {n: m.SerializeToString(deterministic=True) for n, m in r.items()} for t, r in b.items()}
    listener = inbound(with_fields, identity=None)
    assert len(listener.filter_chains) == 1 and not listener.listener_filters and not listener.filter_chains[0].name
    hcm = hcm_of(listener.filter_chains[0])
    assert hcm.forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE  # the proto's default
    assert not hcm.HasField("set_current_client_cert_details")


# --------------------------------------------------------------------------- outbound clusters and endpoints


@pytest.mark.parametrize("protocol, alpn", [("http", ["http/1.1"]), ("grpc", ["h2"]), ("tcp", ["http/1.1"])])
def test_the_cluster_and_its_subsets_verify_the_exact_spiffe_id_of_the_service(protocol, alpn):
    snap = snapshot(service("catalog", inst("10.0.0.1", mtls=True, version="v1"), protocol=protocol))
    out = tr.translate(snap, NODE, IDENTITY)
    for name in ("outbound|catalog.default", "outbound|catalog.default|v1"):
        ctx = upstream_tls(out[xds.CLUSTER][name])
        assert ctx.sni == "outbound_.catalog.default"
        common = ctx.common_tls_context
        assert sds_names(common) == (["default"], "ROOTCA")
        assert list(common.alpn_protocols) == alpn
        (san,) = common.combined_validation_context.default_validation_context.match_typed_subject_alt_names
        assert san.san_type == common_pb2.SubjectAltNameMatcher.URI
        assert san.matcher.exact == "spiffe://example.org/ns/default/sa/catalog"
        assert not out[xds.CLUSTER][name].HasField("transport_socket")  # the default stays plaintext


@pytest.mark.parametrize("svc_mode, ns_mode, tls", [
    (None, None, True), ("STRICT", None, True), ("PERMISSIVE", None, True), ("DISABLE", None, False),
    (None, "DISABLE", False), ("PERMISSIVE", "DISABLE", True), ("DISABLE", "STRICT", False)])
def test_the_targets_effective_mode_decides_the_transport_socket_match(svc_mode, ns_mode, tls):
    snap = snapshot(service("catalog", inst("10.0.0.1", mtls=True), mode=svc_mode), ns_mode=ns_mode)
    c = tr.translate(snap, NODE, IDENTITY)[xds.CLUSTER]["outbound|catalog.default"]
    assert bool(c.transport_socket_matches) is tls


def test_only_instances_registered_with_mtls_carry_the_tls_mode_metadata():
    snap = snapshot(service("catalog", inst("10.0.0.1", mtls=True, version="v1"), inst("10.0.0.2")))
    cla = tr.translate(snap, NODE, IDENTITY)[xds.ENDPOINT]["outbound|catalog.default"]
    meta = {ep.endpoint.address.socket_address.address: json_format.MessageToDict(ep.metadata)
            for loc in cla.endpoints for ep in loc.lb_endpoints}
    assert meta["10.0.0.1"] == {"filterMetadata": {"envoy.lb": {"version": "v1"},
                                                   "envoy.transport_socket_match": {"tlsMode": "mutual"}}}
    assert meta["10.0.0.2"] == {}


# --------------------------------------------------------------------------- inbound listener


def downstream_tls(chain) -> tls_pb2.DownstreamTlsContext:
    assert chain.transport_socket.name == "envoy.transport_sockets.tls"
    ctx = tls_pb2.DownstreamTlsContext()
    assert chain.transport_socket.typed_config.Unpack(ctx)
    return ctx


def check_mtls_chain(chain) -> None:
    assert chain.name == "inbound-mtls"
    assert chain.filter_chain_match.transport_protocol == "tls"
    ctx = downstream_tls(chain)
    assert ctx.require_client_certificate.value is True
    common = ctx.common_tls_context
    assert sds_names(common) == (["default"], "ROOTCA")
    assert list(common.alpn_protocols) == ["h2", "http/1.1"]
    (san,) = common.combined_validation_context.default_validation_context.match_typed_subject_alt_names
    assert (san.san_type, san.matcher.prefix) == (common_pb2.SubjectAltNameMatcher.URI, "spiffe://example.org/")


def test_permissive_has_the_tls_inspector_an_mtls_chain_then_a_plaintext_one_with_the_same_hcm():
    listener = inbound(snapshot(service("web", inst("10.0.0.9"))))  # no znode: PERMISSIVE
    assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.tls_inspector"]
    mtls, plain = listener.filter_chains
    check_mtls_chain(mtls)
    assert plain.name == "inbound-plaintext"
    assert not plain.HasField("filter_chain_match") and not plain.HasField("transport_socket")
    assert mtls.filters == plain.filters
    hcm = hcm_of(mtls)
    assert hcm.forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE_SET
    assert hcm.set_current_client_cert_details.uri is True


def test_strict_has_only_the_mtls_chain_and_the_namespace_mode_applies_without_a_service_one():
    for snap in (snapshot(service("web", mode="STRICT")), snapshot(service("web"), ns_mode="STRICT"),
                 snapshot(ns_mode="STRICT")):  # an unregistered node: its namespace's mode
        listener = inbound(snap)
        (chain,) = listener.filter_chains
        check_mtls_chain(chain)
        assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.tls_inspector"]


def test_disable_keeps_todays_listener_but_still_sanitizes_the_client_cert_header():
    listener = inbound(snapshot(service("web", mode="DISABLE"), ns_mode="STRICT"))
    assert len(listener.filter_chains) == 1 and not listener.listener_filters
    assert not listener.filter_chains[0].name and not listener.filter_chains[0].HasField("transport_socket")
    assert hcm_of(listener.filter_chains[0]).forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE_SET


def test_a_tcp_service_gets_the_same_chains_around_tcp_proxy():
    node = xds.NodeInfo(node_id="t", service="thrift", app_port=9090, inbound_port=15006, outbound_port=15001,
                        protocol="tcp")
    listener = inbound(snapshot(service("thrift", protocol="tcp", mode="STRICT",
                                        authz={"action": "DENY", "rules": [{}]})), node)
    (chain,) = listener.filter_chains
    check_mtls_chain(chain)
    assert chain.filters[0].name == "envoy.filters.network.tcp_proxy"
    assert chain.filters[0].typed_config.Is(tcp_proxy_pb2.TcpProxy.DESCRIPTOR)


# --------------------------------------------------------------------------- RBAC


def rbac_of(listener) -> tuple[list[str], rbac_filter_pb2.RBAC | None]:
    hcm = hcm_of(listener.filter_chains[0])
    names = [f.name for f in hcm.http_filters]
    for f in hcm.http_filters:
        if f.name == "envoy.filters.http.rbac":
            msg = rbac_filter_pb2.RBAC()
            assert f.typed_config.Unpack(msg)
            return names, msg
    return names, None


def test_no_authz_znode_no_rbac_filter():
    names, msg = rbac_of(inbound(snapshot(service("web"))))
    assert msg is None and names == ["envoy.filters.http.router"]


def test_allow_with_spiffe_ids_namespaces_methods_and_paths():
    authz = {"action": "ALLOW", "rules": [
        {"from": [WEB, "ns:prod"], "methods": ["GET", "HEAD"], "paths": ["/api", "/v2/"]},
        {"paths": ["/healthz"]},
        {"from": ["ns:default"]},
        {}]}
    snap = snapshot(service("web", authz=authz, policy={"rate_limit": {"rps": 10}}))
    names, msg = rbac_of(inbound(snap))
    assert names == ["envoy.filters.http.rbac", "envoy.filters.http.local_ratelimit", "envoy.filters.http.router"]
    rules = msg.rules
    assert rules.action == rbac_pb2.RBAC.ALLOW
    assert sorted(rules.policies) == ["rule-0", "rule-1", "rule-2", "rule-3"]
    p0 = json_format.MessageToDict(rules.policies["rule-0"])
    assert p0 == {
        "principals": [{"orIds": {"ids": [
            {"authenticated": {"principalName": {"exact": WEB}}},
            {"authenticated": {"principalName": {"prefix": "spiffe://example.org/ns/prod/sa/"}}}]}}],
        "permissions": [{"andRules": {"rules": [
            {"orRules": {"rules": [{"header": {"name": ":method", "stringMatch": {"exact": "GET"}}},
                                   {"header": {"name": ":method", "stringMatch": {"exact": "HEAD"}}}]}},
            {"orRules": {"rules": [{"urlPath": {"path": {"prefix": "/api"}}},
                                   {"urlPath": {"path": {"prefix": "/v2/"}}}]}}]}}]}
    p1 = json_format.MessageToDict(rules.policies["rule-1"])
    assert p1 == {"principals": [{"any": True}], "permissions": [{"andRules": {"rules": [
        {"orRules": {"rules": [{"urlPath": {"path": {"prefix": "/healthz"}}}]}}]}}]}
    p2 = json_format.MessageToDict(rules.policies["rule-2"])
    assert p2 == {"principals": [{"orIds": {"ids": [
        {"authenticated": {"principalName": {"prefix": "spiffe://example.org/ns/default/sa/"}}}]}}],
        "permissions": [{"any": True}]}
    assert json_format.MessageToDict(rules.policies["rule-3"]) == {"principals": [{"any": True}],
                                                                   "permissions": [{"any": True}]}


def test_deny_and_allow_without_rules():
    _, deny = rbac_of(inbound(snapshot(service("web", authz={"action": "DENY", "rules": [{"methods": ["DELETE"]}]}))))
    assert deny.rules.action == rbac_pb2.RBAC.DENY and list(deny.rules.policies) == ["rule-0"]
    _, nothing = rbac_of(inbound(snapshot(service("web", authz={"action": "ALLOW"}))))
    assert nothing.rules.action == rbac_pb2.RBAC.ALLOW and not nothing.rules.policies  # refuses everything


def test_authz_applies_without_a_ca_with_the_default_trust_domain_and_is_in_every_chain():
    snap = snapshot(service("web", authz={"action": "ALLOW", "rules": [{"from": ["ns:prod"]}]}))
    listener = inbound(snap, identity=None)
    _, msg = rbac_of(listener)
    ids = msg.rules.policies["rule-0"].principals[0].or_ids.ids
    assert ids[0].authenticated.principal_name.prefix == "spiffe://meshkeeper.local/ns/prod/sa/"
    assert len(listener.filter_chains) == 1
    mtls, plain = inbound(snap).filter_chains
    assert hcm_of(mtls) == hcm_of(plain) and rbac_of(inbound(snap))[1] is not None


def test_rbac_is_only_in_the_inbound_hcm():
    snap = snapshot(service("web", authz={"action": "DENY", "rules": [{}]}), service("catalog", inst("10.0.0.1")))
    out = transparent.translate(snap, REDIRECT, IDENTITY)
    for name, listener in out[xds.LISTENER].items():
        if name != xds.INBOUND_LISTENER:
            assert b"envoy.filters.http.rbac" not in listener.SerializeToString()


# --------------------------------------------------------------------------- transparent mode


def test_redirect_mode_inbound_chains_match_the_app_port_after_original_dst():
    listener = inbound(snapshot(service("web")), REDIRECT)
    assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.original_dst",
                                                           "envoy.filters.listener.tls_inspector"]
    mtls, plain = listener.filter_chains
    check_mtls_chain(mtls)
    assert (mtls.filter_chain_match.destination_port.value, plain.filter_chain_match.destination_port.value) == (8080, 8080)
    assert plain.name == "inbound-plaintext" and not plain.filter_chain_match.transport_protocol
    assert listener.default_filter_chain.name == xds.INBOUND_PASSTHROUGH_CLUSTER


def test_redirect_mode_strict_has_no_default_chain_so_plaintext_matches_nothing():
    listener = inbound(snapshot(service("web", mode="STRICT")), REDIRECT)
    (mtls,) = listener.filter_chains
    check_mtls_chain(mtls)
    assert mtls.filter_chain_match.destination_port.value == 8080
    assert not listener.HasField("default_filter_chain")
    permissive = inbound(snapshot(service("web", mode="PERMISSIVE")), REDIRECT)
    assert permissive.default_filter_chain.name == xds.INBOUND_PASSTHROUGH_CLUSTER


def test_redirect_mode_without_identity_is_unchanged():
    listener = inbound(snapshot(service("web", mode="STRICT")), REDIRECT, identity=None)
    (chain,) = listener.filter_chains
    assert chain.name == "app" and [f.name for f in listener.listener_filters] == ["envoy.filters.listener.original_dst"]


# --------------------------------------------------------------------------- every message is Envoy's


def _check_any(a: any_pb2.Any) -> None:
    """``a`` names a registered Envoy type, and its bytes parse into it and serialize back the same;
    nested ``Any`` s (typed configs) too."""
    cls = symbol_database.Default().GetSymbol(a.type_url.split("/", 1)[1])
    msg = cls()
    assert a.Unpack(msg), a.type_url
    assert msg.SerializeToString(deterministic=True) == a.value
    _walk(msg)


def _walk(msg: Message) -> None:
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        items = value.values() if fd.message_type.GetOptions().map_entry else (
            value if fd.is_repeated else [value])
        for v in items:
            if not isinstance(v, Message):
                continue
            if v.DESCRIPTOR.full_name == "google.protobuf.Any":
                _check_any(v)
            else:
                _walk(v)


@pytest.mark.parametrize("node", [NODE, REDIRECT])
@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE", "DISABLE"])
def test_every_resource_round_trips_through_any_as_its_envoy_type(node, mode):
    snap = snapshot(service("web", inst("10.0.0.9", mtls=True), mode=mode,
                            authz={"action": "ALLOW", "rules": [{"from": [WEB, "ns:x"], "methods": ["GET"], "paths": ["/"]}]}),
                    service("catalog", inst("10.0.0.1", mtls=True, version="v1"), protocol="grpc"))
    out = transparent.translate(snap, node, IDENTITY)
    for type_url, items in out.items():
        for msg in items.values():
            a = any_pb2.Any()
            a.Pack(msg, deterministic=True)  # as the cache packs them
            assert a.type_url == type_url
            _check_any(a)
    assert isinstance(out[xds.LISTENER][xds.INBOUND_LISTENER], listener_pb2.Listener)


# --------------------------------------------------------------------------- the cache


def test_the_cache_rebuilds_a_nodes_own_layer_when_its_mode_or_authz_changes_and_only_then():
    cache = SnapshotCache(identity=IDENTITY)
    assert cache.identity == IDENTITY
    catalog = service("catalog", inst("10.0.0.1", mtls=True))

    def own(version: int, **web):
        cache.set_snapshot(snapshot(catalog, service("web", inst("10.0.0.9"), **web), version=version))
        return cache.resources(NODE)[xds.LISTENER][xds.INBOUND_LISTENER]

    permissive = own(1)
    assert own(2) is permissive  # nothing of the node's changed: the same packed resource
    strict = own(3, mode="STRICT")
    assert strict.digest != permissive.digest
    with_authz = own(4, mode="STRICT", authz={"action": "DENY", "rules": [{}]})
    assert with_authz.digest != strict.digest
    assert own(5, mode="STRICT", authz={"action": "DENY", "rules": [{}]}) is with_authz


def test_the_cache_retranslates_a_service_when_only_its_namespaces_mode_changes():
    cache = SnapshotCache(identity=IDENTITY)
    catalog = service("catalog", inst("10.0.0.1", mtls=True))
    cache.set_snapshot(snapshot(catalog, version=1))
    before = cache.resources(NODE)[xds.CLUSTER]["outbound|catalog.default"]
    assert before.any.value and b"tlsMode-mutual" in before.any.value
    cache.set_snapshot(snapshot(catalog, ns_mode="DISABLE", version=2))
    after = cache.resources(NODE)[xds.CLUSTER]["outbound|catalog.default"]
    assert b"tlsMode-mutual" not in after.any.value
    assert cache.resources(NODE)[xds.ENDPOINT]["outbound|catalog.default"] is not None
    cache.set_snapshot(snapshot(catalog, ns_mode="DISABLE", version=3))
    assert cache.resources(NODE)[xds.CLUSTER]["outbound|catalog.default"] is after


def test_a_cache_without_identity_ignores_peer_authentication():
    cache = SnapshotCache()
    catalog = service("catalog", inst("10.0.0.1", mtls=True))
    cache.set_snapshot(snapshot(catalog, version=1))
    before = cache.resources(NODE)
    cache.set_snapshot(snapshot(catalog, ns_mode="STRICT", version=2))
    after = cache.resources(NODE)
    assert all(after[t][n] is r for t in before for n, r in before[t].items())


# --------------------------------------------------------------------------- calls by instance address (transparent)

SECURE, PLAIN = "passthrough-mtls|catalog.default", "passthrough|catalog.default"


def instance_chains(out) -> dict[str, tuple[str, str]]:
    """virtual_outbound's instance chains of catalog -> (the cluster they go to, the route config or tcp_proxy)."""
    got = {}
    for chain in out[xds.LISTENER][xds.VIRTUAL_OUTBOUND_LISTENER].filter_chains:
        if not chain.name.startswith("catalog.default|") or chain.name.endswith("|vip"):
            continue
        f = chain.filters[0]
        if f.name == tr.TCP_PROXY_FILTER:
            proxy = tcp_proxy_pb2.TcpProxy()
            assert f.typed_config.Unpack(proxy)
            got[chain.name] = (proxy.cluster, "tcp_proxy")
        else:
            hcm = hcm_of(chain)
            (route,) = hcm.route_config.virtual_hosts[0].routes
            got[chain.name] = (route.route.cluster, hcm.route_config.name)
    return got


def mixed(mode: str | None = "STRICT", protocol: str = "http", ns_mode: str | None = None) -> RegistrySnapshot:
    """catalog: one instance with a sidecar identity (mtls), one registered without (meshkeeper register)."""
    return snapshot(service("catalog", inst("10.0.0.1", mtls=True), inst("10.0.0.2"), protocol=protocol, mode=mode),
                    service("web", inst("10.0.0.9", mtls=True)), ns_mode=ns_mode)


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE"])
def test_an_instance_address_of_an_mtls_instance_goes_to_the_passthrough_mtls_cluster(mode):
    out = transparent.translate(mixed(mode), REDIRECT, IDENTITY)
    assert instance_chains(out) == {
        "catalog.default|10.0.0.1:15006": (SECURE, "catalog.default|direct-mtls"),
        "catalog.default|10.0.0.2:15006": (PLAIN, "catalog.default|direct"),
    }
    secure, plain = out[xds.CLUSTER][SECURE], out[xds.CLUSTER][PLAIN]
    assert secure.type == cluster_pb2.Cluster.ORIGINAL_DST and secure.lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED
    assert not secure.transport_socket_matches and not plain.HasField("transport_socket")
    # the service's policy as on the plaintext one, plus the transport socket
    rest = cluster_pb2.Cluster()
    rest.CopyFrom(secure)
    rest.ClearField("transport_socket")
    rest.name = PLAIN
    assert rest == plain
    # the very UpstreamTlsContext of outbound|catalog.default's tlsMode-mutual match
    assert secure.transport_socket.name == "envoy.transport_sockets.tls"
    ctx = tls_pb2.UpstreamTlsContext()
    assert secure.transport_socket.typed_config.Unpack(ctx)
    assert ctx == upstream_tls(out[xds.CLUSTER]["outbound|catalog.default"])
    assert ctx.sni == "outbound_.catalog.default"
    assert list(ctx.common_tls_context.alpn_protocols) == ["http/1.1"]


def test_a_tcp_service_by_address_gets_tcp_proxy_to_the_passthrough_mtls_cluster():
    out = transparent.translate(mixed(protocol="tcp"), REDIRECT, IDENTITY)
    assert instance_chains(out) == {"catalog.default|10.0.0.1:15006": (SECURE, "tcp_proxy"),
                                    "catalog.default|10.0.0.2:15006": (PLAIN, "tcp_proxy")}
    ctx = tls_pb2.UpstreamTlsContext()
    assert out[xds.CLUSTER][SECURE].transport_socket.typed_config.Unpack(ctx)
    assert list(ctx.common_tls_context.alpn_protocols) == ["http/1.1"]


def test_a_grpc_service_by_address_offers_the_protocol_its_passthrough_cluster_speaks():
    # passthrough|<svc>.<ns> has no HTTP/2 options (HTTP/1.1 to the instance): ALPN http/1.1, not
    # the h2 of outbound|<svc>.<ns>, or the sidecar would refuse the cluster
    out = transparent.translate(mixed(protocol="grpc"), REDIRECT, IDENTITY)
    secure = out[xds.CLUSTER][SECURE]
    assert not secure.typed_extension_protocol_options
    ctx = tls_pb2.UpstreamTlsContext()
    assert secure.transport_socket.typed_config.Unpack(ctx)
    assert list(ctx.common_tls_context.alpn_protocols) == ["http/1.1"]
    assert ctx.common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names[
        0].matcher.exact == "spiffe://example.org/ns/default/sa/catalog"


@pytest.mark.parametrize("case", ["disable", "namespace-disable", "no-ca", "no-mtls-instance", "loopback-only"])
def test_instance_addresses_stay_plaintext_when_a_call_by_name_would(case):
    snap, identity = mixed(), IDENTITY
    if case == "disable":
        snap = mixed("DISABLE")
    elif case == "namespace-disable":
        snap = mixed(None, ns_mode="DISABLE")
    elif case == "no-ca":
        identity = None
    elif case == "no-mtls-instance":
        snap = snapshot(service("catalog", inst("10.0.0.1"), inst("10.0.0.2"), mode="STRICT"))
    else:  # explicit-mode registrations: no chain to route anywhere
        snap = snapshot(service("catalog", inst("127.0.0.1", mtls=True), mode="STRICT"))
    out = transparent.translate(snap, REDIRECT, identity)
    assert SECURE not in out[xds.CLUSTER] and PLAIN in out[xds.CLUSTER]
    assert {c for c, _ in instance_chains(out).values()} <= {PLAIN}


def test_explicit_mode_nodes_get_no_passthrough_clusters():
    out = transparent.translate(mixed(), NODE, IDENTITY)
    assert SECURE not in out[xds.CLUSTER] and PLAIN not in out[xds.CLUSTER]


def test_the_cache_serves_the_passthrough_mtls_cluster_and_keeps_unchanged_resources():
    cache = SnapshotCache(identity=IDENTITY)

    def held(snap):
        cache.set_snapshot(snap)
        return cache.resources(REDIRECT)

    first = held(mixed())
    want = transparent.translate(mixed(), REDIRECT, IDENTITY)
    assert {n: r.any.value for n, r in first[xds.CLUSTER].items()} == {
        n: m.SerializeToString(deterministic=True) for n, m in want[xds.CLUSTER].items()}
    assert SECURE in first[xds.CLUSTER]
    # the same inputs in a new snapshot: the same packed resources
    again = held(mixed())
    assert again[xds.CLUSTER][SECURE] is first[xds.CLUSTER][SECURE]
    assert again[xds.LISTENER][xds.VIRTUAL_OUTBOUND_LISTENER] is first[xds.LISTENER][xds.VIRTUAL_OUTBOUND_LISTENER]
    # the service's mode goes DISABLE: the cluster goes, its chain turns plaintext; the rest stays
    disabled = held(mixed("DISABLE"))
    assert SECURE not in disabled[xds.CLUSTER]
    assert disabled[xds.CLUSTER][PLAIN] is first[xds.CLUSTER][PLAIN]
    assert disabled[xds.LISTENER][xds.VIRTUAL_OUTBOUND_LISTENER].digest != first[xds.LISTENER][xds.VIRTUAL_OUTBOUND_LISTENER].digest
    # a cache without a CA: no passthrough-mtls cluster whatever the records say
    plain = SnapshotCache()
    plain.set_snapshot(mixed())
    assert SECURE not in plain.resources(REDIRECT)[xds.CLUSTER]
