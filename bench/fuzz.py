"""The long run of the fuzz properties (issue 16): the HTTP/1.1 path's and the mesh DNS's, by the million.

The properties are the suite's (tests/unit/test_fuzz_http1_proxy.py: any request stream, any
upstream response; test_fuzz_http1_codecs.py: each codec alone; test_fuzz_dns.py: any datagram to
the mesh DNS over UDP, any byte stream over TCP);
here each is run on random inputs through hypothesis' ``fuzz_one_input`` (what an external fuzzer
would call: the strategies read random bytes, and there is no shrinking, database or per-run
overhead), in one process per worker, until the time or the input count is up. A failure is kept
with its traceback and the bytes that replay it (``f.hypothesis.fuzz_one_input(blob)``) in
``--out``, the first of each distinct error only, and the run goes on.

    .venv/bin/python bench/fuzz.py --minutes 20 --workers 2
    .venv/bin/python bench/fuzz.py --inputs 1000000 --workers 2 --targets proxy
    .venv/bin/python bench/fuzz.py --inputs 1000000 --minutes 60 --workers 2 --targets dns-udp,dns-tcp
    .venv/bin/python bench/fuzz.py --replay bench/out/fuzz/proxy-1.bin --targets proxy
    .venv/bin/python bench/fuzz.py --minutes 5 --workers 2 --targets xds-mtls,tls-identity,admin

It prints a line per minute and, at the end, inputs run per target (valid ones: an input the
strategies could not use is not counted), the rate, and the distinct failures; the same in
``--out``/summary.json. For the suite's own bounded runs and the ``long`` hypothesis profile (with
shrinking), see tests/support/fuzz.py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    # name: (module, test function, share of the inputs)
    "proxy": ("tests.unit.test_fuzz_http1_proxy", "test_proxy_any_request_stream", 2),
    "proxy-upstream": ("tests.unit.test_fuzz_http1_proxy", "test_proxy_any_upstream_response", 1),
    "request-codec": ("tests.unit.test_fuzz_http1_codecs", "test_request_codec_any_stream", 1),
    "response-codec": ("tests.unit.test_fuzz_http1_codecs", "test_response_codec_any_response", 1),
    "dns-udp": ("tests.unit.test_fuzz_dns", "test_udp_any_datagrams", 1),
    "dns-tcp": ("tests.unit.test_fuzz_dns", "test_tcp_any_stream", 1),
    # issue 16, docs/identity.md: mutated mTLS/authz xDS resources through the converters and
    # state.Update; TlsIdentity.apply_secrets with mutated PEMs; any admin API request (a real gRPC
    # server over a ZooKeeper of the worker's own, started by the module's fuzz_setup()).
    "xds-mtls": ("tests.unit.test_fuzz_xds_mtls", "test_any_mutated_mtls_resource_is_applied_or_nacked_by_name", 1),
    "tls-identity": ("tests.unit.test_fuzz_xds_mtls",
                     "test_apply_secrets_refuses_or_accepts_any_pems_and_a_refusal_changes_nothing", 1),
    "admin": ("tests.unit.test_fuzz_admin", "test_any_admin_request_ends_with_a_status_and_writes_nothing_invalid", 1),
}
# Run only when named in --targets (slower, or with a ZooKeeper of their own): not in the default set.
OPT_IN = ("xds-mtls", "tls-identity", "admin")
BUFFER = 4096  # random bytes per input: more than any strategy here reads


def _load(names: list[str], show: bool = False) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("MESHKEEPER_FUZZ", "long")
    import importlib

    from tests.support import fuzz

    fuzz.load_profile()
    out = {}
    set_up: set[str] = set()
    for name in names:
        module, fn, _ = TARGETS[name]
        loaded = importlib.import_module(module)
        if hasattr(loaded, "fuzz_setup") and module not in set_up:  # e.g. a ZooKeeper for the admin API
            loaded.fuzz_setup()
            set_up.add(module)
        test = getattr(loaded, fn)
        if show:  # print the arguments the input gives before the property judges them
            inner = test.hypothesis.inner_test

            def shown(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
                print(f"arguments: {args} {kwargs}", flush=True)
                return _inner(*args, **kwargs)

            test.hypothesis.inner_test = shown
        out[name] = test.hypothesis.fuzz_one_input
    return out


def _worker(index: int, names: list[str], deadline: float, quota: int, out: str, queue: Any) -> None:
    fuzzers = _load(names)
    rng = random.Random(os.urandom(16))
    weighted = [n for n in names for _ in range(TARGETS[n][2])]
    ran = dict.fromkeys(names, 0)
    invalid = 0
    seen: set[str] = set()
    total = 0
    last_report = time.monotonic()
    while time.monotonic() < deadline and total < quota:
        name = weighted[total % len(weighted)]
        blob = rng.randbytes(BUFFER)
        try:
            used = fuzzers[name](blob)
        except Exception as exc:
            ran[name] += 1
            key = f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if key not in seen:
                seen.add(key)
                stem = Path(out) / f"{name}-w{index}-{len(seen)}"
                stem.with_suffix(".bin").write_bytes(blob)
                stem.with_suffix(".txt").write_text(key + "\n\n" + traceback.format_exc())
                queue.put(("failure", key, str(stem.with_suffix(".bin"))))
        else:
            if used is None:
                invalid += 1
            else:
                ran[name] += 1
        total += 1
        now = time.monotonic()
        if now - last_report > 10:
            queue.put(("progress", index, dict(ran), invalid))
            last_report = now
    queue.put(("done", index, dict(ran), invalid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="stop after this long (default 10)")
    parser.add_argument("--inputs", type=int, default=0, help="stop after this many inputs in all (default: none)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--targets", default=",".join(n for n in TARGETS if n not in OPT_IN),
                        help=f"comma-separated, of: {', '.join(TARGETS)} (default: all but {', '.join(OPT_IN)})")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "fuzz"))
    parser.add_argument("--replay", help="run one saved input (a .bin of --out) on the first target and show the failure")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        parser.error(f"--targets: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(TARGETS)}")
    if args.replay:
        fuzzers = _load(names[:1], show=True)
        fuzzers[names[0]](Path(args.replay).read_bytes())
        print("no failure")
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.minutes * 60
    quota = -(-args.inputs // args.workers) if args.inputs else 1 << 62
    queue: Any = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=_worker, args=(i, names, deadline, quota, args.out, queue))
             for i in range(args.workers)]
    for p in procs:
        p.start()
    counts: dict[int, tuple[dict[str, int], int]] = {}
    failures: dict[str, str] = {}
    done = 0
    next_line = start + 60
    while done < len(procs):
        try:
            kind, *rest = queue.get(timeout=30)
        except Exception:  # queue.Empty: a worker that died says nothing more
            if not any(p.is_alive() for p in procs):
                print("every worker has exited", file=sys.stderr)
                break
            continue
        if kind == "failure":
            key, path = rest
            if key not in failures:
                failures[key] = path
                print(f"FAILURE {key}\n  replay: bench/fuzz.py --replay {path} --targets {key.split(':')[0]}", flush=True)
        else:
            index, ran, invalid = rest
            counts[index] = (ran, invalid)
            done += kind == "done"
        if time.monotonic() >= next_line:
            next_line += 60
            total = sum(sum(r.values()) for r, _ in counts.values())
            print(f"{(time.monotonic() - start) / 60:5.1f} min  {total:,} inputs", flush=True)
    for p in procs:
        p.join()
    elapsed = time.monotonic() - start
    per_target = {n: sum(r.get(n, 0) for r, _ in counts.values()) for n in names}
    total = sum(per_target.values())
    summary = {
        "minutes": round(elapsed / 60, 2), "workers": args.workers, "inputs": total,
        "inputs_per_second": round(total / elapsed, 1), "per_target": per_target,
        "unusable_inputs": sum(i for _, i in counts.values()), "failures": failures,
    }
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
