"""Jaeger's query API (``/api/...`` of jaeger-query) over the :class:`TraceStore`, on the HTTP port.

Mounted into :class:`controlplane.web.Web` as a handler of whole path trees; it answers
``/api/services``, ``/api/services/<svc>/operations``, ``/api/operations``, ``/api/traces``,
``/api/traces/<id>`` and ``/api/dependencies`` and returns None for any other path. Shapes and
parameters are Jaeger's (docs/contracts.md, "Trace store: Jaeger query API"). Errors use Jaeger's
envelope ``{"data": null, "errors": [{"code": 400, "msg": "..."}]}``; a bad parameter is a 400
naming it, as Jaeger words it (``unable to parse param 'minDuration': ...``).

Reads follow the admin API's rules (controlplane.auth): open unless the control plane has
``--admin-tokens``, then ``Authorization: Bearer <token>`` of a viewer or more (401 without a
token or with an unknown one, 403 for a role too low: only possible for writes, none here).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

from controlplane.auth import Authorizer, Denied, Role
from controlplane.tracestore.jaeger_json import envelope, error_envelope, parse_trace_id, trace_json
from controlplane.tracestore.store import SPAN_KINDS, TraceQuery, TraceStore

JSON = "application/json"
DEFAULT_LIMIT = 100  # Jaeger's defaultQueryLimit
MAX_LIMIT = 10_000
DEFAULT_DEPENDENCY_LOOKBACK_MS = 24 * 3600 * 1000  # Jaeger's defaultDependencyLookbackDuration
_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
          "m": 60_000_000_000, "h": 3_600_000_000_000, "d": 86_400_000_000_000}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d)")

Reply = tuple[int, str, bytes] | tuple[int, str, bytes, dict[str, str]]


class BadParam(ValueError):
    pass


def parse_duration(text: str, name: str) -> int:
    """Go's ``time.ParseDuration`` (``1.2s``, ``100ms``, ``500us``, ``1h30m``), plus ``d``; ns."""
    s = text.strip()
    if s == "0":
        return 0
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION.match(s, pos)
        if m is None:
            raise BadParam(f"unable to parse param '{name}': time: invalid duration {text!r} "
                           "(a number and a unit: ns, us, ms, s, m, h; e.g. 1.2s, 100ms, 500us)")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s:
        raise BadParam(f"unable to parse param '{name}': empty duration")
    return int(total)


def _int(query: dict[str, str], name: str) -> int | None:
    text = query.get(name, "")
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise BadParam(f"unable to parse param '{name}': {text!r} is not an integer") from None


def parse_tags(query: dict[str, str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    if simple := query.get("tag", ""):
        key, sep, value = simple.partition(":")
        if not sep:
            raise BadParam(f"malformed 'tag' parameter, expecting key:value, received: {simple}")
        tags[key] = value
    if raw := query.get("tags", ""):
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise BadParam(f"malformed 'tags' parameter, cannot unmarshal JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise BadParam("malformed 'tags' parameter: expecting a JSON object of key to value")
        for k, v in obj.items():
            if isinstance(v, dict | list) or v is None:
                raise BadParam(f"malformed 'tags' parameter: the value of {k!r} must be a string, number or bool")
            tags[k] = json.dumps(v) if isinstance(v, bool) else str(v)
    return tags


def parse_trace_query(query: dict[str, str], now_ns: int) -> TraceQuery:
    service = query.get("service", "")
    if not service:
        raise BadParam("parameter 'service' is required")
    start, end = _int(query, "start"), _int(query, "end")
    if start is None and (lookback := query.get("lookback", "")) and lookback != "custom":
        start = ((end * 1000 if end is not None else now_ns) - parse_duration(lookback, "lookback")) // 1000
    limit = _int(query, "limit")
    if limit is None or limit == 0:
        limit = DEFAULT_LIMIT
    if not 0 < limit <= MAX_LIMIT:
        raise BadParam(f"unable to parse param 'limit': {limit} is not between 1 and {MAX_LIMIT}")
    min_d = parse_duration(query["minDuration"], "minDuration") if query.get("minDuration") else 0
    max_d = parse_duration(query["maxDuration"], "maxDuration") if query.get("maxDuration") else 0
    if min_d and max_d and max_d < min_d:
        raise BadParam("'maxDuration' should be greater than 'minDuration'")
    return TraceQuery(service=service, operation=query.get("operation", ""), tags=parse_tags(query),
                      min_duration=min_d, max_duration=max_d,
                      start_min=max(0, start or 0) * 1000, start_max=max(0, end or 0) * 1000, limit=limit)


class JaegerQuery:
    """The HTTP side: ``(method, path, query, headers) -> reply`` or None for paths it does not own."""

    def __init__(self, store: TraceStore, auth: Authorizer | None = None, *,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.store = store
        self.auth = auth or Authorizer()
        self.clock = clock

    def __call__(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
                 body: bytes = b"") -> Reply | None:
        parts = path.rstrip("/").split("/")[1:]  # "/api/traces/x" -> ["api", "traces", "x"]
        if len(parts) < 2 or parts[0] != "api" or parts[1] not in _PAGES:
            return None
        if method != "GET":
            return _reply(405, error_envelope(405, "only GET and HEAD"))
        try:
            auth = headers.get("authorization")
            self.auth.check([("authorization", auth)] if auth else None, Role.VIEWER)
        except Denied as exc:
            status = 401 if exc.code.name == "UNAUTHENTICATED" else 403
            extra = {"WWW-Authenticate": 'Bearer realm="meshkeeper"'} if status == 401 else {}
            return _reply(status, error_envelope(status, str(exc)), extra)
        try:
            return getattr(self, _PAGES[parts[1]])(parts[2:], query)
        except BadParam as exc:
            return _reply(400, error_envelope(400, str(exc)))

    def services(self, rest: list[str], query: dict[str, str]) -> Reply:
        if not rest:
            return _reply(200, envelope(self.store.services()))
        if len(rest) == 2 and rest[1] == "operations":
            names = sorted({name for name, _ in self.store.operations(rest[0])})
            return _reply(200, envelope(names))
        return _not_found(f"no page /api/services/{'/'.join(rest)}")

    def operations(self, rest: list[str], query: dict[str, str]) -> Reply:
        if rest:
            return _not_found(f"no page /api/operations/{'/'.join(rest)}")
        service = query.get("service", "")
        if not service:
            raise BadParam("parameter 'service' is required")
        kind = query.get("spanKind", "")
        if kind and kind not in SPAN_KINDS:
            raise BadParam(f"unable to parse param 'spanKind': {kind!r} is not one of "
                           "server, client, producer, consumer, internal")
        ops = [{"name": n, "spanKind": k} for n, k in self.store.operations(service, kind)]
        return _reply(200, envelope(ops))

    def traces(self, rest: list[str], query: dict[str, str]) -> Reply:
        if len(rest) == 1:
            try:
                key = parse_trace_id(rest[0])
            except ValueError as exc:
                raise BadParam(f"cannot parse traceID: {exc}") from None
            trace = self.store.trace(key)
            if trace is None:
                return _not_found("trace not found")
            return _reply(200, envelope([trace_json(trace)]))
        if rest:
            return _not_found(f"no page /api/traces/{'/'.join(rest)}")
        q = parse_trace_query(query, self.clock())
        return _reply(200, envelope([trace_json(t) for t in self.store.search(q)]))

    def dependencies(self, rest: list[str], query: dict[str, str]) -> Reply:
        if rest:
            return _not_found(f"no page /api/dependencies/{'/'.join(rest)}")
        end_ms = _int(query, "endTs")
        lookback_ms = _int(query, "lookback")
        end_ms = end_ms if end_ms is not None else self.clock() // 1_000_000
        lookback_ms = lookback_ms if lookback_ms is not None else DEFAULT_DEPENDENCY_LOOKBACK_MS
        if lookback_ms < 0:
            raise BadParam("unable to parse param 'lookback': must not be negative")
        deps = self.store.dependencies(max(0, end_ms - lookback_ms) * 1_000_000 or 1, end_ms * 1_000_000)
        return _reply(200, envelope([{"parent": d.parent, "child": d.child, "callCount": d.call_count}
                                     for d in deps]))


_PAGES = {"services": "services", "operations": "operations", "traces": "traces", "dependencies": "dependencies"}


def _reply(status: int, obj: Any, extra: dict[str, str] | None = None) -> Reply:
    body = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    return (status, JSON, body, extra) if extra else (status, JSON, body)


def _not_found(msg: str) -> Reply:
    return _reply(404, error_envelope(404, msg))
