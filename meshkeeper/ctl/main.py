"""The operator verbs of ``meshkeeper`` (DESIGN §9; README "Operating the mesh (CLI)").

Every verb takes the connection flags (``--cp``, ``--token``, ``--ca/--cert/--key``, ``--timeout``)
and ``-n``/``-o``, after the verb or before it. Exit codes: 0 done; 1 the call failed (the gRPC
status in words) or a file could not be read; 2 a usage mistake; 130 interrupted (``events``
exits 0 on Ctrl-C). Every failure is one line on stderr: ``meshkeeper: <what>``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from meshkeeper.admin.v1 import admin_pb2 as pb
from meshkeeper.cliargs import ArgumentParser, seconds
from meshkeeper.ctl import render
from meshkeeper.ctl.client import DEFAULT_CP, Client, CtlError, Target
from meshkeeper.registry import MAX_WEIGHT

EVENT_KINDS = ("registry", "push", "nack", "admin_write", "alert", "zookeeper")
ALERT_CONDITIONS = (("error_ratio", "--error-ratio", float), ("p99_latency_ms", "--p99-latency-ms", float),
                    ("serving_instances", "--instances-below", int), ("nacks", "--nacks-above", int))
PROXY_TYPES = ("cds", "eds", "lds", "rds", "rtds")
PEER_AUTH_MODES = ("STRICT", "PERMISSIVE", "DISABLE")  # meshkeeper.security.MODES (a test checks)
S = argparse.SUPPRESS


# --------------------------------------------------------------------------- argument types


MAX_VERSION = 2**31 - 1  # a ZooKeeper version is a signed 32-bit int


def _hostport(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return text


def _version(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -2
    if not -1 <= n <= MAX_VERSION:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version (a number, -1: must not exist yet)")
    return n


def _weight(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a weight (a whole number, 0 drains)") from None
    if not 0 <= n <= MAX_WEIGHT:
        raise argparse.ArgumentTypeError(f"{n} is not a weight (0..{MAX_WEIGHT}; 0 drains)")
    return n


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    for k in kinds:
        if k not in EVENT_KINDS:
            raise argparse.ArgumentTypeError(f"{k!r} is not an event kind ({', '.join(EVENT_KINDS)})")
    return kinds


def _pairs(parser: argparse.ArgumentParser, items: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"{item!r}: expected {what}")
        if key in out:
            parser.error(f"{key!r} is given twice")
        out[key] = value
    return out


# --------------------------------------------------------------------------- the parser


def _common() -> ArgumentParser:
    """Flags of every verb. Defaults are filled in after parsing (SUPPRESS), so that a flag given
    before the verb is not overwritten by the verb's own default."""
    p = ArgumentParser(add_help=False)
    g = p.add_argument_group("control plane")
    g.add_argument("--cp", type=_hostport, default=S, metavar="HOST:PORT",
                   help=f"the control plane's xDS/admin port (env MESHKEEPER_CP, default {DEFAULT_CP})")
    g.add_argument("--token", default=S, help="bearer token (env MESHKEEPER_TOKEN)")
    g.add_argument("--timeout", type=seconds, default=S, metavar="SECONDS", help="deadline of each call (default 10)")
    g.add_argument("--ca", dest="tls_ca", default=S, metavar="FILE", help="TLS to the control plane, trusting this CA")
    g.add_argument("--cert", dest="tls_cert", default=S, metavar="FILE", help="client certificate for mutual TLS (with --key)")
    g.add_argument("--key", dest="tls_key", default=S, metavar="FILE", help="client certificate's private key")
    g.add_argument("--tls-server-name", default=S, metavar="NAME",
                   help="the name the control plane's certificate must carry, when not the --cp host")
    p.add_argument("-n", "--namespace", default=S, help='namespace (default "default")')
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default=S, help="output format (default table)")
    return p


def _writes() -> ArgumentParser:
    p = ArgumentParser(add_help=False)
    p.add_argument("--if-version", type=_version, default=S, metavar="N",
                   help="write only if the object is still at version N (-1: only if it does not exist)")
    return p


def _all_namespaces() -> ArgumentParser:
    p = ArgumentParser(add_help=False)
    p.add_argument("-A", "--all-namespaces", action="store_true", default=S, help="every namespace")
    return p


def build_parser() -> ArgumentParser:
    common, writes, every_ns = _common(), _writes(), _all_namespaces()
    top = ArgumentParser(prog="meshkeeper", parents=[common],
                         description="Operate the mesh through the control plane's admin API.")
    verbs = top.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(sub: Any, name: str, func: Callable[..., int], help: str, *, write: bool = False,
             aliases: Sequence[str] = (), all_ns: bool = False) -> ArgumentParser:
        parents = [common, *([writes] if write else []), *([every_ns] if all_ns else [])]
        p = sub.add_parser(name, parents=parents, help=help, description=help, aliases=list(aliases))
        p.set_defaults(func=func, parser=p)
        return p

    get = verbs.add_parser("get", parents=[common], help="list services, a service's endpoints, or proxies")
    what = get.add_subparsers(dest="resource", metavar="RESOURCE", required=True)
    verb(what, "services", cmd_services, "services of a namespace", aliases=["service", "svc"])
    p = verb(what, "endpoints", cmd_endpoints, "a service's endpoints: weights, switches, load",
             aliases=["endpoint", "ep"])
    p.add_argument("service", metavar="SVC")
    verb(what, "proxies", cmd_proxies, "proxies connected to the control plane, and their xDS sync state",
         aliases=["proxy"], all_ns=True)
    verb(verbs, "proxy-status", cmd_proxies, "same as `get proxies`", aliases=["ps"], all_ns=True)

    p = verb(verbs, "weight", cmd_weight, "set an endpoint's weight (0 drains it)", write=True)
    p.add_argument("service", metavar="SVC")
    p.add_argument("address", type=_hostport, metavar="HOST:PORT")
    p.add_argument("weight", type=_weight, metavar="N")
    for name, help in (("enable", "put an endpoint back into balancing"),
                       ("disable", "take an endpoint out of balancing"),
                       ("reset", "clear an operator's override of an endpoint (weight and switch)")):
        p = verb(verbs, name, cmd_reset if name == "reset" else cmd_enable, help, write=True)
        p.add_argument("service", metavar="SVC")
        p.add_argument("address", type=_hostport, metavar="HOST:PORT")

    policy = verbs.add_parser("policy", parents=[common], help="a service's traffic policy")
    sub = policy.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = verb(sub, "get", cmd_policy_get, "print the policy (YAML; -o json for the API object)")
    p.add_argument("service", metavar="SVC")
    p = verb(sub, "set", cmd_policy_set, "replace the policy with a YAML or JSON file", write=True)
    p.add_argument("service", metavar="SVC")
    p.add_argument("-f", "--filename", required=True, metavar="FILE", help="the policy; - reads stdin")

    p = verb(verbs, "split", cmd_split, "split traffic between versions: split SVC v1=90 v2=10 "
             "(split SVC --clear removes the split)", write=True)
    p.add_argument("service", metavar="SVC")
    p.add_argument("split", nargs="*", metavar="VERSION=PERCENT")
    p.add_argument("--clear", action="store_true", help="remove the split: the route goes to the whole service")

    cfg = verbs.add_parser("config", parents=[common], help="a service's runtime config (RTDS, the app's /runtime)")
    sub = cfg.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = verb(sub, "get", cmd_config_get, "print the config, or one key's value")
    p.add_argument("service", metavar="SVC")
    p.add_argument("key", nargs="?", metavar="KEY")
    p = verb(sub, "set", cmd_config_set, "set keys (merged into the current config)", write=True)
    p.add_argument("service", metavar="SVC")
    p.add_argument("values", nargs="+", metavar="KEY=VALUE")
    p = verb(sub, "delete", cmd_config_delete, "delete a key", write=True)
    p.add_argument("service", metavar="SVC")
    p.add_argument("key", metavar="KEY")

    p = verb(what, "alerts", cmd_alerts, "alert rules and their state (inactive, pending, firing)", aliases=["alert"])
    p.add_argument("name", nargs="?", metavar="NAME")
    alert = verbs.add_parser("alert", parents=[common], help="alert rules (docs/alerts.md)")
    sub = alert.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = verb(sub, "set", cmd_alert_set, "create or replace a rule, from a YAML or JSON file or from flags", write=True)
    p.add_argument("name", metavar="NAME")
    p.add_argument("-f", "--filename", metavar="FILE", help="the rule; - reads stdin")
    p.add_argument("--service", metavar="SVC")
    for cond, flag, kind in ALERT_CONDITIONS:
        p.add_argument(flag, dest=cond, type=kind, metavar="N", help=f"condition {cond}")
    p.add_argument("--for", dest="for_", metavar="DURATION", help="how long the condition must hold (30s, 5m)")
    p.add_argument("--severity", choices=("critical", "warning", "info"))
    p.add_argument("--min-rps", type=float, metavar="RPS", help="no error_ratio or p99 alert below this rate")
    p.add_argument("--summary")
    p.add_argument("--description")
    p.add_argument("--webhook", action="append", metavar="URL", help="also POST to this URL (repeatable)")
    p = verb(sub, "delete", cmd_alert_delete, "delete a rule", write=True)
    p.add_argument("name", metavar="NAME")

    p = verb(verbs, "proxy-config", cmd_proxy_config, "what a proxy has ACKed, per xDS type", aliases=["pc"])
    p.add_argument("node", metavar="NODE", help="node id, its unique end (10.0.0.1~catalog-15006.default) or its instance HOST:PORT")
    p.add_argument("--type", type=str.lower, choices=PROXY_TYPES, default=None, help="one type only")

    ident = verbs.add_parser("identity", parents=[common], help="workload identities (docs/identity.md)")
    sub = ident.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = verb(sub, "token", cmd_identity_token, "mint a bootstrap token for a service's sidecars "
             "(printed alone on stdout; role admin)")
    p.add_argument("service", metavar="SVC")

    authz = verbs.add_parser("authz", parents=[common],
                             help="a service's authorization policy: callers allowed or denied by identity")
    sub = authz.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = verb(sub, "get", cmd_authz_get, "print the policy (YAML; -o json for the API object)")
    p.add_argument("service", metavar="SVC")
    p = verb(sub, "set", cmd_authz_set, "replace the policy with a YAML or JSON file (role admin)", write=True)
    p.add_argument("service", metavar="SVC")
    p.add_argument("-f", "--filename", required=True, metavar="FILE", help="the policy; - reads stdin")
    p = verb(sub, "delete", cmd_authz_delete, "delete the policy: every caller is allowed again (role admin)",
             write=True)
    p.add_argument("service", metavar="SVC")

    peer = verbs.add_parser("peer-auth", parents=[common],
                            help="mutual TLS mode (PeerAuthentication) of a namespace, or of one service")
    sub = peer.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = verb(sub, "get", cmd_peer_auth_get, "print the mode set and the mode in effect (no SVC: the namespace's)")
    p.add_argument("service", nargs="?", default="", metavar="SVC")
    p = verb(sub, "set", cmd_peer_auth_set, "set the mode (no SVC: the namespace's; role admin)", write=True)
    p.add_argument("service", nargs="?", default="", metavar="SVC")
    p.add_argument("--mode", required=True, type=str.upper, choices=PEER_AUTH_MODES,
                   help="STRICT (mTLS only), PERMISSIVE (mTLS and plaintext) or DISABLE (plaintext)")
    p = verb(sub, "delete", cmd_peer_auth_delete, "delete the mode set: the namespace's, or PERMISSIVE, applies "
             "(no SVC: the namespace's; role admin)", write=True)
    p.add_argument("service", nargs="?", default="", metavar="SVC")

    p = verb(verbs, "events", cmd_events, "registry changes, pushes, NACKs and admin writes as they happen",
             all_ns=True)
    p.add_argument("--kind", type=_kinds, action="extend", nargs="+", default=None, metavar="KIND",
                   help=f"only these kinds ({', '.join(EVENT_KINDS)}; repeat or separate with commas)")
    return top


def _finish(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Target:
    """Fill in the defaults (flags, then environment) and check what argparse could not."""
    cp = getattr(args, "cp", None)
    if cp is None:
        cp = os.environ.get("MESHKEEPER_CP") or DEFAULT_CP
        try:
            _hostport(cp)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"MESHKEEPER_CP {exc}")
    args.namespace = getattr(args, "namespace", "default")
    args.output = getattr(args, "output", "table")
    args.if_version = getattr(args, "if_version", None)
    args.all_namespaces = getattr(args, "all_namespaces", False)
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if bool(cert) != bool(key):
        parser.error("--cert and --key go together (a client certificate and its key)")
    token = args.token if hasattr(args, "token") else os.environ.get("MESHKEEPER_TOKEN", "")
    return Target(cp=cp, token=token.strip(), timeout=getattr(args, "timeout", 10.0),
                  ca=getattr(args, "tls_ca", None), cert=cert, key=key,
                  server_name=getattr(args, "tls_server_name", None))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage mistake (already printed, one line)
        return exc.code if isinstance(exc.code, int) else 2
    parser: argparse.ArgumentParser = args.parser
    try:
        target = _finish(args, parser)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    client: Client | None = None
    try:
        client = Client(target)
        return int(args.func(args, client) or 0)
    except CtlError as exc:
        sys.stderr.write(f"meshkeeper: {exc.message}\n")
        return exc.exit_code
    except SystemExit as exc:  # parser.error() from a verb's own checks
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        return 0 if args.func is cmd_events else 130
    except BrokenPipeError:  # `meshkeeper get proxies | head`
        _silence_stdout()
        return 0
    finally:
        if client is not None:
            client.close()


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


# --------------------------------------------------------------------------- verbs


def _versioned(request: Any, args: argparse.Namespace) -> Any:
    if args.if_version is not None:
        request.expected_version = args.if_version
    return request


def _service_list_empty(what: str, args: argparse.Namespace) -> None:
    where = "any namespace" if args.all_namespaces else f"namespace {args.namespace!r}"
    render.note(f"No {what} found in {where}.")


def cmd_services(args: argparse.Namespace, client: Client) -> int:
    resp = client.call("ListServices", pb.ListServicesRequest(namespace=args.namespace))
    if not render.document(args.output, resp):
        if resp.services:
            render.services(resp.services)
        else:
            _service_list_empty("services", args)
    return 0


def cmd_endpoints(args: argparse.Namespace, client: Client) -> int:
    svc = client.call("GetService", pb.GetServiceRequest(namespace=args.namespace, service=args.service))
    if not render.document(args.output, svc):
        if svc.endpoints:
            render.endpoints(svc.endpoints)
        else:
            render.note(f"Service {args.service!r} in namespace {args.namespace!r} has no endpoints.")
    return 0


def cmd_proxies(args: argparse.Namespace, client: Client) -> int:
    ns = "" if args.all_namespaces else args.namespace
    resp = client.call("ListProxies", pb.ListProxiesRequest(namespace=ns))
    if not render.document(args.output, resp):
        if resp.proxies:
            render.proxies(resp.proxies, now=time.time(), namespaces=args.all_namespaces)
        else:
            _service_list_empty("proxies connected to this control plane", args)
    return 0


def _endpoint_what(args: argparse.Namespace) -> str:
    return f"the override of {args.address} of {args.service}"


def _print_endpoint(args: argparse.Namespace, ep: Any) -> int:
    if not render.document(args.output, ep):
        render.endpoints([ep])
    return 0


def cmd_weight(args: argparse.Namespace, client: Client) -> int:
    req = _versioned(pb.SetWeightRequest(namespace=args.namespace, service=args.service, address=args.address,
                                         weight=args.weight), args)
    return _print_endpoint(args, client.call("SetWeight", req, _endpoint_what(args), args.if_version))


def cmd_enable(args: argparse.Namespace, client: Client) -> int:
    req = _versioned(pb.SetEnabledRequest(namespace=args.namespace, service=args.service, address=args.address,
                                          enabled=args.verb == "enable"), args)
    return _print_endpoint(args, client.call("SetEnabled", req, _endpoint_what(args), args.if_version))


def cmd_reset(args: argparse.Namespace, client: Client) -> int:
    req = _versioned(pb.ClearOverrideRequest(namespace=args.namespace, service=args.service,
                                             address=args.address), args)
    return _print_endpoint(args, client.call("ClearOverride", req, _endpoint_what(args), args.if_version))


def _print_policy(args: argparse.Namespace, policy: Any) -> int:
    if not render.document(args.output, policy):
        render.write(render.policy_yaml(policy))
    return 0


def cmd_policy_get(args: argparse.Namespace, client: Client) -> int:
    return _print_policy(args, client.call("GetPolicy", pb.GetPolicyRequest(namespace=args.namespace,
                                                                            service=args.service)))


def _read_policy(path: str, what: str = "policy") -> str:
    """The policy in ``path`` (``-``: stdin), YAML or JSON, as the JSON text the API takes."""
    import yaml

    name = "stdin" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        raise CtlError(f"cannot read {name}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CtlError(f"cannot read {name}: not UTF-8 text") from None
    if not text.strip():
        raise CtlError(f"{name} is empty; a {what} is a mapping of fields")
    try:
        body = json.loads(text)
    except ValueError:
        try:
            body = render.load_yaml(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise CtlError(f"{name} is not valid YAML or JSON: {problem}{where}") from None
    if not isinstance(body, dict):
        raise CtlError(f"{name}: a {what} is a mapping of fields, not a {type(body).__name__}")
    try:
        return json.dumps(body)
    except (TypeError, ValueError) as exc:
        raise CtlError(f"{name}: {exc}") from None


def cmd_policy_set(args: argparse.Namespace, client: Client) -> int:
    req = _versioned(pb.SetPolicyRequest(namespace=args.namespace, service=args.service,
                                         json=_read_policy(args.filename)), args)
    return _print_policy(args, client.call("SetPolicy", req, f"the policy of {args.service}", args.if_version))


def cmd_split(args: argparse.Namespace, client: Client) -> int:
    if args.clear == bool(args.split):
        args.parser.error("give VERSION=PERCENT pairs (like v1=90 v2=10), or --clear")
    split: dict[str, int] = {}
    for name, value in _pairs(args.parser, args.split, "VERSION=PERCENT, like v1=90").items():
        if not (value.isascii() and value.isdigit()):
            args.parser.error(f"{name}={value}: the percent must be a whole number 0-100")
        split[name] = int(value)
    total = sum(split.values())
    if split and total != 100:
        args.parser.error(f"the percents add up to {total}, not 100")
    req = _versioned(pb.SetTrafficSplitRequest(namespace=args.namespace, service=args.service, split=split), args)
    return _print_policy(args, client.call("SetTrafficSplit", req, f"the policy of {args.service}", args.if_version))


def _print_config(args: argparse.Namespace, cfg: Any) -> int:
    if not render.document(args.output, cfg):
        if cfg.values:
            render.config(cfg.values)
        else:
            render.note(f"No runtime config for {args.service!r} in namespace {args.namespace!r}.")
    return 0


def cmd_config_get(args: argparse.Namespace, client: Client) -> int:
    cfg = client.call("GetConfig", pb.GetConfigRequest(namespace=args.namespace, service=args.service))
    if args.key is None:
        return _print_config(args, cfg)
    if args.key not in cfg.values:
        raise CtlError(f"the runtime config of {args.service} has no key {args.key!r}")
    if args.output == "table":
        render.write(cfg.values[args.key] + "\n")  # the bare value, for $(meshkeeper config get svc key)
        return 0
    one = pb.RuntimeConfig()
    one.CopyFrom(cfg)
    one.values.clear()
    one.values[args.key] = cfg.values[args.key]
    render.document(args.output, one)
    return 0


def cmd_config_set(args: argparse.Namespace, client: Client) -> int:
    values = _pairs(args.parser, args.values, "KEY=VALUE")
    req = _versioned(pb.SetConfigRequest(namespace=args.namespace, service=args.service, values=values), args)
    return _print_config(args, client.call("SetConfig", req, f"the runtime config of {args.service}",
                                           args.if_version))


def cmd_config_delete(args: argparse.Namespace, client: Client) -> int:
    req = _versioned(pb.DeleteConfigKeyRequest(namespace=args.namespace, service=args.service, key=args.key), args)
    return _print_config(args, client.call("DeleteConfigKey", req, f"the runtime config of {args.service}",
                                           args.if_version))


def _resolve_node(client: Client, node: str) -> str:
    """A node id as given when a connected proxy has it; otherwise the one proxy whose id ends with
    ``~NODE`` or whose instance is NODE (as istioctl takes a pod's name). Nothing matching: as given,
    for the control plane to say."""
    ids = {p.node_id: p.instance for p in client.call("ListProxies", pb.ListProxiesRequest(namespace="")).proxies}
    if node in ids:
        return node
    found = sorted(n for n, instance in ids.items() if n.endswith("~" + node) or instance == node)
    if len(found) > 1:
        raise CtlError(f"{node!r} matches {len(found)} proxies: {', '.join(found)}")
    return found[0] if found else node


def cmd_proxy_config(args: argparse.Namespace, client: Client) -> int:
    node = _resolve_node(client, args.node)
    cfg = client.call("GetProxyConfig", pb.GetProxyConfigRequest(node_id=node))
    order = {t: i for i, t in enumerate(render.CONFIG_TYPES)}
    types = sorted(cfg.types, key=lambda t: order.get(render.short_type(t.type), len(order)))
    if args.type:
        types = [t for t in types if render.short_type(t.type) == args.type.upper()]
    if render.document(args.output, render.proxy_config_document(cfg, types)):
        return 0
    if not types:
        which = f"{args.type.upper()} " if args.type else ""
        render.note(f"Proxy {cfg.node_id or node} has ACKed no {which}resources yet.")
        return 0
    render.proxy_config(cfg, types)
    return 0


def cmd_events(args: argparse.Namespace, client: Client) -> int:
    # Ctrl-C ends the stream even when started from a shell that ignores SIGINT for background
    # jobs (Python then installs no handler of its own); on the main thread only, as signals require.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    kinds = [k for group in args.kind or [] for k in group]  # --kind push,nack --kind registry
    req = pb.WatchEventsRequest(namespace="" if args.all_namespaces else args.namespace, kinds=kinds)
    for ev in client.stream("WatchEvents", req):
        if args.output == "table":
            line = render.event_line(ev)
        elif args.output == "json":
            line = render.to_json(ev, indent=None)
        else:
            line = "---\n" + render.dump_yaml(render.to_dict(ev)).rstrip("\n")
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    return 0


def cmd_alerts(args: argparse.Namespace, client: Client) -> int:
    resp = client.call("ListAlerts", pb.ListAlertsRequest(namespace=args.namespace, name=args.name or ""))
    if not render.document(args.output, resp):
        if resp.alerts:
            render.alerts(resp.alerts, now=time.time())
        else:
            render.note(f"No alert rules in namespace {args.namespace!r}.")
    return 0


def _alert_rule(args: argparse.Namespace) -> str:
    """The rule's JSON from -f, or from the flags (the control plane validates either)."""
    conditions = [(cond, getattr(args, cond)) for cond, _, _ in ALERT_CONDITIONS if getattr(args, cond) is not None]
    flags = {"for": args.for_, "severity": args.severity, "min_rps": args.min_rps, "summary": args.summary,
             "description": args.description, "webhooks": args.webhook}
    if args.filename:
        if args.service or conditions or any(v is not None for v in flags.values()):
            args.parser.error("give the rule with -f or with flags, not both")
        return _read_policy(args.filename, "rule")
    if not args.service or len(conditions) != 1:
        args.parser.error("give -f FILE, or --service and one condition "
                          f"({', '.join(flag for _, flag, _ in ALERT_CONDITIONS)})")
    rule = {"service": args.service, "condition": conditions[0][0], "threshold": conditions[0][1]}
    rule.update({k: v for k, v in flags.items() if v is not None})
    return json.dumps(rule)


def _print_alert(args: argparse.Namespace, alert: Any) -> int:
    if not render.document(args.output, alert):
        render.alerts([alert], now=time.time())
    return 0


def cmd_alert_set(args: argparse.Namespace, client: Client) -> int:
    req = _versioned(pb.SetAlertRequest(namespace=args.namespace, name=args.name, json=_alert_rule(args)), args)
    return _print_alert(args, client.call("SetAlert", req, f"the alert rule {args.name}", args.if_version))


def cmd_alert_delete(args: argparse.Namespace, client: Client) -> int:
    req = _versioned(pb.DeleteAlertRequest(namespace=args.namespace, name=args.name), args)
    client.call("DeleteAlert", req, f"the alert rule {args.name}", args.if_version)
    render.note(f"Alert rule {args.name!r} deleted from namespace {args.namespace!r}.")
    return 0


def cmd_identity_token(args: argparse.Namespace, client: Client) -> int:
    resp = client.call("IssueIdentityToken", pb.IssueIdentityTokenRequest(namespace=args.namespace,
                                                                          service=args.service))
    if not render.document(args.output, resp):
        render.write(resp.token + "\n")  # alone, for $(meshkeeper identity token SVC) and Secrets
        render.note(f"Bootstrap token for {resp.spiffe_id}: a credential, keep it as a Secret.")
    return 0


# --------------------------------------------------------------------------- authz and peer-auth


def _print_authz(args: argparse.Namespace, authz: Any) -> int:
    if not render.document(args.output, authz):
        render.write(render.authz_yaml(authz))
    return 0


def cmd_authz_get(args: argparse.Namespace, client: Client) -> int:
    return _print_authz(args, client.call("GetAuthz", pb.GetAuthzRequest(namespace=args.namespace,
                                                                         service=args.service)))


def cmd_authz_set(args: argparse.Namespace, client: Client) -> int:
    req = _versioned(pb.SetAuthzRequest(namespace=args.namespace, service=args.service,
                                        json=_read_policy(args.filename, "authz policy")), args)
    return _print_authz(args, client.call("SetAuthz", req, f"the authz policy of {args.service}", args.if_version))


def cmd_authz_delete(args: argparse.Namespace, client: Client) -> int:
    req = _versioned(pb.DeleteAuthzRequest(namespace=args.namespace, service=args.service), args)
    resp = client.call("DeleteAuthz", req, f"the authz policy of {args.service}", args.if_version)
    if not render.document(args.output, resp):
        render.note(f"Authz policy of {args.service!r} deleted from namespace {args.namespace!r}: "
                    "every caller is allowed.")
    return 0


def _peer_auth_what(args: argparse.Namespace) -> str:
    return f"the peer authentication of {args.service or f'namespace {args.namespace}'}"


def _print_peer_auth(args: argparse.Namespace, pa: Any) -> int:
    if not render.document(args.output, pa):
        render.peer_authentication([pa])
    return 0


def cmd_peer_auth_get(args: argparse.Namespace, client: Client) -> int:
    return _print_peer_auth(args, client.call("GetPeerAuthentication", pb.GetPeerAuthenticationRequest(
        namespace=args.namespace, service=args.service)))


def cmd_peer_auth_set(args: argparse.Namespace, client: Client) -> int:
    req = _versioned(pb.SetPeerAuthenticationRequest(namespace=args.namespace, service=args.service,
                                                     mode=args.mode), args)
    return _print_peer_auth(args, client.call("SetPeerAuthentication", req, _peer_auth_what(args), args.if_version))


def cmd_peer_auth_delete(args: argparse.Namespace, client: Client) -> int:
    req = _versioned(pb.DeletePeerAuthenticationRequest(namespace=args.namespace, service=args.service), args)
    return _print_peer_auth(args, client.call("DeletePeerAuthentication", req, _peer_auth_what(args),
                                              args.if_version))
