"""Codecs: how a connection's bytes become request streams and back (Envoy's ``Http::Codec``).

The request path is codec-agnostic: the connection manager (:mod:`sidecar.proxy.connection_manager`)
and the router (:mod:`sidecar.proxy.router_filter`) see streams, headers, data, trailers, ends and
resets; a codec turns them into one protocol's bytes. The interfaces are in :mod:`.api`:

- downstream, a *server codec* per client connection: :mod:`.http1` (httptools) and
  :mod:`.http2` (the ``h2`` package, sans-IO);
- upstream, a *client codec* per connection of a pool (:mod:`sidecar.upstream.pool`).

Headers travel as *pieces*: a flat list ``[name, b": ", value, b"\\r\\n", ...]`` (see
:mod:`.headers`), which HTTP/1.1 writes with one join and HTTP/2 reads with two slices.
"""
