"""IssueIdentityToken and ``meshkeeper identity token``: the real AdminService on a real gRPC server
(the RPC reads nothing from ZooKeeper, so no store is needed), the CLI in-process."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from controlplane.admin import AdminService
from controlplane.admin import add_to_server as add_admin_to_server
from controlplane.auth import Authorizer, TokenFile
from controlplane.ca import Issuer
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
