"""``meshkeeper inject -f FILE|-``: istioctl kube-inject for Meshkeeper.

Reads a multi-document YAML file (``-``: stdin), injects the pod of every Pod, Deployment,
StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job and CronJob, passes other kinds
through, and writes the result to stdout for ``kubectl apply -f -``. Pods that are never injected
(opt-out, hostNetwork, kube-system, already injected) come out unchanged; one without any port to
call the app's comes out unchanged with a warning on stderr. Comments and key quoting of the input
are not kept (the documents are re-serialised). A file that cannot be read or parsed, a document
that is not a Kubernetes object, or an annotation that cannot be honoured: one line on stderr, exit 2.

Given the control plane's CA (``--ca-cert/--ca-key``, or ``--ca-passphrase-file`` /
``MESHKEEPER_CA_PASSPHRASE`` to read the CA the replicas share in ZooKeeper ``--zk``), each proxy
gets a bootstrap token for its service in ``MESHKEEPER_IDENTITY_TOKEN`` (docs/identity.md). A CA
that cannot be read: one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import yaml

from controlplane.ca.setup import add_token_arguments, token_minter
from controlplane.injector.patch import InjectConfig, InjectError
from controlplane.injector.workloads import describe, inject_object
from meshkeeper.cliargs import ArgumentParser, zk_hosts

PROG = "meshkeeper inject"


def add_injection_flags(p: argparse.ArgumentParser) -> None:
    """The flags ``meshkeeper inject`` and ``meshkeeper injector`` share."""
    defaults = InjectConfig()
    p.add_argument("--cp", default=defaults.cp, help="control plane HOST:PORT the proxies dial (default %(default)s)")
    p.add_argument("--zk", type=zk_hosts, default=defaults.zk, metavar="HOSTS",
                   help="ZooKeeper the proxies register in, HOST:PORT[,HOST:PORT...]: one server or every "
                        "server of an ensemble (default %(default)s)")
    p.add_argument("--image", default=defaults.image, help="image of meshkeeper-init and meshkeeper-proxy "
                                                          "(default %(default)s)")
    p.add_argument("--proxy-uid", type=_uid, default=defaults.proxy_uid,
                   help="uid the proxy runs as; its traffic is never captured (default %(default)s)")
    p.add_argument("--native-sidecar", action=argparse.BooleanOptionalAction, default=defaults.native_sidecar,
                   help="the proxy as a native sidecar (init container, restartPolicy Always; Kubernetes "
                        "1.29+, 1.28 with its feature gate); --no-native-sidecar: a regular first container (default: native)")
    add_token_arguments(p)


def config_from(args: argparse.Namespace) -> InjectConfig:
    return InjectConfig(cp=args.cp, zk=args.zk, image=args.image, proxy_uid=args.proxy_uid,
                        native_sidecar=args.native_sidecar, identity_tokens=getattr(args, "identity_tokens", None))


def check_token_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Read the CA of the token flags (``p.error`` when it cannot be read): ``args.identity_tokens``."""
    args.identity_tokens = token_minter(p, args)


def _uid(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-root uid")
    return int(text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description="Add the Meshkeeper sidecar to the pods of Kubernetes manifests "
                                              "(as istioctl kube-inject); the result goes to stdout.")
    p.add_argument("-f", "--filename", required=True, metavar="FILE|-", help="manifests to inject ('-': stdin)")
    add_injection_flags(p)
    args = p.parse_args(argv)
    check_token_arguments(p, args)
    return args


def inject_documents(text: str, config: InjectConfig, warn: TextIO) -> str:
    """The injected YAML of a multi-document YAML text. Raises InjectError, yaml.YAMLError."""
    out: list[Any] = []
    for n, doc in enumerate(yaml.safe_load_all(text), 1):
        if doc is None:
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
            raise InjectError(f"document {n} is not a Kubernetes object (no kind)")
        try:
            injected, result = inject_object(doc, config)
        except InjectError as exc:
            raise InjectError(f"{describe(doc)}: {exc}") from None
        if result is not None and result.warn:
            warn.write(f"{PROG}: {describe(doc)}: not injected: {result.skipped}\n")
        out.append(injected)
    return yaml.dump_all(out, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         explicit_start=len(out) > 1)


class _Dumper(yaml.SafeDumper):
    """Never ``&id001`` anchors: kubectl reads them, but people reviewing the output should not have to."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            with open(args.filename, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        sys.stderr.write(f"{PROG}: cannot read {args.filename}: {getattr(exc, 'strerror', None) or exc}\n")
        return 2
    try:
        result = inject_documents(text, config_from(args), sys.stderr)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        sys.stderr.write(f"{PROG}: {args.filename}: not valid YAML{at}: {problem}\n")
        return 2
    except InjectError as exc:
        sys.stderr.write(f"{PROG}: {args.filename}: {exc}\n")
        return 2
    sys.stdout.write(result)
    return 0
