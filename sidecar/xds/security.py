"""The sidecar's side of mTLS and authz (docs/identity.md): Envoy's TLS contexts, the inbound
listener's tls_inspector chains, XFCC and the RBAC filter -> the sidecar's config, refusing the rest.

Exactly the shapes docs/identity.md describes: SDS secrets ``default`` / ``ROOTCA`` over ADS, URI
SAN matchers (exact upstream, prefix downstream), Istio's tlsMode-mutual transport socket match,
the inbound listener's tls_inspector with an mTLS chain (and a plaintext one when PERMISSIVE),
XFCC SANITIZE_SET with the URI, and RBAC principals / permissions as the control plane writes them.
:mod:`sidecar.xds.convert` calls these from its cluster, endpoint and listener converters; the
secrets themselves are :mod:`sidecar.xds.secrets`.
"""

from __future__ import annotations

import dataclasses
import re

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_http_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf.message import Message

from sidecar.config import (
    AUTHZ_ALLOW,
    AUTHZ_DENY,
    TLS_PERMISSIVE,
    TLS_STRICT,
    AuthzConfig,
    AuthzPolicy,
    DownstreamTlsConfig,
    ListenerConfig,
    PermissionMatch,
    PrincipalMatch,
    UpstreamTlsConfig,
)
from sidecar.xds.proto import XdsError, enum_name, only, unpack

_HCM = http_connection_manager_pb2.HttpConnectionManager
# Envoy's extension names and type URLs, and Istio's tlsMode convention.
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
UPSTREAM_TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
DOWNSTREAM_TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
TLS_INSPECTOR_FILTER = "envoy.filters.listener.tls_inspector"
TLS_INSPECTOR = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"  # the endpoint metadata filter auto mTLS reads
TLS_MODE_KEY, TLS_MODE_MUTUAL = "tlsMode", "mutual"
_CERTIFICATE_SECRET, _TRUST_BUNDLE_SECRET = "default", "ROOTCA"
_SERVER_ALPN = ("h2", "http/1.1")  # what the sidecar's TLS server negotiates (sidecar.tls.identity)
_SNI = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*")
_UPSTREAM_ALPN = {("h2",), ("http/1.1",), ("h2", "http/1.1")}


def with_tls(config: ListenerConfig, tls: DownstreamTlsConfig | None, where: str) -> ListenerConfig:
    """``config`` (an HTTP connection manager or a tcp_proxy) served behind the mTLS chains."""
    if tls is None:
        return config
    return dataclasses.replace(config, tls=tls)


def _sds(msg: Message, name: str, where: str) -> None:
    """An SdsSecretConfig: ``name`` delivered on the ADS stream."""
    only(msg, ("name", "sds_config"), where)
    if msg.name != name:
        raise XdsError(f"{where}: secret {msg.name!r} is not supported (this sidecar's secrets are "
                       f"{_CERTIFICATE_SECRET!r} and {_TRUST_BUNDLE_SECRET!r})")
    src = msg.sds_config
    only(src, ("ads", "resource_api_version"), f"{where} sds_config")
    if not src.HasField("ads"):
        raise XdsError(f"{where}: sds_config must be ads")
    if src.resource_api_version not in (config_source_pb2.AUTO, config_source_pb2.V3):
        raise XdsError(f"{where}: sds_config resource_api_version must be V3")


def _common_tls(msg: Message, where: str, san_kind: str) -> tuple[str, tuple[str, ...]]:
    """A CommonTlsContext as docs/identity.md writes it -> (the URI SAN matcher's value, ALPN)."""
    only(msg, ("tls_certificate_sds_secret_configs", "combined_validation_context", "alpn_protocols"), where)
    if len(msg.tls_certificate_sds_secret_configs) != 1:
        raise XdsError(f"{where}: exactly one tls_certificate_sds_secret_configs ({_CERTIFICATE_SECRET!r}) is supported")
    _sds(msg.tls_certificate_sds_secret_configs[0], _CERTIFICATE_SECRET, f"{where} tls_certificate_sds_secret_configs")
    if not msg.HasField("combined_validation_context"):
        raise XdsError(f"{where}: needs combined_validation_context (the {_TRUST_BUNDLE_SECRET!r} bundle and a SAN matcher)")
    cvc = msg.combined_validation_context
    vwhere = f"{where} combined_validation_context"
    only(cvc, ("default_validation_context", "validation_context_sds_secret_config"), vwhere)
    if not cvc.HasField("validation_context_sds_secret_config"):
        raise XdsError(f"{vwhere}: needs validation_context_sds_secret_config {_TRUST_BUNDLE_SECRET!r}")
    _sds(cvc.validation_context_sds_secret_config, _TRUST_BUNDLE_SECRET, f"{vwhere} validation_context_sds_secret_config")
    dvc = cvc.default_validation_context
    only(dvc, ("match_typed_subject_alt_names",), f"{vwhere} default_validation_context")
    if len(dvc.match_typed_subject_alt_names) != 1:
        raise XdsError(f"{vwhere}: exactly one match_typed_subject_alt_names (a URI SAN {san_kind}) is supported")
    san = dvc.match_typed_subject_alt_names[0]
    swhere = f"{vwhere} match_typed_subject_alt_names"
    only(san, ("san_type", "matcher"), swhere)
    if san.san_type != common_pb2.SubjectAltNameMatcher.URI:
        raise XdsError(f"{swhere}: only san_type URI is supported")
    only(san.matcher, (san_kind,), f"{swhere} matcher (only {san_kind})")
    value = getattr(san.matcher, san_kind)
    if not value:
        raise XdsError(f"{swhere}: an empty {san_kind}")
    return value, tuple(msg.alpn_protocols)


def upstream_tls(cluster_msg: cluster_pb2.Cluster, http2: bool, where: str) -> UpstreamTlsConfig | None:
    """``transport_socket_matches``: one tlsMode-mutual match with an UpstreamTlsContext, or none."""
    matches = cluster_msg.transport_socket_matches
    if not matches:
        return None
    where = f"{where} transport_socket_matches"
    if len(matches) != 1:
        raise XdsError(f"{where}: exactly one entry (tlsMode-mutual) is supported, got {len(matches)}")
    m = matches[0]
    only(m, ("name", "match", "transport_socket"), where)
    criteria = {k: v.string_value if v.WhichOneof("kind") == "string_value" else None for k, v in m.match.fields.items()}
    if criteria != {TLS_MODE_KEY: TLS_MODE_MUTUAL}:
        raise XdsError(f"{where}: match must be {{{TLS_MODE_KEY}: {TLS_MODE_MUTUAL}}}")
    return _upstream_tls_context(m.transport_socket, http2, where)


def original_dst_tls(cluster_msg: cluster_pb2.Cluster, http2: bool, where: str) -> UpstreamTlsConfig | None:
    """An ORIGINAL_DST cluster's ``transport_socket`` (transparent mode's ``passthrough-mtls|<svc>.<ns>``):
    an UpstreamTlsContext for every host it makes (they carry no metadata a match could read), or
    none (plaintext)."""
    if not cluster_msg.HasField("transport_socket"):
        return None
    return _upstream_tls_context(cluster_msg.transport_socket, http2, where)


def _upstream_tls_context(ts, http2: bool, where: str) -> UpstreamTlsConfig:
    """A transport socket ``envoy.transport_sockets.tls`` with an UpstreamTlsContext as
    docs/identity.md writes it -> :class:`UpstreamTlsConfig`."""
    only(ts, ("name", "typed_config"), f"{where} transport_socket")
    if ts.typed_config.type_url != UPSTREAM_TLS_CONTEXT:
        raise XdsError(f"{where}: transport_socket must be {TLS_TRANSPORT_SOCKET} with an UpstreamTlsContext")
    ctx = unpack(ts.typed_config, tls_pb2.UpstreamTlsContext(), where, "UpstreamTlsContext")
    cwhere = f"{where} UpstreamTlsContext"
    only(ctx, ("common_tls_context", "sni"), cwhere)
    san, alpn = _common_tls(ctx.common_tls_context, f"{cwhere} common_tls_context", "exact")
    if alpn and alpn not in _UPSTREAM_ALPN:
        raise XdsError(f"{cwhere}: alpn_protocols {list(alpn)} are not supported (h2 and/or http/1.1)")
    if alpn and ("h2" if http2 else "http/1.1") not in alpn:
        raise XdsError(f"{cwhere}: alpn_protocols {list(alpn)} do not offer the cluster's protocol "
                       f"({'HTTP/2' if http2 else 'HTTP/1.1'})")
    if ctx.sni and not _SNI.fullmatch(ctx.sni):
        raise XdsError(f"{cwhere}: sni {ctx.sni!r} is not a host name")
    return UpstreamTlsConfig(san=san, alpn=alpn, sni=ctx.sni)


def endpoint_mtls(lbe, where: str) -> bool:
    """The endpoint's ``envoy.transport_socket_match`` metadata says ``tlsMode: mutual``."""
    md = lbe.metadata.filter_metadata.get(TRANSPORT_SOCKET_MATCH) if lbe.HasField("metadata") else None
    if md is None:
        return False
    value = md.fields.get(TLS_MODE_KEY)
    return value is not None and value.WhichOneof("kind") == "string_value" and value.string_value == TLS_MODE_MUTUAL


def _downstream_tls(chain, where: str) -> str:
    """The mTLS chain's transport_socket -> the SAN prefix callers' certificates must have."""
    ts = chain.transport_socket
    only(ts, ("name", "typed_config"), f"{where} transport_socket")
    if ts.typed_config.type_url != DOWNSTREAM_TLS_CONTEXT:
        raise XdsError(f"{where}: transport_socket must be {TLS_TRANSPORT_SOCKET} with a DownstreamTlsContext")
    ctx = unpack(ts.typed_config, tls_pb2.DownstreamTlsContext(), where, "DownstreamTlsContext")
    cwhere = f"{where} DownstreamTlsContext"
    only(ctx, ("common_tls_context", "require_client_certificate"), cwhere)
    if not ctx.require_client_certificate.value:
        raise XdsError(f"{cwhere}: require_client_certificate must be true (mutual TLS only)")
    prefix, alpn = _common_tls(ctx.common_tls_context, f"{cwhere} common_tls_context", "prefix")
    if alpn != _SERVER_ALPN:
        raise XdsError(f"{cwhere}: alpn_protocols must be {list(_SERVER_ALPN)}, got {list(alpn)}")
    return prefix


def tls_inspector_names(msg: listener_pb2.Listener, where: str) -> list[str]:
    """The listener filters' names; a tls_inspector must carry nothing but its (empty) config."""
    names = []
    for f in msg.listener_filters:
        if f.name == TLS_INSPECTOR_FILTER:
            only(f, ("name", "typed_config"), f"{where} listener filter {f.name!r}")
            if f.HasField("typed_config"):
                if f.typed_config.type_url != TLS_INSPECTOR:
                    raise XdsError(f"{where} listener filter {f.name!r}: typed_config must be a TlsInspector")
                only(unpack(f.typed_config, tls_inspector_pb2.TlsInspector(), where), (),
                      f"{where} listener filter {f.name!r}")
        names.append(f.name)
    return names


def tls_chains(msg: listener_pb2.Listener, where: str, match_fields: tuple[str, ...] = ()):
    """A listener's filter chains behind its tls_inspector -> (the mTLS chain, the plaintext chain
    or None, the TLS config).

    The mTLS chain has ``filter_chain_match.transport_protocol: tls`` and a DownstreamTlsContext;
    the plaintext one (PERMISSIVE only) no transport protocol. ``match_fields`` are the other
    filter_chain_match fields allowed (the same on both chains). That both carry the same network
    filter is for the caller to check (:func:`sidecar.xds.convert.filter_chains`).
    """
    chains = msg.filter_chains
    if len(chains) not in (1, 2):
        raise XdsError(f"{where}: with {TLS_INSPECTOR_FILTER} one (STRICT) or two (PERMISSIVE) filter chains "
                       f"are supported, got {len(chains)}")
    tls_chain = plain_chain = None
    for i, chain in enumerate(chains):
        cwhere = f"{where} filter chain {chain.name or i!r}"
        only(chain, ("filters", "name", "metadata", "filter_chain_match", "transport_socket"), cwhere)
        only(chain.filter_chain_match, ("transport_protocol", *match_fields), f"{cwhere} filter_chain_match")
        proto = chain.filter_chain_match.transport_protocol
        if proto == "tls":
            if tls_chain is not None:
                raise XdsError(f"{where}: two chains match transport_protocol tls")
            if not chain.HasField("transport_socket"):
                raise XdsError(f"{cwhere}: a tls chain needs a transport_socket (DownstreamTlsContext)")
            tls_chain = (chain, _downstream_tls(chain, cwhere))
        elif proto in ("", "raw_buffer"):
            if plain_chain is not None:
                raise XdsError(f"{where}: two plaintext chains")
            if chain.HasField("transport_socket"):
                raise XdsError(f"{cwhere}: a plaintext chain has no transport_socket")
            plain_chain = chain
        else:
            raise XdsError(f"{cwhere}: transport_protocol {proto!r} is not supported (tls, or none)")
    if tls_chain is None:
        raise XdsError(f"{where}: listener_filters {TLS_INSPECTOR_FILTER} needs a filter chain matching transport_protocol tls")
    chain, prefix = tls_chain
    if plain_chain is not None:
        for name in match_fields:
            if getattr(chain.filter_chain_match, name) != getattr(plain_chain.filter_chain_match, name):
                raise XdsError(f"{where}: the tls and plaintext chains must match the same {name}")
    return chain, plain_chain, DownstreamTlsConfig(mode=TLS_STRICT if plain_chain is None else TLS_PERMISSIVE, san_prefix=prefix)


def xfcc(hcm: Message, where: str) -> dict[str, bool]:
    """``forward_client_cert_details`` SANITIZE_SET with ``set_current_client_cert_details.uri``
    (the default, SANITIZE, is today's: the header is left as the caller sent it)."""
    mode = hcm.forward_client_cert_details
    if mode not in (_HCM.SANITIZE, _HCM.SANITIZE_SET):
        name = enum_name(_HCM.ForwardClientCertDetails, mode)
        raise XdsError(f"{where}: forward_client_cert_details {name} is not supported (SANITIZE_SET)")
    if hcm.HasField("set_current_client_cert_details"):
        details = hcm.set_current_client_cert_details
        only(details, ("uri",), f"{where} set_current_client_cert_details (only uri)")
        if mode != _HCM.SANITIZE_SET:
            raise XdsError(f"{where}: set_current_client_cert_details needs forward_client_cert_details SANITIZE_SET")
        return {"xfcc_sanitize_set": True, "xfcc_uri": details.uri}
    return {"xfcc_sanitize_set": mode == _HCM.SANITIZE_SET, "xfcc_uri": False}


def rbac_filter(f, where: str) -> AuthzConfig | None:
    """``envoy.filters.http.rbac`` -> AuthzConfig; None: no ``rules`` (Envoy: the filter does nothing)."""
    msg = unpack(f.typed_config, rbac_http_pb2.RBAC(), where, "RBAC")
    only(msg, ("rules",), where)
    if not msg.HasField("rules"):
        return None
    rules = msg.rules
    only(rules, ("action", "policies"), f"{where} rules")
    if rules.action not in (rbac_pb2.RBAC.ALLOW, rbac_pb2.RBAC.DENY):
        raise XdsError(f"{where} rules: action {enum_name(rbac_pb2.RBAC.Action, rules.action)} is not supported (ALLOW, DENY)")
    policies = []
    for name in sorted(rules.policies):
        p = rules.policies[name]
        pwhere = f"{where} policy {name!r}"
        only(p, ("permissions", "principals"), pwhere)
        if not p.permissions or not p.principals:
            raise XdsError(f"{pwhere}: needs permissions and principals")
        principals: list[PrincipalMatch] = []
        for pr in p.principals:
            principals.extend(_principal(pr, f"{pwhere} principal", nested=False))
        policies.append(AuthzPolicy(name=name, permissions=tuple(_permission(pm, f"{pwhere} permission")
                                                                 for pm in p.permissions),
                                    principals=tuple(principals)))
    action = AUTHZ_ALLOW if rules.action == rbac_pb2.RBAC.ALLOW else AUTHZ_DENY
    return AuthzConfig(action=action, policies=tuple(policies))


def _principal(msg, where: str, nested: bool) -> list[PrincipalMatch]:
    """``any``, ``authenticated.principal_name`` exact/prefix, or (not nested) ``or_ids`` of those."""
    which = msg.WhichOneof("identifier")
    if which == "any" and msg.any:
        return [PrincipalMatch(any=True)]
    if which == "authenticated":
        only(msg.authenticated, ("principal_name",), f"{where} authenticated")
        sm = msg.authenticated.principal_name
        only(sm, ("exact", "prefix"), f"{where} principal_name (exact or prefix)")
        kind = sm.WhichOneof("match_pattern")
        if kind is None or not getattr(sm, kind):
            raise XdsError(f"{where} principal_name: an empty matcher")
        return [PrincipalMatch(exact=sm.exact) if kind == "exact" else PrincipalMatch(prefix=sm.prefix)]
    if which == "or_ids" and not nested:
        if not msg.or_ids.ids:
            raise XdsError(f"{where} or_ids: empty")
        return [m for p in msg.or_ids.ids for m in _principal(p, f"{where} or_ids", nested=True)]
    raise XdsError(f"{where}: {which or 'nothing'} is not supported (any, authenticated, or_ids of authenticated)")


def _permission(msg, where: str) -> PermissionMatch:
    """``any``, or ``and_rules`` of at most one method part and one path part, each an ``or_rules``
    of ``header ":method"`` exact / ``url_path`` path prefix matchers (or one such matcher)."""
    which = msg.WhichOneof("rule")
    if which == "any" and msg.any:
        return PermissionMatch()
    parts = msg.and_rules.rules if which == "and_rules" else [msg]
    if which == "and_rules" and not parts:
        raise XdsError(f"{where} and_rules: empty")
    methods: set[bytes] | None = None
    paths: list[bytes] | None = None
    for part in parts:
        kind, values = _permission_part(part, where)
        if kind == "method":
            if methods is not None:
                raise XdsError(f"{where}: two method parts")
            methods = set(values)
        else:
            if paths is not None:
                raise XdsError(f"{where}: two path parts")
            paths = list(values)
    return PermissionMatch(methods=frozenset(methods or ()), path_prefixes=tuple(paths or ()))


def _permission_part(msg, where: str) -> tuple[str, list[bytes]]:
    which = msg.WhichOneof("rule")
    if which == "or_rules":
        got = [_permission_leaf(r, f"{where} or_rules") for r in msg.or_rules.rules]
        if not got or len({k for k, _ in got}) != 1:
            raise XdsError(f"{where} or_rules: needs matchers of one kind (methods, or paths)")
        return got[0][0], [v for _, v in got]
    kind, value = _permission_leaf(msg, where)
    return kind, [value]


def _permission_leaf(msg, where: str) -> tuple[str, bytes]:
    which = msg.WhichOneof("rule")
    if which == "header":
        h = msg.header
        only(h, ("name", "string_match", "exact_match"), f"{where} header")
        value = h.string_match.exact if h.HasField("string_match") else h.exact_match
        if h.HasField("string_match"):
            only(h.string_match, ("exact",), f"{where} header string_match (exact only)")
        if h.name != ":method" or not value:
            raise XdsError(f"{where} header: only \":method\" matched exactly is supported")
        return "method", value.encode("latin-1")
    if which == "url_path":
        up = msg.url_path
        only(up, ("path",), f"{where} url_path")
        only(up.path, ("prefix",), f"{where} url_path path (prefix only)")
        if not up.path.prefix:
            raise XdsError(f"{where} url_path: an empty prefix")
        return "path", up.path.prefix.encode("latin-1")
    raise XdsError(f"{where}: {which or 'nothing'} is not supported (header :method, url_path prefix)")
