"""``meshkeeper controlplane``: registry watch -> xDS cache -> ADS server, plus the HTTP port.

``meshkeeper.cli`` calls :func:`main` with the arguments after ``controlplane``. Once both ports
are bound, one ready line goes to stdout (docs/contracts.md); logs go to stderr. SIGTERM and SIGINT
close the ADS and LRS streams, the HTTP port and the ZooKeeper session, then :func:`main` returns 0.
ZooKeeper being down at start is fine: the session is retried until it comes up, and sidecars get
nothing until the first complete registry snapshot.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

import grpc
import prometheus_client
import uvloop

from controlplane.admin import AdminService
from controlplane.admin import add_to_server as add_admin_to_server
from controlplane.ads import SERVER_OPTIONS, AdsServer, add_to_server
from controlplane.alerts.evaluate import DEFAULT_INTERVAL as DEFAULT_ALERT_INTERVAL
from controlplane.alerts.evaluate import Evaluator
from controlplane.alerts.notify import Notifier
from controlplane.auth import Authorizer, TokenFile, TokenFileError
from controlplane.ca import CAError
from controlplane.ca.setup import add_arguments as add_ca_arguments
from controlplane.ca.setup import build_issuer
from controlplane.ca.setup import check_arguments as check_ca_arguments
from controlplane.cache import SnapshotCache
from controlplane.console import Console
from controlplane.events import EventBus
from controlplane.lrs import DEFAULT_LOAD_REPORT_INTERVAL, LoadReportingServer, LoadStore
from controlplane.lrs import add_to_server as add_lrs_to_server
from controlplane.metrics import Metrics
from controlplane.proxies import ProxyRegistry
from controlplane.snapshot import RegistrySnapshot
from controlplane.tracestore import add_arguments as add_trace_store_arguments
from controlplane.tracestore import check_arguments as check_trace_store_arguments
from controlplane.tracestore import install as install_trace_store
from controlplane.vips import DEFAULT_VIP_CIDR, VipAllocator, parse_cidr
from controlplane.watch import DEFAULT_DEBOUNCE, RegistryWatch
from controlplane.web import Web
from controlplane.zksource import KazooSource
from controlplane.zkstore import ZkStore
from meshkeeper.cliargs import ArgumentParser, add_zk_argument, port, seconds, zk_from_environment
from meshkeeper.httpd import HttpServer
from meshkeeper.security import MeshIdentity

log = logging.getLogger("meshkeeper.controlplane")

DEFAULT_XDS_PORT = 15010
DEFAULT_HTTP_PORT = 15014
SHUTDOWN_GRACE = 1.0  # seconds for streams to end after close_streams() before they are cancelled


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="meshkeeper controlplane",
                                description="xDS control plane over the ZooKeeper registry")
    add_zk_argument(p, "the ZooKeeper it watches")
    p.add_argument("--xds-port", type=port, default=DEFAULT_XDS_PORT, help="gRPC xDS port (0: pick a free one)")
    p.add_argument("--http-port", type=port, default=DEFAULT_HTTP_PORT,
                   help="HTTP port for /healthz, /metrics, /api (0: pick a free one)")
    p.add_argument("--bind", default="0.0.0.0", help="address both ports bind to (default %(default)s)")
    p.add_argument("--zk-session-timeout", type=seconds, default=10.0, help="ZooKeeper session timeout, seconds")
    p.add_argument("--debounce-ms", type=int, default=int(DEFAULT_DEBOUNCE * 1000),
                   help="wait this long after a registry change before publishing (default %(default)s)")
    p.add_argument("--load-report-interval", type=seconds, default=DEFAULT_LOAD_REPORT_INTERVAL,
                   help="how often sidecars send load reports (LRS), seconds (default %(default)s)")
    p.add_argument("--admin-tokens", metavar="FILE", default=os.environ.get("MESHKEEPER_ADMIN_TOKENS") or None,
                   help="admin API bearer tokens, lines '<token> <name> <viewer|operator|admin>' "
                        "(env MESHKEEPER_ADMIN_TOKENS); re-read when it changes")
    p.add_argument("--insecure-admin", action="store_true",
                   help="without --admin-tokens: let every caller write through the admin API (trusted networks only)")
    p.add_argument("--tls-cert", metavar="FILE", help="serve the gRPC port (xDS, LRS, admin) over TLS with this certificate")
    p.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert")
    p.add_argument("--tls-client-ca", metavar="FILE",
                   help="with --tls-cert: require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--vip-cidr", default=DEFAULT_VIP_CIDR,
                   help="range the services' virtual IPs are allocated from, for the mesh DNS and "
                        "transparent mode (default %(default)s; every replica must use the same)")
    add_ca_arguments(p)
    add_trace_store_arguments(p)
    p.add_argument("--alert-interval", type=seconds, default=DEFAULT_ALERT_INTERVAL,
                   help="evaluate the alert rules this often, seconds (default %(default)s; docs/alerts.md)")
    p.add_argument("--alert-webhook", action="append", default=[], metavar="URL",
                   help="POST firing and resolved alerts here in Alertmanager's webhook format (repeatable)")
    p.add_argument("--alert-external-url", default="", metavar="URL",
                   help="this control plane's HTTP address as receivers should link to it "
                        "(default http://<host name>:<http port>)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = p.parse_args(argv)
    zk_from_environment(p, args)
    for flag in ("xds_port", "http_port"):
        if not 0 <= getattr(args, flag) < 65536:
            p.error(f"--{flag.replace('_', '-')}: not a port")
    if args.alert_interval <= 0:
        p.error("--alert-interval must be > 0")
    for url in args.alert_webhook:
        if not url.startswith(("http://", "https://")):
            p.error(f"--alert-webhook {url!r}: expected an http:// or https:// URL")
    if args.zk_session_timeout <= 0 or args.debounce_ms < 0:
        p.error("--zk-session-timeout must be > 0 and --debounce-ms >= 0")
    if args.admin_tokens and args.insecure_admin:
        p.error("--insecure-admin and --admin-tokens exclude each other")
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        p.error("--tls-client-ca needs --tls-cert and --tls-key")
    check_trace_store_arguments(p, args)
    check_ca_arguments(p, args)
    try:
        args.vip_cidr = parse_cidr(args.vip_cidr)
    except ValueError as exc:
        p.error(str(exc))
    try:
        args.tokens = TokenFile(args.admin_tokens) if args.admin_tokens else None
        args.tls = _read_tls(args)
    except (TokenFileError, OSError) as exc:
        p.error(str(exc))
    return args


def _read_tls(args: argparse.Namespace) -> tuple[bytes, bytes, bytes | None] | None:
    if not args.tls_cert:
        return None

    def read(flag: str, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise OSError(f"{flag} {path}: {exc.strerror}") from None
    return (read("--tls-cert", args.tls_cert), read("--tls-key", args.tls_key),
            read("--tls-client-ca", args.tls_client_ca) if args.tls_client_ca else None)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    try:
        issuer = await build_issuer(args, stop)
    except CAError as exc:
        log.error("%s", exc)
        return 1
    if issuer is None and getattr(args, "ca_stopped", False):
        return 0  # stopped while waiting for ZooKeeper to read the shared CA
    if issuer is not None:
        log.info("CA: %s; trust domain %s, workload certificates for %g s",
                 issuer.origin, issuer.trust_domain, issuer.ttl)

    metrics = Metrics()
    # With a CA, translation emits mTLS for the trust domain (docs/identity.md); without, plaintext.
    cache = SnapshotCache(metrics, identity=MeshIdentity(issuer.trust_domain) if issuer is not None else None)
    events = EventBus()
    proxies = ProxyRegistry(metrics, events=events)

    source = KazooSource(args.zk, args.zk_session_timeout)
    vips = VipAllocator(ZkStore(source.client), args.vip_cidr,
                        on_change=lambda action, *_: metrics.vip_changes.labels(action=action).inc())

    def publish(snapshot: RegistrySnapshot) -> None:
        events.registry_changed(cache.snapshot, snapshot)
        cache.set_snapshot(snapshot)
        vips.on_snapshot(snapshot)

    watch = RegistryWatch(source, publish, metrics=metrics, debounce=args.debounce_ms / 1000,
                          on_state=events.zookeeper_state)

    load = LoadStore(args.load_report_interval)

    server = grpc.aio.server(options=SERVER_OPTIONS)
    # Replicas (DESIGN §13): one that lost ZooKeeper after its first snapshot takes no new stream.
    ads = AdsServer(cache, proxies, serving=lambda: cache.snapshot is None or watch.state == "CONNECTED",
                    issuer=issuer)
    add_to_server(server, ads)
    lrs = LoadReportingServer(load, metrics)
    add_lrs_to_server(server, lrs)
    auth = Authorizer(args.tokens, args.insecure_admin)
    admin = AdminService(ZkStore(source.client), auth, proxies=proxies, events=events, load=load,
                         issuer=issuer)
    add_admin_to_server(server, admin)
    jaeger = install_trace_store(args, server, metrics, auth)
    try:
        if args.tls is None:
            xds_port = server.add_insecure_port(_hostport(args.bind, args.xds_port))
        else:
            cert, key, client_ca = args.tls
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                                require_client_auth=client_ca is not None)
            xds_port = server.add_secure_port(_hostport(args.bind, args.xds_port), creds)
    except RuntimeError as exc:
        xds_port, why = 0, exc
    else:
        why = "address in use or not available"
    if not xds_port:
        log.error("cannot bind the xDS port %s: %s", _hostport(args.bind, args.xds_port), why)
        return 1
    await server.start()
    external = args.alert_external_url or f"http://{socket.gethostname()}:{args.http_port}"
    notifier = Notifier(args.alert_webhook, metrics=metrics, external_url=external)
    alerts = Evaluator(ZkStore(source.client), lambda: watch.latest, load, proxies, events, notifier,
                       interval=args.alert_interval, metrics=metrics)
    try:
        pages = Web(cache, proxies, metrics, lambda: watch.state, load)
        pages.mounts.append(Console(lambda: watch.latest, load, proxies, events, admin, auth,
                                    alert_states=alerts.states))
        if jaeger is not None:
            pages.mounts.append(jaeger)
        web = await HttpServer.start(pages, args.bind, args.http_port)
    except OSError as exc:
        log.error("cannot bind the HTTP port %s: %s", _hostport(args.bind, args.http_port), exc)
        await server.stop(None)
        return 1

    watch.start()
    if not args.alert_external_url:  # the port bound (the flag may say 0)
        notifier.external_url = f"http://{socket.gethostname()}:{web.port}"
    alerts.start()
    print(f"meshkeeper controlplane listening xds_port={xds_port} http_port={web.port}", flush=True)
    log.info("serving xDS, LRS and the admin API on %s%s, HTTP on %s; zookeeper %s", xds_port,
             "" if args.tls is None else " (TLS" + (", client certificates required)" if args.tls[2] else ")"),
             web.port, args.zk)
    if auth.mode == "insecure":
        log.warning("admin API: --insecure-admin: every caller may change the mesh")
    elif auth.mode == "read-only":
        log.info("admin API: no --admin-tokens: reads are open, writes are refused")
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        ads.close_streams()
        lrs.close_streams()
        events.close()
        await server.stop(SHUTDOWN_GRACE)
        await alerts.stop()
        await web.close()
        await vips.close()
        await watch.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prometheus_client.disable_created_metrics()  # no *_created series: they only add noise here
    if args.log_level != "DEBUG":
        logging.getLogger("kazoo").setLevel(logging.WARNING)
    return uvloop.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
