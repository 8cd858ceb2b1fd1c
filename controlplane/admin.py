"""The admin API (``meshkeeper.admin.v1.AdminService``, proto/meshkeeper/admin/v1/admin.proto),
served on the control plane's gRPC port beside ADS and LRS. docs/contracts.md has the rules.

Reads and writes go to ZooKeeper through :class:`controlplane.zkstore.ZkStore` (every write is a
versioned read-modify-write); nothing an operator sets lives only in this process, so any replica
serves it and the registry watch turns it into xDS like any other registry change. Each RPC is
authorised first (:mod:`controlplane.auth`); every write attempt that passed auth is one audit log
line, and a successful one an ``admin_write`` event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2

from controlplane.alerts.api import alert_message
from controlplane.alerts.rule import AlertRule
from controlplane.alerts.state import state_path
from controlplane.auth import Authorizer, Caller, Denied, PeerCertificate, Role, peer_certificate
from controlplane.ca import Issuer
from controlplane.events import KINDS, EventBus, Overflow
from controlplane.lrs import LoadStore
from controlplane.proxies import ProxyRegistry
from controlplane.zkstore import Conflict, Unavailable, Written, ZkStore
from meshkeeper.admin.v1 import admin_pb2, admin_pb2_grpc
from meshkeeper.identity import IdentityError, spiffe_id
from meshkeeper.policy import PolicyError, decode_policy, encode_policy
from meshkeeper.registry import (
    DEFAULT_NAMESPACE,
    MAX_WEIGHT,
    InstanceRecord,
    Override,
    Paths,
    RecordError,
    RuntimeValues,
    ServiceRecord,
    effective_weight,
    is_serving,
    parse_endpoint_key,
    validate_name,
)
from meshkeeper.security import DEFAULT_MODE, AuthzPolicy, PeerAuthentication

log = logging.getLogger("meshkeeper.controlplane.admin")
audit_log = logging.getLogger("meshkeeper.controlplane.audit")

SHORT_TYPES = ("CDS", "EDS", "LDS", "RDS", "RTDS")
# An authz znode at most (encoded): well under ZooKeeper's 1 MiB packet limit (jute.maxbuffer), past
# which the server drops the connection rather than refusing the write.
MAX_AUTHZ_BYTES = 512 * 1024


class AdminError(Exception):
    code = grpc.StatusCode.INVALID_ARGUMENT
    result = "invalid"


class NotFound(AdminError):
    code = grpc.StatusCode.NOT_FOUND
    result = "not_found"


class Precondition(AdminError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    result = "refused"


_STATUS = {Conflict: (grpc.StatusCode.ABORTED, "aborted"), Unavailable: (grpc.StatusCode.UNAVAILABLE, "unavailable")}


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    if isinstance(exc, AdminError):
        return exc.code, exc.result
    if isinstance(exc, (RecordError, PolicyError, IdentityError)):
        return grpc.StatusCode.INVALID_ARGUMENT, "invalid"
    for cls, got in _STATUS.items():
        if isinstance(exc, cls):
            return got
    return None


def _audit(entry: dict[str, Any]) -> None:
    audit_log.info("audit %s", json.dumps(entry, sort_keys=True))


def _attempt(rpc_name: str, request: Any, peer: str, caller: Caller | None) -> dict[str, Any]:
    """The audit fields every write attempt has, whatever becomes of it."""
    entry: dict[str, Any] = {"rpc": rpc_name, "peer": peer, "namespace": getattr(request, "namespace", ""),
                             "service": getattr(request, "service", "")}
    if caller is not None:
        entry.update(who=caller.name, role=caller.role.label)
    if "expected_version" in type(request).DESCRIPTOR.fields_by_name:
        entry["expected_version"] = request.expected_version if request.HasField("expected_version") else None
    return entry


# A refusal's message at most (UTF-8): it travels in the grpc-message trailer, percent-encoded,
# and a trailer past gRPC's 8 KiB metadata limit reaches the caller as RESOURCE_EXHAUSTED instead.
MAX_MESSAGE_BYTES = 1024


def shown(message: str) -> str:
    """``message`` as the caller is shown it: one line (line breaks of quoted input escaped),
    encodable (a lone surrogate of a JSON escape spelled out), at most MAX_MESSAGE_BYTES."""
    text = message.encode("utf-8", "backslashreplace").decode("utf-8")
    text = "\\n".join(text.splitlines())
    data = text.encode()
    if len(data) > MAX_MESSAGE_BYTES:
        text = data[:MAX_MESSAGE_BYTES - 40].decode("utf-8", "ignore") + f"... ({len(data)} bytes)"
    return text


class RpcFailure(Exception):
    """An RPC refused or failed: the gRPC status code and the message the caller is shown."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def rpc(role: Role) -> Callable:
    """Authorise the call for ``role``, pass the :class:`Caller` on, and turn the errors above
    into gRPC status codes with their messages. Every write attempt that fails, at auth or after,
    is one audit line here; :meth:`AdminService._write` writes the line of a success.

    The wrapped method serves gRPC; ``method.call(service, request, metadata, peer)`` runs the very
    same steps for another front end (the console's HTTP writes, :meth:`AdminService.invoke`) and
    raises :class:`RpcFailure` where gRPC would abort."""
    write = role > Role.VIEWER

    def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable:
        async def call(self: AdminService, request: Any, metadata: Any, peer: str,
                       certificate: PeerCertificate | None = None) -> Any:
            try:
                caller = self.auth.check(metadata, role, peer, certificate)
            except Denied as d:
                if write:
                    _audit({**_attempt(fn.__name__, request, peer, None), "result": d.code.name.lower(),
                            "error": str(d)})
                raise RpcFailure(d.code, shown(str(d))) from None
            try:
                return await fn(self, request, caller)
            except Exception as exc:
                status = _status_of(exc)
                if write:
                    result = "unknown" if getattr(exc, "outcome_unknown", False) else status[1] if status else "error"
                    _audit({**_attempt(fn.__name__, request, peer, caller), "path": getattr(exc, "audit_path", None),
                            "result": result, "error": str(exc) or type(exc).__name__})
                if status is None:
                    raise
                raise RpcFailure(status[0], shown(str(exc))) from None

        @functools.wraps(fn)
        async def handler(self: AdminService, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await call(self, request, context.invocation_metadata(), context.peer() or "",
                                  peer_certificate(context))
            except RpcFailure as f:
                await context.abort(f.code, f.message)

        handler.call = call
        return handler
    return wrap


def _namespace(value: str) -> str:
    return validate_name("namespace", value or DEFAULT_NAMESPACE)


def _service(value: str) -> str:
    if not value:
        raise AdminError("service: required")
    return validate_name("service", value)


def _expected(request: Any) -> int | None:
    if not request.HasField("expected_version"):
        return None
    v = request.expected_version
    if v < -1:
        raise AdminError(f"expected_version: {v} is not -1 (create only) or a znode version")
    return v


def _json_text(data: bytes | None) -> Any:
    """A znode payload for the audit line and events: its JSON, or the raw text if it is not JSON."""
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return data.decode("utf-8", "replace")


def _dump(obj: Any) -> str:
    return "" if obj is None else json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclasses.dataclass
class _ServiceState:
    record: ServiceRecord
    instances: dict[str, InstanceRecord]
    overrides: dict[str, tuple[Override, int]]  # key -> (override, znode version)


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, store: ZkStore, auth: Authorizer, *, proxies: ProxyRegistry,
                 events: EventBus, load: LoadStore | None = None, issuer: Issuer | None = None) -> None:
        self.store, self.auth, self.proxies, self.events, self.load = store, auth, proxies, events, load
        self.issuer = issuer  # the CA (controlplane.ca); None: no identity tokens

    async def invoke(self, rpc_name: str, request: Any, metadata: Any, peer: str = "") -> Any:
        """Run one unary RPC for a front end other than gRPC (the console's HTTP writes): the same
        authorisation, write logic, audit line and event; :class:`RpcFailure` where gRPC aborts."""
        method = getattr(type(self), rpc_name, None)
        call = getattr(method, "call", None)
        if call is None:
            raise AttributeError(f"{rpc_name} is not a unary admin RPC")
        return await call(self, request, metadata, peer)

    # ------------------------------------------------------------------ shared reads

    async def _service_state(self, ns: str, svc: str) -> _ServiceState:
        paths = Paths(ns)
        node = await self.store.get(paths.service(svc))
        if node is None:
            raise NotFound(f"service {svc!r} is not registered in namespace {ns!r}")
        try:
            record = ServiceRecord.decode(node.data)
        except RecordError:
            record = ServiceRecord()
        inst_keys, ovr_keys = await asyncio.gather(self.store.children(paths.instances(svc)),
                                                   self.store.children(paths.overrides(svc)))
        inst_keys, ovr_keys = inst_keys or [], ovr_keys or []
        inst_nodes, ovr_nodes = await asyncio.gather(
            self.store.get_many([paths.instance(svc, k) for k in inst_keys]),
            self.store.get_many([paths.override(svc, k) for k in ovr_keys]))
        instances = {}
        for key, zn in zip(inst_keys, inst_nodes, strict=True):
            if zn is None:
                continue
            try:
                rec = InstanceRecord.decode(zn.data)
            except RecordError as exc:
                log.debug("admin: skipping bad instance %s/%s: %s", svc, key, exc)
                continue
            if rec.key == key:
                instances[key] = rec
        overrides = {}
        for key, zn in zip(ovr_keys, ovr_nodes, strict=True):
            if zn is None:
                continue
            try:
                overrides[key] = (Override.decode(zn.data), zn.version)
            except RecordError:
                overrides[key] = (Override(), zn.version)  # shown as none; a write replaces it
        return _ServiceState(record, instances, overrides)

    @staticmethod
    def _endpoint(key: str, state: _ServiceState, load: dict[str, Any] | None) -> admin_pb2.Endpoint:
        inst = state.instances.get(key)
        override, version = state.overrides.get(key, (None, -1))
        ep = admin_pb2.Endpoint(address=key, registered=inst is not None, version=version)
        if inst is not None:
            ep.labels.update(dict(inst.labels))
            ep.registered_weight = inst.weight
            ep.effective_weight = effective_weight(inst, override)
        elif override is not None and override.weight is not None:
            ep.effective_weight = override.weight
        ep.enabled = override is None or override.enabled is not False
        if override is not None:
            ep.override.SetInParent()
            if override.weight is not None:
                ep.override.weight = override.weight
            if override.enabled is not None:
                ep.override.enabled = override.enabled
        got = (load or {}).get(key)
        if got is not None:
            rates = got["rates"]
            ep.load.rps = rates["rps"]
            ep.load.error_ratio = rates["error_ratio"] or 0.0
            ep.load.mean_latency_seconds = rates["mean_latency_seconds"] or 0.0
            ep.load.in_progress = got["totals"]["in_progress"]
        return ep

    def _endpoint_load(self, ns: str, svc: str) -> dict[str, Any]:
        if self.load is None:
            return {}
        for s in self.load.snapshot(ns)["services"]:
            if s["service"] == svc:
                return {e["address"]: e for e in s["endpoints"]}
        return {}

    # ------------------------------------------------------------------ writes

    async def _write(self, caller: Caller, rpc_name: str, ns: str, svc: str, path: str,
                     change: Callable[[bytes | None], bytes | None], expected: int | None,
                     what: str) -> Written:
        try:
            written = await self.store.update(path, change, expected)
        except Exception as exc:
            exc.audit_path = path  # the rpc wrapper writes the failure's audit line
            raise
        before, after = _json_text(written.before), _json_text(written.after)
        _audit({"who": caller.name, "role": caller.role.label, "peer": caller.peer, "rpc": rpc_name,
                "namespace": ns, "service": svc, "path": path, "expected_version": expected, "result": "ok",
                "before": before, "after": after, "version": written.version})
        self.events.publish("admin_write", namespace=ns, service=svc, who=caller.name,
                            summary=f"{rpc_name} {what} by {caller.name}",
                            before=_dump(before), after=_dump(after))
        return written

    async def _override_write(self, caller: Caller, rpc_name: str, request: Any,
                              change: Callable[[Override | None], Override | None], what: str) -> admin_pb2.Endpoint:
        ns, svc = _namespace(request.namespace), _service(request.service)
        parse_endpoint_key(request.address)
        key = request.address
        expected = _expected(request)
        state = await self._service_state(ns, svc)
        if key not in state.instances and key not in state.overrides:
            known = ", ".join(sorted(state.instances)) or "none"
            raise NotFound(f"{svc} has no instance {key} (registered: {known})")

        def apply(data: bytes | None) -> bytes | None:
            try:
                cur = Override.decode(data) if data is not None else None
            except RecordError:
                cur = None  # a bad override is replaced by a good one
            new = change(cur)
            return None if new is None else new.encode()

        written = await self._write(caller, rpc_name, ns, svc, Paths(ns).override(svc, key), apply, expected,
                                    f"{svc} {key} {what}")
        # The endpoint as written, without reading the whole service again.
        if written.after is None:
            state.overrides.pop(key, None)
        else:
            state.overrides[key] = (Override.decode(written.after), written.version)
        return self._endpoint(key, state, self._endpoint_load(ns, svc))

    # ------------------------------------------------------------------ registry

    @rpc(Role.VIEWER)
    async def ListServices(self, request, caller):  # noqa: N802 (gRPC names)
        ns = _namespace(request.namespace)
        names = await self.store.children(Paths(ns).services) or []
        names = [n for n in names if _valid(n)]
        paths = Paths(ns)
        policies, authzs, peer_auths, (ns_peer_auth,) = await asyncio.gather(
            self.store.get_many([paths.policy(n) for n in names]),
            self.store.get_many([paths.authz(n) for n in names]),
            self.store.get_many([paths.peer_authentication(n) for n in names]),
            self.store.get_many([paths.peer_authentication()]))
        ns_mode = _field(ns_peer_auth, PeerAuthentication, "mode")
        states = await asyncio.gather(*(self._service_state(ns, n) for n in names), return_exceptions=True)
        out = admin_pb2.ListServicesResponse()
        for name, state, policy, authz, peer_auth in zip(names, states, policies, authzs, peer_auths, strict=True):
            if isinstance(state, NotFound):  # removed between the two reads
                continue
            if isinstance(state, BaseException):
                raise state
            serving = sum(1 for k, inst in state.instances.items()
                          if is_serving(inst, state.overrides.get(k, (None, 0))[0]))
            out.services.add(namespace=ns, name=name, protocol=state.record.protocol,
                             instances=len(state.instances), serving=serving, has_policy=policy is not None,
                             mtls_mode=_field(peer_auth, PeerAuthentication, "mode") or ns_mode or DEFAULT_MODE,
                             authz=_field(authz, AuthzPolicy, "action"))
        return out

    @rpc(Role.VIEWER)
    async def GetService(self, request, caller):  # noqa: N802
        ns, svc = _namespace(request.namespace), _service(request.service)
        state = await self._service_state(ns, svc)
        load = self._endpoint_load(ns, svc)
        out = admin_pb2.Service(namespace=ns, name=svc, protocol=state.record.protocol)
        for key in sorted(set(state.instances) | set(state.overrides)):
            out.endpoints.append(self._endpoint(key, state, load))
        return out

    # ------------------------------------------------------------------ overrides

    @rpc(Role.OPERATOR)
    async def SetWeight(self, request, caller):  # noqa: N802
        if not 0 <= request.weight <= MAX_WEIGHT:
            raise AdminError(f"weight: {request.weight} is outside 0..{MAX_WEIGHT}")
        return await self._override_write(
            caller, "SetWeight", request,
            lambda cur: dataclasses.replace(cur or Override(), weight=request.weight), f"weight={request.weight}")

    @rpc(Role.OPERATOR)
    async def SetEnabled(self, request, caller):  # noqa: N802
        return await self._override_write(
            caller, "SetEnabled", request,
            lambda cur: dataclasses.replace(cur or Override(), enabled=request.enabled),
            f"enabled={str(request.enabled).lower()}")

    @rpc(Role.OPERATOR)
    async def ClearOverride(self, request, caller):  # noqa: N802
        return await self._override_write(caller, "ClearOverride", request, lambda cur: None, "cleared")

    # ------------------------------------------------------------------ policy

    async def _policy(self, ns: str, svc: str) -> admin_pb2.Policy:
        zn = await self.store.get(Paths(ns).policy(svc))
        if zn is None:
            return admin_pb2.Policy(namespace=ns, service=svc, json="{}", version=-1)
        try:
            text = encode_policy(decode_policy(zn.data)).decode()
        except PolicyError:
            text = zn.data.decode("utf-8", "replace")  # as stored: the operator sees what is wrong
        return admin_pb2.Policy(namespace=ns, service=svc, json=text, version=zn.version)

    async def _require_service(self, ns: str, svc: str) -> None:
        if await self.store.get(Paths(ns).service(svc)) is None:
            raise NotFound(f"service {svc!r} is not registered in namespace {ns!r}")

    @rpc(Role.VIEWER)
    async def GetPolicy(self, request, caller):  # noqa: N802
        ns, svc = _namespace(request.namespace), _service(request.service)
        await self._require_service(ns, svc)
        return await self._policy(ns, svc)

    @rpc(Role.ADMIN)
    async def SetPolicy(self, request, caller):  # noqa: N802
        ns, svc = _namespace(request.namespace), _service(request.service)
        expected = _expected(request)
        policy = decode_policy(request.json or "{}")  # PolicyError names the field
        await self._require_service(ns, svc)
        encoded = encode_policy(policy)
        await self._write(caller, "SetPolicy", ns, svc, Paths(ns).policy(svc), lambda _: encoded, expected,
                          f"policy of {svc}")
        return await self._policy(ns, svc)

    @rpc(Role.OPERATOR)
    async def SetTrafficSplit(self, request, caller):  # noqa: N802
        ns, svc = _namespace(request.namespace), _service(request.service)
        expected = _expected(request)
        split = dict(request.split)
        decode_policy({"split": split})  # the schema's checks: labels, 0..100, sum 100
        state = await self._service_state(ns, svc)
        versions = {inst.version for inst in state.instances.values() if inst.version}
        missing = sorted(v for v, w in split.items() if w > 0 and v not in versions)
        if missing:
            raise Precondition(f"split: no registered instance of {svc} has version {missing[0]!r} "
                               f"(versions: {', '.join(sorted(versions)) or 'none'})")

        def apply(data: bytes | None) -> bytes:
            try:
                policy = decode_policy(data)
            except PolicyError as exc:
                raise Precondition(f"the current policy of {svc} is invalid ({exc}); replace it with SetPolicy") from None
            return encode_policy(dataclasses.replace(policy, split=MappingProxyType(split)))

        what = " ".join(f"{k}={v}" for k, v in sorted(split.items())) or "removed"
        await self._write(caller, "SetTrafficSplit", ns, svc, Paths(ns).policy(svc), apply, expected,
                          f"split of {svc}: {what}")
        return await self._policy(ns, svc)

    # ------------------------------------------------------------------ config centre

    async def _config(self, ns: str, svc: str) -> admin_pb2.RuntimeConfig:
        zn = await self.store.get(Paths(ns).config(svc))
        out = admin_pb2.RuntimeConfig(namespace=ns, service=svc, version=-1 if zn is None else zn.version)
        if zn is not None:
            try:
                out.values.update(dict(RuntimeValues.decode(zn.data).values))
            except RecordError as exc:
                raise Precondition(f"the config znode of {svc} is invalid ({exc}); a SetConfig with "
                                   f"expected_version {zn.version} replaces it") from None
        return out

    async def _config_write(self, caller: Caller, rpc_name: str, request: Any,
                            change: Callable[[dict[str, str]], dict[str, str]], what: str) -> admin_pb2.RuntimeConfig:
        ns, svc = _namespace(request.namespace), _service(request.service)
        expected = _expected(request)
        await self._require_service(ns, svc)

        def apply(data: bytes | None) -> bytes:
            try:
                cur = dict(RuntimeValues.decode(data).values) if data is not None else {}
            except RecordError as exc:
                if expected is None:  # never drop values silently: replacing a bad znode is asked for
                    raise Precondition(f"the config znode of {svc} is invalid ({exc}); name its version "
                                       "(expected_version) to replace it") from None
                cur = {}
            encoded = RuntimeValues(change(cur)).encode()
            RuntimeValues.decode(encoded)  # what the control plane will accept: key count and size
            return encoded

        await self._write(caller, rpc_name, ns, svc, Paths(ns).config(svc), apply, expected, what)
        return await self._config(ns, svc)

    @rpc(Role.VIEWER)
    async def GetConfig(self, request, caller):  # noqa: N802
        ns, svc = _namespace(request.namespace), _service(request.service)
        config = await self._config(ns, svc)
        if config.version == -1:  # a config may exist without its service, but neither: a typo
            await self._require_service(ns, svc)
        return config

    @rpc(Role.OPERATOR)
    async def SetConfig(self, request, caller):  # noqa: N802
        values = dict(request.values)
        if not values:
            raise AdminError("values: nothing to set")
        for k, v in values.items():
            RuntimeValues.check(k, v)
        keys = ", ".join(sorted(values))
        return await self._config_write(caller, "SetConfig", request, lambda cur: {**cur, **values},
                                        f"config of {request.service}: {keys}")

    @rpc(Role.OPERATOR)
    async def DeleteConfigKey(self, request, caller):  # noqa: N802
        key = request.key

        def drop(cur: dict[str, str]) -> dict[str, str]:
            if key not in cur:
                raise NotFound(f"config of {request.service} has no key {key!r}")
            return {k: v for k, v in cur.items() if k != key}

        return await self._config_write(caller, "DeleteConfigKey", request, drop,
                                        f"config of {request.service}: -{key}")

    # ------------------------------------------------------------------ proxies

    @rpc(Role.VIEWER)
    async def ListProxies(self, request, caller):  # noqa: N802
        ns = request.namespace
        out = admin_pb2.ListProxiesResponse()
        for p in self.proxies.list():
            n = p.node
            if ns and n.namespace != ns:
                continue
            proxy = out.proxies.add(node_id=n.node_id, service=n.service, namespace=n.namespace,
                                    instance="" if n.proxyless else f"{n.advertise_host}:{n.inbound_port}",
                                    connected_since=_ts(p.connected_since))
            for short in sorted(p.types, key=_type_order):
                st = p.types[short]
                t = proxy.types.add(type=short, version_sent=st.version_sent, version_acked=st.version_acked)
                if st.acked_at is not None:
                    t.acked_at.CopyFrom(_ts(st.acked_at))
                if st.nack is not None:
                    t.last_nack_error, t.last_nack_version = st.nack.error, st.nack.version
        return out

    @rpc(Role.VIEWER)
    async def GetProxyConfig(self, request, caller):  # noqa: N802
        p = self.proxies.get(request.node_id)
        if p is None:
            raise NotFound(f"no proxy {request.node_id!r} is connected to this control plane "
                           "(meshkeeper get proxies lists them)")
        out = admin_pb2.ProxyConfig(node_id=request.node_id)
        for short in sorted(p.types, key=_type_order):
            st = p.types[short]
            acked = out.types.add(type=short, version=st.version_acked)
            for r in st.acked_held():
                acked.resources_json[r.name] = json_format.MessageToJson(r.any, preserving_proto_field_name=True,
                                                                         indent=None)
        return out

    # ------------------------------------------------------------------ alerts

    async def _alert(self, ns: str, name: str) -> admin_pb2.Alert:
        rule, state = await self.store.get_many([Paths(ns).alert(name), state_path(ns, name)])
        return alert_message(ns, name, None if rule is None else rule.data, -1 if rule is None else rule.version,
                             None if state is None else state.data)

    @rpc(Role.VIEWER)
    async def ListAlerts(self, request, caller):  # noqa: N802
        ns = _namespace(request.namespace)
        if request.name:
            names = [validate_name("alert", request.name)]
        else:
            names = [n for n in await self.store.children(Paths(ns).alerts) or [] if _valid(n)]
        alerts = await asyncio.gather(*(self._alert(ns, n) for n in names))
        if request.name and alerts[0].version == -1:
            raise NotFound(f"no alert rule {request.name!r} in namespace {ns!r}")
        return admin_pb2.ListAlertsResponse(alerts=alerts)

    @rpc(Role.OPERATOR)
    async def SetAlert(self, request, caller):  # noqa: N802
        ns, name = _namespace(request.namespace), validate_name("alert", request.name)
        expected = _expected(request)
        rule = AlertRule.decode(request.json or "")  # AlertRuleError names the field
        encoded = rule.encode()
        await self._write(caller, "SetAlert", ns, rule.service, Paths(ns).alert(name), lambda _: encoded, expected,
                          f"alert {name}: {rule.expression}")
        return await self._alert(ns, name)

    @rpc(Role.OPERATOR)
    async def DeleteAlert(self, request, caller):  # noqa: N802
        ns, name = _namespace(request.namespace), validate_name("alert", request.name)
        expected = _expected(request)
        gone = await self._alert(ns, name)
        if gone.version == -1:
            raise NotFound(f"no alert rule {name!r} in namespace {ns!r}")

        def drop(data: bytes | None) -> None:
            if data is None:
                raise NotFound(f"no alert rule {name!r} in namespace {ns!r}")
            return None

        await self._write(caller, "DeleteAlert", ns, gone.service, Paths(ns).alert(name), drop, expected,
                          f"alert {name} deleted")
        try:  # its shared state goes with it; a leftover is harmless (rewritten if the rule returns)
            await self.store.update(state_path(ns, name), lambda _: None)
        except (Conflict, Unavailable) as exc:
            log.debug("admin: alert state of %s/%s not deleted: %s", ns, name, exc)
        gone.version = -1
        return gone

    # ------------------------------------------------------------------ identity

    @rpc(Role.ADMIN)
    async def IssueIdentityToken(self, request, caller):  # noqa: N802
        ns, svc = _namespace(request.namespace), _service(request.service)
        if self.issuer is None:
            raise Precondition("the control plane has no CA: start it with --ca-cert/--ca-key or a CA "
                               "passphrase (--ca-passphrase-file, MESHKEEPER_CA_PASSPHRASE); docs/identity.md")
        token = self.issuer.mint_token(ns, svc)
        uri = spiffe_id(self.issuer.trust_domain, ns, svc)
        # A token is a credential: the audit line and the event say who got one, never the token.
        _audit({"who": caller.name, "role": caller.role.label, "peer": caller.peer, "rpc": "IssueIdentityToken",
                "namespace": ns, "service": svc, "spiffe_id": uri, "result": "ok"})
        self.events.publish("admin_write", namespace=ns, service=svc, who=caller.name,
                            summary=f"IssueIdentityToken for {uri} by {caller.name}")
        return admin_pb2.IdentityToken(token=token, spiffe_id=uri)

    # ------------------------------------------------------------------ authorization

    async def _authz(self, ns: str, svc: str) -> admin_pb2.Authz:
        zn = await self.store.get(Paths(ns).authz(svc))
        if zn is None:
            return admin_pb2.Authz(namespace=ns, service=svc, json="", version=-1)
        out = admin_pb2.Authz(namespace=ns, service=svc, version=zn.version)
        try:
            out.json = AuthzPolicy.decode(zn.data).encode().decode()
        except RecordError as exc:  # as stored: the operator sees what is wrong, and why
            out.json, out.error = zn.data.decode("utf-8", "replace"), str(exc)
        return out

    @rpc(Role.VIEWER)
    async def GetAuthz(self, request, caller):  # noqa: N802
        ns, svc = _namespace(request.namespace), _service(request.service)
        authz = await self._authz(ns, svc)
        if authz.version == -1:  # none for a registered service; neither: a typo
            await self._require_service(ns, svc)
        return authz

    @rpc(Role.ADMIN)
    async def SetAuthz(self, request, caller):  # noqa: N802
        ns, svc = _namespace(request.namespace), _service(request.service)
        expected = _expected(request)
        if not request.json.strip():
            raise AdminError('json: required, the policy ({"action": "ALLOW"|"DENY", "rules": [...]})')
        policy = AuthzPolicy.decode(request.json)  # RecordError names the field (authz.rules[0].from[1])
        encoded = policy.encode()
        if len(encoded) > MAX_AUTHZ_BYTES:
            raise AdminError(f"authz: {len(encoded)} bytes encoded, at most {MAX_AUTHZ_BYTES}")
        node = await self.store.get(Paths(ns).service(svc))  # never created as a side effect
        if node is None:
            raise NotFound(f"service {svc!r} is not registered in namespace {ns!r}")
        try:
            protocol = ServiceRecord.decode(node.data).protocol
        except RecordError:
            protocol = "http"
        if protocol == "tcp":  # no HTTP connection manager, no RBAC filter: it would be ignored
            raise Precondition(f"{svc} is a tcp service: authz applies to http and grpc services only "
                               "(docs/identity.md), a policy would not be enforced")
        rules = len(policy.rules)
        await self._write(caller, "SetAuthz", ns, svc, Paths(ns).authz(svc), lambda _: encoded, expected,
                          f"authz of {svc}: {policy.action}, {rules} rule{'' if rules == 1 else 's'}")
        return await self._authz(ns, svc)

    @rpc(Role.ADMIN)
    async def DeleteAuthz(self, request, caller):  # noqa: N802
        ns, svc = _namespace(request.namespace), _service(request.service)
        expected = _expected(request)

        def drop(data: bytes | None) -> None:
            if data is None:
                raise NotFound(f"{svc} has no authz policy in namespace {ns!r}")
            return None

        await self._write(caller, "DeleteAuthz", ns, svc, Paths(ns).authz(svc), drop, expected,
                          f"authz of {svc} deleted")
        return admin_pb2.Authz(namespace=ns, service=svc, json="", version=-1)

    # ------------------------------------------------------------------ peer authentication

    async def _peer_authentication(self, ns: str, svc: str) -> admin_pb2.PeerAuthentication:
        paths = Paths(ns)
        own_path = paths.peer_authentication(svc or None)
        wanted = [own_path] + ([paths.peer_authentication()] if svc else [])
        nodes = await self.store.get_many(wanted)
        out = admin_pb2.PeerAuthentication(namespace=ns, service=svc, version=-1)
        modes: list[str | None] = []
        for i, zn in enumerate(nodes):
            mode = None
            if zn is not None:
                try:
                    mode = PeerAuthentication.decode(zn.data).mode
                except RecordError as exc:  # the control plane skips it: as if absent
                    if i == 0:
                        out.error = str(exc)
            if i == 0 and zn is not None:
                out.version, out.mode = zn.version, mode or ""
            modes.append(mode)
        for source, mode in zip(("service", "namespace") if svc else ("namespace",), modes, strict=True):
            if mode is not None:
                out.effective_mode, out.effective_from = mode, source
                break
        else:
            out.effective_mode, out.effective_from = DEFAULT_MODE, "default"
        return out

    @rpc(Role.VIEWER)
    async def GetPeerAuthentication(self, request, caller):  # noqa: N802
        ns = _namespace(request.namespace)
        svc = validate_name("service", request.service) if request.service else ""
        got = await self._peer_authentication(ns, svc)
        if svc and got.version == -1:
            await self._require_service(ns, svc)
        return got

    @rpc(Role.ADMIN)
    async def SetPeerAuthentication(self, request, caller):  # noqa: N802
        ns = _namespace(request.namespace)
        svc = validate_name("service", request.service) if request.service else ""
        expected = _expected(request)
        record = PeerAuthentication.decode(json.dumps({"mode": request.mode}))  # names the field
        if svc:
            await self._require_service(ns, svc)
        encoded = record.encode()
        where = svc or f"namespace {ns}"
        await self._write(caller, "SetPeerAuthentication", ns, svc, Paths(ns).peer_authentication(svc or None),
                          lambda _: encoded, expected, f"peer authentication of {where}: {record.mode}")
        return await self._peer_authentication(ns, svc)

    @rpc(Role.ADMIN)
    async def DeletePeerAuthentication(self, request, caller):  # noqa: N802
        ns = _namespace(request.namespace)
        svc = validate_name("service", request.service) if request.service else ""
        expected = _expected(request)
        where = svc or f"namespace {ns}"

        def drop(data: bytes | None) -> None:
            if data is None:
                raise NotFound(f"{where} has no peer authentication" + (f" in namespace {ns!r}" if svc else ""))
            return None

        await self._write(caller, "DeletePeerAuthentication", ns, svc, Paths(ns).peer_authentication(svc or None),
                          drop, expected, f"peer authentication of {where} deleted")
        return await self._peer_authentication(ns, svc)

    # ------------------------------------------------------------------ events

    async def WatchEvents(self, request, context):  # noqa: N802
        try:
            self.auth.check(context.invocation_metadata(), Role.VIEWER, context.peer() or "",
                            peer_certificate(context))
        except Denied as d:
            await context.abort(d.code, str(d))
        unknown = sorted(set(request.kinds) - set(KINDS))
        if unknown:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                shown(f"kinds: {unknown[0]!r} is not one of {', '.join(KINDS)}"))
        sub = self.events.subscribe(request.namespace, request.kinds)
        try:
            while True:
                event = await sub.next()
                if event is None:
                    return
                yield event
        except Overflow as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"this watcher fell behind: {exc}")
        finally:
            sub.close()


def _field(zn: Any, record: Any, name: str) -> str:
    """Field ``name`` of a znode decoded as ``record`` (peer_authentication's mode, authz's action);
    "" when the znode is absent or invalid (the watch skips it too)."""
    if zn is None:
        return ""
    try:
        return getattr(record.decode(zn.data), name)
    except RecordError:
        return ""


def _valid(name: str) -> bool:
    try:
        validate_name("service", name)
    except RecordError:
        return False
    return True


def _type_order(short: str) -> int:
    return SHORT_TYPES.index(short) if short in SHORT_TYPES else len(SHORT_TYPES)


def _ts(wall: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(wall * 1e9))
    return ts


def add_to_server(server: grpc.aio.Server, admin: AdminService) -> None:
    admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)

