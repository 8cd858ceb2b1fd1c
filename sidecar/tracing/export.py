"""Sampled spans to an OTLP/gRPC collector (Jaeger, the OpenTelemetry Collector), off the event loop.

The sidecar does not run OpenTelemetry's tracer on the request path: ``tracer.start_span`` and
``span.end`` cost ~36 µs per span (bench machine), and an unsampled request must not pay for tracing at all (see
``sidecar.tracing.context``). Instead, at the end of a *sampled* span the connection manager calls
:meth:`Tracer.record` with what it already knows (ids, start and end times, attributes, outcome).
``record`` builds the SDK's ``ReadableSpan`` (the object ``span.end()`` would have handed to span
processors) directly and gives it to the SDK's ``BatchSpanProcessor``, whose worker thread batches
spans and calls ``OTLPSpanExporter``. The wire format, batching, retries with back-off and the gRPC
channel are all OpenTelemetry's. ``record`` costs ~3 µs (timeit, on a machine where
``start_span`` + ``end`` with a batch processor costs ~17 µs).

Bounded and counted, whatever the collector does:

- ``record`` is O(1) and never blocks: it appends to the processor's queue and returns. The export,
  and the OTLP exporter's retries until its ``timeout``, happen in the processor's worker thread.
- The SDK's queue, when full, silently evicts its oldest span. We never let it fill: a small
  counting exporter wraps the real one and sees every batch the worker takes from the queue, so
  ``admitted - handed_over`` bounds what the queue holds. At ``max_queue_size`` a new span is
  refused and counted in ``spans_dropped_queue_full``; spans of a batch the collector did not accept
  (error, timeout, exception) are counted in ``spans_dropped_export_failed``. ``queued`` is the
  rest, admitted and not yet resolved::

      spans_sampled == spans_exported + spans_dropped_queue_full + spans_dropped_export_failed
                       + spans_dropped_invalid + queued

  and since nothing is evicted behind our back, ``queued`` returns to 0 once the worker is idle.

  ``handed_over`` is written by the worker and read by the loop thread without a lock (plain ints
  under the GIL). The worker pops a batch before it counts it, so a stale read can only make the
  queue look fuller than it is: the race refuses a span early, for a few microseconds, and never
  lets the queue overflow.
- Each counter has one writing thread: ``spans_sampled``, ``spans_dropped_queue_full`` and
  ``spans_dropped_invalid`` the event loop, ``spans_exported`` and ``spans_dropped_export_failed``
  the worker. The Prometheus collector reads them at scrape time.
- :meth:`Tracer.shutdown` flushes what is queued for at most ``timeout`` seconds: batches taken
  after the deadline are dropped (and counted), and an export still running at the deadline is
  cancelled by shutting the exporter down (this closes its gRPC channel and ends its back-off).

A failing collector is logged by the OTLP exporter itself (logger
``opentelemetry.exporter.otlp.proto.grpc.exporter``, once per failed batch); ``record`` logs only
its own unexpected errors, once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from meshkeeper import __version__
from sidecar.tracing.context import Sampler

log = logging.getLogger(__name__)


class _OnceFilter(logging.Filter):
    """Lets the first record through, marked, and drops the rest.

    OpenTelemetry's TraceState parser logs a warning for every invalid ``tracestate`` member it
    meets, and ``tracestate`` is whatever a client sends: one log line per sampled request would
    let a client flood the sidecar's log. Its module logs nothing else.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.dropped += 1
        if self.dropped > 1:
            return False
        record.msg = f"{record.msg} (a client's tracestate; further such warnings are not logged)"
        return True


logging.getLogger("opentelemetry.trace.span").addFilter(_OnceFilter())

SERVER, CLIENT = 1, 2  # our span kinds: the inbound hop's span, the outbound hop's span
_SPAN_KINDS = {SERVER: SpanKind.SERVER, CLIENT: SpanKind.CLIENT}

SCOPE_NAME = "meshkeeper.sidecar"
DEFAULT_MAX_QUEUE_SIZE = 2048  # OpenTelemetry's OTEL_BSP_MAX_QUEUE_SIZE default
DEFAULT_MAX_EXPORT_BATCH_SIZE = 512  # OTEL_BSP_MAX_EXPORT_BATCH_SIZE default
DEFAULT_SCHEDULE_DELAY = 1.0  # seconds; OTEL_BSP_SCHEDULE_DELAY is 5 s, shorter suits a mesh demo
DEFAULT_EXPORT_TIMEOUT = 5.0  # seconds per batch, retries included
DEFAULT_SHUTDOWN_TIMEOUT = 2.0

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NO_TRACESTATE = TraceState()
_STATUS_ERROR = Status(StatusCode.ERROR)
_STATUS_UNSET = Status(StatusCode.UNSET)

TRACING_STATS: tuple[str, ...] = (
    "spans_sampled",  # spans handed to record()
    "spans_exported",  # spans the collector accepted
    "spans_dropped_queue_full",  # refused by record(): max_queue_size spans waiting, or shut down
    "spans_dropped_export_failed",  # in a batch the collector did not accept (or dropped at shutdown)
    "spans_dropped_invalid",  # record() could not build the span (a bug; logged once)
)


class TracingStats:
    """Plain-integer span counters, one writing thread each (see the module docstring)."""

    __slots__ = TRACING_STATS

    def __init__(self) -> None:
        for name in TRACING_STATS:
            setattr(self, name, 0)

    @property
    def queued(self) -> int:
        """Spans admitted and not yet resolved: waiting in the processor or in an export now."""
        return (self.spans_sampled - self.spans_exported - self.spans_dropped_queue_full
                - self.spans_dropped_export_failed - self.spans_dropped_invalid)

    def snapshot(self) -> dict[str, int]:
        out = {name: getattr(self, name) for name in TRACING_STATS}
        out["spans_queued"] = self.queued
        return out


class _CountingExporter(SpanExporter):
    """Sees every batch the processor's worker takes from its queue, counts it, passes it on."""

    def __init__(self, exporter: SpanExporter, stats: TracingStats) -> None:
        self._exporter = exporter
        self._stats = stats
        self.handed_over = 0  # spans taken from the queue; written by the worker thread only
        self.deadline: float | None = None  # time.monotonic() after which batches are dropped
        self._lock = threading.Lock()
        self._shut_down = False
        self._logged = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        n = len(spans)
        self.handed_over += n
        stats = self._stats
        deadline = self.deadline
        if deadline is not None and time.monotonic() >= deadline:
            stats.spans_dropped_export_failed += n
            return SpanExportResult.FAILURE
        try:
            result = self._exporter.export(spans)
        except Exception:
            if not self._logged:
                self._logged = True
                log.exception("span exporter raised; its batches are counted as failed (logged once)")
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            stats.spans_exported += n
        else:
            stats.spans_dropped_export_failed += n
        return result

    def shutdown(self) -> None:
        """Shut the real exporter down once (from the processor, or the shutdown deadline timer)."""
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
        try:
            self._exporter.shutdown()
        except Exception:
            log.exception("span exporter shutdown failed")

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


class Tracer:
    """Exports the sidecar's sampled spans; holds the sampler for new traces and the span counters."""

    __slots__ = ("sampler", "stats", "resource", "_scope", "_exporter", "_processor", "_max_queue_size",
                 "_admitted", "_closed", "_logged", "_tracestate_raw", "_tracestate")

    def __init__(self, exporter: SpanExporter, resource_attributes: dict[str, str], *, ratio: float,
                 max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
                 max_export_batch_size: int = DEFAULT_MAX_EXPORT_BATCH_SIZE,
                 schedule_delay: float = DEFAULT_SCHEDULE_DELAY) -> None:
        self.sampler = Sampler(ratio)
        self.stats = TracingStats()
        # Resource.create adds telemetry.sdk.* and OTEL_RESOURCE_ATTRIBUTES to service.* from the caller.
        self.resource = Resource.create(resource_attributes)
        self._scope = InstrumentationScope(SCOPE_NAME, __version__)
        self._exporter = _CountingExporter(exporter, self.stats)
        self._max_queue_size = max_queue_size
        self._admitted = 0  # spans given to the processor; written by the loop thread only
        self._closed = False
        self._logged = False
        self._tracestate_raw = b""  # the last tracestate parsed, and its TraceState (loop thread only)
        self._tracestate = _NO_TRACESTATE
        # Raises ValueError on inconsistent sizes (a config error, before any thread starts).
        self._processor = BatchSpanProcessor(
            self._exporter, max_queue_size=max_queue_size, schedule_delay_millis=schedule_delay * 1000.0,
            max_export_batch_size=max_export_batch_size)

    @classmethod
    def otlp(cls, endpoint: str, resource_attributes: dict[str, str], *, ratio: float,
             timeout: float = DEFAULT_EXPORT_TIMEOUT, max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
             max_export_batch_size: int = DEFAULT_MAX_EXPORT_BATCH_SIZE,
             schedule_delay: float = DEFAULT_SCHEDULE_DELAY) -> Tracer:
        """A tracer exporting to an OTLP/gRPC collector at ``host:port``, ``http://`` or ``https://host:port``.

        ``timeout`` bounds one batch's export, retries included. Raises ImportError, whatever the
        underlying failure (xds-protos' overwritten files can also fail with protobuf errors), when
        the exporter cannot be loaded: the caller names ``meshkeeper.deps.REPAIR_HINT``.
        """
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except Exception as exc:
            raise ImportError(f"cannot load the OTLP exporter: {type(exc).__name__}: {exc}") from exc
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"), timeout=timeout)
        return cls(exporter, resource_attributes, ratio=ratio, max_queue_size=max_queue_size,
                   max_export_batch_size=max_export_batch_size, schedule_delay=schedule_delay)

    def record(self, name: str, kind: int, trace_id: int, span_id: int, parent_id: int, start_ns: int,
               end_ns: int, attributes: dict[str, str | int | float | bool], error: bool,
               tracestate: bytes = b"") -> None:
        """Queue one finished, sampled span for export; O(1), never blocks, never raises.

        Called on the event loop thread. ``parent_id`` 0 makes a root span; ``kind`` is SERVER or
        CLIENT; times are Unix epoch nanoseconds; ``error`` sets status ERROR (else UNSET). The span
        keeps ``attributes``: the caller must not change the dict afterwards.
        """
        stats = self.stats
        stats.spans_sampled += 1
        if self._closed or self._admitted - self._exporter.handed_over >= self._max_queue_size:
            stats.spans_dropped_queue_full += 1
            return
        try:
            if not tracestate:
                trace_state = _NO_TRACESTATE
            elif tracestate == self._tracestate_raw:  # a caller usually repeats its tracestate
                trace_state = self._tracestate
            else:
                trace_state = TraceState.from_header([tracestate.decode("latin-1")])
                self._tracestate_raw, self._tracestate = tracestate, trace_state
            span = ReadableSpan(
                name=name,
                context=SpanContext(trace_id, span_id, False, _SAMPLED, trace_state),
                parent=SpanContext(trace_id, parent_id, True, _SAMPLED, _NO_TRACESTATE) if parent_id else None,
                resource=self.resource,
                attributes=attributes,
                kind=_SPAN_KINDS[kind],
                status=_STATUS_ERROR if error else _STATUS_UNSET,
                start_time=start_ns,
                end_time=end_ns,
                instrumentation_scope=self._scope,
            )
            self._processor.on_end(span)
        except Exception:
            stats.spans_dropped_invalid += 1
            if not self._logged:
                self._logged = True
                log.exception("could not record span %r (counted in spans_dropped_invalid; logged once)", name)
            return
        self._admitted += 1

    def shutdown(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
        """Export what is queued for at most ``timeout`` seconds, then stop the worker thread.

        Blocks the caller (call it at exit, or from an executor). Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._exporter.deadline = time.monotonic() + timeout
        # At the deadline, an export still running (a collector that does not answer, or the OTLP
        # exporter's back-off) is cut short by shutting the exporter down.
        timer = threading.Timer(timeout, self._exporter.shutdown)
        timer.daemon = True
        timer.start()
        try:
            self._processor.shutdown()
        finally:
            timer.cancel()
            timer.join()
