"""The status port (sidecar/status.py): the admin port's readiness and metrics, and nothing else.

Driven through its handler with the real AdminServer over a real Server; the ADS client
and the registration are stand-ins that only carry the two flags readiness reads. The sockets
(which address each port binds) are tests/integration/test_status_port.py's.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from meshkeeper.xds import NodeInfo
from sidecar.admin import AdminServer
from sidecar.server import Server
from sidecar.status import StatusServer

ADMIN_PAGES = ("/ready", "/config_dump", "/clusters", "/listeners", "/server_info", "/runtime", "/")


def runtime() -> Server:
    node = NodeInfo(node_id="sidecar~127.0.0.1~catalog-15006.shop", service="catalog", namespace="shop",
                    app_port=8080, inbound_port=15006, outbound_port=15001, admin_port=15000)
    return Server(node)


async def get(server: StatusServer | AdminServer, path: str, method: str = "GET") -> tuple:
    return await server.handle(method, path, {}, {}, b"")


async def test_readiness_is_the_admin_ports_in_every_state() -> None:
    admin = AdminServer()
    status = StatusServer(admin)
    assert await get(status, "/healthz/ready") == (503, "text/plain", b"PRE_INITIALIZING\n")  # no runtime yet

    rt = runtime()
    admin.runtime = rt
    rt.ads = SimpleNamespace(initialized=False)
    rt.registration = SimpleNamespace(registered=False)
    seen = []
    for step in ("ads", "registered", "draining"):
        if step == "ads":
            rt.ads.initialized = True
        elif step == "registered":
            rt.registration.registered = True
        else:
            rt.draining = True
        answer = await get(status, "/healthz/ready")
        assert answer == await get(admin, "/ready")
        seen.append((answer[0], answer[2]))
    assert seen == [(503, b"INITIALIZING\n"), (200, b"LIVE\n"), (503, b"DRAINING\n")]


async def test_metrics_are_the_admin_ports_exposition() -> None:
    admin = AdminServer(runtime())
    status_code, ctype, body = await get(StatusServer(admin), "/stats/prometheus")
    assert (status_code, ctype, body) == await get(admin, "/stats/prometheus")
    assert status_code == 200 and ctype.startswith("text/plain") and b"# TYPE meshkeeper_" in body


@pytest.mark.parametrize("path", [*ADMIN_PAGES, "/healthz", "/stats", "/healthz/ready/", "/admin/ready"])
async def test_every_other_path_is_404_without_naming_the_admin_pages(path: str) -> None:
    code, _, body = await get(StatusServer(AdminServer(runtime())), path)
    assert code == 404 and body == b"not found\n"


async def test_only_get_and_head() -> None:
    code, _, _ = await get(StatusServer(AdminServer(runtime())), "/healthz/ready", method="POST")
    assert code == 405


async def test_admin_listeners_report_the_status_port_and_its_address() -> None:
    admin = AdminServer(runtime())
    admin.status_address = ("0.0.0.0", 15021)
    _, _, body = await get(admin, "/listeners")
    listeners = json.loads(body)
    assert listeners["status"] == {"address": "0.0.0.0", "port": 15021}
    assert listeners["admin"]["address"] == "127.0.0.1"
