"""How fast an operator's change reaches the data path, through the admin API.

Starts a local mesh (ZooKeeper, one control plane, three catalog instances and a frontend, each
with its sidecar; meshkeeper.demo.mesh) and, for ``--rounds`` rounds, measures from the moment an
admin RPC returns:

* ``disable``: SetEnabled(false) until the frontend sidecar's ``/clusters`` no longer lists the
  endpoint as serving, and ``enable`` until it is back;
* ``weight``: SetWeight until the frontend sidecar shows the new weight;
* ``config``: SetConfig until a long poll on a catalog sidecar's ``/runtime`` (held before the
  write) returns the new values;
* and the RPC itself (client-side round trip of SetEnabled, through ZooKeeper).

The registry watch debounces changes for 100 ms (``--debounce-ms``), which is the floor of every
figure but the RPC's. Sidecar ``/clusters`` is polled every 2 ms.

    .venv/bin/python bench/admin_convergence.py --rounds 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshkeeper.admin.v1 import admin_pb2 as pb  # noqa: E402
from meshkeeper.admin.v1 import admin_pb2_grpc  # noqa: E402
from meshkeeper.demo.mesh import LocalMesh  # noqa: E402

POLL = 0.002


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def serving(admin_url: str, cluster: str) -> dict[str, int]:
    for c in get_json(f"{admin_url}/clusters")["clusters"]:
        if c["name"] == cluster:
            return {f"{e['address']}:{e['port']}": e["weight"] for e in c["endpoints"] if e["serving"]}
    return {}


def until(predicate, timeout: float = 5.0) -> float:
    """Seconds until ``predicate()`` holds, polling every POLL."""
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > timeout:
            raise TimeoutError("no convergence within 5 s")
        time.sleep(POLL)
    return time.perf_counter() - start


def summary(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
    return (f"{name:<22} n={len(ms):<3} median {statistics.median(ms):7.1f} ms   p90 {p90:7.1f} ms   "
            f"max {ms[-1]:7.1f} ms")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()

    mesh = LocalMesh()
    try:
        mesh.start_registry()
        catalog = [mesh.add_instance("catalog", v, w) for v, w in (("v1", 1), ("v1", 2), ("v2", 7))]
        frontend = mesh.add_instance("frontend", "v1", 10, call="http://catalog/")
        mesh.wait_ready()
        stub = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(mesh.cp_address))
        cluster = "outbound|catalog.default"
        victim = f"127.0.0.1:{catalog[2].inbound_port}"
        until(lambda: len(serving(frontend.admin_url, cluster)) == 3, 30)
        rpc, off, on, weight, config = [], [], [], [], []
        for i in range(args.rounds):
            t0 = time.perf_counter()
            stub.SetEnabled(pb.SetEnabledRequest(service="catalog", address=victim, enabled=False), timeout=5)
            rpc.append(time.perf_counter() - t0)
            off.append(until(lambda: victim not in serving(frontend.admin_url, cluster)))
            stub.SetEnabled(pb.SetEnabledRequest(service="catalog", address=victim, enabled=True), timeout=5)
            on.append(until(lambda: victim in serving(frontend.admin_url, cluster)))
            w = 3 + i % 5
            stub.SetWeight(pb.SetWeightRequest(service="catalog", address=victim, weight=w), timeout=5)
            weight.append(until(lambda w=w: serving(frontend.admin_url, cluster).get(victim) == w))

            current = get_json(f"{catalog[0].admin_url}/runtime")["version"]
            answer: list[float] = []
            held = threading.Event()

            def poll(version: str = current, held: threading.Event = held, answer: list[float] = answer) -> None:
                held.set()
                get_json(f"{catalog[0].admin_url}/runtime?version={version}&wait=10", timeout=15)
                answer.append(time.perf_counter())

            t = threading.Thread(target=poll)
            t.start()
            held.wait()
            time.sleep(0.05)  # let the request reach the sidecar and be held
            stub.SetConfig(pb.SetConfigRequest(service="catalog", values={"round": str(i)}), timeout=5)
            written = time.perf_counter()
            t.join(15)
            config.append(answer[0] - written)
        print(f"{args.rounds} rounds; control plane debounce 100 ms; sidecar /clusters polled every 2 ms")
        for name, values in (("SetEnabled RPC", rpc), ("disable -> out", off), ("enable -> back", on),
                             ("weight -> applied", weight), ("config -> long poll", config)):
            print(summary(name, values))
    finally:
        mesh.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
