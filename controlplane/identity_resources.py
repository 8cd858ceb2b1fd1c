"""Identity (docs/identity.md) as Envoy resources: the TLS contexts, the inbound mTLS chains,
``x-forwarded-client-cert`` and the RBAC filter. Pure functions, used by
:mod:`controlplane.translate` (and :mod:`controlplane.transparent` for :class:`NodeSecurity`).

With a :class:`meshkeeper.security.MeshIdentity` (the control plane has a CA), an outbound cluster of
a service whose peer authentication is not DISABLE carries a ``tlsMode-mutual`` transport socket
match (:func:`upstream_tls_context`, :func:`tls_socket_match`), endpoints of instances registered
with ``mtls`` carry the ``tlsMode: mutual`` metadata it matches (:data:`TRANSPORT_SOCKET_MATCH`,
:data:`TLS_MODE`), and a node's inbound listener takes mTLS by its own service's mode
(:func:`secure_inbound`) and tells the app who called (:func:`set_client_cert_details`). A
service's ``authz`` becomes the inbound HCM's RBAC filter (:func:`rbac_filter`), CA or not.
:func:`node_security` gathers what a node's inbound side needs of all this.

Certificates travel as SDS secrets ``default`` and ``ROOTCA`` on the ADS stream (controlplane/sds.py
serves them). Returned messages may be shared: callers must treat them as read-only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.type.matcher.v3 import path_pb2, string_pb2
from google.protobuf import wrappers_pb2

from controlplane.snapshot import RegistrySnapshot
from controlplane.xdsbuild import ads_source, pack
from meshkeeper import identity as ident
from meshkeeper import security
from meshkeeper.security import AuthzPolicy, MeshIdentity
from meshkeeper.xds import NodeInfo

# Envoy's extension names and Istio's conventions.
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
TLS_INSPECTOR_FILTER = "envoy.filters.listener.tls_inspector"
RBAC_FILTER = "envoy.filters.http.rbac"
TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"  # endpoint metadata filter a cluster's matches read
TLS_MODE_MATCH = "tlsMode-mutual"
TLS_MODE = {"tlsMode": "mutual"}
INBOUND_MTLS_CHAIN = "inbound-mtls"
INBOUND_PLAINTEXT_CHAIN = "inbound-plaintext"
INBOUND_ALPN = ("h2", "http/1.1")


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads_source())


def _uri_san(**matcher: str) -> tls_common_pb2.SubjectAltNameMatcher:
    return tls_common_pb2.SubjectAltNameMatcher(san_type=tls_common_pb2.SubjectAltNameMatcher.URI,
                                                matcher=string_pb2.StringMatcher(**matcher))


def common_tls_context(san: tls_common_pb2.SubjectAltNameMatcher, alpn: Iterable[str]) -> tls_pb2.CommonTlsContext:
    """The workload certificate ``default`` and the trust bundle ``ROOTCA``, both over SDS on the
    ADS stream, the peer's URI SAN checked by ``san`` (Istio's shape)."""
    return tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[_sds(ident.SECRET_DEFAULT)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=tls_common_pb2.CertificateValidationContext(match_typed_subject_alt_names=[san]),
            validation_context_sds_secret_config=_sds(ident.SECRET_ROOTCA)),
        alpn_protocols=list(alpn))


def upstream_sni(svc: str, ns: str) -> str:
    return f"outbound_.{svc}.{ns}"


def upstream_tls_context(identity: MeshIdentity, svc: str, ns: str, protocol: str = "http") -> tls_pb2.UpstreamTlsContext:
    """What a caller's sidecar presents to the service's instances: its own certificate, and it
    accepts only the exact SPIFFE ID of ``svc``; ALPN h2 to a grpc service, else http/1.1."""
    san = _uri_san(exact=ident.spiffe_id(identity.trust_domain, ns, svc))
    alpn = ("h2",) if protocol == "grpc" else ("http/1.1",)
    return tls_pb2.UpstreamTlsContext(common_tls_context=common_tls_context(san, alpn), sni=upstream_sni(svc, ns))


def tls_socket_match(context: tls_pb2.UpstreamTlsContext) -> cluster_pb2.Cluster.TransportSocketMatch:
    """``transport_socket_matches`` entry ``tlsMode-mutual``: endpoints whose
    ``envoy.transport_socket_match`` metadata says ``tlsMode: mutual`` get TLS; the rest the
    cluster's default (plaintext)."""
    m = cluster_pb2.Cluster.TransportSocketMatch(name=TLS_MODE_MATCH, transport_socket=tls_transport_socket(context))
    m.match.update(TLS_MODE)
    return m


def tls_transport_socket(context: tls_pb2.UpstreamTlsContext) -> base_pb2.TransportSocket:
    """``envoy.transport_sockets.tls`` with ``context``: a match's socket, or (transparent mode's
    ``passthrough-mtls|<svc>.<ns>``) a whole cluster's."""
    return base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=pack(context))


def upstream_mtls(identity: MeshIdentity | None, mode: str) -> bool:
    """Callers of a service whose effective peer authentication is ``mode`` use mTLS to its
    ``mtls`` instances: the control plane has a CA and the mode is not DISABLE."""
    return identity is not None and mode != security.DISABLE


def downstream_tls_context(identity: MeshIdentity) -> tls_pb2.DownstreamTlsContext:
    """The inbound mTLS chain's: a client certificate is required, of any workload of the trust domain."""
    san = _uri_san(prefix=f"spiffe://{identity.trust_domain}/")
    return tls_pb2.DownstreamTlsContext(common_tls_context=common_tls_context(san, INBOUND_ALPN),
                                        require_client_certificate=wrappers_pb2.BoolValue(value=True))


def secure_inbound(listener: listener_pb2.Listener, identity: MeshIdentity | None, mode: str) -> listener_pb2.Listener:
    """The inbound listener's filter chains for the peer authentication ``mode``: PERMISSIVE,
    ``inbound-mtls`` (``transport_protocol: tls``, a DownstreamTlsContext) then
    ``inbound-plaintext``, behind the tls_inspector; STRICT, ``inbound-mtls`` only; DISABLE or no
    identity, the listener as it is (one unnamed plaintext chain). Both chains carry the same filters."""
    if identity is None or mode == security.DISABLE:
        return listener
    plain = listener.filter_chains[0]
    mtls = listener_components_pb2.FilterChain(
        name=INBOUND_MTLS_CHAIN, filter_chain_match=listener_components_pb2.FilterChainMatch(transport_protocol="tls"),
        filters=plain.filters,
        transport_socket=base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET,
                                                  typed_config=pack(downstream_tls_context(identity))))
    chains = [mtls]
    if mode != security.STRICT:
        chains.append(listener_components_pb2.FilterChain(name=INBOUND_PLAINTEXT_CHAIN, filters=plain.filters))
    del listener.filter_chains[:]
    listener.filter_chains.extend(chains)
    listener.listener_filters.add(name=TLS_INSPECTOR_FILTER, typed_config=pack(tls_inspector_pb2.TlsInspector()))
    return listener


def set_client_cert_details(hcm: hcm_pb2.HttpConnectionManager) -> None:
    """``x-forwarded-client-cert``: a caller's is always removed; on an mTLS connection the app gets
    ``By=<own SPIFFE ID>;Hash=<SHA-256 of the caller's certificate>;URI=<caller's>`` (SANITIZE_SET,
    Istio's setting but for ``subject``, which the sidecar does not take)."""
    hcm.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
    hcm.set_current_client_cert_details.uri = True


def _principal(source: str, trust_domain: str) -> rbac_pb2.Principal:
    if source.startswith(security.NS_PREFIX):
        matcher = string_pb2.StringMatcher(prefix=ident.namespace_prefix(trust_domain, source[len(security.NS_PREFIX):]))
    else:
        matcher = string_pb2.StringMatcher(exact=source)
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=matcher))


def _any_of(rules: list[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=rules))


def rbac_policy(rule: security.AuthzRule, trust_domain: str) -> rbac_pb2.Policy:
    """One rule: principals ``[{any}]`` or one ``or_ids`` of the ``from`` identities; permissions
    ``[{any}]`` or one ``and_rules`` of (any method, any path prefix), each part when present."""
    if rule.sources:
        principals = [rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(
            ids=[_principal(s, trust_domain) for s in rule.sources]))]
    else:
        principals = [rbac_pb2.Principal(any=True)]
    parts = []
    if rule.methods:
        parts.append(_any_of([rbac_pb2.Permission(header=route_components_pb2.HeaderMatcher(
            name=":method", string_match=string_pb2.StringMatcher(exact=m))) for m in rule.methods]))
    if rule.paths:
        parts.append(_any_of([rbac_pb2.Permission(url_path=path_pb2.PathMatcher(
            path=string_pb2.StringMatcher(prefix=p))) for p in rule.paths]))
    if parts:
        permissions = [rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=parts))]
    else:
        permissions = [rbac_pb2.Permission(any=True)]
    return rbac_pb2.Policy(permissions=permissions, principals=principals)


RBAC_ACTIONS = {security.ALLOW: rbac_pb2.RBAC.ALLOW, security.DENY: rbac_pb2.RBAC.DENY}


def rbac(policy: AuthzPolicy, trust_domain: str) -> rbac_filter_pb2.RBAC:
    """``envoy.filters.http.rbac`` of a service's ``authz``: policies ``rule-<i>``. The trust domain
    turns ``ns:<ns>`` into a SPIFFE ID prefix (the default one without a CA: no caller has a
    principal then, and only rules without ``from`` can match)."""
    rules = rbac_pb2.RBAC(action=RBAC_ACTIONS[policy.action])
    for i, rule in enumerate(policy.rules):
        rules.policies[f"rule-{i}"].CopyFrom(rbac_policy(rule, trust_domain))
    return rbac_filter_pb2.RBAC(rules=rules)


def rbac_filter(policy: AuthzPolicy, trust_domain: str) -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name=RBAC_FILTER, typed_config=pack(rbac(policy, trust_domain)))


@dataclass(frozen=True, slots=True)
class NodeSecurity:
    """What a node's inbound side needs of identity: the mesh's (None: no CA), its own service's
    effective peer authentication mode and its ``authz`` (None: no znode). Hashable: the xDS cache
    keys per-node resources on it."""

    identity: MeshIdentity | None = None
    mode: str = security.DEFAULT_MODE
    authz: AuthzPolicy | None = None

    @property
    def trust_domain(self) -> str:
        return self.identity.trust_domain if self.identity is not None else ident.DEFAULT_TRUST_DOMAIN


NO_SECURITY = NodeSecurity()


def node_security(snapshot: RegistrySnapshot, node: NodeInfo, identity: MeshIdentity | None = None) -> NodeSecurity:
    """The :class:`NodeSecurity` of the node's own service; :data:`NO_SECURITY` (today's resources)
    without identity and authz."""
    svc = snapshot.services(node.namespace).get(node.service)
    authz = svc.authz if svc is not None else None
    if identity is None and authz is None:
        return NO_SECURITY
    mode = snapshot.peer_mode(node.namespace, node.service) if identity is not None else security.DEFAULT_MODE
    return NodeSecurity(identity, mode, authz)
