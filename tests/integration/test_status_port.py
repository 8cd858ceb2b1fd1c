"""A real sidecar's status port (Istio's 15021): readiness and metrics on every address, the admin
port on 127.0.0.1 only, and nothing of the admin port's config on the status port.

"Another address" is this host's address on its default route when it has one, else 127.0.0.2:
a socket bound to 127.0.0.1 does not answer on it either, while one bound to 0.0.0.0 does.
"""

from __future__ import annotations

import json
import socket

import pytest

from tests.harness import http_get, wait_until

pytestmark = pytest.mark.integration


def other_address() -> str:
    """An address of this host that is not 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: picks the source address of the default route; sends nothing
            address = s.getsockname()[0]
        except OSError:  # no route out of this host
            return "127.0.0.2"
    return address if not address.startswith("127.") else "127.0.0.2"


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def mesh(procs, zk_server, namespace):
    cp = procs.controlplane(zk_server.hosts)
    app = procs.app("catalog")

    def sidecar(**flags):
        return procs.sidecar("catalog", app.port("port"), cp=f"127.0.0.1:{cp.port('xds_port')}",
                             zk=zk_server.hosts, namespace=namespace, **flags)

    return sidecar


def test_status_port_serves_readiness_and_metrics_on_every_address_and_nothing_else(mesh) -> None:
    car = mesh()  # the harness passes --status-port 0; --status-bind stays 0.0.0.0
    status_port, admin_port = int(car.port("status_port")), int(car.port("admin_port"))
    assert status_port not in (0, admin_port)
    host = other_address()
    status = f"http://{host}:{status_port}"

    wait_until(lambda: http_get(f"{status}/healthz/ready")[0] == 200, 10, 0.05, "ready on the status port")
    code, _, body = http_get(f"{status}/healthz/ready")
    assert (code, body) == (200, b"LIVE\n")
    code, headers, body = http_get(f"{status}/stats/prometheus")
    _, admin_headers, admin_body = http_get(f"{car.admin_url}/stats/prometheus")
    assert code == 200 and headers["Content-Type"] == admin_headers["Content-Type"]
    types = {line for line in body.splitlines() if line.startswith(b"# TYPE meshkeeper_")}
    assert types and types == {line for line in admin_body.splitlines() if line.startswith(b"# TYPE meshkeeper_")}
    for path in ("/ready", "/config_dump", "/runtime", "/clusters", "/listeners", "/server_info", "/"):
        code, _, body = http_get(f"{status}{path}")
        assert code == 404 and b"config" not in body and b"pages" not in body, path

    assert refused(host, admin_port), "the admin port answers on an address other than 127.0.0.1"
    bound = json.loads(http_get(f"{car.admin_url}/listeners")[2])
    assert bound["admin"] == {"address": "127.0.0.1", "port": admin_port}
    assert bound["status"] == {"address": "0.0.0.0", "port": status_port}


def test_status_bind_is_the_address_given(mesh) -> None:
    car = mesh(status_bind="127.0.0.1")
    status_port = int(car.port("status_port"))
    assert http_get(f"http://127.0.0.1:{status_port}/healthz/ready")[0] in (200, 503)
    assert refused(other_address(), status_port)
    bound = json.loads(http_get(f"{car.admin_url}/listeners")[2])
    assert bound["status"] == {"address": "127.0.0.1", "port": status_port}
