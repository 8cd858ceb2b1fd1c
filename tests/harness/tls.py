"""Throwaway TLS material for tests, made with the ``openssl`` CLI.

    from tests.harness.tls import make_tls
    tls = make_tls(tmp_path / "tls")      # paths: ca, ca_key, server_cert, server_key, client_cert, client_key
    grpc.ssl_server_credentials([(tls.server_key.read_bytes(), tls.server_cert.read_bytes())],
                                root_certificates=tls.ca.read_bytes(), require_client_auth=True)

One CA signs a server certificate (``CN=meshkeeper-controlplane``, SAN ``IP:127.0.0.1`` and
``DNS:localhost``, serverAuth) and a client certificate (``CN=meshkeeper-sidecar``, clientAuth).
``other_ca`` is a second, unrelated CA, for "does not trust" cases. EC P-256 keys, unencrypted,
valid for a day.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "1"


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path.name,
             cwd=path.parent)


def _ca(d: Path, name: str, cn: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _key(key)
    _openssl("req", "-x509", "-new", "-key", key.name, "-out", cert.name, "-days", DAYS, "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)
    return cert, key


def _leaf(d: Path, name: str, cn: str, ca: Path, ca_key: Path, extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    _key(key)
    _openssl("req", "-new", "-key", key.name, "-out", csr.name, "-subj", f"/CN={cn}", cwd=d)
    ext.write_text(extensions)
    _openssl("x509", "-req", "-in", csr.name, "-CA", ca.name, "-CAkey", ca_key.name, "-CAcreateserial",
             "-out", cert.name, "-days", DAYS, "-extfile", ext.name, cwd=d)
    return cert, key


def make_tls(directory: Path | str) -> TlsFiles:
    """Write a CA, a server and a client certificate (and a second CA) into ``directory``."""
    if shutil.which("openssl") is None:
        raise RuntimeError("make_tls needs the openssl CLI on PATH")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca(d, "ca", "meshkeeper test CA")
    other_ca, _ = _ca(d, "other-ca", "some other CA")
    server_cert, server_key = _leaf(
        d, "server", "meshkeeper-controlplane", ca, ca_key,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    client_cert, client_key = _leaf(
        d, "client", "meshkeeper-sidecar", ca, ca_key,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    return TlsFiles(ca=ca, ca_key=ca_key, server_cert=server_cert, server_key=server_key,
                    client_cert=client_cert, client_key=client_key, other_ca=other_ca)
