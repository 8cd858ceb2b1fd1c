"""SDS ``Secret`` resources -> :class:`sidecar.config.SecretConfig` (docs/identity.md).

Only what the control plane sends is accepted, inline: ``default`` with a certificate chain and no
private key (the sidecar's key never travels), ``ROOTCA`` with a trusted CA bundle. Anything else
(a key sent over the wire, a file path, SPKI pins, another secret type) is refused by name, so the
xDS client NACKs it and the last good secret stays.
"""

from __future__ import annotations

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from meshkeeper.identity import SECRET_DEFAULT, SECRET_ROOTCA
from sidecar.config import SecretConfig
from sidecar.xds.convert import XdsError

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


def _inline(source, where: str) -> bytes:
    if source.WhichOneof("specifier") != "inline_bytes":
        raise XdsError(f"{where}: only inline_bytes is supported")
    data = source.inline_bytes
    if _PEM_CERT not in data:
        raise XdsError(f"{where}: no PEM certificate")
    return data


def secret(msg: secret_pb2.Secret) -> SecretConfig:
    where = f"secret {msg.name!r}"
    kind = msg.WhichOneof("type")
    if msg.name == SECRET_DEFAULT and kind == "tls_certificate":
        tls = msg.tls_certificate
        if tls.HasField("private_key") or tls.HasField("private_key_provider"):
            raise XdsError(f"{where}: carries a private key; the sidecar makes its own and sends only a CSR")
        return SecretConfig(msg.name, certificate_chain=_inline(tls.certificate_chain, f"{where} certificate_chain"))
    if msg.name == SECRET_ROOTCA and kind == "validation_context":
        vc = msg.validation_context
        extra = [f.name for f, _ in vc.ListFields() if f.name != "trusted_ca"]
        if extra:
            raise XdsError(f"{where}: validation_context fields {', '.join(extra)} are not supported")
        return SecretConfig(msg.name, trusted_ca=_inline(vc.trusted_ca, f"{where} trusted_ca"))
    raise XdsError(f"{where}: only 'default' (tls_certificate) and 'ROOTCA' (validation_context) are served, got {kind}")
