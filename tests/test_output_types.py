"""Every kind of output a ComfyUI history entry reports is collected, with its type."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from comfyfleet.app import serving
from comfyfleet.comfy.prompts import OutputFile, OutputText, output_items
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from comfyfleet.storage import content_type_for, output_key
from tests.support import wait_for_job

# Shapes of real nodes' UI output: SaveImage, SaveAnimatedWEBP, VHS_VideoCombine ("gifs"),
# SaveAudio, Save3D-style nodes, PreviewAny; plus keys that are not files.
HISTORY_OUTPUTS = {
    "9": {"images": [{"filename": "a_00001_.png", "subfolder": "comfyfleet/p", "type": "output"},
                     {"filename": "a_00002_.png", "subfolder": "comfyfleet/p", "type": "output"}]},
    "12": {"images": [{"filename": "anim_00001_.webp", "subfolder": "", "type": "output"}],
           "animated": [True]},
    "20": {"gifs": [{"filename": "clip_00001.mp4", "subfolder": "", "type": "output",
                     "format": "video/h264-mp4", "frame_rate": 8.0}]},
    "30": {"audio": [{"filename": "voice_00001_.flac", "subfolder": "audio", "type": "output"}]},
    "40": {"3d": [{"filename": "mesh_00001_.glb", "subfolder": "", "type": "output"}]},
    "50": {"text": ["a caption", "another"]},
    "60": {"images": [{"filename": "ComfyUI_temp_abcde_00001_.png", "subfolder": "",
                       "type": "temp"}]},
    "70": None,
}


def test_files_of_every_ui_key_and_text_values_are_collected() -> None:
    files, texts = output_items(HISTORY_OUTPUTS)
    assert [(f.node_id, f.filename) for f in files] == [
        ("9", "a_00001_.png"), ("9", "a_00002_.png"), ("12", "anim_00001_.webp"),
        ("20", "clip_00001.mp4"), ("30", "voice_00001_.flac"), ("40", "mesh_00001_.glb"),
        ("60", "ComfyUI_temp_abcde_00001_.png"),
    ]
    assert files[4] == OutputFile("30", "voice_00001_.flac", "audio", "output")
    assert files[-1].type == "temp"
    assert texts == [OutputText("50", "a caption"), OutputText("50", "another")]


def test_content_types_and_keys_follow_the_file() -> None:
    assert [content_type_for(name) for name in (
        "a.png", "anim.webp", "clip.mp4", "voice.flac", "x.gif", "mesh.glb", "noext")] == [
        "image/png", "image/webp", "video/mp4", "audio/flac", "image/gif", "model/gltf-binary",
        "application/octet-stream"]
    assert output_key("out/", "job-1", "20", 0, "clip_00001.MP4") == "out/job-1/20_0.mp4"
    # Names from a backend are not trusted: only a short extension survives.
    assert output_key("", "job-1", "9", 1, "../../etc/passwd") == "job-1/9_1"
    assert output_key("", "job-1", "../x", 0, "a.png") == "job-1/___x_0.png"


# A text output holding NUL, made on the backend (RegexReplace expands the replacement's
# `\0`): PostgreSQL's jsonb cannot hold \u0000, so such a text is stored as a file, its
# bytes intact, like a file output.
NUL_CAPTION = {
    "1": {"class_type": "RegexReplace",
          "inputs": {"string": "before@after é", "regex_pattern": "@", "replace": "\\0"}},
    "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    "3": {"class_type": "PrimitiveString", "inputs": {"value": "plain"}},
    "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
}


async def test_a_text_output_with_nul_is_stored_as_a_file_with_its_bytes_intact(
    settings: Settings, workflows: Path,
) -> None:
    (workflows / "nul_caption.json").write_text(json.dumps(NUL_CAPTION))
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            api = base + settings.route_prefix
            async with http.post(f"{api}/jobs", json={"workflow": "nul_caption"}) as response:
                assert response.status == 202, await response.text()
                job_id = (await response.json())["id"]
            job = await wait_for_job(http, api, job_id, "succeeded")
            outputs = {output["node_id"]: output for output in job["outputs"]}
            assert outputs["4"]["text"] == "plain"  # a text jsonb holds stays inline
            nul = outputs["2"]
            assert "text" not in nul
            assert nul["content_type"] == "text/plain; charset=utf-8"
            assert nul["size"] == len("before\u0000after é".encode())
            index = job["outputs"].index(nul)
            async with http.get(f"{api}/jobs/{job_id}/outputs/{index}") as response:
                assert response.status == 200
                assert await response.read() == "before\u0000after é".encode()
            v2 = f"{base}/api/v2"
            async with http.get(f"{v2}/jobs/{job_id}") as response:
                assets = (await response.json())["outputs"]
            [asset] = [a for a in assets if a["node_id"] == "2"]
            assert (asset["type"], asset["size_bytes"]) == ("text", nul["size"])
