"""IssueIdentityToken and ``meshkeeper identity token``: the real AdminService on a real gRPC server
(the RPC reads nothing from ZooKeeper, so no store is needed), the CLI in-process."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.admin import AdminService
from controlplane.admin import add_to_server as add_admin_to_server
from controlplane.auth import Authorizer, Role, TokenFile, TokenFileError, parse_credentials
from controlplane.ca import Issuer
from controlplane.ca.authority import generate
from controlplane.events import EventBus
from controlplane.proxies import ProxyRegistry
from meshkeeper.cli import main as cli_main

ADMIN, OPERATOR = "admin-token-0123456789", "operator-token-0123456789"


class ServedAdmin:
    """An AdminService on 127.0.0.1:<port 0>, its loop on a thread of its own."""

    def __init__(self, auth: Authorizer, issuer: Issuer | None,
                 credentials: grpc.ServerCredentials | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.admin = AdminService(object(), auth, proxies=ProxyRegistry(), events=EventBus(), issuer=issuer)

        async def start() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server()
            add_admin_to_server(server, self.admin)
            port = (server.add_insecure_port("127.0.0.1:0") if credentials is None
                    else server.add_secure_port("127.0.0.1:0", credentials))
            await server.start()
            return server, port

        self.server, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.cp = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def tokens(tmp_path: Path) -> TokenFile:
    path = tmp_path / "tokens"
    path.write_text(f"{ADMIN} ada admin\n{OPERATOR} otto operator\n")
    return TokenFile(str(path))


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer.generate(trust_domain="example.org")


@pytest.fixture
def served(tokens: TokenFile, issuer: Issuer) -> Iterator[ServedAdmin]:
    s = ServedAdmin(Authorizer(tokens), issuer)
    try:
        yield s
    finally:
        s.close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_an_admin_mints_a_token_the_ca_accepts(served: ServedAdmin, issuer: Issuer, capsys) -> None:
    code, out, err = run(capsys, "identity", "token", "web", "-n", "shop", "--cp", served.cp, "--token", ADMIN)
    assert code == 0, err
    token = out.strip()
    assert out == token + "\n"  # alone on stdout, for $(...)
    assert issuer.verify_token(token) == ("shop", "web")
    assert "spiffe://example.org/ns/shop/sa/web" in err


def test_json_output_and_the_ctl_spelling(served: ServedAdmin, issuer: Issuer, capsys) -> None:
    code, out, err = run(capsys, "ctl", "identity", "token", "web", "--cp", served.cp, "--token", ADMIN, "-o", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["spiffe_id"] == "spiffe://example.org/ns/default/sa/web"
    assert issuer.verify_token(doc["token"]) == ("default", "web")


def test_an_operator_may_not_mint(served: ServedAdmin, capsys) -> None:
    code, out, err = run(capsys, "identity", "token", "web", "--cp", served.cp, "--token", OPERATOR)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "admin" in err, err


def test_without_a_ca_it_is_a_failed_precondition(tokens: TokenFile) -> None:
    s = ServedAdmin(Authorizer(tokens), None)
    try:
        from meshkeeper.admin.v1 import admin_pb2, admin_pb2_grpc

        with grpc.insecure_channel(s.cp) as ch:
            stub = admin_pb2_grpc.AdminServiceStub(ch)
            with pytest.raises(grpc.RpcError) as exc:
                stub.IssueIdentityToken(admin_pb2.IssueIdentityTokenRequest(service="web"), timeout=10,
                                        metadata=(("authorization", f"Bearer {ADMIN}"),))
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no CA" in exc.value.details() and "\n" not in exc.value.details()
    finally:
        s.close()


@pytest.mark.parametrize("argv", [["identity", "token", "Web_1"], ["identity", "token", "web", "-n", "a.b"]])
def test_bad_names_are_refused_in_one_line(served: ServedAdmin, capsys, argv: list[str]) -> None:
    code, out, err = run(capsys, *argv, "--cp", served.cp, "--token", ADMIN)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "lowercase DNS label" in err, err


@pytest.mark.parametrize("argv", [["identity"], ["identity", "token"], ["identity", "token", "a", "b"],
                                  ["identity", "mint", "web"]])
def test_usage_mistakes_are_one_line(capsys, argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1, err


def test_the_audit_line_names_the_identity_never_the_token(served: ServedAdmin, caplog, capsys) -> None:
    caplog.set_level("INFO", logger="meshkeeper.controlplane.audit")
    code, out, err = run(capsys, "identity", "token", "web", "-n", "shop", "--cp", served.cp, "--token", ADMIN)
    assert code == 0, err
    lines = [r.getMessage() for r in caplog.records if r.name == "meshkeeper.controlplane.audit"]
    assert len(lines) == 1
    entry = json.loads(lines[0].split("audit ", 1)[1])
    assert (entry["rpc"], entry["who"], entry["role"], entry["result"]) == ("IssueIdentityToken", "ada", "admin", "ok")
    assert entry["spiffe_id"] == "spiffe://example.org/ns/shop/sa/web"
    token = out.strip()
    assert token not in lines[0] and token.rsplit(".", 1)[1] not in lines[0]


def test_a_refused_attempt_is_audited(served: ServedAdmin, caplog, capsys) -> None:
    caplog.set_level("INFO", logger="meshkeeper.controlplane.audit")
    run(capsys, "identity", "token", "web", "--cp", served.cp, "--token", OPERATOR)
    entries = [json.loads(r.getMessage().split("audit ", 1)[1]) for r in caplog.records
               if r.name == "meshkeeper.controlplane.audit"]
    assert [(e["rpc"], e["result"]) for e in entries] == [("IssueIdentityToken", "permission_denied")]
    assert "otto has the operator role" in entries[0]["error"]


# -------------------------------------------------------------------- operators over mutual TLS


OPS_CA_LIFETIME = 3600.0


def _leaf(ca, key, *, cn: str = "", org: str = "", uris: tuple[str, ...] = (), server: bool = False):
    now = datetime.datetime.now(datetime.UTC)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else []
    attrs += [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    if server:
        names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    b = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(ca.cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=not attrs)
    return b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _write_pair(directory: Path, name: str, ca, **kw) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert, keyfile = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(_leaf(ca, key, **kw))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(cert), str(keyfile)


@dataclass
class Ops:
    served: ServedAdmin
    ca: str
    certs: dict[str, tuple[str, str]]

    def run(self, capsys, who: str, *argv: str) -> tuple[int, str, str]:
        cert, key = self.certs[who]
        return run(capsys, *argv, "--cp", f"localhost:{self.served.port}", "--ca", self.ca, "--cert", cert, "--key", key)


@pytest.fixture
def ops(tmp_path: Path, issuer: Issuer) -> Iterator[Ops]:
    ca = generate("ops.example", time.time)
    (tmp_path / "ca.pem").write_bytes(ca.bundle_pem)
    server_cert, server_key = _write_pair(tmp_path, "server", ca, cn="meshkeeper-controlplane", server=True)
    certs = {
        "alice": _write_pair(tmp_path, "alice", ca, uris=("spiffe://ops.example/ns/ops/sa/alice",)),
        # bob's subject is O=ops then CN=bob in the certificate; the file writes it the other way round.
        "bob": _write_pair(tmp_path, "bob", ca, cn="Bob Smith", org="ops"),
        "mallory": _write_pair(tmp_path, "mallory", ca, cn="mallory", uris=("spiffe://ops.example/ns/ops/sa/mallory",)),
    }
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ADMIN} ada admin\n{OPERATOR} otto operator\n"
                      "spiffe://ops.example/ns/ops/sa/alice  alice  admin   # platform on-call\n"
                      "subject:CN=Bob Smith,O=ops  bob  operator\n")
    creds = grpc.ssl_server_credentials([(Path(server_key).read_bytes(), Path(server_cert).read_bytes())],
                                        root_certificates=ca.bundle_pem, require_client_auth=True)
    served = ServedAdmin(Authorizer(TokenFile(str(tokens))), issuer, creds)
    try:
        yield Ops(served, str(tmp_path / "ca.pem"), certs)
    finally:
        served.close()


def test_an_operator_certificate_with_a_mapped_spiffe_id_is_its_role(ops: Ops, issuer: Issuer, caplog, capsys) -> None:
    caplog.set_level("INFO", logger="meshkeeper.controlplane.audit")
    code, out, err = ops.run(capsys, "alice", "identity", "token", "web")
    assert code == 0, err
    assert issuer.verify_token(out.strip()) == ("default", "web")
    entry = json.loads(next(r.getMessage() for r in caplog.records
                            if r.name == "meshkeeper.controlplane.audit").split("audit ", 1)[1])
    assert (entry["who"], entry["role"]) == ("alice", "admin")


def test_a_subject_maps_in_any_attribute_order_and_roles_still_apply(ops: Ops, capsys) -> None:
    code, out, err = ops.run(capsys, "bob", "identity", "token", "web")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "bob has the operator role" in err, err


def test_an_unmapped_certificate_is_unauthenticated(ops: Ops, capsys) -> None:
    code, out, err = ops.run(capsys, "mallory", "identity", "token", "web")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "spiffe://ops.example/ns/ops/sa/mallory" in err, err


def test_a_token_decides_over_the_certificate(ops: Ops, capsys) -> None:
    code, _, err = ops.run(capsys, "alice", "identity", "token", "web", "--token", OPERATOR)
    assert code == 1 and "otto has the operator role" in err, err
    code, out, err = ops.run(capsys, "mallory", "identity", "token", "web", "--token", ADMIN)
    assert code == 0 and out.startswith("mk1.default.web."), err


@pytest.mark.parametrize(("line", "message"), [
    ("spiffe:// x admin", "has no trust domain"),
    ("spiffe:///ns/a x admin", "has no trust domain"),
    ("subject:CN=a x root", "role 'root'"),
    ("subject:not a name x admin", "is not an RFC 4514 name"),
    ("spiffe://td/a x admin\nspiffe://td/a y viewer", "tokens:2: spiffe://td/a is given twice"),
    ("subject:CN=a,O=b x admin\nsubject:O=b,CN=a y viewer", "tokens:2: the subject of 'y' is given twice"),
])
def test_bad_certificate_lines_name_the_line(line: str, message: str) -> None:
    with pytest.raises(TokenFileError, match=re.escape(message)):
        parse_credentials(line)


def test_certificate_lines_parse() -> None:
    creds = parse_credentials("spiffe://td/ns/ops/sa/alice alice operator\n"
                              "subject: CN=Alice Smith, O=ops   alice2 admin  # a comment\n"
                              f"{ADMIN} ada admin\n")
    assert creds.spiffe_ids == {"spiffe://td/ns/ops/sa/alice": ("alice", Role.OPERATOR)}
    assert list(creds.subjects.values()) == [("alice2", Role.ADMIN)]
    assert len(creds.tokens) == 1 and len(creds) == 3
