"""CPU per output stored in S3, through the storage's own `put_stream`, as the collector
stores a finished job's image.

One process, a moto S3 server in its own process (it answers `Connection: close`, so every
PUT opens a new connection: that part is the benchmark's, not S3's); `--puts` objects of
`--size` bytes (a 64x64 PNG is about 600), `--concurrency` at once. The CPU time this process
spends (`time.process_time`: waiting for moto or for the CPU is not counted) is divided by
the puts, over `--rounds` rounds; the SDK's own `put_object` of the same bytes is measured in
the same rounds, for scale. Run it on two commits to compare them.

Run from the repository root:  .venv/bin/python -m bench.storage_put [--puts 500]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import uvloop

from bench.harness import moto_s3, print_table, s3_client
from comfyfleet.settings import Settings
from comfyfleet.storage import S3Storage
from tests.conftest import S3_CREDENTIALS


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def cpu_ms_per_call(calls: int, concurrency: int,
                          call: Callable[[int], Awaitable[object]]) -> float:
    numbers = iter(range(calls))

    async def worker() -> None:
        for n in numbers:
            await call(n)

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - started) / calls * 1000


async def main(puts: int, size: int, concurrency: int, rounds: int) -> None:
    print(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                      "cpus": os.cpu_count(), "load_average": os.getloadavg()}), flush=True)
    body = bytes(n % 251 for n in range(size))
    async with moto_s3() as s3:
        settings = Settings(_env_file=None, s3_bucket=s3.bucket, s3_endpoint_url=s3.endpoint,
                            aws_access_key_id=S3_CREDENTIALS["aws_access_key_id"],
                            aws_secret_access_key=S3_CREDENTIALS["aws_secret_access_key"])
        storage = await S3Storage.open(settings)
        try:
            async with s3_client(s3.endpoint) as client:
                async def stored(n: int) -> int:
                    return await storage.put_stream(f"out/{n}/3_0.png", _chunks(body),
                                                    "image/png")

                async def sdk(n: int) -> object:
                    return await client.put_object(Bucket=s3.bucket, Key=f"sdk/{n}/3_0.png",
                                                   Body=io.BytesIO(body),
                                                   ContentType="image/png")

                await cpu_ms_per_call(50, concurrency, stored)  # warm up both
                await cpu_ms_per_call(50, concurrency, sdk)
                rows = []
                for round_ in range(1, rounds + 1):
                    rows.append((round_, f"{await cpu_ms_per_call(puts, concurrency, stored):.2f}",
                                 f"{await cpu_ms_per_call(puts, concurrency, sdk):.2f}"))
        finally:
            await storage.close()
    print_table(["round", "S3Storage.put_stream, ms CPU", "SDK put_object, ms CPU"], rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--puts", type=int, default=500)
    parser.add_argument("--size", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    uvloop.run(main(args.puts, args.size, args.concurrency, args.rounds))  # as the service
