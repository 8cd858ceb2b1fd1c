"""`meshkeeper demo` end to end: it runs, splits catalog traffic by weight, and cleans up."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from meshkeeper.demo.process import meshkeeper_argv

pytestmark = pytest.mark.integration


def test_demo_runs_splits_by_weight_and_leaves_nothing_behind():
    proc = subprocess.run(meshkeeper_argv("demo", "--duration", "6"), capture_output=True, text=True, timeout=90)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    workdir = re.search(r"starting in (\S+)", out).group(1)
    assert re.search(r"^console\s+http://127\.0\.0\.1:\d+/ ", out, re.M), out[:2000]  # one line to open
    assert not Path(workdir).exists()
    # The last table: weights 1, 2, 7 and their share of the answered requests.
    table = out.rsplit("instance ", 1)[1]
    rows = re.findall(r"^\S+:\d+\s+v\d\s+(\d+)\s+[\d.]+%\s+\d+\s+(\d+)\s+([\d.]+)%$", table, re.M)
    assert sorted(int(w) for w, _, _ in rows) == [1, 2, 7], table
    answered = int(re.search(r"(\d+) answered, (\d+) failed", table).group(1))
    assert answered >= 100 and "0 failed" in table
    for weight, _, share in rows:
        assert abs(float(share) - int(weight) * 10) <= 5, table
    # Nothing the demo started is still running.
    cmdlines = []
    for f in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdlines.append(f.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # the process ended while we looked
            pass
    assert not [c for c in cmdlines if workdir in c or "meshkeeper.demo.app" in c]


def test_demo_on_a_zookeeper_ensemble():
    proc = subprocess.run(meshkeeper_argv("demo", "--zk-ensemble", "3", "--duration", "4"), capture_output=True,
                          text=True, timeout=90)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    hosts = re.search(r"^ZooKeeper\s+ensemble of 3: (\S+)", out, re.M).group(1)
    assert len(hosts.split(",")) == 3
    assert len(re.findall(r"^\s+server \d 127\.0\.0\.1:\d+ pid \d+", out, re.M)) == 3
    # The status under the table: one leader, two followers.
    status = re.findall(r"^ZooKeeper\s+ensemble: (.*)$", out, re.M)[-1]
    assert sorted(m.split(" ", 1)[1] for m in status.split(", ")) == ["follower", "follower", "leader"], status
    assert " 0 failed" in out.rsplit("instance ", 1)[1]
    assert not Path(re.search(r"starting in (\S+)", out).group(1)).exists()
