"""A large output through comfyfleet: the service's memory growth and its throughput, against a
direct aiobotocore upload of the same bytes.

One simulated ComfyUI (in this process) pads its SaveImage output to `--size` bytes (a sparse
file: free to make and to read); `comfyfleet serve` runs as a process of its own against
embedded PostgreSQL and a moto S3 server, so that its RSS is its own. Per run:

- comfyfleet: one job, from POST /jobs?wait= until it answers succeeded; that is the /view
  download streamed into an S3 multipart upload. The process's peak RSS (VmHWM, reset just
  before the job) minus its RSS then is the growth.
- direct: the same file, read from the simulator's disk and uploaded by aiobotocore as a
  multipart upload with comfyfleet's part size and parts in flight: what S3 (moto here)
  takes without comfyfleet in between.

A warm-up job runs first; figures are medians of `--runs`, growth the largest seen.

Run from the repository root:  .venv/bin/python -m bench.output_streaming [--size 1G] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import bench_root, embedded_postgres, moto_s3, s3_client
from comfyfleet import db
from comfyfleet.sim import SimulatedComfyUI
from comfyfleet.storage.s3 import PART_CONCURRENCY, PART_SIZE
from tests.test_large_outputs import peak_rss, reset_peak_rss, run_job, s3_service

MIB = 1024 * 1024
WARM_UP_SIZE = 40 * MIB
JOB_WAIT_SECONDS = 300


async def direct_upload(s3: Any, bucket: str, key: str, path: Path) -> float:
    """Seconds to upload `path` as comfyfleet would, parts read from disk (no HTTP source)."""
    started = time.perf_counter()
    created = await s3.create_multipart_upload(Bucket=bucket, Key=key, ContentType="image/png")
    upload_id = created["UploadId"]
    slots = asyncio.Semaphore(PART_CONCURRENCY)
    etags: dict[int, str] = {}

    async def put(number: int, body: bytes) -> None:
        try:
            answer = await s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                          PartNumber=number, Body=body)
            etags[number] = answer["ETag"]
        finally:
            slots.release()

    uploads = []
    with path.open("rb") as source:
        number = 0
        while True:
            await slots.acquire()
            body = await asyncio.to_thread(source.read, PART_SIZE)
            if not body:
                break
            number += 1
            uploads.append(asyncio.create_task(put(number, body)))
    await asyncio.gather(*uploads)
    await s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]})
    return time.perf_counter() - started


async def run(size: int, runs: int, root: Path) -> dict[str, Any]:
    async with (
        embedded_postgres(root) as pg,
        moto_s3() as moto,
        s3_client(moto.endpoint) as s3,
        SimulatedComfyUI(data_dir=root / "sim", output_size=WARM_UP_SIZE) as sim,
        s3_service(db.embedded_url(pg), moto.endpoint, moto.bucket, sim.url, root / "data")
        as (service, api),
        aiohttp.ClientSession() as http,
    ):
        await run_job(http, api, JOB_WAIT_SECONDS)
        sim.faults.update({"output_size": size})
        service_seconds, direct_seconds, growths = [], [], []
        for _ in range(runs):
            baseline = reset_peak_rss(service.pid)
            started = time.perf_counter()
            job = await run_job(http, api, JOB_WAIT_SECONDS)
            service_seconds.append(time.perf_counter() - started)
            growths.append(peak_rss(service.pid) - baseline)
            (output,) = job["outputs"]
            head = await s3.head_object(Bucket=moto.bucket, Key=output["key"])
            assert head["ContentLength"] == size, head
            # The object is not needed again; moto keeps objects in memory.
            await s3.delete_object(Bucket=moto.bucket, Key=output["key"])
            # Every prompt writes into a folder named after it (isolate_outputs).
            (path,) = (root / "sim" / "output").rglob(
                f"{job['prompt_id']}/{output['filename']}")
            direct_seconds.append(await direct_upload(s3, moto.bucket, "direct.bin", path))
            await s3.delete_object(Bucket=moto.bucket, Key="direct.bin")
            path.unlink()
    service_median = statistics.median(service_seconds)
    direct_median = statistics.median(direct_seconds)
    return {
        "size_mib": size / MIB,
        "runs": runs,
        "comfyfleet_seconds": [round(s, 2) for s in service_seconds],
        "direct_seconds": [round(s, 2) for s in direct_seconds],
        "comfyfleet_mib_per_s": round(size / MIB / service_median, 1),
        "direct_mib_per_s": round(size / MIB / direct_median, 1),
        "throughput_ratio": round(direct_median / service_median, 3),
        "rss_growth_mib": [round(g / MIB, 1) for g in growths],
        "part_size_mib": PART_SIZE / MIB,
        "parts_in_flight": PART_CONCURRENCY,
    }


async def main(size: int, runs: int) -> None:
    print(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                      "cpus": os.cpu_count()}), flush=True)
    with bench_root() as root:
        print(json.dumps(await run(size, runs, root)), flush=True)


def parse_size(text: str) -> int:
    units = {"k": 1024, "m": MIB, "g": 1024 * MIB}
    multiple = units.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if multiple > 1 else text) * multiple)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1024 * MIB,
                        help="output size, e.g. 1G or 300M (default 1G)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.size, args.runs))
