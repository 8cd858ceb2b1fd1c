"""``meshkeeper sidecar``: flags, sockets, and the order things start and stop in.

Start: bind the listener sockets (port 0 picks a free port), connect the ADS stream, start
health-checking the app, serve admin (on 127.0.0.1) and the status port (Istio's 15021, on
``--status-bind``: readiness and metrics only, for the kubelet and Prometheus; sidecar/status.py),
print the ready line (docs/contracts.md). The listeners
listen only once the first full config is applied (as Envoy's before its first LDS), and the
instance is registered only once the app is healthy and every worker listens.

Stop (SIGTERM/SIGINT): deregister first so that callers stop picking this instance, keep accepting
for ``--drain-delay`` while callers learn of it (answering ``Connection: close``), then stop
accepting, let in-flight requests finish (bounded by ``--drain-timeout``), then exit.

``--workers N`` runs N-1 extra worker processes sharing the listener ports with SO_REUSEPORT;
each has its own loop, ADS stream and load reporting (LRS) stream. Registration, the admin port
and the status port live in worker 0.

``--xds-ca FILE`` makes the ADS and LRS streams use TLS, trusting that CA for the control plane's
certificate (which must name the host of ``--cp``); ``--xds-cert FILE --xds-key FILE`` add a client
certificate for mutual TLS. The files are read (and checked) once at start; workers get the same flags.

``--xds-api delta|sotw`` picks the ADS variant, as Envoy's ``ads_config.api_type`` (DELTA_GRPC or
GRPC): Delta (sidecar/xds/delta.py, the default) or State of the World (sidecar/xds/client.py).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

from meshkeeper import xds
from meshkeeper.cliargs import (
    ArgumentParser,
    add_zk_argument,
    non_negative_seconds,
    port,
    ratio,
    seconds,
    zk_from_environment,
)
from meshkeeper.identity import TOKEN_ENV
from meshkeeper.registry import DEFAULT_WEIGHT, MAX_WEIGHT, InstanceRecord, Paths, RecordError, ServiceRecord
from meshkeeper.xds import NodeInfo
from sidecar.status import DEFAULT_STATUS_PORT

if TYPE_CHECKING:
    from sidecar.xds.client import XdsClient

log = logging.getLogger("meshkeeper.sidecar")

DEFAULT_SAMPLE_RATIO = 0.01  # Istio's default trace sampling: 1%
XDS_APIS = ("delta", "sotw")  # Envoy's ads api_type DELTA_GRPC and GRPC
DEFAULT_XDS_API = "delta"  # Envoy's DELTA_GRPC; "sotw" for GRPC


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="meshkeeper sidecar", description="Run the sidecar beside one service instance.")
    p.add_argument("--service", required=True, help="the service this instance belongs to")
    p.add_argument("--app-port", type=port, required=True, help="the local app's port")
    p.add_argument("--namespace", "-n", default="default")
    p.add_argument("--cp", default=os.environ.get("MESHKEEPER_CP", "127.0.0.1:15010"),
                   help="control plane HOST:PORT, or several replicas HOST:PORT,HOST:PORT,...: the xDS and "
                        "load-reporting streams go to the first and fail over to the next (one that lost "
                        "ZooKeeper sends the sidecar on while others are left to try)")
    p.add_argument("--xds-ca", metavar="FILE", default="",
                   help="PEM CA to trust for the control plane's certificate: xDS and LRS use TLS")
    p.add_argument("--xds-cert", metavar="FILE", default="",
                   help="PEM client certificate for mutual TLS with the control plane (with --xds-key)")
    p.add_argument("--xds-key", metavar="FILE", default="", help="PEM private key of --xds-cert")
    p.add_argument("--identity-token-file", metavar="FILE", default="",
                   help="the bootstrap token that proves this sidecar's service to the control plane's CA "
                        f"(docs/identity.md); default: ${TOKEN_ENV}; none: no certificate, plaintext only")
    p.add_argument("--xds-api", choices=XDS_APIS, default=DEFAULT_XDS_API,
                   help="the ADS variant: delta (incremental, DeltaAggregatedResources) or sotw (State of "
                        "the World, StreamAggregatedResources); default %(default)s")
    add_zk_argument(p, "the ZooKeeper the instance registers in")
    p.add_argument("--version", default="", help="the instance's version label (subsets)")
    p.add_argument("--zone", default="", help="the instance's zone label (locality)")
    p.add_argument("--weight", type=int, default=DEFAULT_WEIGHT, help="registered weight")
    p.add_argument("--protocol", choices=("http", "grpc", "tcp"), default="http",
                   help="the app's protocol: http (HTTP/1.1), grpc (HTTP/2 to the app, health by the gRPC "
                        "health protocol) or tcp")
    p.add_argument("--interception", choices=xds.INTERCEPTION_MODES, default="none",
                   help="redirect: transparent mode (run `meshkeeper iptables` first; DESIGN §10): connections "
                        "are dispatched by their original destination and the mesh DNS serves on --dns-port; "
                        "the instance registers <advertise-host>:<app-port>. none (default): apps dial the sidecar")
    p.add_argument("--outbound-policy", choices=xds.OUTBOUND_POLICIES, default="allow_any",
                   help="where traffic for no known service goes: allow_any (default: to where it was "
                        "going, PassthroughCluster) or registry_only (refused, BlackHoleCluster)")
    p.add_argument("--egress", default="*", metavar="SERVICES",
                   help="the services of its namespace this sidecar calls, comma-separated (Istio's Sidecar "
                        "egress hosts): it is sent only those, and discovers others on the first request (Delta "
                        "xDS); '*' (default): all of them, or its service's policy.egress when that is set")
    p.add_argument("--dns-port", type=port, default=15053, help="the mesh DNS's port (UDP and TCP) in transparent mode")
    p.add_argument("--dns-domain", default="mesh.local",
                   help="the mesh DNS also answers <svc>.<ns>.<this> (default %(default)s)")
    p.add_argument("--resolv-conf", default="/etc/resolv.conf", metavar="FILE",
                   help="where the mesh DNS finds the resolvers it forwards other names to")
    p.add_argument("--health-path", default="/health")
    p.add_argument("--health-interval", type=seconds, default=1.0)
    p.add_argument("--advertise-host", default="127.0.0.1", help="address callers dial to reach the inbound listener")
    p.add_argument("--inbound-bind", default="0.0.0.0")
    p.add_argument("--outbound-port", type=port, default=15001)
    p.add_argument("--inbound-port", type=port, default=15006)
    p.add_argument("--admin-port", type=port, default=15000)
    p.add_argument("--status-port", type=port, default=None,
                   help="readiness (/healthz/ready) and metrics (/stats/prometheus) only, for the kubelet "
                        f"and Prometheus (default {DEFAULT_STATUS_PORT} with --interception redirect; in explicit "
                        "mode none unless given, so hosts running several sidecars keep working)")
    p.add_argument("--status-bind", default="0.0.0.0",
                   help="address of the status port (default %(default)s: the pod IP too; the admin port "
                        "stays on 127.0.0.1)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--zk-session-timeout", type=seconds, default=10.0)
    p.add_argument("--drain-delay", type=non_negative_seconds, default=2.0,
                   help="after deregistering, keep accepting (answering Connection: close) this long, "
                        "so that callers learn of it before the listeners close")
    p.add_argument("--drain-timeout", type=seconds, default=5.0, help="bound on waiting for in-flight requests")
    p.add_argument("--otlp-endpoint", default=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
                   help="OTLP/gRPC collector HOST:PORT (Jaeger's 4317) to export spans to; "
                        "empty (default): no tracing, trace headers pass through untouched")
    p.add_argument("--otlp-timeout", type=seconds, default=5.0,
                   help="bound on one export to the collector, retries included (default %(default)s s)")
    p.add_argument("--trace-sample-ratio", type=ratio, default=DEFAULT_SAMPLE_RATIO,
                   help="share of new traces sampled, 0..1 (default %(default)s; a service's policy "
                        "tracing.sample_percent overrides it); a caller's decision is always followed")
    p.add_argument("--access-log", default="off", metavar="PATH|-|off",
                   help="one JSON line per request: 'off' (default, as in Istio and Linkerd: the log "
                        "costs a quarter of a worker's throughput, bench/RESULTS.md), '-' stdout, or a file")
    p.add_argument("--log-level", default=os.environ.get("MESHKEEPER_LOG_LEVEL", "info"))
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    zk_from_environment(p, args)
    if not 0 <= args.weight <= MAX_WEIGHT:
        p.error(f"--weight {args.weight} is outside 0..{MAX_WEIGHT}")
    try:
        args.egress = ",".join(xds.parse_egress(args.egress))
    except ValueError as exc:
        p.error(f"--{exc}")
    if not 1 <= args.workers <= 64:
        p.error("--workers must be between 1 and 64")
    if args.app_port == 0:
        p.error("--app-port must name the app's port")
    if args.status_port is None and args.interception == "redirect":
        args.status_port = DEFAULT_STATUS_PORT
    try:
        ipaddress.ip_address(args.status_bind)
    except ValueError:
        p.error(f"--status-bind {args.status_bind!r}: expected an IP address (0.0.0.0: all of them)")
    for flag in ("outbound_port", "inbound_port", "admin_port"):
        if args.status_port and getattr(args, flag) == args.status_port:  # None (none) and 0 (free) never clash
            p.error(f"--status-port and --{flag.replace('_', '-')} are both {args.status_port}")
    try:
        Paths(args.namespace)
        from meshkeeper.registry import validate_name
        validate_name("service", args.service)
    except RecordError as exc:
        p.error(str(exc))
    if args.interception == "redirect" and args.advertise_host.startswith(("127.", "localhost", "::1")):
        p.error(f"--advertise-host {args.advertise_host}: in transparent mode it must be the pod's own IP "
                "(callers' sidecars dial it, and this pod's capture rules bring it to the inbound listener)")
    for cp in args.cp.split(","):
        cp_host, sep, cp_port = cp.strip().rpartition(":")
        if not sep or not cp_host or not cp_port.isdigit():
            p.error(f"--cp {args.cp!r}: expected HOST:PORT[,HOST:PORT...] (one address per control plane replica)")
    try:
        args.xds_tls = read_xds_tls(args.xds_ca, args.xds_cert, args.xds_key)
    except ValueError as exc:
        p.error(str(exc))
    args.identity_token = _identity_token(p, args.identity_token_file)
    if args.identity_token and args.identity_token.split(".")[1:3] != [args.namespace, args.service]:
        _, ns, svc, _ = args.identity_token.split(".")
        p.error(f"the bootstrap token is for service {svc!r} of namespace {ns!r}, "
                f"not --service {args.service} --namespace {args.namespace}")
    return args


def _identity_token(p: argparse.ArgumentParser, path: str) -> str:
    """The bootstrap token of ``--identity-token-file``, else of the environment, else ""."""
    from sidecar.identity import read_token

    try:
        if path:
            with open(path, encoding="ascii") as f:
                return read_token(f.read(), f"--identity-token-file {path}")
        if os.environ.get(TOKEN_ENV, "").strip():
            return read_token(os.environ[TOKEN_ENV], f"${TOKEN_ENV}")
    except (OSError, UnicodeDecodeError) as exc:
        p.error(f"--identity-token-file {path}: {getattr(exc, 'strerror', None) or exc}")
    except ValueError as exc:
        p.error(str(exc))
    return ""


class XdsTls(NamedTuple):
    """PEM bytes of ``--xds-ca`` and, for mutual TLS, ``--xds-cert`` and ``--xds-key``."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None


def _no_password() -> bytes:
    raise ValueError("the key is encrypted (a key without a passphrase is needed)")


def read_xds_tls(ca: str, cert: str, key: str) -> XdsTls | None:
    """Read and check the TLS files of the xDS connection; None without ``--xds-ca``.

    Raises ValueError with a one-line message naming the flag: a missing partner flag, a file that
    cannot be read, one that holds no PEM certificate (or key), or a key that is not the certificate's.
    """
    if bool(cert) != bool(key):
        raise ValueError("--xds-cert and --xds-key go together (a client certificate and its key)")
    if cert and not ca:
        raise ValueError("--xds-cert/--xds-key need --xds-ca (mutual TLS is TLS first)")
    if not ca:
        return None

    def read(flag: str, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ValueError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None
        if b"-----BEGIN " not in data:
            raise ValueError(f"{flag} {path}: not a PEM file")
        return data

    tls = XdsTls(read("--xds-ca", ca), read("--xds-cert", cert) if cert else None,
                 read("--xds-key", key) if key else None)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cadata=tls.ca.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"--xds-ca {ca}: no usable CA certificate ({exc})") from None
    if cert:
        try:
            ctx.load_cert_chain(cert, key, password=_no_password)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ValueError(f"--xds-cert {cert} / --xds-key {key}: not a certificate and its key ({exc})") from None
    return tls


async def run(args: argparse.Namespace) -> int:
    from sidecar.accesslog import AccessLog
    from sidecar.admin import AdminServer
    from sidecar.grpc_health import check_grpc
    from sidecar.proxy.listener import bind_socket
    from sidecar.registration import Registration, check_http, check_tcp
    from sidecar.server import Server
    from sidecar.status import StatusServer
    from sidecar.xds.client import channel_credentials
    from sidecar.xds.lrs import LoadReporter

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    primary = args.worker_index == 0
    reuse = args.workers > 1 or not primary
    admin = AdminServer() if primary else None
    status = StatusServer(admin) if admin and args.status_port is not None else None
    try:
        # Bound now (the ports are ours), listening only once the first config is in.
        outbound_sock = bind_socket("127.0.0.1", args.outbound_port, reuse_port=reuse, exclusive=primary)
        inbound_sock = bind_socket(args.inbound_bind, args.inbound_port, reuse_port=reuse, exclusive=primary)
        admin_port = await admin.start("127.0.0.1", args.admin_port) if admin else 0
    except OSError as exc:
        print(f"meshkeeper sidecar: cannot bind a listener: {exc}", file=sys.stderr)
        return 1
    try:
        status_port = await status.start(args.status_bind, args.status_port) if status else 0
    except OSError as exc:
        print(f"meshkeeper sidecar: cannot bind the status port {args.status_bind}:{args.status_port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    if admin is not None and status is not None:
        admin.status_address = status.address
    outbound_port = outbound_sock.getsockname()[1]
    inbound_port = inbound_sock.getsockname()[1]

    node_id = NodeInfo.make_id(args.advertise_host, args.service, inbound_port, args.namespace)
    if not primary:
        node_id += f"~w{args.worker_index}"
    node = NodeInfo(node_id=node_id, service=args.service, namespace=args.namespace, app_port=args.app_port,
                    inbound_port=inbound_port, outbound_port=outbound_port, admin_port=admin_port,
                    advertise_host=args.advertise_host, version=args.version, protocol=args.protocol,
                    interception=args.interception, outbound_policy=args.outbound_policy, egress=args.egress)
    transparent = args.interception == "redirect"

    try:
        tracer = _tracer(args, node)
        access_log = AccessLog.open(args.access_log)
    except TracingUnavailable as exc:
        print(f"meshkeeper sidecar: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"meshkeeper sidecar: cannot open the access log: {exc}", file=sys.stderr)
        return 1
    runtime = Server(node, tracer=tracer, access_log=access_log)
    dns_port = 0
    if transparent and primary:
        from sidecar.dns import MeshDns, read_resolv_conf

        # 127.0.0.1: the capture rules redirect the app's queries there, and the answer must leave
        # from the address the app's kernel expects it from (docs/transparent.md).
        runtime.dns, runtime.dns_domain = MeshDns(read_resolv_conf(args.resolv_conf)), args.dns_domain.strip(".").lower()
        try:
            dns_port = await runtime.dns.start("127.0.0.1", args.dns_port)
        except OSError as exc:
            print(f"meshkeeper sidecar: cannot bind the DNS port: {exc}", file=sys.stderr)
            return 1
    registration: Registration | None = None
    config_ready = asyncio.Event()
    workers: list[Worker] = []
    workers_serving = 0

    def changed() -> None:
        runtime.xds_changed()
        if ads.initialized:
            config_ready.set()
        if registration is not None:
            registration.poke()

    def registrable() -> bool:
        # Like Envoy before its first LDS: nothing listens (callers get a refused connection, not a
        # 404) until the first full config is applied, in this process and in every worker.
        return bool(runtime.listeners) and workers_serving == len(workers)

    # One set of credentials for both streams to the control plane (None: insecure).
    credentials = channel_credentials(*args.xds_tls) if args.xds_tls is not None else None
    ads = ads_client_class(args.xds_api)(args.cp, node, runtime, on_change=changed, credentials=credentials,
                                         token=args.identity_token)
    runtime.ads = ads
    identity = None
    if args.identity_token:  # a key of our own, certified over SDS and rotated at half life
        from sidecar.identity import IdentityAgent

        identity = IdentityAgent(runtime.tls, ads)
        identity.start()
    if args.xds_api == "delta":  # on-demand discovery subscribes by name: Delta only
        runtime.enable_on_demand(ads.request_cluster)
        ads.on_missing = runtime.on_demand_missing
    ads.start()
    lrs = LoadReporter(args.cp, node, runtime.clusters, credentials=credentials)  # every worker reports its own load
    runtime.lrs = lrs
    lrs.start()

    if primary:
        labels = {k: v for k, v in (("version", args.version), ("zone", args.zone)) if v}
        # Transparent mode registers the address callers dial, the app's own port: their sidecars
        # send there, and this pod's capture rules bring it to the inbound listener (DESIGN §3).
        record = InstanceRecord(address=args.advertise_host, port=args.app_port if transparent else inbound_port,
                                weight=args.weight,
                                labels=labels, protocol=args.protocol, app_port=args.app_port,
                                mtls=bool(args.identity_token))
        if args.protocol == "tcp":
            def check():
                return check_tcp("127.0.0.1", args.app_port)
        elif args.protocol == "grpc":
            def check():
                return check_grpc("127.0.0.1", args.app_port)
        else:
            def check():
                return check_http("127.0.0.1", args.app_port, args.health_path)
        registration = Registration(zk_hosts=args.zk, session_timeout=args.zk_session_timeout,
                                    paths=Paths(args.namespace), service=args.service, record=record,
                                    service_record=ServiceRecord(protocol=args.protocol), check=check,
                                    interval=args.health_interval, gate=registrable)
        runtime.registration = registration
        registration.start()
        admin.runtime = runtime
        workers = _spawn_workers(args, outbound_port, inbound_port)

    # A worker announces itself to the primary on a pipe of its own (--ready-fd): its stdout is the
    # primary's, shared by their access logs.
    announce = os.fdopen(args.ready_fd, "w") if args.ready_fd >= 0 else sys.stdout
    print(f"meshkeeper sidecar listening outbound_port={outbound_port} inbound_port={inbound_port} "
          f"admin_port={admin_port}" + (f" status_port={status_port}" if status_port else "")
          + (f" dns_port={dns_port}" if dns_port else "") + f" node={node_id}",
          file=announce, flush=True)

    async def worker_serving(w: Worker) -> None:
        nonlocal workers_serving
        while True:
            line = await loop.run_in_executor(None, w.ready.readline)
            if not line:
                return
            if line.startswith(b"meshkeeper sidecar serving"):
                workers_serving += 1
                changed()

    watchers = [loop.create_task(worker_serving(w)) for w in workers]
    waits = [loop.create_task(stop.wait()), loop.create_task(config_ready.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        await runtime.start_listeners(outbound_sock, inbound_sock)
        changed()
        print(f"meshkeeper sidecar serving node={node_id}", file=announce, flush=True)
    await stop.wait()
    for t in (*waits, *watchers):
        t.cancel()
    log.info("shutting down: deregistering, draining for %.1fs, then closing (in-flight requests get %.1fs)",
             args.drain_delay, args.drain_timeout)
    if registration is not None:
        await registration.deregister_and_stop()
    for w in workers:
        w.proc.send_signal(signal.SIGTERM)
    drained = await runtime.drain(args.drain_delay if runtime.listeners else 0.0, args.drain_timeout)
    if not drained:
        log.warning("drain timeout: reset the connections still open")
    if identity is not None:
        identity.stop()
    await ads.stop()
    await lrs.stop()
    if runtime.dns is not None:
        await runtime.dns.stop()
    if status is not None:
        await status.stop()
    if admin is not None:
        await admin.stop()
    for w in workers:
        try:
            await asyncio.wait_for(loop.run_in_executor(None, w.proc.wait), args.drain_timeout + 2)
        except TimeoutError:
            w.proc.kill()
        w.ready.close()
    if tracer is not None:
        await loop.run_in_executor(None, tracer.shutdown)  # flush what is queued, bounded
    if access_log is not None:
        access_log.close()
    log.info("stopped")
    return 0


class TracingUnavailable(Exception):
    pass


def _tracer(args: argparse.Namespace, node: NodeInfo):
    """The span exporter of ``--otlp-endpoint`` (None without one). The resource names the
    instance as OpenTelemetry's conventions say: service.name, service.namespace, service.instance.id."""
    if not args.otlp_endpoint:
        return None
    from meshkeeper.deps import REPAIR_HINT

    resource = {"service.name": args.service, "service.namespace": args.namespace,
                "service.instance.id": node.node_id}
    if args.version:
        resource["service.version"] = args.version
    try:  # the SDK or the exporter may not import in an environment xds-protos broke (DESIGN §4a)
        from sidecar.tracing.export import Tracer

        return Tracer.otlp(args.otlp_endpoint, resource, ratio=args.trace_sample_ratio, timeout=args.otlp_timeout)
    except ImportError as exc:
        raise TracingUnavailable(f"tracing needs the OTLP exporter, which does not import ({exc}): {REPAIR_HINT}") from None


def ads_client_class(api: str) -> type[XdsClient]:
    """The ADS client of ``--xds-api``; both have one surface (sidecar/xds/client.py)."""
    if api == "delta":
        from sidecar.xds.delta import DeltaAdsClient
        return DeltaAdsClient
    from sidecar.xds.client import AdsClient
    return AdsClient


class Worker(NamedTuple):
    proc: subprocess.Popen
    ready: BinaryIO  # the read end of the worker's --ready-fd pipe


def _spawn_workers(args: argparse.Namespace, outbound_port: int, inbound_port: int) -> list[Worker]:
    procs = []
    for i in range(1, args.workers):
        read_end, write_end = os.pipe()
        argv = [sys.executable, "-m", "meshkeeper.cli", "sidecar", "--service", args.service,
                "--app-port", str(args.app_port), "--namespace", args.namespace, "--cp", args.cp,
                "--xds-api", args.xds_api,
                "--version", args.version, "--protocol", args.protocol, "--advertise-host", args.advertise_host,
                "--interception", args.interception, "--outbound-policy", args.outbound_policy,
                "--egress", args.egress, "--inbound-bind", args.inbound_bind, "--outbound-port", str(outbound_port),
                "--inbound-port", str(inbound_port), "--admin-port", "0", "--status-port", "0",
                "--drain-timeout", str(args.drain_timeout),
                "--drain-delay", str(args.drain_delay), "--otlp-endpoint", args.otlp_endpoint,
                "--otlp-timeout", str(args.otlp_timeout),
                "--trace-sample-ratio", repr(args.trace_sample_ratio), "--access-log", args.access_log,
                "--log-level", args.log_level, "--worker-index", str(i), "--ready-fd", str(write_end),
                *worker_tls_flags(args)]
        # Workers die with the primary (setpriv's PR_SET_PDEATHSIG; preexec_fn is unsafe beside gRPC's threads).
        if shutil.which("setpriv"):
            argv = ["setpriv", "--pdeathsig", "TERM", *argv]
        try:
            # The token goes by the environment, not argv (which any local user can read).
            env = {**os.environ, TOKEN_ENV: args.identity_token} if args.identity_token else None
            procs.append(Worker(subprocess.Popen(argv, pass_fds=(write_end,), env=env), os.fdopen(read_end, "rb")))
        finally:
            os.close(write_end)
    return procs


def worker_tls_flags(args: argparse.Namespace) -> list[str]:
    """The xDS TLS flags a worker gets: the primary's own (relative paths: the cwd is shared)."""
    out: list[str] = []
    for flag, value in (("--xds-ca", args.xds_ca), ("--xds-cert", args.xds_cert), ("--xds-key", args.xds_key)):
        if value:
            out += [flag, value]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    import uvloop

    try:
        return uvloop.run(run(args))
    except KeyboardInterrupt:
        return 130
