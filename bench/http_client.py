"""CPU per request of the hot path's HTTP requests, aiohttp's client (as the code before the
lean client made them) beside the lean client (http_client.py, as the code makes them now),
in one process, taking turns, against servers in processes of their own.

The requests, one at a time: POST /prompt of the benchmarks' job and GET /view of one
of its outputs (a PNG of a few hundred bytes) on a simulated ComfyUI (`comfyfleet sim`); the
whole-object PUT of that many bytes, SigV4-signed, to S3 on moto (which answers `Connection:
close`: every PUT of either client opens a connection); a webhook-shaped POST (1 KiB of
signed JSON) to the simulator's POST /interrupt, an aiohttp handler answering 200. The CPU
time of this process (`time.process_time`: waiting on a server or for the CPU is not counted)
is divided by the requests, in `--rounds` rounds, old and new in turns.

Run from the repository root:  .venv/bin/python -m bench.http_client [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import uvloop
from botocore.credentials import ReadOnlyCredentials

from bench.harness import moto_s3, print_table, sim_fleet, workflow_job
from comfyfleet.comfy.client import ComfyClient
from comfyfleet.comfy.prompts import output_items
from comfyfleet.http_client import HttpClient, Timeouts
from comfyfleet.storage.s3 import _amz_date, _signed_put_headers
from comfyfleet.webhooks.delivery import WebhookSender
from comfyfleet.webhooks.signing import new_secret, signed_headers
from tests.conftest import S3_CREDENTIALS

# The aiohttp requests as the code before the lean client made them (comfy/client.py,
# storage/s3.py `_put`, webhooks/delivery.py).
OLD_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=5)
OLD_VIEW_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
CHUNK_BYTES = 1024 * 1024


async def cpu_us_per_call(calls: int, call: Callable[[int], Awaitable[object]]) -> float:
    started = time.process_time()
    for n in range(calls):
        await call(n)
    return (time.process_time() - started) / calls * 1e6


async def main(requests: int, rounds: int) -> None:
    print(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                      "cpus": os.cpu_count(), "load_average": os.getloadavg()}), flush=True)
    prompt = workflow_job()[1]
    secret = new_secret()
    credentials = ReadOnlyCredentials(S3_CREDENTIALS["aws_access_key_id"],
                                      S3_CREDENTIALS["aws_secret_access_key"], None)
    async with sim_fleet(1) as sims, moto_s3() as s3, HttpClient() as lean, \
            aiohttp.ClientSession() as session:
        sim = sims.urls[0]
        client = ComfyClient(sim, session, lean)
        sender = WebhookSender(secret, timeout=10, allow_private=True, concurrency=10)
        old_put = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=10),
            timeout=aiohttp.ClientTimeout(sock_connect=60, sock_read=60),
            cookie_jar=aiohttp.DummyCookieJar())
        old_webhooks = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=10),
                                             timeout=aiohttp.ClientTimeout(total=10))
        client_id = f"bench-{uuid.uuid4().hex}"
        prompt_id = str(uuid.uuid4())
        await client.queue_prompt(prompt, prompt_id=prompt_id, client_id=client_id)
        while (entry := await client.history(prompt_id)) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        (image,), _ = output_items(entry.get("outputs"))
        async with client.view(image.filename, image.subfolder, image.type,
                               CHUNK_BYTES) as chunks:
            png = b"".join([chunk async for chunk in chunks])
        put_path = f"/{s3.bucket}/"
        put_url = s3.endpoint + put_path
        put_host = put_url.split("/")[2]
        event = json.dumps({"type": "job.succeeded", "data": {"outputs": ["x" * 900]}}).encode()

        async def prompt_old(_: int) -> object:
            body = {"prompt": prompt, "prompt_id": str(uuid.uuid4()), "client_id": client_id}
            async with session.post(sim + "/prompt", json=body, timeout=OLD_TIMEOUT) as response:
                return await response.json(content_type=None)

        async def prompt_new(_: int) -> object:
            return await client.queue_prompt(prompt, prompt_id=str(uuid.uuid4()),
                                             client_id=client_id)

        async def view_old(_: int) -> object:
            params = {"filename": image.filename, "subfolder": image.subfolder,
                      "type": image.type}
            response = await session.get(sim + "/view", params=params, timeout=OLD_VIEW_TIMEOUT)
            try:
                return [chunk async for chunk in response.content.iter_chunked(CHUNK_BYTES)]
            finally:
                response.release()

        async def view_new(_: int) -> object:
            async with client.view(image.filename, image.subfolder, image.type,
                                   CHUNK_BYTES) as chunks:
                return [chunk async for chunk in chunks]

        def put_headers(key: str) -> tuple[str, dict[str, str]]:
            headers = _signed_put_headers(put_path + key, put_host, "image/png",
                                          hashlib.sha256(png).hexdigest(), credentials,
                                          "us-east-1", _amz_date(int(time.time())))
            return put_url + key, headers

        async def put_old(n: int) -> object:
            url, headers = put_headers(f"old/{n}.png")
            async with old_put.put(url, data=memoryview(png), headers=headers) as response:
                assert response.status == 200, response.status
                return None

        async def put_new(n: int) -> object:
            url, headers = put_headers(f"new/{n}.png")
            async with lean.request("PUT", url, body=memoryview(png), headers=headers,
                                    timeouts=Timeouts(connect=60, read=60)) as response:
                assert response.status == 200, response.status
                return await response.read()

        async def webhook_old(_: int) -> object:
            headers = signed_headers(secret, f"msg_{uuid.uuid4().hex}", event)
            async with old_webhooks.post(sim + "/interrupt", data=event, headers=headers,
                                         allow_redirects=False) as response:
                return await response.content.read(1024)

        async def webhook_new(_: int) -> object:
            result = await sender.send(sim + "/interrupt", f"msg_{uuid.uuid4().hex}", event)
            assert result.delivered, result
            return result

        kinds: dict[str, tuple[Callable[[int], Awaitable[object]],
                               Callable[[int], Awaitable[object]]]] = {
            "POST /prompt": (prompt_old, prompt_new),
            "GET /view": (view_old, view_new),
            "S3 PUT (moto: a new connection each)": (put_old, put_new),
            "webhook POST": (webhook_old, webhook_new),
        }
        figures: dict[str, dict[str, list[float]]] = {
            kind: {"old": [], "new": []} for kind in kinds}
        try:
            for old, new in kinds.values():  # warm up both
                await cpu_us_per_call(50, old)
                await cpu_us_per_call(50, new)
            for round_ in range(rounds):
                for kind, (old, new) in kinds.items():
                    order: list[tuple[str, Any]] = [("old", old), ("new", new)]
                    for name, call in order if round_ % 2 == 0 else order[::-1]:
                        figures[kind][name].append(await cpu_us_per_call(requests, call))
        finally:
            await sender.close()
            await old_put.close()
            await old_webhooks.close()
    rows = []
    for kind, by_client in figures.items():
        old_us, new_us = statistics.median(by_client["old"]), statistics.median(by_client["new"])
        rows.append((kind, " / ".join(f"{v:.0f}" for v in by_client["old"]),
                     " / ".join(f"{v:.0f}" for v in by_client["new"]),
                     f"{old_us - new_us:.0f} ({(old_us - new_us) / old_us:.0%})"))
    print_table(["request", "aiohttp, us CPU per request, each round",
                 "lean client, each round", "saved, median"], rows)
    print(json.dumps({"load_average_at_end": os.getloadavg()}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="per client, per round")
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    uvloop.run(main(arguments.requests, arguments.rounds))
