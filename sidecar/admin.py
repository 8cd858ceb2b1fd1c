"""The sidecar's admin port (Envoy's admin interface, in JSON).

``/ready``          200 ``LIVE`` once the first config is applied and the instance is registered;
                    503 with the state (``PRE_INITIALIZING``, ``INITIALIZING``, ``DRAINING``) before.
``/config_dump``    the applied listeners, routes, clusters, endpoints and runtime, with versions and NACKs.
``/clusters``       every cluster: load balancer, panic (now) and its threshold, circuit breaker
                    limits, outlier detection (config, active ejections, detections, success rate
                    average and threshold, or null); every endpoint: weight, serving, active and total
                    requests, and ``ejected``, ``ejections`` (times ejected), ``ejected_until``
                    (seconds from now, or null) with its outlier counters.
``/listeners``      the bound listener ports (the status port's too: sidecar.status).
``/server_info``    node identity, state, uptime, xDS connection (and whether it uses TLS), load
                    reporting (LRS) state.
``/stats/prometheus`` Prometheus text exposition.
``/runtime``        the service's runtime config (RTDS) for the local app (docs/contracts.md):
                    ``{"service", "namespace", "version", "values"}`` and the header
                    ``x-meshkeeper-runtime-version``. ``?version=V&wait=S`` holds the answer until
                    the version differs from V or S seconds passed (default 60, more than 300 is
                    taken as 300); a ``wait`` that is not a number of seconds >= 0 gets 400.

Handlers only read the runtime; nothing here changes routing.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from google.protobuf.json_format import MessageToDict

from meshkeeper import xds
from meshkeeper.httpd import HttpServer

if TYPE_CHECKING:
    from sidecar.server import Server

JSON = "application/json"
_DUMP_ORDER = ((xds.LISTENER, "listeners"), (xds.ROUTE, "routes"), (xds.CLUSTER, "clusters"),
               (xds.ENDPOINT, "endpoints"), (xds.RUNTIME, "runtime"), (xds.SECRET, "secrets"))
RUNTIME_VERSION_HEADER = "x-meshkeeper-runtime-version"
DEFAULT_RUNTIME_WAIT = 60.0
MAX_RUNTIME_WAIT = 300.0
_QUERY_PAGES = ("/runtime",)  # pages whose handler takes the query


def _json(status: int, obj: Any) -> tuple[int, str, bytes]:
    return status, JSON, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


class AdminServer:
    def __init__(self, runtime: Server | None = None) -> None:
        self.runtime = runtime  # set once the sidecar's node (with the admin port) is known
        self.status_address: tuple[str, int] | None = None  # the status port's (bind, port), when served
        self.started = time.time()
        self._server: HttpServer | None = None
        self._routes = {
            "/ready": self.ready,
            "/config_dump": self.config_dump,
            "/clusters": self.clusters,
            "/listeners": self.listeners,
            "/server_info": self.server_info,
            "/stats/prometheus": self.prometheus,
            "/runtime": self.runtime_config,
            "/certs": self.certs,
            "/": self.index,
        }

    async def start(self, host: str, port: int) -> int:
        """Serve on ``host:port`` (0 picks a free port); returns the bound port."""
        self._server = await HttpServer.start(self.handle, host, port)
        return self._server.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.close()

    async def handle(self, method: str, path: str, query: dict, headers: dict, body: bytes) -> tuple:
        handler = self._routes.get(path)
        if self.runtime is None:
            return 503, "text/plain", b"PRE_INITIALIZING\n"
        if handler is None:
            return _json(404, {"error": f"no admin page {path}", "pages": sorted(self._routes)})
        if method not in ("GET", "HEAD"):
            return _json(405, {"error": f"{method} is not allowed on {path}"})
        result = handler(query) if path in _QUERY_PAGES else handler()
        return await result if inspect.isawaitable(result) else result

    # ------------------------------------------------------------------ pages

    def state(self) -> str:
        rt = self.runtime
        if rt.draining:
            return "DRAINING"
        if rt.ads is None or not rt.ads.initialized:
            return "PRE_INITIALIZING"
        if rt.registration is not None and not rt.registration.registered:
            return "INITIALIZING"
        return "LIVE"

    def ready(self) -> tuple[int, str, bytes]:
        state = self.state()
        return (200 if state == "LIVE" else 503), "text/plain", (state + "\n").encode()

    def index(self) -> tuple[int, str, bytes]:
        return _json(200, {"pages": sorted(p for p in self._routes if p != "/")})

    def server_info(self) -> tuple[int, str, bytes]:
        rt = self.runtime
        reg = rt.registration
        return _json(200, {
            "state": self.state(),
            "node": rt.node.node_id,
            "metadata": rt.node.metadata(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "control_plane": {"target": rt.ads.target, "connected": rt.ads.connected,
                              "connects": rt.ads.connects, "tls": rt.ads.credentials is not None}
            if rt.ads else None,
            "load_reporting": rt.lrs.admin_view() if rt.lrs is not None else None,
            "registration": None if reg is None else {
                "path": reg.path, "registered": reg.registered, "app_healthy": reg.healthy,
                "zookeeper": reg.zk_state, "registrations": reg.registrations,
                "consecutive_check_failures": reg.failures},
        })

    def listeners(self) -> tuple[int, str, bytes]:
        n = self.runtime.node
        out = {"outbound": {"address": "127.0.0.1", "port": n.outbound_port},
               "inbound": {"address": n.advertise_host, "port": n.inbound_port},
               "admin": {"address": "127.0.0.1", "port": n.admin_port}}
        rt = self.runtime
        if self.status_address is not None:
            out["status"] = {"address": self.status_address[0], "port": self.status_address[1]}
        if rt.dns is not None and rt.dns.port:
            out["dns"] = {"address": "127.0.0.1", "port": rt.dns.port}
        for name, bound in sorted(rt.tcp_listeners.items()):  # explicit mode's tcp services
            out[name] = {"address": bound.bind[0], "port": bound.bind[1]}
        return _json(200, out)

    def config_dump(self) -> tuple[int, str, bytes]:
        ads = self.runtime.ads
        out: dict[str, Any] = {"node": self.runtime.node.node_id, "configs": {}}
        for type_url, key in _DUMP_ORDER:
            st = ads.state[type_url]
            out["configs"][key] = {
                "version_info": st.version,
                "last_updated": st.updated_at or None,
                "subscribed": list(st.names) if st.names else "*" if type_url in xds.WILDCARD_TYPES else [],
                "accepted": st.accepted,
                "rejected": st.rejected,
                "last_nack": st.last_error or None,
                "resources": [MessageToDict(m, preserving_proto_field_name=True) for _, m in sorted(st.raw.items())],
            }
        return _json(200, out)

    async def runtime_config(self, query: dict[str, str]) -> tuple[int, str, bytes, dict[str, str]]:
        """``/runtime``, long-polled with ``?version=V&wait=S`` (held while the version is V)."""
        layer = self.runtime.runtime_layer
        wait = DEFAULT_RUNTIME_WAIT
        if "wait" in query:
            try:
                wait = float(query["wait"])
            except ValueError:
                wait = math.nan
            if not (math.isfinite(wait) and wait >= 0):
                return _json(400, {"error": f"wait {query['wait']!r}: expected a number of seconds, 0 or more"})
            wait = min(wait, MAX_RUNTIME_WAIT)
        if "version" in query:
            await layer.wait_change(query["version"], wait)
        status, ctype, body = _json(200, {"service": self.runtime.node.service,
                                          "namespace": self.runtime.node.namespace,
                                          "version": layer.version, "values": dict(layer.values)})
        return status, ctype, body, {RUNTIME_VERSION_HEADER: _header_value(layer.version)}

    def certs(self) -> tuple[int, str, bytes]:
        """Envoy's ``/certs``: the trust bundle and the workload chain the sidecar serves with
        (docs/identity.md), each certificate's serial, SANs and validity; never a key."""
        tls = self.runtime.tls
        return _json(200, {"certificates": [{
            "ca_cert": [_cert_view(c) for c in _certificates(tls.trust_bundle)],
            "cert_chain": [_cert_view(c) for c in _certificates(tls.certificate_chain)],
        }] if tls.certificate_chain or tls.trust_bundle else []})

    def clusters(self) -> tuple[int, str, bytes]:
        return _json(200, {"clusters": self.runtime.clusters_view()})

    def prometheus(self) -> tuple[int, str, bytes]:
        body, ctype = self.runtime.metrics.exposition()
        return 200, ctype, body


def _certificates(pem: bytes) -> list:
    from cryptography import x509

    return x509.load_pem_x509_certificates(pem) if pem else []


def _cert_view(cert) -> dict[str, Any]:
    from cryptography import x509

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        alt = [{"uri": str(u)} for u in sans.get_values_for_type(x509.UniformResourceIdentifier)]
        alt += [{"dns": str(d)} for d in sans.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        alt = []
    expires = cert.not_valid_after_utc.timestamp()
    return {"serial_number": format(cert.serial_number, "x"), "subject": cert.subject.rfc4514_string(),
            "subject_alt_names": alt, "valid_from": cert.not_valid_before_utc.isoformat(),
            "expiration_time": cert.not_valid_after_utc.isoformat(),
            "seconds_until_expiration": max(0, int(expires - time.time()))}


def _header_value(text: str) -> str:
    """``text`` as a header value: as is when printable ASCII, else percent-encoded."""
    return text if text.isascii() and text.isprintable() else quote(text, safe="")
