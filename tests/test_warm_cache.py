"""What the gateway believes each backend's node cache holds: predicted from the prompts it
sends, checked against and corrected by `execution_cached`, shown in GET /backends.

Over real sockets: the service in process, simulated ComfyUI servers (whose cache is checked
against a real server's in test_replay.py), a prompt sent behind the gateway's back.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp

from comfyfleet.app import serving
from comfyfleet.comfy.cache import CachePolicy
from comfyfleet.comfy.prompts import isolate_outputs
from comfyfleet.execution.warm import PromptKeys, WarmCache
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.cache_probes import chain
from tests.support import wait_for_job


class Gateway:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base

    async def submit(self, model: str, seconds: float = 0.0, priority: int = 0,
                     steps: int = 1) -> str:
        body = {"workflow": "simulated_model",
                "params": {"model": model, "seconds": seconds, "steps": steps},
                "priority": priority}
        async with self.http.post(f"{self.base}/jobs", json=body) as response:
            job = await response.json()
        assert response.status == 202, job
        return str(job["id"])

    async def reached(self, job_id: str, status: str) -> dict[str, Any]:
        return await wait_for_job(self.http, self.base, job_id, status)

    async def finished(self, job_id: str) -> dict[str, Any]:
        return await self.reached(job_id, "succeeded")

    async def run(self, model: str, seconds: float = 0.0) -> dict[str, Any]:
        return await self.finished(await self.submit(model, seconds))

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, self.base + path, json=body) as response:
            assert response.status < 300, await response.text()
            return await response.json()

    async def cache(self) -> dict[str, Any]:
        async with self.http.get(f"{self.base}/backends") as response:
            (backend,) = await response.json()
        cache: dict[str, Any] = backend["cache"]
        return cache


def models(*letters: str) -> list[str]:
    return [f"SimulatedLoader.ckpt_name=model-{letter}.safetensors" for letter in letters]


async def behind_our_back(sim: SimulatedComfyUI, model: str) -> None:
    """Another client runs a prompt on the backend and waits for it to end."""
    prompt_id = str(uuid.uuid4())
    body = {"prompt": chain(model, 0.0, "other"), "prompt_id": prompt_id}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{sim.url}/prompt", json=body) as response:
            assert response.status == 200
        async with asyncio.timeout(10):
            while True:
                async with http.get(f"{sim.url}/history/{prompt_id}") as response:
                    if await response.json():
                        return
                await asyncio.sleep(0.05)  # polling a remote server: no event to wait on


async def test_the_model_follows_the_backend_and_is_corrected_by_execution_cached(
    settings: Settings
) -> None:
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [sim.url + "#gpu"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            gateway = Gateway(http, base + settings.route_prefix)
            await gateway.run("model-a.safetensors")
            assert await gateway.cache() == {
                "policy": "classic", "held_nodes": 3, "models": models("a"),
                "predictions": 1, "mispredictions": 0,
            }
            # The same model again: loader and work served from cache, as predicted.
            await gateway.run("model-a.safetensors")
            cache = await gateway.cache()
            assert (cache["predictions"], cache["mispredictions"]) == (2, 0)

            # Another client loads model c there: the backend holds c, not a. Our next
            # prompt on c is mispredicted (the loader served from cache, unseen by us) ...
            await behind_our_back(sim, "model-c.safetensors")
            await gateway.run("model-c.safetensors")
            cache = await gateway.cache()
            assert (cache["models"], cache["mispredictions"]) == (models("c"), 1)
            # ... and corrected: the one after is predicted right.
            await gateway.run("model-c.safetensors")
            cache = await gateway.cache()
            assert (cache["predictions"], cache["mispredictions"]) == (4, 1)

            # /free behind our back: what we believed held is not; believed again after.
            async with http.post(f"{sim.url}/free", json={"free_memory": True}) as response:
                assert response.status == 200
            await gateway.run("model-c.safetensors")
            await gateway.run("model-c.safetensors")
            cache = await gateway.cache()
            assert (cache["predictions"], cache["mispredictions"]) == (6, 2)


async def test_an_lru_backend_holds_several_models(settings: Settings) -> None:
    async with SimulatedComfyUI(cache=CachePolicy("lru", 20)) as sim:
        settings.comfyui_endpoints = [sim.url + "#gpu"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            gateway = Gateway(http, base + settings.route_prefix)
            for letter in "aba":
                await gateway.run(f"model-{letter}.safetensors")
            cache = await gateway.cache()
    assert cache["policy"] == "lru 20"
    assert cache["models"] == models("a", "b")
    assert (cache["predictions"], cache["mispredictions"]) == (3, 0)


def test_a_prompt_queued_now_finds_what_the_prompts_ahead_of_it_leave() -> None:
    """With one prompt running and one ready (MAX_INFLIGHT_PER_BACKEND=2), the next prompt
    there finds the cache as the prompts ahead of it leave it, not as it is now."""
    def keys(model: str, prefix: str) -> PromptKeys:
        return PromptKeys(chain(model, 1.0, prefix), frozenset())

    now_a, then_b = keys("model-a.safetensors", "x"), keys("model-b.safetensors", "y")
    classic = WarmCache(CachePolicy())
    classic.started(now_a, [])
    for node_id in now_a.keys:
        classic.ran(now_a, node_id)
    assert classic.held_after([]) == frozenset(now_a.keys.values())
    assert classic.held_after([now_a, then_b]) == frozenset(then_b.keys.values())
    lru = WarmCache(CachePolicy("lru", 100))
    lru.started(now_a, [])
    for node_id in now_a.keys:
        lru.ran(now_a, node_id)
    assert lru.held_after([then_b]) == frozenset([*now_a.keys.values(), *then_b.keys.values()])
    assert WarmCache(CachePolicy("none")).held_after([now_a]) == frozenset()


def test_what_a_backend_holds_now_follows_every_start_run_and_reconnect() -> None:
    """What a backend holds with nothing ahead (kept between changes: placement asks at every
    claim) is what its cache holds after each prompt's start, each node run, a reconnect."""
    now_a = PromptKeys(chain("model-a.safetensors", 1.0, "x"), frozenset())
    then_b = PromptKeys(chain("model-b.safetensors", 1.0, "y"), frozenset())
    cache = WarmCache(CachePolicy())
    assert cache.held_after([]) == frozenset()
    cache.started(now_a, [])
    ran: set[str] = set()
    for node_id, key in now_a.keys.items():
        assert cache.held_after([]) == ran
        cache.ran(now_a, node_id)
        ran.add(key)
    assert cache.held_after([]) == ran == frozenset(now_a.keys.values())
    cache.started(then_b, ["1"])  # its loader served, as the server says
    assert cache.held_after([]) == {then_b.keys["1"]}
    cache.reset(CachePolicy())
    assert cache.held_after([]) == frozenset()


def test_the_keys_of_a_prompt_as_sent_are_those_of_the_prompt_computed_again_where_it_changed(
) -> None:
    """The dispatcher's keys of a queued prompt serve for the prompt as sent (its saving nodes
    isolated): the same keys as computed afresh, a node downstream of a changed one
    included; and a key that matches nothing is a new one for each prompt followed."""
    prompt = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a"}},
        "3": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
        # A node that saves and passes its image on, and the nodes after it.
        "4": {"class_type": "SaveAndPass", "inputs": {"images": ["1", 0], "filename_prefix": "b"}},
        "5": {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "c"}},
    }
    queued = PromptKeys(prompt, frozenset({"SaveAndPass"}))
    sent = isolate_outputs(prompt, "prompt-1")
    afresh = PromptKeys(sent, frozenset({"SaveAndPass"}))
    copied = queued.of_copy(sent, frozenset({"SaveAndPass"}))
    assert copied.signatures == afresh.signatures
    assert list(copied.keys) == list(prompt)
    changed = {node for node in prompt if queued.signatures[node] != afresh.signatures[node]}
    assert changed == {"2", "4", "5", "6"}
    # Those, whose keys no other prompt has (the tracker keeps no samples of them); none of a
    # prompt keyed on its own.
    assert copied.changed == changed and not queued.changed and not afresh.changed
    assert copied.signatures["3"] is None and copied.keys["3"] != queued.keys["3"]
    # Keyed by id for other classes: computed afresh.
    other = queued.of_copy(sent, frozenset())
    assert other.signatures == PromptKeys(sent, frozenset()).signatures
    assert other.signatures["4"] != copied.signatures["4"]


class CountedNode(dict[str, Any]):
    """A node of a prompt that counts how often its fields are read."""

    reads = 0

    def get(self, key: str, default: Any = None) -> Any:
        CountedNode.reads += 1
        return super().get(key, default)


def test_the_keys_of_a_prompt_as_sent_read_only_the_nodes_it_changed() -> None:
    """What the keys of the queued prompt found of its nodes not changed (their immediate
    signatures, where their inputs link) serves for the prompt as sent: the tracker works its
    keys out for every job dispatched, and a prompt has many nodes a send does not change."""
    prompt: dict[str, Any] = {
        "1": CountedNode(class_type="EmptyImage",
                         inputs={"width": 8, "height": 8, "batch_size": 1, "color": 0}),
        "2": CountedNode(class_type="ImageInvert", inputs={"image": ["1", 0]}),
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "a"}},
    }
    queued = PromptKeys(prompt, frozenset())
    sent = isolate_outputs(prompt, "prompt-1")
    CountedNode.reads = 0
    copied = queued.of_copy(sent, frozenset())
    assert CountedNode.reads == 0
    assert copied.signatures == PromptKeys(sent, frozenset()).signatures
