"""Trace context on the request path (sidecar.tracing.context), cross-checked against OpenTelemetry.

Every extract case is also run through OpenTelemetry's own propagators on the same headers
(W3C: ``TraceContextTextMapPropagator``; B3: ``B3SingleFormat`` / ``B3MultiFormat``); where the two
differ on purpose the case says how OpenTelemetry answers, so a change on either side shows up.
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass

import pytest
from opentelemetry import trace
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidecar.tracing import context
from sidecar.tracing.context import (
    B3,
    B3_FLAGS,
    B3_MULTI,
    B3_NONE,
    B3_PARENT,
    B3_SAMPLED,
    B3_SINGLE,
    B3_SPAN,
    B3_TRACE,
    TP,
    TRACE_HEADERS,
    TS,
    Sampler,
    TraceContext,
    extract,
    format_trace_id,
    new_request_id,
    new_span_id,
    new_trace_id,
    sampling_hint,
    trace_headers,
)

NAMES = {kind: name.decode() for name, kind in TRACE_HEADERS.items()}

TID = "0af7651916cd43dd8448eb211c80319c"
SID = "b7ad6b7169203331"
BTID = "80f198ee56343ba864fe8b2a57d3eff7"
BTID64 = "64fe8b2a57d3eff7"
BSID = "e457b5a2e4d86bd1"
BPARENT = "05e3ac9a4f6e3b90"
ZERO32 = "0" * 32
ZERO16 = "0" * 16


def tp(value: str) -> tuple[int, bytes]:
    return (TP, value.encode())


@dataclass
class Case:
    id: str
    headers: list[tuple[int, bytes]]
    want: tuple[int, int, bool | None, bytes, int] | None  # trace_id, parent_id, sampled, tracestate, b3
    otel: str = "w3c"  # the OpenTelemetry propagator that reads these headers: w3c, b3single, b3multi
    otel_sampled: bool | None = None  # OpenTelemetry's flag where ours is None (a deferred B3 decision)
    otel_valid: bool | None = None  # OpenTelemetry's validity where it differs from ours on purpose
    hint: bool | None = None  # sampling_hint() for the same headers


def ok(trace_id: str, parent_id: str, sampled: bool | None, tracestate: bytes = b"", b3: int = B3_NONE
       ) -> tuple[int, int, bool | None, bytes, int]:
    return (int(trace_id, 16), int(parent_id, 16), sampled, tracestate, b3)


W3C_CASES = [
    Case("w3c-sampled", [tp(f"00-{TID}-{SID}-01")], ok(TID, SID, True)),
    Case("w3c-not-sampled", [tp(f"00-{TID}-{SID}-00")], ok(TID, SID, False)),
    Case("w3c-other-flag-bits", [tp(f"00-{TID}-{SID}-03")], ok(TID, SID, True)),
    Case("w3c-flag-bits-unsampled", [tp(f"00-{TID}-{SID}-fe")], ok(TID, SID, False)),
    Case("w3c-tracestate", [tp(f"00-{TID}-{SID}-01"), (TS, b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")],
         ok(TID, SID, True, b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")),
    Case("w3c-tracestate-first", [(TS, b"rojo=00f067aa0ba902b7"), tp(f"00-{TID}-{SID}-00")],
         ok(TID, SID, False, b"rojo=00f067aa0ba902b7")),
    Case("w3c-two-tracestate-fields", [tp(f"00-{TID}-{SID}-01"), (TS, b"congo=t61rcWkgMzE"), (TS, b"rojo=1")],
         ok(TID, SID, True, b"congo=t61rcWkgMzE,rojo=1")),
    Case("w3c-tracestate-too-long", [tp(f"00-{TID}-{SID}-01"), (TS, b"a=" + b"b" * 8191)], ok(TID, SID, True)),
    Case("w3c-optional-whitespace", [tp(f" \t00-{TID}-{SID}-01 ")], ok(TID, SID, True)),
    Case("w3c-future-version", [tp(f"01-{TID}-{SID}-01")], ok(TID, SID, True)),
    Case("w3c-future-version-more-fields", [tp(f"cc-{TID}-{SID}-01-what-the-future-will-be-like")],
         ok(TID, SID, True)),
    Case("w3c-future-version-512", [tp(f"01-{TID}-{SID}-01-" + "x" * (512 - 56))], ok(TID, SID, True)),
    Case("w3c-over-512", [tp(f"01-{TID}-{SID}-01-" + "x" * (513 - 56))], None),
    Case("w3c-future-version-no-dash", [tp(f"01-{TID}-{SID}-01x")], None),
    Case("w3c-version-00-extra-field", [tp(f"00-{TID}-{SID}-01-extra")], None),
    Case("w3c-version-ff", [tp(f"ff-{TID}-{SID}-01")], None),
    Case("w3c-uppercase-trace", [tp(f"00-{TID.upper()}-{SID}-01")], None),
    Case("w3c-uppercase-span", [tp(f"00-{TID}-{SID.upper()}-01")], None),
    Case("w3c-uppercase-version", [tp(f"0A-{TID}-{SID}-01")], None),
    Case("w3c-uppercase-flags", [tp(f"00-{TID}-{SID}-0F")], None),
    Case("w3c-zero-trace", [tp(f"00-{ZERO32}-{SID}-01")], None),
    Case("w3c-zero-span", [tp(f"00-{TID}-{ZERO16}-01")], None),
    Case("w3c-short-trace", [tp(f"00-{TID[:31]}-{SID}-01")], None),
    Case("w3c-long-trace", [tp(f"00-{TID}0-{SID}-01")], None),
    Case("w3c-short-span", [tp(f"00-{TID}-{SID[:15]}-01")], None),
    Case("w3c-short-flags", [tp(f"00-{TID}-{SID}-1")], None),
    Case("w3c-short-version", [tp(f"0-{TID}-{SID}-01")], None),
    Case("w3c-non-hex", [tp(f"00-{TID[:31]}g-{SID}-01")], None),
    Case("w3c-signed-trace", [tp(f"00--{TID[1:]}-{SID}-01")], None),
    Case("w3c-plus-span", [tp(f"00-{TID}-+{SID[1:]}-01")], None),
    Case("w3c-underscore", [tp(f"00-{TID[:30]}_0-{SID}-01")], None),
    Case("w3c-signed-version", [tp(f"-0-{TID}-{SID}-01")], None),
    Case("w3c-wrong-separators", [tp(f"00_{TID}_{SID}_01")], None),
    Case("w3c-empty", [tp("")], None),
    Case("tracestate-alone", [(TS, b"rojo=00f067aa0ba902b7")], None),
    # The W3C test suite restarts the trace on a duplicated traceparent; OpenTelemetry reads the first.
    Case("w3c-duplicated", [tp(f"00-{TID}-{SID}-01"), tp(f"00-{BTID}-{BSID}-01")], None, otel_valid=True),
]

B3_SINGLE_CASES = [
    Case("b3-ids-only-deferred", [(B3, f"{BTID}-{BSID}".encode())], ok(BTID, BSID, None, b"", B3_SINGLE),
         otel="b3single", otel_sampled=True),
    Case("b3-sampled", [(B3, f"{BTID}-{BSID}-1".encode())], ok(BTID, BSID, True, b"", B3_SINGLE), otel="b3single"),
    Case("b3-deny", [(B3, f"{BTID}-{BSID}-0".encode())], ok(BTID, BSID, False, b"", B3_SINGLE), otel="b3single"),
    Case("b3-debug", [(B3, f"{BTID}-{BSID}-d".encode())], ok(BTID, BSID, True, b"", B3_SINGLE), otel="b3single"),
    Case("b3-with-parent", [(B3, f"{BTID}-{BSID}-1-{BPARENT}".encode())], ok(BTID, BSID, True, b"", B3_SINGLE),
         otel="b3single"),
    Case("b3-64bit-trace", [(B3, f"{BTID64}-{BSID}-1".encode())], ok(BTID64, BSID, True, b"", B3_SINGLE),
         otel="b3single"),
    Case("b3-uppercase", [(B3, f"{BTID.upper()}-{BSID.upper()}-0".encode())],
         ok(BTID, BSID, False, b"", B3_SINGLE), otel="b3single"),
    Case("b3-unknown-sampled-is-deny", [(B3, f"{BTID}-{BSID}-x".encode())], ok(BTID, BSID, False, b"", B3_SINGLE),
         otel="b3single"),
    Case("b3-sampling-only-deny", [(B3, b"0")], None, otel="b3single", hint=False),
    Case("b3-sampling-only-accept", [(B3, b"1")], None, otel="b3single", hint=True),
    Case("b3-sampling-only-debug", [(B3, b"d")], None, otel="b3single", hint=True),
    Case("b3-too-many-fields", [(B3, f"{BTID}-{BSID}-1-{BPARENT}-x".encode())], None, otel="b3single"),
    Case("b3-trace-20-hex", [(B3, f"{BTID[:20]}-{BSID}-1".encode())], None, otel="b3single"),
    Case("b3-short-span", [(B3, f"{BTID}-{BSID[:15]}-1".encode())], None, otel="b3single"),
    Case("b3-zero-trace", [(B3, f"{ZERO32}-{BSID}-1".encode())], None, otel="b3single"),
    Case("b3-zero-span", [(B3, f"{BTID}-{ZERO16}-1".encode())], None, otel="b3single"),
    Case("b3-non-hex", [(B3, f"{BTID[:31]}z-{BSID}-1".encode())], None, otel="b3single"),
    Case("b3-empty", [(B3, b"")], None, otel="b3single"),
]

B3_MULTI_CASES = [
    Case("b3m-sampled-1", [(B3_TRACE, BTID.encode()), (B3_SPAN, BSID.encode()), (B3_SAMPLED, b"1")],
         ok(BTID, BSID, True, b"", B3_MULTI), otel="b3multi"),
    Case("b3m-sampled-true", [(B3_TRACE, BTID.encode()), (B3_SPAN, BSID.encode()), (B3_SAMPLED, b"true")],
         ok(BTID, BSID, True, b"", B3_MULTI), otel="b3multi"),
    Case("b3m-sampled-0", [(B3_TRACE, BTID.encode()), (B3_SPAN, BSID.encode()), (B3_SAMPLED, b"0")],
         ok(BTID, BSID, False, b"", B3_MULTI), otel="b3multi"),
    Case("b3m-sampled-false", [(B3_TRACE, BTID.encode()), (B3_SPAN, BSID.encode()), (B3_SAMPLED, b"false")],
         ok(BTID, BSID, False, b"", B3_MULTI), otel="b3multi"),
    Case("b3m-debug-flag", [(B3_TRACE, BTID.encode()), (B3_SPAN, BSID.encode()), (B3_FLAGS, b"1")],
         ok(BTID, BSID, True, b"", B3_MULTI), otel="b3multi"),
    Case("b3m-debug-beats-deny", [(B3_TRACE, BTID.encode()), (B3_SPAN, BSID.encode()), (B3_SAMPLED, b"0"),
                                   (B3_FLAGS, b"1")], ok(BTID, BSID, True, b"", B3_MULTI), otel="b3multi"),
    Case("b3m-deferred", [(B3_TRACE, BTID.encode()), (B3_SPAN, BSID.encode())],
         ok(BTID, BSID, None, b"", B3_MULTI), otel="b3multi", otel_sampled=False),
    Case("b3m-64bit-with-parent", [(B3_TRACE, BTID64.encode()), (B3_SPAN, BSID.encode()),
                                    (B3_PARENT, BPARENT.encode()), (B3_SAMPLED, b"1")],
         ok(BTID64, BSID, True, b"", B3_MULTI), otel="b3multi"),
    Case("b3m-missing-span", [(B3_TRACE, BTID.encode()), (B3_SAMPLED, b"1")], None, otel="b3multi", hint=True),
    Case("b3m-missing-trace", [(B3_SPAN, BSID.encode()), (B3_SAMPLED, b"0")], None, otel="b3multi", hint=False),
    Case("b3m-sampling-only-flags", [(B3_FLAGS, b"1")], None, otel="b3multi", hint=True),
    Case("b3m-bad-trace", [(B3_TRACE, BTID[:30].encode()), (B3_SPAN, BSID.encode())], None, otel="b3multi"),
]

MIXED_CASES = [
    # W3C supplies the ids; b3 remembers that the caller also spoke B3, to answer in both formats.
    Case("w3c-beats-b3-single", [(B3, f"{BTID}-{BSID}-0".encode()), tp(f"00-{TID}-{SID}-01"), (TS, b"k=v")],
         ok(TID, SID, True, b"k=v", B3_SINGLE)),
    Case("w3c-beats-b3-multi", [tp(f"00-{TID}-{SID}-00"), (B3_TRACE, BTID.encode()), (B3_SPAN, BSID.encode()),
                                (B3_SAMPLED, b"1")], ok(TID, SID, False, b"", B3_MULTI)),
    Case("w3c-with-b3-sampled-only", [tp(f"00-{TID}-{SID}-01"), (B3_SAMPLED, b"1")],
         ok(TID, SID, True, b"", B3_MULTI)),
    Case("w3c-with-bad-b3-single", [tp(f"00-{TID}-{SID}-01"), (B3, b"0")], ok(TID, SID, True, b"", B3_SINGLE)),
    Case("w3c-with-b3-parent-only", [tp(f"00-{TID}-{SID}-01"), (B3_PARENT, BPARENT.encode())], ok(TID, SID, True)),
    Case("bad-w3c-then-b3-single", [tp(f"ff-{TID}-{SID}-01"), (TS, b"k=v"), (B3, f"{BTID}-{BSID}-1".encode())],
         ok(BTID, BSID, True, b"", B3_SINGLE), otel="b3single"),
    Case("b3-single-beats-multi", [(B3, f"{BTID}-{BSID}-0".encode()), (B3_TRACE, BTID64.encode()),
                                   (B3_SPAN, BPARENT.encode()), (B3_SAMPLED, b"1")],
         ok(BTID, BSID, False, b"", B3_SINGLE), otel="b3single"),
    # A bad single header is skipped for the multi headers; OpenTelemetry stops at it.
    Case("bad-b3-single-then-multi", [(B3, b"garbage-x"), (B3_TRACE, BTID.encode()), (B3_SPAN, BSID.encode()),
                                      (B3_SAMPLED, b"1")], ok(BTID, BSID, True, b"", B3_MULTI), otel="b3multi",
         otel_valid=False),
    Case("nothing", [], None),
]

CASES = W3C_CASES + B3_SINGLE_CASES + B3_MULTI_CASES + MIXED_CASES

_PROPAGATORS = {"w3c": TraceContextTextMapPropagator(), "b3single": B3SingleFormat(), "b3multi": B3MultiFormat()}


def carrier(headers: list[tuple[int, bytes]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for kind, value in headers:
        out.setdefault(NAMES[kind], []).append(value.decode("latin-1"))
    return out


def otel_extract(propagator: str, headers: list[tuple[int, bytes]]) -> trace.SpanContext:
    ctx = _PROPAGATORS[propagator].extract(carrier(headers))
    return trace.get_current_span(ctx).get_span_context()


def fields(ctx: TraceContext | None) -> tuple[int, int, bool | None, bytes, int] | None:
    return None if ctx is None else (ctx.trace_id, ctx.parent_id, ctx.sampled, ctx.tracestate, ctx.b3)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_extract(case: Case) -> None:
    assert fields(extract(case.headers)) == case.want


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_extract_agrees_with_opentelemetry(case: Case) -> None:
    sc = otel_extract(case.otel, case.headers)
    otel_valid = (case.want is not None) if case.otel_valid is None else case.otel_valid
    assert sc.is_valid == otel_valid
    if case.want is None or case.otel_valid is not None:
        return
    trace_id, parent_id, sampled, tracestate, _ = case.want
    assert sc.trace_id == trace_id
    assert sc.span_id == parent_id
    assert sc.trace_flags.sampled == (case.otel_sampled if sampled is None else sampled)
    if case.otel == "w3c":
        assert sc.trace_state.to_header() == tracestate.decode()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sampling_hint(case: Case) -> None:
    if case.want is None:
        assert sampling_hint(case.headers) is case.hint


def test_sampling_hint_of_lone_b3_beats_multi_flags() -> None:
    assert sampling_hint([(B3_SAMPLED, b"1"), (B3, b"0")]) is False
    assert sampling_hint([(B3, b"junk"), (B3_SAMPLED, b"false")]) is False
    assert sampling_hint([(TP, b"00-junk")]) is None


def test_garbage_never_raises() -> None:
    rng = random.Random(4)
    alphabet = b"0123456789abcdefABCDEF-_+ \t\x00\xff,=dtrue"
    kinds = [TP, TS, B3, B3_TRACE, B3_SPAN, B3_PARENT, B3_SAMPLED, B3_FLAGS]
    for i in range(20_000):
        headers = []
        for _ in range(rng.randint(1, 4)):
            n = rng.choice((0, 1, 16, 32, 49, 55, 56, 70, 600, rng.randint(0, 100)))
            value = bytes(rng.choice(alphabet) for _ in range(n)) if i % 2 else rng.randbytes(n)
            headers.append((rng.choice(kinds), value))
        ctx = extract(headers)
        sampling_hint(headers)
        if ctx is not None:
            assert 0 < ctx.trace_id < 1 << 128 and 0 < ctx.parent_id < 1 << 64
    # Near-valid mutations of good headers, one byte changed: never raise, ids stay in range.
    good = f"00-{TID}-{SID}-01".encode()
    for pos in range(len(good)):
        for byte in b"-+_ \tGg0\x00":
            value = good[:pos] + bytes([byte]) + good[pos + 1:]
            ctx = extract([(TP, value)])
            assert ctx is None or (ctx.trace_id > 0 and ctx.parent_id > 0)
            assert otel_extract("w3c", [(TP, value)]).is_valid == (ctx is not None), value


# trace_headers(): what the upstream gets


def header_lines(blob: bytes) -> list[tuple[bytes, bytes]]:
    assert blob.endswith(b"\r\n")
    out = []
    for line in blob[:-2].split(b"\r\n"):
        name, _, value = line.partition(b": ")
        assert name == name.lower() and value
        out.append((name, value))
    return out


def as_headers(blob: bytes, skip: tuple[bytes, ...] = ()) -> list[tuple[int, bytes]]:
    return [(TRACE_HEADERS[name], value) for name, value in header_lines(blob) if name not in skip]


def otel_inject(propagator: TextMapPropagator, trace_id: int, span_id: int, sampled: bool, tracestate: str = "") -> dict:
    sc = trace.SpanContext(trace_id, span_id, is_remote=False,
                           trace_flags=trace.TraceFlags(1 if sampled else 0),
                           trace_state=trace.TraceState.from_header([tracestate]) if tracestate else None)
    out: dict[str, str] = {}
    propagator.inject(out, trace.set_span_in_context(trace.NonRecordingSpan(sc)))
    return out


@pytest.mark.parametrize("b3", [B3_NONE, B3_MULTI, B3_SINGLE])
@pytest.mark.parametrize("sampled", [True, False])
@pytest.mark.parametrize("tracestate", [b"", b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"])
def test_trace_headers_round_trip(b3: int, sampled: bool, tracestate: bytes) -> None:
    trace_id, span_id = new_trace_id(), new_span_id()
    blob = trace_headers(trace_id, span_id, sampled, tracestate, b3)
    names = [name for name, _ in header_lines(blob)]
    want_names = [b"traceparent"] + ([b"tracestate"] if tracestate else [])
    want_names += {B3_NONE: [], B3_MULTI: [b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled"], B3_SINGLE: [b"b3"]}[b3]
    assert names == want_names

    # Read back by our own extract (W3C's ids, the same B3 style: the next hop answers in kind),
    # then the B3 part alone.
    assert fields(extract(as_headers(blob))) == (trace_id, span_id, sampled, tracestate, b3)
    if b3 != B3_NONE:
        b3_only = as_headers(blob, skip=(b"traceparent", b"tracestate"))
        assert fields(extract(b3_only)) == (trace_id, span_id, sampled, b"", b3)

    # Read back by OpenTelemetry's propagators.
    hs = as_headers(blob)
    for name in ("w3c", "b3single", "b3multi") if b3 != B3_NONE else ("w3c",):
        sc = otel_extract(name, hs)
        assert (sc.trace_id, sc.span_id, sc.trace_flags.sampled) == (trace_id, span_id, sampled), name
    assert otel_extract("w3c", hs).trace_state.to_header() == tracestate.decode()

    # Byte for byte what OpenTelemetry's inject writes.
    lines = {name.decode(): value.decode() for name, value in header_lines(blob)}
    expected = otel_inject(TraceContextTextMapPropagator(), trace_id, span_id, sampled, tracestate.decode())
    if b3 == B3_MULTI:
        expected |= otel_inject(B3MultiFormat(), trace_id, span_id, sampled)
    elif b3 == B3_SINGLE:
        expected |= otel_inject(B3SingleFormat(), trace_id, span_id, sampled)
    assert lines == expected


def test_trace_headers_pad_small_ids() -> None:
    assert trace_headers(1, 2, True, b"", B3_SINGLE) == (
        b"traceparent: 00-00000000000000000000000000000001-0000000000000002-01\r\n"
        b"b3: 00000000000000000000000000000001-0000000000000002-1\r\n")


def test_format_trace_id() -> None:
    for trace_id in (1, int(TID, 16), (1 << 128) - 1):
        assert format_trace_id(trace_id) == trace.format_trace_id(trace_id)


# Ids


UUID4 = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def test_request_ids_are_uuid4_and_unique() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for rid in ids:
        assert UUID4.fullmatch(rid), rid
        u = uuid.UUID(rid.decode())
        assert u.version == 4 and u.variant == uuid.RFC_4122
        assert str(u).encode() == rid
    # The random bits are all used: every hex position outside the fixed nibbles varies.
    for pos in (0, 7, 9, 15, 20, 35):
        assert len({rid[pos] for rid in ids[:200]}) > 8


def test_request_id_keeps_random_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context, "_getrandbits", lambda bits: (1 << bits) - 1)
    assert new_request_id() == b"ffffffff-ffff-4fff-bfff-ffffffffffff"
    monkeypatch.setattr(context, "_getrandbits", lambda bits: 0)
    assert new_request_id() == b"00000000-0000-4000-8000-000000000000"


def test_ids_are_never_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter([0, 0, 7, 0, 9])
    monkeypatch.setattr(context, "_getrandbits", lambda bits: next(draws))
    assert new_trace_id() == 7
    assert new_span_id() == 9


def test_ids_fit_their_width() -> None:
    for _ in range(1000):
        assert 0 < new_trace_id() < 1 << 128
        assert 0 < new_span_id() < 1 << 64
    assert len({new_trace_id() for _ in range(1000)}) == 1000


# Sampler


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.5, 1.0])
def test_sampler_agrees_with_opentelemetry(ratio: float) -> None:
    ours, theirs = Sampler(ratio), TraceIdRatioBased(ratio)
    rng = random.Random(ratio)
    ids = [rng.getrandbits(128) or 1 for _ in range(20_000)]
    # The edges of the bound, with high bits that the decision must ignore.
    ids += [theirs.bound + d + (k << 64) for d in (-1, 0, 1) for k in (0, 1, 1 << 63) if theirs.bound + d > 0]
    decisions = [ours.sample(t) for t in ids]
    assert decisions == [theirs.should_sample(None, t, "span").decision.is_sampled() for t in ids]
    assert ours.bound == theirs.bound
    sampled = sum(decisions[:20_000]) / 20_000
    assert abs(sampled - ratio) < 0.02


@pytest.mark.parametrize("ratio", [-0.01, 1.01, float("nan"), float("inf")])
def test_sampler_refuses_ratio_outside_0_1(ratio: float) -> None:
    with pytest.raises(ValueError):
        Sampler(ratio)
