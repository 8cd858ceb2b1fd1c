"""Distributed tracing in the sidecar: trace context on the request path, sampled spans to a collector.

``context`` is the hot-path half: it reads the caller's W3C ``traceparent``/``tracestate`` or B3
headers from raw header bytes, makes the sampling decision for new traces and writes the headers
sent upstream, with no OpenTelemetry objects per request. ``export`` is the other half: it turns a
finished, sampled span into an OpenTelemetry span and exports it over OTLP/gRPC off the event loop.
"""
