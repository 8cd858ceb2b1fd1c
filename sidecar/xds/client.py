"""The sidecar's ADS client (State of the World).

One gRPC stream to the control plane carries every type. The client subscribes to all
listeners and clusters (wildcard), then to the route configurations the listeners name and the
load assignments of the EDS clusters, and from the first request on to the RTDS Runtime named
after its own service (runtime config for the app, served at ``/runtime``; it never holds back
readiness). Each response is converted and validated as a whole: if
any resource cannot be honoured, the response is NACKed with an error_detail naming it and the
previous config stays in force; otherwise the whole set is applied in one swap and ACKed.

When the stream breaks the sidecar keeps routing with its last config and reconnects with
jittered exponential backoff, presenting the versions it holds.

:func:`open_channel` makes the channel of every stream to the control plane (ADS here, LRS in
:mod:`sidecar.xds.lrs`): insecure, or TLS with the credentials of :func:`channel_credentials`
(``--xds-ca``, and ``--xds-cert``/``--xds-key`` for mutual TLS).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.runtime.v3 import rtds_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from meshkeeper import __version__, xds
from meshkeeper.xds import NodeInfo
from sidecar.config import ClusterConfig, EndpointConfig, ListenerConfig, RouteConfig
from sidecar.xds import convert, listeners

log = logging.getLogger("meshkeeper.sidecar.xds")

BACKOFF_BASE = 0.5
BACKOFF_MAX = 15.0
STABLE_STREAM = 30.0  # a stream that lived this long resets the back-off: the control plane just restarted
_INVALID_ARGUMENT = 3
# The ADS stream is idle most of the time: keepalive pings are what tell a half-open stream
# (control plane host gone, network partition) from a quiet one, so the client reconnects.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

_CONVERTERS = {
    xds.LISTENER: listeners.listener,
    xds.ROUTE: convert.route_configuration,
    xds.CLUSTER: convert.cluster,
    xds.ENDPOINT: convert.endpoints,
    xds.RUNTIME: convert.runtime,
}
_MESSAGES = {
    xds.LISTENER: listener_pb2.Listener,
    xds.ROUTE: route_pb2.RouteConfiguration,
    xds.CLUSTER: cluster_pb2.Cluster,
    xds.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    xds.RUNTIME: rtds_pb2.Runtime,
}
# Types whose responses may carry only some of the subscribed names (merged into what is held).
# An RTDS response is the full state of its names: the service's resource missing means empty.
_MERGED_TYPES = (xds.ROUTE, xds.ENDPOINT)


class ConfigSink(Protocol):
    """Where accepted config goes. Each call carries the complete, validated set of its type."""

    def apply_clusters(self, clusters: dict[str, ClusterConfig]) -> None: ...

    def apply_endpoints(self, assignments: dict[str, tuple[EndpointConfig, ...]]) -> None: ...

    def apply_listeners(self, listeners: dict[str, ListenerConfig]) -> None: ...

    def apply_routes(self, routes: dict[str, RouteConfig]) -> None: ...

    def apply_runtime(self, values: Mapping[str, str], version: str) -> None:
        """The service's runtime values (empty when the response lacks its resource), as of the
        RTDS version being accepted; called only for a response that will be ACKed."""


@dataclass
class TypeState:
    """What the client holds of one resource type."""

    version: str = ""  # last accepted
    nonce: str = ""  # of the last response seen
    names: tuple[str, ...] = ()  # subscribed (empty = wildcard for LDS/CDS; RTDS: the own service)
    received: bool = False  # a response was accepted at least once
    accepted: int = 0
    rejected: int = 0
    last_error: str = ""
    resources: dict[str, Any] = field(default_factory=dict)  # name -> converted config
    raw: dict[str, Any] = field(default_factory=dict)  # name -> proto, for /config_dump
    updated_at: float = 0.0


def backoff(attempt: int, base: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait before reconnect ``attempt``: exponential from ``base``, capped at ``maximum``,
    jittered uniformly into its upper half so that sidecars do not reconnect in step."""
    delay = min(maximum, base * 2 ** min(attempt, 10))
    return delay * (0.5 + rng.random() / 2)


def channel_credentials(ca: bytes, cert: bytes | None = None, key: bytes | None = None) -> grpc.ChannelCredentials:
    """TLS trusting the PEM CA ``ca``; with ``cert`` and ``key`` (PEM) the client presents a
    certificate too (mutual TLS). The server's certificate must name the host of the target."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both the certificate and its key")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def open_channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """The channel of one stream to the control plane: TLS with ``credentials``, else insecure."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)


STOP_GRACE = 2.0  # seconds a cancelled stream task gets to close its channel


async def stop_task(task: asyncio.Task, what: str) -> None:
    """Cancel a stream's task and wait for it, but not forever: a gRPC channel that is closing
    while its TLS handshake fails has been seen to never finish, and shutdown must go on."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=STOP_GRACE)
    if not done:
        log.warning("%s stream did not stop within %.0f s; leaving it behind", what, STOP_GRACE)
    elif not task.cancelled() and task.exception() is not None:
        log.debug("%s stream ended with %r", what, task.exception())


def build_node(info: NodeInfo) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update(info.metadata())
    return base_pb2.Node(id=info.node_id, cluster=info.service, metadata=meta,
                         user_agent_name="meshkeeper", user_agent_version=__version__)


class AdsClient:
    def __init__(self, target: str, node: NodeInfo, sink: ConfigSink, *,
                 on_change: Callable[[], None] | None = None, rng: random.Random | None = None,
                 backoff_base: float = BACKOFF_BASE, backoff_max: float = BACKOFF_MAX,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.target = target
        self.credentials = credentials  # None: insecure channel
        self.service = node.service
        self.node = build_node(node)
        self.sink = sink
        self.on_change = on_change or (lambda: None)
        self.rng = rng or random.Random()
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.state = {t: TypeState() for t in _MESSAGES}
        self.state[xds.RUNTIME].names = (node.service,)  # fixed: the own service's runtime layer
        self.connected = False
        self._initialized = False
        self.connects = 0
        self._queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] | None = None
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ads-client")

    async def stop(self) -> None:
        if self._task:
            await stop_task(self._task, "xds")

    @property
    def initialized(self) -> bool:
        """True from the first time the config was complete (Envoy's initial fetch): it never
        goes back, so that a later update that waits for EDS does not make the sidecar unready."""
        if not self._initialized and self.synced:
            self._initialized = True
        return self._initialized

    @property
    def synced(self) -> bool:
        """True while LDS and CDS are accepted and every subscribed RDS/EDS name has arrived."""
        lds, cds, rds, eds = (self.state[t] for t in (xds.LISTENER, xds.CLUSTER, xds.ROUTE, xds.ENDPOINT))
        if not (lds.received and cds.received):
            return False
        return all(n in rds.resources for n in rds.names) and all(n in eds.resources for n in eds.names)

    async def _run(self) -> None:
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                await self._stream_once()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning("xds stream to %s ended: %s %s", self.target, exc.code().name, exc.details())
            except Exception:  # a bug must not stop reconnection; the last config keeps routing
                log.exception("xds stream to %s failed", self.target)
            self.connected = False
            self.on_change()
            attempt = 0 if time.monotonic() - started > STABLE_STREAM else attempt + 1
            await asyncio.sleep(backoff(attempt, self.backoff_base, self.backoff_max, self.rng))

    async def _stream_once(self) -> None:
        queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self._queue = queue
        for st in self.state.values():
            st.nonce = ""  # nonces belong to a stream; the server numbers each stream anew

        async def requests():
            while True:
                req = await queue.get()
                if req is None:
                    return
                yield req

        async with open_channel(self.target, self.credentials) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources(requests())
            # Initial subscriptions: wildcard LDS and CDS, the own service's RTDS layer, plus what
            # we already hold (after a reconnect).
            first = True
            for type_url in (xds.CLUSTER, xds.ENDPOINT, xds.LISTENER, xds.ROUTE, xds.RUNTIME):
                st = self.state[type_url]
                if type_url in xds.WILDCARD_TYPES or st.names:
                    queue.put_nowait(self._request(type_url, nonce="", node=first))
                    first = False
            async for resp in call:
                if not self.connected:
                    self.connected = True
                    self.connects += 1
                    log.info("xds stream to %s established", self.target)
                self._on_response(resp)

    # ------------------------------------------------------------------ protocol

    def _request(self, type_url: str, nonce: str, error: str = "", node: bool = False) -> discovery_pb2.DiscoveryRequest:
        st = self.state[type_url]
        req = discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=st.version,
                                             response_nonce=nonce, resource_names=list(st.names))
        if node:
            req.node.CopyFrom(self.node)
        if error:
            req.error_detail.CopyFrom(status_pb2.Status(code=_INVALID_ARGUMENT, message=error))
        return req

    def _send(self, req: discovery_pb2.DiscoveryRequest) -> None:
        if self._queue is not None:
            self._queue.put_nowait(req)

    def _on_response(self, resp: discovery_pb2.DiscoveryResponse) -> None:
        """Apply what can be honoured, NACK what cannot (Envoy's and gRFC A46's semantics).

        A resource that fails to convert keeps its last accepted value (or stays absent if it is
        new) while the valid resources of the same response are applied; the response is then
        NACKed naming every refused resource, and the accepted version does not move. So one
        service with an unsupported setting never freezes the rest of the mesh. If applying the
        set fails as a whole (a runtime object refuses it), nothing changes and it is NACKed.
        """
        type_url = resp.type_url
        st = self.state.get(type_url)
        if st is None:
            log.warning("ignoring xds response of unsupported type %s", type_url)
            return
        st.nonce = resp.nonce
        short = xds.SHORT_TYPE[type_url]
        named = type_url in _MERGED_TYPES  # a response may carry only some names: merge
        converted, raw, errors = self._convert(type_url, resp, st)
        if type_url == xds.RUNTIME and errors:
            # One resource matters (the own service's), so a refused response changes nothing:
            # the values stay those of the accepted version, which /runtime reports with them.
            converted = None
        try:
            if converted is not None:
                self._apply(type_url, converted, resp.version_info)
        except Exception as exc:  # a runtime object refused the set (e.g. a Router); nothing changed
            if not isinstance(exc, ValueError):
                log.exception("applying %s version %s failed", short, resp.version_info)
            errors, converted = [str(exc)], None
        if converted is not None:
            if named:
                st.resources.update(converted)
                st.raw.update(raw)
            else:
                st.resources, st.raw = converted, raw
            st.received = True
            st.updated_at = time.time()
        if errors:
            detail = "; ".join(errors)
            st.rejected += 1
            st.last_error = detail
            log.warning("NACK %s version %s: %s", short, resp.version_info, detail)
            self._send(self._request(type_url, resp.nonce, error=detail))
        else:
            st.version = resp.version_info
            st.accepted += 1
            st.last_error = ""
            log.info("ACK %s version %s (%d resources)", short, resp.version_info, len(resp.resources))
            self._send(self._request(type_url, resp.nonce))
        if converted is not None:
            self._resubscribe(type_url)
        self.on_change()

    def _convert(self, type_url: str, resp: discovery_pb2.DiscoveryResponse,
                 st: TypeState) -> tuple[dict | None, dict, list[str]]:
        """(converted, protos, errors); a refused resource keeps its last accepted value.

        ``converted`` is None when an error cannot be pinned on a named resource (wrong type,
        undecodable, nameless): then the whole response is refused, since applying the rest of a
        State-of-the-World set would delete whatever that resource was.
        """
        cls = _MESSAGES[type_url]
        short = xds.SHORT_TYPE[type_url]
        converted: dict[str, Any] = {}
        raw: dict[str, Any] = {}
        errors: list[str] = []
        whole = False
        for any_msg in resp.resources:
            if any_msg.type_url != type_url:
                errors.append(f"resource of type {any_msg.type_url} in a {short} response")
                whole = True
                continue
            msg = cls()
            try:
                if not any_msg.Unpack(msg):
                    raise convert.XdsError("cannot decode it")
            except Exception as exc:  # DecodeError is not a ValueError
                errors.append(f"a {short} resource does not decode: {exc}")
                whole = True
                continue
            name = msg.cluster_name if type_url == xds.ENDPOINT else msg.name
            if not name:
                errors.append(f"a {short} resource has no name")
                whole = True
                continue
            if type_url == xds.RUNTIME and name not in st.names:
                log.debug("ignoring %s resource %r: not subscribed", short, name)
                continue
            if name in converted:
                errors.append(f"{short} resource {name!r} appears twice")
                whole = True
                continue
            try:
                converted[name] = _CONVERTERS[type_url](msg)
                raw[name] = msg
            except Exception as exc:
                if not isinstance(exc, ValueError):
                    log.exception("converting %s %r failed", short, name)
                errors.append(str(exc))
                if name in st.resources:  # keep serving the last accepted value
                    converted[name], raw[name] = st.resources[name], st.raw[name]
        return (None if whole else converted), raw, errors

    def _apply(self, type_url: str, converted: dict[str, Any], version: str) -> None:
        if type_url == xds.RUNTIME:
            layer = converted.get(self.service)
            self.sink.apply_runtime(layer.values if layer is not None else {}, version)
        elif type_url == xds.CLUSTER:
            self.sink.apply_clusters(converted)
        elif type_url == xds.ENDPOINT:
            self.sink.apply_endpoints(converted)
        elif type_url == xds.LISTENER:
            self.sink.apply_listeners(converted)
        else:
            self.sink.apply_routes(converted)

    def _resubscribe(self, type_url: str) -> None:
        """After CDS/LDS, subscribe to the EDS/RDS names they reference (SotW: the full list)."""
        if type_url == xds.CLUSTER:
            names = tuple(sorted(n for n, c in self.state[xds.CLUSTER].resources.items() if c.discovery == "EDS"))
            dep = xds.ENDPOINT
        elif type_url == xds.LISTENER:
            names = tuple(sorted({c.rds_name for c in self.state[xds.LISTENER].resources.values() if c.rds_name}))
            dep = xds.ROUTE
        else:
            return
        st = self.state[dep]
        if names != st.names:
            st.names = names
            # Forget what is no longer subscribed so that `synced` and the dump stay exact.
            st.resources = {n: v for n, v in st.resources.items() if n in names}
            st.raw = {n: v for n, v in st.raw.items() if n in names}
            self._send(self._request(dep, st.nonce))
