"""`comfyfleet workflows import-seed`: a ComfyUI-server checkout's workflows become workflow
files, and what cannot be converted is said, with why.

The checkout is `tests/fixtures/comfyui-server/`, written the way ComfyUI-server's README shows:
text2img with `$text` (and a bare `$seed`), img2img with `$text` and `$image` and the image
upload in its service function, one service function with logic of its own, and the file
cleaner's prompt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from comfyfleet.cli.main import main
from comfyfleet.workflows.api_format import WorkflowError
from comfyfleet.workflows.catalog import load_catalog
from comfyfleet.workflows.seed_import import (
    Fixed,
    Param,
    Upload,
    read_services,
    template_to_json,
)

SEED = Path(__file__).resolve().parent / "fixtures" / "comfyui-server"


def _import(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(["workflows", "import-seed", *args])
    code = exited.value.code
    return code if isinstance(code, int) else 1, capsys.readouterr().out


def test_converts_the_readme_templates_and_says_what_it_cannot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _import([str(SEED), "--out", str(tmp_path)], capsys)
    lines = {line.split(":")[0]: line for line in report.splitlines()}
    assert code == 1  # upscale is not converted
    assert lines["OK   text2img"] and lines["OK   img2img"]
    assert "seed (int, default 42)" in report
    assert "image (image: base64 as before" in report
    failed = lines["FAIL upscale"]
    assert "does more than substitute values" in failed
    assert "line 43: chooses by a parameter (params.get('quality') == 'high')" in failed
    assert "workflows/upscale.py (build(params, template))" in failed
    assert "file-cleaner prompt" in lines["SKIP clean_local_file"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "img2img.json", "img2img.params.json", "text2img.json", "text2img.params.json"]
    # The bare placeholder is a whole-value one now: valid JSON, replaced by the typed value.
    text2img = json.loads((tmp_path / "text2img.json").read_text())
    assert text2img["3"]["inputs"]["seed"] == "$seed"
    assert text2img["6"]["inputs"]["text"] == "$text"
    assert text2img["6"]["_meta"]["title"] == "Positive prompt ($$ costs nothing)"
    assert json.loads((tmp_path / "img2img.params.json").read_text()) == {
        "image": {"type": "image"}}
    catalog = load_catalog(tmp_path)
    assert catalog.errors == {}
    assert set(catalog.workflows["img2img"].params) == {"image", "text"}


async def test_converted_workflows_fill_what_string_template_would_have_broken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _import([str(SEED), "--out", str(tmp_path)], capsys)
    workflow = load_catalog(tmp_path).workflows["text2img"]
    text = 'a "quoted" prompt", "extra": "node'
    prompt = await workflow.make_prompt(workflow.validate({"text": text, "seed": "12"}))
    assert prompt["6"]["inputs"]["text"] == text
    assert prompt["3"]["inputs"]["seed"] == 12
    assert (await workflow.make_prompt(workflow.validate({"text": "x"})))["3"]["inputs"][
        "seed"] == 42


def test_files_already_there_are_kept_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "text2img.json").write_text("mine")
    _, report = _import([str(SEED / "src"), "--out", str(tmp_path)], capsys)
    assert "FAIL text2img:" in report and "not overwritten (--force replaces)" in report
    assert (tmp_path / "text2img.json").read_text() == "mine"
    _, report = _import([str(SEED / "src" / "workflows"), "--out", str(tmp_path), "--force"],
                        capsys)
    assert "OK   text2img" in report
    assert json.loads((tmp_path / "text2img.json").read_text())["3"]["class_type"] == "KSampler"


def test_the_checkout_is_read_never_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    seed = tmp_path / "seed"
    shutil.copytree(SEED, seed)
    ran = tmp_path / "ran"
    for module in (seed / "src" / "workflows" / "text2img.py",
                   seed / "src" / "api" / "service.py"):
        module.write_text(f"open({str(ran)!r}, 'w').close()\n" + module.read_text())
    _, report = _import([str(seed), "--out", str(tmp_path / "out")], capsys)
    assert "OK   text2img" in report
    assert not ran.exists()


def test_without_service_functions_each_template_is_named_after_its_module(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = tmp_path / "workflows"
    shutil.copytree(SEED / "src" / "workflows", seed)
    code, report = _import([str(seed), "--out", str(tmp_path / "out")], capsys)
    assert code == 0
    assert "service functions: none found" in report
    for name in ("text2img", "img2img", "upscale"):
        assert f"OK   {name}:" in report
    assert "SKIP clean_local_file" in report
    upscale = json.loads((tmp_path / "out" / "upscale.json").read_text())
    assert upscale["2"]["inputs"]["scale_by"] == "$factor"


def test_a_path_without_templates_is_one_plain_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _import([str(tmp_path)], capsys)
    assert (code, report.strip()) == (
        1, f"FAIL {tmp_path}: no src/workflows/*.py here (the ComfyUI-server checkout, its src/ "
           "or its src/workflows/)")


def test_placeholders_are_quoted_outside_strings_and_kept_inside() -> None:
    text = '{"1": {"class_type": "K", "inputs": {"a": $a, "b": [${b}, 0], ' \
           '"c": "x $c \\" $$d", "e": "$e"}}}'
    filled = template_to_json(text, lambda name: "renamed" if name == "e" else name)
    assert filled.document["1"]["inputs"] == {"a": "$a", "b": ["$b", 0],
                                              "c": 'x $c " $$d', "e": "${renamed}"}
    assert filled.bare == ["a", "b"]
    fixed = template_to_json('{"1": {"class_type": "K", "inputs": {"n": $n, "s": "$s"}}}',
                             lambda name: Fixed(3 if name == "n" else 'say "hi"'))
    assert fixed.document["1"]["inputs"] == {"n": 3, "s": 'say "hi"'}
    with pytest.raises(WorkflowError, match=r"not JSON even with its placeholders quoted: .* "
                                            r"line 2 column"):
        template_to_json('{"1":\n {"inputs": {"w": ${w}0}}}', str)
    with pytest.raises(WorkflowError, match="has no class_type"):
        template_to_json('{"1": {"inputs": {}}}', str)


SERVICE = '''
import base64
class Service:
    @staticmethod
    async def renamed(client_task_id, params):
        prompt = str(params["prompt"])
        steps = int(params.get("steps", 20))
        return await server.queue_prompt(client_task_id, json.loads(
            T.substitute({"text": prompt, "steps": steps, "mode": "fast"})))

    @staticmethod
    async def everything(client_task_id, params):
        return await server.queue_prompt(client_task_id, json.loads(T.safe_substitute(**params)))

    @staticmethod
    async def looping(client_task_id, params):
        for _ in range(params.get("n")):
            await server.queue_prompt(client_task_id, json.loads(T.substitute(text="x")))

    @staticmethod
    async def edits(client_task_id, params):
        prompt = json.loads(T.substitute(text=params.get("text")))
        prompt["3"]["inputs"]["seed"] = random.randint(0, 9)
        return await server.queue_prompt(client_task_id, prompt)

    @staticmethod
    async def uploads(client_task_id, params):
        raw = params.get("picture")
        response = await server.upload_image(base64.b64decode(raw))
        return await server.queue_prompt(client_task_id, json.loads(
            T.substitute(image=response["name"])))
'''


def test_service_functions_are_read_for_what_fills_each_placeholder() -> None:
    readings = {reading.name: reading for reading in read_services(SERVICE)}
    renamed = readings["renamed"]
    assert renamed.beyond == []
    assert renamed.fills == {"text": Param("prompt", None, "string"),
                             "steps": Param("steps", 20, "int"), "mode": Fixed("fast")}
    assert readings["everything"].passes_all_params and readings["everything"].beyond == []
    assert readings["looping"].beyond == ["line 17: a loop", "line 17: calls range()"]
    assert readings["edits"].beyond == [
        "line 23: changes a value in place (prompt['3']['inputs']['seed'] = ...)",
        "line 23: calls random.randint()"]
    assert readings["uploads"].fills == {"image": Upload("picture")}
