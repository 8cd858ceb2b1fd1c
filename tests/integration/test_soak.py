"""The endurance soak of bench/soak.py (issue 16), 60 seconds of it: the same mesh, load and fault
schedule, the faults denser (each of the eight once, about 5 s apart after an 8 s warm-up), and the verdict
asserted: no failed request a retry could have saved, no RSS growth past 10% after warm-up, no
descriptor growth, every fault recovered from. Every process (and the cgroup and iptables rules of
the session-expiry and partition faults) is removed in ``run``'s ``finally`` and the faults'
context managers, whatever happened. Load: 50 req/s (the 10-minute bench runs 100).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("bench_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_a_60_second_soak_loses_no_request_and_leaks_nothing(tmp_path):
    soak = load_soak()
    result = soak.run(60.0, 50.0, tmp_path / "soak", partition=True)
    (tmp_path / "soak.json").write_text(json.dumps(result, indent=1))
    summary = soak.markdown(result)
    print(summary)
    assert result["verdict"]["pass"], f"{summary}\nfailures: {result['failures'][:5]}\nlogs: {tmp_path / 'soak'}"
    assert result["sent"] >= 0.95 * 60 * 50, "the load was not offered at its rate"
    injected = {e["fault"] for e in result["events"]}
    assert injected | set(result["faults_skipped"]) == {
        "app-sigkill", "sidecar-sigkill", "slow-upstream", "controlplane-sigkill", "zookeeper-leader-sigkill",
        "zookeeper-session-expiry", "rolling-sigterm", "pod-partition"}
