"""Sampled spans to OTLP/gRPC (sidecar.tracing.export): a real receiver on 127.0.0.1, a dead and a
silent collector, and fake exporters for exact drop counting."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from sidecar.tracing.context import format_trace_id, new_span_id, new_trace_id
from sidecar.tracing.export import CLIENT, SERVER, TRACING_STATS, Tracer, TracingStats
from tests.harness import free_port, wait_until
from tests.harness.otlp import OtlpReceiver, ReceivedSpan

SERVICE = {"service.name": "catalog", "service.namespace": "shop", "service.instance.id": "catalog-7f9c",
           "service.version": "v2"}


@pytest.fixture
def threads() -> Iterator[None]:
    """Every thread a test starts (processor workers, timers, gRPC servers) is gone after it."""
    before = {t.ident for t in threading.enumerate()}
    yield

    def leaked() -> list[str]:
        return [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    wait_until(lambda: not leaked(), 10, message="threads left behind")


@pytest.fixture
def receiver(threads: None) -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
def tracers(threads: None) -> Iterator[Callable[..., Tracer]]:
    """``tracers(endpoint_or_exporter, **kw)``: a tracer shut down at teardown."""
    made: list[Tracer] = []

    def make(target: str | SpanExporter, ratio: float = 1.0, **kw: Any) -> Tracer:
        if isinstance(target, str):
            tracer = Tracer.otlp(target, SERVICE, ratio=ratio, **kw)
        else:
            tracer = Tracer(target, SERVICE, ratio=ratio, **kw)
        made.append(tracer)
        return tracer
    yield make
    for tracer in made:
        tracer.shutdown(timeout=1.0)


class FakeExporter(SpanExporter):
    """Answers ``result`` (or raises ``error``) after ``gate`` opens; records what it saw."""

    def __init__(self, result: SpanExportResult = SpanExportResult.SUCCESS, error: Exception | None = None) -> None:
        self.result = result
        self.error = error
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[int] = []
        self.shut_down = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.batches.append(len(spans))
        self.gate.wait(10)
        if self.error is not None:
            raise self.error
        return self.result

    def shutdown(self) -> None:
        self.shut_down = True
        self.gate.set()


def record(tracer: Tracer, n: int = 1, **kw: Any) -> None:
    now = time.time_ns()
    for _ in range(n):
        args: dict[str, Any] = dict(name="GET /items", kind=SERVER, trace_id=new_trace_id(), span_id=new_span_id(), parent_id=0,
                    start_ns=now, end_ns=now + 1000, attributes={}, error=False)
        args.update(kw)
        tracer.record(**args)


def resolved(tracer: Tracer) -> bool:
    return tracer.stats.queued == 0


# Over real gRPC


def test_spans_arrive_at_the_collector(receiver: OtlpReceiver, tracers: Callable[..., Tracer]) -> None:
    tracer = tracers(receiver.endpoint, schedule_delay=0.05)
    trace_id = new_trace_id()
    ids = [new_span_id() for _ in range(5)]
    t0 = time.time_ns()
    # frontend SERVER -> frontend CLIENT -> catalog SERVER -> catalog CLIENT -> reviews SERVER (failed)
    spans = [
        ("ingress frontend", SERVER, 0, {"http.method": "GET", "http.status_code": 200}, False),
        ("egress catalog", CLIENT, ids[0], {"upstream_cluster": "outbound|catalog.shop", "retry": 0}, False),
        ("ingress catalog", SERVER, ids[1], {"http.url": "/items", "sampled_ratio": 0.25}, False),
        ("egress reviews", CLIENT, ids[2], {"peer.address": "10.0.0.7:8080", "cached": False}, True),
        ("ingress reviews", SERVER, ids[3], {"response_flags": "UC", "http.status_code": 503}, True),
    ]
    for i, (name, kind, parent, attributes, error) in enumerate(spans):
        tracer.record(name, kind, trace_id, ids[i], parent, t0 + i, t0 + 1000 - i, dict(attributes), error,
                      b"congo=t61rcWkgMzE" if i == 0 else b"")

    got = {s.span_id: s for s in receiver.wait_for(5)}
    assert len(got) == 5
    for i, (name, kind, parent, attributes, error) in enumerate(spans):
        s: ReceivedSpan = got[f"{ids[i]:016x}"]
        assert s.name == name
        assert s.kind == ("SERVER" if kind == SERVER else "CLIENT")
        assert s.trace_id == format_trace_id(trace_id)
        assert s.parent_span_id == (f"{parent:016x}" if parent else "")
        assert s.attributes == attributes
        assert s.status_code == ("ERROR" if error else "UNSET")
        assert (s.start_ns, s.end_ns) == (t0 + i, t0 + 1000 - i)
        assert s.resource | SERVICE == s.resource  # service.* as given
        assert s.resource["telemetry.sdk.language"] == "python"  # Resource.create merged the SDK's
        assert s.scope == "meshkeeper.sidecar"
        assert s.trace_state == ("congo=t61rcWkgMzE" if i == 0 else "")
    wait_until(lambda: tracer.stats.spans_exported == 5, 10, message="exports counted")
    assert tracer.stats.snapshot() == {"spans_sampled": 5, "spans_exported": 5, "spans_dropped_queue_full": 0,
                                       "spans_dropped_export_failed": 0, "spans_dropped_invalid": 0,
                                       "spans_queued": 0}


def test_endpoint_with_http_scheme(receiver: OtlpReceiver, tracers: Callable[..., Tracer]) -> None:
    tracer = tracers(f"http://{receiver.endpoint}", schedule_delay=0.05)
    record(tracer, 3, kind=CLIENT)
    assert [s.kind for s in receiver.wait_for(3)] == ["CLIENT"] * 3
    assert receiver.requests >= 1


def test_shutdown_flushes_what_is_queued(receiver: OtlpReceiver, tracers: Callable[..., Tracer]) -> None:
    tracer = tracers(receiver.endpoint, schedule_delay=60)  # only shutdown sends
    record(tracer, 7)
    assert receiver.requests == 0
    tracer.shutdown(timeout=5)
    assert len(receiver.spans()) == 7
    assert tracer.stats.spans_exported == 7 and tracer.stats.queued == 0


def test_dead_collector_never_blocks_and_counts_every_drop(tracers: Callable[..., Tracer]) -> None:
    tracer = tracers(f"127.0.0.1:{free_port()}", timeout=0.5, max_queue_size=64, max_export_batch_size=16,
                     schedule_delay=0.05)
    slowest = 0.0
    for _ in range(5000):
        t = time.perf_counter()
        record(tracer)
        slowest = max(slowest, time.perf_counter() - t)
        # What waits is bounded: the queue, plus one batch being exported.
        assert tracer.stats.queued <= 64 + 16
    assert slowest < 0.05, f"record() blocked for {slowest * 1000:.1f} ms"
    stats = tracer.stats
    wait_until(lambda: resolved(tracer), 20, message=f"spans resolved: {stats.snapshot()}")
    assert stats.spans_sampled == 5000
    assert stats.spans_exported == 0 and stats.spans_dropped_invalid == 0
    assert stats.spans_dropped_queue_full > 0 and stats.spans_dropped_export_failed > 0
    assert stats.spans_dropped_queue_full + stats.spans_dropped_export_failed == 5000


def test_silent_collector_is_cut_off_at_shutdown(tracers: Callable[..., Tracer]) -> None:
    """A collector that accepts TCP and never answers: the export would wait its full 30 s timeout;
    shutdown(timeout) cancels it at the deadline and counts what was not sent."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        tracer = tracers(f"127.0.0.1:{silent.getsockname()[1]}", timeout=30, max_queue_size=100,
                         max_export_batch_size=10, schedule_delay=0.02)
        slowest = 0.0
        for _ in range(300):
            t = time.perf_counter()
            record(tracer)
            slowest = max(slowest, time.perf_counter() - t)
        assert slowest < 1.0  # never waits on the export (30 s here); generous for a loaded CI machine
        t = time.monotonic()
        tracer.shutdown(timeout=0.5)
        assert time.monotonic() - t < 5
    stats = tracer.stats
    assert stats.queued == 0 and stats.spans_exported == 0
    assert stats.spans_dropped_queue_full + stats.spans_dropped_export_failed == 300
    assert stats.spans_dropped_export_failed >= 100  # everything admitted was counted as not sent


# Exact counting, with fake exporters


def test_full_queue_refuses_and_counts_exactly(tracers: Callable[..., Tracer]) -> None:
    exporter = FakeExporter()
    exporter.gate.clear()  # the first batch hangs in the exporter
    tracer = tracers(exporter, max_queue_size=10, max_export_batch_size=5, schedule_delay=60)
    record(tracer, 5)  # a full batch wakes the worker
    wait_until(lambda: exporter.batches == [5], 10, message="first batch taken")
    record(tracer, 100)  # 10 fit in the queue, 90 are refused; the SDK's queue never evicts
    assert tracer.stats.spans_dropped_queue_full == 90
    assert tracer.stats.queued == 15
    exporter.gate.set()
    wait_until(lambda: resolved(tracer), 10, message="queue drained")
    assert exporter.batches == [5, 5, 5]
    assert tracer.stats.spans_exported == 15
    assert tracer.stats.spans_dropped_export_failed == 0


def test_failed_batches_are_counted(tracers: Callable[..., Tracer]) -> None:
    tracer = tracers(FakeExporter(SpanExportResult.FAILURE), max_export_batch_size=4, schedule_delay=0.02)
    record(tracer, 10)
    wait_until(lambda: resolved(tracer), 10, message="batches failed")
    assert tracer.stats.spans_dropped_export_failed == 10 and tracer.stats.spans_exported == 0


def test_exporter_exception_is_counted_and_logged_once(tracers: Callable[..., Tracer],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    tracer = tracers(FakeExporter(error=RuntimeError("collector client bug")), max_export_batch_size=2,
                     schedule_delay=0.02)
    with caplog.at_level(logging.ERROR, logger="sidecar.tracing.export"):
        record(tracer, 6)
        wait_until(lambda: resolved(tracer), 10, message="batches failed")
    assert tracer.stats.spans_dropped_export_failed == 6
    assert sum("span exporter raised" in r.getMessage() for r in caplog.records) == 1


def test_bad_span_is_counted_not_raised(tracers: Callable[..., Tracer], caplog: pytest.LogCaptureFixture) -> None:
    tracer = tracers(FakeExporter(), schedule_delay=0.02)
    with caplog.at_level(logging.ERROR, logger="sidecar.tracing.export"):
        record(tracer, 2, kind=99)
    assert tracer.stats.spans_dropped_invalid == 2
    assert sum("could not record span" in r.getMessage() for r in caplog.records) == 1
    record(tracer, 1)
    wait_until(lambda: tracer.stats.spans_exported == 1, 10, message="good span exported")
    assert tracer.stats.queued == 0


def test_record_after_shutdown_is_refused(tracers: Callable[..., Tracer]) -> None:
    exporter = FakeExporter()
    tracer = tracers(exporter, schedule_delay=60)
    record(tracer, 3)
    tracer.shutdown()
    assert exporter.batches == [3] and exporter.shut_down
    record(tracer, 2)
    assert tracer.stats.spans_dropped_queue_full == 2 and tracer.stats.queued == 0
    tracer.shutdown()  # idempotent


def test_construction_errors(threads: None) -> None:
    with pytest.raises(ValueError):
        Tracer(FakeExporter(), SERVICE, ratio=1.5)
    with pytest.raises(ValueError):  # the SDK's own check: a batch cannot exceed the queue
        Tracer(FakeExporter(), SERVICE, ratio=1.0, max_queue_size=10, max_export_batch_size=20)


def test_sampler_and_stats_shape(tracers: Callable[..., Tracer]) -> None:
    tracer = tracers(FakeExporter(), ratio=0.25)
    assert tracer.sampler.ratio == 0.25
    assert set(TracingStats().snapshot()) == {*TRACING_STATS, "spans_queued"}


def test_otlp_exporter_that_does_not_import_raises_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a broken environment (xds-protos over opentelemetry-proto) looks like to the sidecar."""
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    with pytest.raises(ImportError, match="cannot load the OTLP exporter"):
        Tracer.otlp("127.0.0.1:4317", SERVICE, ratio=1.0)
