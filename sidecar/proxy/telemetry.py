"""What the connection manager records of each request: ids, trace context, spans, access log, metrics.

Called at four points of an exchange's life, each cheap when there is nothing to export:

- :func:`begin`, first thing when a request is dispatched: the ``x-request-id`` (kept when the
  caller sent one, else a new UUID4, as Envoy's ``generate_request_id``) and, when tracing is on,
  the trace context: the caller's (W3C ``traceparent``/``tracestate`` or B3, single or multi
  header) or a new trace whose sampling decision is taken here (parent-based: a caller's decision
  is followed; a new trace is sampled with the listener's ratio).
- :func:`inject`, when the upstream head is built: ``x-request-id`` and the trace headers naming
  this hop's span as the parent (W3C always; B3 too when the caller spoke B3).
- :func:`attempt_failed`, when a try fails and is retried: a sampled request gets a span for the
  failed attempt, and the next attempt a new span id (OpenTelemetry's HTTP conventions: every
  resend is a CLIENT span of its own, with ``http.request.resend_count``).
- :func:`end`, once per exchange however it ended: the request duration histogram, the counts by
  route, cluster and status class, the span (sampled requests only) and the access log line.

An unsampled request never builds a span or an attribute: it costs a random trace and span id, a
comparison for the sampling decision and the formatting of its trace headers. With tracing off
(no ``--otlp-endpoint``) trace headers are forwarded as any other header and no ids are made.

The inbound listener's span is a SERVER span, the outbound listener's a CLIENT span; both carry
OpenTelemetry's HTTP semantic conventions plus the mesh's own attributes (``meshkeeper.*``: service,
namespace, upstream cluster and host, response flags, request id). A 5xx (or no response, or one cut short) sets
the span's status to error; a CLIENT span is also in error for a 4xx, as the conventions say.
"""

from __future__ import annotations

from json.encoder import encode_basestring
from time import gmtime, monotonic, strftime, time_ns
from typing import TYPE_CHECKING

from sidecar.proxy.grpc import NAMES, method_of
from sidecar.tracing.context import (
    extract,
    format_trace_id,
    new_request_id,
    new_span_id,
    new_trace_id,
    sampling_hint,
    trace_headers,
)
from sidecar.tracing.export import CLIENT

if TYPE_CHECKING:
    from sidecar.proxy.context import ListenerContext
    from sidecar.proxy.stream import Stream

# The access log line (see sidecar.accesslog); %-formatting is the fastest way to fill it.
_LOG_LINE = (
    '{"start_time":"%s","method":%s,"authority":%s,"path":%s,"protocol":"%s","response_code":%d,'
    '"response_flags":"%s","bytes_received":%d,"bytes_sent":%d,"duration":%d,"upstream_host":%s,'
    '"upstream_cluster":%s,"route_name":%s,"request_id":%s,"trace_id":"%s","listener":"%s"}\n')
_VERSIONS = {10: "1.0", 11: "1.1", 20: "2"}
_PROTOCOLS = {10: "HTTP/1.0", 11: "HTTP/1.1", 20: "HTTP/2"}


def begin(rt: ListenerContext, ex: Stream) -> None:
    """The request id and trace context of a request about to be dispatched."""
    if ex.request_id is None:
        ex.request_id = new_request_id()
    tracer = rt.tracer
    if tracer is None:
        return
    trace_in = ex.trace_in
    ctx = extract(trace_in) if trace_in is not None else None
    if ctx is None:
        ex.trace_id = trace_id = new_trace_id()
        hint = sampling_hint(trace_in) if trace_in is not None else None  # "b3: 0" and the like
        ex.sampled = rt.sampler.sample(trace_id) if hint is None else hint
    else:
        ex.trace_id = ctx.trace_id
        ex.parent_id = ctx.parent_id
        ex.tracestate = ctx.tracestate
        ex.b3 = ctx.b3
        ex.sampled = ctx.sampled if ctx.sampled is not None else rt.sampler.sample(ctx.trace_id)
    ex.span_id = new_span_id()


def inject(ex: Stream, head: list[bytes]) -> None:
    """Append the trace headers naming this hop's span to the upstream headers (as pieces)."""
    if ex.trace_id:
        ex.trace_at = len(head)
        head += _pieces(trace_headers(ex.trace_id, ex.span_id, ex.sampled, ex.tracestate, ex.b3))


def _pieces(lines: bytes) -> list[bytes]:
    """``name: value\r\n`` lines as header pieces."""
    out: list[bytes] = []
    for line in lines.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b": ")
        out += (name, b": ", value, b"\r\n")
    return out


def attempt_failed(rt: ListenerContext, ex: Stream, flag: str) -> None:
    """A try failed and will be retried: export its span (if sampled) and give the next one its own."""
    if not ex.trace_id:
        return
    now_ns = time_ns()
    if ex.sampled and rt.tracer is not None:
        _record(rt, ex, ex.span_start or ex.wall0, now_ns, ex.try_status, flag, ex.retries)
    ex.span_id = new_span_id()
    ex.span_start = now_ns
    if ex.trace_at >= 0:  # the same headers (same style, same tracestate), a new span id
        pieces = _pieces(trace_headers(ex.trace_id, ex.span_id, ex.sampled, ex.tracestate, ex.b3))
        ex.upstream_headers[ex.trace_at:ex.trace_at + len(pieces)] = pieces


def end(rt: ListenerContext, ex: Stream, peer: tuple | None = None) -> None:
    """The exchange is over (answered, failed or abandoned): account for it once."""
    elapsed = monotonic() - ex.t0
    rt.rq_time.observe(elapsed)
    status = ex.status
    entry = ex.entry
    cluster = ex.cluster
    if status:
        key = (entry.name if entry is not None else "", cluster.name if cluster is not None else "")
        counts = rt.route_stats.get(key)
        if counts is None:
            counts = rt.route_stats[key] = [0, 0, 0, 0, 0]
        cls = status // 100
        counts[(cls if cls < 6 else 5) - 1] += 1
    elif not ex.flags:
        ex.flags = "DC"  # the downstream connection went away before a response (Envoy's DC)
    if ex.grpc_status >= 0:
        gkey = (entry.name if entry is not None else "", cluster.name if cluster is not None else "", ex.grpc_status)
        rt.grpc_stats[gkey] = rt.grpc_stats.get(gkey, 0) + 1
    if ex.sampled and rt.tracer is not None:
        end_ns = ex.wall0 + int(elapsed * 1e9)
        _record(rt, ex, ex.span_start or ex.wall0, end_ns, status, ex.flags, ex.retries, peer)
    access_log = rt.access_log
    if access_log is not None:
        access_log.write(_log_line(rt, ex, elapsed))


# --------------------------------------------------------------------------- spans


def _record(rt: ListenerContext, ex: Stream, start_ns: int, end_ns: int, status: int, flags: str,
            resends: int, peer: tuple | None = None) -> None:
    method = ex.method.decode("latin-1") if ex.method else "_OTHER"
    path = _path(ex).decode("latin-1")
    authority = (ex.authority or b"").decode("latin-1")
    host, _, port = authority.rpartition(":") if authority.rfind(":") > authority.rfind("]") else (authority, "", "")
    attrs: dict[str, str | int | float | bool] = {
        "http.request.method": method,
        "network.protocol.version": _VERSIONS[ex.version],
        "server.address": host or authority,
        "meshkeeper.service": rt.service,
        "meshkeeper.namespace": rt.namespace,
        "meshkeeper.request_id": ex.request_id.decode("latin-1") if ex.request_id else "",
    }
    if port.isdigit():
        attrs["server.port"] = int(port)
    kind = rt.span_kind
    if kind == CLIENT:
        attrs["url.full"] = f"http://{authority}{path}"
        if resends:
            attrs["http.request.resend_count"] = resends
    else:
        p, _, q = path.partition("?")
        attrs["url.path"] = p
        if q:
            attrs["url.query"] = q
        attrs["url.scheme"] = "http"
        if peer:
            attrs["client.address"] = peer[0]
            attrs["client.port"] = peer[1]
    if status:
        attrs["http.response.status_code"] = status
    if ex.grpc:  # OpenTelemetry's RPC conventions
        service, rpc_method = method_of(ex.path)
        attrs["rpc.system"] = "grpc"
        attrs["rpc.service"] = service
        attrs["rpc.method"] = rpc_method
        if ex.grpc_status >= 0:
            attrs["rpc.grpc.status_code"] = ex.grpc_status
    if ex.cluster is not None:
        attrs["meshkeeper.upstream_cluster"] = ex.cluster.name
    if ex.upstream_host:
        attrs["meshkeeper.upstream_host"] = ex.upstream_host
        if kind == CLIENT:
            addr, _, p = ex.upstream_host.rpartition(":")
            attrs["network.peer.address"] = addr
            if p.isdigit():
                attrs["network.peer.port"] = int(p)
    if flags:
        attrs["meshkeeper.response_flags"] = flags
    # Cut short after it started (UC, UT after the head; DC: the client left) is an error too.
    outcome = ex.outcome if status else 0
    error = not outcome or outcome >= 500 or (kind == CLIENT and outcome >= 400) or ex.failed or flags == "DC"
    if error:
        attrs["error.type"] = flags or (NAMES[ex.grpc_status] if 0 <= ex.grpc_status < len(NAMES) else str(status))
    rt.tracer.record(method, kind, ex.trace_id, ex.span_id, ex.parent_id, start_ns, end_ns, attrs, error,
                     ex.tracestate)


def _path(ex: Stream) -> bytes:
    """The origin-form path sent upstream (an absolute-form URI's path), else the request target."""
    if ex.entry is not None and ex.upstream_path:
        return ex.upstream_path
    return ex.path


# --------------------------------------------------------------------------- access log


def _log_line(rt: ListenerContext, ex: Stream, elapsed: float) -> bytes:
    wall = ex.wall0
    secs = wall // 1_000_000_000
    start = f"{_iso_seconds(secs)}.{wall // 1_000_000 % 1000:03d}Z"
    return (_LOG_LINE % (
        start,
        _json(ex.method),
        _json(ex.authority or b""),
        _json(_path(ex)),
        _PROTOCOLS[ex.version],
        ex.status,
        ex.flags or "-",
        ex.bytes_in,
        ex.bytes_out,
        int(elapsed * 1000),
        _json(ex.upstream_host) if ex.upstream_host else "null",
        _json(ex.cluster.name) if ex.cluster is not None else "null",
        _json(ex.entry.name) if ex.entry is not None else "null",
        encode_basestring(ex.request_id.decode("latin-1")) if ex.request_id else "null",  # unique: not cached
        format_trace_id(ex.trace_id) if ex.trace_id else "-",
        rt.name,
    )).encode()


_JSON_CACHE_SIZE = 4096
_json_cache: dict[bytes | str, str] = {}


def _json(value: bytes | str) -> str:
    """``value`` as a JSON string literal (bytes read as latin-1). Methods, authorities, cluster,
    route and host names and most paths repeat: their literals are kept, up to a bound (then the
    cache starts over)."""
    try:
        return _json_cache[value]
    except KeyError:
        pass
    text = encode_basestring(value.decode("latin-1") if isinstance(value, bytes) else value)
    if len(_json_cache) >= _JSON_CACHE_SIZE:
        _json_cache.clear()
    if len(value) <= 256:
        _json_cache[value] = text
    return text


_iso_cache: list = [None, ""]


def _iso_seconds(secs: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` (UTC) of an epoch second, formatted once per second."""
    if _iso_cache[0] != secs:
        _iso_cache[0] = secs
        _iso_cache[1] = strftime("%Y-%m-%dT%H:%M:%S", gmtime(secs))
    return _iso_cache[1]
