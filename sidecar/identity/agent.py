"""Keeps the sidecar's certificate fresh (docs/identity.md, "Rotation at half life").

At start the agent makes a key, hands it to :class:`sidecar.tls.TlsIdentity` as the pending key and
puts its CSR in the ADS node (:meth:`sidecar.xds.client.XdsClient.set_csr`); the control plane
answers with the ``default`` secret, which the identity pairs with the key. Each time a chain is
taken, the agent schedules the next rotation at half of that certificate's remaining life: a new
key, a new CSR on the stream. Until the new chain arrives the old key and chain keep serving, and
connections already open keep the certificate they were made with.

A stream that breaks is reopened by the xDS client with the newest CSR in its node, so a rotation
that fell into a reconnect is answered by whichever control plane replica the sidecar reaches.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sidecar.identity.keys import new_key as make_key

if TYPE_CHECKING:
    from sidecar.tls import TlsIdentity
    from sidecar.xds.client import XdsClient

log = logging.getLogger("meshkeeper.sidecar.identity")

MIN_ROTATION_DELAY = 1.0  # seconds: a certificate already at its end is replaced, but not in a loop
_TOKEN_RE = re.compile(r"^mk1\.[a-z0-9][a-z0-9-]*\.[a-z0-9][a-z0-9-]*\.[A-Za-z0-9_-]+$")


def read_token(text: str, source: str) -> str:
    """A bootstrap token from ``source`` (a flag or the environment), stripped; ValueError naming
    the source when it is not one (``mk1.<ns>.<svc>.<mac>``)."""
    token = text.strip()
    if not _TOKEN_RE.match(token):
        raise ValueError(f"{source}: not a Meshkeeper bootstrap token (mk1.<namespace>.<service>.<mac>)")
    return token


class IdentityAgent:
    def __init__(self, tls: TlsIdentity, ads: XdsClient, *, clock: Callable[[], float] = time.time,
                 new_key: Callable[[], tuple[bytes, bytes]] = make_key) -> None:
        self.tls, self.ads = tls, ads
        self.clock, self.new_key = clock, new_key
        self.rotations = 0  # new keys asked for after the first
        self._timer: asyncio.TimerHandle | None = None
        self._not_after = 0.0

    def start(self) -> None:
        """Make the first key and put its CSR in the node (before the ADS client starts)."""
        self.tls.on_change.append(self.certificate_changed)
        self._request()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def certificate_changed(self) -> None:
        """The identity took a chain: schedule the next rotation at half its remaining life."""
        not_after = self.tls.not_after.timestamp() if self.tls.not_after is not None else 0.0
        if not not_after or not_after == self._not_after:
            return
        self._not_after = not_after
        delay = max(MIN_ROTATION_DELAY, (not_after - self.clock()) / 2)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self.rotate)
        log.info("certificate %s valid until %.0f; next rotation in %.1f s", self.tls.spiffe_id, not_after, delay)

    def rotate(self) -> None:
        self._timer = None
        self.rotations += 1
        self._request()

    def _request(self) -> None:
        key_pem, csr_pem = self.new_key()
        self.tls.set_pending_key(key_pem)
        self.ads.set_csr(csr_pem)
