"""OTLP spans shaped like the sidecar's (sidecar/tracing/export.py, sidecar/proxy/telemetry.py).

For the trace store's tests and bench/tracestore.py: the same resource attributes, span kinds
and attributes a sidecar exports, built directly as protobuf messages::

    req = export_request([span(trace_id=1, span_id=2, name="GET", kind=SERVER, service="catalog")])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

INTERNAL, SERVER, CLIENT = 1, 2, 3  # OTLP SpanKind values
T0 = 1_750_000_000_000_000_000  # a Unix time in ns


def value(v: Any) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    return AnyValue(string_value=v)


def attributes(d: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=value(v)) for k, v in d.items()]


def resource(service: str, namespace: str = "default", instance: str = "") -> resource_pb2.Resource:
    return resource_pb2.Resource(attributes=attributes({
        "telemetry.sdk.language": "python", "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.version": "1.30.0", "service.name": service, "service.namespace": namespace,
        "service.instance.id": instance or f"sidecar~127.0.0.1~{service}-15006.{namespace}",
        "service.version": "v1"}))


def sidecar_attributes(service: str, kind: int, status: int = 200, n: int = 0) -> dict[str, Any]:
    a: dict[str, Any] = {
        "http.request.method": "GET", "url.path": "/items", "url.scheme": "http",
        "http.response.status_code": status, "meshkeeper.service": service,
        "meshkeeper.namespace": "default", "meshkeeper.request_id": f"5f0c8e1a-7b2d-4c3e-9f10-{n:012x}",
        "network.peer.address": "127.0.0.1", "network.peer.port": 15006, "user_agent.original": "python-urllib/3.12",
    }
    if kind == CLIENT:
        a.update({"url.full": "http://catalog/items", "server.address": "catalog",
                  "meshkeeper.upstream_cluster": "outbound|catalog.default",
                  "meshkeeper.upstream_host": "127.0.0.1:15006"})
    else:
        a.update({"client.address": "127.0.0.1", "meshkeeper.upstream_cluster": "inbound|8080"})
    return a


def span(*, trace_id: int, span_id: int, parent_id: int = 0, name: str = "GET", kind: int = SERVER,
         start: int = T0, duration: int = 1_000_000, attrs: dict[str, Any] | None = None, error: bool = False,
         events: Iterable[tuple[str, int, dict[str, Any]]] = (), status_message: str = "") -> trace_pb2.Span:
    s = trace_pb2.Span(
        trace_id=trace_id.to_bytes(16, "big"), span_id=span_id.to_bytes(8, "big"),
        parent_span_id=parent_id.to_bytes(8, "big") if parent_id else b"", name=name, kind=kind,
        start_time_unix_nano=start, end_time_unix_nano=start + duration,
        attributes=attributes(attrs or {}),
        status=trace_pb2.Status(code=2 if error else 0, message=status_message))
    for ev_name, ev_time, ev_attrs in events:
        s.events.add(name=ev_name, time_unix_nano=ev_time, attributes=attributes(ev_attrs))
    return s


def export_request(spans_by_service: dict[str, list[trace_pb2.Span]]) -> trace_service_pb2.ExportTraceServiceRequest:
    req = trace_service_pb2.ExportTraceServiceRequest()
    for service, spans in spans_by_service.items():
        rs = req.resource_spans.add(resource=resource(service))
        rs.scope_spans.add(scope=InstrumentationScope(name="meshkeeper.sidecar", version="0.1.0"), spans=spans)
    return req


def two_hop_trace(trace_id: int, start: int, *, base_span: int = 1, duration: int = 2_000_000,
                  error: bool = False, n: int = 0, service: str = "frontend",
                  callee: str = "catalog") -> dict[str, list[trace_pb2.Span]]:
    """frontend SERVER -> frontend CLIENT -> catalog SERVER, as the sidecars export a request."""
    fe_server, fe_client, cat_server = base_span, base_span + 1, base_span + 2
    status = 500 if error else 200
    return {
        service: [
            span(trace_id=trace_id, span_id=fe_server, name="GET", kind=SERVER, start=start, duration=duration,
                 attrs=sidecar_attributes(service, SERVER, status, n), error=error),
            span(trace_id=trace_id, span_id=fe_client, parent_id=fe_server, name="GET", kind=CLIENT,
                 start=start + 100_000, duration=duration - 200_000,
                 attrs=sidecar_attributes(service, CLIENT, status, n), error=error),
        ],
        callee: [
            span(trace_id=trace_id, span_id=cat_server, parent_id=fe_client, name="GET", kind=SERVER,
                 start=start + 150_000, duration=duration - 300_000,
                 attrs=sidecar_attributes(callee, SERVER, status, n), error=error),
        ],
    }


_processes: dict[str, Any] = {}


def add_to_store(store: Any, by_service: dict[str, list[trace_pb2.Span]]) -> None:
    """Put spans straight into a :class:`controlplane.tracestore.store.TraceStore` (no gRPC)."""
    from controlplane.tracestore.otlp import make_process
    from controlplane.tracestore.store import Scope

    scope = Scope("meshkeeper.sidecar", "0.1.0")
    for service, spans in by_service.items():
        # One process per service, as the OTLP service's cache makes it for a sidecar's resource.
        process = _processes.get(service)
        if process is None:
            process = _processes[service] = make_process(resource(service))
        for s in spans:
            store.add(s, process, scope)
