"""The in-memory trace store: spans by trace, bounded, with an index for Jaeger's searches.

Who writes: :mod:`.otlp` (OTLP ``TraceService/Export``) calls :meth:`TraceStore.add`; readers
(:mod:`.query`) call :meth:`search`, :meth:`trace`, :meth:`services`, :meth:`operations` and
:meth:`dependencies`. Everything runs on the event loop; nothing here blocks or takes a lock.

What a span costs. On ingest we read the few fields the index needs (ids, name, kind, times,
status) and keep the span as its protobuf serialization (``blob``), re-serialized by us, so its
bytes are canonical whatever the sender wrote. Attributes, events and links are decoded only when
a trace is rendered. A tag search matches on those canonical bytes: the attribute ``k=v`` is
present only if the serialized ``KeyValue(k, v)`` (as a string, or int, bool or double when ``v``
reads as one) occurs in the blob, a C substring search; a hit is confirmed by decoding that one
span, so a coincidental byte match never counts.

Bounds. ``max_spans`` and ``max_bytes`` (accounted: ``len(blob) + SPAN_OVERHEAD`` per span plus
``TRACE_OVERHEAD`` per trace; the constants are measured with tracemalloc by bench/tracestore.py
and tests/unit/test_tracestore.py). When a span takes the store over either bound, whole traces
are evicted, the trace first seen longest ago first, until it is back under both; evicted traces
and spans are counted. A trace that alone exceeds a bound is evicted too, with the span that
arrived.

Index. Per ``(service, "")`` and ``(service, operation)``: spans in minute buckets of their start
time, each bucket in arrival order. A search walks the buckets that overlap its time window,
newest first, and each bucket backwards, and stops at ``limit`` traces. Evicted spans are
unlinked lazily: a bucket counts its dead entries and is compacted when they are half of it, so
eviction is O(spans evicted) amortized.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

DEFAULT_MAX_SPANS = 100_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# Python objects per span beside its blob: the span record (slots), its ids and times, its
# entries in the trace and two index buckets. Measured (tracemalloc, bench/tracestore.py):
# ~350 bytes beside len(blob) per span of the sidecar's and ~320 per trace (a 6% margin above).
SPAN_OVERHEAD = 400
TRACE_OVERHEAD = 360
BUCKET_NS = 60 * 1_000_000_000  # index buckets of one minute of span start time
NO_SERVICE = "OTLPResourceNoServiceName"  # what Jaeger's OTLP translator names a resource without one

# OTLP SpanKind -> the ``span.kind`` tag Jaeger shows ("" for UNSPECIFIED: no tag).
SPAN_KINDS = ("", "internal", "server", "client", "producer", "consumer")
STATUS_OK, STATUS_ERROR = 1, 2


@dataclass(eq=False, slots=True)
class Process:
    """A resource as Jaeger's ``processes`` show it; shared by every span of that resource."""

    service: str
    tags: list[dict[str, Any]]  # Jaeger KeyValues of the resource attributes but service.name
    match: dict[str, str]  # the same, as strings, for tag searches


@dataclass(eq=False, slots=True)
class Scope:
    name: str
    version: str


class Trace:
    __slots__ = ("key", "spans", "bytes", "alive")

    def __init__(self, key: bytes) -> None:
        self.key = key  # the 16-byte trace id
        self.spans: list[StoredSpan] = []
        self.bytes = TRACE_OVERHEAD
        self.alive = True


class StoredSpan:
    __slots__ = ("trace", "span_id", "parent_id", "name", "kind", "start", "end", "status", "process",
                 "scope", "blob")

    def __init__(self, trace: Trace, span_id: bytes, parent_id: bytes, name: str, kind: int, start: int,
                 end: int, status: int, process: Process, scope: Scope, blob: bytes) -> None:
        self.trace = trace
        self.span_id = span_id
        self.parent_id = parent_id
        self.name = name
        self.kind = kind
        self.start = start  # Unix ns
        self.end = end
        self.status = status  # OTLP status code: 0 unset, 1 ok, 2 error
        self.process = process
        self.scope = scope
        self.blob = blob  # trace_pb2.Span, serialized

    @property
    def error(self) -> bool:
        return self.status == STATUS_ERROR

    def decode(self) -> trace_pb2.Span:
        return trace_pb2.Span.FromString(self.blob)


class _Bucket:
    __slots__ = ("spans", "dead")

    def __init__(self) -> None:
        self.spans: list[StoredSpan] = []
        self.dead = 0


class MalformedSpan(ValueError):
    """A span the store cannot keep; the message says which field is wrong."""


@dataclass(frozen=True, slots=True)
class TraceQuery:
    """A Jaeger search. Durations and times in ns; 0 means "no bound"."""

    service: str
    operation: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    min_duration: int = 0
    max_duration: int = 0
    start_min: int = 0
    start_max: int = 0
    limit: int = 100


@dataclass(frozen=True, slots=True)
class Dependency:
    parent: str
    child: str
    call_count: int


def _patterns(key: str, value: str) -> list[bytes]:
    """The canonical bytes of attribute ``key`` = ``value`` under each type ``value`` can be read as."""
    values = [AnyValue(string_value=value)]
    if value in ("true", "false"):
        values.append(AnyValue(bool_value=value == "true"))
    try:
        values.append(AnyValue(int_value=int(value)))
    except ValueError:
        pass
    else:
        if not -(1 << 63) <= int(value) < (1 << 63):
            values.pop()
    try:
        values.append(AnyValue(double_value=float(value)))
    except (ValueError, OverflowError):
        pass
    return [KeyValue(key=key, value=v).SerializeToString() for v in values]


def value_string(v: AnyValue) -> str:
    """An attribute value as a tag search compares it (Jaeger compares the value's string form)."""
    which = v.WhichOneof("value")
    if which == "bool_value":
        return "true" if v.bool_value else "false"
    if which in ("int_value", "double_value", "string_value"):
        x = getattr(v, which)
        return repr(x) if which == "double_value" else str(x)
    return v.SerializeToString().hex() if which else ""


def _same_value(v: AnyValue, wanted: str) -> bool:
    which = v.WhichOneof("value")
    if which == "double_value":
        try:
            return v.double_value == float(wanted)
        except ValueError:
            return False
    return value_string(v) == wanted


class _SpanMatcher:
    """One search's span predicate: the checks built once, the cheapest first."""

    def __init__(self, q: TraceQuery) -> None:
        self.start_min, self.start_max = q.start_min, q.start_max
        self.min_duration, self.max_duration = q.min_duration, q.max_duration
        self.tags = [(k, v, _patterns(k, v), k in _SYNTHETIC_KEYS) for k, v in q.tags.items()]

    def __call__(self, s: StoredSpan) -> bool:
        if self.start_min and s.start < self.start_min or self.start_max and s.start > self.start_max:
            return False
        if self.min_duration or self.max_duration:
            d = s.end - s.start
            if self.min_duration and d < self.min_duration or self.max_duration and d > self.max_duration:
                return False
        for key, value, patterns, synthetic in self.tags:
            if synthetic and _synthetic_tag(s, key) == value or s.process.match.get(key) == value:
                continue
            blob = s.blob
            for p in patterns:
                if p in blob:
                    break
            else:
                return False
            if not _confirm(s, key, value):
                return False
        return True


def _confirm(s: StoredSpan, key: str, value: str) -> bool:
    """Decode the span: the bytes may have matched inside another field."""
    pb = s.decode()
    kvs = [*pb.attributes, *(kv for e in pb.events for kv in e.attributes)]
    return any(kv.key == key and _same_value(kv.value, value) for kv in kvs)


_SYNTHETIC_KEYS = frozenset(("span.kind", "error", "otel.status_code", "otel.scope.name"))


def _synthetic_tag(s: StoredSpan, key: str) -> str | None:
    """Tags Jaeger's OTLP translator adds from span fields, as strings."""
    if key == "span.kind":
        return SPAN_KINDS[s.kind] if 0 < s.kind < len(SPAN_KINDS) else None
    if key == "error":
        return "true" if s.status == STATUS_ERROR else None
    if key == "otel.status_code":
        return {STATUS_OK: "OK", STATUS_ERROR: "ERROR"}.get(s.status)
    if key == "otel.scope.name":
        return s.scope.name or None
    return None


class TraceStore:
    def __init__(self, max_spans: int = DEFAULT_MAX_SPANS, max_bytes: int = DEFAULT_MAX_BYTES, *,
                 on_evict: Callable[[int, int], None] | None = None) -> None:
        if max_spans < 1 or max_bytes < 1:
            raise ValueError("the trace store needs max_spans >= 1 and max_bytes >= 1")
        self.max_spans = max_spans
        self.max_bytes = max_bytes
        self.span_count = 0
        self.bytes = 0
        self.evicted_traces = 0
        self.evicted_spans = 0
        self._on_evict = on_evict  # (traces, spans) evicted, for the metrics
        self._traces: dict[bytes, Trace] = {}
        self._order: deque[Trace] = deque()  # traces by first arrival; eviction pops the left
        self._index: dict[tuple[str, str], dict[int, _Bucket]] = {}
        self._ops: dict[str, dict[tuple[str, int], int]] = {}  # service -> (operation, kind) -> spans

    def __len__(self) -> int:
        return len(self._traces)

    # -- ingest

    def add(self, span: trace_pb2.Span, process: Process, scope: Scope) -> None:
        """Keep one span; raises :class:`MalformedSpan` (and keeps nothing) for bad ids or times."""
        tid, sid, pid = span.trace_id, span.span_id, span.parent_span_id
        if len(tid) != 16 or not any(tid):
            raise MalformedSpan(f"trace_id must be 16 bytes, not all zero (got {tid.hex() or 'none'})")
        if len(sid) != 8 or not any(sid):
            raise MalformedSpan(f"span_id must be 8 bytes, not all zero (got {sid.hex() or 'none'})")
        if pid and len(pid) != 8:
            raise MalformedSpan(f"parent_span_id must be empty or 8 bytes (got {pid.hex()})")
        start, end = span.start_time_unix_nano, span.end_time_unix_nano
        if not start or end < start:
            raise MalformedSpan(f"span {sid.hex()}: start_time must be set and end_time not before it "
                                f"(start {start}, end {end})")
        trace = self._traces.get(tid)
        if trace is None:
            trace = self._traces[tid] = Trace(tid)
            self._order.append(trace)
            self.bytes += TRACE_OVERHEAD
        blob = span.SerializeToString()
        s = StoredSpan(trace, sid, pid if any(pid) else b"", span.name, span.kind, start, end,
                       span.status.code, process, scope, blob)
        trace.spans.append(s)
        cost = len(blob) + SPAN_OVERHEAD
        trace.bytes += cost
        self.bytes += cost
        self.span_count += 1
        minute = start // BUCKET_NS
        service = process.service
        index = self._index
        for key in ((service, ""), (service, s.name)):
            buckets = index.get(key)
            if buckets is None:
                buckets = index[key] = {}
            bucket = buckets.get(minute)
            if bucket is None:
                bucket = buckets[minute] = _Bucket()
            bucket.spans.append(s)
        ops = self._ops.get(service)
        if ops is None:
            ops = self._ops[service] = {}
        op = (s.name, s.kind)
        ops[op] = ops.get(op, 0) + 1
        if self.span_count > self.max_spans or self.bytes > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        traces = spans = 0
        while self._order and (self.span_count > self.max_spans or self.bytes > self.max_bytes):
            trace = self._order.popleft()
            del self._traces[trace.key]
            trace.alive = False
            self.bytes -= trace.bytes
            self.span_count -= len(trace.spans)
            traces += 1
            spans += len(trace.spans)
            for s in trace.spans:
                self._unlink(s)
        self.evicted_traces += traces
        self.evicted_spans += spans
        if self._on_evict is not None and traces:
            self._on_evict(traces, spans)

    def _unlink(self, s: StoredSpan) -> None:
        service, minute = s.process.service, s.start // BUCKET_NS
        for key in ((service, ""), (service, s.name)):
            buckets = self._index[key]
            bucket = buckets[minute]
            bucket.dead += 1
            if bucket.dead == len(bucket.spans):
                del buckets[minute]
                if not buckets:
                    del self._index[key]
            elif bucket.dead * 2 > len(bucket.spans):
                bucket.spans = [x for x in bucket.spans if x.trace.alive]
                bucket.dead = 0
        ops = self._ops[service]
        op = (s.name, s.kind)
        left = ops[op] - 1
        if left:
            ops[op] = left
        else:
            del ops[op]
            if not ops:
                del self._ops[service]

    # -- reads

    def trace(self, trace_id: bytes) -> Trace | None:
        return self._traces.get(trace_id)

    def services(self) -> list[str]:
        return sorted(self._ops)

    def operations(self, service: str, kind: str = "") -> list[tuple[str, str]]:
        """(operation, span kind name) pairs of ``service``, sorted; ``kind`` filters by kind name."""
        ops = self._ops.get(service, {})
        return sorted((name, SPAN_KINDS[k] if 0 <= k < len(SPAN_KINDS) else "")
                      for name, k in ops if not kind or (SPAN_KINDS[k] if 0 <= k < len(SPAN_KINDS) else "") == kind)

    def search(self, q: TraceQuery) -> list[Trace]:
        """Traces with at least one span that matches every condition of ``q``, newest buckets first."""
        buckets = self._index.get((q.service, q.operation))
        if not buckets or q.limit <= 0:
            return []
        lo = q.start_min // BUCKET_NS if q.start_min else None
        hi = q.start_max // BUCKET_NS if q.start_max else None
        match = _SpanMatcher(q)
        found: dict[bytes, Trace] = {}
        for minute in sorted(buckets, reverse=True):
            if hi is not None and minute > hi:
                continue
            if lo is not None and minute < lo:
                break
            for s in reversed(buckets[minute].spans):
                t = s.trace
                if t.alive and t.key not in found and match(s):
                    found[t.key] = t
                    if len(found) >= q.limit:
                        return list(found.values())
        return list(found.values())

    def dependencies(self, start_min: int = 0, start_max: int = 0) -> list[Dependency]:
        """Calls between services: a span whose parent span is another service's, counted per pair.

        Only child spans that started within [start_min, start_max] (ns; 0: unbounded) count.
        """
        counts: dict[tuple[str, str], int] = {}
        for trace in self._traces.values():
            if len(trace.spans) < 2:
                continue
            by_id = {s.span_id: s.process.service for s in trace.spans}
            for s in trace.spans:
                if not s.parent_id or start_min and s.start < start_min or start_max and s.start > start_max:
                    continue
                parent = by_id.get(s.parent_id)
                if parent is not None and parent != s.process.service:
                    pair = (parent, s.process.service)
                    counts[pair] = counts.get(pair, 0) + 1
        return [Dependency(p, c, n) for (p, c), n in sorted(counts.items())]

    def traces(self) -> Iterator[Trace]:
        """Every trace, oldest first (for tests and the bench)."""
        return iter(list(self._order))


def spans_of(traces: Iterable[Trace]) -> int:
    return sum(len(t.spans) for t in traces)

