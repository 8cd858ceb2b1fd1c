"""``meshkeeper iptables``: install, show or remove the capture rules of transparent mode (DESIGN §10).

The job of Istio's istio-iptables and Linkerd's proxy-init: run once as root in the pod's network
namespace (in Kubernetes, by an init container) before the app and the sidecar start. Every flag
is validated before anything runs; a bad flag is one line on stderr and exit code 2, and no rule
is touched. A missing iptables tool or missing privileges is one line and exit code 1.

docs/transparent.md explains the rules; :mod:`.rules` generates them, :mod:`.ruleset` plans the
change against what is installed, :mod:`.apply` runs the tools.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from meshkeeper.cliargs import ArgumentParser
from sidecar.interception import apply, rules, ruleset
from sidecar.interception.rules import CaptureConfig, Network

MAX_ID = 2**32 - 2  # (uid_t)-1 means "no id"


def _id(kind: str):
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) > MAX_ID:
            raise argparse.ArgumentTypeError(f"{text!r} is not a numeric {kind} (names are not looked up)")
        return int(text)

    return parse


def listener_port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def port_list(text: str) -> tuple[int, ...]:
    """``8080,9090``; empty for none."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if "*" in items:
        raise argparse.ArgumentTypeError(f"{text!r}: '*' is not allowed here" if items == ["*"]
                                         else f"{text!r}: '*' cannot be mixed with ports")
    return tuple(sorted({listener_port(item) for item in items}))


def ports_or_all(text: str) -> tuple[int, ...] | None:
    """``*`` (every port: ``None``) or a port list."""
    return None if text.strip() == "*" else port_list(text)


def cidr_list(text: str) -> tuple[Network, ...]:
    """``10.0.0.0/8,fd00::/8``; a bare address is a /32 (/128); host bits are dropped."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if "*" in items:
        raise argparse.ArgumentTypeError(f"{text!r}: '*' is not allowed here" if items == ["*"]
                                         else f"{text!r}: '*' cannot be mixed with CIDRs")
    found: list[Network] = []
    for item in items:
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a CIDR (like 10.0.0.0/8)") from None
        if net not in found:
            found.append(net)
    return tuple(sorted(found, key=lambda n: (n.version, n)))


def cidrs_or_all(text: str) -> tuple[Network, ...] | None:
    return None if text.strip() == "*" else cidr_list(text)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="meshkeeper iptables",
        description="Install the transparent-mode capture rules in this network namespace (root). "
                    "LIST is comma-separated; '' means none. See docs/transparent.md.")
    p.add_argument("--proxy-uid", type=_id("uid"), default=rules.DEFAULT_PROXY_UID,
                   help="the sidecar's uid: its traffic is never captured (default %(default)s)")
    p.add_argument("--proxy-gid", type=_id("gid"), default=None,
                   help="also never capture traffic of this gid (default: uid only)")
    p.add_argument("--admin-port", type=listener_port, default=rules.DEFAULT_ADMIN_PORT)
    p.add_argument("--status-port", type=listener_port, default=rules.DEFAULT_STATUS_PORT,
                   help="the sidecar's status port (readiness, metrics): never captured inbound, so the "
                        "kubelet and Prometheus reach it (default %(default)s)")
    p.add_argument("--outbound-port", type=listener_port, default=rules.DEFAULT_OUTBOUND_PORT)
    p.add_argument("--inbound-port", type=listener_port, default=rules.DEFAULT_INBOUND_PORT)
    p.add_argument("--dns-port", type=listener_port, default=rules.DEFAULT_DNS_PORT)
    p.add_argument("--inbound-ports", type=ports_or_all, default=None, metavar="'*'|LIST",
                   help="pod ports whose inbound TCP is captured (default '*': all)")
    p.add_argument("--exclude-inbound-ports", type=port_list, default=(), metavar="LIST")
    p.add_argument("--exclude-outbound-ports", type=port_list, default=(), metavar="LIST")
    p.add_argument("--include-cidrs", type=cidrs_or_all, default=None, metavar="'*'|LIST",
                   help="destinations whose outbound TCP is captured (default '*': all)")
    p.add_argument("--exclude-cidrs", type=cidr_list, default=(), metavar="LIST")
    p.add_argument("--no-dns", action="store_true", help="do not capture DNS (port 53, UDP and TCP)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the iptables-restore input and change nothing")
    p.add_argument("--cleanup", action="store_true",
                   help="remove our rules and chains (nothing else); a no-op when there are none")
    return p


def config_from(args: argparse.Namespace, parser: ArgumentParser) -> CaptureConfig:
    """The validated config; contradictions between flags end the program with exit code 2."""
    listeners = {"--admin-port": args.admin_port, "--status-port": args.status_port, "--outbound-port": args.outbound_port,
                 "--inbound-port": args.inbound_port, "--dns-port": args.dns_port}
    seen: dict[int, str] = {}
    for flag, value in listeners.items():
        if value in seen:
            parser.error(f"{seen[value]} and {flag} are both {value}")
        seen[value] = flag
    for port in args.inbound_ports or ():
        if port in seen:
            parser.error(f"--inbound-ports: {port} is the sidecar's own port ({seen[port]})")
        if port in args.exclude_inbound_ports:
            parser.error(f"port {port} is in both --inbound-ports and --exclude-inbound-ports")
    for net in args.include_cidrs or ():
        if any(net.subnet_of(ex) for ex in args.exclude_cidrs if ex.version == net.version):
            parser.error(f"--include-cidrs {net} lies inside --exclude-cidrs: nothing would be captured")
    return CaptureConfig(
        proxy_uid=args.proxy_uid, proxy_gid=args.proxy_gid, admin_port=args.admin_port, status_port=args.status_port,
        outbound_port=args.outbound_port, inbound_port=args.inbound_port, dns_port=args.dns_port,
        inbound_ports=args.inbound_ports, exclude_inbound_ports=args.exclude_inbound_ports,
        exclude_outbound_ports=args.exclude_outbound_ports, include_cidrs=args.include_cidrs,
        exclude_cidrs=args.exclude_cidrs, dns=not args.no_dns)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from(args, parser)
    if args.dry_run and not args.cleanup:
        sys.stdout.write(render(config))
        return 0
    try:
        return _reconcile(config, args.cleanup, args.dry_run)
    except apply.InterceptionError as exc:
        sys.stderr.write(f"meshkeeper iptables: {exc}\n")
        return 1


def render(config: CaptureConfig) -> str:
    """What ``--dry-run`` prints: each family's ``iptables-restore`` input, under a comment line
    naming the tool (one family's part can be piped to that tool as it is)."""
    out = []
    for family in (apply.IPV4, apply.IPV6):
        out += [f"# {family.restore} --noflush", *rules.generate(config, family.version)]
    return "\n".join(out) + "\n"


def _reconcile(config: CaptureConfig, cleanup: bool, dry_run: bool) -> int:
    """Read every family first, then change them: a failure to read touches nothing."""
    if not apply.available(apply.IPV4):
        raise apply.InterceptionError("iptables-save/iptables-restore not found (install the iptables package)")
    plans: list[tuple[apply.Family, list[str]]] = []
    for family in (apply.IPV4, apply.IPV6):
        if family is apply.IPV6 and not apply.available(family):
            print(f"{family.label}: skipped ({family.restore} not found)")
            continue
        try:
            current = apply.read(family)
        except apply.InterceptionError as exc:
            if family is apply.IPV4:
                raise
            print(f"{family.label}: skipped ({exc})")
            continue
        wanted = [] if cleanup else rules.generate(config, family.version)
        plans.append((family, ruleset.plan(wanted, current)))
    for family, plan in plans:
        if dry_run:
            print(f"# {family.restore} --noflush", *(plan or ["# nothing to change"]), sep="\n")
            continue
        apply.write(family, plan)
        done = ("removed" if cleanup else "installed") if plan else ("nothing to remove" if cleanup else "unchanged")
        print(f"{family.label}: {done}")
    return 0
