"""The control plane's built-in trace store (DESIGN §11): OTLP in, Jaeger's query API out.

* :mod:`.store`: the bounded in-memory store and its index (what is kept, how it is evicted);
* :mod:`.otlp`: ``TraceService/Export`` on the gRPC port, feeding the store;
* :mod:`.jaeger_json`: stored spans in Jaeger's JSON shapes;
* :mod:`.query`: Jaeger's ``/api/...`` query endpoints on the HTTP port.

The control plane wires it with :func:`add_arguments` and :func:`install`. Each replica keeps only
the spans exported to it: the Jaeger API of one replica answers for its own store (point every
sidecar at one replica, or look at each).
"""

from __future__ import annotations

import argparse
import logging

import grpc

from controlplane.auth import Authorizer
from controlplane.metrics import Metrics
from controlplane.tracestore.otlp import DEFAULT_MAX_BATCH_SPANS, TraceService, add_to_server
from controlplane.tracestore.query import JaegerQuery
from controlplane.tracestore.store import DEFAULT_MAX_BYTES, DEFAULT_MAX_SPANS, TraceStore

__all__ = ["JaegerQuery", "TraceService", "TraceStore", "add_arguments", "install"]

log = logging.getLogger("meshkeeper.controlplane.tracestore")


def _size(text: str) -> int:
    """``268435456``, ``256Mi``, ``1Gi``, ``500M``: bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, mult in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    return int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace-store-max-spans", type=int, default=DEFAULT_MAX_SPANS, metavar="N",
                   help="spans the built-in trace store keeps; the oldest traces are evicted whole "
                        "(0: no trace store, Export is not served; default %(default)s)")
    p.add_argument("--trace-store-max-bytes", type=_size, default=DEFAULT_MAX_BYTES, metavar="BYTES",
                   help="bytes the trace store may hold, by its own accounting (docs/tracing.md), "
                        "e.g. 256Mi (default %(default)s)")
    p.add_argument("--trace-store-max-batch-spans", type=int, default=DEFAULT_MAX_BATCH_SPANS, metavar="N",
                   help="spans one OTLP Export may carry; larger requests are refused (default %(default)s)")


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.trace_store_max_spans < 0 or args.trace_store_max_bytes < 1 or args.trace_store_max_batch_spans < 1:
        p.error("--trace-store-max-spans must be >= 0, --trace-store-max-bytes and "
                "--trace-store-max-batch-spans >= 1")


def install(args: argparse.Namespace, server: grpc.aio.Server, metrics: Metrics,
            auth: Authorizer) -> JaegerQuery | None:
    """Build the store from the flags, serve Export on ``server``; returns the HTTP handler to mount."""
    if args.trace_store_max_spans == 0:
        log.info("trace store off (--trace-store-max-spans 0)")
        return None

    def evicted(traces: int, spans: int) -> None:
        metrics.tracestore_traces_evicted.inc(traces)
        metrics.tracestore_spans_evicted.inc(spans)

    store = TraceStore(args.trace_store_max_spans, args.trace_store_max_bytes, on_evict=evicted)
    metrics.tracestore_spans.set_function(lambda: store.span_count)
    metrics.tracestore_traces.set_function(lambda: len(store))
    metrics.tracestore_bytes.set_function(lambda: store.bytes)
    add_to_server(server, TraceService(store, metrics, args.trace_store_max_batch_spans))
    return JaegerQuery(store, auth)
