"""``meshkeeper bootstrap --proxyless``: the gRPC xDS bootstrap of a proxyless client (DESIGN §12).

A stock grpcio client reads the file named by ``GRPC_XDS_BOOTSTRAP`` once, at its first ``xds:``
channel, and from then on asks the control plane for the Listener named as its target
(``xds:///catalog.default``). The file says where the control plane is and who the client is:

    {"xds_servers": [{"server_uri": "127.0.0.1:15010", "channel_creds": [{"type": "insecure"}],
                      "server_features": ["xds_v3"]}],
     "node": {"id": "proxyless~<host>~<service>.<ns>", "cluster": "<service>",
              "metadata": {"namespace": "<ns>"}, "locality": {}}}

``channel_creds`` is required (without it grpcio's calls just time out); ``--xds-ca`` makes it
``tls`` (gRFC A65: files, read by grpcio). The node carries no ``service`` in its metadata: that is
how the control plane tells a proxyless client from a sidecar (meshkeeper.xds.NodeInfo); its
``namespace`` is where targets without one (``xds:///catalog``) resolve. The sidecar needs no such
file: its flags are its bootstrap.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

from meshkeeper.cliargs import ArgumentParser, host_port
from meshkeeper.registry import DEFAULT_NAMESPACE, RecordError, validate_name

DEFAULT_CP = "127.0.0.1:15010"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="meshkeeper bootstrap",
                       description="Print a gRPC xDS bootstrap (GRPC_XDS_BOOTSTRAP) for proxyless grpcio clients.")
    p.add_argument("--proxyless", action="store_true", help="a bootstrap for grpcio's own xDS client (required)")
    p.add_argument("--cp", type=host_port, default=None, metavar="HOST:PORT",
                   help=f"the control plane's xDS port (env MESHKEEPER_CP, default {DEFAULT_CP})")
    p.add_argument("--namespace", "-n", default=DEFAULT_NAMESPACE,
                   help="where targets without a namespace (xds:///catalog) resolve (default %(default)s)")
    p.add_argument("--service", default="", help="the client app's own name (node.cluster; shown by proxy-status)")
    p.add_argument("--node-id", default="", help="node.id (default proxyless~<hostname>~<service>.<namespace>)")
    p.add_argument("--xds-ca", metavar="FILE", default="", help="TLS to the control plane, trusting this PEM CA")
    p.add_argument("--xds-cert", metavar="FILE", default="", help="client certificate for mutual TLS (with --xds-key)")
    p.add_argument("--xds-key", metavar="FILE", default="", help="private key of --xds-cert")
    p.add_argument("--output", "-o", metavar="FILE", default="-", help="write here instead of stdout")
    args = p.parse_args(argv)
    if not args.proxyless:
        p.error("only --proxyless bootstraps are made (a sidecar needs none: its flags are its bootstrap)")
    if args.cp is None:
        try:
            args.cp = host_port(os.environ.get("MESHKEEPER_CP") or DEFAULT_CP)
        except argparse.ArgumentTypeError as exc:
            p.error(f"MESHKEEPER_CP {exc}")
    try:
        validate_name("namespace", args.namespace)
        if args.service:
            validate_name("service", args.service)
    except RecordError as exc:
        p.error(str(exc))
    if bool(args.xds_cert) != bool(args.xds_key) or (args.xds_cert and not args.xds_ca):
        p.error("--xds-cert and --xds-key go together, and only with --xds-ca")
    for flag, path in (("--xds-ca", args.xds_ca), ("--xds-cert", args.xds_cert), ("--xds-key", args.xds_key)):
        if path and not os.access(path, os.R_OK):
            p.error(f"{flag} {path}: cannot read it")
    return args


def bootstrap(cp: str, namespace: str = DEFAULT_NAMESPACE, service: str = "", node_id: str = "",
              ca: str = "", cert: str = "", key: str = "") -> dict[str, Any]:
    """The bootstrap as a dict (see the module docstring)."""
    creds: dict[str, Any] = {"type": "insecure"}
    if ca:
        config = {"ca_certificate_file": os.path.abspath(ca)}
        if cert:
            config |= {"certificate_file": os.path.abspath(cert), "private_key_file": os.path.abspath(key)}
        creds = {"type": "tls", "config": config}
    node_id = node_id or f"proxyless~{socket.gethostname()}~{service or 'grpc'}.{namespace}"
    return {
        "xds_servers": [{"server_uri": cp, "channel_creds": [creds], "server_features": ["xds_v3"]}],
        "node": {"id": node_id, "cluster": service, "metadata": {"namespace": namespace}, "locality": {}},
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    text = json.dumps(bootstrap(args.cp, args.namespace, args.service, args.node_id, args.xds_ca,
                                args.xds_cert, args.xds_key), indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        print(f"meshkeeper bootstrap: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
