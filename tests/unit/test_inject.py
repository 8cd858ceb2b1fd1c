"""Sidecar injection without a cluster: golden manifests, the JSONPatch, the values read from a pod.

tests/golden/inject/<case>.in.yaml goes through ``meshkeeper inject`` (in-process; flags from a first
line ``# meshkeeper inject flags: ...``) and must give <case>.out.yaml byte for byte. After a deliberate
change, ``MESHKEEPER_REFRESH_GOLDEN=1 pytest tests/unit/test_inject.py`` rewrites the outputs: review
the diff before committing it. The patches the webhook sent (tests/golden/webhook/*.patch.json) and the
one computed here between each input pod and its injected pod are applied with a small RFC 6902
applier written below, and must give the injected pod.
"""

from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.injector import inject
from controlplane.injector.admission import workload_name
from controlplane.injector.diff import json_patch
from controlplane.injector.patch import InjectConfig, InjectError, inject_pod
from controlplane.injector.workloads import TEMPLATE_PATHS
from meshkeeper.cli import main as cli_main

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CASES = sorted(p.name.removesuffix(".in.yaml") for p in (GOLDEN / "inject").glob("*.in.yaml"))
UNCHANGED = {"opt-out", "hostnetwork", "kube-system", "already-injected"}
REFRESH = os.environ.get("MESHKEEPER_REFRESH_GOLDEN") == "1"
FLAGS_PREFIX = "# meshkeeper inject flags:"


def run_case(case: str) -> tuple[str, str]:
    path = GOLDEN / "inject" / f"{case}.in.yaml"
    text = path.read_text()
    first = text.splitlines()[0]
    flags = first.removeprefix(FLAGS_PREFIX).split() if first.startswith(FLAGS_PREFIX) else []
    warnings = io.StringIO()
    out = inject.inject_documents(text, inject.config_from(inject.parse_args([*flags, "-f", str(path)])), warnings)
    return out, warnings.getvalue()


def pods(docs: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """The pod of each document (None for kinds that make none)."""
    found = []
    for doc in docs:
        path = TEMPLATE_PATHS.get(doc.get("kind"))
        node: Any = doc if path is not None else None
        for key in path or ():
            node = node[key]
        found.append(node)
    return found


# --------------------------------------------------------------------------- golden manifests


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    out, _ = run_case(case)
    golden = GOLDEN / "inject" / f"{case}.out.yaml"
    if REFRESH:
        golden.write_text(out)
    assert golden.exists(), f"no {golden.name}: run with MESHKEEPER_REFRESH_GOLDEN=1 and review it"
    assert out == golden.read_text(), f"{case}: output differs from {golden.name} (refresh and review the diff)"


@pytest.mark.parametrize("case", sorted(UNCHANGED))
def test_never_injected_pods_come_out_unchanged(case: str) -> None:
    out, warnings = run_case(case)
    before = list(yaml.safe_load_all((GOLDEN / "inject" / f"{case}.in.yaml").read_text()))
    assert list(yaml.safe_load_all(out)) == before
    assert warnings == ""


def test_every_golden_case_is_covered() -> None:
    assert {"pod", "deployment", "job", "multidoc", "no-native", "annotations", *UNCHANGED} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_patch_of_each_pod_gives_the_injected_pod(case: str) -> None:
    out, _ = run_case(case)
    before = pods(list(yaml.safe_load_all((GOLDEN / "inject" / f"{case}.in.yaml").read_text())))
    after = pods(list(yaml.safe_load_all(out)))
    assert len(before) == len(after)
    for b, a in zip(before, after, strict=True):
        if b is not None:
            assert apply_patch(b, json_patch(b, a)) == a


def test_reinjecting_an_injected_output_changes_nothing() -> None:
    for case in ("pod", "deployment", "job", "multidoc", "annotations"):
        once, _ = run_case(case)
        twice = inject.inject_documents(once, InjectConfig(), io.StringIO())
        assert twice == once, case


def test_multidoc_passes_other_kinds_through_and_warns_about_a_portless_pod() -> None:
    out, warnings = run_case("multidoc")
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["Service", "StatefulSet", "ConfigMap", "CronJob", "Deployment"]
    before = list(yaml.safe_load_all((GOLDEN / "inject" / "multidoc.in.yaml").read_text()))
    assert docs[0] == before[0] and docs[2] == before[2] and docs[4] == before[4]
    assert warnings.count("\n") == 1 and "Deployment/queue-worker: not injected: no container port" in warnings


def test_webhook_golden_patches_give_the_injected_pod() -> None:
    cases = sorted((GOLDEN / "webhook").glob("*.patch.json"))
    assert cases, "no webhook goldens"
    for patch_file in cases:
        request = json.loads(patch_file.with_name(patch_file.name.replace(".patch.json", ".request.json")).read_text())
        pod = request["request"]["object"]
        injected = apply_patch(pod, json.loads(patch_file.read_text()))
        ns = request["request"]["namespace"]
        assert injected == inject_pod(pod, InjectConfig(), namespace=ns, workload=workload_name(pod["metadata"])).pod


# --------------------------------------------------------------------------- values read from the pod


def pod(annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None,
        ports: list[int] = (8080,)) -> dict[str, Any]:
    return {"metadata": {"annotations": annotations or {}, "labels": labels or {}},
            "spec": {"containers": [{"name": "app", "image": "app:1",
                                     "ports": [{"containerPort": p} for p in ports]}]}}


def proxy_args(result_pod: dict[str, Any]) -> list[str]:
    (proxy,) = [c for c in result_pod["spec"]["initContainers"] if c["name"] == "meshkeeper-proxy"]
    return proxy["args"]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize(("annotations", "labels", "expected"), [
    ({"sidecar.meshkeeper.io/service": "from-annotation"}, {"app.kubernetes.io/name": "n", "app": "a"},
     "from-annotation"),
    ({}, {"app.kubernetes.io/name": "from-name-label", "app": "a"}, "from-name-label"),
    ({}, {"app": "from-app-label"}, "from-app-label"),
    ({}, {}, "the-workload"),
])
def test_service_name_precedence(annotations: dict[str, str], labels: dict[str, str], expected: str) -> None:
    result = inject_pod(pod(annotations, labels), InjectConfig(), workload="the-workload")
    assert flag(proxy_args(result.pod), "--service") == expected


def test_mesh_namespace_and_version() -> None:
    args = proxy_args(inject_pod(pod(labels={"app": "a"}), InjectConfig()).pod)
    assert flag(args, "--namespace") == "default" and "--version" not in args
    args = proxy_args(inject_pod(pod(labels={"app": "a", "version": "v9"}), InjectConfig(), namespace="k8s-ns").pod)
    assert flag(args, "--namespace") == "k8s-ns" and flag(args, "--version") == "v9"


def test_prometheus_scrapes_the_status_port_unless_the_pod_names_its_own_target() -> None:
    injected = inject_pod(pod(labels={"app": "a"}), InjectConfig()).pod["metadata"]["annotations"]
    assert {k: v for k, v in injected.items() if k.startswith("prometheus.io/")} == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "15021", "prometheus.io/path": "/stats/prometheus"}
    own = {"prometheus.io/port": "9102"}  # the app's metrics: kept, and none of ours mixed in
    injected = inject_pod(pod(own, {"app": "a"}), InjectConfig()).pod["metadata"]["annotations"]
    assert {k: v for k, v in injected.items() if k.startswith("prometheus.io/")} == own


def test_workload_name_from_a_replicaset_pod() -> None:
    meta = {"generateName": "web-7d9f8c6b5d-", "labels": {"pod-template-hash": "7d9f8c6b5d"}}
    assert workload_name(meta) == "web"
    assert workload_name({"name": "web-7d9f8c6b5d-x2x4z", "labels": {"pod-template-hash": "7d9f8c6b5d"}}) == "web"
    assert workload_name({"generateName": "ledger-"}) == "ledger"
    assert workload_name({}) is None


@pytest.mark.parametrize(("annotations", "message"), [
    ({"sidecar.meshkeeper.io/app-port": "http"}, "is not a port number"),
    ({"sidecar.meshkeeper.io/app-port": "70000"}, "is not a port number"),
    ({"sidecar.meshkeeper.io/protocol": "udp"}, "is not one of http, tcp"),
    ({"sidecar.meshkeeper.io/protocol": "grpc"}, "grpc needs HTTP/2 in the sidecar"),
    ({"sidecar.meshkeeper.io/service": "Bad_Name"}, "lowercase DNS label"),
    ({"traffic.sidecar.meshkeeper.io/excludeOutboundIPRanges": "10.0.0.0/33"}, "is not an IP range"),
    ({"traffic.sidecar.meshkeeper.io/excludeOutboundPorts": "53,x"}, "is not a port number"),
])
def test_annotations_that_cannot_be_honoured(annotations: dict[str, str], message: str) -> None:
    with pytest.raises(InjectError, match=message):
        inject_pod(pod(annotations, {"app": "a"}), InjectConfig())


def test_the_argument_is_never_mutated() -> None:
    original = pod(labels={"app": "a"})
    kept = copy.deepcopy(original)
    inject_pod(original, InjectConfig())
    assert original == kept


def test_json_patch_escapes_pointer_tokens_and_inserts_in_lists() -> None:
    before = {"metadata": {"annotations": {"a~b": "1"}}, "spec": {"containers": [1, 2]}}
    after = {"metadata": {"annotations": {"a~b": "1", "x/y": "2"}}, "spec": {"containers": [0, 1, 2, 3]}}
    ops = json_patch(before, after)
    assert ops == [{"op": "add", "path": "/metadata/annotations/x~1y", "value": "2"},
                   {"op": "add", "path": "/spec/containers/0", "value": 0},
                   {"op": "add", "path": "/spec/containers/3", "value": 3}]
    assert apply_patch(before, ops) == after
    assert apply_patch(before, json_patch(before, {"spec": {"containers": [2, 1]}})) == {"spec": {"containers": [2, 1]}}


# --------------------------------------------------------------------------- the command line


def test_cli_writes_injected_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["inject", "-f", str(GOLDEN / "inject" / "pod.in.yaml")]) == 0
    assert capsys.readouterr().out == (GOLDEN / "inject" / "pod.out.yaml").read_text()


@pytest.mark.parametrize(("content", "argv", "message"), [
    (None, ["-f", "/nonexistent/app.yaml"], "cannot read /nonexistent/app.yaml"),
    ("kind: Pod\nmetadata: [\n", ["-f", "FILE"], "not valid YAML (line 3"),
    ("- just\n- a list\n", ["-f", "FILE"], "document 1 is not a Kubernetes object"),
    ("kind: Pod\nmetadata: {name: p, annotations: {sidecar.meshkeeper.io/protocol: udp}}\n"
     "spec: {containers: [{name: a, image: a, ports: [{containerPort: 80}]}]}\n",
     ["-f", "FILE"], "Pod/p: sidecar.meshkeeper.io/protocol: 'udp' is not one of"),
    ("kind: Deployment\nmetadata: {name: d}\nspec: {}\n", ["-f", "FILE"], "Deployment/d has no pod template"),
    (None, [], "the following arguments are required: -f/--filename"),
    (None, ["-f", "x", "--proxy-uid", "0"], "'0' is not a non-root uid"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None,
                                         argv: list[str], message: str) -> None:
    if content is not None:
        (tmp_path / "in.yaml").write_text(content)
    argv = [str(tmp_path / "in.yaml") if a == "FILE" else a for a in argv]
    assert exit_code(["inject", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err, captured.err


def exit_code(argv: list[str]) -> int:
    """What ``meshkeeper ARGV`` exits with (flag errors leave argparse through SystemExit)."""
    try:
        return cli_main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_injector_bad_flags_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(["injector", "--port", "9443"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert cli_main(["injector", "--port", "0", "--cert", str(tmp_path / "no.crt"), "--key", str(tmp_path / "no.key")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load --cert" in err
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    assert cli_main(["injector", "--port", "0", "--cert", str(tmp_path / "junk.pem"), "--key", str(tmp_path / "junk.pem")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --------------------------------------------------------------------------- RFC 6902, the parts we emit


def apply_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """Apply add, remove and replace operations (RFC 6902) to a copy of ``doc``."""
    doc = copy.deepcopy(doc)
    for op in ops:
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        if not tokens:
            assert op["op"] == "replace"
            doc = copy.deepcopy(op["value"])
            continue
        parent = doc
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if op["op"] == "add":
                assert 0 <= index <= len(parent), op
                parent.insert(index, copy.deepcopy(op["value"]))
            elif op["op"] == "replace":
                parent[index] = copy.deepcopy(op["value"])
            else:
                del parent[index]
        else:
            if op["op"] in ("replace", "remove"):
                assert last in parent, f"{op['op']} of a missing member: {op}"
            if op["op"] == "remove":
                del parent[last]
            else:
                parent[last] = copy.deepcopy(op["value"])
    return doc
