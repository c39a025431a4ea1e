"""Every kind of output a ComfyUI history entry reports is collected, with its type."""

from __future__ import annotations

from comfyfleet.comfy.prompts import OutputFile, OutputText, output_items
from comfyfleet.storage import content_type_for, output_key

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
