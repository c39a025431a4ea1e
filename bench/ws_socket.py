"""CPU per job of reading a backend's websocket over a real socket: aiohttp's client websocket
(as the sessions read it before comfy/websocket.py) beside the lean client, taking turns.

A loopback server in a process of its own sends, per job, the text frames of a zero-duration
cached prompt as the simulator words and batches them (`status` x2; `execution_start`,
`execution_cached`, `executed`, `progress_state`, `execution_success`; `status`, `executing`
with no node), in three writes `--pause` seconds apart, as the simulator's publisher writes
them. The reader takes each frame as `BackendSession._read` does (progress_state left
undecoded, the rest parsed into messages) and hands them to no one. CPU time of this process
(`time.process_time`), per job, on uvloop as `comfyfleet serve` runs.

Run from the repository root:  .venv/bin/python -m bench.ws_socket [--jobs 3000 --rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import aiohttp
import uvloop

from comfyfleet.comfy import websocket
from comfyfleet.comfy.messages import parse_text, unread
from comfyfleet.sim.frames import status_frame, text_frame, websocket_frame
from tests.test_websocket import answer_handshake


def job_writes(prompt_id: str) -> list[bytes]:
    """A job's frames on the wire, in the writes the simulator makes of them."""
    def frame(kind: str, **data: object) -> bytes:
        return websocket_frame(text_frame(kind, {**data, "prompt_id": prompt_id}))
    output = {"images": [{"filename": "invert_00001_.png", "subfolder": "", "type": "output"}]}
    state = {"3": {"value": 1, "max": 1, "state": "finished", "node_id": "3",
                   "prompt_id": prompt_id, "display_node_id": "3", "parent_node_id": None,
                   "real_node_id": "3"}}
    status = [websocket_frame(status_frame(1))] * 2
    run = [frame("execution_start", timestamp=1796662984138),
           frame("execution_cached", nodes=["1", "2", "3"], timestamp=1796662984138),
           frame("executed", node="3", display_node="3", output=output),
           frame("progress_state", nodes=state),
           frame("execution_success", timestamp=1796662984138)]
    end = [websocket_frame(status_frame(0)), frame("executing", node=None)]
    return [b"".join(status), b"".join(run), b"".join(end)]


async def serve(port: int, jobs: int, pause: float) -> None:
    writes = job_writes("894923cb-82ec-4fde-afeb-928eacc3485f")

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer_handshake(reader, writer)
        await reader.readexactly(7)  # the reader's start: a masked text frame of one byte
        for _ in range(jobs):
            for piece in writes:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(pause)
        writer.write(b"\x88\x02\x03\xe8")  # close, 1000
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", port)
    print("ready", flush=True)
    await server.serve_forever()


async def with_aiohttp(url: str, jobs: int) -> float:
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url, heartbeat=20,
                                      timeout=aiohttp.ClientWSTimeout(ws_close=5))
        started = time.process_time()
        await ws.send_str("x")
        async for frame in ws:
            if frame.type == aiohttp.WSMsgType.TEXT and not unread(frame.data.encode()):
                parse_text(frame.data)
        return (time.process_time() - started) / jobs * 1e6


async def with_lean(url: str, jobs: int) -> float:
    ws = await websocket.connect(url)
    started = time.process_time()
    ws.send_text(b"x")
    while (received := await ws.receive()) is not None:
        kind, data = received
        if kind == websocket.TEXT and not unread(data):
            parse_text(data)
    ws.close()
    return (time.process_time() - started) / jobs * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per turn")
    parser.add_argument("--rounds", type=int, default=5, help="turns of each client")
    parser.add_argument("--pause", type=float, default=0.0005,
                        help="seconds between the server's writes")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server's port
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.jobs, args.pause))
        return
    port = 18000 + os.getpid() % 1000
    server = subprocess.Popen([sys.executable, "-m", "bench.ws_socket", "--serve", str(port),
                               "--jobs", str(args.jobs), "--pause", str(args.pause)],
                              stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        url = f"http://127.0.0.1:{port}/ws"
        figures: dict[str, list[float]] = {"aiohttp": [], "lean (comfy/websocket.py)": []}
        for _ in range(args.rounds):
            figures["aiohttp"].append(uvloop.run(with_aiohttp(url, args.jobs)))
            figures["lean (comfy/websocket.py)"].append(uvloop.run(with_lean(url, args.jobs)))
    finally:
        server.kill()
        server.wait()
    print(f"CPU per job (us) reading its 9 frames in 3 reads, {args.jobs} jobs x "
          f"{args.rounds} turns each, load {os.getloadavg()[0]:.1f}")
    for name, values in figures.items():
        print(f"{name:<28} median {statistics.median(values):7.1f}   "
              + " ".join(f"{value:.1f}" for value in values))


if __name__ == "__main__":
    main()
