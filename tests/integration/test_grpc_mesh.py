"""gRPC through the sidecars (issue 14's acceptance): grpcio client -> its sidecar's outbound
listener -> the server's sidecar (``--protocol grpc``) -> grpcio server, with real ZooKeeper, the
real control plane and real sidecar processes.

The grpcio servers (tests/harness/grpc_rich.py) run in the test's process, so a test reads what a
server saw (its deadline); everything Meshkeeper is a process of its own. The client dials the
frontend sidecar's outbound port with ``grpc.default_authority`` set to the service's name, the
``Host: catalog`` of the HTTP tests: the mesh routes by ``:authority``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from meshkeeper.demo.process import rss_kib
from meshkeeper.registry import Paths, ServiceRecord
from tests.harness import ProcessGroup, http_get, wait_until
from tests.harness.grpc_rich import BIDI, BLOB, CLIENT_STREAM, SERVER_STREAM, UNARY, WHO, RichServer

pytestmark = pytest.mark.integration

CALL_TIMEOUT = 10.0


@dataclass
class GrpcMesh:
    ns: str
    cp: object
    frontend: object
    servers: list[RichServer]
    sidecars: list[object]  # the servers' sidecars, in the same order
    channels: list[grpc.Channel] = field(default_factory=list)

    def serving(self) -> dict[str, int]:
        """Serving catalog endpoints seen by the frontend sidecar: {host:port: weight}."""
        clusters = json.loads(http_get(f"{self.frontend.admin_url}/clusters")[2])["clusters"]
        for c in clusters:
            if c["name"] == f"outbound|catalog.{self.ns}":
                return {f"{e['address']}:{e['port']}": e["weight"] for e in c["endpoints"] if e["serving"]}
        return {}

    def cluster(self, sidecar=None) -> dict:
        clusters = json.loads(http_get(f"{(sidecar or self.frontend).admin_url}/clusters")[2])["clusters"]
        return next(c for c in clusters if c["name"] == f"outbound|catalog.{self.ns}")

    def channel(self, authority: str = "catalog") -> grpc.Channel:
        """A channel of its own (own HTTP/2 connection) to the frontend's outbound listener."""
        ch = grpc.insecure_channel(f"127.0.0.1:{self.frontend.port('outbound_port')}",
                                   options=[("grpc.default_authority", authority)])
        self.channels.append(ch)
        return ch

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        for server in self.servers:
            server.stop(None)


def start_grpc_mesh(procs: ProcessGroup, zk_hosts: str, ns: str, kz, weights: tuple[int, ...] = (10,),
                    policy: dict | None = None, fail_every: tuple[int, ...] = (),
                    sidecar_flags: dict | None = None) -> GrpcMesh:
    """Control plane, one grpcio server per weight (each behind a ``--protocol grpc`` sidecar), and a
    frontend sidecar; returns once the frontend routes to every catalog endpoint. The service
    record (protocol grpc) and policy are written first, so the first config carries them."""
    paths = Paths(ns)
    kz.create(paths.service("catalog"), ServiceRecord(protocol="grpc").encode(), makepath=True)
    if policy is not None:
        kz.create(paths.policy("catalog"), json.dumps(policy).encode())
    cp = procs.controlplane(zk_hosts)
    xds = f"127.0.0.1:{cp.port('xds_port')}"
    servers, sidecars = [], []
    names = "abcdefgh"
    flags = {"drain_delay": 0, "health_interval": 0.2, **(sidecar_flags or {})}
    for i, weight in enumerate(weights):
        server = RichServer(names[i], fail_every=fail_every[i] if i < len(fail_every) else 0).start()
        servers.append(server)
        sidecars.append(procs.sidecar("catalog", server.port, cp=xds, zk=zk_hosts, namespace=ns, protocol="grpc",
                                      weight=weight, wait_ready=False, name=f"sidecar-catalog-{names[i]}", **flags))
    fe_app = procs.app("frontend")
    frontend = procs.sidecar("frontend", fe_app.port("port"), cp=xds, zk=zk_hosts, namespace=ns, drain_delay=0)
    mesh = GrpcMesh(ns, cp, frontend, servers, sidecars)
    for sc in sidecars:
        sc.wait_ready()
    wait_until(lambda: len(mesh.serving()) == len(weights), 15, message="frontend sees every catalog endpoint")
    return mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, zk_server) -> Iterator[GrpcMesh]:
    """One catalog server behind its sidecar, a frontend sidecar, and an HTTP/1.1 service ``web``
    beside them (for the test of HTTP/1.1 and HTTP/2 clients on one port); shared by the tests that
    change nothing."""
    from kazoo.client import KazooClient

    procs = ProcessGroup(tmp_path_factory.mktemp("grpc-mesh") / "logs")
    kz = KazooClient(hosts=zk_server.hosts, timeout=5.0)
    kz.start(timeout=10)
    m = None
    try:
        m = start_grpc_mesh(procs, zk_server.hosts, "grpc-mesh-shared", kz)
        web = procs.app("web")
        procs.sidecar("web", web.port("port"), cp=f"127.0.0.1:{m.cp.port('xds_port')}", zk=zk_server.hosts,
                      namespace=m.ns, drain_delay=0)
        wait_until(lambda: http_get(f"http://127.0.0.1:{m.frontend.port('outbound_port')}/",
                                    {"Host": "web"})[0] == 200, 15, message="web routed")
        yield m
    finally:
        if m is not None:
            m.close()
        procs.close()
        kz.stop()
        kz.close()


def metadata(call) -> dict[str, str | bytes]:
    return dict(call)


# --------------------------------------------------------------------------- call kinds


def test_unary_carries_metadata_both_ways_and_trailers(mesh: GrpcMesh) -> None:
    for authority in ("catalog", f"catalog.{mesh.ns}"):
        unary = mesh.channel(authority).unary_unary(UNARY)
        body, call = unary.with_call(b"{}", timeout=CALL_TIMEOUT,
                                     metadata=(("x-request", "r1"), ("x-user", "u")))
        answer = json.loads(body)
        assert answer["name"] == "a", authority
        assert {k: answer["metadata"].get(k) for k in ("x-request", "x-user")} == {"x-request": "r1", "x-user": "u"}
        assert answer["metadata"]["x-request-id"]  # the sidecar's, as Envoy adds it
        assert metadata(call.initial_metadata())["x-initial"] == "a"
        trailers = metadata(call.trailing_metadata())
        assert trailers["x-trailer"] == "t-a" and trailers["x-blob-bin"] == BLOB
        assert call.code() == grpc.StatusCode.OK


def test_server_streaming(mesh: GrpcMesh) -> None:
    stream = mesh.channel().unary_stream(SERVER_STREAM)
    call = stream(json.dumps({"count": 50, "size": 1000}).encode(), timeout=CALL_TIMEOUT)
    messages = list(call)
    assert [m.split(b":")[1] for m in messages] == [str(i).encode() for i in range(50)]
    assert all(len(m) == 1000 for m in messages)
    assert metadata(call.initial_metadata())["x-initial"] == "a"
    assert metadata(call.trailing_metadata())["x-trailer"] == "t-a"
    assert call.code() == grpc.StatusCode.OK


def test_client_streaming(mesh: GrpcMesh) -> None:
    upload = mesh.channel().stream_unary(CLIENT_STREAM)
    messages = [bytes([i]) * (i * 1000) for i in range(100)]  # 4.95 MB in all: windows are crossed
    body, call = upload.with_call(iter(messages), timeout=CALL_TIMEOUT, metadata=(("x-request", "up"),))
    assert json.loads(body) == {"name": "a", "count": 100, "bytes": sum(map(len, messages))}
    assert metadata(call.trailing_metadata())["x-trailer"] == "t-a"


def test_bidi_streaming_interleaves(mesh: GrpcMesh) -> None:
    """Each answer arrives before the next message is sent: the sidecars forward frames as they
    come, neither side's half is buffered until its end."""
    bidi = mesh.channel().stream_stream(BIDI)
    outbox: list[bytes] = []
    ready = threading.Event()

    def requests() -> Iterator[bytes]:
        for i in range(20):
            ready.wait(CALL_TIMEOUT)
            ready.clear()
            outbox.append(b"m%d" % i)  # before the yield: the code after it runs at the next pull only
            yield outbox[-1]

    ready.set()
    answers = []
    for answer in bidi(requests(), timeout=CALL_TIMEOUT):
        answers.append(answer)
        assert answer == b"a:" + outbox[-1]
        ready.set()
    assert answers == [b"a:m%d" % i for i in range(20)]


@pytest.mark.parametrize(("status", "details"), [
    ("NOT_FOUND", "no book 42"), ("INVALID_ARGUMENT", "isbn: must be 13 digits"),
    ("PERMISSION_DENIED", "not yours"), ("UNAVAILABLE", "try later"), ("INTERNAL", "oops ünïcode %"),
])
def test_status_codes_and_details_arrive_unchanged(mesh: GrpcMesh, status: str, details: str) -> None:
    unary = mesh.channel().unary_unary(UNARY)
    with pytest.raises(grpc.RpcError) as err:
        unary(json.dumps({"status": status, "details": details}).encode(), timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode[status]
    assert err.value.details() == details
    assert metadata(err.value.trailing_metadata())["x-trailer"] == "t-a"


# --------------------------------------------------------------------------- deadlines


def test_deadline_propagates_to_the_server(mesh: GrpcMesh) -> None:
    unary = mesh.channel().unary_unary(UNARY)
    unary(b"{}", timeout=CALL_TIMEOUT)  # the connections are up: the timing below is the call's own
    server = mesh.servers[0]
    seen = len(server.deadlines)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        unary(json.dumps({"sleep_ms": 2000}).encode(), timeout=0.3)
    elapsed = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.28 <= elapsed < 0.8, elapsed
    remaining = server.deadlines[seen]
    assert remaining is not None and 0 < remaining < 1.0, remaining


# --------------------------------------------------------------------------- flow control


MESSAGE = 64 * 1024
BIG = 20 * 1024 * 1024  # 320 messages of 64 KiB
# What a sidecar may hold for one stream by design: the receive window whose credit it withholds
# (1 MiB, sidecar/codec/http2_session.py), the send queue up to its high-water mark (64 KiB) and the
# transport's write buffer (64 KiB). Measured growth: 1.2 to 2.9 MiB. A sidecar without back-pressure
# would hold what the reader has not taken, 20 MiB less what the client and the sockets hold
# (the whole pipeline holds 6 to 8 MiB, measured as how far the server runs ahead): over 12 MiB.
RSS_GROWTH_LIMIT_KIB = 8 * 1024
AHEAD_LIMIT = 16 * 1024 * 1024  # unbounded: the server writes 20 MiB in a fraction of a second


def sidecar_rss_kib(sidecar) -> int:
    return sum(rss_kib(pid) for pid in sidecar.group_pids())


def test_a_slow_reader_of_20_mb_keeps_both_sidecars_rss_bounded(mesh: GrpcMesh) -> None:
    """The server writes 20 MB as fast as HTTP/2 flow control lets it; the client reads a message
    every 5 ms. Back-pressure has to travel client <- frontend sidecar <- catalog sidecar <- server,
    so neither sidecar may hold more than its windows and socket buffers."""
    stream = mesh.channel().unary_stream(SERVER_STREAM)
    request = json.dumps({"count": BIG // MESSAGE, "size": MESSAGE}).encode()
    sidecars = {"frontend": mesh.frontend, "catalog": mesh.sidecars[0]}
    # Warm up: one fast 20 MB transfer, so that the baseline has what any big call allocates.
    assert sum(map(len, stream(request, timeout=30))) == BIG
    baseline = {name: sidecar_rss_kib(sc) for name, sc in sidecars.items()}
    peak = dict(baseline)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for name, sc in sidecars.items():
                peak[name] = max(peak[name], sidecar_rss_kib(sc))
            done.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    received, ahead = 0, []
    server = mesh.servers[0]
    streamed = server.streamed
    try:
        for message in stream(request, timeout=60):
            received += len(message)
            ahead.append(server.streamed - streamed - received)
            time.sleep(0.005)  # the slow reader (a pace, not a wait for state)
    finally:
        done.set()
        sampler.join()
    assert received == BIG
    growth = {name: peak[name] - baseline[name] for name in sidecars}
    print(f"RSS baseline KiB {baseline}, peak growth KiB {growth}, server ahead of the reader by at most "
          f"{max(ahead) // 1024} KiB, by {ahead[len(ahead) // 2] // 1024} KiB half-way")
    assert all(g < RSS_GROWTH_LIMIT_KIB for g in growth.values()), growth
    assert max(ahead) < AHEAD_LIMIT, max(ahead)


# --------------------------------------------------------------------------- both HTTP versions on one port


needs_load_tools = pytest.mark.skipif(shutil.which("h2load") is None or shutil.which("wrk") is None,
                                      reason="h2load (nghttp2-client) and wrk are needed")


@needs_load_tools
def test_http1_and_http2_clients_on_the_same_outbound_port_at_once(mesh: GrpcMesh) -> None:
    """wrk (HTTP/1.1) and h2load (h2c, prior knowledge) to the HTTP service ``web``, and grpcio to
    ``catalog``, all at once on the frontend's one outbound port: every request is routed."""
    port = mesh.frontend.port("outbound_port")
    who = mesh.channel().unary_unary(WHO)
    grpc_answers: Counter[str] = Counter()
    grpc_done = threading.Event()

    def grpc_calls() -> None:
        while not grpc_done.is_set():
            try:
                grpc_answers[who(b"", timeout=CALL_TIMEOUT).decode()] += 1
            except grpc.RpcError as exc:
                grpc_answers[exc.code().name] += 1

    caller = threading.Thread(target=grpc_calls)
    caller.start()
    wrk = subprocess.Popen(["wrk", "-t1", "-c4", "-d2s", "-H", "Host: web", f"http://127.0.0.1:{port}/"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        h2 = subprocess.run(["h2load", "-c10", "-m10", "-n2000", "-H", ":authority: web", f"http://127.0.0.1:{port}/"],
                            capture_output=True, text=True, timeout=60)
        wrk_out = wrk.communicate(timeout=30)[0]
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
        grpc_done.set()
        caller.join(timeout=30)
    print(wrk_out, h2.stdout, grpc_answers, sep="\n")
    assert "2000 succeeded, 0 failed, 0 errored" in h2.stdout, h2.stdout
    assert "status codes: 2000 2xx" in h2.stdout and "h2c" in h2.stdout, h2.stdout
    # Counts, not rates: that each client was served while the others ran (a loaded machine may
    # give wrk few requests in its 2 s; speed is bench/'s business).
    requests = int(wrk_out.split(" requests in ")[0].split()[-1])
    assert requests >= 4 and "Non-2xx" not in wrk_out and "Socket errors" not in wrk_out, wrk_out
    assert set(grpc_answers) == {"a"} and grpc_answers["a"] >= 1, grpc_answers


# --------------------------------------------------------------------------- weights


WEIGHTS = (1, 2, 7)


def test_weights_1_2_7_split_2000_unary_calls(procs, zk_server, zk_client, namespace) -> None:
    mesh = start_grpc_mesh(procs, zk_server.hosts, namespace, zk_client, weights=WEIGHTS)
    try:
        who = mesh.channel().unary_unary(WHO)
        got = Counter(who(b"", timeout=CALL_TIMEOUT).decode() for _ in range(2000))
        shares = {name: got[name] / 2000 for name in "abc"}
        print(f"weights {WEIGHTS} over 2000 calls: {shares}")
        for name, weight in zip("abc", WEIGHTS, strict=True):
            assert abs(shares[name] - weight / sum(WEIGHTS)) <= 0.03, shares
    finally:
        mesh.close()


# --------------------------------------------------------------------------- ejection and retries


def test_an_unavailable_instance_is_ejected_and_retries_hide_it(procs, zk_server, zk_client, namespace) -> None:
    policy = {"outlier": {"consecutive_5xx": 5, "interval_ms": 1000, "base_ejection_ms": 30000,
                          "max_ejection_percent": 50},
              "retry": {"attempts": 2, "on": ["unavailable"]}}
    mesh = start_grpc_mesh(procs, zk_server.hosts, namespace, zk_client, weights=(10, 10, 10), policy=policy,
                           fail_every=(1,))  # server a answers UNAVAILABLE to every call
    try:
        bad = f"127.0.0.1:{mesh.sidecars[0].port('inbound_port')}"
        who = mesh.channel().unary_unary(WHO)
        got: Counter[str] = Counter()
        for _ in range(1200):
            try:
                got[who(b"", timeout=CALL_TIMEOUT).decode()] += 1
            except grpc.RpcError as exc:
                got[exc.code().name] += 1
        ok = got["b"] + got["c"]
        print(f"over 1200 calls: {dict(got)}; server a saw {mesh.servers[0].calls} calls")
        assert ok / 1200 >= 0.999, got
        endpoints = {f"{e['address']}:{e['port']}": e for e in mesh.cluster()["endpoints"]}
        assert endpoints[bad]["ejected"], endpoints[bad]
        assert mesh.servers[0].calls <= 10, mesh.servers[0].calls  # ejected on the 5th failure
    finally:
        mesh.close()


# --------------------------------------------------------------------------- drain on SIGTERM


class GoawayTolerantH2(h2.connection.H2Connection):
    """h2 moves its whole connection to CLOSED on a GOAWAY and then refuses the DATA of the streams
    still in flight, which RFC 9113 §6.8 lets finish: here a GOAWAY is only an event."""

    def _receive_goaway_frame(self, frame):
        event = h2.events.ConnectionTerminated()
        event.error_code, event.last_stream_id = frame.error_code, frame.last_stream_id
        return [], [event]


class RawCall:
    """One server-streaming call on a raw HTTP/2 connection to a sidecar's inbound listener (as a
    calling sidecar would open it), to see the frames a drain sends: GOAWAY, then the rest."""

    def __init__(self, port: int, request: bytes) -> None:
        import socket
        import struct

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.h2 = GoawayTolerantH2(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.h2.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", SERVER_STREAM),
                                 (":authority", "catalog"), ("content-type", "application/grpc"),
                                 ("te", "trailers")])
        self.h2.send_data(1, struct.pack(">BI", 0, len(request)) + request, end_stream=True)
        self.sock.sendall(self.h2.data_to_send())
        self.body = bytearray()
        self.trailers: dict[bytes, bytes] = {}
        self.goaways: list[tuple[int, int, int]] = []  # (error code, last stream id, body bytes by then)
        self.ended = False

    def read(self) -> bool:
        """Read once (at most 10 s); False once the connection is closed."""
        data = self.sock.recv(65536)
        if not data:
            return False
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                self.body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                self.trailers = dict(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaways.append((event.error_code, event.last_stream_id, len(self.body)))
        self.sock.sendall(self.h2.data_to_send())
        return True

    def close(self) -> None:
        self.sock.close()


def test_sigterm_on_the_servers_sidecar_drains_with_goaway_and_in_flight_streams_finish(
        procs, zk_server, zk_client, namespace) -> None:
    mesh = start_grpc_mesh(procs, zk_server.hosts, namespace, zk_client, weights=(10, 10),
                           sidecar_flags={"drain_delay": 1, "drain_timeout": 10})
    draining = mesh.sidecars[0]  # in front of server a
    slow = json.dumps({"count": 30, "size": 100, "interval_ms": 50}).encode()  # 1.5 s a call
    raw = RawCall(draining.port("inbound_port"), slow)
    streams = mesh.channel().unary_stream(SERVER_STREAM)
    who = mesh.channel().unary_unary(WHO)
    results: list[tuple[str, int, str]] = []  # (server, messages, status) per streaming call
    started = threading.Semaphore(0)
    unary: Counter[str] = Counter()
    stop_unary = threading.Event()

    def stream_call() -> None:
        n, server, code = 0, "", "OK"
        try:
            for message in streams(slow, timeout=CALL_TIMEOUT):
                if n == 0:
                    server = message.split(b":")[0].decode()
                    started.release()
                n += 1
        except grpc.RpcError as exc:
            code = exc.code().name
            if n == 0:
                started.release()
        results.append((server, n, code))

    def unary_calls() -> None:
        while not stop_unary.is_set():
            try:
                unary[who(b"", timeout=CALL_TIMEOUT).decode()] += 1
            except grpc.RpcError as exc:
                unary[exc.code().name] += 1

    threads = [threading.Thread(target=stream_call) for _ in range(8)] + [threading.Thread(target=unary_calls)]
    try:
        for t in threads:
            t.start()
        for _ in range(8):
            assert started.acquire(timeout=CALL_TIMEOUT), "a streaming call got no first message"
        while not raw.body:
            assert raw.read(), "the raw call's connection closed before its first message"
        draining.signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while not raw.ended and raw.read():
            assert time.monotonic() < deadline, "the raw call did not end"
        # RFC 9113 §6.8: a notice refusing nothing, then (after a PING round trip) the final GOAWAY
        # naming the stream in flight; both while it runs.
        assert [(code, last) for code, last, _ in raw.goaways] == [(0, 2**31 - 1), (0, 1)], raw.goaways
        assert all(0 < at < 30 * 105 for _, _, at in raw.goaways), "GOAWAY came after the stream ended"
        assert raw.ended and raw.trailers.get(b"grpc-status") == b"0", raw.trailers
        assert len(raw.body) == 30 * 105  # 30 messages of 100 bytes, each with its 5-byte prefix
        for t in threads[:-1]:
            t.join(timeout=15)
        assert draining.wait(timeout=15) == 0
        stop_unary.set()
        threads[-1].join(timeout=15)
    finally:
        stop_unary.set()
        raw.close()
        mesh.close()
    print(f"streaming calls (server, messages, status): {sorted(results)}; unary calls meanwhile: {dict(unary)}")
    assert sorted(results) == sorted((s, 30, "OK") for s, _, _ in results), results
    assert {s for s, _, _ in results} == {"a", "b"}  # some of them were in flight through the draining sidecar
    assert set(unary) <= {"a", "b"} and unary["b"] > 0, unary
