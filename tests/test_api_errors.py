"""Bad input on the job path gets a clear 4xx JSON error, never a 500."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest

from comfyfleet.app import serving
from comfyfleet.settings import Settings
from tests.support import png


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[str]:
    async with serving(settings) as base:
        yield base + settings.route_prefix


async def post(api: str, body: object) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.post(f"{api}/jobs", json=body) as response:
        return response.status, await response.json()


def error_of(body: dict[str, object]) -> dict[str, object]:
    error = body["error"]
    assert isinstance(error, dict)
    return error


async def test_unknown_workflow_is_422_naming_the_known_ones(api: str) -> None:
    status, body = await post(api, {"workflow": "nope", "params": {}})
    assert status == 422
    assert error_of(body)["type"] == "unknown_workflow"
    assert "invert" in str(error_of(body)["message"])


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"width": "wide"}, "width"),
        ({"height": 0}, "height"),
        ({"color": 2**24}, "color"),
        ({"width": 1.5}, "width"),
        ({"shade": 1}, "shade"),
        ({"width": 10**400}, "width"),  # too large for a float
        ({"width": "1" * 400}, "width"),  # the same as form text
        ({"width": -(10**400)}, "width"),
    ],
)
async def test_bad_parameter_is_422_naming_it(
    api: str, params: dict[str, object], named: str
) -> None:
    status, body = await post(api, {"workflow": "invert", "params": params})
    assert status == 422
    error = error_of(body)
    assert error["type"] == "invalid_params"
    problems = error["params"]
    assert isinstance(problems, dict)
    assert set(problems) == {named}
    assert named in str(error["message"])


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"cfg": 10**400}, "cfg"),
        ({"cfg": "1e400"}, "cfg"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 10**400}, "seed"),
    ],
)
async def test_numbers_beyond_any_range_are_422_naming_them(
    api: str, params: dict[str, object], named: str
) -> None:
    status, body = await post(api, {"workflow": "sd15_txt2img",
                                    "params": {"prompt": "a cat", **params}})
    assert status == 422, body
    problems = error_of(body)["params"]
    assert isinstance(problems, dict)
    assert set(problems) == {named}


async def test_the_largest_seed_is_kept_exactly(api: str) -> None:
    seed = 2**64 - 1  # a float would make it 2**64, over the maximum
    status, job = await post(api, {"workflow": "sd15_txt2img",
                                   "params": {"prompt": "a cat", "seed": seed}})
    assert status == 202, job
    params = job["params"]
    assert isinstance(params, dict)
    assert params["seed"] == seed


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"workflow": "invert", "params": []},
        {"workflow": "invert", "callback_url": "not a url"},
        {"workflow": "invert", "priority": "high"},
        [1, 2],
        "just a string",
    ],
)
async def test_malformed_request_is_422(api: str, body: object) -> None:
    status, answer = await post(api, body)
    assert status == 422
    assert error_of(answer)["type"] == "invalid_request"


async def test_body_that_is_not_json_is_422(api: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(
        f"{api}/jobs", data=b"{nope", headers={"content-type": "application/json"}
    ) as response:
        assert response.status == 422
        assert error_of(await response.json())["type"] == "invalid_request"


async def test_unknown_and_malformed_job_ids(api: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{api}/jobs/{uuid.uuid4()}") as response:
            assert response.status == 404
            assert error_of(await response.json())["type"] == "job_not_found"
        async with http.get(f"{api}/jobs/not-a-uuid") as response:
            assert response.status == 422


async def test_queued_job_is_recorded_and_idempotent_by_client_task_id(api: str) -> None:
    request = {"workflow": "invert", "params": {"width": 32}, "client_task_id": "order-17"}
    status, first = await post(api, request)
    assert status == 202
    assert first["status"] == "queued"
    assert first["params"] == {"width": 32, "height": 512, "color": 0}
    status, again = await post(api, request)
    assert status == 200
    assert again["id"] == first["id"]
    async with aiohttp.ClientSession() as http, http.get(f"{api}/jobs/{first['id']}") as got:
        assert got.status == 200
        assert (await got.json())["client_task_id"] == "order-17"


async def test_health_and_readiness(settings: Settings) -> None:
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as response:
            assert response.status == 200
        async with http.get(f"{base}/readyz") as response:
            body = await response.json()
            assert response.status == 200
            assert body["database"] is True
            assert body["storage"] is True


def named_fields(body: dict[str, object]) -> set[str]:
    """The fields an error names: in `problems`, or as its one `field`."""
    error = error_of(body)
    if "field" in error:
        return {str(error["field"])}
    problems = error["problems"]
    assert isinstance(problems, list)
    return {problem["field"] for problem in problems}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"workflow": "invert", "client_task_id": "a\u0000b"}, "client_task_id"),
        ({"workflow": "sd15_txt2img", "params": {"prompt": "a cat\u0000"}}, "params.prompt"),
    ],
)
async def test_a_nul_character_is_422_naming_the_field(
    api: str, body: dict[str, object], field: str
) -> None:
    """PostgreSQL stores no NUL character, in text or jsonb: the client hears which field."""
    status, answer = await post(api, body)
    assert status == 422, answer
    assert error_of(answer)["type"] == "invalid_request"
    assert named_fields(answer) == {field}


async def test_a_nul_character_in_a_form_field_or_query_is_422_naming_it(api: str) -> None:
    form = aiohttp.FormData({"client_task_id": "a\u0000b", "width": "16"},
                            default_to_multipart=True)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{api}/workflows/invert/jobs", data=form) as response:
            assert response.status == 422
            assert named_fields(await response.json()) == {"client_task_id"}
        async with http.get(f"{api}/jobs?workflow=a%00b") as response:
            assert response.status == 422
            assert named_fields(await response.json()) == {"workflow"}


async def test_a_new_backend_that_cannot_be_stored_is_422_naming_the_field(api: str) -> None:
    cases = [
        ({"url": "127.0.0.1:1/a\u0000b"}, "url"),
        ({"url": "127.0.0.1:1", "name": "gpu\u0000"}, "name"),
        ({"url": "127.0.0.1:1/" + "a" * 488}, "url"),  # 500 characters, 507 with http://
        ({"url": "127.0.0.1:1", "name": "gpu" * 50}, "name"),
    ]
    async with aiohttp.ClientSession() as http:
        for backend, field in cases:
            async with http.post(f"{api}/backends", json=backend) as response:
                assert response.status == 422, backend
                assert named_fields(await response.json()) == {field}
        async with http.get(f"{api}/backends") as listed:
            assert await listed.json() == []


def invert_graph(filename_prefix: str) -> dict[str, object]:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage",
              "inputs": {"images": ["2", 0], "filename_prefix": filename_prefix}},
    }


async def test_a_nul_character_on_the_v2_surface_is_422_in_its_envelope(api: str) -> None:
    v2 = api.removesuffix("/api/v1") + "/api/v2"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{v2}/jobs", json={"workflow": invert_graph("a\u0000b")}) as got:
            assert got.status == 422
            error = (await got.json())["error"]
        assert error["code"] == "invalid_request"
        assert [p["field"] for p in error["details"]["problems"]] == [
            "workflow.3.inputs.filename_prefix"]
        async with http.get(f"{v2}/jobs?metadata[shop]=a%00b") as got:
            assert got.status == 422
            error = (await got.json())["error"]
        assert [p["field"] for p in error["details"]["problems"]] == ["metadata.shop"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/jobs", '{"workflow": "sd15_txt2img", "params": {"prompt": "a cat\\ud800"}}',
         "params.prompt"),
        ("/api/v1/jobs", '{"workflow": "invert", "params": {"\\udfff": 1}}', "params.\\udfff"),
        ("/api/v1/workflows/sd15_txt2img/jobs", '{"params": {"prompt": "\\ud800"}}',
         "params.prompt"),
        ("/api/v1/jobs", b'{"workflow": "blur_image", "params": {"image": "\xed\xa0\x80"}}',
         "params.image"),  # the surrogate's bytes, which Python's JSON parser lets through
        ("/api/v2/jobs", '{"workflow": {"1": {"class_type": "SaveImage", "inputs": '
                         '{"filename_prefix": "\\ud800"}}}}', "workflow.1.inputs.filename_prefix"),
        ("/api/v2/jobs", '{"workflow": {}, "metadata": {"\\ud800": "x"}}', "metadata.\\ud800"),
    ],
)
async def test_a_lone_surrogate_is_422_naming_the_field(
    api: str, path: str, body: str | bytes, field: str
) -> None:
    """JSON can spell a UTF-16 surrogate with no partner: no text a database, a hash or an
    answer can encode, so it is the client's error wherever it is (a 500 before)."""
    base = api.removesuffix("/api/v1")
    data = body.encode() if isinstance(body, str) else body
    async with aiohttp.ClientSession() as http, http.post(
            base + path, data=data, headers={"Content-Type": "application/json"}) as response:
        assert response.status == 422, await response.text()
        error = (await response.json())["error"]
    problems = error["problems"] if "problems" in error else error["details"]["problems"]
    assert [problem["field"] for problem in problems] == [field]
    assert "lone surrogate" in problems[0]["message"]


async def test_a_surrogate_pair_is_text(api: str) -> None:
    cat = "a \U0001f408"  # sent as the pair \ud83d\udc08
    status, job = await post(api, {"workflow": "sd15_txt2img", "params": {"prompt": cat}})
    assert status == 202, job
    params = job["params"]
    assert isinstance(params, dict) and params["prompt"] == cat


async def test_a_nul_character_in_an_asset_is_422_naming_the_field(api: str) -> None:
    """The v2 asset routes write what the client names its asset: a NUL character there is
    the client's error too (a 500 before), and nothing is kept."""
    v2 = api.removesuffix("/api/v1") + "/api/v2"
    good = {"content_type": "image/png", "file_path": "cat.png", "tags": "pets"}
    async with aiohttp.ClientSession() as http:
        for field in good:
            form = aiohttp.FormData()
            form.add_field("file", png(), filename="cat.png", content_type="image/png")
            for name, value in good.items():
                form.add_field(name, value + "\u0000" if name == field else value)
            async with http.post(f"{v2}/assets", data=form) as response:
                assert response.status == 422, await response.text()
                problems = (await response.json())["error"]["details"]["problems"]
            assert [problem["field"] for problem in problems] == [
                "tags.0" if field == "tags" else field]

        form = aiohttp.FormData()
        form.add_field("file", png(), filename="cat.png", content_type="image/png")
        for name, value in good.items():
            form.add_field(name, value)
        async with http.post(f"{v2}/assets", data=form) as response:
            assert response.status == 201  # new bytes: the refused uploads kept nothing
            digest = (await response.json())["hash"]
        async with http.post(f"{v2}/assets/from-hash", json={
                "hash": digest, "file_path": "dog\u0000.png"}) as response:
            assert response.status == 422, await response.text()
            problems = (await response.json())["error"]["details"]["problems"]
        assert [problem["field"] for problem in problems] == ["file_path"]
