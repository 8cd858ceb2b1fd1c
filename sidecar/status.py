"""The sidecar's status port (Istio's 15021): what the kubelet and Prometheus reach on the pod IP.

The admin port stays on 127.0.0.1 (it shows the whole config and the app's runtime values); this
port is bound on ``--status-bind`` (default all addresses) and serves two pages of it, nothing else:

``/healthz/ready``    the admin port's ``/ready``: 200 ``LIVE``, else 503 with the state.
``/stats/prometheus`` the admin port's ``/stats/prometheus``.

Every other path is 404, without the list of admin pages. The answers come from the
:class:`~sidecar.admin.AdminServer` itself, so the two ports cannot disagree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshkeeper.httpd import HttpServer

if TYPE_CHECKING:
    from sidecar.admin import AdminServer

DEFAULT_STATUS_PORT = 15021
# status path -> the admin page that answers it
STATUS_PAGES = {"/healthz/ready": "/ready", "/stats/prometheus": "/stats/prometheus"}


class StatusServer:
    def __init__(self, admin: AdminServer) -> None:
        self._admin = admin
        self._server: HttpServer | None = None
        self.address: tuple[str, int] | None = None  # (bind address, bound port) once started

    async def start(self, host: str, port: int) -> int:
        """Serve on ``host:port`` (0 picks a free port); returns the bound port."""
        self._server = await HttpServer.start(self.handle, host, port)
        self.address = (host, self._server.port)
        return self._server.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.close()

    async def handle(self, method: str, path: str, query: dict, headers: dict, body: bytes) -> tuple:
        page = STATUS_PAGES.get(path)
        if page is None:
            return 404, "text/plain; charset=utf-8", b"not found\n"
        return await self._admin.handle(method, page, {}, headers, b"")
