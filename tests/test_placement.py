"""Speed-aware placement: the rule on its own, then through `serve` with simulated GPUs of
different speeds (learned from the run times it observes, never configured)."""

from __future__ import annotations

import asyncio
import random
import statistics
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest

from comfyfleet.app import serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.dispatch.placement import BackendLoad, remaining, should_take
from comfyfleet.execution import costs as node_costs
from comfyfleet.execution.costs import (
    UNSEEN_LOAD_SECONDS,
    UNSEEN_NODE_SECONDS,
    NodeCosts,
    Samples,
)
from comfyfleet.execution.run_times import RunTimes
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import wait_for_job


@pytest.mark.parametrize("size", [9, 15, 101])
def test_samples_kept_sorted_give_the_median_of_the_latest_as_statistics_does(size: int) -> None:
    """A window of samples (a key's, a class's, a backend's overheads) answers its median
    from the samples it keeps sorted: the very float statistics.median gives for the latest
    `size` samples, ties, zeros and a window not yet full included."""
    rng = random.Random(size)
    window, latest = Samples(size), deque[float](maxlen=size)
    with pytest.raises(ValueError):
        window.median()
    for _ in range(2000):
        seconds = rng.choice([rng.lognormvariate(0, 1), 0.0, 1e-3, round(rng.random(), 2)])
        window.append(seconds)
        latest.append(seconds)
        assert (len(window), window.median()) == (len(latest), statistics.median(latest))

def test_idle_fast_backend_beats_slow_one_for_the_last_job() -> None:
    slow = BackendLoad("slow", seconds_per_job=4.0, busy_for=0.0)
    fast = BackendLoad("fast", seconds_per_job=1.0, busy_for=0.0)
    assert not should_take(slow, [fast], backlog=1)
    assert should_take(fast, [slow], backlog=1)
    # The fast one gets through 3 jobs before the slow one could finish its first.
    assert not should_take(slow, [fast], backlog=3)
    assert should_take(slow, [fast], backlog=4)


def test_equal_backends_never_all_refuse() -> None:
    first, second = BackendLoad("a", 2.0, 1.0), BackendLoad("b", 2.0, 1.0)
    assert should_take(first, [second], backlog=1)
    assert should_take(second, [first], backlog=1)


def test_a_busy_fast_backend_counts_only_after_its_queue() -> None:
    slow = BackendLoad("slow", seconds_per_job=2.0, busy_for=0.0)
    busy_fast = BackendLoad("fast", seconds_per_job=1.0, busy_for=1.5)
    assert should_take(slow, [busy_fast], backlog=1)  # 2.0 beats 1.5 + 1.0


def test_run_times_per_backend_fall_back_to_the_fleet() -> None:
    times = RunTimes()
    assert times.expected("a", "w") is None
    for seconds in (1.0, 2.0, 3.0):
        times.record("a", "w", seconds)
    times.record("b", "w", 8.0)
    assert times.expected("a", "w") == 2.0
    # b has too few samples of its own: the fleet's mean stands in.
    assert times.expected("b", "w") == 3.5
    assert times.expected("c", "w") == 3.5
    assert times.expected("a", "other") is None


def test_an_overrunning_prompt_is_expected_to_need_longer() -> None:
    assert remaining(expected=2.0, elapsed=0.5) == 1.5
    assert remaining(expected=2.0, elapsed=8.0) == 2.0  # a quarter of its elapsed time
    assert remaining(expected=2.0, elapsed=40.0) == 10.0


class Api:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http, self.base = http, base
        self.submitted = 0

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, self.base + path, json=body) as response:
            assert response.status < 300, await response.text()
            return await response.json()

    async def submit(self, seconds: float, steps: int = 1, callback: str | None = None) -> str:
        self.submitted += 1
        # No two prompts alike: ComfyUI would answer a repeat from its cache, in no time.
        job = await self.call("POST", "/jobs", {
            "workflow": "simulated_work", "callback_url": callback,
            "params": {"seconds": seconds + self.submitted / 10_000, "steps": steps}})
        return str(job["id"])

    async def run_on(self, backend: str, *durations: float) -> None:
        """Let `backend` alone take work, so placement learns its speed."""
        others = [b["name"] for b in await self.call("GET", "/backends") if b["name"] != backend]
        for other in others:
            await self.call("PATCH", f"/backends/{other}", {"drain": True})
        for job_id in [await self.submit(seconds) for seconds in durations]:
            job = await wait_for_job(self.http, self.base, job_id, "succeeded")
            assert job["backend"] == backend
        for other in others:
            await self.call("PATCH", f"/backends/{other}", {"drain": False})


async def slow_and_fast(
    stack: AsyncExitStack, settings: Settings
) -> tuple[Api, SimulatedComfyUI]:
    """A 0.25x and a 1x backend behind the service, each seen running the workflow; returns
    the API and the slow backend."""
    api, slow = await slow_and_fast_unseen(stack, settings)
    await api.run_on("slow", 0.2, 0.2, 0.2)
    await api.run_on("fast", 0.2, 0.2, 0.2)
    return api, slow


async def slow_and_fast_unseen(
    stack: AsyncExitStack, settings: Settings
) -> tuple[Api, SimulatedComfyUI]:
    """A 0.25x and a 1x backend behind the service, neither seen running anything yet."""
    slow = await stack.enter_async_context(SimulatedComfyUI(speed=0.25))
    fast = await stack.enter_async_context(SimulatedComfyUI(speed=1.0))
    # The slow one listed first, so without placement it would be asked first.
    settings.comfyui_endpoints = [slow.url + "#slow", fast.url + "#fast"]
    base = await stack.enter_async_context(serving(settings))
    http = await stack.enter_async_context(aiohttp.ClientSession())
    return Api(http, base + settings.route_prefix), slow


async def test_slow_backend_leaves_the_last_job_to_an_idle_fast_one(settings: Settings) -> None:
    async with AsyncExitStack() as stack:
        api, _ = await slow_and_fast(stack, settings)
        for _ in range(3):
            job = await wait_for_job(api.http, api.base, await api.submit(0.2), "succeeded")
            assert job["backend"] == "fast"
        # A backlog the fast one cannot clear alone in time: both work.
        backlog = [await api.submit(0.2) for _ in range(12)]
        ran_on = {(await wait_for_job(api.http, api.base, job_id, "succeeded"))["backend"]
                  for job_id in backlog}
        assert ran_on == {"slow", "fast"}


async def test_idle_backend_takes_over_a_prompt_waiting_behind_a_long_one(
    settings: Settings,
) -> None:
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(SimulatedComfyUI())
        second = await stack.enter_async_context(SimulatedComfyUI())
        settings.comfyui_endpoints = [first.url + "#first", second.url + "#second"]
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        api = Api(http, base + settings.route_prefix)
        await api.run_on("first", 0.2)  # now the workflow is expected to take 0.2 s
        await api.call("PATCH", "/backends/second", {"drain": True})
        long_job = await api.submit(8.0)
        waiting = await api.submit(0.2)
        async with asyncio.timeout(10):  # both on `first`: one running, one in its queue
            while (await api.call("GET", "/backends"))[0]["queue_remaining"] < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # polling the API: no local event to wait on
        await api.call("PATCH", "/backends/second", {"drain": False})

        moved = await wait_for_job(api.http, api.base, waiting, "succeeded")
        assert (moved["backend"], moved["attempts"]) == ("second", 1)
        assert (await api.call("GET", f"/jobs/{long_job}"))["status"] == "running"
        async with aiohttp.ClientSession() as direct, \
                direct.get(f"{first.url}/history") as response:
            ran_on_first = set(await response.json())
        assert moved["prompt_id"] not in ran_on_first
        long_run = await wait_for_job(api.http, api.base, long_job, "succeeded")
        assert long_run["backend"] == "first"
        # Moved once the running prompt looked long, not at once: it is expected to need a
        # quarter of its elapsed time again, so waiting behind it costs MOVE_MIN_GAIN (1 s)
        # more than moving only 4 s in.
        long_start = await started_ms(api.http, first.url, long_run["prompt_id"])
        moved_start = await started_ms(api.http, second.url, moved["prompt_id"])
        assert moved_start - long_start > 4_000


async def test_long_prompt_on_a_slow_backend_restarts_on_an_idle_fast_one(
    settings: Settings, receiver: WebhookReceiver,
) -> None:
    async with AsyncExitStack() as stack:
        api, slow = await slow_and_fast(stack, settings)
        await api.call("PATCH", "/backends/fast", {"drain": True})
        # 12 s on the slow GPU, 3 s on the fast one; its steps show how far it has got.
        long_job = await api.submit(3.0, steps=20, callback=receiver.url)
        running = await wait_for_job(api.http, api.base, long_job, "running", progress=0.4)
        first_prompt = running["prompt_id"]
        enabled = asyncio.get_running_loop().time()
        await api.call("PATCH", "/backends/fast", {"drain": False})

        done = await wait_for_job(api.http, api.base, long_job, "succeeded")
        took = asyncio.get_running_loop().time() - enabled
        assert (done["backend"], done["attempts"]) == ("fast", 1)
        assert took < 8.0  # afresh on the fast GPU, rather than ~10 s more on the slow one
        async with api.http.get(f"{slow.url}/history/{first_prompt}") as response:
            interrupted = (await response.json())[first_prompt]["status"]
        assert interrupted["status_str"] == "error"
        assert [m[0] for m in interrupted["messages"]][-1] == "execution_interrupted"
        await receiver.wait_for(1)
        # One webhook: the interrupted prompt ended nothing (the delivery log is written with
        # each terminal state, so it holds every webhook there will be).
        (delivery,) = (await api.call("GET", f"/jobs/{long_job}/deliveries"))["deliveries"]
        assert delivery["event_type"] == "job.succeeded"
        assert [event["type"] for event in receiver.verified] == ["job.succeeded"]


async def test_restart_judges_speeds_by_all_their_runs_not_the_last_prompts(
    settings: Settings,
) -> None:
    """The fast GPU happened to get long prompts last and the slow one short ones: by their
    last few runs the slow one looks nearly as fast, and a long prompt would be left to run
    there; by all their runs it is a quarter as fast, and the prompt restarts on the fast
    one (as in bench.fleet_balance, where the backends' recent prompts differ by chance)."""
    async with AsyncExitStack() as stack:
        api, _ = await slow_and_fast_unseen(stack, settings)
        await api.run_on("slow", *[0.1] * 10)  # 0.4 s each there
        await api.run_on("fast", *[0.02] * 10, *[0.1] * 10)
        await api.run_on("slow", *[0.02] * 10)  # 0.08 s each: its last runs look quick
        await api.call("PATCH", "/backends/fast", {"drain": True})
        # 12 s on the slow GPU, 3 s on the fast one.
        long_job = await api.submit(3.0, steps=20)
        await wait_for_job(api.http, api.base, long_job, "running", progress=0.4)
        await api.call("PATCH", "/backends/fast", {"drain": False})

        done = await wait_for_job(api.http, api.base, long_job, "succeeded")
        assert done["backend"] == "fast"


async def test_a_prompt_restarts_as_soon_as_its_progress_shows_it_long(
    settings: Settings,
) -> None:
    """No polling delay: the progress report that reveals a long prompt triggers the restart."""
    # The dispatcher's own pass is out of the way: only the report can have woken it.
    settings.dispatch_interval = 60.0
    async with AsyncExitStack() as stack:
        api, slow = await slow_and_fast(stack, settings)
        fast = settings.comfyui_endpoints[1].split("#")[0]
        await api.call("PATCH", "/backends/fast", {"drain": True})
        # 12 s on the slow GPU in 4 steps: its first report, 3 s in, shows how long it is.
        long_job = await api.submit(3.0, steps=4)
        first_prompt = (await wait_for_job(api.http, api.base, long_job, "running"))["prompt_id"]
        # Nothing to judge yet; the dispatcher's next pass of its own is a minute away.
        await api.call("PATCH", "/backends/fast", {"drain": False})

        done = await wait_for_job(api.http, api.base, long_job, "succeeded")
        assert (done["backend"], done["attempts"]) == ("fast", 1)
        slow_start = await started_ms(api.http, slow.url, first_prompt)
        fast_start = await started_ms(api.http, fast, done["prompt_id"])
        # Its first report was due 3 s after it started (the simulator keeps to its steps),
        # the second one 6 s after: the first one did it.
        assert 3_000 <= fast_start - slow_start < 6_000


async def started_ms(http: aiohttp.ClientSession, url: str, prompt_id: str) -> int:
    """When a prompt started on a backend, by its history (ComfyUI's wall-clock ms)."""
    async with http.get(f"{url}/history/{prompt_id}") as response:
        messages = (await response.json())[prompt_id]["status"]["messages"]
    return next(int(data["timestamp"]) for kind, data in messages if kind == "execution_start")


def test_speed_compares_a_backend_with_the_fleet_on_the_workflows_it_ran() -> None:
    times = RunTimes()
    for _ in range(3):
        times.record("fast", "a", 1.0)
        times.record("slow", "a", 3.0)
    times.record("new", "a", 2.0)  # too few runs to tell
    assert times.speed("fast") == pytest.approx(2.0)  # the fleet's mean of "a" is 2.0
    assert times.speed("slow") == pytest.approx(2 / 3)
    assert times.speed("new") is None
    assert times.speed("unknown") is None


def test_a_node_not_yet_seen_on_a_backend_costs_the_fleets_median_over_its_speed() -> None:
    costs = NodeCosts()
    for seconds in (1.0, 1.1, 0.9):
        costs.record("fast", "sampler-x", "KSampler", seconds)
        costs.record("slow", "sampler-y", "KSampler", 2 * seconds)
        costs.record("fast", "save-x", "SaveImage", 0.001)  # too short to weigh
        costs.record("slow", "save-y", "SaveImage", 0.01)
    assert costs.cost("fast", "sampler-x", "KSampler") == 1.0  # its own samples
    fleet = costs.cost("new", "sampler-z", "KSampler")  # fleet median, speed 1
    assert costs.speed("slow") < 1.0 < costs.speed("fast")
    assert costs.cost("slow", "sampler-z", "KSampler") == pytest.approx(
        fleet / costs.speed("slow"))
    assert costs.cost("slow", "sampler-z", "KSampler") > 1.4 * costs.cost(
        "fast", "sampler-z", "KSampler")


def test_a_backends_speed_is_not_decided_by_the_prompts_it_got_last() -> None:
    """One class runs for very different times with different inputs: a 4x faster backend
    that happened to get the long prompts last, and a slower one the short ones, still
    compare as they are."""
    costs = NodeCosts()
    for i in range(12):  # the same prompts on both, in opposite orders, keys never repeated
        costs.record("fast", f"short-{i}", "SimulatedWork", 0.1)
        costs.record("slow", f"long-{i}", "SimulatedWork", 4 * 1.0)
    for i in range(12):
        costs.record("fast", f"long-{i}", "SimulatedWork", 1.0)
        costs.record("slow", f"short-{i}", "SimulatedWork", 4 * 0.1)
    assert costs.speed("fast") / costs.speed("slow") == pytest.approx(4.0)


def test_a_loader_not_yet_seen_running_counts_as_a_load() -> None:
    """Before the first load has ended, a node naming a model file costs what a load does,
    not what an unknown node does; once one has run, what it took."""
    costs = NodeCosts()
    prompt = {"1": {"class_type": "CheckpointLoaderSimple",
                    "inputs": {"ckpt_name": "sd15.safetensors"}},
              "2": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 1}}}
    keys = {"1": "loader-sd15", "2": "sampler-1"}
    assert costs.uncached_seconds("a", prompt, keys, frozenset()) == \
        UNSEEN_LOAD_SECONDS + UNSEEN_NODE_SECONDS
    assert UNSEEN_LOAD_SECONDS >= 3 * UNSEEN_NODE_SECONDS
    costs.record("b", "loader-sdxl", "CheckpointLoaderSimple", 2.0)
    assert costs.uncached_seconds("a", prompt, keys, {"sampler-1"}) == 2.0


def test_a_guess_served_from_a_cache_is_what_a_try_would_find_out() -> None:
    """A loader no backend has run but one served from its cache: its guessed load stands,
    except for a backend tried on it (`tried`); once one has run, what it took."""
    costs = NodeCosts()
    loader = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}}
    assert costs.node_cost("a", "loader-sd15", loader, tried=True) == UNSEEN_LOAD_SECONDS
    costs.served("CheckpointLoaderSimple")
    assert costs.node_cost("a", "loader-sd15", loader) == UNSEEN_LOAD_SECONDS
    assert costs.node_cost("a", "loader-sd15", loader, tried=True) == 0.0
    costs.record("b", "loader-sd15", "CheckpointLoaderSimple", 2.0)
    assert costs.node_cost("a", "loader-sd15", loader, tried=True) == 2.0


def test_the_samples_of_keys_not_recorded_for_long_go(monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    """Most keys never come again (an output node's, keyed by its prompt's own filename
    prefix): beyond KEYS_KEPT, the samples of the one recorded least recently go (a prompt's
    nodes kept theirs for good, about a kilobyte a node run), and what it costs is its class's
    again; a key recorded again (a loader's) stays."""
    monkeypatch.setattr(node_costs, "KEYS_KEPT", 3)
    costs = NodeCosts()
    save = {"class_type": "SaveImage", "inputs": {}}

    def estimate(key: str) -> float:  # kept between samples, as placement asks it
        return costs.uncached_seconds("a", {"9": save}, {"9": key}, frozenset())

    costs.record("a", "loader-sd15", "CheckpointLoaderSimple", 3.0)
    costs.record("a", "save-1", "SaveImage", 1.0)
    assert estimate("save-1") == 1.0
    costs.record("a", "save-2", "SaveImage", 0.5)
    costs.record("a", "loader-sd15", "CheckpointLoaderSimple", 3.0)  # recorded again
    costs.record("a", "save-3", "SaveImage", 0.3)  # a fourth key: save-1's samples go
    class_cost = costs.cost("a", "save-new", "SaveImage")
    assert class_cost != 1.0
    assert costs.cost("a", "save-1", "SaveImage") == estimate("save-1") == class_cost
    assert costs.cost("a", "save-2", "SaveImage") == estimate("save-2") == 0.5
    costs.record("a", "save-4", "SaveImage", 0.3)  # save-2's go; the loader's stay
    assert costs.cost("a", "save-2", "SaveImage") == costs.cost("a", "save-new", "SaveImage")
    assert costs.cost("a", "loader-sd15", "CheckpointLoaderSimple") == 3.0


def test_a_key_no_other_prompt_has_keeps_no_samples_its_class_takes_them() -> None:
    """An output node's key as sent (its prompt's own filename prefix) is asked the cost of by
    nobody (placement weighs queued prompts' keys): its sample moves its class's estimate,
    and keeps no samples of its key (a kilobyte each, and they pushed the loaders' out)."""
    costs = NodeCosts()
    costs.record("a", "save-queued", "SaveImage", 1.0)
    costs.record("a", "save-sent-1", "SaveImage", 3.0, own=True)
    assert costs.cost("a", "save-sent-1", "SaveImage") == costs.cost("a", "new", "SaveImage") \
        == 2.0
    assert costs.cost("a", "save-queued", "SaveImage") == 1.0
    assert list(costs._by_key) == [("a", "save-queued")]


def test_a_backends_overhead_per_prompt_is_a_median_of_its_own_else_the_fleets() -> None:
    costs = NodeCosts()
    assert costs.overhead("a") == 0.0  # nothing known: as before overheads were counted
    for seconds in (0.02, 0.03, 5.0):  # one prompt held up by another client's
        costs.record_overhead("a", seconds)
    assert costs.overhead("a") == 0.03
    assert costs.overhead("new") == costs.overhead() == 0.03


def test_what_costs_keep_between_samples_is_what_they_would_work_out_afresh() -> None:
    """NodeCosts keeps what it worked out of each node for the claims after (placement weighs
    every job near the backlog's head at each): after every sample, first cache hit of a
    class and overhead, its estimates are a fresh NodeCosts' fed the same, on every backend,
    tried or not, whatever the cache holds."""
    prompt = {"1": {"class_type": "CheckpointLoaderSimple",
                    "inputs": {"ckpt_name": "sd15.safetensors"}},
              "2": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 1}},
              "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0]}}}
    keys = {"1": "loader-sd15", "2": "sampler-1", "3": "decode-1"}
    events: list[tuple[Any, ...]] = [
        ("record", "a", "sampler-1", "KSampler", 2.0),  # the class's first: guesses go
        ("record", "b", "sampler-2", "KSampler", 1.0),  # moves a's speed, not its samples
        ("record", "a", "loader-sd15", "CheckpointLoaderSimple", 3.0),  # a's own key
        ("served", "VAEDecode"),  # a try on it would find it cached
        ("record", "a", "loader-sd15", "CheckpointLoaderSimple", 9.0),  # its median moves
        ("record", "b", "decode-2", "VAEDecode", 0.5),
        ("overhead", "a", 0.04),
        ("overhead", "b", 0.02),
    ]

    def apply(costs: NodeCosts, event: tuple[Any, ...]) -> None:
        kind, *args = event
        tell: dict[str, Callable[..., None]] = {
            "record": costs.record, "served": costs.served, "overhead": costs.record_overhead}
        tell[kind](*args)

    def estimates(costs: NodeCosts) -> list[float]:
        return [figure for backend in ("a", "b", "c") for tried in (False, True)
                for held in (frozenset(), frozenset({"loader-sd15"}))
                for figure in (costs.uncached_seconds(backend, prompt, keys, held, tried=tried),
                               costs.overhead(backend))]

    kept = NodeCosts()
    for done, event in enumerate(events, 1):
        estimates(kept)  # worked out before the event, and kept
        apply(kept, event)
        fresh = NodeCosts()
        for earlier in events[:done]:
            apply(fresh, earlier)
        assert estimates(kept) == estimates(fresh), event
