"""Fuzzing the sidecar's xDS converters (issue 16): mutated Envoy protos into sidecar/xds/convert.py
and sidecar/xds/listeners.py, as sidecar/xds/state.py calls them (its CONVERTERS).

The valid resources are what the control plane sends (controlplane.translate on a registry with a
rich policy, gRPC and tcp services, runtime config, and a transparent-mode node); each example
changes one to four fields anywhere in one of them (a scalar set to any value of its type, an enum
to any number, a message cleared or emptied, a repeated field grown or emptied, an ``Any`` retyped
or filled with bytes), or parses random bytes as the resource. A converter returns a config or
raises a ValueError (XdsError: the NACK's reason), never another exception (which the xDS client
only logs as a bug). Converters are pure functions of the message, so a refused resource leaves
nothing applied.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import any_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import given
from hypothesis import strategies as st

from controlplane import translate
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from meshkeeper import xds
from meshkeeper.policy import decode_policy
from meshkeeper.registry import InstanceRecord, ServiceRecord
from meshkeeper.registry import RuntimeValues as Values
from meshkeeper.xds import NodeInfo
from sidecar.xds.convert import XdsError
from sidecar.xds.state import CONVERTERS, MESSAGES
from tests.support.fuzz import fuzz_settings, tally

_POLICY = decode_policy({
    "lb": {"policy": "least_request"},
    "outlier": {"consecutive_5xx": 3, "base_ejection_ms": 1000, "max_ejection_ms": 5000,
                "success_rate": {}, "failure_percentage": {"enforcing_percent": 50}},
    "retry": {"attempts": 2, "on": ["5xx", "reset", "retriable-status-codes"], "per_try_timeout_ms": 500,
              "retriable_status_codes": [409]},
    "timeout_ms": 2000, "split": {"v1": 90, "v2": 10}, "match": [{"header": "x-canary", "equals": "1", "subset": "v2"}],
    "fault": {"abort_percent": 5, "abort_status": 503, "delay_ms": 100, "delay_percent": 1},
    "tracing": {"sample_percent": 10}, "rate_limit": {"rps": 10, "burst": 20},
    "circuit_breaker": {"max_requests": 100, "retry_budget": {"percent": 25}}})


def _instances(*specs: tuple[str, str, str]) -> MappingProxyType:
    out = {}
    for host, version, zone in specs:
        inst = InstanceRecord(address=host, port=15006, weight=10, labels={"version": version, "zone": zone}, app_port=8080)
        out[inst.key] = inst
    return MappingProxyType(out)


def valid_resources() -> list[tuple[str, str, Message]]:
    """(type URL, name, message) of everything two sidecars get from a rich registry."""
    services = {
        "web": ServiceSnapshot("web", "default", ServiceRecord("http"), _instances(("10.0.0.9", "v1", "a"))),
        "catalog": ServiceSnapshot("catalog", "default", ServiceRecord("http"),
                                   _instances(("10.0.0.1", "v1", "a"), ("10.0.0.2", "v2", "b")), policy=_POLICY),
        "orders": ServiceSnapshot("orders", "default", ServiceRecord("grpc"), _instances(("10.0.0.3", "v1", "a"))),
        "db": ServiceSnapshot("db", "default", ServiceRecord("tcp"), _instances(("10.0.0.4", "v1", "b"))),
    }
    snapshot = RegistrySnapshot(
        1, MappingProxyType({"default": MappingProxyType(services)}),
        configs=MappingProxyType({"default": MappingProxyType({"web": Values({"feature.x": "true", "color": "blue"})})}),
        vips=MappingProxyType({"default": MappingProxyType({"catalog": "10.96.0.5", "db": "10.96.0.6"})}))
    nodes = [
        NodeInfo(node_id=NodeInfo.make_id("10.0.0.9", "web", 15006, "default"), service="web", app_port=8080,
                 inbound_port=15006, outbound_port=15001, advertise_host="10.0.0.9"),
        NodeInfo(node_id=NodeInfo.make_id("10.0.0.1", "catalog", 15006, "default"), service="catalog", app_port=8080,
                 inbound_port=15006, outbound_port=15001, advertise_host="10.0.0.1", interception="redirect"),
    ]
    out: dict[tuple[str, str], Message] = {}
    for node in nodes:
        for type_url, items in translate.translate(snapshot, node).items():
            for name, msg in items.items():
                if type_url in CONVERTERS:
                    out[(type_url, name)] = msg
    return [(t, n, m) for (t, n), m in sorted(out.items(), key=lambda kv: kv[0])]


RESOURCES = valid_resources()
BY_TYPE: dict[str, list[Message]] = {}
for _type_url, _, _msg in RESOURCES:
    BY_TYPE.setdefault(_type_url, []).append(_msg)
_ANY_TYPES = (xds.ROUTER, "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
              "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
              "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
              "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
              "type.googleapis.com/google.protobuf.Duration", "type.googleapis.com/nothing.Known", "")
_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1), FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


def _scalar(draw: st.DrawFn, fd: FieldDescriptor) -> Any:
    cpp = fd.cpp_type
    if cpp in _INT_RANGES:
        lo, hi = _INT_RANGES[cpp]
        return draw(st.sampled_from((0, 1, lo, hi, -1 if lo < 0 else 2)) | st.integers(lo, hi))
    if cpp in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        value = draw(st.floats(width=32 if cpp == FieldDescriptor.CPPTYPE_FLOAT else 64))
        return value
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return draw(st.booleans())
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return draw(st.sampled_from([v.number for v in fd.enum_type.values]) | st.integers(-(2**31), 2**31 - 1))
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return draw(st.binary(max_size=16))
    return draw(st.sampled_from(("", "outbound", "catalog", "default", "*", "/", "a" * 300)) | st.text(max_size=12))


def _mutate(draw: st.DrawFn, msg: Message, depth: int = 0) -> None:
    """One random change somewhere in ``msg``."""
    if isinstance(msg, any_pb2.Any):
        op = draw(st.sampled_from(("retype", "bytes", "inner", "inner")))
        if op == "retype":
            msg.type_url = draw(st.sampled_from(_ANY_TYPES))
            return
        if op == "bytes":
            msg.value = draw(st.binary(max_size=32))
            return
        inner = _unpacked(msg)
        if inner is not None:
            _mutate(draw, inner, depth + 1)
            msg.Pack(inner)
            return
    fields = list(msg.DESCRIPTOR.fields)
    if not fields:
        return
    set_fields = [fd for fd, _ in msg.ListFields()]
    # Mostly where the message has something (that is what a converter reads), sometimes anywhere.
    fd = draw(st.sampled_from(set_fields)) if set_fields and draw(st.integers(0, 3)) else draw(st.sampled_from(fields))
    name = fd.name
    if fd.is_repeated:
        container = getattr(msg, name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            op = draw(st.sampled_from(("clear", "add")))
            if op == "clear":
                msg.ClearField(name)
            else:
                key = _scalar(draw, fd.message_type.fields_by_name["key"])
                value_fd = fd.message_type.fields_by_name["value"]
                if value_fd.message_type is None:
                    container[key] = _scalar(draw, value_fd)
                else:
                    container[key].SetInParent()
            return
        op = draw(st.sampled_from(("clear", "add", "into", "into", "drop")))
        if op == "clear" or (op in ("into", "drop") and not container):
            msg.ClearField(name)
        elif op == "add":
            if fd.message_type is None:
                container.append(_scalar(draw, fd))
            else:
                container.add()
        elif op == "drop":
            del container[draw(st.integers(0, len(container) - 1))]
        else:
            i = draw(st.integers(0, len(container) - 1))
            if fd.message_type is None:
                container[i] = _scalar(draw, fd)
            else:
                _mutate(draw, container[i], depth + 1)
        return
    if fd.message_type is None:
        setattr(msg, name, _scalar(draw, fd))
        return
    op = draw(st.sampled_from(("clear", "empty", "into", "into", "into")))
    if op == "clear":
        msg.ClearField(name)
    elif op == "empty":
        getattr(msg, name).SetInParent()
    elif depth < 12:
        _mutate(draw, getattr(msg, name), depth + 1)


def _unpacked(any_msg: any_pb2.Any) -> Message | None:
    from google.protobuf import symbol_database

    try:
        cls = symbol_database.Default().GetSymbol(any_msg.type_url.split("/")[-1])
    except KeyError:
        return None
    inner = cls()
    try:
        return inner if any_msg.Unpack(inner) else None
    except DecodeError:
        return None


@st.composite
def mutated_resource(draw: st.DrawFn) -> tuple[str, Message]:
    type_url = draw(st.sampled_from(sorted(BY_TYPE)))  # each type alike, however many resources it has
    original = draw(st.sampled_from(BY_TYPE[type_url]))
    msg = MESSAGES[type_url]()
    if draw(st.integers(0, 9)) == 0:  # bytes that happen to parse as the resource
        try:
            msg.ParseFromString(draw(st.binary(max_size=64)))
        except DecodeError:
            msg = MESSAGES[type_url]()
        return type_url, msg
    msg.CopyFrom(original)
    for _ in range(draw(st.integers(1, 4))):
        _mutate(draw, msg)
    return type_url, msg


def check_converter(type_url: str, msg: Message) -> None:
    short = xds.SHORT_TYPE[type_url]
    try:
        config = CONVERTERS[type_url](msg)
    except ValueError:
        tally(f"{short} refused")
        return  # XdsError: refused with a reason (the NACK)
    tally(f"{short} accepted")
    assert config is not None
    _check_finite(config)


def _check_finite(config: Any) -> None:
    """A config accepted with NaN in a number would compare false everywhere it is used."""
    for value in getattr(config, "__dict__", {}).values() if hasattr(config, "__dict__") else ():
        if isinstance(value, float):
            assert not math.isnan(value), f"NaN accepted in {config!r}"


@pytest.mark.parametrize("resource", RESOURCES, ids=[f"{xds.SHORT_TYPE[t]}:{n}" for t, n, _ in RESOURCES])
def test_the_control_planes_resources_convert(resource: tuple[str, str, Message]) -> None:
    type_url, _, msg = resource
    CONVERTERS[type_url](msg)


@fuzz_settings(1000)
@given(case=mutated_resource())
def test_any_mutated_resource_converts_or_is_refused(case: tuple[str, Message]) -> None:
    check_converter(*case)


def test_a_filter_config_that_does_not_decode_is_refused() -> None:
    # Found by fuzzing: Any.Unpack raised DecodeError (not a ValueError) for an http_connection_manager,
    # tcp_proxy or dns_filter config of corrupt bytes; the xDS client logged it as a bug.
    for _type_url, _, original in RESOURCES:
        if _type_url != xds.LISTENER or not original.filter_chains:
            continue
        msg = listener_pb2.Listener()
        msg.CopyFrom(original)
        msg.filter_chains[0].filters[0].typed_config.value = b"\x00"
        with pytest.raises(XdsError, match="cannot decode"):
            CONVERTERS[xds.LISTENER](msg)
