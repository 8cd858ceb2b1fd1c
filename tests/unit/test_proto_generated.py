"""The committed admin API code is what the pinned grpcio-tools generates from the .proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_admin_code_is_up_to_date():
    assert _generator().stale() == [], "run `make proto` and commit meshkeeper/admin/v1/"


def test_generated_admin_code_imports_beside_the_envoy_protos():
    import envoy.service.discovery.v3.ads_pb2  # noqa: F401 - one descriptor pool for both

    from meshkeeper.admin.v1 import admin_pb2, admin_pb2_grpc

    svc = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
    assert "WatchEvents" in svc.methods_by_name and svc.methods_by_name["WatchEvents"].server_streaming
    assert hasattr(admin_pb2_grpc, "AdminServiceStub")
    request = admin_pb2.SetWeightRequest(namespace="ns", service="catalog", address="10.0.0.1:15006", weight=5,
                                         expected_version=3)
    assert admin_pb2.SetWeightRequest.FromString(request.SerializeToString()) == request
