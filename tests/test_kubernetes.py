"""The Kubernetes manifests (deploy/kubernetes): every overlay renders with `kubectl kustomize`,
every object validates against its schema (Kubernetes' own for a pinned version, the
operators' for KEDA and CloudNativePG), and the parts that must agree with comfyfleet do."""

from __future__ import annotations

import json
import shutil
import subprocess
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


def custom_schema(obj: dict[str, Any]) -> dict[str, Any] | None:
    group_version = obj["apiVersion"].replace("/", "_")
    path = SCHEMAS / f"{group_version}_{obj['kind']}.json"
    return json.loads(path.read_text()) if path.exists() else None


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(overlay: str) -> None:
    kinds = []
    for obj in render(overlay):
        kinds.append(obj["kind"])
        schema = custom_schema(obj)
        if schema is not None:
            jsonschema.validate(obj, schema)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert {"Deployment", "StatefulSet", "Service", "ScaledObject"} <= set(kinds)


def test_the_validation_catches_mistakes() -> None:
    """Strict validation refuses an unknown field, in Kubernetes' objects and in ours."""
    deployment = next(yaml.safe_load_all((KUBERNETES / "base" / "comfyfleet.yaml").read_text()))
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    scaled = list(yaml.safe_load_all(
        (KUBERNETES / "components" / "keda" / "scaledobject.yaml").read_text()))[1]
    scaled["spec"]["maxReplicas"] = 8
    schema = custom_schema(scaled)
    assert schema is not None
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, schema)


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
