"""Every shell, Python and Node.js example in README.md and docs/*.md runs against a live
service on loopback and does what its page says, so the documentation stays true.

How a page is read (write new examples this way):
- A ```sh (or bash, shell) block runs in `bash -e -o pipefail`, a ```python block in a Python
  process, a ```js block in Node.js (an ES module); other fences (output, JSON, YAML) are not
  examples. Every curl in them must get a 2xx or 3xx answer: it runs with `--fail-with-body`.
  What an example starts in the background (`... &`) runs on until the page is done.
- Comment lines right after a command (no blank line between) are what it prints: each must
  match a line of the example's output, in order. `...` stands for anything (`0b4f...` for
  an id); in a line with JSON (`data: {...}` too) the JSON is matched by shape: those keys
  and values, where `"5c1e..."` is any string, `[...]` any list, `: ...` any value and
  `, ...}` more keys. Comment lines after a blank line or at the start are prose.
- The line before a fence may say what else to do with it:
  `<!-- not run: why -->` skips it (`test_skipped_examples_say_why` lists each one);
  `<!-- exits N -->` expects that exit status instead of 0;
  `<!-- webhook receiver -->` starts it, sends it a job's webhook, expects it to print the
  event type, job id and status, and stops it;
  `<!-- excerpt of PATH -->` checks that the block is, line for line, a part of that file;
  `<!-- run with pytest -->` runs a Python block's tests, which must pass.

What the examples may assume, and are given: the service at localhost:8000 (unless a block of
the page starts one in the background, `comfyfleet serve &`) on a database of the page's own;
ComfyUIs at 127.0.0.1:8188 and 8189 (simulated, the service's backends; also as
gpu1.lan:8188 and gpu2.lan:8188), a spare one at gpu7.lan:8188, free ports 8288-8290 for the
examples' own `comfyfleet sim`; webhook receivers at https://example.com/hooks (one that
verifies) and on port 9000; `$JOB` a job still running, `$KEY` an API key;
`.venv/bin/comfyfleet` and `comfyfleet` the one under test; and in the working directory (a
checkout's root) `.env.example`, `workflows/`, `photos/` (two PNGs), `photo.png` and
`workflow_api.json` (a graph with a SaveImage node "9"). Addresses are rewritten to those on
loopback; an example that names any other host fails here, so no traffic leaves loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfyfleet.app import serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from comfyfleet.webhooks.signing import new_secret
from tests.support import LOOPBACK, REPO, child_env, free_ports, new_database, png

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"sh", "bash", "shell"}
PYTHON = {"python", "py"}
JAVASCRIPT = {"js", "javascript"}
RUN = SHELL | PYTHON | JAVASCRIPT
FENCE = re.compile(r"^```(\S*)\s*$")
DIRECTIVE = re.compile(
    r"^<!--\s*(not run|exits|webhook receiver|excerpt of|run with pytest)\s*:?\s*(.*?)\s*-->$")
BLOCK_SECONDS = 30


@dataclass
class Example:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    directive: str = ""
    argument: str = ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.directive != "not run" and self.language in RUN


def examples(page: Path) -> list[Example]:
    """The page's fenced blocks in a language we run, with the directive before each."""
    found: list[Example] = []
    lines = page.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = next(n for n in range(index + 1, len(lines)) if lines[n].startswith("```"))
        language = opening.group(1).lower()
        if language in RUN:
            previous = lines[index - 1].strip() if index else ""
            directive = DIRECTIVE.match(previous)
            found.append(Example(page, index + 1, language, "\n".join(lines[index + 1:end]) + "\n",
                                 *(directive.groups() if directive else ("", ""))))
        index = end + 1
    return found


# --- what the output must look like --------------------------------------------------------

ANY_STRING, ANY_LIST, ANY_VALUE = "\x00any string", "\x00any list", "\x00any value"
MORE_KEYS = "\x00more keys"


def _shape(expected: str) -> Any:
    """A JSON line with the doc's `...` shorthands as markers."""
    text = re.sub(r'"[^"]*\.\.\."', lambda _: json.dumps(ANY_STRING), expected)
    text = text.replace("[...]", json.dumps(ANY_LIST))
    text = re.sub(r"(?<=:)\s*\.\.\.(?=\s*[,}])", lambda _: json.dumps(ANY_VALUE), text)
    text = re.sub(r",\s*\.\.\.\s*}", lambda _: f', {json.dumps(MORE_KEYS)}: true}}', text)
    return json.loads(text)


def _fits(expected: Any, actual: Any) -> bool:
    if expected == ANY_VALUE:
        return True
    if expected == ANY_STRING:
        return isinstance(actual, str)
    if expected == ANY_LIST:
        return isinstance(actual, list)
    if isinstance(expected, dict):
        keys = set(expected) - {MORE_KEYS}
        if not isinstance(actual, dict) or not keys <= actual.keys():
            return False
        if MORE_KEYS not in expected and keys != actual.keys():
            return False
        return all(_fits(expected[key], actual[key]) for key in keys)
    if isinstance(expected, list):
        return (isinstance(actual, list) and len(expected) == len(actual)
                and all(map(_fits, expected, actual)))
    return bool(expected == actual)


def _line_fits(expected: str, actual: str) -> bool:
    """Text before a JSON value (`data: {...}`) is text; the value is matched by shape."""
    start = min((expected.find(c) for c in "{[" if c in expected), default=-1)
    if start >= 0:
        try:
            shape = _shape(expected[start:])
        except ValueError:
            shape = None  # not JSON: all of it is text
        if shape is not None:
            prefix = expected[:start].strip()
            if not actual.strip().startswith(prefix):
                return False
            try:
                return _fits(shape, json.loads(actual.strip()[len(prefix):]))
            except ValueError:
                return False
    # An abbreviated id ("0b4f...") is any id.
    words = re.sub(r"[0-9a-f]{4,}\.\.\.", "...", expected).split()
    pattern = r"\s+".join(".*?".join(map(re.escape, word.split("..."))) for word in words)
    return re.fullmatch(pattern, actual.strip()) is not None


def unmatched(expected: list[str], output: str) -> list[str]:
    """The expected lines not found, in order, among the output's lines."""
    # Answers without a newline at the end run together, as on a terminal: `{...}{...}`; and
    # the log of a service in the background may land between an answer and the newline that
    # curl writes after it: `{...}2026-12-07 13:05:07,307 WARNING ...`.
    actual = iter(part for line in output.splitlines()
                  for part in re.split(r"(?<=\})(?=\{|\d{4}-\d\d-\d\d \d\d:)", line))
    return [line for line in expected if not any(_line_fits(line, got) for got in actual)]


def shown_output(text: str) -> list[str]:
    """The comment lines right after a command: what the doc shows it printing."""
    shown: list[str] = []
    after_command = False
    for line in text.splitlines():
        comment = line.startswith("#")
        if comment and after_command:
            shown.append(line[1:].strip())
            continue
        after_command = bool(line.strip()) and not comment and not line.endswith("\\")
    return shown


# --- the live service the examples talk to ---------------------------------------------------

@dataclass
class Live:
    """Everything the examples are pointed at, and how their text is rewritten to reach it."""

    workdir: Path
    ports: dict[int, int]  # a port the docs name -> the one on loopback here
    hosts: dict[str, str]  # a URL or host the docs name -> the one on loopback here
    env: dict[str, str]
    api: str  # the service's /api/v1 (not answering when the page starts its own)
    receiver_port: int  # port 9000 of the examples
    background: list[Running] = field(default_factory=list)  # stopped when the page is done

    def rewrite(self, text: str) -> str:
        def port(match: re.Match[str]) -> str:
            named = int(match.group("port"))
            assert named in self.ports, f"an example names port {named}: map it in Live"
            before = match.group("before")
            return f"{LOOPBACK if ':' in before else before}{':' * (':' in before)}" \
                   f"{self.ports[named]}"

        text = re.sub(r"(?P<before>\b(?:localhost|127\.0\.0\.1):|\bport=|--port |\.listen\()"
                      r"(?P<port>\d+)\b", port, text)
        for name, local in self.hosts.items():
            text = text.replace(name, local)
        foreign = re.findall(r"https?://(?!127\.0\.0\.1[:/]|<)[^\s'\"/]+|\b[\w-]+\.lan\b", text)
        assert not foreign, f"an example names a host off loopback: {foreign}"
        return text


def _workdir(root: Path) -> Path:
    """A checkout's root as the examples expect it, without the repository's own files."""
    root.mkdir()
    (root / ".venv").symlink_to(Path(sys.prefix))
    shutil.copy(REPO / ".env.example", root / ".env.example")
    shutil.copytree(REPO / "workflows", root / "workflows")
    (root / "photos").mkdir()
    for n in range(2):
        (root / "photos" / f"photo{n}.png").write_bytes(png(24 + 8 * n, 16))
    (root / "photo.png").write_bytes(png())
    graph = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 32, "height": 16, "batch_size": 1, "color": 3355443}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "doc"}},
    }
    (root / "workflow_api.json").write_text(json.dumps(graph))
    return root


@asynccontextmanager
async def live(page: Path, postgres: Any, root: Path) -> AsyncIterator[Live]:
    """Simulated ComfyUIs, a webhook receiver and (unless the page starts its own) the service
    on a fresh database, for one page's examples."""
    secret = new_secret()
    database_url = await new_database(postgres, "docs")
    runnable = [example for example in examples(page) if example.runnable]
    starts_its_own = any(re.search(r"comfyfleet serve\b.*&$", example.text, re.MULTILINE)
                         for example in runnable)
    async with AsyncExitStack() as stack:
        sims = [await stack.enter_async_context(SimulatedComfyUI(name=f"sim{n}"))
                for n in range(3)]
        hooks = WebhookReceiver(secret)
        await hooks.start()
        stack.push_async_callback(hooks.stop)
        service_port = free_ports(2)
        receiver_port = service_port + 1
        settings = Settings(
            _env_file=None, database_url=database_url, data_dir=root / "data",
            workflows_dir=REPO / "workflows", storage="local", webhook_secret=secret,
            allow_private_callbacks=True, service_port=service_port,
            comfyui_endpoints=[sims[0].url, sims[1].url],
        )
        base = f"http://{LOOPBACK}:{service_port}"
        if runnable and not starts_its_own:
            await stack.enter_async_context(serving(settings))
        workdir = _workdir(root / "work")
        fleet = free_ports(3)  # for the examples' own `comfyfleet sim --port 8288`
        ports = {8000: service_port, 9000: receiver_port, 8188: sims[0].port,
                 8189: sims[1].port, 8288: fleet, 8289: fleet + 1, 8290: fleet + 2}
        hosts = {"https://comfyfleet.example.com": base, "https://example.com/hooks": hooks.url,
                 "path/to/ComfyUI-server": str(REPO / "tests/fixtures/comfyui-server"),
                 "gpu1.lan:8188": f"{LOOPBACK}:{sims[0].port}",
                 "gpu2.lan:8188": f"{LOOPBACK}:{sims[1].port}",
                 "gpu7.lan:8188": f"{LOOPBACK}:{sims[2].port}", "whsec_...": secret}
        env = child_env(
            PATH=f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            SERVICE_PORT=str(service_port), DATABASE_URL=database_url,
            ALLOW_PRIVATE_CALLBACKS="true", WEBHOOK_SECRET=secret, COMFY_BASE_URL=base,
            KEY="a-key-the-service-does-not-ask-for",
        )
        here = Live(workdir, ports, hosts, env, f"{base}{settings.route_prefix}", receiver_port)

        async def stop_what_examples_left_running() -> None:
            for running in here.background:
                await running.stop()

        stack.push_async_callback(stop_what_examples_left_running)  # first, whatever happens
        yield here
        assert hooks.rejected == 0


# --- running one example ---------------------------------------------------------------------

@dataclass
class Run:
    status: int
    output: str


class Running:
    """An example's process, and whatever it starts in the background, in a session of its
    own. Its output goes to a file: a server the example leaves running in the background
    keeps a pipe open, and asyncio would wait for that pipe before it saw the example end."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.log = log

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def printed(self, pattern: str, seconds: float) -> None:
        async with asyncio.timeout(seconds):
            while re.search(pattern, self.output) is None:
                assert self.process.returncode is None, self.output
                await asyncio.sleep(0.1)  # a file gives no event to wait on

    async def stop(self) -> None:
        """End the example's whole session: background servers too."""
        group = self.process.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(group, sig)
                async with asyncio.timeout(15):
                    while True:  # until no process of the group is left
                        await asyncio.sleep(0.1)  # no event says a process has gone
                        os.killpg(group, 0)
            except ProcessLookupError:
                break
            except TimeoutError:
                continue
        await self.process.wait()


async def start(argv: list[str], live: Live, env: dict[str, str]) -> Running:
    log = live.workdir.parent / f"output-{len(list(live.workdir.parent.glob('output-*')))}"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=live.workdir, env=env, stdout=output, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
    return Running(process, log)


def command(example: Example, live: Live) -> list[str]:
    if example.language in PYTHON | JAVASCRIPT:
        python = example.language in PYTHON
        source = live.workdir / f"example_{example.line}.{'py' if python else 'mjs'}"
        source.write_text(live.rewrite(example.text))
        if example.directive == "run with pytest":
            return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "--rootdir", ".", source.name]
        node = shutil.which("node")
        assert python or node, f"{example.where} needs Node.js: install nodejs (.ci/run does)"
        return [sys.executable if python else str(node), source.name]
    return ["bash", "-e", "-o", "pipefail", "-c", FAIL_ON_HTTP_ERRORS + live.rewrite(example.text)]


# curl refuses --fail-with-body next to --fail (-f): a curl that has that already keeps it.
FAIL_ON_HTTP_ERRORS = """curl() {
  local arg
  for arg in "$@"; do
    case $arg in --fail|--fail-with-body|-[a-zA-Z]*f*) command curl "$@"; return;; esac
  done
  command curl --fail-with-body "$@"
}
"""


async def run(example: Example, live: Live, env: dict[str, str]) -> Run:
    """Run the example to its end; what it left running in the background (`serve &`) runs on
    until the page is done, as in a reader's shell."""
    running = await start(command(example, live), live, env)
    live.background.append(running)
    try:
        async with asyncio.timeout(BLOCK_SECONDS):
            status = await running.process.wait()
    except TimeoutError:
        raise AssertionError(f"{example.where} still running after {BLOCK_SECONDS} s:\n"
                             f"{running.output}") from None
    return Run(status, running.output)


async def running_job(live: Live) -> str:
    """A job that runs a few seconds on a backend: the examples' $JOB, still running when an
    example cancels it, soon over for one that follows it to the end. Its length differs a
    little each time, so that no backend serves it from the cache of an earlier one."""
    seconds = 3 + random.uniform(0, 1e-3)
    body = {"workflow": "simulated_work", "params": {"seconds": seconds, "steps": 3}}
    async with aiohttp.ClientSession() as http, http.post(f"{live.api}/jobs", json=body) as answer:
        assert answer.status == 202, await answer.text()
        return str((await answer.json())["id"])


async def check_receiver(example: Example, live: Live, env: dict[str, str]) -> None:
    """Start the receiver, have a job call it back, see it print the event."""
    running = await start(command(example, live), live, env)
    url = f"http://{LOOPBACK}:{live.receiver_port}/hooks"
    try:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(20):
                while True:  # until the receiver answers (with anything: a GET is refused)
                    assert running.process.returncode is None, running.output
                    try:
                        async with http.get(url):
                            break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.1)
            body = {"workflow": "invert", "params": {"width": 16}, "callback_url": url}
            async with http.post(f"{live.api}/jobs?wait=30", json=body) as answer:
                job = await answer.json()
                assert job["status"] == "succeeded", job
        await running.printed(rf"job\.succeeded {job['id']} succeeded", 20)
    except TimeoutError:
        raise AssertionError(f"{example.where}: the receiver printed:\n{running.output}"
                             ) from None
    finally:
        await running.stop()


async def check(example: Example, live: Live) -> None:
    if example.directive == "excerpt of":
        whole = (REPO / example.argument).read_text()
        assert example.text in whole, f"{example.where} is not a part of {example.argument}"
        return
    env = dict(live.env)
    if "$JOB" in example.text:
        env["JOB"] = await running_job(live)
    if example.directive == "webhook receiver":
        await check_receiver(example, live, env)
        return
    result = await run(example, live, env)
    wanted = int(example.argument) if example.directive == "exits" else 0
    assert result.status == wanted, (
        f"{example.where} exited {result.status}, not {wanted}:\n{result.output}")
    if example.language in SHELL:
        missing = unmatched(shown_output(live.rewrite(example.text)), result.output)
        assert not missing, f"{example.where}: not printed: {missing}\n--- it printed:\n" \
                            f"{result.output}"


def _ids(page: Path) -> str:
    return str(page.relative_to(REPO))


@pytest.mark.parametrize("page", PAGES, ids=_ids)
async def test_the_examples_of_a_page_do_what_it_says(
    page: Path, postgres: Any, tmp_path: Path
) -> None:
    todo = [example for example in examples(page) if example.runnable]
    if not todo:
        return
    async with live(page, postgres, tmp_path) as here:
        for example in todo:
            await check(example, here)


def skipped() -> Iterator[Example]:
    for page in PAGES:
        yield from (example for example in examples(page) if example.directive == "not run")


def test_skipped_examples_say_why() -> None:
    listed = [f"{example.where}: {example.argument}" for example in skipped()]
    print("examples not run:\n" + "\n".join(listed))
    assert all(example.argument for example in skipped()), listed


def test_each_example_uses_its_own_idempotency_key() -> None:
    """A reader runs the examples one after another against one service: a key used by two
    requests that differ is a 422 for the second."""
    seen: dict[str, str] = {}
    repeated = []
    for page in PAGES:
        for example in examples(page):
            keys = re.findall(r'"client_task_id":\s*"([^"]+)"|Idempotency-Key["\']?[:,]\s*"?'
                              r"'?([\w-]+)", example.text)
            for key in {a or b for a, b in keys} - {""}:  # once an example: a repeat is shown
                if key in seen:
                    repeated.append(f"{key}: {seen[key]} and {example.where}")
                seen.setdefault(key, example.where)
    assert not repeated, repeated


def test_output_lines_match_by_shape() -> None:
    printed = '{"id": "5c1e0000", "status": "succeeded", "outputs": [], "error": null}'
    assert unmatched(['{"id": "5c1e...", "status": "succeeded", ...}'], printed) == []
    assert unmatched(['{"id": "5c1e...", "status": "failed", ...}'], printed) != []
    assert unmatched(['{"id": "5c1e...", "status": "succeeded"}'], printed) != []
    assert unmatched(["OK   text2img: workflows/text2img.json (from ...)"],
                     "OK   text2img: workflows/text2img.json (from a.py X)") == []
    assert unmatched(["b", "a"], "a\nb") == ["a"]  # in order
    assert unmatched(['{"a": 1}', '{"b": 2}'], '{"a": 1}{"b": 2}') == []
    assert unmatched(["x.png: job 0b4f..."], "x.png: job 5c1e0000-aaaa") == []
    assert unmatched(['data: {"a": ..., "b": "x", ...}'], 'data: {"c": 1, "a": [], "b": "x"}') == []
    assert unmatched(['data: {"a": ..., "b": "x"}'], 'data: {"c": 1, "a": [], "b": "x"}') != []
