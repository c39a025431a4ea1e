"""The Kubernetes manifests (deploy/kubernetes): every overlay renders with `kubectl kustomize`,
every object validates against its schema (Kubernetes' own for a pinned version; for KEDA and
CloudNativePG the openAPIV3Schema of their released CRDs, kept in deploy/kubernetes/schemas),
and the parts that must agree with comfyfleet do."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema
import kubernetes_validate
import pytest
import yaml

from comfyfleet.fleet.discovery import DnsTarget
from comfyfleet.jobs.models import TERMINAL_STATES, JobStatus
from comfyfleet.settings import Settings
from tests.support import REPO

KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir())
KUBERNETES_VERSION = "1.34"
SCHEMAS = KUBERNETES / "schemas"
KUBECTL = shutil.which("kubectl")

needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: it renders the kustomize overlays")


def render(overlay: str) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(KUBERNETES / "overlays" / overlay)],
                         check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


@cache
def custom_schema(api_version: str, kind: str) -> dict[str, Any] | None:
    """The CRD's schema for objects of `kind`, made strict, or None for Kubernetes' own kinds."""
    path = SCHEMAS / f"{api_version.replace('/', '_')}_{kind}.yaml"
    if not path.exists():
        return None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 400 kB for CloudNativePG's
    return strict(yaml.load(path.read_text(), Loader=loader))


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (changed in place) as the API server applies it with strict field validation,
    kubectl's default: a field an object's `properties` do not name is an error, unless the CRD
    marks the object x-kubernetes-preserve-unknown-fields. (Its CEL rules,
    x-kubernetes-validations, are not checked here.)"""
    pending = [schema]
    while pending:
        node = pending.pop()
        if "properties" in node and "additionalProperties" not in node and not node.get(
                "x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        pending.extend(node.get("properties", {}).values())
        for key in ("items", "additionalProperties", "not"):
            if isinstance(node.get(key), dict):
                pending.append(node[key])
        for key in ("anyOf", "allOf", "oneOf"):
            pending.extend(node.get(key, []))
    return schema


def validate(obj: dict[str, Any]) -> None:
    """Strictly, against its CRD's schema or, for Kubernetes' own kinds, Kubernetes'."""
    schema = custom_schema(obj["apiVersion"], obj["kind"])
    if schema is None:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    else:
        jsonschema.Draft4Validator(schema).validate(obj)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(overlay: str) -> None:
    kinds = []
    for obj in render(overlay):
        kinds.append(obj["kind"])
        validate(obj)
    assert {"Deployment", "StatefulSet", "Service", "ScaledObject"} <= set(kinds)


def test_the_operators_schemas_are_their_released_crds() -> None:
    """Each kept schema names where it comes from, and is the whole CRD schema, not a subset."""
    for path in sorted(SCHEMAS.glob("*.yaml")):
        header = "".join(line for line in path.read_text().splitlines(keepends=True)
                         if line.startswith("#"))
        for line in ("# Source: https://github.com/", "# Version: v", "# License: Apache-2.0"):
            assert line in header, f"{path.name}: no {line!r}"
        group, version, kind = path.stem.split("_")
        schema = custom_schema(f"{group}/{version}", kind)
        assert schema is not None and {"apiVersion", "kind", "metadata", "spec", "status"} <= set(
            schema["properties"])


def test_the_validation_catches_mistakes() -> None:
    """Strict validation refuses an unknown field or a wrong type, in Kubernetes' objects and in
    the operators', at any depth; the same objects without the mistake pass."""
    def loaded(*path: str) -> list[dict[str, Any]]:
        return list(yaml.safe_load_all(KUBERNETES.joinpath(*path).read_text()))

    deployment = loaded("base", "comfyfleet.yaml")[0]
    authentication, scaled = loaded("components", "keda", "scaledobject.yaml")
    cluster = loaded("overlays", "cloudnative-pg", "database.yaml")[0]
    mistakes: list[tuple[dict[str, Any], Any, str]] = [
        (deployment, lambda d: d["spec"].update(replica=2), "replica"),
        (scaled, lambda s: s["spec"].update(maxReplicas=8), "maxReplicas"),
        (scaled, lambda s: s["spec"]["scaleTargetRef"].update(namespace="gpu"), "namespace"),
        (scaled, lambda s: s["spec"]["triggers"][0]["metadata"].update(targetQueryValue=2),
         "targetQueryValue"),
        (scaled, lambda s: s["spec"]["triggers"][0].update(authRef={"name": "x"}), "authRef"),
        (authentication, lambda a: a["spec"]["secretTargetRef"][0].update(secret="x"),
         "secret"),
        (cluster, lambda c: c["spec"]["storage"].update(sizeLimit="1Gi"), "sizeLimit"),
        (cluster, lambda c: c["spec"]["bootstrap"]["initdb"].update(databse="x"), "databse"),
        (cluster, lambda c: c["spec"].update(instances="two"), "instances"),
    ]
    for obj, mistake, field in mistakes:
        validate(obj)
        wrong = copy.deepcopy(obj)
        mistake(wrong)
        with pytest.raises((jsonschema.ValidationError,
                            kubernetes_validate.ValidationError)) as refused:
            validate(wrong)
        assert field in str(refused.value), (obj["kind"], field, str(refused.value)[:300])


@needs_kubectl
def test_the_gateway_finds_drains_and_is_probed_as_comfyfleet_expects() -> None:
    objects = render("external-db")
    settings = find(objects, "ConfigMap", next(
        o["metadata"]["name"] for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("comfyfleet-settings")))
    unknown = set(settings["data"]) - {name.upper() for name in Settings.model_fields}
    assert unknown == set(), "settings comfyfleet does not read"

    # Discovery names the headless Service and its port.
    target = DnsTarget.parse(settings["data"]["COMFYUI_DISCOVERY"])
    service = find(objects, "Service", target.name)
    assert service["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in service["spec"]["ports"]] == [target.port]

    gateway = find(objects, "Deployment", "comfyfleet")
    assert gateway["spec"]["replicas"] >= 2
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    grace = gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(settings["data"]["SHUTDOWN_TIMEOUT"])

    # Each ComfyUI pod drains its backend before it stops, with the script the comfyfleet
    # image carries, waiting less than the pod's grace period.
    pods = find(objects, "StatefulSet", "comfyui")["spec"]
    comfyui = pods["template"]["spec"]["containers"][0]
    command = comfyui["lifecycle"]["preStop"]["exec"]["command"]
    script = Path(command[1])
    mounts = {m["mountPath"]: m["name"] for m in comfyui["volumeMounts"]}
    assert mounts[str(script.parent)] == "comfyfleet-nodes"
    assert (REPO / "comfyui_nodes" / "comfyfleet_cleanup" / script.name).is_file()
    assert float(command[command.index("--wait") + 1]) < pods["template"]["spec"][
        "terminationGracePeriodSeconds"]
    assert pods["serviceName"] == target.name
    assert "COPY comfyui_nodes" in (REPO / "Dockerfile").read_text()


def deploy_commands(page: Path) -> list[list[str]]:
    """The `kubectl` commands of the page's block that deploys (the one creating the Secret)."""
    block = next(b for b in re.findall(r"```sh\n(.*?)```", page.read_text(), re.DOTALL)
                 if "kubectl create secret" in b)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines()
            if line.startswith("kubectl")]


@needs_kubectl
@pytest.mark.parametrize("page", ["README.md", "docs/deployment.md"])
def test_the_documented_commands_deploy_what_the_manifests_need(page: str) -> None:
    """The three commands README and docs/deployment.md give create the Secret with every key
    the manifests read from it (and only settings someone reads), the workflows ConfigMap the
    gateway mounts, and apply an overlay there is."""
    secret, workflows, apply = deploy_commands(REPO / page)
    assert secret[:4] == ["kubectl", "create", "secret", "generic"]
    given = {arg.removeprefix("--from-literal=").split("=", 1)[0]
             for arg in secret[5:] if arg.startswith("--from-literal=")}
    assert apply[:3] == ["kubectl", "apply", "-k"]
    objects = render(Path(apply[3]).name)
    assert (REPO / apply[3]).resolve() == KUBERNETES / "overlays" / Path(apply[3]).name

    read = set()
    for obj in objects:
        if obj["kind"] == "TriggerAuthentication":
            read |= {ref["key"] for ref in obj["spec"]["secretTargetRef"]
                     if ref["name"] == secret[4]}
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            read |= {env["valueFrom"]["secretKeyRef"]["key"] for env in container.get("env", [])
                     if env.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == secret[4]}
    assert read <= given, f"{page}: the Secret lacks {read - given}"
    settings = {name.upper() for name in Settings.model_fields}
    assert given - settings <= read, f"{page}: {given - settings - read} read by nothing"

    assert workflows[:3] == ["kubectl", "create", "configmap"]
    gateway = find(objects, "Deployment", "comfyfleet")["spec"]["template"]["spec"]
    assert {"name": "workflows", "configMap": {"name": workflows[3]}} in gateway["volumes"]


@needs_kubectl
async def test_the_autoscaler_counts_unfinished_jobs(database_url: str, engine: Any) -> None:
    """KEDA's query runs on comfyfleet's schema and counts exactly the jobs a GPU is needed
    for: all but the terminal ones."""
    scaled = find(render("external-db"), "ScaledObject", "comfyui")
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        for index, status in enumerate(JobStatus):
            await connection.execute(
                "INSERT INTO jobs (id, workflow, status) VALUES (gen_random_uuid(), $1, $2)",
                f"w{index}", status.value)
        counted = await connection.fetchval(query)
    finally:
        await connection.close()
    assert counted == len(JobStatus) - len(TERMINAL_STATES)
