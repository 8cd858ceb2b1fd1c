"""Bootstrap tokens: what a sidecar shows to get a certificate (docs/identity.md).

    mk1.<ns>.<svc>.<base64url HMAC-SHA256(K, "mk1.<ns>.<svc>")>

``K`` is HKDF-SHA256 (no salt, info ``meshkeeper bootstrap token``) of the CA private key as
unencrypted PKCS#8 DER, so every replica with the CA verifies the tokens of the others, and a new
CA invalidates every token. The MAC is base64url without padding (43 characters). Tokens do not
expire.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshkeeper.identity import IdentityError
from meshkeeper.registry import validate_name

VERSION = "mk1"
HKDF_INFO = b"meshkeeper bootstrap token"


def derive_key(ca_key_der: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(ca_key_der)


def _names(namespace: str, service: str) -> None:
    try:
        validate_name("namespace", namespace)
        validate_name("service", service)
    except ValueError as exc:
        raise IdentityError(str(exc)) from None


def _mac(key: bytes, namespace: str, service: str) -> str:
    digest = hmac.new(key, f"{VERSION}.{namespace}.{service}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class TokenKey:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def mint(self, namespace: str, service: str) -> str:
        _names(namespace, service)
        return f"{VERSION}.{namespace}.{service}.{_mac(self._key, namespace, service)}"

    def verify(self, token: str) -> tuple[str, str]:
        """``(namespace, service)`` of a token minted with this key; IdentityError otherwise."""
        parts = token.strip().split(".") if isinstance(token, str) else []
        if len(parts) != 4 or parts[0] != VERSION:
            raise IdentityError("identity token: not a meshkeeper bootstrap token (mk1.<ns>.<svc>.<mac>)")
        _, namespace, service, mac = parts
        _names(namespace, service)
        if not hmac.compare_digest(mac.encode(), _mac(self._key, namespace, service).encode()):
            raise IdentityError(f"identity token for {namespace}/{service}: not minted by this CA "
                                "(another CA's, or altered)")
        return namespace, service
