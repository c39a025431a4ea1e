"""Workflow files: loading, the API-format check, parameters and safe substitution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfyfleet.workflows.api_format import UI_FORMAT_HINT
from comfyfleet.workflows.catalog import load_catalog
from comfyfleet.workflows.params import ParamError

REPO = Path(__file__).resolve().parent.parent


def write(directory: Path, name: str, document: object) -> None:
    (directory / name).write_text(json.dumps(document))


def test_shipped_invert_workflow_has_typed_parameters_with_defaults() -> None:
    catalog = load_catalog(REPO / "workflows")
    assert catalog.errors == {}
    invert = catalog.workflows["invert"]
    values, prompt = invert.build({"width": "64", "color": 0x112233})
    assert values == {"width": 64, "height": 512, "color": 0x112233}
    assert prompt["1"]["inputs"] == {"width": 64, "height": 512, "batch_size": 1,
                                     "color": 0x112233}
    assert invert.template["1"]["inputs"]["width"] == "$width"  # the template is untouched


def test_bad_parameters_are_named_each() -> None:
    invert = load_catalog(REPO / "workflows").workflows["invert"]
    with pytest.raises(ParamError) as caught:
        invert.build({"width": "wide", "height": 0, "colour": 1})
    assert set(caught.value.problems) == {"width", "height", "colour"}
    assert "at least 1" in caught.value.problems["height"]
    assert caught.value.problems["colour"] == "unknown parameter"


def test_integers_keep_their_exact_value_and_bad_numbers_say_what_is_expected() -> None:
    txt2img = load_catalog(REPO / "workflows").workflows["sd15_txt2img"]
    for seed in (2**64 - 1, 12345678901234567, "12345678901234567"):
        _, prompt = txt2img.build({"prompt": "a cat", "seed": seed})
        assert prompt["3"]["inputs"]["seed"] == int(seed)  # a float would round it
    assert txt2img.validate({"prompt": "a cat", "seed": "1e3", "cfg": "7"})["seed"] == 1000
    with pytest.raises(ParamError) as caught:
        txt2img.build({"prompt": "a cat", "seed": "abc", "steps": 2.5, "cfg": "high"})
    assert caught.value.problems == {"seed": "expected an integer, got 'abc'",
                                     "steps": "expected an integer, got 2.5",
                                     "cfg": "expected a number, got 'high'"}


def test_substitution_happens_in_values_never_in_raw_text(tmp_path: Path) -> None:
    write(tmp_path, "caption.json", {
        "1": {"class_type": "PrimitiveString",
              "inputs": {"value": "a photo of $subject, ${style}"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0], "note": "cost: $$5"}},
    })
    workflow = load_catalog(tmp_path).workflows["caption"]
    hostile = 'x", "3": {"class_type": "Evil"}, "y": "'
    _, prompt = workflow.build({"subject": hostile, "style": "7"})
    assert set(prompt) == {"1", "2"}
    assert prompt["1"]["inputs"]["value"] == f"a photo of {hostile}, 7"
    assert prompt["2"]["inputs"]["note"] == "cost: $5"


def test_each_prompt_is_built_anew_from_an_untouched_template(tmp_path: Path) -> None:
    # A workflow finds its placeholders once and fills them for every job: what one job's
    # prompt (or its service function) changes reaches neither the template nor the next job.
    write(tmp_path, "listed.json", {
        "1": {"class_type": "CLIPTextEncode",
              "inputs": {"text": "$text", "clip": ["4", 1], "note": "fixed"}}})
    workflow = load_catalog(tmp_path).workflows["listed"]
    _, first = workflow.build({"text": "a cat"})
    first["1"]["inputs"]["clip"].append(2)
    first["1"]["inputs"]["note"] = "changed"
    first["2"] = {}
    _, second = workflow.build({"text": "a dog"})
    assert second == {"1": {"class_type": "CLIPTextEncode",
                            "inputs": {"text": "a dog", "clip": ["4", 1], "note": "fixed"}}}
    assert workflow.template["1"]["inputs"] == {"text": "$text", "clip": ["4", 1],
                                                "note": "fixed"}


def test_missing_required_placeholder_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "seeded.json", {"1": {"class_type": "KSampler", "inputs": {"seed": "$seed"}}})
    workflow = load_catalog(tmp_path).workflows["seeded"]
    with pytest.raises(ParamError) as caught:
        workflow.build({})
    assert caught.value.problems == {"seed": "required parameter is missing"}
    _, prompt = workflow.build({"seed": 42})
    assert prompt["1"]["inputs"]["seed"] == 42  # a whole-value placeholder keeps the type


def test_ui_export_and_broken_files_are_reported_without_hiding_the_rest(tmp_path: Path) -> None:
    write(tmp_path, "ui.json", {"nodes": [], "links": [], "version": 0.4})
    (tmp_path / "broken.json").write_text("{not json")
    write(tmp_path, "good.json", {"1": {"class_type": "EmptyImage", "inputs": {}}})
    write(tmp_path, "bad-sidecar.json", {"1": {"class_type": "EmptyImage", "inputs": {}}})
    write(tmp_path, "bad-sidecar.params.json", {"nope": {"type": "int"}})
    catalog = load_catalog(tmp_path)
    assert list(catalog.workflows) == ["good"]
    assert catalog.errors["ui"] == UI_FORMAT_HINT
    assert "not valid JSON" in catalog.errors["broken"]
    assert "'nope' is not used" in catalog.errors["bad-sidecar"]


SCALED = {
    "1": {"class_type": "EmptyImage",
          "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageScale",
          "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 256,
                     "height": 256, "crop": "disabled"}},
    "3": {"class_type": "SaveImage",
          "inputs": {"images": ["2", 0], "filename_prefix": "$prefix"}},
}


def test_a_yaml_sidecar_names_parameters_by_node_and_input(tmp_path: Path) -> None:
    """DESIGN §3: the sidecar names each parameter's node id and input name, so an export
    needs no placeholder at all; placeholders and sidecar entries mix."""
    write(tmp_path, "scaled.json", SCALED)
    (tmp_path / "scaled.params.yaml").write_text(
        "# Which inputs of the export a request sets.\n"
        "size:\n"
        "  node: '2'\n"
        "  input: width\n"
        "  type: int\n"
        "  min: 8\n"
        "  max: 4096\n"
        "  description: Output width\n"
        "method: {node: '2', input: upscale_method, type: enum,\n"
        "         choices: [nearest-exact, bilinear, area, bicubic, lanczos]}\n"
        "color: {node: '1', input: color, type: int, required: true}\n"
        "prefix: {type: string, default: scaled}\n")
    workflow = load_catalog(tmp_path).workflows["scaled"]
    specs = {name: spec.to_json() for name, spec in workflow.params.items()}
    assert set(specs) == {"size", "method", "color", "prefix"}
    # Without a default of its own, an input keeps the value the export has.
    assert specs["size"] == {
        "name": "size", "type": "int", "default": 256, "required": False, "min": 8,
        "max": 4096, "step": None, "choices": None, "description": "Output width",
        "type_source": "sidecar", "type_note": None}
    assert (specs["method"]["type"], specs["method"]["default"]) == ("enum", "bilinear")
    assert (specs["color"]["required"], specs["color"]["default"]) == (True, None)

    values, prompt = workflow.build({"size": "640", "color": 7})
    assert values == {"size": 640, "method": "bilinear", "color": 7, "prefix": "scaled"}
    assert prompt["2"]["inputs"] == {"image": ["1", 0], "upscale_method": "bilinear",
                                     "width": 640, "height": 256, "crop": "disabled"}
    assert prompt["1"]["inputs"]["color"] == 7
    assert prompt["3"]["inputs"]["filename_prefix"] == "scaled"
    with pytest.raises(ParamError) as caught:
        workflow.build({"size": 4, "method": "sharpest"})
    assert set(caught.value.problems) == {"size", "method", "color"}
    assert caught.value.problems["color"] == "required parameter is missing"


@pytest.mark.parametrize(("entry", "says"), [
    ("{node: '9', input: width, type: int}", "node '9'"),
    ("{node: '2', input: sharpness, type: int}", "no input 'sharpness'"),
    ("{node: '2', input: image, type: int}", "a link"),
    ("{node: '2', type: int}", "both node and input"),
])
def test_a_sidecar_entry_naming_a_missing_input_is_reported(
    tmp_path: Path, entry: str, says: str
) -> None:
    write(tmp_path, "scaled.json", SCALED)
    (tmp_path / "scaled.params.yaml").write_text(f"prefix: {{type: string}}\nsize: {entry}\n")
    catalog = load_catalog(tmp_path)
    assert "scaled" not in catalog.workflows
    assert says in catalog.errors["scaled"]
    assert "scaled.params.yaml" in catalog.errors["scaled"]
