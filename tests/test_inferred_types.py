"""Drop-in workflows get their types from the fleet: a `$placeholder` that is the whole value of
a node input takes that input's type, range and choices from the backends' /object_info (here
the /object_info recorded from a real ComfyUI 0.3.64, served by the simulator); one inside a
longer string is a string; a sidecar wins where it says something."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfyfleet.app import serving
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from comfyfleet.workflows.catalog import Workflow, load_catalog
from comfyfleet.workflows.inference import NOT_KNOWN_YET, NodeInputs
from comfyfleet.workflows.params import ParamError
from tests.model_sim import FULL_OBJECT_INFO
from tests.support import free_ports

# A text-to-image graph as ComfyUI exports it, with placeholders where requests fill values.
TXT2IMG: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "$checkpoint"}},
    "6": {"class_type": "CLIPTextEncode",
          "inputs": {"text": "a photo of ${subject}, highly detailed", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage",
          "inputs": {"width": "$width", "height": "$width", "batch_size": 1}},
    "3": {"class_type": "KSampler", "inputs": {
        "seed": "$seed", "steps": "$steps", "cfg": "$cfg", "sampler_name": "$sampler",
        "scheduler": "normal", "denoise": "$denoise", "model": ["4", 0],
        "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "$prefix",
                                                "images": ["8", 0]}},
}

# Model-free, so the simulator runs it: a blurred, scaled empty image.
BLUR: dict[str, Any] = {
    "1": {"class_type": "EmptyImage",
          "inputs": {"width": "$width", "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageBlur",
          "inputs": {"image": ["1", 0], "blur_radius": "$radius", "sigma": "$sigma"}},
    "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "$method",
                                                 "width": 0, "height": 32, "crop": "disabled"}},
    "4": {"class_type": "SaveImage",
          "inputs": {"images": ["3", 0], "filename_prefix": "blur_$tag"}},
}


def real_object_info(checkpoints: list[str] | None = None) -> dict[str, Any]:
    """The recorded /object_info, with these files in the checkpoints folder."""
    info: dict[str, Any] = json.loads(FULL_OBJECT_INFO.read_text())
    info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] = checkpoints or []
    return info


def drop_in(directory: Path, name: str, template: dict[str, Any],
            sidecar: dict[str, Any] | None = None) -> None:
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(template))
    if sidecar is not None:
        (directory / f"{name}.params.json").write_text(json.dumps(sidecar))


def loaded(directory: Path, name: str, *object_infos: dict[str, Any]) -> Workflow:
    """The workflow as the catalog types it once backends with these /object_info reported."""
    catalog = load_catalog(directory)
    assert catalog.errors == {}
    for index, info in enumerate(object_infos):
        catalog.backend_reported(f"gpu{index}", NodeInputs.from_object_info(info))
    return catalog.workflows[name]


def problems(workflow: Workflow, given: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ParamError) as caught:
        workflow.validate(given)
    return caught.value.problems


def test_drop_in_parameters_take_the_types_of_the_inputs_they_fill(tmp_path: Path) -> None:
    drop_in(tmp_path, "txt2img", TXT2IMG)
    workflow = loaded(tmp_path, "txt2img", real_object_info(["sd15.safetensors"]))
    params = {name: spec.to_json() for name, spec in workflow.params.items()}
    assert list(params) == ["checkpoint", "subject", "width", "seed", "steps", "cfg", "sampler",
                            "denoise", "prefix"]
    assert workflow.types_known
    assert {name: p["type"] for name, p in params.items()} == {
        "checkpoint": "enum", "subject": "string", "width": "int", "seed": "int",
        "steps": "int", "cfg": "float", "sampler": "enum", "denoise": "float",
        "prefix": "string"}
    assert params["checkpoint"]["choices"] == ["sd15.safetensors"]
    assert (params["subject"]["type_source"], params["subject"]["type_note"]) == (
        "template", "used inside a longer string")
    assert params["width"] | {"type_note": ""} == {
        "name": "width", "type": "int", "default": None, "required": True, "min": 16,
        "max": 16384, "step": 8, "choices": None, "description": "",
        "type_source": "object_info", "type_note": ""}
    assert params["width"]["type_note"] == ("from EmptyLatentImage.width (node 5), "
                                            "EmptyLatentImage.height (node 5)")
    assert (params["seed"]["min"], params["seed"]["max"]) == (0, 2**64 - 1)
    assert (params["cfg"]["min"], params["cfg"]["max"], params["cfg"]["step"]) == (0, 100, 0.1)
    assert "dpmpp_2m" in params["sampler"]["choices"]
    assert params["prefix"]["type_source"] == "object_info"  # SaveImage.filename_prefix STRING

    good = {"checkpoint": "sd15.safetensors", "subject": "a lighthouse", "width": "512",
            "seed": 2**64 - 1, "steps": 20, "cfg": 7, "sampler": "euler", "denoise": 0.6,
            "prefix": "x"}
    _, prompt = workflow.build(good)
    assert prompt["3"]["inputs"]["seed"] == 2**64 - 1  # exact, not through a float
    assert (prompt["5"]["inputs"]["width"], prompt["3"]["inputs"]["cfg"]) == (512, 7.0)
    assert prompt["6"]["inputs"]["text"] == "a photo of a lighthouse, highly detailed"
    found = problems(workflow, {**good, "steps": "abc", "cfg": 100.5, "sampler": "warp",
                                "width": 8, "denoise": "x", "subject": 7, "checkpoint": "x.ckpt",
                                "seed": -1})
    assert found == {
        "steps": "expected an integer, got 'abc'", "cfg": "must be at most 100.0",
        "width": "must be at least 16", "denoise": "expected a number, got 'x'",
        "subject": "expected a string, got 7", "checkpoint": "must be one of ['sd15.safetensors']",
        "seed": "must be at least 0",
        "sampler": found["sampler"]}
    assert found["sampler"].startswith("must be one of ['euler', 'euler_cfg_pp', ")
    assert found["sampler"].endswith(" more")  # the first choices, not all of them


def test_images_booleans_and_what_cannot_be_typed(tmp_path: Path) -> None:
    drop_in(tmp_path, "misc", {
        "1": {"class_type": "LoadImage", "inputs": {"image": "$picture"},
              "_meta": {"title": "$title"}},
        "2": {"class_type": "PrimitiveBoolean", "inputs": {"value": "$flag"}},
        "3": {"class_type": "NoSuchNode", "inputs": {"x": "$custom"}},
        "4": {"class_type": "ImageInvert", "inputs": {"image": "$linked", "nope": "$absent"}},
        "5": {"class_type": "PrimitiveInt", "inputs": {"value": "$number"}},
        "6": {"class_type": "PrimitiveString", "inputs": {"value": "$number"}},
    })
    workflow = loaded(tmp_path, "misc", real_object_info())
    params = workflow.params
    assert params["picture"].type == "image"  # uploaded to the backend that runs the job
    assert params["flag"].type == "bool"
    untyped = {name: (spec.type, spec.source, spec.note) for name, spec in params.items()
               if name not in ("picture", "flag")}
    assert untyped == {
        "title": ("any", None, "not the whole value of a node input"),
        "custom": ("any", None, "no backend has node class NoSuchNode"),
        "linked": ("any", None, "ImageInvert.image takes a link, not a value"),
        "absent": ("any", None, "ImageInvert has no input nope"),
        "number": ("any", None, "its inputs take different types: PrimitiveInt.value (node 5), "
                                "PrimitiveString.value (node 6)"),
    }
    assert not workflow.types_known
    assert workflow.validate({"picture": "https://example.com/a.png", "flag": "true",
                              "title": 1, "custom": 2, "linked": 3, "absent": 4,
                              "number": 5})["flag"] is True
    assert problems(workflow, {"picture": "x", "flag": "maybe", "title": 1, "custom": 2,
                               "linked": 3, "absent": 4, "number": 5}) == {
        "flag": "expected true or false, got 'maybe'"}


def test_a_placeholder_in_several_inputs_takes_a_type_that_suits_them_all(
    tmp_path: Path,
) -> None:
    drop_in(tmp_path, "shared", {
        "1": {"class_type": "EmptyImage", "inputs": {"width": "$size", "height": "$size",
                                                     "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScale", "inputs": {
            "image": ["1", 0], "upscale_method": "bilinear", "width": "$size", "height": 0,
            "crop": "$crop"}},
        "3": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": "$blur",
                                                    "sigma": "$blur"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0],
                                                    "filename_prefix": "$crop"}},
    })
    params = loaded(tmp_path, "shared", real_object_info()).params
    # EmptyImage takes 1..16384, ImageScale 0..16384: both hold for 1..16384.
    assert (params["size"].type, params["size"].minimum, params["size"].maximum) == (
        "int", 1, 16384)
    # An integer suits INT 1..31 and FLOAT 0.1..10.
    assert (params["blur"].type, params["blur"].minimum, params["blur"].maximum) == (
        "int", 1, 10.0)
    # A combo's choice suits a STRING input too.
    assert (params["crop"].type, params["crop"].choices) == ("enum", ("disabled", "center"))


def test_a_sidecar_wins_where_it_says_something(tmp_path: Path) -> None:
    drop_in(tmp_path, "txt2img", TXT2IMG, {
        "steps": {"max": 50, "default": 20},
        "cfg": {"description": "How closely to follow the prompt"},
        "sampler": {"type": "enum", "choices": ["euler", "heun"], "default": "euler"},
        "width": {"type": "string"},
        "checkpoint": {"type": "any"},
    })
    params = loaded(tmp_path, "txt2img", real_object_info(["sd15.safetensors"])).params
    steps = params["steps"]
    assert (steps.type, steps.minimum, steps.maximum, steps.default, steps.required,
            steps.source) == ("int", 1, 50, 20, False, "object_info")
    cfg = params["cfg"]
    assert (cfg.type, cfg.minimum, cfg.maximum, cfg.description) == (
        "float", 0, 100, "How closely to follow the prompt")
    assert (params["sampler"].choices, params["sampler"].source) == (("euler", "heun"),
                                                                     "sidecar")
    # Another type than the input's: the sidecar alone, no range of the node's.
    width = params["width"]
    assert (width.type, width.minimum, width.source) == ("string", None, "sidecar")
    assert (params["checkpoint"].type, params["checkpoint"].choices) == ("any", ())


def test_backends_that_differ_are_merged_and_a_removed_one_is_forgotten(
    tmp_path: Path,
) -> None:
    drop_in(tmp_path, "txt2img", TXT2IMG)
    model_free = json.loads(FULL_OBJECT_INFO.with_name(
        "object_info_modelfree_subset.json").read_text())
    catalog = load_catalog(tmp_path)
    catalog.backend_reported("cpu", NodeInputs.from_object_info(model_free))
    assert catalog.workflows["txt2img"].params["steps"].note == (
        "no backend has node class KSampler")
    catalog.backend_reported("gpu-b", NodeInputs.from_object_info(real_object_info(["b.ckpt"])))
    catalog.backend_reported("gpu-a", NodeInputs.from_object_info(real_object_info(["a.ckpt"])))
    params = catalog.workflows["txt2img"].params
    # The first backend (by name) that has the node describes it; a choice of any is valid.
    assert params["checkpoint"].choices == ("a.ckpt", "b.ckpt")
    assert (params["steps"].type, params["steps"].maximum) == ("int", 10000)
    catalog.backend_removed("gpu-a")
    assert catalog.workflows["txt2img"].params["checkpoint"].choices == ("b.ckpt",)
    catalog.backend_removed("gpu-b")
    assert catalog.workflows["txt2img"].params["steps"].type == "any"


def test_types_are_not_known_before_a_backend_reports(tmp_path: Path) -> None:
    drop_in(tmp_path, "blur", BLUR)
    workflow = load_catalog(tmp_path).workflows["blur"]
    assert not workflow.types_known
    assert workflow.params["radius"].note == NOT_KNOWN_YET
    assert workflow.params["tag"].type == "string"  # inside a longer string: known already


# --- over real sockets: the service, with simulated ComfyUI servers as its backends ----------


@asynccontextmanager
async def service(settings: Settings, directory: Path, *sims: SimulatedComfyUI,
                  ) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    settings.workflows_dir = directory
    settings.comfyui_endpoints = [f"{sim.url}#{sim.name}" for sim in sims]
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        yield http, base + settings.route_prefix


async def call(http: aiohttp.ClientSession, method: str, url: str,
               body: Any = None) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as response:
        return response.status, await response.json()


async def params_schema(http: aiohttp.ClientSession, prefix: str, route_prefix: str,
                        workflow: str) -> Any:
    """The schema of `params` in the workflow's typed endpoint, from /openapi.json."""
    status, schema = await call(http, "GET", prefix.removesuffix(route_prefix) + "/openapi.json")
    assert status == 200
    operation = schema["paths"][f"{route_prefix}/workflows/{workflow}/jobs"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    return body["properties"]["params"]


async def until_connected(http: aiohttp.ClientSession, prefix: str, count: int) -> None:
    async with asyncio.timeout(30):
        while True:
            _, backends = await call(http, "GET", f"{prefix}/backends")
            if sum(backend["healthy"] for backend in backends) == count:
                return
            await asyncio.sleep(0.05)  # polling the API: nothing local to wait on


async def test_bad_values_are_422_naming_the_parameter_and_the_schema_shows_the_types(
    settings: Settings, tmp_path: Path,
) -> None:
    directory = tmp_path / "workflows"
    drop_in(directory, "blur", BLUR)
    sim = SimulatedComfyUI(name="real", node_specs=real_object_info())
    async with sim, service(settings, directory, sim) as (http, prefix):
        await until_connected(http, prefix, 1)
        good: dict[str, Any] = {"width": 48, "radius": 3, "sigma": 1.5, "method": "bicubic",
                                "tag": "t"}
        cases: list[tuple[dict[str, Any], str]] = [
            ({"radius": "abc"}, "expected an integer, got 'abc'"),
            ({"radius": 32}, "must be at most 31"),
            ({"sigma": "soft"}, "expected a number, got 'soft'"),
            ({"sigma": 0.05}, "must be at least 0.1"),
            ({"method": "cubic"}, "must be one of ['nearest-exact', 'bilinear', 'area', "
                                  "'bicubic', 'lanczos']"),
            ({"width": 0}, "must be at least 1"),
            ({"tag": {"nodes": 1}}, "expected a string, got {'nodes': 1}"),
        ]
        for bad, expected in cases:
            for url, body in [(f"{prefix}/workflows/blur/jobs", {"params": {**good, **bad}}),
                              (f"{prefix}/jobs", {"workflow": "blur",
                                                  "params": {**good, **bad}})]:
                status, answer = await call(http, "POST", url, body)
                (name,) = bad
                assert (status, answer["error"]["type"]) == (422, "invalid_params"), answer
                assert answer["error"]["params"] == {name: expected}
                assert f"{name}: {expected}" in answer["error"]["message"]

        status, job = await call(http, "POST", f"{prefix}/workflows/blur/jobs?wait=30",
                                 {"params": {**good, "radius": "5"}})
        assert (status, job["status"]) == (202, "succeeded"), job
        assert job["params"]["radius"] == 5

        status, described = await call(http, "GET", f"{prefix}/workflows/blur")
        assert (status, described["types_known"]) == (200, True)
        radius = next(p for p in described["params"] if p["name"] == "radius")
        assert radius == {"name": "radius", "type": "int", "default": None, "required": True,
                          "min": 1, "max": 31, "step": 1, "choices": None, "description": "",
                          "type_source": "object_info",
                          "type_note": "from ImageBlur.blur_radius (node 2)"}

        params = await params_schema(http, prefix, settings.route_prefix, "blur")
        assert params["properties"] == {
            "width": {"type": "integer", "minimum": 1, "maximum": 16384},
            "radius": {"type": "integer", "minimum": 1, "maximum": 31},
            "sigma": {"type": "number", "minimum": 0.1, "maximum": 10.0},
            "method": {"enum": ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]},
            "tag": {"type": "string"},
        }
        assert params["required"] == ["width", "radius", "sigma", "method", "tag"]

        drop_in(directory, "blur_again", BLUR)
        status, reloaded = await call(http, "POST", f"{prefix}/workflows/reload")
        again = next(w for w in reloaded["workflows"] if w["name"] == "blur_again")
        assert again["types_known"] is True  # read again, typed by what the fleet reported


async def test_several_backends_type_what_any_of_them_has(
    settings: Settings, tmp_path: Path,
) -> None:
    directory = tmp_path / "workflows"
    drop_in(directory, "txt2img", TXT2IMG)
    sims = [SimulatedComfyUI(name="cpu"),
            SimulatedComfyUI(name="gpu-a", models=["a.safetensors"]),
            SimulatedComfyUI(name="gpu-b", models=["b.safetensors"])]
    async with sims[0], sims[1], sims[2], service(settings, directory, *sims) as (http, prefix):
        await until_connected(http, prefix, 3)
        status, described = await call(http, "GET", f"{prefix}/workflows/txt2img")
        params = {p["name"]: p for p in described["params"]}
        assert params["checkpoint"]["choices"] == ["a.safetensors", "b.safetensors"]
        assert (params["steps"]["type"], params["steps"]["max"]) == ("int", 10000)
        assert sorted(described["backends"]) == ["gpu-a", "gpu-b"]
        good = {"checkpoint": "b.safetensors", "subject": "a cat", "width": 64, "seed": 1,
                "steps": 2, "cfg": 7.5, "sampler": "euler", "denoise": 1, "prefix": "cat"}
        status, job = await call(http, "POST", f"{prefix}/workflows/txt2img/jobs?wait=30",
                                 {"params": good})
        assert (status, job["status"], job["backend"]) == (202, "succeeded", "gpu-b"), job
        status, answer = await call(http, "POST", f"{prefix}/workflows/txt2img/jobs",
                                    {"params": {**good, "checkpoint": "c.safetensors"}})
        assert (status, answer["error"]["params"]) == (422, {
            "checkpoint": "must be one of ['a.safetensors', 'b.safetensors']"})


async def test_types_not_known_until_a_backend_connects_then_typed_at_once(
    settings: Settings, tmp_path: Path,
) -> None:
    directory = tmp_path / "workflows"
    drop_in(directory, "blur", BLUR)
    sim = SimulatedComfyUI(name="late", port=free_ports(1), node_specs=real_object_info())
    async with service(settings, directory, sim) as (http, prefix):
        status, described = await call(http, "GET", f"{prefix}/workflows/blur")
        assert (status, described["types_known"]) == (200, False)
        radius = next(p for p in described["params"] if p["name"] == "radius")
        assert (radius["type"], radius["type_source"], radius["type_note"]) == (
            "any", None, NOT_KNOWN_YET)
        params = await params_schema(http, prefix, settings.route_prefix, "blur")
        assert params["properties"]["radius"] == {
            "description": f"Type not known ({NOT_KNOWN_YET})"}
        async with sim:
            await until_connected(http, prefix, 1)
            # No wait beyond the backend being up: its /object_info was handed over first.
            status, described = await call(http, "GET", f"{prefix}/workflows/blur")
            assert described["types_known"] is True
            status, answer = await call(http, "POST", f"{prefix}/workflows/blur/jobs", {
                "params": {"width": 8, "radius": "abc", "sigma": 1, "method": "area",
                           "tag": "x"}})
            assert (status, answer["error"]["params"]) == (422, {
                "radius": "expected an integer, got 'abc'"})
