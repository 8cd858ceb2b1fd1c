"""The OTLP exporter and the Envoy protos import together (meshkeeper.deps, DESIGN §4a).

xds-protos ships older copies of ``opentelemetry/proto`` and ``google/rpc``; installed in the wrong
order they break the OTLP exporter with no complaint from pip. These tests make CI fail instead of a
user's sidecar: in this process, in a fresh one, and through ``meshkeeper doctor``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from meshkeeper import deps

FRESH_PROCESS = """
import envoy.service.discovery.v3.ads_pb2
import envoy.service.load_stats.v3.lrs_pb2
from envoy.config.cluster.v3 import cluster_pb2
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

exporter = OTLPSpanExporter(endpoint="127.0.0.1:4317", insecure=True, timeout=1)
cluster = cluster_pb2.Cluster(name="outbound|catalog.shop", type=cluster_pb2.Cluster.EDS)
assert cluster_pb2.Cluster.FromString(cluster.SerializeToString()).name == "outbound|catalog.shop"
assert InstrumentationScope(name="meshkeeper.sidecar").name == "meshkeeper.sidecar"
exporter.shutdown()

from meshkeeper import deps
assert deps.problems() == [], deps.problems()
print("imports ok")
"""


def test_no_problems_in_this_process_after_importing_both() -> None:
    import envoy.config.cluster.v3.cluster_pb2  # noqa: F401
    import envoy.service.discovery.v3.ads_pb2  # noqa: F401
    import envoy.service.load_stats.v3.lrs_pb2  # noqa: F401
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: F401

    assert deps.problems() == []


def test_no_problems_in_a_fresh_process() -> None:
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "imports ok" in done.stdout


def test_doctor_says_ok() -> None:
    cli = Path(sys.executable).with_name("meshkeeper")  # the console script the package installs
    assert cli.exists(), f"{cli} missing: install the package (make venv)"
    done = subprocess.run([str(cli), "doctor"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("meshkeeper doctor: ok"), done.stdout
