"""`comfyfleet demo --jobs N`, run as a newcomer would: in its own process, from an empty
directory (as after `pip install`) and with no WORKFLOWS_DIR: the samples come from the
package."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

from tests.support import child_env


async def test_demo_runs_jobs_through_both_backends_and_exits_zero(data_root: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfyfleet", "demo", "--jobs", "4", "--port", "0",
        cwd=data_root,
        env=child_env(DATA_DIR=str(data_root)),  # no WORKFLOWS_DIR: the packaged samples
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    text = output.decode()
    assert process.returncode == 0, text
    (summary_line,) = [line for line in text.splitlines() if line.startswith('{"jobs"')]
    summary = json.loads(summary_line)
    assert summary["jobs"] == summary["succeeded"] == summary["webhooks_verified"] == 4
    assert summary["webhooks_rejected"] == 0
    assert summary["backends_used"] == ["sim0", "sim1"]
    assert text.count("webhook verified: job.succeeded") == 4
    assert len(list((data_root / "outputs").rglob("3_0.png"))) == 4
    # The dashboard's address is printed (the page itself: test_dashboard).
    assert re.search(r"^dashboard http://127\.0\.0\.1:\d+/dashboard$", text, re.MULTILINE), text
