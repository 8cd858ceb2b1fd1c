"""The control plane's identity flags (controlplane.ca.setup): a bad value is one line, exit 2."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from controlplane.ca.authority import generate
from controlplane.ca.setup import build_issuer
from controlplane.main import parse_args

ZK = ["--zk", "127.0.0.1:1"]


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_args([*ZK, *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meshkeeper controlplane: "), err
    return err


def write_ca(tmp_path: Path) -> tuple[str, str]:
    tmp_path.mkdir(exist_ok=True)
    ca = generate("example.org", lambda: 1_800_000_000.0)
    cert, key = tmp_path / "ca.pem", tmp_path / "ca.key"
    cert.write_bytes(ca.bundle_pem)
    key.write_bytes(ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return str(cert), str(key)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHKEEPER_CA_PASSPHRASE", raising=False)
    args = parse_args(ZK)
    assert args.trust_domain == "meshkeeper.local" and args.cert_ttl == 86400
    assert args.ca_authority is None and args.ca_passphrase is None


@pytest.mark.parametrize(("argv", "says"), [
    (["--trust-domain", "Bad Domain"], "--trust-domain"),
    (["--trust-domain", ""], "--trust-domain"),
    (["--cert-ttl", "0"], "--cert-ttl"),
    (["--cert-ttl", "0.5"], "--cert-ttl"),
    (["--cert-ttl", "soon"], "--cert-ttl"),
    (["--ca-cert", "x.pem"], "--ca-cert and --ca-key go together"),
    (["--ca-bundle", "x.pem"], "--ca-bundle needs --ca-cert"),
    (["--ca-cert", "/nonexistent/ca.pem", "--ca-key", "/nonexistent/ca.key"], "No such file"),
    (["--ca-passphrase-file", "/nonexistent/pass"], "--ca-passphrase-file /nonexistent/pass"),
])
def test_bad_identity_flags_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], says: str) -> None:
    assert says in refused(capsys, *argv)


def test_ca_files_that_do_not_fit_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cert, _ = write_ca(tmp_path / "a")
    _, other_key = write_ca(tmp_path / "b")
    assert "does not belong" in refused(capsys, "--ca-cert", cert, "--ca-key", other_key)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert "is empty" in refused(capsys, "--ca-passphrase-file", str(empty))


def test_ca_files_make_an_issuer(tmp_path: Path) -> None:
    cert, key = write_ca(tmp_path)
    args = parse_args([*ZK, "--ca-cert", cert, "--ca-key", key, "--trust-domain", "example.org",
                       "--cert-ttl", "10"])
    issuer = asyncio.run(build_issuer(args, asyncio.Event()))
    assert issuer is not None and issuer.trust_domain == "example.org" and issuer.ttl == 10
    assert issuer.bundle_pem == Path(cert).read_bytes()
    assert issuer.origin.startswith(f"--ca-cert {cert} (O=example.org)")


def test_no_ca_is_a_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("MESHKEEPER_CA_PASSPHRASE", raising=False)
    args = parse_args(ZK)
    assert asyncio.run(build_issuer(args, asyncio.Event())) is None
    assert [r.levelname for r in caplog.records if "no CA" in r.getMessage()] == ["WARNING"]


def test_the_passphrase_comes_from_the_file_or_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("MESHKEEPER_CA_PASSPHRASE", "from-env")
    assert parse_args(ZK).ca_passphrase == b"from-env"
    f = tmp_path / "pass"
    f.write_text("from-file\n")
    assert parse_args([*ZK, "--ca-passphrase-file", str(f)]).ca_passphrase == b"from-file"
