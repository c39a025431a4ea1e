"""A client's own graph checked against the fleet's /object_info, as ComfyUI checks a prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from comfyfleet.comfy.capabilities import Capabilities
from comfyfleet.intake.graphs import InvalidGraph, UiFormatGraph, check_graph, shape_label

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "comfyui-0.3.64"
REAL = Capabilities.from_object_info(
    json.loads((FIXTURES / "object_info_full.json").read_text()))

GRAPH: dict[str, Any] = {
    "1": {"class_type": "EmptyImage",
          "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
}


def problems(graph: dict[str, Any], fleet: list[Capabilities]) -> set[tuple[str, str, str]]:
    with pytest.raises(InvalidGraph) as raised:
        check_graph(graph, fleet)
    return {(node, p.field or "", p.reason)
            for node, found in raised.value.node_errors.items() for p in found}


def with_inputs(node_id: str, **inputs: Any) -> dict[str, Any]:
    node = GRAPH[node_id]
    return {**GRAPH, node_id: {**node, "inputs": {**node["inputs"], **inputs}}}


def test_a_valid_graph_passes_as_it_is() -> None:
    assert check_graph(GRAPH, [REAL]) is GRAPH


def test_values_are_checked_against_the_declared_types_ranges_and_choices() -> None:
    mask_into_image = {**GRAPH, "4": {"class_type": "SolidMask", "inputs": {
        "value": 1.0, "width": 8, "height": 8}}, "2": {"class_type": "ImageInvert",
                                                       "inputs": {"image": ["4", 0]}}}
    assert problems(mask_into_image, [REAL]) == {("2", "image", "type_mismatch")}
    assert problems(with_inputs("1", width=0), [REAL]) == {("1", "width", "value_out_of_range")}
    upscale = {**GRAPH, "2": {"class_type": "ImageScale", "inputs": {
        "image": ["1", 0], "upscale_method": "warp", "width": 8, "height": 8, "crop": "disabled"}}}
    assert problems(upscale, [REAL]) == {("2", "upscale_method", "value_not_in_list")}


def test_malformed_nodes_and_links_are_named_even_without_a_backend() -> None:
    graph = {**GRAPH, "2": {"inputs": {}}, "3": {"class_type": "SaveImage",
                                                 "inputs": {"images": ["1"]}}}
    assert problems(graph, []) == {("2", "class_type", "missing_class_type"),
                                   ("3", "images", "bad_link")}
    assert problems(with_inputs("3", images=["9", 0]), [REAL]) == {("3", "images", "bad_link")}
    assert problems(with_inputs("3", images=["1", 1]), [REAL]) == {("3", "images", "bad_link")}
    # Without /object_info an unknown class is left to the backends, as for catalog jobs.
    assert check_graph(with_inputs("2") | {"2": {"class_type": "Custom", "inputs": {}}}, [])


def test_ui_exports_and_graphs_no_backend_can_run_are_refused() -> None:
    with pytest.raises(UiFormatGraph):
        check_graph({"nodes": [], "links": [], "last_node_id": 0}, [REAL])
    only_models = Capabilities.from_object_info({"EmptyImage": {"input": {}, "output": ["IMAGE"]}})
    with pytest.raises(InvalidGraph) as split:
        # Every class is on some backend, none has them all.
        check_graph(GRAPH, [only_models, Capabilities.from_object_info(
            {name: json.loads((FIXTURES / "object_info_full.json").read_text())[name]
             for name in ("ImageInvert", "SaveImage")})])
    assert split.value.details["reason"] == "no_capable_backend"


def test_a_fleet_of_like_servers_is_checked_as_one_and_its_changes_are_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Backends of one /object_info share their capabilities (Capabilities.shared): a graph
    is checked against them once, not once per backend (per node and input: the check grew
    with the fleet, 0.18 ms for a 7-node graph on 16 backends); and a backend whose
    /object_info changed is checked as it is now, not as an earlier check knew the fleet."""
    asked: list[Capabilities] = []
    missing = Capabilities.missing

    def counted(self: Capabilities, prompt: dict[str, Any]) -> list[str]:
        asked.append(self)
        return missing(self, prompt)

    monkeypatch.setattr(Capabilities, "missing", counted)
    assert check_graph(GRAPH, [REAL] * 16) is GRAPH
    assert asked == [REAL]
    without_invert = Capabilities.from_object_info(
        {name: json.loads((FIXTURES / "object_info_full.json").read_text())[name]
         for name in ("EmptyImage", "SaveImage")})
    assert problems(GRAPH, [without_invert] * 16) == {("2", "class_type", "unknown_class")}
    # A class that one backend of a mixed fleet has is checked against that one's spec.
    assert check_graph(GRAPH, [without_invert, REAL]) is GRAPH
    assert problems(with_inputs("2", image=["1", 3]), [without_invert, REAL]) == {
        ("2", "image", "bad_link")}


def test_asset_references_are_not_taken_for_file_names() -> None:
    load = {"1": {"class_type": "LoadImage", "inputs": {"image": {
        "__type": "core/ASSET", "info": {"id": "a"}}}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                        "filename_prefix": "x"}}}
    assert check_graph(load, [REAL]) is load


def test_the_shape_label_ignores_values_but_not_links() -> None:
    assert shape_label(GRAPH) == shape_label(with_inputs("1", color=5, width=9))
    assert shape_label(GRAPH) != shape_label(with_inputs("3", images=["1", 0]))
    assert shape_label(GRAPH).startswith("graph:")


def test_the_shape_label_stays_what_jobs_already_store() -> None:
    """Labels are stored (and learned run times kept under them): their digest is of the
    standard library's JSON text of the shape, keys sorted at every level, non-ASCII escaped,
    whatever order a client sent the inputs in."""
    graph = {"9": {"class_type": "Ünïcode", "inputs": {"z": ["10", 0], "a": ["9", 1], "v": 3}},
             "10": {"class_type": "X", "inputs": {}}}
    assert shape_label(graph) == "graph:183a619a8372d496"
    assert shape_label({"9": {**graph["9"], "inputs": {"a": ["9", 1], "v": 3, "z": ["10", 0]}},
                        "10": {"class_type": "X"}}) == "graph:183a619a8372d496"
    assert shape_label(GRAPH) == "graph:b130d93eb8a72887"
