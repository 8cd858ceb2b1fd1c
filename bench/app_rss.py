"""RSS of the demo app as the soak's frontend, without the mesh: is its growth a leak or the allocator?

    .venv/bin/python bench/app_rss.py --minutes 10 [--rate 100] [--blip-every 10] [--tracemalloc]
                                      [--arena-max N] [--env K=V] [--out bench/out/app_rss.jsonl]

What the soak's app-frontend-1 sees, reduced to what touches the app: ``meshkeeper.demo.app --call
http://catalog/`` with ``HTTP_PROXY`` at a second demo app (the "upstream": it takes the absolute-URI
request a proxy would get and answers it), so every request makes one urllib call on a fresh
connection, as in the mesh. The load is open loop (request ``i`` due at ``start + i / rate``) over a
keep-alive pool that reuses its most recent idle connection first (LIFO) and never closes an idle
one, as the frontend sidecar's pool to its app does (sidecar/upstream/pool.py; idle timeout 1 h), so
the app's ThreadingHTTPServer keeps one parked thread per pooled connection. Every ``--spike-every``
seconds the upstream turns slow (``/fail?mode=slow&ms=M`` for ``--spike-s`` seconds, M varied so
that 42 to 49 requests are in flight at once, like the soak's partition of a catalog pod), then
back to ``mode=ok``; with ``--blip-every S``, every S seconds between spikes the upstream is slow
for 2 s (4 to 30 in flight), as the soak's other faults make it, so that requests move between more
of the pooled connections (threads) than the few a steady load uses.

Sampled every 5 s from /proc: VmRSS, threads, descriptors of the frontend app, and every 30 s its
resident memory by kind of mapping (brk heap = glibc's main arena, glibc's other arenas, thread
stacks, other anonymous = pymalloc's arenas and big blocks; ``smaps_kinds``). The app itself runs
under a small wrapper (``--child``, this file) that, every ``--detail-every`` seconds, writes
glibc's ``mallinfo2`` (bytes in use and free in the malloc arenas, mmapped), the number of malloc
arenas and their sizes (``malloc_info``) and, with ``--tracemalloc``, the Python-level allocations
(traced current, tracemalloc's own overhead, top line-number diffs against the first sample after
warm-up). At the end the wrapper calls ``malloc_trim(0)`` (SIGUSR1) and the RSS after it is
recorded: memory that trim gives back was free in the arenas, not held by live objects (chunks in
glibc's per-thread caches, the tcache, count as in use and stay).

Output: one JSON object per line in ``--out`` (``kind`` = ``rss``, ``detail``, ``trim``,
``summary``), and a summary on stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from meshkeeper.demo.process import rss_kib

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- in the app process


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def threads_of(pid: int) -> int:
    try:
        m = re.search(r"^Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


def smaps_kinds(pid: int) -> dict[str, int]:
    """Resident KiB of a process by kind of mapping: the brk heap (glibc's main arena), glibc's other
    arenas (64 MiB-aligned heaps), thread stacks (8 MiB after a guard page), other anonymous memory
    (pymalloc's arenas, large mmapped blocks), files."""
    maps: list[dict] = []
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        if m := re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$", line):
            maps.append({"start": int(m.group(1), 16), "end": int(m.group(2), 16), "perm": m.group(3),
                         "name": m.group(4).strip(), "rss": 0})
        elif line.startswith("Rss:") and maps:
            maps[-1]["rss"] = int(line.split()[1])
    kinds: dict[str, int] = {}
    for i, mp in enumerate(maps):
        prev, nxt = maps[i - 1] if i else None, maps[i + 1] if i + 1 < len(maps) else None
        if mp["name"] == "[heap]":
            kind = "brk_heap"
        elif mp["name"]:
            kind = "files" if mp["name"].startswith("/") else "other"
        elif not mp["perm"].startswith("rw"):
            kind = "other"
        elif mp["start"] % (64 << 20) == 0 and (mp["end"] - mp["start"] == 64 << 20 or (
                nxt and nxt["start"] == mp["end"] and nxt["end"] - mp["start"] == 64 << 20)):
            kind = "thread_arenas"
        elif mp["end"] - mp["start"] == 8 << 20 and prev and prev["end"] == mp["start"] and prev["perm"].startswith("---"):
            kind = "thread_stacks"
        else:
            kind = "anon_other"
        kinds[kind] = kinds.get(kind, 0) + mp["rss"]
    return kinds


def arenas(libc: ctypes.CDLL) -> list[dict[str, int]]:
    """Each malloc arena (heap) of glibc's malloc_info: its system size and its free ("rest") bytes."""
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        fp = libc.fopen(f.name.encode(), b"w")
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        xml = Path(f.name).read_text()
    out = []
    for heap in re.findall(r'<heap nr="\d+">(.*?)</heap>', xml, re.S):
        system = re.search(r'<system type="current" size="(\d+)"', heap)
        rest = re.search(r'<total type="rest" count="\d+" size="(\d+)"', heap)
        out.append({"system": int(system.group(1)) if system else 0, "free": int(rest.group(1)) if rest else 0})
    return out


def child(out: Path, every: float, warmup: float, traced: bool, app_args: list[str]) -> int:
    """Run the demo app in this process, writing allocator (and tracemalloc) details to ``out``."""
    import tracemalloc

    from meshkeeper.demo import app

    if traced:
        tracemalloc.start(1)
    libc = _libc()
    t0 = time.monotonic()
    lock = threading.Lock()

    def write(record: dict) -> None:
        with lock, out.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def detail() -> None:
        base = None
        while True:
            time.sleep(every)
            t = time.monotonic() - t0
            mi = libc.mallinfo2()
            heaps = arenas(libc)
            rec = {"kind": "detail", "t": round(t, 1), "rss_kib": rss_kib(os.getpid()), "threads": threading.active_count(),
                   "malloc_in_use": mi.uordblks, "malloc_free": mi.fordblks, "malloc_arena": mi.arena,
                   "malloc_mmapped": mi.hblkhd, "n_arenas": len(heaps), "arenas": heaps}
            if traced:
                snap = tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)])
                rec["traced"], rec["traced_peak"] = tracemalloc.get_traced_memory()
                rec["tracemalloc_overhead"] = tracemalloc.get_tracemalloc_memory()
                if base is None and t >= warmup:
                    base = snap
                if base is not None:
                    rec["top_diff"] = [
                        {"where": f"{s.traceback[0].filename.removeprefix(str(ROOT) + '/')}:{s.traceback[0].lineno}",
                         "size_diff": s.size_diff, "count_diff": s.count_diff}
                        for s in snap.compare_to(base, "lineno")[:8]]
                del snap
            write(rec)

    def trim(signum: int, frame: object) -> None:
        before = rss_kib(os.getpid())
        libc.malloc_trim(0)
        write({"kind": "trim", "t": round(time.monotonic() - t0, 1), "rss_before_kib": before, "rss_after_kib": rss_kib(os.getpid())})

    signal.signal(signal.SIGUSR1, trim)
    threading.Thread(target=detail, daemon=True, name="app-rss-detail").start()
    return app.main(app_args)


# --------------------------------------------------------------------------- the driver


def start_app(argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    line = proc.stdout.readline() if proc.stdout else ""
    m = re.search(r"port=(\d+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"app did not start: {line!r}")
    return proc, int(m.group(1))


class LifoLoad:
    """Open-loop paced GETs over a keep-alive pool that reuses the most recently idle connection."""

    def __init__(self, port: int, rate: float, workers: int = 64) -> None:
        self.port, self.rate, self.workers = port, rate, workers
        self.idle: list[http.client.HTTPConnection] = []
        self.lock = threading.Lock()
        self.slot = 0
        self.start_at = time.monotonic() + 0.05
        self.stop = threading.Event()
        self.sent = self.failed = self.opened = self.in_flight = self.max_in_flight = 0

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(self.workers)]
        for t in threads:
            t.start()
        return threads

    def _worker(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                i, self.slot = self.slot, self.slot + 1
            if (delay := self.start_at + i / self.rate - time.monotonic()) > 0 and self.stop.wait(delay):
                return
            with self.lock:
                conn = self.idle.pop() if self.idle else None
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                if conn is None:
                    self.opened += 1
            conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            status, reuse = 0, False
            try:
                conn.request("GET", "/", headers={"Host": "frontend"})
                resp = conn.getresponse()
                resp.read()
                status, reuse = resp.status, not resp.will_close
            except (OSError, http.client.HTTPException):
                pass
            with self.lock:
                self.in_flight -= 1
                self.sent += 1
                self.failed += status != 200
                if reuse:
                    self.idle.append(conn)
                else:
                    conn.close()


def driver(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    py = sys.executable
    upstream, up_port = start_app([py, "-m", "meshkeeper.demo.app", "--name", "catalog"])
    proxy = f"http://127.0.0.1:{up_port}"
    env = {"HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
    if args.arena_max:
        env["MALLOC_ARENA_MAX"] = str(args.arena_max)
    env.update(kv.split("=", 1) for kv in args.env)
    child_argv = [py, str(Path(__file__).resolve()), "--child", "--out", str(out), "--detail-every",
                  str(args.detail_every), "--warmup", str(args.warmup)] + (["--tracemalloc"] if args.tracemalloc else [])
    frontend, fe_port = start_app(child_argv + ["--", "--name", "frontend", "--call", "http://catalog/"], env)
    first = http.client.HTTPConnection("127.0.0.1", fe_port, timeout=10)  # imports done before the load
    first.request("GET", "/")
    first.getresponse().read()
    first.close()
    load = LifoLoad(fe_port, args.rate)
    t0 = time.monotonic()
    threads = load.run()
    seconds = args.minutes * 60
    peaks = [420, 490, 450, 470, 430, 480, 440, 460]  # ms: 42 to 49 in flight at 100 req/s
    spikes = 0

    def fail(query: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", up_port, timeout=5)
        conn.request("GET", f"/fail?{query}")
        conn.getresponse().read()
        conn.close()

    def sample() -> dict:
        rec = {"kind": "rss", "t": round(time.monotonic() - t0, 1), "rss_kib": rss_kib(frontend.pid),
               "threads": threads_of(frontend.pid), "fds": len(os.listdir(f"/proc/{frontend.pid}/fd")),
               "sent": load.sent, "failed": load.failed, "opened": load.opened, "max_in_flight": load.max_in_flight}
        if int(rec["t"]) % 30 < 5:
            rec["smaps"] = smaps_kinds(frontend.pid)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    try:
        next_sample, next_spike, next_blip, blip = 0.0, args.spike_at, args.spike_at + args.blip_every, 0
        blips = [60, 150, 300, 100, 220, 40, 260]  # ms: 4 to 30 in flight at 100 req/s
        while (t := time.monotonic() - t0) < seconds:
            if t >= next_sample:
                rec = sample()
                if int(t) % 60 < 5:
                    print(json.dumps(rec), flush=True)
                next_sample += 5
            if t >= next_spike and t < seconds - 30:
                fail(f"mode=slow&ms={peaks[spikes % len(peaks)] * 100 / args.rate:.0f}")
                time.sleep(args.spike_s)
                fail("mode=ok")
                spikes += 1
                next_spike += args.spike_every
                next_blip = time.monotonic() - t0 + args.blip_every / 2
            elif args.blip_every and t >= next_blip and t < min(next_spike - 5, seconds - 30):
                # The soak's other faults (a slow inventory, killed pods, retries) between partitions:
                # a few to 30 requests in flight for a moment, so more of the pooled connections serve.
                fail(f"mode=slow&ms={blips[blip % len(blips)] * 100 / args.rate:.0f}")
                time.sleep(2)
                fail("mode=ok")
                blip += 1
                next_blip += args.blip_every
            time.sleep(0.2)
        before = sample()
        frontend.send_signal(signal.SIGUSR1)
        time.sleep(2)
        after = sample()
        summary = {"kind": "summary", "seconds": seconds, "rate": args.rate, "spikes": spikes, "blips": blip,
                   "tracemalloc": args.tracemalloc, "arena_max": args.arena_max, "env": args.env, "sent": load.sent,
                   "failed": load.failed, "connections_opened": load.opened, "max_in_flight": load.max_in_flight,
                   "rss_end_kib": before["rss_kib"], "rss_after_trim_kib": after["rss_kib"]}
        with out.open("a") as f:
            f.write(json.dumps(summary) + "\n")
        print(json.dumps(summary), flush=True)
    finally:
        load.stop.set()
        for t in threads:
            t.join(1)
        for p in (frontend, upstream):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=12)
    p.add_argument("--rate", type=float, default=100)
    p.add_argument("--spike-every", type=float, default=60, help="seconds between slow-upstream spikes")
    p.add_argument("--spike-at", type=float, default=30, help="the first spike")
    p.add_argument("--spike-s", type=float, default=5)
    p.add_argument("--blip-every", type=float, default=0,
                   help="between spikes, every this many seconds a 2-s slow upstream (4 to 30 in flight); 0: none")
    p.add_argument("--warmup", type=float, default=25, help="tracemalloc diffs are against the first sample after it")
    p.add_argument("--detail-every", type=float, default=30)
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--arena-max", type=int, default=0, help="MALLOC_ARENA_MAX for the frontend app (0: glibc's)")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="more environment for the frontend app, e.g. GLIBC_TUNABLES=glibc.malloc.tcache_count=0")
    p.add_argument("--out", default="bench/out/app_rss.jsonl")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.child:
        return child(Path(args.out), args.detail_every, args.warmup, args.tracemalloc,
                     rest[1:] if rest[:1] == ["--"] else rest)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
