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
