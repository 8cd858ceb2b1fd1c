"""Fuzzing the xDS resources of mutual TLS and authorization (issue 16, docs/identity.md).

The valid resources are what the control plane sends a sidecar when it has a CA and a service has
an authz policy (controlplane.translate and controlplane.transparent with a MeshIdentity, STRICT and
PERMISSIVE peer authentication, mTLS instances, ALLOW and DENY policies): clusters with
``transport_socket_matches`` (UpstreamTlsContext), inbound listeners with the tls_inspector, two
filter chains and a DownstreamTlsContext, HCMs with ``forward_client_cert_details`` and the
``envoy.filters.http.rbac`` filter, and the SDS ``Secret`` resources ``default`` and ``ROOTCA``
(as controlplane/sds.py packs them). Each example mutates one of them as tests/unit/test_fuzz_xds.py
does (and Secrets' PEMs byte-wise), then:

- the converter (sidecar/xds/state.py's CONVERTERS) returns a config or raises a ValueError
  (XdsError), never another exception;
- through :class:`sidecar.xds.state.Update`, a response carrying every valid resource of the type
  with the mutated one in place of (or beside) its original applies the others and, when it refuses
  the mutated one, NACKs naming it and keeps its last accepted value: nothing half-applied;
- :meth:`sidecar.tls.identity.TlsIdentity.apply_secrets` with mutated PEMs (bad PEM, a chain for
  another key or from another CA, garbage appended, bundles cut short) raises ValueError or accepts,
  never another exception, and a refusal leaves every part of the identity as it was.
"""

from __future__ import annotations

import base64
import copy
import datetime
from types import MappingProxyType
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtensionOID
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf.message import DecodeError, Message
from hypothesis import given
from hypothesis import strategies as st

from controlplane import translate, transparent
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from meshkeeper import xds
from meshkeeper.identity import SECRET_DEFAULT, SECRET_ROOTCA
from meshkeeper.registry import InstanceRecord, ServiceRecord
from meshkeeper.security import AuthzPolicy, MeshIdentity, PeerAuthentication
from sidecar.config import SecretConfig
from sidecar.tls.identity import TlsIdentity
from sidecar.xds.state import CONVERTERS, MESSAGES, TypeState, Update
from tests.support import pki
from tests.support.fuzz import fuzz_settings, mutated, tally
from tests.unit.test_fuzz_xds import _mutate

TD = pki.TRUST_DOMAIN
IDENTITY = MeshIdentity(TD)
CA = pki.Ca()
OTHER_CA = pki.Ca("other.example")
KEY = pki.new_key()  # the sidecar's current key
NEXT_KEY = pki.new_key()  # its pending key (a rotation in flight)
CHAIN = pki.cert_pem(CA.sign(KEY.public_key(), pki.spiffe("web")))
NEXT_CHAIN = pki.cert_pem(CA.sign(NEXT_KEY.public_key(), pki.spiffe("web")))
STRANGER_CHAIN = pki.cert_pem(CA.sign(pki.new_key().public_key(), pki.spiffe("web")))  # a key we do not have
FOREIGN_CHAIN = pki.cert_pem(OTHER_CA.sign(KEY.public_key(), pki.spiffe("web")))  # our key, another CA
BUNDLE = CA.bundle_pem


def _broken_san_chain(key: Any) -> bytes:
    """A certificate for ``key`` whose subjectAltName does not parse (OpenSSL refuses it; cryptography
    parses extensions only when asked)."""
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(CA.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=60)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x86\x05a"),
                           critical=False)
            .sign(CA.key, hashes.SHA256()))
    return pki.cert_pem(cert)


def _unknown_curve_chain() -> bytes:
    """CHAIN with its key's curve OID (P-256, 1.2.840.10045.3.1.7) changed to one nobody supports."""
    der = x509.load_pem_x509_certificate(CHAIN).public_bytes(serialization.Encoding.DER)
    p256 = bytes.fromhex("06082a8648ce3d030107")
    assert der.count(p256) == 1
    der = der.replace(p256, bytes.fromhex("06082a8648ce3e030107"))
    return b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n"


BROKEN_SAN_CHAIN = _broken_san_chain(NEXT_KEY)
UNKNOWN_CURVE_CHAIN = _unknown_curve_chain()
PEMS = (CHAIN, NEXT_CHAIN, STRANGER_CHAIN, FOREIGN_CHAIN, BUNDLE, OTHER_CA.bundle_pem, pki.key_pem(KEY),
        CHAIN + BUNDLE, BUNDLE + OTHER_CA.bundle_pem, b"", b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "é".encode(),
        BROKEN_SAN_CHAIN, UNKNOWN_CURVE_CHAIN)


def _inst(host: str, version: str = "") -> InstanceRecord:
    return InstanceRecord(address=host, port=15006, labels={"version": version} if version else {}, app_port=8080,
                          mtls=True)


def _service(name: str, *instances: InstanceRecord, protocol: str = "http", mode: str | None = None,
             authz: str | None = None) -> ServiceSnapshot:
    return ServiceSnapshot(name=name, namespace="default", record=ServiceRecord(protocol=protocol),
                           instances=MappingProxyType({i.key: i for i in instances}),
                           peer_authentication=PeerAuthentication(mode) if mode else None,
                           authz=AuthzPolicy.decode(authz.encode()) if authz else None)


def _secrets() -> dict[str, Message]:
    default = secret_pb2.Secret(name=SECRET_DEFAULT)
    default.tls_certificate.certificate_chain.inline_bytes = CHAIN
    rootca = secret_pb2.Secret(name=SECRET_ROOTCA)
    rootca.validation_context.trusted_ca.inline_bytes = BUNDLE
    return {SECRET_DEFAULT: default, SECRET_ROOTCA: rootca}


def valid_resources() -> dict[str, dict[str, Message]]:
    """type URL -> name -> message: what sidecars of a mesh with a CA and authz policies get."""
    allow = ('{"action": "ALLOW", "rules": [{"from": ["spiffe://meshkeeper.local/ns/default/sa/web", "ns:ops"], '
             '"methods": ["GET", "POST"], "paths": ["/api/"]}, {"paths": ["/healthz"]}]}')
    deny = '{"action": "DENY", "rules": [{"paths": ["/admin"]}, {"from": ["ns:other"]}]}'
    services = {
        "web": _service("web", _inst("10.0.0.9"), mode="PERMISSIVE", authz=deny),
        "catalog": _service("catalog", _inst("10.0.0.1", "v1"), _inst("10.0.0.2", "v2"), mode="STRICT", authz=allow),
        "orders": _service("orders", _inst("10.0.0.3"), protocol="grpc", authz=allow),
        "db": _service("db", _inst("10.0.0.4"), protocol="tcp", mode="STRICT"),
    }
    snapshot = RegistrySnapshot(1, MappingProxyType({"default": MappingProxyType(services)}),
                                peer_authentication=MappingProxyType({"default": PeerAuthentication("PERMISSIVE")}))
    out: dict[str, dict[str, Message]] = {xds.SECRET: _secrets()}
    for svc, interception, fn in (("web", "", translate.translate), ("catalog", "redirect", transparent.translate),
                                  ("orders", "", translate.translate), ("web", "redirect", transparent.translate)):
        host = services[svc].instances and next(iter(services[svc].instances.values())).address
        node = xds.NodeInfo(node_id=f"{svc}-{interception or 'explicit'}", service=svc, app_port=8080, inbound_port=15006,
                            outbound_port=15001, advertise_host=host, **({"interception": interception} if interception else {}))
        for type_url, items in fn(snapshot, node, IDENTITY).items():
            if type_url in CONVERTERS:
                for name, msg in items.items():
                    out.setdefault(type_url, {}).setdefault(name, msg)
    return out


RESOURCES = valid_resources()
# The types whose resources carry what this file is about, and the resources of mTLS or authz.
TYPES = (xds.CLUSTER, xds.LISTENER, xds.SECRET)


def _interesting(type_url: str, msg: Message) -> bool:
    if type_url == xds.SECRET:
        return True
    if type_url == xds.CLUSTER:
        return bool(msg.transport_socket_matches)
    return bool(msg.listener_filters) or any(c.transport_socket.name for c in msg.filter_chains) or \
        b"rbac" in msg.SerializeToString()


MTLS = {t: [n for n, m in sorted(RESOURCES[t].items()) if _interesting(t, m)] for t in TYPES}


@st.composite
def mutated_resource(draw: st.DrawFn) -> tuple[str, str, Message]:
    """(type URL, the original's name, a mutation of it)."""
    type_url = draw(st.sampled_from(TYPES))
    name = draw(st.sampled_from(MTLS[type_url]))
    msg = MESSAGES[type_url]()
    if draw(st.integers(0, 15)) == 0:  # bytes that happen to parse as the resource
        try:
            msg.ParseFromString(draw(st.binary(max_size=64)))
        except DecodeError:
            msg = MESSAGES[type_url]()
        return type_url, name, msg
    msg.CopyFrom(RESOURCES[type_url][name])
    if type_url == xds.SECRET and draw(st.booleans()):  # the PEM itself, byte-wise
        source = (msg.tls_certificate.certificate_chain if msg.HasField("tls_certificate")
                  else msg.validation_context.trusted_ca)
        source.inline_bytes = draw(mutated(source.inline_bytes) | st.sampled_from(PEMS))
    for _ in range(draw(st.integers(1 if type_url != xds.SECRET else 0, 4))):
        _mutate(draw, msg)
    return type_url, name, msg


def _name(type_url: str, msg: Message) -> str:
    return msg.cluster_name if type_url == xds.ENDPOINT else msg.name


def check_update(type_url: str, original_name: str, msg: Message) -> None:
    """The mutated resource alone through its converter, then in a response with every valid
    resource of its type, over a client that holds them all (accepted before)."""
    short = xds.SHORT_TYPE[type_url]
    try:
        CONVERTERS[type_url](msg)
    except ValueError:
        refused = True
    else:
        refused = False
    tally(f"{short} {'refused' if refused else 'accepted'}")
    valid = RESOURCES[type_url]
    held = TypeState()
    first = Update(type_url, held, incremental=False)
    for n, m in valid.items():
        first.add(n, m)
    assert not first.errors, first.errors
    held.resources, held.raw, held.versions = first.held_after()
    before = (dict(held.resources), dict(held.raw))

    name = _name(type_url, msg)
    up = Update(type_url, held, incremental=False)
    for n, m in valid.items():
        if n != original_name and n != name:
            up.add(n, m)
    up.add(name, msg)
    up.remove_unlisted()
    # Every other resource: applied, as converted from the same message.
    for n, m in valid.items():
        if n not in (original_name, name):
            assert up.raw[n] is m and n not in up.removed
    assert (held.resources, held.raw) == before, "an Update changed what the client holds"
    if refused:
        assert len(up.errors) == 1 and not up.whole, up.errors
        reason = up.errors[0]
        assert name in reason or repr(name) in reason, f"the NACK does not name {name!r}: {reason}"
        if name in before[0]:  # the last accepted value stays, whole
            assert up.converted[name] is before[0][name] and up.raw[name] is before[1][name]
        else:
            assert name not in up.converted and name not in up.raw
    else:
        assert not up.errors and up.raw[name] is msg
    resources, raw, _ = up.held_after()
    assert set(resources) == set(raw)


@pytest.mark.parametrize("type_url", TYPES)
def test_the_control_planes_mtls_resources_convert(type_url: str) -> None:
    assert MTLS[type_url], f"no mTLS or authz resource of {type_url}"
    for msg in RESOURCES[type_url].values():
        CONVERTERS[type_url](msg)


@fuzz_settings(300)
@given(case=mutated_resource())
def test_any_mutated_mtls_resource_is_applied_or_nacked_by_name(case: tuple[str, str, Message]) -> None:
    check_update(*case)


def _inbound_with_hcm(change: Any) -> Message:
    """An inbound listener of the control plane's with ``change`` made to its HCM (both chains)."""
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    for msg in RESOURCES[xds.LISTENER].values():
        if len(msg.filter_chains) == 2 and msg.listener_filters:
            out = copy.deepcopy(msg)
            for chain in out.filter_chains:
                hcm = hcm_pb2.HttpConnectionManager()
                if not chain.filters[0].typed_config.Unpack(hcm):
                    break
                change(hcm)
                chain.filters[0].typed_config.Pack(hcm)
            else:
                return out
    raise AssertionError("no PERMISSIVE inbound listener with an HCM")


def _set_xfcc(hcm: Any) -> None:
    hcm.forward_client_cert_details = 99


def _set_rbac_action(hcm: Any) -> None:
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_http_pb2

    for f in hcm.http_filters:
        if f.typed_config.type_url.endswith("rbac.v3.RBAC"):
            rbac = rbac_http_pb2.RBAC()
            f.typed_config.Unpack(rbac)
            rbac.rules.action = 7
            f.typed_config.Pack(rbac)
            return
    raise AssertionError("no RBAC filter")


@pytest.mark.parametrize("case", ["cluster type", "cluster lb_policy", "forward_client_cert_details", "rbac action"])
def test_an_unknown_enum_value_is_nacked_naming_the_resource(case: str) -> None:
    if case.startswith("cluster"):
        msg = copy.deepcopy(RESOURCES[xds.CLUSTER][MTLS[xds.CLUSTER][0]])
        if case == "cluster type":
            msg.type = -1
        else:
            msg.lb_policy = 99
        type_url = xds.CLUSTER
    else:
        msg, type_url = _inbound_with_hcm(_set_xfcc if case == "forward_client_cert_details" else _set_rbac_action), \
            xds.LISTENER
    with pytest.raises(ValueError) as refused:
        CONVERTERS[type_url](msg)
    assert repr(msg.name) in str(refused.value) and "no name defined" not in str(refused.value), str(refused.value)


# --------------------------------------------------------------------------- TlsIdentity


def _state(identity: TlsIdentity) -> tuple[Any, ...]:
    return (identity._key, identity._pending, identity._chain, identity._bundle, identity._server,
            dict(identity._clients), identity.spiffe_id, identity.not_after, identity.generation)


def _identity(pending: bool, fresh: bool = False) -> TlsIdentity:
    """Ready (KEY, CHAIN, BUNDLE), with NEXT_KEY pending if ``pending``; ``fresh``: nothing but the
    pending NEXT_KEY yet (a sidecar's first certificate)."""
    identity = TlsIdentity()
    if fresh:
        identity.set_pending_key(pki.key_pem(NEXT_KEY))
        return identity
    identity.set_pending_key(pki.key_pem(KEY))
    identity.apply_secrets({SECRET_DEFAULT: SecretConfig(SECRET_DEFAULT, certificate_chain=CHAIN),
                            SECRET_ROOTCA: SecretConfig(SECRET_ROOTCA, trusted_ca=BUNDLE)})
    assert identity.ready
    if pending:
        identity.set_pending_key(pki.key_pem(NEXT_KEY))
    return identity


_PEM = st.sampled_from((CHAIN, NEXT_CHAIN, BUNDLE, CHAIN + BUNDLE)) | st.sampled_from(PEMS) | st.sampled_from(PEMS).flatmap(mutated) | st.binary(max_size=64) | \
    st.lists(st.sampled_from(PEMS), min_size=2, max_size=4).map(b"".join)


_GOOD = {SECRET_DEFAULT: (CHAIN, NEXT_CHAIN, CHAIN + BUNDLE, NEXT_CHAIN + BUNDLE), SECRET_ROOTCA: (BUNDLE,)}


@st.composite
def secret_sets(draw: st.DrawFn) -> tuple[str, dict[str, SecretConfig]]:
    """(a rotation in flight, the secrets): each PEM a valid one half of the time, else anything."""
    names = draw(st.sampled_from(((SECRET_DEFAULT,), (SECRET_ROOTCA,), (SECRET_DEFAULT, SECRET_ROOTCA))))
    if draw(st.integers(0, 7)) == 0:
        names += (draw(st.sampled_from(("other", "", "default "))),)
    out: dict[str, SecretConfig] = {}
    for name in names:
        good = _GOOD.get(name, (CHAIN,)) + ((BROKEN_SAN_CHAIN, UNKNOWN_CURVE_CHAIN) if name == SECRET_DEFAULT else ())
        pem = draw(st.sampled_from(good)) if draw(st.booleans()) else draw(_PEM)
        extra = draw(_PEM) if draw(st.integers(0, 9)) == 0 else b""  # the other field set too
        chain, bundle = (extra, pem) if name == SECRET_ROOTCA else (pem, extra)
        out[name] = SecretConfig(name, certificate_chain=chain, trusted_ca=bundle)
    return draw(st.sampled_from(("ready", "pending", "fresh"))), out


def check_apply_secrets(start: str, secrets: dict[str, SecretConfig]) -> None:
    identity = _identity(start == "pending", fresh=start == "fresh")
    before = _state(identity)
    try:
        identity.apply_secrets(secrets)
    except ValueError:
        tally("secrets refused")
        assert _state(identity) == before, "a refused apply_secrets changed the identity"
        return
    tally(f"secrets accepted ({start})")
    if start != "fresh":
        assert identity.ready, "an accepted change lost the identity"
    if identity.ready:
        assert identity.server_context() is not None
        assert identity.client_context(("h2",)) is not None


@fuzz_settings(100)
@given(case=secret_sets())
def test_apply_secrets_refuses_or_accepts_any_pems_and_a_refusal_changes_nothing(
        case: tuple[str, dict[str, SecretConfig]]) -> None:
    check_apply_secrets(*case)


def test_the_fixture_identity_rotates_to_the_pending_key() -> None:
    identity = _identity(pending=True)
    generation = identity.generation
    identity.apply_secrets({SECRET_DEFAULT: SecretConfig(SECRET_DEFAULT, certificate_chain=NEXT_CHAIN)})
    assert identity.generation == generation + 1 and not identity.has_pending_key
    assert copy.copy(identity.certificate_chain) == NEXT_CHAIN


@pytest.mark.parametrize("start", ["ready", "pending", "fresh"])
def test_a_certificate_whose_key_curve_is_unknown_is_refused_and_changes_nothing(start: str) -> None:
    # Found by fuzzing: leaf.public_key() raised cryptography's UnsupportedAlgorithm (not a
    # ValueError), which the xDS client logs as a bug instead of NACKing.
    identity = _identity(start == "pending", fresh=start == "fresh")
    before = _state(identity)
    with pytest.raises(ValueError, match="public key is not supported"):
        identity.apply_secrets({SECRET_DEFAULT: SecretConfig(SECRET_DEFAULT, certificate_chain=UNKNOWN_CURVE_CHAIN)})
    assert _state(identity) == before


def test_a_certificate_whose_san_does_not_parse_is_refused_before_anything_changes() -> None:
    # Found by review of the fuzz target (the sidecar's first certificate, no ROOTCA yet, so no TLS
    # context to refuse it): the SAN was read after the new key, chain and contexts were in place,
    # so its ValueError (a NACK) left the chain applied and the pending key promoted, half-applied.
    identity = _identity(pending=False, fresh=True)
    before = _state(identity)
    with pytest.raises(ValueError, match="extensions do not parse"):
        identity.apply_secrets({SECRET_DEFAULT: SecretConfig(SECRET_DEFAULT, certificate_chain=BROKEN_SAN_CHAIN)})
    assert _state(identity) == before and identity.has_pending_key
