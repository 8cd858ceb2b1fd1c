"""The console's JSON documents, built from what the control plane already holds in memory.

Pure functions over the published :class:`RegistrySnapshot`, the :class:`LoadStore` (LRS), the
:class:`ProxyRegistry` and the alert evaluator's last states: no ZooKeeper read per request, so a
console open in many tabs costs the registry nothing. docs/contracts.md ("Console JSON API") has
the shapes; :mod:`controlplane.console` serves them.

Health follows Kiali's rule of thumb: a service is ``failing`` when it has instances and none
serves, or when at least :data:`FAILING_ERROR_RATIO` of its requests fail; ``degraded`` from
:data:`DEGRADED_ERROR_RATIO`; else ``healthy``. Services that only appear as callers (no registry
entry) are ``unknown``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from controlplane.alerts.rule import AlertRule, format_duration
from controlplane.alerts.state import AlertState
from controlplane.lrs import Load, LoadStore
from controlplane.proxies import ProxyRegistry
from controlplane.snapshot import RegistrySnapshot, ServiceSnapshot
from meshkeeper.policy import encode_policy
from meshkeeper.registry import effective_weight, is_serving

FAILING_ERROR_RATIO = 0.2
DEGRADED_ERROR_RATIO = 0.01
XDS_TYPES = ("CDS", "EDS", "LDS", "RDS", "RTDS")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def caller_of(node_id: str) -> tuple[str, str] | None:
    """(namespace, service) of a sidecar node id ``sidecar~<host>~<svc>-<port>.<ns>``, else None."""
    parts = node_id.split("~")
    if len(parts) != 3:
        return None
    name, dot, ns = parts[2].rpartition(".")
    svc, dash, port = name.rpartition("-")
    if not (dot and dash and port.isdigit() and svc and ns):
        return None
    return ns, svc


def load_json(load: Load) -> dict[str, Any]:
    """Rates of one interval: rps, error ratio and latencies (seconds; null without requests)."""
    return load.rates_json()


def health(instances: int, serving: int, error_ratio: float | None) -> str:
    if (instances and not serving) or (error_ratio or 0) >= FAILING_ERROR_RATIO:
        return "failing"
    if (error_ratio or 0) >= DEGRADED_ERROR_RATIO:
        return "degraded"
    return "healthy"


def _serving(svc: ServiceSnapshot) -> int:
    return sum(1 for k, inst in svc.instances.items() if is_serving(inst, svc.overrides.get(k)))


def graph(snapshot: RegistrySnapshot | None, load: LoadStore, namespace: str = "") -> dict[str, Any]:
    """Services as nodes, caller -> callee edges with the last interval's load (from LRS)."""
    nodes: dict[tuple[str, str], dict[str, Any]] = {}

    def node(ns: str, svc: str, entry: ServiceSnapshot | None) -> dict[str, Any]:
        got = nodes.get((ns, svc))
        if got is None:
            instances = len(entry.instances) if entry is not None else 0
            serving = _serving(entry) if entry is not None else 0
            rates = load_json(load.rates(ns, svc))
            got = nodes[(ns, svc)] = {
                "id": f"{ns}/{svc}", "namespace": ns, "service": svc, "registered": entry is not None,
                "protocol": entry.record.protocol if entry is not None else "",
                "instances": instances, "serving": serving, "rates": rates,
                "health": health(instances, serving, rates["error_ratio"]) if entry is not None else "unknown",
            }
        return got

    if snapshot is not None:
        for ns in sorted(snapshot.namespaces):
            if namespace and ns != namespace:
                continue
            for svc, entry in sorted(snapshot.services(ns).items()):
                node(ns, svc, entry)
    edges = []
    summed: dict[tuple[tuple[str, str], tuple[str, str]], Load] = {}
    for (node_id, callee), rates in load.edges().items():
        if not rates.issued and not rates.in_progress:  # sidecars report every cluster, idle ones too
            continue
        caller = caller_of(node_id)
        if caller is None or (namespace and namespace not in (caller[0], callee[0])):
            continue
        into = summed.setdefault((caller, callee), Load())
        into.add(rates)
    for (caller, callee), rates in sorted(summed.items()):
        for ns, svc in (caller, callee):
            node(ns, svc, snapshot.services(ns).get(svc) if snapshot is not None else None)
        edges.append({"id": f"{caller[0]}/{caller[1]}->{callee[0]}/{callee[1]}",
                      "source": f"{caller[0]}/{caller[1]}", "target": f"{callee[0]}/{callee[1]}",
                      "rates": load_json(rates)})
    return {"version": None if snapshot is None else snapshot.version,
            "interval_seconds": load.interval,
            "nodes": [nodes[k] for k in sorted(nodes)], "edges": edges}


def service(snapshot: RegistrySnapshot | None, load: LoadStore, proxies: ProxyRegistry,
            ns: str, svc: str) -> dict[str, Any] | None:
    """One service's page: endpoints with weights, switches and load; policy, runtime config,
    virtual IP and the sidecars connected for it. None when the service is not registered."""
    entry = snapshot.services(ns).get(svc) if snapshot is not None else None
    if entry is None:
        return None
    current = {e["address"]: e["rates"] for s in load.snapshot(ns)["services"] if s["service"] == svc
               for e in s["endpoints"]}
    endpoints = []
    for key in sorted(set(entry.instances) | set(entry.overrides)):
        inst, override = entry.instances.get(key), entry.overrides.get(key)
        enabled = override is None or override.enabled is not False
        endpoints.append({
            "address": key, "registered": inst is not None,
            "version": inst.version if inst is not None else "", "zone": inst.zone if inst is not None else "",
            "labels": dict(inst.labels) if inst is not None else {},
            "registered_weight": inst.weight if inst is not None else None,
            "override": None if override is None else {"weight": override.weight, "enabled": override.enabled},
            "effective_weight": effective_weight(inst, override) if inst is not None else None,
            "enabled": enabled, "serving": inst is not None and is_serving(inst, override),
            "ejected": None,  # filled in from the callers' sidecars by the console, when they answer
            "rates": current.get(key) or Load().rates_json(),
        })
    config = snapshot.config(ns, svc)
    rates = load_json(load.rates(ns, svc))
    return {
        "namespace": ns, "service": svc, "protocol": entry.record.protocol, "vip": snapshot.vip(ns, svc),
        "instances": len(entry.instances), "serving": _serving(entry),
        "health": health(len(entry.instances), _serving(entry), rates["error_ratio"]),
        "rates": rates, "endpoints": endpoints,
        "policy": json.loads(encode_policy(entry.policy)),
        "config": None if config is None else dict(config.values),
        "proxies": [p.node.node_id for p in proxies.list()
                    if p.node.namespace == ns and p.node.service == svc],
        "snapshot_version": snapshot.version,
    }


def proxy_status(proxies: ProxyRegistry, namespace: str = "") -> list[dict[str, Any]]:
    """istioctl proxy-status: per proxy and xDS type SYNCED, STALE (sent, not ACKed yet or NACKed)
    or NOT SENT, with the last NACK and its error."""
    out = []
    for p in proxies.list():
        n = p.node
        if namespace and n.namespace != namespace:
            continue
        types = {}
        for short in XDS_TYPES:
            st = p.types.get(short)
            if st is None or not st.version_sent:
                types[short] = {"status": "NOT SENT"}
                continue
            status = "SYNCED" if st.version_acked == st.version_sent and st.nack is None else "STALE"
            types[short] = {
                "status": status, "version_sent": st.version_sent, "version_acked": st.version_acked,
                "nack": None if st.nack is None else {"error": st.nack.error, "version": st.nack.version,
                                                      "at": iso(st.nack.at)},
                "pushes": st.pushes, "nacks": st.nacks,
            }
        out.append({"node_id": n.node_id, "namespace": n.namespace, "service": n.service,
                    "proxyless": n.proxyless, "peer": p.peer, "connected_since": iso(p.connected_since),
                    "types": types})
    return out


def alerts(snapshot: RegistrySnapshot | None, states: Mapping[tuple[str, str], AlertState],
           namespace: str = "", name: str = "") -> list[dict[str, Any]]:
    """Every alert rule of the snapshot with the state this replica last evaluated."""
    out = []
    tables: Iterable[tuple[str, Mapping[str, AlertRule]]] = sorted(snapshot.alerts.items()) if snapshot else ()
    for ns, table in tables:
        if namespace and ns != namespace:
            continue
        for rule_name, rule in sorted(table.items()):
            if name and rule_name != name:
                continue
            st = states.get((ns, rule_name))
            out.append({
                "namespace": ns, "name": rule_name, "service": rule.service, "condition": rule.expression,
                "severity": rule.severity, "for": format_duration(rule.for_seconds),
                "summary": rule.summary, "description": rule.description,
                "state": "unknown" if st is None else st.state,  # not evaluated here yet
                "value": None if st is None else st.value,
                "active_since": iso(st.active_since) if st else None,
                "fired_at": iso(st.fired_at) if st else None,
                "resolved_at": iso(st.resolved_at) if st else None,
            })
    return out
