"""The ``meshkeeper`` command: one entry point for every process and verb (DESIGN §9).

Each subcommand's module parses its own flags; this only dispatches, so that ``meshkeeper sidecar``
does not import the control plane and the other way round.
"""

from __future__ import annotations

import difflib
import sys

from meshkeeper.ctl import is_ctl_argument

USAGE = """usage: meshkeeper <command> [flags]

processes:
  controlplane   run the control plane (xDS server, registry watch, HTTP admin)
  sidecar        run the sidecar beside one service instance
  demo           run a local mesh: ZooKeeper, a control plane, demo services and traffic
  doctor         check (--fix: repair) that the OTLP exporter and the Envoy protos import together
  iptables       install (--cleanup: remove) transparent mode's capture rules in this network namespace
  injector       run the Kubernetes sidecar-injection webhook (HTTPS admission server)
  register       keep a gRPC/HTTP server without a sidecar registered while its health check passes

proxyless gRPC:
  bootstrap      bootstrap --proxyless [-n NS] [-o FILE]   a GRPC_XDS_BOOTSTRAP file for xds:///<svc>.<ns> targets

Kubernetes:
  inject         inject -f FILE|-                    add the sidecar to manifests (as istioctl kube-inject)

operating the mesh (the control plane's admin API):
  get            get services | get endpoints SVC | get proxies | get alerts   (-o json for scripts)
  weight         weight SVC HOST:PORT N              set an endpoint's weight (0 drains it)
  enable         enable SVC HOST:PORT                put an endpoint back into balancing
  disable        disable SVC HOST:PORT               take an endpoint out of balancing
  reset          reset SVC HOST:PORT                 clear an endpoint's override
  policy         policy get SVC | policy set SVC -f FILE|-           the traffic policy (YAML or JSON)
  split          split SVC v1=90 v2=10               split traffic between versions
  config         config get SVC [KEY] | set SVC K=V ... | delete SVC KEY   runtime config (RTDS)
  alert          alert set NAME -f FILE|--service SVC --error-ratio X ... | alert delete NAME   alert rules
  proxy-status   the proxies and their xDS sync state (same as `get proxies`; alias ps)
  proxy-config   proxy-config NODE [--type cds|eds|lds|rds|rtds]     what a proxy ACKed (alias pc)
  events         registry changes, pushes, NACKs, admin writes and alerts as they happen (Ctrl-C stops)
  identity       identity token SVC                  mint a bootstrap token for a service's sidecars (admin)
  authz          authz get SVC | authz set SVC -f FILE|- | authz delete SVC   authorization by caller identity
  peer-auth      peer-auth get [SVC] | set [SVC] --mode STRICT|PERMISSIVE|DISABLE | delete [SVC]   mTLS mode

  Every verb takes --cp HOST:PORT (MESHKEEPER_CP, default 127.0.0.1:15010), --token T
  (MESHKEEPER_TOKEN), -n NAMESPACE, -o table|json|yaml, --timeout SECONDS, --ca FILE
  [--cert FILE --key FILE]; writes take --if-version N. `meshkeeper ctl VERB ...` is the same as
  `meshkeeper VERB ...`.

`meshkeeper <command> --help` shows a command's flags.
"""

COMMANDS = ("controlplane", "sidecar", "demo", "doctor", "iptables", "inject", "injector", "register",
            "bootstrap", "get", "weight", "enable", "disable", "reset",
            "policy", "split", "config", "alert", "proxy-status", "proxy-config", "events", "identity",
            "authz", "peer-auth")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if argv[0] == "ctl" and len(argv) > 1 and is_ctl_argument(argv[1]):  # kubectl-like spelling
        argv = argv[1:]
    cmd, rest = argv[0], argv[1:]
    if cmd in ("--version", "version"):
        from meshkeeper import __version__

        print(f"meshkeeper {__version__}")
        return 0
    if cmd == "controlplane":
        from controlplane.main import main as run
    elif cmd == "sidecar":
        from sidecar.main import main as run
    elif cmd == "demo":
        from meshkeeper.demo import run
    elif cmd == "doctor":
        from meshkeeper.deps import main as run
    elif cmd == "iptables":
        from sidecar.interception.iptables import main as run
    elif cmd == "inject":
        from controlplane.injector.inject import main as run
    elif cmd == "injector":
        from controlplane.injector.webhook import main as run
    elif cmd == "register":
        from sidecar.register import main as run
    elif cmd == "bootstrap":
        from meshkeeper.bootstrap import main as run
    elif is_ctl_argument(cmd):  # an operator verb, or a flag of theirs before the verb
        from meshkeeper.ctl.main import main as ctl

        return int(ctl(argv) or 0)
    else:
        sys.stderr.write(f"meshkeeper: {_unknown(cmd)}\n")
        return 2
    return int(run(rest) or 0)


def _unknown(cmd: str) -> str:
    close = difflib.get_close_matches(cmd, COMMANDS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown command {cmd!r} ({hint}`meshkeeper --help` lists the commands)"


if __name__ == "__main__":
    sys.exit(main())
