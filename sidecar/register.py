"""``meshkeeper register``: the sidecar's health-gated registration alone, for a server that runs
without a sidecar, such as a grpcio server that proxyless clients call directly (DESIGN §12).

It keeps the EPHEMERAL instance znode ``<ns>/services/<svc>/instances/<host>:<port>`` while the
server's health check passes (sidecar.registration: registered after the first passing check,
removed after three failures, re-created after a session expiry) and deletes it on SIGTERM/SIGINT.
The instance is named by the address callers dial, the server's own: ``--advertise-host`` and
``--port``, and it is checked there. Checks by protocol: ``grpc`` (the default) asks
``grpc.health.v1.Health/Check`` (``--health-service``, "" for the whole server) and wants SERVING;
``http`` wants 2xx/3xx from ``GET --health-path``; ``tcp`` a connect.

Once running it prints ``meshkeeper register listening instance=<host:port> service=<svc>
namespace=<ns>`` (the ready line of docs/contracts.md; it listens on nothing itself).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys

from meshkeeper.cliargs import ArgumentParser, add_zk_argument, port, seconds, zk_from_environment
from meshkeeper.registry import (
    DEFAULT_NAMESPACE,
    DEFAULT_WEIGHT,
    MAX_WEIGHT,
    PROTOCOLS,
    InstanceRecord,
    Paths,
    RecordError,
    ServiceRecord,
    validate_name,
)

log = logging.getLogger("meshkeeper.register")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="meshkeeper register",
                       description="Keep a server without a sidecar registered in ZooKeeper while it is healthy.")
    p.add_argument("--service", required=True, help="the service the server belongs to")
    p.add_argument("--port", type=port, required=True, help="the server's port (callers dial it)")
    p.add_argument("--namespace", "-n", default=DEFAULT_NAMESPACE)
    add_zk_argument(p)
    p.add_argument("--advertise-host", default="127.0.0.1", help="the server's address, as callers dial it")
    p.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    p.add_argument("--weight", type=int, default=DEFAULT_WEIGHT, help="registered weight")
    p.add_argument("--version", default="", help="the instance's version label (subsets)")
    p.add_argument("--zone", default="", help="the instance's zone label (locality)")
    p.add_argument("--health-service", default="", help="grpc: the service name asked about (default: the server)")
    p.add_argument("--health-path", default="/health", help="http: the path checked")
    p.add_argument("--health-interval", type=seconds, default=1.0)
    p.add_argument("--zk-session-timeout", type=seconds, default=10.0)
    p.add_argument("--log-level", default=os.environ.get("MESHKEEPER_LOG_LEVEL", "info"))
    args = p.parse_args(argv)
    zk_from_environment(p, args)
    if args.port == 0:
        p.error("--port must name the server's port")
    if not 0 <= args.weight <= MAX_WEIGHT:
        p.error(f"--weight {args.weight} is outside 0..{MAX_WEIGHT}")
    try:
        ipaddress.ip_address(args.advertise_host)
    except ValueError:
        p.error(f"--advertise-host {args.advertise_host!r}: expected an IP address (callers dial it)")
    if args.log_level.upper() not in logging.getLevelNamesMapping():
        p.error(f"--log-level {args.log_level!r}: expected debug, info, warning or error")
    try:
        validate_name("service", args.service)
        Paths(args.namespace)
        labels = {k: v for k, v in (("version", args.version), ("zone", args.zone)) if v}
        args.record = InstanceRecord(address=args.advertise_host, port=args.port, weight=args.weight,
                                     labels=labels, protocol=args.protocol, app_port=args.port)
        InstanceRecord.decode(args.record.encode())  # the checks the control plane will make
    except RecordError as exc:
        p.error(str(exc))
    return args


def health_check(args: argparse.Namespace):
    """The check of ``args.protocol``, at the address callers dial."""
    host, svc_port = args.advertise_host, args.port
    if args.protocol == "grpc":
        from sidecar.grpc_health import check_grpc

        return lambda: check_grpc(host, svc_port, args.health_service)
    from sidecar.registration import check_http, check_tcp

    if args.protocol == "tcp":
        return lambda: check_tcp(host, svc_port)
    http_host = f"[{host}]" if ":" in host else host
    return lambda: check_http(http_host, svc_port, args.health_path)


async def run(args: argparse.Namespace) -> int:
    from sidecar.registration import Registration

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registration = Registration(zk_hosts=args.zk, session_timeout=args.zk_session_timeout,
                                paths=Paths(args.namespace), service=args.service, record=args.record,
                                service_record=ServiceRecord(protocol=args.protocol), check=health_check(args),
                                interval=args.health_interval)
    registration.start()
    print(f"meshkeeper register listening instance={args.record.key} service={args.service} "
          f"namespace={args.namespace}", flush=True)
    await stop.wait()
    log.info("stopping: deregistering %s", registration.path)
    await registration.deregister_and_stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
