"""Run a module under a sampler of its own CPU time (the benchmark's profile of the service).

    python -m bench.cpu_sampled OUTPUT -m MODULE [ARGS...]

SIGUSR1 starts sampling, SIGUSR2 stops it and writes the samples to OUTPUT as collapsed stacks
("frame;frame;... count" lines, outermost frame first, as py-spy writes them), then a line
"gc (generation N) count" per generation for the time the garbage collector took, in
samples of the same length.

A sample is taken each time the process has used another tick of CPU (ITIMER_PROF; user and
system time, so a syscall's kernel work counts for the Python line that made it), wherever
the main thread's Python is then. Unlike py-spy's samples of a thread holding the GIL, time
the process is runnable but not running (preempted on a busy machine, typically right after a
loopback write woke its peer) is not counted: in one run py-spy put 37% of the service's
samples in its socket writes, CPU time put 6% there (bench/RESULTS.md). What C code does
without returning to Python (the event loop's own work) lands on the next Python frame that
runs.
"""

from __future__ import annotations

import gc
import runpy
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

SAMPLE_EVERY_SECONDS = 0.001  # of CPU; the kernel rounds it up to its tick (4 ms at HZ=250)


class Sampler:
    def __init__(self, output: Path) -> None:
        self.output = output
        self.stacks: Counter[tuple[tuple[CodeType, ...], int]] = Counter()
        self.gc_seconds: dict[int, float] = {}
        self._gc_started = 0.0
        self._cpu_started = 0.0
        self.sampling = False

    def sample(self, _: int, frame: FrameType | None) -> None:
        if frame is None:
            return
        codes = []
        outer: FrameType | None = frame
        while outer is not None:
            codes.append(outer.f_code)
            outer = outer.f_back
        self.stacks[tuple(codes), frame.f_lineno] += 1

    def collecting(self, phase: str, info: dict[str, Any]) -> None:
        if not self.sampling:
            return
        if phase == "start":
            self._gc_started = time.thread_time()
        else:
            generation = info["generation"]
            self.gc_seconds[generation] = (self.gc_seconds.get(generation, 0.0)
                                           + time.thread_time() - self._gc_started)

    def start(self, *_: Any) -> None:
        self.stacks.clear()
        self.gc_seconds.clear()
        self.sampling = True
        self._cpu_started = time.process_time()
        signal.setitimer(signal.ITIMER_PROF, SAMPLE_EVERY_SECONDS, SAMPLE_EVERY_SECONDS)

    def stop(self, *_: Any) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        self.sampling = False
        samples = sum(self.stacks.values())
        per_sample = (time.process_time() - self._cpu_started) / max(samples, 1)
        lines = []
        for (codes, line), count in self.stacks.items():
            frames = [f"{code.co_qualname} ({_short(code.co_filename)}:{code.co_firstlineno})"
                      for code in reversed(codes)]
            frames[-1] = f"{frames[-1].rsplit(':', 1)[0]}:{line})"  # the line sampled
            lines.append(f"{';'.join(frames)} {count}")
        lines += [f"gc (generation {generation}) {round(seconds / per_sample)}"
                  for generation, seconds in sorted(self.gc_seconds.items())]
        written = self.output.with_name(self.output.name + ".part")
        written.write_text("\n".join(lines) + "\n")
        written.replace(self.output)  # whole, for whoever waits for it to appear


def _short(path: str) -> str:
    """A file's path from its package on (`aiohttp/client.py`), as py-spy names it."""
    for root in ("site-packages/", "/src/", "python3.11/"):
        if root in path:
            return path.split(root, 1)[1]
    return path


def main() -> None:
    output, flag, module, *args = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: python -m bench.cpu_sampled OUTPUT -m MODULE [ARGS...]")
    sampler = Sampler(Path(output))
    signal.signal(signal.SIGPROF, sampler.sample)
    signal.signal(signal.SIGUSR1, sampler.start)
    signal.signal(signal.SIGUSR2, sampler.stop)
    gc.callbacks.append(sampler.collecting)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
