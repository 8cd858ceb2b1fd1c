"""OTLP ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` into the :class:`TraceStore`.

Served on the control plane's gRPC port beside xDS, so a sidecar's ``--otlp-endpoint`` can name
the control plane. One Export is answered once its spans are in the store (O(spans); the loop is
handed back every :data:`YIELD_EVERY` spans, so a large batch never holds it for long).

Refusals, as OTLP says a server refuses (and counted in ``meshkeeper_tracestore_spans_refused_total``):

* a request over ``max_batch_spans`` spans: INVALID_ARGUMENT naming the limit, nothing kept
  (``reason="batch_too_large"``; OTLP clients do not retry INVALID_ARGUMENT);
* a malformed span (ids of the wrong length or all zero, no start time, end before start): that
  span is skipped, the others kept, and the response's ``partial_success`` carries the number of
  rejected spans and the first reason (``reason="malformed"``).

A resource is turned into a Jaeger process once: processes are cached by the resource's
serialized bytes (a sidecar sends the same resource in every batch).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.resource.v1 import resource_pb2

from controlplane.metrics import Metrics
from controlplane.tracestore.jaeger_json import key_value
from controlplane.tracestore.store import NO_SERVICE, MalformedSpan, Process, Scope, TraceStore, value_string

log = logging.getLogger("meshkeeper.controlplane.tracestore")

DEFAULT_MAX_BATCH_SPANS = 10_000  # the OTel SDK's batches are 512; the Collector's default 8192
YIELD_EVERY = 1000  # spans ingested between two hand-backs of the event loop
_CACHE_LIMIT = 4096  # distinct resources / scopes remembered before the cache starts over


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: TraceStore, metrics: Metrics, max_batch_spans: int = DEFAULT_MAX_BATCH_SPANS) -> None:
        self.store = store
        self.metrics = metrics
        self.max_batch_spans = max_batch_spans
        self._processes: dict[bytes, Process] = {}
        self._scopes: dict[tuple[str, str], Scope] = {}
        self._logged_malformed = False

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,  # noqa: N802 (gRPC name)
                     context: grpc.aio.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        total = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        if total > self.max_batch_spans:
            self.metrics.tracestore_spans_refused.labels(reason="batch_too_large").inc(total)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{total} spans in one Export; this trace store takes at most "
                                f"{self.max_batch_spans} per request (--trace-store-max-batch-spans)")
        accepted, rejected, first_error = await self.ingest(request)
        self.metrics.tracestore_spans_received.inc(accepted)
        response = trace_service_pb2.ExportTraceServiceResponse()
        if rejected:
            self.metrics.tracestore_spans_refused.labels(reason="malformed").inc(rejected)
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = f"{rejected} malformed spans rejected; first: {first_error}"
            if not self._logged_malformed:
                self._logged_malformed = True
                log.warning("OTLP export from %s: %s (logged once; counted in "
                            "meshkeeper_tracestore_spans_refused_total)", context.peer(), first_error)
        return response

    async def ingest(self, request: trace_service_pb2.ExportTraceServiceRequest) -> tuple[int, int, str]:
        """Add every span of ``request``: (accepted, rejected, first rejection reason)."""
        store = self.store
        accepted = rejected = since_yield = 0
        first_error = ""
        for rs in request.resource_spans:
            process = self.process(rs.resource)
            for ss in rs.scope_spans:
                scope = self.scope(ss.scope.name, ss.scope.version)
                for span in ss.spans:
                    try:
                        store.add(span, process, scope)
                        accepted += 1
                    except MalformedSpan as exc:
                        rejected += 1
                        first_error = first_error or str(exc)
                    since_yield += 1
                    if since_yield >= YIELD_EVERY:
                        since_yield = 0
                        await asyncio.sleep(0)
        return accepted, rejected, first_error

    def process(self, resource: resource_pb2.Resource) -> Process:
        key = resource.SerializeToString()
        p = self._processes.get(key)
        if p is None:
            if len(self._processes) >= _CACHE_LIMIT:
                self._processes.clear()
            p = self._processes[key] = make_process(resource)
        return p

    def scope(self, name: str, version: str) -> Scope:
        s = self._scopes.get((name, version))
        if s is None:
            if len(self._scopes) >= _CACHE_LIMIT:
                self._scopes.clear()
            s = self._scopes[(name, version)] = Scope(name, version)
        return s


def make_process(resource: resource_pb2.Resource) -> Process:
    """A Jaeger process: ``service.name`` as serviceName, the other attributes as its tags."""
    service = ""
    tags: list[dict[str, Any]] = []
    match: dict[str, str] = {}
    for kv in resource.attributes:
        if kv.key == "service.name" and kv.value.WhichOneof("value") == "string_value":
            service = kv.value.string_value
            continue
        tags.append(key_value(kv.key, kv.value))
        match[kv.key] = value_string(kv.value)
    return Process(service or NO_SERVICE, tags, match)


def add_to_server(server: grpc.aio.Server, service: TraceService) -> None:
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
