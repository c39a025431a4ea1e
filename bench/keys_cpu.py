"""CPU per job of ComfyUI cache keys: a queued prompt's (`PromptKeys`, as the dispatcher
weighs a job) and its copy as sent (`PromptKeys.of_copy` of `isolate_outputs`' copy under a
new prompt id, as the tracker follows it), for shipped workflows: `invert` (the throughput
bench's 3 nodes), `sdxl_txt2img` (7) and `sd15_img2img` (9). No I/O.

Each round times a few hundred of each in a row (process CPU time) and keeps the microseconds
a call; a digest of every key made must be the same for both codes when a change keeps the
keys. With `--other SRC`, the same in a process whose PYTHONPATH puts SRC first (a `git
archive` of main's `src`, say), in turns with this checkout's.

Run from the repository root:
    .venv/bin/python -m bench.keys_cpu [--other /tmp/main/src] [--turns 3] [--rounds 5]
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from bench.harness import measured_runs, paired_parser, print_turns
from comfyfleet.comfy.prompts import isolate_outputs
from comfyfleet.execution.warm import PromptKeys
from comfyfleet.workflows.catalog import load_catalog
from tests.support import REPO

CALLS = 300
KEYED_BY_ID = frozenset({"SaveImageWebsocket"})
WORKFLOWS: dict[str, dict[str, Any]] = {
    "invert": {"width": 64, "height": 64},
    "sdxl_txt2img": {"prompt": "a lighthouse at dusk"},
    "sd15_img2img": {"prompt": "a lighthouse at dusk", "image": "lighthouse.png"},
}


def measure(rounds: int) -> dict[str, Any]:
    catalog = load_catalog(REPO / "workflows")
    figures: dict[str, Any] = {}
    digest = hashlib.sha256()
    for name, params in WORKFLOWS.items():
        prompt = catalog.workflows[name].build(params)[1]
        sent = [isolate_outputs(prompt, f"prompt-{index}") for index in range(CALLS)]
        queued, copied = [], []
        for _ in range(rounds):
            started = time.process_time()
            for _ in range(CALLS):
                keys = PromptKeys(prompt, KEYED_BY_ID)
            queued.append((time.process_time() - started) / CALLS * 1e6)
            started = time.process_time()
            for copy in sent:
                keys.of_copy(copy, KEYED_BY_ID)
            copied.append((time.process_time() - started) / CALLS * 1e6)
        figures[f"{name} queued"], figures[f"{name} as sent"] = queued, copied
        digest.update(json.dumps([keys.signatures, keys.of_copy(sent[0], KEYED_BY_ID).signatures],
                                 sort_keys=True).encode())
    return {**figures, "keys": digest.hexdigest()[:16]}


def main() -> None:
    parser = paired_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.rounds)))
        return
    print(f"load average {os.getloadavg()[0]:.2f}")
    runs = measured_runs("bench.keys_cpu", args.other, args.turns, [f"--rounds={args.rounds}"],
                         lambda: measure(args.rounds))
    for figure in [f"{name} {copy}" for name in WORKFLOWS for copy in ("queued", "as sent")]:
        print(f"\n{figure}")
        print_turns(runs, figure, "us a call")
    print("\nkeys digest: " + ", ".join(f"{run['code']} {run['keys']}" for run in runs))


if __name__ == "__main__":
    main()
