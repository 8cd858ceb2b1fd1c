"""The cost of mutual TLS between sidecars (issue 16): a two-hop path in plaintext and in mTLS, for the
mesh and for an HAProxy pair, side by side in one run.

A mesh call crosses two proxies: the caller's sidecar (outbound) and the callee's (inbound), and mTLS
is on the hop between them. Every target here is that path, client -> proxy A -> proxy B -> upstream
nginx, all four running at once beside one upstream:

* ``mesh-plain``: the ``frontend`` sidecar's outbound port (``Host: catalog``) -> the ``catalog``
  sidecar's inbound listener -> nginx, in namespace ``bench-plain``: no identity tokens, and
  ``services/catalog/peer_authentication`` = ``{"mode": "DISABLE"}``, so the inbound listener is the
  plain one of a mesh without identity (no tls_inspector) and the cluster has no TLS socket.
* ``mesh-mtls``: the same in namespace ``bench-mtls``: both sidecars started with
  ``--identity-token-file`` (``Issuer.mint_token``), catalog's mode ``STRICT``. Before anything is
  measured the script proves that TLS is used: both sidecars' ``/certs`` show a chain with their SPIFFE
  URI SAN, a plaintext connection to catalog's inbound port is closed unanswered, a TLS client with a
  certificate from the same CA gets a 200 there (its protocol and cipher are printed) and one without a
  certificate gets nothing, and catalog's inbound listener counts TLS handshakes
  (``meshkeeper_listener_ssl_handshake_total``), as many as the connections it accepted.
* ``haproxy-plain``: HAProxy A -> HAProxy B -> nginx, both in plaintext (bench/haproxy-mtls-a.cfg,
  bench/haproxy-mtls-b.cfg; one thread each, keep-alive on every hop, ``http-reuse always``).
* ``haproxy-tls``: A originates TLS with a client certificate and verifies B's chain against the CA;
  B terminates TLS with ``verify required`` against the same CA. The certificates come from the same
  kind of CA as the mesh's (``controlplane.ca.Issuer.generate()``: EC P-256, SPIFFE URI SANs only);
  HAProxy takes the chain and the key in one PEM. HAProxy checks the chain, not the URI SAN (2.6 has
  no URI SAN matcher for servers), where the sidecar matches the SAN exactly.

Pinning as bench/run.py: wrk, h2load, nginx, ZooKeeper and the control plane (with ``--ca-cert``/
``--ca-key``) on the load CPU; both proxies of every pair (both sidecars, both HAProxies) on the proxy
CPU, one worker or thread each. Measured in rounds, the order of the targets rotating each round
(bench/h1_paired.py):

* throughput: ``wrk -t1 -c<connections> -d<duration>s`` per target -> req/s, and the CPU time per
  request of A and of B (/proc utime + stime over the wrk run);
* latency at a fixed rate: bench/run.py's ``h2load --h1 -c 10 --rps <rate-per-client>`` for
  ``--latency-duration`` s per target per round -> p50/p99 from ``--log-file`` (per round, and over
  every request of every round);
* connections accepted and TLS handshakes by B during each run (the catalog sidecar's inbound
  listener ``downstream_cx_total`` and ``ssl_handshake_total``; HAProxy B's ``CumConns`` /
  ``CumSslConns`` from its stats socket): with keep-alive on both hops A's pool is filled in the
  warm-up and a run reopens only what the previous one lost. When wrk stops it closes its
  connections with requests in flight, and the sidecar then closes the upstream connections that
  carried them (an HTTP/1.1 request cannot be cancelled otherwise; Envoy does the same), so the next
  run reopens up to ``--connections`` of them. HAProxy A reopened up to 51 per 5-s run too (bench/RESULTS.md,
  "mTLS cost").

Then ``--close-rounds`` rounds of ``wrk -H 'Connection: close'``: the client opens a connection per
request to A (plaintext, as an app to its sidecar); what matters is whether A's pooled upstream
connections to B survive it, counted the same way.

The deltas: per round, mTLS req/s / plaintext req/s and mTLS p99 - plaintext p99 of the same proxy;
their medians and ranges. Everything goes to stdout, <workdir>/mtls.md and <workdir>/rounds.json.

    .venv/bin/python bench/mtls.py [--rounds 6] [--duration 5] [--latency-duration 8] [--close-rounds 1]
    .venv/bin/python bench/mtls.py --no-mtls --rounds 1 --duration 2 --latency-duration 2   # dry run

If the mTLS target cannot be started or proven, it is dropped with the exact error and the other three
are measured. The sidecars are the ``meshkeeper`` this interpreter imports (this working tree).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import h1_paired  # noqa: E402 - bench/h1_paired.py, beside this file
import run as bench  # noqa: E402 - bench/run.py

from meshkeeper.demo.process import (  # noqa: E402
    ChildProcess,
    ManagedProcess,
    free_port,
    http_get,
    meshkeeper_argv,
    wait_until,
)

TD = "meshkeeper.local"
CALLER, CALLEE = "frontend", "catalog"
NS_PLAIN, NS_MTLS = "bench-plain", "bench-mtls"
HANDSHAKE_METRIC = re.compile(r"ssl_handshake_total$")


@dataclass
class Target:
    label: str
    kind: str  # "mesh" or "haproxy"
    tls: bool
    a: ChildProcess | None = None
    b: ChildProcess | None = None
    url: str = ""
    counters: Callable[[], dict[str, float]] = dict  # hop B's connection / handshake counters
    proof: list[str] = field(default_factory=list)
    warmup_counters: dict[str, float] = field(default_factory=dict)
    rps: list[float] = field(default_factory=list)
    cpu_a: list[float] = field(default_factory=list)  # µs per request, per round
    cpu_b: list[float] = field(default_factory=list)
    per_run: list[dict[str, float]] = field(default_factory=list)  # counter deltas per keep-alive wrk run
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    latencies_us: list[int] = field(default_factory=list)
    latency_errors: int = 0
    close_rps: list[float] = field(default_factory=list)
    close_cpu: list[float] = field(default_factory=list)  # A + B µs per request
    close_runs: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def cpu(self) -> tuple[float, float]:
        return (h1_paired.cpu_seconds(self.a) if self.a else 0.0, h1_paired.cpu_seconds(self.b) if self.b else 0.0)


# --------------------------------------------------------------------------- PKI


def write_pki(issuer, directory: Path) -> dict[str, Path]:
    """The CA's files for the control plane, and leaf certificates of the same CA for HAProxy (chain and
    key in one PEM) and for the TLS probe (chain and key apart, for Python's ssl)."""
    from cryptography.hazmat.primitives import serialization

    from sidecar.identity.keys import new_key

    directory.mkdir(parents=True, exist_ok=True)
    a = issuer.authority
    files = {"ca": directory / "ca.pem", "ca_key": directory / "ca-key.pem"}
    files["ca"].write_bytes(a.cert.public_bytes(serialization.Encoding.PEM))
    files["ca_key"].write_bytes(a.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    files["ca_key"].chmod(0o600)
    for name, ns, svc in (("haproxy_a", "haproxy", CALLER), ("haproxy_b", "haproxy", CALLEE),
                          ("probe", NS_MTLS, CALLER)):
        key_pem, csr_pem = new_key()
        cert = issuer.sign(csr_pem, ns, svc)
        files[name] = directory / f"{name}.pem"
        files[name].write_bytes(cert.chain_pem + key_pem)
        files[f"{name}_cert"] = directory / f"{name}.crt"
        files[f"{name}_cert"].write_bytes(cert.chain_pem)
        files[f"{name}_key"] = directory / f"{name}.key"
        files[f"{name}_key"].write_bytes(key_pem)
    return files


def tls_probe(port: int, pki: dict[str, Path], client_cert: bool = True) -> str:
    """One request over TLS, with a client certificate of the CA or none:
    '<protocol> <cipher>, peer <URI SAN>: <status line>'."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pki["ca"])
    if client_cert:
        ctx.load_cert_chain(pki["probe_cert"], pki["probe_key"])
    ctx.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
        peer = s.getpeercert() or {}
        sans = [v for k, v in peer.get("subjectAltName", ()) if k == "URI"]
        s.sendall(f"GET / HTTP/1.1\r\nHost: {CALLEE}\r\nConnection: close\r\n\r\n".encode())
        status = s.recv(200).split(b"\r\n", 1)[0].decode(errors="replace")
        return f"{s.version()} {s.cipher()[0]}, peer {', '.join(sans) or '(no URI SAN)'}: {status or '(closed)'}"


def tls_proofs(port: int, pki: dict[str, Path], who: str) -> list[str]:
    """A client with a certificate of the CA gets a 200; one without a certificate gets nothing."""
    with_cert = tls_probe(port, pki)
    if not with_cert.endswith(" 200 OK"):
        raise RuntimeError(f"a TLS client with a certificate of the CA got: {with_cert}")
    try:
        without = tls_probe(port, pki, client_cert=False)
        if without.endswith("(closed)"):
            without = f"refused: the handshake completed on the client's side ({without.split(',')[0]}), " \
                      "then the connection was closed unanswered"
    except (ssl.SSLError, ConnectionError) as exc:
        without = f"refused ({exc})"
    if without.endswith(" 200 OK"):
        raise RuntimeError(f"{who} answers a TLS client without a certificate: {without}")
    return [f"TLS probe to {who}, client certificate of the CA: {with_cert}",
            f"without a client certificate: {without}"]


def plaintext_answer(port: int) -> bytes:
    """The first bytes answered to a plaintext request (b"": the connection was closed unanswered)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {CALLEE}\r\n\r\n".encode())
            return s.recv(100)
    except (ConnectionError, TimeoutError):
        return b""


def plaintext_refused(port: int) -> bool:
    return plaintext_answer(port) == b""


# --------------------------------------------------------------------------- the mesh


class Mesh:
    """ZooKeeper and a control plane with the CA (load CPU), and sidecar pairs (proxy CPU)."""

    def __init__(self, workdir: Path, upstream_port: int, issuer, pki: dict[str, Path]) -> None:
        self.workdir = workdir
        self.upstream_port = upstream_port
        self.issuer = issuer
        self.pki = pki
        self.zk = None
        self.cp: ManagedProcess | None = None
        self.kazoo = None
        self.procs: list[ChildProcess] = []

    def start(self) -> None:
        from kazoo.client import KazooClient

        from meshkeeper.demo.zookeeper import ZooKeeper

        self.zk = ZooKeeper(self.workdir / "zookeeper").start()
        self.cp = ManagedProcess(meshkeeper_argv(
            "controlplane", "--zk", self.zk.hosts, "--xds-port", "0", "--http-port", "0", "--insecure-admin",
            "--trust-domain", TD, "--ca-cert", str(self.pki["ca"]), "--ca-key", str(self.pki["ca_key"]),
        ), role="controlplane", log_dir=self.workdir)  # fmt: skip
        self.procs.append(self.cp)
        self.cp.start()
        self.kazoo = KazooClient(hosts=self.zk.hosts, timeout=10.0)
        self.kazoo.start(timeout=15)

    def mode(self, namespace: str, mode: str) -> None:
        """The callee's peer authentication, written before its sidecars start (the service record first,
        as a sidecar would write it, so that the znode's parent is a valid service)."""
        from meshkeeper.registry import Paths, ServiceRecord

        paths = Paths(namespace)
        if not self.kazoo.exists(paths.service(CALLEE)):
            self.kazoo.create(paths.service(CALLEE), ServiceRecord("http").encode(), makepath=True)
        data = json.dumps({"mode": mode}).encode()
        if self.kazoo.exists(paths.peer_authentication(CALLEE)):
            self.kazoo.set(paths.peer_authentication(CALLEE), data)
        else:
            self.kazoo.create(paths.peer_authentication(CALLEE), data)

    def sidecar(self, namespace: str, service: str, token: bool) -> ManagedProcess:
        flags = []
        if token:
            path = self.workdir / f"{namespace}.{service}.token"
            path.write_text(self.issuer.mint_token(namespace, service))
            path.chmod(0o600)
            flags = ["--identity-token-file", str(path)]
        proc = ManagedProcess(bench.pinned(bench.PROXY_CPU, meshkeeper_argv(
            "sidecar", "--service", service, "--namespace", namespace, "--app-port", str(self.upstream_port),
            "--cp", f"127.0.0.1:{self.cp.port('xds_port')}", "--zk", self.zk.hosts, "--outbound-port", "0",
            "--inbound-port", "0", "--admin-port", "0", "--workers", "1", "--access-log", "off", *flags,
        )), role="sidecar", name=f"sidecar-{namespace}-{service}", log_dir=self.workdir)  # fmt: skip
        self.procs.append(proc)
        proc.start()
        admin = f"http://127.0.0.1:{proc.port('admin_port')}"
        wait_until(lambda: http_get(f"{admin}/ready", timeout=1)[0] == 200, 30, 0.1, f"{proc.name} {admin}/ready")
        return proc

    def pair(self, target: Target) -> None:
        ns = NS_MTLS if target.tls else NS_PLAIN
        self.mode(ns, "STRICT" if target.tls else "DISABLE")
        target.b = self.sidecar(ns, CALLEE, token=target.tls)
        target.a = self.sidecar(ns, CALLER, token=target.tls)
        target.url = f"http://127.0.0.1:{target.a.port('outbound_port')}/"
        wait_until(lambda: http_get(target.url, {"Host": CALLEE}, timeout=2)[0] == 200, 30, 0.2,
                   f"{target.label}: {CALLER} routes {CALLEE}")
        target.counters = lambda: sidecar_counters(target.b)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate(5)
        if self.kazoo is not None:
            self.kazoo.stop()
            self.kazoo.close()
        if self.zk is not None:
            self.zk.stop()


def admin(proc: ChildProcess) -> str:
    return f"http://127.0.0.1:{proc.port('admin_port')}"


def sidecar_counters(proc: ChildProcess) -> dict[str, float]:
    """The callee sidecar's inbound listener: connections accepted, TLS handshakes, TLS failures."""
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = http_get(f"{admin(proc)}/stats/prometheus", timeout=5)
    if status != 200:
        raise RuntimeError(f"{proc.name} /stats/prometheus: {status}")
    out = {"accepted": 0.0, "handshakes": 0.0, "ssl errors": 0.0}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.labels.get("listener") != "inbound" or s.name.endswith("_created"):
                continue
            if s.name == "meshkeeper_listener_downstream_cx_total":
                out["accepted"] += s.value
            elif HANDSHAKE_METRIC.search(s.name):
                out["handshakes"] += s.value
            elif re.search(r"ssl_(fail|connection_error)", s.name):
                out["ssl errors"] += s.value
    return out


def tls_samples(proc: ChildProcess) -> list[str]:
    """Every non-zero sample of the sidecar's /stats/prometheus whose name says ssl or tls (for the record)."""
    status, _, body = http_get(f"{admin(proc)}/stats/prometheus", timeout=5)
    return [line for line in body.decode().splitlines()
            if not line.startswith("#") and re.search(r"ssl|tls", line.split("{")[0].split(" ")[0], re.I)
            and not line.endswith(" 0.0")]


def certs(proc: ChildProcess) -> list[str]:
    """The URI SANs of the chains on the sidecar's /certs page."""
    status, _, body = http_get(f"{admin(proc)}/certs", timeout=5)
    if status != 200:
        raise RuntimeError(f"{proc.name} /certs: {status} {body[:200]!r}")
    sans = []
    for chain in json.loads(body).get("certificates", []):
        for cert in chain.get("cert_chain", [])[:1]:
            sans += [s.get("uri", "") for s in cert.get("subject_alt_names", [])]
    return sans


def inbound_shape(proc: ChildProcess) -> str:
    """The inbound listener's filter chains and listener filters, from the sidecar's /config_dump."""
    status, _, body = http_get(f"{admin(proc)}/config_dump", timeout=5)
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("name") == "inbound" and "filter_chains" in node:
                chains = [f"{fc.get('name', '?')}{' (TLS)' if 'transport_socket' in fc else ''}"
                          for fc in node["filter_chains"]]
                filters = [lf.get("name", "?") for lf in node.get("listener_filters", [])]
                found.append(f"filter chains {chains}, listener filters {filters}")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(body) if status == 200 else {})
    return "; ".join(found) or f"no inbound listener found ({status})"


def prove_mesh(target: Target, pki: dict[str, Path]) -> None:
    inbound = target.b.port("inbound_port")
    caller_sans, callee_sans = certs(target.a), certs(target.b)
    if not target.tls:
        target.proof.append(f"/certs: {CALLER} {caller_sans or 'none'}, {CALLEE} {callee_sans or 'none'}")
        if plaintext_refused(inbound):
            raise RuntimeError(f"{CALLEE}'s inbound port refuses a plaintext request in mode DISABLE")
        target.proof.append(f"{CALLEE}'s inbound port answers plaintext")
        return
    want = f"spiffe://{TD}/ns/{NS_MTLS}/sa/{CALLEE}"
    wait_until(lambda: want in certs(target.b) and certs(target.a), 30, 0.2, f"{CALLEE} and {CALLER} /certs")
    target.proof.append(f"/certs: {CALLER} {certs(target.a)}, {CALLEE} {certs(target.b)}")
    try:
        wait_until(lambda: plaintext_refused(inbound), 30, 0.2, f"STRICT: {CALLEE}'s inbound port refuses plaintext")
    except TimeoutError as exc:
        answer = plaintext_answer(inbound).split(b"\r\n", 1)[0].decode(errors="replace")
        raise RuntimeError(f"{exc}: a plaintext request got {answer!r}; {CALLEE}'s inbound listener in its "
                           f"/config_dump: {inbound_shape(target.b)}") from None
    target.proof.append(f"{CALLEE}'s inbound port closes a plaintext connection unanswered (STRICT)")
    target.proof += tls_proofs(inbound, pki, f"{CALLEE}'s inbound port")


# --------------------------------------------------------------------------- HAProxy


def haproxy_info(sock: Path) -> dict[str, str]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(b"show info\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return dict(line.split(": ", 1) for line in data.decode().splitlines() if ": " in line)


def haproxy_counters(sock: Path) -> dict[str, float]:
    info = haproxy_info(sock)
    return {"accepted": float(info.get("CumConns", 0)), "handshakes": float(info.get("CumSslConns", 0))}


def start_haproxy_pair(target: Target, upstream_port: int, workdir: Path, pki: dict[str, Path]) -> None:
    own = workdir / target.label
    own.mkdir(exist_ok=True)
    b_port, a_port = free_port(), free_port()
    tls = f" ssl crt {pki['haproxy_b']} ca-file {pki['ca']} verify required alpn http/1.1" if target.tls else ""
    cfg_b = bench.render("haproxy-mtls-b.cfg", own, port=b_port, upstream_port=upstream_port, bind_tls=tls)
    target.b = ChildProcess(bench.pinned(bench.PROXY_CPU, ["haproxy", "-db", "-f", str(cfg_b)]),
                            name=f"{target.label}-b", log_dir=workdir)
    target.b.spawn()

    def listening() -> bool:
        if not target.b.running():
            raise RuntimeError(f"{target.label}-b exited: {target.b.stderr_tail(3)}")
        try:
            socket.create_connection(("127.0.0.1", b_port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_until(listening, 15, 0.05, f"{target.label}-b listening")
    tls = f" ssl crt {pki['haproxy_a']} ca-file {pki['ca']} verify required alpn http/1.1" if target.tls else ""
    cfg_a = bench.render("haproxy-mtls-a.cfg", own, port=a_port, b_port=b_port, server_tls=tls)
    target.url = f"http://127.0.0.1:{a_port}/"
    target.a = bench.start_server(bench.pinned(bench.PROXY_CPU, ["haproxy", "-db", "-f", str(cfg_a)]),
                                  f"{target.label}-a", workdir, target.url)
    sock = own / "haproxy-b.sock"
    target.counters = lambda: haproxy_counters(sock)
    if target.tls:
        if not plaintext_refused(b_port):
            raise RuntimeError("haproxy B answers a plaintext request")
        target.proof.append("B closes a plaintext connection unanswered")
        target.proof += tls_proofs(b_port, pki, "B")


# --------------------------------------------------------------------------- load


def wrk_close(url: str, duration: int, connections: int, workdir: Path, name: str) -> tuple[float, str]:
    """bench/run.py's wrk with ``Connection: close``: a new client connection per request."""
    argv = bench.pinned(bench.LOAD_CPU, ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-H",
                                         f"Host: {bench.HOST}", "-H", "Connection: close", url])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    (workdir / f"{name}.wrk.txt").write_text(out)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise RuntimeError(f"wrk printed no Requests/sec:\n{out}")
    errors = "; ".join(m.group(0) for m in re.finditer(r"(Non-2xx or 3xx responses: \d+|Socket errors: .*)", out))
    return float(match.group(1)), errors


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def run_wrk(t: Target, args: argparse.Namespace, workdir: Path, name: str, close: bool = False) -> str:
    c0 = t.counters()
    a0, b0 = t.cpu()
    if close:
        got, errors = wrk_close(t.url, args.close_duration, args.connections, workdir, name)
        seconds = args.close_duration
    else:
        got, errors, _ = bench.run_wrk(t.url, args.duration, args.connections, workdir, name)
        seconds = args.duration
    a1, b1 = t.cpu()
    counts = delta(t.counters(), c0)
    requests = got * seconds
    if close:
        t.close_rps.append(got)
        t.close_cpu.append((a1 - a0 + b1 - b0) / requests * 1e6)
        t.close_runs.append(counts)
    else:
        t.rps.append(got)
        t.cpu_a.append((a1 - a0) / requests * 1e6)
        t.cpu_b.append((b1 - b0) / requests * 1e6)
        t.per_run.append(counts)
    if errors:
        t.errors.append(f"{name}: {errors}")
    cpu = t.close_cpu[-1] if close else t.cpu_a[-1] + t.cpu_b[-1]
    return f"{got:,.0f} req/s, {cpu:.1f} CPU µs/request (A+B), B: {fmt_counts(counts)} {errors}"


def run_latency(t: Target, args: argparse.Namespace, workdir: Path, name: str) -> str:
    p50, p99, errors, _ = bench.run_h2load(t.url, args.latency_duration, workdir, name)
    t.p50.append(p50)
    t.p99.append(p99)
    t.latency_errors += errors
    for line in (workdir / f"{name}.h2load.tsv").read_text().splitlines():
        cols = line.split("\t")
        if len(cols) >= 3 and cols[1] == "200":
            t.latencies_us.append(int(cols[2]))
    return f"p50 {p50:.2f} ms, p99 {p99:.2f} ms{f', {errors} failed' if errors else ''}"


def fmt_counts(counts: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('meshkeeper_')} {v:,.0f}" for k, v in counts.items()) or "-"


# --------------------------------------------------------------------------- report


def med(values: list[float], fmt: str = ",.0f") -> str:
    return format(statistics.median(values), fmt) if values else "-"


def rng(values: list[float], fmt: str = ".2f") -> str:
    return h1_paired._range(values, fmt) if values else "-"


def pooled(values_us: list[int], q: int) -> float | None:
    if len(values_us) < 100:
        return None
    return statistics.quantiles(values_us, n=100, method="inclusive")[q - 1] / 1000


def plain_of(t: Target, targets: list[Target]) -> Target | None:
    return next((p for p in targets if p.kind == t.kind and not p.tls and p.rps), None) if t.tls else None


def counts_summary(runs: list[dict[str, float]]) -> str:
    keys = sorted({k for r in runs for k in r})
    return ", ".join(f"{k.removeprefix('meshkeeper_')} {med([r.get(k, 0.0) for r in runs], ',.0f')}" for k in keys) or "-"


def tables(targets: list[Target], args: argparse.Namespace) -> str:
    rate = bench.LATENCY_CLIENTS * bench.LATENCY_RPS_PER_CLIENT
    rows = [
        "| target | req/s (median) | range | vs plaintext (median of rounds) | range | p50 ms | p99 ms "
        "| p99 per round | CPU µs/req A | CPU µs/req B | A+B | B: connections accepted per run (median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in targets:
        if not t.rps:
            first = (t.errors[0].splitlines() or ["?"])[0] if t.errors else "?"
            rows.append(f"| {t.label} | {first.replace('|', '/')[:400]} |||||||||||")
            continue
        p = plain_of(t, targets)
        ratios = [a / b for a, b in zip(t.rps, p.rps, strict=False)] if p else []
        p50, p99 = pooled(t.latencies_us, 50), pooled(t.latencies_us, 99)
        ab = [a + b for a, b in zip(t.cpu_a, t.cpu_b, strict=True)]
        rows.append(
            f"| {t.label} | {med(t.rps)} | {rng([x / 1000 for x in t.rps], '.1f')}k "
            f"| {med(ratios, '.3f') if ratios else '-'} | {rng(ratios, '.3f') if ratios else '-'} "
            f"| {'-' if p50 is None else f'{p50:.2f}'} | {'-' if p99 is None else f'{p99:.2f}'} | {rng(t.p99)} "
            f"| {med(t.cpu_a, '.1f')} | {med(t.cpu_b, '.1f')} | {med(ab, '.1f')} | {counts_summary(t.per_run)} |")
    lines = [
        f"Keep-alive (wrk -t1 -c{args.connections} -d{args.duration}s per target per round, {args.rounds} rounds; "
        f"latency: h2load --h1 -c {bench.LATENCY_CLIENTS} at {rate} req/s for {args.latency_duration} s per "
        "target per round, p50/p99 over every request of every round):",
        "", *rows, "", "Deltas, mTLS against plaintext of the same proxy (per round, median and range):", "",
        "| proxy | req/s ratio | range | added p99 ms | range | added p50 ms | added CPU µs/req (A+B) | CPU ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in targets:
        p = plain_of(t, targets)
        if not (p and t.rps):
            continue
        ratios = [a / b for a, b in zip(t.rps, p.rps, strict=False)]
        d99 = [a - b for a, b in zip(t.p99, p.p99, strict=False)]
        d50 = [a - b for a, b in zip(t.p50, p.p50, strict=False)]
        cpu_t = statistics.median([a + b for a, b in zip(t.cpu_a, t.cpu_b, strict=True)])
        cpu_p = statistics.median([a + b for a, b in zip(p.cpu_a, p.cpu_b, strict=True)])
        lines.append(f"| {t.kind} | {med(ratios, '.3f')} | {rng(ratios, '.3f')} | {med(d99, '+.2f')} "
                     f"| {rng(d99, '+.2f')} | {med(d50, '+.2f')} | {cpu_t - cpu_p:+.1f} | {cpu_t / cpu_p:.2f}x |")
    if any(t.close_rps for t in targets):
        lines += ["", f"Connection: close from the client (wrk -H 'Connection: close' -c{args.connections} "
                  f"-d{args.close_duration}s, {args.close_rounds} round(s)): a new plaintext connection to A per "
                  "request; A's pool to B should stay:", "",
                  "| target | req/s (median) | vs plaintext | CPU µs/req A+B | B: connections accepted per run |",
                  "|---|---:|---:|---:|---|"]
        for t in targets:
            if not t.close_rps:
                continue
            p = plain_of(t, targets)
            ratio = med([a / b for a, b in zip(t.close_rps, p.close_rps, strict=False)], ".3f") if p and p.close_rps else "-"
            lines.append(f"| {t.label} | {med(t.close_rps)} | {ratio} | {med(t.close_cpu, '.1f')} "
                         f"| {counts_summary(t.close_runs)} |")
    lines += ["", "B's counters after the warm-up (since start) and what proves the path:", ""]
    for t in targets:
        lines.append(f"- {t.label}: warm-up {fmt_counts(t.warmup_counters)}" + "".join(f"; {p}" for p in t.proof))
        if t.latency_errors:
            lines.append(f"  - {t.latency_errors} requests failed at the fixed rate")
        for e in t.errors:
            lines.append(f"  - {e}")
    return "\n".join(lines)


def busy() -> str:
    out = subprocess.run(["pgrep", "-af", "bench/soak.py|pytest"], capture_output=True, text=True).stdout
    return "; ".join(line for line in out.splitlines() if "pgrep" not in line)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=int, default=5, help="seconds of wrk per target per round (default 5)")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--latency-duration", type=int, default=8, help="seconds of h2load per target per round")
    p.add_argument("--rate-per-client", type=int, default=bench.LATENCY_RPS_PER_CLIENT,
                   help=f"h2load --rps, {bench.LATENCY_CLIENTS} clients (default {bench.LATENCY_RPS_PER_CLIENT})")
    p.add_argument("--close-rounds", type=int, default=1, help="rounds of wrk with Connection: close (0: none)")
    p.add_argument("--close-duration", type=int, default=5)
    p.add_argument("--no-mtls", action="store_true", help="leave out mesh-mtls (a dry run before it works)")
    p.add_argument("--only", default="", help="comma-separated labels: a subset of the four targets")
    p.add_argument("--workdir", type=Path, default=bench.BENCH_DIR / "out" / "mtls")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration < 1 or args.latency_duration < 2:
        p.error("--rounds >= 1, --duration >= 1, --latency-duration >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from controlplane.ca import Issuer

    os.environ["PATH"] = bench._path()
    bench.preflight()
    os.sched_setaffinity(0, {int(bench.LOAD_CPU)})  # everything started here inherits the load CPU
    bench.HOST = CALLEE  # the Host (h2load: :authority) of bench/run.py's wrk and h2load: the callee
    bench.LATENCY_RPS_PER_CLIENT = args.rate_per_client
    workdir = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    cmd = shlex.join([".venv/bin/python", "bench/mtls.py", *argv])
    started, load_before = time.monotonic(), os.getloadavg()
    print(f"{cmd}\nbusy at start: {busy() or 'nothing'}; load average {load_before[0]:.2f}", flush=True)
    issuer = Issuer.generate(trust_domain=TD)
    pki = write_pki(issuer, workdir / "pki")
    targets = [Target("mesh-plain", "mesh", False), Target("mesh-mtls", "mesh", True),
               Target("haproxy-plain", "haproxy", False), Target("haproxy-tls", "haproxy", True)]
    if args.no_mtls:
        targets = [t for t in targets if t.label != "mesh-mtls"]
    if args.only:
        targets = [t for t in targets if t.label in args.only.split(",")]
    upstream = mesh = None
    others: list[ChildProcess] = []
    try:
        port = free_port()
        conf = bench.render("nginx-upstream.conf", workdir, port=port)
        (workdir / "nginx-upstream-tmp").mkdir()
        upstream = bench.start_server(bench.pinned(bench.LOAD_CPU, ["nginx", "-c", str(conf)]), "upstream",
                                      workdir, f"http://127.0.0.1:{port}/")
        mesh = Mesh(workdir, port, issuer, pki)
        mesh.start()
        live = []
        for t in targets:
            try:
                if t.kind == "mesh":
                    mesh.pair(t)
                    prove_mesh(t, pki)
                else:
                    start_haproxy_pair(t, port, workdir, pki)
                    others += [p for p in (t.b, t.a) if p is not None]
                bench.run_wrk(t.url, 2, args.connections, workdir, f"{t.label}.warmup")
                t.warmup_counters = t.counters()
                if t.tls and t.kind == "mesh":
                    t.proof.append("TLS samples in its /stats/prometheus: "
                                   + ("; ".join(tls_samples(t.b)[:12]) or "none"))
                live.append(t)
                print(f"{t.label}: {t.url}; B after warm-up: {fmt_counts(t.warmup_counters)}", flush=True)
                for line in t.proof:
                    print(f"  {line}", flush=True)
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, KeyError) as exc:
                t.errors.append(f"not measured: {exc}")
                print(f"{t.label}: NOT MEASURED: {exc}", flush=True)
        loads = []
        for r in range(args.rounds):
            k = r % len(live)
            order = live[k:] + live[:k]
            for t in order:
                try:
                    print(f"round {r + 1}: {t.label} {run_wrk(t, args, workdir, f'{t.label}.{r}')}", flush=True)
                except (RuntimeError, subprocess.SubprocessError) as exc:
                    t.errors.append(f"round {r + 1} wrk: {bench._one_line(exc)}")
            for t in order:
                try:
                    print(f"round {r + 1}: {t.label} {run_latency(t, args, workdir, f'{t.label}.{r}')}", flush=True)
                except (RuntimeError, subprocess.SubprocessError) as exc:
                    t.errors.append(f"round {r + 1} h2load: {bench._one_line(exc)}")
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}: load average {loads[-1]:.2f}; busy: {busy() or 'nothing'}", flush=True)
        for r in range(args.close_rounds):
            k = r % len(live)
            for t in live[k:] + live[:k]:
                try:
                    print(f"close {r + 1}: {t.label} "
                          f"{run_wrk(t, args, workdir, f'{t.label}.close{r}', close=True)}", flush=True)
                except (RuntimeError, subprocess.SubprocessError) as exc:
                    t.errors.append(f"close round {r + 1}: {bench._one_line(exc)}")
        for t in live:
            try:
                if t.tls and t.kind == "haproxy":
                    info = haproxy_info(workdir / t.label / "haproxy-b.sock")
                    t.proof.append("B's show info at the end: " + ", ".join(
                        f"{k} {v}" for k, v in info.items() if k in ("CumConns", "CumSslConns", "SslCacheLookups",
                                                                     "SslCacheMisses", "SslFrontendSessionReuse_pct")))
                elif t.tls:
                    t.proof.append("TLS samples of B at the end: " + ("; ".join(tls_samples(t.b)[:12]) or "none"))
                    t.proof.append("TLS samples of A at the end: " + ("; ".join(tls_samples(t.a)[:12]) or "none"))
            except (OSError, RuntimeError) as exc:
                t.errors.append(f"B's counters at the end: {exc}")
            for p in (t.a, t.b):
                if p is not None and not p.running():
                    t.errors.append(f"{p.name} exited with {p.returncode}: {p.stderr_tail(5)}")
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        head = (f"{now}, `{cmd}`, {time.monotonic() - started:.0f} s; load average (1 min) before "
                f"{load_before[0]:.2f}, per round {rng(loads)}, after {os.getloadavg()[0]:.2f}")
        text = "\n".join([head, "", tables(targets, args), "", "Machine:", "",
                          *[f"- {k}: {v}" for k, v in bench.machine()], ""])
        print("\n" + text)
        (workdir / "mtls.md").write_text(text)
        (workdir / "rounds.json").write_text(json.dumps({
            "command": cmd, "time": now, "loads": loads,
            "targets": [{"label": t.label, "rps": t.rps, "cpu_a_us": t.cpu_a, "cpu_b_us": t.cpu_b,
                         "per_run": t.per_run, "p50_ms": t.p50, "p99_ms": t.p99, "close_rps": t.close_rps,
                         "close_cpu_us": t.close_cpu, "close_runs": t.close_runs, "warmup": t.warmup_counters,
                         "proof": t.proof, "errors": t.errors} for t in targets]}, indent=1))
        print(f"\nwritten to {workdir / 'mtls.md'} and rounds.json; logs in {workdir}")
        return 0
    finally:
        for p in reversed(others):
            p.terminate(5)
        if mesh is not None:
            mesh.stop()
        if upstream is not None:
            upstream.terminate(5)


if __name__ == "__main__":
    sys.exit(main())
