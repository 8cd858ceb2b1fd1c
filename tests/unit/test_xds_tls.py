"""TLS for the sidecar's streams to the control plane (``--xds-ca``, ``--xds-cert``, ``--xds-key``):
the flags, and the ADS and LRS clients against a real grpc.aio server with TLS credentials."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.load_stats.v3 import lrs_pb2, lrs_pb2_grpc

from meshkeeper import xds
from meshkeeper.xds import NodeInfo
from sidecar import main as sidecar_main
from sidecar.upstream.cluster import ClusterManager
from sidecar.xds.client import AdsClient, channel_credentials
from sidecar.xds.lrs import LoadReporter
from tests.harness.tls import TlsFiles, make_tls

NODE = NodeInfo(node_id="sidecar~127.0.0.1~catalog-15006.default", service="catalog", app_port=8080)


class NullSink:
    def apply_clusters(self, clusters): ...
    def apply_endpoints(self, assignments): ...
    def apply_listeners(self, listeners): ...
    def apply_routes(self, routes): ...
    def apply_runtime(self, values, version): ...


class TinyAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """Answers a stream's first request with an empty CDS response; records who connected."""

    def __init__(self) -> None:
        self.streams = 0
        self.client_names: list[str] = []  # the client certificate's CN, "" without one

    async def StreamAggregatedResources(self, request_iterator, context):  # noqa: N802
        self.streams += 1
        cn = context.auth_context().get("x509_common_name") or [b""]
        self.client_names.append(cn[0].decode())
        async for _ in request_iterator:
            yield discovery_pb2.DiscoveryResponse(type_url=xds.CLUSTER, version_info="1", nonce="1")
            break
        await asyncio.Event().wait()  # hold the stream open until the client goes


class TinyLrs(lrs_pb2_grpc.LoadReportingServiceServicer):
    def __init__(self) -> None:
        self.streams = 0

    async def StreamLoadStats(self, request_iterator, context):  # noqa: N802
        self.streams += 1
        async for _ in request_iterator:
            resp = lrs_pb2.LoadStatsResponse(send_all_clusters=True)
            resp.load_reporting_interval.FromSeconds(60)
            yield resp
            break
        await asyncio.Event().wait()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


async def serve_tls(tls: TlsFiles, *, require_client_auth: bool) -> tuple[grpc.aio.Server, str, TinyAds, TinyLrs]:
    server = grpc.aio.server()
    ads, lrs = TinyAds(), TinyLrs()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    lrs_pb2_grpc.add_LoadReportingServiceServicer_to_server(lrs, server)
    creds = grpc.ssl_server_credentials([(tls.server_key.read_bytes(), tls.server_cert.read_bytes())],
                                        root_certificates=tls.ca.read_bytes(),
                                        require_client_auth=require_client_auth)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    return server, f"127.0.0.1:{port}", ads, lrs


def sidecar_args(target: str, *extra: str):
    return sidecar_main.parse_args(["--service", "catalog", "--app-port", "8080", "--cp", target, *extra])


def credentials_of(args):
    return channel_credentials(*args.xds_tls) if args.xds_tls is not None else None


async def until(cond, what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def start_clients(target: str, args) -> tuple[AdsClient, LoadReporter]:
    creds = credentials_of(args)
    ads = AdsClient(target, NODE, NullSink(), backoff_base=0.02, backoff_max=0.1, credentials=creds)
    lrs = LoadReporter(target, NODE, ClusterManager(), backoff_base=0.02, backoff_max=0.1, credentials=creds)
    ads.start()
    lrs.start()
    return ads, lrs


# --------------------------------------------------------------------------- connecting


async def test_tls_with_the_ca_connects_ads_and_lrs(tls):
    server, target, ads_servicer, lrs_servicer = await serve_tls(tls, require_client_auth=False)
    ads, lrs = start_clients(target, sidecar_args(target, "--xds-ca", str(tls.ca)))
    try:
        await until(lambda: ads.connected and lrs.connected, "ADS and LRS connected over TLS")
        assert ads_servicer.client_names == [""]  # no client certificate asked, none sent
        assert lrs_servicer.streams == 1
    finally:
        await ads.stop()
        await lrs.stop()
        await server.stop(None)


async def test_mutual_tls_connects_with_the_client_certificate(tls):
    server, target, ads_servicer, lrs_servicer = await serve_tls(tls, require_client_auth=True)
    args = sidecar_args(target, "--xds-ca", str(tls.ca), "--xds-cert", str(tls.client_cert),
                        "--xds-key", str(tls.client_key))
    ads, lrs = start_clients(target, args)
    try:
        await until(lambda: ads.connected and lrs.connected, "ADS and LRS connected over mutual TLS")
        assert ads_servicer.client_names == ["meshkeeper-sidecar"]
    finally:
        await ads.stop()
        await lrs.stop()
        await server.stop(None)


@pytest.mark.parametrize("flags", ["ca-only", "other-ca", "insecure"])
async def test_without_the_right_credentials_the_clients_stay_not_connected(tls, flags, caplog):
    """mTLS required: no client certificate, an untrusted server CA, or no TLS at all never connect;
    the clients keep retrying (each failure logged) and the server never sees a stream."""
    server, target, ads_servicer, lrs_servicer = await serve_tls(tls, require_client_auth=True)
    extra = {"ca-only": ("--xds-ca", str(tls.ca)), "other-ca": ("--xds-ca", str(tls.other_ca)),
             "insecure": ()}[flags]
    caplog.set_level(logging.WARNING, logger="meshkeeper.sidecar")
    ads, lrs = start_clients(target, sidecar_args(target, *extra))
    try:
        def failures(logger: str) -> int:
            return sum(1 for r in caplog.records if r.name == logger and "UNAVAILABLE" in r.getMessage())

        # Three failed ADS attempts, and LRS failed too: the handshake was tried and refused.
        await until(lambda: failures("meshkeeper.sidecar.xds") >= 3 and failures("meshkeeper.sidecar.lrs") >= 1,
                    "failed connection attempts")
        assert not ads.connected and ads.connects == 0
        assert not lrs.connected and lrs.connects == 0
        assert ads_servicer.streams == 0 and lrs_servicer.streams == 0
    finally:
        await ads.stop()
        await lrs.stop()
        await server.stop(None)


# --------------------------------------------------------------------------- flags


def test_without_the_flags_the_channel_is_insecure():
    args = sidecar_args("127.0.0.1:15010")
    assert args.xds_tls is None and credentials_of(args) is None
    assert sidecar_main.worker_tls_flags(args) == []


def test_the_flags_read_the_pem_files(tls):
    args = sidecar_args("127.0.0.1:15010", "--xds-ca", str(tls.ca), "--xds-cert", str(tls.client_cert),
                        "--xds-key", str(tls.client_key))
    assert args.xds_tls == (tls.ca.read_bytes(), tls.client_cert.read_bytes(), tls.client_key.read_bytes())
    args = sidecar_args("127.0.0.1:15010", "--xds-ca", str(tls.ca))
    assert args.xds_tls == (tls.ca.read_bytes(), None, None)


@pytest.mark.parametrize(("case", "message"), [
    ("missing-ca", "--xds-ca {d}/nope.pem: cannot read it: No such file or directory"),
    ("ca-is-a-dir", "--xds-ca {d}: cannot read it"),
    ("ca-not-pem", "--xds-ca {d}/junk.txt: not a PEM file"),
    ("ca-is-a-key", "no usable CA certificate"),
    ("cert-without-key", "--xds-cert and --xds-key go together"),
    ("key-without-cert", "--xds-cert and --xds-key go together"),
    ("cert-without-ca", "--xds-cert/--xds-key need --xds-ca"),
    ("missing-key", "--xds-key {d}/nope.key: cannot read it"),
    ("key-of-another-cert", "not a certificate and its key"),
])
def test_bad_tls_flags_are_one_line_and_exit_code_2(tls, tmp_path: Path, capsys, case, message):
    (tmp_path / "junk.txt").write_text("not a certificate\n")
    ca, cert, key = str(tls.ca), str(tls.client_cert), str(tls.client_key)
    flags = {
        "missing-ca": ["--xds-ca", f"{tmp_path}/nope.pem"],
        "ca-is-a-dir": ["--xds-ca", str(tmp_path)],
        "ca-not-pem": ["--xds-ca", f"{tmp_path}/junk.txt"],
        "ca-is-a-key": ["--xds-ca", key],
        "cert-without-key": ["--xds-ca", ca, "--xds-cert", cert],
        "key-without-cert": ["--xds-ca", ca, "--xds-key", key],
        "cert-without-ca": ["--xds-cert", cert, "--xds-key", key],
        "missing-key": ["--xds-ca", ca, "--xds-cert", cert, "--xds-key", f"{tmp_path}/nope.key"],
        "key-of-another-cert": ["--xds-ca", ca, "--xds-cert", cert, "--xds-key", str(tls.server_key)],
    }[case]
    with pytest.raises(SystemExit) as info:
        sidecar_args("127.0.0.1:15010", *flags)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meshkeeper sidecar: ")
    assert message.format(d=tmp_path) in err
    assert "Traceback" not in err


def test_workers_get_the_same_tls_flags(tls, monkeypatch):
    args = sidecar_args("127.0.0.1:15010", "--workers", "3", "--xds-ca", str(tls.ca),
                        "--xds-cert", str(tls.client_cert), "--xds-key", str(tls.client_key))
    spawned: list[list[str]] = []

    class FakePopen:
        def __init__(self, argv, pass_fds=(), env=None):
            spawned.append(list(argv))

    monkeypatch.setattr(sidecar_main.subprocess, "Popen", FakePopen)
    workers = sidecar_main._spawn_workers(args, 15001, 15006)
    for w in workers:
        w.ready.close()
    assert len(spawned) == 2
    for argv in spawned:
        worker = sidecar_main.parse_args(argv[argv.index("sidecar") + 1:])
        assert (worker.xds_ca, worker.xds_cert, worker.xds_key) == (str(tls.ca), str(tls.client_cert),
                                                                    str(tls.client_key))
        assert worker.xds_tls == args.xds_tls and worker.worker_index > 0


async def test_stopping_a_stream_that_will_not_end_does_not_hang_shutdown(monkeypatch, caplog):
    from sidecar.xds import client as client_module

    monkeypatch.setattr(client_module, "STOP_GRACE", 0.1)
    stuck = asyncio.Event()

    async def never_ends() -> None:
        while not stuck.is_set():
            try:
                await stuck.wait()
            except asyncio.CancelledError:
                continue  # what a channel stuck in close looks like from outside

    task = asyncio.get_running_loop().create_task(never_ends())
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    await client_module.stop_task(task, "xds")
    assert asyncio.get_running_loop().time() - started < 2
    assert "xds stream did not stop" in caplog.text
    stuck.set()  # let it end
    await asyncio.wait({task}, timeout=5)
    assert task.done()
