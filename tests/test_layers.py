"""The house keeps its shape (DESIGN §11): every import inside the package points down the flow.

A stage may use what lies below it, never what lies above: the HTTP layer calls intake, intake
never knows HTTP; the dispatcher calls into execution, execution never reaches back into the
dispatcher. Imports made only for type checking count too: they are how cycles hide.
"""

from __future__ import annotations

import ast
from pathlib import Path

import comfyfleet

PACKAGE = Path(comfyfleet.__file__).parent

# Top to bottom. A unit is a subpackage or a top-level module of comfyfleet.
LAYERS: list[set[str]] = [
    {"__main__"},  # python -m comfyfleet
    {"cli"},  # commands
    {"app"},  # wiring, lifespan
    {"api"},  # HTTP in, domain errors out as HTTP
    {"services"},  # what the routes share
    {"intake"},  # a request becomes a job
    {"fleet"},  # the fleet: its table, and dispatch + execution wired per backend
    {"dispatch"},  # claim -> submit, placement, rebalance
    {"execution"},  # backend sessions, tracker, collector
    {"webhooks", "peers"},  # outbox leases, worker, delivery, signing; other processes' news
    {"api_keys"},  # tenants
    {"metrics", "logs"},  # what every stage records into
    {"jobs"},  # model, repository, lease, the outbox's rows
    {"sim"},  # the simulated ComfyUI: keeps its cache by comfy/'s rules
    {"egress", "storage", "workflows", "pulse"},  # leaves
    {"comfy"},  # what a ComfyUI server is and says (workflows read its /object_info)
    {"http_client"},  # the lean HTTP/1.1 client of the hot path's requests
    {"db", "sql"},
    {"settings"},
    {"json_codec"},  # the JSON encoder and decoder every stage shares
]


def _layer(unit: str) -> int:
    for depth, units in enumerate(LAYERS):
        if unit in units:
            return depth
    raise AssertionError(f"comfyfleet.{unit} has no layer: add it to LAYERS in {__file__}")


def _imports() -> set[tuple[str, str, str]]:
    """(importing unit, imported unit, file) for every import of comfyfleet inside comfyfleet."""
    found: set[tuple[str, str, str]] = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).with_suffix("")
        if relative.parts[0] == "migrations":  # frozen history, run by alembic only
            continue
        unit = relative.parts[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            if node.module == "comfyfleet":
                targets = [alias.name for alias in node.names]
            elif node.module.startswith("comfyfleet."):
                targets = [node.module.split(".")[1]]
            else:
                continue
            found.update((unit, target, str(relative)) for target in targets if target != unit)
    return found


def test_every_unit_has_a_layer() -> None:
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    for unit in units - {"migrations"}:
        _layer(unit)


def test_imports_point_down() -> None:
    upward = sorted(
        f"{where} imports comfyfleet.{target}"
        for unit, target, where in _imports()
        if _layer(target) <= _layer(unit)
    )
    assert upward == []


def test_no_function_is_over_60_lines() -> None:
    """Long functions hide the flow (issue #21): past 60 lines, cut by what the parts do."""
    long = sorted(
        f"{path.relative_to(PACKAGE)}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None and node.end_lineno - node.lineno + 1 > 60
    )
    assert long == []


# The web framework's packages: only the HTTP layer and what stands above it may use them.
HTTP_FRAMEWORKS = {"fastapi", "starlette", "sse_starlette"}


def _imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_only_api_knows_http() -> None:
    """Below api/, code raises domain errors and api/ answers them (DESIGN §11): no request,
    response or status code of the web framework reaches further down."""
    units_below = {unit for units in LAYERS[_layer("api") + 1:] for unit in units}
    below_api = sorted(
        f"{path.relative_to(PACKAGE)} imports {package}"
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).with_suffix("").parts[0] in units_below
        for package in _imported_packages(path) & HTTP_FRAMEWORKS
    )
    assert below_api == []
