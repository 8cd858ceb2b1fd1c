"""Dependencies that fight (DESIGN §4a): check, and repair, the protobuf packages xds-protos overwrites.

xds-protos ships its own, older copies of ``opentelemetry/proto`` and ``google/{api,rpc,type,...}``.
pip installs a package's deepest dependencies first, so a plain ``pip install meshkeeper`` puts
opentelemetry-proto and googleapis-common-protos down before xds-protos, whose copies then
overwrite theirs: the OTLP exporter fails to import (``cannot import name 'InstrumentationScope'``)
and ``pip check`` says nothing. Uninstalling xds-protos later deletes files such as
``google/rpc/status_pb2.py`` that googleapis-common-protos needs.

The fix is an order: xds-protos first, then the two owners of those files put back over it.
``make venv`` (and so ``make test`` and CI) runs :func:`repair` after installing the package;
anyone who installs with plain pip runs ``meshkeeper doctor --fix``. The sidecar refuses to start
tracing in a broken environment with a one-line message naming that command, and a test imports
the OTLP exporter and the Envoy protos in one process so that CI fails instead of a user's sidecar.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from importlib import metadata

# The distributions whose files xds-protos overwrites; reinstalled (same version, no deps) over it.
OVERWRITTEN = ("opentelemetry-proto", "googleapis-common-protos")

# What must import, in one process, for the sidecar and the control plane to work.
_CHECKS: tuple[tuple[str, str | None], ...] = (
    ("opentelemetry.proto.common.v1.common_pb2", "InstrumentationScope"),
    ("opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc", "TraceServiceStub"),
    ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "OTLPSpanExporter"),
    ("google.rpc.status_pb2", "Status"),
    ("envoy.service.discovery.v3.ads_pb2_grpc", "AggregatedDiscoveryServiceStub"),
    ("envoy.service.load_stats.v3.lrs_pb2_grpc", "LoadReportingServiceStub"),
    ("envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
     "HttpConnectionManager"),
)

REPAIR_HINT = "run `meshkeeper doctor --fix` (xds-protos overwrote opentelemetry-proto; see DESIGN §4a)"


def problems() -> list[str]:
    """What fails to import, one line each (empty: the environment is sound)."""
    found = []
    for module, name in _CHECKS:
        try:
            mod = importlib.import_module(module)
            if name is not None:
                getattr(mod, name)
        except Exception as exc:  # ImportError, AttributeError, protobuf descriptor errors
            found.append(f"{module}: {type(exc).__name__}: {exc}")
    return found


def repair_command() -> list[str]:
    """pip reinstalling the overwritten distributions at their installed versions, without deps."""
    pins = []
    for dist in OVERWRITTEN:
        try:
            pins.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pins.append(dist)
    return [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--force-reinstall", "--no-deps", *pins]


def repair() -> int:
    """Put the overwritten files back; returns pip's exit code."""
    return subprocess.call(repair_command())


def main(argv: list[str]) -> int:
    """``meshkeeper doctor [--fix]``: report (and with --fix repair) the environment."""
    from meshkeeper.cliargs import ArgumentParser

    p = ArgumentParser(prog="meshkeeper doctor",
                       description="Check that the OTLP exporter and the Envoy protos import in one process.")
    p.add_argument("--fix", action="store_true",
                   help=f"reinstall {' and '.join(OVERWRITTEN)} over xds-protos' copies, then check again")
    args = p.parse_args(argv)
    if args.fix:
        code = repair()
        if code:
            print(f"meshkeeper doctor: pip failed (exit {code}): {' '.join(repair_command())}", file=sys.stderr)
            return 1
        # The failed imports are cached in this process: check in a fresh one.
        return subprocess.call([sys.executable, "-m", "meshkeeper.cli", "doctor"])
    found = problems()
    if not found:
        print("meshkeeper doctor: ok (OTLP exporter and Envoy protos import together)")
        return 0
    for line in found:
        print(f"meshkeeper doctor: {line}", file=sys.stderr)
    print(f"meshkeeper doctor: {REPAIR_HINT}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
