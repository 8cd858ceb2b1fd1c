"""Where the pod is in each kind of Kubernetes object that makes pods, for ``meshkeeper inject``.

A Pod is its own pod; Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController and
Job carry one in ``spec.template``; a CronJob in ``spec.jobTemplate.spec.template``. Every other
kind (Services, ConfigMaps, CRDs) passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controlplane.injector.patch import InjectConfig, InjectError, Injection, inject_pod

TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def describe(obj: Mapping[str, Any]) -> str:
    """``Kind/name`` for messages."""
    name = (obj.get("metadata") or {}).get("name") or (obj.get("metadata") or {}).get("generateName") or "?"
    return f"{obj.get('kind', '?')}/{name}"


def inject_object(obj: dict[str, Any], config: InjectConfig) -> tuple[dict[str, Any], Injection | None]:
    """The object with its pod injected, and the pod's :class:`Injection` (None: not a pod-maker).

    Raises :class:`InjectError` for a pod-making object without a pod template.
    """
    path = TEMPLATE_PATHS.get(obj.get("kind", ""))
    if path is None:
        return obj, None
    meta = obj.get("metadata") or {}
    if not path:
        result = inject_pod(obj, config, namespace=meta.get("namespace"), workload=meta.get("name"))
        return result.pod, result
    parent: Any = obj
    for key in path[:-1]:
        parent = parent.get(key) if isinstance(parent, dict) else None
    template = parent.get(path[-1]) if isinstance(parent, dict) else None
    if not isinstance(template, dict):
        raise InjectError(f"{describe(obj)} has no pod template at {'.'.join(path)}")
    result = inject_pod(template, config, namespace=meta.get("namespace"), workload=meta.get("name"))
    if result.skipped:
        return obj, result
    out = dict(obj)
    node = out
    for key in path[:-1]:  # copy the path down to the template, share the rest
        node[key] = dict(node[key])
        node = node[key]
    node[path[-1]] = result.pod
    return out, result
