"""Node specs (as /object_info reports them) and the simulator's node implementations.

Images travel between nodes as lists of RGB Pillow images (a batch); masks as lists of "L"
images. Blocking work runs where blocking.py decides: small work on the event loop, the rest
in a thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from PIL import Image, ImageChops, ImageFilter, ImageOps, ImageSequence

from comfyfleet.sim import png
from comfyfleet.sim.blocking import Disk, image_work
from comfyfleet.sim.files import Folders, pad_file, save_target

SPEC_FILE = "object_info_modelfree_subset.json"
# The model nodes of real ComfyUI 0.3.64 (from its full /object_info) that the sample SD
# workflows use, and its common loaders: offered only by a server given model files.
MODEL_SPEC_FILE = "object_info_model_nodes.json"
# Each loader and the input naming its model file: the list of files it offers. A loader
# takes the server's `load_seconds` whenever the cache does not hold it, as loading weights
# does; the other model nodes run as pass-throughs.
LOADER_FILE_INPUTS = {"CheckpointLoaderSimple": "ckpt_name", "LoraLoader": "lora_name",
                      "VAELoader": "vae_name", "CLIPLoader": "clip_name",
                      "UNETLoader": "unet_name"}
# The checkpoints the sample SD workflows load (`comfyfleet sim --models` with no list).
SAMPLE_MODELS = ("v1-5-pruned-emaonly-fp16.safetensors", "sd_xl_base_1.0.safetensors")

# The simulator's own node: a pass-through that takes `seconds / speed` and reports `steps`
# progress updates with a small preview image each, standing in for a sampler on a GPU.
SIMULATED_WORK_SPEC: dict[str, Any] = {
    "input": {
        "required": {
            "image": ["IMAGE"],
            "seconds": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 3600.0, "step": 0.01}],
            "steps": ["INT", {"default": 10, "min": 1, "max": 10000}],
        },
        "optional": {"preview": ["BOOLEAN", {"default": True}]},
    },
    "input_order": {"required": ["image", "seconds", "steps"], "optional": ["preview"]},
    "output": ["IMAGE"],
    "output_is_list": [False],
    "output_name": ["IMAGE"],
    "name": "SimulatedWork",
    "display_name": "Simulated Work",
    "description": "Passes the image through after `seconds` (divided by the backend's speed), "
    "reporting `steps` progress updates, each with a preview unless `preview` is false.",
    "python_module": "custom_nodes.comfyfleet_sim",
    "category": "comfyfleet/sim",
    "output_node": False,
}

# The model files SimulatedLoader offers (its combo), as a loader lists what the server has.
SIMULATED_MODELS = [f"model-{letter}.safetensors" for letter in "abcdefgh"]

# The simulator's stand-in for a checkpoint loader: it takes the server's `load_seconds`
# (divided by its speed) whenever the cache does not hold it, as loading weights does.
SIMULATED_LOADER_SPEC: dict[str, Any] = {
    "input": {"required": {"ckpt_name": [SIMULATED_MODELS, {}]}},
    "input_order": {"required": ["ckpt_name"]},
    "output": ["IMAGE"],
    "output_is_list": [False],
    "output_name": ["IMAGE"],
    "name": "SimulatedLoader",
    "display_name": "Simulated Loader",
    "description": "Loads a model: takes the server's load time when it is not cached, and "
    "outputs a small image standing for the model.",
    "python_module": "custom_nodes.comfyfleet_sim",
    "category": "comfyfleet/sim",
    "output_node": False,
}

# A core node missing from the shipped subset, copied from the same server's full /object_info.
PREVIEW_ANY_SPEC: dict[str, Any] = {
    "input": {"required": {"source": ["*", {}]}},
    "input_order": {"required": ["source"]},
    "output": [],
    "output_is_list": [],
    "output_name": [],
    "name": "PreviewAny",
    "display_name": "Preview Any",
    "description": "",
    "python_module": "comfy_extras.nodes_preview_any",
    "category": "utils",
    "output_node": True,
}

# The subset was recorded with the lab's own test package loaded (LabSlowImage, LabFail); a
# plain ComfyUI does not have those nodes, so neither does the simulator.
_LAB_MODULE = "custom_nodes.lab_test_nodes"

# The largest side of SimulatedWork's previews: a few dozen pixels are enough to be an image.
_PREVIEW_SIZE = 8

# Nodes whose `image` input names a file: ComfyUI validates it with VALIDATE_INPUTS (instead of
# the combo list) and re-runs the node whenever the file's hash changes (IS_CHANGED).
IMAGE_FILE_NODES = frozenset({"LoadImage", "LoadImageMask", "LoadImageOutput"})

# PreviewImage's random infix alphabet, sic ("p" twice, no "w"), as in ComfyUI's nodes.py.
_PREVIEW_LETTERS = "abcdefghijklmnopqrstupvxyz"

_RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

_SCALAR_DEFAULTS: dict[str, Any] = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}


def load_specs() -> dict[str, Any]:
    """All node specs by class name: the shipped ComfyUI subset, PreviewAny, SimulatedWork and
    SimulatedLoader."""
    recorded = _recorded(SPEC_FILE)
    specs = {name: spec for name, spec in recorded.items() if spec["python_module"] != _LAB_MODULE}
    specs["PreviewAny"] = PREVIEW_ANY_SPEC
    specs["SimulatedWork"] = SIMULATED_WORK_SPEC
    specs["SimulatedLoader"] = SIMULATED_LOADER_SPEC
    return specs


def model_specs(files: Sequence[str]) -> dict[str, Any]:
    """The model nodes' specs (MODEL_SPEC_FILE) of a server that has `files`: every loader
    lists them all as its choices (VAELoader before its own "pixel_space", as ComfyUI's)."""
    specs = _recorded(MODEL_SPEC_FILE)
    for class_type, name in LOADER_FILE_INPUTS.items():
        choices = specs[class_type]["input"]["required"][name][0]
        choices[:0] = list(files)
    return specs


def _recorded(file: str) -> dict[str, Any]:
    text = resources.files("comfyfleet.sim").joinpath(file).read_text(encoding="utf-8")
    specs: dict[str, Any] = json.loads(text)
    return specs


def declared_inputs(spec: dict[str, Any]) -> list[tuple[str, str, list[Any]]]:
    """(name, "required"/"optional", [type, options...]) in the spec's declared order."""
    found = []
    for category in ("required", "optional"):
        for name, config in spec["input"].get(category, {}).items():
            found.append((name, category, config))
    return found


@dataclass
class NodeContext:
    """What a node may use besides its inputs."""

    node_id: str  # hidden input UNIQUE_ID
    folders: Folders
    disk: Disk  # runs the file operations
    prompt: dict[str, Any]  # hidden input PROMPT, written into saved PNGs
    extra_pnginfo: Any  # hidden input EXTRA_PNGINFO
    speed: float
    load_seconds: float  # what a loader (SimulatedLoader, LOADER_FILE_INPUTS) takes at speed 1
    output_size: int | None  # pad every saved image file to this many bytes
    sleep: Callable[[float], Awaitable[None]]  # returns early when interrupted
    # (value, max, PNG preview or None); raises when interrupted.
    progress: Callable[[int, int, bytes | None], Awaitable[None]]
    show_text: Callable[[str], None]  # the text shown under the node (binary TEXT frame)


Outputs = tuple[Any, ...]
UI = dict[str, Any] | None
NodeFunction = Callable[[NodeContext, dict[str, Any]], Awaitable[tuple[Outputs, UI]]]


async def run_node(
    class_type: str, spec: dict[str, Any], ctx: NodeContext, inputs: dict[str, Any]
) -> tuple[Outputs, UI]:
    impl = _IMPLEMENTATIONS.get(class_type)
    if impl is None:
        if class_type in LOADER_FILE_INPUTS:
            await ctx.sleep(ctx.load_seconds / ctx.speed)
        return _passthrough(spec, inputs), None
    return await impl(ctx, inputs)


def _passthrough(spec: dict[str, Any], inputs: dict[str, Any]) -> Outputs:
    """Stand-in for nodes without a simulation: the first IMAGE input (or a tiny image)."""
    image_inputs = [
        inputs[name]
        for name, _, config in declared_inputs(spec)
        if config[0] == "IMAGE" and name in inputs
    ]
    outputs: list[Any] = []
    for output_type in spec["output"]:
        if output_type == "IMAGE":
            outputs.append(image_inputs[0] if image_inputs else [Image.new("RGB", (64, 64))])
        elif output_type == "MASK":
            outputs.append([Image.new("L", (64, 64))])
        else:
            outputs.append(_SCALAR_DEFAULTS.get(output_type))
    return tuple(outputs)


def _pixels(images: list[Image.Image]) -> int:
    return sum(image.width * image.height for image in images)


def _each(images: list[Image.Image], fn: Callable[[Image.Image], Image.Image]) -> list[Any]:
    return [fn(image) for image in images]


async def _empty_image(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    color, size = i["color"], (i["width"], i["height"])
    rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
    image = await image_work(size[0] * size[1], Image.new, "RGB", size, rgb)
    # The batch shares one image: nodes never modify an image in place.
    return ([image] * i["batch_size"],), None


async def _image_invert(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    # ImageChops.invert computes what ImageOps.invert does (255 - value) in C, 25x faster.
    images = i["image"]
    return (await image_work(_pixels(images), _each, images, ImageChops.invert),), None


def _scale(image: Image.Image, method: str, width: int, height: int, crop: str) -> Image.Image:
    old_w, old_h = image.size
    if width == 0 and height == 0:
        return image
    if width == 0:
        width = max(1, round(old_w * height / old_h))
    elif height == 0:
        height = max(1, round(old_h * width / old_w))
    if crop == "center":
        # comfy.utils.common_upscale: cut the excess of the longer side equally on both ends.
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        image = image.crop((x, y, old_w - x, old_h - y))
    return image.resize((width, height), _RESAMPLE[method])


async def _image_scale(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    def scale(image: Image.Image) -> Image.Image:
        return _scale(image, i["upscale_method"], i["width"], i["height"], i["crop"])

    return (await asyncio.to_thread(_each, i["image"], scale),), None


async def _image_scale_by(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    def scale(image: Image.Image) -> Image.Image:
        width, height = round(image.width * i["scale_by"]), round(image.height * i["scale_by"])
        return _scale(image, i["upscale_method"], width, height, "disabled")

    return (await asyncio.to_thread(_each, i["image"], scale),), None


async def _image_blur(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    # ComfyUI convolves with a (2 * blur_radius + 1) gaussian kernel of `sigma`; Pillow's
    # gaussian blur with that sigma is close enough for a simulator.
    blur = ImageFilter.GaussianBlur(i["sigma"])
    return (await asyncio.to_thread(_each, i["image"], lambda im: im.filter(blur)),), None


def _load_image(path: str) -> tuple[list[Image.Image], list[Image.Image]]:
    images: list[Image.Image] = []
    masks: list[Image.Image] = []
    with Image.open(path) as img:  # a corrupt file raises PIL.UnidentifiedImageError here
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            rgb = frame.convert("RGB")
            if images and rgb.size != images[0].size:
                continue  # ComfyUI skips frames whose size differs from the first one
            images.append(rgb)
            if "A" in frame.getbands():
                masks.append(ImageOps.invert(frame.getchannel("A")))
            else:
                masks.append(Image.new("L", (64, 64)))
    return images, masks


async def _load_image_node(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    path = ctx.folders.image_input_path(i["image"])
    if path is None:
        raise FileNotFoundError(i["image"])
    images, masks = await asyncio.to_thread(_load_image, path)
    return (images, masks), None


def _encode_all(images: list[Image.Image], compress_level: int) -> list[bytes]:
    return [png.encode(image, compress_level) for image in images]


def _write_images(
    encoded: list[bytes],
    size: tuple[int, int],
    prefix: str,
    directory: str,
    dir_type: str,
    ctx: NodeContext,
) -> list[dict[str, str]]:
    target = save_target(prefix, directory, *size)
    text = [("prompt", json.dumps(ctx.prompt))]
    if ctx.extra_pnginfo is not None:
        text += [(key, json.dumps(ctx.extra_pnginfo[key])) for key in ctx.extra_pnginfo]
    chunks = png.text_chunks(text)
    results = []
    for batch_number, image_png in enumerate(encoded):
        name = target.base.replace("%batch_num%", str(batch_number))
        filename = f"{name}_{target.counter + batch_number:05}_.png"
        path = os.path.join(target.folder, filename)
        with open(path, "wb") as f:
            f.write(png.with_chunks(image_png, chunks))
        if ctx.output_size is not None:
            pad_file(path, ctx.output_size)
        results.append({"filename": filename, "subfolder": target.subfolder, "type": dir_type})
    return results


async def _save_images(
    images: list[Image.Image],
    prefix: str,
    directory: str,
    dir_type: str,
    compress_level: int,
    ctx: NodeContext,
) -> UI:
    encoded = await image_work(_pixels(images), _encode_all, images, compress_level)
    written = sum(map(len, encoded))
    size = images[0].size
    results = await ctx.disk.run(
        written, _write_images, encoded, size, prefix, directory, dir_type, ctx
    )
    return {"images": results}


async def _save_image(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    prefix = i["filename_prefix"]
    return (), await _save_images(i["images"], prefix, ctx.folders.output, "output", 4, ctx)


async def _preview_image(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    prefix = "ComfyUI_temp_" + "".join(random.choice(_PREVIEW_LETTERS) for _ in range(5))
    return (), await _save_images(i["images"], prefix, ctx.folders.temp, "temp", 1, ctx)


def _small_png(image: Image.Image) -> bytes:
    small = image.copy()
    small.thumbnail((_PREVIEW_SIZE, _PREVIEW_SIZE))
    return png.encode(small, 1)  # ComfyUI's compression of preview frames


async def _simulated_work(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    loop = asyncio.get_running_loop()
    total, steps = i["seconds"] / ctx.speed, i["steps"]
    first, preview = i["image"][0], None
    if i.get("preview", True):
        preview = await image_work(_pixels([first]), _small_png, first)
    start = loop.time()
    for step in range(1, steps + 1):
        # Deadlines from the start, so the sleeps' overshoot does not add up over many steps.
        await ctx.sleep(start + total * step / steps - loop.time())
        await ctx.progress(step, steps, preview)
    return (i["image"],), None


async def _simulated_loader(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    await ctx.sleep(ctx.load_seconds / ctx.speed)
    return ([Image.new("RGB", (_PREVIEW_SIZE, _PREVIEW_SIZE))],), None


async def _save_image_websocket(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    """Each image as a preview frame with its progress update; no file, no UI."""
    images = i["images"]
    for step, image in enumerate(images):
        encoded = await image_work(_pixels([image]), png.encode, image, 1)
        await ctx.progress(step, len(images), encoded)
    return (), None


async def _get_image_size(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    images = i["image"]
    width, height, batch = images[0].width, images[0].height, len(images)
    ctx.show_text(f"width: {width}, height: {height}\n batch size: {batch}")
    return (width, height, batch), None


async def _preview_any(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    """The value as text, like ComfyUI's PreviewAny: strings as they are, scalars via str(),
    anything else as JSON or, failing that, str()."""
    source = i.get("source")
    if isinstance(source, str):
        value = source
    elif isinstance(source, int | float | bool):
        value = str(source)
    elif source is None:
        value = "None"
    else:
        try:
            value = json.dumps(source)
        except (TypeError, ValueError):
            value = str(source)
    return (), {"text": [value]}


async def _primitive(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    return (i["value"],), None


async def _string_concatenate(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    return (i["delimiter"].join((i["string_a"], i["string_b"])),), None


async def _regex_replace(ctx: NodeContext, i: dict[str, Any]) -> tuple[Outputs, UI]:
    """As ComfyUI's (comfy_extras/nodes_string.py): `re.sub`, so the replacement's escapes
    are expanded (`\\0` is a NUL character)."""
    flags = (re.IGNORECASE if i.get("case_insensitive", True) else 0) \
        | (re.MULTILINE if i.get("multiline", False) else 0) \
        | (re.DOTALL if i.get("dotall", False) else 0)
    return (re.sub(i["regex_pattern"], i["replace"], i["string"], count=i.get("count", 0),
                   flags=flags),), None


_IMPLEMENTATIONS: dict[str, NodeFunction] = {
    "PrimitiveInt": _primitive,
    "PrimitiveString": _primitive,
    "StringConcatenate": _string_concatenate,
    "RegexReplace": _regex_replace,
    "EmptyImage": _empty_image,
    "ImageInvert": _image_invert,
    "ImageScale": _image_scale,
    "ImageScaleBy": _image_scale_by,
    "ImageBlur": _image_blur,
    "LoadImage": _load_image_node,
    "LoadImageOutput": _load_image_node,
    "SaveImage": _save_image,
    "PreviewImage": _preview_image,
    "SaveImageWebsocket": _save_image_websocket,
    "GetImageSize": _get_image_size,
    "PreviewAny": _preview_any,
    "SimulatedWork": _simulated_work,
    "SimulatedLoader": _simulated_loader,
}
