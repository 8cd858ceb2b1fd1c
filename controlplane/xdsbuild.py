"""The smallest pieces every xDS resource builder of the control plane needs: packing a typed
config into an ``Any`` (deterministically) and the ADS config source. Shared by
:mod:`controlplane.translate`, :mod:`controlplane.identity_resources` and
:mod:`controlplane.transparent`; it imports none of them."""

from __future__ import annotations

from envoy.config.core.v3 import config_source_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message


def ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.ApiVersion.V3)


def pack(msg: Message) -> any_pb2.Any:
    # Deterministic: a typed config with a map (RBAC's policies) packs to the same bytes, hence the
    # same resource version, on every control plane replica.
    a = any_pb2.Any()
    a.Pack(msg, deterministic=True)
    return a
