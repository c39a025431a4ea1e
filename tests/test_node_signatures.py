"""ComfyUI 0.3.64's cache keys and cache policies (comfy/signatures.py, comfy/cache.py).

The facts come from ComfyUI's comfy_execution/caching.py, execution.py and main.py at v0.3.64;
test_sim_cache.py and the replay tests check them against a real server's transcripts.
"""

from __future__ import annotations

import gc
import hashlib
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from comfyfleet.comfy.cache import CachePolicy, NodeCache
from comfyfleet.comfy.capabilities import Capabilities
from comfyfleet.comfy.signatures import (
    NEVER_EQUAL,
    _canonical,
    _Unequal,
    is_link,
    node_signatures,
    predicted_signatures,
)

FIXTURES = Path(__file__).parent / "fixtures" / "comfyui-0.3.64"

JSON = dict[str, Any]


def plain(prompt: JSON, *, volatile: frozenset[str] = frozenset(),
          by_id: frozenset[str] = frozenset()) -> dict[str, str | None]:
    def is_changed(node_id: str, node: Mapping[str, Any]) -> object:
        return NEVER_EQUAL if node["class_type"] in volatile else False

    return node_signatures(prompt, is_changed=is_changed, keyed_by_id=lambda c: c in by_id)


def chain(model: str = "model-a.safetensors", seconds: float = 1.0, prefix: str = "out",
          ids: tuple[str, str, str] = ("1", "2", "3")) -> JSON:
    loader, work, save = ids
    return {
        loader: {"class_type": "SimulatedLoader", "inputs": {"ckpt_name": model}},
        work: {"class_type": "SimulatedWork",
               "inputs": {"image": [loader, 0], "seconds": seconds, "steps": 2}},
        save: {"class_type": "SaveImage",
               "inputs": {"images": [work, 0], "filename_prefix": prefix}},
    }


def test_same_shape_and_values_same_key_whatever_the_node_ids() -> None:
    first = plain(chain())
    renumbered = plain(chain(ids=("30", "10", "20")))
    assert [first[n] for n in ("1", "2", "3")] == [renumbered[n] for n in ("30", "10", "20")]
    assert len(set(first.values())) == 3


def test_keys_are_made_without_reference_cycles() -> None:
    """Keys are made for every job placed: what making them leaves goes by reference counts,
    not by the garbage collector's passes (a recursive closure was a cycle a node)."""
    gc.collect()
    gc.disable()
    try:
        assert len(set(plain(chain()).values())) == 3
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_a_changed_input_changes_its_node_and_everything_downstream_only() -> None:
    base = plain(chain())
    slower = plain(chain(seconds=2.0))
    assert slower["1"] == base["1"]  # the loader is shared: the partial-graph hit
    assert slower["2"] != base["2"] and slower["3"] != base["3"]
    other_model = plain(chain(model="model-b.safetensors"))
    assert all(other_model[n] != base[n] for n in base)


def test_numbers_compare_by_value_as_python_does() -> None:
    assert plain(chain(seconds=1))["3"] == plain(chain(seconds=1.0))["3"]
    as_bool = chain()
    as_bool["2"]["inputs"]["steps"] = True
    as_int = chain()
    as_int["2"]["inputs"]["steps"] = 1
    assert plain(as_bool)["2"] == plain(as_int)["2"]
    assert plain(chain(seconds=1.5))["2"] != plain(chain(seconds=1.25))["2"]
    assert plain(chain(prefix="1"))["3"] != plain(chain(prefix=1))["3"]  # type: ignore[arg-type]


def test_links_are_positions_in_the_ancestry_not_a_hash_of_the_parents() -> None:
    """Two identical parents are two ancestors; one parent linked twice is one: ComfyUI's keys
    differ, though a hash of each parent's key would make them equal."""
    def batch(second_parent: str) -> JSON:
        return {
            "1": {"class_type": "EmptyImage",
                  "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "EmptyImage",
                  "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "3": {"class_type": "ImageBatch",
                  "inputs": {"image1": ["1", 0], "image2": [second_parent, 0]}},
        }

    two_parents, one_parent = plain(batch("2")), plain(batch("1"))
    assert two_parents["1"] == two_parents["2"] == one_parent["1"]
    assert two_parents["3"] != one_parent["3"]


def test_every_input_counts_declared_or_not_and_the_output_index() -> None:
    extra = chain()
    extra["1"]["inputs"]["note"] = "not declared"
    assert plain(extra)["1"] != plain(chain())["1"]
    second_output = chain()
    second_output["2"]["inputs"]["image"] = ["1", 1]
    assert plain(second_output)["2"] != plain(chain())["2"]


def test_a_never_equal_is_changed_poisons_the_node_and_its_descendants() -> None:
    keys = plain(chain(), volatile=frozenset({"SimulatedWork"}))
    assert keys["1"] is not None
    assert keys["2"] is None and keys["3"] is None


def test_classes_keyed_by_node_id() -> None:
    """UNIQUE_ID hidden input or NOT_IDEMPOTENT: the node id is part of the key."""
    by_id = frozenset({"SimulatedWork"})
    assert plain(chain(), by_id=by_id)["1"] == plain(chain(ids=("1", "9", "3")), by_id=by_id)["1"]
    assert plain(chain(), by_id=by_id)["2"] != plain(chain(ids=("1", "9", "3")), by_id=by_id)["9"]
    assert plain(chain(), by_id=by_id)["2"] == plain(chain(), by_id=by_id)["2"]


def test_a_link_to_a_missing_node_matches_nothing() -> None:
    prompt = chain()
    prompt["2"]["inputs"]["image"] = ["404", 0]
    keys = plain(prompt)
    assert keys["2"] is None and keys["3"] is None and keys["1"] is not None


def test_policy_from_argv_as_main_py_reads_it() -> None:
    base = ["main.py", "--listen", "127.0.0.1"]
    assert CachePolicy.from_argv(base) == CachePolicy("classic")
    assert CachePolicy.from_argv([*base, "--cache-lru", "12"]) == CachePolicy("lru", 12)
    assert CachePolicy.from_argv([*base, "--cache-lru=3"]) == CachePolicy("lru", 3)
    assert CachePolicy.from_argv([*base, "--cache-lru", "0"]) == CachePolicy("classic")
    assert CachePolicy.from_argv([*base, "--cache-none"]) == CachePolicy("none")
    for policy in (CachePolicy("lru", 5), CachePolicy("none"), CachePolicy()):
        assert CachePolicy.from_argv([*base, *policy.argv()]) == policy


def run(cache: NodeCache[str], keys: list[str]) -> list[str]:
    """One prompt: what it finds cached, then every key it has is held."""
    cache.start_prompt(keys)
    found = [key for key in keys if key in cache]
    for key in keys:
        cache.set(key, key)
    return found


def test_classic_keeps_only_the_previous_prompts_results() -> None:
    cache: NodeCache[str] = NodeCache(CachePolicy())
    assert run(cache, ["a", "w1", "s1"]) == []
    assert run(cache, ["a", "w2", "s2"]) == ["a"]
    assert run(cache, ["b", "w3", "s3"]) == []
    assert run(cache, ["a", "w1", "s1"]) == []
    # Nothing is kept of the results dropped: not their generations either.
    for index in range(100):
        run(cache, ["a", f"w{index}", f"s{index}"])
    assert sorted(cache._used) == sorted(key for key, _ in cache.items()) == ["a", "s99", "w99"]


def test_lru_drops_whole_generations_oldest_first_past_its_size() -> None:
    cache: NodeCache[str] = NodeCache(CachePolicy("lru", 4))
    assert run(cache, ["a", "x1"]) == []
    assert run(cache, ["b", "x2"]) == []
    assert run(cache, ["a", "x3"]) == ["a"]  # 4 held at its start: nothing dropped
    # 5 held: the start of the next prompt drops generation 1 (x1; "a" was used again in 3).
    assert run(cache, ["c", "x4"]) == []
    assert sorted(key for key, _ in cache.items()) == ["a", "b", "c", "x2", "x3", "x4"]
    # 6 held: generation 2 goes (x2; b is used again now), then 3 (a, x3): 3 left.
    assert run(cache, ["b"]) == ["b"]
    assert sorted(key for key, _ in cache.items()) == ["b", "c", "x4"]


def test_none_keeps_nothing_and_free_drops_everything() -> None:
    none: NodeCache[str] = NodeCache(CachePolicy("none"))
    assert run(none, ["a"]) == [] and run(none, ["a"]) == []
    lru: NodeCache[str] = NodeCache(CachePolicy("lru", 10))
    run(lru, ["a"])
    lru.clear()
    assert run(lru, ["a"]) == []


def test_prediction_knows_the_core_classes_that_change_every_run_and_use_their_id() -> None:
    info = json.loads((FIXTURES / "object_info_modelfree_subset.json").read_text("utf-8"))
    keyed_by_id = Capabilities.from_object_info(info).keyed_by_id
    assert "GetImageSize" in keyed_by_id and "ImageInvert" not in keyed_by_id
    prompt = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
        "3": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
    }
    keys = predicted_signatures(prompt, keyed_by_id)
    assert keys["1"] is not None and keys["2"] is None
    moved = {"1": prompt["1"], "9": prompt["3"]}
    assert predicted_signatures(moved, keyed_by_id)["9"] != keys["3"]


def reference_key(prompt: JSON, node_id: str, by_id: frozenset[str]) -> str | None:
    """The module docstring's definition, written out plainly: the canonical encoding of the
    node's and its ancestors' immediate signatures, all of it at once, hashed."""
    ancestors: list[str] = []

    def visit(current: str) -> None:
        node = prompt.get(current)
        for _, value in sorted(node["inputs"].items()) if isinstance(node, dict) else []:
            if is_link(value) and value[0] not in ancestors:
                ancestors.append(value[0])
                visit(value[0])

    visit(node_id)
    order = {ancestor: index for index, ancestor in enumerate(ancestors)}
    parts: list[Any] = []
    for member in [node_id, *ancestors]:
        node = prompt.get(member)
        if not isinstance(node, dict) or node["class_type"] == "SaveImageWebsocket":
            return None
        immediate = [node["class_type"], False] + ([member] if node["class_type"] in by_id else [])
        parts.append(immediate + [
            [name, ["ANCESTOR", order[value[0]], value[1]] if is_link(value) else value]
            for name, value in sorted(node["inputs"].items())])
    try:
        text = json.dumps(_canonical(parts), separators=(",", ":"), ensure_ascii=False)
    except _Unequal:
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def test_keys_are_the_definitions_byte_for_byte() -> None:
    """Each node's text is made once and joined into every key it is part of: the keys stay
    those of the plain definition, for the shipped workflows and for odd values and shapes."""
    workflows = Path(__file__).parent.parent / "workflows"
    prompts = [json.loads(path.read_text("utf-8")) for path in sorted(workflows.glob("*.json"))
               if not path.name.endswith((".params.json", "_times.json"))]
    rng = random.Random(17)
    odd = [1, 1.0, True, -2.5, 3e300, float("nan"), float("inf"), "é\u2028\"\\", None,
           [1, [2.0, "a"]], {"b": 1, "a": [True]}, {"x": float("nan")}]
    for _ in range(300):
        ids = [str(rng.randint(1, 12)) for _ in range(rng.randint(1, 8))]
        prompts.append({node_id: {
            "class_type": rng.choice(["A", "B", "Keyed", "SaveImageWebsocket"]),
            "inputs": {rng.choice(["a", "b", "image", "é"]):
                       [rng.choice([*ids, "missing"]), rng.choice([0, 1, 1.0, float("nan")])]
                       if rng.random() < 0.5 else rng.choice(odd) for _ in range(4)}}
            for node_id in ids})
    matching_nothing = 0
    for prompt in prompts:
        for by_id in (frozenset(), frozenset({"Keyed", "SaveImage"})):
            keys = predicted_signatures(prompt, by_id)
            assert keys == {node_id: reference_key(prompt, node_id, by_id) for node_id in prompt}
            matching_nothing += list(keys.values()).count(None)
    assert 0 < matching_nothing < 2 * sum(len(prompt) for prompt in prompts)
