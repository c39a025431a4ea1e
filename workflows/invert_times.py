"""Service function of the `invert_times` sample: what its template cannot say by itself.

- a derived value: the width and height come from `size` and `shape`;
- a graph shaped by a parameter: the template's one ImageInvert node becomes a chain of
  `times` of them (none at all for 0).

`template` is invert_times.json with the parameters already filled in (here only `$color`),
a fresh copy for each job; return the API-format prompt to run.
"""

from typing import Any

ASPECTS = {"square": (1, 1), "landscape": (16, 9), "portrait": (9, 16)}


def build(params: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    across, down = ASPECTS[params["shape"]]
    longer = max(across, down)
    template["1"]["inputs"]["width"] = params["size"] * across // longer
    template["1"]["inputs"]["height"] = params["size"] * down // longer
    del template["2"]
    image = ["1", 0]
    for step in range(params["times"]):
        node_id = str(10 + step)
        template[node_id] = {"class_type": "ImageInvert", "inputs": {"image": image}}
        image = [node_id, 0]
    template["3"]["inputs"]["images"] = image
    return template
