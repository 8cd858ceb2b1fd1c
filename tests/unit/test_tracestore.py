"""The trace store: bounds and eviction by whole traces, the index's searches, dependencies."""

from __future__ import annotations

import pytest

from controlplane.tracestore.otlp import make_process
from controlplane.tracestore.store import (
    BUCKET_NS,
    MalformedSpan,
    Scope,
    TraceQuery,
    TraceStore,
)
from tests.support.otlp_spans import CLIENT, SERVER, T0, resource, span, two_hop_trace
from tests.support.otlp_spans import add_to_store as add

SCOPE = Scope("meshkeeper.sidecar", "0.1.0")
MS = 1_000_000


def ids(traces) -> list[int]:
    return [int.from_bytes(t.key, "big") for t in traces]


def index_entries(store: TraceStore) -> int:
    return sum(len(b.spans) for buckets in store._index.values() for b in buckets.values())


def test_span_bound_evicts_whole_oldest_traces_and_counts():
    evicted = []
    store = TraceStore(max_spans=10, on_evict=lambda t, s: evicted.append((t, s)))
    for n in range(1, 6):  # five traces of three spans
        add(store, two_hop_trace(n, T0 + n * MS))
    assert store.span_count == 9 and len(store) == 3
    assert ids(store.traces()) == [3, 4, 5]
    assert store.evicted_traces == 2 and store.evicted_spans == 6
    assert sum(t for t, _ in evicted) == 2 and sum(s for _, s in evicted) == 6
    assert store.trace((1).to_bytes(16, "big")) is None
    assert all(len(t.spans) == 3 for t in store.traces())  # never part of a trace


def test_byte_bound_and_accounting():
    store = TraceStore(max_spans=1_000_000, max_bytes=20_000)
    for n in range(1, 200):
        add(store, two_hop_trace(n, T0 + n * MS))
        assert store.bytes <= 20_000
    kept = list(store.traces())
    assert ids(kept)[-1] == 199 and store.evicted_traces == 199 - len(kept)
    expected = sum(t.bytes for t in kept)
    assert store.bytes == expected


def test_eviction_order_is_first_arrival_of_the_trace():
    store = TraceStore(max_spans=6)
    a, b = two_hop_trace(1, T0), two_hop_trace(2, T0 + MS)
    add(store, {"frontend": a["frontend"]})  # trace 1 starts first
    add(store, b)  # trace 2 complete
    add(store, {"catalog": a["catalog"]})  # trace 1's late span: 6 spans, at the bound
    assert store.span_count == 6
    add(store, two_hop_trace(3, T0 + 2 * MS))  # over: trace 1 goes first, whole, then it fits
    assert ids(store.traces()) == [2, 3]


def test_a_trace_alone_over_the_bound_is_evicted_with_it():
    store = TraceStore(max_spans=2)
    add(store, two_hop_trace(1, T0))
    assert len(store) == 0 and store.span_count == 0 and store.evicted_spans == 3
    assert store.services() == [] and store._index == {}


def test_malformed_spans_are_refused_and_keep_nothing():
    store = TraceStore()
    p = make_process(resource("catalog"))
    bad = [
        span(trace_id=0, span_id=1),
        span(trace_id=1, span_id=0),
        span(trace_id=1, span_id=1, start=0),
        span(trace_id=1, span_id=1, duration=-5),
    ]
    for s in bad:
        with pytest.raises(MalformedSpan):
            store.add(s, p, SCOPE)
    short = span(trace_id=1, span_id=1)
    short.parent_span_id = b"\x01\x02"
    with pytest.raises(MalformedSpan, match="parent_span_id"):
        store.add(short, p, SCOPE)
    assert store.span_count == 0 and len(store) == 0 and store.bytes == 0


def test_services_and_operations_follow_eviction():
    store = TraceStore(max_spans=3)
    add(store, two_hop_trace(1, T0, service="web"))
    assert store.services() == ["catalog", "web"]
    assert store.operations("web") == [("GET", "client"), ("GET", "server")]
    assert store.operations("web", "client") == [("GET", "client")]
    add(store, {"search": [span(trace_id=2, span_id=1, name="POST /q", kind=SERVER)]})
    assert store.services() == ["search"] and store.operations("web") == []


@pytest.fixture
def filled() -> TraceStore:
    """40 traces a minute apart; every 5th an error; trace n lasts n ms."""
    store = TraceStore()
    for n in range(1, 41):
        add(store, two_hop_trace(n, T0 + n * BUCKET_NS, duration=n * MS, error=n % 5 == 0, n=n))
    add(store, {"search": [span(trace_id=99, span_id=1, name="POST /q", kind=SERVER, start=T0,
                                attrs={"note": "frontend", "db.rows": 3, "cache.hit": True, "ratio": 0.5})]})
    return store


def test_search_by_service_is_newest_first_and_limited(filled):
    assert ids(filled.search(TraceQuery("catalog", limit=3))) == [40, 39, 38]
    assert len(filled.search(TraceQuery("catalog"))) == 40
    assert filled.search(TraceQuery("nobody")) == []


def test_search_by_operation(filled):
    assert ids(filled.search(TraceQuery("search", operation="POST /q"))) == [99]
    assert filled.search(TraceQuery("search", operation="GET")) == []


def test_search_by_duration(filled):
    found = ids(filled.search(TraceQuery("frontend", min_duration=30 * MS, max_duration=32 * MS)))
    assert found == [32, 31, 30]  # the frontend SERVER span lasts n ms
    # One span must satisfy every condition: catalog's span lasts n ms - 0.3 ms.
    assert ids(filled.search(TraceQuery("catalog", min_duration=30 * MS, max_duration=31 * MS))) == [31]


def test_search_by_time_window(filled):
    q = TraceQuery("catalog", start_min=T0 + 10 * BUCKET_NS, start_max=T0 + 12 * BUCKET_NS + BUCKET_NS // 2)
    assert ids(filled.search(q)) == [12, 11, 10]


def test_search_by_tags(filled):
    by = lambda **tags: ids(filled.search(TraceQuery("catalog", tags=tags)))  # noqa: E731
    assert by(error="true") == [40, 35, 30, 25, 20, 15, 10, 5]
    assert by(**{"http.response.status_code": "500"}) == [40, 35, 30, 25, 20, 15, 10, 5]
    assert by(**{"http.response.status_code": "500", "otel.status_code": "ERROR"})[:2] == [40, 35]
    assert by(**{"meshkeeper.request_id": "5f0c8e1a-7b2d-4c3e-9f10-000000000007"}) == [7]
    assert by(**{"span.kind": "server"})[:1] == [40]
    assert by(**{"span.kind": "client"}) == []  # catalog's spans are all SERVER
    assert by(**{"service.namespace": "default"})[:1] == [40]  # a process tag
    assert by(**{"service.namespace": "other"}) == []
    assert by(**{"url.path": "/nothing"}) == []
    s = lambda **tags: ids(filled.search(TraceQuery("search", tags=tags)))  # noqa: E731
    assert s(**{"db.rows": "3"}) == [99] and s(**{"db.rows": "4"}) == []
    assert s(**{"cache.hit": "true"}) == [99] and s(**{"cache.hit": "false"}) == []
    assert s(ratio="0.5") == [99]
    # "frontend" is a value of key "note" on this span: it must not match another key's bytes.
    assert s(**{"meshkeeper.service": "frontend"}) == [] and s(note="frontend") == [99]


def test_search_matches_event_attributes_as_jaeger_matches_log_fields():
    store = TraceStore()
    add(store, {"catalog": [span(trace_id=5, span_id=1, events=[("retry", T0 + 10, {"attempt": 2})])]})
    assert ids(store.search(TraceQuery("catalog", tags={"attempt": "2"}))) == [5]


def test_dependencies_from_parent_child_pairs_across_services(filled):
    deps = filled.dependencies()
    assert [(d.parent, d.child, d.call_count) for d in deps] == [("frontend", "catalog", 40)]
    window = filled.dependencies(T0 + 10 * BUCKET_NS, T0 + 19 * BUCKET_NS + BUCKET_NS // 2)
    assert [(d.parent, d.child, d.call_count) for d in window] == [("frontend", "catalog", 10)]


def test_index_unlinks_evicted_spans():
    store = TraceStore(max_spans=300)
    for n in range(1, 2001):
        add(store, two_hop_trace(n, T0 + (n % 7) * BUCKET_NS + n))  # buckets shared, arrival interleaved
    # Two index entries per span, dead entries at most as many as live ones (compaction at half).
    assert index_entries(store) <= 4 * store.span_count
    got = ids(store.search(TraceQuery("catalog", limit=1000)))
    assert sorted(got) == ids(store.traces()) and len(got) == len(store)


def test_client_and_server_kinds_are_kept():
    store = TraceStore()
    add(store, two_hop_trace(1, T0))
    kinds = sorted((s.process.service, s.kind) for s in store.trace((1).to_bytes(16, "big")).spans)
    assert kinds == [("catalog", SERVER), ("frontend", SERVER), ("frontend", CLIENT)]
