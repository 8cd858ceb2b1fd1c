"""The endurance soak of bench/soak.py (issue 16), 60 seconds of it: the same mesh (mutual TLS on:
a CA in the control plane, a bootstrap token per sidecar, catalog and inventory STRICT, 20 s
certificates), load and fault schedule, the faults denser (each of the nine once, back to back after
a 6 s warm-up), and the verdict asserted: no failed request a retry
could have saved, no RSS growth past 10% after warm-up, no descriptor growth, every fault recovered
from, every fault seen in the metrics and in the control plane's event stream (exceptions:
:data:`KNOWN_INVISIBLE`, none now). Every process (and the cgroup
and iptables rules of the session-expiry and partition faults) is removed in ``run``'s ``finally``
and the faults' context managers, whatever happened. Load: 50 req/s (the 10-minute bench runs 100).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"
# Faults allowed to go unseen: none since the control plane publishes ``zookeeper`` events (a
# leader change was seen only in the metrics before; bench/RESULTS.md, "Soak").
KNOWN_INVISIBLE: set[str] = set()


def load_soak():
    spec = importlib.util.spec_from_file_location("bench_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_a_60_second_soak_loses_no_request_and_leaks_nothing(tmp_path):
    soak = load_soak()
    result = soak.run(60.0, 50.0, tmp_path / "soak", warmup=6.0, partition=True, mtls=True, cert_ttl=20)
    (tmp_path / "soak.json").write_text(json.dumps(result, indent=1))
    summary = soak.markdown(result)
    print(summary)
    verdict = result["verdict"]
    why = f"{summary}\nfailures: {result['failures'][:5]}\nlogs: {tmp_path / 'soak'}"
    assert all(ok for k, ok in verdict.items() if k not in ("faults_visible", "pass")), why
    assert set(result["invisible"]) <= KNOWN_INVISIBLE, why
    assert result["sent"] >= 0.95 * 60 * 50, "the load was not offered at its rate"
    injected = {e["fault"] for e in result["events"]}
    assert injected | set(result["faults_skipped"]) == {
        "app-sigkill", "sidecar-sigkill", "slow-upstream", "certificate-rotation", "controlplane-sigkill",
        "zookeeper-leader-sigkill", "zookeeper-session-expiry", "rolling-sigterm", "pod-partition"}
    assert "certificate-rotation" in injected
    # 20 s certificates over 60 s: every sidecar that ran throughout rotated at least twice.
    assert result["rotations"].get("sidecar-frontend-1", 0) >= 2, result["rotations"]
