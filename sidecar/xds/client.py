"""The sidecar's ADS clients: what both variants share, and the State-of-the-World client.

One gRPC stream to the control plane carries every type. A client subscribes to all listeners
and clusters (wildcard), then to the route configurations the listeners name and the load
assignments of the EDS clusters, and from the first request on to the RTDS Runtime named after
its own service (runtime config for the app, served at ``/runtime``; it never holds back
readiness). Each resource of a response is converted and validated on its own
(:mod:`sidecar.xds.state`): the valid ones are applied in one swap, a refused one keeps its last
accepted value, and the response is NACKed naming every refused resource (else ACKed).

When the stream breaks the sidecar keeps routing with its last config and reconnects with
jittered exponential backoff, presenting what it holds.

:class:`XdsClient` is that shared part (lifecycle, reconnection, readiness, applying to the
:class:`~sidecar.xds.state.ConfigSink`, following CDS/LDS with EDS/RDS subscriptions); a variant
says how it opens its stream, words its requests and reads a response. :class:`AdsClient` speaks
State of the World (``StreamAggregatedResources``); :class:`sidecar.xds.delta.DeltaAdsClient`
speaks Delta (``DeltaAggregatedResources``).

:func:`open_channel` makes the channel of every stream to the control plane (ADS here, LRS in
:mod:`sidecar.xds.lrs`): insecure, or TLS with the credentials of :func:`channel_credentials`
(``--xds-ca``, and ``--xds-cert``/``--xds-key`` for mutual TLS).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from meshkeeper import __version__, xds
from meshkeeper.identity import CSR_METADATA, SECRET_DEFAULT, SECRET_ROOTCA
from meshkeeper.xds import NodeInfo
from sidecar.xds import convert
from sidecar.xds.state import (
    MERGED_TYPES,
    MESSAGES,
    SUBSCRIBE_ORDER,
    ConfigSink,
    TypeState,
    Update,
    referenced_names,
    resource_name,
    unpack,
)

log = logging.getLogger("meshkeeper.sidecar.xds")

BACKOFF_BASE = 0.5
BACKOFF_MAX = 15.0
STABLE_STREAM = 30.0  # a stream that lived this long resets the back-off: the control plane just restarted
INVALID_ARGUMENT = 3  # google.rpc.Code of a NACK's error_detail
# The ADS stream is idle most of the time: keepalive pings are what tell a half-open stream
# (control plane host gone, network partition) from a quiet one, so the client reconnects.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


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


# Sent on an ADS stream while other replicas are left to try: a replica that lost ZooKeeper then
# refuses the stream (UNAVAILABLE) rather than serve what it last knew; on the last untried one
# (or with one --cp) it is not sent, and a stale replica is better than none.
TRY_OTHERS = (("x-meshkeeper-try-others", "1"),)


class Targets:
    """The control plane replicas of ``--cp`` (``HOST:PORT[,HOST:PORT...]``): a stream goes to
    :attr:`current`; when it ends or cannot be opened, the next one is tried (in order, round).
    ``failed`` counts the attempts in a row that got no response."""

    def __init__(self, text: str) -> None:
        self.all = [t.strip() for t in text.split(",") if t.strip()]
        if not self.all:
            raise ValueError("no control plane address")
        self._i = 0
        self.failed = 0

    @property
    def others_left(self) -> bool:
        """Whether a replica not yet tried in this round remains after the current one."""
        return self.failed < len(self.all) - 1

    @property
    def current(self) -> str:
        return self.all[self._i]

    def advance(self) -> None:
        self._i = (self._i + 1) % len(self.all)

    def __str__(self) -> str:
        return self.current


def build_node(info: NodeInfo) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update(info.metadata())
    return base_pb2.Node(id=info.node_id, cluster=info.service, metadata=meta,
                         user_agent_name="meshkeeper", user_agent_version=__version__)


def nack_status(detail: str) -> status_pb2.Status:
    return status_pb2.Status(code=INVALID_ARGUMENT, message=detail)


class XdsClient:
    """An ADS client's shared part; a variant implements the five methods at the end.

    The variant owns its wording only: what the first request of a type says, how an ACK, a NACK
    and a change of EDS/RDS names are sent, and how a response becomes an :class:`Update`, which
    it hands to :meth:`_settle`.
    """

    def __init__(self, target: str, node: NodeInfo, sink: ConfigSink, *,
                 on_change: Callable[[], None] | None = None, rng: random.Random | None = None,
                 backoff_base: float = BACKOFF_BASE, backoff_max: float = BACKOFF_MAX,
                 credentials: grpc.ChannelCredentials | None = None, token: str = "") -> None:
        self.targets = Targets(target)  # one or several control plane replicas
        self.credentials = credentials  # None: insecure channel
        # The bootstrap token (docs/identity.md): sent on every stream; with it the sidecar asks for
        # its certificate and the trust bundle over SDS, its CSR in the node (:meth:`set_csr`).
        self.token = token
        self.service = node.service
        self.node = build_node(node)
        self.sink = sink
        self.on_change = on_change or (lambda: None)
        self.rng = rng or random.Random()
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.state = {t: TypeState() for t in MESSAGES}
        self.state[xds.RUNTIME].names = (node.service,)  # fixed: the own service's runtime layer
        if token:
            self.state[xds.SECRET].names = (SECRET_DEFAULT, SECRET_ROOTCA)
        self.connected = False
        self._initialized = False
        self.connects = 0
        self._queue: asyncio.Queue[Any] | None = None
        self._task: asyncio.Task | None = None

    @property
    def target(self) -> str:
        """The control plane replica the stream goes to (or will, next)."""
        return self.targets.current

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
        sds = self.state[xds.SECRET]
        if sds.names and not sds.received:  # as Envoy warms a cluster until its secrets arrive
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
            self.targets.failed = 0 if self.connected else self.targets.failed + 1
            self.targets.advance()  # the next replica, if there are several
            self.connected = False
            self.on_change()
            attempt = 0 if time.monotonic() - started > STABLE_STREAM else attempt + 1
            await asyncio.sleep(backoff(attempt, self.backoff_base, self.backoff_max, self.rng))

    async def _stream_once(self) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queue = queue
        for st in self.state.values():
            st.nonce = ""  # nonces belong to a stream; the server numbers each stream anew

        async def requests() -> AsyncIterator[Any]:
            while True:
                req = await queue.get()
                if req is None:
                    return
                yield req

        async with open_channel(self.target, self.credentials) as channel:
            call = self._open_stream(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel), requests(),
                                     self._call_metadata())
            # Initial subscriptions: wildcard LDS and CDS, the own service's RTDS layer, plus what
            # we already hold (after a reconnect). The node goes on the stream's first request.
            first = True
            for type_url in SUBSCRIBE_ORDER:
                if type_url in xds.WILDCARD_TYPES or self.state[type_url].names:
                    req = self._first_request(type_url)
                    if first:
                        req.node.CopyFrom(self.node)
                        first = False
                    queue.put_nowait(req)
            try:
                async for resp in call:
                    if not self.connected:
                        self.connected = True
                        self.connects += 1
                        log.info("xds stream to %s established", self.target)
                    self._on_response(resp)
            finally:
                # End the request iterator, which waits on the queue: left waiting, gRPC's task
                # that reads it is destroyed pending when the channel closes (an ERROR each time a
                # control plane goes away).
                queue.put_nowait(None)
                call.cancel()

    def _call_metadata(self) -> tuple | None:
        metadata = TRY_OTHERS if self.targets.others_left else ()
        if self.token:
            metadata += (("authorization", f"Bearer {self.token}"),)
        return metadata or None

    def set_csr(self, csr_pem: bytes) -> None:
        """Ask for a certificate for a new key: the CSR goes in the node, on every stream from now
        on, and at once on this one in a request for the secrets (a rotation, docs/identity.md)."""
        self.node.metadata.update({CSR_METADATA: csr_pem.decode("ascii")})
        if self.connected and self.state[xds.SECRET].names:
            req = self._first_request(xds.SECRET)
            req.node.CopyFrom(self.node)
            self._send(req)

    def _send(self, req: Any) -> None:
        if self._queue is not None:
            self._queue.put_nowait(req)

    # ------------------------------------------------------------------ a response, either variant

    def _settle(self, up: Update, nonce: str, version: str, count: int) -> None:
        """Apply what can be honoured, NACK what cannot (Envoy's and gRFC A46's semantics).

        The valid resources of ``up`` are applied even when others are refused (they keep their
        last accepted value, or stay absent if new); the response is then NACKed naming every
        refused resource, and the accepted version does not move. So one service with an
        unsupported setting never freezes the rest of the mesh. Nothing is applied when ``up`` is
        refused whole, when the own service's RTDS resource is refused (one resource matters, so
        the values stay those of the accepted version, which /runtime reports with them), or when
        the sink refuses the set (a runtime object such as a Router).
        """
        type_url, st, short = up.type_url, up.held, up.short
        st.nonce = nonce
        errors = up.errors
        accepted = not up.whole and not (type_url == xds.RUNTIME and errors)
        if accepted:
            resources, raw, versions = up.held_after()
            try:
                self._apply(type_url, up.converted if type_url in MERGED_TYPES else resources, version)
            except Exception as exc:  # a runtime object refused the set; nothing changed
                if not isinstance(exc, ValueError):
                    log.exception("applying %s version %s failed", short, version)
                errors, accepted = [str(exc)], False
        if accepted:
            st.resources, st.raw, st.versions = resources, raw, versions
            st.received = True
            st.updated_at = time.time()
        removed = f", {len(up.removed)} removed" if accepted and up.removed else ""
        if errors:
            detail = "; ".join(errors)
            st.rejected += 1
            st.last_error = detail
            log.warning("NACK %s version %s: %s", short, version, detail)
            self._send_ack(type_url, nonce, detail)
        else:
            st.version = version
            st.accepted += 1
            st.last_error = ""
            log.info("ACK %s version %s (%d resources%s)", short, version, count, removed)
            self._send_ack(type_url, nonce, "")
        if accepted:
            self._resubscribe(type_url)
        self.on_change()

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
        elif type_url == xds.SECRET:
            self.sink.apply_secrets(converted)
        else:
            self.sink.apply_routes(converted)

    def _resubscribe(self, type_url: str) -> None:
        """After CDS/LDS, subscribe to the EDS/RDS names they reference."""
        ref = referenced_names(type_url, self.state[type_url].resources)
        if ref is None:
            return
        dep, names = ref
        st = self.state[dep]
        if names != st.names:
            added, gone = st.subscribe(names)
            self._send_subscription(dep, added, gone)

    def _update(self, type_url: str, *, incremental: bool) -> Update | None:
        """A response's :class:`Update` of what is held of ``type_url``; None for a type not asked for."""
        st = self.state.get(type_url)
        if st is None:
            log.warning("ignoring xds response of unsupported type %s", type_url)
            return None
        return Update(type_url, st, incremental=incremental)

    # ------------------------------------------------------------------ the variant's part

    def _open_stream(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub, requests: AsyncIterator[Any],
                     metadata: tuple | None) -> Any:
        raise NotImplementedError

    def _first_request(self, type_url: str) -> Any:
        """The request that subscribes to ``type_url`` on a new stream (the base adds the node)."""
        raise NotImplementedError

    def _on_response(self, resp: Any) -> None:
        """Read ``resp`` into an Update and :meth:`_settle` it."""
        raise NotImplementedError

    def _send_ack(self, type_url: str, nonce: str, error: str) -> None:
        """ACK the response ``nonce``, or NACK it with ``error`` (non-empty)."""
        raise NotImplementedError

    def _send_subscription(self, type_url: str, added: list[str], gone: list[str]) -> None:
        """Tell the server the names of ``type_url`` changed (``self.state`` already has them)."""
        raise NotImplementedError


class AdsClient(XdsClient):
    """State of the World: every request carries the full list of names and the version held; a
    response is the whole set of its type (LDS, CDS, RTDS) or of the names it carries (EDS, RDS).
    A response with a resource that cannot be attributed to a name is refused whole, since applying
    the rest of the set would delete whatever that resource was."""

    def _open_stream(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub, requests: AsyncIterator[Any],
                     metadata: tuple | None) -> Any:
        return stub.StreamAggregatedResources(requests, metadata=metadata)

    def _request(self, type_url: str, nonce: str, error: str = "") -> discovery_pb2.DiscoveryRequest:
        st = self.state[type_url]
        req = discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=st.version,
                                             response_nonce=nonce, resource_names=list(st.names))
        if error:
            req.error_detail.CopyFrom(nack_status(error))
        return req

    def _first_request(self, type_url: str) -> discovery_pb2.DiscoveryRequest:
        return self._request(type_url, nonce="")

    def _send_ack(self, type_url: str, nonce: str, error: str) -> None:
        self._send(self._request(type_url, nonce, error))

    def _send_subscription(self, type_url: str, added: list[str], gone: list[str]) -> None:
        self._send(self._request(type_url, self.state[type_url].nonce))

    def _on_response(self, resp: discovery_pb2.DiscoveryResponse) -> None:
        type_url = resp.type_url
        up = self._update(type_url, incremental=False)
        if up is None:
            return
        for any_msg in resp.resources:
            try:
                msg = unpack(type_url, any_msg)
            except convert.XdsError as exc:
                up.refuse(str(exc))
                continue
            name = resource_name(type_url, msg)
            if not name:
                up.refuse(f"a {up.short} resource has no name")
                continue
            up.add(name, msg)
        if type_url not in MERGED_TYPES:
            up.remove_unlisted()
        self._settle(up, resp.nonce, resp.version_info, len(resp.resources))
