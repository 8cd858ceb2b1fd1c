"""Stored spans in Jaeger's JSON shapes (jaeger's ``model/json`` and its query service's envelope).

What Jaeger's OTLP translator does, we do: the span kind becomes the tag ``span.kind``
(``server``, ``client``, ``producer``, ``consumer``, ``internal``); status ERROR becomes
``error: true`` plus ``otel.status_code: "ERROR"`` (OK: ``otel.status_code: "OK"``) and a status
message ``otel.status_description``; the instrumentation scope ``otel.scope.name`` and
``otel.scope.version``; ``tracestate`` ``w3c.tracestate``. The parent is a ``CHILD_OF`` reference,
links are ``FOLLOWS_FROM``; events are logs with the event's name as field ``event``. Times are
microseconds since the epoch, durations microseconds (both truncated, as Jaeger does). A trace id
whose high 64 bits are zero is written with 16 hex digits, as Jaeger writes it.

Value types are Jaeger's: ``string``, ``bool``, ``int64``, ``float64``, ``binary`` (base64);
arrays and maps are written as a JSON string, as the translator does.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from controlplane.tracestore.store import SPAN_KINDS, STATUS_ERROR, STATUS_OK, StoredSpan, Trace


def trace_id_hex(key: bytes) -> str:
    return key[8:].hex() if not any(key[:8]) else key.hex()


def parse_trace_id(text: str) -> bytes:
    """A trace id as Jaeger accepts it: 1 to 32 hex digits. Raises ValueError."""
    if not 0 < len(text) <= 32:
        raise ValueError(f"trace id {text!r} must be 1 to 32 hex digits")
    try:
        return int(text, 16).to_bytes(16, "big")
    except ValueError:
        raise ValueError(f"trace id {text!r} is not hex") from None


def _plain(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_plain(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _plain(kv.value) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    return getattr(v, which) if which else None


def key_value(key: str, v: AnyValue) -> dict[str, Any]:
    which = v.WhichOneof("value")
    if which == "bool_value":
        return {"key": key, "type": "bool", "value": v.bool_value}
    if which == "int_value":
        return {"key": key, "type": "int64", "value": v.int_value}
    if which == "double_value":
        return {"key": key, "type": "float64", "value": v.double_value}
    if which == "bytes_value":
        return {"key": key, "type": "binary", "value": base64.b64encode(v.bytes_value).decode()}
    if which in ("array_value", "kvlist_value"):
        return {"key": key, "type": "string", "value": json.dumps(_plain(v), separators=(",", ":"))}
    return {"key": key, "type": "string", "value": v.string_value}


def _str(key: str, value: str) -> dict[str, Any]:
    return {"key": key, "type": "string", "value": value}


def span_json(s: StoredSpan, trace_id: str, process_id: str) -> dict[str, Any]:
    pb = s.decode()
    references = []
    if s.parent_id:
        references.append({"refType": "CHILD_OF", "traceID": trace_id, "spanID": s.parent_id.hex()})
    for link in pb.links:
        references.append({"refType": "FOLLOWS_FROM", "traceID": trace_id_hex(link.trace_id),
                           "spanID": link.span_id.hex()})
    tags = [key_value(kv.key, kv.value) for kv in pb.attributes]
    if s.scope.name:
        tags.append(_str("otel.scope.name", s.scope.name))
        if s.scope.version:
            tags.append(_str("otel.scope.version", s.scope.version))
    if 0 < s.kind < len(SPAN_KINDS):
        tags.append(_str("span.kind", SPAN_KINDS[s.kind]))
    if s.status == STATUS_ERROR:
        tags.append({"key": "error", "type": "bool", "value": True})
        tags.append(_str("otel.status_code", "ERROR"))
    elif s.status == STATUS_OK:
        tags.append(_str("otel.status_code", "OK"))
    if pb.status.message:
        tags.append(_str("otel.status_description", pb.status.message))
    if pb.trace_state:
        tags.append(_str("w3c.tracestate", pb.trace_state))
    logs = []
    for event in pb.events:
        fields = [_str("event", event.name)] if event.name else []
        fields.extend(key_value(kv.key, kv.value) for kv in event.attributes)
        logs.append({"timestamp": event.time_unix_nano // 1000, "fields": fields})
    return {
        "traceID": trace_id,
        "spanID": s.span_id.hex(),
        "operationName": s.name,
        "references": references,
        "startTime": s.start // 1000,
        "duration": (s.end - s.start) // 1000,
        "tags": tags,
        "logs": logs,
        "processID": process_id,
        "warnings": None,
    }


def trace_json(trace: Trace) -> dict[str, Any]:
    trace_id = trace_id_hex(trace.key)
    pids: dict[int, tuple[str, Any]] = {}  # id(process) -> (processID, process)
    spans = []
    for s in sorted(trace.spans, key=lambda x: x.start):
        entry = pids.get(id(s.process))
        if entry is None:
            entry = pids[id(s.process)] = (f"p{len(pids) + 1}", s.process)
        spans.append(span_json(s, trace_id, entry[0]))
    return {
        "traceID": trace_id,
        "spans": spans,
        "processes": {pid: {"serviceName": p.service, "tags": p.tags} for pid, p in pids.values()},
        "warnings": None,
    }


def envelope(data: Any, total: int | None = None) -> dict[str, Any]:
    """Jaeger's ``structuredResponse``."""
    if total is None:
        total = len(data) if isinstance(data, list) else 0
    return {"data": data, "total": total, "limit": 0, "offset": 0, "errors": None}


def error_envelope(code: int, msg: str) -> dict[str, Any]:
    return {"data": None, "total": 0, "limit": 0, "offset": 0, "errors": [{"code": code, "msg": msg}]}
