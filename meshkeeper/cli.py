"""The ``meshkeeper`` command: one entry point for every process and verb (DESIGN §9).

Each subcommand's module parses its own flags; this only dispatches, so that ``meshkeeper sidecar``
does not import the control plane and the other way round.
"""

from __future__ import annotations

import sys

USAGE = """usage: meshkeeper <command> [flags]

commands:
  controlplane   run the control plane (xDS server, registry watch, HTTP admin)
  sidecar        run the sidecar beside one service instance
  demo           run a local mesh: ZooKeeper, a control plane, demo services and traffic
  doctor         check (--fix: repair) that the OTLP exporter and the Envoy protos import together

`meshkeeper <command> --help` shows a command's flags.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
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
    else:
        sys.stderr.write(f"meshkeeper: unknown command {cmd!r} (try: controlplane, sidecar, demo, doctor)\n")
        return 2
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
