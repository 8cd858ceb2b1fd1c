"""``meshkeeper bootstrap --proxyless`` and ``meshkeeper register`` without processes, and the gRPC
health check against an in-process grpc.aio server."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshkeeper import bootstrap, cli
from meshkeeper.demo.process import free_port
from sidecar import register
from sidecar.grpc_health import check_grpc


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_bootstrap_names_the_control_plane_insecure_v3_and_a_node_without_a_service(capsys):
    code, out, err = run_cli(capsys, "bootstrap", "--proxyless", "--cp", "10.0.0.5:15010", "-n", "prod",
                             "--service", "frontend", "--node-id", "fe-1")
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "xds_servers": [{"server_uri": "10.0.0.5:15010", "channel_creds": [{"type": "insecure"}],
                         "server_features": ["xds_v3"]}],
        "node": {"id": "fe-1", "cluster": "frontend", "metadata": {"namespace": "prod"}, "locality": {}}}


def test_bootstrap_defaults_and_file_output(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MESHKEEPER_CP", "127.0.0.1:25010")
    path = tmp_path / "bootstrap.json"
    assert run_cli(capsys, "bootstrap", "--proxyless", "-o", str(path)) == (0, "", "")
    got = json.loads(path.read_text())
    assert got["xds_servers"][0]["server_uri"] == "127.0.0.1:25010"
    assert got["node"]["id"].startswith("proxyless~") and got["node"]["id"].endswith("~grpc.default")


def test_bootstrap_with_tls_names_the_files(tmp_path):
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem"))
    got = bootstrap.bootstrap("cp:15010", ca=str(ca), cert=str(cert), key=str(key))
    assert got["xds_servers"][0]["channel_creds"] == [{"type": "tls", "config": {
        "ca_certificate_file": str(ca), "certificate_file": str(cert), "private_key_file": str(key)}}]


@pytest.mark.parametrize("argv, says", [
    (["bootstrap"], "only --proxyless"),
    (["bootstrap", "--proxyless", "--cp", "nohost"], "expected HOST:PORT"),
    (["bootstrap", "--proxyless", "-n", "Bad_NS"], "namespace"),
    (["bootstrap", "--proxyless", "--xds-cert", "c.pem"], "go together"),
    (["bootstrap", "--proxyless", "--xds-ca", "/nonexistent/ca.pem"], "cannot read"),
    (["register", "--port", "50051"], "--service"),
    (["register", "--service", "catalog", "--port", "0"], "--port must name"),
    (["register", "--service", "catalog", "--port", "http"], "not a port number"),
    (["register", "--service", "catalog", "--port", "50051", "--weight", "100001"], "outside"),
    (["register", "--service", "catalog", "--port", "50051", "--advertise-host", "myhost"], "IP address"),
    (["register", "--service", "Catalog!", "--port", "50051"], "service"),
    (["register", "--service", "catalog", "--port", "50051", "--protocol", "h3"], "invalid choice"),
    (["register", "--service", "catalog", "--port", "50051", "--log-level", "loud"], "--log-level"),
    (["register", "--service", "catalog", "--port", "50051", "--zk", ""], "--zk"),
    (["register", "--service", "catalog", "--port", "50051", "--zk", "zk1:notaport"], "--zk"),
    (["register", "--service", "catalog", "--port", "50051", "--zk", "zk1:2181,zk2:x:y"], "--zk"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, argv, says):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and says in err and "Traceback" not in err, err


def test_register_reads_zookeeper_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("MESHKEEPER_ZK", "zk1:2181,zk2:2181/mesh")
    assert register.parse_args(["--service", "catalog", "--port", "50051"]).zk == "zk1:2181,zk2:2181/mesh"
    monkeypatch.setenv("MESHKEEPER_ZK", "zk1:port")
    code, _, err = run_cli(capsys, "register", "--service", "catalog", "--port", "50051")
    assert code == 2 and err.startswith("meshkeeper register: MESHKEEPER_ZK ") and err.count("\n") == 1


def test_register_builds_the_instance_record_callers_dial():
    args = register.parse_args(["--service", "catalog", "--port", "50051", "--weight", "7", "--zone", "a",
                                "--advertise-host", "10.0.0.7"])
    rec = args.record
    assert (rec.key, rec.weight, rec.protocol, rec.app_port, dict(rec.labels)) == (
        "10.0.0.7:50051", 7, "grpc", 50051, {"zone": "a"})


async def test_grpc_health_check_wants_serving():
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await servicer.set("catalog", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await check_grpc("127.0.0.1", port) is True
        assert await check_grpc("127.0.0.1", port, "catalog") is False
        assert await check_grpc("127.0.0.1", port, "nosuch") is False  # NOT_FOUND
    finally:
        await server.stop(0)
    assert await check_grpc("127.0.0.1", free_port(), timeout=1.0) is False  # nothing listens
