"""Fuzzing the admin API (issue 16): hypothesis-made requests to every RPC of AdminService
(proto/meshkeeper/admin/v1/admin.proto) over a real gRPC server and the session's ZooKeeper.
tests/support/admin_fuzz.py has the harness, the request strategies and the properties: a status
among OK / INVALID_ARGUMENT / NOT_FOUND / ABORTED / FAILED_PRECONDITION / PERMISSION_DENIED /
UNAUTHENTICATED with a one-line message, a refused call writes nothing, an accepted one writes
only what the registry's decoders accept.

The property takes no pytest fixture (bench/fuzz.py runs it through ``fuzz_one_input``): the
harness is the module's, made by the fixture below in the suite and by :func:`fuzz_setup` (a
ZooKeeper of its own) in bench/fuzz.py.
"""

from __future__ import annotations

import atexit
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given

from tests.support import admin_fuzz
from tests.support.admin_fuzz import AdminHarness
from tests.support.fuzz import fuzz_settings, tally

NAMESPACE = "fuzz-admin"
_harness: AdminHarness | None = None


@pytest.fixture(scope="module", autouse=True)
def _served(zk_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminHarness]:
    global _harness
    _harness = AdminHarness(zk_server.hosts, NAMESPACE, tmp_path_factory.mktemp("fuzz-admin"))
    try:
        yield _harness
    finally:
        _harness.close()
        _harness = None


def fuzz_setup() -> None:
    """bench/fuzz.py: a ZooKeeper of this process's own, and the harness over it."""
    global _harness
    from tests.harness import ZooKeeper

    work = Path(tempfile.mkdtemp(prefix="fuzz-admin-"))
    server = ZooKeeper(work / "zk")
    server.start()
    _harness = AdminHarness(server.hosts, NAMESPACE, work)
    atexit.register(server.close)
    atexit.register(_harness.close)


def test_every_rpc_has_request_strategies() -> None:
    assert admin_fuzz.unknown_rpcs() == []


@fuzz_settings(40)
@given(case=admin_fuzz.requests(NAMESPACE))
def test_any_admin_request_ends_with_a_status_and_writes_nothing_invalid(case: tuple[str, Any, str | None]) -> None:
    rpc, request, role = case
    assert _harness is not None
    code = _harness.check(rpc, request, role)
    tally(f"{rpc} {code.name}")


# --------------------------------------------------------------------------- found by fuzzing


def test_a_refusal_naming_a_huge_field_is_still_its_status_with_a_bounded_message() -> None:
    # Found by fuzzing: a 10,000-character service name was echoed whole in the refusal; the
    # grpc-message trailer passed gRPC's 8 KiB metadata limit and the caller got RESOURCE_EXHAUSTED
    # "Stream removed" instead of INVALID_ARGUMENT.
    assert _harness is not None
    for rpc in ("GetPeerAuthentication", "GetAuthz", "SetAuthz"):
        request = admin_fuzz.REQUESTS[rpc](namespace=NAMESPACE, service="a" * 10_000)
        code, details = _harness.call(rpc, request, "admin")
        assert code == admin_fuzz.grpc.StatusCode.INVALID_ARGUMENT, (rpc, code, details[:200])
        assert details.startswith("service 'aaaa") and len(details) <= 1100, (rpc, len(details))


def test_a_refusal_whose_reason_quotes_a_newline_is_one_line() -> None:
    # Found by fuzzing: an alert rule's unknown field is named as given, so a key with a newline made
    # a message of two lines (the CLI prints it as the error; the audit log line was split too).
    assert _harness is not None
    request = admin_fuzz.REQUESTS["SetAlert"](namespace=NAMESPACE, name="new-rule",
                                              json='{"service": "catalog", "bad\\nfield": 1}')
    code, details = _harness.call("SetAlert", request, "admin")
    assert code == admin_fuzz.grpc.StatusCode.INVALID_ARGUMENT and "bad" in details
    assert "\n" not in details and "\r" not in details, details


def test_watch_events_refusing_a_huge_kind_is_invalid_argument() -> None:
    assert _harness is not None
    code, details = _harness.call("WatchEvents", admin_fuzz.REQUESTS["WatchEvents"](kinds=["k" * 10_000]), "viewer")
    assert code == admin_fuzz.grpc.StatusCode.INVALID_ARGUMENT and len(details) <= 1100, (code, details[:200])
