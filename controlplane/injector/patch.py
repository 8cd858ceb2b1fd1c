"""Sidecar injection of one pod, as a pure function: a pod (or pod template) in, the injected pod out.

What injection adds (docs/kubernetes.md says it for users):

- init container ``meshkeeper-init``: ``meshkeeper iptables ...`` (DESIGN §10) as root with
  NET_ADMIN and NET_RAW, installing the capture rules in the pod's network namespace;
- the proxy ``meshkeeper-proxy``: ``meshkeeper sidecar ... --interception redirect`` as the proxy
  uid, registering ``$(POD_IP):<app port>``. As a native sidecar (Kubernetes 1.29+; the default) it
  is an init container with ``restartPolicy: Always`` right after ``meshkeeper-init``, so it starts
  before the app and the app's own init containers, stops after them, and Jobs complete; otherwise
  it is the first regular container;
- with a token minter (the injector was given the control plane's CA, docs/identity.md): the
  proxy's env ``MESHKEEPER_IDENTITY_TOKEN``, a bootstrap token for the pod's mesh namespace and
  service, with which it obtains its certificate;
- the annotation ``sidecar.meshkeeper.io/status``, so that a second injection changes nothing;
- Prometheus' scrape annotations pointing at the proxy's status port (``/stats/prometheus`` on
  15021), as Istio's injection does, unless the pod sets any ``prometheus.io/*`` of its own.

The proxy's readiness probe is ``GET /healthz/ready`` on its status port (15021), which the sidecar
binds on every address: its admin port (15000) stays on 127.0.0.1, out of the kubelet's reach.

:func:`inject_pod` never mutates its argument. A pod left alone comes back with the reason
(:class:`Injection`); annotations that cannot be honoured raise :class:`InjectError`.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshkeeper import __version__
from meshkeeper.identity import TOKEN_ENV
from meshkeeper.registry import RecordError, validate_name

DEFAULT_CP = "meshkeeper-controlplane.meshkeeper-system.svc:15010"
DEFAULT_ZK = "zookeeper.meshkeeper-system.svc:2181"
DEFAULT_IMAGE = f"meshkeeper:{__version__}"
DEFAULT_PROXY_UID = 1337
ADMIN_PORT, OUTBOUND_PORT, INBOUND_PORT, DNS_PORT = 15000, 15001, 15006, 15053  # DESIGN §1
STATUS_PORT = 15021  # the sidecar's readiness and metrics on the pod IP (Istio's status port)
READY_PATH, METRICS_PATH = "/healthz/ready", "/stats/prometheus"

INIT_NAME = "meshkeeper-init"
PROXY_NAME = "meshkeeper-proxy"
NEVER_INJECTED_NAMESPACES = frozenset({"kube-system", "kube-public"})

# Pod annotations (labels too for "inject", which the webhook's objectSelector reads).
A_INJECT = "sidecar.meshkeeper.io/inject"
A_STATUS = "sidecar.meshkeeper.io/status"
A_SERVICE = "sidecar.meshkeeper.io/service"
A_APP_PORT = "sidecar.meshkeeper.io/app-port"
A_PROTOCOL = "sidecar.meshkeeper.io/protocol"
A_NAMESPACE = "sidecar.meshkeeper.io/namespace"
A_HEALTH_PATH = "sidecar.meshkeeper.io/health-path"
A_INCLUDE_INBOUND = "traffic.sidecar.meshkeeper.io/includeInboundPorts"
A_EXCLUDE_INBOUND = "traffic.sidecar.meshkeeper.io/excludeInboundPorts"
A_EXCLUDE_OUTBOUND = "traffic.sidecar.meshkeeper.io/excludeOutboundPorts"
A_INCLUDE_CIDRS = "traffic.sidecar.meshkeeper.io/includeOutboundIPRanges"
A_EXCLUDE_CIDRS = "traffic.sidecar.meshkeeper.io/excludeOutboundIPRanges"
PROTOCOLS = ("http", "tcp")  # what the sidecar's --protocol takes (grpc comes with HTTP/2, issue 14)
# Prometheus' scrape annotations (the convention of the community Helm chart's kubernetes-pods job).
A_PROMETHEUS_SCRAPE, A_PROMETHEUS_PORT, A_PROMETHEUS_PATH = "prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path"


class InjectError(ValueError):
    """A pod asks for something injection cannot do (a bad annotation); one line, says which."""


@dataclass(frozen=True)
class InjectConfig:
    """The values every injection shares (the flags of ``meshkeeper inject`` and ``injector``)."""

    cp: str = DEFAULT_CP
    zk: str = DEFAULT_ZK
    image: str = DEFAULT_IMAGE
    proxy_uid: int = DEFAULT_PROXY_UID
    native_sidecar: bool = True
    # mint(namespace, service) -> bootstrap token (controlplane.ca.tokens); None: no tokens.
    identity_tokens: Callable[[str, str], str] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Injection:
    """The pod after injection, or the pod as it was and ``skipped`` saying why.

    ``warn`` marks a skip the user did not ask for (kubectl shows it as an admission warning).
    """

    pod: dict[str, Any]
    skipped: str | None = None
    warn: bool = False


def skip_reason(pod: Mapping[str, Any], namespace: str | None) -> str | None:
    """Why this pod is never injected, or None. Checked before anything is read from it."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    if namespace in NEVER_INJECTED_NAMESPACES:
        return f"pods in {namespace} are never injected"
    if (meta.get("annotations") or {}).get(A_INJECT) == "false" or (meta.get("labels") or {}).get(A_INJECT) == "false":
        return f'{A_INJECT}: "false"'
    if spec.get("hostNetwork"):
        return "hostNetwork pods share the node's network namespace: capturing it would capture the node"
    names = {c.get("name") for c in (spec.get("containers") or []) + (spec.get("initContainers") or [])}
    if A_STATUS in (meta.get("annotations") or {}) or PROXY_NAME in names or INIT_NAME in names:
        return "already injected"
    return None


def inject_pod(pod: Mapping[str, Any], config: InjectConfig, *, namespace: str | None = None,
               workload: str | None = None) -> Injection:
    """Inject one pod (``metadata`` + ``spec``: a Pod or a workload's template).

    ``namespace`` is the Kubernetes namespace the pod is created in; ``workload`` the name to fall
    back on for the service (the Deployment's, or the Pod's own).
    """
    reason = skip_reason(pod, namespace)
    if reason:
        return Injection(copy.deepcopy(dict(pod)), reason)
    out = copy.deepcopy(dict(pod))
    meta = out.setdefault("metadata", {})
    spec = out.setdefault("spec", {})
    app_containers = spec.get("containers") or []
    if not app_containers:
        raise InjectError("the pod has no containers")
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    app_port = _app_port(annotations, app_containers)
    if app_port is None:
        return Injection(copy.deepcopy(dict(pod)), f"no container port to name the app's port (set {A_APP_PORT}, "
                         f'or {A_INJECT}: "false")', warn=True)
    init = _init_container(config, annotations, app_containers, app_port)
    proxy = _proxy_container(config, annotations, labels, app_port, namespace, workload)
    if config.native_sidecar:
        spec["initContainers"] = [init, proxy, *(spec.get("initContainers") or [])]
    else:
        spec["initContainers"] = [init, *(spec.get("initContainers") or [])]
        spec["containers"] = [proxy, *app_containers]
    status = {"version": __version__, "image": config.image, "initContainers": [INIT_NAME],
              "containers": []}
    status["initContainers" if config.native_sidecar else "containers"].append(PROXY_NAME)
    meta["annotations"] = {**annotations, **_prometheus_annotations(annotations),
                           A_STATUS: json.dumps(status, separators=(",", ":"))}
    return Injection(out)


# --------------------------------------------------------------------------- values from the pod


def _app_port(annotations: Mapping[str, str], containers: list[dict[str, Any]]) -> int | None:
    if A_APP_PORT in annotations:
        return _port(A_APP_PORT, annotations[A_APP_PORT])
    for port in containers[0].get("ports") or []:
        if port.get("containerPort"):
            return int(port["containerPort"])
    return None


def _service(annotations: Mapping[str, str], labels: Mapping[str, str], workload: str | None) -> str:
    for source, value in ((f"annotation {A_SERVICE}", annotations.get(A_SERVICE)),
                          ("label app.kubernetes.io/name", labels.get("app.kubernetes.io/name")),
                          ("label app", labels.get("app")), ("the workload's name", workload)):
        if value:
            try:
                return validate_name("service", value)
            except RecordError as exc:
                raise InjectError(f"{exc} (from {source}; set {A_SERVICE})") from None
    raise InjectError(f"no service name: set annotation {A_SERVICE} or label app.kubernetes.io/name")


def _port(what: str, text: str) -> int:
    if not text.strip().isdigit() or not 0 < int(text) < 65536:
        raise InjectError(f"{what}: {text!r} is not a port number (1-65535)")
    return int(text)


def _ports(what: str, text: str, allow_star: bool = False) -> str:
    text = text.strip()
    if allow_star and text == "*":
        return text
    return ",".join(str(_port(what, p)) for p in text.split(",") if p.strip())


def _cidrs(what: str, text: str, allow_star: bool = False) -> str:
    text = text.strip()
    if allow_star and text == "*":
        return text
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise InjectError(f"{what}: {item!r} is not an IP range (CIDR)") from None
    return ",".join(out)


def _inbound_ports(containers: list[dict[str, Any]], app_port: int) -> str:
    ports: list[int] = []
    for c in containers:
        for p in c.get("ports") or []:
            if p.get("containerPort") and p.get("protocol", "TCP") == "TCP" and p["containerPort"] not in ports:
                ports.append(int(p["containerPort"]))
    if app_port not in ports:
        ports.append(app_port)
    return ",".join(map(str, ports))


def _prometheus_annotations(annotations: Mapping[str, str]) -> dict[str, str]:
    """Scrape the proxy's metrics, unless the pod names a scrape target of its own (then it is the
    app's: pointing it elsewhere, or at half of it, would lose the app's metrics)."""
    if any(key.startswith("prometheus.io/") for key in annotations):
        return {}
    return {A_PROMETHEUS_SCRAPE: "true", A_PROMETHEUS_PORT: str(STATUS_PORT), A_PROMETHEUS_PATH: METRICS_PATH}


# --------------------------------------------------------------------------- the containers


def _init_container(config: InjectConfig, annotations: Mapping[str, str], containers: list[dict[str, Any]],
                    app_port: int) -> dict[str, Any]:
    inbound = (_ports(A_INCLUDE_INBOUND, annotations[A_INCLUDE_INBOUND], allow_star=True)
               if A_INCLUDE_INBOUND in annotations else _inbound_ports(containers, app_port))
    args = ["iptables", "--proxy-uid", str(config.proxy_uid), "--inbound-ports", inbound or "*"]
    optional = ((A_EXCLUDE_INBOUND, "--exclude-inbound-ports", _ports),
                (A_EXCLUDE_OUTBOUND, "--exclude-outbound-ports", _ports),
                (A_INCLUDE_CIDRS, "--include-cidrs", lambda w, t: _cidrs(w, t, allow_star=True)),
                (A_EXCLUDE_CIDRS, "--exclude-cidrs", _cidrs))
    for annotation, flag, parse in optional:
        if annotations.get(annotation, "").strip():
            args += [flag, parse(annotation, annotations[annotation])]
    return {
        "name": INIT_NAME,
        "image": config.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["meshkeeper"],
        "args": args,
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {
            "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "privileged": False,
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def _proxy_container(config: InjectConfig, annotations: Mapping[str, str], labels: Mapping[str, str],
                     app_port: int, namespace: str | None, workload: str | None) -> dict[str, Any]:
    protocol = annotations.get(A_PROTOCOL, "http")
    if protocol == "grpc":
        raise InjectError(f"{A_PROTOCOL}: grpc needs HTTP/2 in the sidecar, which it does not speak yet; "
                          "use tcp to carry gRPC at L4 meanwhile")
    if protocol not in PROTOCOLS:
        raise InjectError(f"{A_PROTOCOL}: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    mesh_ns = annotations.get(A_NAMESPACE) or namespace or "default"
    try:
        validate_name("namespace", mesh_ns)
    except RecordError as exc:
        raise InjectError(f"{exc} (set {A_NAMESPACE})") from None
    service = _service(annotations, labels, workload)
    args = ["sidecar", "--service", service, "--namespace", mesh_ns,
            "--app-port", str(app_port), "--interception", "redirect", "--advertise-host", "$(POD_IP)",
            "--inbound-bind", "0.0.0.0", "--cp", config.cp, "--zk", config.zk]
    version = labels.get("version") or labels.get("app.kubernetes.io/version")
    if version:
        args += ["--version", version]
    args += ["--protocol", protocol]
    if annotations.get(A_HEALTH_PATH):
        args += ["--health-path", annotations[A_HEALTH_PATH]]
    # Readiness only, no startupProbe: the sidecar's /ready waits for its registration, which waits
    # for the app to be healthy, and a native sidecar's startupProbe holds the app back until it
    # passes, so the two would wait on each other forever.
    native = {"restartPolicy": "Always"} if config.native_sidecar else {}
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    if config.identity_tokens is not None:
        env.append({"name": TOKEN_ENV, "value": config.identity_tokens(mesh_ns, service)})
    return {
        "name": PROXY_NAME,
        "image": config.image,
        "imagePullPolicy": "IfNotPresent",
        **native,
        "command": ["meshkeeper"],
        "args": args,
        "env": env,
        "ports": [
            {"name": "mk-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
            {"name": "mk-status", "containerPort": STATUS_PORT, "protocol": "TCP"},
            {"name": "mk-outbound", "containerPort": OUTBOUND_PORT, "protocol": "TCP"},
            {"name": "mk-inbound", "containerPort": INBOUND_PORT, "protocol": "TCP"},
            {"name": "mk-dns", "containerPort": DNS_PORT, "protocol": "UDP"},
            {"name": "mk-dns-tcp", "containerPort": DNS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": {"path": READY_PATH, "port": STATUS_PORT}, "periodSeconds": 5,
                           "failureThreshold": 3, "timeoutSeconds": 2},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": {
            "runAsUser": config.proxy_uid, "runAsGroup": config.proxy_uid, "runAsNonRoot": True,
            "privileged": False, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
