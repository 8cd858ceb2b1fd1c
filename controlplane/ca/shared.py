"""One self-signed CA shared by every control-plane replica through ZooKeeper (docs/identity.md).

``/meshkeeper/_ca`` (persistent) holds JSON ``{"cert": "<PEM>", "key": "<PEM>"}``, the key PKCS#8
encrypted with the replicas' passphrase, so the key is never in ZooKeeper in the clear. The first
replica to start generates the CA and creates the znode; one that loses the race reads the
winner's. ``/meshkeeper/_ca`` starts with ``_``, so the registry watch skips it as a reserved
child of the root (meshkeeper.registry.is_reserved_root_child), as ``_vips``.

The calls here are kazoo's blocking ones: run them off the event loop (``run_in_executor``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from kazoo.exceptions import NodeExistsError, NoNodeError

from controlplane.ca.authority import Authority, CAError, Clock, from_pem, generate
from meshkeeper.registry import ROOT

log = logging.getLogger("meshkeeper.controlplane.ca")

CA_ZNODE = f"{ROOT}/_ca"


def encode(authority: Authority, passphrase: bytes) -> bytes:
    key = authority.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(passphrase))
    cert = authority.cert.public_bytes(serialization.Encoding.PEM)
    return json.dumps({"cert": cert.decode(), "key": key.decode()}, indent=1).encode()


def decode(payload: bytes, passphrase: bytes, where: str = CA_ZNODE) -> Authority:
    try:
        doc = json.loads(payload)
        cert, key = doc["cert"].encode(), doc["key"].encode()
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CAError(f"{where}: not a CA record (JSON {{\"cert\": PEM, \"key\": encrypted PEM}})") from None
    if b"ENCRYPTED PRIVATE KEY" not in key:
        raise CAError(f"{where}: the CA key is not encrypted; delete the znode and restart the control planes")
    try:
        return from_pem(cert, key, password=passphrase, names=(f"{where} cert", f"{where} key", ""))
    except CAError as exc:
        if "passphrase is wrong" in str(exc):
            raise CAError(f"{where}: the CA passphrase is wrong: it does not decrypt the key "
                          "the other replicas created") from None
        raise


def trust_domain_of(authority: Authority) -> str:
    names = authority.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(names[0].value) if names else ""


def read(client: Any, passphrase: bytes) -> Authority | None:
    """The shared CA, or None while no control plane has created it (never creates it)."""
    try:
        payload, _stat = client.get(CA_ZNODE)
    except NoNodeError:
        return None
    return decode(payload, passphrase)


def load_or_create(client: Any, passphrase: bytes, trust_domain: str, clock: Clock) -> tuple[Authority, bool]:
    """The shared CA, created if there is none yet: ``(authority, created_here)``. ``client`` is a
    connected kazoo client. CAError for a wrong passphrase or an unreadable znode."""
    if not passphrase:
        raise CAError("the CA passphrase is empty")
    for _ in range(3):  # the znode may be deleted between a create that failed and the read
        try:
            payload, _stat = client.get(CA_ZNODE)
        except NoNodeError:
            pass
        else:
            authority = decode(payload, passphrase)
            _check_trust_domain(authority, trust_domain)
            return authority, False
        authority = generate(trust_domain, clock)
        client.ensure_path(ROOT)
        try:
            client.create(CA_ZNODE, encode(authority, passphrase))
        except NodeExistsError:
            continue  # another replica won the race: use its CA
        return authority, True
    raise CAError(f"{CA_ZNODE} keeps appearing and disappearing")


def _check_trust_domain(authority: Authority, trust_domain: str) -> None:
    td = trust_domain_of(authority)
    if td and td != trust_domain:
        log.warning("the shared CA in %s was made for trust domain %s; this replica's is %s "
                    "(every replica should use the same --trust-domain)", CA_ZNODE, td, trust_domain)
