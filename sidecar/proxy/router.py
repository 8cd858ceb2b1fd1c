"""Route matching: a RouteConfig compiled once into lookups the data path can afford per request.

Virtual hosts are chosen by the request's authority (the Host header, or the authority of an
absolute-form URI), case-insensitively, in Envoy's order of precedence:

1. an exact domain (``catalog``, ``catalog.default``, ``catalog:8080``);
2. ``name:*`` — that name with any port (``catalog:*`` matches ``catalog:8080``, not ``catalog``);
3. ``*`` — the default virtual host.

Within a virtual host the first route, in order, whose prefix starts the path (query string
included, as Envoy's ``prefix`` match) and whose header matches all hold wins. Header matches
(``sidecar.config.HeaderMatch`` has the semantics) read the request's headers as the codec
stores them (``Stream.headers``: (name, ": ", value, CRLF) pieces per header, see
:mod:`sidecar.codec.headers`): a virtual host none of whose routes match on headers never looks at it, so routing by
authority and path costs what it did before; the others scan the head for the names they match.
Weighted clusters are split by smooth weighted round robin, so a split of 90/10 sends exactly 9 of
every 10 requests to the first cluster, and tests are exact.

A Router is immutable after construction except for the positions of its weighted splits; the xDS
layer builds a new one per RouteConfiguration and swaps it into the listener. Construction raises
``ValueError`` for configs it cannot honour (turned into a NACK by the caller).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from sidecar.codec.headers import UNMATCHABLE_HEADERS
from sidecar.config import HeaderMatch, Route, RouteConfig, VirtualHost
from sidecar.upstream.lb import SmoothWeightedRoundRobin

AUTHORITY_CACHE_SIZE = 1024

# HeaderMatcher kinds
_EXACT = 0
_PREFIX = 1
_PRESENT = 2
_METHOD = 3  # ":method", exact
_OWS = b" \t"


class HeaderMatcher:
    """A compiled :class:`~sidecar.config.HeaderMatch`: ``matches(head, method)``."""

    __slots__ = ("name", "kind", "value", "present", "invert", "ignore_case")

    def __init__(self, match: HeaderMatch) -> None:
        if match.name in UNMATCHABLE_HEADERS:
            raise ValueError(f"header match {match.name!r}: the sidecar consumes that header, a route cannot match it")
        self.name = match.name.encode()
        self.invert = match.invert
        self.ignore_case = match.ignore_case
        self.present = bool(match.present)
        value = match.exact if match.exact is not None else match.prefix or ""
        self.value = value.lower().encode() if match.ignore_case else value.encode()
        if match.name == ":method":
            self.kind = _METHOD
        elif match.present is not None:
            self.kind = _PRESENT
        else:
            self.kind = _EXACT if match.exact is not None else _PREFIX

    def matches(self, head: Sequence[bytes], method: bytes) -> bool:
        kind = self.kind
        if kind == _METHOD:
            return ((method.lower() if self.ignore_case else method) == self.value) != self.invert
        name = self.name
        size = len(name)
        found = matched = False
        for i in range(0, len(head), 4):
            key = head[i]
            if len(key) != size or key.lower() != name:
                continue
            found = True
            if kind == _PRESENT:
                break
            value = head[i + 2].rstrip(_OWS)
            if self.ignore_case:
                value = value.lower()
            if value == self.value if kind == _EXACT else value.startswith(self.value):
                matched = True
                break
        if kind == _PRESENT:
            return (found == self.present) != self.invert
        return found and matched != self.invert  # a missing header never matches, inverted or not


def head_of(headers: Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]) -> list[bytes]:
    """A ``Stream.headers``-shaped piece list of ``headers``, for :meth:`Router.resolve` outside
    the connection manager (:meth:`Router.lookup`, tests)."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    head: list[bytes] = []
    for name, value in pairs:
        head += (name.encode() if isinstance(name, str) else name, b": ",
                 value.encode() if isinstance(value, str) else value, b"\r\n")
    return head


class RouteEntry:
    """A compiled route. ``cluster()`` names the target cluster of one request."""

    __slots__ = ("route", "name", "prefix", "headers", "timeout", "retry", "per_try_timeout", "timed", "fault",
                 "_cluster", "_split")

    def __init__(self, route: Route, faults: bool = True, vhost_name: str = "") -> None:
        self.route = route
        # The ``route`` of request metrics and access logs: its virtual host's name (one per
        # service, ``<svc>.<ns>``, in what the control plane sends; ``inbound`` on the inbound side).
        self.name = vhost_name
        self.prefix = route.prefix.encode()
        # None: the route matches on the path alone.
        self.headers = tuple(HeaderMatcher(m) for m in route.headers) or None
        self.timeout = route.timeout if route.timeout > 0 else 0.0
        # Read per request: None when the route has no retry policy / no fault to inject.
        self.retry = route.retry_policy if route.retry_policy is not None and route.retry_policy.num_retries > 0 else None
        self.per_try_timeout = self.retry.per_try_timeout if self.retry is not None else 0.0
        self.timed = bool(self.timeout or self.per_try_timeout)  # a timeout starts with the request's end
        fault = route.fault if faults else None  # without the HCM's fault filter a route's fault is inert
        self.fault = fault if fault is not None and (fault.delay_percent > 0 or fault.abort_percent > 0) else None
        self._split: SmoothWeightedRoundRobin[str] | None = None
        if route.weighted_clusters:
            choices = [(wc.name, wc.weight) for wc in route.weighted_clusters]
            if any(not name for name, _ in choices) or any(w < 0 for _, w in choices):
                raise ValueError(f"route {route.prefix!r}: weighted cluster without name or with negative weight")
            if sum(w for _, w in choices) <= 0:
                raise ValueError(f"route {route.prefix!r}: weighted clusters have a total weight of 0")
            self._split = SmoothWeightedRoundRobin(choices)
            self._cluster = ""
        elif route.cluster:
            self._cluster = route.cluster
        else:
            raise ValueError(f"route {route.prefix!r} names no cluster")

    def cluster(self) -> str:
        split = self._split
        if split is None:
            return self._cluster
        return split.pick() or ""

    def cluster_names(self) -> list[str]:
        if self._split is None:
            return [self._cluster]
        return [wc.name for wc in self.route.weighted_clusters]


class _CompiledVirtualHost:
    __slots__ = ("vhost", "routes", "by_headers")

    def __init__(self, vhost: VirtualHost, faults: bool) -> None:
        self.vhost = vhost
        self.routes = tuple(RouteEntry(r, faults, vhost.name) for r in vhost.routes)
        self.by_headers = any(entry.headers is not None for entry in self.routes)

    def match(self, path: bytes) -> RouteEntry | None:
        """The first route whose prefix matches: for virtual hosts without header matches."""
        for entry in self.routes:
            if path.startswith(entry.prefix):
                return entry
        return None

    def match_request(self, path: bytes, head: Sequence[bytes], method: bytes) -> RouteEntry | None:
        """The first route whose prefix and header matches all match."""
        for entry in self.routes:
            if path.startswith(entry.prefix):
                matchers = entry.headers
                if matchers is None:
                    return entry
                for m in matchers:
                    if not m.matches(head, method):
                        break
                else:
                    return entry
        return None


class Router:
    """Compiled form of one RouteConfig; ``resolve`` is the per-request entry point."""

    __slots__ = ("config", "_exact", "_any_port", "_default", "_cache")

    def __init__(self, config: RouteConfig, faults: bool = True) -> None:
        """``faults``: whether the listener runs the fault filter (routes' fault configs apply)."""
        self.config = config
        self._exact: dict[bytes, _CompiledVirtualHost] = {}
        self._any_port: dict[bytes, _CompiledVirtualHost] = {}
        self._default: _CompiledVirtualHost | None = None
        self._cache: dict[bytes, _CompiledVirtualHost | None] = {}
        for vhost in config.virtual_hosts:
            compiled = _CompiledVirtualHost(vhost, faults)
            for domain in vhost.domains:
                self._add_domain(domain, compiled)

    def _add_domain(self, domain: str, compiled: _CompiledVirtualHost) -> None:
        key = domain.strip().lower().encode()
        if key == b"*":
            if self._default is not None:
                raise ValueError("domain '*' appears in more than one virtual host")
            self._default = compiled
            return
        if not key or b"*" in key[:-1] or (key.endswith(b"*") and not key.endswith(b":*")):
            raise ValueError(f"unsupported domain {domain!r} (exact, 'host:*' and '*' are honoured)")
        table = self._any_port if key.endswith(b":*") else self._exact
        name = key[:-2] if key.endswith(b":*") else key
        if name in table:
            raise ValueError(f"domain {domain!r} appears more than once")
        table[name] = compiled

    def cluster_names(self) -> set[str]:
        """Every cluster any route can send to (for ``validate_clusters``-style checks)."""
        names: set[str] = set()
        vhosts = {id(v): v for v in (*self._exact.values(), *self._any_port.values())}
        if self._default is not None:
            vhosts[id(self._default)] = self._default
        for vhost in vhosts.values():
            for entry in vhost.routes:
                names.update(entry.cluster_names())
        return names

    def virtual_host(self, authority: bytes) -> _CompiledVirtualHost | None:
        cache = self._cache
        try:
            return cache[authority]
        except KeyError:
            pass
        host = authority.lower()
        found = self._exact.get(host)
        if found is None and self._any_port:
            name, port = _split_port(host)
            if port:
                found = self._any_port.get(name)
        if found is None:
            found = self._default
        if len(cache) >= AUTHORITY_CACHE_SIZE:
            cache.clear()
        cache[authority] = found
        return found

    def resolve(self, authority: bytes, path: bytes, head: Sequence[bytes] = (), method: bytes = b"") -> RouteEntry | None:
        """The compiled route for a request, or None (404 NR).

        ``head``: the request's headers as ``Stream.headers`` holds them (see :func:`head_of`),
        ``method`` its method; only read by a virtual host with header matches.
        """
        vhost = self.virtual_host(authority)
        if vhost is None:
            return None
        if vhost.by_headers:
            return vhost.match_request(path, head, method)
        return vhost.match(path)

    def lookup(self, authority: str | bytes, path: str | bytes,
               headers: Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]] = (),
               method: str | bytes = b"GET") -> Route | None:
        """The matching Route config, or None: a convenience over :meth:`resolve`."""
        if isinstance(authority, str):
            authority = authority.encode()
        if isinstance(path, str):
            path = path.encode()
        if isinstance(method, str):
            method = method.encode()
        entry = self.resolve(authority, path, head_of(headers), method)
        return entry.route if entry is not None else None


def _split_port(host: bytes) -> tuple[bytes, bytes]:
    """``name:port`` -> (name, port); IPv6 literals keep their brackets."""
    colon = host.rfind(b":")
    if colon < 0 or host.endswith(b"]"):
        return host, b""
    return host[:colon], host[colon + 1 :]
