"""deploy/kubernetes/ and the injected golden manifests, checked offline against Kubernetes' own schemas.

No cluster runs here: kubernetes-validate carries the OpenAPI schemas of each Kubernetes release, and
``strict`` makes an unknown field (a typo) an error, as ``kubectl apply --validate=strict`` would.
Beyond the schemas: the flags in the manifests are parsed by the commands' own parsers, and the
names that tie the pieces together (Services, ports, the webhook's path, the proxy uid, the image
tag) are compared, so that a rename in one place fails here.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controlplane.injector import patch, webhook
from controlplane.injector.workloads import TEMPLATE_PATHS
from meshkeeper import __version__

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
GOLDEN = ROOT / "tests" / "golden" / "inject"
KUBERNETES_VERSION = "1.30.0"  # native sidecars (init containers' restartPolicy): beta, on by default, since 1.29
NOT_KUBERNETES_SCHEMAS = {"kustomization.yaml"}  # kustomize's own file
CRD_FILES = {"cert-manager.yaml"}  # cert-manager's kinds: no schema ships with Kubernetes


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.glob("*.yaml") if p.name not in NOT_KUBERNETES_SCHEMAS | CRD_FILES)


def find(kind: str, name: str) -> dict[str, Any]:
    for path in manifest_files():
        for doc in documents(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind}/{name} in {DEPLOY}")


def validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", manifest_files() + sorted(GOLDEN.glob("*.out.yaml")), ids=lambda p: p.name)
def test_every_document_is_valid_kubernetes(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        try:
            validate(doc)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata'].get('name')}: {exc.message} at "
                        f"{'.'.join(map(str, exc.absolute_path))}")


@pytest.mark.parametrize(("where", "typo"), [
    (("spec", "template", "spec", "containers", 0, "ports", 0), ("containerPort", "containerPrt")),
    (("spec",), ("replicas", "replica")),
    (("spec", "template", "spec", "containers", 0), ("readinessProbe", "readynessProbe")),
])
def test_the_validator_catches_a_typo(where: tuple[Any, ...], typo: tuple[str, str]) -> None:
    doc = copy.deepcopy(find("Deployment", "meshkeeper-injector"))
    node: Any = doc
    for key in where:
        node = node[key]
    node[typo[1]] = node.pop(typo[0])
    with pytest.raises(kubernetes_validate.ValidationError, match=typo[1]):
        validate(doc)


def test_an_injected_pod_with_a_typo_fails_too() -> None:
    (pod,) = documents(GOLDEN / "pod.out.yaml")
    proxy = pod["spec"]["initContainers"][1]
    proxy["restartPolicyy"] = proxy.pop("restartPolicy")
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicyy"):
        validate(pod)


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = documents(DEPLOY / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())
    assert kustomization["images"] == [{"name": "meshkeeper", "newTag": __version__}]


def test_cert_manager_resources_name_the_injector_secret() -> None:
    kinds = {d["kind"]: d for d in documents(DEPLOY / "cert-manager.yaml")}
    assert set(kinds) == {"Issuer", "Certificate"}
    assert kinds["Certificate"]["spec"]["secretName"] == secret_of_injector()
    hook = find("MutatingWebhookConfiguration", "meshkeeper-sidecar-injector")
    assert hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "meshkeeper-system/meshkeeper-injector"
    assert "meshkeeper-injector.meshkeeper-system.svc" in kinds["Certificate"]["spec"]["dnsNames"]


def secret_of_injector() -> str:
    spec = find("Deployment", "meshkeeper-injector")["spec"]["template"]["spec"]
    (volume,) = spec["volumes"]
    return volume["secret"]["secretName"]


def args_of(kind: str, name: str) -> list[str]:
    (container,) = find(kind, name)["spec"]["template"]["spec"]["containers"]
    return container["args"]


def test_controlplane_flags_parse_and_match_its_service() -> None:
    from controlplane.main import parse_args

    args = args_of("Deployment", "meshkeeper-controlplane")
    parsed = parse_args(args[1:])
    service_ports = {p["name"]: p["targetPort"] for p in find("Service", "meshkeeper-controlplane")["spec"]["ports"]}
    assert args[0] == "controlplane"
    assert service_ports == {"grpc-xds": parsed.xds_port, "http-monitoring": parsed.http_port}
    assert parsed.zk == patch.DEFAULT_ZK
    assert find("Deployment", "meshkeeper-controlplane")["spec"]["replicas"] == 2


def test_injector_flags_parse_and_match_the_webhook_and_the_services() -> None:
    args = args_of("Deployment", "meshkeeper-injector")
    assert args[0] == "injector"
    parsed = webhook.parse_args(args[1:])
    assert (parsed.cp, parsed.zk, parsed.image) == (patch.DEFAULT_CP, patch.DEFAULT_ZK, patch.DEFAULT_IMAGE)
    assert parsed.proxy_uid == patch.DEFAULT_PROXY_UID and parsed.native_sidecar
    cp_host, cp_port = parsed.cp.rsplit(":", 1)
    assert cp_host == "meshkeeper-controlplane.meshkeeper-system.svc"
    assert int(cp_port) in {p["port"] for p in find("Service", "meshkeeper-controlplane")["spec"]["ports"]}
    zk_host, zk_port = parsed.zk.rsplit(":", 1)
    assert zk_host == "zookeeper.meshkeeper-system.svc"
    assert int(zk_port) in {p["port"] for p in find("Service", "zookeeper")["spec"]["ports"]}
    (svc_port,) = find("Service", "meshkeeper-injector")["spec"]["ports"]
    assert (svc_port["port"], svc_port["targetPort"]) == (443, parsed.port)
    assert Path(parsed.cert).parent == Path(parsed.key).parent


def test_webhook_configuration() -> None:
    config = find("MutatingWebhookConfiguration", "meshkeeper-sidecar-injector")
    hooks = config["webhooks"]
    assert [h["name"] for h in hooks] == ["namespace.sidecar-injector.meshkeeper.io",
                                          "object.sidecar-injector.meshkeeper.io"]
    for hook in hooks:
        assert hook["clientConfig"]["service"] == {"name": "meshkeeper-injector", "namespace": "meshkeeper-system",
                                                   "path": "/inject", "port": 443}
        assert "caBundle" not in hook["clientConfig"], "no invented CA: cert-manager or webhook-cert.sh fills it"
        assert hook["admissionReviewVersions"] == ["v1", "v1beta1"]
        assert hook["sideEffects"] == "None" and hook["failurePolicy"] == "Fail"
        assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                  "resources": ["pods"], "scope": "Namespaced"}]
        never = {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                 "values": ["kube-system", "kube-public", "meshkeeper-system"]}
        assert never in hook["namespaceSelector"]["matchExpressions"]
    assert {"key": "meshkeeper-injection", "operator": "In", "values": ["enabled"]} in \
        hooks[0]["namespaceSelector"]["matchExpressions"]
    assert hooks[0]["objectSelector"]["matchExpressions"] == [
        {"key": patch.A_INJECT, "operator": "NotIn", "values": ["false"]}]
    assert hooks[1]["objectSelector"] == {"matchLabels": {patch.A_INJECT: "true"}}
    assert "WEBHOOK=meshkeeper-sidecar-injector" in (DEPLOY / "webhook-cert.sh").read_text()


def test_zookeeper_ensemble() -> None:
    sts = find("StatefulSet", "zookeeper")
    replicas = sts["spec"]["replicas"]
    assert replicas == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"zookeeper:[\d.]+", container["image"])
    servers = {e["name"]: e["value"] for e in container["env"]}["ZOO_SERVERS"].split()
    headless = find("Service", "zookeeper-headless")
    assert headless["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == "zookeeper-headless"
    assert servers == [f"server.{i + 1}=zookeeper-{i}.zookeeper-headless.meshkeeper-system.svc.cluster.local"
                       f":2888:3888;2181" for i in range(replicas)]
    assert find("PodDisruptionBudget", "zookeeper")["spec"]["maxUnavailable"] == 1


def test_no_service_account_can_reach_the_api() -> None:
    """Least privilege: none of our processes calls the Kubernetes API, so none gets a token or a role."""
    kinds = [d["kind"] for p in manifest_files() for d in documents(p)]
    assert not {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"} & set(kinds)
    for kind, name in (("StatefulSet", "zookeeper"), ("Deployment", "meshkeeper-controlplane"),
                       ("Deployment", "meshkeeper-injector")):
        spec = find(kind, name)["spec"]["template"]["spec"]
        account = find("ServiceAccount", spec["serviceAccountName"])
        assert account["automountServiceAccountToken"] is False and spec["automountServiceAccountToken"] is False


def test_dockerfile_matches_the_injection_defaults() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert re.search(r"apt-get install .*iptables", text)
    assert f"--uid {patch.DEFAULT_PROXY_UID}" in text and f"USER {patch.DEFAULT_PROXY_UID}:" in text
    assert 'ENTRYPOINT ["meshkeeper"]' in text
    assert f"meshkeeper:{__version__}" == patch.DEFAULT_IMAGE
    for kind, name in (("Deployment", "meshkeeper-controlplane"), ("Deployment", "meshkeeper-injector")):
        (container,) = find(kind, name)["spec"]["template"]["spec"]["containers"]
        assert container["image"] == patch.DEFAULT_IMAGE


def injected_pods() -> list[tuple[str, dict[str, Any]]]:
    """(file name, pod) of every injected pod in the golden outputs."""
    found = []
    for path in sorted(GOLDEN.glob("*.out.yaml")):
        for doc in documents(path):
            if doc["kind"] not in TEMPLATE_PATHS:
                continue  # a Service, a ConfigMap: no pod
            pod = doc
            for key in TEMPLATE_PATHS[doc["kind"]]:
                pod = pod[key]
            names = {c["name"] for c in pod["spec"].get("initContainers") or []}
            if patch.INIT_NAME in names and path.name != "already-injected.out.yaml":
                found.append((f"{path.name}:{doc['metadata'].get('name')}", pod))
    return found


INJECTED = injected_pods()
def proxy_cases() -> list[Any]:
    return [pytest.param(name, pod, id=name) for name, pod in INJECTED]


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod["spec"]
    return next(c for c in (spec.get("initContainers") or []) + spec["containers"] if c["name"] == name)


def test_golden_outputs_hold_injected_pods() -> None:
    assert len(INJECTED) >= 6 and any(name.startswith("pod.out.yaml") for name, _ in INJECTED)


def test_injected_proxy_flags_parse_with_the_sidecar() -> None:
    from sidecar.main import parse_args

    (pod,) = documents(GOLDEN / "pod.out.yaml")
    proxy = container(pod, patch.PROXY_NAME)
    parsed = parse_args([a.replace("$(POD_IP)", "10.1.2.3") for a in proxy["args"][1:]])
    assert (parsed.service, parsed.namespace, parsed.app_port) == ("catalog", "shop", 8080)
    assert parsed.advertise_host == "10.1.2.3"
    assert parsed.interception == "redirect"


@pytest.mark.parametrize(("name", "pod"), proxy_cases())
def test_probe_and_scrape_target_the_status_port_the_sidecar_serves(name: str, pod: dict[str, Any]) -> None:
    from sidecar.main import parse_args
    from sidecar.status import STATUS_PAGES

    proxy = container(pod, patch.PROXY_NAME)
    assert proxy["command"] == ["meshkeeper"] and proxy["args"][0] == "sidecar"
    parsed = parse_args([a.replace("$(POD_IP)", "10.1.2.3") for a in proxy["args"][1:]])
    probe = proxy["readinessProbe"]["httpGet"]
    assert probe == {"path": "/healthz/ready", "port": parsed.status_port} and probe["path"] in STATUS_PAGES
    assert parsed.status_bind == "0.0.0.0", "the kubelet probes the pod IP"
    assert {"name": "mk-status", "containerPort": parsed.status_port, "protocol": "TCP"} in proxy["ports"]
    annotations = pod["metadata"].get("annotations") or {}
    if annotations.get(patch.A_PROMETHEUS_PORT) == str(parsed.status_port):
        assert annotations[patch.A_PROMETHEUS_PATH] in STATUS_PAGES
        assert annotations[patch.A_PROMETHEUS_SCRAPE] == "true"


@pytest.mark.parametrize(("name", "pod"), INJECTED, ids=[name for name, _ in INJECTED])
def test_injected_init_flags_parse_with_meshkeeper_iptables(name: str, pod: dict[str, Any]) -> None:
    from sidecar.interception.iptables import build_parser, config_from

    init = container(pod, patch.INIT_NAME)
    assert init["command"] == ["meshkeeper"] and init["args"][0] == "iptables"
    parser = build_parser()
    config = config_from(parser.parse_args(init["args"][1:]), parser)  # a bad flag exits here
    proxy = container(pod, patch.PROXY_NAME)
    assert config.proxy_uid == proxy["securityContext"]["runAsUser"]
    probe_port = proxy["readinessProbe"]["httpGet"]["port"]
    # The kubelet's probe and Prometheus reach the status port: never redirected to 15006.
    assert probe_port in config.sidecar_ports
    assert config.inbound_ports is None or probe_port not in config.inbound_ports
