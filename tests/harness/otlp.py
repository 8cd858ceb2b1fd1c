"""A real OTLP/gRPC trace receiver (the protocol Jaeger and the OpenTelemetry Collector accept).

It runs a sync ``grpc.server`` on its own threads, so the same object serves sync tests and tests
on an event loop; ``wait_for`` blocks on a condition with a deadline, never on fixed sleeps::

    with OtlpReceiver() as collector:
        procs.sidecar(..., extra=["--otlp-endpoint", collector.endpoint])
        ...
        spans = collector.wait_for(lambda spans: any(s.kind == "SERVER" for s in spans))
        assert spans[0].resource["service.name"] == "catalog"
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the collector received it, with ids in hex and enums by their short names."""

    name: str
    kind: str  # "SERVER", "CLIENT", "INTERNAL", ...
    trace_id: str  # 32 hex
    span_id: str  # 16 hex
    parent_span_id: str  # 16 hex, "" for a root span
    attributes: dict[str, Any]
    status_code: str  # "UNSET", "OK", "ERROR"
    resource: dict[str, Any]
    start_ns: int
    end_ns: int
    trace_state: str = ""
    scope: str = ""  # instrumentation scope name


def any_value(value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as the Python value it carries."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return key_values(value.kvlist_value.values)
    return getattr(value, which)


def key_values(pairs: list[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs}


def _short(enum_name: str, prefix: str) -> str:
    return enum_name[len(prefix):] if enum_name.startswith(prefix) else enum_name


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,  # noqa: N802 (gRPC's name)
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receiver._store(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Stores every ``ResourceSpans`` exported to it; ``spans()`` flattens them."""

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._cond = threading.Condition()
        self.resource_spans: list[trace_pb2.ResourceSpans] = []
        self.requests = 0  # Export calls received

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> OtlpReceiver:
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-receiver")
        server = grpc.server(self._executor)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)
        self._port = server.add_insecure_port(f"127.0.0.1:{self._port}")
        server.start()
        self._server = server
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop serving and end the server's threads (grpc leaves the handler pool to its owner)."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _store(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._cond:
            self.requests += 1
            self.resource_spans.extend(request.resource_spans)
            self._cond.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order."""
        with self._cond:
            batches = list(self.resource_spans)
        out = []
        for rs in batches:
            resource = key_values(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(ReceivedSpan(
                        name=s.name,
                        kind=_short(trace_pb2.Span.SpanKind.Name(s.kind), "SPAN_KIND_"),
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        attributes=key_values(s.attributes),
                        status_code=_short(trace_pb2.Status.StatusCode.Name(s.status.code), "STATUS_CODE_"),
                        resource=resource,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        trace_state=s.trace_state,
                        scope=ss.scope.name,
                    ))
        return out

    def wait_for(self, predicate_or_count: int | Callable[[list[ReceivedSpan]], object],
                 timeout: float = 10.0) -> list[ReceivedSpan]:
        """The spans, once ``predicate(spans)`` is true (or at least ``count`` have arrived).

        Raises TimeoutError, listing what did arrive, when the deadline passes first.
        """
        if isinstance(predicate_or_count, int):
            count = predicate_or_count

            def predicate(spans: list[ReceivedSpan]) -> object:
                return len(spans) >= count
            what = f"{count} spans"
        else:
            predicate = predicate_or_count
            what = getattr(predicate, "__name__", "predicate")
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                spans = self.spans()
                if predicate(spans):
                    return spans
                left = deadline - time.monotonic()
                if left <= 0:
                    names = [(s.name, s.kind, s.span_id) for s in spans]
                    raise TimeoutError(f"OTLP receiver: no {what} within {timeout}s "
                                       f"({self.requests} Export calls, spans: {names})")
                self._cond.wait(left)
