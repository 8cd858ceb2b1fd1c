"""Alert rules and their state as the admin API shows them (``meshkeeper.admin.v1.Alert``).

The admin API reads the rule znode and the state znode from ZooKeeper, as it reads everything
else, so any replica answers with what the last write made.
"""

from __future__ import annotations

import json

from google.protobuf import timestamp_pb2

from controlplane.alerts.rule import AlertRule, format_duration
from controlplane.alerts.state import AlertState
from meshkeeper.admin.v1 import admin_pb2


def alert_message(ns: str, name: str, rule_data: bytes | None, version: int,
                  state_data: bytes | None) -> admin_pb2.Alert:
    out = admin_pb2.Alert(namespace=ns, name=name, version=version)
    if rule_data is None:
        out.json, out.state = "{}", "inactive"
        return out
    try:
        rule = AlertRule.decode(rule_data)
    except ValueError as exc:
        out.json, out.state, out.error = rule_data.decode("utf-8", "replace"), "invalid", str(exc)
        return out
    out.json = json.dumps(rule.to_json(), sort_keys=True)
    out.service, out.condition, out.severity = rule.service, rule.expression, rule.severity
    out.for_duration = format_duration(rule.for_seconds)
    state = AlertState.decode(state_data)
    out.state = state.state
    if state.value is not None:
        out.value = state.value
    for field, ts in (("active_since", state.active_since), ("fired_at", state.fired_at),
                      ("resolved_at", state.resolved_at)):
        if ts is not None:
            getattr(out, field).CopyFrom(_ts(ts))
    return out


def _ts(wall: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(wall * 1e9))
    return ts
