"""The deployment files agree with the code: docker-compose.yml and the Dockerfile, every
setting in .env.example and in the configuration table (docs/configuration.md), and nothing
else there."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from dotenv import dotenv_values

from comfyfleet.settings import Settings
from comfyfleet.workflows.catalog import load_catalog
from tests.support import REPO

SETTING_NAMES = {name.upper() for name in Settings.model_fields}


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def with_defaults(text: str) -> str:
    """Compose's `${NAME:-default}` as it is with NAME unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def test_compose_services_ports_and_settings() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "minio", "minio-bucket", "comfyui", "comfyfleet"}
    app = services["comfyfleet"]
    assert app["build"] == "."
    environment = app["environment"]
    unknown = set(environment) - SETTING_NAMES
    assert not unknown, f"not settings of comfyfleet: {sorted(unknown)}"
    assert app["ports"] == [f"{environment['SERVICE_PORT']}:{environment['SERVICE_PORT']}"]
    assert environment["SERVICE_HOST"] == "0.0.0.0"
    assert environment["DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in environment["DATABASE_URL"]
    assert environment["S3_ENDPOINT_URL"] == "http://minio:9000"
    # Output URLs name MinIO as the host reaches it, on a published port.
    assert with_defaults(environment["S3_PUBLIC_URL"]) == "http://localhost:9000"
    assert "9000:9000" in services["minio"]["ports"]
    assert app["depends_on"]["postgres"] == {"condition": "service_healthy"}
    # Ready means accepting TCP connections, not the first start's Unix-socket-only server.
    healthcheck = services["postgres"]["healthcheck"]["test"]
    assert healthcheck[:2] == ["CMD", "pg_isready"] and "-h" in healthcheck
    assert healthcheck[healthcheck.index("-h") + 1] == "localhost"
    for name in ("postgres", "minio", "comfyui", "comfyfleet"):
        assert services[name]["restart"] == "unless-stopped", name
    assert app["depends_on"]["minio-bucket"] == {"condition": "service_completed_successfully"}
    # The grace period covers the shutdown drain.
    assert int(app["stop_grace_period"].rstrip("s")) > float(environment["SHUTDOWN_TIMEOUT"])
    assert "comfyfleet-outputs" in services["minio-bucket"]["entrypoint"]
    assert environment["S3_BUCKET"] == "comfyfleet-outputs"

    # One ComfyUI service on one GPU, whichever the machine has; no fixed device ids. Its
    # replicas (--scale) are found by DNS.
    assert environment["COMFYUI_DISCOVERY"] == "dns:comfyui:8188"
    assert "COMFYUI_ENDPOINTS" not in environment
    comfyui = services["comfyui"]
    (device,) = comfyui["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    # Stock ComfyUI listens on 127.0.0.1 only, out of comfyfleet's reach.
    command = with_defaults(comfyui["command"]).split()
    assert command[:2] == ["python", "main.py"]
    assert command[command.index("--listen") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "8188"
    assert with_defaults(comfyui["working_dir"]) == "/opt/ComfyUI"
    mounts = [with_defaults(volume).split(":") for volume in comfyui["volumes"]]
    assert ["comfyui-models", "/opt/ComfyUI/models"] in mounts
    assert "comfyui-models" in compose()["volumes"]
    assert ["./comfyui_nodes/comfyfleet_cleanup",
            "/opt/ComfyUI/custom_nodes/comfyfleet_cleanup", "ro"] in mounts
    assert (REPO / "comfyui_nodes" / "comfyfleet_cleanup" / "__init__.py").is_file()
    # Both sides of the cleanup routes get the same token.
    assert comfyui["environment"]["COMFYFLEET_NODE_TOKEN"] == (
        environment["COMFYFLEET_NODE_TOKEN"])


def test_the_package_ships_the_sample_workflows(tmp_path: Path) -> None:
    """What `pip install` puts in site-packages: the repository's workflows/, every file."""
    build = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q",
         "egg_info", "--egg-base", str(tmp_path), "build_py", "--build-lib", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert build.returncode == 0, build.stderr
    shipped = tmp_path / "comfyfleet" / "sample_workflows"
    samples = sorted(path.name for path in (REPO / "workflows").iterdir() if path.is_file())
    assert "invert.json" in samples
    assert sorted(path.name for path in shipped.iterdir()) == samples
    catalog = load_catalog(shipped)
    assert "invert" in catalog.workflows and not catalog.errors


def test_dockerfile_installs_the_pinned_requirements_and_serves() -> None:
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    assert "FROM python:3.11-slim" in lines
    assert "RUN pip install -r requirements.txt" in lines
    assert "RUN pip install --no-deps ." in lines
    assert lines.index("COPY requirements.txt .") < lines.index("COPY src ./src")
    # The package links to the sample workflows: they must be there when it is installed.
    assert lines.index("COPY workflows ./workflows") < lines.index("RUN pip install --no-deps .")
    assert 'CMD ["comfyfleet", "serve"]' in lines
    assert "EXPOSE 8000" in lines
    assert "USER comfyfleet" in lines
    for setting in re.findall(r"^\s*(\w+)=", "\n".join(lines), re.MULTILINE):
        if not setting.startswith(("PYTHON", "PIP_")):
            assert setting in SETTING_NAMES, setting
    # Healthy means reachable from outside the container, not just from its own loopback.
    (healthcheck,) = [line for line in lines if "/healthz" in line]
    assert "socket.gethostname()" in healthcheck
    assert "127.0.0.1" not in healthcheck and "localhost" not in healthcheck


def dockerfile_env() -> dict[str, str]:
    """What the Dockerfile's ENV instructions set."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return {name: value for line in text.splitlines() if line.startswith("ENV ")
            for name, value in re.findall(r"(\w+)=(\S+)", line)}


def test_env_example_as_the_images_env_file_undoes_none_of_its_settings() -> None:
    """`docker run --env-file .env`, the .env made from .env.example, overrides the image's ENV:
    a SERVICE_HOST=127.0.0.1 there left the container answering only itself."""
    image = dockerfile_env()
    assert image["SERVICE_HOST"] == "0.0.0.0"
    workdir = re.findall(r"^WORKDIR (\S+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    for name, value in dotenv_values(REPO / ".env.example").items():
        if name in image and value is not None:  # a relative path is taken from WORKDIR
            assert image[name] in (value, str(PurePosixPath(*workdir, value))), name


def example_names(path: Path) -> list[str]:
    """Every NAME= line of an env file, commented out or not."""
    return re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", path.read_text(), re.MULTILINE)


def test_env_example_lists_every_setting_once_and_nothing_else() -> None:
    names = example_names(REPO / ".env.example")
    assert len(names) == len(set(names)), "listed twice"
    assert set(names) - SETTING_NAMES == set(), "not a setting"
    assert SETTING_NAMES - set(names) == set(), "missing from .env.example"


def design_settings() -> set[str]:
    """The settings docs/DESIGN.md §9 (the product's contract) names."""
    design = (REPO / "docs" / "DESIGN.md").read_text()
    section = design[design.index("\n## 9. Configuration"):]
    section = section[:section.index("\n## ", 1)]
    return set(re.findall(r"`([A-Z][A-Z0-9_]+)`", section))


# Named there, built by open issues: each comes out of this list when it lands.
NOT_BUILT_YET: dict[str, str] = {}


def test_every_setting_of_the_design_is_a_setting_and_in_env_example() -> None:
    listed = set(example_names(REPO / ".env.example"))
    named = design_settings()
    assert {"COMFYUI_ENDPOINTS", "RDB_PASSWORD", "DISCOVERY_INTERVAL"} <= named  # all of §9
    missing = {name for name in named if name not in SETTING_NAMES or name not in listed}
    assert missing == set(NOT_BUILT_YET), "built now? take it out of NOT_BUILT_YET"


def test_env_example_values_are_valid() -> None:
    settings = Settings(_env_file=REPO / ".env.example")
    assert settings.log_format == "text"
    assert settings.max_inflight_per_backend == 2


def shown(default: object) -> str:
    """A default as the configuration table writes it."""
    if default is None:
        return "unset"
    if default == "" or default == []:
        return "empty"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, list):
        return "`" + ",".join(shown(item).strip("`") for item in default) + "`"
    if isinstance(default, float) and default.is_integer():
        return f"`{int(default)}`"
    return f"`{default}`"


def test_configuration_table_matches_the_settings() -> None:
    section = (REPO / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]*) \|", section, re.MULTILINE)
    documented = dict(rows)
    assert len(rows) == len(documented), "a setting documented twice"
    assert set(documented) == SETTING_NAMES
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        assert documented[name.upper()].strip() == shown(default), name
